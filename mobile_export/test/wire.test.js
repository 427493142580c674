// Tests of src/wire.js: round trips, bodies written by Python (splitkeras.wire
// and the safetensors package), the same refusals with the same messages as
// wire.py, and float16 conversion bit for bit against NumPy.
//
// Fixtures come from test/fixtures/make_wire_fixtures.py; tests/test_wire.py
// checks the reverse direction (Python decoding what wire.js encodes).

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';

import {
  ACCEPTED_MEDIA_TYPES, MEDIA_TYPE, WireFormatError, decodeTensors, encodeTensors,
  float16BitsToFloat32, float32ToFloat16Bits, isWireMediaType,
} from '../src/wire.js';
import { fixtureTensors, ramp } from './encode_fixture.mjs';

const FIXTURES = new URL('./fixtures/', import.meta.url);
const fixtureBytes = (name) => new Uint8Array(readFileSync(new URL(name, FIXTURES)));
const MANIFEST = JSON.parse(readFileSync(new URL('wire_fixtures.json', FIXTURES), 'utf8'));
const MALFORMED = JSON.parse(readFileSync(new URL('wire_malformed.json', FIXTURES), 'utf8'));

const ACT = { name: 'act', shape: [null, 4], dtype: 'float32' };
const LABELS = { name: 'labels', shape: [null], dtype: 'int32' };

function actAndLabels(batch = 2) {
  return [
    { name: 'act', dtype: 'float32', shape: [batch, 4], data: ramp(batch * 4, 0.5, -1) },
    {
      name: 'labels', dtype: 'int32', shape: [batch],
      data: Int32Array.from({ length: batch }, (_, i) => i),
    },
  ];
}

/** A body with a hand-written header (text or bytes) and data, as make_wire_fixtures.raw_body. */
function rawBody(header, data = new Uint8Array(0)) {
  const text = header instanceof Uint8Array ? header : new TextEncoder().encode(header);
  const body = new Uint8Array(8 + text.length + data.length);
  new DataView(body.buffer).setUint32(0, text.length, true);
  body.set(text, 8);
  body.set(data, 8 + text.length);
  return body;
}

/** The same bytes at an odd offset of a larger buffer: no typed view is aligned. */
function atOddOffset(bytes) {
  const shifted = new Uint8Array(bytes.length + 1);
  shifted.set(bytes, 1);
  return shifted.subarray(1);
}

const throwsWire = (fn, message) => assert.throws(fn, (error) => {
  assert.ok(error instanceof WireFormatError, `expected a WireFormatError, got ${error}`);
  if (message instanceof RegExp) assert.match(error.message, message);
  else assert.equal(error.message, message);
  return true;
});

test('media types', () => {
  assert.equal(MEDIA_TYPE, 'application/vnd.splitkeras.safetensors');
  assert.deepEqual(ACCEPTED_MEDIA_TYPES, [MEDIA_TYPE, 'application/octet-stream']);
  assert.ok(isWireMediaType('Application/Octet-Stream; charset=binary'));
  assert.ok(!isWireMediaType('application/json'));
  assert.ok(!isWireMediaType(undefined));
});

test('float32, int32 and bool round trip exactly, with metadata, in the given order', () => {
  const tensors = [
    {
      name: 'x', dtype: 'float32', shape: [2, 3],
      data: new Float32Array([1.5, -0, 3e-41, 3.4e38, -7, 0.1]),
    },
    { name: 'ids', dtype: 'int32', shape: [2], data: new Int32Array([-2147483648, 2147483647]) },
    { name: 'mask', dtype: 'bool', shape: [2, 1], data: new Uint8Array([1, 0]) },
    { name: 'scalar', dtype: 'float32', shape: [], data: [2.5] },
  ];
  const body = encodeTensors(tensors, { metadata: { step: '12', who: 'd\u00e9vice' } });
  assert.equal(new DataView(body.buffer).getUint32(0, true) % 8, 0, 'header padded to 8 bytes');
  const { tensors: out, metadata } = decodeTensors(body.buffer);
  assert.deepEqual(metadata, { step: '12', who: 'd\u00e9vice' });
  assert.deepEqual(Object.keys(out), ['x', 'ids', 'mask', 'scalar']);
  for (const tensor of tensors) {
    assert.equal(out[tensor.name].dtype, tensor.dtype);
    assert.deepEqual(out[tensor.name].shape, tensor.shape);
    assert.deepEqual([...out[tensor.name].data], [...tensor.data]);
  }
  assert.ok(Object.is(out.x.data[1], -0));
});

