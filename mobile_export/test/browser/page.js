// The page of test/browser.test.js (bundled by esbuild with TF.js and the wasm backend): the
// Hermes harness's split (a conv/BatchNorm/pool head, a softmax tail), trained in the browser
// against the test's in-memory server over real HTTP, with the browser's own fetch.

import * as tf from '@tensorflow/tfjs';
import { setWasmPaths } from '@tensorflow/tfjs-backend-wasm';
import { SplitDevice } from '../../src/runtime.js';
import { MANIFEST, data, models } from '../hermes/harness.js';

window.train = async ({ backend, serverUrl }) => {
  if (backend === 'wasm') setWasmPaths(new URL('/wasm/', location.href).href);
  await tf.setBackend(backend);
  const { xs, ys } = data(tf);
  const device = await SplitDevice.create({ tf, manifest: MANIFEST, models: models(tf), serverUrl,
    key: 'k', seed: 3, retries: 0 });
  try {
    const { history, steps } = await device.fit(xs, ys, { batchSize: 4, epochs: 1, shuffle: false });
    const weights = Object.fromEntries(Object.entries(device.getWeights()).map(([k, v]) => [k, Array.from(v)]));
    await device.closeSession();
    return { backend: tf.getBackend(), history, steps, weights };
  } catch (error) {
    return { error: { name: error.name, code: error.code, message: error.message } };
  }
};
window.pageReady = true;
