// `npm run build:page`: the device page of `splitkeras serve --device-page` into dist/device-page/
// (ignored by git): index.html, device_page.js (esbuild bundle of page/device_page.js with
// @tensorflow/tfjs, the wasm backend and the runtime) and the TF.js wasm binaries, all in one flat
// folder (the server serves exactly the files it finds there). scripts/setup runs it.
//
//   node tools/build_page.mjs [OUT_DIR]

import { copyFile, mkdir, readdir, rm } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('..', import.meta.url));

/** Build the page into `out` (default dist/device-page); returns the files written. */
export async function buildPage(out = path.join(ROOT, 'dist', 'device-page')) {
  const esbuild = await import('esbuild');
  await rm(out, { recursive: true, force: true });
  await mkdir(out, { recursive: true });
  await esbuild.build({ entryPoints: [path.join(ROOT, 'page', 'device_page.js')], bundle: true, format: 'esm',
    platform: 'browser', minify: true, outfile: path.join(out, 'device_page.js'), logLevel: 'error',
    legalComments: 'none' });
  await copyFile(path.join(ROOT, 'page', 'index.html'), path.join(out, 'index.html'));
  const dist = path.join(ROOT, 'node_modules', '@tensorflow', 'tfjs-backend-wasm', 'dist');
  for (const name of (await readdir(dist)).filter((n) => n.endsWith('.wasm'))) {
    await copyFile(path.join(dist, name), path.join(out, name));
  }
  return (await readdir(out)).sort();
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const out = process.argv[2] ? path.resolve(process.argv[2]) : undefined;
  const files = await buildPage(out);
  console.log(`device page built: ${files.join(', ')} in ${out ?? path.join(ROOT, 'dist', 'device-page')}`);
}
