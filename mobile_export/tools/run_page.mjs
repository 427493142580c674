#!/usr/bin/env node
// Open a page in headless Chromium and print what it leaves in a window variable, for tests
// that run a web example against a real server (tests/test_app_readme.py):
//
//   node tools/run_page.mjs --root web --proxy http://127.0.0.1:PORT --path 'index.html?key=K' \
//     --wait splitResult [--reload] [--timeout 120]
//
// The folder is served from 127.0.0.1 by page_server.mjs, /v1 reverse-proxied to --proxy (one
// origin: no CORS needed). Prints one JSON line: {"results": [<window[wait]>, ...], "log": [...]};
// with --reload the page is loaded a second time in the same browser profile (IndexedDB kept).

import { parseArgs } from 'node:util';
import { launchChromium } from './chromium.mjs';
import { startPageServer } from './page_server.mjs';

const { values } = parseArgs({ options: { root: { type: 'string' }, proxy: { type: 'string' },
  path: { type: 'string', default: 'index.html' }, wait: { type: 'string', default: 'splitResult' },
  reload: { type: 'boolean', default: false }, timeout: { type: 'string', default: '120' } } });
const server = await startPageServer({ root: values.root, proxy: values.proxy });
const browser = await launchChromium();
const log = [];
const results = [];
try {
  const page = await browser.newPage();
  page.on('console', (m) => log.push(m.text()));
  page.on('pageerror', (e) => log.push(`pageerror: ${e.message}`));
  for (let run = 0; run < (values.reload ? 2 : 1); run += 1) {
    await page.goto(`${server.url}/${values.path}`);
    try {
      await page.waitForFunction((name) => window[name] !== undefined, values.wait,
        { timeout: Number(values.timeout) * 1000 });
    } catch (error) {
      throw new Error(`${error.message}\n${log.join('\n')}`);
    }
    results.push(await page.evaluate((name) => window[name], values.wait));
  }
  process.stdout.write(`${JSON.stringify({ results, log })}\n`);
} finally {
  await browser.close();
  await server.close();
}
