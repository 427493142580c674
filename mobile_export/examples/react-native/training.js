// The training code of the example app (App.js), kept free of React Native imports so that
// the runtime's tests run it under the Hermes engine (test/hermes.test.js) and in Node.
//
// trainOnDevice: create the SplitDevice from the app bundle's models (the saved, trained ones
// when there are some), train with fit, save the trained device segments, close the session.

import { SplitDevice } from 'splitkeras-device';

/**
 * @param {{tf: object, manifest: object, models: Object<string, object>,
 *   serverUrl: string, key: string, xs: object, ys: object, fetch?: Function,
 *   batchSize?: number, epochs?: number, wireDtype?: string, seed?: number,
 *   onProgress?: (info: {epoch: number, batch: number, loss: number}) => void,
 *   save?: (name: string, model: object) => Promise<void>}} options
 *   `models`: each device segment's tf.LayersModel or IOHandler; `save` stores a trained
 *   segment (the app: `model.save(asyncStorageIO(...))`).
 * @returns {Promise<{history: Object<string, number[]>, steps: number, stats: object,
 *   weights: Object<string, number[]>}>}
 */
export async function trainOnDevice({
  tf, manifest, models, serverUrl, key, xs, ys, fetch, batchSize = 32, epochs = 1,
  wireDtype = 'float32', seed = 1, onProgress = () => {}, save = null,
}) {
  const device = await SplitDevice.create({ tf, manifest, models, serverUrl, key, fetch, wireDtype, seed });
  let epoch = 0;
  const { history, steps } = await device.fit(xs, ys, {
    batchSize, epochs, shuffle: false,
    onEpochBegin: (e) => { epoch = e; },
    onBatchEnd: (batch, logs) => onProgress({ epoch, batch, loss: logs.loss }),
  });
  if (save) {
    for (const segment of manifest.segments.filter((s) => s.placement === 'device')) {
      await save(segment.name, device.model(segment.name));
    }
  }
  const stats = device.stats;
  await device.closeSession();
  const weights = {};
  for (const [name, values] of Object.entries(device.getWeights())) weights[name] = Array.from(values);
  return { history, steps, stats, weights };
}

/**
 * The models to start from: each device segment's saved model if `load(name)` finds one, else
 * the bundled one (`bundled[name]`, e.g. assets.js's bundleResourceIO handlers).
 */
export async function loadDeviceModels(tf, manifest, bundled, load) {
  const models = {};
  for (const segment of manifest.segments.filter((s) => s.placement === 'device')) {
    let model = null;
    try {
      model = load ? await load(segment.name) : null;
    } catch {
      model = null; // nothing saved yet
    }
    models[segment.name] = model ?? await tf.loadLayersModel(bundled[segment.name], { strict: true });
  }
  return models;
}