test('float16 on the wire rounds like NumPy and halves the bytes', () => {
  const data = ramp(1000, 0.731, -300);
  const tensors = [{ name: 'act', dtype: 'float32', shape: [10, 100], data }];
  const body32 = encodeTensors(tensors);
  const body16 = encodeTensors(tensors, { wireDtype: 'float16' });
  assert.ok(body16.length < body32.length / 2 + 100);
  const expected = [{ name: 'act', shape: [null, 100], dtype: 'float32' }];
  const { tensors: out } = decodeTensors(body16, { expected });
  assert.ok(out.act.data instanceof Float32Array);
  assert.deepEqual(out.act.data, float16BitsToFloat32(float32ToFloat16Bits(data)));
});

test('decoded float32 data is a view of the body when aligned, a copy when not', () => {
  const body = encodeTensors(actAndLabels());
  const aligned = decodeTensors(body, { expected: [ACT, LABELS] });
  assert.equal(aligned.tensors.act.data.buffer, body.buffer);
  const shifted = atOddOffset(body);
  const copied = decodeTensors(shifted, { expected: [ACT, LABELS] });
  assert.notEqual(copied.tensors.act.data.buffer, shifted.buffer);
  assert.deepEqual(copied.tensors.act.data, aligned.tensors.act.data);
  assert.deepEqual(copied.tensors.labels.data, aligned.tensors.labels.data);
});

test('tensors come back in the order of the expected specs', () => {
  const body = encodeTensors(actAndLabels(3));
  const { tensors } = decodeTensors(body, { expected: [LABELS, ACT], maxBatch: 3 });
  assert.deepEqual(Object.keys(tensors), ['labels', 'act']);
});

test('names such as __proto__ stay plain own properties', () => {
  const body = encodeTensors([{ name: '__proto__', dtype: 'int32', shape: [1], data: [7] }],
    { metadata: { __proto__: 'x' } });
  const { tensors, metadata } = decodeTensors(body);
  assert.deepEqual(Object.keys(tensors), ['__proto__']);
  assert.deepEqual([...tensors.__proto__.data], [7]);
  assert.equal(Object.getPrototypeOf(tensors), Object.prototype);
  assert.deepEqual(Object.keys(metadata), []); // an object literal's __proto__ is not a key
});

for (const [file, described] of Object.entries(MANIFEST.bodies)) {
  test(`decodes ${file} (written by Python) exactly`, () => {
    const entries = Object.entries(described.tensors);
    const specs = (batch) => entries.map(([name, { dtype, shape }]) => (
      { name, dtype, shape: batch ? [null, ...shape.slice(1)] : shape }));
    const optionSets = [{}, { expected: specs(false) }];
    if (new Set(entries.map(([, { shape }]) => shape[0])).size === 1) {
      optionSets.push({ expected: specs(true), maxBatch: 8 }); // one batch size: check it
    }
    for (const bytes of [fixtureBytes(file), atOddOffset(fixtureBytes(file))]) {
      for (const options of optionSets) {
        const { tensors, metadata } = decodeTensors(bytes, options);
        assert.deepEqual(metadata, described.metadata);
        assert.deepEqual(Object.keys(tensors), Object.keys(described.tensors));
        for (const [name, { dtype, shape, values }] of Object.entries(described.tensors)) {
          assert.equal(tensors[name].dtype, dtype);
          assert.deepEqual(tensors[name].shape, shape);
          assert.deepEqual([...tensors[name].data], values);
        }
      }
    }
  });
}

test('encodes the same bytes as splitkeras.wire.encode', () => {
  const tensors = fixtureTensors();
  assert.deepEqual(encodeTensors(tensors.float32, { metadata: { step: '7', session: 'abc-123' } }),
    fixtureBytes('py_float32.safetensors'));
  assert.deepEqual(encodeTensors(tensors.float16Multi, {
    wireDtype: 'float16', metadata: { step: '8', note: 'h\u00e9llo \u2713' },
  }), fixtureBytes('py_float16_multi.safetensors'));
});

test('malformed bodies: the fixtures cover every refusal wire.py pins', () => {
  assert.ok(MALFORMED.length >= 35);
});

for (const { name, body, options, message, exact } of MALFORMED) {
  test(`refuses malformed body "${name}" with wire.py's message`, () => {
    const bytes = new Uint8Array(Buffer.from(body, 'base64'));
    assert.throws(() => decodeTensors(bytes, options), (error) => {
      assert.ok(error instanceof WireFormatError, `expected a WireFormatError, got ${error}`);
      if (exact) assert.equal(error.message, message);
      else assert.ok(error.message.startsWith(message), `${error.message} !startsWith ${message}`);
      return true;
    });
  });
}

