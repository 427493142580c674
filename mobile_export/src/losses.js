// Losses and metrics of a split's training config, computed as Keras 3 computes them.
//
// `resolveLoss(config)` reads the `loss` entry of split.json's `training` (a name
// such as "sparse_categorical_crossentropy", or a serialized loss object) and
// returns a loss whose `compute(tf, yTrue, yPred, logits)` gives the scalar that
// Keras' compiled loss gives: the per-sample loss of `keras.losses.<name>` (same
// clipping at 1e-7, same squeeze/expand of the labels), reduced with
// "sum_over_batch_size" (sum / number of elements).
//
// Keras' softmax and sigmoid activations remember their input ("_keras_logits"),
// and the cross-entropies then work from those logits instead of the clipped
// probabilities (Keras 3, backend/tensorflow/nn.py `_get_logits`). Pass the
// captured pre-activation as `logits` (see segment.js `captureLogits`) to get the
// same numbers, saturated outputs included.
//
// `resolveMetrics(config, lossSpec)` maps `metrics` (["accuracy"], "acc", or
// serialized metric objects) to the accuracies below; `"accuracy"` resolves to
// binary, sparse categorical or categorical accuracy by the rule of Keras'
// `compile_utils.get_metric`.
//
// Runs anywhere TF.js runs: `tf` is passed in, nothing is imported.

export const EPSILON = 1e-7; // keras.backend.epsilon()

/** The split's training config asks for something this runtime cannot compute. */
export class UnsupportedTrainingConfigError extends Error {
  constructor(message) {
    super(message);
    this.name = 'UnsupportedTrainingConfigError';
  }
}

const LOSS_ALIASES = {
  sparse_categorical_crossentropy: 'sparse_categorical_crossentropy',
  SparseCategoricalCrossentropy: 'sparse_categorical_crossentropy',
  categorical_crossentropy: 'categorical_crossentropy',
  CategoricalCrossentropy: 'categorical_crossentropy',
  binary_crossentropy: 'binary_crossentropy',
  BinaryCrossentropy: 'binary_crossentropy',
  mse: 'mean_squared_error',
  MSE: 'mean_squared_error',
  mean_squared_error: 'mean_squared_error',
  MeanSquaredError: 'mean_squared_error',
  mae: 'mean_absolute_error',
  MAE: 'mean_absolute_error',
  mean_absolute_error: 'mean_absolute_error',
  MeanAbsoluteError: 'mean_absolute_error',
};
const CROSSENTROPIES = ['sparse_categorical_crossentropy', 'categorical_crossentropy',
  'binary_crossentropy'];
const SUPPORTED = 'sparse_categorical_crossentropy, categorical_crossentropy, '
  + 'binary_crossentropy, mean_squared_error (mse), mean_absolute_error (mae)';

const unwrapSingle = (value, what) => {
  if (Array.isArray(value)) {
    if (value.length !== 1) {
      throw new UnsupportedTrainingConfigError(`${what} has ${value.length} entries; this runtime `
        + 'trains models with one output and one loss');
    }
    return value[0];
  }
  if (value && typeof value === 'object' && !('class_name' in value)) {
    const entries = Object.values(value);
    if (entries.length !== 1) {
      throw new UnsupportedTrainingConfigError(`${what} maps ${entries.length} outputs; this `
        + 'runtime trains models with one output and one loss');
    }
    return entries[0];
  }
  return value;
};

/**
 * The loss of a training config.
 * @param {string|object} config split.json `training.loss`
 * @returns {{name: string, fromLogits: boolean, labelSmoothing: number,
 *   compute: (tf: object, yTrue: object, yPred: object, logits?: object) => object}}
 */
