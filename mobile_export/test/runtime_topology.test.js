// The step loop of src/steps.js over topologies other than device,server(,device):
// a chain of servers (one stage to the device), two separate servers with a device
// segment between them, a chain that holds the labels, two consecutive device segments.
// The servers are in memory (a fetch stub decoding the safetensors bodies with
// src/wire.js); each server segment is a fixed function, so one device step can be
// compared with the whole model differentiated in one TF.js tape.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import * as tf from '@tensorflow/tfjs';

import { MEDIA_TYPE, decodeTensors, encodeTensors } from '../src/wire.js';
import { SplitDevice, SplitDeviceError } from '../src/runtime.js';

await tf.setBackend('cpu');
const LR = 0.1;
const widths = { x: 3, h: 4, skip: 2, a: 3, b: 3, c: 2, y: 2, p: 3, q: 3, r: 2 };
const spec = (name) => ({ name, shape: [null, widths[name]], dtype: 'float32' });
const seg = (name, placement, inputs, outputs, host) => ({
  name, placement, keras_file: `${name}.keras`, inputs: inputs.map(spec), outputs: outputs.map(spec),
  ...(host ? { host } : {}),
});
const manifestOf = (segments) => ({
  format: 'splitkeras.split', format_version: 2, cuts: segments.slice(1).map((s) => s.name),
  source: {}, model_inputs: [spec('x')], model_outputs: [spec('y')], segments,
  training: { optimizer: { class_name: 'SGD', config: { learning_rate: LR, momentum: 0 } },
    loss: 'mse', metrics: [] },
});

const matrix = (rows, cols, seed) => tf.randomUniform([rows, cols], -1, 1, 'float32', seed);
const W = { 1: matrix(4, 3, 11), 2: matrix(3, 2, 12), 3: matrix(3, 2, 13), 4: matrix(4, 3, 14),
  5: matrix(4, 2, 15), 6: matrix(2, 2, 16), 7: matrix(3, 2, 17) };
// The server segments: inputs in split.json order -> outputs in split.json order.
const SERVER_FNS = {
  s1: ([h]) => [tf.tanh(tf.matMul(h, W[1]))],
  s2: ([b, a]) => [tf.add(tf.matMul(b, W[3]), tf.matMul(a, W[7]))],
  edge: ([h]) => [tf.matMul(h, W[1]), tf.tanh(tf.matMul(h, W[4]))],
  cloud: ([a, skip]) => [tf.add(tf.tanh(tf.matMul(a, W[2])), skip)],
  edge2: ([h]) => [tf.tanh(tf.matMul(h, W[1]))],
  cloud2: ([a, h]) => [tf.add(tf.matMul(a, W[2]), tf.matMul(h, W[5]))],
  mid: ([q]) => [tf.tanh(tf.matMul(q, W[7]))],
};

/** A device segment: its inputs concatenated, one Dense layer per output. */
function deviceModel(entry, seed) {
  const inputs = entry.inputs.map((s) => tf.input({ shape: [widths[s.name]], name: s.name }));
  const joined = inputs.length > 1 ? tf.layers.concatenate({ name: `${entry.name}_join` })
    .apply(inputs) : inputs[0];
  const outputs = entry.outputs.map((s, i) => tf.layers.dense({ units: widths[s.name],
    activation: entry.name === 'tail' ? 'linear' : 'tanh', name: `${entry.name}_${s.name}`,
    kernelInitializer: tf.initializers.glorotUniform({ seed: seed + i }) }).apply(joined));
  return tf.model({ inputs, outputs, name: entry.name });
}

function deviceModels(manifest) {
  const models = {};
  manifest.segments.forEach((entry, i) => {
    if (entry.placement === 'device') models[entry.name] = deviceModel(entry, 10 * i + 1);
  });
  return models;
}

const asList = (v) => (Array.isArray(v) ? v : [v]);
/** Every tensor of the whole model (training mode), device and server segments alike. */
function wholeModel(manifest, models, x) {
  const store = new Map([['x', x]]);
  for (const entry of manifest.segments) {
    const ins = entry.inputs.map((s) => store.get(s.name));
    const outs = entry.placement === 'device'
      ? asList(models[entry.name].apply(ins.length === 1 ? ins[0] : ins, { training: true }))
      : SERVER_FNS[entry.name](ins);
    entry.outputs.forEach((s, i) => store.set(s.name, outs[i]));
  }
  return store;
}

