// The step loop of SplitDevice over the stages of the topology (topology.js): the step
// of splitkeras/engine.py for any sequence of device segments and server stages.
//
//   forward:  every stage but the label stage, in order: a device segment runs its
//             training forward (recomputed under the tape at its backward, segment.js);
//             a server stage gets `forward k` with its inputs and answers its outputs.
//   labels:   the label stage: a device segment computes loss, metrics, its update and
//             its input gradients (trainStep); a server stage gets `train k` with its
//             inputs + `label:<output>` and answers input gradients, loss and metrics.
//   backward: the other stages in reverse: a server stage gets `backward k` with the
//             gradient of each of its outputs (zeros where no later stage sent one) and
//             answers the gradients of its float inputs; a device segment applies its
//             update from its outputs' gradients and yields its inputs'.
//
// A step is two phases: startTrainStep (the forward of every stage before the label stage)
// and finishTrainStep (the label stage and the backwards). trainStep runs one after the other;
// a pipelined fit (pipeline.js) starts the next steps while the oldest finishes.
//
// A tensor read by several later stages gets the sum of their gradients (addGrads).
// The loss is the label stage's (its regularization included) plus the regularization
// every other stage reports on its forward (`regularization_loss` from a server).

import { metricValues } from './losses.js';
import { addNoPeek, noPeekGradients } from './nopeek.js';
import {
  clipGradients, flipLabels, noiseActivations, perturbGradients,
} from './privacy.js';
import { addGrads, fromWire, labelTensor, namedInputs, wireTensors } from './tensors.js';

const LABEL_PREFIX = 'label:';
const specNames = (specs) => specs.map((s) => s.name);

/**
 * One training step (SplitDevice.trainStep without the session handling).
 * @returns {Promise<object>} {step, loss, metrics, metricCounts?, details?}
 */
export async function runTrainStep(device, step, x, y, { details = false } = {}) {
  return finishTrainStep(await startTrainStep(device, step, x, y, { details }));
}

/**
 * The first phase of a step: the forward of every stage before the label stage. `x` and `y`
 * are copied before the first await (the caller may dispose them once this returns its
 * promise). On failure the step's state is freed and the error thrown.
 * @returns {Promise<object>} the step's state, for finishTrainStep (or abandonTrainStep)
 */
export async function startTrainStep(device, step, x, y, { details = false } = {}) {
  const { tf, runners } = device;
  const state = {
    device, step, store: namedInputs(tf, device.modelInputs, x, device.maxBatch), grads: new Map(),
    result: { step, metrics: {} },
    received: details ? new Map() : null, // stage -> Map(name -> tensor copy data)
    regularization: [], labels: null,
    clipStates: new Map(), // stage -> what activation-noise clipped (for its Jacobian)
    noPeeks: new Map(), // stage -> NoPeek's gradients of what it was sent (before noise)
    made: [], // tensors the defences made, disposed at the end
  };
  const { store, regularization } = state;
  try {
    state.labels = labelTensor(tf, y, store.get(device.modelInputs[0].name).shape[0]);
    for (const runner of runners.slice(0, -1)) {
      const { segment, session, stage } = runner;
      if (segment) {
        const { outputs, regularization: reg } = segment.forward(step,
          segment.inputNames.map((n) => store.get(n)));
        segment.outputNames.forEach((name, i) => store.set(name, outputs[i]));
        regularization.push(reg);
      } else {
        const answer = await session.forward(step, await sentTensors(state, stage));
        regularization.push(Number(answer.metadata.regularization_loss ?? 0));
        for (const [name, t] of fromWire(tf, answer, stage.outputs, 'forward')) store.set(name, t);
      }
    }
  } catch (error) {
    abandonTrainStep(state);
    throw error;
  }
  return state;
}

// the tensors sent to a server stage, through the activation defences
async function sentTensors(state, stage) {
  const { device: { tf, defences = [], modelInputs }, store } = state;
  state.noPeeks.set(stage.name, noPeekGradients(defences, store, specNames(stage.inputs),
    modelInputs.map((s) => s.name)));
  const { sent, made: noised, state: clipped } = noiseActivations(tf, defences, specNames(stage.inputs), store);
  state.made.push(...noised);
  if (clipped) state.clipStates.set(stage.name, clipped);
  return wireTensors(specNames(stage.inputs), sent);
}

