// The binary tensor wire format: safetensors bodies, encoded and checked.
//
// The JavaScript twin of `splitkeras/wire.py`: a body is an 8-byte
// little-endian header length N, N bytes of UTF-8 JSON mapping each tensor
// name to its `dtype`, `shape` and `data_offsets` (plus an optional
// `__metadata__` object of strings), then the tensors' bytes back to back
// (https://github.com/huggingface/safetensors). Both sides refuse the same
// bodies with the same messages.
//
// Runs in React Native and browsers: ArrayBuffer, DataView and typed arrays
// only (TextEncoder/TextDecoder when present, a built-in UTF-8 codec when not).
//
// Example:
//   import { encodeTensors, decodeTensors, MEDIA_TYPE } from './wire.js';
//   const body = encodeTensors(
//     [{ name: 'act', dtype: 'float32', shape: [2, 4], data: new Float32Array(8) }],
//     { wireDtype: 'float16', metadata: { step: '3' } });
//   await fetch(url, { method: 'POST', headers: { 'Content-Type': MEDIA_TYPE }, body });
//   const { tensors, metadata } = decodeTensors(await response.arrayBuffer(), {
//     expected: [{ name: 'grad', shape: [null, 4], dtype: 'float32' }], maxBatch: 64 });

import {
  bfloat16BitsToFloat32, collapseTensors, expandTensors, float32ToBfloat16Bits, parseCodec,
} from './codecs.js';
import { float16BitsToFloat32, float32ToFloat16Bits } from './float16.js';
import { utf8Decode, utf8Encode } from './utf8.js';
import { WireFormatError } from './wire_error.js';

export { float16BitsToFloat32, float32ToFloat16Bits, WireFormatError };

export const MEDIA_TYPE = 'application/vnd.splitkeras.safetensors';
export const ACCEPTED_MEDIA_TYPES = [MEDIA_TYPE, 'application/octet-stream'];
export const WIRE_DTYPES = ['float32', 'float16']; // the legacy wireDtype; codecs.js has them all
export const DEFAULT_MAX_HEADER_BYTES = 64 * 1024;

const METADATA_KEY = '__metadata__';
const CODEC_KEY = 'codec'; // the metadata key naming a lossy codec's spec
// safetensors dtype code -> bytes per element, in the order wire.py lists them.
const ITEMSIZE = {
  F64: 8, F32: 4, F16: 2, BF16: 2, I64: 8, I32: 4, I16: 2, I8: 1, U64: 8, U32: 4, U16: 2, U8: 1, BOOL: 1,
};
const CODES = Object.keys(ITEMSIZE);
// spec dtype name -> the one code allowed for it (floating specs allow F32 and F16).
const NAME_TO_CODE = {
  float64: 'F64', float32: 'F32', float16: 'F16', int64: 'I64', int32: 'I32', int16: 'I16',
  int8: 'I8', uint64: 'U64', uint32: 'U32', uint16: 'U16', uint8: 'U8', bool: 'BOOL',
};
const FLOAT_NAMES = ['float64', 'float32', 'float16'];
// What a decoded code becomes here: TF.js holds float32, int32 and bool.
const DECODED = {
  F32: ['float32', Float32Array], F16: ['float32', Float32Array], BF16: ['float32', Float32Array],
  F64: ['float64', Float64Array],
  I32: ['int32', Int32Array], I16: ['int16', Int16Array], I8: ['int8', Int8Array],
  U32: ['uint32', Uint32Array], U16: ['uint16', Uint16Array], U8: ['uint8', Uint8Array],
  BOOL: ['bool', Uint8Array],
};
const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

const has = (object, key) => Object.prototype.hasOwnProperty.call(object, key);
const isPlainObject = (value) =>
  typeof value === 'object' && value !== null && !Array.isArray(value);
const isCount = (value) => Number.isSafeInteger(value) && value >= 0;
const q = (name) => `'${name}'`;
const quoteList = (names) => `[${names.map(q).join(', ')}]`;
const isUnknown = (dim) => dim === null || dim === undefined;
const formatShape = (shape) =>
  `[${shape.map((dim) => (isUnknown(dim) ? 'None' : String(dim))).join(', ')}]`;
const product = (shape) => shape.reduce((total, dim) => total * dim, 1);
// Own, enumerable property even for a name like "__proto__".
const setOwn = (object, key, value) =>
  Object.defineProperty(object, key, {
    value, enumerable: true, writable: true, configurable: true,
  });

function bad(name, problem) {
  throw new WireFormatError(`tensor ${q(name)}: ${problem}`);
}