/**
 * In-memory servers: `stages` maps a base URL to {segments, inputs, outputs, mode,
 * regularization}; each runs its segments in order (a chain hands tensors on inside).
 */
function fakeServers(manifest, stages, { describe = (info) => info } = {}) {
  const log = [];
  const pending = new Map();
  const specs = new Map(manifest.segments.flatMap((s) => [...s.inputs, ...s.outputs])
    .map((s) => [s.name, s]));
  const answer = (list, metadata) => new Response(encodeTensors(list.map(([name, t]) => ({
    name, dtype: 'float32', shape: t.shape, data: Float32Array.from(t.dataSync()) })), { metadata }),
  { status: 200, headers: { 'content-type': MEDIA_TYPE } });
  const run = (stage, named) => {
    const store = new Map(named);
    for (const name of stage.segments) {
      const entry = manifest.segments.find((s) => s.name === name);
      const outs = SERVER_FNS[name](entry.inputs.map((s) => store.get(s.name)));
      entry.outputs.forEach((s, i) => store.set(s.name, outs[i]));
    }
    return stage.outputs.map((name) => store.get(name));
  };
  // The gradients of sum(outputs * outputGrads) for the stage's inputs.
  const vjp = (stage, inputs, outputGrads) => tf.grads((...xs) => tf.addN(run(stage,
    stage.inputs.map((n, i) => [n, xs[i]])).map((out, i) => tf.sum(tf.mul(out, outputGrads[i])))))(
    inputs);
  const fetch = async (url, init) => {
    const base = new URL(url).origin;
    const path = url.slice(base.length);
    const stage = stages[base];
    if (!stage) throw new TypeError(`no server at ${base}`);
    const body = init.headers['Content-Type'] === MEDIA_TYPE ? decodeTensors(init.body) : null;
    const route = path === '/v1/sessions' ? 'open' : (init.method === 'DELETE' ? 'close'
      : path.split('/').at(-1));
    const step = route === 'forward' || route === 'backward' || route === 'train'
      ? Number(init.headers['Splitkeras-Step']) : null; // the URL is the same at every step
    const entry = { server: base, route, step, tensors: body?.tensors };
    log.push(entry);
    const tensorOf = (name) => tf.tensor(body.tensors[name].data, body.tensors[name].shape);
    if (route === 'open') {
      return new Response(JSON.stringify(describe({ session_id: 'sid', token: 'tok',
        wire_dtype: 'float32', segment: stage.segments[0], mode: stage.mode, max_batch: 16,
        next_step: 0, inputs: stage.inputs.map((n) => specs.get(n)),
        outputs: stage.outputs.map((n) => specs.get(n)) }, base)), { status: 201 });
    }
    if (route === 'close') return new Response(null, { status: 204 });
    if (route === 'forward' || route === 'predict') {
      const inputs = stage.inputs.map(tensorOf);
      const outs = tf.tidy(() => run(stage, stage.inputs.map((n, i) => [n, inputs[i]])));
      if (route === 'forward') pending.set(base, inputs);
      else inputs.forEach((t) => t.dispose());
      const response = answer(stage.outputs.map((n, i) => [n, outs[i]]),
        { regularization_loss: String(stage.regularization ?? 0) });
      outs.forEach((t) => t.dispose());
      return response;
    }
    if (route === 'backward') {
      const inputs = pending.get(base);
      pending.delete(base);
      const grads = stage.outputs.map(tensorOf);
      const inputGrads = vjp(stage, inputs, grads);
      entry.answer = Object.fromEntries(stage.inputs.map((n, i) => [n,
        Float32Array.from(inputGrads[i].dataSync())]));
      const response = answer(stage.inputs.map((n, i) => [n, inputGrads[i]]));
      [...inputs, ...grads, ...inputGrads].forEach((t) => t.dispose());
      return response;
    }
    if (route === 'train') {
      const inputs = stage.inputs.map(tensorOf);
      const y = tensorOf('label:y');
      const lossOf = (...xs) => tf.mean(tf.square(tf.sub(run(stage,
        stage.inputs.map((n, i) => [n, xs[i]]))[0], y)));
      const loss = tf.tidy(() => lossOf(...inputs).dataSync()[0]);
      const inputGrads = tf.grads(lossOf)(inputs);
      const response = answer(stage.inputs.map((n, i) => [n, inputGrads[i]]),
        { loss: String(loss), mae: '0.125', step: String(step) });
      [...inputs, y, ...inputGrads].forEach((t) => t.dispose());
      return response;
    }
    throw new Error(`unexpected ${init.method} ${url}`);
  };
  return { fetch, log };
}

