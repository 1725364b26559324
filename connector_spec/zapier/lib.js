'use strict';

// Shared pieces of the Zapier app: where the relay is, the answer's fields, and samples.

const relayUrl = (bundle) => String(bundle.authData.relay_url || '').replace(/\/+$/, '');

// The relay's normalized answer, field for field (see connector_spec/openapi.yaml, schema Answer).
const ANSWER_FIELDS = [
  { key: 'ok', label: 'OK', type: 'boolean' },
  { key: 'status', label: 'Status (queued, running, processing, ready, validated, failed)' },
  { key: 'cloned_voice_item_id', label: 'Cloned Voice Item ID' },
  { key: 'item_id', label: 'Item ID' },
  { key: 'name', label: 'Voice Name' },
  { key: 'user_id', label: 'TemPolor Account (user_id)' },
  { key: 'message', label: 'Message' },
  { key: 'error_code', label: 'Error Code' },
  { key: 'error_message', label: 'Error Message' },
  { key: 'upstream_status', label: 'useapi.net HTTP Status', type: 'integer' },
  { key: 'audio_format', label: 'Audio Format' },
  { key: 'audio_content_type', label: 'Audio Content Type' },
  { key: 'audio_bytes', label: 'Audio Size (bytes)', type: 'integer' },
  { key: 'audio_duration_seconds', label: 'Audio Duration (s)', type: 'number' },
  { key: 'audio_sample_rate', label: 'Sample Rate (Hz)', type: 'integer' },
  { key: 'audio_channels', label: 'Channels', type: 'integer' },
  { key: 'source_format', label: 'Received Format' },
  { key: 'converted', label: 'Converted Before Upload', type: 'boolean' },
  { key: 'audio_peak_dbfs', label: 'Peak Level (dBFS)', type: 'number' },
  { key: 'audio_rms_dbfs', label: 'RMS Level (dBFS)', type: 'number' },
  { key: 'dry_run', label: 'Dry Run', type: 'boolean' },
  { key: 'reused', label: 'Reused an Existing Voice', type: 'boolean' },
  { key: 'request_id', label: 'Request ID' },
  { key: 'warnings[]', label: 'Warnings' },
  { key: 'metadata', label: 'Metadata' },
  { key: 'job_id', label: 'Job ID' },
  { key: 'status_url', label: 'Status URL' },
  { key: 'created_at', label: 'Created At', type: 'datetime' },
  { key: 'updated_at', label: 'Updated At', type: 'datetime' },
  { key: 'completed_at', label: 'Completed At', type: 'datetime' },
  { key: 'queue_position', label: 'Queue Position', type: 'integer' },
  { key: 'callback_status', label: 'Callback Status' },
];

// One cloned voice, flat (schema Voice); `id` is what Zapier dedupes and references by.
const VOICE_FIELDS = [
  { key: 'id', label: 'ID (= Cloned Voice Item ID)' },
  { key: 'cloned_voice_item_id', label: 'Cloned Voice Item ID' },
  { key: 'item_id', label: 'Item ID' },
  { key: 'name', label: 'Name' },
  { key: 'status', label: 'Status (ready, processing, failed)' },
  { key: 'upstream_status_code', label: 'useapi.net Status Code', type: 'integer' },
  { key: 'vocal_url', label: 'Vocal Sample URL' },
  { key: 'created_at', label: 'Created At', type: 'datetime' },
  { key: 'updated_at', label: 'Updated At', type: 'datetime' },
  { key: 'user_id', label: 'TemPolor Account (user_id)' },
];

const VOICE_ID = 'user:12345-tempolor:67890-voice:abcdef123456789';

const ANSWER_SAMPLE = {
  ok: true,
  status: 'ready',
  cloned_voice_item_id: VOICE_ID,
  item_id: 'abcdef123456789',
  name: 'My voice',
  user_id: '67890',
  message: 'The voice is cloned and ready: use cloned_voice_item_id with POST music/song.',
  error_code: null,
  error_message: null,
  upstream_status: 200,
  audio_format: 'm4a',
  audio_content_type: 'audio/mp4',
  audio_bytes: 9384,
  audio_duration_seconds: 2.046,
  audio_sample_rate: 22050,
  audio_channels: 2,
  source_format: 'm4a',
  converted: false,
  audio_peak_dbfs: -1.2,
  audio_rms_dbfs: -21.3,
  dry_run: false,
  reused: false,
  request_id: '3f0c2b9e5d6a4f1e8b7c9d0a1b2c3d4e',
  warnings: [],
  metadata: null,
  job_id: '5018e74be430411d905919bb0e9dbedd',
  status_url: 'https://relay.example.com/v1/voice-clones/5018e74be430411d905919bb0e9dbedd',
  created_at: '2026-11-25T07:59:50Z',
  updated_at: '2026-11-25T07:59:52Z',
  completed_at: '2026-11-25T07:59:52Z',
  queue_position: null,
  callback_status: 'delivered',
};

const VOICE_SAMPLE = {
  id: VOICE_ID,
  cloned_voice_item_id: VOICE_ID,
  item_id: 'abcdef123456789',
  name: 'My voice',
  status: 'ready',
  upstream_status_code: 30,
  vocal_url: 'https://cdn.example.com/cloned-voice/abcdef123456789.mp3',
  created_at: '2024-05-24T15:43:45Z',
  updated_at: '2024-05-24T15:48:20Z',
  user_id: '67890',
};

const withId = (voice) => ({ id: voice.cloned_voice_item_id, ...voice });

module.exports = { relayUrl, ANSWER_FIELDS, VOICE_FIELDS, ANSWER_SAMPLE, VOICE_SAMPLE, withId };
