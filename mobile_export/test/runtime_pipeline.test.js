// SplitDevice.fit({pipelineDepth}) (src/pipeline.js) against an in-memory server that
// enforces the pipelined protocol (docs/protocol.md): forward k only when k is newer than
// every pending step and fewer than max_pending_steps are pending (else 409 pipeline_full),
// backward only for the OLDEST pending step (FIFO; else step_out_of_order), exactly once per
// step (a repeated forward or backward gets the cached bytes and runs nothing). Its answers
// come after a few milliseconds (a backward after more than a forward, as when the device's
// tail and the gradients take longer than the head), so the requests of several steps are
// really in flight at once and the pipeline fills. The server's middle is m = h @ W; the device's head (tanh dense) and tail (softmax)
// train, as in runtime_fit.test.js.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import * as tf from '@tensorflow/tfjs';

import { MEDIA_TYPE, decodeTensors, encodeTensors } from '../src/wire.js';
import { ProtocolError, SplitDevice, SplitDeviceError } from '../src/runtime.js';

await tf.setBackend('cpu');
const spec = (name, width) => ({ name, shape: [null, width], dtype: 'float32' });
const MANIFEST = { format: 'splitkeras.split', format_version: 1, cuts: [], source: {},
  model_inputs: [spec('x', 3)], model_outputs: [{ name: 'out', shape: [null], dtype: 'int32' }],
  segments: [
    { name: 'head', placement: 'device', keras_file: 'h.keras', inputs: [spec('x', 3)], outputs: [spec('h', 4)] },
    { name: 'middle', placement: 'server', keras_file: 'm.keras', inputs: [spec('h', 4)], outputs: [spec('m', 2)] },
    { name: 'tail', placement: 'device', keras_file: 't.keras', inputs: [spec('m', 2)], outputs: [spec('out', 3)] },
  ],
  training: { optimizer: { class_name: 'SGD', config: { learning_rate: 0.1 } },
    loss: 'sparse_categorical_crossentropy', metrics: ['accuracy'] } };

function head() {
  const x = tf.input({ shape: [3], name: 'x' });
  const h = tf.layers.dense({ units: 4, activation: 'tanh', name: 'h_dense',
    kernelInitializer: tf.initializers.glorotUniform({ seed: 1 }) }).apply(x);
  return tf.model({ inputs: x, outputs: h, name: 'head' });
}
function tail() {
  const m = tf.input({ shape: [2], name: 'm' });
  const out = tf.layers.dense({ units: 3, activation: 'softmax', name: 'out',
    kernelInitializer: tf.initializers.glorotUniform({ seed: 2 }) }).apply(m);
  return tf.model({ inputs: m, outputs: out, name: 'tail' });
}

const W = tf.tensor([[0.5, -1], [1, 0.25], [-0.5, 0.75], [0.3, 0.2]]);
const json = (status, body) => new Response(JSON.stringify(body), { status,
  headers: { 'content-type': 'application/json' } });
const refuse = (code, expected) => json(409, { error: { code, message: `refused: ${code}`,
  expected_step: expected } });
const later = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

/**
 * The pipelined protocol in memory. `maxPending`: the max_pending_steps it advertises
 * (null: an older server that does not send it, which holds one step); `refuseAt`: the
 * pending count at which it answers pipeline_full (default maxPending); `faults(request)`:
 * a Response to answer instead (a 503, a lost session), or null; `delay`: milliseconds before
 * it answers, by route; `holdUntil(step)`: a backward of `step` is answered only once that
 * step's forward has arrived (the pipeline is full, whatever the machine's load).
 */
