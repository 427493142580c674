// Headless Chromium (Debian's `chromium` package) driven by playwright-core, for the browser
// tests and benchmarks: never a browser that playwright downloads (nothing is downloaded).
//
//   const reason = chromiumMissing();        // null, or why there is no browser
//   const browser = await launchChromium();  // a fresh --user-data-dir every launch
//   const page = await browser.newPage();
//   ...
//   await browser.close();                   // also removes the profile folder

import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';

export const CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];

/** The Chromium binary: $CHROMIUM_PATH, else Debian's /usr/bin/chromium (null if neither). */
export function chromiumPath() {
  for (const candidate of [process.env.CHROMIUM_PATH, '/usr/bin/chromium']) {
    if (candidate && existsSync(candidate)) return candidate;
  }
  return null;
}

/** Why the browser tests cannot run here, or null when they can. */
export function chromiumMissing() {
  if (!chromiumPath()) {
    return 'no Chromium: install Debian\'s package (`apt-get update && apt-get install -y chromium`, '
      + 'scripts/setup does) or set CHROMIUM_PATH';
  }
  return null;
}

/**
 * Launch headless Chromium with a fresh profile folder.
 * @param {{args?: string[]}} [options] more Chromium flags
 * @returns {Promise<{newPage: () => Promise<object>, close: () => Promise<void>, context: object}>}
 */
export async function launchChromium({ args = [] } = {}) {
  const executablePath = chromiumPath();
  if (!executablePath) throw new Error(chromiumMissing());
  const { chromium } = await import('playwright-core');
  const profile = await mkdtemp(path.join(tmpdir(), 'splitkeras-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath, headless: true, args: [...CHROMIUM_FLAGS, ...args],
  });
  return {
    context,
    newPage: () => context.newPage(),
    close: async () => {
      await context.close();
      await rm(profile, { recursive: true, force: true });
    },
  };
}