const X = tf.tensor([[0.1, -0.2, 0.3], [1, 0.5, -1], [0.7, 0.7, 0.1], [-0.3, 0.2, 0.9]]);
const Y = tf.tensor([[0.5, -1], [1, 0], [0, 0.25], [-0.5, 0.5]]);

const weightsOf = (models) => Object.assign({}, ...Object.values(models).map((m) => Object
  .fromEntries(m.weights.map((w) => [w.originalName, Float32Array.from(w.read().dataSync())]))));
function maxDiff(a, b) {
  assert.deepEqual(Object.keys(a).sort(), Object.keys(b).sort());
  let max = 0;
  for (const key of Object.keys(b)) {
    for (let i = 0; i < b[key].length; i += 1) max = Math.max(max, Math.abs(a[key][i] - b[key][i]));
  }
  return max;
}
function closeTo(actual, expected, what, tolerance = 1e-5) {
  const a = Array.from(actual);
  const e = Array.from(expected);
  assert.equal(a.length, e.length, what);
  const diff = Math.max(...a.map((v, i) => Math.abs(v - e[i])));
  assert.ok(diff < tolerance, `${what}: max |diff| ${diff}`);
}

/**
 * The reference: the same device weights, the whole model in one tape, one SGD step of
 * the device variables (the loss is mse, as the fake servers compute it), and the
 * gradient of the loss for each tensor of `watch`.
 * @returns {{loss: number, models: object, grad: (name) => Float32Array}}
 */
function referenceStep(manifest, models, watch = []) {
  const ref = deviceModels(manifest);
  for (const [name, model] of Object.entries(models)) {
    ref[name].setWeights(model.getWeights().map((w) => w.clone()));
  }
  const intermediate = {};
  for (const name of watch) {
    // d loss / d <name>: the model from <name> on, with <name> a leaf
    const value = tf.tidy(() => wholeModel(manifest, ref, X).get(name));
    intermediate[name] = tf.grad((leaf) => {
      const store = new Map([['x', X], [name, leaf]]);
      for (const entry of manifest.segments) {
        if (entry.outputs.some((s) => s.name === name)) continue;
        const ins = entry.inputs.map((s) => store.get(s.name) ?? wholeModel(manifest, ref, X)
          .get(s.name));
        const outs = entry.placement === 'device'
          ? asList(ref[entry.name].apply(ins.length === 1 ? ins[0] : ins, { training: true }))
          : SERVER_FNS[entry.name](ins);
        entry.outputs.forEach((s, i) => store.set(s.name, outs[i]));
      }
      return tf.mean(tf.square(tf.sub(store.get('y'), Y)));
    })(value).dataSync();
    value.dispose();
  }
  let loss;
  const variables = Object.values(ref).flatMap((m) => m.trainableWeights).map((w) => w.read());
  const { grads } = tf.variableGrads(() => {
    const total = tf.mean(tf.square(tf.sub(wholeModel(manifest, ref, X).get('y'), Y)));
    loss = total.dataSync()[0];
    return total;
  }, variables);
  variables.forEach((v) => v.assign(tf.sub(v, tf.mul(grads[v.name], LR))));
  return { loss, models: ref, grad: (name) => intermediate[name] };
}

const steps = (log) => log.filter((r) => r.step !== null)
  .map((r) => `${r.route} ${r.step} ${new URL(r.server).host} ${Object.keys(r.tensors).sort().join(',')}`);

// head -> edge -> cloud -> tail: cloud reads a (from edge) and skip (from the head);
// the tail reads b (from edge) and c (from cloud).
const CHAIN = manifestOf([
  seg('head', 'device', ['x'], ['h', 'skip']),
  seg('edge', 'server', ['h'], ['a', 'b'], 'edge-eu'),
  seg('cloud', 'server', ['a', 'skip'], ['c'], 'cloud-us'),
  seg('tail', 'device', ['b', 'c'], ['y']),
]);

