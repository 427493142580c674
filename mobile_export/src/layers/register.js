// Importing this module registers the runtime's layers with the app's @tensorflow/tfjs (the
// package's peer dependency, so the app's single copy): afterwards a plain
// `tf.loadLayersModel` loads every bundle `converters.export_tfjs` writes.
//
// Example:
//   import * as tf from '@tensorflow/tfjs';
//   import './split/splitkeras-device/src/layers/register.js';
//   const model = await tf.loadLayersModel(handler);

import * as tf from '@tensorflow/tfjs';
import { registerLayers } from './index.js';

export const registered = registerLayers(tf);