/** Whether a Content-Type header names a body `decodeTensors` reads. */
export function isWireMediaType(contentType) {
  if (!contentType) return false;
  return ACCEPTED_MEDIA_TYPES.includes(contentType.split(';')[0].trim().toLowerCase());
}

// ---------------------------------------------------------------- encode

function tensorBytes(tensor, wireDtype) {
  const { name, dtype } = tensor;
  let { data } = tensor;
  if (dtype === 'float32') {
    if (!(data instanceof Float32Array)) data = Float32Array.from(data);
    if (wireDtype === 'bfloat16') {
      const halves = float32ToBfloat16Bits(data);
      for (let i = 0; i < halves.length; i += 1) {
        if ((halves[i] & 0x7fff) === 0x7f80 && Number.isFinite(data[i])) {
          bad(name, 'finite values beyond the bfloat16 range; send float32 or rescale');
        }
      }
      return ['BF16', new Uint8Array(halves.buffer)];
    }
    if (wireDtype === 'float16') {
      const halves = float32ToFloat16Bits(data);
      const bits = new Uint32Array(data.buffer, data.byteOffset, data.length);
      for (let i = 0; i < halves.length; i += 1) {
        if ((halves[i] & 0x7fff) === 0x7c00 && (bits[i] & 0x7f800000) !== 0x7f800000) {
          bad(name, 'finite values beyond the float16 range; send float32 or rescale');
        }
      }
      return ['F16', new Uint8Array(halves.buffer)];
    }
    return ['F32', new Uint8Array(data.buffer, data.byteOffset, data.byteLength)];
  }
  if (dtype === 'int32' || dtype === 'bool' || dtype === 'uint8') {
    const Type = dtype === 'int32' ? Int32Array : Uint8Array;
    if (!(data instanceof Type)) data = Type.from(data, (v) => (dtype === 'bool' ? !!v : v));
    return [NAME_TO_CODE[dtype], new Uint8Array(data.buffer, data.byteOffset, data.byteLength)];
  }
  throw new WireFormatError(
    `tensor ${q(name)} has dtype ${dtype}; wire.js encodes float32, int32, uint8 and bool tensors`);
}

/**
 * Encode tensors as one safetensors body.
 *
 * Float32 tensors are sent as `wireDtype` (float16 halves the bytes), int32 and
 * bool tensors as they are, in the order given.
 *
 * @param {Array<{name: string, dtype: 'float32'|'int32'|'bool', shape: number[],
 *   data: Float32Array|Int32Array|Uint8Array|number[]}>} tensors
 * @param {{wireDtype?: 'float32'|'float16', metadata?: Object<string, string>}} [options]
 * @returns {Uint8Array}
 */
export function encodeTensors(tensors, {
  wireDtype, codec = 'float32', metadata, residuals, uncompressed = [],
} = {}) {
  if (!LITTLE_ENDIAN) throw new WireFormatError('wire.js needs a little-endian platform');
  const chosen = toCodec(wireDtype ?? codec);
  if (metadata !== undefined && metadata !== null) {
    if (!isPlainObject(metadata) || !Object.values(metadata).every((v) => typeof v === 'string')) {
      throw new WireFormatError('metadata must map strings to strings');
    }
  }
  if (chosen.plain) return encodePlain(tensors, chosen.family, metadata);
  const entries = expandTensors(tensors, chosen, residuals, uncompressed);
  return encodePlain(entries, 'float32', { ...(metadata ?? {}), [CODEC_KEY]: chosen.spec });
}

function toCodec(codec) {
  try {
    return parseCodec(codec);
  } catch (error) {
    throw new WireFormatError(error.message);
  }
}

