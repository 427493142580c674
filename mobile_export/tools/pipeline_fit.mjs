#!/usr/bin/env node
// SplitDevice.fit with `pipelineDepth` against a REAL splitkeras server, optionally over an
// emulated link (slow_link.mjs), then evaluate on test data: for tests/test_js_pipeline.py
// and benchmarks/pipelining_js.py.
//
// Usage: node tools/pipeline_fit.mjs JOB.json OUT.json
//
// JOB.json: {"app_dir": "OUT/app" (written by `splitkeras export`), "server_url": "...",
//   "key": "...", "seed": 1, "pipeline_depth": 2, "batch_size": 32, "epochs": 1,
//   "shuffle": true, "train_x": tensor, "train_y": tensor, "test_x"?: tensor, "test_y"?: tensor,
//   "link"?: {"latency_ms": 40, "up_mbit": 15, "down_mbit": 15}}
//   tensor = {"shape": [..], "dtype": "float32"|"int32", "data": "<base64 little-endian>"}
// OUT.json: {"history", "steps", "epoch_seconds": [..], "batch_losses": [..], "warnings": [..],
//   "session_state": (GET /v1/sessions/{id} after fit), "test"?: {loss, accuracy, ...},
//   "stats", "link"?: {upBusyMs, downBusyMs}} or {"error", "stack"}.

import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import * as tf from '@tensorflow/tfjs';

import { slowLink } from './slow_link.mjs';

const decode = ({ shape, dtype = 'float32', data }) => {
  const bytes = Buffer.from(data, 'base64');
  const copy = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
  return tf.tensor(dtype === 'int32' ? new Int32Array(copy) : new Float32Array(copy), shape, dtype);
};

async function run(job) {
  const app = path.resolve(job.app_dir);
  const src = path.join(app, 'splitkeras-device', 'src');
  const { SplitDevice } = await import(pathToFileURL(path.join(src, 'runtime.js')).href);
  const { loadLayersModelFromDir } = await import(pathToFileURL(path.join(src, 'node_io.js')).href);
  const manifest = JSON.parse(await readFile(path.join(app, 'split.json'), 'utf8'));
  const models = {};
  for (const entry of manifest.segments.filter((s) => s.placement === 'device')) {
    models[entry.name] = await loadLayersModelFromDir(tf, path.join(app, path.dirname(entry.tfjs)));
  }
  const link = job.link ? slowLink((...a) => globalThis.fetch(...a), { latencyMs: job.link.latency_ms,
    upMbit: job.link.up_mbit, downMbit: job.link.down_mbit }) : null;
  const device = await SplitDevice.create({ tf, manifest, models, serverUrl: job.server_url,
    key: job.key, seed: job.seed ?? 1, ...(link ? { fetch: link } : {}) });
  await device.openSession();
  if (job.shuffle_seed !== undefined) tf.util.shuffle = seededShuffle(job.shuffle_seed);
  const warnings = [];
  const epochSeconds = [];
  const batchLosses = [];
  let began = 0;
  const fit = await device.fit(decode(job.train_x), decode(job.train_y), {
    batchSize: job.batch_size ?? 32, epochs: job.epochs ?? 1, shuffle: job.shuffle ?? false,
    pipelineDepth: job.pipeline_depth ?? 1,
    onWarning: (message) => { warnings.push(message); },
    onEpochBegin: () => { began = performance.now(); },
    onEpochEnd: () => { epochSeconds.push((performance.now() - began) / 1000); },
    onBatchEnd: (batch, logs) => { batchLosses.push(logs.loss); },
  });
  const out = { history: fit.history, steps: fit.steps, epoch_seconds: epochSeconds,
    batch_losses: batchLosses, warnings, session_state: await device.session.state(),
    stats: device.stats };
  if (link) out.link = link.stats();
  if (job.test_x) out.test = await device.evaluate(decode(job.test_x), decode(job.test_y), { batchSize: 64 });
  await device.closeSession();
  return out;
}

// tf.util.shuffle with a seeded stream (mulberry32), so that every mode sees the same batches
function seededShuffle(seed) {
  let state = seed >>> 0;
  const random = () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return (array) => {
    for (let i = array.length - 1; i > 0; i -= 1) {
      const j = Math.floor(random() * (i + 1));
      [array[i], array[j]] = [array[j], array[i]];
    }
  };
}

const [jobPath, outPath] = process.argv.slice(2);
try {
  await tf.setBackend('cpu');
  const job = JSON.parse(await readFile(jobPath, 'utf8'));
  await writeFile(outPath, JSON.stringify(await run(job)));
} catch (error) {
  await writeFile(outPath, JSON.stringify({ error: String(error?.message ?? error), stack: error?.stack }));
  process.exitCode = 1;
}
