// SplitDevice: train the device segments of a split Keras model in TensorFlow.js,
// with the other segments on splitkeras servers.
//
// The shape of the split is data (topology.js): the segments run in order, the last one
// holds the labels, consecutive server segments are one server stage (a chain of servers
// the device reaches through its first server). The step is the one of
// splitkeras/engine.py and SplitTrainer.train_batch, walked over the stages (steps.js):
//
//   U-shaped (device,server,device; labels stay on the device):
//     head forward k -> server forward k -> tail train step (loss, metrics, update,
//     input gradients) -> server backward k -> head backward k
//   labels on the server (device,server):
//     head forward k -> server train k (inputs + label:<output>) -> head backward k
//   and any other sequence: device,server,server,device (a chain), device,server,device,
//   server,device (two servers), device,server,server, device,device,server,device, ...
//
// The gradients of a tensor used by several later stages are summed; a tensor one
// device segment sends to another (a skip connection) stays on the device.
// Loss and metrics are computed on the device when the last segment is there (see
// losses.js), the optimizer is the split's Keras optimizer with Keras' update rules
// (optimizers.js), and a device segment's forward is recomputed under the gradient
// tape when its gradient arrives, with BatchNorm statistics moving once and Dropout
// masks equal (segment.js).
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
//
// Several server stages: servers: {middle_1: 'https://edge.example.org',
//   middle_3: {url: 'https://cloud.example.org', key: CLOUD_KEY}} (stage or host names).

import { registerTrainingKernels } from './kernels.js';
import { checkNoPeekStages } from './nopeek.js';
import { createDefences } from './privacy.js';
import { registerLayers } from './layers/index.js'; // the layers TF.js lacks (src/layers/)
import { resolveLoss, resolveMetrics } from './losses.js';
import { createOptimizer } from './optimizers.js';
import { DeviceSegment } from './segment.js';
import { StageSessions } from './servers.js';
import { runEvaluateAll, runFit, runPredictAll } from './batches.js';
import { runTrainStep } from './steps.js';
import { SplitDeviceError, isFloat } from './tensors.js';
import { deriveTopology, placements } from './topology.js';

export { ProtocolError, SplitSession } from './session.js';
export { FleetRounds } from './rounds.js';
export { TRAINING_KERNELS, registerTrainingKernels } from './kernels.js';
export { SegmentError } from './segment.js';
export { UnsupportedTrainingConfigError } from './losses.js';
export { SplitDeviceError } from './tensors.js';
export { TopologyError, deriveTopology, segmentHost } from './topology.js';
export { StageSessions, stageServers } from './servers.js';

function checkTopology(manifest) {
  const topology = deriveTopology(manifest);
  if (!topology.stages.some((s) => s.kind === 'server')) {
    throw new SplitDeviceError(`The split's placements are ${placements(manifest)}: no segment runs `
      + 'on a server, so there is nothing to split-train; place at least one segment on a server.');
  }
  return topology;
}

