// Keras 3 records keras.ops calls on symbolic tensors (`x + 3.0`, `ops.multiply(a, b)`,
// `ops.mean(x, axis=1)`) in a functional model as operations, e.g. MobileNetV3's hard sigmoid
// `ReLU(6)(x + 3.0) * (1 / 6)` and ConvNeXt's residual `ops.add`. The exporter writes each as a
// SplitkerasOperation layer: `op` names the operation, `operands` lists its arguments in order,
// null where an input tensor goes and the number (or nested list) where Keras recorded a
// constant; `axis`, `keepdims`, `axes`, `approximate` are the operation's settings.
// Also the Subtract layer (TF.js 4.22 has none): op 'subtract', operands [null, null].

import { broadcastShapes, positiveAxis } from './common.js';
import { hardSigmoid } from './activations.js';

const GELU_TANH = Math.sqrt(2 / Math.PI);

function unary(tf) {
  return {
    negative: (x) => tf.neg(x),
    abs: (x) => tf.abs(x),
    square: (x) => tf.square(x),
    sqrt: (x) => tf.sqrt(x),
    exp: (x) => tf.exp(x),
    log: (x) => tf.log(x),
    tanh: (x) => tf.tanh(x),
    sigmoid: (x) => tf.sigmoid(x),
    relu: (x) => tf.relu(x),
    relu6: (x) => tf.relu6(x),
    silu: (x) => tf.mul(x, tf.sigmoid(x)),
    hardSigmoid: (x) => hardSigmoid(tf, x),
    hardSilu: (x) => tf.mul(x, hardSigmoid(tf, x)),
    softplus: (x) => tf.softplus(x),
    gelu: (x, settings) => (settings.approximate
      ? tf.mul(tf.mul(0.5, x), tf.add(1, tf.tanh(tf.mul(GELU_TANH, tf.add(x, tf.mul(0.044715, tf.pow(x, 3)))))))
      : tf.mul(tf.mul(0.5, x), tf.add(1, tf.erf(tf.div(x, Math.SQRT2))))),
    softmax: (x, settings) => softmaxOn(tf, x, settings.axis ?? -1),
  };
}

function softmaxOn(tf, x, axis) {
  const rank = x.rank;
  const a = positiveAxis(axis, rank);
  if (a === rank - 1) return tf.softmax(x);
  const perm = Array.from({ length: rank }, (_, i) => i);
  perm[a] = rank - 1;
  perm[rank - 1] = a;
  return tf.transpose(tf.softmax(tf.transpose(x, perm)), perm);
}

function binary(tf) {
  return {
    add: (a, b) => tf.add(a, b),
    subtract: (a, b) => tf.sub(a, b),
    multiply: (a, b) => tf.mul(a, b),
    divide: (a, b) => tf.div(a, b),
    maximum: (a, b) => tf.maximum(a, b),
    minimum: (a, b) => tf.minimum(a, b),
    power: (a, b) => tf.pow(a, b),
    matmul: (a, b) => tf.matMul(a, b),
  };
}

const REDUCTIONS = ['mean', 'sum', 'max', 'min'];

function reductionAxes(axis, rank) {
  if (axis == null) return Array.from({ length: rank }, (_, i) => i);
  return (Array.isArray(axis) ? axis : [axis]).map((a) => positiveAxis(a, rank));
}

export function defineOperations(tf) {
  const UNARY = unary(tf);
  const BINARY = binary(tf);
  const known = [...Object.keys(UNARY), ...Object.keys(BINARY), ...REDUCTIONS, 'transpose'];

  class SplitkerasOperation extends tf.layers.Layer {
    constructor(config) {
      super(config);
      this.op = config.op;
      if (!known.includes(this.op)) {
        throw new Error(`SplitkerasOperation '${config.name}': unknown operation '${this.op}'; `
          + `this runtime knows ${known.join(', ')}`);
      }
      this.operands = config.operands ?? [null];
      this.settings = {};
      for (const key of ['axis', 'keepdims', 'axes', 'approximate']) {
        if (config[key] !== undefined) this.settings[key] = config[key];
      }
    }

    // The operands in order: the input tensors where the template has null, constants elsewhere.
    arguments(inputs) {
      const tensors = Array.isArray(inputs) ? inputs.slice() : [inputs];
      return this.operands.map((operand) => (operand === null ? tensors.shift()
        : tf.tensor(operand, undefined, 'float32')));
    }

    call(inputs) {
      return tf.tidy(() => {
        const args = this.arguments(inputs);
        const { op, settings } = this;
        if (op in BINARY) return BINARY[op](args[0], args[1]);
        if (op in UNARY) return UNARY[op](args[0], settings);
        const x = args[0];
        if (op === 'transpose') return tf.transpose(x, settings.axes ?? undefined);
        const axes = reductionAxes(settings.axis, x.rank);
        return tf[op](x, axes, Boolean(settings.keepdims));
      });
    }

    computeOutputShape(inputShape) {
      const shapes = Array.isArray(inputShape[0]) ? inputShape.slice() : [inputShape];
      const args = this.operands.map((operand) => {
        if (operand === null) return shapes.shift();
        const shape = [];
        for (let value = operand; Array.isArray(value); value = value[0]) shape.push(value.length);
        return shape;
      });
      const { op, settings } = this;
      if (op === 'matmul') {
        const [a, b] = args;
        const batch = broadcastShapes([a.slice(0, -2), b.slice(0, -2)]);
        return [...batch, a[a.length - 2], b[b.length - 1]];
      }
      if (op in BINARY) return broadcastShapes(args);
      const x = args[0];
      if (op in UNARY) return x;
      if (op === 'transpose') {
        const axes = settings.axes ?? x.map((_, i) => x.length - 1 - i);
        return axes.map((a) => x[a]);
      }
      const axes = reductionAxes(settings.axis, x.length);
      if (settings.keepdims) return x.map((d, i) => (axes.includes(i) ? 1 : d));
      return x.filter((_, i) => !axes.includes(i));
    }

    getConfig() {
      return { ...super.getConfig(), op: this.op, operands: this.operands, ...this.settings };
    }
  }
  SplitkerasOperation.className = 'SplitkerasOperation';

  return [SplitkerasOperation];
}
