// Normalizations TF.js 4.22 lacks or gets wrong.
//
// SplitkerasBatchNormalization: Keras 3's BatchNormalization on any axis, with or without
// gamma (scale) and beta (center); TF.js' own layer computes a wrong result on another axis
// than the last and throws when training without gamma or beta. A frozen layer
// (trainable=False) runs in inference mode even when the model trains, as in Keras 3 (TF.js'
// own layer would use batch statistics and move its moving statistics). Training mode: batch
// mean and (biased) variance over every axis but `axis`, and the moving statistics move by
// moving * momentum + batch * (1 - momentum), as Keras 3 moves them; over the last axis through
// the fused kernel of norm_kernels.js (one pass for the statistics' sums, one for the gradient).
//
// SplitkerasNormalization: Keras' Normalization layer, (x - mean) / max(sqrt(variance), 1e-7)
// (or its inverse), with the mean and variance adapted (weights `mean`, `variance`, `count`) or
// given as constants (the exporter writes them already broadcast, in `mean` and `variance`).

import { batchNormTrainingOp } from '../norm_kernels.js';
import { positiveAxis, regularizerOf, single } from './common.js';

/** Keras 3's update: moving = moving * momentum + batch * (1 - momentum), mean and variance. */
function moveStatistics(tf, layer, mean, variance) {
  for (const [variable, value] of [[layer.movingMean, mean], [layer.movingVariance, variance]]) {
    variable.write(tf.add(tf.mul(variable.read(), layer.momentum),
      tf.mul(tf.reshape(value, variable.shape), 1 - layer.momentum)));
  }
}

/** Training mode over the last axis through the fused kernel (norm_kernels.js): y; moves the statistics. */
function trainingBatchNorm(tf, layer, x, gamma, beta) {
  const { y, mean, variance } = batchNormTrainingOp(tf, x, gamma, beta, layer.epsilon);
  moveStatistics(tf, layer, mean, variance);
  return y;
}

/**
 * The training call of TF.js' own BatchNormalization (what the exporter writes for a Keras
 * BatchNormalization over the last axis, with gamma and beta) through the fused kernel, moving
 * the statistics as Keras 3 does; inference and every other case go to `stockCall`, TF.js' own.
 * registerTrainingKernels (kernels.js) puts it on the class's prototype, so that every
 * instance, loaded before or after, trains through it; restore() puts `stockCall` back.
 * @param {object} tf the @tensorflow/tfjs module
 * @param {Function} stockCall TF.js' BatchNormalization.prototype.call
 */
export function fusedBatchNormCall(tf, stockCall) {
  return function call(inputs, kwargs) {
    const x = single(inputs);
    const rank = x.shape.length;
    if (!kwargs?.training || positiveAxis(this.axis, rank) !== rank - 1 || !this.gamma || !this.beta) {
      return stockCall.call(this, inputs, kwargs);
    }
    return tf.tidy(() => trainingBatchNorm(tf, this, x, this.gamma.read(), this.beta.read()));
  };
}

const KERAS_EPSILON = 1e-7; // keras.backend.epsilon()