export class SplitDevice {
  /**
   * Load the device segments and prepare their optimizers.
   *
   * @param {{tf: object, manifest: object, models: Object<string, object|string>,
   *   serverUrl?: string, servers?: Object<string, string|{url: string, key?: string}>,
   *   key?: string, wireDtype?: 'float32'|'float16', compress?: string, fetch?: Function,
   *   retries?: number, backoff?: number, maxBackoff?: number, timeoutMs?: number,
   *   seed?: number, kernels?: boolean, defences?: object[]}} options
   *   `models` maps each device segment name (head, tail) to a tf.LayersModel, an
   *   IOHandler or a URL for `tf.loadLayersModel`. `serverUrl` is the server of a split
   *   with one server stage; `servers` maps each server stage (its first segment's name,
   *   or that segment's host) to its first server's URL (and key, default `key`).
   *   `backoff` in milliseconds. `seed` seeds the per-step Dropout masks (default: random).
   *   `defences`: privacy defences for the training steps (privacy.js, docs/privacy.md), e.g.
   *   [{name: 'max-norm', seed: 1}, {name: 'activation-noise', clip: 1, sigma: 0.5, seed: 2},
   *   {name: 'nopeek', alpha: 0.5}].
   *   `kernels` (default true): register the runtime's training kernels (kernels.js) for the
   *   cpu and wasm backends: fast conv/depthwise gradients on cpu, the ones wasm lacks or
   *   gets wrong.
   * @returns {Promise<SplitDevice>}
   */
  static async create({
    tf, manifest, models = {}, serverUrl, servers, key, wireDtype = 'float32', compress = null,
    fetch, retries = 12, backoff = 500, maxBackoff = 10000, jitter = 0.25, timeoutMs = 30000,
    seed, sleep, kernels = true, defences,
  }) {
    if (!tf || typeof tf.tensor !== 'function') {
      throw new SplitDeviceError('pass the @tensorflow/tfjs module as tf (import * as tf from '
        + "'@tensorflow/tfjs')");
    }
    if (kernels) registerTrainingKernels(tf);
    registerLayers(tf); // before a bundle loads; once per TF.js instance
    const topology = checkTopology(manifest);
    const checkedDefences = createDefences(defences, topology.mode);
    checkNoPeekStages(checkedDefences, topology, manifest.model_inputs.map((s) => s.name));
    const sessions = new StageSessions(topology.stages.filter((s) => s.kind === 'server'), {
      serverUrl, servers, key, wireDtype, compress, fetch, retries, backoff, maxBackoff, jitter, timeoutMs, sleep,
    });
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
    const device = new SplitDevice(tf, manifest, topology, loaded, sessions,
      seed ?? Math.floor(Math.random() * 2 ** 31));
    device.defences = checkedDefences;
    return device;
  }

  constructor(tf, manifest, topology, models, stageSessions, seed) {
    Object.assign(this, { tf, manifest, topology, models, stageSessions, seed });
    this.mode = topology.mode;
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
    if (this.mode === 'u_shaped') {
      this.loss = resolveLoss(training.loss);
      ({ metrics: this.metrics, skipped: this.skippedMetrics } = resolveMetrics(training.metrics));
    }
    const indexOf = new Map(manifest.segments.map((s, i) => [s.name, i]));
    const build = (entry, recomputes) => new DeviceSegment(tf, models[entry.name], entry, {
      optimizer: createOptimizer(tf, training.optimizer),
      inputGradients: entry.inputs.map((s) => !modelInputNames.has(s.name) && isFloat(s.dtype)),
      recomputes,
      seed: seed + indexOf.get(entry.name),
    });
    // One runner per stage, in order: a DeviceSegment or the stage's SplitSession.
    this.runners = topology.stages.map((stage) => (stage.kind === 'device'
      ? { stage, segment: build(manifest.segments[indexOf.get(stage.name)], !stage.holdsLabels) }
      : { stage, session: stageSessions.get(stage.name) }));
    this.devices = this.runners.filter((r) => r.segment).map((r) => r.segment);
    this.head = this.devices[0];
    this.tail = this.runners[this.runners.length - 1].segment ?? null;
    this.stepCount = 0;
  }

  // ---------------------------------------------------------------- sessions

  /** The SplitSession of each server stage, in stage order. */
  get sessions() {
    return this.stageSessions.sessions;
  }

  /** The session of the first server stage (the only one of a one-server split). */
  get session() {
    return this.stageSessions.sessions[0];
  }

  /**
   * Open a session on the server of every server stage; checks that each serves its
   * stage (segment, mode, inputs, outputs) and closes the ones opened if one does not.
   * @returns {Promise<object>} the server's session description (one server stage), or
   *   the descriptions by stage name (several)
   */
  async openSession() {
    return this.describeSessions(await this.stageSessions.open());
  }

  describeSessions(infos) {
    this.maxBatch = this.stageSessions.maxBatch;
    if (infos.length === 1) return infos[0];
    return Object.fromEntries(this.stageSessions.stages.map((s, i) => [s.name, infos[i]]));
  }

  async ensureSessions() {
    if (!this.stageSessions.isOpen) {
      this.describeSessions(await this.stageSessions.open({ onlyClosed: true }));
    }
  }

  /** Close the sessions on the servers. */
  async closeSession() {
    await this.stageSessions.close();
  }