function encodePlain(tensors, wireDtype, metadata) {
  const header = Object.create(null);
  if (metadata !== undefined && metadata !== null) header[METADATA_KEY] = { ...metadata };
  const parts = [];
  let offset = 0;
  for (const tensor of tensors) {
    const { name, shape } = tensor;
    if (typeof name !== 'string' || name === METADATA_KEY || has(header, name)) {
      throw new WireFormatError(
        `tensor name ${JSON.stringify(name)} is not allowed; use distinct strings other than `
        + METADATA_KEY);
    }
    if (!Array.isArray(shape) || !shape.every(isCount)) {
      bad(name, `shape must be a list of non-negative integers, got ${JSON.stringify(shape)}`);
    }
    const [code, bytes] = tensorBytes(tensor, wireDtype);
    if (bytes.length !== product(shape) * ITEMSIZE[code]) {
      bad(name, `data has ${bytes.length / ITEMSIZE[code]} values but shape ${formatShape(shape)} `
        + `needs ${product(shape)}`);
    }
    const dataOffsets = [offset, offset + bytes.length];
    header[name] = { dtype: code, shape: [...shape], data_offsets: dataOffsets };
    parts.push([offset, bytes]);
    offset += bytes.length;
  }
  const headerBytes = utf8Encode(JSON.stringify(header));
  const padded = Math.ceil(headerBytes.length / 8) * 8;
  const body = new Uint8Array(8 + padded + offset);
  body.fill(0x20, 8 + headerBytes.length, 8 + padded);
  const view = new DataView(body.buffer);
  view.setUint32(0, padded, true);
  view.setUint32(4, Math.floor(padded / 2 ** 32), true);
  body.set(headerBytes, 8);
  for (const [start, bytes] of parts) body.set(bytes, 8 + padded + start);
  return body;
}

// ---------------------------------------------------------------- decode

function parseHeader(bytes, maxHeaderBytes) {
  if (bytes.length < 8) {
    throw new WireFormatError(`body is ${bytes.length} bytes; a safetensors body starts with an `
      + '8-byte little-endian header length');
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, 8);
  const headerLength = view.getUint32(0, true) + view.getUint32(4, true) * 2 ** 32;
  if (headerLength > maxHeaderBytes) {
    throw new WireFormatError(
      `header length ${headerLength} is over the limit of ${maxHeaderBytes} bytes`);
  }
  if (8 + headerLength > bytes.length) {
    throw new WireFormatError(`header length ${headerLength} runs past the end of the `
      + `${bytes.length}-byte body (truncated body?)`);
  }
  let text;
  try {
    text = utf8Decode(bytes.subarray(8, 8 + headerLength));
  } catch (error) {
    throw new WireFormatError(`header is not valid UTF-8: ${error.message}`);
  }
  const notObject = "header must be a JSON object starting with '{'";
  if (!text.startsWith('{')) throw new WireFormatError(notObject);
  let header;
  try {
    header = JSON.parse(text);
  } catch (error) {
    throw new WireFormatError(`header is not valid JSON: ${error.message}`);
  }
  if (!isPlainObject(header)) throw new WireFormatError(notObject);
  return [header, 8 + headerLength];
}

function checkEntries(header) {
  const metadata = has(header, METADATA_KEY) ? header[METADATA_KEY] : {};
  if (!isPlainObject(metadata) || !Object.values(metadata).every((v) => typeof v === 'string')) {
    throw new WireFormatError(`${METADATA_KEY} must map strings to strings`);
  }
  const entries = Object.entries(header).filter(([name]) => name !== METADATA_KEY);
  for (const [name, entry] of entries) {
    if (!isPlainObject(entry) || !['dtype', 'shape', 'data_offsets'].every((k) => has(entry, k))) {
      bad(name, 'entry must be an object with dtype, shape and data_offsets');
    }
    if (typeof entry.dtype !== 'string' || !has(ITEMSIZE, entry.dtype)) {
      const supported = CODES.join(', ');
      bad(name, `dtype ${JSON.stringify(entry.dtype)} is not supported; supported: ${supported}`);
    }
    const { shape, data_offsets: offsets } = entry;
    if (!Array.isArray(shape) || !shape.every(isCount)) {
      bad(name, `shape must be a list of non-negative integers, got ${JSON.stringify(shape)}`);
    }
    if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every(isCount)) {
      bad(name, `data_offsets must be [begin, end] integers >= 0, got ${JSON.stringify(offsets)}`);
    }
  }
  return [metadata, entries];
}

function checkOffsets(entries, dataLength) {
  for (const [name, { data_offsets: [begin, end], shape, dtype }] of entries) {
    if (begin > end || end > dataLength) {
      bad(name, `data_offsets [${begin}, ${end}] out of range for ${dataLength} data bytes`);
    }
    const needed = product(shape) * ITEMSIZE[dtype];
    if (end - begin !== needed) {
      bad(name, `data_offsets [${begin}, ${end}] span ${end - begin} bytes but shape `
        + `${formatShape(shape)} of ${dtype} needs ${needed} bytes`);
    }
  }
  const inOrder = [...entries].sort(([, a], [, b]) =>
    a.data_offsets[0] - b.data_offsets[0] || a.data_offsets[1] - b.data_offsets[1]);
  let previousName = '';
  let previousEnd = 0;
  inOrder.forEach(([name, { data_offsets: [begin, end] }], index) => {
    if (index === 0 && begin !== 0) {
      bad(name, `data_offsets start at ${begin}; the first tensor must start at 0`);
    }
    if (begin !== previousEnd) {
      const problem = begin < previousEnd ? 'overlap tensor' : 'leave a gap after tensor';
      const where = `${q(previousName)} ending at ${previousEnd}`;
      bad(name, `data_offsets [${begin}, ${end}] ${problem} ${where}`);
    }
    previousName = name;
    previousEnd = end;
  });
  if (previousEnd !== dataLength) {
    throw new WireFormatError(`${dataLength - previousEnd} trailing bytes after the last tensor `
      + `(data buffer is ${dataLength} bytes, tensors end at ${previousEnd})`);
  }
}

