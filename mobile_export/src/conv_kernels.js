// 2-D convolutions (NHWC, float32) as im2col + a matrix product: the forward pass (with
// FusedConv2D's bias and activation), the filter gradient im2col(x)^T @ dy and the input
// gradient col2im(dy @ W^T). On cpu the product is gemm.js (blocks of im2col rows at a time);
// on wasm it is the backend's own BatchMatMul (XNNPACK), with the operands transposed here
// first (its transposeA / transposeB paths are ~40x slower). A 1x1 convolution with stride 1
// needs no im2col: x is the matrix. The filter gradient's sums: float64 inside gemm's blocks.

import { gemm, transpose } from './gemm.js';
import { convInfo, isPointwise, output, read, stockOr, view, windowTaps } from './kernel_setup.js';

// Rows of im2col per block of the cpu convolutions: about 4 MiB of patches at a time; for the
// filter gradient fewer (its product runs down the rows: a block of dy, rows x co, stays in
// the cache; 2.5x faster than 4 MiB blocks on a 1x1 conv x[32, 32, 32, 16] -> 64).
const BLOCK_FLOATS = 1 << 20;
const blockRows = (K) => Math.max(4, Math.floor(BLOCK_FLOATS / Math.max(K, 1)));
const filterGradRows = (K, CO) => Math.min(4096, Math.max(16, Math.floor((1 << 14) / Math.max(K, CO))));
const sizes = (info) => ({ rows: info.batchSize * info.outHeight * info.outWidth,
  K: info.filterHeight * info.filterWidth * info.inChannels, CO: info.outChannels });

/**
 * im2col of the output positions [r0, r1) (rows r = (b * OH + oh) * OW + ow):
 * [r1 - r0, fh * fw * ci] patches into `cols` (zeros where the window is in the padding).
 */
export function im2col(x, info, r0 = 0, r1 = info.batchSize * info.outHeight * info.outWidth,
  cols = new Float32Array((r1 - r0) * info.filterHeight * info.filterWidth * info.inChannels),
  taps = windowTaps(info)) {
  const { inHeight: H, inWidth: W, inChannels: CI, outHeight: OH, outWidth: OW } = info;
  const { start, pixel, tap } = taps;
  const K = info.filterHeight * info.filterWidth * CI;
  const P = OH * OW;
  cols.fill(0, 0, (r1 - r0) * K);
  for (let r = r0; r < r1; r += 1) {
    const p = r % P;
    const image = (r - p) / P * H * W;
    const row = (r - r0) * K;
    for (let t = start[p]; t < start[p + 1]; t += 1) {
      const src = (image + pixel[t]) * CI;
      const dst = row + tap[t] * CI;
      for (let ci = 0; ci < CI; ci += 1) cols[dst + ci] = x[src + ci];
    }
  }
  return cols;
}

/** col2im: the scatter-add of the columns of positions [r0, r1) into dx [b, h, w, ci]. */
export function col2im(cols, info, r0 = 0, r1 = info.batchSize * info.outHeight * info.outWidth,
  dx = new Float32Array(info.batchSize * info.inHeight * info.inWidth * info.inChannels),
  taps = windowTaps(info)) {
  const { inHeight: H, inWidth: W, inChannels: CI, outHeight: OH, outWidth: OW } = info;
  const { start, pixel, tap } = taps;
  const K = info.filterHeight * info.filterWidth * CI;
  const P = OH * OW;
  for (let r = r0; r < r1; r += 1) {
    const p = r % P;
    const image = (r - p) / P * H * W;
    const row = (r - r0) * K;
    for (let t = start[p]; t < start[p + 1]; t += 1) {
      const dst = (image + pixel[t]) * CI;
      const src = row + tap[t] * CI;
      for (let ci = 0; ci < CI; ci += 1) dx[dst + ci] += cols[src + ci];
    }
  }
  return dx;
}

/** Call `each(r0, n)` per block of `step` im2col rows, with the block's patches in `cols` (x given). */
function byBlocks(x, info, each, step = blockRows(sizes(info).K)) {
  const { rows, K } = sizes(info);
  const cols = new Float32Array(step * K);
  const taps = windowTaps(info);
  for (let r0 = 0; r0 < rows; r0 += step) {
    const n = Math.min(step, rows - r0);
    if (x) im2col(x, info, r0, r0 + n, cols, taps);
    each(r0, n, cols, taps);
  }
}

