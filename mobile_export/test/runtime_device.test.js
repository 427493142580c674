// SplitDevice (src/runtime.js) end to end against an in-memory fake server whose middle is
// a fixed matrix (m = h @ W), so that one training step can be compared with the same
// step on the whole model computed in one TF.js tape: a head with BatchNormalization
// and Dropout, a skip tensor from the head to the tail, an L2-regularized softmax tail.
// The real-server parity with Keras is tests/test_js_device.py.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import * as tf from '@tensorflow/tfjs';

import { MEDIA_TYPE, decodeTensors, encodeTensors } from '../src/wire.js';
import { SegmentError, SplitDevice, SplitDeviceError } from '../src/runtime.js';
import { captureLogits, deriveSeed } from '../src/segment.js';
import { resolveLoss } from '../src/losses.js';

await tf.setBackend('cpu');
const LR = 0.1;
const SEED = 42;
const spec = (name, shape, dtype = 'float32') => ({ name, shape: [null, ...shape], dtype });

function manifest(mode) {
  const segments = mode === 'u_shaped' ? [
    { name: 'head', placement: 'device', keras_file: 'head.keras', inputs: [spec('x', [3])],
      outputs: [spec('h', [4])] },
    { name: 'middle', placement: 'server', keras_file: 'middle.keras', inputs: [spec('h', [4])],
      outputs: [spec('m', [2])] },
    { name: 'tail', placement: 'device', keras_file: 'tail.keras',
      inputs: [spec('m', [2]), spec('h', [4])], outputs: [spec('out', [3])] },
  ] : [
    { name: 'head', placement: 'device', keras_file: 'head.keras', inputs: [spec('x', [3])],
      outputs: [spec('h', [4])] },
    { name: 'rest', placement: 'server', keras_file: 'rest.keras', inputs: [spec('h', [4])],
      outputs: [spec('out', [2])] },
  ];
  return {
    format: 'splitkeras.split', format_version: 1, cuts: [], source: {},
    model_inputs: [spec('x', [3])], model_outputs: [spec('out', [mode === 'u_shaped' ? 3 : 2])],
    segments,
    training: {
      optimizer: { class_name: 'SGD', config: { learning_rate: LR, momentum: 0 } },
      loss: mode === 'u_shaped' ? 'sparse_categorical_crossentropy' : 'mse', metrics: ['accuracy'],
    },
  };
}

function headModel({ noise = false, rate = 0.5 } = {}) {
  const x = tf.input({ shape: [3], name: 'x' });
  let h = tf.layers.dense({ units: 4, name: 'h_dense',
    kernelInitializer: tf.initializers.glorotUniform({ seed: 1 }) }).apply(x);
  h = tf.layers.batchNormalization({ name: 'bn', momentum: 0.9 }).apply(h);
  h = tf.layers.dropout({ rate, name: 'drop' }).apply(h);
  if (noise) h = tf.layers.gaussianNoise({ stddev: 0.1, name: 'noise' }).apply(h);
  return tf.model({ inputs: x, outputs: h, name: 'head' });
}

function tailModel() {
  const m = tf.input({ shape: [2], name: 'm' });
  const h = tf.input({ shape: [4], name: 'h' });
  const joined = tf.layers.concatenate({ name: 'join' }).apply([m, h]);
  const out = tf.layers.dense({ units: 3, activation: 'softmax', name: 'out',
    kernelInitializer: tf.initializers.glorotUniform({ seed: 2 }), kernelRegularizer: tf.regularizers.l2({ l2: 0.01 }) }).apply(joined);
  return tf.model({ inputs: [m, h], outputs: out, name: 'tail' });
}

