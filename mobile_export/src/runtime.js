// SplitDevice: train the device segments of a split Keras model in TensorFlow.js,
// with the middle on a splitkeras server.
//
// The step is the one of splitkeras/engine.py and SplitTrainer.train_batch:
//
//   U-shaped (head and tail on the device, labels stay on the device):
//     head forward k -> server forward k -> tail train step (loss, metrics, update,
//     input gradients) -> server backward k -> head backward k
//   labels on the server (one cut):
//     head forward k -> server train k (inputs + label:<output>) -> head backward k
//
// The gradients of a tensor used by several later segments are summed; a tensor
// the head sends straight to the tail (a skip connection) stays on the device.
// Loss and metrics are computed on the device in U-shaped mode (see losses.js),
// the optimizer is the split's Keras optimizer with Keras' update rules
// (optimizers.js), and the head's forward is recomputed under the gradient tape
// when the server's gradient arrives, with BatchNorm statistics moving once and
// Dropout masks equal (segment.js).
//
// No Node-only API: models come in as tf.LayersModels, IOHandlers or URLs, the
// network is `fetch`. In Node, `node_io.js` loads bundles from a folder.
//
// Example (React Native):
//   import * as tf from '@tensorflow/tfjs';
//   import { bundleResourceIO } from '@tensorflow/tfjs-react-native';
//   const device = await SplitDevice.create({ tf, manifest,
//     models: { head: bundleResourceIO(headJson, headWeights),
//               tail: bundleResourceIO(tailJson, tailWeights) },
//     serverUrl: 'https://split.example.org', key: SERVER_KEY, wireDtype: 'float16' });
//   await device.openSession();
//   const { loss, metrics } = await device.trainStep(xBatch, yBatch);

import { resolveLoss, resolveMetrics } from './losses.js';
import { createOptimizer } from './optimizers.js';
import { DeviceSegment } from './segment.js';
import { SplitSession } from './session.js';
import {
  SplitDeviceError, addGrads, fromWire, isFloat, labelTensor, namedInputs, wireTensors,
} from './tensors.js';

export { ProtocolError, SplitSession } from './session.js';
export { SegmentError } from './segment.js';
export { UnsupportedTrainingConfigError } from './losses.js';
export { SplitDeviceError } from './tensors.js';
export { TopologyError, deriveTopology, segmentHost } from './topology.js';

const LABEL_PREFIX = 'label:';
const MANIFEST_FORMAT = 'splitkeras.split';

function checkManifest(manifest) {
  if (!manifest || manifest.format !== MANIFEST_FORMAT) {
    throw new SplitDeviceError(`manifest is not a splitkeras split.json (expected "format": `
      + `"${MANIFEST_FORMAT}"); pass the parsed split.json of the app bundle`);
  }
  if (manifest.format_version !== 1) {
    throw new SplitDeviceError(`split.json format_version ${manifest.format_version} is not `
      + 'supported (this runtime reads version 1); re-export the app bundle');
  }
  const placements = manifest.segments.map((s) => s.placement).join(',');
  if (placements === 'device,server,device') return 'u_shaped';
  if (placements === 'device,server') return 'labels_on_server';
  throw new SplitDeviceError(`The split's placements are ${placements}; the device runtime trains `
    + 'device,server (labels on the server) or device,server,device (U-shaped) splits. Re-split '
    + 'with one or two cuts and the default placements.');
}

export class SplitDevice {
  /**
   * Load the device segments and prepare their optimizers.
   *
   * @param {{tf: object, manifest: object, models: Object<string, object|string>,
   *   serverUrl: string, key?: string, wireDtype?: 'float32'|'float16', fetch?: Function,
   *   retries?: number, backoff?: number, maxBackoff?: number, timeoutMs?: number,
   *   seed?: number}} options
   *   `models` maps each device segment name (head, tail) to a tf.LayersModel, an
   *   IOHandler or a URL for `tf.loadLayersModel`. `backoff` in milliseconds.
   *   `seed` seeds the per-step Dropout masks (default: random).
   * @returns {Promise<SplitDevice>}
   */
  static async create({
    tf, manifest, models = {}, serverUrl, key, wireDtype = 'float32', fetch = globalThis.fetch,
    retries = 5, backoff = 200, maxBackoff = 10000, timeoutMs = 30000, seed, sleep,
  }) {
    if (!tf || typeof tf.tensor !== 'function') {
      throw new SplitDeviceError('pass the @tensorflow/tfjs module as tf (import * as tf from '
        + "'@tensorflow/tfjs')");
    }
    const mode = checkManifest(manifest);
    const loaded = {};
    for (const entry of manifest.segments.filter((s) => s.placement === 'device')) {
      const source = models[entry.name];
      if (!source) {
        throw new SplitDeviceError(`models.${entry.name} is missing: pass the TF.js model of `
          + `device segment '${entry.name}' (its bundle is ${entry.tfjs ?? `${entry.name}_tfjs`})`);
      }
      loaded[entry.name] = typeof source.apply === 'function' && Array.isArray(source.layers)
        ? source : await tf.loadLayersModel(source, { strict: true });
    }
    const session = new SplitSession({
      serverUrl, key, wireDtype, fetch, retries, backoff, maxBackoff, timeoutMs, sleep,
    });
    return new SplitDevice(tf, manifest, mode, loaded, session,
      seed ?? Math.floor(Math.random() * 2 ** 31));
  }

