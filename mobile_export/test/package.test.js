// The npm package as an app installs it: `npm pack` (what the tarball holds), `npm install`
// of the tarball into a fresh project offline (its peer @tensorflow/tfjs linked from this
// checkout's node_modules), `import { SplitDevice } from "splitkeras-device"` in Node,
// esbuild bundles for the browser and with React Native's resolution conditions (no
// Node-only import), and the hand-written TypeScript declarations checked by `tsc --noEmit`
// on a consumer that must compile and one that must not.

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, mkdir, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const run = promisify(execFile);
const PACKAGE_DIR = fileURLToPath(new URL('..', import.meta.url));
const NODE_MODULES = path.join(PACKAGE_DIR, 'node_modules');
const NPM = process.platform === 'win32' ? 'npm.cmd' : 'npm';
let work;
let project;
let packed;

/** Install a package tarball into a fresh project, offline, with @tensorflow linked in. */
export async function installTarball(tarball, folder) {
  await mkdir(folder, { recursive: true });
  await writeFile(path.join(folder, 'package.json'), JSON.stringify({ name: 'consumer', private: true,
    type: 'module' }));
  await run(NPM, ['install', '--offline', '--no-audit', '--no-fund', '--no-save', '--legacy-peer-deps',
    '--ignore-scripts', '--loglevel=error', tarball], { cwd: folder });
  await symlink(path.join(NODE_MODULES, '@tensorflow'), path.join(folder, 'node_modules', '@tensorflow'), 'dir');
}

before(async () => {
  work = await mkdtemp(path.join(tmpdir(), 'splitkeras-pack-'));
  const { stdout } = await run(NPM, ['pack', '--json', '--pack-destination', work, '--loglevel=error'],
    { cwd: PACKAGE_DIR });
  [packed] = JSON.parse(stdout);
  project = path.join(work, 'consumer');
  await installTarball(path.join(work, packed.filename), project);
});
after(async () => {
  if (work) await rm(work, { recursive: true, force: true });
});

test('npm pack ships the runtime, its declarations and README, and no tests, fixtures, tools or Python',
  () => {
    const files = packed.files.map((f) => f.path).sort();
    for (const needed of ['package.json', 'README.md', 'src/runtime.js', 'src/runtime.d.ts',
      'src/kernels.js', 'src/node_io.js', 'src/node_io.d.ts', 'src/session.js', 'src/http.js',
      'src/fetch_errors.js', 'src/protocol.js', 'src/wire.js', 'src/codecs.js', 'src/wire_error.js']) {
      assert.ok(files.includes(needed), `${needed} is in the tarball: ${files.join(', ')}`);
    }
    const unwanted = files.filter((f) => /^(test|tools|examples|node_modules)\/|\.py$|fixtures|\.bin$/.test(f));
    assert.deepEqual(unwanted, []);
    assert.ok(files.every((f) => f === 'package.json' || f === 'README.md'
      || /^src\/[^/]+\.(js|d\.ts)$/.test(f) || /^src\/layers\/[^/]+\.(js|json)$/.test(f)), files.join(', '));
    assert.ok(files.includes('src/layers/index.js') && files.includes('src/layers/table.json'),
      'the layers TF.js lacks ship with the runtime');
  });

test('installed from the tarball offline, the package imports by name in Node, with ./node '
  + 'and no deep imports', async () => {
  const script = `
    import * as tf from '@tensorflow/tfjs';
    import { SplitDevice, registerTrainingKernels, ProtocolError, deriveTopology } from 'splitkeras-device';
    import { loadLayersModelFromDir } from 'splitkeras-device/node';
    const { registered } = registerTrainingKernels(tf);
    let deep = 'imported';
    try { await import('splitkeras-device/src/wire.js'); } catch (e) { deep = e.code; }
    console.log(JSON.stringify({ create: typeof SplitDevice.create, kernels: registered.length,
      error: new ProtocolError('x').name, topology: typeof deriveTopology, node: typeof loadLayersModelFromDir,
      deep, resolved: import.meta.resolve('splitkeras-device') }));`;
  await writeFile(path.join(project, 'check.mjs'), script);
  const { stdout } = await run(process.execPath, ['check.mjs'], { cwd: project });
  const out = JSON.parse(stdout.trim().split('\n').at(-1));
  assert.equal(out.create, 'function');
  assert.ok(out.kernels >= 8);
  assert.equal(out.error, 'ProtocolError');
  assert.equal(out.node, 'function');
  assert.equal(out.deep, 'ERR_PACKAGE_PATH_NOT_EXPORTED');
  assert.ok(out.resolved.includes('/consumer/node_modules/splitkeras-device/src/runtime.js'), out.resolved);
});

async function bundle(entry, options) {
  const esbuild = await import('esbuild');
  return esbuild.build({ entryPoints: [entry], bundle: true, write: false, metafile: true,
    format: 'esm', logLevel: 'silent', ...options });
}

