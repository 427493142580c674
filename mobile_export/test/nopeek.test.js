// NoPeek in the JS runtime (src/nopeek.js) against splitkeras.privacy's own numbers
// (fixtures/nopeek_fixtures.json, written by fixtures/make_nopeek_fixtures.py): the distance
// correlation and its float64 gradient, and NoPeek's float32 gradients of the sent tensors.

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import * as tf from '@tensorflow/tfjs';

import {
  addNoPeek, checkNoPeekStages, distanceCorrelation, noPeekGradients,
} from '../src/nopeek.js';
import { createDefences } from '../src/privacy.js';

await tf.setBackend('cpu');
const { cases } = JSON.parse(readFileSync(new URL('./fixtures/nopeek_fixtures.json', import.meta.url)));

// each sample's values of several tensors side by side
function rows(tensors) {
  const batch = tensors[0].shape[0];
  const widths = tensors.map((t) => t.data.length / batch);
  const out = [];
  for (let i = 0; i < batch; i += 1) {
    tensors.forEach((t, k) => out.push(...t.data.slice(i * widths[k], (i + 1) * widths[k])));
  }
  return { out: Float64Array.from(out), batch, widths };
}

const worstRelative = (actual, expected) => {
  const scale = Math.max(...expected.map(Math.abs));
  return Math.max(...expected.map((e, k) => Math.abs(actual[k] - e))) / scale;
};

test('the distance correlation and its gradient are splitkeras.privacy\'s, to float64 rounding', () => {
  assert.equal(cases.length, 5);
  for (const c of cases) {
    const x = rows(c.x);
    const a = rows(c.a);
    const { value, gradient } = distanceCorrelation(x.out, a.out, x.batch);
    assert.ok(Math.abs(value - c.value) <= 1e-12 * c.value, `${c.name}: ${value} vs ${c.value}`);
    const expected = rows(c.gradient).out;
    assert.ok(worstRelative([...gradient], [...expected]) <= 1e-9, `${c.name}: gradient`);
  }
  assert.ok(cases.find((c) => c.name.startsWith('nearly')).value > 0.99); // what its name says
  const x = rows(cases[0].x).out;
  const linear = distanceCorrelation(x, x.map((v) => 2 * v + 1), 8); // dCor 1: its maximum
  assert.ok(Math.abs(linear.value - 1) < 1e-12 && Math.max(...linear.gradient.map(Math.abs)) < 1e-6);
});

test('NoPeek\'s float32 gradients of each sent tensor equal the Python client\'s', () => {
  for (const c of cases) {
    const store = new Map([
      ...c.x.map((t, i) => [`x${i}`, tf.tensor(t.data, t.shape, 'float32')]),
      ...c.a.map((t, i) => [`a${i}`, tf.tensor(t.data, t.shape, 'float32')]),
    ]);
    const [defence] = createDefences([{ name: 'nopeek', alpha: c.alpha }], 'u_shaped');
    const names = c.a.map((_, i) => `a${i}`);
    const [grads] = noPeekGradients([defence], store, names, c.x.map((_, i) => `x${i}`));
    assert.deepEqual(defence.lastDcor.length, 1);
    names.forEach((name, i) => {
      const expected = c.nopeek[i].data;
      const actual = [...grads.get(name)];
      // float32 of the same float64 number, or its neighbour where float64 rounding differs
      const worst = Math.max(...expected.map((e, k) => Math.abs(actual[k] - e) / Math.max(Math.abs(e), 1e-30)));
      assert.ok(worst <= 2 ** -23, `${c.name} ${name}: ${worst}`);
    });
    for (const t of store.values()) t.dispose();
  }
});

test('NoPeek adds to what the server answered, in float32, and is off at alpha 0', () => {
  const c = cases[0];
  const store = new Map([['x', tf.tensor(c.x[0].data, c.x[0].shape)], ['a', tf.tensor(c.a[0].data, c.a[0].shape)]]);
  const answer = tf.randomNormal(c.a[0].shape, 0, 1, 'float32', 3);
  const served = answer.dataSync().slice();
  const [defence] = createDefences([{ name: 'nopeek', alpha: c.alpha }], 'u_shaped');
  const extras = noPeekGradients([defence], store, ['a'], ['x']);
  const summed = addNoPeek(tf, new Map([['a', answer]]), extras, store).get('a').dataSync();
  served.forEach((g, k) => assert.equal(summed[k], Math.fround(g + extras[0].get('a')[k])));
  assert.ok(answer.isDisposed);
  const [off] = createDefences([{ name: 'nopeek', alpha: 0 }], 'u_shaped');
  assert.deepEqual(noPeekGradients([off], store, ['a'], ['x']), []);
  assert.equal(createDefences([{ name: 'nopeek' }], 'labels_on_server')[0].alpha, 0.1); // Python's default
});

const off = (alpha) => createDefences([{ name: 'nopeek', alpha }], 'u_shaped')[0];

test('bad NoPeek settings get one clear error each', () => {
  assert.throws(() => createDefences([{ name: 'nopeek', alpha: -1 }], 'u_shaped'),
    /defence 'nopeek': alpha must be a number >= 0, got -1/);
  assert.throws(() => createDefences([{ name: 'nopeek', alpha: '1' }], 'u_shaped'),
    /defence 'nopeek': alpha must be a number >= 0, got 1/);
  const store = new Map([['x', tf.ones([2, 3])]]);
  const [defence] = createDefences([{ name: 'nopeek', alpha: 1 }], 'u_shaped');
  assert.throws(() => noPeekGradients([defence], store, ['x'], ['x']),
    /NoPeek needs the model's inputs on the device, but the server stage reads them all itself/);
  const topology = { stages: [{ kind: 'device', name: 'head', inputs: [{ name: 'x' }] },
    { kind: 'server', name: 'rest', inputs: [{ name: 'x' }] }] };
  assert.throws(() => checkNoPeekStages([defence], topology, ['x']),
    /NoPeek needs the model's inputs on the device, but server stage 'rest' reads them all itself: remove/);
  checkNoPeekStages([off(0)], topology, ['x']); // off: nothing to check
  topology.stages[1].inputs = [{ name: 'h' }];
  checkNoPeekStages([defence], topology, ['x']);
  assert.throws(() => distanceCorrelation(new Float64Array(5), new Float64Array(4), 2),
    /distanceCorrelation: 5 and 4 values do not make 2 samples each/);
});