test('device,server,server,device: the chain is one remote stage, reached at its first server',
  async () => {
    const models = deviceModels(CHAIN);
    const reference = referenceStep(CHAIN, models, ['h', 'skip']);
    const server = fakeServers(CHAIN, { 'http://edge': { segments: ['edge', 'cloud'],
      inputs: ['h', 'skip'], outputs: ['b', 'c'], mode: 'u_shaped', regularization: 0.5 } });
    const dev = await SplitDevice.create({ tf, manifest: CHAIN, models, fetch: server.fetch,
      servers: { 'edge-eu': 'http://edge' }, key: 'k', retries: 0, seed: 3 });
    assert.deepEqual(dev.runners.map((r) => r.stage.name), ['head', 'edge', 'tail']);
    const result = await dev.trainStep(X, Y, { details: true });
    // a, handed from edge to cloud, never reaches the device
    assert.deepEqual(steps(server.log), ['forward 0 edge h,skip', 'backward 0 edge b,c']);
    assert.ok(Math.abs(result.loss - (reference.loss + 0.5)) < 1e-5,
      `${result.loss} vs ${reference.loss} + 0.5`);
    const diff = maxDiff(dev.getWeights(), weightsOf(reference.models));
    assert.ok(diff < 1e-5, `weights after one step: max |diff| ${diff}`);
    assert.deepEqual(Object.keys(result.details.serverInputGradients).sort(), ['h', 'skip']);
    closeTo(result.details.serverInputGradients.skip.data, reference.grad('skip'), 'dL/dskip');
    closeTo(result.details.serverInputGradients.h.data, reference.grad('h'), 'dL/dh');
    assert.deepEqual(Object.keys(dev.stageStats), ['edge']);
  });

test('a one-stage chain also takes serverUrl, and the stage name as servers key', async () => {
  for (const options of [{ serverUrl: 'http://edge' }, { servers: { edge: 'http://edge' } }]) {
    const server = fakeServers(CHAIN, { 'http://edge': { segments: ['edge', 'cloud'],
      inputs: ['h', 'skip'], outputs: ['b', 'c'], mode: 'u_shaped' } });
    const dev = await SplitDevice.create({ tf, manifest: CHAIN, models: deviceModels(CHAIN),
      fetch: server.fetch, key: 'k', retries: 0, ...options });
    const info = await dev.openSession();
    assert.equal(info.segment, 'edge');
    const prediction = await dev.predict(X);
    assert.deepEqual(prediction.shape, [4, 2]);
    prediction.dispose();
    await dev.closeSession();
    assert.deepEqual(server.log.map((r) => r.route), ['open', 'predict', 'close']);
  }
  await assert.rejects(SplitDevice.create({ tf, manifest: CHAIN, models: deviceModels(CHAIN) }),
    (e) => e instanceof SplitDeviceError && /No server URL for stage 'edge' \(segments edge, cloud on server 'edge-eu'\): pass serverUrl/.test(e.message));
});

// head -> s1 -> mid -> s2 -> tail: a (from s1) is read by mid AND s2, skip (from the
// head) by mid and the tail.
const TWO = manifestOf([
  seg('head', 'device', ['x'], ['h', 'skip']),
  seg('s1', 'server', ['h'], ['a'], 'one'),
  seg('mid', 'device', ['a', 'skip'], ['b']),
  seg('s2', 'server', ['b', 'a'], ['c'], 'two'),
  seg('tail', 'device', ['c', 'skip'], ['y']),
]);
const TWO_SERVERS = {
  'http://one': { segments: ['s1'], inputs: ['h'], outputs: ['a'], mode: 'u_shaped',
    regularization: 0.5 },
  'http://two': { segments: ['s2'], inputs: ['b', 'a'], outputs: ['c'], mode: 'u_shaped',
    regularization: 0.25 },
};
const twoDevice = (server, extra = {}) => SplitDevice.create({ tf, manifest: TWO,
  models: deviceModels(TWO), fetch: server.fetch, key: 'k', retries: 0, seed: 5,
  servers: { s1: 'http://one', two: 'http://two' }, ...extra });

