// The codec registry (src/codecs.js) through wire.js: round trips, error feedback, the
// SPEC grammar, and the malformed compressed bodies of fixtures/codec_malformed.json
// (made by make_codec_fixtures.py), each refused with splitkeras.wire's message.
// tests/test_codecs.py checks the bytes are the Python encoder's (encode_codecs.mjs).

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import test from 'node:test';
import { parseCodec, parseCompress, formatCompress, topkIndices } from '../src/codecs.js';
import { decodeTensors, encodeTensors, WireFormatError } from '../src/wire.js';
import { hashed } from './encode_codecs.mjs';

const MALFORMED = JSON.parse(readFileSync(new URL('./fixtures/codec_malformed.json', import.meta.url),
  'utf8'));
const ACT = [{ name: 'act', shape: [null, 4], dtype: 'float32' }];

test('the malformed fixtures cover every defect the issue names', () => {
  const names = MALFORMED.map((c) => c.name);
  for (const defect of ['topk_index_out_of_range', 'topk_indices_unsorted', 'topk_index_duplicated',
    'int8_zero_scale', 'int8_nan_scale', 'topk_truncated_values', 'int8_truncated_scales']) {
    assert.ok(names.includes(defect), defect);
  }
});

for (const { name, codec, body, message, exact } of MALFORMED) {
  test(`refuses compressed body "${name}" with wire.py's message`, () => {
    const bytes = new Uint8Array(Buffer.from(body, 'base64'));
    assert.throws(() => decodeTensors(bytes, { expected: ACT, maxBatch: 8, codec }), (error) => {
      assert.ok(error instanceof WireFormatError, `expected a WireFormatError, got ${error}`);
      if (exact) assert.equal(error.message, message);
      else assert.ok(error.message.startsWith(message), `${error.message} !startsWith ${message}`);
      return true;
    });
  });
}

const act = (seed, shape = [6, 10]) => ({
  name: 'act', dtype: 'float32', shape, data: hashed(shape[0] * shape[1], seed, 8) });

test('int8 round trip: within half a step of each channel, 1 byte a value', () => {
  const tensor = act(3);
  const body = encodeTensors([tensor], { codec: 'int8' });
  const { tensors, metadata } = decodeTensors(body, { codec: 'int8' });
  assert.deepEqual(metadata, {});
  for (let c = 0; c < 10; c += 1) {
    const column = [0, 1, 2, 3, 4, 5].map((r) => tensor.data[r * 10 + c]);
    const step = Math.fround((Math.max(...column) - Math.min(...column)) / 255);
    for (let r = 0; r < 6; r += 1) {
      const error = Math.abs(tensors.act.data[r * 10 + c] - tensor.data[r * 10 + c]);
      assert.ok(error <= step / 2 * (1 + 1e-5) + 1e-6, `${error} > ${step / 2}`);
    }
  }
  const big = act(4, [64, 10]);
  const ratio = encodeTensors([big], { codec: 'int8' }).length / encodeTensors([big]).length;
  assert.ok(ratio < 0.4, `int8 body is ${ratio} of float32's`);
});

test('top-k error feedback: what is dropped is sent later, nothing is lost', () => {
  const residuals = new Map();
  const tensor = act(5);
  const total = new Float32Array(60);
  for (let step = 0; step < 10; step += 1) {
    const body = encodeTensors([tensor], { codec: 'topk:0.1', residuals });
    const { tensors } = decodeTensors(body, { codec: 'topk:0.1' });
    assert.equal(tensors.act.data.filter((v) => v !== 0).length, 6);
    for (let i = 0; i < 60; i += 1) total[i] += tensors.act.data[i];
  }
  // sent + residual == 10 * tensor (in float32 sums: within rounding)
  const residual = residuals.get('act').data;
  for (let i = 0; i < 60; i += 1) {
    assert.ok(Math.abs(total[i] + residual[i] - 10 * tensor.data[i]) < 1e-4);
  }
});

test('top-k keeps the largest magnitudes, ties to the lower index', () => {
  const data = new Float32Array([1, -3, 3, 0, -3, 2]);
  assert.deepEqual([...topkIndices(data, 2)], [1, 2]);
  assert.deepEqual([...topkIndices(data, 3)], [1, 2, 4]);
  assert.deepEqual([...topkIndices(data, 6)], [0, 1, 2, 3, 4, 5]);
});

test('bfloat16 halves the bytes and refuses what it cannot hold', () => {
  const body = encodeTensors([act(1)], { codec: 'bfloat16' });
  const { tensors } = decodeTensors(body, { expected: [{ name: 'act', shape: [null, 10], dtype: 'float32' }] });
  assert.ok(Math.abs(tensors.act.data[0] - act(1).data[0]) < 0.02);
  assert.throws(() => encodeTensors([{ name: 'a', dtype: 'float32', shape: [1], data: [3.4e38] }],
    { codec: 'bfloat16' }), /finite values beyond the bfloat16 range/);
});

test('SPEC grammar: one codec or forward=...,backward=..., same errors as codecs.py', () => {
  const both = parseCompress('forward=int8,backward=topk:0.05+int8');
  assert.equal(both.forward.spec, 'int8');
  assert.equal(both.backward.fraction, 0.05);
  assert.equal(formatCompress(both), 'forward=int8,backward=topk:0.05+int8');
  assert.equal(formatCompress(parseCompress('int8')), 'int8');
  assert.equal(parseCompress('backward=int8').forward.spec, 'float32');
  assert.throws(() => parseCodec('topk:0.050'), /the top-k fraction '0.050' is not a decimal/);
  assert.throws(() => parseCodec('topk:0.1+float16'), /top-k values travel as float32/);
  assert.throws(() => parseCodec('float8'), /^TypeError: Unknown codec 'float8'/);
  assert.throws(() => parseCompress('sideways=int8'), /'sideways=int8' is not forward=CODEC/);
  assert.throws(() => parseCompress('forward=int8,forward=int8'), /names forward twice/);
});

test('int8 refuses NaN and Inf at the sender, with codec_bodies.py\'s message', () => {
  for (const bad of [NaN, Infinity]) {
    assert.throws(() => encodeTensors([{ name: 'a', dtype: 'float32', shape: [2, 2],
      data: new Float32Array([1, bad, 2, 3]) }], { codec: 'int8' }),
    /^WireFormatError: tensor 'a': non-finite values, or a channel spanning beyond float32, cannot be sent as int8/);
  }
});
