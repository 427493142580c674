// The device's privacy defences (src/privacy.js) in the real @tensorflow/tfjs: the same
// mechanisms as the Python client's (splitkeras/privacy/defences), exact where they are
// deterministic (clipping and its Jacobian, checked against tf.grad), by their statistics
// where they draw noise (the random streams differ from NumPy's).

import assert from 'node:assert/strict';
import { test } from 'node:test';
import * as tf from '@tensorflow/tfjs';

import {
  clipGradients, createDefences, flipLabels, noiseActivations, perturbGradients, randomStream,
} from '../src/privacy.js';

await tf.setBackend('cpu');
const stream = randomStream(7);
const randn = (shape, scale = 1) => tf.tensor(Float32Array.from({ length: shape.reduce((a, b) => a * b) },
  () => scale * stream.normal()), shape);
const rowNorms = (data, batch) => {
  const width = data.length / batch;
  return Array.from({ length: batch }, (_, i) => Math.hypot(...data.slice(i * width, (i + 1) * width)));
};

test('the random stream is seeded and standard normal', () => {
  const a = randomStream(3);
  const b = randomStream(3);
  const values = Array.from({ length: 50000 }, () => a.normal());
  assert.deepEqual(values.slice(0, 5), Array.from({ length: 5 }, () => b.normal()));
  const mean = values.reduce((s, v) => s + v, 0) / values.length;
  const variance = values.reduce((s, v) => s + (v - mean) ** 2, 0) / values.length;
  assert.ok(Math.abs(mean) < 0.02 && Math.abs(variance - 1) < 0.02, `${mean} ${variance}`);
});

test('defences are checked against the split mode, one clear error each', () => {
  assert.throws(() => createDefences([{ name: 'no-peek', alpha: 1 }], 'u_shaped'),
    /unknown defence "no-peek"; the device runtime has max-norm, gradient-noise, activation-noise, randomized-response, nopeek$/);
  assert.throws(() => createDefences([{ name: 'max-norm' }], 'labels_on_server'),
    /defence 'max-norm' acts only in u_shaped splits; this split is labels_on_server/);
  assert.throws(() => createDefences([{ name: 'activation-noise', clip: -1 }], 'u_shaped'),
    /defence 'activation-noise': clip must be a number > 0, got -1/);
  assert.deepEqual(createDefences(undefined, 'u_shaped'), []);
});

test('max-norm matches the largest expected squared norm, along each gradient', () => {
  const g = tf.mul(randn([6, 5]), tf.tensor([[1], [2], [3], [0.5], [4], [0]]));
  const data = g.dataSync();
  const norms = rowNorms(data, 6);
  const largest = Math.max(...norms) ** 2;
  const [defence] = createDefences([{ name: 'max-norm', seed: 1 }], 'u_shaped');
  const squares = new Float64Array(6);
  const draws = 20000;
  for (let d = 0; d < draws; d += 1) {
    const store = new Map([['g', g.clone()]]);
    perturbGradients(tf, [defence], store);
    const out = store.get('g').dataSync();
    rowNorms(out, 6).forEach((n, i) => { squares[i] += n * n / draws; });
    if (d === 0) {
      for (let i = 0; i < 5; i += 1) { // only along the gradient: |cosine| 1
        const a = out.slice(i * 5, i * 5 + 5);
        const b = data.slice(i * 5, i * 5 + 5);
        const cosine = a.reduce((s, v, k) => s + v * b[k], 0) / (Math.hypot(...a) * Math.hypot(...b));
        assert.ok(Math.abs(Math.abs(cosine) - 1) < 1e-5);
      }
    }
    store.get('g').dispose();
  }
  for (let i = 0; i < 5; i += 1) assert.ok(Math.abs(squares[i] / largest - 1) < 0.03, `${squares[i]} ${largest}`);
  assert.equal(squares[5], 0);
});

