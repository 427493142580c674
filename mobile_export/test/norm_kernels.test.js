// src/norm_kernels.js: the fused training BatchNormalization and the ReLU/ReLU6/clip mask
// gradients, on the cpu and wasm backends: against Keras 3 (fixtures/norm_fixtures.json,
// make_norm_fixtures.py: y, every gradient, the moving statistics), against TF.js' stock
// composition (tf.moments + tf.batchNorm, the stock gradients: NaN, 0 and the clip bounds
// included) on small shapes (batch 1, channel 1, non-square, rank 2), and through the layers
// (TF.js' BatchNormalization, whose training call registerTrainingKernels replaces).

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import '@tensorflow/tfjs-backend-wasm';

import { registerTrainingKernels } from '../src/kernels.js';
import { registerLayers } from '../src/layers/index.js';
import { BN_TRAINING, batchNormTrainingOp } from '../src/norm_kernels.js';
import { close, decoder, relative } from './compare.js';

const fixtures = JSON.parse(readFileSync(new URL('./fixtures/norm_fixtures.json', import.meta.url)));
const decode = decoder(tf);
const bits = (t) => Array.from(new Uint32Array(Float32Array.from(t.dataSync()).buffer));

const batchNormCall = () => Object.getPrototypeOf(tf.layers.batchNormalization({})).call;

/** A BatchNormalization layer as a bundle loads it (the class map's), with the fixture's weights. */
function fixtureLayer(c) {
  const [cls, fromConfig] = tf.serialization.SerializationMap.getMap().classNameMap.BatchNormalization;
  const layer = fromConfig(cls, { momentum: c.momentum, epsilon: c.epsilon });
  layer.build(c.shape);
  layer.setWeights(['gamma', 'beta', 'moving_mean', 'moving_variance'].map((name) => decode(c[name])));
  return layer;
}

/** y and dL/dx, dL/dgamma, dL/dbeta of L = sum(y * dy), training mode, one call. */
function layerGradients(layer, x, dy) {
  const gamma = layer.gamma.read();
  const beta = layer.beta.read();
  const { value, grads } = tf.engine().gradients(() => layer.apply(x, { training: true }), [x, gamma, beta], dy);
  return { y: value, dx: grads[0], dgamma: grads[1], dbeta: grads[2] };
}

/** fn's result and how many times it ran the fused BatchNorm kernel. */
function countingFused(fn) {
  const engine = tf.engine();
  const run = engine.runKernel;
  let fused = 0;
  engine.runKernel = function counted(name, ...rest) {
    if (name === BN_TRAINING) fused += 1;
    return run.call(this, name, ...rest);
  };
  try {
    return { result: fn(), fused };
  } finally {
    engine.runKernel = run;
  }
}

async function onBackends(fn) {
  for (const backend of ['cpu', 'wasm']) {
    await tf.setBackend(backend);
    try {
      await fn(backend);
    } finally {
      await tf.setBackend('cpu');
    }
  }
}

test('BatchNormalization in training through the fused kernels equals Keras (y, dx, dgamma, dbeta, the '
  + 'moving statistics) to 1e-5 relative, on cpu and wasm', async () => {
  const { restore } = registerTrainingKernels(tf);
  restore();
  const stockCall = batchNormCall();
  registerTrainingKernels(tf);
  assert.notEqual(batchNormCall(), stockCall, 'TF.js\' BatchNormalization trains through the fused call');
  await onBackends(async (backend) => {
    const { fused } = countingFused(() => {
      for (const c of fixtures.batch_norm) {
        tf.tidy(() => {
          const layer = fixtureLayer(c);
          const got = layerGradients(layer, decode(c.x), decode(c.dy));
          const what = `${backend} [${c.shape}]`;
          got.moving_mean_after = layer.movingMean.read();
          got.moving_variance_after = layer.movingVariance.read();
          for (const name of ['y', 'dx', 'dgamma', 'dbeta', 'moving_mean_after', 'moving_variance_after']) {
            // against Keras in float64 (the exact value of the same float32 inputs), and against
            // Keras in float32 unless Keras float32 itself is off the float64 value by > 1e-5
            // (x = 50 + 0.1 n: its float32 mean's rounding is ~5e-5 of the spread); there ours
            // must be the closer to float64
            const exact = decode(c.float64[name]);
            close(got[name], exact, `${what} ${name} (Keras float64)`);
            const kerasNoise = relative(decode(c[name]), exact, name);
            if (kerasNoise <= 1e-5) close(got[name], decode(c[name]), `${what} ${name} (Keras float32)`);
            else assert.ok(relative(got[name], exact, name) < kerasNoise, `${what} ${name}: closer than Keras float32`);
          }
        });
      }
    });
    assert.equal(fused, fixtures.batch_norm.length, `${backend}: every case ran the fused kernel`);
  });
});

