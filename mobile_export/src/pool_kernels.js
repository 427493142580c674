// Pooling gradients (NHWC, float32) over each output position's window taps (kernel_setup.js):
//   MaxPoolGrad: each window's dy goes to its first maximum (row-major), as TF (the stock wasm
//     kernel is wrong where a window's maximum is < 0);
//   AvgPoolGrad: dy / (the window's valid, unpadded size), as TF and the forward pass (the stock
//     kernels divide by the whole window with 'same' padding).

import { output, poolInfo, read, windowTaps } from './kernel_setup.js';

/** dx of a max pool (NHWC): each window's dy goes to its first maximum (row-major), as TF. */
export function maxPoolGrad(x, dy, info) {
  const { batchSize: B, inHeight: H, inWidth: W, inChannels: C, outHeight: OH, outWidth: OW } = info;
  const { start, pixel } = windowTaps(info);
  const P = OH * OW;
  const dx = new Float32Array(B * H * W * C);
  const best = new Float32Array(C);
  const where = new Int32Array(C);
  for (let b = 0; b < B; b += 1) {
    for (let p = 0; p < P; p += 1) {
      best.fill(-Infinity);
      where.fill(-1);
      for (let t = start[p]; t < start[p + 1]; t += 1) {
        const xOff = (b * H * W + pixel[t]) * C;
        for (let c = 0; c < C; c += 1) {
          const v = x[xOff + c];
          if (v > best[c] || (where[c] < 0 && v === -Infinity)) {
            best[c] = v;
            where[c] = xOff + c;
          }
        }
      }
      const dyOff = (b * P + p) * C;
      for (let c = 0; c < C; c += 1) if (where[c] >= 0) dx[where[c]] += dy[dyOff + c];
    }
  }
  return dx;
}

/** dx of an average pool (NHWC): dy / (the window's valid, unpadded size), as TF. */
export function avgPoolGrad(dy, info) {
  const { batchSize: B, inHeight: H, inWidth: W, inChannels: C, outHeight: OH, outWidth: OW } = info;
  const { start, pixel } = windowTaps(info);
  const P = OH * OW;
  const dx = new Float32Array(B * H * W * C);
  for (let b = 0; b < B; b += 1) {
    for (let p = 0; p < P; p += 1) {
      const count = start[p + 1] - start[p];
      if (!count) continue;
      const scale = 1 / count;
      const dyOff = (b * P + p) * C;
      for (let t = start[p]; t < start[p + 1]; t += 1) {
        const xOff = (b * H * W + pixel[t]) * C;
        for (let c = 0; c < C; c += 1) dx[xOff + c] += dy[dyOff + c] * scale;
      }
    }
  }
  return dx;
}

export const POOL_FACTORIES = {
  MaxPoolGrad: (tf) => ({ inputs: { dy, input }, backend, attrs }) => output(backend, input.shape,
    maxPoolGrad(read(backend, input), read(backend, dy), poolInfo(tf, input.shape, attrs))),
  AvgPoolGrad: (tf) => ({ inputs: { dy, input }, backend, attrs }) => output(backend, input.shape,
    avgPoolGrad(read(backend, dy), poolInfo(tf, input.shape, attrs))),
};
