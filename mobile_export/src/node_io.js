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

import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { registerLayers } from './layers/index.js';

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
 * Registers the runtime's layer classes (`src/layers/`) on `tf` first, so any bundle
 * `converters.export_tfjs` writes loads (a MobileNetV3's hard_silu, an EfficientNet's
 * Normalization, ...), also before `SplitDevice.create` (which registers them too).
 *
 * @param {object} tf the @tensorflow/tfjs module
 * @param {string} dir folder holding model.json and its shards
 * @returns {Promise<object>} a tf.LayersModel
 */
export async function loadLayersModelFromDir(tf, dir) {
  registerLayers(tf);
  return tf.loadLayersModel(nodeDirHandler(tf, dir), { strict: true });
}

/**
 * Save a LayersModel as a bundle folder (`model.json` + `group1-shard1of1.bin`) that
 * `loadLayersModelFromDir` and `converters.load_tfjs_weights` read: e.g. the trained device
 * segments, to start from them on the next run. The folder is replaced as a whole.
 *
 * @param {object} tf the @tensorflow/tfjs module
 * @param {object} model a tf.LayersModel (e.g. `device.model('head')`)
 * @param {string} dir the bundle folder to write
 * @returns {Promise<string>} the path of the model.json written
 */
export async function saveLayersModelToDir(tf, model, dir) {
  const root = path.resolve(dir);
  const fresh = `${root}.saving`;
  await rm(fresh, { recursive: true, force: true });
  await mkdir(fresh, { recursive: true });
  await model.save(tf.io.withSaveHandler(async (artifacts) => {
    const shard = 'group1-shard1of1.bin';
    const data = tf.io.CompositeArrayBuffer.join(artifacts.weightData);
    await writeFile(path.join(fresh, shard), Buffer.from(data));
    await writeFile(path.join(fresh, 'model.json'), JSON.stringify({
      format: artifacts.format, generatedBy: artifacts.generatedBy,
      convertedBy: 'splitkeras-device saveLayersModelToDir', modelTopology: artifacts.modelTopology,
      weightsManifest: [{ paths: [shard], weights: artifacts.weightSpecs }],
    }));
    return { modelArtifactsInfo: { dateSaved: new Date(), modelTopologyType: 'JSON',
      weightDataBytes: data.byteLength } };
  }));
  await rm(root, { recursive: true, force: true });
  await rename(fresh, root);
  return path.join(root, 'model.json');
}