test('the fused call is TF.js\' own in inference mode; restore() puts TF.js\' call back, also for a layer '
  + 'made before', () => {
  const { restore } = registerTrainingKernels(tf);
  const c = fixtures.batch_norm[0];
  const layer = fixtureLayer(c);
  const ours = tf.tidy(() => layer.apply(decode(c.x), { training: false }).dataSync());
  const fusedCall = batchNormCall();
  restore();
  try {
    assert.notEqual(batchNormCall(), fusedCall);
    const inference = tf.tidy(() => layer.apply(decode(c.x), { training: false }).dataSync());
    assert.deepEqual(Array.from(ours), Array.from(inference));
    // training: the stock composition now (no fused kernel runs), the same numbers to 1e-5
    const before = layer.getWeights().map((w) => w.clone());
    const stock = countingFused(() => tf.tidy(() => {
      const got = layerGradients(layer, decode(c.x), decode(c.dy));
      return [got.y, got.dx, got.dgamma, got.dbeta, layer.movingVariance.read()].map((t) => tf.keep(t.clone()));
    }));
    assert.equal(stock.fused, 0, 'restored: the stock composition');
    layer.setWeights(before);
    registerTrainingKernels(tf);
    const again = countingFused(() => tf.tidy(() => {
      const got = layerGradients(layer, decode(c.x), decode(c.dy));
      [got.y, got.dx, got.dgamma, got.dbeta, layer.movingVariance.read()].forEach((t, i) => close(t, stock.result[i],
        `the same layer, registered again: ${['y', 'dx', 'dgamma', 'dbeta', 'moving variance'][i]}`));
    }));
    assert.equal(again.fused, 1, 'registered again: the fused kernel, for a layer made before');
  } finally {
    registerTrainingKernels(tf);
  }
});

test('the fused kernels equal TF.js\' stock composition (tf.moments + tf.batchNorm, its gradients) on small '
  + 'shapes, on cpu and wasm; without them the same op takes the stock path', async () => {
  const shapes = [[2, 5, 3, 4], [1, 3, 3, 1], [1, 2, 1, 5], [6, 3], [3, 7, 2, 2]];
  await onBackends((backend) => {
    for (const [i, shape] of shapes.entries()) {
      tf.tidy(() => {
        const C = shape[shape.length - 1];
        const x = tf.randomNormal(shape, 1.5, 2, 'float32', 10 + i);
        const gamma = tf.randomUniform([C], 0.5, 1.5, 'float32', 20 + i);
        const beta = tf.randomNormal([C], 0, 1, 'float32', 30 + i);
        const dy = tf.randomNormal(shape, 0, 1, 'float32', 40 + i);
        const axes = shape.slice(0, -1).map((_, d) => d);
        const stock = (a, g, b) => {
          const { mean, variance } = tf.moments(a, axes);
          return tf.batchNorm(a, mean, variance, b, g, 1e-3);
        };
        const fused = (a, g, b) => batchNormTrainingOp(tf, a, g, b, 1e-3).y;
        const expected = tf.engine().gradients(() => stock(x, gamma, beta), [x, gamma, beta], dy);
        const got = tf.engine().gradients(() => fused(x, gamma, beta), [x, gamma, beta], dy);
        const what = `${backend} [${shape}]`;
        close(got.value, expected.value, `${what} y`);
        ['dx', 'dgamma', 'dbeta'].forEach((name, k) => close(got.grads[k], expected.grads[k], `${what} ${name}`));
        const { mean, variance } = batchNormTrainingOp(tf, x, gamma, beta, 1e-3);
        const moments = tf.moments(x, axes);
        close(mean, moments.mean, `${what} mean`);
        close(variance, moments.variance, `${what} variance (biased)`);
      });
    }
  });
  const { restore } = registerTrainingKernels(tf);
  restore();
  try {
    assert.equal(tf.getKernel(BN_TRAINING, 'cpu'), undefined);
    const x = tf.randomNormal([2, 3, 4], 0, 1, 'float32', 5);
    const { y, variance } = batchNormTrainingOp(tf, x, tf.ones([4]), tf.zeros([4]), 1e-3);
    close(variance, tf.moments(x, [0, 1]).variance, 'stock path variance');
    assert.deepEqual(y.shape, [2, 3, 4]);
  } finally {
    registerTrainingKernels(tf);
  }
});

test('one element per channel (batch 1, 1x1): the fused kernels give the exact y = beta and dx = 0, where '
  + 'the stock composition leaves float noise', async () => {
  registerTrainingKernels(tf);
  await onBackends((backend) => tf.tidy(() => {
    const x = tf.randomNormal([1, 1, 1, 5], 3, 2, 'float32', 71);
    const gamma = tf.randomUniform([5], 0.5, 1.5, 'float32', 72);
    const beta = tf.randomNormal([5], 0, 1, 'float32', 73);
    const dy = tf.randomNormal([1, 1, 1, 5], 0, 1, 'float32', 74);
    const { value, grads } = tf.engine().gradients(() => batchNormTrainingOp(tf, x, gamma, beta, 1e-3).y,
      [x, gamma, beta], dy);
    assert.deepEqual(Array.from(value.dataSync()), Array.from(beta.dataSync()), `${backend} y`);
    assert.deepEqual(Array.from(grads[0].dataSync()), [0, 0, 0, 0, 0], `${backend} dx`);
    assert.deepEqual(Array.from(grads[1].dataSync()), [0, 0, 0, 0, 0], `${backend} dgamma`);
    assert.deepEqual(Array.from(grads[2].dataSync()), Array.from(dy.dataSync()), `${backend} dbeta`);
  }));
});