  constructor(tf, manifest, mode, models, session, seed) {
    Object.assign(this, { tf, manifest, mode, models, session, seed });
    const training = manifest.training ?? {};
    if (!training.optimizer) {
      throw new SplitDeviceError('split.json has no training config (the source model was not '
        + 'compiled); compile the model before splitting it');
    }
    if (manifest.model_outputs.length !== 1) {
      throw new SplitDeviceError(`The model has ${manifest.model_outputs.length} outputs; the `
        + 'device runtime trains models with one output');
    }
    this.modelInputs = manifest.model_inputs;
    const modelInputNames = new Set(this.modelInputs.map((s) => s.name));
    const [first, server, last] = manifest.segments;
    this.serverEntry = server;
    if (mode === 'u_shaped') {
      this.loss = resolveLoss(training.loss);
      ({ metrics: this.metrics, skipped: this.skippedMetrics } = resolveMetrics(training.metrics));
    }
    const build = (entry, index, recomputes) => new DeviceSegment(tf, models[entry.name], entry, {
      optimizer: createOptimizer(tf, training.optimizer),
      inputGradients: entry.inputs.map((s) => !modelInputNames.has(s.name) && isFloat(s.dtype)),
      recomputes,
      seed: seed + index,
    });
    this.head = build(first, 0, true);
    this.tail = mode === 'u_shaped' ? build(last, 2, false) : null;
    this.devices = this.tail ? [this.head, this.tail] : [this.head];
    this.stepCount = 0;
  }

  // ---------------------------------------------------------------- sessions

  /** Open a session on the server; checks that it serves this split's server segment. */
  async openSession() {
    const info = await this.session.open();
    if (info.segment !== this.serverEntry.name || info.mode !== this.mode) {
      await this.session.close();
      throw new SplitDeviceError(`The server serves segment '${info.segment}' in mode '${info.mode}'`
        + `, this device's split needs '${this.serverEntry.name}' in mode '${this.mode}'. Serve the `
        + 'split folder this app bundle was exported from.');
    }
    this.maxBatch = info.max_batch;
    return info;
  }

  /** Close the session on the server. */
  async closeSession() {
    await this.session.close();
  }

  /** Bytes, requests, retries and recoveries of the session so far. */
  get stats() {
    return { ...this.session.stats };
  }

  // ---------------------------------------------------------------- training

