'use strict';

// The Zapier app, checked by Zapier's own schema and run by Zapier's own app tester against a live
// relay. tests/test_connector_zapier.py starts the relay (with a useapi.net stand-in and an audio
// host behind it, all on loopback) and runs `npm test` with RELAY_URL, RELAY_KEY, USEAPI_TOKEN and
// AUDIO_URL set; without RELAY_URL only the schema checks run.

const test = require('node:test');
const assert = require('node:assert/strict');
const zapier = require('zapier-platform-core');
const schemaTools = require('zapier-platform-core/src/tools/schema');
const cleaner = require('zapier-platform-core/src/tools/cleaner');
const CreateSchema = require('zapier-platform-schema/lib/schemas/CreateSchema');
const SearchSchema = require('zapier-platform-schema/lib/schemas/SearchSchema');
const TriggerSchema = require('zapier-platform-schema/lib/schemas/TriggerSchema');

const App = require('../index');
const { ANSWER_FIELDS } = require('../lib');

const appTester = zapier.createAppTester(App);
const live = Boolean(process.env.RELAY_URL);
const authData = {
  relay_url: process.env.RELAY_URL,
  relay_key: process.env.RELAY_KEY,
  useapi_token: process.env.USEAPI_TOKEN,
};
const cleaned = () => cleaner.recurseCleanFuncs(schemaTools.compileApp(App));

test('the app definition passes validateAppDefinition', () => {
  const errors = schemaTools.validateApp(schemaTools.compileApp(App));
  assert.deepEqual(errors, []);
});

test('each create, search and trigger passes its own schema (which also demands a sample)', () => {
  const app = cleaned();
  for (const create of Object.values(app.creates)) assert.deepEqual(CreateSchema.validate(create).errors, []);
  for (const search of Object.values(app.searches)) assert.deepEqual(SearchSchema.validate(search).errors, []);
  for (const trigger of Object.values(app.triggers)) assert.deepEqual(TriggerSchema.validate(trigger).errors, []);
  // The per-operation check is not a formality: a create without a sample fails it.
  const noSample = JSON.parse(JSON.stringify(app.creates.clone_voice));
  delete noSample.operation.sample;
  assert.notEqual(CreateSchema.validate(noSample).errors.length, 0);
});

test('every operation has input fields, output fields and a sample; clone answers field for field', () => {
  const app = cleaned();
  for (const kind of ['creates', 'searches', 'triggers']) {
    for (const [key, action] of Object.entries(app[kind])) {
      assert.ok(action.operation.inputFields.length > 0, `${key} has input fields`);
      assert.ok(action.operation.outputFields.length > 0, `${key} has output fields`);
      assert.ok(action.operation.sample, `${key} has a sample`);
      for (const field of action.operation.outputFields) {
        assert.ok(field.key.replace('[]', '') in action.operation.sample, `${key} sample has ${field.key}`);
      }
    }
  }
  assert.deepEqual(Object.keys(app.creates.clone_voice.operation.sample), ANSWER_FIELDS.map((f) => f.key.replace('[]', '')));
});

test('loading a sample in the Zap editor clones nothing and gives the sample', async () => {
  const bundle = { authData: {}, inputData: { audio_url: 'https://example.com/a.wav', name: 'x' }, meta: { isLoadingSample: true } };
  const answer = await appTester(App.creates.clone_voice.operation.perform, bundle);
  assert.deepEqual(answer, App.creates.clone_voice.operation.sample);
});

test('auth test reaches the relay and a wrong key is refused', { skip: !live }, async () => {
  const ok = await appTester(App.authentication.test, { authData });
  assert.equal(ok.ok, true);
  assert.equal(ok.useapi_token, 'request');
  await assert.rejects(appTester(App.authentication.test, { authData: { ...authData, relay_key: 'wrong' } }), /relay key/i);
});

