// src/session.js and the fetch it is given: a browser's fetch throws "Illegal invocation"
// when called as a method of another object, and a failure that is the client's (network,
// CORS, mixed content, cleartext blocked) is reported as the client's, not as "is the
// server running".

import assert from 'node:assert/strict';
import { createServer } from 'node:net';
import { test } from 'node:test';

import { ProtocolError, SplitSession } from '../src/session.js';

const opened = () => new Response(JSON.stringify({ session_id: 's1', token: 'tok', wire_dtype: 'float32',
  segment: 'middle', mode: 'u_shaped', max_batch: 8, next_step: 0, inputs: [], outputs: [] }),
{ status: 201, headers: { 'content-type': 'application/json' } });

/** Like a browser's window.fetch: refuses any `this` but the global object (or none). */
function strictFetch(calls) {
  return function fetch(url) {
    if (this !== undefined && this !== globalThis) throw new TypeError('Illegal invocation');
    calls.push(url);
    return Promise.resolve(opened());
  };
}

/** Run `fn` with some globals replaced (document, location, navigator, fetch), then restore them. */
async function withGlobals(values, fn) {
  const saved = Object.fromEntries(Object.keys(values).map((k) => [k,
    Object.getOwnPropertyDescriptor(globalThis, k)]));
  for (const [k, v] of Object.entries(values)) {
    Object.defineProperty(globalThis, k, { value: v, configurable: true, writable: true });
  }
  try {
    return await fn();
  } finally {
    for (const [k, d] of Object.entries(saved)) {
      if (d) Object.defineProperty(globalThis, k, d);
      else delete globalThis[k];
    }
  }
}

const quick = { retries: 1, backoff: 0, sleep: async () => {} };

test('the global fetch is called bound to the global object (no Illegal invocation)', async () => {
  const calls = [];
  await withGlobals({ fetch: strictFetch(calls) }, async () => {
    const session = new SplitSession({ serverUrl: 'http://server.test', key: 'k', ...quick });
    const info = await session.open();
    assert.equal(info.session_id, 's1');
  });
  assert.deepEqual(calls, ['http://server.test/v1/sessions']);
});

test('a fetch passed in is called as a plain function, not as a method of the session', async () => {
  const calls = [];
  const session = new SplitSession({ serverUrl: 'http://server.test', key: 'k',
    fetch: strictFetch(calls), ...quick });
  await session.open();
  assert.equal(calls.length, 1);
});

const failing = (error) => async () => { throw error; };

test('in a browser, a TypeError from fetch is named as the client side: network, CORS, mixed content',
  async () => {
    await withGlobals({ document: {}, location: { protocol: 'http:', origin: 'http://127.0.0.1:5173' } },
      async () => {
        const session = new SplitSession({ serverUrl: 'http://127.0.0.1:8000', key: 'k',
          fetch: failing(new TypeError('Failed to fetch')), ...quick });
        await assert.rejects(session.open(), (e) => {
          assert.ok(e instanceof ProtocolError);
          assert.equal(e.code, 'client_network');
          assert.match(e.message, /last: TypeError: Failed to fetch/);
          assert.match(e.message, /CORS/);
          assert.match(e.message, /splitkeras serve` --cors-origin http:\/\/127\.0\.0\.1:5173/);
          assert.match(e.message, /mixed content/);
          assert.doesNotMatch(e.message, /Is the server/);
          return true;
        });
      });
    await withGlobals({ document: {}, location: { protocol: 'https:', origin: 'https://app.example.org' } },
      async () => {
        const session = new SplitSession({ serverUrl: 'http://10.0.2.2:8000', key: 'k',
          fetch: failing(new TypeError('Failed to fetch')), ...quick });
        await assert.rejects(session.open(), (e) => e.code === 'client_network' && /Mixed content: this page is https and the server URL http:\/\/10\.0\.2\.2:8000 is http/.test(e.message));
      });
  });

test('in React Native, a TypeError from fetch names the network and blocked cleartext http', async () => {
  await withGlobals({ navigator: { product: 'ReactNative' } }, async () => {
    const session = new SplitSession({ serverUrl: 'http://192.0.2.1:8000', key: 'k',
      fetch: failing(new TypeError('Network request failed')), ...quick });
    await assert.rejects(session.open(), (e) => e.code === 'client_network'
      && /usesCleartextTraffic/.test(e.message) && /App Transport Security/.test(e.message)
      && !/Is the server/.test(e.message));
  });
});

test('in Node, a refused connection says so and asks whether the server runs', async () => {
  const port = await new Promise((resolve) => {
    const server = createServer();
    server.listen(0, '127.0.0.1', () => {
      const { port: free } = server.address();
      server.close(() => resolve(free));
    });
  });
  const session = new SplitSession({ serverUrl: `http://127.0.0.1:${port}`, key: 'k', ...quick });
  await assert.rejects(session.open(), (e) => e.code === 'unreachable'
    && /\(ECONNREFUSED\)/.test(e.message) && /nothing accepted the connection/.test(e.message)
    && /Is the server \(`splitkeras serve`\) running/.test(e.message));
});

test('a timeout is reported as a timeout', async () => {
  const hanging = (url, { signal }) => new Promise((_, reject) => {
    signal.addEventListener('abort', () => reject(new DOMException('aborted', 'AbortError')));
  });
  const session = new SplitSession({ serverUrl: 'http://server.test', key: 'k', fetch: hanging,
    timeoutMs: 20, ...quick });
  await assert.rejects(session.open(), (e) => e.code === 'timeout'
    && /No answer within timeoutMs \(20 ms\)/.test(e.message));
});

test('a fetch that throws Illegal invocation is named as such', async () => {
  const session = new SplitSession({ serverUrl: 'http://server.test', key: 'k', ...quick,
    fetch: failing(new TypeError("Failed to execute 'fetch' on 'Window': Illegal invocation")) });
  await assert.rejects(session.open(), (e) => e.code === 'client_network'
    && /called with the wrong `this`/.test(e.message));
});

test('in a browser the body goes as a Blob of the same bytes; elsewhere as the Uint8Array', async () => {
  const bodies = [];
  const capture = async (url, init) => { bodies.push(init.body); return opened(); };
  await withGlobals({ document: {}, location: { protocol: 'http:', origin: 'http://127.0.0.1:1' } }, async () => {
    await new SplitSession({ serverUrl: 'http://server.test', key: 'k', fetch: capture, ...quick }).open();
  });
  await withGlobals({ document: {}, navigator: { product: 'ReactNative' } }, async () => {
    await new SplitSession({ serverUrl: 'http://server.test', key: 'k', fetch: capture, ...quick }).open();
  });
  await new SplitSession({ serverUrl: 'http://server.test', key: 'k', fetch: capture, ...quick }).open();
  assert.ok(bodies[0] instanceof Blob);
  assert.ok(bodies[1] instanceof Uint8Array && bodies[2] instanceof Uint8Array);
  assert.deepEqual(new Uint8Array(await bodies[0].arrayBuffer()), bodies[2]);
});

test('HTTP 503 every time is the server side', async () => {
  const session = new SplitSession({ serverUrl: 'http://server.test', key: 'k', ...quick,
    fetch: async () => new Response('busy', { status: 503 }) });
  await assert.rejects(session.open(), (e) => e.status === 503 && /answered HTTP 503 every time/.test(e.message));
});
