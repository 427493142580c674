// src/session.js against a mocked fetch: retries with backoff on transient failures
// (same bytes every time), Retry-After, and the protocol recoveries of
// docs/protocol.md (forward_lost, unknown_session, step_out_of_order).

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { MEDIA_TYPE, decodeTensors, encodeTensors } from '../src/wire.js';
import { ProtocolError, SplitSession } from '../src/session.js';

const URL_BASE = 'http://server.test';
const ACT = [{ name: 'h', dtype: 'float32', shape: [1, 2], data: new Float32Array([1, 2]) }];

const json = (status, body) => new Response(JSON.stringify(body), {
  status, headers: { 'content-type': 'application/json' },
});
const tensors = (list) => new Response(encodeTensors(list), {
  status: 200, headers: { 'content-type': MEDIA_TYPE },
});
const refusal = (status, code, extra = {}) => json(status, { error: { code, message: `msg ${code}`, ...extra } });

/** A scripted fetch: each call is logged and answered by the next handler. */
function scripted(handlers) {
  const calls = [];
  const fetch = async (url, init) => {
    const body = init.body ? new Uint8Array(init.body) : null;
    calls.push({ url: url.replace(URL_BASE, ''), method: init.method, body,
      auth: init.headers.Authorization, step: init.headers['Splitkeras-Step'] });
    const handler = handlers.shift();
    if (!handler) throw new Error(`unexpected request ${init.method} ${url}`);
    return handler(url, init);
  };
  return { fetch, calls };
}

const opened = (id = 's1', nextStep = 0) => () => json(201, {
  session_id: id, token: `tok-${id}`, wire_dtype: 'float32', segment: 'middle', mode: 'u_shaped',
  max_batch: 8, next_step: nextStep, inputs: [], outputs: [],
});

function session(fetch, extra = {}) {
  const sleeps = [];
  const s = new SplitSession({ serverUrl: `${URL_BASE}/`, key: 'k', fetch, backoff: 200,
    maxBackoff: 5000, jitter: 0, sleep: async (ms) => { sleeps.push(ms); }, ...extra });
  return { s, sleeps };
}

test('the default retry budget outlasts a server restart of a minute (64-107 s, jittered)', async () => {
  const sleeps = [];
  const down = async () => { throw new TypeError('Network request failed'); };
  const s = new SplitSession({ serverUrl: URL_BASE, key: 'k', fetch: down,
    sleep: async (ms) => { sleeps.push(ms); } });
  await assert.rejects(s.open(), ProtocolError);
  const total = sleeps.reduce((a, b) => a + b, 0);
  assert.equal(sleeps.length, 12);
  assert.ok(total >= 64000 && total <= 107000, `waited ${total} ms in all`);
  assert.ok(new Set(sleeps.map((ms) => Math.round(ms))).size > 6, 'the waits are jittered');
});

test('a transient failure is retried with exponential backoff and the same bytes', async () => {
  const { fetch, calls } = scripted([
    opened(),
    () => { throw new TypeError('Network request failed'); },
    () => new Response('bad gateway', { status: 502 }),
    () => tensors([{ name: 'm', dtype: 'float32', shape: [1, 2], data: new Float32Array([3, 4]) }]),
  ]);
  const { s, sleeps } = session(fetch);
  await s.open();
  const { tensors: out } = await s.forward(0, ACT);
  assert.deepEqual([...out.m.data], [3, 4]);
  assert.deepEqual(sleeps, [200, 400]);
  const posts = calls.filter((c) => c.url.endsWith('/forward'));
  assert.equal(posts.length, 3);
  assert.ok(posts.every((c) => c.url === '/v1/sessions/s1/forward' && c.step === '0'));
  assert.ok(posts.every((c) => c.auth === 'Bearer tok-s1'));
  assert.deepEqual(posts[1].body, posts[0].body);
  assert.deepEqual(posts[2].body, posts[0].body);
  assert.equal(s.stats.retries, 2);
  assert.equal(s.stats.bytesSent, calls.reduce((n, c) => n + (c.body?.byteLength ?? 0), 0));
});

test('Retry-After is honoured up to maxBackoff', async () => {
  const { fetch } = scripted([opened(),
    () => new Response('', { status: 503, headers: { 'retry-after': '2' } }),
    () => new Response('', { status: 503, headers: { 'retry-after': '60' } }),
    () => tensors([])]);
  const { s, sleeps } = session(fetch);
  await s.open();
  await s.forward(0, ACT);
  assert.deepEqual(sleeps, [2000, 5000]);
});

