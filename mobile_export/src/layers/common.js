// Helpers shared by the layer classes of this folder.
//
// Configs arrive as TF.js hands them to a layer's constructor: keys camel-cased
// (`kernel_size` -> `kernelSize`) and string values camel-cased too (`'hard_sigmoid'` ->
// `'hardSigmoid'`), so the exporter writes strings without underscores where it can.

/** The one tensor of a single-input layer (TF.js passes a list for a layer called on a list). */
export const single = (inputs) => (Array.isArray(inputs) ? inputs[0] : inputs);

/** A shape or the first of several shapes. */
export const singleShape = (shape) => (Array.isArray(shape[0]) ? shape[0] : shape);

/** An integer or a list of integers as a list of `n`. */
export function tuple(value, n) {
  if (Array.isArray(value)) return value.slice();
  return Array(n).fill(value);
}

/** A TF.js activation object (`apply(x)`) from its TF.js name (camel case, as loaded). */
export function activationOf(tf, name) {
  return tf.layers.activation({ activation: name ?? 'linear' }).activation;
}

/** A regularizer from its exported config (`{className: 'L1L2', config: {l1, l2}}`), or null. */
export function regularizerOf(tf, config) {
  if (config == null) return null;
  if (config.className !== 'L1L2') {
    throw new Error(`unsupported regularizer ${JSON.stringify(config)}; the exporter writes L1L2 only`);
  }
  const { l1 = 0, l2 = 0 } = config.config ?? {};
  return tf.regularizers.l1l2({ l1, l2 });
}

/** Output length of a convolution or pooling window along one axis (TF semantics). */
export function windowOutput(size, window, stride, padding) {
  if (size == null) return null;
  if (padding === 'same' || padding === 'causal') return Math.ceil(size / stride);
  return Math.max(0, Math.floor((size - window) / stride) + 1);
}

/** TensorFlow's 'same' padding of one axis: [before, after]. */
export function samePadding(size, window, stride) {
  const out = Math.ceil(size / stride);
  const total = Math.max((out - 1) * stride + window - size, 0);
  const before = Math.floor(total / 2);
  return [before, total - before];
}

/** Numpy broadcasting of shapes with unknown (null) dimensions. */
export function broadcastShapes(shapes) {
  const rank = Math.max(...shapes.map((s) => s.length));
  const out = [];
  for (let i = 0; i < rank; i += 1) {
    let dim = 1;
    for (const shape of shapes) {
      const d = shape[shape.length - rank + i];
      if (d === undefined || d === 1) continue;
      if (d === null) {
        if (dim === 1) dim = null;
      } else {
        dim = d;
      }
    }
    out.push(dim);
  }
  return out;
}

/** Normalize a possibly negative axis. */
export const positiveAxis = (axis, rank) => (axis < 0 ? axis + rank : axis);