/**
 * dW of a 2-D convolution (NHWC): Float32Array [fh, fw, ci, co], im2col(x)^T @ dy, summed in
 * float64 over blocks of rows (x's own rows for a 1x1 conv).
 */
export function conv2dFilterGrad(x, dy, info, dW = new Float32Array(sizes(info).K * sizes(info).CO)) {
  const { rows, K, CO } = sizes(info);
  const acc = new Float64Array(K * CO);
  const step = filterGradRows(K, CO);
  if (isPointwise(info)) {
    for (let r0 = 0; r0 < rows; r0 += step) {
      const n = Math.min(step, rows - r0);
      gemm(transpose(x.subarray(r0 * K, (r0 + n) * K), n, K), dy.subarray(r0 * CO, (r0 + n) * CO), acc, K, n, CO, true);
    }
  } else {
    byBlocks(x, info, (r0, n, cols) => {
      gemm(transpose(cols.subarray(0, n * K), n, K), dy.subarray(r0 * CO, (r0 + n) * CO), acc, K, n, CO, true);
    }, step);
  }
  dW.set(acc);
  return dW;
}

/** dx of a 2-D convolution (NHWC) from dy and the filter [fh, fw, ci, co]: col2im(dy @ W^T). */
export function conv2dInputGrad(dy, filter, info) {
  const { rows, K, CO } = sizes(info);
  const filterT = transpose(filter, K, CO);
  if (isPointwise(info)) return gemm(dy, filterT, new Float32Array(rows * K), rows, CO, K);
  const dx = new Float32Array(info.batchSize * info.inHeight * info.inWidth * info.inChannels);
  byBlocks(null, info, (r0, n, cols, taps) => {
    gemm(dy.subarray(r0 * CO, (r0 + n) * CO), filterT, cols, n, CO, K);
    col2im(cols, info, r0, r0 + n, dx, taps);
  });
  return dx;
}

// The fused activations of TF.js's FusedConv2D (prelu is left to the stock kernel).
const ACTIVATIONS = ['linear', 'relu', 'relu6', 'leakyrelu', 'elu', 'sigmoid'];
function activate(y, activation, alpha) {
  const n = y.length;
  switch (activation) {
    case 'relu': for (let i = 0; i < n; i += 1) if (y[i] < 0) y[i] = 0; break;
    case 'relu6': for (let i = 0; i < n; i += 1) y[i] = y[i] < 0 ? 0 : (y[i] > 6 ? 6 : y[i]); break;
    case 'leakyrelu': for (let i = 0; i < n; i += 1) if (y[i] < 0) y[i] *= alpha; break;
    case 'elu': for (let i = 0; i < n; i += 1) if (y[i] < 0) y[i] = Math.exp(y[i]) - 1; break;
    case 'sigmoid': for (let i = 0; i < n; i += 1) y[i] = 1 / (1 + Math.exp(-y[i])); break;
    default: break;
  }
  return y;
}

/** The forward 2-D convolution (NHWC) with an optional bias [co] and activation: im2col @ W. */
export function conv2dForward(x, filter, info, bias = null, activation = 'linear', alpha = 0.2) {
  const { rows, K, CO } = sizes(info);
  const y = new Float32Array(rows * CO);
  if (isPointwise(info)) gemm(x, filter, y, rows, K, CO);
  else byBlocks(x, info, (r0, n, cols) => gemm(cols, filter, y.subarray(r0 * CO, (r0 + n) * CO), n, K, CO));
  if (bias) {
    for (let base = 0; base < y.length; base += CO) {
      for (let co = 0; co < CO; co += 1) y[base + co] += bias[co];
    }
  }
  return activate(y, activation, alpha);
}

// The backend's own BatchMatMul (XNNPACK on wasm) of [1, m, k] x [1, k, n] views.
function matMul(tf, backendName, backend, a, b) {
  return tf.getKernel('BatchMatMul', backendName).kernelFunc({ inputs: { a, b }, backend,
    attrs: { transposeA: false, transposeB: false } });
}

