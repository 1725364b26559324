'use strict';

const authentication = require('./authentication');
const cloneVoice = require('./creates/clone_voice');
const deleteVoice = require('./creates/delete_voice');
const findVoice = require('./searches/find_voice');
const newClonedVoice = require('./triggers/new_cloned_voice');

// Every request carries the relay key and, when given, the useapi.net token.
const addHeaders = (request, z, bundle) => {
  request.headers = request.headers || {};
  request.headers.Authorization = `Bearer ${bundle.authData.relay_key}`;
  if (bundle.authData.useapi_token) {
    request.headers['X-Useapi-Token'] = bundle.authData.useapi_token;
  }
  return request;
};

const NOTHING_KEPT = ['relay_restarting', 'upload_storage_full', 'database_unavailable'];

// The relay answers every failure in one shape: surface its error_message (and code) in Zapier.
const relayErrors = (response, z) => {
  if (response.status >= 400) {
    let answer = {};
    try {
      answer = typeof response.data === 'object' && response.data ? response.data : JSON.parse(response.content);
    } catch (err) {
      answer = {};
    }
    const message = answer.error_message || `The relay answered HTTP ${response.status}.`;
    if (response.status === 401 && answer.error_code === 'unauthorized') {
      throw new z.errors.ExpiredAuthError(message);
    }
    // The relay is restarting, or briefly out of room or database, and kept nothing of the request
    // (status "failed", never null): Zapier tries the step again after Retry-After, no one has to.
    if (response.status === 503 && NOTHING_KEPT.includes(answer.error_code) && answer.status === 'failed') {
      const delay = parseInt(response.getHeader('retry-after'), 10);
      throw new z.errors.ThrottledError(message, Number.isFinite(delay) && delay > 0 ? delay : 10);
    }
    throw new z.errors.Error(message, answer.error_code || 'relay_error', response.status);
  }
  return response;
};

module.exports = {
  version: require('./package.json').version,
  platformVersion: require('zapier-platform-core').version,
  authentication,
  beforeRequest: [addHeaders],
  afterResponse: [relayErrors],
  triggers: { [newClonedVoice.key]: newClonedVoice },
  searches: { [findVoice.key]: findVoice },
  creates: { [cloneVoice.key]: cloneVoice, [deleteVoice.key]: deleteVoice },
};
