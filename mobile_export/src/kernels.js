// Training kernels the device runtime registers with TF.js (4.22), so that a device segment
// trains fast on the pure-JS `cpu` backend and trains at all, and right, on the `wasm` backend.
// What the stock kernels do (measured in test/kernels.test.js and benchmarks/device_step.py):
//
//   kernel                               | cpu (stock)                        | wasm (stock)
//   Conv2DBackpropFilter                 | replaced: a naive loop, ~40-60x    | missing: added
//                                        |   slower than the forward conv     |
//   Conv2D, FusedConv2D, Conv2DBackprop- | replaced: im2col + gemm.js         | input grad replaced:
//     Input                              |                                    |   im2col + XNNPACK
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
//   Sum, Mean, broadcast arithmetic and  | replaced: contiguous loops         | Tile replaced
//     comparisons, Relu/Relu6/Clip, Tile |   (generic_kernels.js)             |
//   BatchNormalization in training       | added: SplitkerasBatchNormTraining(Grad), one fused kernel
//     (~15 elementwise ops each way)     |   each way (norm_kernels.js), cpu and wasm
//   Relu, Relu6, ClipByValue gradients   | added: SplitkerasMaskGrad, one pass (both backends)
//   ReLU(maxValue) layer: relu + clip    | added: SplitkerasReluClip, one pass each way (both)
//
// The fused BatchNorm kernels are reached through the layers: the training call of TF.js'
// BatchNormalization (its prototype's `call`, so every instance) and SplitkerasBatchNormalization's
// run them (layers/normalization.js), TF.js' ReLU layer with a maxValue runs SplitkerasReluClip;
// the Relu, Relu6 and ClipByValue gradients are registered anew (tf.registerGradient) to run
// SplitkerasMaskGrad, the stock gradient on other backends.
//
// Everything else a conv/depthwise/pooling/BatchNorm/Dense model needs to train is stock on
// both backends (test/kernels.test.js trains such a model on each). The kernels are plain loops
// over float32 data in NHWC order, by concept: conv_kernels.js (im2col + matrix products),
// depthwise_kernels.js, pool_kernels.js, generic_kernels.js, norm_kernels.js, over the helpers
// of kernel_setup.js (the window taps of each output position, TF.js' own padding from
// `backend_util.computeConv2DInfo` / `computePool2DInfo`, so 'same', 'valid', explicit and
// dimRoundingMode paddings mean what they mean to the stock kernels). Sums run in float64 (as
// the stock cpu kernels do). NCHW (channelsFirst) falls back to the stock kernel where there is one.
//
// They are checked against the stock kernels and against TensorFlow/Keras numbers
// (test/kernels.test.js, test/norm_kernels.test.js, test/fixtures/kernel_fixtures.json,
// <= 1e-5 relative).
//
// Example:
//   import * as tf from '@tensorflow/tfjs';
//   import '@tensorflow/tfjs-backend-wasm';
//   import { registerTrainingKernels } from 'splitkeras-device';
//   registerTrainingKernels(tf);          // SplitDevice.create does this unless kernels: false
//   await tf.setBackend('wasm');

import { CONV_FACTORIES } from './conv_kernels.js';
import { DEPTHWISE_FACTORIES } from './depthwise_kernels.js';
import { BINARY_KERNELS, REDUCE_KERNELS, UNARY_KERNELS, binaryKernel, reduceKernel, segmentSumKernel, tileKernel,
  unaryKernel, untransposedMatMulKernel } from './generic_kernels.js';
import { fusedBatchNormCall } from './layers/normalization.js';
import { BN_TRAINING, BN_TRAINING_GRAD, MASK_GRAD, MASK_GRADIENTS, NORM_KERNEL_FUNCS, RELU_CLIP, fusedReluCall,
  normGradients } from './norm_kernels.js';
import { POOL_FACTORIES } from './pool_kernels.js';

const FUSED = Symbol.for('splitkeras.fusedBatchNormCall');
const NORM = [BN_TRAINING, BN_TRAINING_GRAD, MASK_GRAD, RELU_CLIP];

