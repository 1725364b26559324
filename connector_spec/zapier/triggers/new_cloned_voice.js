'use strict';

const { relayUrl, VOICE_FIELDS, VOICE_SAMPLE, withId } = require('../lib');

module.exports = {
  key: 'new_cloned_voice',
  noun: 'Voice',
  display: { label: 'New Cloned Voice', description: 'Triggers when a cloned voice becomes ready on the account.' },
  operation: {
    type: 'polling',
    inputFields: [{ key: 'user_id', label: 'TemPolor Account (user_id)', required: false, type: 'string' }],
    perform: async (z, bundle) => {
      const response = await z.request({
        url: `${relayUrl(bundle)}/v1/voices`,
        params: { status: 'ready', user_id: bundle.inputData.user_id || '' },
      });
      // Newest first; Zapier dedupes by `id`.
      return response.data.voices
        .map(withId)
        .sort((a, b) => String(b.created_at || '').localeCompare(String(a.created_at || '')));
    },
    outputFields: VOICE_FIELDS,
    sample: VOICE_SAMPLE,
  },
};
