#!/usr/bin/env node
// The JavaScript side of benchmarks/device_step.py: device steps in Node (cpu backend) and in
// headless Chromium (cpu and wasm backends), driven by JSON lines on stdin, one answer per line
// on stdout (the last line of output for each command).
//
//   {"cmd": "open", "client": "node-cpu"|"chromium-cpu"|"chromium-wasm"|"chromium-wasm-direct",
//    "model": "digits",
//    "app": "/path/to/app", "server": "http://127.0.0.1:PORT", "key": "...", "batch": 32}
//   {"cmd": "steps", "client": ..., "model": ..., "n": 5}  -> {"steps": [{ms, transportMs, loss}]}
//   {"cmd": "profile", "client": ..., "model": ...}       -> {"kernels": [{kernel, ms}]}
//   {"cmd": "quit"}
//
// The page is esbuild's bundle of step_bench_page.js (TF.js, the wasm backend, the runtime),
// served with the app bundle by tools/page_server.mjs on 127.0.0.1, which also proxies /v1 to
// the model's splitkeras server: page and protocol share one origin, so no CORS is needed (the
// server has none yet). The page is cross-origin isolated (COOP/COEP), so wasm may use threads.
// "chromium-wasm-direct" measures what that proxy hop costs: a second browser started with
// --disable-web-security (no CORS checks, for this measurement only) calls the server itself.

import { copyFile, mkdtemp, readdir, readFile, rm, symlink } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
// stdout carries the answers: anything TF.js prints goes to stderr
console.log = (...args) => console.error(...args);
import * as tf from '@tensorflow/tfjs';
import { loadLayersModelFromDir } from '../src/node_io.js';
import { launchChromium } from './chromium.mjs';
import { startPageServer } from './page_server.mjs';
import { createBench } from './step_bench.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const WASM_DIST = path.join(HERE, '..', 'node_modules', '@tensorflow', 'tfjs-backend-wasm', 'dist');
const clients = new Map(); // `${client}/${model}` -> bench
const pageServers = new Map(); // model -> page server
let site = null;
let browser = null;
let directBrowser = null;

async function buildSite() {
  const root = await mkdtemp(path.join(tmpdir(), 'splitkeras-bench-page-'));
  const esbuild = await import('esbuild');
  await esbuild.build({ entryPoints: [path.join(HERE, 'step_bench_page.js')], bundle: true,
    format: 'esm', platform: 'browser', outfile: path.join(root, 'page.js'), logLevel: 'error' });
  await (await import('node:fs/promises')).writeFile(path.join(root, 'index.html'),
    '<!doctype html><meta charset="utf-8"><title>device step</title><script type="module" src="/page.js"></script>\n');
  const wasm = path.join(root, 'wasm');
  await (await import('node:fs/promises')).mkdir(wasm);
  for (const file of (await readdir(WASM_DIST)).filter((f) => f.endsWith('.wasm'))) {
    await copyFile(path.join(WASM_DIST, file), path.join(wasm, file));
  }
  return root;
}

async function open({ client, model, app, server, key, batch, threads }) {
  if (client === 'node-cpu') {
    await tf.setBackend('cpu');
    const manifest = JSON.parse(await readFile(path.join(app, 'split.json'), 'utf8'));
    const models = {};
    for (const segment of manifest.segments.filter((s) => s.placement === 'device')) {
      models[segment.name] = await loadLayersModelFromDir(tf, path.join(app, path.dirname(segment.tfjs)));
    }
    clients.set(`${client}/${model}`, await createBench({ tf, manifest, models, serverUrl: server, key, batch }));
    return { backend: tf.getBackend(), node: process.version };
  }
  const direct = client.endsWith('-direct');
  const backend = client.replace(/^chromium-/, '').replace(/-direct$/, '');
  site ??= await buildSite();
  if (!pageServers.has(model)) {
    await symlink(path.resolve(app), path.join(site, `app-${model}`), 'dir');
    pageServers.set(model, await startPageServer({ root: site, proxy: server, isolate: true }));
  }
  let page;
  if (direct) {
    directBrowser ??= await launchChromium({ args: ['--disable-web-security'] });
    page = await directBrowser.newPage();
  } else {
    browser ??= await launchChromium();
    page = await browser.newPage();
  }
  const logs = [];
  page.on('console', (message) => logs.push(message.text()));
  page.on('pageerror', (error) => logs.push(`pageerror: ${error.message}`));
  await page.goto(`${pageServers.get(model).url}/index.html`);
  await page.waitForFunction(() => window.benchReady === true, null, { timeout: 60000 });
  let info;
  try {
    info = await page.evaluate((config) => window.bench.setup(config),
      { backend, app: `/app-${model}`, batch, key, serverUrl: direct ? server : undefined, threads });
  } catch (error) {
    throw new Error(`${error.message}\npage log:\n${logs.join('\n')}`);
  }
  clients.set(`${client}/${model}`, {
    steps: (n) => page.evaluate((count) => window.bench.steps(count), n),
    profile: () => page.evaluate(() => window.bench.profile()),
    close: () => page.evaluate(() => window.bench.close()),
  });
  return { ...info, proxied: !direct };
}

async function handle(command) {
  switch (command.cmd) {
    case 'open': return { info: await open(command) };
    case 'steps': return { steps: await clients.get(`${command.client}/${command.model}`).steps(command.n) };
    case 'profile': return { kernels: await clients.get(`${command.client}/${command.model}`).profile() };
    case 'quit': {
      for (const bench of clients.values()) await bench.close().catch(() => {});
      await browser?.close();
      await directBrowser?.close();
      for (const server of pageServers.values()) await server.close();
      if (site) await rm(site, { recursive: true, force: true });
      return { bye: true };
    }
    default: throw new Error(`unknown command ${command.cmd}`);
  }
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  let answer;
  try {
    answer = await handle(JSON.parse(line));
  } catch (error) {
    answer = { error: `${error.name}: ${error.message}` };
  }
  process.stdout.write(`${JSON.stringify(answer)}\n`);
  if (answer.bye) break;
}
process.exit(0);
