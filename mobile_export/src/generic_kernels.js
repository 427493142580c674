// Fast paths of generic kernels that a training step spends most of its time in on the pure-JS
// `cpu` backend (and, for Tile, on `wasm`): BatchNormalization's moments and gradient reduce
// over the batch and spatial axes ([N, H, W, C] -> [C]), broadcast per-channel vectors back
// ([1, 1, 1, C] x [N, H, W, C]), compare with scalars (ReLU6's gradient) and tile. The stock
// cpu kernels transpose before such a reduction and compute a multi-index per element for
// such a broadcast (a MobileNetV2-style head at 32x32, batch 32: seconds per step); these
// loop over contiguous memory. Each handles the common layouts only and hands every other
// case (and dtype) to the stock kernel, so the results are the stock kernels' (float sums
// in float64, as stock does): test/kernels.test.js compares them on random shapes.
// Also: UnsortedSegmentSum (missing on wasm) and BatchMatMul with its operands transposed first
// (wasm: XNNPACK's transposed paths are ~40x slower).

import { transpose } from './gemm.js';
import { output, read, stockOr } from './kernel_setup.js';

const ARITHMETIC = {
  Add: (a, b) => a + b,
  Sub: (a, b) => a - b,
  Multiply: (a, b) => a * b,
  RealDiv: (a, b) => a / b,
  Maximum: Math.max,
  Minimum: Math.min,
  SquaredDifference: (a, b) => (a - b) * (a - b),
};
const COMPARISON = {
  Greater: (a, b) => (a > b ? 1 : 0),
  GreaterEqual: (a, b) => (a >= b ? 1 : 0),
  Less: (a, b) => (a < b ? 1 : 0),
  LessEqual: (a, b) => (a <= b ? 1 : 0),
  Equal: (a, b) => (a === b ? 1 : 0),
  LogicalAnd: (a, b) => (a && b ? 1 : 0),
};
export const BINARY_KERNELS = [...Object.keys(ARITHMETIC), ...Object.keys(COMPARISON)];
export const UNARY_KERNELS = ['Relu', 'Relu6', 'ClipByValue', 'Step'];
export const REDUCE_KERNELS = ['Sum', 'Mean'];

const size = (shape) => shape.reduce((a, b) => a * b, 1);
const sameShape = (a, b) => a.length === b.length && a.every((d, i) => d === b[i]);

// The period of `small` inside `big` when `small` broadcasts along big's leading axes only
// ([C], [1, 1, 1, C], [W, C] against [N, H, W, C]; a size-1 tensor is period 1), else 0.
function suffixPeriod(big, small) {
  const n = size(small);
  if (n === 1) return 1;
  const trimmed = [...small];
  while (trimmed.length && trimmed[0] === 1) trimmed.shift();
  if (trimmed.length > big.length) return 0;
  const tail = big.slice(big.length - trimmed.length);
  return sameShape(tail, trimmed) ? n : 0;
}

// The hot arithmetic ops get loops of their own (a call through a function argument in the
// innermost loop would not be inlined once several ops share it); `R`: the small operand on the
// left. `a` has the output's shape, `b` repeats with period `p` (its innermost elements).
function loopAdd(a, b, p, out) {
  const n = a.length;
  if (p === n) for (let i = 0; i < n; i += 1) out[i] = a[i] + b[i];
  else if (p === 1) {
    const s = b[0];
    for (let i = 0; i < n; i += 1) out[i] = a[i] + s;
  } else {
    for (let base = 0; base < n; base += p) {
      for (let j = 0; j < p; j += 1) out[base + j] = a[base + j] + b[j];
    }
  }
}

function loopSub(a, b, p, out) {
  const n = a.length;
  if (p === n) for (let i = 0; i < n; i += 1) out[i] = a[i] - b[i];
  else if (p === 1) {
    const s = b[0];
    for (let i = 0; i < n; i += 1) out[i] = a[i] - s;
  } else {
    for (let base = 0; base < n; base += p) {
      for (let j = 0; j < p; j += 1) out[base + j] = a[base + j] - b[j];
    }
  }
}