function checkBatch(name, batch, maxBatch, allowEmpty = false) {
  if (batch === 0 && !allowEmpty) bad(name, 'batch size is 0; send at least one sample');
  if (maxBatch !== undefined && maxBatch !== null && batch > maxBatch) {
    bad(name, `batch size ${batch} is over the limit of ${maxBatch}; send smaller batches`);
  }
}

function checkAgainstSpecs(byName, expected, maxBatch) {
  const names = expected.map((spec) => spec.name);
  const received = [...byName.keys()];
  if (JSON.stringify([...received].sort()) !== JSON.stringify([...names].sort())) {
    const missing = names.filter((name) => !byName.has(name));
    const unexpected = received.filter((name) => !names.includes(name));
    throw new WireFormatError(`tensor names do not match: expected ${quoteList(names)}, received `
      + `${quoteList(received)} (missing: ${quoteList(missing)}; `
      + `unexpected: ${quoteList(unexpected)})`);
  }
  let batchOwner = null;
  let batchSize = 0;
  for (const spec of expected) {
    const { dtype: code, shape } = byName.get(spec.name);
    const floating = FLOAT_NAMES.includes(spec.dtype);
    const allowed = floating ? ['F32', 'F16', 'BF16'] : [NAME_TO_CODE[spec.dtype] ?? '?'];
    if (!allowed.includes(code)) {
      bad(spec.name, `dtype ${code} is not allowed for spec dtype ${spec.dtype}; expected `
        + allowed.join(' or '));
    }
    if (shape.length !== spec.shape.length) {
      bad(spec.name, `shape ${formatShape(shape)} has rank ${shape.length}; expected rank `
        + `${spec.shape.length} for shape ${formatShape(spec.shape)}`);
    }
    spec.shape.forEach((specDim, axis) => {
      if (!isUnknown(specDim) && shape[axis] !== specDim) {
        bad(spec.name, `shape ${formatShape(shape)} does not match expected `
          + `${formatShape(spec.shape)} (dimension ${axis} is ${shape[axis]}, `
          + `expected ${specDim})`);
      }
    });
    if (spec.shape.length === 0 || !isUnknown(spec.shape[0])) continue;
    checkBatch(spec.name, shape[0], maxBatch);
    if (batchOwner === null) {
      batchOwner = spec.name;
      batchSize = shape[0];
    } else if (shape[0] !== batchSize) {
      throw new WireFormatError(`batch sizes differ between tensors: ${q(batchOwner)} has `
        + `${batchSize}, ${q(spec.name)} has ${shape[0]}`);
    }
  }
}

// A typed-array view of body bytes; a copy when the offset is not aligned for Type.
function typedArray(Type, bytes, start, count) {
  const offset = bytes.byteOffset + start;
  if (offset % Type.BYTES_PER_ELEMENT === 0) return new Type(bytes.buffer, offset, count);
  return new Type(bytes.buffer.slice(offset, offset + count * Type.BYTES_PER_ELEMENT));
}

function countNonFinite(values) {
  let count = 0;
  for (let i = 0; i < values.length; i += 1) if (values[i] - values[i] !== 0) count += 1;
  return count;
}

/**
 * Decode and check a safetensors body.
 *
 * With `expected`, the body must hold exactly those tensors with their rank and
 * non-batch dimensions (`null` marks the batch), one batch size
 * (`1 <= batch <= maxBatch`), F32 or F16 for a floating spec and the exact
 * dtype otherwise; tensors come back in the specs' order. Without it, any names
 * pass and `maxBatch` bounds every first dimension. F16 is widened to a
 * Float32Array; F32 data is a view into `buffer` when aligned (a copy when
 * not). NaN or Inf is refused unless `allowNonFinite`. Every problem throws a
 * `WireFormatError`.
 *
 * @param {ArrayBuffer|Uint8Array} buffer
 * @param {{expected?: Array<{name: string, shape: Array<number|null>, dtype: string}>,
 *   maxBatch?: number, allowNonFinite?: boolean, maxHeaderBytes?: number}} [options]
 * @returns {{tensors: Object<string, {dtype: string, shape: number[],
 *   data: Float32Array|Int32Array|Uint8Array}>, metadata: Object<string, string>}}
 */
