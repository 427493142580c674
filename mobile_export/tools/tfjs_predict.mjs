#!/usr/bin/env node
// Run TF.js bundles in the real @tensorflow/tfjs (pure-JS CPU backend), for tests, with the
// runtime's layers (src/layers/) registered.
//
// Usage: node tools/tfjs_predict.mjs JOB.json [OUT.json]     (OUT defaults to stdout)
//
// JOB.json is one job or {"jobs": [job, ...]} (one node start for many models). A job:
//   {"id": "any", "bundle_dir": "path/with/model.json",
//    "inputs": [{"shape": [2, 4], "dtype": "float32"|"int32", "data": "<base64 little-endian>"}],
//    "training": false,              // forward pass with model.apply(x, {training})
//    "upstream": [tensor, ...],      // optional, one per output: run a training pass and return
//                                    //   the VJP of sum(output * upstream) for the weights and inputs
//    "sgd_learning_rate": 0.1,       // optional with upstream: apply one SGD step
//    "save_dir": "path",             // optional: save the model (after the step) as a bundle
//    "return_weights": false,        // optional: every weight after the job, by Keras name
//                                    //   ("non_trainable": only those, e.g. BatchNorm statistics)
//    "result_file": "path"}          // optional: write this job's result there (big models), and
//                                    //   list {"id", "result_file"} in the batch result
// Result: {"id", "seconds", "outputs": [tensor], "regularization_loss": number,
//          "training_outputs"?, "gradients"?: {"<layer>/<weight>": tensor}, "input_gradients"?,
//          "weights"?} or {"id", "error": "message"}. A batch gives {"results": [...],
//          "registered": {"classes", "activations"}} (what src/layers/ registered).

import { mkdir, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { loadLayersModelFromDir } from '../src/node_io.js';
import { registered } from '../src/layers/register.js';

const decode = ({ shape, dtype = 'float32', data }) => {
  const bytes = Buffer.from(data, 'base64');
  const copy = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
  const values = dtype === 'int32' ? new Int32Array(copy) : new Float32Array(copy);
  return tf.tensor(values, shape, dtype);
};

const encode = (tensor) => {
  const values = tensor.dtype === 'int32' ? tensor.dataSync() : Float32Array.from(tensor.dataSync());
  return {
    shape: tensor.shape,
    dtype: tensor.dtype === 'int32' ? 'int32' : 'float32',
    data: Buffer.from(values.buffer, values.byteOffset, values.byteLength).toString('base64'),
  };
};

const asList = (value) => (Array.isArray(value) ? value : [value]);

async function saveBundle(model, dir) {
  await mkdir(dir, { recursive: true });
  await model.save(tf.io.withSaveHandler(async (artifacts) => {
    const data = Buffer.from(tf.io.CompositeArrayBuffer.join(artifacts.weightData));
    const shard = 'group1-shard1of1.bin';
    await writeFile(path.join(dir, shard), data);
    const modelJSON = {
      format: artifacts.format,
      generatedBy: artifacts.generatedBy,
      convertedBy: 'splitkeras tools/tfjs_predict.mjs',
      modelTopology: artifacts.modelTopology,
      weightsManifest: [{ paths: [shard], weights: artifacts.weightSpecs }],
    };
    await writeFile(path.join(dir, 'model.json'), JSON.stringify(modelJSON));
    return { modelArtifactsInfo: { dateSaved: new Date(), modelTopologyType: 'JSON' } };
  }));
}

// One training pass: the VJP of sum(output * upstream) for the trainable weights and
// the float inputs, then optionally one SGD step (what the device does with a gradient).
function trainingPass(model, job, inputs, result) {
  tf.tidy(() => {
    const upstream = job.upstream.map(decode);
    // Integer inputs (token ids) have no gradient; float inputs are fed as variables.
    const inputVariables = inputs.map((t) => (t.dtype === 'int32' ? null : tf.variable(t, true)));
    const trainable = model.trainableWeights.map((w) => w.read());
    const { value, grads } = tf.variableGrads(() => {
      const fed = inputVariables.map((v, i) => v ?? inputs[i]);
      const outputs = asList(model.apply(fed.length === 1 ? fed[0] : fed, { training: true }));
      result.training_outputs = outputs.map(encode);
      return tf.addN(outputs.map((out, i) => tf.sum(tf.mul(out, upstream[i]))));
    }, [...trainable, ...inputVariables.filter((v) => v !== null)]);
    result.gradients = {};
    model.trainableWeights.forEach((w, i) => {
      result.gradients[w.originalName] = encode(grads[trainable[i].name]);
    });
    result.input_gradients = inputVariables.map((v) => (v === null ? null : encode(grads[v.name])));
    if (job.sgd_learning_rate != null) {
      const step = {};
      trainable.forEach((v) => { step[v.name] = grads[v.name]; });
      tf.train.sgd(job.sgd_learning_rate).applyGradients(step);
    }
    value.dispose();
    inputVariables.forEach((v) => v?.dispose());
  });
}

async function runJob(job) {
  const started = Date.now();
  const model = await loadLayersModelFromDir(tf, job.bundle_dir);
  const result = { id: job.id };
  const inputs = job.inputs.map(decode);
  const x = inputs.length === 1 ? inputs[0] : inputs;
  tf.tidy(() => {
    const outputs = job.training ? model.apply(x, { training: true }) : model.predict(x);
    result.outputs = asList(outputs).map(encode);
    const losses = model.calculateLosses();
    result.regularization_loss = losses.length ? tf.addN(losses).dataSync()[0] : 0;
  });
  if (job.upstream) {
    try {
      trainingPass(model, job, inputs, result);
    } catch (error) {
      result.training_error = `${error.name}: ${error.message}`;
    }
  }
  if (job.save_dir && !result.training_error) await saveBundle(model, job.save_dir);
  if (job.return_weights) {
    result.weights = {};
    const weights = job.return_weights === 'non_trainable' ? model.nonTrainableWeights : model.weights;
    weights.forEach((w) => { result.weights[w.originalName] = encode(w.read()); });
  }
  inputs.forEach((t) => t.dispose());
  model.dispose();
  result.seconds = (Date.now() - started) / 1000;
  return result;
}

const [jobPath, outPath] = process.argv.slice(2);
if (!jobPath) {
  console.error('usage: node tools/tfjs_predict.mjs JOB.json [OUT.json]');
  process.exit(2);
}
await tf.setBackend('cpu');
const spec = JSON.parse(await readFile(jobPath, 'utf8'));
const jobs = Array.isArray(spec.jobs) ? spec.jobs : [spec];
const results = [];
for (const job of jobs) {
  let result;
  try {
    result = await runJob(job);
  } catch (error) {
    result = { id: job.id, error: `${error.name}: ${error.message}` };
  }
  if (job.result_file) {
    await writeFile(job.result_file, JSON.stringify(result));
    result = { id: job.id, result_file: job.result_file };
  }
  results.push(result);
}
const text = JSON.stringify(Array.isArray(spec.jobs) ? { results, registered } : results[0]);
if (outPath) await writeFile(outPath, text);
else process.stdout.write(text + '\n');