export function resolveLoss(config) {
  const entry = unwrapSingle(config, 'The loss');
  if (entry === null || entry === undefined) {
    throw new UnsupportedTrainingConfigError('split.json has no loss in "training"; compile the '
      + 'source model with a loss before splitting it');
  }
  let key;
  let options = {};
  if (typeof entry === 'string') key = entry;
  else if (typeof entry === 'object' && typeof entry.class_name === 'string') {
    key = entry.class_name;
    options = entry.config ?? {};
  } else {
    throw new UnsupportedTrainingConfigError(`The loss ${JSON.stringify(entry)} is not a name or a `
      + 'serialized Keras loss');
  }
  const name = LOSS_ALIASES[key];
  if (!name) {
    throw new UnsupportedTrainingConfigError(`The loss '${key}' is not implemented on the device; `
      + `supported: ${SUPPORTED}. Use one of these, or put the labels on the server (one cut)`);
  }
  const reduction = options.reduction ?? 'sum_over_batch_size';
  if (!['sum_over_batch_size', 'mean'].includes(reduction)) {
    throw new UnsupportedTrainingConfigError(`The loss reduction '${reduction}' is not implemented `
      + "on the device; use the default 'sum_over_batch_size'");
  }
  if (options.axis !== undefined && options.axis !== -1) {
    throw new UnsupportedTrainingConfigError(`The loss axis ${options.axis} is not supported; `
      + 'the device computes losses over the last axis (axis=-1)');
  }
  if (options.ignore_class !== undefined && options.ignore_class !== null) {
    throw new UnsupportedTrainingConfigError('SparseCategoricalCrossentropy(ignore_class=...) is '
      + 'not implemented on the device; remove ignore_class');
  }
  const spec = {
    name,
    fromLogits: Boolean(options.from_logits),
    labelSmoothing: Number(options.label_smoothing ?? 0),
  };
  spec.compute = (tf, yTrue, yPred, logits) => computeLoss(tf, spec, yTrue, yPred, logits);
  return spec;
}

// keras.src.losses.loss.squeeze_or_expand_to_same_rank
function sameRank(tf, a, b) {
  if (a.rank === b.rank + 1 && a.shape[a.rank - 1] === 1) {
    return b.rank === 1 ? [a, tf.expandDims(b, -1)] : [tf.squeeze(a, [-1]), b];
  }
  if (b.rank === a.rank + 1 && b.shape[b.rank - 1] === 1) {
    return a.rank === 1 ? [tf.expandDims(a, -1), b] : [a, tf.squeeze(b, [-1])];
  }
  return [a, b];
}

function perSample(tf, spec, yTrueIn, yPredIn, logitsIn) {
  const { name, labelSmoothing } = spec;
  // LossFunctionWrapper.call aligns the ranks first; a reshaped y_pred loses its logits.
  const [yTrue, yPred] = sameRank(tf, yTrueIn, yPredIn);
  const logits = yPred === yPredIn ? logitsIn : undefined;
  const useLogits = CROSSENTROPIES.includes(name) && (spec.fromLogits || Boolean(logits));
  const z = logits ?? yPred;
  if (name === 'sparse_categorical_crossentropy') {
    let labels = yTrue;
    if (labels.rank === yPred.rank && labels.shape[labels.rank - 1] === 1) {
      labels = tf.squeeze(labels, [-1]);
    }
    const classes = yPred.shape[yPred.rank - 1];
    const oneHot = tf.oneHot(tf.cast(tf.reshape(labels, [-1]), 'int32'), classes);
    const scores = useLogits ? z : tf.log(tf.clipByValue(yPred, EPSILON, 1 - EPSILON));
    const flat = tf.reshape(scores, [-1, classes]);
    const loss = tf.neg(tf.sum(tf.mul(oneHot, tf.logSoftmax(flat)), -1));
    return tf.reshape(loss, labels.shape);
  }
  let target = tf.cast(yTrue, 'float32');
  if (name === 'categorical_crossentropy') {
    if (labelSmoothing) {
      const classes = target.shape[target.rank - 1];
      target = tf.add(tf.mul(target, 1 - labelSmoothing), labelSmoothing / classes);
    }
    if (useLogits) return tf.neg(tf.sum(tf.mul(target, tf.logSoftmax(z)), -1));
    let p = tf.div(yPred, tf.sum(yPred, -1, true));
    p = tf.clipByValue(p, EPSILON, 1 - EPSILON);
    return tf.neg(tf.sum(tf.mul(target, tf.log(p)), -1));
  }
  if (name === 'binary_crossentropy') {
    if (labelSmoothing) target = tf.add(tf.mul(target, 1 - labelSmoothing), 0.5 * labelSmoothing);
    let elementwise;
    if (useLogits) {
      // tf.nn.sigmoid_cross_entropy_with_logits, with its where() so that the gradient at
      // z == 0 is sigmoid(0) - y (relu and abs would give -y there).
      const positive = tf.greaterEqual(z, 0);
      const reluLogits = tf.where(positive, z, tf.zerosLike(z));
      const negAbsLogits = tf.where(positive, tf.neg(z), z);
      elementwise = tf.add(tf.sub(reluLogits, tf.mul(z, target)), tf.log1p(tf.exp(negAbsLogits)));
    } else {
      const p = tf.clipByValue(yPred, EPSILON, 1 - EPSILON);
      const bce = tf.add(tf.mul(target, tf.log(p)),
        tf.mul(tf.sub(1, target), tf.log(tf.sub(1, p))));
      elementwise = tf.neg(bce);
    }
    return tf.mean(elementwise, -1);
  }
  const difference = tf.sub(target, yPred);
  if (name === 'mean_squared_error') return tf.mean(tf.square(difference), -1);
  return tf.mean(tf.abs(difference), -1); // mean_absolute_error
}