/** The protocol of docs/protocol.md in memory; the middle is m = h @ W and does not train. */
function fakeServer(mode, W) {
  const log = [];
  let next = 0;
  const answer = (list, metadata) => new Response(encodeTensors(list, { metadata }),
    { status: 200, headers: { 'content-type': MEDIA_TYPE } });
  const matrix = ({ data, shape }) => tf.tensor(data, shape);
  const out = (name, t) => ({ name, dtype: 'float32', shape: t.shape,
    data: Float32Array.from(t.dataSync()) });
  const fetch = async (url, init) => {
    const path = url.replace('http://fake', '');
    const body = init.headers['Content-Type'] === MEDIA_TYPE ? decodeTensors(init.body) : null;
    log.push({ path, method: init.method, tensors: body?.tensors });
    if (path === '/v1/sessions') {
      return new Response(JSON.stringify({ session_id: 's', token: 't', wire_dtype: 'float32',
        segment: mode === 'u_shaped' ? 'middle' : 'rest', mode, max_batch: 16, next_step: next,
        inputs: [], outputs: [] }), { status: 201 });
    }
    const step = Number(init.headers['Splitkeras-Step']); // the URL is the same at every step
    const route = path.split('/').at(-1);
    if (route !== 'predict' && path !== `/v1/sessions/s/${route}`) throw new Error(`unexpected ${path}`);
    if (route === 'forward') {
      assert.equal(step, next);
      return answer(tf.tidy(() => [out('m', tf.matMul(matrix(body.tensors.h), W))]),
        { regularization_loss: '0.25' });
    }
    if (route === 'backward') {
      next += 1;
      return answer(tf.tidy(() => [out('h', tf.matMul(matrix(body.tensors.m), W, false, true))]));
    }
    if (route === 'train') {
      next += 1;
      return tf.tidy(() => {
        const h = matrix(body.tensors.h);
        const y = matrix(body.tensors['label:out']);
        const diff = tf.sub(tf.matMul(h, W), y);
        const grad = tf.div(tf.mul(2, tf.matMul(diff, W, false, true)), diff.size);
        return answer([out('h', grad)], { loss: String(tf.mean(tf.square(diff)).dataSync()[0]),
          step: String(step) });
      });
    }
    if (route === 'predict') {
      return answer(tf.tidy(() => [out(mode === 'u_shaped' ? 'm' : 'out',
        tf.matMul(matrix(body.tensors.h), W))]));
    }
    return new Response('', { status: 204 });
  };
  return { fetch, log };
}

const W_U = tf.tensor([[0.5, -1], [1, 0.25], [-0.5, 0.75], [0.3, 0.2]]);
const X = tf.tensor([[0.1, -0.2, 0.3], [1, 0.5, -1], [0.7, 0.7, 0.1], [-0.3, 0.2, 0.9]]);
const Y = tf.tensor1d([0, 2, 1, 2], 'int32');

async function device(mode, models, server) {
  return SplitDevice.create({ tf, manifest: manifest(mode), models, serverUrl: 'http://fake',
    key: 'k', fetch: server.fetch, seed: SEED, retries: 0 });
}

const weightsOf = (model) => Object.fromEntries(model.weights.map((w) => [w.originalName,
  Float32Array.from(w.read().dataSync())]));
function cloneWeights(from, to) {
  to.setWeights(from.getWeights().map((w) => w.clone()));
}
function maxDiff(a, b) {
  let max = 0;
  for (const key of Object.keys(b)) {
    assert.ok(key in a, `missing weight ${key}`);
    for (let i = 0; i < b[key].length; i += 1) max = Math.max(max, Math.abs(a[key][i] - b[key][i]));
  }
  return max;
}

test('one U-shaped step equals one SGD step of the whole model (BN once, same Dropout mask, '
  + 'skip gradients summed, regularization)', async () => {
  const head = headModel();
  const tail = tailModel();
  const refHead = headModel();
  const refTail = tailModel();
  cloneWeights(head, refHead);
  cloneWeights(tail, refTail);
  const server = fakeServer('u_shaped', W_U);
  const dev = await device('u_shaped', { head, tail }, server);
  const result = await dev.trainStep(X, Y, { details: true });

  // The reference: the whole model in one tape, Dropout seeded as the device seeds step 0.
  refHead.getLayer('drop').seed = deriveSeed(SEED, 0, 0);
  const loss = resolveLoss('sparse_categorical_crossentropy');
  let sent;
  let refLoss;
  const variables = [...refHead.trainableWeights, ...refTail.trainableWeights].map((w) => w.read());
  const { grads } = tf.variableGrads(() => {
    const h = refHead.apply(X, { training: true });
    sent = tf.keep(h.clone());
    const m = tf.matMul(h, W_U);
    const { output, logits } = captureLogits(tf, refTail, () => refTail.apply([m, h], { training: true }));
    const total = tf.add(loss.compute(tf, Y, output, logits), tf.addN(refTail.calculateLosses()));
    refLoss = total.dataSync()[0];
    return total;
  }, variables);
  variables.forEach((v) => v.assign(tf.sub(v, tf.mul(grads[v.name], LR))));

  const forward = server.log.find((r) => r.path.endsWith('/forward'));
  const sentDiff = Math.max(...forward.tensors.h.data.map((v, i) => Math.abs(v - sent.dataSync()[i])));
  assert.ok(sentDiff < 1e-6, `the sent activation used the step's Dropout mask (${sentDiff})`);
  const weightDiff = Math.max(maxDiff(dev.getWeights('head'), weightsOf(refHead)),
    maxDiff(dev.getWeights('tail'), weightsOf(refTail)));
  assert.ok(weightDiff < 1e-6, `weights and BN statistics after one step: max |diff| ${weightDiff}`);
  assert.ok(Math.abs(result.loss - (refLoss + 0.25)) < 1e-5, `${result.loss} vs ${refLoss} + 0.25`);
  assert.ok(result.metrics.accuracy >= 0 && result.metrics.accuracy <= 1);
  assert.ok(result.bytesSent > 0 && result.bytesReceived > 0);
  assert.deepEqual(Object.keys(result.details.serverInputGradients), ['h']);
});

