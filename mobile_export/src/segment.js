// One device segment (a tf.LayersModel) with the step semantics of splitkeras/engine.py.
//
// * `forward(step, inputs)`: the training-mode forward whose outputs are sent.
// * `backward(step, outputGrads)`: the VJP of sum(outputs * g) + regularization for
//   the weights (and the inputs that need it), then one optimizer update.
// * `trainStep(inputs, y, loss, metrics)`: the label segment's step: loss, metrics,
//   update and input gradients in one pass.
//
// TF.js records gradients only while a synchronous function runs, so the tape of
// `forward` cannot wait for the server: `backward` runs the same forward again, on
// the same inputs and weights, under the tape. Two things would differ on that
// second pass, and are made not to:
//   - BatchNormalization moves its moving statistics on every training pass: the
//     non-trainable weights are saved before the recompute and restored after it,
//     so they move once per step, as in Keras.
//   - Dropout draws a new mask on every call: each Dropout layer gets a seed
//     derived from (segment seed, step, layer) for both passes, so the mask that
//     shaped the sent activation is the one differentiated. TF.js cannot seed
//     GaussianNoise, GaussianDropout or AlphaDropout: a segment that recomputes
//     refuses them (they are fine in the label segment, which runs once).

import { metricValues } from './losses.js';

const SEEDED_RANDOM = ['Dropout', 'SpatialDropout1D'];
const UNSEEDABLE_RANDOM = ['GaussianNoise', 'GaussianDropout', 'AlphaDropout'];
// Layers whose `activation` is their last operation (Keras keeps the logits of softmax/sigmoid).
const ACTIVATED = ['Dense', 'Conv1D', 'Conv2D', 'Conv3D', 'Conv2DTranspose', 'Conv3DTranspose',
  'SeparableConv2D', 'DepthwiseConv2D', 'Activation'];

/** A device segment cannot be trained as the split asks. */
export class SegmentError extends Error {
  constructor(message) {
    super(message);
    this.name = 'SegmentError';
  }
}

const asList = (value) => (Array.isArray(value) ? value : [value]);

/** A 31-bit non-zero seed from integers (TF.js treats seed 0 as "no seed"). */
export function deriveSeed(...parts) {
  let hash = 0x811c9dc5;
  for (const part of parts) {
    let value = Math.floor(Math.abs(part)) >>> 0;
    for (let i = 0; i < 4; i += 1) {
      hash ^= value & 0xff;
      hash = Math.imul(hash, 0x01000193) >>> 0;
      value >>>= 8;
    }
  }
  return (hash & 0x7fffffff) || 1;
}

/**
 * Run `fn` (which applies `model`) and capture the pre-activation of the model's
 * output layer when that activation is a softmax or a sigmoid, as Keras keeps it
 * (`_keras_logits`) for the cross-entropies. The logits are kept out of the layer's
 * tidy: the caller disposes them.
 * @returns {{output: object, logits: object|null}}
 */
export function captureLogits(tf, model, fn) {
  const layer = model.outputLayers?.length === 1 ? model.outputLayers[0]
    : (model.getClassName?.() === 'Sequential' ? model.layers[model.layers.length - 1] : null);
  let logits = null;
  let restore = () => {};
  const className = layer?.getClassName?.();
  if (className === 'Softmax' && typeof layer.softmax === 'function') {
    const original = layer.softmax;
    layer.softmax = (x, axis) => {
      logits = tf.keep(x);
      return original(x, axis);
    };
    restore = () => { layer.softmax = original; };
  } else if (ACTIVATED.includes(className) && layer.activation
      && ['softmax', 'sigmoid'].includes(layer.activation.getClassName?.())) {
    const original = layer.activation;
    layer.activation = {
      apply: (x, axis) => {
        logits = tf.keep(x);
        return original.apply(x, axis);
      },
      getClassName: () => original.getClassName(),
      getConfig: () => original.getConfig?.() ?? {},
    };
    restore = () => { layer.activation = original; };
  }
  try {
    const output = fn();
    return { output, logits };
  } finally {
    restore();
  }
}