test('device,server,device,server,device: two servers, forward s1, s2, backward s2, s1; '
  + 'the gradient of a tensor two later stages read is summed', async () => {
  const models = deviceModels(TWO);
  const reference = referenceStep(TWO, models, ['a', 'h']);
  const server = fakeServers(TWO, TWO_SERVERS);
  const dev = await SplitDevice.create({ tf, manifest: TWO, models, fetch: server.fetch, key: 'k',
    retries: 0, seed: 5, servers: { s1: 'http://one', two: 'http://two' } });
  const result = await dev.trainStep(X, Y, { details: true });
  assert.deepEqual(steps(server.log), ['forward 0 one h', 'forward 0 two a,b', 'backward 0 two c',
    'backward 0 one a']);
  // what s1 got for a = what mid yields for a + what s2 yields for a
  const [, , backwardTwo, backwardOne] = server.log.filter((r) => r.step !== null);
  closeTo(backwardOne.tensors.a.data, reference.grad('a'), 'dL/da sent to s1');
  const fromS2 = backwardTwo.answer.a;
  assert.ok(Array.from(fromS2).some((v, i) => Math.abs(v - reference.grad('a')[i]) > 1e-3),
    'the device added its own part to the gradient of a');
  closeTo(result.details.serverInputGradients.h.data, reference.grad('h'), 'dL/dh from s1');
  assert.deepEqual(Object.keys(result.details.stageInputGradients), ['s2', 's1']);
  assert.ok(Math.abs(result.loss - (reference.loss + 0.5 + 0.25)) < 1e-5,
    `${result.loss} vs ${reference.loss} + 0.75`);
  const diff = maxDiff(dev.getWeights(), weightsOf(reference.models));
  assert.ok(diff < 1e-5, `weights after one step: max |diff| ${diff}`);
  const stages = dev.stageStats;
  assert.deepEqual(Object.keys(stages), ['s1', 's2']);
  assert.equal(dev.stats.requests, stages.s1.requests + stages.s2.requests);
  assert.equal(stages.s1.requests, 3);
  const before = tf.memory().numTensors;
  const second = await dev.trainStep(X, Y);
  assert.equal(tf.memory().numTensors, before, 'a step leaks no tensor');
  const sent = ['s1', 's2'].map((name) => dev.stageStats[name].bytesSent - stages[name].bytesSent);
  assert.ok(sent.every((n) => n > 0));
  assert.equal(second.bytesSent, sent[0] + sent[1], 'the step counts the bytes of both servers');
});

test('two servers: openSession opens both, predict walks the stages, closeSession closes both',
  async () => {
    const server = fakeServers(TWO, TWO_SERVERS);
    const models = deviceModels(TWO);
    const dev = await twoDevice(server, { models });
    const infos = await dev.openSession();
    assert.deepEqual(Object.keys(infos), ['s1', 's2']);
    assert.equal(dev.maxBatch, 16);
    const prediction = await dev.predict(X);
    const expected = tf.tidy(() => wholeModel(TWO, models, X).get('y'));
    closeTo(prediction.dataSync(), expected.dataSync(), 'prediction');
    [prediction, expected].forEach((t) => t.dispose());
    await dev.closeSession();
    assert.deepEqual(server.log.map((r) => `${r.route} ${new URL(r.server).host}`), ['open one',
      'open two', 'predict one', 'predict two', 'close one', 'close two']);
  });

test('two servers: a missing, ambiguous or unknown server URL is refused, naming the stage',
  async () => {
    const server = fakeServers(TWO, TWO_SERVERS);
    await assert.rejects(twoDevice(server, { servers: { s1: 'http://one' } }),
      (e) => e instanceof SplitDeviceError && /No server URL for stage 's2' \(segment s2 on server 'two'\)/.test(e.message)
        && /servers: \{s1: url, s2: url\}/.test(e.message));
    await assert.rejects(twoDevice(server, { servers: undefined, serverUrl: 'http://one' }),
      /2 server stages .*serverUrl cannot say which it is/);
    await assert.rejects(twoDevice(server, { servers: { s1: 'http://one', s2: 'http://two',
      cloud: 'http://three' } }), /servers names 'cloud', which is neither a server stage nor a host/);
    const withKeys = await twoDevice(server, { servers: { one: 'http://one',
      s2: { url: 'http://two', key: 'k2' } } });
    assert.deepEqual(withKeys.sessions.map((s) => [s.baseUrl, s.key]),
      [['http://one', 'k'], ['http://two', 'k2']]);
  });