function loopSubR(a, b, p, out) {
  const n = a.length;
  if (p === n) for (let i = 0; i < n; i += 1) out[i] = b[i] - a[i];
  else if (p === 1) {
    const s = b[0];
    for (let i = 0; i < n; i += 1) out[i] = s - a[i];
  } else {
    for (let base = 0; base < n; base += p) {
      for (let j = 0; j < p; j += 1) out[base + j] = b[j] - a[base + j];
    }
  }
}

function loopMultiply(a, b, p, out) {
  const n = a.length;
  if (p === n) for (let i = 0; i < n; i += 1) out[i] = a[i] * b[i];
  else if (p === 1) {
    const s = b[0];
    for (let i = 0; i < n; i += 1) out[i] = a[i] * s;
  } else {
    for (let base = 0; base < n; base += p) {
      for (let j = 0; j < p; j += 1) out[base + j] = a[base + j] * b[j];
    }
  }
}

function loopRealDiv(a, b, p, out) {
  const n = a.length;
  if (p === n) for (let i = 0; i < n; i += 1) out[i] = a[i] / b[i];
  else if (p === 1) {
    const s = b[0];
    for (let i = 0; i < n; i += 1) out[i] = a[i] / s;
  } else {
    for (let base = 0; base < n; base += p) {
      for (let j = 0; j < p; j += 1) out[base + j] = a[base + j] / b[j];
    }
  }
}

function loopRealDivR(a, b, p, out) {
  const n = a.length;
  if (p === n) for (let i = 0; i < n; i += 1) out[i] = b[i] / a[i];
  else if (p === 1) {
    const s = b[0];
    for (let i = 0; i < n; i += 1) out[i] = s / a[i];
  } else {
    for (let base = 0; base < n; base += p) {
      for (let j = 0; j < p; j += 1) out[base + j] = b[j] / a[base + j];
    }
  }
}
const HOT = { Add: [loopAdd, loopAdd], Sub: [loopSub, loopSubR], Multiply: [loopMultiply, loopMultiply],
  RealDiv: [loopRealDiv, loopRealDivR] };

/** The other ops: `fn` per element (comparisons, max/min, squared difference). */
function broadcastLoop(fn, big, small, period, swapped, out) {
  const n = big.length;
  for (let base = 0; base < n; base += period) {
    if (swapped) for (let j = 0; j < period; j += 1) out[base + j] = fn(small[j], big[base + j]);
    else for (let j = 0; j < period; j += 1) out[base + j] = fn(big[base + j], small[j]);
  }
  return out;
}

/** A kernelFunc for a binary op; null from `plan` means "the stock kernel". */
export function binaryKernel(kernelName, stock) {
  const comparison = kernelName in COMPARISON;
  const fn = ARITHMETIC[kernelName] ?? COMPARISON[kernelName];
  return ({ inputs, backend, attrs }) => {
    const { a, b } = inputs;
    const dtypes = kernelName === 'LogicalAnd' ? ['bool'] : (kernelName === 'RealDiv' ? ['float32']
      : ['float32', 'int32']);
    let plan = null;
    if (a.dtype === b.dtype && dtypes.includes(a.dtype)) {
      const pa = suffixPeriod(b.shape, a.shape);
      const pb = suffixPeriod(a.shape, b.shape);
      if (pb && a.shape.length >= b.shape.length) plan = { big: a, small: b, period: pb, swapped: false };
      else if (pa && b.shape.length >= a.shape.length) plan = { big: b, small: a, period: pa, swapped: true };
      if (plan && size(plan.big.shape) === 0) plan = null;
    }
    if (!plan) return stock.kernelFunc({ inputs, backend, attrs });
    const dtype = comparison ? 'bool' : a.dtype;
    const n = size(plan.big.shape);
    const out = dtype === 'bool' ? new Uint8Array(n) : (dtype === 'int32' ? new Int32Array(n) : new Float32Array(n));
    const big = backend.readSync(plan.big.dataId);
    const small = backend.readSync(plan.small.dataId);
    if (HOT[kernelName]) HOT[kernelName][plan.swapped ? 1 : 0](big, small, plan.period, out);
    else broadcastLoop(fn, big, small, plan.period, plan.swapped, out);
    const shape = [...plan.big.shape];
    return { dataId: backend.write(out, shape, dtype), shape, dtype };
  };
}

