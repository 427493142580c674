// Write bodies and float16 conversions made by wire.js, for tests/test_wire.py
// to check on the Python side (splitkeras.wire, the safetensors package, NumPy).
//
// Usage: node mobile_export/test/encode_fixture.mjs OUT_DIR
//
//   js_float32.safetensors        x [2,3,4] float32 + metadata (same tensors as py_float32)
//   js_float16_multi.safetensors  activation [3,5] as F16 + labels [3] int32 + metadata
//   js_unaligned.safetensors      act [1,3] as F16, then ids [1] int32 at data offset 6
//   js_f16_to_f32.bin             float16BitsToFloat32 of all 65536 float16 patterns (u32 LE)
//   js_f32_to_f16.bin             float32ToFloat16Bits of the float32 patterns i * 4099 (u16 LE)

import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { encodeTensors, float16BitsToFloat32, float32ToFloat16Bits } from '../src/wire.js';

export const SWEEP_STEP = 4099;

/** float32(i * scale + shift), as make_wire_fixtures.py's ramp computes it. */
export function ramp(count, scale, shift) {
  return Float32Array.from({ length: count }, (_, i) => Math.fround(i * scale + shift));
}

export function fixtureTensors() {
  const activation = ramp(15, 1.1, -7.3);
  activation[0] = 1e-6;
  activation[14] = 60000;
  return {
    float32: [{ name: 'x', dtype: 'float32', shape: [2, 3, 4], data: ramp(24, 0.37, -4.1) }],
    float16Multi: [
      { name: 'activation', dtype: 'float32', shape: [3, 5], data: activation },
      { name: 'labels', dtype: 'int32', shape: [3], data: new Int32Array([2, 0, 1]) },
    ],
  };
}

function main(outDir) {
  mkdirSync(outDir, { recursive: true });
  const tensors = fixtureTensors();
  const write = (name, bytes) => writeFileSync(path.join(outDir, name), bytes);
  write('js_float32.safetensors',
    encodeTensors(tensors.float32, { metadata: { step: '7', session: 'abc-123' } }));
  write('js_float16_multi.safetensors', encodeTensors(tensors.float16Multi, {
    wireDtype: 'float16', metadata: { step: '8', note: 'h\u00e9llo \u2713' },
  }));
  write('js_unaligned.safetensors', encodeTensors([
    { name: 'act', dtype: 'float32', shape: [1, 3], data: [0.5, -1.25, 3] },
    { name: 'ids', dtype: 'int32', shape: [1], data: [-42] },
  ], { wireDtype: 'float16' }));
  const halves = Uint16Array.from({ length: 65536 }, (_, i) => i);
  write('js_f16_to_f32.bin', new Uint8Array(float16BitsToFloat32(halves).buffer));
  const sweep = Uint32Array.from({ length: Math.floor(2 ** 32 / SWEEP_STEP) + 1 },
    (_, i) => i * SWEEP_STEP);
  const converted = float32ToFloat16Bits(new Float32Array(sweep.buffer));
  write('js_f32_to_f16.bin', new Uint8Array(converted.buffer));
}

// Run as a script with OUT_DIR. Without one (as `node --test test/` runs every
// file under test/) it does nothing.
const invoked = process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url);
if (invoked && process.argv.length > 2) main(process.argv[2]);
