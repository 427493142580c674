// FleetRounds (src/rounds.js) against a session in memory: the download before the first step,
// an upload of every device weight (named <segment>/<layer>/<weight>, metadata samples) after
// each round, the long poll until the round closes, a straggler's upload dropped for the latest
// weights, and clear errors for a server without aggregation or weights that do not fit.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import * as tf from '@tensorflow/tfjs';

import { decodeTensors, encodeTensors } from '../src/wire.js';
import { FleetRounds } from '../src/rounds.js';

await tf.setBackend('cpu');

function device(aggregation) {
  const x = tf.input({ shape: [3], name: 'x' });
  const head = tf.model({ inputs: x, outputs: tf.layers.dense({ units: 2, name: 'h_dense' }).apply(x) });
  const m = tf.input({ shape: [2], name: 'm' });
  const tail = tf.model({ inputs: m, outputs: tf.layers.dense({ units: 1, name: 'out' }).apply(m) });
  const manifest = { segments: [{ name: 'head', placement: 'device' }, { name: 'middle', placement: 'server' },
    { name: 'tail', placement: 'device' }] };
  const server = { round: 0, uploads: [], closeOnUpload: true, refuse: null, requests: [] };
  const weights = (scale) => [['head/h_dense/kernel', [3, 2]], ['head/h_dense/bias', [2]],
    ['tail/out/kernel', [2, 1]], ['tail/out/bias', [1]]].map(([name, shape]) => ({
    name, dtype: 'float32', shape, data: Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) },
      (_, i) => scale * (i + 1)) }));
  server.global = weights(1);
  const session = {
    info: { session_id: 's', token: 't', aggregation }, wireDtype: 'float32',
    sessionPath: () => '/v1/sessions/s',
    async send(method, path, body) {
      server.requests.push(`${method} ${path}`);
      if (method === 'POST') {
        if (server.refuse) {
          const code = server.refuse;
          const error = new Error('refused');
          Object.assign(error, { code, toError: () => new Error(`refused: ${code}`) });
          server.refuse = null;
          server.round += 1;
          server.global = weights(7);
          throw error;
        }
        server.uploads.push(decodeTensors(body));
        if (server.closeOnUpload) {
          server.round += 1;
          server.global = weights(server.round + 1);
        }
        return { status: 200, body: new Uint8Array() };
      }
      return { status: 200, body: encodeTensors(server.global, { metadata: { round: String(server.round) } }) };
    },
  };
  return { server, device: { tf, manifest, models: { head, tail }, session, ensureSessions: async () => {} } };
}

const value = (model, index) => Array.from(model.weights[index].read().dataSync());

test('a round: download first, upload every weight with its samples, take the new average', async () => {
  const { server, device: d } = device({ mode: 'fedavg', round_steps: 2, deadline_seconds: 1 });
  const rounds = await FleetRounds.forDevice(d);
  assert.ok(rounds && d.rounds === rounds);
  await rounds.onTrainBegin({});
  assert.deepEqual(value(d.models.head, 0), [1, 2, 3, 4, 5, 6]); // the global weights of round 0
  await rounds.onBatchEnd(0, { size: 5 });
  assert.equal(server.uploads.length, 0);
  await rounds.onBatchEnd(1, { size: 3 });
  assert.equal(server.uploads.length, 1);
  const { tensors, metadata } = server.uploads[0];
  assert.deepEqual(Object.keys(tensors).sort(), ['head/h_dense/bias', 'head/h_dense/kernel', 'tail/out/bias',
    'tail/out/kernel']);
  assert.equal(metadata.samples, '8');
  assert.ok(server.requests.includes('POST /v1/sessions/s/fleet/rounds/0/weights'));
  assert.ok(server.requests.includes('GET /v1/sessions/s/fleet/weights?after=0&wait=20'));
  assert.equal(rounds.round, 1);
  assert.deepEqual(value(d.models.tail, 1), [2]); // round 1's weights (2 x)
  await rounds.onTrainEnd({}); // nothing left of the round: no upload
  assert.equal(server.uploads.length, 1);
  assert.equal(rounds.stats.rounds, 1);
  assert.ok(rounds.stats.uploadedBytes > 0 && rounds.stats.downloadedBytes > 0);
});

test('per-epoch rounds, and a straggler drops its upload and takes the latest weights', async () => {
  const { server, device: d } = device({ mode: 'fedavg', round_steps: null, deadline_seconds: 1 });
  const rounds = await FleetRounds.forDevice(d);
  await rounds.onTrainBegin({});
  await rounds.onBatchEnd(0, { size: 4 });
  assert.equal(server.uploads.length, 0);
  server.refuse = 'round_closed';
  await rounds.onEpochEnd(0, {});
  assert.equal(rounds.stats.droppedUploads, 1);
  assert.equal(rounds.round, 1);
  assert.deepEqual(value(d.models.head, 1), [7, 14]);
});

test('another refusal of an upload is thrown', async () => {
  const { server, device: d } = device({ mode: 'fedavg', round_steps: 1, deadline_seconds: 1 });
  const rounds = await FleetRounds.forDevice(d);
  await rounds.onTrainBegin({});
  server.refuse = 'out_of_bounds';
  await assert.rejects(rounds.onBatchEnd(0, { size: 1 }), /out_of_bounds/);
});

test('a server without aggregation: no rounds, or an error when they are asked for', async () => {
  const { device: d } = device(null);
  assert.equal(await FleetRounds.forDevice(d), null);
  await assert.rejects(FleetRounds.forDevice(d, true), /--aggregate fedavg/);
  const { device: on } = device({ mode: 'relay', round_steps: null });
  assert.equal(await FleetRounds.forDevice(on, false), null);
});

test('global weights that lack one of the device weights are refused', async () => {
  const { server, device: d } = device({ mode: 'fedavg', round_steps: 1 });
  server.global = server.global.slice(1);
  const rounds = await FleetRounds.forDevice(d);
  await assert.rejects(rounds.onTrainBegin({}), /have no 'head\/h_dense\/kernel'/);
});
