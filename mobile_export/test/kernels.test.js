// src/kernels.js: the training kernels the runtime registers, checked against TensorFlow/Keras
// gradients (fixtures/kernel_fixtures.json, make_kernel_fixtures.py) on the cpu and wasm
// backends, against the stock cpu kernels on random shapes and paddings, for speed against
// the stock cpu kernel, and by training a conv/depthwise/pooling/BatchNorm model on wasm.

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import '@tensorflow/tfjs-backend-wasm';

import { TRAINING_KERNELS, registerTrainingKernels } from '../src/kernels.js';
import { close, decoder } from './compare.js';

const fixtures = JSON.parse(readFileSync(new URL('./fixtures/kernel_fixtures.json', import.meta.url)));
const decode = decoder(tf);
const pair = (v) => (Array.isArray(v) ? v : [v, v]);

// The gradients TF.js computes for one fixture case: {y?, dx, dkernel?}.
function tfjsGradients(c) {
  return tf.tidy(() => {
    const x = decode(c.x);
    const dy = decode(c.dy);
    const cfg = c.config;
    const pad = cfg.padding;
    if (c.layer === 'MaxPooling2D' || c.layer === 'AveragePooling2D') {
      const pool = (input) => (c.layer === 'MaxPooling2D' ? tf.maxPool : tf.avgPool)(input,
        pair(cfg.pool_size), pair(cfg.strides), pad);
      return { dx: tf.engine().gradients(() => pool(x), [x], dy).grads[0] };
    }
    const kernel = decode(c.kernel);
    const strides = pair(cfg.strides);
    const dilations = pair(cfg.dilation_rate ?? 1);
    if (c.layer === 'Conv2D') {
      const { grads } = tf.engine().gradients(() => tf.conv2d(x, kernel, strides, pad), [x, kernel], dy);
      return { dx: grads[0], dkernel: grads[1] };
    }
    const y = tf.depthwiseConv2d(x, kernel, strides, pad, 'NHWC', dilations);
    if (dilations[0] === 1 && dilations[1] === 1) {
      const { grads } = tf.engine().gradients(() => tf.depthwiseConv2d(x, kernel, strides, pad), [x, kernel], dy);
      return { y, dx: grads[0], dkernel: grads[1] };
    }
    // TF.js's depthwise gradient refuses dilations > 1; the kernels themselves take them
    const attrs = { strides, pad, dilations };
    return { y,
      dx: tf.engine().runKernel('DepthwiseConv2dNativeBackpropInput', { dy, filter: kernel },
        { ...attrs, inputShape: x.shape }),
      dkernel: tf.engine().runKernel('DepthwiseConv2dNativeBackpropFilter', { x, dy },
        { ...attrs, filterShape: kernel.shape }) };
  });
}

for (const backend of ['cpu', 'wasm']) {
  test(`${backend}: conv, depthwise and pooling gradients (and the depthwise forward) equal `
    + 'Keras\' to 1e-5 relative', async () => {
    registerTrainingKernels(tf);
    await tf.setBackend(backend);
    try {
      for (const c of fixtures.cases) {
        const what = `${backend} ${c.layer} ${JSON.stringify(c.config)} x${JSON.stringify(c.x.shape)}`;
        const got = tfjsGradients(c);
        close(got.dx, decode(c.dx), `${what} dx`);
        if (c.dkernel) close(got.dkernel, decode(c.dkernel), `${what} dkernel`);
        if (c.y) close(got.y, decode(c.y), `${what} y`);
        Object.values(got).forEach((t) => t.dispose());
      }
    } finally {
      await tf.setBackend('cpu');
    }
  });
}

