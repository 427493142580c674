// src/layers/: what it registers against table.json (the table the exporter reads), loading
// with a plain tf.loadLayersModel, and each class's config round trip. The numbers of every
// class against Keras (predict, gradients, moving statistics) are checked from Python in
// tests/test_tfjs_export.py, which exports Keras layers and runs them here in TF.js.

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import * as tf from '@tensorflow/tfjs';

import { registerLayers } from '../src/layers/index.js';
import { registered } from '../src/layers/register.js';
import { bilinearMatrix } from '../src/layers/misc.js';
import { dilateKernel } from '../src/layers/convolution.js';

await tf.setBackend('cpu');
const TABLE = JSON.parse(readFileSync(new URL('../src/layers/table.json', import.meta.url), 'utf8'));

test('the runtime registers exactly the classes and activations table.json lists', () => {
  assert.deepEqual([...registered.classes].sort(), Object.keys(TABLE.classes).sort());
  const activations = new Set(Object.values(TABLE.activations).filter((a) => a.registered).map((a) => a.registered));
  assert.deepEqual([...registered.activations].sort(), [...activations].sort());
  const map = tf.serialization.SerializationMap.getMap().classNameMap;
  for (const name of [...registered.classes, ...registered.activations]) assert.ok(map[name], name);
  // what the exporter writes (snake case) is what TF.js camel-cases into the registered name
  for (const entry of Object.values(TABLE.activations).filter((a) => a.registered)) {
    const camel = entry.tfjs.replace(/_+(\w)/g, (_, c) => c.toUpperCase());
    assert.equal(camel, entry.registered);
  }
  // every custom class the layer table routes to is one the runtime registers
  for (const [keras, entry] of Object.entries(TABLE.layers)) {
    if (entry.custom) assert.ok(registered.classes.includes(entry.custom), `${keras} -> ${entry.custom}`);
  }
});

test("the runtime's recurrent layers count their cell's regularizers (TF.js' own do not)", () => {
  const config = { units: 2, kernelRegularizer: { className: 'L1L2', config: { l1: 0, l2: 0.1 } } };
  const map = tf.serialization.SerializationMap.getMap().classNameMap;
  const x = tf.ones([1, 3, 4]);
  for (const name of ['SplitkerasLSTM', 'SplitkerasGRU', 'SplitkerasSimpleRNN']) {
    const [cls, fromConfig] = map[name];
    const layer = fromConfig(cls, { name: `reg_${name}`, ...config });
    layer.apply(x);
    assert.equal(layer.losses.length, 1, name);
  }
  const builtin = tf.layers.lstm({ units: 2, kernelRegularizer: tf.regularizers.l2({ l2: 0.1 }) });
  builtin.apply(x);
  assert.equal(builtin.losses.length, 0, 'TF.js 4.22 LSTM keeps the loss to its cell (if this changed, revisit)');
});

test('registering again (the same TF.js) is harmless and returns the same lists', () => {
  assert.equal(registerLayers(tf), registered);
});

const shape = (t) => t.shape;
const randomize = (layer) => {
  layer.setWeights(layer.getWeights().map((w, i) => (w.dtype === 'int32' ? w
    : tf.randomNormal(w.shape, 0, 0.5, 'float32', 17 + i))));
};

// One config per registered class, as the exporter writes it (after TF.js' camel-casing), and an input.
const CASES = {
  SplitkerasConv1D: [{ filters: 3, kernelSize: [3], strides: [1], padding: 'causal', dilationRate: [2], groups: 1,
    useBias: true, activation: 'relu' }, [2, 9, 4]],
  SplitkerasConv2D: [{ filters: 4, kernelSize: [3, 3], strides: [1, 1], padding: 'same', dilationRate: [2, 2],
    groups: 2, useBias: true, activation: 'linear' }, [2, 7, 7, 4]],
  SplitkerasDepthwiseConv2D: [{ kernelSize: [3, 3], strides: [1, 1], padding: 'valid', dilationRate: [2, 2],
    depthMultiplier: 2, useBias: true, activation: 'linear' }, [2, 8, 8, 3]],
  SplitkerasSeparableConv2D: [{ filters: 2, kernelSize: [3, 3], strides: [1, 1], padding: 'same',
    dilationRate: [2, 2], depthMultiplier: 1, useBias: false, activation: 'tanh' }, [2, 6, 6, 3]],
  SplitkerasAveragePooling1D: [{ poolSize: [3], strides: [2], padding: 'same' }, [2, 7, 3]],
  SplitkerasAveragePooling2D: [{ poolSize: [3, 3], strides: [2, 2], padding: 'same' }, [2, 7, 6, 3]],
  SplitkerasGlobalAveragePooling1D: [{ keepdims: true }, [2, 5, 3]],
  SplitkerasGlobalAveragePooling2D: [{ keepdims: true }, [2, 5, 4, 3]],
  SplitkerasGlobalMaxPooling1D: [{ keepdims: true }, [2, 5, 3]],
  SplitkerasGlobalMaxPooling2D: [{ keepdims: true }, [2, 5, 4, 3]],
  SplitkerasBatchNormalization: [{ axis: 1, momentum: 0.9, epsilon: 1e-3, center: false, scale: true }, [4, 3, 5]],
  SplitkerasNormalization: [{ axis: [2], invert: false, mean: null, variance: null, broadcastShape: [1, 1, 3] },
    [2, 4, 3]],
  SplitkerasELU: [{ alpha: 0.5 }, [2, 6]],
  SplitkerasRescaling: [{ scale: [0.5, 2, 1], offset: [1, 0, -1] }, [2, 4, 3]],
  SplitkerasLayerScale: [{ initValues: 0.1, projectionDim: 3 }, [2, 4, 3]],
  SplitkerasCustomScale: [{ scale: 0.17 }, [[2, 4, 3], [2, 4, 3]]],
  SplitkerasUpSampling2D: [{ size: [2, 3], interpolation: 'bilinear' }, [2, 3, 4, 2]],
  SplitkerasGRU: [{ units: 3, activation: 'tanh', recurrentActivation: 'sigmoid', useBias: true,
    returnSequences: true }, [2, 5, 4]],
  SplitkerasOperation: [{ op: 'add', operands: [null, 3] }, [2, 4]],
  SplitkerasLSTM: [{ units: 2, kernelRegularizer: { className: 'L1L2', config: { l1: 0, l2: 0.1 } } }, [2, 3, 4]],
  SplitkerasSimpleRNN: [{ units: 2, returnSequences: true }, [2, 3, 4]],
};