test('activation noise clips each sample over all tensors, adds sigma * clip, and differentiates the clip exactly', () => {
  const a = randn([400, 3]);
  const b = randn([400, 2, 2]);
  const store = new Map([['a', a], ['b', b]]);
  const [clipOnly] = createDefences([{ name: 'activation-noise', clip: 1.5, sigma: 0 }], 'u_shaped');
  const { sent, state } = noiseActivations(tf, [clipOnly], ['a', 'b'], store);
  const sa = sent.get('a').dataSync();
  const sb = sent.get('b').dataSync();
  const ra = a.dataSync();
  const rb = b.dataSync();
  for (let i = 0; i < 400; i += 1) {
    const norm = Math.hypot(...sa.slice(3 * i, 3 * i + 3), ...sb.slice(4 * i, 4 * i + 4));
    const original = Math.hypot(...ra.slice(3 * i, 3 * i + 3), ...rb.slice(4 * i, 4 * i + 4));
    assert.ok(Math.abs(norm - Math.min(original, 1.5)) <= 1e-6 * original);
  }
  const [noisy] = createDefences([{ name: 'activation-noise', clip: 1.5, sigma: 0.8, seed: 4 }], 'u_shaped');
  const noised = noiseActivations(tf, [noisy], ['a', 'b'], store).sent;
  const diffs = [...tf.sub(noised.get('a'), sent.get('a')).dataSync(), ...tf.sub(noised.get('b'), sent.get('b')).dataSync()];
  const std = Math.sqrt(diffs.reduce((s, v) => s + v * v, 0) / diffs.length);
  assert.ok(Math.abs(std / (0.8 * 1.5) - 1) < 0.03, `${std}`);

  const ga = randn([400, 3]);
  const gb = randn([400, 2, 2]);
  const mine = clipGradients(tf, state, new Map([['a', ga.clone()], ['b', gb.clone()]]));
  const clip = (x, y) => {
    const norm = tf.sqrt(tf.add(tf.sum(tf.square(x), 1), tf.sum(tf.square(tf.reshape(y, [400, 4])), 1)));
    const factor = tf.reshape(tf.minimum(1, tf.div(1.5, norm)), [400, 1]);
    return [tf.mul(x, factor), tf.reshape(tf.mul(tf.reshape(y, [400, 4]), factor), [400, 2, 2])];
  };
  const expected = tf.grads((x, y) => {
    const [cx, cy] = clip(x, y);
    return tf.add(tf.sum(tf.mul(cx, ga)), tf.sum(tf.mul(cy, gb)));
  })([a, b]);
  const worst = (x, y) => Math.max(...tf.abs(tf.sub(x, y)).dataSync());
  assert.ok(worst(mine.get('a'), expected[0]) < 1e-5 && worst(mine.get('b'), expected[1]) < 1e-5);
  assert.ok(state.factors.some((f) => f < 1) && state.factors.some((f) => f === 1));
});

test('randomized response keeps each label with probability e^eps / (e^eps + K - 1)', () => {
  const ids = Int32Array.from({ length: 50000 }, () => Math.floor(stream.uniform() * 5));
  const labels = tf.tensor(ids, [ids.length], 'int32');
  const flipped = flipLabels(tf, createDefences([{ name: 'randomized-response', epsilon: 1, seed: 2 }],
    'labels_on_server'), labels, 5).dataSync();
  const kept = flipped.filter((v, i) => v === ids[i]).length / ids.length;
  assert.ok(Math.abs(kept - Math.E / (Math.E + 4)) < 0.01, `${kept}`);
  const shifts = [0, 0, 0, 0, 0];
  flipped.forEach((v, i) => { if (v !== ids[i]) shifts[(v - ids[i] + 5) % 5] += 1; });
  const others = shifts.slice(1).reduce((s, v) => s + v, 0);
  for (const count of shifts.slice(1)) assert.ok(Math.abs(count / others - 0.25) < 0.01);
  assert.throws(() => flipLabels(tf, createDefences([{ name: 'randomized-response', epsilon: 1 }],
    'labels_on_server'), tf.tensor([0, 7], [2], 'int32'), 5), /class ids in \[0, 5\), got 7/);
});
