// Write bodies encoded and decoded by codecs.js, for tests/test_codecs.py to compare
// byte for byte with splitkeras.wire (the same tensors, the same codecs, two steps of
// top-k error feedback).
//
// Usage: node mobile_export/test/encode_codecs.mjs OUT_DIR
//
//   <codec>.<step>.safetensors  the body of step 1 or 2 (act [6, 10] + labels [6] int32 + metadata)
//   <codec>.<step>.decoded.bin  the act it decodes to (float32 LE)
//   <codec>.residual.bin        the top-k residual after step 2 (float32 LE)
//   <codec>.ties.safetensors    a tensor of ties, -0, a constant channel (no residual kept)

import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { decodeTensors, encodeTensors } from '../src/wire.js';

export const CODECS = ['float32', 'float16', 'bfloat16', 'int8', 'topk:0.1', 'topk:0.1+int8', 'topk:1'];

/** float32(((i + seed) * 2654435761 mod 2**32) / 2**32 - 0.5) * scale), as test_codecs.py. */
export function hashed(count, seed, scale) {
  return Float32Array.from({ length: count },
    (_, i) => Math.fround(((Math.imul(i + seed, 2654435761) >>> 0) / 4294967296 - 0.5) * scale));
}

export function tiesTensor() {
  const data = Float32Array.from({ length: 20 }, (_, i) => (i % 3) - 1);
  data[4] = -0;
  for (let row = 0; row < 4; row += 1) data[row * 5 + 2] = 0.75; // a constant channel
  return { name: 'tie', dtype: 'float32', shape: [4, 5], data };
}

function stepTensors(seed) {
  return [
    { name: 'act', dtype: 'float32', shape: [6, 10], data: hashed(60, seed, 8) },
    { name: 'labels', dtype: 'int32', shape: [6], data: Int32Array.from([0, 1, 2, 3, 4, 5]) },
  ];
}

const raw = (array) => new Uint8Array(array.buffer, array.byteOffset, array.byteLength);

function main(outDir) {
  mkdirSync(outDir, { recursive: true });
  const write = (name, bytes) => writeFileSync(path.join(outDir, name), bytes);
  for (const codec of CODECS) {
    const residuals = new Map();
    for (const step of [1, 2]) {
      const body = encodeTensors(stepTensors(step), { codec, residuals, metadata: { step: String(step) } });
      write(`${codec}.${step}.safetensors`, body);
      const { tensors } = decodeTensors(body, { codec });
      write(`${codec}.${step}.decoded.bin`, raw(tensors.act.data));
    }
    if (residuals.has('act')) write(`${codec}.residual.bin`, raw(residuals.get('act').data));
    write(`${codec}.ties.safetensors`, encodeTensors([tiesTensor()], { codec }));
  }
}

const invoked = process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url);
if (invoked && process.argv.length > 2) main(process.argv[2]);