function pipelinedServer({ maxPending = 4, refuseAt, faults = () => null,
  delay = { backward: 8 }, holdUntil = null, aggregation = null } = {}) {
  const limit = refuseAt ?? maxPending ?? 1;
  const sessions = new Map();
  const log = []; // every request: {route, step, session, body bytes, pendingAtArrival}
  const stats = { applied: 0, forwardsRun: 0, maxPending: 0, opens: 0 };
  let opened = 0;
  const answer = (list) => new Response(encodeTensors(list), { status: 200,
    headers: { 'content-type': MEDIA_TYPE } });
  const tensor = ({ data, shape }) => tf.tensor(data, shape);
  const out = (name, t) => ({ name, dtype: 'float32', shape: t.shape, data: Float32Array.from(t.dataSync()) });
  const fetch = async (url, init) => {
    const path = url.replace('http://fake', '');
    const id = path.split('/')[3];
    const route = path === '/v1/sessions' ? 'open' : (init.method === 'DELETE' ? 'close'
      : (init.method === 'GET' ? 'state' : path.split('/').at(-1)));
    const step = init.headers['Splitkeras-Step'] === undefined ? null : Number(init.headers['Splitkeras-Step']);
    const session = sessions.get(id);
    const entry = { route, step, session: id, body: init.body ? new Uint8Array(init.body) : null,
      pendingAtArrival: session ? [...session.pending.keys()] : null };
    log.push(entry);
    await later(delay[route] ?? 1);
    while (route === 'backward' && session && holdUntil && session.next <= holdUntil(step)
      && !session.released && sessions.has(id)) await later(1);
    const fault = faults(entry, { sessions, log });
    if (fault) return fault;
    if (route === 'open') {
      opened += 1;
      stats.opens += 1;
      const sid = `s${opened}`;
      const nextStep = opened === 1 ? 0 : 100 * opened; // a new session numbers steps its own way
      sessions.set(sid, { pending: new Map(), done: new Map(), next: nextStep, lostTapes: new Set(),
        expired: new Set() });
      const info = { session_id: sid, token: `t${sid}`, wire_dtype: 'float32', segment: 'middle',
        mode: 'u_shaped', max_batch: 16, next_step: nextStep, inputs: [], outputs: [] };
      if (maxPending !== null) info.max_pending_steps = maxPending;
      if (aggregation) info.aggregation = aggregation;
      return json(201, info);
    }
    if (!session) return json(404, { error: { code: 'unknown_session', message: 'no such session' } });
    if (route === 'close') {
      sessions.delete(id);
      return new Response(null, { status: 204 });
    }
    if (route === 'state') {
      const pending = [...session.pending.keys()];
      return json(200, { next_step: session.next, pending_step: pending.length ? pending[0] : null,
        pending_steps: pending, applied_steps: stats.applied });
    }
    const oldest = session.pending.size ? [...session.pending.keys()][0] : null;
    if (route === 'forward') {
      const cached = session.pending.get(step) ?? session.done.get(step)?.forward;
      if (cached && !session.lostTapes.has(step)) return answer(cached.answer);
      for (const old of session.expired) if (old <= step) session.expired.delete(old);
      if (session.lostTapes.has(step)) session.lostTapes.delete(step); // the resent forward
      else {
        if (session.pending.size && step <= Math.max(...session.pending.keys())) {
          return refuse('step_out_of_order', oldest);
        }
        if (step < session.next) return refuse('step_out_of_order', session.next);
        if (session.pending.size >= limit) {
          session.released = true; // held backwards go on
          return refuse('pipeline_full', oldest);
        }
      }
      const h = decodeTensors(init.body).tensors.h;
      const result = [tf.tidy(() => out('m', tf.matMul(tensor(h), W)))];
      stats.forwardsRun += 1;
      session.pending.set(step, { answer: result, h });
      session.next = step + 1;
      stats.maxPending = Math.max(stats.maxPending, session.pending.size);
      return answer(result);
    }
    if (route === 'backward') {
      const done = session.done.get(step);
      if (done) return answer(done.backward);
      if (session.expired.has(step)) return refuse('step_expired', session.next);
      if (step !== oldest) return refuse('step_out_of_order', oldest);
      if (session.lostTapes.has(step)) return refuse('forward_lost', oldest);
      const g = decodeTensors(init.body).tensors.m;
      const result = [tf.tidy(() => out('h', tf.matMul(tensor(g), W, false, true)))];
      stats.applied += 1;
      session.done.set(step, { forward: session.pending.get(step), backward: result });
      session.pending.delete(step);
      return answer(result);
    }
    throw new Error(`unexpected ${init.method} ${path}`);
  };
  return { fetch, log, stats, sessions };
}