/** Sum or Mean over the leading axes (column sums) or the trailing axes (row sums). */
export function reduceKernel(kernelName, stock, tf) {
  return ({ inputs, backend, attrs }) => {
    const { x } = inputs;
    const { axis, keepDims } = attrs;
    const rank = x.shape.length;
    const axes = [...new Set(tf.util.parseAxisParam(axis, x.shape))].sort((p, q) => p - q);
    const leading = axes.length > 0 && axes.every((d, i) => d === i);
    const trailing = axes.length > 0 && axes.every((d, i) => d === rank - axes.length + i);
    if (x.dtype !== 'float32' || !(leading || trailing) || axes.length === rank || size(x.shape) === 0) {
      return stock.kernelFunc({ inputs, backend, attrs });
    }
    const values = backend.readSync(x.dataId);
    const split = leading ? axes.length : rank - axes.length;
    const outer = size(x.shape.slice(0, split));
    const inner = size(x.shape.slice(split));
    let out;
    if (leading) { // out[j] = sum_i x[i, j]
      const acc = new Float64Array(inner);
      for (let i = 0; i < outer; i += 1) {
        const base = i * inner;
        for (let j = 0; j < inner; j += 1) acc[j] += values[base + j];
      }
      if (kernelName === 'Mean') for (let j = 0; j < inner; j += 1) acc[j] /= outer;
      out = Float32Array.from(acc);
    } else { // out[i] = sum_j x[i, j]
      out = new Float32Array(outer);
      for (let i = 0; i < outer; i += 1) {
        let sum = 0;
        const base = i * inner;
        for (let j = 0; j < inner; j += 1) sum += values[base + j];
        out[i] = kernelName === 'Mean' ? sum / inner : sum;
      }
    }
    const shape = keepDims ? x.shape.map((d, i) => (axes.includes(i) ? 1 : d))
      : x.shape.filter((_, i) => !axes.includes(i));
    return { dataId: backend.write(out, shape, 'float32'), shape, dtype: 'float32' };
  };
}

/** Tile by block copies, the last axis first (any rank, numeric and bool dtypes). */
export function tileValues(values, shape, reps) {
  let data = values;
  let current = [...shape];
  for (let axis = shape.length - 1; axis >= 0; axis -= 1) {
    const r = reps[axis];
    if (r === 1) continue;
    const block = size(current.slice(axis));
    const outer = size(current.slice(0, axis));
    const next = new data.constructor(data.length * r);
    for (let o = 0; o < outer; o += 1) {
      const from = data.subarray(o * block, (o + 1) * block);
      for (let k = 0; k < r; k += 1) next.set(from, (o * r + k) * block);
    }
    data = next;
    current[axis] *= r;
  }
  return data === values ? values.slice() : data;
}

export function tileKernel(stock) {
  return ({ inputs, backend, attrs }) => {
    const { x } = inputs;
    const { reps } = attrs;
    if (!['float32', 'int32', 'bool'].includes(x.dtype) || reps.length !== x.shape.length) {
      return stock.kernelFunc({ inputs, backend, attrs });
    }
    const shape = x.shape.map((d, i) => d * reps[i]);
    const out = tileValues(backend.readSync(x.dataId), x.shape, reps);
    return { dataId: backend.write(out, shape, x.dtype), shape, dtype: x.dtype };
  };
}

