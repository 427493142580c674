#!/usr/bin/env node
// Train a split's device segments with the JavaScript runtime against a REAL splitkeras
// server, for tests/test_js_device.py (which starts the server and compares with Keras).
//
// Usage: node tools/device_e2e.mjs JOB.json OUT.json
//
// JOB.json:
//   {"app_dir": "OUT/app",              // written by `splitkeras export`: split.json, bundles,
//                                       //   and the runtime copy it imports (splitkeras-device/src)
//    "server_url": "http://127.0.0.1:PORT", "key": "...", "wire_dtype": "float32",
//    "servers": {"middle_1": "http://127.0.0.1:PORT", ...},   // instead of server_url: one
//                                       //   URL per server stage (several server stages)
//    "seed": 1,
//    "defences": [{"name": "activation-noise", "clip": 1, "sigma": 0}],   // optional (privacy.js)
//    "x": tensor, "y": tensor,          // the first step's batch (details: server gradients)
//    "train_x": tensor, "train_y": tensor, "batch_size": 8, "epochs": 3,  // then fit()
//    "predict_x": tensor,               // then predict() through the server
//    "save_dir": "dir",                 // then <save_dir>/<segment>_tfjs bundles of the trained models
//    "float16_epochs": 2,               // then a second device (fresh bundles), float16 on the
//                                       //   wire, fits train_x/train_y: out.float16
//    "compress": "int8",                // the first device's codecs (default: wire_dtype)
//    "codec_runs": ["int8", ...], "codec_epochs": 2}  // then one fresh device per codec: a
//                                       //   step of x/y, then fits train_x/train_y: out.codecs[spec]
//   tensor = {"shape": [..], "dtype": "float32"|"int32", "data": "<base64 little-endian>"}
// OUT.json: {"first_step": {loss, metrics, bytesSent, bytesReceived, server_input_gradients},
//   "weights_after_first_step": {name: tensor}, "fit": {history, steps, bytesSent, bytesReceived},
//   "prediction": tensor, "weights": {name: tensor}, "stats": {...}, "float16"?: {history, ...}}
//   or {"error": "..."}.