test('Dropout masks differ between steps but not between the two passes of a step', async () => {
  const head = headModel();
  const tail = tailModel();
  const server = fakeServer('u_shaped', W_U);
  const dev = await device('u_shaped', { head, tail }, server);
  await dev.trainStep(X, Y);
  const before = tf.memory().numTensors;
  await dev.trainStep(X, Y);
  assert.equal(tf.memory().numTensors, before, 'a step leaks no tensor');
  const [first, second] = server.log.filter((r) => r.path.endsWith('/forward'))
    .map((r) => Array.from(r.tensors.h.data, (v) => v === 0));
  assert.notDeepEqual(first, second);
});

test('labels on the server: label:<output> goes up, the head trains from the gradient', async () => {
  const W = tf.tensor([[0.5, -1], [1, 0.25], [-0.5, 0.75], [0.3, 0.2]]);
  const head = headModel();
  const refHead = headModel();
  cloneWeights(head, refHead);
  const server = fakeServer('labels_on_server', W);
  const dev = await device('labels_on_server', { head }, server);
  const y = tf.tensor([[1, 0], [0, 1], [1, 1], [0, 0]]);
  const result = await dev.trainStep(X, y);
  const train = server.log.find((r) => r.path.endsWith('/train'));
  assert.deepEqual(Object.keys(train.tensors).sort(), ['h', 'label:out']);
  refHead.getLayer('drop').seed = deriveSeed(SEED, 0, 0);
  const variables = refHead.trainableWeights.map((w) => w.read());
  const { grads } = tf.variableGrads(() => tf.mean(tf.square(tf.sub(
    tf.matMul(refHead.apply(X, { training: true }), W), y))), variables);
  variables.forEach((v) => v.assign(tf.sub(v, tf.mul(grads[v.name], LR))));
  assert.ok(maxDiff(dev.getWeights(), weightsOf(refHead)) < 1e-6);
  assert.ok(Number.isFinite(result.loss));
  const before = tf.memory().numTensors;
  await dev.trainStep(X, y);
  assert.equal(tf.memory().numTensors, before, 'a step leaks no tensor');
});

test('fit lowers the loss and predict goes through the server', async () => {
  const server = fakeServer('u_shaped', W_U);
  const dev = await device('u_shaped', { head: headModel({ rate: 0.1 }), tail: tailModel() }, server);
  const xs = tf.randomNormal([16, 3], 0, 1, 'float32', 7);
  const ys = tf.argMax(tf.matMul(xs, tf.tensor([[1, 0, -1], [0, 1, 1], [1, -1, 0]])), -1);
  const batches = [];
  const before = tf.memory().numTensors;
  const { history, steps } = await dev.fit(xs, ys, { batchSize: 8, epochs: 6,
    onBatchEnd: (batch, logs) => batches.push(logs.loss) });
  assert.equal(tf.memory().numTensors, before, 'fit leaks no tensor');
  assert.equal(steps, 12);
  assert.equal(history.loss.length, 6);
  assert.ok(history.loss.at(-1) < history.loss[0], JSON.stringify(history.loss));
  const prediction = await dev.predict(xs);
  assert.deepEqual(prediction.shape, [16, 3]);
  assert.ok(server.log.some((r) => r.path.endsWith('/predict')));
});

test('a head with noise TF.js cannot seed is refused with the reason', async () => {
  const server = fakeServer('u_shaped', W_U);
  await assert.rejects(device('u_shaped', { head: headModel({ noise: true }), tail: tailModel() },
    server), (e) => e instanceof SegmentError && /'noise' \(GaussianNoise\).*cannot seed/.test(e.message));
});

test('wrong manifests, models and inputs are explained', async () => {
  const server = fakeServer('u_shaped', W_U);
  await assert.rejects(SplitDevice.create({ tf, manifest: { format: 'x' }, serverUrl: 'http://fake',
    fetch: server.fetch }), (e) => e instanceof SplitDeviceError && /not a splitkeras split.json/.test(e.message));
  await assert.rejects(device('u_shaped', { head: headModel() }, server), /models.tail is missing/);
  const dev = await device('u_shaped', { head: headModel(), tail: tailModel() }, server);
  await assert.rejects(dev.trainStep(tf.zeros([2, 5]), tf.tensor1d([0, 1], 'int32')),
    /'x' has shape \[2, 5\], expected \[batch, 3\]/);
});
