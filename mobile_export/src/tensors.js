// Tensor plumbing of the device step: user inputs to named tensors, tensors to and from
// wire.js bodies, gradient sums. `tf` is passed in, nothing is imported.

const FLOAT_DTYPES = ['float16', 'float32', 'float64'];

/** The split or the arguments do not fit what the device runtime can do. */
export class SplitDeviceError extends Error {
  constructor(message) {
    super(message);
    this.name = 'SplitDeviceError';
  }
}

export const isFloat = (dtype) => FLOAT_DTYPES.includes(dtype);
const isTensor = (tf, value) => value instanceof tf.Tensor;

/** Check a shape against a TensorSpec (null: the batch) and the server's max_batch. */
export function checkShape(spec, shape, what, maxBatch) {
  const ok = shape.length === spec.shape.length
    && spec.shape.every((d, i) => d === null || d === shape[i]);
  if (!ok) {
    const expected = `[${spec.shape.map((d) => (d === null ? 'batch' : d)).join(', ')}]`;
    throw new SplitDeviceError(`${what}: '${spec.name}' has shape [${shape.join(', ')}], expected `
      + expected);
  }
  if (maxBatch && shape[0] > maxBatch) {
    throw new SplitDeviceError(`${what}: batch ${shape[0]} is over the server's max_batch `
      + `${maxBatch}; use smaller batches`);
  }
}

/**
 * The model inputs by name (new tensors the caller disposes).
 * @param x a tf.Tensor (one model input), an array in model-input order, or {name: tensor};
 *   nested arrays and typed arrays are accepted for a single input.
 */
export function namedInputs(tf, specs, x, maxBatch) {
  let values;
  if (isTensor(tf, x)) values = [x];
  else if (Array.isArray(x)) values = specs.length === 1 && !isTensor(tf, x[0]) ? [x] : x;
  else if (x && typeof x === 'object' && !ArrayBuffer.isView(x)) {
    const missing = specs.filter((s) => !(s.name in x)).map((s) => s.name);
    if (missing.length) {
      throw new SplitDeviceError(`x lacks the model inputs ${JSON.stringify(missing)}`);
    }
    values = specs.map((s) => x[s.name]);
  } else {
    throw new SplitDeviceError('x must be a tf.Tensor, an array of them in model-input order, '
      + 'or an object {inputName: tensor}');
  }
  if (values.length !== specs.length) {
    throw new SplitDeviceError(`The model takes ${specs.length} inputs `
      + `${JSON.stringify(specs.map((s) => s.name))}, received ${values.length}`);
  }
  const store = new Map();
  try {
    specs.forEach((spec, i) => {
      const dtype = isFloat(spec.dtype) ? 'float32' : 'int32';
      const value = isTensor(tf, values[i]) ? tf.cast(values[i], dtype)
        : tf.tensor(values[i], undefined, dtype);
      store.set(spec.name, value);
      checkShape(spec, value.shape, 'x', maxBatch);
    });
  } catch (error) {
    for (const t of store.values()) t.dispose();
    throw error;
  }
  return store;
}

/** The labels as a tensor the caller disposes, checked against the batch size. */
export function labelTensor(tf, y, batch) {
  const value = isTensor(tf, y) ? y.clone() : tf.tensor(y);
  if (value.shape[0] !== batch) {
    value.dispose();
    throw new SplitDeviceError(`y has batch ${value.shape[0]}, x has ${batch}`);
  }
  return value;
}

/** wire.js tensors for `names` from `store` (name -> tf.Tensor). */
export async function wireTensors(names, store) {
  return Promise.all(names.map(async (name) => {
    const tensor = store.get(name);
    return { name, dtype: tensor.dtype === 'int32' ? 'int32' : 'float32', shape: tensor.shape,
      data: await tensor.data() };
  }));
}

/** tf.Tensors (name -> tensor) from a decoded body, checked against `specs`. */
export function fromWire(tf, decoded, specs, route) {
  const out = new Map();
  for (const spec of specs) {
    const t = decoded.tensors[spec.name];
    if (!t) {
      for (const made of out.values()) made.dispose();
      throw new SplitDeviceError(`The server's ${route} answer lacks '${spec.name}' (it holds `
        + `${JSON.stringify(Object.keys(decoded.tensors))}). Serve the split folder this app `
        + 'bundle was exported from.');
    }
    checkShape(spec, t.shape, `the server's ${route} answer`);
    out.set(spec.name, tf.tensor(t.data, t.shape, t.dtype === 'int32' ? 'int32' : 'float32'));
  }
  return out;
}

/** Add gradients into `grads` (name -> tensor), summing a tensor's several uses. */
export function addGrads(tf, grads, names, values) {
  names.forEach((name, i) => {
    const g = values[i];
    if (!g) return;
    const previous = grads.get(name);
    if (previous) {
      grads.set(name, tf.add(previous, g));
      previous.dispose();
      g.dispose();
    } else grads.set(name, g);
  });
}