  /**
   * One training step on one batch.
   * @param {object} x a tf.Tensor, an array of them (model-input order) or {inputName: tensor}
   * @param {object} y the labels (a tf.Tensor: int class ids or float targets)
   * @param {{details?: boolean}} [options] details: also return the gradients the
   *   server sent for the device's tensors (Float32Arrays by name), for parity tests.
   * @returns {Promise<{step: number, loss: number, metrics: Object<string, number>,
   *   bytesSent: number, bytesReceived: number, seconds: number, details?: object}>}
   */
  async trainStep(x, y, { details = false } = {}) {
    const { tf } = this;
    if (!this.session.info) await this.openSession();
    const step = this.stepCount;
    this.stepCount += 1;
    const before = { ...this.session.stats };
    const started = Date.now();
    const store = namedInputs(tf, this.modelInputs, x, this.maxBatch);
    const grads = new Map();
    const result = { step, metrics: {} };
    let labels = null;
    try {
      labels = labelTensor(tf, y, store.get(this.modelInputs[0].name).shape[0]);
      const head = this.head;
      const { outputs, regularization: headRegularization } = head.forward(step,
        head.inputNames.map((n) => store.get(n)));
      head.outputNames.forEach((name, i) => store.set(name, outputs[i]));
      const serverInputs = this.serverEntry.inputs.map((s) => s.name);
      let serverGrads;
      if (this.mode === 'u_shaped') {
        const forward = await this.session.forward(step, await wireTensors(serverInputs, store));
        const serverRegularization = Number(forward.metadata.regularization_loss ?? 0);
        for (const [name, t] of fromWire(tf, forward, this.serverEntry.outputs, 'forward')) {
          store.set(name, t);
        }
        const tail = this.tail;
        const out = tail.trainStep(tail.inputNames.map((n) => store.get(n)), labels, this.loss,
          this.metrics);
        addGrads(tf, grads, tail.inputNames, out.inputGrads);
        result.loss = out.loss + out.regularization + headRegularization + serverRegularization;
        for (const [name, { sum, count }] of Object.entries(out.metrics)) {
          result.metrics[name] = sum / count;
        }
        result.metricCounts = Object.fromEntries(Object.entries(out.metrics)
          .map(([name, { count }]) => [name, count]));
        const outputGrads = this.serverEntry.outputs.map((spec) => {
          const g = grads.get(spec.name) ?? tf.zerosLike(store.get(spec.name));
          grads.delete(spec.name);
          return g;
        });
        const gradStore = new Map(this.serverEntry.outputs.map((s, i) => [s.name, outputGrads[i]]));
        const body = await wireTensors([...gradStore.keys()], gradStore);
        outputGrads.forEach((g) => g.dispose());
        serverGrads = await this.session.backward(step, body);
      } else {
        const tensors = await wireTensors(serverInputs, store);
        const labelName = LABEL_PREFIX + this.manifest.model_outputs[0].name;
        tensors.push(...await wireTensors([labelName], new Map([[labelName, labels]])));
        serverGrads = await this.session.train(step, tensors);
        const meta = serverGrads.metadata;
        result.loss = Number(meta.loss) + headRegularization;
        for (const [name, value] of Object.entries(meta)) {
          if (name !== 'step' && name !== 'loss') result.metrics[name] = Number(value);
        }
      }
      const gradSpecs = this.serverEntry.inputs.filter((s) => s.name in serverGrads.tensors);
      const fromServer = fromWire(tf, serverGrads, gradSpecs, 'backward');
      if (details) {
        result.details = { serverInputGradients: Object.fromEntries([...fromServer]
          .map(([name, t]) => [name, { shape: t.shape, data: Float32Array.from(t.dataSync()) }])) };
      }
      addGrads(tf, grads, [...fromServer.keys()], [...fromServer.values()]);
      const headGrads = head.outputNames.map((name) => grads.get(name) ?? null);
      head.backward(step, headGrads).forEach((g) => g?.dispose());
    } finally {
      this.head.drop(step);
      for (const t of store.values()) t.dispose();
      for (const t of grads.values()) t.dispose();
      labels?.dispose();
    }
    const after = this.session.stats;
    result.bytesSent = after.bytesSent - before.bytesSent;
    result.bytesReceived = after.bytesReceived - before.bytesReceived;
    result.seconds = (Date.now() - started) / 1000;
    return result;
  }