// Random cases for the stock comparison: [kernel, inputs, attrs]
function randomCases() {
  const r = (shape, seed) => tf.randomNormal(shape, 0, 1, 'float32', seed);
  const cases = [];
  const convs = [
    { x: [3, 9, 7, 4], f: [3, 3, 4, 5], strides: [1, 1], pad: 'same' },
    { x: [2, 10, 10, 3], f: [4, 4, 3, 2], strides: [2, 2], pad: 'same' },
    { x: [2, 11, 9, 2], f: [3, 2, 2, 3], strides: [3, 2], pad: 'valid' },
    { x: [2, 8, 8, 3], f: [3, 3, 3, 4], strides: [2, 2], pad: 1, dimRoundingMode: 'ceil' },
    { x: [2, 8, 8, 3], f: [3, 3, 3, 4], strides: [2, 2], pad: 2, dimRoundingMode: 'floor' },
    { x: [2, 7, 8, 3], f: [3, 3, 3, 4], strides: [1, 2], pad: [[0, 0], [2, 0], [1, 3], [0, 0]] },
  ];
  convs.push({ x: [2, 6, 5, 7], f: [1, 1, 7, 9], strides: [1, 1], pad: 'valid' }, // pointwise
    { x: [3, 6, 6, 5], f: [1, 1, 5, 6], strides: [2, 2], pad: 'same' });
  convs.forEach((c, i) => {
    const info = tf.backend_util.computeConv2DInfo(c.x, c.f, c.strides, 1, c.pad, c.dimRoundingMode);
    const attrs = { strides: c.strides, pad: c.pad, dataFormat: 'NHWC', dimRoundingMode: c.dimRoundingMode };
    const x = r(c.x, i);
    const dy = r(info.outShape, 100 + i);
    const filter = r(c.f, 700 + i);
    cases.push(['Conv2DBackpropFilter', { x, dy }, { ...attrs, filterShape: c.f }]);
    cases.push(['Conv2DBackpropInput', { dy, filter }, { ...attrs, inputShape: c.x }]);
    cases.push(['Conv2D', { x, filter }, { ...attrs, dilations: [1, 1] }]);
    cases.push(['FusedConv2D', { x, filter, bias: r([c.f[3]], 800 + i) },
      { ...attrs, dilations: [1, 1], activation: ['relu', 'relu6', 'linear', 'leakyrelu', 'elu', 'sigmoid'][i % 6],
        leakyreluAlpha: 0.1 }]);
  });
  const depthwise = [
    { x: [2, 9, 7, 4], f: [3, 3, 4, 1], strides: [1, 1], pad: 'same', dilations: [1, 1] },
    { x: [2, 10, 10, 3], f: [3, 3, 3, 2], strides: [2, 2], pad: 'same', dilations: [1, 1] },
    // dilations > 1: the stock backprop kernels ignore them (TF.js's depthwise gradient refuses
    // them); the forward is compared here, the gradients against Keras above
    { x: [2, 9, 9, 2], f: [2, 3, 2, 3], strides: [1, 1], pad: 'valid', dilations: [2, 1], forwardOnly: true },
    { x: [2, 8, 8, 3], f: [3, 3, 3, 1], strides: [2, 2], pad: 1, dimRoundingMode: 'round', dilations: [1, 1] },
    { x: [2, 7, 8, 3], f: [3, 3, 3, 2], strides: [1, 2], pad: [[0, 0], [1, 0], [0, 2], [0, 0]], dilations: [1, 1] },
  ];
  depthwise.forEach((c, i) => {
    const info = tf.backend_util.computeConv2DInfo(c.x, c.f, c.strides, c.dilations, c.pad,
      c.dimRoundingMode, true);
    const attrs = { strides: c.strides, pad: c.pad, dilations: c.dilations, dimRoundingMode: c.dimRoundingMode };
    const x = r(c.x, 200 + i);
    const dy = r(info.outShape, 300 + i);
    const filter = r(c.f, 400 + i);
    if (!c.forwardOnly) {
      cases.push(['DepthwiseConv2dNativeBackpropFilter', { x, dy }, { ...attrs, filterShape: c.f }]);
      cases.push(['DepthwiseConv2dNativeBackpropInput', { dy, filter }, { ...attrs, inputShape: c.x }]);
    }
    cases.push(['DepthwiseConv2dNative', { x, filter }, attrs]);
  });
  // AvgPoolGrad without padding (with padding the stock kernel is wrong: see the Keras test)
  [{ x: [2, 8, 8, 3], filterSize: 2, strides: 2 }, { x: [2, 9, 7, 2], filterSize: [3, 2], strides: [2, 1] }]
    .forEach((c, i) => {
      const info = tf.backend_util.computePool2DInfo(c.x, c.filterSize, c.strides, 1, 'valid');
      cases.push(['AvgPoolGrad', { dy: r(info.outShape, 500 + i), input: r(c.x, 600 + i) },
        { filterSize: c.filterSize, strides: c.strides, pad: 'valid' }]);
    });
  // the generic kernels: broadcasts, reductions over leading or trailing axes, tile
  const big = r([3, 4, 5, 6], 900);
  const pairs = [[[3, 4, 5, 6], [3, 4, 5, 6]], [[3, 4, 5, 6], [6]], [[1, 1, 1, 6], [3, 4, 5, 6]],
    [[3, 4, 5, 6], []], [[], [3, 4, 5, 6]], [[3, 4, 5, 6], [5, 6]], [[3, 4, 5, 6], [3, 1, 5, 6]], [[4, 1], [1, 6]]];
  pairs.forEach(([sa, sb], i) => {
    for (const name of ['Add', 'Sub', 'Multiply', 'RealDiv', 'Maximum', 'Minimum', 'SquaredDifference',
      'Greater', 'GreaterEqual', 'Less', 'LessEqual', 'Equal']) {
      const a = sa.length ? r(sa, 1000 + i) : tf.scalar(0.25);
      const b = sb.length ? r(sb, 1100 + i) : tf.scalar(-0.5);
      cases.push([name, { a: i === 7 ? a : (name === 'Equal' ? tf.round(a) : a), b: name === 'Equal' ? tf.round(b) : b }, {}]);
    }
    cases.push(['Add', { a: tf.cast(tf.mul(r(sa.length ? sa : [1], 1200 + i), 10), 'int32'),
      b: tf.cast(tf.mul(r(sb.length ? sb : [1], 1300 + i), 10), 'int32') }, {}]);
    cases.push(['LogicalAnd', { a: tf.greater(r(sa.length ? sa : [1], 1400 + i), 0),
      b: tf.greater(r(sb.length ? sb : [1], 1500 + i), 0) }, {}]);
  });
  for (const [axis, keepDims] of [[[0, 1, 2], false], [[0, 1, 2], true], [[3], false], [[2, 3], true], [0, false],
    [[1, 2], false], [-1, false], [[0, 1, 2, 3], false]]) {
    cases.push(['Sum', { x: big }, { axis, keepDims }]);
    cases.push(['Mean', { x: big }, { axis, keepDims }]);
  }
  cases.push(['Sum', { x: tf.cast(tf.mul(big, 10), 'int32') }, { axis: [0, 1, 2], keepDims: false }]);
  for (const [shape, reps] of [[[1, 1, 1, 6], [3, 4, 5, 1]], [[2, 3], [2, 2]], [[2, 1, 3], [1, 4, 1]], [[5], [3]]]) {
    cases.push(['Tile', { x: r(shape, 1600) }, { reps }]);
  }
  cases.push(['Tile', { x: tf.greater(r([2, 3], 1700), 0) }, { reps: [2, 1] }]);
  const withNaN = tf.concat([r([20], 1800).mul(8), tf.tensor1d([NaN, 0, 6, -0])]);
  for (const [name, attrs] of [['Relu', {}], ['Relu6', {}], ['ClipByValue', { clipValueMin: -1, clipValueMax: 2.5 }],
    ['Step', { alpha: 0 }], ['Step', { alpha: 0.3 }]]) {
    cases.push([name, { x: withNaN }, attrs]);
  }
  return cases;
}