test('every registered class has a round-trip case here', () => {
  assert.deepEqual(Object.keys(CASES).sort(), [...registered.classes].sort());
});

for (const [className, [config, inputShape]] of Object.entries(CASES)) {
  test(`${className}: computeOutputShape is the shape call returns, and the config round-trips`, () => {
    const [cls, fromConfig] = tf.serialization.SerializationMap.getMap().classNameMap[className];
    const layer = fromConfig(cls, { name: `l_${className}`, ...config });
    const shapes = Array.isArray(inputShape[0]) ? inputShape : [inputShape];
    const xs = shapes.map((s, i) => tf.randomNormal(s, 0, 1, 'float32', 3 + i));
    const y = layer.apply(xs.length === 1 ? xs[0] : xs);
    randomize(layer);
    const out = layer.apply(xs.length === 1 ? xs[0] : xs);
    const expected = layer.computeOutputShape(xs.length === 1 ? shape(xs[0]) : xs.map(shape));
    assert.deepEqual(out.shape, expected.map((d, i) => (d == null ? out.shape[i] : d)));
    const copy = fromConfig(cls, { ...layer.getConfig(), name: `copy_${className}` });
    copy.apply(xs.length === 1 ? xs[0] : xs);
    copy.setWeights(layer.getWeights());
    const again = copy.apply(xs.length === 1 ? xs[0] : xs);
    assert.deepEqual(Array.from(again.dataSync()), Array.from(out.dataSync()));
    tf.dispose([...xs, y, out, again]);
  });
}

test('a bundle with the runtime classes loads with a plain tf.loadLayersModel', async () => {
  const layers = [
    { class_name: 'InputLayer', name: 'x', inbound_nodes: [],
      config: { batch_input_shape: [null, 4, 4, 2], dtype: 'float32', sparse: false, name: 'x' } },
    { class_name: 'SplitkerasConv2D', name: 'base/conv', inbound_nodes: [[['x', 0, 0, {}]]],
      config: { name: 'base/conv', trainable: true, filters: 2, kernel_size: [3, 3], strides: [1, 1],
        padding: 'same', dilation_rate: [2, 2], groups: 2, use_bias: true, activation: 'splitkeras_hard_silu' } },
    { class_name: 'SplitkerasOperation', name: 'add', inbound_nodes: [[['base/conv', 0, 0, {}]]],
      config: { name: 'add', trainable: true, op: 'add', operands: [null, 3.0] } },
  ];
  const artifacts = {
    modelTopology: { class_name: 'Model', config: { name: 'm', layers, input_layers: [['x', 0, 0]],
      output_layers: [['add', 0, 0]] } },
    weightSpecs: [{ name: 'base/conv/kernel', shape: [3, 3, 1, 2], dtype: 'float32' },
      { name: 'base/conv/bias', shape: [2], dtype: 'float32' }],
    weightData: new Float32Array(20).fill(0.25).buffer,
  };
  const model = await tf.loadLayersModel(tf.io.fromMemory(artifacts), { strict: true });
  assert.deepEqual(model.layers.map((l) => l.getClassName()), ['InputLayer', 'SplitkerasConv2D', 'SplitkerasOperation']);
  assert.deepEqual(model.weights.map((w) => w.originalName), ['base/conv/kernel', 'base/conv/bias']);
  assert.equal(model.layers[1].activation.getClassName(), 'splitkerasHardSilu');
  const y = model.predict(tf.ones([1, 4, 4, 2]));
  assert.deepEqual(y.shape, [1, 4, 4, 2]);
  // corner: 4 taps of the dilated 3x3 kernel fall inside (0.25 * 4 + 0.25 bias = 1.25), hard_silu, + 3
  const corner = 1.25 * Math.min(Math.max(1.25 + 3, 0), 6) / 6 + 3;
  assert.ok(Math.abs(y.dataSync()[0] - corner) < 1e-6, `${y.dataSync()[0]} vs ${corner}`);
  model.dispose();
});

test('dilateKernel puts rate - 1 zeros between taps; bilinear rows sum to one', () => {
  const k = tf.tensor4d([1, 2, 3, 4], [2, 2, 1, 1]);
  assert.deepEqual(Array.from(dilateKernel(tf, k, [2, 3]).dataSync()), [1, 0, 0, 2, 0, 0, 0, 0, 3, 0, 0, 4]);
  for (const row of bilinearMatrix(3, 7)) assert.ok(Math.abs(row.reduce((a, b) => a + b, 0) - 1) < 1e-12);
  assert.deepEqual(bilinearMatrix(2, 4), [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]]);
});
