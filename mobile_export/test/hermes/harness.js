// The Hermes test's program (test/hermes.test.js bundles it with esbuild, lowers it with
// Babel as Metro would, and runs the same file under Hermes and in Node): the example app's
// training code (examples/react-native/training.js) trains a U-shaped split, a conv head and
// a softmax tail, against the in-memory server, for two steps; the result is the losses and
// the device weights after training.

import { trainOnDevice } from '../../examples/react-native/training.js';
import { fakeServer } from './fake_server.js';

const spec = (name, shape, dtype = 'float32') => ({ name, shape: [null, ...shape], dtype });
export const MANIFEST = {
  format: 'splitkeras.split', format_version: 2, cuts: ['pool', 'm'], source: {},
  model_inputs: [spec('image', [6, 6, 1])], model_outputs: [spec('classes', [3])],
  segments: [
    { name: 'head', placement: 'device', host: 'device', keras_file: 'head.keras', tfjs: 'head_tfjs/model.json',
      inputs: [spec('image', [6, 6, 1])], outputs: [spec('h', [3, 3, 4])] },
    { name: 'middle', placement: 'server', host: 'middle', keras_file: 'middle.keras',
      inputs: [spec('h', [3, 3, 4])], outputs: [spec('m', [5])] },
    { name: 'tail', placement: 'device', host: 'device', keras_file: 'tail.keras', tfjs: 'tail_tfjs/model.json',
      inputs: [spec('m', [5])], outputs: [spec('classes', [3])] },
  ],
  training: { optimizer: { class_name: 'Adam', config: { learning_rate: 0.01 } },
    loss: 'sparse_categorical_crossentropy', metrics: ['accuracy'] },
};

export function models(tf) {
  const seed = (s) => tf.initializers.glorotUniform({ seed: s });
  const image = tf.input({ shape: [6, 6, 1], name: 'image' });
  let h = tf.layers.conv2d({ filters: 4, kernelSize: 3, padding: 'same', activation: 'relu', name: 'conv',
    kernelInitializer: seed(1) }).apply(image);
  h = tf.layers.batchNormalization({ name: 'bn' }).apply(h);
  h = tf.layers.maxPooling2d({ poolSize: 2, name: 'pool' }).apply(h);
  const head = tf.model({ inputs: image, outputs: h, name: 'head' });
  const m = tf.input({ shape: [5], name: 'm' });
  const out = tf.layers.dense({ units: 3, activation: 'softmax', name: 'classes', kernelInitializer: seed(2) }).apply(m);
  return { head, tail: tf.model({ inputs: m, outputs: out, name: 'tail' }) };
}

/** The server's fixed middle and the training data. */
export function data(tf) {
  return {
    W: tf.tensor2d(Array.from({ length: 36 * 5 }, (_, i) => Math.sin(i) * 0.3), [36, 5]),
    xs: tf.tensor4d(Array.from({ length: 8 * 36 }, (_, i) => Math.cos(i * 0.7)), [8, 6, 6, 1]),
    ys: tf.tensor1d([0, 1, 2, 1, 0, 2, 2, 1], 'int32'),
  };
}

globalThis.runHarness = async ({ tf, backend = 'cpu' }) => {
  await tf.setBackend(backend);
  const { W, xs, ys } = data(tf);
  const server = fakeServer(tf, { W });
  const progress = [];
  const result = await trainOnDevice({ tf, manifest: MANIFEST, models: models(tf), serverUrl: 'https://split.test',
    key: 'k', fetch: server.fetch, xs, ys, batchSize: 4, epochs: 1, seed: 3,
    onProgress: ({ batch, loss }) => progress.push([batch, loss]) });
  return { ...result, progress, requests: server.log, backend: tf.getBackend() };
};
