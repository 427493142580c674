// The loops over a whole dataset, as keras.Model.fit / evaluate / predict run them: batches
// within the server's max_batch, epochs, shuffling, validation, callbacks. SplitDevice's fit,
// evaluate and predict (runtime.js, with their documentation) call these; one batch is
// steps.js' work.

import {
  checkNoRounds, checkPipelinable, checkPipelineDepth, runPipelined, servedDepth,
} from './pipeline.js';
import { FleetRounds } from './rounds.js';
import { runEvaluate, runPredict } from './steps.js';
import { SplitDeviceError, namedInputs } from './tensors.js';

/** `size` as a batch size: a whole number from 1 to the server's max_batch. */
export function checkBatchSize(device, size) {
  if (!Number.isInteger(size) || size < 1 || (device.maxBatch && size > device.maxBatch)) {
    throw new SplitDeviceError(`batchSize ${size} must be an integer between 1 and the `
      + `server's max_batch (${device.maxBatch ?? 'not limited'})`);
  }
}

export async function runFit(device, xs, ys, options = {}) {
  const { tf } = device;
  const {
    batchSize = 32, epochs = 1, shuffle = true, validationData, validationSplit = 0,
    validationBatchSize, initialEpoch = 0, callbacks, pipelineDepth = 1,
  } = options;
  checkPipelinable(device, checkPipelineDepth(pipelineDepth));
  const hooks = [options, ...(Array.isArray(callbacks) ? callbacks : (callbacks ? [callbacks] : []))];
  const emit = async (name, ...args) => {
    for (const hook of hooks) if (typeof hook[name] === 'function') await hook[name](...args);
  };
  // onWarning(message) of the options or callbacks, else console.warn
  const warn = async (message) => {
    if (hooks.some((hook) => typeof hook.onWarning === 'function')) await emit('onWarning', message);
    else console.warn(`splitkeras-device: ${message}`);
  };
  if (!Number.isInteger(epochs) || epochs < 0 || !Number.isInteger(initialEpoch) || initialEpoch < 0) {
    throw new SplitDeviceError(`epochs (${epochs}) and initialEpoch (${initialEpoch}) must be `
      + 'integers >= 0');
  }
  if (!(validationSplit >= 0 && validationSplit < 1)) {
    throw new SplitDeviceError(`validationSplit ${validationSplit} must be in [0, 1)`);
  }
  if (validationData !== undefined && validationData !== null
      && !(Array.isArray(validationData) && validationData.length === 2)) {
    throw new SplitDeviceError('validationData must be [x, y]');
  }
  const names = device.modelInputs.map((s) => s.name);
  let store = namedInputs(tf, device.modelInputs, xs); // the whole dataset: no max_batch check
  let labels = ys instanceof tf.Tensor ? ys.clone() : tf.tensor(ys);
  let validation = validationData ? [validationData[0], validationData[1]] : null;
  const owned = [];
  const history = {};
  const epochList = [];
  const start = device.stats;
  let steps = 0;
  let lastLogs = {};
  let depth = 1;
  try {
    let count = store.get(names[0]).shape[0];
    if (count < 1) throw new SplitDeviceError('xs holds no sample to train on');
    if (labels.shape[0] !== count) {
      throw new SplitDeviceError(`ys has ${labels.shape[0]} samples, xs has ${count}`);
    }
    if (validationSplit > 0 && !validation) {
      const kept = Math.floor(count * (1 - validationSplit));
      if (kept < 1 || kept === count) {
        throw new SplitDeviceError(`validationSplit ${validationSplit} of ${count} samples leaves `
          + `${kept} to train on and ${count - kept} to validate`);
      }
      const cut = (t, from, size) => tf.slice(t, [from], [size]);
      const vx = names.map((n) => cut(store.get(n), kept, count - kept));
      const vy = cut(labels, kept, count - kept);
      owned.push(...vx, vy);
      validation = [vx, vy];
      const trainStore = new Map(names.map((n) => [n, cut(store.get(n), 0, kept)]));
      const trainLabels = cut(labels, 0, kept);
      for (const t of store.values()) t.dispose();
      labels.dispose();
      store = trainStore;
      labels = trainLabels;
      count = kept;
    }
    await device.ensureSessions();
    checkBatchSize(device, batchSize);
    if (pipelineDepth > 1) {
      let message = null;
      depth = servedDepth(device, pipelineDepth, (text) => { message = text; });
      if (message) await warn(message);
      for (const session of device.sessions) session.pipelineDepth = depth;
    }
    device.stopTraining = false;
    const rounds = await FleetRounds.forDevice(device, options.rounds); // rounds.js: --aggregate
    checkNoRounds(rounds, depth);
    if (rounds) hooks.push(rounds);
    await emit('onTrainBegin', {});
    for (let epoch = initialEpoch; epoch < epochs && !device.stopTraining; epoch += 1) {
      await emit('onEpochBegin', epoch);
      const order = Int32Array.from({ length: count }, (_, i) => i);
      if (shuffle) tf.util.shuffle(order);
      const sums = { loss: 0, samples: 0, metrics: {}, counts: {} };
      const add = async (batch, size, logs) => {
        steps += 1;
        sums.loss += logs.loss * size;
        sums.samples += size;
        for (const [name, value] of Object.entries(logs.metrics)) {
          const weight = logs.metricCounts?.[name] ?? size;
          sums.metrics[name] = (sums.metrics[name] ?? 0) + value * weight;
          sums.counts[name] = (sums.counts[name] ?? 0) + weight;
        }
        await emit('onBatchEnd', batch, { ...logs, size });
      };
      const gather = (begin, size) => {
        const indices = tf.tensor1d(order.subarray(begin, begin + size), 'int32');
        const bx = names.map((n) => tf.gather(store.get(n), indices));
        const by = tf.gather(labels, indices);
        indices.dispose();
        return { bx, by };
      };
      if (depth > 1) { // pipeline.js: up to `depth` steps in flight, drained at the epoch's end
        let begin = 0;
        let batch = 0;
        await runPipelined(device, depth, {
          nextBatch: async () => {
            if (begin >= count || device.stopTraining) return null;
            await emit('onBatchBegin', batch);
            const size = Math.min(batchSize, count - begin);
            const { bx, by } = gather(begin, size);
            const item = { x: bx, y: by, size, batch };
            begin += batchSize;
            batch += 1;
            return item;
          },
          release: (item) => {
            item.x.forEach((t) => t.dispose());
            item.y.dispose();
          },
          finished: (logs, item) => add(item.batch, item.size, logs),
        });
      }
      for (let begin = 0, batch = 0; depth === 1 && begin < count && !device.stopTraining;
        begin += batchSize, batch += 1) {
        await emit('onBatchBegin', batch);
        const size = Math.min(batchSize, count - begin);
        const { bx, by } = gather(begin, size);
        let logs;
        try {
          logs = await device.trainStep(bx, by);
        } finally {
          bx.forEach((t) => t.dispose());
          by.dispose();
        }
        await add(batch, size, logs);
      }
      const epochLogs = { loss: sums.loss / sums.samples };
      for (const name of Object.keys(sums.metrics)) {
        epochLogs[name] = sums.metrics[name] / sums.counts[name];
      }
      if (validation) {
        const val = await device.evaluate(validation[0], validation[1],
          { batchSize: validationBatchSize ?? batchSize });
        for (const [name, value] of Object.entries(val)) epochLogs[`val_${name}`] = value;
      }
      for (const [name, value] of Object.entries(epochLogs)) {
        (history[name] ??= []).push(value);
      }
      epochList.push(epoch);
      lastLogs = epochLogs;
      await emit('onEpochEnd', epoch, epochLogs);
    }
    await emit('onTrainEnd', lastLogs);
  } catch (error) {
    try {
      await device.closeSession();
    } catch {
      // the first error is the one to report
    }
    throw error;
  } finally {
    for (const session of device.sessions) session.pipelineDepth = 1;
    for (const t of store.values()) t.dispose();
    labels.dispose();
    owned.forEach((t) => t.dispose());
  }
  const end = device.stats;
  return { history, epoch: epochList, steps, bytesSent: end.bytesSent - start.bytesSent,
    bytesReceived: end.bytesReceived - start.bytesReceived };
}