/** Free a started step that will not finish: its tensors, its segments' and sessions' pending state. */
export function abandonTrainStep(state) {
  for (const { segment, session } of state.device.runners.slice(0, -1)) {
    segment?.drop(state.step);
    session?.forget(state.step);
  }
  disposeStep(state);
}

function disposeStep({ store, grads, made, labels }) {
  for (const t of store.values()) t.dispose();
  for (const t of grads.values()) t.dispose();
  for (const t of made) t.dispose();
  labels?.dispose();
}

/**
 * The second phase of a step: the label stage (loss, metrics, its update), then the
 * backwards in reverse stage order. Frees the step's state, whatever happens.
 * @returns {Promise<object>} {step, loss, metrics, metricCounts?, details?}
 */
export async function finishTrainStep(state) {
  const { device, step, store, grads, result, received, regularization, labels, clipStates,
    noPeeks, made } = state;
  const { tf, runners } = device;
  const label = runners[runners.length - 1];
  const others = runners.slice(0, -1);
  const defences = device.defences ?? [];
  const takeInputGrads = (runner, answer) => {
    const specs = runner.stage.inputs.filter((s) => s.name in answer.tensors);
    const answered = clipGradients(tf, clipStates.get(runner.stage.name),
      fromWire(tf, answer, specs, 'backward'));
    if (received) {
      received.set(runner.stage.name, Object.fromEntries([...answered].map(([name, t]) => [name,
        { shape: t.shape, data: Float32Array.from(t.dataSync()) }])));
    }
    const fromServer = addNoPeek(tf, answered, noPeeks.get(runner.stage.name) ?? [], store);
    addGrads(tf, grads, [...fromServer.keys()], [...fromServer.values()]);
  };

  try {
    if (label.segment) {
      const tail = label.segment;
      const out = tail.trainStep(tail.inputNames.map((n) => store.get(n)), labels, device.loss,
        device.metrics);
      addGrads(tf, grads, tail.inputNames, out.inputGrads);
      result.loss = out.loss + out.regularization;
      for (const [name, { sum, count }] of Object.entries(out.metrics)) {
        result.metrics[name] = sum / count;
      }
      result.metricCounts = Object.fromEntries(Object.entries(out.metrics)
        .map(([name, { count }]) => [name, count]));
    } else {
      const tensors = await sentTensors(state, label.stage);
      const labelName = LABEL_PREFIX + device.manifest.model_outputs[0].name;
      const output = device.manifest.model_outputs[0];
      const sentLabels = flipLabels(tf, defences, labels, Number(output.shape[output.shape.length - 1]));
      if (sentLabels !== labels) made.push(sentLabels);
      tensors.push(...await wireTensors([labelName], new Map([[labelName, sentLabels]])));
      const answer = await label.session.train(step, tensors);
      const meta = answer.metadata;
      result.loss = Number(meta.loss);
      for (const [name, value] of Object.entries(meta)) {
        if (name !== 'step' && name !== 'loss') result.metrics[name] = Number(value);
      }
      takeInputGrads(label, answer);
    }
    for (const reg of regularization) result.loss += reg;

    for (const runner of [...others].reverse()) {
      const { segment, session, stage } = runner;
      if (segment) {
        const outputGrads = segment.outputNames.map((name) => grads.get(name) ?? null);
        const inputGrads = segment.backward(step, outputGrads);
        for (const name of segment.outputNames) {
          grads.get(name)?.dispose();
          grads.delete(name);
        }
        addGrads(tf, grads, segment.inputNames, inputGrads);
      } else {
        const gradStore = new Map(stage.outputs.map((spec) => {
          const g = grads.get(spec.name) ?? tf.zerosLike(store.get(spec.name));
          grads.delete(spec.name);
          return [spec.name, g];
        }));
        perturbGradients(tf, defences, gradStore);
        const body = await wireTensors([...gradStore.keys()], gradStore);
        for (const g of gradStore.values()) g.dispose();
        takeInputGrads(runner, await session.backward(step, body));
      }
    }
  } finally {
    for (const { segment, session } of others) {
      segment?.drop(step);
      session?.forget(step);
    }
    disposeStep(state);
  }
  if (received) result.details = gradientDetails(received);
  return result;
}