/** `fn(info)` with a temporary float32 tensor of `values`, disposed afterwards. */
function withTemporary(backend, values, shape, fn) {
  const info = output(backend, shape, values);
  try {
    return fn(info);
  } finally {
    backend.disposeData(info.dataId);
  }
}

const float32 = (...infos) => infos.every((t) => t.dtype === 'float32');

// kernelFunc factories: (tf, backendName, stock) -> kernelFunc; `stock` is the backend's own
// kernel (or undefined) for what these do not handle.
export const CONV_FACTORIES = {
  Conv2DBackpropFilter: (tf, backendName, stock) => (call) => {
    const { inputs: { x, dy }, backend, attrs } = call;
    const { strides, pad, dataFormat, dimRoundingMode, filterShape } = attrs;
    const info = convInfo(tf, x.shape, filterShape, strides, 1, pad, dimRoundingMode, false, dataFormat);
    if (!info) return stockOr(stock, 'Conv2DBackpropFilter', backendName, `data format ${dataFormat}`, call);
    if (backendName !== 'wasm') {
      return output(backend, info.filterShape, conv2dFilterGrad(read(backend, x), read(backend, dy), info));
    }
    const { rows, K, CO } = sizes(info);
    const cols = isPointwise(info) ? read(backend, x) : im2col(read(backend, x), info);
    return withTemporary(backend, transpose(cols, rows, K), [K, rows], (colsT) => view(
      matMul(tf, backendName, backend, view(colsT, [1, K, rows]), view(dy, [1, rows, CO])), info.filterShape));
  },
  Conv2DBackpropInput: (tf, backendName, stock) => (call) => {
    const { inputs: { dy, filter }, backend, attrs } = call;
    const { strides, pad, dataFormat, dimRoundingMode, inputShape } = attrs;
    const info = convInfo(tf, inputShape, filter.shape, strides, 1, pad, dimRoundingMode, false, dataFormat);
    if (!info) return stock.kernelFunc(call);
    if (backendName !== 'wasm') {
      return output(backend, info.inShape, conv2dInputGrad(read(backend, dy), read(backend, filter), info));
    }
    const { rows, K, CO } = sizes(info);
    const cols = withTemporary(backend, transpose(read(backend, filter), K, CO), [CO, K],
      (filterT) => matMul(tf, backendName, backend, view(dy, [1, rows, CO]), view(filterT, [1, CO, K])));
    if (isPointwise(info)) return view(cols, info.inShape);
    try {
      return output(backend, info.inShape, col2im(read(backend, cols), info));
    } finally {
      backend.disposeData(cols.dataId);
    }
  },
  Conv2D: (tf, backendName, stock) => (call) => {
    const { inputs: { x, filter }, backend, attrs } = call;
    const { strides, pad, dataFormat, dilations, dimRoundingMode } = attrs;
    const info = convInfo(tf, x.shape, filter.shape, strides, dilations, pad, dimRoundingMode, false, dataFormat);
    if (!info || !float32(x, filter)) return stock.kernelFunc(call);
    return output(backend, info.outShape, conv2dForward(read(backend, x), read(backend, filter), info));
  },
  FusedConv2D: (tf, backendName, stock) => (call) => {
    const { inputs: { x, filter, bias }, backend, attrs } = call;
    const { strides, pad, dataFormat, dilations, dimRoundingMode, activation = 'linear', leakyreluAlpha } = attrs;
    const info = convInfo(tf, x.shape, filter.shape, strides, dilations, pad, dimRoundingMode, false, dataFormat);
    const biasOk = !bias || (bias.dtype === 'float32' && bias.shape.length === 1
      && bias.shape[0] === filter.shape[3]);
    if (!info || !biasOk || !ACTIVATIONS.includes(activation) || !float32(x, filter)) return stock.kernelFunc(call);
    return output(backend, info.outShape, conv2dForward(read(backend, x), read(backend, filter), info,
      bias ? read(backend, bias) : null, activation, leakyreluAlpha ?? 0.2));
  },
};
