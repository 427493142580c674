// Fused kernels for what a MobileNetV2-style head spends its backward pass in: training-mode
// BatchNormalization (channels last) and the masks of ReLU / ReLU6 / clip gradients.
//
// TF.js 4.22 builds a training BatchNormalization from tf.moments (Mean, SquaredDifference,
// Mean) and the FusedBatchNorm kernel; its autodiff then runs ~15 elementwise ops over the
// whole activation, and ReLU(max_value=6) (relu, then clipByValue) adds GreaterEqual, LessEqual,
// LogicalAnd, Select, ZerosLike, Step and Multiply. Here:
//
//   SplitkerasBatchNormTraining      x [..., C], gamma [C], beta [C] -> y, mean [C], variance [C],
//                                    meanLow [C] (one pass for the statistics, one for y)
//   SplitkerasBatchNormTrainingGrad  dy, x, mean, meanLow, variance, gamma -> dx, dgamma, dbeta
//                                    (one pass for the two sums, one for dx)
//   SplitkerasMaskGrad               dy, x -> dx of Relu, Relu6, ClipByValue or ReluClip (one pass)
//   SplitkerasReluClip               x -> clipByValue(relu(x), 0, max): TF.js' ReLU(maxValue) layer
//                                    (ReLU6) in one pass each way
//
// Keras 3's semantics (keras/src/layers/normalization/batch_normalization.py): the batch mean
// and the biased variance (the mean of squared differences) over every axis but the last;
// y = gamma * (x - mean) / sqrt(variance + epsilon) + beta; the gradient is that of this
// expression with mean and variance functions of x:
//   xhat = (x - mean) * invStd,  dbeta = sum(dy),  dgamma = sum(dy * xhat),
//   dx = gamma * invStd * (dy - dbeta / N - xhat * dgamma / N)      (N: elements per channel)
// Sums are in float64 (JS numbers), as the stock cpu reductions of generic_kernels.js. The
// mask gradients repeat the stock ops' arithmetic (dy * step(x), dy * (x <= 6) * step(x),
// where(min <= x <= max, dy, 0)), NaN included, so they equal the stock result exactly.
// Checked in test/norm_kernels.test.js against the stock composition and Keras.

import { computeInto, read } from './kernel_setup.js';

export const BN_TRAINING = 'SplitkerasBatchNormTraining';
export const BN_TRAINING_GRAD = 'SplitkerasBatchNormTrainingGrad';
export const MASK_GRAD = 'SplitkerasMaskGrad';
export const RELU_CLIP = 'SplitkerasReluClip';

/**
 * Batch statistics and the normalized output of x viewed as [rows, C]. The mean is computed in
 * float64 and kept as two float32s, `mean` + `meanLow` (its rounding error), for y and the
 * gradient: where the mean is large against the spread (x = 50 + 0.1 n), the float32 mean's
 * rounding alone is ~3e-5 of the spread.
 * @returns {{y: Float32Array, mean: Float32Array, meanLow: Float32Array, variance: Float32Array}}
 */
export function batchNormTraining(x, gamma, beta, C, epsilon, { y = new Float32Array(x.length),
  mean = new Float32Array(C), meanLow = new Float32Array(C), variance = new Float32Array(C) } = {}) {
  const rows = x.length / C;
  // one pass: the sums of d = x - shift and d^2, shift = the first row (near the mean, so
  // that the float64 sums lose nothing to cancellation)
  const shift = Float64Array.from(x.subarray(0, C));
  const sums = new Float64Array(C);
  const squares = new Float64Array(C);
  for (let base = 0; base < x.length; base += C) {
    for (let c = 0; c < C; c += 1) {
      const d = x[base + c] - shift[c];
      sums[c] += d;
      squares[c] += d * d;
    }
  }
  const sum = new Float64Array(C); // the mean, float64
  const scale = new Float64Array(C);
  for (let c = 0; c < C; c += 1) {
    const m = sums[c] / rows;
    sum[c] = shift[c] + m;
    mean[c] = sum[c];
    meanLow[c] = sum[c] - mean[c];
    variance[c] = Math.max(squares[c] / rows - m * m, 0);
    scale[c] = gamma[c] / Math.sqrt(variance[c] + epsilon);
  }
  for (let base = 0; base < x.length; base += C) {
    for (let c = 0; c < C; c += 1) y[base + c] = beta[c] + (x[base + c] - sum[c]) * scale[c];
  }
  return { y, mean, meanLow, variance };
}