test('cpu: the registered kernels equal the stock cpu kernels on random shapes, strides, '
  + 'dilations and paddings (same, valid, numeric with rounding, explicit)', async () => {
  await tf.setBackend('cpu');
  const cases = randomCases();
  const { restore } = registerTrainingKernels(tf, { backends: ['cpu'] });
  const ours = cases.map(([name, inputs, attrs]) => tf.engine().runKernel(name, inputs, attrs));
  restore();
  try {
    cases.forEach(([name, inputs, attrs], i) => {
      const stock = tf.engine().runKernel(name, inputs, attrs);
      const what = `${name} ${JSON.stringify(Object.values(inputs).map((t) => t.shape))} ${JSON.stringify(attrs)}`;
      assert.equal(ours[i].dtype, stock.dtype, `${what}: dtype`);
      close(ours[i].dtype === 'bool' ? tf.cast(ours[i], 'float32') : ours[i],
        stock.dtype === 'bool' ? tf.cast(stock, 'float32') : stock, what, 1e-6);
      stock.dispose();
    });
  } finally {
    registerTrainingKernels(tf);
  }
});

test('wasm: the replaced kernels equal the stock wasm kernels (conv input gradient, tile, transposed products)', async () => {
  await tf.setBackend('wasm');
  try {
    const r = (shape, seed) => tf.randomNormal(shape, 0, 1, 'float32', seed);
    const cases = randomCases().filter(([name]) => ['Conv2DBackpropInput', 'Tile'].includes(name));
    for (const [transposeA, transposeB] of [[true, false], [false, true], [true, true], [false, false]]) {
      const a = r(transposeA ? [2, 5, 3] : [2, 3, 5], 1900);
      const b = r(transposeB ? [2, 4, 5] : [2, 5, 4], 1901);
      cases.push(['BatchMatMul', { a, b }, { transposeA, transposeB }]);
    }
    const ours = cases.map(([name, inputs, attrs]) => tf.engine().runKernel(name, inputs, attrs));
    const { restore } = registerTrainingKernels(tf, { backends: ['wasm'] });
    restore();
    cases.forEach(([name, inputs, attrs], i) => {
      const stock = tf.engine().runKernel(name, inputs, attrs);
      close(ours[i].dtype === 'bool' ? tf.cast(ours[i], 'float32') : ours[i],
        stock.dtype === 'bool' ? tf.cast(stock, 'float32') : stock, `wasm ${name} ${JSON.stringify(attrs)}`, 1e-6);
    });
  } finally {
    registerTrainingKernels(tf);
    await tf.setBackend('cpu');
  }
});

