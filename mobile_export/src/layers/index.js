// The layers and activations the device runtime adds to TensorFlow.js 4.22: what TF.js lacks
// (Normalization, grouped convolutions, keras.ops operations, the custom layers of
// keras.applications, hard_silu, ...) and what it computes or trains differently from Keras
// (dilated and causal convolutions, average pooling 'same', UpSampling2D, BatchNormalization on
// another axis, without gamma/beta or frozen, ELU alpha != 1, GRU reset_after, hard_sigmoid).
// `table.json` lists them, with the Keras layers the exporter (converters/) writes as each.
//
// `registerLayers(tf)` registers every class with `tf.serialization.registerClass`, so a plain
// `tf.loadLayersModel` loads bundles that use them; `SplitDevice.create` (runtime.js) calls it
// on the `tf` it is given, and `./register.js` on the `@tensorflow/tfjs` the importer resolves.
// Registering twice is harmless.
//
// Example:
//   import * as tf from '@tensorflow/tfjs';
//   import { registerLayers } from './layers/index.js';
//   registerLayers(tf);
//   const model = await tf.loadLayersModel(handler);

import { defineActivations } from './activations.js';
import { defineConvolutions } from './convolution.js';
import { defineMisc } from './misc.js';
import { defineNormalizations } from './normalization.js';
import { defineOperations } from './operations.js';
import { definePooling } from './pooling.js';
import { defineRecurrent } from './recurrent.js';

const REGISTERED = Symbol.for('splitkeras.layers.registered');

/**
 * Register this runtime's layer classes and activations with `tf` (once per TF.js instance).
 * @param {object} tf the @tensorflow/tfjs module
 * @returns {{classes: string[], activations: string[]}} the registered class names
 */
export function registerLayers(tf) {
  const map = tf.serialization.SerializationMap.getMap();
  if (map[REGISTERED]) return map[REGISTERED];
  const classes = [
    ...defineConvolutions(tf), ...definePooling(tf), ...defineNormalizations(tf), ...defineMisc(tf),
    ...defineRecurrent(tf), ...defineOperations(tf),
  ];
  const activations = defineActivations(tf);
  for (const cls of [...classes, ...activations]) tf.serialization.registerClass(cls);
  map[REGISTERED] = { classes: classes.map((c) => c.className), activations: activations.map((c) => c.className) };
  return map[REGISTERED];
}