test('after the retries, a ProtocolError says what failed and where', async () => {
  const { fetch } = scripted([opened(), ...Array(3).fill(() => { throw new TypeError('refused'); })]);
  const { s, sleeps } = session(fetch, { retries: 2 });
  await s.open();
  await assert.rejects(s.forward(0, ACT), (e) => e instanceof ProtocolError && e.code === 'unreachable'
    && /Could not complete forward of step 0 .* after 3 attempts \(last: TypeError: refused\)/.test(e.message));
  assert.deepEqual(sleeps, [200, 400]);
});

test('a 4xx is not retried and keeps the server code', async () => {
  const { fetch, calls } = scripted([opened(), () => refusal(400, 'bad_tensor')]);
  const { s } = session(fetch);
  await s.open();
  await assert.rejects(s.forward(0, ACT), (e) => e.status === 400 && e.code === 'bad_tensor'
    && /refused forward of step 0 .*\(400 bad_tensor\): msg bad_tensor/.test(e.message));
  assert.equal(calls.length, 2);
});

test('a wrong or missing key is one clear error', async () => {
  const { fetch } = scripted([() => refusal(401, 'unauthorized')]);
  const s = new SplitSession({ serverUrl: URL_BASE, fetch });
  await assert.rejects(s.open(), /401 unauthorized.*No key was given/);
});

test('backward after forward_lost resends the forward with the same bytes, then backward', async () => {
  const grads = [{ name: 'h', dtype: 'float32', shape: [1, 2], data: new Float32Array([5, 6]) }];
  const { fetch, calls } = scripted([opened(),
    () => tensors([]), // forward 0
    () => refusal(409, 'forward_lost', { expected_step: 0 }), // backward 0: server restarted
    () => tensors([]), // forward 0 again
    () => tensors(grads)]); // backward 0
  const { s } = session(fetch);
  await s.open();
  await s.forward(0, ACT);
  const { tensors: out } = await s.backward(0, [{ name: 'm', dtype: 'float32', shape: [1, 2],
    data: new Float32Array([1, 1]) }]);
  assert.deepEqual([...out.h.data], [5, 6]);
  const routes = calls.slice(1).map((c) => `${c.step}/${c.url.split('/').at(-1)}`);
  assert.deepEqual(routes, ['0/forward', '0/backward', '0/forward', '0/backward']);
  assert.ok(calls.slice(1).every((c) => c.url.startsWith('/v1/sessions/s1/')));
  assert.deepEqual(calls[3].body, calls[1].body);
  assert.equal(s.stats.recoveries, 1);
});

test('unknown_session reopens a session and continues at its next_step', async () => {
  const { fetch, calls } = scripted([opened('s1'),
    () => tensors([]), // forward 0 on s1
    () => refusal(404, 'unknown_session'), // backward 0: s1 is gone
    () => refusal(404, 'unknown_session'), // DELETE s1 (best effort)
    opened('s2', 7), // a new session
    () => tensors([]), // forward resent as step 7
    () => tensors([])]); // backward 7
  const { s } = session(fetch);
  await s.open();
  await s.forward(0, ACT);
  await s.backward(0, []);
  assert.deepEqual(calls.map((c) => `${c.method} ${c.url}${c.step === undefined ? '' : ` step ${c.step}`}`)
    .slice(2), ['POST /v1/sessions/s1/backward step 0', 'DELETE /v1/sessions/s1', 'POST /v1/sessions',
    'POST /v1/sessions/s2/forward step 7', 'POST /v1/sessions/s2/backward step 7']);
  assert.equal(calls.at(-1).auth, 'Bearer tok-s2');
});

test('step_out_of_order on a forward resyncs to the expected step', async () => {
  const { fetch, calls } = scripted([opened('s1', 3),
    () => refusal(409, 'step_out_of_order', { expected_step: 5 }),
    () => json(200, { session_id: 's1', next_step: 5, pending_step: null, applied_steps: 5 }),
    () => tensors([])]);
  const { s } = session(fetch);
  await s.open();
  await s.forward(0, ACT);
  assert.deepEqual(calls.map((c) => `${c.url}${c.step === undefined ? '' : ` step ${c.step}`}`).slice(1),
    ['/v1/sessions/s1/forward step 3', '/v1/sessions/s1', '/v1/sessions/s1/forward step 5']);
});

test('float16 sessions send half the float bytes', async () => {
  const { fetch, calls } = scripted([opened(), () => tensors([])]);
  const { s } = session(fetch, { wireDtype: 'float16' });
  await s.open();
  const data = new Float32Array(64).fill(0.5);
  await s.forward(0, [{ name: 'h', dtype: 'float32', shape: [1, 64], data }]);
  const { tensors: sent } = decodeTensors(calls[1].body);
  assert.deepEqual([...sent.h.data], [...data]);
  assert.ok(calls[1].body.byteLength < 64 * 4);
  assert.equal(JSON.parse(new TextDecoder().decode(calls[0].body)).wire_dtype, 'float16');
});
