// The runtime in a real browser: headless Debian Chromium (tools/chromium.mjs, playwright-core)
// opens a page (esbuild bundle of TF.js, the wasm backend, the runtime: test/browser/page.js)
// served from 127.0.0.1, whose /v1 routes are the in-memory server of the Hermes test
// (test/hermes/fake_server.js) over real HTTP. The page trains with the browser's own fetch
// (a method call of it would throw "Illegal invocation"), on the cpu and the wasm backend, and
// the weights are compared with Node's; a server of another origin without CORS gives the
// client-side error that names CORS.
//
// Without Chromium the tests are skipped with the reason printed (scripts/setup installs it).

import assert from 'node:assert/strict';
import { copyFile, mkdir, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import * as tf from '@tensorflow/tfjs';

import { chromiumMissing, launchChromium } from '../tools/chromium.mjs';
import { startPageServer } from '../tools/page_server.mjs';
import { fakeServer } from './hermes/fake_server.js';
import { data } from './hermes/harness.js';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const missing = chromiumMissing();
if (missing) console.log(`# browser.test.js skipped: ${missing}`);
const skip = missing ?? false;
let site;
let browser;
const servers = [];

/** A /v1 handler answering from a fresh in-memory server (the fetch-like fake of the Hermes test). */
function protocolHandler() {
  const { W } = data(tf);
  const server = fakeServer(tf, { W });
  return async (req, res) => {
    if (req.method === 'OPTIONS') { // as `splitkeras serve` without --cors-origin: no preflight
      res.writeHead(405, { 'content-type': 'application/json' });
      res.end('{"detail": "Method Not Allowed"}');
      return;
    }
    const chunks = [];
    for await (const chunk of req) chunks.push(chunk);
    const body = Buffer.concat(chunks);
    const answer = await server.fetch(`http://page${req.url}`, { method: req.method,
      headers: { 'Content-Type': req.headers['content-type'], Authorization: req.headers.authorization,
        ...(req.headers['splitkeras-step'] === undefined ? {} : { 'Splitkeras-Step': req.headers['splitkeras-step'] }) },
      body: body.length ? new Uint8Array(body.buffer, body.byteOffset, body.byteLength) : undefined });
    const bytes = Buffer.from(await answer.arrayBuffer());
    res.writeHead(answer.status, answer.headers.get('content-type') ? { 'content-type': answer.headers.get('content-type') } : {});
    res.end(answer.status === 204 ? undefined : bytes);
  };
}

before(async () => {
  if (skip) return;
  await tf.setBackend('cpu');
  site = await mkdtemp(path.join(tmpdir(), 'splitkeras-browser-'));
  const esbuild = await import('esbuild');
  await esbuild.build({ entryPoints: [path.join(ROOT, 'test', 'browser', 'page.js')], bundle: true,
    format: 'esm', platform: 'browser', outfile: path.join(site, 'page.js'), logLevel: 'error' });
  await writeFile(path.join(site, 'index.html'),
    '<!doctype html><meta charset="utf-8"><script type="module" src="/page.js"></script>\n');
  await mkdir(path.join(site, 'wasm'));
  const dist = path.join(ROOT, 'node_modules', '@tensorflow', 'tfjs-backend-wasm', 'dist');
  for (const f of (await readdir(dist)).filter((n) => n.endsWith('.wasm'))) {
    await copyFile(path.join(dist, f), path.join(site, 'wasm', f));
  }
  browser = await launchChromium();
});
after(async () => {
  await browser?.close();
  for (const server of servers) await server.close();
  if (site) await rm(site, { recursive: true, force: true });
});

async function openPage(server) {
  const page = await browser.newPage();
  const log = [];
  page.on('pageerror', (error) => log.push(error.message));
  await page.goto(`${server.url}/index.html`);
  await page.waitForFunction(() => window.pageReady === true, null, { timeout: 60000 }).catch((error) => {
    throw new Error(`${error.message}: ${log.join('\n')}`);
  });
  return page;
}

const maxDiff = (a, b) => Math.max(...Object.keys(b).flatMap((k) => b[k].map((v, i) => Math.abs(v - a[k][i]))));

test('Chromium trains the split with its own fetch on cpu and wasm, as Node does', { skip, timeout: 180000 },
  async () => {
    const reference = await globalThis.runHarness({ tf, backend: 'cpu' });
    for (const backend of ['cpu', 'wasm']) {
      const server = await startPageServer({ root: site, proxy: protocolHandler() });
      servers.push(server);
      const page = await openPage(server);
      const result = await page.evaluate((options) => window.train(options), { backend, serverUrl: server.url });
      assert.ok(!result.error, `${backend}: ${JSON.stringify(result.error)}`);
      assert.equal(result.backend, backend);
      assert.equal(result.steps, 2);
      const diff = maxDiff(result.weights, reference.weights);
      console.log(`Chromium ${backend}: loss ${result.history.loss[0]} (Node ${reference.history.loss[0]}), `
        + `weights max |diff| ${diff.toExponential(2)}`);
      assert.ok(diff <= (backend === 'cpu' ? 1e-6 : 1e-4), `${backend}: weights differ from Node's by ${diff}`);
      assert.ok(Math.abs(result.history.loss[0] - reference.history.loss[0]) <= 1e-5);
      await page.close();
    }
  });

test('Chromium: a server of another origin without CORS is a client_network error naming CORS',
  { skip, timeout: 120000 }, async () => {
    const pageServer = await startPageServer({ root: site, proxy: protocolHandler() });
    const otherOrigin = await startPageServer({ root: site, proxy: protocolHandler() }); // no CORS headers
    servers.push(pageServer, otherOrigin);
    const page = await openPage(pageServer);
    const result = await page.evaluate((options) => window.train(options), { backend: 'cpu',
      serverUrl: otherOrigin.url });
    assert.ok(result.error, 'the cross-origin request failed');
    assert.equal(result.error.name, 'ProtocolError');
    assert.equal(result.error.code, 'client_network');
    assert.match(result.error.message, /CORS/);
    assert.match(result.error.message, new RegExp(`--cors-origin ${pageServer.url.replace(/[.]/g, '\\.')}`));
    assert.doesNotMatch(result.error.message, /Is the server/);
    await page.close();
  });