const create = (server, extra = {}) => SplitDevice.create({ tf, manifest: MANIFEST,
  models: { head: head(), tail: tail() }, serverUrl: 'http://fake', key: 'k', fetch: server.fetch,
  retries: 0, seed: 7, ...extra });

const N = 100; // 7 batches of 16 (the last one 4) per epoch
const XS = tf.randomUniform([N, 3], -1, 1, 'float32', 3);
const YS = tf.tensor1d(Array.from({ length: N }, (_, i) => (i * 7) % 3), 'int32');
const fitOptions = { batchSize: 16, epochs: 2, shuffle: false };
const steps = (log, route) => log.filter((r) => r.route === route).map((r) => r.step);
const bytes = (entry) => Array.from(entry.body ?? []).join(',');

test('pipelineDepth is 1..4, checked before any request', async () => {
  const server = pipelinedServer();
  const device = await create(server);
  for (const depth of [0, 5, 1.5, '2', -1]) {
    await assert.rejects(device.fit(XS, YS, { ...fitOptions, pipelineDepth: depth }), (e) => e instanceof SplitDeviceError
      && e.message === `pipelineDepth ${depth} must be an integer from 1 (no pipelining) to 4: `
        + 'the number of steps in flight at once');
  }
  assert.equal(server.log.length, 0);
});

test('depth 1 sends the same requests, byte for byte, as fit without the option and as a loop '
  + 'of trainStep: forward k, backward k, forward k+1, ...', async () => {
  const runs = [];
  for (const options of [{}, { pipelineDepth: 1 }, null]) {
    const server = pipelinedServer();
    const device = await create(server);
    if (options) await device.fit(XS, YS, { ...fitOptions, ...options });
    else {
      for (let epoch = 0; epoch < 2; epoch += 1) {
        for (let begin = 0; begin < N; begin += 16) {
          const size = Math.min(16, N - begin);
          const bx = tf.slice(XS, [begin], [size]);
          const by = tf.slice(YS, [begin], [size]);
          await device.trainStep(bx, by);
          tf.dispose([bx, by]);
        }
      }
    }
    runs.push({ server, weights: device.getWeights() });
  }
  const sequence = ({ server }) => server.log.map((r) => `${r.route} ${r.step} ${bytes(r)}`);
  assert.deepEqual(sequence(runs[1]), sequence(runs[0]));
  assert.deepEqual(sequence(runs[2]), sequence(runs[0]));
  const routes = runs[0].server.log.map((r) => (r.step === null ? r.route : `${r.route} ${r.step}`));
  assert.deepEqual(routes, ['open', ...Array.from({ length: 14 }, (_, k) => [`forward ${k}`, `backward ${k}`]).flat()]);
  assert.equal(runs[0].server.stats.maxPending, 1);
  for (const run of runs.slice(1)) assert.deepEqual(run.weights, runs[0].weights);
});