// The gradients the servers sent, by tensor (summed where several stages sent one for the
// same tensor) and by stage.
function gradientDetails(received) {
  const serverInputGradients = {};
  for (const byName of received.values()) {
    for (const [name, { shape, data }] of Object.entries(byName)) {
      const previous = serverInputGradients[name];
      if (!previous) serverInputGradients[name] = { shape, data: Float32Array.from(data) };
      else previous.data.forEach((v, i) => { previous.data[i] = v + data[i]; });
    }
  }
  const details = { serverInputGradients };
  if (received.size > 1) details.stageInputGradients = Object.fromEntries(received);
  return details;
}

// Inference through `runners` in inference mode: fills `store` and returns the sum of the
// regularization losses (a device segment's from its weights, a server's `regularization_loss`
// predict metadata, 0 when it sends none, as the Python client reads it).
async function infer(device, runners, store) {
  const { tf } = device;
  let regularization = 0;
  for (const { segment, session, stage } of runners) {
    if (segment) {
      const outs = segment.predict(segment.inputNames.map((n) => store.get(n)));
      segment.outputNames.forEach((name, i) => store.set(name, outs[i]));
      regularization += segment.regularizationValue();
    } else {
      const answer = await session.predict(await wireTensors(specNames(stage.inputs), store));
      regularization += Number(answer.metadata?.regularization_loss ?? 0);
      for (const [name, t] of fromWire(tf, answer, stage.outputs, 'predict')) store.set(name, t);
    }
  }
  return regularization;
}

/** Inference over every stage; the model output (a tf.Tensor the caller owns). */
export async function runPredict(device, x) {
  const { tf, runners } = device;
  const store = namedInputs(tf, device.modelInputs, x, device.maxBatch);
  try {
    await infer(device, runners, store);
    return tf.keep(store.get(device.manifest.model_outputs[0].name).clone());
  } finally {
    for (const t of store.values()) t.dispose();
  }
}

/**
 * The loss and metrics of one batch in inference mode (keras `test_step`): the label segment
 * on the device computes them from its inputs, or, with the labels on the server, the device
 * computes them from the server's predictions. Nothing trains.
 * @returns {Promise<{loss: number, metrics: Object<string, {sum: number, count: number}>,
 *   samples: number}>}
 */
export async function runEvaluate(device, x, y) {
  const { tf, runners } = device;
  const { loss: lossSpec, metrics } = device.evaluation();
  const store = namedInputs(tf, device.modelInputs, x, device.maxBatch);
  const samples = store.get(device.modelInputs[0].name).shape[0];
  let labels = null;
  try {
    labels = labelTensor(tf, y, samples);
    const label = runners[runners.length - 1];
    if (label.segment) {
      const regularization = await infer(device, runners.slice(0, -1), store);
      const out = label.segment.evaluate(label.segment.inputNames.map((n) => store.get(n)), labels,
        lossSpec, metrics);
      return { loss: out.loss + out.regularization + regularization, metrics: out.metrics, samples };
    }
    const regularization = await infer(device, runners, store);
    const yPred = store.get(device.manifest.model_outputs[0].name);
    return tf.tidy(() => {
      const result = { loss: lossSpec.compute(tf, labels, yPred, null).dataSync()[0]
        + regularization, metrics: {}, samples };
      for (const metric of metrics) {
        const values = metricValues(tf, metric, labels, yPred);
        result.metrics[metric.name] = { sum: tf.sum(values).dataSync()[0], count: values.size };
      }
      return result;
    });
  } finally {
    for (const t of store.values()) t.dispose();
    labels?.dispose();
  }
}
