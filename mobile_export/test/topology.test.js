// src/topology.js: hosts, stages and their interfaces for each placement the device
// runtime trains, and the splits it refuses (the rules of splitkeras/topology.py).

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { TopologyError, deriveTopology, segmentHost } from '../src/topology.js';
import { SplitDeviceError, deriveTopology as fromEntry } from '../src/runtime.js';

const spec = (name, width = 2) => ({ name, shape: [null, width], dtype: 'float32' });
const seg = (name, placement, inputs, outputs, extra = {}) => ({
  name, placement, keras_file: `${name}.keras`, inputs: inputs.map((n) => spec(n)),
  outputs: outputs.map((n) => spec(n)), ...extra,
});
const split = (segments, { version = 2, inputs = ['x'], outputs = ['y'] } = {}) => ({
  format: 'splitkeras.split', format_version: version, cuts: segments.slice(1).map((s) => s.name),
  model_inputs: inputs.map((n) => spec(n)), model_outputs: outputs.map((n) => spec(n)), segments,
});
const names = (specs) => specs.map((s) => s.name);
const summary = (topology) => topology.stages.map((s) => ({
  kind: s.kind, name: s.name, host: s.host, segments: s.segments, inputs: names(s.inputs),
  outputs: names(s.outputs), holdsLabels: s.holdsLabels, mode: s.mode,
}));

test('device,server: the server stage holds the labels', () => {
  const t = deriveTopology(split([seg('head', 'device', ['x'], ['h']),
    seg('tail', 'server', ['h'], ['y'])], { version: 1 }));
  assert.equal(t.mode, 'labels_on_server');
  assert.equal(t.labelSegment, 'tail');
  assert.equal(t.labelStage, 'tail');
  assert.deepEqual(t.segments.map((s) => s.host), ['device', 'tail']);
  assert.deepEqual(summary(t), [
    { kind: 'device', name: 'head', host: 'device', segments: ['head'], inputs: ['x'],
      outputs: ['h'], holdsLabels: false, mode: null },
    { kind: 'server', name: 'tail', host: 'tail', segments: ['tail'], inputs: ['h'],
      outputs: ['y'], holdsLabels: true, mode: 'labels_on_server' },
  ]);
});

test('device,server,device: U-shaped, a skip tensor from head to tail stays on the device', () => {
  const t = deriveTopology(split([seg('head', 'device', ['x'], ['e', 'h']),
    seg('middle', 'server', ['h'], ['m']), seg('tail', 'device', ['e', 'm'], ['y'])],
  { version: 1 }));
  assert.equal(t.mode, 'u_shaped');
  assert.deepEqual(summary(t).map((s) => [s.kind, s.name, s.inputs, s.outputs, s.mode]), [
    ['device', 'head', ['x'], ['e', 'h'], null],
    ['server', 'middle', ['h'], ['m'], 'u_shaped'],
    ['device', 'tail', ['e', 'm'], ['y'], null],
  ]);
});

test('device,server,server,device: the chain is one stage whose interface hides what the '
  + 'servers hand each other', () => {
  const t = deriveTopology(split([
    seg('head', 'device', ['x'], ['h', 'skip']),
    seg('edge', 'server', ['h'], ['a', 'b'], { host: 'edge-eu' }),
    // cloud reads a (from edge: inside the chain) and skip (from the head: a stage input)
    seg('cloud', 'server', ['a', 'skip'], ['c'], { host: 'cloud' }),
    // the tail reads b (edge -> tail: a stage output) and c
    seg('tail', 'device', ['b', 'c'], ['y']),
  ]));
  assert.equal(t.mode, 'u_shaped');
  const [, chain] = summary(t);
  assert.deepEqual(chain, { kind: 'server', name: 'edge', host: 'edge-eu',
    segments: ['edge', 'cloud'], inputs: ['h', 'skip'], outputs: ['b', 'c'], holdsLabels: false,
    mode: 'u_shaped' });
  assert.equal(t.stages.length, 3);
});

test('device,server,device,server,device: two server stages with a device segment between', () => {
  const t = deriveTopology(split([
    seg('head', 'device', ['x'], ['h', 'skip']),
    seg('s1', 'server', ['h'], ['a']),
    seg('mid', 'device', ['a', 'skip'], ['b']),
    seg('s2', 'server', ['b', 'a'], ['c']),
    seg('tail', 'device', ['c', 'skip'], ['y']),
  ]));
  assert.deepEqual(summary(t).map((s) => [s.kind, s.name, s.inputs, s.outputs, s.mode]), [
    ['device', 'head', ['x'], ['h', 'skip'], null],
    ['server', 's1', ['h'], ['a'], 'u_shaped'],
    ['device', 'mid', ['a', 'skip'], ['b'], null],
    ['server', 's2', ['b', 'a'], ['c'], 'u_shaped'],
    ['device', 'tail', ['c', 'skip'], ['y'], null],
  ]);
  assert.equal(t.mode, 'u_shaped');
});

