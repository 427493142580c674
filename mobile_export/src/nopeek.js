// NoPeek (Vepakomma et al. 2020) on the device: alpha times the distance correlation between
// a batch's model inputs and the activations sent to a server stage, added to the device's
// loss -- splitkeras/privacy/defences/nopeek.py term for term, in float64:
//
//   D_ij = sqrt(|z_i - z_j|^2 + 1e-12)           (each sample flattened; smooth at i = j)
//   C = D - mean over i - mean over j + mean      (double centring)
//   dCor = sqrt(max(mean(Cx Ca), 0) / (sqrt(mean(Cx^2) mean(Ca^2)) + 1e-18) + 1e-18)
//
// Its gradient with respect to the sent activations (every float tensor a stage reads,
// concatenated per sample), times alpha and rounded to float32, is added to the gradient
// the server answers for them (after activation-noise's clip Jacobian: NoPeek sees the
// activations before any noise, as Python's outermost wrapper does); the head's backward
// carries it to its weights. The model inputs get no gradient; the loss reported stays
// the task's loss, and `defence.lastDcor` keeps each step's value (Python's `last_dcor`; the last
// KEPT_DCOR steps').

import { SplitDeviceError, isFloat } from './tensors.js';

/** The steps whose distance correlation `lastDcor` keeps (bounded memory, as Python's). */
export const KEPT_DCOR = 10000;

function centredDistances(data, batch) {
  const width = data.length / batch;
  const distances = new Float64Array(batch * batch);
  for (let i = 0; i < batch; i += 1) {
    for (let j = 0; j < batch; j += 1) {
      let sum = 0;
      for (let k = 0; k < width; k += 1) {
        const d = data[i * width + k] - data[j * width + k];
        sum += d * d;
      }
      distances[i * batch + j] = Math.sqrt(sum + 1e-12);
    }
  }
  const rows = new Float64Array(batch); // mean over j (axis 1)
  const columns = new Float64Array(batch); // mean over i (axis 0)
  let total = 0;
  for (let i = 0; i < batch; i += 1) {
    for (let j = 0; j < batch; j += 1) {
      const d = distances[i * batch + j];
      rows[i] += d;
      columns[j] += d;
      total += d;
    }
  }
  for (let i = 0; i < batch; i += 1) {
    rows[i] /= batch;
    columns[i] /= batch;
  }
  const mean = total / (batch * batch);
  const centred = new Float64Array(batch * batch);
  for (let i = 0; i < batch; i += 1) {
    for (let j = 0; j < batch; j += 1) {
      centred[i * batch + j] = distances[i * batch + j] - columns[j] - rows[i] + mean;
    }
  }
  return { distances, centred };
}

const meanProduct = (a, b) => {
  let sum = 0;
  for (let k = 0; k < a.length; k += 1) sum += a[k] * b[k];
  return sum / a.length;
};

/**
 * The sample distance correlation of two batches (flat row-major arrays of `batch` samples)
 * and its gradient with respect to `a` (a Float64Array like `a`).
 * @returns {{value: number, gradient: Float64Array}}
 */
export function distanceCorrelation(x, a, batch) {
  if (!(batch > 0) || x.length % batch || a.length % batch) {
    throw new SplitDeviceError(`distanceCorrelation: ${x.length} and ${a.length} values do not `
      + `make ${batch} samples each`);
  }
  const cx = centredDistances(x, batch).centred;
  const { distances, centred: ca } = centredDistances(a, batch);
  const covariance = meanProduct(cx, ca);
  const vx = meanProduct(cx, cx);
  const va = meanProduct(ca, ca);
  const variance = Math.sqrt(vx * va);
  const value = Math.sqrt(Math.max(covariance, 0) / (variance + 1e-18) + 1e-18);
  // the chain rule backwards through each line above (TF's gradients of sqrt, div, maximum)
  const gRatio = 0.5 / value;
  const gCovariance = covariance >= 0 ? gRatio / (variance + 1e-18) : 0;
  const gVariance = gRatio * (-Math.max(covariance, 0) / (variance + 1e-18) / (variance + 1e-18));
  const gVa = ((gVariance * 0.5) / variance) * vx;
  const cells = batch * batch;
  const gCentred = new Float64Array(cells);
  for (let k = 0; k < cells; k += 1) gCentred[k] = (gCovariance * cx[k] + gVa * 2 * ca[k]) / cells;
  const rows = new Float64Array(batch);
  const columns = new Float64Array(batch);
  let total = 0;
  for (let i = 0; i < batch; i += 1) {
    for (let j = 0; j < batch; j += 1) {
      rows[i] += gCentred[i * batch + j];
      columns[j] += gCentred[i * batch + j];
      total += gCentred[i * batch + j];
    }
  }
  const gSquares = new Float64Array(cells); // d/d|a_i - a_j|^2
  for (let i = 0; i < batch; i += 1) {
    for (let j = 0; j < batch; j += 1) {
      const k = i * batch + j;
      const gDistance = gCentred[k] - columns[j] / batch - rows[i] / batch + total / cells;
      gSquares[k] = (gDistance * 0.5) / distances[k];
    }
  }
  const width = a.length / batch;
  const gradient = new Float64Array(a.length);
  for (let i = 0; i < batch; i += 1) {
    for (let j = 0; j < batch; j += 1) {
      if (i === j) continue;
      const weight = 2 * (gSquares[i * batch + j] + gSquares[j * batch + i]);
      for (let k = 0; k < width; k += 1) {
        gradient[i * width + k] += weight * (a[i * width + k] - a[j * width + k]);
      }
    }
  }
  return { value, gradient };
}