import { mkdir, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import * as tf from '@tensorflow/tfjs';

const decode = ({ shape, dtype = 'float32', data }) => {
  const bytes = Buffer.from(data, 'base64');
  const copy = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
  return tf.tensor(dtype === 'int32' ? new Int32Array(copy) : new Float32Array(copy), shape, dtype);
};
const encodeArray = (shape, values) => ({
  shape, dtype: 'float32',
  data: Buffer.from(values.buffer, values.byteOffset, values.byteLength).toString('base64'),
});
const encode = (tensor) => encodeArray(tensor.shape, Float32Array.from(tensor.dataSync()));

async function saveBundle(model, dir) {
  await mkdir(dir, { recursive: true });
  await model.save(tf.io.withSaveHandler(async (artifacts) => {
    const shard = 'group1-shard1of1.bin';
    await writeFile(path.join(dir, shard), Buffer.from(tf.io.CompositeArrayBuffer.join(artifacts.weightData)));
    await writeFile(path.join(dir, 'model.json'), JSON.stringify({
      format: artifacts.format, generatedBy: artifacts.generatedBy,
      convertedBy: 'splitkeras tools/device_e2e.mjs', modelTopology: artifacts.modelTopology,
      weightsManifest: [{ paths: [shard], weights: artifacts.weightSpecs }],
    }));
    return { modelArtifactsInfo: { dateSaved: new Date(), modelTopologyType: 'JSON' } };
  }));
}

function weightsOut(device) {
  const shapes = {};
  for (const name of device.devices.map((s) => s.name)) {
    for (const w of device.model(name).weights) shapes[w.originalName] = w.shape;
  }
  return Object.fromEntries(Object.entries(device.getWeights())
    .map(([name, values]) => [name, encodeArray(shapes[name], values)]));
}

async function loadDevice(job, wireDtype, compress = null) {
  const app = path.resolve(job.app_dir);
  const src = path.join(app, 'splitkeras-device', 'src');
  const { SplitDevice } = await import(pathToFileURL(path.join(src, 'runtime.js')).href);
  // the bundle's own loader: it registers the runtime's layers (src/layers/) before loading
  const { loadLayersModelFromDir } = await import(pathToFileURL(path.join(src, 'node_io.js')).href);
  const manifest = JSON.parse(await readFile(path.join(app, 'split.json'), 'utf8'));
  const models = {};
  for (const entry of manifest.segments.filter((s) => s.placement === 'device')) {
    models[entry.name] = await loadLayersModelFromDir(tf, path.join(app, path.dirname(entry.tfjs)));
  }
  const device = await SplitDevice.create({ tf, manifest, models, serverUrl: job.server_url,
    servers: job.servers, key: job.key, wireDtype, compress, seed: job.seed ?? 1,
    defences: job.defences });
  return { device, models };
}

async function run(job) {
  const { device, models } = await loadDevice(job, job.wire_dtype ?? 'float32', job.compress ?? null);
  const out = {};
  await device.openSession();
  out.first_step = await firstStep(device, job);
  out.weights_after_first_step = weightsOut(device);
  if (job.train_x) {
    const started = Date.now();
    out.fit = await device.fit(decode(job.train_x), decode(job.train_y), {
      batchSize: job.batch_size ?? 8, epochs: job.epochs ?? 1, shuffle: false });
    out.fit.seconds = (Date.now() - started) / 1000;
    // fleet rounds (a server with --aggregate): the round reached and the weights' traffic
    out.rounds = device.rounds ? { round: device.rounds.round, ...device.rounds.stats } : null;
  }
  if (job.predict_x) out.prediction = encode(await device.predict(decode(job.predict_x)));
  out.weights = weightsOut(device);
  if (job.save_dir) {
    for (const name of Object.keys(models)) {
      await saveBundle(device.model(name), path.join(job.save_dir, `${name}_tfjs`));
    }
  }
  out.stats = device.stats;
  await device.closeSession();
  if (job.float16_epochs) {
    const { device: half } = await loadDevice(job, 'float16');
    out.float16 = await half.fit(decode(job.train_x), decode(job.train_y), {
      batchSize: job.batch_size ?? 8, epochs: job.float16_epochs, shuffle: false });
    await half.closeSession();
  }
  out.codecs = {};
  for (const spec of job.codec_runs ?? []) {
    const { device: other } = await loadDevice(job, 'float32', spec);
    const result = { first_step: await firstStep(other, job) };
    result.fit = await other.fit(decode(job.train_x), decode(job.train_y), {
      batchSize: job.batch_size ?? 8, epochs: job.codec_epochs ?? 1, shuffle: false });
    await other.closeSession();
    out.codecs[spec] = result;
  }
  return out;
}

async function firstStep(device, job) {
  const first = await device.trainStep(decode(job.x), decode(job.y), { details: true });
  return { loss: first.loss, metrics: first.metrics, bytesSent: first.bytesSent,
    bytesReceived: first.bytesReceived, seconds: first.seconds,
    server_input_gradients: Object.fromEntries(Object.entries(first.details.serverInputGradients)
      .map(([name, t]) => [name, encodeArray(t.shape, t.data)])) };
}

const [jobPath, outPath] = process.argv.slice(2);
if (!jobPath || !outPath) {
  console.error('usage: node tools/device_e2e.mjs JOB.json OUT.json');
  process.exit(2);
}
await tf.setBackend('cpu');
let result;
try {
  result = await run(JSON.parse(await readFile(jobPath, 'utf8')));
} catch (error) {
  result = { error: `${error.name}: ${error.message}`, stack: error.stack };
}
await writeFile(outPath, JSON.stringify(result));
process.exit(result.error ? 1 : 0);
