// The codec registry: how floating tensors are written on the wire, per direction.
//
// The JavaScript twin of `splitkeras/codecs.py` and `splitkeras/codec_bodies.py`:
// the same SPEC grammar (`float32`, `float16`, `bfloat16`, `int8`, `topk:F`,
// `topk:F+int8`), the same bytes (every operation float32, `Math.fround` after
// each one, in the Python order), the same checks and messages when decoding.
// See docs/protocol.md ("Codecs") for the formats and the directions.
//
// Example:
//   import { parseCompress } from './codecs.js';
//   parseCompress('forward=int8,backward=topk:0.05+int8').backward.spec; // 'topk:0.05+int8'

import { WireFormatError } from './wire_error.js';

export const PLAIN = ['float32', 'float16', 'bfloat16'];
export const FAMILIES = [...PLAIN, 'int8', 'topk'];
export const DIRECTIONS = ['forward', 'backward'];

const FRACTION = /^(?:1|0\.[0-9]*[1-9])$/;
const FLOAT32_MAX = 3.4028234663852886e38;
const LARGEST = {
  float32: FLOAT32_MAX, float16: 65504, bfloat16: 3.3895313892515355e38, int8: FLOAT32_MAX / 2,
};
const SYNTAX = 'float32, float16, bfloat16, int8, topk:F or topk:F+int8 (F a fraction in (0, 1] '
  + 'without trailing zeros, like 0.05)';
const PART_NAMES = ['scale', 'offset', 'indices', 'shape'];
const fr = Math.fround;
const pyRepr = (text) => `'${text}'`;

function makeCodec(spec, family, fraction = null, values = null) {
  const plain = PLAIN.includes(family);
  return Object.freeze({
    spec, family, fraction, values, plain,
    families: family === 'topk' && values === 'int8' ? ['topk', 'int8'] : [family],
    largestValue: LARGEST[family === 'topk' ? values : family],
    labelDtype: plain ? family : 'float32',
    kept: (count) => Math.min(count, Math.max(1, Math.ceil(fraction * count))),
  });
}

/** Parse one codec SPEC; a TypeError saying the syntax when it is not one. */
export function parseCodec(text) {
  if (text !== null && typeof text === 'object' && typeof text.spec === 'string') return text;
  if (typeof text !== 'string') {
    throw new TypeError(`A codec must be a string, got ${typeof text}; use ${SYNTAX}.`);
  }
  if (PLAIN.includes(text) || text === 'int8') return makeCodec(text, text);
  if (text.startsWith('topk:')) {
    const rest = text.slice(5);
    const plus = rest.indexOf('+');
    const fractionText = plus < 0 ? rest : rest.slice(0, plus);
    const values = plus < 0 ? '' : rest.slice(plus + 1);
    if (!FRACTION.test(fractionText)) {
      throw new TypeError(`Codec ${pyRepr(text)}: the top-k fraction ${pyRepr(fractionText)} is not `
        + 'a decimal in (0, 1] without trailing zeros; write it like topk:0.05.');
    }
    if (values !== '' && values !== 'int8') {
      throw new TypeError(`Codec ${pyRepr(text)}: top-k values travel as float32 (topk:F) or int8 `
        + `(topk:F+int8), not ${pyRepr(values)}.`);
    }
    return makeCodec(text, 'topk', Number(fractionText), values || 'float32');
  }
  throw new TypeError(`Unknown codec ${pyRepr(text)}; use ${SYNTAX}.`);
}

/**
 * Parse a `compress` SPEC: one codec for both directions, `forward=CODEC,backward=CODEC`
 * (a direction left out is float32), or `{forward, backward}`.
 * @returns {{forward: object, backward: object}}
 */
export function parseCompress(text) {
  if (text !== null && typeof text === 'object' && typeof text.spec !== 'string') {
    const unknown = Object.keys(text).filter((key) => !DIRECTIONS.includes(key));
    if (unknown.length) {
      throw new TypeError(`Unknown direction(s) ${unknown.join(', ')} in compress; use 'forward' and `
        + "'backward'.");
    }
    return { forward: parseCodec(text.forward ?? 'float32'),
      backward: parseCodec(text.backward ?? 'float32') };
  }
  if (typeof text !== 'string' || !text) {
    throw new TypeError(`compress must be a codec or 'forward=CODEC,backward=CODEC', got ${text}.`);
  }
  if (!text.includes('=')) {
    const codec = parseCodec(text);
    return { forward: codec, backward: codec };
  }
  const chosen = {};
  for (const item of text.split(',')) {
    const equals = item.indexOf('=');
    const direction = equals < 0 ? item : item.slice(0, equals);
    if (equals < 0 || !DIRECTIONS.includes(direction)) {
      throw new TypeError(`compress ${pyRepr(text)}: ${pyRepr(item)} is not forward=CODEC or `
        + 'backward=CODEC.');
    }
    if (chosen[direction]) throw new TypeError(`compress ${pyRepr(text)} names ${direction} twice.`);
    chosen[direction] = parseCodec(item.slice(equals + 1));
  }
  return { forward: chosen.forward ?? parseCodec('float32'),
    backward: chosen.backward ?? parseCodec('float32') };
}