test('device,server,server: a chain that holds the labels at its end', () => {
  const t = deriveTopology(split([seg('head', 'device', ['x'], ['h']),
    seg('edge', 'server', ['h'], ['a']), seg('cloud', 'server', ['a', 'h'], ['y'])]));
  assert.equal(t.mode, 'labels_on_server');
  assert.equal(t.labelSegment, 'cloud');
  assert.equal(t.labelStage, 'edge');
  assert.deepEqual(summary(t)[1], { kind: 'server', name: 'edge', host: 'edge',
    segments: ['edge', 'cloud'], inputs: ['h'], outputs: ['y'], holdsLabels: true,
    mode: 'labels_on_server' });
});

test('device,device,server,device: consecutive device segments are separate stages', () => {
  const t = deriveTopology(split([seg('d1', 'device', ['x'], ['p']),
    seg('d2', 'device', ['p', 'x'], ['q']), seg('mid', 'server', ['q'], ['r']),
    seg('tail', 'device', ['r', 'p'], ['y'])], { version: 1 }));
  assert.deepEqual(summary(t).map((s) => [s.kind, s.segments, s.inputs, s.outputs]), [
    ['device', ['d1'], ['x'], ['p']],
    ['device', ['d2'], ['p', 'x'], ['q']],
    ['server', ['mid'], ['q'], ['r']],
    ['device', ['tail'], ['r', 'p'], ['y']],
  ]);
});

test('the stage interfaces carry the specs of split.json', () => {
  const manifest = split([seg('head', 'device', ['x'], ['h']), seg('tail', 'server', ['h'], ['y'])]);
  manifest.segments[1].inputs[0].shape = [null, 7];
  const { stages } = deriveTopology(manifest);
  assert.deepEqual(stages[1].inputs, [{ name: 'h', shape: [null, 7], dtype: 'float32' }]);
  assert.equal(manifest.segments[0].host, undefined, 'the manifest is not changed');
});

test('a later server segment may read a model input (split warns; it trains, as in Python)', () => {
  const { stages } = deriveTopology(split([seg('head', 'device', ['x'], ['h']),
    seg('mid', 'server', ['h', 'x'], ['m']), seg('tail', 'device', ['m'], ['y'])]));
  assert.deepEqual(stages[1].inputs.map((s) => s.name), ['h', 'x']);
});

test('a first segment on a server is refused', () => {
  assert.throws(() => deriveTopology(split([seg('head', 'server', ['x'], ['h']),
    seg('tail', 'device', ['h'], ['y'])])),
  (e) => e instanceof TopologyError && /first segment 'head' runs on server 'head'; the first segment must run on the device/.test(e.message));
});

test('format versions other than 1 and 2 are refused, clearly', () => {
  const good = [seg('head', 'device', ['x'], ['h']), seg('tail', 'server', ['h'], ['y'])];
  for (const version of [0, 3, '2', null, undefined]) {
    const manifest = { ...split(good), format_version: version };
    assert.throws(() => deriveTopology(manifest),
      (e) => e instanceof TopologyError
        && /split.json format_version .* is not supported \(this runtime reads versions 1 and 2\)/.test(e.message),
      `version ${version}`);
  }
  assert.throws(() => deriveTopology({ format: 'other' }), /not a splitkeras split.json/);
  assert.throws(() => deriveTopology(null), /not a splitkeras split.json/);
});

test('hosts: defaults, explicit names, and contradictions', () => {
  assert.equal(segmentHost({ name: 'a', placement: 'device' }), 'device');
  assert.equal(segmentHost({ name: 'a', placement: 'server' }), 'a');
  assert.equal(segmentHost({ name: 'a', placement: 'server', host: 'edge' }), 'edge');
  assert.throws(() => segmentHost({ name: 'a', placement: 'device', host: 'edge' }),
    /'a' is placed on the device but its host is 'edge'/);
  assert.throws(() => segmentHost({ name: 'a', placement: 'server', host: 'device' }),
    /'a' is placed on a server but its host is "device"/);
  assert.throws(() => segmentHost({ name: 'a', placement: 'server', host: '' }),
    /host must be a non-empty string/);
});

test('malformed splits are explained', () => {
  assert.throws(() => deriveTopology(split([seg('head', 'device', ['x'], ['y'])])),
    /at least two segments/);
  assert.throws(() => deriveTopology(split([seg('a', 'device', ['x'], ['h']),
    seg('a', 'server', ['h'], ['y'])])), /two segments are named 'a'/);
  assert.throws(() => deriveTopology(split([seg('head', 'device', ['x'], ['h']),
    seg('tail', 'phone', ['h'], ['y'])])), /placement must be "device" or "server", got "phone"/);
  assert.throws(() => deriveTopology(split([seg('head', 'device', ['x'], ['h']),
    seg('tail', 'server', ['zz'], ['y'])])), /'tail' reads 'zz', which is neither a model input/);
  assert.throws(() => deriveTopology(split([seg('head', 'device', ['x'], ['h']),
    seg('tail', 'server', ['h'], ['z'])])), /No segment produces the model output 'y'/);
});

test('deriveTopology is exported from the package entry', () => {
  assert.equal(fromEntry, deriveTopology);
});
