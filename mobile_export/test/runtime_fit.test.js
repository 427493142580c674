// SplitDevice.fit and evaluate (src/runtime.js) like Keras': any dataset size in batches
// within the server's max_batch, epochs, shuffling, validation data (val_ logs), callbacks,
// stopTraining, and the sessions closed when a step or a callback fails. The server is in
// memory: its middle is a fixed matrix (m = h @ W, u_shaped) or out = h @ W with an mse loss
// (labels on the server), as in runtime_device.test.js.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import * as tf from '@tensorflow/tfjs';

import { MEDIA_TYPE, decodeTensors, encodeTensors } from '../src/wire.js';
import { ProtocolError, SplitDevice, SplitDeviceError } from '../src/runtime.js';

await tf.setBackend('cpu');
const MAX_BATCH = 16;
const SERVER_REG = 0.25;
const spec = (name, width, dtype = 'float32') => ({ name, shape: [null, width], dtype });
const yspec = (name) => ({ name, shape: [null], dtype: 'int32' });

function manifest(mode) {
  const segments = mode === 'u_shaped' ? [
    { name: 'head', placement: 'device', keras_file: 'h.keras', inputs: [spec('x', 3)], outputs: [spec('h', 4)] },
    { name: 'middle', placement: 'server', keras_file: 'm.keras', inputs: [spec('h', 4)], outputs: [spec('m', 2)] },
    { name: 'tail', placement: 'device', keras_file: 't.keras', inputs: [spec('m', 2)], outputs: [spec('out', 3)] },
  ] : [
    { name: 'head', placement: 'device', keras_file: 'h.keras', inputs: [spec('x', 3)], outputs: [spec('h', 4)] },
    { name: 'rest', placement: 'server', keras_file: 'r.keras', inputs: [spec('h', 4)], outputs: [spec('out', 2)] },
  ];
  return { format: 'splitkeras.split', format_version: 1, cuts: [], source: {},
    model_inputs: [spec('x', 3)], model_outputs: mode === 'u_shaped' ? [yspec('out')] : [spec('out', 2)],
    segments,
    training: { optimizer: { class_name: 'SGD', config: { learning_rate: 0.1 } },
      loss: mode === 'u_shaped' ? 'sparse_categorical_crossentropy' : 'mse',
      metrics: mode === 'u_shaped' ? ['accuracy'] : [] } };
}

const models = (mode) => {
  const x = tf.input({ shape: [3], name: 'x' });
  const h = tf.layers.dense({ units: 4, activation: 'tanh', name: 'h_dense',
    kernelInitializer: tf.initializers.glorotUniform({ seed: 1 }) }).apply(x);
  const head = tf.model({ inputs: x, outputs: h, name: 'head' });
  if (mode !== 'u_shaped') return { head };
  const m = tf.input({ shape: [2], name: 'm' });
  const out = tf.layers.dense({ units: 3, activation: 'softmax', name: 'out',
    kernelInitializer: tf.initializers.glorotUniform({ seed: 2 }),
    kernelRegularizer: tf.regularizers.l2({ l2: 0.01 }) }).apply(m);
  return { head, tail: tf.model({ inputs: m, outputs: out, name: 'tail' }) };
};

const W = { u_shaped: tf.tensor([[0.5, -1], [1, 0.25], [-0.5, 0.75], [0.3, 0.2]]),
  labels_on_server: tf.tensor([[0.5, -1], [1, 0.25], [-0.5, 0.75], [0.3, 0.2]]) };