/** The SPEC text of per-direction codecs: one name when both are the same. */
export function formatCompress({ forward, backward }) {
  return forward.spec === backward.spec ? forward.spec
    : `forward=${forward.spec},backward=${backward.spec}`;
}

function bad(name, problem) {
  throw new WireFormatError(`tensor '${name}': ${problem}`);
}

// ---------------------------------------------------------------- arithmetic

/** float32 -> bfloat16 bit patterns, rounded to nearest even (NaN stays a quiet NaN). */
export function float32ToBfloat16Bits(values) {
  const bits = new Uint32Array(values.buffer, values.byteOffset, values.length);
  const out = new Uint16Array(values.length);
  for (let i = 0; i < bits.length; i += 1) {
    const b = bits[i];
    out[i] = (b & 0x7fffffff) > 0x7f800000 ? (b >>> 16) | 0x40
      : (b + 0x7fff + ((b >>> 16) & 1)) / 65536;
  }
  return out;
}

/** bfloat16 bit patterns -> float32 (exact). */
export function bfloat16BitsToFloat32(halves) {
  const bits = new Uint32Array(halves.length);
  for (let i = 0; i < halves.length; i += 1) bits[i] = halves[i] << 16;
  return new Float32Array(bits.buffer);
}

/** Affine 8-bit codes per channel of the last axis: {codes, scale, offset} (see codec_bodies.py). */
export function int8Encode(name, data, channels) {
  const rows = channels ? data.length / channels : 0;
  const scale = new Float32Array(channels).fill(1);
  const offset = new Float32Array(channels);
  const codes = new Uint8Array(data.length);
  if (rows === 0) return { codes, scale, offset };
  const low = data.slice(0, channels);
  const high = data.slice(0, channels);
  for (let row = 1, i = channels; row < rows; row += 1) {
    for (let c = 0; c < channels; c += 1, i += 1) { // Math.min/max: branch-free, NaN sticks
      low[c] = Math.min(low[c], data[i]);
      high[c] = Math.max(high[c], data[i]);
    }
  }
  const inverse = new Float32Array(channels);
  for (let c = 0; c < channels; c += 1) {
    const nan = low[c] !== low[c] || high[c] !== high[c]; // eslint-disable-line no-self-compare
    low[c] += 0; // -0 -> +0, as in codec_bodies.py
    high[c] += 0;
    const span = fr(high[c] - low[c]);
    if (nan || !Number.isFinite(span)) {
      bad(name, 'non-finite values, or a channel spanning beyond float32, cannot be sent as int8; '
        + 'send float32 or rescale');
    }
    const s = fr(span / 255);
    scale[c] = s === 0 ? 1 : s;
    inverse[c] = fr(1 / scale[c]);
    offset[c] = low[c];
  }
  for (let row = 0, i = 0; row < rows; row += 1) {
    for (let c = 0; c < channels; c += 1, i += 1) {
      const v = fr(fr(data[i] - offset[c]) * inverse[c]); // in [0, 255 + a few ulps]
      let q = (v + 0.5) | 0; // round half to even, as NumPy's rint
      if (q - v === 0.5 && (q & 1) === 1) q -= 1;
      codes[i] = q;
    }
  }
  return { codes, scale, offset };
}

/** `codes * scale + offset` in float32, channels along the last axis. */
export function int8Decode(codes, scale, offset) {
  const channels = scale.length;
  const out = new Float32Array(codes.length);
  const rows = channels ? codes.length / channels : 0;
  for (let row = 0, i = 0; row < rows; row += 1) {
    for (let c = 0; c < channels; c += 1, i += 1) out[i] = fr(codes[i] * scale[c]) + offset[c];
  }
  return out;
}

