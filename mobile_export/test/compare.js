// Comparisons the kernel tests share: fixture tensors (float32 little-endian, base64) and the
// relative difference max |a - b| / max |b| (NaN where both have it; in one only: Infinity).

import assert from 'node:assert/strict';

/** The tensor of a fixture entry {shape, data}. */
export const decoder = (tf) => ({ shape, data }) => {
  const bytes = Buffer.from(data, 'base64');
  return tf.tensor(new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4), shape);
};

/** max |a - b| / max |b|, after checking the shapes. */
export function relative(actual, expected, what) {
  assert.deepEqual(actual.shape, expected.shape, `${what}: shape`);
  const a = actual.dataSync();
  const e = expected.dataSync();
  let diff = 0;
  let scale = 0;
  for (let i = 0; i < e.length; i += 1) {
    if (Number.isNaN(a[i]) || Number.isNaN(e[i])) {
      if (Number.isNaN(a[i]) !== Number.isNaN(e[i])) return Infinity; // NaN in one only
      continue;
    }
    diff = Math.max(diff, Math.abs(a[i] - e[i]));
    scale = Math.max(scale, Math.abs(e[i]));
  }
  return diff / (scale || 1);
}

/** Assert relative(actual, expected) <= tolerance. */
export const close = (actual, expected, what, tolerance = 1e-5) => {
  const rel = relative(actual, expected, what);
  assert.ok(rel <= tolerance, `${what}: relative difference ${rel.toExponential(2)} > ${tolerance}`);
};