// Each sample's values of several [batch, ...] arrays side by side (tf.concat of the reshapes).
function concatenated(arrays, batch) {
  const widths = arrays.map((data) => data.length / batch);
  const width = widths.reduce((s, w) => s + w, 0);
  const out = new Float64Array(batch * width);
  for (let i = 0; i < batch; i += 1) {
    let offset = i * width;
    arrays.forEach((data, t) => {
      for (let k = 0; k < widths[t]; k += 1) out[offset + k] = data[i * widths[t] + k];
      offset += widths[t];
    });
  }
  return { out, widths, width };
}

/**
 * NoPeek's gradients for a server stage reading `names` of `store`, given the model inputs
 * the stage does not read: one Map (name -> Float32Array, float tensors) per NoPeek defence
 * on, in order; [] when none is.
 */
export function noPeekGradients(defences, store, names, modelInputNames) {
  const active = defences.filter((d) => d.name === 'nopeek' && d.alpha > 0);
  if (!active.length) return [];
  const inputs = modelInputNames.filter((n) => !names.includes(n));
  if (!inputs.length) {
    throw new SplitDeviceError('NoPeek needs the model\'s inputs on the device, but the server stage '
      + 'reads them all itself: remove the nopeek defence for this split');
  }
  const floats = names.filter((n) => isFloat(store.get(n).dtype));
  if (!floats.length) return [];
  const batch = store.get(floats[0]).shape[0];
  const x = concatenated(inputs.map((n) => store.get(n).dataSync()), batch).out;
  const { out: a, widths, width } = concatenated(floats.map((n) => store.get(n).dataSync()), batch);
  const { value, gradient } = distanceCorrelation(x, a, batch);
  return active.map((defence) => {
    defence.lastDcor.push(value);
    if (defence.lastDcor.length > KEPT_DCOR) defence.lastDcor.shift(); // bounded, as Python's deque
    let offset = 0;
    return new Map(floats.map((n, t) => {
      const values = new Float32Array(batch * widths[t]);
      for (let i = 0; i < batch; i += 1) {
        for (let k = 0; k < widths[t]; k += 1) {
          values[i * widths[t] + k] = defence.alpha * gradient[i * width + offset + k];
        }
      }
      offset += widths[t];
      return [n, values];
    }));
  });
}

/**
 * `grads` (Map name -> tensor, the server's answer after the clip Jacobian) plus each of
 * NoPeek's gradients in turn, summed in float32 as Python's wrappers add them.
 */
export function addNoPeek(tf, grads, extras, store) {
  if (!extras.length) return grads;
  const sums = new Map([...grads].map(([name, t]) => [name, Float32Array.from(t.dataSync())]));
  for (const extra of extras) {
    for (const [name, values] of extra) {
      const sum = sums.get(name);
      if (!sum) sums.set(name, Float32Array.from(values));
      else for (let k = 0; k < sum.length; k += 1) sum[k] += values[k];
    }
  }
  for (const t of grads.values()) t.dispose();
  return new Map([...sums].map(([name, values]) => [name,
    tf.tensor(values, store.get(name).shape, 'float32')]));
}

/** At SplitDevice.create: NoPeek needs, for each server stage, a model input it does not read. */
export function checkNoPeekStages(defences, topology, modelInputNames) {
  if (!defences.some((d) => d.name === 'nopeek' && d.alpha > 0)) return;
  for (const stage of topology.stages.filter((s) => s.kind === 'server')) {
    const reads = new Set(stage.inputs.map((s) => s.name));
    if (modelInputNames.every((n) => reads.has(n))) {
      throw new SplitDeviceError(`NoPeek needs the model's inputs on the device, but server stage `
        + `'${stage.name}' reads them all itself: remove the nopeek defence for this split`);
    }
  }
}
