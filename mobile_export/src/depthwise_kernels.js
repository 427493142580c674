// Depthwise 2-D convolutions (NHWC, float32, filter [fh, fw, ci, multiplier]): the forward pass
// and both gradients, as loops over each output position's window taps (kernel_setup.js) with
// the channels innermost. The filter-gradient sums are in float64, as the stock cpu kernel's.
// On wasm the input gradient with stride 1 is the backend's own (XNNPACK) forward depthwise
// convolution of dy with the flipped filter.

import { computeInto, convInfo, output, read, windowTaps } from './kernel_setup.js';

/** The geometry the three loops share. */
function geometry(info) {
  const { batchSize: B, inHeight: H, inWidth: W, inChannels: CI, outHeight: OH, outWidth: OW,
    outChannels: CO } = info;
  return { B, HW: H * W, CI, P: OH * OW, CO, M: CO / CI, ...windowTaps(info) };
}

/** The forward depthwise convolution (NHWC), [b, oh, ow, ci * multiplier]. */
export function depthwiseForward(x, filter, info, y = new Float32Array(info.batchSize * info.outHeight
  * info.outWidth * info.outChannels)) {
  const { B, HW, CI, P, CO, M, start, pixel, tap } = geometry(info);
  const sum = new Float64Array(CO);
  for (let b = 0; b < B; b += 1) {
    for (let p = 0; p < P; p += 1) {
      sum.fill(0);
      for (let t = start[p]; t < start[p + 1]; t += 1) {
        const xOff = (b * HW + pixel[t]) * CI;
        const wOff = tap[t] * CO;
        if (M === 1) {
          for (let c = 0; c < CI; c += 1) sum[c] += x[xOff + c] * filter[wOff + c];
        } else {
          for (let c = 0; c < CI; c += 1) {
            const v = x[xOff + c];
            for (let m = 0; m < M; m += 1) sum[c * M + m] += v * filter[wOff + c * M + m];
          }
        }
      }
      y.set(sum, (b * P + p) * CO);
    }
  }
  return y;
}

/** dW of a depthwise convolution (NHWC), filter layout [fh, fw, ci, multiplier]. */
export function depthwiseFilterGrad(x, dy, info, dW = new Float32Array(info.filterHeight * info.filterWidth
  * info.outChannels)) {
  const { B, HW, CI, P, CO, M, start, pixel, tap } = geometry(info);
  const acc = new Float64Array(info.filterHeight * info.filterWidth * CO);
  for (let b = 0; b < B; b += 1) {
    for (let p = 0; p < P; p += 1) {
      const dyOff = (b * P + p) * CO;
      for (let t = start[p]; t < start[p + 1]; t += 1) {
        const xOff = (b * HW + pixel[t]) * CI;
        const wOff = tap[t] * CO;
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
  dW.set(acc);
  return dW;
}

/** dx of a depthwise convolution (NHWC) from dy and the filter [fh, fw, ci, multiplier]. */
export function depthwiseInputGrad(dy, filter, info, dx = new Float32Array(info.batchSize * info.inHeight
  * info.inWidth * info.inChannels)) {
  const { B, HW, CI, P, CO, M, start, pixel, tap } = geometry(info);
  for (let b = 0; b < B; b += 1) {
    for (let p = 0; p < P; p += 1) {
      const dyOff = (b * P + p) * CO;
      for (let t = start[p]; t < start[p + 1]; t += 1) {
        const xOff = (b * HW + pixel[t]) * CI;
        const wOff = tap[t] * CO;
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
  return dx;
}

/** The filter [fh, fw, c, 1] turned by 180 degrees. */
function flipFilter(w, FH, FW, C) {
  const flipped = new Float32Array(w.length);
  for (let kh = 0; kh < FH; kh += 1) {
    for (let kw = 0; kw < FW; kw += 1) {
      flipped.set(w.subarray((kh * FW + kw) * C, (kh * FW + kw + 1) * C), ((FH - 1 - kh) * FW + (FW - 1 - kw)) * C);
    }
  }
  return flipped;
}

// wasm, stride 1, multiplier 1: dx is the depthwise convolution of dy with the flipped filter
// and the complementary padding, which the backend's own forward kernel computes; null otherwise.
function wasmStrideOneInputGrad(tf, backendName, backend, dy, filter, info) {
  const { strideHeight: SH, strideWidth: SW, dilationHeight: DH, dilationWidth: DW, filterHeight: FH,
    filterWidth: FW, inHeight: H, inWidth: W, outHeight: OH, outWidth: OW, padInfo } = info;
  const flipPad = [FH - 1 - padInfo.top, H - OH - (FH - 1 - padInfo.top) + FH - 1,
    FW - 1 - padInfo.left, W - OW - (FW - 1 - padInfo.left) + FW - 1];
  if (backendName !== 'wasm' || SH !== 1 || SW !== 1 || DH !== 1 || DW !== 1
      || info.outChannels !== info.inChannels || !flipPad.every((p) => p >= 0)) return null;
  const flipped = output(backend, filter.shape, flipFilter(read(backend, filter), FH, FW, info.inChannels));
  try {
    return tf.getKernel('DepthwiseConv2dNative', backendName).kernelFunc({ inputs: { x: dy, filter: flipped },
      backend, attrs: { strides: [1, 1], dilations: [1, 1], dataFormat: 'NHWC',
        pad: [[0, 0], [flipPad[0], flipPad[1]], [flipPad[2], flipPad[3]], [0, 0]] } });
  } finally {
    backend.disposeData(flipped.dataId);
  }
}

const depthwiseInfo = (tf, xShape, filterShape, { strides, dilations, pad, dimRoundingMode }) => convInfo(tf,
  xShape, filterShape, strides, dilations ?? [1, 1], pad, dimRoundingMode, true);

export const DEPTHWISE_FACTORIES = {
  DepthwiseConv2dNativeBackpropFilter: (tf) => ({ inputs: { x, dy }, backend, attrs }) => {
    const info = depthwiseInfo(tf, x.shape, attrs.filterShape, attrs);
    return computeInto(backend, [info.filterShape], (dW) => depthwiseFilterGrad(read(backend, x), read(backend, dy),
      info, dW))[0];
  },
  DepthwiseConv2dNativeBackpropInput: (tf, backendName) => ({ inputs: { dy, filter }, backend, attrs }) => {
    const info = depthwiseInfo(tf, attrs.inputShape, filter.shape, attrs);
    return wasmStrideOneInputGrad(tf, backendName, backend, dy, filter, info)
      ?? computeInto(backend, [info.inShape], (dx) => depthwiseInputGrad(read(backend, dy), read(backend, filter),
        info, dx))[0];
  },
  DepthwiseConv2dNative: (tf, backendName, stock) => (call) => {
    const { inputs: { x, filter }, backend, attrs } = call;
    if (x.dtype !== 'float32' || filter.dtype !== 'float32') return stock.kernelFunc(call);
    const info = depthwiseInfo(tf, x.shape, filter.shape, attrs);
    return computeInto(backend, [info.outShape], (y) => depthwiseForward(read(backend, x), read(backend, filter),
      info, y))[0];
  },
};