for (const depth of [2, 3, 4]) {
  test(`depth ${depth}: up to ${depth} steps in flight, every step applied once, in order, `
    + `and each forward misses exactly the updates of the ${depth - 1} step(s) before it`, async () => {
    // backward k waits for forward k+depth-1 (or its epoch's last): the pipeline is full
    const server = pipelinedServer({ maxPending: 4,
      holdUntil: (step) => Math.min(step + depth - 1, step < 7 ? 6 : 13) });
    const device = await create(server);
    const snapshots = new Map([[-1, device.getWeights()]]); // weights after step k's update
    const events = [];
    const result = await device.fit(XS, YS, { ...fitOptions, pipelineDepth: depth,
      onBatchBegin: (batch) => { events.push(`begin ${batch}`); },
      onBatchEnd: (batch, logs) => {
        events.push(`end ${batch}`);
        snapshots.set(snapshots.size - 1, device.getWeights());
        assert.ok(Number.isFinite(logs.loss) && logs.size > 0 && logs.bytesSent > 0);
      } });
    assert.equal(result.steps, 14);
    assert.equal(server.stats.applied, 14); // every step's update, once
    assert.equal(server.stats.forwardsRun, 14); // no forward ran twice
    assert.equal(server.stats.maxPending, depth); // the pipeline was full
    assert.deepEqual(steps(server.log, 'forward'), [...Array(14).keys()]);
    assert.deepEqual(steps(server.log, 'backward'), [...Array(14).keys()]);
    // callbacks: a batch begins when its forward may start, ends in order; drained per epoch
    assert.deepEqual(events.filter((e) => e.startsWith('end')), [...Array(7).keys(), ...Array(7).keys()]
      .map((b) => `end ${b}`));
    assert.equal(events.indexOf(`begin ${depth - 1}`) < events.indexOf('end 0'), true);
    assert.equal(events.indexOf('begin 0', 1) > events.indexOf('end 6'), true);
    // forward k (step index s within the run) was computed on the weights after step
    // s - depth (its epoch's first steps: after the previous epoch's last step)
    const reference = head();
    server.log.filter((r) => r.route === 'forward').forEach((r) => {
      const s = r.step;
      const firstOfEpoch = s < 7 ? 0 : 7;
      const after = Math.max(s - depth, firstOfEpoch - 1);
      const w = snapshots.get(after);
      reference.getLayer('h_dense').setWeights([tf.tensor(w['h_dense/kernel'], [3, 4]),
        tf.tensor(w['h_dense/bias'], [4])]);
      const begin = (s % 7) * 16;
      const x = tf.slice(XS, [begin], [Math.min(16, N - begin)]);
      const expected = reference.apply(x, { training: true });
      const sent = decodeTensors(r.body).tensors.h;
      assert.deepEqual(Array.from(sent.data), Array.from(expected.dataSync()), `forward ${s}`);
      tf.dispose([x, expected]);
    });
    // pipelining happened: a forward arrived while an older step was pending
    assert.ok(server.log.some((r) => r.route === 'forward' && r.pendingAtArrival.length > 0));
    const history = result.history.loss;
    assert.ok(history.every(Number.isFinite) && history[1] < history[0], `loss ${history}`);
  });
}

test('a depth above the server\'s max_pending_steps is capped at it, with a warning', async () => {
  const server = pipelinedServer({ maxPending: 2 });
  const device = await create(server);
  const warnings = [];
  await device.fit(XS, YS, { ...fitOptions, pipelineDepth: 4, onWarning: (m) => { warnings.push(m); } });
  assert.deepEqual(warnings, ['pipelineDepth 4 is capped at 2: the server takes at most that many '
    + 'steps in flight per session (max_pending_steps middle: 2; `splitkeras serve --max-pending-steps`).']);
  assert.equal(server.stats.maxPending, 2);
  assert.equal(server.stats.applied, 14);

  const old = pipelinedServer({ maxPending: null }); // no max_pending_steps: one step
  const sequential = pipelinedServer();
  const warned = [];
  await (await create(old)).fit(XS, YS, { ...fitOptions, pipelineDepth: 2, callbacks: [{ onWarning: (m) => warned.push(m) }] });
  await (await create(sequential)).fit(XS, YS, fitOptions);
  assert.match(warned[0], /^pipelineDepth 2 is capped at 1/);
  assert.deepEqual(old.log.map((r) => `${r.route} ${r.step} ${bytes(r)}`),
    sequential.log.map((r) => `${r.route} ${r.step} ${bytes(r)}`));
});

