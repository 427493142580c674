// Keras 3 optimizers on TF.js variables, with Keras' update rules to the letter.
//
// TF.js has its own optimizers, but they are not Keras 3's: `tf.train.adam` puts
// epsilon after bias-correcting v (Keras: alpha = lr * sqrt(1 - b2^t) / (1 - b1^t),
// then m * alpha / (sqrt(v) + eps)), `tf.train.rmsprop` and `tf.train.momentum`
// order their terms differently, and none knows clipnorm, clipvalue or Keras'
// decoupled weight decay. So the device runs the rules of keras/src/optimizers/
// (sgd.py, adam.py, rmsprop.py, base_optimizer.py `apply`) itself, in float32 ops:
//
//   clip (clipnorm per variable | clipvalue) -> weight decay (w -= w * wd * lr)
//   -> update_step -> constraint -> iterations += 1
//
// with the learning rate (a constant or a schedule) evaluated at `iterations`.
// Each segment owns one optimizer, as each segment owns one in splitkeras.engine.
//
// Example:
//   const optimizer = createOptimizer(tf, manifest.training.optimizer);
//   optimizer.build(model.trainableWeights);
//   optimizer.apply(grads);   // one tensor (or null) per trainable weight

import { UnsupportedTrainingConfigError } from './losses.js';

const DEFAULTS = {
  SGD: { learning_rate: 0.01, momentum: 0, nesterov: false },
  Adam: { learning_rate: 0.001, beta_1: 0.9, beta_2: 0.999, epsilon: 1e-7, amsgrad: false },
  AdamW: { learning_rate: 0.001, beta_1: 0.9, beta_2: 0.999, epsilon: 1e-7, amsgrad: false,
    weight_decay: 0.004 },
  RMSprop: { learning_rate: 0.001, rho: 0.9, momentum: 0, epsilon: 1e-7, centered: false },
};
const NAMES = { sgd: 'SGD', adam: 'Adam', adamw: 'AdamW', rmsprop: 'RMSprop' };
const SUPPORTED = 'SGD (momentum, nesterov), Adam (amsgrad), AdamW, RMSprop (momentum, centered)';

function refuse(message) {
  throw new UnsupportedTrainingConfigError(message);
}

/** A learning rate: a number, or a serialized Keras LearningRateSchedule. */
function learningRateFunction(tf, value) {
  if (typeof value === 'number') return () => tf.scalar(value);
  if (!value || typeof value !== 'object' || typeof value.class_name !== 'string') {
    refuse(`The learning rate ${JSON.stringify(value)} is neither a number nor a Keras schedule`);
  }
  const c = value.config ?? {};
  const f32 = (x) => tf.scalar(x, 'float32');
  switch (value.class_name) {
    case 'ExponentialDecay':
    case 'InverseTimeDecay':
      return (step) => tf.tidy(() => {
        let p = tf.div(f32(step), f32(c.decay_steps));
        if (c.staircase) p = tf.floor(p);
        if (value.class_name === 'ExponentialDecay') {
          return tf.mul(f32(c.initial_learning_rate), tf.pow(f32(c.decay_rate), p));
        }
        return tf.div(f32(c.initial_learning_rate), tf.add(f32(1), tf.mul(f32(c.decay_rate), p)));
      });
    case 'PiecewiseConstantDecay':
      return (step) => {
        const { boundaries, values } = c;
        let index = boundaries.findIndex((boundary) => step <= boundary);
        if (index < 0) index = values.length - 1;
        return f32(values[index]);
      };
    default:
      return refuse(`The learning-rate schedule '${value.class_name}' is not implemented on the `
        + 'device; use a constant, ExponentialDecay, InverseTimeDecay or PiecewiseConstantDecay');
  }
}

/**
 * A Keras 3 optimizer from its serialized config (split.json `training.optimizer`).
 * @param {object} tf the @tensorflow/tfjs module
 * @param {string|object} config e.g. {class_name: "Adam", config: {learning_rate: 0.001, ...}}
 * @returns {KerasOptimizer}
 */
export function createOptimizer(tf, config) {
  let className;
  let options;
  if (typeof config === 'string') {
    className = NAMES[config.toLowerCase()];
    options = {};
  } else if (config && typeof config === 'object') {
    className = config.class_name;
    options = config.config ?? {};
  }
  if (!DEFAULTS[className]) {
    refuse(`The optimizer ${JSON.stringify(className ?? config)} is not implemented on the device; `
      + `supported: ${SUPPORTED}`);
  }
  return new KerasOptimizer(tf, className, { ...DEFAULTS[className], ...options });
}

export class KerasOptimizer {
  constructor(tf, className, config) {
    for (const [key, unsupported, fix] of [
      ['global_clipnorm', (v) => v, 'global_clipnorm needs the norm of ALL gradients of the '
        + 'model, which no single segment sees; use clipnorm (per variable) or clipvalue'],
      ['use_ema', (v) => v, 'use_ema is not implemented on the device; train without it'],
      ['gradient_accumulation_steps', (v) => v, 'gradient_accumulation_steps is not implemented '
        + 'on the device; use larger batches'],
      ['loss_scale_factor', (v) => v !== null && v !== undefined && v !== 1,
        'loss_scale_factor is for mixed precision, which the device does not use; remove it'],
    ]) {
      if (unsupported(config[key])) refuse(`${className}: ${fix}`);
    }
    this.tf = tf;
    this.className = className;
    this.config = config;
    this.learningRateAt = learningRateFunction(tf, config.learning_rate);
    this.iterations = 0;
    this.variables = null;
    this.slots = [];
  }

