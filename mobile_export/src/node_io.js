// Node-only loading of a TF.js layers-model bundle (model.json + weight shards)
// from a local folder.
//
// `tf.loadLayersModel('file://...')` needs @tensorflow/tfjs-node, which cannot
// be installed everywhere (its install script downloads libtensorflow). This
// adapter reads the files with node:fs and hands them to the real loader
// through `tf.io.getModelArtifactsForJSON`, so the pure-JS @tensorflow/tfjs
// package is enough.
//
// Example:
//   import * as tf from '@tensorflow/tfjs';
//   import { loadLayersModelFromDir } from './node_io.js';
//   await tf.setBackend('cpu');
//   const model = await loadLayersModelFromDir(tf, 'out/head_tfjs');
//   model.predict(tf.zeros([1, 28, 28, 1])).print();

import { readFile } from 'node:fs/promises';
import path from 'node:path';

/**
 * An IOHandler (load only) that reads `<dir>/model.json` and the weight
 * shards it lists.
 *
 * @param {object} tf the @tensorflow/tfjs module
 * @param {string} dir folder holding model.json and its shards
 * @returns {{load: () => Promise<object>}}
 */
export function nodeDirHandler(tf, dir) {
  const root = path.resolve(dir);
  return {
    async load() {
      const modelJsonPath = path.join(root, 'model.json');
      let modelJSON;
      try {
        modelJSON = JSON.parse(await readFile(modelJsonPath, 'utf8'));
      } catch (error) {
        throw new Error(
          `cannot read the TF.js bundle at ${modelJsonPath}: ${error.message}; ` +
            'expected a folder written by converters.export_tfjs (model.json and group1-shard*.bin)',
        );
      }
      return tf.io.getModelArtifactsForJSON(modelJSON, async (manifest) => {
        const specs = [];
        const buffers = [];
        for (const group of manifest) {
          for (const relativePath of group.paths) {
            const shardPath = path.resolve(root, relativePath);
            if (path.dirname(shardPath) !== root) {
              throw new Error(
                `weight shard path ${JSON.stringify(relativePath)} in ${modelJsonPath} ` +
                  'leaves the bundle folder; expected a plain file name',
              );
            }
            buffers.push(await readFile(shardPath));
          }
          specs.push(...group.weights);
        }
        const all = Buffer.concat(buffers);
        const weightData = all.buffer.slice(all.byteOffset, all.byteOffset + all.byteLength);
        return [specs, weightData];
      });
    },
  };
}

/**
 * Load a LayersModel from a local bundle folder (strict: every weight in the
 * bundle must match a model weight by name and shape, and none may be missing).
 *
 * @param {object} tf the @tensorflow/tfjs module
 * @param {string} dir folder holding model.json and its shards
 * @returns {Promise<object>} a tf.LayersModel
 */
export async function loadLayersModelFromDir(tf, dir) {
  return tf.loadLayersModel(nodeDirHandler(tf, dir), { strict: true });
}