/** The flat indices (Int32Array, increasing) of the `kept` largest magnitudes; ties to the lower index. */
export function topkIndices(flat, kept) {
  const count = flat.length;
  if (kept >= count) return Int32Array.from({ length: count }, (_, i) => i);
  const bits = new Uint32Array(flat.buffer, flat.byteOffset, count);
  // The kept-th largest magnitude bit pattern, by two 16-bit radix passes (exact, O(n)).
  const histogram = new Uint32Array(65536);
  for (let i = 0; i < count; i += 1) histogram[(bits[i] & 0x7fffffff) >>> 16] += 1;
  let rank = kept;
  let high = 65535;
  while (histogram[high] < rank) { rank -= histogram[high]; high -= 1; }
  histogram.fill(0);
  for (let i = 0; i < count; i += 1) {
    const m = bits[i] & 0x7fffffff;
    if (m >>> 16 === high) histogram[m & 0xffff] += 1;
  }
  let low = 65535;
  while (histogram[low] < rank) { rank -= histogram[low]; low -= 1; }
  const threshold = high * 65536 + low;
  let ties = rank; // how many of the values equal to the threshold are kept (lowest indices)
  const indices = new Int32Array(kept);
  let n = 0;
  for (let i = 0; i < count; i += 1) {
    const m = (bits[i] & 0x7fffffff) >>> 0;
    if (m > threshold) indices[n++] = i;
    else if (m === threshold && ties > 0) { indices[n++] = i; ties -= 1; }
  }
  return indices;
}

const product = (shape) => shape.reduce((total, dim) => total * dim, 1);

function topkParts(tensor, codec, residuals) {
  const { name, shape } = tensor;
  const count = product(shape);
  if (count >= 2 ** 31 || shape.some((dim) => dim >= 2 ** 31)) {
    bad(name, 'has too many values for top-k indices (int32); send it as int8 or float32');
  }
  const dense = Float32Array.from(tensor.data);
  const previous = residuals ? residuals.get(name) : undefined;
  if (previous && previous.shape.length === shape.length
      && previous.shape.every((dim, axis) => dim === shape[axis])) {
    for (let i = 0; i < count; i += 1) dense[i] += previous.data[i];
  }
  const indices = topkIndices(dense, codec.kept(count));
  const kept = new Float32Array(indices.length);
  for (let j = 0; j < indices.length; j += 1) kept[j] = dense[indices[j]];
  const parts = [];
  let sent = kept;
  if (codec.values === 'int8') {
    const { codes, scale, offset } = int8Encode(name, kept, 1);
    parts.push({ name, dtype: 'uint8', shape: [kept.length], data: codes },
      { name: `${name}/scale`, dtype: 'float32', shape: [1], data: scale },
      { name: `${name}/offset`, dtype: 'float32', shape: [1], data: offset });
    sent = int8Decode(codes, scale, offset);
  } else {
    parts.push({ name, dtype: 'float32', shape: [kept.length], data: kept });
  }
  parts.push({ name: `${name}/indices`, dtype: 'int32', shape: [indices.length], data: indices },
    { name: `${name}/shape`, dtype: 'int32', shape: [shape.length], data: Int32Array.from(shape) });
  if (residuals) {
    for (let j = 0; j < indices.length; j += 1) dense[indices[j]] = kept[j] - sent[j];
    residuals.set(name, { shape: [...shape], data: dense });
  }
  return parts;
}

/**
 * The entries that carry `tensors` under a lossy codec: float32 tensors compressed
 * (except the `uncompressed` names), others as they are. Top-k reads and updates
 * `residuals` (a Map, name -> {shape, data}).
 */
export function expandTensors(tensors, codec, residuals, uncompressed = []) {
  const entries = [];
  for (const tensor of tensors) {
    const { name, dtype, shape } = tensor;
    if (typeof name !== 'string' || name.includes('/')) {
      throw new WireFormatError(`tensor name ${JSON.stringify(name)} is not allowed with codec `
        + `'${codec.spec}': '/' separates a tensor's parts; rename it`);
    }
    if (dtype !== 'float32' || uncompressed.includes(name)) entries.push(tensor);
    else if (codec.family === 'int8') {
      const data = tensor.data instanceof Float32Array ? tensor.data : Float32Array.from(tensor.data);
      const { codes, scale, offset } = int8Encode(name, data, shape.length ? shape[shape.length - 1] : 1);
      entries.push({ name, dtype: 'uint8', shape: [...shape], data: codes },
        { name: `${name}/scale`, dtype: 'float32', shape: [scale.length], data: scale },
        { name: `${name}/offset`, dtype: 'float32', shape: [offset.length], data: offset });
    } else entries.push(...topkParts(tensor, codec, residuals));
  }
  return entries;
}

// ---------------------------------------------------------------- decoding checks