test('esbuild bundles the installed package for the browser and as Metro resolves it (react-native), '
  + 'with no Node-only import; the ./node entry does not bundle for a browser', async () => {
  const entry = path.join(project, 'app.js');
  await writeFile(entry, `import * as tf from '@tensorflow/tfjs';
    import { SplitDevice, registerTrainingKernels } from 'splitkeras-device';
    registerTrainingKernels(tf);
    export const ready = () => SplitDevice.create;`);
  for (const options of [{ platform: 'browser' },
    // Metro: the react-native condition and main field, then browser (with its file map), main
    { platform: 'browser', conditions: ['react-native'], mainFields: ['react-native', 'browser', 'main'] }]) {
    const result = await bundle(entry, options);
    const inputs = Object.keys(result.metafile.inputs);
    assert.ok(inputs.some((f) => f.endsWith('node_modules/splitkeras-device/src/runtime.js')), inputs.join('\n'));
    assert.ok(inputs.some((f) => f.endsWith('node_modules/splitkeras-device/src/kernels.js')));
    assert.ok(!inputs.some((f) => f.endsWith('node_io.js')), 'node_io.js stays out');
    const text = result.outputFiles[0].text;
    assert.doesNotMatch(text, /from\s*["']node:|require\(["'](node:)?(fs|path|os|child_process)["']\)/);
  }
  const nodeEntry = path.join(project, 'node_entry.js');
  await writeFile(nodeEntry, "export { loadLayersModelFromDir } from 'splitkeras-device/node';\n");
  await assert.rejects(bundle(nodeEntry, { platform: 'browser' }), /splitkeras-device\/node|node:fs/);
});

const CONSUMER = `import * as tf from '@tensorflow/tfjs';
import { SplitDevice, ProtocolError, registerTrainingKernels, type FitOptions, type SplitManifest } from 'splitkeras-device';
import { loadLayersModelFromDir } from 'splitkeras-device/node';

export async function train(manifest: SplitManifest, xs: tf.Tensor, ys: tf.Tensor): Promise<number> {
  registerTrainingKernels(tf, { backends: ['cpu', 'wasm'] });
  const head = await loadLayersModelFromDir(tf, 'app/head_tfjs');
  const device = await SplitDevice.create({ tf, manifest, models: { head, tail: 'https://x/tail/model.json' },
    serverUrl: 'https://split.example.org', key: 'k', wireDtype: 'float16' });
  const options: FitOptions = { batchSize: 32, epochs: 2, validationSplit: 0.1, pipelineDepth: 2,
    onWarning: (message) => { console.log(message.length); },
    onEpochEnd: (epoch, logs) => { console.log(epoch, logs.loss.toFixed(3), logs.val_loss); },
    callbacks: [{ onBatchEnd: (batch, logs) => { console.log(batch, logs.size, logs.bytesSent); } }] };
  try {
    const { history, steps } = await device.fit(xs, ys, options);
    const logs = await device.evaluate(xs, ys, { batchSize: 16 });
    const p: tf.Tensor = await device.predict(xs);
    p.dispose();
    const w: Float32Array = device.getWeights('head')['conv/kernel'];
    return history.loss[0] + steps + logs.loss + w.length;
  } catch (error) {
    if (error instanceof ProtocolError) console.log(error.code, error.status);
    throw error;
  } finally {
    await device.closeSession();
  }
}
`;
const BAD = `import * as tf from '@tensorflow/tfjs';
import { SplitDevice, type SplitManifest } from 'splitkeras-device';
export async function bad(manifest: SplitManifest, xs: tf.Tensor) {
  const device = await SplitDevice.create({ tf, manifest, models: {}, wireDtype: 'float64' });
  await device.fit(xs, xs, { batchSize: '32' });
  await device.fit(xs, xs, { pipelineDepth: 5 });
  const n: string = device.stats.bytesSent;
  return n;
}
`;

test('tsc --noEmit: the declarations type a real consumer (nodenext and bundler resolution) and '
  + 'reject a wrong one', async () => {
  const tsc = path.join(NODE_MODULES, 'typescript', 'bin', 'tsc');
  await writeFile(path.join(project, 'consumer.ts'), CONSUMER);
  await writeFile(path.join(project, 'bad.ts'), BAD);
  const options = (resolution, file) => ({ compilerOptions: { target: 'es2022', strict: true, noEmit: true,
    skipLibCheck: true, types: [], module: resolution === 'bundler' ? 'esnext' : 'nodenext',
    moduleResolution: resolution }, files: [file] });
  for (const resolution of ['nodenext', 'bundler']) {
    await writeFile(path.join(project, 'tsconfig.json'), JSON.stringify(options(resolution, 'consumer.ts')));
    await run(process.execPath, [tsc, '-p', 'tsconfig.json'], { cwd: project }).catch((error) => {
      assert.fail(`tsc (${resolution}) on consumer.ts:\n${error.stdout}${error.stderr}`);
    });
  }
  await writeFile(path.join(project, 'tsconfig.json'), JSON.stringify(options('nodenext', 'bad.ts')));
  const failure = await run(process.execPath, [tsc, '-p', 'tsconfig.json'], { cwd: project }).then(
    () => null, (error) => error);
  assert.ok(failure, 'tsc accepted bad.ts');
  const errors = failure.stdout.split('\n').filter((line) => /bad\.ts\(\d+,\d+\): error/.test(line));
  assert.equal(errors.length, 4, failure.stdout);
  assert.match(failure.stdout, /"float64"/);
  assert.match(failure.stdout, /bad\.ts\(5,\d+\): error TS2322: Type 'string' is not assignable to type 'number'/);
  assert.match(failure.stdout, /bad\.ts\(6,\d+\): error TS2322: Type '5' is not assignable to type '1 \| 2 \| 3 \| 4 \| undefined'/);
  const declared = await readFile(path.join(project, 'node_modules', 'splitkeras-device', 'package.json'), 'utf8');
  assert.equal(JSON.parse(declared).exports['.'].types, './src/runtime.d.ts');
});