export class DeviceSegment {
  /**
   * @param {object} tf the @tensorflow/tfjs module
   * @param {object} model a tf.LayersModel (the segment's TF.js bundle)
   * @param {{name: string, inputs: object[], outputs: object[]}} entry its split.json entry
   * @param {{optimizer: object, inputGradients: boolean[], recomputes: boolean, seed: number}} options
   */
  constructor(tf, model, entry, { optimizer, inputGradients, recomputes, seed }) {
    Object.assign(this, { tf, model, entry, optimizer, inputGradients, seed });
    this.name = entry.name;
    this.inputNames = entry.inputs.map((s) => s.name);
    this.outputNames = entry.outputs.map((s) => s.name);
    if (model.inputs.length !== entry.inputs.length || model.outputs.length !== entry.outputs.length) {
      throw new SegmentError(`Segment '${entry.name}': the TF.js model has ${model.inputs.length} `
        + `inputs and ${model.outputs.length} outputs, split.json lists ${entry.inputs.length} and `
        + `${entry.outputs.length}. Load the bundle exported with this split.json.`);
    }
    this.randomLayers = model.layers.filter((l) => SEEDED_RANDOM.includes(l.getClassName()));
    if (recomputes) {
      const unseedable = model.layers.filter((l) => UNSEEDABLE_RANDOM.includes(l.getClassName()));
      if (unseedable.length) {
        const names = unseedable.map((l) => `'${l.name}' (${l.getClassName()})`).join(', ');
        throw new SegmentError(`Segment '${entry.name}' holds ${names}: TF.js cannot seed these `
          + 'layers, so the forward pass the device recomputes for the gradient would draw other '
          + 'noise than the pass it sent. Move them after the last cut (into the label segment) or '
          + 'use Dropout, which the device seeds per step.');
      }
    }
    this.trainable = model.trainableWeights;
    optimizer.build(this.trainable);
    this.pending = new Map();
  }

  call(inputs) {
    return inputs.length === 1 ? inputs[0] : inputs;
  }

  regularization() {
    const losses = this.model.calculateLosses();
    return losses.length ? this.tf.addN(losses) : null;
  }

  withSeeds(step, fn) {
    const originals = this.randomLayers.map((layer) => layer.seed);
    this.randomLayers.forEach((layer, index) => {
      layer.seed = deriveSeed(this.seed, step, index);
    });
    try {
      return fn();
    } finally {
      this.randomLayers.forEach((layer, index) => { layer.seed = originals[index]; });
    }
  }

  /**
   * Training-mode forward of `step`; the caller owns the returned outputs.
   * @returns {{outputs: object[], regularization: number}}
   */
  forward(step, inputs) {
    const { tf } = this;
    let regularization = 0;
    const outputs = this.withSeeds(step, () => tf.tidy(() => {
      const out = asList(this.model.apply(this.call(inputs), { training: true }));
      const reg = this.regularization();
      if (reg) regularization = reg.dataSync()[0];
      return out;
    }));
    this.pending.set(step, { inputs: inputs.map((x) => tf.keep(x.clone())),
      sizes: outputs.map((o) => o.size) });
    return { outputs, regularization };
  }

  hasPending(step) {
    return this.pending.has(step);
  }

  /** Forget a forward whose backward will never come. */
  drop(step) {
    const pending = this.pending.get(step);
    if (pending) pending.inputs.forEach((x) => x.dispose());
    this.pending.delete(step);
  }

  /**
   * The update of `step` from the gradients of its outputs (null: zero).
   * @returns {Array<object|null>} one gradient per input (null where none is needed);
   *   the caller owns them.
   */
  backward(step, outputGrads) {
    const { tf } = this;
    const pending = this.pending.get(step);
    if (!pending) {
      throw new SegmentError(`Segment '${this.name}' has no forward pass for step ${step} to `
        + 'differentiate; run forward(step, ...) first.');
    }
    if (outputGrads.length !== this.outputNames.length) {
      throw new SegmentError(`Segment '${this.name}' has ${this.outputNames.length} outputs, `
        + `received ${outputGrads.length} gradients.`);
    }
    // The VJP is seeded with the outputs' gradients themselves (flattened, concatenated),
    // rather than differentiating sum(outputs * g): that scalar's gradient would first
    // broadcast 1 to the output shape (Sum's gradient: [1,1,1,1] x ones(shape), a slow
    // broadcasting multiply on the cpu backend) and then multiply it by g.
    const seed = tf.tidy(() => {
      const parts = pending.sizes.map((size, i) => (outputGrads[i]
        ? tf.reshape(outputGrads[i], [-1]) : tf.zeros([size])));
      return parts.length === 1 ? parts[0] : tf.concat(parts);
    });
    try {
      return this.withSeeds(step, () => this.differentiate(pending.inputs, (outputs) => {
        const flat = outputs.map((out) => tf.reshape(out, [-1]));
        return flat.length === 1 ? flat[0] : tf.concat(flat);
      }, true, seed).inputGrads);
    } finally {
      seed.dispose();
      this.drop(step);
    }
  }

  /**
   * The label segment's step: loss (+ this segment's regularization), metrics, one
   * update, input gradients.
   * @returns {{inputGrads: Array<object|null>, loss: number, regularization: number,
   *   metrics: Object<string, {sum: number, count: number}>}}
   */
  trainStep(inputs, y, lossSpec, metrics = []) {
    const { tf } = this;
    const result = { loss: 0, regularization: 0, metrics: {} };
    const { inputGrads } = this.differentiate(inputs, (outputs, logits) => {
      const [yPred] = outputs;
      const loss = lossSpec.compute(tf, y, yPred, logits);
      result.loss = loss.dataSync()[0];
      for (const metric of metrics) {
        const values = metricValues(tf, metric, y, yPred);
        result.metrics[metric.name] = { sum: tf.sum(values).dataSync()[0], count: values.size };
        values.dispose();
      }
      return loss;
    }, false);
    Object.assign(result, { inputGrads, regularization: this.lastRegularization });
    return result;
  }

