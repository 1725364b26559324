'use strict';

const { relayUrl } = require('../lib');

module.exports = {
  key: 'delete_voice',
  noun: 'Voice',
  display: {
    label: 'Delete Voice',
    description: 'Deletes a cloned voice. A voice that is already gone is not an error (Deleted Now is false).',
  },
  operation: {
    inputFields: [{ key: 'cloned_voice_item_id', label: 'Cloned Voice Item ID', required: true, type: 'string' }],
    perform: async (z, bundle) => {
      const id = encodeURIComponent(bundle.inputData.cloned_voice_item_id).replace(/%3A/gi, ':');
      const response = await z.request({ url: `${relayUrl(bundle)}/v1/voices/${id}`, method: 'DELETE' });
      return response.data;
    },
    outputFields: [
      { key: 'ok', label: 'OK', type: 'boolean' },
      { key: 'deleted', label: 'Deleted Now (false: was already gone)', type: 'boolean' },
      { key: 'cloned_voice_item_id', label: 'Cloned Voice Item ID' },
      { key: 'request_id', label: 'Request ID' },
    ],
    sample: {
      ok: true,
      deleted: true,
      cloned_voice_item_id: 'user:12345-tempolor:67890-voice:abcdef123456789',
      request_id: '3f0c2b9e5d6a4f1e8b7c9d0a1b2c3d4e',
    },
  },
};