export async function runEvaluateAll(device, x, y, { batchSize = 32 } = {}) {
  const { tf } = device;
  await device.ensureSessions();
  checkBatchSize(device, batchSize);
  device.evaluation(); // refuse an unsupported loss before any request
  const store = namedInputs(tf, device.modelInputs, x);
  const labels = y instanceof tf.Tensor ? y.clone() : tf.tensor(y);
  const names = device.modelInputs.map((s) => s.name);
  try {
    const count = store.get(names[0]).shape[0];
    if (labels.shape[0] !== count) {
      throw new SplitDeviceError(`y has ${labels.shape[0]} samples, x has ${count}`);
    }
    let loss = 0;
    const sums = {};
    const counts = {};
    for (let begin = 0; begin < count; begin += batchSize) {
      const size = Math.min(batchSize, count - begin);
      const bx = names.map((n) => tf.slice(store.get(n), [begin], [size]));
      const by = tf.slice(labels, [begin], [size]);
      let out;
      try {
        out = await runEvaluate(device, bx, by);
      } finally {
        bx.forEach((t) => t.dispose());
        by.dispose();
      }
      loss += out.loss * size;
      for (const [name, { sum, count: n }] of Object.entries(out.metrics)) {
        sums[name] = (sums[name] ?? 0) + sum;
        counts[name] = (counts[name] ?? 0) + n;
      }
    }
    const logs = { loss: loss / count };
    for (const name of Object.keys(sums)) logs[name] = sums[name] / counts[name];
    return logs;
  } finally {
    for (const t of store.values()) t.dispose();
    labels.dispose();
  }
}

export async function runPredictAll(device, x, { batchSize } = {}) {
  const { tf } = device;
  await device.ensureSessions();
  const limit = batchSize ?? device.maxBatch;
  if (limit !== undefined) checkBatchSize(device, limit);
  const store = namedInputs(tf, device.modelInputs, x);
  const names = device.modelInputs.map((s) => s.name);
  try {
    const count = store.get(names[0]).shape[0];
    if (!limit || count <= limit) return await runPredict(device, names.map((n) => store.get(n)));
    const parts = [];
    try {
      for (let begin = 0; begin < count; begin += limit) {
        const size = Math.min(limit, count - begin);
        const bx = names.map((n) => tf.slice(store.get(n), [begin], [size]));
        try {
          parts.push(await runPredict(device, bx));
        } finally {
          bx.forEach((t) => t.dispose());
        }
      }
      return tf.concat(parts);
    } finally {
      parts.forEach((t) => t.dispose());
    }
  } finally {
    for (const t of store.values()) t.dispose();
  }
}
