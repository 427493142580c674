// The device page of `splitkeras serve --device-page` (bundled by tools/build_page.mjs with
// TF.js, the wasm backend and the runtime; served at /device/). It reads the server key from
// the `#key=` fragment (never sent to the server; removed from the address bar) or a field,
// loads split.json and the device segments' TF.js bundles from /device/split/, the data from
// /device/data (or a chosen file), and trains with SplitDevice.fit on the wasm backend when it
// loads, else cpu. window.devicePage holds the run's figures (the tests read them).
//
// Query options: ?epochs=5&batch=32&backend=auto|wasm|cpu&autostart=1

import * as tf from '@tensorflow/tfjs';
import { setWasmPaths } from '@tensorflow/tfjs-backend-wasm';
import { SplitDevice } from '../src/runtime.js';
import { chartSvg } from './chart.js';
import { PageDataError, pageData } from './data.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const state = {
  status: 'idle', error: null, backend: null, steps: 0, appliedSteps: null, stepsPerSecond: null,
  losses: [], accuracies: [], epochEnds: [], history: null, testAccuracy: null, bytesSent: 0, bytesReceived: 0,
};
window.devicePage = state;
let key = null;
let chosenData = null;
let device = null;

function say(text, error = false) {
  $('message').textContent = text;
  $('message').className = error ? 'error' : '';
}

