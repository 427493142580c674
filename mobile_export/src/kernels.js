// Training kernels the device runtime registers with TF.js (4.22), so that a device segment
// trains fast on the pure-JS `cpu` backend and trains at all, and right, on the `wasm` backend.
// What the stock kernels do (measured in test/kernels.test.js and benchmarks/device_step.mjs):
//
//   kernel                               | cpu (stock)                        | wasm (stock)
//   Conv2DBackpropFilter                 | replaced: a naive loop, ~40-60x    | missing: added
//                                        |   slower than the forward conv     |
//   DepthwiseConv2dNativeBackpropFilter  | replaced: naive, ~50x the forward  | missing: added
//   DepthwiseConv2dNativeBackpropInput   | replaced (2-3x faster)             | missing: added
//   DepthwiseConv2dNative (forward)      | replaced (~2x faster)              | stock (XNNPACK)
//   MaxPoolGrad                          | stock                              | replaced: WRONG where a
//                                        |                                    |   window's max is < 0
//   AvgPoolGrad                          | replaced: WRONG with 'same'        | replaced: the same bug
//                                        |   padding (divides by the whole    |
//                                        |   window, the forward by the valid |
//                                        |   part, as TF does)                |
//   UnsortedSegmentSum (Gather's and     | stock                              | missing: added
//     Embedding's gradient)              |                                    |
//   BatchMatMul with a transpose (Dense  | stock                              | ~40x slower than without:
//     gradients)                         |                                    |   transposed here first
//
// Everything else a conv/depthwise/pooling/BatchNorm/Dense model needs to train is stock on
// both backends (Conv2D, FusedConv2D, Conv2DBackpropInput, BatchNorm's ops, ...;
// test/kernels.test.js trains such a model on each). The kernels are plain loops over the
// float32 data in NHWC order, with the filter-gradient sums in float64 (as the stock cpu
// kernel does): dW[kh, kw, ci, co] = sum over (b, oh, ow) of x[b, ih, iw, ci] * dy[b, oh, ow, co],
// with ih = oh * strideH + kh * dilationH - padTop (likewise iw), accumulated output position
// by output position so that the innermost loop runs over contiguous channels. The padding
// comes from TF.js's own `backend_util.computeConv2DInfo` / `computePool2DInfo`, so 'same',
// 'valid', explicit and dimRoundingMode paddings mean what they mean to the stock kernels.
// NCHW (channelsFirst) falls back to the stock kernel where there is one.
//
// They are checked against the stock cpu kernels and against TensorFlow/Keras numbers
// (test/kernels.test.js, test/fixtures/kernel_fixtures.json, <= 1e-5 relative).
//
// Example:
//   import * as tf from '@tensorflow/tfjs';
//   import '@tensorflow/tfjs-backend-wasm';
//   import { registerTrainingKernels } from 'splitkeras-device';
//   registerTrainingKernels(tf);          // SplitDevice.create does this unless kernels: false
//   await tf.setBackend('wasm');

// The kernels registered for each backend.
export const TRAINING_KERNELS = {
  cpu: ['Conv2D', 'FusedConv2D', 'Conv2DBackpropFilter', 'Conv2DBackpropInput',
    'DepthwiseConv2dNativeBackpropFilter',
    'DepthwiseConv2dNativeBackpropInput', 'DepthwiseConv2dNative', 'AvgPoolGrad', 'Tile',
    ...REDUCE_KERNELS, ...BINARY_KERNELS, ...UNARY_KERNELS],
  wasm: ['Conv2DBackpropFilter', 'Conv2DBackpropInput', 'DepthwiseConv2dNativeBackpropFilter',
    'DepthwiseConv2dNativeBackpropInput', 'MaxPoolGrad', 'AvgPoolGrad', 'UnsortedSegmentSum', 'Tile',
    'BatchMatMul'],
};

import { gemm, transpose } from './gemm.js';
import { BINARY_KERNELS, REDUCE_KERNELS, UNARY_KERNELS, binaryKernel, reduceKernel, tileKernel, unaryKernel }
  from './generic_kernels.js';

const read = (backend, info) => backend.readSync(info.dataId);
const output = (backend, shape, values) => ({ dataId: backend.write(values, shape, 'float32'), shape,
  dtype: 'float32' });

// convInfo of the stock kernels; null for NCHW (the caller falls back).
function convInfo(tf, xShape, filterShape, strides, dilations, pad, dimRoundingMode, depthwise,
  dataFormat = 'NHWC') {
  const format = tf.backend_util.convertConv2DDataFormat(dataFormat);
  if (format !== 'channelsLast') return null;
  return tf.backend_util.computeConv2DInfo(xShape, filterShape, strides, dilations, pad,
    dimRoundingMode, depthwise, format);
}