  /**
   * Train for `epochs` over (xs, ys) in batches, like keras.Model.fit: the epoch's
   * loss is the batch losses averaged by batch size, the metrics are running means.
   * @param {object} xs inputs (as for trainStep), all samples
   * @param {object} ys labels, all samples
   * @param {{batchSize?: number, epochs?: number, shuffle?: boolean,
   *   onBatchEnd?: (batch: number, logs: object) => any,
   *   onEpochEnd?: (epoch: number, logs: object) => any}} [options]
   * @returns {Promise<{history: Object<string, number[]>, steps: number, bytesSent: number,
   *   bytesReceived: number}>}
   */
  async fit(xs, ys, {
    batchSize = 32, epochs = 1, shuffle = true, onBatchEnd, onEpochEnd,
  } = {}) {
    const { tf } = this;
    if (!this.session.info) await this.openSession();
    if (!(batchSize >= 1) || (this.maxBatch && batchSize > this.maxBatch)) {
      throw new SplitDeviceError(`batchSize ${batchSize} must be between 1 and the server's `
        + `max_batch (${this.maxBatch})`);
    }
    const store = namedInputs(tf, this.modelInputs, xs, this.maxBatch);
    const names = this.modelInputs.map((s) => s.name);
    const labels = ys instanceof tf.Tensor ? ys : tf.tensor(ys);
    const count = store.get(names[0]).shape[0];
    const history = { loss: [] };
    const start = { ...this.session.stats };
    let steps = 0;
    try {
      for (let epoch = 0; epoch < epochs; epoch += 1) {
        const order = Int32Array.from({ length: count }, (_, i) => i);
        if (shuffle) tf.util.shuffle(order);
        const sums = { loss: 0, samples: 0, metrics: {}, counts: {} };
        for (let begin = 0, batch = 0; begin < count; begin += batchSize, batch += 1) {
          const indices = tf.tensor1d(order.subarray(begin, begin + batchSize), 'int32');
          const bx = names.map((n) => tf.gather(store.get(n), indices));
          const by = tf.gather(labels, indices);
          indices.dispose();
          let logs;
          try {
            logs = await this.trainStep(bx, by);
          } finally {
            bx.forEach((t) => t.dispose());
            by.dispose();
          }
          steps += 1;
          const size = Math.min(batchSize, count - begin);
          sums.loss += logs.loss * size;
          sums.samples += size;
          for (const [name, value] of Object.entries(logs.metrics)) {
            const weight = logs.metricCounts?.[name] ?? size;
            sums.metrics[name] = (sums.metrics[name] ?? 0) + value * weight;
            sums.counts[name] = (sums.counts[name] ?? 0) + weight;
          }
          if (onBatchEnd) await onBatchEnd(batch, logs);
        }
        const epochLogs = { loss: sums.loss / sums.samples };
        for (const name of Object.keys(sums.metrics)) {
          epochLogs[name] = sums.metrics[name] / sums.counts[name];
        }
        for (const [name, value] of Object.entries(epochLogs)) {
          (history[name] ??= []).push(value);
        }
        if (onEpochEnd) await onEpochEnd(epoch, epochLogs);
      }
    } finally {
      for (const t of store.values()) t.dispose();
      if (labels !== ys) labels.dispose();
    }
    const end = this.session.stats;
    return { history, steps, bytesSent: end.bytesSent - start.bytesSent,
      bytesReceived: end.bytesReceived - start.bytesReceived };
  }

  /**
   * Inference: head and tail on the device (inference mode), the middle through the
   * server's predict route. Returns the model output (a tf.Tensor the caller owns).
   */
  async predict(x) {
    const { tf } = this;
    if (!this.session.info) await this.openSession();
    const store = namedInputs(tf, this.modelInputs, x, this.maxBatch);
    try {
      const headOut = this.head.predict(this.head.inputNames.map((n) => store.get(n)));
      this.head.outputNames.forEach((name, i) => store.set(name, headOut[i]));
      const serverInputs = this.serverEntry.inputs.map((s) => s.name);
      const answer = await this.session.predict(await wireTensors(serverInputs, store));
      for (const [name, t] of fromWire(tf, answer, this.serverEntry.outputs, 'predict')) {
        store.set(name, t);
      }
      const outputName = this.manifest.model_outputs[0].name;
      if (this.tail) {
        const outs = this.tail.predict(this.tail.inputNames.map((n) => store.get(n)));
        this.tail.outputNames.forEach((name, i) => store.set(name, outs[i]));
      }
      return tf.keep(store.get(outputName).clone());
    } finally {
      for (const t of store.values()) t.dispose();
    }
  }

  // ---------------------------------------------------------------- weights

  /**
   * The device segments' weights by Keras name `<layer>/<weight>` (the names
   * `converters.load_tfjs_weights` reads): all device segments, or one by name.
   * @returns {Object<string, Float32Array>}
   */
  getWeights(segmentName) {
    const segments = segmentName ? this.devices.filter((s) => s.name === segmentName) : this.devices;
    if (!segments.length) {
      throw new SplitDeviceError(`No device segment '${segmentName}'; device segments: `
        + `${this.devices.map((s) => s.name).join(', ')}`);
    }
    return Object.assign({}, ...segments.map((s) => s.weights()));
  }

  /** The tf.LayersModel of a device segment (e.g. to `model.save(handler)` after training). */
  model(segmentName) {
    const segment = this.devices.find((s) => s.name === segmentName);
    if (!segment) throw new SplitDeviceError(`No device segment '${segmentName}'`);
    return segment.model;
  }

  /** Free the models and optimizer state. */
  dispose() {
    for (const segment of this.devices) {
      segment.optimizer.dispose();
      segment.model.dispose();
    }
  }
}