/** dx, dgamma, dbeta of batchNormTraining's y (see the formulas above). */
export function batchNormTrainingGrad(dy, x, mean32, meanLow, variance, gamma, C, epsilon,
  { dx = new Float32Array(x.length), dgamma = new Float32Array(C), dbeta = new Float32Array(C) } = {}) {
  const rows = x.length / C;
  const mean = new Float64Array(C);
  for (let c = 0; c < C; c += 1) mean[c] = mean32[c] + meanLow[c];
  const invStd = new Float64Array(C);
  for (let c = 0; c < C; c += 1) invStd[c] = 1 / Math.sqrt(variance[c] + epsilon);
  const sumDy = new Float64Array(C);
  const sumDyXhat = new Float64Array(C);
  for (let base = 0; base < x.length; base += C) {
    for (let c = 0; c < C; c += 1) {
      const g = dy[base + c];
      sumDy[c] += g;
      sumDyXhat[c] += g * (x[base + c] - mean[c]);
    }
  }
  const meanDy = new Float64Array(C);
  const meanDyXhat = new Float64Array(C);
  const factor = new Float64Array(C);
  for (let c = 0; c < C; c += 1) {
    sumDyXhat[c] *= invStd[c];
    meanDy[c] = sumDy[c] / rows;
    meanDyXhat[c] = sumDyXhat[c] / rows;
    factor[c] = gamma[c] * invStd[c];
    dgamma[c] = sumDyXhat[c];
  }
  dbeta.set(sumDy);
  for (let base = 0; base < x.length; base += C) {
    for (let c = 0; c < C; c += 1) {
      const xhat = (x[base + c] - mean[c]) * invStd[c];
      dx[base + c] = factor[c] * (dy[base + c] - meanDy[c] - xhat * meanDyXhat[c]);
    }
  }
  return { dx, dgamma, dbeta };
}

/**
 * dx of relu ('relu'), relu6 ('relu6'), clipByValue(x, min, max) ('clip') or
 * clipByValue(relu(x), 0, max) ('reluClip'), as the stock gradients compute it:
 * dy * step(x), dy * (x <= 6) * step(x), where(min <= x <= max, dy, 0), and the product of the
 * last two, where(x > max, 0, dy * step(x)).
 */
export function maskGrad(dy, x, op, min = 0, max = 6, dx = new Float32Array(x.length)) {
  const n = x.length;
  if (op === 'relu') {
    for (let i = 0; i < n; i += 1) {
      const v = x[i];
      dx[i] = dy[i] * (v > 0 ? 1 : (v !== v ? NaN : 0)); // eslint-disable-line no-self-compare
    }
  } else if (op === 'relu6') {
    for (let i = 0; i < n; i += 1) {
      const v = x[i];
      dx[i] = dy[i] * ((v <= 6 ? 1 : 0) * (v > 0 ? 1 : (v !== v ? NaN : 0))); // eslint-disable-line no-self-compare
    }
  } else if (op === 'reluClip') { // clipByValue(relu(x), 0, max): where(x > max, 0, dy * step(x))
    for (let i = 0; i < n; i += 1) {
      const v = x[i];
      dx[i] = v > max ? 0 : dy[i] * (v > 0 ? 1 : (v !== v ? NaN : 0)); // eslint-disable-line no-self-compare
    }
  } else if (op === 'clip') {
    for (let i = 0; i < n; i += 1) dx[i] = x[i] >= min && x[i] <= max ? dy[i] : 0;
  } else {
    throw new Error(`maskGrad: unknown op '${op}' (relu, relu6, reluClip or clip)`);
  }
  return dx;
}

/**
 * clipByValue(relu(x), 0, max), as the two stock kernels give it: NaN stays NaN (cpu), or
 * becomes 0 (`nanToZero`: wasm's relu is fmax(0, x)).
 */
export function reluClip(x, max, y = new Float32Array(x.length), nanToZero = false) {
  const n = x.length;
  const top = +max;
  // Math.max / Math.min: no branch per element (the ternary form ran 2x slower than a mask)
  if (nanToZero) for (let i = 0; i < n; i += 1) y[i] = x[i] > 0 ? Math.min(x[i], top) : 0;
  else for (let i = 0; i < n; i += 1) y[i] = Math.min(Math.max(x[i], 0), top);
  return y;
}

const channelsOf = (shape) => shape[shape.length - 1];

/** kernelFuncs of the three kernels, the same on cpu and wasm (outputs allocated, then computed into). */
export const NORM_KERNEL_FUNCS = {
  [BN_TRAINING]: ({ inputs: { x, gamma, beta }, backend, attrs }) => {
    const C = channelsOf(x.shape);
    return computeInto(backend, [x.shape, [C], [C], [C]], (y, mean, variance, meanLow) => batchNormTraining(
      read(backend, x), read(backend, gamma), read(backend, beta), C, attrs.epsilon, { y, mean, meanLow, variance }));
  },
  [BN_TRAINING_GRAD]: ({ inputs: { dy, x, mean, meanLow, variance, gamma }, backend, attrs }) => {
    const C = channelsOf(x.shape);
    return computeInto(backend, [x.shape, [C], [C]], (dx, dgamma, dbeta) => batchNormTrainingGrad(read(backend, dy),
      read(backend, x), read(backend, mean), read(backend, meanLow), read(backend, variance), read(backend, gamma), C,
      attrs.epsilon, { dx, dgamma, dbeta }));
  },
  [RELU_CLIP]: ({ inputs: { x }, backend, attrs }) => computeInto(backend, [x.shape],
    (y) => reluClip(read(backend, x), attrs.max, y, attrs.nanToZero))[0],
  [MASK_GRAD]: ({ inputs: { dy, x }, backend, attrs }) => computeInto(backend, [x.shape],
    (dx) => maskGrad(read(backend, dy), read(backend, x), attrs.op, attrs.min, attrs.max, dx))[0],
};