/** The protocol in memory; `failOn(route, count)` answers 400 to that request instead. */
function fakeServer(mode, { failOn = () => false } = {}) {
  const log = [];
  const seen = {};
  const w = W[mode];
  const answer = (list, metadata) => new Response(encodeTensors(list, { metadata }),
    { status: 200, headers: { 'content-type': MEDIA_TYPE } });
  const matrix = ({ data, shape }) => tf.tensor(data, shape);
  const out = (name, t) => ({ name, dtype: 'float32', shape: t.shape, data: Float32Array.from(t.dataSync()) });
  const fetch = async (url, init) => {
    const path = url.replace('http://fake', '');
    const body = init.headers['Content-Type'] === MEDIA_TYPE ? decodeTensors(init.body) : null;
    const route = path === '/v1/sessions' ? 'open' : (init.method === 'DELETE' ? 'close' : path.split('/').at(-1));
    seen[route] = (seen[route] ?? 0) + 1;
    log.push({ route, batch: body ? Object.values(body.tensors)[0]?.shape[0] : null,
      labels: body?.tensors['label:out'] ? Array.from(body.tensors['label:out'].data) : null });
    if (failOn(route, seen[route])) {
      return new Response(JSON.stringify({ error: { code: 'bad_tensor', message: 'refused here' } }),
        { status: 400 });
    }
    if (route === 'open') {
      return new Response(JSON.stringify({ session_id: 's', token: 't', wire_dtype: 'float32',
        segment: mode === 'u_shaped' ? 'middle' : 'rest', mode, max_batch: MAX_BATCH, next_step: 0,
        inputs: [], outputs: [] }), { status: 201 });
    }
    if (route === 'close') return new Response(null, { status: 204 });
    for (const t of Object.values(body.tensors)) assert.ok(t.shape[0] <= MAX_BATCH, 'over max_batch');
    if (route === 'forward') {
      return answer(tf.tidy(() => [out('m', tf.matMul(matrix(body.tensors.h), w))]),
        { regularization_loss: String(SERVER_REG) });
    }
    if (route === 'backward') {
      return answer(tf.tidy(() => [out('h', tf.matMul(matrix(body.tensors.m), w, false, true))]));
    }
    if (route === 'train') {
      return tf.tidy(() => {
        const h = matrix(body.tensors.h);
        const y = tf.tensor(body.tensors['label:out'].data, body.tensors['label:out'].shape);
        const diff = tf.sub(tf.matMul(h, w), y);
        const grad = tf.div(tf.mul(2, tf.matMul(diff, w, false, true)), diff.size);
        return answer([out('h', grad)], { loss: String(tf.mean(tf.square(diff)).dataSync()[0]) });
      });
    }
    if (route === 'predict') {
      return answer(tf.tidy(() => [out(mode === 'u_shaped' ? 'm' : 'out', tf.matMul(matrix(body.tensors.h), w))]),
        { regularization_loss: String(SERVER_REG) });
    }
    throw new Error(`unexpected ${init.method} ${path}`);
  };
  return { fetch, log };
}

const create = (mode, server, extra = {}) => SplitDevice.create({ tf, manifest: manifest(mode),
  models: models(mode), serverUrl: 'http://fake', key: 'k', fetch: server.fetch, retries: 0,
  seed: 7, ...extra });

const N = 100; // > max_batch: 6 batches of 16 and one of 4 per epoch
const XS = tf.randomUniform([N, 3], -1, 1, 'float32', 3);
const YS = tf.tensor1d(Array.from({ length: N }, (_, i) => (i * 7) % 3), 'int32');
const weights = (device) => device.getWeights();

test('fit trains a dataset larger than max_batch in batches within it, the last one smaller, '
  + 'and equals trainStep over the same batches', async () => {
  const server = fakeServer('u_shaped');
  const device = await create('u_shaped', server);
  const batchLosses = [];
  const { history, steps, epoch } = await device.fit(XS, YS, { batchSize: MAX_BATCH, epochs: 2,
    shuffle: false, onBatchEnd: (batch, logs) => { batchLosses.push([logs.loss, logs.size]); } });
  assert.equal(steps, 14);
  assert.deepEqual(epoch, [0, 1]);
  const forwards = server.log.filter((r) => r.route === 'forward').map((r) => r.batch);
  assert.deepEqual(forwards, [16, 16, 16, 16, 16, 16, 4, 16, 16, 16, 16, 16, 16, 4]);
  const mean = (pairs) => pairs.reduce((s, [l, n]) => s + l * n, 0) / pairs.reduce((s, [, n]) => s + n, 0);
  assert.ok(Math.abs(history.loss[0] - mean(batchLosses.slice(0, 7))) < 1e-6);
  assert.ok(Math.abs(history.loss[1] - mean(batchLosses.slice(7))) < 1e-6);
  assert.equal(history.accuracy.length, 2);

  const manual = await create('u_shaped', fakeServer('u_shaped'));
  for (let e = 0; e < 2; e += 1) {
    for (let begin = 0; begin < N; begin += MAX_BATCH) {
      const size = Math.min(MAX_BATCH, N - begin);
      const bx = tf.slice(XS, [begin], [size]);
      const by = tf.slice(YS, [begin], [size]);
      await manual.trainStep(bx, by);
      bx.dispose();
      by.dispose();
    }
  }
  const a = weights(device);
  const b = weights(manual);
  for (const name of Object.keys(b)) assert.deepEqual(Array.from(a[name]), Array.from(b[name]), name);
});