test('pipeline_full (a server holding fewer steps than it said) is one clear error; the steps '
  + 'in flight are abandoned and the session closed', async () => {
  const server = pipelinedServer({ maxPending: 3, refuseAt: 2, holdUntil: (step) => step + 2 });
  const device = await create(server);
  await assert.rejects(device.fit(XS, YS, { ...fitOptions, pipelineDepth: 3 }), (e) => e instanceof ProtocolError
    && e.code === 'pipeline_full' && /409 pipeline_full/.test(e.message)
    && /at most 3 step\(s\) in flight per session: lower pipelineDepth to it/.test(e.message));
  assert.equal(server.log.at(-1).route, 'close');
  assert.ok(server.stats.applied < 14);
  assert.equal(device.head.pending.size, 0); // no tape of an abandoned step is kept
  assert.equal(device.session.forwardBodies.size, 0);
});

test('503s with several steps in flight: the same bytes again, every step applied once', async () => {
  let count = 0;
  const server = pipelinedServer({ faults: (r) => (['forward', 'backward'].includes(r.route)
    && (count += 1) % 5 === 0 ? new Response('busy', { status: 503 }) : null) });
  const device = await create(server, { retries: 3, backoff: 0, sleep: async () => {} });
  await device.fit(XS, YS, { ...fitOptions, pipelineDepth: 3 });
  assert.equal(server.stats.applied, 14);
  assert.equal(server.stats.forwardsRun, 14);
  assert.ok(device.stats.retries >= 5);
});

test('forward_lost with several steps in flight: the forwards of every step in flight are '
  + 'resent, oldest first, then the backward', async () => {
  let restarted = false;
  const server = pipelinedServer({ holdUntil: (step) => Math.min(step + 2, step < 7 ? 6 : 13), faults: (r, { sessions }) => {
    // a restart at the backward of step 5: the tapes of the pending steps are gone
    if (!restarted && r.route === 'backward' && r.step === 5) {
      restarted = true;
      const session = sessions.get(r.session);
      for (const step of session.pending.keys()) session.lostTapes.add(step);
    }
    return null;
  } });
  const device = await create(server);
  await device.fit(XS, YS, { ...fitOptions, pipelineDepth: 3 });
  const after = server.log.slice(server.log.findIndex((r) => r.route === 'backward' && r.step === 5));
  const lost = [...server.log.filter((r) => r.route === 'backward' && r.step === 5)[0].pendingAtArrival];
  assert.ok(lost.length >= 2, `in flight at the restart: ${lost}`);
  const resent = after.slice(1).filter((r) => r.route === 'forward' && lost.includes(r.step)).map((r) => r.step);
  assert.deepEqual(resent.slice(0, lost.length), lost); // oldest first
  assert.equal(server.stats.applied, 14);
  assert.equal(device.stats.recoveries, 1);
  assert.deepEqual(steps(server.log, 'backward').filter((s) => s !== 5), [...Array(14).keys()].filter((s) => s !== 5));
});

test('unknown_session with several steps in flight: ONE new session, the steps in flight resent '
  + 'to it oldest first, every step applied once', async () => {
  let lostAt = null;
  const server = pipelinedServer({ holdUntil: (step) => Math.min(step + 2, step < 7 ? 6 : 13), faults: (r, { sessions }) => {
    if (lostAt === null && r.route === 'backward' && r.step === 4) {
      lostAt = [...sessions.get(r.session).pending.keys()];
      sessions.clear(); // the server restarted without its state
      return json(404, { error: { code: 'unknown_session', message: 'no such session' } });
    }
    return null;
  } });
  const device = await create(server);
  await device.fit(XS, YS, { ...fitOptions, pipelineDepth: 3 });
  assert.equal(server.stats.opens, 2);
  const onNew = server.log.filter((r) => r.session === 's2' && r.route === 'forward').map((r) => r.step);
  // step 4 is server step 200 on the new session; steps 4..13 go there in order
  assert.deepEqual([...new Set(onNew)], [...Array(10).keys()].map((k) => 200 + k));
  assert.deepEqual(steps(server.log.filter((r) => r.session === 's2'), 'backward'),
    [...Array(10).keys()].map((k) => 200 + k));
  assert.ok(lostAt.length >= 2, `in flight when the session was lost: ${lostAt}`);
  // the steps in flight (4 and newer) were resent oldest first, before any backward
  const firstBackward = server.log.findIndex((r) => r.session === 's2' && r.route === 'backward');
  assert.deepEqual(onNew.slice(0, lostAt.length), lostAt.map((_, i) => 200 + i));
  assert.ok(server.log.findIndex((r) => r.session === 's2' && r.step === 200 + lostAt.length - 1) < firstBackward);
  assert.equal(server.stats.applied, 4 + 10); // steps 0-3 on the first session, 4-13 on the new one
});