/**
 * The scalar loss Keras reports and differentiates (before regularization).
 * @param {object} tf the @tensorflow/tfjs module
 * @param {object} spec from `resolveLoss`
 * @param {object} yTrue labels (int32 class ids or float targets)
 * @param {object} yPred the model output
 * @param {object} [logits] the pre-activation of a softmax/sigmoid output layer
 */
export function computeLoss(tf, spec, yTrue, yPred, logits) {
  return tf.tidy(() => {
    const values = perSample(tf, spec, yTrue, yPred, logits);
    return tf.div(tf.sum(values), values.size); // sum_over_batch_size
  });
}

// ---------------------------------------------------------------- metrics

const METRIC_ALIASES = {
  sparse_categorical_accuracy: 'sparse_categorical_accuracy',
  SparseCategoricalAccuracy: 'sparse_categorical_accuracy',
  categorical_accuracy: 'categorical_accuracy',
  CategoricalAccuracy: 'categorical_accuracy',
  binary_accuracy: 'binary_accuracy',
  BinaryAccuracy: 'binary_accuracy',
};

/**
 * The metrics of a training config that the device computes, and those it skips.
 * `kind` "accuracy" is resolved per batch from the label and prediction shapes.
 * @returns {{metrics: Array<{name: string, kind: string, threshold: number}>, skipped: string[]}}
 */
export function resolveMetrics(config) {
  const metrics = [];
  const skipped = [];
  if (config === null || config === undefined) return { metrics, skipped };
  const list = unwrapSingle(Array.isArray(config) ? [config] : config, 'The metrics');
  for (const entry of Array.isArray(list) ? list : [list]) {
    if (typeof entry === 'string') {
      if (['accuracy', 'acc'].includes(entry.toLowerCase())) {
        metrics.push({ name: entry, kind: 'accuracy', threshold: 0.5 });
      } else if (METRIC_ALIASES[entry]) {
        metrics.push({ name: entry, kind: METRIC_ALIASES[entry], threshold: 0.5 });
      } else skipped.push(entry);
    } else if (entry && typeof entry === 'object' && METRIC_ALIASES[entry.class_name]) {
      const options = entry.config ?? {};
      metrics.push({ name: options.name ?? METRIC_ALIASES[entry.class_name],
        kind: METRIC_ALIASES[entry.class_name], threshold: options.threshold ?? 0.5 });
    } else skipped.push(entry?.class_name ?? JSON.stringify(entry));
  }
  return { metrics, skipped };
}

// keras.src.trainers.compile_utils.is_binary_or_sparse_categorical
function accuracyKind(yTrue, yPred) {
  const trueLast = yTrue.shape[yTrue.rank - 1];
  const predLast = yPred.shape[yPred.rank - 1];
  if (predLast === 1) return 'binary_accuracy';
  if (yTrue.rank < yPred.rank || (trueLast === 1 && predLast > 1)) {
    return 'sparse_categorical_accuracy';
  }
  return 'categorical_accuracy';
}

/**
 * Per-sample matches (1 or 0, float32) of one metric, as Keras' accuracy functions.
 * Average them (sum / count) for the batch value; Keras' running mean over an
 * epoch is the sum of matches over the count of matches.
 */
export function metricValues(tf, metric, yTrue, yPred) {
  return tf.tidy(() => {
    const kind = metric.kind === 'accuracy' ? accuracyKind(yTrue, yPred) : metric.kind;
    if (kind === 'binary_accuracy') {
      const [t, p] = sameRank(tf, tf.cast(yTrue, 'float32'), yPred);
      return tf.cast(tf.equal(t, tf.cast(tf.greater(p, metric.threshold), 'float32')), 'float32');
    }
    let labels = kind === 'categorical_accuracy' ? tf.argMax(yTrue, -1) : yTrue;
    if (kind === 'sparse_categorical_accuracy' && labels.rank === yPred.rank
        && labels.shape[labels.rank - 1] === 1) {
      labels = tf.squeeze(labels, [-1]);
    }
    const predicted = tf.argMax(yPred, -1);
    return tf.cast(tf.equal(tf.cast(labels, 'int32'), predicted), 'float32');
  });
}