export function defineNormalizations(tf) {
  const { Layer } = tf.layers;

  class SplitkerasBatchNormalization extends Layer {
    constructor(config) {
      super(config);
      this.axis = config.axis ?? -1;
      this.momentum = config.momentum ?? 0.99;
      this.epsilon = config.epsilon ?? 1e-3;
      this.center = config.center ?? true;
      this.scale = config.scale ?? true;
      this.betaRegularizerConfig = config.betaRegularizer ?? null;
      this.gammaRegularizerConfig = config.gammaRegularizer ?? null;
    }

    build(inputShape) {
      const rank = inputShape.length;
      const axis = positiveAxis(this.axis, rank);
      const dim = inputShape[axis];
      this.reductionAxes = Array.from({ length: rank }, (_, i) => i).filter((i) => i !== axis);
      this.broadcastShape = Array.from({ length: rank }, (_, i) => (i === axis ? dim : 1));
      const ones = tf.initializers.ones();
      const zeros = tf.initializers.zeros();
      // Keras' weight order: gamma, beta, moving_mean, moving_variance
      if (this.scale) {
        this.gamma = this.addWeight('gamma', [dim], 'float32', ones,
          regularizerOf(tf, this.gammaRegularizerConfig), true);
      }
      if (this.center) {
        this.beta = this.addWeight('beta', [dim], 'float32', zeros,
          regularizerOf(tf, this.betaRegularizerConfig), true);
      }
      this.movingMean = this.addWeight('moving_mean', [dim], 'float32', zeros, null, false);
      this.movingVariance = this.addWeight('moving_variance', [dim], 'float32', ones, null, false);
      this.built = true;
    }

    call(inputs, kwargs) {
      const training = Boolean(kwargs?.training) && this.trainable;
      return tf.tidy(() => {
        const x = single(inputs);
        const last = positiveAxis(this.axis, x.shape.length) === x.shape.length - 1;
        if (training && last) {
          // the fused kernel, with the gamma and beta Keras leaves out as ones and zeros
          const dim = x.shape[x.shape.length - 1];
          const gamma = this.scale ? this.gamma.read() : tf.ones([dim]);
          const beta = this.center ? this.beta.read() : tf.zeros([dim]);
          return trainingBatchNorm(tf, this, x, gamma, beta);
        }
        let mean;
        let variance;
        if (training) {
          ({ mean, variance } = tf.moments(x, this.reductionAxes, true));
          moveStatistics(tf, this, mean, variance);
        } else {
          mean = tf.reshape(this.movingMean.read(), this.broadcastShape);
          variance = tf.reshape(this.movingVariance.read(), this.broadcastShape);
        }
        let inv = tf.rsqrt(tf.add(variance, this.epsilon));
        if (this.scale) inv = tf.mul(inv, tf.reshape(this.gamma.read(), this.broadcastShape));
        let y = tf.mul(tf.sub(x, mean), inv);
        if (this.center) y = tf.add(y, tf.reshape(this.beta.read(), this.broadcastShape));
        return y;
      });
    }

    computeOutputShape(inputShape) {
      return inputShape;
    }

    getConfig() {
      return {
        ...super.getConfig(),
        axis: this.axis,
        momentum: this.momentum,
        epsilon: this.epsilon,
        center: this.center,
        scale: this.scale,
        betaRegularizer: this.betaRegularizerConfig,
        gammaRegularizer: this.gammaRegularizerConfig,
      };
    }
  }
  SplitkerasBatchNormalization.className = 'SplitkerasBatchNormalization';

  class SplitkerasNormalization extends Layer {
    constructor(config) {
      super(config);
      this.axis = config.axis ?? [];
      this.invert = config.invert ?? false;
      this.mean = config.mean ?? null;
      this.variance = config.variance ?? null;
      this.broadcastShape = config.broadcastShape;
    }

    build(inputShape) {
      if (this.mean == null) {
        const shape = this.axis.map((a) => inputShape[a]);
        this.meanWeight = this.addWeight('mean', shape, 'float32', tf.initializers.zeros(), null, false);
        this.varianceWeight = this.addWeight('variance', shape, 'float32', tf.initializers.ones(), null, false);
        this.count = this.addWeight('count', [], 'int32', tf.initializers.zeros(), null, false);
      }
      this.built = true;
    }

    call(inputs) {
      return tf.tidy(() => {
        const x = single(inputs);
        const mean = this.mean == null ? tf.reshape(this.meanWeight.read(), this.broadcastShape)
          : tf.tensor(this.mean, this.broadcastShape, 'float32');
        const variance = this.variance == null
          ? tf.reshape(this.varianceWeight.read(), this.broadcastShape)
          : tf.tensor(this.variance, this.broadcastShape, 'float32');
        const std = tf.maximum(tf.sqrt(variance), KERAS_EPSILON);
        return this.invert ? tf.add(mean, tf.mul(x, std)) : tf.div(tf.sub(x, mean), std);
      });
    }

    computeOutputShape(inputShape) {
      return inputShape;
    }

    getConfig() {
      return {
        ...super.getConfig(),
        axis: this.axis,
        invert: this.invert,
        mean: this.mean,
        variance: this.variance,
        broadcastShape: this.broadcastShape,
      };
    }
  }
  SplitkerasNormalization.className = 'SplitkerasNormalization';

  return [SplitkerasBatchNormalization, SplitkerasNormalization];
}
