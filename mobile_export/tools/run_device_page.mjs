// Open the device page of a running `splitkeras serve --device-page` in headless Chromium
// (tools/chromium.mjs), let it train, and print what it reports (window.devicePage) as JSON
// on stdout, with the page's console errors. tests/test_device_page.py drives it.
//
//   node tools/run_device_page.mjs URL [TIMEOUT_MS] [DATA_FILE]
//   URL e.g. http://127.0.0.1:8000/device/?epochs=2&autostart=1#key=KEY
// With DATA_FILE, a page that asks for data (a split without data of its own) gets it through
// its file chooser, as a user would, and the run goes on.
// Exit 2 with a reason when there is no Chromium.

import { chromiumMissing, launchChromium } from './chromium.mjs';

const [url, timeoutText = '240000', dataFile] = process.argv.slice(2);
if (!url) {
  console.error('usage: node tools/run_device_page.mjs URL [TIMEOUT_MS]');
  process.exit(1);
}
const missing = chromiumMissing();
if (missing) {
  console.error(missing);
  process.exit(2);
}
const browser = await launchChromium();
const errors = [];
try {
  const page = await browser.newPage();
  page.on('pageerror', (error) => errors.push(`pageerror: ${error.message}`));
  page.on('console', (message) => { if (message.type() === 'error') errors.push(`console: ${message.text()}`); });
  const settled = () => page.waitForFunction(() => ['done', 'error', 'needs_data'].includes(window.devicePage?.status)
    || (window.devicePage?.ready && !/autostart=1/.test(location.search)), null,
  { timeout: Number(timeoutText), polling: 200 });
  await page.goto(url);
  await settled();
  let askedForData = null;
  if (dataFile && await page.evaluate(() => window.devicePage.status === 'needs_data')) {
    askedForData = await page.evaluate(() => document.getElementById('data-message').textContent);
    await page.setInputFiles('#data-file', dataFile);
    await page.waitForFunction(() => window.devicePage.status !== 'needs_data', null, { timeout: 30000 });
    await settled();
  }
  const result = await page.evaluate(() => ({
    ...window.devicePage,
    address: location.href,
    message: document.getElementById('message').textContent,
    dataMessage: document.getElementById('data-message').textContent,
    keyPanelShown: !document.getElementById('key-panel').hidden,
    chartPolylines: [...document.querySelectorAll('#chart polyline')].map((p) => ({
      series: p.dataset.series, points: p.getAttribute('points').split(' ').length })),
    shown: Object.fromEntries(['steps', 'applied', 'rate', 'loss', 'accuracy', 'test-accuracy', 'bytes', 'backend']
      .map((id) => [id, document.getElementById(id).textContent])),
  }));
  console.log(JSON.stringify({ ...result, askedForData, errors }));
} catch (error) {
  console.log(JSON.stringify({ status: 'driver_error', error: { message: error.message }, errors }));
} finally {
  await browser.close();
}