test('step_expired dropping every pending step (the server drops them all, FIFO): the device '
  + 'resends the forwards of every step in flight, oldest first, each applied once', async () => {
  let dropped = null;
  let droppedAt = null; // requests logged by then
  const server = pipelinedServer({ holdUntil: (step) => Math.min(step + 2, step < 7 ? 6 : 13),
    faults: (r, { sessions, log }) => {
      const session = sessions.get(r.session);
      if (dropped === null && r.route === 'backward' && r.step === 8) {
        dropped = [...session.pending.keys()]; // the TTL dropped them: the oldest first
        for (const step of dropped) session.expired.add(step);
        session.pending.clear();
        session.next = dropped[0];
        droppedAt = log.length;
      }
      return null;
    } });
  const device = await create(server);
  const { steps: run } = await device.fit(XS, YS, { ...fitOptions, pipelineDepth: 3 });
  assert.equal(run, 14);
  assert.ok(dropped.length >= 2, `pending when dropped: ${dropped}`);
  const resent = server.log.slice(droppedAt).filter((r) => r.route === 'forward' && dropped.includes(r.step))
    .map((r) => r.step);
  assert.deepEqual(resent.slice(0, dropped.length), dropped);
  assert.equal(server.stats.applied, 14);
  assert.equal(server.stats.forwardsRun, 14 + dropped.length);
});

test('pipelining refuses, before any request, what it does not do: labels on the server, '
  + 'privacy defences', async () => {
  const server = pipelinedServer();
  const defended = await create(server, { defences: [{ name: 'max-norm', seed: 1 }] });
  await assert.rejects(defended.fit(XS, YS, { ...fitOptions, pipelineDepth: 2 }), (e) => e instanceof SplitDeviceError
    && e.message === 'fit({pipelineDepth: 2}) needs a U-shaped split with one server stage (labels on '
      + 'the device), without defences; this split has 1 server stage(s), the labels on the device, '
      + 'defences. Train it with pipelineDepth 1.');
  const labelsOnServer = { ...MANIFEST, model_outputs: [spec('out', 2)],
    segments: [MANIFEST.segments[0], { name: 'rest', placement: 'server', keras_file: 'r.keras',
      inputs: [spec('h', 4)], outputs: [spec('out', 2)] }],
    training: { ...MANIFEST.training, loss: 'mse', metrics: [] } };
  const device = await SplitDevice.create({ tf, manifest: labelsOnServer, models: { head: head() },
    serverUrl: 'http://fake', key: 'k', fetch: server.fetch, retries: 0 });
  await assert.rejects(device.fit(XS, tf.zeros([N, 2]), { ...fitOptions, pipelineDepth: 3 }),
    /this split has 1 server stage\(s\), the labels on a server\. Train it with pipelineDepth 1\./);
  assert.equal(server.log.length, 0);
});

test('pipelining refuses fleet rounds (weights uploaded between steps) before any step', async () => {
  const server = pipelinedServer({ aggregation: { strategy: 'fedavg', round: 0, round_steps: 2 } });
  const device = await create(server);
  await assert.rejects(device.fit(XS, YS, { ...fitOptions, pipelineDepth: 2 }), (e) => e instanceof SplitDeviceError
    && /^fit\(\{pipelineDepth: 2\}\): the server runs fleet rounds \(--aggregate\)/.test(e.message));
  assert.deepEqual(server.log.map((r) => r.route), ['open', 'close']);
});
