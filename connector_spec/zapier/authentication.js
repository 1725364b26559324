'use strict';

const { relayUrl } = require('./lib');

module.exports = {
  type: 'custom',
  fields: [
    {
      key: 'relay_url',
      label: 'Relay URL',
      required: true,
      type: 'string',
      helpText: 'Where your relay runs, for example `https://my-relay.herokuapp.com`.',
    },
    {
      key: 'relay_key',
      label: 'Relay Key',
      required: true,
      type: 'password',
      helpText: "The relay's `RELAY_API_KEY` (Heroku: Settings → Config Vars).",
    },
    {
      key: 'useapi_token',
      label: 'useapi.net API Token',
      required: false,
      type: 'password',
      helpText: 'Optional: your useapi.net token. Leave empty when the relay has `USEAPI_TOKEN` set.',
    },
  ],
  test: async (z, bundle) => {
    const response = await z.request({ url: `${relayUrl(bundle)}/v1/auth` });
    return response.data;
  },
  connectionLabel: (z, bundle) => relayUrl(bundle).replace(/^https?:\/\//, ''),
};