test('cpu: Conv2DBackpropFilter is more than 5x faster than the stock kernel', async () => {
  await tf.setBackend('cpu');
  const x = tf.randomNormal([8, 8, 8, 16]);
  const dy = tf.randomNormal([8, 8, 8, 32]);
  const attrs = { strides: [1, 1], pad: 'same', dataFormat: 'NHWC', filterShape: [3, 3, 16, 32] };
  const time = () => {
    const started = performance.now();
    tf.tidy(() => { tf.engine().runKernel('Conv2DBackpropFilter', { x, dy }, attrs).dataSync(); });
    return performance.now() - started;
  };
  const { restore } = registerTrainingKernels(tf, { backends: ['cpu'] });
  time();
  const ours = Math.min(time(), time(), time());
  restore();
  const stock = time();
  registerTrainingKernels(tf);
  assert.ok(ours * 5 < stock, `ours ${ours.toFixed(1)} ms, stock ${stock.toFixed(1)} ms`);
  [x, dy].forEach((t) => t.dispose());
});

// A model with every layer kind the table in the README lists as training on wasm.
function convModel() {
  const seed = (s) => tf.initializers.glorotUniform({ seed: s });
  const input = tf.input({ shape: [8, 8, 3] });
  let h = tf.layers.conv2d({ filters: 8, kernelSize: 3, padding: 'same', activation: 'relu',
    kernelInitializer: seed(1) }).apply(input);
  h = tf.layers.batchNormalization().apply(h);
  h = tf.layers.depthwiseConv2d({ kernelSize: 3, padding: 'same', depthMultiplier: 2,
    depthwiseInitializer: seed(2) }).apply(h);
  h = tf.layers.maxPooling2d({ poolSize: 2 }).apply(h); // negative maxima (no ReLU before)
  h = tf.layers.reLU({ maxValue: 6 }).apply(h);
  h = tf.layers.conv2d({ filters: 6, kernelSize: 3, strides: 2, padding: 'same', kernelInitializer: seed(3) }).apply(h);
  h = tf.layers.averagePooling2d({ poolSize: 3, strides: 1, padding: 'same' }).apply(h);
  h = tf.layers.separableConv2d({ filters: 4, kernelSize: 1, depthwiseInitializer: seed(4),
    pointwiseInitializer: seed(5) }).apply(h);
  h = tf.layers.globalAveragePooling2d({}).apply(h);
  const out = tf.layers.dense({ units: 3, kernelInitializer: seed(6) }).apply(h);
  return tf.model({ inputs: input, outputs: out });
}

function gradsOn(model, x, g) {
  const vars = model.trainableWeights.map((w) => w.read());
  const { grads } = tf.variableGrads(() => tf.sum(tf.mul(model.apply(x, { training: true }), g)), vars);
  return vars.map((v) => grads[v.name]);
}

