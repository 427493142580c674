// Privacy defences of the device (docs/privacy.md), the same mechanisms as the Python
// client's splitkeras.privacy.defences, on what crosses to a server stage in training steps:
//
//   {name: 'max-norm', strength = 1, seed}      U-shaped: g_j (1 + strength sigma_j xi),
//        sigma_j = sqrt(max_k |g_k|^2 / |g_j|^2 - 1), on the gradients sent with `backward`
//   {name: 'gradient-noise', scale, seed}       U-shaped: g_j + N(0, (scale max_k |g_k|)^2 / d)
//   {name: 'activation-noise', clip, sigma, seed}  both: each sample's activation (every float
//        tensor sent, concatenated) clipped to L2 norm clip, + N(0, sigma^2 clip^2); the
//        returned gradient goes through the clip's exact Jacobian
//   {name: 'randomized-response', epsilon, seed}   labels on the server: K-ary randomized
//        response on the class ids sent
//   {name: 'nopeek', alpha = 0.1}                 both: alpha * dCor(model inputs, activations
//        sent) added to the device's loss (nopeek.js; deterministic, equal to Python's)
//
// The random stream is this module's own (mulberry32, Box-Muller), not NumPy's PCG64: the
// same seed gives the same noise in JS, and the statistics match Python's (tested).
// Deterministic parts (clipping, its Jacobian, strength/scale 0) equal Python's.

import { SplitDeviceError, isFloat } from './tensors.js';

const MODES = {
  'max-norm': ['u_shaped'], 'gradient-noise': ['u_shaped'],
  'activation-noise': ['u_shaped', 'labels_on_server'], 'randomized-response': ['labels_on_server'],
  nopeek: ['u_shaped', 'labels_on_server'],
};

/** A seeded uniform [0, 1) and standard-normal generator. */
export function randomStream(seed) {
  let state = (Number(seed ?? Math.floor(Math.random() * 2 ** 31)) >>> 0) || 0x9e3779b9;
  let spare = null;
  const uniform = () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const normal = () => {
    if (spare !== null) {
      const value = spare;
      spare = null;
      return value;
    }
    let u = 0;
    while (u === 0) u = uniform();
    const radius = Math.sqrt(-2 * Math.log(u));
    const angle = 2 * Math.PI * uniform();
    spare = radius * Math.sin(angle);
    return radius * Math.cos(angle);
  };
  return { uniform, normal };
}

/** The defences of `specs` for a split of `mode`, checked; [] when none. */
export function createDefences(specs, mode) {
  if (specs == null) return [];
  if (!Array.isArray(specs)) throw new SplitDeviceError('defences must be an array of {name, ...} objects');
  return specs.map((spec) => {
    const name = spec?.name;
    if (!(name in MODES)) {
      throw new SplitDeviceError(`unknown defence ${JSON.stringify(name)}; the device runtime has `
        + `${Object.keys(MODES).join(', ')}`);
    }
    if (!MODES[name].includes(mode)) {
      throw new SplitDeviceError(`defence '${name}' acts only in ${MODES[name].join(' or ')} splits; `
        + `this split is ${mode}`);
    }
    const number = (key, fallback, ok) => {
      const value = spec[key] ?? fallback;
      if (typeof value !== 'number' || !ok(value)) {
        throw new SplitDeviceError(`defence '${name}': ${key} must be a number ${ok.text}, got ${spec[key]}`);
      }
      return value;
    };
    const nonNegative = Object.assign((v) => v >= 0, { text: '>= 0' });
    const positive = Object.assign((v) => v > 0, { text: '> 0' });
    const defence = { name, random: randomStream(spec.seed) };
    if (name === 'max-norm') defence.strength = number('strength', 1, nonNegative);
    if (name === 'gradient-noise') defence.scale = number('scale', undefined, nonNegative);
    if (name === 'activation-noise') {
      defence.clip = spec.clip === null ? null : number('clip', 1, positive);
      defence.sigma = number('sigma', 1, nonNegative);
    }
    if (name === 'randomized-response') defence.epsilon = number('epsilon', undefined, positive);
    if (name === 'nopeek') {
      defence.alpha = number('alpha', 0.1, nonNegative);
      defence.lastDcor = [];
    }
    return defence;
  });
}

function perSampleNorms(arrays, batch) {
  const squares = new Float64Array(batch);
  for (const { data } of arrays) {
    const width = data.length / batch;
    for (let i = 0; i < batch; i += 1) {
      let sum = 0;
      for (let j = i * width; j < (i + 1) * width; j += 1) sum += data[j] * data[j];
      squares[i] += sum;
    }
  }
  return squares.map(Math.sqrt);
}

/**
 * Activation noise on the float tensors `names` of `store`: a Map of the tensors to send
 * (new ones the caller disposes for the noised names) and the clip state for `clipGradients`.
 */
