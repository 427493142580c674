// tools/slow_link.mjs, the emulated link of benchmarks/pipelining_js.py: latency per direction
// per request, bandwidth serialised per direction across the requests in flight (a shared
// link), only the latency overlapping.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { slowLink } from '../tools/slow_link.mjs';

test('two requests in flight share the uplink: the second body waits for the first', async () => {
  const calls = [];
  const t0 = performance.now();
  const inner = async () => {
    calls.push(performance.now() - t0);
    return new Response(new Uint8Array(2500)); // 20 ms down at 1 Mbit/s
  };
  const link = slowLink(inner, { latencyMs: 50, upMbit: 1, downMbit: 1 });
  const body = new Uint8Array(15000); // 120 ms up at 1 Mbit/s
  const answers = await Promise.all([link('u', { body }), link('u', { body })]);
  calls.sort((a, b) => a - b);
  assert.ok(calls[0] >= 170 - 1, `first body through after ${calls[0]} ms`); // 120 + 50
  assert.ok(calls[1] >= 290 - 1, `second body through after ${calls[1]} ms`); // 240 + 50: serialised
  assert.ok(performance.now() - t0 >= 290 + 20 + 50 - 1);
  assert.deepEqual(link.stats(), { upBusyMs: 240, downBusyMs: 40 });
  for (const answer of answers) assert.equal((await answer.arrayBuffer()).byteLength, 2500);
});

test('without bandwidth limits only the latency is added, each way', async () => {
  const t0 = performance.now();
  const link = slowLink(async () => new Response('ok'), { latencyMs: 30 });
  const answer = await link('u', { body: new Uint8Array(10) });
  assert.ok(performance.now() - t0 >= 60 - 1);
  assert.equal(await answer.text(), 'ok');
  assert.deepEqual(link.stats(), { upBusyMs: 0, downBusyMs: 0 });
});