// Rows of im2col per block of the cpu convolutions: about 4 MiB of patches at a time.
const BLOCK_FLOATS = 1 << 20;
const blockRows = (K) => Math.max(4, Math.floor(BLOCK_FLOATS / Math.max(K, 1)));

/**
 * dW of a 2-D convolution (NHWC) from x and dy: Float32Array in filter layout [fh, fw, ci, co],
 * im2col(x)^T @ dy, block of rows by block of rows (x itself for a 1x1 conv).
 * @param {object} info TF.js conv info (backend_util.computeConv2DInfo)
 */
export function conv2dFilterGrad(x, dy, info) {
  const rows = info.batchSize * info.outHeight * info.outWidth;
  const K = info.filterHeight * info.filterWidth * info.inChannels;
  const CO = info.outChannels;
  const dW = new Float32Array(K * CO);
  if (isPointwise(info)) return gemm(transpose(x, rows, K), dy, dW, K, rows, CO);
  const step = blockRows(K);
  const cols = new Float32Array(step * K);
  for (let r0 = 0; r0 < rows; r0 += step) {
    const n = Math.min(step, rows - r0);
    im2col(x, info, r0, r0 + n, cols);
    gemm(transpose(cols, n, K), dy.subarray(r0 * CO, (r0 + n) * CO), dW, K, n, CO, true);
  }
  return dW;
}

/** dW of a depthwise convolution (NHWC), filter layout [fh, fw, ci, multiplier]. */
export function depthwiseFilterGrad(x, dy, info) {
  const { batchSize: B, inHeight: H, inWidth: W, inChannels: CI, outHeight: OH, outWidth: OW,
    outChannels: CO, strideHeight: SH, strideWidth: SW, dilationHeight: DH, dilationWidth: DW,
    filterHeight: FH, filterWidth: FW, padInfo } = info;
  const M = CO / CI;
  const acc = new Float64Array(FH * FW * CO);
  for (let b = 0; b < B; b += 1) {
    for (let oh = 0; oh < OH; oh += 1) {
      const ih0 = oh * SH - padInfo.top;
      for (let ow = 0; ow < OW; ow += 1) {
        const iw0 = ow * SW - padInfo.left;
        const dyOff = ((b * OH + oh) * OW + ow) * CO;
        for (let kh = 0; kh < FH; kh += 1) {
          const ih = ih0 + kh * DH;
          if (ih < 0 || ih >= H) continue;
          for (let kw = 0; kw < FW; kw += 1) {
            const iw = iw0 + kw * DW;
            if (iw < 0 || iw >= W) continue;
            const xOff = ((b * H + ih) * W + iw) * CI;
            const wOff = (kh * FW + kw) * CO;
            if (M === 1) {
              for (let c = 0; c < CI; c += 1) acc[wOff + c] += x[xOff + c] * dy[dyOff + c];
            } else {
              for (let c = 0; c < CI; c += 1) {
                const v = x[xOff + c];
                const o = c * M;
                for (let m = 0; m < M; m += 1) acc[wOff + o + m] += v * dy[dyOff + o + m];
              }
            }
          }
        }
      }
    }
  }
  return Float32Array.from(acc);
}

/** dx of a depthwise convolution (NHWC) from dy and the filter [fh, fw, ci, multiplier]. */
export function depthwiseInputGrad(dy, filter, info) {
  const { batchSize: B, inHeight: H, inWidth: W, inChannels: CI, outHeight: OH, outWidth: OW,
    outChannels: CO, strideHeight: SH, strideWidth: SW, dilationHeight: DH, dilationWidth: DW,
    filterHeight: FH, filterWidth: FW, padInfo } = info;
  const M = CO / CI;
  const dx = new Float32Array(B * H * W * CI);
  for (let b = 0; b < B; b += 1) {
    for (let oh = 0; oh < OH; oh += 1) {
      const ih0 = oh * SH - padInfo.top;
      for (let ow = 0; ow < OW; ow += 1) {
        const iw0 = ow * SW - padInfo.left;
        const dyOff = ((b * OH + oh) * OW + ow) * CO;
        for (let kh = 0; kh < FH; kh += 1) {
          const ih = ih0 + kh * DH;
          if (ih < 0 || ih >= H) continue;
          for (let kw = 0; kw < FW; kw += 1) {
            const iw = iw0 + kw * DW;
            if (iw < 0 || iw >= W) continue;
            const xOff = ((b * H + ih) * W + iw) * CI;
            const wOff = (kh * FW + kw) * CO;
            if (M === 1) {
              for (let c = 0; c < CI; c += 1) dx[xOff + c] += dy[dyOff + c] * filter[wOff + c];
            } else {
              for (let c = 0; c < CI; c += 1) {
                let sum = 0;
                for (let m = 0; m < M; m += 1) sum += dy[dyOff + c * M + m] * filter[wOff + c * M + m];
                dx[xOff + c] += sum;
              }
            }
          }
        }
      }
    }
  }
  return dx;
}

