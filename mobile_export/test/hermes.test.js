// The runtime's U-shaped training under Hermes, React Native's JavaScript engine (npm
// hermes-engine-cli 0.12, its Linux binary), transpiled as Metro would, compared with Node.
//
// The program is test/hermes/harness.js: the example app's training code
// (examples/react-native/training.js), which trains a conv/BatchNorm/pool head and a softmax
// tail against an in-memory server (test/hermes/fake_server.js) for two steps. It is bundled by
// esbuild (the runtime and the example only) and lowered by Babel's preset-env (classes,
// async functions to generators, optional chaining, ...: what Metro's preset does for Hermes);
// TF.js is its pre-built ES5 bundle (dist/tf.js), not transpiled. What React Native would
// provide is provided, and nothing else:
//   * `global` (React Native defines it; Hermes has only globalThis),
//   * `console` (React Native's; Hermes' CLI has only print),
//   * fetch (React Native's whatwg-fetch; here the in-memory server's function),
//   * a TF.js platform (what @tensorflow/tfjs-react-native sets with tf.setPlatform: fetch, now,
//     encode/decode, isTypedArray).
// Hermes' CLI has setTimeout and Promise itself (React Native: its timers). No TextEncoder,
// TextDecoder, AbortController, structuredClone, performance or Array.prototype.at: the runtime
// needs none of them. The very same file then runs in a fresh Node vm context with the same
// shims; the losses and the weights after training must agree to 1e-6.

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import vm from 'node:vm';

const run = promisify(execFile);
const ROOT = fileURLToPath(new URL('..', import.meta.url));
const HERMES = path.join(ROOT, 'node_modules', 'hermes-engine-cli', 'linux64-bin', 'hermes');
const TFJS_ES5 = path.join(ROOT, 'node_modules', '@tensorflow', 'tfjs', 'dist', 'tf.js');

// What React Native provides that Hermes' CLI does not (see above).
const PRELUDE = `var global = globalThis;
if (typeof console === 'undefined') {
  globalThis.console = { log: print, info: print, warn: print, error: print, debug: function () {} };
}
`;
const BOOT = `
function utf8Encode(text) {
  var escaped = unescape(encodeURIComponent(text));
  var out = new Uint8Array(escaped.length);
  for (var i = 0; i < escaped.length; i += 1) out[i] = escaped.charCodeAt(i);
  return out;
}
function utf8Decode(bytes) {
  var s = '';
  for (var i = 0; i < bytes.length; i += 1) s += String.fromCharCode(bytes[i]);
  return decodeURIComponent(escape(s));
}
tf.setPlatform('react-native', {
  fetch: function () { return Promise.reject(new Error('no network in this test')); },
  now: function () { return Date.now(); },
  encode: function (text) { return utf8Encode(text); },
  decode: function (bytes) { return utf8Decode(bytes); },
  isTypedArray: function (a) { return ArrayBuffer.isView(a) && !(a instanceof DataView); },
  setTimeoutCustom: function (f, delay) { setTimeout(f, delay); },
  isTypedArrayBrowser: function (a) { return ArrayBuffer.isView(a) && !(a instanceof DataView); }
});
runHarness({ tf: tf }).then(function (result) {
  print('RESULT ' + JSON.stringify(result));
}, function (error) {
  print('ERROR ' + (error && error.stack ? error.stack : error));
});
`;

/** esbuild (the runtime and the example only) + Babel preset-env, as Metro lowers an app. */
async function buildProgram() {
  const esbuild = await import('esbuild');
  const { outputFiles } = await esbuild.build({
    entryPoints: [path.join(ROOT, 'test', 'hermes', 'harness.js')], bundle: true, write: false,
    format: 'iife', platform: 'neutral', target: 'es2020', logLevel: 'error',
    alias: { 'splitkeras-device': path.join(ROOT, 'src', 'runtime.js') },
  });
  const babel = await import('@babel/core');
  const { code } = await babel.transformAsync(outputFiles[0].text, {
    babelrc: false, configFile: false, sourceType: 'script', compact: false, comments: false,
    // Hermes runs generators natively: async functions become generators, not regenerator
    presets: [[path.join(ROOT, 'node_modules', '@babel', 'preset-env'), { targets: { ie: '11' },
      modules: false, exclude: ['transform-regenerator'] }]],
  });
  return code;
}

