'use strict';

const { relayUrl, VOICE_FIELDS, VOICE_SAMPLE, withId } = require('../lib');

module.exports = {
  key: 'find_voice',
  noun: 'Voice',
  display: { label: 'Find Voice', description: 'Finds a cloned voice by its name (exact, any case).' },
  operation: {
    inputFields: [
      { key: 'name', label: 'Voice Name', required: true, type: 'string' },
      { key: 'user_id', label: 'TemPolor Account (user_id)', required: false, type: 'string' },
    ],
    perform: async (z, bundle) => {
      const response = await z.request({
        url: `${relayUrl(bundle)}/v1/voices`,
        params: { name: bundle.inputData.name, user_id: bundle.inputData.user_id || '' },
      });
      return response.data.voices.map(withId);
    },
    outputFields: VOICE_FIELDS,
    sample: VOICE_SAMPLE,
  },
};
