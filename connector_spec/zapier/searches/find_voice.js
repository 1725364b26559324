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
      const voices = response.data.voices.map(withId);
      if (!voices.length && response.data.complete === false) {
        // The listing ran out of time before its end: "not found" could make a Find-or-Create Zap
        // clone (and pay for) a voice that exists. Fail the step instead; Zapier can replay it.
        throw new z.errors.Error(
          'The voice list could not be read to its end in time, so "not found" is not certain. Try again.',
          'listing_incomplete'
        );
      }
      return voices;
    },
    outputFields: VOICE_FIELDS,
    sample: VOICE_SAMPLE,
  },
};