// The mask gradients' settings per stock kernel: the op of maskGrad and its bounds.
const MASKS = {
  Relu: () => ({ op: 'relu' }),
  Relu6: () => ({ op: 'relu6' }),
  ClipByValue: (attrs) => ({ op: 'clip', min: attrs.clipValueMin, max: attrs.clipValueMax }),
};
export const MASK_GRADIENTS = Object.keys(MASKS);

// The backend runs `kernelName` (ours are registered for cpu and wasm only).
const onBackend = (tf, kernelName) => Boolean(tf.getKernel(kernelName, tf.getBackend()));

/**
 * The gradient configs this module registers: the BatchNorm kernel's, and Relu's, Relu6's and
 * ClipByValue's through SplitkerasMaskGrad (the stock gradient where the backend lacks it).
 * @param {object} tf the @tensorflow/tfjs module
 * @param {(kernelName: string) => object | undefined} stockGradient the stock gradient config
 */
export function normGradients(tf, stockGradient) {
  const bnGrad = {
    kernelName: BN_TRAINING,
    inputsToSave: ['x', 'gamma'],
    outputsToSave: [false, true, true, true],
    gradFunc: (dys, saved, attrs) => {
      const [x, gamma, mean, variance, meanLow] = saved;
      // computed here, once: each closure runs in a tidy of its own, which would dispose the others
      const [dx, dgamma, dbeta] = tf.engine().runKernel(BN_TRAINING_GRAD,
        { dy: dys[0], x, mean, meanLow, variance, gamma }, attrs);
      return { x: () => dx, gamma: () => dgamma, beta: () => dbeta };
    },
  };
  const masks = MASK_GRADIENTS.map((kernelName) => {
    const stock = stockGradient(kernelName);
    return {
      kernelName,
      inputsToSave: ['x'],
      gradFunc: (dy, saved, attrs) => {
        if (!onBackend(tf, MASK_GRAD) || dy.dtype !== 'float32' || saved[0].dtype !== 'float32') {
          return stock.gradFunc(dy, saved, attrs);
        }
        return { x: () => tf.engine().runKernel(MASK_GRAD, { dy, x: saved[0] }, MASKS[kernelName](attrs ?? {})) };
      },
    };
  });
  const reluClipGrad = {
    kernelName: RELU_CLIP,
    inputsToSave: ['x'],
    gradFunc: (dy, saved, attrs) => ({ x: () => tf.engine().runKernel(MASK_GRAD, { dy, x: saved[0] },
      { op: 'reluClip', max: attrs.max }) }),
  };
  return [bnGrad, reluClipGrad, ...masks];
}

/**
 * The call of TF.js' ReLU layer with a maxValue (Keras' ReLU(max_value), as ReLU6) as one
 * SplitkerasReluClip kernel each way where the backend has it (TF.js: relu, then clipByValue,
 * and their two gradients); `stockCall` otherwise. registerTrainingKernels puts it on the
 * layer's prototype.
 */
export function fusedReluCall(tf, stockCall) {
  return function call(inputs, kwargs) {
    const x = Array.isArray(inputs) ? inputs[0] : inputs;
    if (this.maxValue == null || x.dtype !== 'float32' || !onBackend(tf, RELU_CLIP)) {
      return stockCall.call(this, inputs, kwargs);
    }
    return tf.engine().runKernel(RELU_CLIP, { x }, { max: this.maxValue, nanToZero: tf.getBackend() === 'wasm' });
  };
}

/**
 * Training-mode batch normalization over the last axis: {y, mean, variance} through the fused
 * kernel where the active backend has it (cpu, wasm once registered), else TF.js' own ops
 * (tf.moments and tf.batchNorm: the same values, slower). Only y carries a gradient.
 */
export function batchNormTrainingOp(tf, x, gamma, beta, epsilon) {
  if (onBackend(tf, BN_TRAINING) && x.dtype === 'float32') {
    const [y, mean, variance] = tf.engine().runKernel(BN_TRAINING, { x, gamma, beta }, { epsilon });
    return { y, mean, variance };
  }
  const axes = x.shape.slice(0, -1).map((_, i) => i);
  const { mean, variance } = tf.moments(x, axes);
  return { y: tf.batchNorm(x, mean, variance, beta, gamma, epsilon), mean, variance };
}