export function decodeTensors(buffer, {
  expected, maxBatch, allowNonFinite = false, maxHeaderBytes = DEFAULT_MAX_HEADER_BYTES,
  codec = 'float32',
} = {}) {
  if (!LITTLE_ENDIAN) throw new WireFormatError('wire.js needs a little-endian platform');
  const chosen = toCodec(codec);
  let bytes;
  if (buffer instanceof ArrayBuffer) bytes = new Uint8Array(buffer);
  else if (ArrayBuffer.isView(buffer)) {
    bytes = new Uint8Array(buffer.buffer, buffer.byteOffset, buffer.byteLength);
  }
  else throw new WireFormatError(`body must be an ArrayBuffer or Uint8Array, got ${typeof buffer}`);
  const [header, dataStart] = parseHeader(bytes, maxHeaderBytes);
  const [metadata, entries] = checkEntries(header);
  checkOffsets(entries, bytes.length - dataStart);
  const sent = has(metadata, CODEC_KEY) ? metadata[CODEC_KEY] : null;
  if (sent !== (chosen.plain ? null : chosen.spec)) {
    const said = sent !== null ? `says codec '${sent}'` : 'has no codec in its metadata';
    throw new WireFormatError(`the body ${said}, but this direction's codec is '${chosen.spec}': `
      + 'encode it with the codec the session negotiated');
  }
  let byName = new Map(entries);
  let arrays = null; // lossy codecs: read and collapsed up front; plain: read after the checks
  let compressed = new Set();
  if (!chosen.plain) {
    const raw = new Map(entries.map(([name, entry]) => [name, readEntry(bytes, dataStart, name, entry)]));
    ({ tensors: arrays, compressed } = collapseTensors(raw, chosen));
    byName = new Map([...arrays].map(([name, { code, shape }]) => [name, { dtype: code, shape }]));
  }
  let order = [...byName.keys()];
  if (expected !== undefined && expected !== null) {
    checkAgainstSpecs(byName, expected, maxBatch);
    const plain = expected.filter((spec) => FLOAT_NAMES.includes(spec.dtype)
      && !compressed.has(spec.name));
    if (!chosen.plain && plain.length) {
      bad(plain[0].name, `a floating tensor must arrive in the parts of codec '${chosen.spec}', not `
        + `as ${byName.get(plain[0].name).dtype}`);
    }
    order = expected.map((spec) => spec.name);
  } else {
    for (const [name, { shape }] of byName) {
      if (shape.length) checkBatch(name, shape[0], maxBatch, true);
    }
  }
  const tensors = {};
  for (const name of order) {
    const { dtype, shape, data } = arrays ? arrays.get(name)
      : readEntry(bytes, dataStart, name, byName.get(name));
    if (!allowNonFinite && (dtype === 'float32' || dtype === 'float64')) {
      const nonFinite = countNonFinite(data);
      if (nonFinite) {
        bad(name, `contains ${nonFinite} non-finite values (NaN or Inf); pass allowNonFinite: true `
          + 'to accept them');
      }
    }
    setOwn(tensors, name, { dtype, shape: [...shape], data });
  }
  const metadataCopy = {};
  for (const [key, value] of Object.entries(metadata)) {
    if (chosen.plain || key !== CODEC_KEY) setOwn(metadataCopy, key, value);
  }
  return { tensors, metadata: metadataCopy };
}

// An entry's data as sent ({dtype, code, shape, data}); F16 and BF16 widened to float32.
function readEntry(bytes, dataStart, name, { dtype: code, shape, data_offsets: [begin, end] }) {
  if (!has(DECODED, code)) bad(name, `dtype ${code} cannot be decoded in JavaScript; send int32`);
  const [dtype, Type] = DECODED[code];
  const count = (end - begin) / ITEMSIZE[code];
  let data;
  if (code === 'F16' || code === 'BF16') {
    const halves = typedArray(Uint16Array, bytes, dataStart + begin, count);
    data = code === 'F16' ? float16BitsToFloat32(halves) : bfloat16BitsToFloat32(halves);
  } else data = typedArray(Type, bytes, dataStart + begin, count);
  return { dtype, code, shape, data };
}
