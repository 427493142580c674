// Type declarations of splitkeras-device/node (src/node_io.js), Node only.

import type * as tfjs from '@tensorflow/tfjs';

/** A load-only IOHandler that reads `<dir>/model.json` and its weight shards. */
export function nodeDirHandler(tf: typeof tfjs, dir: string): tfjs.io.IOHandler;
/** Load a LayersModel from a local bundle folder (strict weight matching). */
export function loadLayersModelFromDir(tf: typeof tfjs, dir: string): Promise<tfjs.LayersModel>;
/** Save a LayersModel as a bundle folder (model.json + one shard), replacing it whole. */
export function saveLayersModelToDir(tf: typeof tfjs, model: tfjs.LayersModel, dir: string): Promise<string>;
