#!/usr/bin/env node
// A page on one origin (127.0.0.1:PAGE_PORT, tools/page_server.mjs) trains a splitkeras server
// on another (SERVER_URL, `splitkeras serve --cors-origin http://127.0.0.1:PAGE_PORT`) in real
// headless Chromium, with the browser's own fetch: test/browser/steps_page.js. For
// tests/test_browser_cors.py and benchmarks/cors_preflight.py, which count the server's
// OPTIONS requests in its access log.
//
// Usage: node tools/cors_steps.mjs '{"pagePort": 8123, "serverUrl": "http://127.0.0.1:8000",
//   "key": "...", "steps": 8, "batch": 2}'
// Prints one JSON line: {requests: [{method, path, ms}], stepMs: [...], origin} or {error}.

import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { launchChromium } from './chromium.mjs';
import { startPageServer } from './page_server.mjs';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const job = JSON.parse(process.argv[2]);
const site = await mkdtemp(path.join(tmpdir(), 'splitkeras-cors-'));
let browser = null;
let server = null;
try {
  const esbuild = await import('esbuild');
  await esbuild.build({ entryPoints: [path.join(ROOT, 'test', 'browser', 'steps_page.js')], bundle: true,
    format: 'esm', platform: 'browser', outfile: path.join(site, 'page.js'), logLevel: 'error' });
  await writeFile(path.join(site, 'index.html'),
    '<!doctype html><meta charset="utf-8"><script type="module" src="/page.js"></script>\n');
  server = await startPageServer({ root: site, port: job.pagePort });
  browser = await launchChromium();
  const page = await browser.newPage();
  await page.goto(`${server.url}/index.html`);
  await page.waitForFunction(() => window.pageReady === true, null, { timeout: 60000 });
  const result = await page.evaluate((options) => window.runSteps(options),
    { serverUrl: job.serverUrl, key: job.key, steps: job.steps, batch: job.batch ?? 2 });
  console.log(JSON.stringify(result));
} catch (error) {
  console.log(JSON.stringify({ error: { name: error.name, message: error.message } }));
} finally {
  await browser?.close();
  await server?.close();
  await rm(site, { recursive: true, force: true });
}
