// Normalizations TF.js 4.22 lacks or gets wrong.
//
// SplitkerasBatchNormalization: Keras 3's BatchNormalization on any axis, with or without
// gamma (scale) and beta (center); TF.js' own layer computes a wrong result on another axis
// than the last and throws when training without gamma or beta. A frozen layer
// (trainable=False) runs in inference mode even when the model trains, as in Keras 3 (TF.js'
// own layer would use batch statistics and move its moving statistics). Training mode: batch
// mean and (biased) variance over every axis but `axis`, and the moving statistics move by
// moving * momentum + batch * (1 - momentum), as Keras 3 moves them.
//
// SplitkerasNormalization: Keras' Normalization layer, (x - mean) / max(sqrt(variance), 1e-7)
// (or its inverse), with the mean and variance adapted (weights `mean`, `variance`, `count`) or
// given as constants (the exporter writes them already broadcast, in `mean` and `variance`).

import { positiveAxis, regularizerOf, single } from './common.js';

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
        let mean;
        let variance;
        if (training) {
          ({ mean, variance } = tf.moments(x, this.reductionAxes, true));
          const update = (variable, value) => {
            const moved = tf.add(tf.mul(variable.read(), this.momentum),
              tf.mul(tf.reshape(value, variable.shape), 1 - this.momentum));
            variable.write(moved);
          };
          update(this.movingMean, mean);
          update(this.movingVariance, variance);
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