const waitForJob = async (statusUrl) => {
  for (let i = 0; i < 200; i += 1) {
    const response = await fetch(statusUrl, { headers: { Authorization: `Bearer ${authData.relay_key}` } });
    const answer = await response.json();
    if (['ready', 'validated', 'failed'].includes(answer.status)) return answer;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  throw new Error('the clone job did not end');
};

test('Clone Voice starts with a callback URL and resumes with the callback body', { skip: !live }, async () => {
  const bundle = { authData, inputData: { audio_url: process.env.AUDIO_URL, name: 'From Zapier', if_exists: 'create' } };
  const started = await appTester(App.creates.clone_voice.operation.perform, bundle);
  assert.equal(started.ok, true);
  assert.ok(started.job_id);
  assert.equal(started.callback_status === 'pending' || started.status !== 'ready', true);
  // The relay POSTs the job's final answer to the callback URL; that body is what Zapier hands to
  // performResume as cleanedRequest. Read the same answer and resume with it.
  const final = await waitForJob(started.status_url);
  const resumed = await appTester(App.creates.clone_voice.operation.performResume, {
    authData,
    inputData: bundle.inputData,
    outputData: started,
    cleanedRequest: final,
  });
  assert.equal(resumed.status, 'ready');
  assert.match(resumed.cloned_voice_item_id, /^user:.+-voice:.+$/);
  assert.equal(resumed.job_id, started.job_id);
});

test('Clone Voice takes a file field: the URL Zapier hands over for a voice note is converted', { skip: !live || !process.env.FILE_URL }, async () => {
  // Zapier gives an app a URL for a file field (a Gmail attachment, a Drive file); the relay
  // downloads it, recognises Ogg Opus and converts it. A dry run: checked, nothing uploaded.
  const bundle = { authData, inputData: { audio_url: process.env.FILE_URL, name: 'Zapier File', dry_run: true } };
  const started = await appTester(App.creates.clone_voice.operation.perform, bundle);
  const final = await waitForJob(started.status_url);
  assert.equal(final.status, 'validated');
  assert.equal(final.source_format, 'opus');
  assert.equal(final.converted, true);
  assert.equal(final.audio_format, 'flac');
});

test('Find Voice finds the voice by name, New Cloned Voice lists it, Delete Voice removes it twice safely', { skip: !live }, async () => {
  const found = await appTester(App.searches.find_voice.operation.perform, { authData, inputData: { name: 'from zapier' } });
  assert.equal(found.length, 1);
  assert.equal(found[0].id, found[0].cloned_voice_item_id);
  const polled = await appTester(App.triggers.new_cloned_voice.operation.perform, { authData, inputData: {} });
  assert.ok(polled.some((voice) => voice.id === found[0].id));
  const first = await appTester(App.creates.delete_voice.operation.perform, {
    authData,
    inputData: { cloned_voice_item_id: found[0].id },
  });
  assert.equal(first.deleted, true);
  const again = await appTester(App.creates.delete_voice.operation.perform, {
    authData,
    inputData: { cloned_voice_item_id: found[0].id },
  });
  assert.equal(again.ok, true);
  assert.equal(again.deleted, false);
});

test('Clone Voice fails the step when the callback says the clone failed', async () => {
  const started = { ok: true, status: 'queued', job_id: 'j1', callback_status: 'pending' };
  const failed = { ok: false, status: 'failed', job_id: 'j1', error_code: 'not_audio', error_message: 'Expected audio but received an HTML web page.' };
  const resume = (cleanedRequest) =>
    appTester(App.creates.clone_voice.operation.performResume, { authData: {}, inputData: {}, outputData: started, cleanedRequest });
  await assert.rejects(resume(failed), /Expected audio but received an HTML web page/);
  await assert.rejects(resume({ ...failed, error_code: 'upstream_unauthorized', error_message: 'useapi.net refused the token.' }), (err) => err.name === 'ExpiredAuthError');
  const ready = await resume({ ok: true, status: 'ready', job_id: 'j1', cloned_voice_item_id: 'user:1-tempolor:2-voice:3' });
  assert.equal(ready.cloned_voice_item_id, 'user:1-tempolor:2-voice:3');
});

test('Find Voice fails rather than answer "not found" from a voice list cut short', async () => {
  // A server on loopback answering as the relay does when useapi's list runs out of time.
  const http = require('node:http');
  const server = http.createServer((request, response) => {
    response.setHeader('Content-Type', 'application/json');
    response.end(JSON.stringify({ ok: true, voices: [], complete: false, request_id: 'r1' }));
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  try {
    const relay = { relay_url: `http://127.0.0.1:${server.address().port}`, relay_key: 'k' };
    await assert.rejects(
      appTester(App.searches.find_voice.operation.perform, { authData: relay, inputData: { name: 'x' } }),
      /not certain/
    );
  } finally {
    server.close();
  }
});

test('a relay that kept nothing (restarting, out of room) is retried later; a clone that may be stored is not', async () => {
  const http = require('node:http');
  let answer;
  const server = http.createServer((request, response) => {
    response.statusCode = 503;
    response.setHeader('Content-Type', 'application/json');
    response.setHeader('Retry-After', '7');
    response.end(JSON.stringify(answer));
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  try {
    const bundle = { authData: { relay_url: `http://127.0.0.1:${server.address().port}`, relay_key: 'k' }, inputData: { audio_url: 'https://a/b.wav', name: 'x' } };
    const clone = () => appTester(App.creates.clone_voice.operation.perform, bundle);
    answer = { ok: false, status: 'failed', error_code: 'relay_restarting', error_message: 'The relay is restarting.' };
    await assert.rejects(clone(), (err) => err.name === 'ThrottledError' && JSON.parse(err.message).delay === 7);
    // status null: the clone may have been stored just before the database went away; a person decides.
    answer = { ok: false, status: null, error_code: 'database_unavailable', error_message: 'The database did not answer.' };
    await assert.rejects(clone(), (err) => err.name !== 'ThrottledError' && /did not answer/.test(err.message));
  } finally {
    server.close();
  }
});

test("a relay error surfaces the relay's error_message", { skip: !live }, async () => {
  const bundle = { authData, inputData: { audio_url: 'http://169.254.169.254/latest/meta-data', name: 'x' } };
  await assert.rejects(appTester(App.creates.clone_voice.operation.perform, bundle), /not a public internet address/);
});
