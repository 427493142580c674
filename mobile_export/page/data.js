// The device page's training data: one safetensors body (the server's GET /device/data for the
// demo split, or a file the user chooses) with x_train and y_train, optionally x_test and y_test,
// checked against the split's model input and output before any training.

import { decodeTensors } from '../src/wire.js';

export class PageDataError extends Error {
  constructor(message) {
    super(message);
    this.name = 'PageDataError';
  }
}

/**
 * Decode `buffer` into tf tensors {xTrain, yTrain, xTest?, yTest?} for `manifest`'s one input.
 * @param {object} tf the @tensorflow/tfjs module
 * @param {ArrayBuffer} buffer a safetensors body
 * @param {object} manifest the parsed split.json
 */
export function pageData(tf, buffer, manifest) {
  if (manifest.model_inputs.length !== 1) {
    throw new PageDataError(`the page trains splits with one model input; this one has ${manifest.model_inputs.length}`);
  }
  let tensors;
  try {
    ({ tensors } = decodeTensors(buffer));
  } catch (error) {
    throw new PageDataError(`the data is not a safetensors file the page can read: ${error.message}`);
  }
  const [input] = manifest.model_inputs;
  const want = input.shape.slice(1);
  const get = (name, required) => {
    const t = tensors[name];
    if (!t) {
      if (required) throw new PageDataError(`the data has no tensor '${name}' (it holds: ${Object.keys(tensors).join(', ') || 'none'}); give x_train and y_train, optionally x_test and y_test`);
      return undefined;
    }
    return t;
  };
  const pair = (xName, yName, required) => {
    const x = get(xName, required);
    const y = get(yName, required || x !== undefined);
    if (!x) return [undefined, undefined];
    if (x.shape.length !== want.length + 1 || x.shape.slice(1).some((d, i) => want[i] !== null && d !== want[i])) {
      throw new PageDataError(`'${xName}' has shape [${x.shape}], the split's input '${input.name}' takes [batch, ${want}]`);
    }
    if (y.shape[0] !== x.shape[0]) {
      throw new PageDataError(`'${yName}' has ${y.shape[0]} samples, '${xName}' has ${x.shape[0]}`);
    }
    if (x.dtype !== 'float32') throw new PageDataError(`'${xName}' must be float32 (or float16), got ${x.dtype}`);
    return [tf.tensor(x.data, x.shape, 'float32'), tf.tensor(y.data, y.shape, y.dtype === 'int32' ? 'int32' : 'float32')];
  };
  const [xTrain, yTrain] = pair('x_train', 'y_train', true);
  const [xTest, yTest] = pair('x_test', 'y_test', false);
  return { xTrain, yTrain, xTest, yTest };
}
