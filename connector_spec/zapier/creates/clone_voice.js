'use strict';

const { relayUrl, ANSWER_FIELDS, ANSWER_SAMPLE } = require('../lib');

// Zapier gives an action 30 s. The relay answers at once (202, job_id) and POSTs the final answer to
// the callback URL when the clone ends; Zapier then runs performResume with that body.
const perform = async (z, bundle) => {
  if (bundle.meta && bundle.meta.isLoadingSample) {
    // "Test step" in the Zap editor: no real clone (it would take a paid voice slot); a typical answer.
    return ANSWER_SAMPLE;
  }
  const body = {
    audio_url: bundle.inputData.audio_url,
    name: bundle.inputData.name,
    user_id: bundle.inputData.user_id,
    if_exists: bundle.inputData.if_exists,
    dry_run: bundle.inputData.dry_run,
    callback_url: z.generateCallbackUrl(),
    wait_seconds: 0,
  };
  const response = await z.request({ url: `${relayUrl(bundle)}/v1/voice-clones`, method: 'POST', body });
  return response.data;
};

// The callback's body is the job's final answer: a clone that failed fails the step (with the relay's
// error_message and error_code), as a refusal at the start does; a finished clone is the step's output.
const performResume = async (z, bundle) => {
  const answer = { ...bundle.outputData, ...bundle.cleanedRequest };
  if (answer.ok === false) {
    const message = answer.error_message || `The clone failed (${answer.error_code || 'no error code'}).`;
    if (answer.error_code === 'upstream_unauthorized') throw new z.errors.ExpiredAuthError(message);
    throw new z.errors.Error(message, answer.error_code || 'clone_failed');
  }
  return answer;
};

module.exports = {
  key: 'clone_voice',
  noun: 'Voice',
  display: {
    label: 'Clone Voice',
    description: 'Clones a voice at useapi.net (TemPolor) from a recording (a file or a link); continues when the clone is ready.',
  },
  operation: {
    inputFields: [
      {
        key: 'audio_url',
        label: 'Audio File',
        required: true,
        // A file field: map a file from any step (Gmail attachment, Drive file, form upload) or type a
        // link. Zapier hands the app a public URL for it either way, which the relay downloads.
        type: 'file',
        helpText:
          'The recording: a file from an earlier step, or a public link (direct, Google Drive or Dropbox). ' +
          'WAV, MP3, FLAC, M4A, or a voice note, browser recording or video (Ogg/Opus, WebM, AAC, AMR, MP4, MOV…), which the relay converts.',
      },
      { key: 'name', label: 'Voice Name', required: true, type: 'string', helpText: '1-100 characters.' },
      {
        key: 'user_id',
        label: 'TemPolor Account (user_id)',
        required: false,
        type: 'string',
        helpText: 'Only when your useapi.net token has several TemPolor accounts.',
      },
      {
        key: 'if_exists',
        label: 'If a Voice With This Name Exists',
        required: false,
        default: 'create',
        choices: { create: 'Clone anyway', reuse: 'Reuse it (no upload)', fail: 'Fail' },
      },
      { key: 'dry_run', label: 'Dry Run (Validate Only)', required: false, type: 'boolean', default: 'false' },
    ],
    perform,
    performResume,
    outputFields: ANSWER_FIELDS,
    sample: ANSWER_SAMPLE,
  },
};