test('a batchSize over max_batch is refused before any step; 1,797 samples are not', async () => {
  const server = fakeServer('u_shaped');
  const device = await create('u_shaped', server);
  await assert.rejects(device.fit(XS, YS, { batchSize: 32 }),
    (e) => e instanceof SplitDeviceError && /batchSize 32 .* max_batch \(16\)/.test(e.message));
  assert.equal(server.log.filter((r) => r.route === 'forward').length, 0);
  const big = tf.randomUniform([1797, 3]);
  const labels = tf.zeros([1797], 'int32');
  const fresh = await create('u_shaped', fakeServer('u_shaped'));
  const { steps } = await fresh.fit(big, labels, { batchSize: 16, epochs: 1 });
  assert.equal(steps, Math.ceil(1797 / 16));
  [big, labels].forEach((t) => t.dispose());
});

test('shuffle: each epoch visits every sample once, in a new order', async () => {
  const server = fakeServer('labels_on_server');
  const device = await create('labels_on_server', server);
  const ys = tf.tensor2d(Array.from({ length: 40 }, (_, i) => [i, -i]));
  const xs = tf.randomUniform([40, 3]);
  await device.fit(xs, ys, { batchSize: 8, epochs: 2 });
  const trains = server.log.filter((r) => r.route === 'train');
  assert.equal(trains.length, 10);
  const order = (list) => list.flatMap((r) => r.labels.filter((_, i) => i % 2 === 0));
  const [first, second] = [order(trains.slice(0, 5)), order(trains.slice(5))];
  const all = Array.from({ length: 40 }, (_, i) => i);
  assert.deepEqual([...first].sort((a, b) => a - b), all);
  assert.deepEqual([...second].sort((a, b) => a - b), all);
  assert.notDeepEqual(first, all, 'shuffled');
  assert.notDeepEqual(first, second, 'a new order each epoch');
  [xs, ys].forEach((t) => t.dispose());
});

test('validationData is evaluated after each epoch (inference mode, regularization included) '
  + 'and logged as val_*', async () => {
  const server = fakeServer('u_shaped');
  const device = await create('u_shaped', server);
  const vx = tf.randomUniform([37, 3], -1, 1, 'float32', 9);
  const vy = tf.tensor1d(Array.from({ length: 37 }, (_, i) => i % 3), 'int32');
  const expected = [];
  const { history } = await device.fit(XS, YS, { batchSize: 16, epochs: 2, validationData: [vx, vy],
    onEpochEnd: async () => {
      // the reference: the model's predictions, the loss from them, + the tail's L2 + the server's
      const probs = await device.predict(vx);
      const p = probs.arraySync();
      const labels = vy.arraySync();
      const ce = -p.reduce((s, row, i) => s + Math.log(row[labels[i]]), 0) / p.length;
      const kernel = device.model('tail').getLayer('out').kernel.read().dataSync();
      const l2 = 0.01 * kernel.reduce((s, v) => s + v * v, 0);
      const acc = p.filter((row, i) => row.indexOf(Math.max(...row)) === labels[i]).length / p.length;
      expected.push({ loss: ce + l2 + SERVER_REG, accuracy: acc });
      probs.dispose();
    } });
  assert.deepEqual(Object.keys(history).sort(), ['accuracy', 'loss', 'val_accuracy', 'val_loss']);
  for (let e = 0; e < 2; e += 1) {
    assert.ok(Math.abs(history.val_loss[e] - expected[e].loss) < 1e-5,
      `epoch ${e}: ${history.val_loss[e]} vs ${expected[e].loss}`);
    assert.equal(history.val_accuracy[e], expected[e].accuracy);
  }
  const predicts = server.log.filter((r) => r.route === 'predict').map((r) => r.batch);
  // per epoch: evaluate's batches, then predict's (batched at max_batch as well)
  assert.deepEqual(predicts, [16, 16, 5, 16, 16, 5, 16, 16, 5, 16, 16, 5]);
  [vx, vy].forEach((t) => t.dispose());
});