export function noiseActivations(tf, defences, names, store) {
  const sent = new Map(names.map((n) => [n, store.get(n)]));
  const made = [];
  let state = null;
  for (const defence of defences.filter((d) => d.name === 'activation-noise')) {
    if (defence.clip === null && defence.sigma === 0) continue;
    const floats = names.filter((n) => isFloat(sent.get(n).dtype));
    if (!floats.length) continue;
    const batch = sent.get(floats[0]).shape[0];
    const arrays = floats.map((n) => ({ name: n, shape: sent.get(n).shape, data: sent.get(n).dataSync() }));
    let factors = null;
    if (defence.clip !== null) {
      factors = perSampleNorms(arrays, batch).map((norm) => (norm > defence.clip ? defence.clip / norm : 1));
      if (!state) state = { arrays, factors };
    }
    const std = defence.sigma * (defence.clip ?? 1);
    for (const { name, shape, data } of arrays) {
      const out = new Float32Array(data.length);
      const width = data.length / batch;
      for (let k = 0; k < data.length; k += 1) {
        let value = factors ? Math.fround(data[k] * factors[Math.floor(k / width)]) : data[k];
        if (std > 0) value += std * defence.random.normal();
        out[k] = value;
      }
      const tensor = tf.tensor(out, shape, 'float32');
      made.push(tensor);
      sent.set(name, tensor);
    }
  }
  return { sent, made, state };
}

/** The gradients (Map name -> tensor) of the unclipped activations from those of the clipped. */
export function clipGradients(tf, state, grads) {
  if (!state || state.factors.every((f) => f === 1)) return grads;
  const { arrays, factors } = state;
  const batch = factors.length;
  const pairs = arrays.filter(({ name }) => grads.has(name))
    .map((a) => ({ ...a, grad: grads.get(a.name).dataSync() }));
  const dot = new Float64Array(batch);
  for (const { data, grad } of pairs) {
    const width = data.length / batch;
    for (let i = 0; i < batch; i += 1) {
      for (let j = i * width; j < (i + 1) * width; j += 1) dot[i] += data[j] * grad[j];
    }
  }
  const squares = perSampleNorms(pairs, batch).map((n) => n * n);
  const out = new Map(grads);
  for (const { name, shape, data, grad } of pairs) {
    const width = data.length / batch;
    const values = new Float32Array(data.length);
    for (let k = 0; k < data.length; k += 1) {
      const i = Math.floor(k / width);
      values[k] = factors[i] < 1 ? factors[i] * (grad[k] - data[k] * (dot[i] / squares[i])) : grad[k];
    }
    grads.get(name).dispose();
    out.set(name, tf.tensor(values, shape, 'float32'));
  }
  return out;
}

/** Max-norm and gradient noise on the gradients sent with `backward` (Map name -> tensor, replaced in place). */
export function perturbGradients(tf, defences, gradStore) {
  for (const defence of defences) {
    if (!(defence.name === 'max-norm' && defence.strength > 0)
      && !(defence.name === 'gradient-noise' && defence.scale > 0)) continue;
    const names = [...gradStore.keys()];
    const batch = gradStore.get(names[0]).shape[0];
    const arrays = names.map((n) => ({ name: n, shape: gradStore.get(n).shape, data: gradStore.get(n).dataSync() }));
    const norms = perSampleNorms(arrays, batch);
    const largest = Math.max(...norms);
    const size = arrays.reduce((total, { data }) => total + data.length / batch, 0);
    const factor = defence.name === 'max-norm' ? norms.map((n) => (n > 0
      ? 1 + defence.strength * Math.sqrt(Math.max(largest * largest / (n * n) - 1, 0)) * defence.random.normal()
      : 1)) : null;
    const std = defence.name === 'gradient-noise' ? defence.scale * largest / Math.sqrt(size) : 0;
    for (const { name, shape, data } of arrays) {
      const width = data.length / batch;
      const out = new Float32Array(data.length);
      for (let k = 0; k < data.length; k += 1) {
        out[k] = factor ? data[k] * factor[Math.floor(k / width)] : data[k] + std * defence.random.normal();
      }
      gradStore.get(name).dispose();
      gradStore.set(name, tf.tensor(out, shape, 'float32'));
    }
  }
}

/** Randomized response on class-id labels (a tensor; a new one when flipped). */
export function flipLabels(tf, defences, labels, classes) {
  let current = labels;
  for (const defence of defences.filter((d) => d.name === 'randomized-response')) {
    const k = Math.max(classes, 2);
    const keep = Math.exp(defence.epsilon) / (Math.exp(defence.epsilon) + k - 1);
    const ids = current.dataSync();
    const out = new (current.dtype === 'int32' ? Int32Array : Float32Array)(ids.length);
    for (let i = 0; i < ids.length; i += 1) {
      const id = ids[i];
      if (!Number.isInteger(id) || id < 0 || id >= k) {
        throw new SplitDeviceError(`randomized-response needs class ids in [0, ${k}), got ${id}`);
      }
      out[i] = defence.random.uniform() < keep ? id
        : (id + 1 + Math.floor(defence.random.uniform() * (k - 1))) % k;
    }
    const flipped = tf.tensor(out, current.shape, current.dtype);
    if (current !== labels) current.dispose();
    current = flipped;
  }
  return current;
}
