// Encode + decode throughput of every codec in JavaScript (mobile_export/src/wire.js) on the
// 8 MiB tensor of _codec_speed.py, and a full sort of its magnitudes; prints one JSON line.
//
// Usage: node benchmarks/codec_speed.mjs [ROUNDS]

import { decodeTensors, encodeTensors } from '../mobile_export/src/wire.js';

const SHAPE = [32, 256, 256];
const CODECS = ['float32', 'float16', 'bfloat16', 'int8', 'topk:0.05', 'topk:0.05+int8'];
const rounds = Number(process.argv[2] ?? 5);
const count = SHAPE.reduce((a, b) => a * b, 1);
const data = Float32Array.from({ length: count },
  (_, i) => Math.max(Math.fround(((Math.imul(i, 2654435761) >>> 0) / 4294967296 - 0.5) * 8), 0));
const expected = [{ name: 'act', shape: [null, ...SHAPE.slice(1)], dtype: 'float32' }];
const median = (values) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)];
const times = Object.fromEntries(CODECS.map((c) => [c, { encode: [], decode: [] }]));
const sizes = {};
const sorts = [];
for (let round = 0; round < rounds; round += 1) {
  for (const codec of CODECS) {
    const started = performance.now();
    const body = encodeTensors([{ name: 'act', dtype: 'float32', shape: SHAPE, data }],
      { codec, residuals: new Map() });
    const middle = performance.now();
    decodeTensors(body, { expected, maxBatch: 64, codec });
    times[codec].encode.push((middle - started) / 1e3);
    times[codec].decode.push((performance.now() - middle) / 1e3);
    sizes[codec] = body.length;
  }
  const magnitudes = data.map(Math.abs);
  const started = performance.now();
  magnitudes.sort();
  sorts.push((performance.now() - started) / 1e3);
}
const codecs = {};
for (const codec of CODECS) {
  const encode = median(times[codec].encode);
  const decode = median(times[codec].decode);
  codecs[codec] = { encode_s: encode, decode_s: decode, body_bytes: sizes[codec],
    throughput_bytes_per_s: (count * 4) / (encode + decode) };
}
console.log(JSON.stringify({ codecs, full_sort_s: median(sorts), node: process.version }));