test('wasm: a conv/depthwise/separable/pooling/BatchNorm model trains, with the gradients of '
  + 'the cpu backend; without the kernels it cannot', async () => {
  await tf.setBackend('cpu');
  const { restore } = registerTrainingKernels(tf);
  const model = convModel();
  const x = tf.randomNormal([4, 8, 8, 3], 0, 1, 'float32', 7);
  const g = tf.randomNormal([4, 3], 0, 1, 'float32', 8);
  // the reference: cpu with the kernels checked against Keras above
  const reference = gradsOn(model, x, g).map((t) => ({ shape: t.shape, data: t.dataSync() }));
  restore(); // the stock kernels, on both backends
  await tf.setBackend('wasm');
  try {
    assert.throws(() => gradsOn(model, x, g), /not registered|Conv2DBackpropFilter|DepthwiseConv2dNative/);
    const { registered } = registerTrainingKernels(tf);
    assert.deepEqual(registered.filter((r) => r.backendName === 'wasm' && !r.replaced)
      .map((r) => r.kernelName).sort(), ['Conv2DBackpropFilter', 'DepthwiseConv2dNativeBackpropFilter',
      'DepthwiseConv2dNativeBackpropInput', 'SplitkerasBatchNormTraining', 'SplitkerasBatchNormTrainingGrad',
      'SplitkerasMaskGrad', 'SplitkerasReluClip', 'UnsortedSegmentSum'],
    'the kernels wasm lacks, and the fused ones of norm_kernels.js');
    assert.deepEqual(registered.filter((r) => r.backendName === 'wasm').map((r) => r.kernelName),
      TRAINING_KERNELS.wasm);
    const grads = gradsOn(model, x, g);
    grads.forEach((t, i) => {
      close(t, tf.tensor(reference[i].data, reference[i].shape), `wasm grad of ${model.trainableWeights[i].originalName}`);
    });
  } finally {
    await tf.setBackend('cpu');
    registerTrainingKernels(tf);
  }
});

test('wasm: an Embedding trains (UnsortedSegmentSum, its gradient, is added), as on cpu', async () => {
  await tf.setBackend('cpu');
  const model = tf.sequential({ layers: [tf.layers.embedding({ inputDim: 7, outputDim: 3, inputLength: 5,
    embeddingsInitializer: tf.initializers.randomUniform({ minval: -1, maxval: 1, seed: 3 }) }),
  tf.layers.flatten(), tf.layers.dense({ units: 2, kernelInitializer: tf.initializers.glorotUniform({ seed: 4 }) })] });
  const ids = tf.tensor([[1, 2, 2, 6, 0], [6, 6, 3, 1, 1]], [2, 5], 'int32');
  const g = tf.tensor([[1, -2], [0.5, 3]]);
  const reference = gradsOn(model, ids, g).map((t) => ({ shape: t.shape, data: t.dataSync() }));
  await tf.setBackend('wasm');
  try {
    gradsOn(model, ids, g).forEach((t, i) => close(t, tf.tensor(reference[i].data, reference[i].shape),
      `wasm grad of ${model.trainableWeights[i].originalName}`, 1e-6));
    const summed = tf.unsortedSegmentSum(tf.tensor([[1, 2], [3, 4], [5, 6]], [3, 2], 'int32'),
      tf.tensor1d([2, 0, 2], 'int32'), 3);
    assert.deepEqual(summed.arraySync(), [[3, 4], [0, 0], [6, 8]]);
  } finally {
    await tf.setBackend('cpu');
  }
});

test('registerTrainingKernels is idempotent, refuses an unknown backend, and restore() puts the '
  + 'stock kernels back', () => {
  const first = registerTrainingKernels(tf);
  const again = registerTrainingKernels(tf);
  assert.deepEqual(again.registered, first.registered);
  assert.ok(first.registered.some((r) => r.kernelName === 'Conv2DBackpropFilter' && r.backendName === 'cpu'
    && r.replaced));
  assert.throws(() => registerTrainingKernels(tf, { backends: ['webgl'] }), /no kernels for backend 'webgl'/);
  const ours = tf.getKernel('Conv2DBackpropFilter', 'cpu').kernelFunc;
  first.restore();
  assert.notEqual(tf.getKernel('Conv2DBackpropFilter', 'cpu').kernelFunc, ours);
  assert.equal(tf.getKernel('Conv2DBackpropFilter', 'wasm'), undefined);
  registerTrainingKernels(tf);
  assert.ok(tf.getKernel('Conv2DBackpropFilter', 'wasm'));
});
