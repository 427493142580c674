/**
 * Exact float32 <-> float16 conversion (NumPy's rounding: nearest even, subnormals, Inf, NaN),
 * for the float16 wire option. Plain typed arrays only: runs in React Native, browsers and Node.
 */


/** float32 bits -> float16 bits, round to nearest even (NumPy's npy_floatbits_to_halfbits). */
function halfBitsFromFloatBits(f) {
  const sign = (f >>> 16) & 0x8000;
  const exponent = f & 0x7f800000;
  if (exponent >= 0x47800000) {
    // Overflow to Inf, Inf, or NaN (keeping the top of its payload, never becoming Inf).
    const significand = f & 0x007fffff;
    if (exponent !== 0x7f800000 || significand === 0) return sign + 0x7c00;
    return sign + 0x7c00 + ((significand >>> 13) || 1);
  }
  if (exponent <= 0x38000000) {
    // A float16 subnormal, or zero. The lost bits decide the rounding ("sticky").
    if (exponent < 0x33000000) return sign;
    let significand = (0x00800000 + (f & 0x007fffff)) >>> (113 - (exponent >>> 23));
    if ((significand & 0x3fff) !== 0x1000 || (f & 0x7ff) !== 0) significand += 0x1000;
    return sign + (significand >>> 13);
  }
  let significand = f & 0x007fffff;
  if ((significand & 0x3fff) !== 0x1000) significand += 0x1000;
  // A carry out of the significand bumps the exponent, up to Inf: both are right.
  return sign + ((exponent - 0x38000000) >>> 13) + (significand >>> 13);
}

/** float16 bits -> float32 bits (exact; NaN payloads kept). */
function floatBitsFromHalfBits(h) {
  const sign = (h & 0x8000) << 16;
  const exponent = h & 0x7c00;
  let significand = h & 0x03ff;
  if (exponent === 0x7c00) return sign | 0x7f800000 | (significand << 13);
  if (exponent !== 0) return sign | (((h & 0x7fff) << 13) + 0x38000000);
  if (significand === 0) return sign;
  let shift = 0;
  while ((significand & 0x0400) === 0) {
    significand <<= 1;
    shift += 1;
  }
  return sign | ((113 - shift) << 23) | ((significand & 0x03ff) << 13);
}

/**
 * Convert float32 values to float16 bit patterns, exactly as NumPy's
 * `astype(np.float16)` does (round to nearest even, subnormals, Inf, NaN).
 * @param {Float32Array} values
 * @returns {Uint16Array}
 */
export function float32ToFloat16Bits(values) {
  const bits = new Uint32Array(values.buffer, values.byteOffset, values.length);
  const out = new Uint16Array(values.length);
  for (let i = 0; i < bits.length; i += 1) out[i] = halfBitsFromFloatBits(bits[i]);
  return out;
}

/**
 * Convert float16 bit patterns to float32 values (exact).
 * @param {Uint16Array} halves
 * @returns {Float32Array}
 */
export function float16BitsToFloat32(halves) {
  const out = new Float32Array(halves.length);
  const bits = new Uint32Array(out.buffer);
  for (let i = 0; i < halves.length; i += 1) bits[i] = floatBitsFromHalfBits(halves[i]);
  return out;
}