  /** Bytes, requests, retries and recoveries of the sessions so far (summed over stages). */
  get stats() {
    return this.stageSessions.stats;
  }

  /** The same counters for each server stage, by stage name. */
  get stageStats() {
    return this.stageSessions.stageStats;
  }

  // ---------------------------------------------------------------- training

  /**
   * One training step on one batch.
   * @param {object} x a tf.Tensor, an array of them (model-input order) or {inputName: tensor}
   * @param {object} y the labels (a tf.Tensor: int class ids or float targets)
   * @param {{details?: boolean}} [options] details: also return the gradients the
   *   servers sent for the device's tensors (`serverInputGradients`, Float32Arrays by
   *   name, summed where several server stages sent one for a tensor; with several server
   *   stages also `stageInputGradients` by stage name), for parity tests.
   * @returns {Promise<{step: number, loss: number, metrics: Object<string, number>,
   *   bytesSent: number, bytesReceived: number, seconds: number, details?: object}>}
   */
  async trainStep(x, y, { details = false } = {}) {
    await this.ensureSessions();
    const step = this.stepCount;
    this.stepCount += 1;
    const before = this.stats;
    const started = Date.now();
    const result = await runTrainStep(this, step, x, y, { details });
    const after = this.stats;
    result.bytesSent = after.bytesSent - before.bytesSent;
    result.bytesReceived = after.bytesReceived - before.bytesReceived;
    result.seconds = (Date.now() - started) / 1000;
    return result;
  }

  /**
   * Train like keras.Model.fit: `epochs` passes over (xs, ys) of any size, in batches of
   * `batchSize` (the last one smaller), shuffled each epoch; after each epoch the validation
   * data (if any) is evaluated and its values are logged as `val_<name>`. The epoch's loss is
   * the batch losses averaged by batch size, its metrics the running means, as Keras'.
   *
   * Callbacks (each may be async; the `callbacks` objects are called after the `on*`
   * options): onTrainBegin(logs), onEpochBegin(epoch), onBatchBegin(batch),
   * onBatchEnd(batch, logs) with the step's result (loss, metrics, bytes, seconds, size),
   * onEpochEnd(epoch, logs), onTrainEnd(logs). Setting `device.stopTraining = true` in a
   * callback ends training after that batch. If a step or a callback fails, the server
   * sessions are closed and the error is thrown.
   *
   * @param {object} xs inputs (as for trainStep), all samples
   * @param {object} ys labels, all samples
   * @param {FitOptions} [options] batchSize (32; at most the server's max_batch), epochs (1),
   *   shuffle (true), validationData ([x, y]), validationSplit (a fraction of the LAST samples,
   *   before shuffling, as Keras), validationBatchSize (batchSize), initialEpoch (0), callbacks.
   * @returns {Promise<{history: Object<string, number[]>, epoch: number[], steps: number,
   *   bytesSent: number, bytesReceived: number}>}
   */
  async fit(xs, ys, options = {}) {
    return runFit(this, xs, ys, options);
  }

  /**
   * Evaluate like keras.Model.evaluate (return_dict): inference mode everywhere, the loss
   * (regularization included) and metrics averaged over the samples, in batches of
   * `batchSize`. Nothing trains.
   * @returns {Promise<Object<string, number>>} {loss, <metric>: value, ...}
   */
  async evaluate(x, y, { batchSize = 32 } = {}) {
    return runEvaluateAll(this, x, y, { batchSize });
  }

  /** The loss and metrics that evaluate computes on the device (resolved once). */
  evaluation() {
    if (!this.evaluationSpec) {
      const training = this.manifest.training;
      const loss = this.loss ?? resolveLoss(training.loss);
      const metrics = this.metrics ?? resolveMetrics(training.metrics).metrics;
      this.evaluationSpec = { loss, metrics };
    }
    return this.evaluationSpec;
  }

  /**
   * Inference: the device segments in inference mode, each server stage through its
   * server's predict route, in batches of `batchSize` (default: the server's max_batch,
   * so any number of samples works). Returns the model output (a tf.Tensor the caller owns).
   */
  async predict(x, { batchSize } = {}) {
    return runPredictAll(this, x, { batchSize });
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