// `raw`: a Map of name -> {code, shape, data}, consumed part by part.
function pop(raw, key, code, shape, what) {
  const tensor = raw.get(key);
  raw.delete(key);
  const fits = shape === null ? tensor.shape.length === 1
    : tensor.shape.length === shape.length && tensor.shape.every((dim, axis) => dim === shape[axis]);
  if (tensor.code !== code || !fits) {
    const wanted = shape === null ? `a rank-1 ${code} tensor` : `${code} of shape [${shape.join(', ')}]`;
    const hint = shape === null ? '' : ' (truncated values?)';
    bad(key.split('/')[0], `${what} must be ${wanted}, got ${tensor.code} of shape `
      + `[${tensor.shape.join(', ')}]${hint}`);
  }
  return tensor.data;
}

function take(raw, name, part, code) {
  const key = `${name}/${part}`;
  if (!raw.has(key)) bad(name, `the part '${key}' is missing`);
  return pop(raw, key, code, null, `the part '${key}'`);
}

function scalesOf(raw, name, channels) {
  const scale = take(raw, name, 'scale', 'F32');
  const offset = take(raw, name, 'offset', 'F32');
  if (scale.length !== channels || offset.length !== channels) {
    bad(name, `${scale.length} scales and ${offset.length} offsets for ${channels} channels `
      + '(the last axis): send one of each per channel');
  }
  for (let c = 0; c < channels; c += 1) {
    if (!(Number.isFinite(scale[c]) && scale[c] > 0)) {
      bad(name, `the scale of channel ${c} is not finite and > 0`);
    }
  }
  for (let c = 0; c < channels; c += 1) {
    if (!Number.isFinite(offset[c])) bad(name, `the offset of channel ${c} is not finite`);
  }
  return [scale, offset];
}

function codesOf(raw, name, shape) {
  return pop(raw, name, 'U8', shape, 'int8 codes');
}

function collapseTopk(raw, name, codec) {
  const shapePart = take(raw, name, 'shape', 'I32');
  if (shapePart.length > 8 || shapePart.some((dim) => dim < 0)) {
    bad(name, `the dense shape [${[...shapePart].join(', ')}] must be at most 8 dimensions >= 0`);
  }
  const shape = [...shapePart];
  const count = product(shape);
  if (count >= 2 ** 31) {
    bad(name, `the dense shape [${shape.join(', ')}] holds ${count} values, over the int32 index range`);
  }
  const indices = take(raw, name, 'indices', 'I32');
  const kept = count ? codec.kept(count) : 0;
  if (indices.length !== kept) {
    bad(name, `${indices.length} indices, but ${codec.spec} of ${count} values keeps ${kept}`);
  }
  let values;
  if (codec.values === 'int8') values = int8Decode(codesOf(raw, name, [kept]), ...scalesOf(raw, name, 1));
  else values = pop(raw, name, 'F32', [kept], 'top-k values');
  for (let j = 0; j < kept; j += 1) {
    if (indices[j] < 0 || indices[j] >= count) {
      bad(name, `index ${indices[j]} at position ${j} is out of range for ${count} values`);
    }
  }
  for (let j = 1; j < kept; j += 1) {
    if (indices[j] === indices[j - 1]) {
      bad(name, `index ${indices[j]} appears twice (positions ${j - 1} and ${j})`);
    }
    if (indices[j] < indices[j - 1]) {
      bad(name, `indices must be strictly increasing: ${indices[j]} at position ${j} follows `
        + `${indices[j - 1]}`);
    }
  }
  const dense = new Float32Array(count);
  for (let j = 0; j < kept; j += 1) dense[indices[j]] = values[j];
  return { dtype: 'float32', code: 'F32', shape, data: dense };
}

/**
 * Check and decode the entries of a body written under a lossy codec (`raw`: a Map of
 * name -> {dtype, code, shape, data}); returns {tensors: Map, compressed: Set}.
 */
export function collapseTensors(raw, codec) {
  const names = [...raw.keys()].filter((name) => !name.includes('/'));
  const tensors = new Map();
  const compressed = new Set();
  for (const name of names) {
    if (!PART_NAMES.some((part) => raw.has(`${name}/${part}`))) {
      tensors.set(name, raw.get(name));
      raw.delete(name);
    } else if (codec.family === 'int8') {
      compressed.add(name);
      const { shape } = raw.get(name);
      const [scale, offset] = scalesOf(raw, name, shape.length ? shape[shape.length - 1] : 1);
      tensors.set(name, { dtype: 'float32', code: 'F32', shape: [...shape],
        data: int8Decode(codesOf(raw, name, shape), scale, offset) });
    } else {
      compressed.add(name);
      tensors.set(name, collapseTopk(raw, name, codec));
    }
  }
  if (raw.size) {
    const stray = [...raw.keys()].map((key) => `'${key}'`).join(', ');
    throw new WireFormatError(`entries ${stray} belong to no tensor of codec '${codec.spec}' (a part's `
      + 'tensor is missing, or the body uses another codec)');
  }
  return { tensors, compressed };
}