test('refuses what only wire.js can be given', () => {
  throwsWire(() => decodeTensors('not bytes'),
    'body must be an ArrayBuffer or Uint8Array, got string');
  const int64 = rawBody('{"x":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}',
    new Uint8Array(8));
  throwsWire(() => decodeTensors(int64),
    "tensor 'x': dtype I64 cannot be decoded in JavaScript; send int32");
  const big = encodeTensors(actAndLabels());
  throwsWire(() => decodeTensors(big, { maxHeaderBytes: 16 }),
    /^header length \d+ is over the limit of 16 bytes$/);
});

test('non-finite values pass only with allowNonFinite', () => {
  const [act, labels] = actAndLabels();
  act.data[3] = NaN;
  act.data[5] = -Infinity;
  const body = encodeTensors([act, labels], { wireDtype: 'float16' });
  throwsWire(() => decodeTensors(body, { expected: [ACT, LABELS] }),
    "tensor 'act': contains 2 non-finite values (NaN or Inf); "
    + 'pass allowNonFinite: true to accept them');
  const { tensors } = decodeTensors(body, { expected: [ACT, LABELS], allowNonFinite: true });
  assert.ok(Number.isNaN(tensors.act.data[3]));
  assert.equal(tensors.act.data[5], -Infinity);
});

test('encode refuses bad input', () => {
  const [act] = actAndLabels();
  throwsWire(() => encodeTensors([act], { wireDtype: 'float8' }), /^Unknown codec 'float8'; use /);
  throwsWire(() => encodeTensors([act, act]), /^tensor name "act" is not allowed/);
  throwsWire(() => encodeTensors([{ ...act, name: '__metadata__' }]),
    /^tensor name "__metadata__"/);
  throwsWire(() => encodeTensors([{ ...act, shape: [3, 4] }]),
    "tensor 'act': data has 8 values but shape [3, 4] needs 12");
  throwsWire(() => encodeTensors([{ ...act, shape: [2, -4] }]),
    /shape must be a list of non-negative integers/);
  throwsWire(() => encodeTensors([{ ...act, dtype: 'int64' }]),
    "tensor 'act' has dtype int64; wire.js encodes float32, int32, uint8 and bool tensors");
  throwsWire(() => encodeTensors([act], { metadata: { step: 3 } }),
    'metadata must map strings to strings');
  throwsWire(() => encodeTensors([{ ...act, data: ramp(8, 1e4, 0) }], { wireDtype: 'float16' }),
    "tensor 'act': finite values beyond the float16 range; send float32 or rescale");
});

test('the UTF-8 fallback (no TextEncoder/TextDecoder, as on some RN engines) agrees', () => {
  const { TextEncoder: encoder, TextDecoder: decoder } = globalThis;
  const tensors = fixtureTensors();
  const options = { wireDtype: 'float16', metadata: { step: '8', note: 'h\u00e9llo \u2713' } };
  const withNative = encodeTensors(tensors.float16Multi, options);
  const wide = { '\u{1f600}': '\u00e9\u4e2d\u{10ffff}' };
  const emoji = encodeTensors(tensors.float32, { metadata: wide });
  try {
    delete globalThis.TextEncoder;
    delete globalThis.TextDecoder;
    assert.deepEqual(encodeTensors(tensors.float16Multi, options), withNative);
    assert.deepEqual(decodeTensors(withNative).metadata, options.metadata);
    assert.deepEqual(decodeTensors(emoji).metadata, wide);
    // stray byte, overlong, surrogate, past U+10FFFF, truncated
    const invalids = [[0xff], [0xc0, 0x80], [0xed, 0xa0, 0x80], [0xf4, 0x90, 0x80, 0x80], [0xe2]];
    for (const invalid of invalids) {
      const body = rawBody(new Uint8Array([0x7b, 0x22, ...invalid, 0x22, 0x3a, 0x31, 0x7d]));
      throwsWire(() => decodeTensors(body), /^header is not valid UTF-8: /);
    }
  } finally {
    globalThis.TextEncoder = encoder;
    globalThis.TextDecoder = decoder;
  }
});