test('two servers: a server serving another stage is refused and the sessions opened are closed',
  async () => {
    const wrongSegment = fakeServers(TWO, TWO_SERVERS, { describe: (info, base) => (base
      === 'http://two' ? { ...info, segment: 'other' } : info) });
    const dev = await twoDevice(wrongSegment);
    await assert.rejects(dev.openSession(), (e) => e instanceof SplitDeviceError
      && /The server of stage 's2' \(http:\/\/two\) serves segment 'other' in mode 'u_shaped', this device's split needs 's2'/.test(e.message));
    assert.deepEqual(wrongSegment.log.map((r) => `${r.route} ${new URL(r.server).host}`),
      ['open one', 'open two', 'close one', 'close two']);

    const wrongInputs = fakeServers(TWO, TWO_SERVERS, { describe: (info, base) => (base
      === 'http://one' ? { ...info, inputs: [spec('skip')] } : info) });
    const dev2 = await twoDevice(wrongInputs);
    await assert.rejects(dev2.trainStep(X, Y), /The server of stage 's1' \(http:\/\/one\) takes inputs \[skip\], this device's split has stage 's1' .* with inputs \[h\]/);
    assert.deepEqual(wrongInputs.log.map((r) => r.route), ['open', 'close']);
  });

test('device,server,server: a chain holding the labels gets inputs + label:y on its train route',
  async () => {
    const manifest = manifestOf([seg('head', 'device', ['x'], ['h']),
      seg('edge2', 'server', ['h'], ['a'], 'edge'), seg('cloud2', 'server', ['a', 'h'], ['y'])]);
    const models = deviceModels(manifest);
    const reference = referenceStep(manifest, models);
    const server = fakeServers(manifest, { 'http://edge': { segments: ['edge2', 'cloud2'],
      inputs: ['h'], outputs: ['y'], mode: 'labels_on_server' } });
    const dev = await SplitDevice.create({ tf, manifest, models, fetch: server.fetch,
      serverUrl: 'http://edge', key: 'k', retries: 0 });
    assert.equal(dev.mode, 'labels_on_server');
    const result = await dev.trainStep(X, Y);
    assert.deepEqual(steps(server.log), ['train 0 edge h,label:y']);
    assert.ok(Math.abs(result.loss - reference.loss) < 1e-5, `${result.loss} vs ${reference.loss}`);
    assert.deepEqual(result.metrics, { mae: 0.125 });
    const diff = maxDiff(dev.getWeights(), weightsOf(reference.models));
    assert.ok(diff < 1e-5, `weights after one step: max |diff| ${diff}`);
  });

test('device,device,server,device: consecutive device segments train as separate segments, '
  + 'a tensor both later device segments read gets both gradients', async () => {
  const manifest = manifestOf([seg('d1', 'device', ['x'], ['p']),
    seg('d2', 'device', ['p', 'x'], ['q']), seg('mid', 'server', ['q'], ['r']),
    seg('tail', 'device', ['r', 'p'], ['y'])]);
  const models = deviceModels(manifest);
  const reference = referenceStep(manifest, models);
  const server = fakeServers(manifest, { 'http://mid': { segments: ['mid'], inputs: ['q'],
    outputs: ['r'], mode: 'u_shaped' } });
  const dev = await SplitDevice.create({ tf, manifest, models, fetch: server.fetch,
    serverUrl: 'http://mid', key: 'k', retries: 0 });
  assert.deepEqual(dev.devices.map((s) => s.name), ['d1', 'd2', 'tail']);
  const result = await dev.trainStep(X, Y);
  assert.deepEqual(steps(server.log), ['forward 0 mid q', 'backward 0 mid r']);
  assert.ok(Math.abs(result.loss - reference.loss) < 1e-5, `${result.loss} vs ${reference.loss}`);
  const diff = maxDiff(dev.getWeights(), weightsOf(reference.models));
  assert.ok(diff < 1e-5, `weights after one step: max |diff| ${diff}`);
});

test('a split with no server segment is refused', async () => {
  const manifest = manifestOf([seg('d1', 'device', ['x'], ['p']), seg('tail', 'device', ['p'], ['y'])]);
  await assert.rejects(SplitDevice.create({ tf, manifest, models: deviceModels(manifest),
    serverUrl: 'http://x' }), (e) => e instanceof SplitDeviceError
    && /placements are device,device: no segment runs on a server/.test(e.message));
});