// The kernels registered for each backend.
export const TRAINING_KERNELS = {
  cpu: ['Conv2D', 'FusedConv2D', 'Conv2DBackpropFilter', 'Conv2DBackpropInput',
    'DepthwiseConv2dNativeBackpropFilter',
    'DepthwiseConv2dNativeBackpropInput', 'DepthwiseConv2dNative', 'AvgPoolGrad', 'Tile',
    ...REDUCE_KERNELS, ...BINARY_KERNELS, ...UNARY_KERNELS, ...NORM],
  wasm: ['Conv2DBackpropFilter', 'Conv2DBackpropInput', 'DepthwiseConv2dNativeBackpropFilter',
    'DepthwiseConv2dNativeBackpropInput', 'MaxPoolGrad', 'AvgPoolGrad', 'UnsortedSegmentSum', 'Tile',
    'BatchMatMul', ...NORM],
};

// kernelFunc factories (tf, backendName, stock) -> kernelFunc; `stock` is the backend's own
// kernel (or undefined) for what they do not handle.
const FACTORIES = {
  ...CONV_FACTORIES,
  ...DEPTHWISE_FACTORIES,
  ...POOL_FACTORIES,
  UnsortedSegmentSum: (tf, backendName, stock) => segmentSumKernel(backendName, stock),
  BatchMatMul: (tf, backendName, stock) => untransposedMatMulKernel(stock),
  Tile: (tf, backendName, stock) => tileKernel(stock),
  ...Object.fromEntries(NORM.map((name) => [name, () => NORM_KERNEL_FUNCS[name]])),
  ...Object.fromEntries(REDUCE_KERNELS.map((name) => [name, (tf, b, stock) => reduceKernel(name, stock, tf)])),
  ...Object.fromEntries(BINARY_KERNELS.map((name) => [name, (tf, b, stock) => binaryKernel(name, stock)])),
  ...Object.fromEntries(UNARY_KERNELS.map((name) => [name, (tf, b, stock) => unaryKernel(name, stock)])),
};

// The backend instance if it has been initialized (setting it up would start it otherwise).
const startedBackend = (tf, backendName) => tf.engine?.().registry?.[backendName] ?? null;

// tf module -> {backendName: {kernelName: stock config or null}} of what this module replaced,
// and `paths`: the stock gradient configs and BatchNormalization class it replaced.
const REGISTERED = new WeakMap();

// The calls of TF.js' layers that train through norm_kernels.js, put on their prototypes (so
// instances loaded before registering train through them too), each falling back to the stock call.
// (The classes from TF.js' class map: making an instance would move its automatic layer names.)
const LAYER_CALLS = [['BatchNormalization', fusedBatchNormCall], ['ReLU', fusedReluCall]];

// The gradients of norm_kernels.js (for every backend: they fall back to the stock gradient
// where the backend lacks SplitkerasMaskGrad) and the LAYER_CALLS.
function registerTrainingPaths(tf, state) {
  if (state.paths) return;
  const gradients = Object.fromEntries(MASK_GRADIENTS.map((name) => [name, tf.getGradient(name)]));
  for (const config of normGradients(tf, (name) => gradients[name])) tf.registerGradient(config);
  const calls = [];
  const classes = tf.serialization.SerializationMap.getMap().classNameMap;
  for (const [className, fused] of LAYER_CALLS) {
    const prototype = classes[className]?.[0]?.prototype;
    if (!prototype) continue;
    const stockCall = prototype.call;
    if (stockCall[FUSED]) continue; // another namespace object of the same TF.js has put it there
    prototype.call = fused(tf, stockCall);
    prototype.call[FUSED] = true;
    calls.push({ prototype, stockCall });
  }
  state.paths = { gradients, calls };
}

function restoreTrainingPaths(tf, state) {
  if (!state.paths) return;
  const { gradients, calls } = state.paths;
  for (const config of Object.values(gradients)) if (config) tf.registerGradient(config);
  for (const { prototype, stockCall } of calls) prototype.call = stockCall;
  delete state.paths;
}

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
  const known = (backendName) => Object.prototype.hasOwnProperty.call(TRAINING_KERNELS, backendName);
  const unknown = backends.find((backendName) => !known(backendName));
  if (unknown !== undefined) {
    throw new Error(`registerTrainingKernels: no kernels for backend '${unknown}'; `
      + `known: ${Object.keys(TRAINING_KERNELS).join(', ')}`);
  }
  const registered = [];
  registerTrainingPaths(tf, state);
  for (const backendName of backends) {
    const names = TRAINING_KERNELS[backendName];
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
    restoreTrainingPaths(tf, state);
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