function parse(output, engine) {
  const line = output.split('\n').find((l) => l.startsWith('RESULT ') || l.startsWith('ERROR '));
  assert.ok(line, `${engine} printed no result:\n${output.slice(-3000)}`);
  assert.ok(line.startsWith('RESULT '), `${engine}: ${line}`);
  return JSON.parse(line.slice('RESULT '.length));
}

function runInNode(source) {
  return new Promise((resolve, reject) => {
    const lines = [];
    const print = (...args) => {
      const text = args.join(' ');
      lines.push(text);
      if (text.startsWith('RESULT ') || text.startsWith('ERROR ')) resolve(lines.join('\n'));
    };
    const context = vm.createContext({ print, setTimeout, clearTimeout });
    try {
      vm.runInContext(source, context, { filename: 'hermes-program.js' });
    } catch (error) {
      reject(error);
    }
  });
}

const missing = !existsSync(HERMES) ? `no Hermes binary at ${HERMES} (npm ci in mobile_export installs `
  + 'hermes-engine-cli)' : null;
if (missing) console.log(`# hermes.test.js skipped: ${missing}`);

test('the example app\'s training runs under Hermes as in Node: same losses, weights to 1e-6',
  { skip: missing ?? false, timeout: 120000 }, async () => {
    const work = await mkdtemp(path.join(tmpdir(), 'splitkeras-hermes-'));
    try {
      const lowered = await buildProgram();
      // TF.js's ES5 bundle carries core-js polyfills (Array.prototype.at, structuredClone,
      // Object.hasOwn, ...) that would hide their absence from bare Hermes; an app's Metro
      // build of @tensorflow/tfjs does not have them: the runtime must not use them.
      for (const [what, pattern] of [['Array.prototype.at', /\.at\(/], ['structuredClone', /structuredClone/],
        ['Object.hasOwn', /Object\.hasOwn\b/], ['findLast', /\.findLast(Index)?\(/], ['replaceAll', /\.replaceAll\(/],
        ['an unguarded TextEncoder', /new TextEncoder(?![^\n]*typeof)/]]) {
        const uses = lowered.split('\n').filter((line) => pattern.test(line) && !/typeof TextEncoder/.test(line));
        assert.deepEqual(uses, [], `the lowered runtime uses ${what}, which Hermes 0.12 lacks`);
      }
      const program = PRELUDE + await readFile(TFJS_ES5, 'utf8') + '\n' + lowered + BOOT;
      assert.doesNotMatch(program.slice(-200000), /\bclass\s+[A-Za-z_$]+\s*(extends|\{)/,
        'no class syntax left for Hermes 0.12');
      const file = path.join(work, 'program.js');
      await writeFile(file, program);
      const started = Date.now();
      const { stdout, stderr } = await run(HERMES, ['-w', file], { maxBuffer: 64 * 2 ** 20 });
      const hermesSeconds = (Date.now() - started) / 1000;
      const hermes = parse(stdout + stderr, 'Hermes');
      const node = parse(await runInNode(program), 'Node');
      console.log(`Hermes ${hermesSeconds.toFixed(1)} s; losses ${hermes.history.loss} (Node ${node.history.loss})`);
      assert.equal(hermes.steps, 2);
      assert.deepEqual(hermes.requests, ['open', 'forward', 'backward', 'forward', 'backward', 'close']);
      assert.deepEqual(Object.keys(hermes.weights).sort(), Object.keys(node.weights).sort());
      assert.ok(Object.keys(hermes.weights).includes('bn/moving_mean'));
      for (const [i, [batch, loss]] of hermes.progress.entries()) {
        assert.equal(batch, node.progress[i][0]);
        assert.ok(Math.abs(loss - node.progress[i][1]) <= 1e-6, `batch ${batch} loss ${loss} vs ${node.progress[i][1]}`);
      }
      let worst = 0;
      for (const [name, values] of Object.entries(node.weights)) {
        values.forEach((v, j) => { worst = Math.max(worst, Math.abs(v - hermes.weights[name][j])); });
      }
      console.log(`weights after training: max |Hermes - Node| ${worst}`);
      assert.ok(worst <= 1e-6, `weights after training: max |Hermes - Node| ${worst}`);
      // the step trained: the weights moved from their initial values
      assert.ok(hermes.history.loss[0] > 0 && Number.isFinite(hermes.history.loss[0]));
    } finally {
      await rm(work, { recursive: true, force: true });
    }
  });