function takeKey() {
  const match = /(?:^#|&)key=([^&]*)/.exec(location.hash);
  if (!match) return null;
  history.replaceState(null, '', location.pathname + location.search); // off the address bar
  return decodeURIComponent(match[1]);
}

async function authorized(path) {
  const response = await fetch(new URL(path, location.href), { headers: { Authorization: `Bearer ${key}` } });
  if (response.ok || response.status === 404) return response;
  let message = `${path}: HTTP ${response.status}`;
  try { message = (await response.json()).error.message; } catch { /* not JSON */ }
  if (response.status === 401) { // a wrong key: ask for it again
    key = null;
    $('key-panel').hidden = false;
  }
  throw new Error(message);
}

async function chooseBackend(wanted) {
  if (wanted !== 'cpu') {
    try {
      setWasmPaths(new URL('./', location.href).href);
      if (await tf.setBackend('wasm')) return 'wasm';
    } catch (error) {
      if (wanted === 'wasm') throw error;
    }
    if (wanted === 'wasm') throw new Error('the wasm backend did not load');
  }
  await tf.setBackend('cpu');
  return 'cpu';
}

async function loadData(manifest) {
  if (chosenData) return pageData(tf, chosenData, manifest);
  const response = await authorized('data');
  if (response.status === 404) {
    let message = 'This split has no data for the page.';
    try { message = (await response.json()).error.message; } catch { /* not JSON */ }
    $('data-message').textContent = message;
    $('data-panel').hidden = false;
    return null;
  }
  return pageData(tf, await response.arrayBuffer(), manifest);
}

function draw() {
  const valAccuracy = (state.history?.val_accuracy ?? []).map((v, i) => [state.epochEnds[i], v]);
  $('chart').innerHTML = chartSvg({ loss: state.losses, accuracy: state.accuracies, valAccuracy });
  $('steps').textContent = String(state.steps);
  $('applied').textContent = state.appliedSteps === null ? '–' : String(state.appliedSteps);
  $('rate').textContent = state.stepsPerSecond === null ? '–' : state.stepsPerSecond.toFixed(1);
  const last = state.losses[state.losses.length - 1];
  $('loss').textContent = last ? last[1].toFixed(4) : '–';
  const acc = state.accuracies[state.accuracies.length - 1];
  $('accuracy').textContent = acc ? acc[1].toFixed(4) : '–';
  $('test-accuracy').textContent = state.testAccuracy === null ? '–' : state.testAccuracy.toFixed(4);
  const kib = (n) => `${(n / 1024).toFixed(1)} KiB`;
  $('bytes').textContent = `${kib(state.bytesSent)} / ${kib(state.bytesReceived)}`;
}

async function train() {
  key = $('key').value.trim() || key; // a key typed in wins over the fragment's
  if (!key) {
    $('key-panel').hidden = false;
    say('The page needs the server key to load the split and open a session.', true);
    return;
  }
  const epochs = Number($('epochs').value);
  const batchSize = Number($('batch').value);
  Object.assign(state, { status: 'loading', error: null, steps: 0, losses: [], accuracies: [], epochEnds: [],
    history: null, testAccuracy: null, appliedSteps: null });
  $('start').disabled = true;
  let data = null;
  try {
    say('Loading the split…');
    const manifest = await (await authorized('split/split.json')).json();
    data = await loadData(manifest);
    if (!data) {
      state.status = 'needs_data';
      say('Choose a data file to train on.', true);
      return;
    }
    state.backend = await chooseBackend(params.get('backend') ?? 'auto');
    $('backend').textContent = state.backend;
    const models = {};
    for (const segment of manifest.segments.filter((s) => s.placement === 'device')) {
      if (!segment.tfjs) throw new Error(`device segment '${segment.name}' has no TF.js bundle: split with TF.js export`);
      models[segment.name] = await tf.loadLayersModel(tf.io.http(new URL(`split/${segment.tfjs}`, location.href).href,
        { requestInit: { headers: { Authorization: `Bearer ${key}` } } }));
    }
    device = await SplitDevice.create({ tf, manifest, models, serverUrl: location.origin, key });
    await device.openSession();
    state.status = 'training';
    say(`Training ${epochs} epoch(s) of ${data.xTrain.shape[0]} samples, batch ${batchSize}, on ${state.backend}…`);
    $('stop').disabled = false;
    const started = performance.now();
    const refresh = async () => {
      state.appliedSteps = (await device.session.state()).applied_steps;
      const stats = device.stats;
      state.bytesSent = stats.bytesSent;
      state.bytesReceived = stats.bytesReceived;
      state.stepsPerSecond = state.steps / ((performance.now() - started) / 1000);
      draw();
    };
    let epochSamples = 0;
    let epochCorrect = 0;
    const result = await device.fit(data.xTrain, data.yTrain, {
      batchSize, epochs, validationData: data.xTest ? [data.xTest, data.yTest] : undefined,
      onEpochBegin: () => { epochSamples = 0; epochCorrect = 0; },
      onBatchEnd: async (_, logs) => {
        state.steps += 1;
        state.losses.push([state.steps, logs.loss]);
        if (logs.metrics.accuracy !== undefined) {
          epochSamples += logs.size;
          epochCorrect += logs.metrics.accuracy * logs.size;
          state.accuracies.push([state.steps, epochCorrect / epochSamples]);
        }
        if (state.steps % 10 === 0) await refresh();
      },
      onEpochEnd: async (epoch, logs) => {
        state.epochEnds.push(state.steps);
        state.history ??= {};
        for (const [name, value] of Object.entries(logs)) (state.history[name] ??= []).push(value);
        if (logs.val_accuracy !== undefined) state.testAccuracy = logs.val_accuracy;
        await refresh();
      },
    });
    state.history = result.history;
    await refresh();
    await device.closeSession();
    state.status = 'done';
    say(`Done: ${state.steps} steps, ${state.appliedSteps} applied by the server`
      + (state.testAccuracy === null ? '.' : `, test accuracy ${state.testAccuracy.toFixed(4)}.`));
  } catch (error) {
    state.status = 'error';
    state.error = { name: error.name, code: error.code, message: error.message };
    say(error instanceof PageDataError ? `Data: ${error.message}` : `${error.name}: ${error.message}`, true);
  } finally {
    for (const t of Object.values(data ?? {})) t?.dispose();
    device?.dispose();
    device = null;
    $('start').disabled = false;
    $('stop').disabled = true;
    draw();
  }
}

$('epochs').value = params.get('epochs') ?? $('epochs').value;
$('batch').value = params.get('batch') ?? $('batch').value;
$('start').addEventListener('click', () => { train(); });
$('stop').addEventListener('click', () => { if (device) device.stopTraining = true; });
$('data-file').addEventListener('change', async (event) => {
  const [file] = event.target.files;
  if (!file) return;
  chosenData = await file.arrayBuffer();
  $('data-panel').hidden = true;
  train();
});
key = takeKey();
if (!key) $('key-panel').hidden = false;
draw();
say(key ? 'Ready: press Train.' : 'Paste the server key, then press Train.');
state.ready = true;
if (params.get('autostart') === '1' && key) train();