test('SplitkerasMaskGrad refuses an unknown op', () => {
  assert.throws(() => tf.engine().runKernel('SplitkerasMaskGrad', { dy: tf.ones([2]), x: tf.ones([2]) },
    { op: 'gelu' }), /unknown op 'gelu' \(relu, relu6, reluClip or clip\)/);
});

test('ReLU, ReLU6, clipByValue and the ReLU(maxValue) layer (SplitkerasReluClip) equal the stock: values as numbers, '
  + 'gradients bit for bit (NaN, 0, the bounds), on cpu and wasm; the stock path runs where the kernels are missing',
async () => {
  const x = tf.tensor([-1, 0, -0, 1e-30, 0.5, 6, 6.000001, 7, NaN, Infinity, -Infinity, 2.5, -2.5]);
  const dy = tf.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, NaN, 13]);
  const ops = {
    relu: (v) => tf.relu(v),
    relu6: (v) => tf.relu6(v),
    clip: (v) => tf.clipByValue(v, -2.5, 6),
    reluLayer: (v) => tf.layers.reLU({ maxValue: 6 }).apply(v),
    reluLayerMax2: (v) => tf.layers.reLU({ maxValue: 2.5 }).apply(v),
    reluLayerNoMax: (v) => tf.layers.reLU({}).apply(v),
  };
  // values: equal as numbers (the stock relu and clip kernels differ in the sign of a zero and
  // of a NaN between the backends' own and the runtime's generic ones); gradients: bit for bit
  const values = (t) => Array.from(t.dataSync(), (v) => (Number.isNaN(v) ? 'NaN' : v + 0));
  const grads = () => Object.fromEntries(Object.entries(ops).flatMap(([name, f]) => [[name, bits(tf.grad(f)(x, dy))],
    [`${name} forward`, values(f(x))]]));
  const { restore } = registerTrainingKernels(tf);
  const ours = {};
  await onBackends((backend) => { ours[backend] = grads(); });
  restore();
  try {
    await onBackends((backend) => assert.deepEqual(ours[backend], grads(), backend));
    registerTrainingKernels(tf, { backends: ['wasm'] }); // the gradients, no cpu kernel
    assert.equal(tf.getKernel('SplitkerasMaskGrad', 'cpu'), undefined);
    assert.deepEqual(grads(), ours.cpu, 'cpu without the kernel: the stock gradient');
  } finally {
    registerTrainingKernels(tf);
  }
});

test('ReLU(max_value=6) trains as in Keras (dx to 1e-6 relative), on cpu and wasm', async () => {
  registerTrainingKernels(tf);
  await onBackends((backend) => {
    for (const c of fixtures.relu6) {
      tf.tidy(() => {
        const layer = tf.layers.reLU({ maxValue: 6 });
        const x = decode(c.x);
        const { value, grads } = tf.engine().gradients(() => layer.apply(x), [x], decode(c.dy));
        close(value, decode(c.y), `${backend} y`, 1e-6);
        close(grads[0], decode(c.dx), `${backend} dx`, 1e-6);
      });
    }
  });
});

test('SplitkerasBatchNormalization over the last axis without gamma/beta trains through the fused kernel '
  + 'as TF.js\' stock composition does', async () => {
  await tf.setBackend('cpu');
  registerTrainingKernels(tf);
  registerLayers(tf);
  const [cls, fromConfig] = tf.serialization.SerializationMap.getMap().classNameMap.SplitkerasBatchNormalization;
  tf.tidy(() => {
    const layer = fromConfig(cls, { axis: -1, momentum: 0.9, epsilon: 1e-3, center: false, scale: false });
    const x = tf.randomNormal([3, 4, 2, 5], 2, 3, 'float32', 61);
    const dy = tf.randomNormal([3, 4, 2, 5], 0, 1, 'float32', 62);
    layer.apply(x); // build
    const { value, grads } = tf.engine().gradients(() => layer.apply(x, { training: true }), [x], dy);
    const expected = tf.engine().gradients(() => {
      const { mean, variance } = tf.moments(x, [0, 1, 2]);
      // (TF.js' batchNorm cannot differentiate without a scale: ones and zeros, as the layer)
      return tf.batchNorm(x, mean, variance, tf.zeros([5]), tf.ones([5]), 1e-3);
    }, [x], dy);
    close(value, expected.value, 'y');
    close(grads[0], expected.grads[0], 'dx');
    const { mean, variance } = tf.moments(x, [0, 1, 2]);
    close(layer.movingMean.read(), tf.mul(mean, 0.1), 'moving mean from 0');
    close(layer.movingVariance.read(), tf.add(0.9, tf.mul(variance, 0.1)), 'moving variance from 1');
  });
});
