// The shape of a split as data: which host runs each segment, and the stages the device
// walks in a training step. The JavaScript twin of splitkeras/topology.py (same rules,
// same names). Pure JS: no tf.
//
// * split.json `format_version` 2 gives each segment a `host`: "device" for a device
//   segment, the name of the server that runs it for a server segment (default: the
//   segment's own name). Version 1 files have no host: it is derived the same way.
// * Segments run in order; the LAST one holds the labels (computes the loss). The first
//   segment runs on the device: it reads the model inputs (raw inputs never leave the
//   device; a later server segment that reads one too is allowed, and `splitkeras split`
//   warns about it).
// * Consecutive server segments form ONE server stage, a chain (device -> edge -> cloud):
//   the device talks to the stage's first server only, the servers hand activations and
//   gradients on among themselves. Each device segment is a stage of its own.
// * A stage's interface: `inputs`, the tensors its segments read that were produced
//   before it (model inputs or earlier outputs); `outputs`, the tensors it produces that a
//   later segment reads, or that are model outputs.
// * A server stage's `mode` is "labels_on_server" when it holds the last segment (the
//   device sends inputs + `label:<output>` to its train route), else "u_shaped" (forward
//   and backward routes).
//
// Example: device,server,server,device (head, edge, cloud, tail) gives the stages
//   head (device) -> edge (server: segments edge, cloud; u_shaped) -> tail (device, labels)

import { SplitDeviceError } from './tensors.js';

export const MANIFEST_FORMAT = 'splitkeras.split';
export const FORMAT_VERSIONS = [1, 2];
export const DEVICE_HOST = 'device';
export const PLACEMENTS = ['device', 'server'];

/** A split.json whose shape the device runtime cannot take (a SplitDeviceError). */
export class TopologyError extends SplitDeviceError {
  constructor(message) {
    super(message);
    this.name = 'TopologyError';
  }
}

/** The host of a segment entry: its `host`, else "device" or the segment's own name. */
export function segmentHost(entry) {
  const host = entry.host ?? (entry.placement === 'device' ? DEVICE_HOST : entry.name);
  if (typeof host !== 'string' || !host) {
    throw new TopologyError(`Segment '${entry.name}': host must be a non-empty string, got `
      + `${JSON.stringify(entry.host)}`);
  }
  if (entry.placement === 'device' && host !== DEVICE_HOST) {
    throw new TopologyError(`Segment '${entry.name}' is placed on the device but its host is `
      + `'${host}'; a device segment's host is "${DEVICE_HOST}"`);
  }
  if (entry.placement === 'server' && host === DEVICE_HOST) {
    throw new TopologyError(`Segment '${entry.name}' is placed on a server but its host is `
      + `"${DEVICE_HOST}"; name the server that runs it (or leave host out)`);
  }
  return host;
}

function checkFormat(manifest) {
  if (!manifest || manifest.format !== MANIFEST_FORMAT) {
    throw new TopologyError(`manifest is not a splitkeras split.json (expected "format": `
      + `"${MANIFEST_FORMAT}"); pass the parsed split.json of the app bundle`);
  }
  if (!FORMAT_VERSIONS.includes(manifest.format_version)) {
    throw new TopologyError(`split.json format_version ${JSON.stringify(manifest.format_version)} `
      + `is not supported (this runtime reads versions ${FORMAT_VERSIONS.join(' and ')}); `
      + 'update splitkeras-device or re-export the app bundle');
  }
  const { segments } = manifest;
  if (!Array.isArray(segments) || segments.length < 2) {
    throw new TopologyError(`split.json must list at least two segments, it lists `
      + `${Array.isArray(segments) ? segments.length : 'none'}`);
  }
  for (const key of ['model_inputs', 'model_outputs']) {
    if (!Array.isArray(manifest[key])) throw new TopologyError(`split.json lacks ${key}`);
  }
  const names = new Set();
  for (const entry of segments) {
    if (!entry || typeof entry.name !== 'string' || !entry.name) {
      throw new TopologyError('every split.json segment needs a name');
    }
    if (names.has(entry.name)) throw new TopologyError(`two segments are named '${entry.name}'`);
    names.add(entry.name);
    if (!PLACEMENTS.includes(entry.placement)) {
      throw new TopologyError(`Segment '${entry.name}': placement must be "device" or "server", `
        + `got ${JSON.stringify(entry.placement)}`);
    }
    if (!Array.isArray(entry.inputs) || !Array.isArray(entry.outputs)) {
      throw new TopologyError(`Segment '${entry.name}' lacks its inputs or outputs`);
    }
  }
}