  /** Create the optimizer state (zeros) for `weights` (TF.js LayerVariables or tf.Variables). */
  build(weights) {
    const { tf, config } = this;
    // LayerVariables (read/write; write applies the constraint) or plain tf.Variables.
    this.variables = weights.map((w) => (typeof w.read === 'function' ? w
      : { read: () => w, write: (value) => w.assign(value), shape: w.shape, name: w.name }));
    const zeros = (w) => tf.variable(tf.zeros(w.shape), false);
    this.slots = this.variables.map((w) => {
      const slot = {};
      if (this.className === 'SGD' && config.momentum !== 0) slot.momentum = zeros(w);
      if (this.className === 'Adam' || this.className === 'AdamW') {
        slot.m = zeros(w);
        slot.v = zeros(w);
        if (config.amsgrad) slot.vHat = zeros(w);
      }
      if (this.className === 'RMSprop') {
        slot.velocity = zeros(w);
        if (config.momentum > 0) slot.momentum = zeros(w);
        if (config.centered) slot.averageGradient = zeros(w);
      }
      return slot;
    });
    return this;
  }

  /** The learning rate of the next update (a schedule is evaluated at `iterations`). */
  currentLearningRate() {
    const lr = this.learningRateAt(this.iterations);
    const value = lr.dataSync()[0];
    lr.dispose();
    return value;
  }

  /**
   * One update: `grads[i]` is the gradient of `weights[i]` (null: no gradient, the
   * variable is left alone, as Keras filters empty gradients).
   */
  apply(grads) {
    const { tf, config } = this;
    if (!this.variables) throw new Error('KerasOptimizer.apply before build(weights)');
    if (grads.length !== this.variables.length) {
      throw new Error(`KerasOptimizer.apply: ${grads.length} gradients for `
        + `${this.variables.length} variables`);
    }
    tf.tidy(() => {
      const lr = this.learningRateAt(this.iterations);
      const t = this.iterations + 1;
      grads.forEach((grad, index) => {
        if (grad === null || grad === undefined) return;
        const weight = this.variables[index];
        const g = clip(tf, config, grad);
        let w = weight.read();
        if (config.weight_decay) w = tf.sub(w, tf.mul(tf.mul(w, config.weight_decay), lr));
        weight.write(this.updateStep(g, w, lr, this.slots[index], t));
      });
    });
    this.iterations += 1;
  }

  updateStep(g, w, lr, slot, t) {
    const { tf, config } = this;
    if (this.className === 'SGD') {
      if (!slot.momentum) return tf.sub(w, tf.mul(g, lr));
      const m = tf.sub(tf.mul(slot.momentum, config.momentum), tf.mul(g, lr));
      slot.momentum.assign(m);
      if (config.nesterov) {
        return tf.add(w, tf.sub(tf.mul(m, config.momentum), tf.mul(g, lr)));
      }
      return tf.add(w, m);
    }
    if (this.className === 'Adam' || this.className === 'AdamW') {
      const step = tf.scalar(t);
      const beta1Power = tf.pow(tf.scalar(config.beta_1), step);
      const beta2Power = tf.pow(tf.scalar(config.beta_2), step);
      const alpha = tf.div(tf.mul(lr, tf.sqrt(tf.sub(1, beta2Power))), tf.sub(1, beta1Power));
      slot.m.assign(tf.add(slot.m, tf.mul(tf.sub(g, slot.m), 1 - config.beta_1)));
      slot.v.assign(tf.add(slot.v, tf.mul(tf.sub(tf.square(g), slot.v), 1 - config.beta_2)));
      let v = slot.v;
      if (slot.vHat) {
        slot.vHat.assign(tf.maximum(slot.vHat, slot.v));
        v = slot.vHat;
      }
      return tf.sub(w, tf.div(tf.mul(slot.m, alpha), tf.add(tf.sqrt(v), config.epsilon)));
    }
    // RMSprop
    const { rho } = config;
    slot.velocity.assign(tf.add(tf.mul(rho, slot.velocity), tf.mul(1 - rho, tf.square(g))));
    let denominator;
    if (slot.averageGradient) {
      slot.averageGradient.assign(tf.add(tf.mul(rho, slot.averageGradient), tf.mul(1 - rho, g)));
      denominator = tf.add(tf.sub(slot.velocity, tf.square(slot.averageGradient)), config.epsilon);
    } else {
      denominator = tf.add(slot.velocity, config.epsilon);
    }
    const increment = tf.div(tf.mul(lr, g), tf.sqrt(denominator));
    if (slot.momentum) {
      slot.momentum.assign(tf.add(tf.mul(config.momentum, slot.momentum), increment));
      return tf.sub(w, slot.momentum);
    }
    return tf.sub(w, increment);
  }

  /** Free the optimizer state. */
  dispose() {
    for (const slot of this.slots) Object.values(slot).forEach((v) => v.dispose());
    this.slots = [];
  }
}

// base_optimizer._clip_gradients: clipnorm (tf.clip_by_norm, per variable), else clipvalue.
function clip(tf, config, grad) {
  if (config.clipnorm && config.clipnorm > 0) {
    const l2sum = tf.sum(tf.square(grad));
    const positive = tf.greater(l2sum, 0);
    const l2norm = tf.where(positive, tf.sqrt(tf.where(positive, l2sum, tf.onesLike(l2sum))), l2sum);
    return tf.div(tf.mul(grad, config.clipnorm), tf.maximum(l2norm, config.clipnorm));
  }
  if (config.clipvalue && config.clipvalue > 0) {
    return tf.clipByValue(grad, -config.clipvalue, config.clipvalue);
  }
  return grad;
}