// Unary activations and their gradients' masks, one loop each (the stock cpu kernels call the
// op through a shared function per element). float32 only; NaN stays NaN as in stock.
function unaryLoop(kernelName, x, out, attrs) {
  const n = x.length;
  switch (kernelName) {
    case 'Relu':
      for (let i = 0; i < n; i += 1) out[i] = x[i] < 0 ? 0 : x[i];
      break;
    case 'Relu6':
      for (let i = 0; i < n; i += 1) out[i] = x[i] < 0 ? 0 : (x[i] > 6 ? 6 : x[i]);
      break;
    case 'ClipByValue': {
      const lo = attrs.clipValueMin;
      const hi = attrs.clipValueMax;
      for (let i = 0; i < n; i += 1) out[i] = x[i] > hi ? hi : (x[i] < lo ? lo : x[i]);
      break;
    }
    case 'Step': {
      const alpha = attrs.alpha ?? 0;
      for (let i = 0; i < n; i += 1) out[i] = x[i] > 0 ? 1 : (Number.isNaN(x[i]) ? NaN : alpha);
      break;
    }
    default:
      throw new Error(`no loop for ${kernelName}`);
  }
  return out;
}

export function unaryKernel(kernelName, stock) {
  return ({ inputs, backend, attrs }) => {
    const { x } = inputs;
    if (x.dtype !== 'float32') return stock.kernelFunc({ inputs, backend, attrs });
    const values = backend.readSync(x.dataId);
    const out = unaryLoop(kernelName, values, new Float32Array(values.length), attrs ?? {});
    return { dataId: backend.write(out, [...x.shape], 'float32'), shape: [...x.shape], dtype: 'float32' };
  };
}

/** out[s, ...] = sum of x[i, ...] over i with segmentIds[i] = s (ids outside [0, n) dropped). */
export function unsortedSegmentSum(x, ids, numSegments, inner, Out = Float32Array) {
  const out = new Out(numSegments * inner);
  for (let i = 0; i < ids.length; i += 1) {
    const s = ids[i];
    if (s < 0 || s >= numSegments) continue;
    const src = i * inner;
    const dst = s * inner;
    for (let j = 0; j < inner; j += 1) out[dst + j] += x[src + j];
  }
  return out;
}

/** UnsortedSegmentSum (Gather's and Embedding's gradient; missing on wasm) over axis 0. */
export function segmentSumKernel(backendName, stock) {
  return (call) => {
    const { inputs: { x, segmentIds }, backend, attrs: { numSegments } } = call;
    if (segmentIds.shape.length !== 1 || segmentIds.shape[0] !== x.shape[0]) {
      // the op flattens nothing else: TF.js's unsortedSegmentSum takes 1-D ids over axis 0
      return stockOr(stock, 'UnsortedSegmentSum', backendName, `segmentIds of shape [${segmentIds.shape}]`, call);
    }
    const inner = size(x.shape.slice(1));
    const shape = [numSegments, ...x.shape.slice(1)];
    const dtype = x.dtype === 'int32' ? 'int32' : 'float32';
    const values = unsortedSegmentSum(read(backend, x), read(backend, segmentIds), numSegments, inner,
      dtype === 'int32' ? Int32Array : Float32Array);
    return { dataId: backend.write(values, shape, dtype), shape, dtype };
  };
}

// wasm: XNNPACK's product runs ~40x slower with transposeA or transposeB (a Dense layer's
// gradients ask for them): transpose the operand here, then the stock kernel untransposed.
export function untransposedMatMulKernel(stock) {
  return (call) => {
    const { inputs: { a, b }, backend, attrs } = call;
    const { transposeA, transposeB } = attrs;
    if ((!transposeA && !transposeB) || a.dtype !== 'float32' || b.dtype !== 'float32') return stock.kernelFunc(call);
    const made = [];
    const untransposed = (t) => {
      const rank = t.shape.length;
      const [r, c] = t.shape.slice(rank - 2);
      const values = read(backend, t);
      const out = new Float32Array(values.length);
      for (let i = 0; i < values.length; i += r * c) out.set(transpose(values.subarray(i, i + r * c), r, c), i);
      const info = output(backend, [...t.shape.slice(0, rank - 2), c, r], out);
      made.push(info);
      return info;
    };
    try {
      return stock.kernelFunc({ inputs: { a: transposeA ? untransposed(a) : a, b: transposeB ? untransposed(b) : b },
        backend, attrs: { ...attrs, transposeA: false, transposeB: false } });
    } finally {
      made.forEach((info) => backend.disposeData(info.dataId));
    }
  };
}