test('fuzz: mutated, truncated and random bodies only ever throw WireFormatError', () => {
  let state = 2463534242;
  const random = (n) => {
    state ^= state << 13; state >>>= 0;
    state ^= state >>> 17;
    state ^= state << 5; state >>>= 0;
    return state % n;
  };
  const seeds = [
    encodeTensors(actAndLabels(), { metadata: { step: '1' } }),
    encodeTensors(actAndLabels(3), { wireDtype: 'float16' }),
    ...Object.keys(MANIFEST.bodies).map(fixtureBytes),
  ];
  const printable = new TextEncoder().encode('{}[]",:0123456789-.eE nulltruefalse"F32""I32"');
  for (let round = 0; round < 3000; round += 1) {
    const seed = seeds[random(seeds.length)];
    let body = seed.slice();
    const kind = random(4);
    if (kind === 0) body = body.subarray(0, random(body.length + 1));
    else if (kind === 3) body = Uint8Array.from({ length: random(64) }, () => random(256));
    else {
      for (let k = 0; k <= random(4); k += 1) {
        const at = random(Math.min(body.length, kind === 1 ? 120 : body.length));
        body[at] = kind === 1 ? printable[random(printable.length)] : random(256);
      }
    }
    for (const options of [{}, { expected: [ACT, LABELS], maxBatch: 4 }]) {
      try {
        decodeTensors(body, options);
      } catch (error) {
        if (!(error instanceof WireFormatError)) {
          assert.fail(`${error} for body ${Buffer.from(body).toString('base64')}`);
        }
      }
    }
  }
});

// ---------------------------------------------------------------- float16

test('float32 -> float16 matches NumPy bit for bit on the fixture cases (edges, ties, NaN)', () => {
  const { file, count } = MANIFEST.fp16_cases;
  const bytes = fixtureBytes(file);
  assert.equal(bytes.length, count * 6);
  const inputs = new Float32Array(bytes.slice(0, count * 4).buffer);
  const expected = new Uint16Array(bytes.slice(count * 4).buffer);
  const actual = float32ToFloat16Bits(inputs);
  const inputBits = new Uint32Array(inputs.buffer);
  for (let i = 0; i < count; i += 1) {
    if (actual[i] !== expected[i]) {
      assert.fail(`0x${inputBits[i].toString(16)}: got 0x${actual[i].toString(16)}, `
        + `NumPy gives 0x${expected[i].toString(16)}`);
    }
  }
});

test('float16 -> float32 is exact for all 65536 patterns, and converts back to itself', () => {
  const halves = Uint16Array.from({ length: 65536 }, (_, i) => i);
  const floats = float16BitsToFloat32(halves);
  const back = float32ToFloat16Bits(floats);
  for (let h = 0; h < 65536; h += 1) {
    const exponent = (h >> 10) & 31;
    const fraction = h & 1023;
    const sign = h & 0x8000 ? -1 : 1;
    let value;
    if (exponent === 31) value = fraction ? NaN : sign * Infinity;
    else if (exponent === 0) value = sign * fraction * 2 ** -24;
    else value = sign * (1 + fraction / 1024) * 2 ** (exponent - 15);
    if (!Object.is(floats[h], value) && !(Number.isNaN(value) && Number.isNaN(floats[h]))) {
      assert.fail(`0x${h.toString(16)} -> ${floats[h]}, expected ${value}`);
    }
    if (back[h] !== h) assert.fail(`0x${h.toString(16)} -> float32 -> 0x${back[h].toString(16)}`);
  }
});

test('float32 -> float16 rounds every tie to even and everything else to nearest', () => {
  const low = new Float32Array(1);
  const probe = new Float32Array(3);
  const probeBits = new Uint32Array(probe.buffer);
  const floats = float16BitsToFloat32(Uint16Array.from({ length: 0x7c01 }, (_, i) => i));
  for (let h = 0; h < 0x7bff; h += 1) { // 0x7bff (65504) has no finite neighbour above
    low[0] = (floats[h] + floats[h + 1]) / 2; // exact in float32
    probe[0] = low[0];
    probeBits[1] = probeBits[0] + 1;
    probeBits[2] = probeBits[0] - 1;
    const [tie, above, below] = float32ToFloat16Bits(probe);
    const even = h % 2 === 0 ? h : h + 1;
    if (tie !== even || above !== h + 1 || below !== h) {
      assert.fail(`between 0x${h.toString(16)} and 0x${(h + 1).toString(16)}: `
        + `tie 0x${tie.toString(16)}, above 0x${above.toString(16)}, `
        + `below 0x${below.toString(16)}`);
    }
  }
});