test('validationSplit holds out the last samples; evaluate works alone and with the labels on '
  + 'the server', async () => {
  const device = await create('u_shaped', fakeServer('u_shaped'));
  const { history, steps } = await device.fit(XS, YS, { batchSize: 16, validationSplit: 0.2 });
  assert.equal(steps, 5); // 80 samples
  const vx = tf.slice(XS, [80], [20]);
  const vy = tf.slice(YS, [80], [20]);
  const before = history.val_loss[0];
  const again = await device.evaluate(vx, vy, { batchSize: 16 });
  assert.ok(Math.abs(again.loss - before) < 1e-6);

  const remote = await create('labels_on_server', fakeServer('labels_on_server'));
  const ys = tf.randomUniform([20, 2]);
  const logs = await remote.evaluate(vx, ys, { batchSize: 8 });
  const pred = await remote.predict(vx.slice([0], [16]));
  const rest = await remote.predict(vx.slice([16], [4]));
  const mse = tf.tidy(() => tf.mean(tf.square(tf.sub(tf.concat([pred, rest]), ys))).dataSync()[0]);
  assert.ok(Math.abs(logs.loss - (mse + SERVER_REG)) < 1e-6, `${logs.loss} vs ${mse + SERVER_REG}`);
  [vx, vy, ys, pred, rest].forEach((t) => t.dispose());
});

test('callbacks: Keras order, options and callbacks objects, async, stopTraining', async () => {
  const device = await create('u_shaped', fakeServer('u_shaped'));
  const calls = [];
  const hook = (name) => async (...args) => { calls.push([name, ...args.filter((a) => typeof a === 'number')]); };
  const listener = { onEpochEnd: (epoch, logs) => calls.push(['listener.onEpochEnd', epoch, typeof logs.loss]) };
  const vx = tf.slice(XS, [0], [8]);
  const vy = tf.slice(YS, [0], [8]);
  await device.fit(tf.slice(XS, [0], [40]), tf.slice(YS, [0], [40]), {
    batchSize: 16, epochs: 2, validationData: [vx, vy], callbacks: [listener],
    ...Object.fromEntries(['onTrainBegin', 'onEpochBegin', 'onBatchBegin', 'onBatchEnd', 'onEpochEnd',
      'onTrainEnd'].map((n) => [n, hook(n)])) });
  const names = calls.map((c) => c.join(' '));
  assert.deepEqual(names, ['onTrainBegin', 'onEpochBegin 0',
    'onBatchBegin 0', 'onBatchEnd 0', 'onBatchBegin 1', 'onBatchEnd 1', 'onBatchBegin 2', 'onBatchEnd 2',
    'onEpochEnd 0', 'listener.onEpochEnd 0 number', 'onEpochBegin 1',
    'onBatchBegin 0', 'onBatchEnd 0', 'onBatchBegin 1', 'onBatchEnd 1', 'onBatchBegin 2', 'onBatchEnd 2',
    'onEpochEnd 1', 'listener.onEpochEnd 1 number', 'onTrainEnd']);

  const stopping = await create('u_shaped', fakeServer('u_shaped'));
  const { steps, history } = await stopping.fit(XS, YS, { batchSize: 16, epochs: 3,
    onBatchEnd: (batch) => { if (batch === 2) stopping.stopTraining = true; } });
  assert.equal(steps, 3);
  assert.equal(history.loss.length, 1);
  [vx, vy].forEach((t) => t.dispose());
});

test('a failing step or callback closes the session and throws', async () => {
  const server = fakeServer('u_shaped', { failOn: (route, n) => route === 'forward' && n === 3 });
  const device = await create('u_shaped', server);
  await assert.rejects(device.fit(XS, YS, { batchSize: 16 }),
    (e) => e instanceof ProtocolError && e.code === 'bad_tensor');
  assert.equal(server.log.at(-1).route, 'close');
  assert.equal(device.session.info, null);

  const other = fakeServer('u_shaped');
  const device2 = await create('u_shaped', other);
  await assert.rejects(device2.fit(XS, YS, { batchSize: 16,
    onEpochEnd: () => { throw new Error('my callback'); } }), /my callback/);
  assert.equal(other.log.at(-1).route, 'close');
  const before = tf.memory().numTensors;
  await assert.rejects(device2.fit(XS, tf.zeros([N - 1], 'int32'), { batchSize: 16 }),
    /ys has 99 samples, xs has 100/);
  assert.ok(tf.memory().numTensors <= before + 1, 'no tensor leaks from a refused fit');
});