/** Specs by name in first-seen order. */
function uniqueSpecs(specs) {
  const seen = new Map();
  for (const spec of specs) if (!seen.has(spec.name)) seen.set(spec.name, spec);
  return [...seen.values()];
}

/**
 * The topology of a split.json: segments with their host, and the stages a step walks.
 * @param {object} manifest the parsed split.json (format_version 1 or 2)
 * @returns {{segments: object[], stages: Array<{kind: 'device'|'server', name: string,
 *   host: string, segments: string[], inputs: object[], outputs: object[],
 *   holdsLabels: boolean, mode: 'u_shaped'|'labels_on_server'|null}>, labelSegment: string,
 *   labelStage: string, mode: 'u_shaped'|'labels_on_server'}}
 *   `stages[i].name` is its first segment's name, `host` that segment's host; `mode` is
 *   null for a device stage.
 * @throws {TopologyError}
 */
export function deriveTopology(manifest) {
  checkFormat(manifest);
  const segments = manifest.segments.map((entry) => ({ ...entry, host: segmentHost(entry) }));
  const modelInputs = new Set(manifest.model_inputs.map((s) => s.name));
  const modelOutputs = new Set(manifest.model_outputs.map((s) => s.name));

  if (segments[0].placement !== 'device') {
    throw new TopologyError(`The first segment '${segments[0].name}' runs on server `
      + `'${segments[0].host}'; the first segment must run on the device (it reads the raw inputs)`);
  }
  const producedBy = new Map(); // tensor -> index of the segment that produced it
  segments.forEach((entry, index) => {
    for (const spec of entry.inputs) {
      // A later server segment may read a model input too: `splitkeras split` warns that
      // this input leaves the device, and the split still trains (as in Python).
      if (!modelInputs.has(spec.name) && !producedBy.has(spec.name)) {
        throw new TopologyError(`Segment '${entry.name}' reads '${spec.name}', which is neither a `
          + 'model input nor an output of an earlier segment');
      }
    }
    for (const spec of entry.outputs) producedBy.set(spec.name, index);
  });
  for (const spec of manifest.model_outputs) {
    if (!producedBy.has(spec.name)) {
      throw new TopologyError(`No segment produces the model output '${spec.name}'`);
    }
  }

  // Stages: consecutive server segments together, each device segment alone.
  const groups = [];
  segments.forEach((entry, index) => {
    const last = groups[groups.length - 1];
    if (entry.placement === 'server' && last?.kind === 'server') last.indices.push(index);
    else groups.push({ kind: entry.placement, indices: [index] });
  });
  const lastIndex = segments.length - 1;
  const stages = groups.map(({ kind, indices }) => {
    const first = indices[0];
    const end = indices[indices.length - 1];
    const members = indices.map((i) => segments[i]);
    const inputs = uniqueSpecs(members.flatMap((entry) => entry.inputs
      .filter((spec) => modelInputs.has(spec.name) || producedBy.get(spec.name) < first)));
    const readLater = new Set(segments.slice(end + 1).flatMap((entry) => entry.inputs)
      .map((spec) => spec.name));
    const outputs = uniqueSpecs(members.flatMap((entry) => entry.outputs
      .filter((spec) => readLater.has(spec.name) || modelOutputs.has(spec.name))));
    const holdsLabels = end === lastIndex;
    return {
      kind,
      name: segments[first].name,
      host: segments[first].host,
      segments: members.map((entry) => entry.name),
      inputs,
      outputs,
      holdsLabels,
      mode: kind === 'server' ? (holdsLabels ? 'labels_on_server' : 'u_shaped') : null,
    };
  });
  const labelStage = stages[stages.length - 1];
  return {
    segments,
    stages,
    labelSegment: segments[lastIndex].name,
    labelStage: labelStage.name,
    mode: labelStage.kind === 'server' ? 'labels_on_server' : 'u_shaped',
  };
}

/** The placements of a split as one string, e.g. "device,server,server,device". */
export function placements(manifest) {
  return manifest.segments.map((s) => s.placement).join(',');
}
