// A MobileNetV2-style head (benchmarks/device_step.py's `mobilenet` head, 32x32x3, batch 32)
// built in TF.js from the classes a bundle loads as, trained one step under tf.profile on the
// cpu and wasm backends of Node: step time and the kernels that take it. For profiling the
// runtime's kernels without a server (the committed figures come from benchmarks/device_step.py).
//
//   node tools/head_profile.mjs [cpu|wasm ...] [--stock] [--steps N] [--top N]
import * as tf from '@tensorflow/tfjs';
import '@tensorflow/tfjs-backend-wasm';
import { registerTrainingKernels } from '../src/kernels.js';

const args = process.argv.slice(2);
const option = (name, fallback) => (args.includes(name) ? Number(args[args.indexOf(name) + 1]) : fallback);
const backends = args.filter((a) => ['cpu', 'wasm'].includes(a));
const steps = option('--steps', 3);
const top = option('--top', 12);
if (!args.includes('--stock')) registerTrainingKernels(tf);

function head() {
  const cls = (name) => tf.serialization.SerializationMap.getMap().classNameMap[name];
  const bn = (x) => { const [c, from] = cls('BatchNormalization'); return from(c, {}).apply(x); };
  const relu6 = (x) => tf.layers.reLU({ maxValue: 6 }).apply(x);
  const conv = (x, filters, k = 1) => tf.layers.conv2d({ filters, kernelSize: k, padding: 'same', useBias: false })
    .apply(x);
  const block = (x, expand, out, stride, residual) => {
    let y = x;
    if (expand !== 1) y = relu6(bn(conv(y, x.shape[3] * expand)));
    y = relu6(bn(tf.layers.depthwiseConv2d({ kernelSize: 3, strides: stride, padding: 'same', useBias: false })
      .apply(y)));
    y = bn(conv(y, out));
    return residual ? tf.layers.add().apply([x, y]) : y;
  };
  const input = tf.input({ shape: [32, 32, 3] });
  let x = relu6(bn(conv(input, 16, 3)));
  x = block(x, 1, 16, 1, true);
  x = block(x, 4, 24, 2, false);
  x = block(x, 4, 24, 1, true);
  return tf.model({ inputs: input, outputs: x });
}

for (const backend of backends.length ? backends : ['cpu', 'wasm']) {
  await tf.setBackend(backend);
  const model = head();
  const x = tf.randomNormal([32, 32, 32, 3], 0, 1, 'float32', 1);
  const g = tf.randomNormal([32, 16, 16, 24], 0, 1, 'float32', 2);
  const step = () => tf.tidy(() => {
    const vars = model.trainableWeights.map((w) => w.read());
    const { grads } = tf.variableGrads(() => tf.sum(tf.mul(model.apply(x, { training: true }), g)), vars);
    return Object.values(grads).map((t) => t.dataSync()[0]);
  });
  step();
  const times = [];
  for (let i = 0; i < steps; i += 1) {
    const start = performance.now();
    step();
    times.push(performance.now() - start);
  }
  const profile = await tf.profile(step);
  const byKernel = profile.kernels.map((k) => [`${k.name} ${JSON.stringify(k.inputShapes)}`, k.kernelTimeMs])
    .sort((a, b) => b[1] - a[1]).slice(0, top);
  console.log(`${backend}: step ${times.map((t) => t.toFixed(0)).join(', ')} ms`);
  for (const [name, ms] of byKernel) console.log(`  ${ms.toFixed(1).padStart(7)}  ${name}`);
}