/** The forward depthwise convolution (NHWC), [b, oh, ow, ci * multiplier]. */
export function depthwiseForward(x, filter, info) {
  const { batchSize: B, inHeight: H, inWidth: W, inChannels: CI, outHeight: OH, outWidth: OW,
    outChannels: CO, strideHeight: SH, strideWidth: SW, dilationHeight: DH, dilationWidth: DW,
    filterHeight: FH, filterWidth: FW, padInfo } = info;
  const M = CO / CI;
  const y = new Float32Array(B * OH * OW * CO);
  const sum = new Float64Array(CO);
  for (let b = 0; b < B; b += 1) {
    for (let oh = 0; oh < OH; oh += 1) {
      const ih0 = oh * SH - padInfo.top;
      for (let ow = 0; ow < OW; ow += 1) {
        const iw0 = ow * SW - padInfo.left;
        sum.fill(0);
        for (let kh = 0; kh < FH; kh += 1) {
          const ih = ih0 + kh * DH;
          if (ih < 0 || ih >= H) continue;
          for (let kw = 0; kw < FW; kw += 1) {
            const iw = iw0 + kw * DW;
            if (iw < 0 || iw >= W) continue;
            const xOff = ((b * H + ih) * W + iw) * CI;
            const wOff = (kh * FW + kw) * CO;
            if (M === 1) {
              for (let c = 0; c < CI; c += 1) sum[c] += x[xOff + c] * filter[wOff + c];
            } else {
              for (let c = 0; c < CI; c += 1) {
                const v = x[xOff + c];
                for (let m = 0; m < M; m += 1) sum[c * M + m] += v * filter[wOff + c * M + m];
              }
            }
          }
        }
        y.set(sum, ((b * OH + oh) * OW + ow) * CO);
      }
    }
  }
  return y;
}

/** dx of a max pool (NHWC): each window's dy goes to its first maximum (row-major), as TF. */
export function maxPoolGrad(x, dy, info) {
  const { batchSize: B, inHeight: H, inWidth: W, inChannels: C, outHeight: OH, outWidth: OW,
    strideHeight: SH, strideWidth: SW, dilationHeight: DH, dilationWidth: DW,
    filterHeight: FH, filterWidth: FW, padInfo } = info;
  const dx = new Float32Array(B * H * W * C);
  const best = new Float32Array(C);
  const where = new Int32Array(C);
  for (let b = 0; b < B; b += 1) {
    for (let oh = 0; oh < OH; oh += 1) {
      const ih0 = oh * SH - padInfo.top;
      for (let ow = 0; ow < OW; ow += 1) {
        const iw0 = ow * SW - padInfo.left;
        best.fill(-Infinity);
        where.fill(-1);
        for (let kh = 0; kh < FH; kh += 1) {
          const ih = ih0 + kh * DH;
          if (ih < 0 || ih >= H) continue;
          for (let kw = 0; kw < FW; kw += 1) {
            const iw = iw0 + kw * DW;
            if (iw < 0 || iw >= W) continue;
            const xOff = ((b * H + ih) * W + iw) * C;
            for (let c = 0; c < C; c += 1) {
              const v = x[xOff + c];
              if (v > best[c] || (where[c] < 0 && v === -Infinity)) {
                best[c] = v;
                where[c] = xOff + c;
              }
            }
          }
        }
        const dyOff = ((b * OH + oh) * OW + ow) * C;
        for (let c = 0; c < C; c += 1) if (where[c] >= 0) dx[where[c]] += dy[dyOff + c];
      }
    }
  }
  return dx;
}