  /** Whether the model has regularization losses (computed once). */
  hasRegularization() {
    this.regularized ??= this.tf.tidy(() => this.model.calculateLosses().length > 0);
    return this.regularized;
  }

  // The gradients of objective(outputs) + regularization for the trainable weights and the
  // inputs that need one; applies the update. Without `seed`, the objective is a scalar; with
  // one, the objective is a flat tensor and `seed` its gradient (the VJP of the outputs), and
  // the regularization joins it as one more element seeded with 1. With `restoreState`, the
  // non-trainable weights (BatchNorm moving statistics) are put back as they were before.
  differentiate(inputs, objective, restoreState, seed = null) {
    const { tf } = this;
    const regularized = this.hasRegularization();
    const saved = restoreState ? this.model.nonTrainableWeights.map((w) => tf.keep(w.read().clone()))
      : [];
    const variables = this.trainable.map((w) => w.read());
    const watched = inputs.filter((_, i) => this.inputGradients[i]);
    let grads = [];
    let logits = null;
    try {
      if (variables.length + watched.length === 0) return { inputGrads: inputs.map(() => null) };
      grads = tf.tidy(() => {
        const dy = seed && regularized ? tf.concat([seed, tf.ones([1])]) : seed;
        const { value, grads: all } = tf.engine().gradients(() => {
          let output;
          ({ output, logits } = captureLogits(tf, this.model,
            () => this.model.apply(this.call(inputs), { training: true })));
          let total = objective(asList(output), logits);
          const reg = this.regularization();
          this.lastRegularization = reg ? reg.dataSync()[0] : 0;
          if (Boolean(reg) !== regularized) {
            throw new SegmentError(`Segment '${this.name}': its regularization losses appeared or `
              + 'vanished between two passes');
          }
          if (reg) total = seed ? tf.concat([total, tf.reshape(reg, [1])]) : tf.add(total, reg);
          return total;
        }, [...variables, ...watched], dy ?? undefined, true);
        value.dispose();
        return all.map((g, i) => g
          ?? (i < variables.length ? null : tf.zerosLike(watched[i - variables.length])));
      });
    } finally {
      logits?.dispose();
      this.model.nonTrainableWeights.forEach((w, i) => {
        if (saved[i]) {
          w.read().assign(saved[i]);
          saved[i].dispose();
        }
      });
    }
    this.optimizer.apply(grads.slice(0, variables.length));
    grads.slice(0, variables.length).forEach((g) => g?.dispose());
    const watchedGrads = grads.slice(variables.length);
    let next = 0;
    return { inputGrads: inputs.map((_, i) => (this.inputGradients[i] ? watchedGrads[next++] : null)) };
  }

  /**
   * The label segment's evaluation of a batch, in inference mode (nothing changes): the loss
   * (Keras' use of the logits behind a softmax/sigmoid output included), this segment's
   * regularization, and each metric's sum and count.
   * @returns {{loss: number, regularization: number,
   *   metrics: Object<string, {sum: number, count: number}>}}
   */
  evaluate(inputs, y, lossSpec, metrics = []) {
    const { tf } = this;
    const result = { loss: 0, regularization: 0, metrics: {} };
    tf.tidy(() => {
      let logits = null;
      try {
        let output;
        ({ output, logits } = captureLogits(tf, this.model,
          () => this.model.apply(this.call(inputs), { training: false })));
        const [yPred] = asList(output);
        result.loss = lossSpec.compute(tf, y, yPred, logits).dataSync()[0];
        for (const metric of metrics) {
          const values = metricValues(tf, metric, y, yPred);
          result.metrics[metric.name] = { sum: tf.sum(values).dataSync()[0], count: values.size };
        }
        const reg = this.regularization();
        if (reg) result.regularization = reg.dataSync()[0];
      } finally {
        logits?.dispose();
      }
    });
    return result;
  }

  /** The regularization loss of the current weights (0 if none). */
  regularizationValue() {
    return this.tf.tidy(() => {
      const reg = this.regularization();
      return reg ? reg.dataSync()[0] : 0;
    });
  }

  /** Inference-mode outputs (the caller owns them). */
  predict(inputs) {
    return this.tf.tidy(() => asList(this.model.apply(this.call(inputs), { training: false })));
  }

  /** Every weight by its Keras name `<layer>/<weight>` (copies). */
  weights() {
    const out = {};
    for (const w of this.model.weights) out[w.originalName] = Float32Array.from(w.read().dataSync());
    return out;
  }
}