/** dx of an average pool (NHWC): dy / (the window's valid, unpadded size), as TF. */
export function avgPoolGrad(dy, info) {
  const { batchSize: B, inHeight: H, inWidth: W, inChannels: C, outHeight: OH, outWidth: OW,
    strideHeight: SH, strideWidth: SW, dilationHeight: DH, dilationWidth: DW,
    filterHeight: FH, filterWidth: FW, padInfo } = info;
  const dx = new Float32Array(B * H * W * C);
  for (let b = 0; b < B; b += 1) {
    for (let oh = 0; oh < OH; oh += 1) {
      const ih0 = oh * SH - padInfo.top;
      let rows = 0;
      for (let kh = 0; kh < FH; kh += 1) if (ih0 + kh * DH >= 0 && ih0 + kh * DH < H) rows += 1;
      for (let ow = 0; ow < OW; ow += 1) {
        const iw0 = ow * SW - padInfo.left;
        let cols = 0;
        for (let kw = 0; kw < FW; kw += 1) if (iw0 + kw * DW >= 0 && iw0 + kw * DW < W) cols += 1;
        if (!rows || !cols) continue;
        const scale = 1 / (rows * cols);
        const dyOff = ((b * OH + oh) * OW + ow) * C;
        for (let kh = 0; kh < FH; kh += 1) {
          const ih = ih0 + kh * DH;
          if (ih < 0 || ih >= H) continue;
          for (let kw = 0; kw < FW; kw += 1) {
            const iw = iw0 + kw * DW;
            if (iw < 0 || iw >= W) continue;
            const xOff = ((b * H + ih) * W + iw) * C;
            for (let c = 0; c < C; c += 1) dx[xOff + c] += dy[dyOff + c] * scale;
          }
        }
      }
    }
  }
  return dx;
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

/** dx of a 2-D convolution (NHWC) from dy and the filter [fh, fw, ci, co]: col2im(dy @ W^T). */
export function conv2dInputGrad(dy, filter, info) {
  const rows = info.batchSize * info.outHeight * info.outWidth;
  const K = info.filterHeight * info.filterWidth * info.inChannels;
  const CO = info.outChannels;
  const filterT = transpose(filter, K, CO);
  if (isPointwise(info)) return gemm(dy, filterT, new Float32Array(rows * K), rows, CO, K);
  const dx = new Float32Array(info.batchSize * info.inHeight * info.inWidth * info.inChannels);
  const step = blockRows(K);
  const cols = new Float32Array(step * K);
  for (let r0 = 0; r0 < rows; r0 += step) {
    const n = Math.min(step, rows - r0);
    gemm(dy.subarray(r0 * CO, (r0 + n) * CO), filterT, cols, n, CO, K);
    col2im(cols, info, r0, r0 + n, dx);
  }
  return dx;
}

/** The forward 2-D convolution (NHWC) with an optional bias [co] and activation: im2col @ W. */
export function conv2dForward(x, filter, info, bias = null, activation = 'linear', alpha = 0.2) {
  const rows = info.batchSize * info.outHeight * info.outWidth;
  const K = info.filterHeight * info.filterWidth * info.inChannels;
  const CO = info.outChannels;
  const y = new Float32Array(rows * CO);
  if (isPointwise(info)) {
    gemm(x, filter, y, rows, K, CO);
  } else {
    const step = blockRows(K);
    const cols = new Float32Array(step * K);
    for (let r0 = 0; r0 < rows; r0 += step) {
      const n = Math.min(step, rows - r0);
      im2col(x, info, r0, r0 + n, cols);
      gemm(cols, filter, y.subarray(r0 * CO, (r0 + n) * CO), n, K, CO);
    }
  }
  if (bias) {
    for (let base = 0; base < y.length; base += CO) {
      for (let co = 0; co < CO; co += 1) y[base + co] += bias[co];
    }
  }
  return activate(y, activation, alpha);
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

const isPointwise = (info) => info.filterHeight === 1 && info.filterWidth === 1
  && info.strideHeight === 1 && info.strideWidth === 1 && info.padInfo.top === 0
  && info.padInfo.left === 0 && info.outHeight === info.inHeight && info.outWidth === info.inWidth;

/**
 * im2col of the output positions [r0, r1) (rows r = (b * OH + oh) * OW + ow):
 * [r1 - r0, fh * fw * ci] patches into `cols` (zeros where the window is in the padding).
 */
export function im2col(x, info, r0 = 0, r1 = info.batchSize * info.outHeight * info.outWidth,
  cols = new Float32Array((r1 - r0) * info.filterHeight * info.filterWidth * info.inChannels)) {
  const { inHeight: H, inWidth: W, inChannels: CI, outHeight: OH, outWidth: OW,
    strideHeight: SH, strideWidth: SW, dilationHeight: DH, dilationWidth: DW,
    filterHeight: FH, filterWidth: FW, padInfo } = info;
  const K = FH * FW * CI;
  cols.fill(0, 0, (r1 - r0) * K);
  for (let r = r0; r < r1; r += 1) {
    const ow = r % OW;
    const oh = Math.floor(r / OW) % OH;
    const b = Math.floor(r / (OW * OH));
    const ih0 = oh * SH - padInfo.top;
    const iw0 = ow * SW - padInfo.left;
    const row = (r - r0) * K;
    for (let kh = 0; kh < FH; kh += 1) {
      const ih = ih0 + kh * DH;
      if (ih < 0 || ih >= H) continue;
      for (let kw = 0; kw < FW; kw += 1) {
        const iw = iw0 + kw * DW;
        if (iw < 0 || iw >= W) continue;
        const xOff = ((b * H + ih) * W + iw) * CI;
        const c = row + (kh * FW + kw) * CI;
        for (let ci = 0; ci < CI; ci += 1) cols[c + ci] = x[xOff + ci];
      }
    }
  }
  return cols;
}

/** col2im: the scatter-add of the columns of positions [r0, r1) into dx [b, h, w, ci]. */
export function col2im(cols, info, r0 = 0, r1 = info.batchSize * info.outHeight * info.outWidth,
  dx = new Float32Array(info.batchSize * info.inHeight * info.inWidth * info.inChannels)) {
  const { inHeight: H, inWidth: W, inChannels: CI, outHeight: OH, outWidth: OW,
    strideHeight: SH, strideWidth: SW, dilationHeight: DH, dilationWidth: DW,
    filterHeight: FH, filterWidth: FW, padInfo } = info;
  const K = FH * FW * CI;
  for (let r = r0; r < r1; r += 1) {
    const ow = r % OW;
    const oh = Math.floor(r / OW) % OH;
    const b = Math.floor(r / (OW * OH));
    const ih0 = oh * SH - padInfo.top;
    const iw0 = ow * SW - padInfo.left;
    const row = (r - r0) * K;
    for (let kh = 0; kh < FH; kh += 1) {
      const ih = ih0 + kh * DH;
      if (ih < 0 || ih >= H) continue;
      for (let kw = 0; kw < FW; kw += 1) {
        const iw = iw0 + kw * DW;
        if (iw < 0 || iw >= W) continue;
        const xOff = ((b * H + ih) * W + iw) * CI;
        const c = row + (kh * FW + kw) * CI;
        for (let ci = 0; ci < CI; ci += 1) dx[xOff + ci] += cols[c + ci];
      }
    }
  }
  return dx;
}

// The backend's own BatchMatMul (XNNPACK on wasm) on [1, m, k] x [1, k, n] views.
function matMul(tf, backendName, backend, a, b, transposeA, transposeB) {
  return tf.getKernel('BatchMatMul', backendName).kernelFunc({ inputs: { a, b }, backend,
    attrs: { transposeA, transposeB } });
}
const view = (info, shape) => ({ dataId: info.dataId, shape, dtype: info.dtype });

function unsupported(name, backendName, why) {
  throw new Error(`${name} on the ${backendName} backend: ${why} (splitkeras-device kernels.js `
    + 'handles NHWC float32 only)');
}

// kernelFunc factories; `stock` is the backend's own kernel (or undefined) for what they do not handle.
const FACTORIES = {
  Conv2DBackpropFilter: (tf, backendName, stock) => ({ inputs, backend, attrs }) => {
    const { x, dy } = inputs;
    const { strides, pad, dataFormat, dimRoundingMode, filterShape } = attrs;
    const info = convInfo(tf, x.shape, filterShape, strides, 1, pad, dimRoundingMode, false, dataFormat);
    if (!info) {
      return stock ? stock.kernelFunc({ inputs, backend, attrs })
        : unsupported('Conv2DBackpropFilter', backendName, `data format ${dataFormat}`);
    }
    if (backendName === 'wasm') {
      // dW = im2col(x)^T @ dy on the backend's matrix product (XNNPACK), the transpose made here:
      // its BatchMatMul with transposeA is ~40x slower than without
      const rows = info.batchSize * info.outHeight * info.outWidth;
      const K = info.filterHeight * info.filterWidth * info.inChannels;
      const cols = isPointwise(info) ? read(backend, x) : im2col(read(backend, x), info);
      const colsT = { dataId: backend.write(transpose(cols, rows, K), [K, rows], 'float32'), shape: [K, rows],
        dtype: 'float32' };
      try {
        const out = matMul(tf, backendName, backend, view(colsT, [1, K, rows]),
          view(dy, [1, rows, info.outChannels]), false, false);
        return view(out, info.filterShape);
      } finally {
        backend.disposeData(colsT.dataId);
      }
    }
    return output(backend, info.filterShape, conv2dFilterGrad(read(backend, x), read(backend, dy), info));
  },
  Conv2D: (tf, backendName, stock) => ({ inputs, backend, attrs }) => {
    const { x, filter } = inputs;
    const { strides, pad, dataFormat, dilations, dimRoundingMode } = attrs;
    const info = convInfo(tf, x.shape, filter.shape, strides, dilations ?? 1, pad, dimRoundingMode, false,
      dataFormat);
    if (!info || x.dtype !== 'float32' || filter.dtype !== 'float32') {
      return stock.kernelFunc({ inputs, backend, attrs });
    }
    return output(backend, info.outShape, conv2dForward(read(backend, x), read(backend, filter), info));
  },
  FusedConv2D: (tf, backendName, stock) => ({ inputs, backend, attrs }) => {
    const { x, filter, bias } = inputs;
    const { strides, pad, dataFormat, dilations, dimRoundingMode, activation = 'linear', leakyreluAlpha } = attrs;
    const info = convInfo(tf, x.shape, filter.shape, strides, dilations ?? 1, pad, dimRoundingMode, false,
      dataFormat);
    const biasOk = !bias || (bias.dtype === 'float32' && bias.shape.length === 1
      && bias.shape[0] === filter.shape[3]);
    if (!info || !biasOk || !ACTIVATIONS.includes(activation) || x.dtype !== 'float32'
        || filter.dtype !== 'float32') {
      return stock.kernelFunc({ inputs, backend, attrs });
    }
    return output(backend, info.outShape, conv2dForward(read(backend, x), read(backend, filter), info,
      bias ? read(backend, bias) : null, activation, leakyreluAlpha ?? 0.2));
  },
  Conv2DBackpropInput: (tf, backendName, stock) => ({ inputs, backend, attrs }) => {
    const { dy, filter } = inputs;
    const { strides, pad, dataFormat, dimRoundingMode, inputShape } = attrs;
    const info = convInfo(tf, inputShape, filter.shape, strides, 1, pad, dimRoundingMode, false, dataFormat);
    if (!info) return stock.kernelFunc({ inputs, backend, attrs });
    if (backendName === 'wasm') {
      // dcols = dy @ W^T on the backend's matrix product (W^T made here, see above), then col2im
      // (nothing to do for a 1x1 conv)
      const rows = info.batchSize * info.outHeight * info.outWidth;
      const K = info.filterHeight * info.filterWidth * info.inChannels;
      const CO = info.outChannels;
      const filterT = { dataId: backend.write(transpose(read(backend, filter), K, CO), [CO, K], 'float32'),
        shape: [CO, K], dtype: 'float32' };
      let cols;
      try {
        cols = matMul(tf, backendName, backend, view(dy, [1, rows, CO]), view(filterT, [1, CO, K]), false, false);
      } finally {
        backend.disposeData(filterT.dataId);
      }
      if (isPointwise(info)) return view(cols, info.inShape);
      try {
        return output(backend, info.inShape, col2im(read(backend, cols), info));
      } finally {
        backend.disposeData(cols.dataId);
      }
    }
    return output(backend, info.inShape, conv2dInputGrad(read(backend, dy), read(backend, filter), info));
  },
  DepthwiseConv2dNativeBackpropFilter: (tf, backendName, stock) => ({ inputs, backend, attrs }) => {
    const { x, dy } = inputs;
    const { strides, dilations, pad, dimRoundingMode, filterShape } = attrs;
    const info = convInfo(tf, x.shape, filterShape, strides, dilations, pad, dimRoundingMode, true);
    return output(backend, info.filterShape, depthwiseFilterGrad(read(backend, x), read(backend, dy), info));
  },
  DepthwiseConv2dNativeBackpropInput: (tf, backendName, stock) => ({ inputs, backend, attrs }) => {
    const { dy, filter } = inputs;
    const { strides, dilations, pad, dimRoundingMode, inputShape } = attrs;
    const info = convInfo(tf, inputShape, filter.shape, strides, dilations, pad, dimRoundingMode, true);
    const { strideHeight: SH, strideWidth: SW, dilationHeight: DH, dilationWidth: DW, filterHeight: FH,
      filterWidth: FW, inHeight: H, inWidth: W, outHeight: OH, outWidth: OW, padInfo } = info;
    const flipPad = [FH - 1 - padInfo.top, H - OH - (FH - 1 - padInfo.top) + FH - 1,
      FW - 1 - padInfo.left, W - OW - (FW - 1 - padInfo.left) + FW - 1];
    if (backendName === 'wasm' && SH === 1 && SW === 1 && DH === 1 && DW === 1
        && info.outChannels === info.inChannels && flipPad.every((p) => p >= 0)) {
      // stride 1: dx is the depthwise convolution of dy with the flipped filter, which the
      // backend's own (XNNPACK) forward kernel computes
      const w = read(backend, filter);
      const C = info.inChannels;
      const flipped = new Float32Array(w.length);
      for (let kh = 0; kh < FH; kh += 1) {
        for (let kw = 0; kw < FW; kw += 1) {
          flipped.set(w.subarray((kh * FW + kw) * C, (kh * FW + kw + 1) * C),
            ((FH - 1 - kh) * FW + (FW - 1 - kw)) * C);
        }
      }
      const flippedInfo = { dataId: backend.write(flipped, filter.shape, 'float32'), shape: filter.shape,
        dtype: 'float32' };
      try {
        return tf.getKernel('DepthwiseConv2dNative', backendName).kernelFunc({ inputs: { x: dy,
          filter: flippedInfo }, backend, attrs: { strides: [1, 1], dilations: [1, 1], dataFormat: 'NHWC',
          pad: [[0, 0], [flipPad[0], flipPad[1]], [flipPad[2], flipPad[3]], [0, 0]] } });
      } finally {
        backend.disposeData(flippedInfo.dataId);
      }
    }
    return output(backend, info.inShape, depthwiseInputGrad(read(backend, dy), read(backend, filter), info));
  },
  MaxPoolGrad: (tf, backendName, stock) => ({ inputs, backend, attrs }) => {
    const { dy, input } = inputs;
    const { filterSize, strides, pad, dimRoundingMode } = attrs;
    const info = tf.backend_util.computePool2DInfo(input.shape, filterSize, strides, 1, pad,
      dimRoundingMode);
    return output(backend, input.shape, maxPoolGrad(read(backend, input), read(backend, dy), info));
  },
  AvgPoolGrad: (tf, backendName, stock) => ({ inputs, backend, attrs }) => {
    const { dy, input } = inputs;
    const { filterSize, strides, pad, dimRoundingMode } = attrs;
    const info = tf.backend_util.computePool2DInfo(input.shape, filterSize, strides, 1, pad,
      dimRoundingMode);
    return output(backend, input.shape, avgPoolGrad(read(backend, dy), info));
  },
  UnsortedSegmentSum: (tf, backendName, stock) => ({ inputs, backend, attrs }) => {
    const { x, segmentIds } = inputs;
    const { numSegments } = attrs;
    if (segmentIds.shape.length !== 1 || segmentIds.shape[0] !== x.shape[0]) {
      // the op flattens nothing else: TF.js's unsortedSegmentSum takes 1-D ids over axis 0
      return stock ? stock.kernelFunc({ inputs, backend, attrs })
        : unsupported('UnsortedSegmentSum', backendName, `segmentIds of shape [${segmentIds.shape}]`);
    }
    const inner = x.shape.slice(1).reduce((a, b) => a * b, 1);
    const shape = [numSegments, ...x.shape.slice(1)];
    const dtype = x.dtype === 'int32' ? 'int32' : 'float32';
    const values = unsortedSegmentSum(read(backend, x), read(backend, segmentIds), numSegments, inner,
      dtype === 'int32' ? Int32Array : Float32Array);
    return { dataId: backend.write(values, shape, dtype), shape, dtype };
  },
  DepthwiseConv2dNative: (tf, backendName, stock) => ({ inputs, backend, attrs }) => {
    const { x, filter } = inputs;
    const { strides, pad, dilations, dimRoundingMode } = attrs;
    const $dilations = dilations ?? [1, 1];
    const info = convInfo(tf, x.shape, filter.shape, strides, $dilations, pad, dimRoundingMode, true);
    if (x.dtype !== 'float32' || filter.dtype !== 'float32') {
      return stock ? stock.kernelFunc({ inputs, backend, attrs })
        : unsupported('DepthwiseConv2dNative', backendName, `dtype ${x.dtype}`);
    }
    return output(backend, info.outShape, depthwiseForward(read(backend, x), read(backend, filter), info));
  },
};

// wasm: XNNPACK's product runs ~40x slower with transposeA or transposeB (a Dense layer's
// gradients ask for them): transpose the operand here, then the stock kernel untransposed
FACTORIES.BatchMatMul = (tf, backendName, stock) => ({ inputs, backend, attrs }) => {
  const { a, b } = inputs;
  const { transposeA, transposeB } = attrs;
  if ((!transposeA && !transposeB) || a.dtype !== 'float32' || b.dtype !== 'float32') {
    return stock.kernelFunc({ inputs, backend, attrs });
  }
  const made = [];
  const untransposed = (t) => {
    const rank = t.shape.length;
    const [r, c] = t.shape.slice(rank - 2);
    const batch = t.shape.slice(0, rank - 2).reduce((p, q) => p * q, 1);
    const values = read(backend, t);
    const out = new Float32Array(values.length);
    for (let i = 0; i < batch; i += 1) out.set(transpose(values.subarray(i * r * c, (i + 1) * r * c), r, c), i * r * c);
    const shape = [...t.shape.slice(0, rank - 2), c, r];
    const info = { dataId: backend.write(out, shape, 'float32'), shape, dtype: 'float32' };
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
FACTORIES.Tile = (tf, backendName, stock) => tileKernel(stock);
for (const name of REDUCE_KERNELS) FACTORIES[name] = (tf, backendName, stock) => reduceKernel(name, stock, tf);
for (const name of BINARY_KERNELS) FACTORIES[name] = (tf, backendName, stock) => binaryKernel(name, stock);
for (const name of UNARY_KERNELS) FACTORIES[name] = (tf, backendName, stock) => unaryKernel(name, stock);

// The backend instance if it has been initialized (setting it up would start it otherwise).
const startedBackend = (tf, backendName) => tf.engine?.().registry?.[backendName] ?? null;

// tf module -> {backendName: {kernelName: stock config or null}} of what this module replaced.
const REGISTERED = new WeakMap();

/**
 * Register the training kernels for `backends` (default: cpu and wasm). Idempotent. A backend
 * need not be loaded yet: the kernels are found when it is set. Returns what was registered
 * and a `restore()` that puts the stock kernels back (for comparisons).
 * @param {object} tf the @tensorflow/tfjs module (or tfjs-core)
 * @param {{backends?: string[]}} [options]
 * @returns {{registered: Array<{kernelName: string, backendName: string, replaced: boolean}>,
 *   restore: () => void}}
 */
export function registerTrainingKernels(tf, { backends = ['cpu', 'wasm'] } = {}) {
  if (typeof tf?.registerKernel !== 'function' || !tf.backend_util) {
    throw new TypeError('registerTrainingKernels: pass the @tensorflow/tfjs module as tf');
  }
  let state = REGISTERED.get(tf);
  if (!state) {
    state = {};
    REGISTERED.set(tf, state);
  }
  const registered = [];
  for (const backendName of backends) {
    const names = TRAINING_KERNELS[backendName];
    if (!names) {
      throw new Error(`registerTrainingKernels: no kernels for backend '${backendName}'; `
        + `known: ${Object.keys(TRAINING_KERNELS).join(', ')}`);
    }
    state[backendName] ??= {};
    for (const kernelName of names) {
      if (!(kernelName in state[backendName])) {
        const stock = tf.getKernel(kernelName, backendName) ?? null;
        if (stock) tf.unregisterKernel(kernelName, backendName);
        // the stock kernel's setup (wasm: binding its function, which ours may call) goes with
        // ours, so that it runs when the backend starts; if it has started, it runs now
        const config = { kernelName, backendName, kernelFunc: FACTORIES[kernelName](tf, backendName, stock) };
        if (stock?.setupFunc) config.setupFunc = stock.setupFunc;
        tf.registerKernel(config);
        const started = startedBackend(tf, backendName);
        if (stock?.setupFunc && started) stock.setupFunc(started);
        state[backendName][kernelName] = stock;
      }
      registered.push({ kernelName, backendName, replaced: state[backendName][kernelName] !== null });
    }
  }
  const restore = () => {
    for (const backendName of backends) {
      for (const kernelName of TRAINING_KERNELS[backendName]) {
        if (!state[backendName] || !(kernelName in state[backendName])) continue;
        const stock = state[backendName][kernelName];
        tf.unregisterKernel(kernelName, backendName);
        if (stock) {
          tf.registerKernel(stock);
          // a stock kernel's setup (wasm: binding its function) runs when its backend starts;
          // when that was before, bind it now
          const started = startedBackend(tf, backendName);
          if (stock.setupFunc && started) stock.setupFunc(started);
        }
        delete state[backendName][kernelName];
      }
    }
  };
  return { registered, restore };
}
