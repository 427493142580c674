// The browser page of benchmarks/device_step.py (bundled by esbuild with TF.js and the wasm
// backend; step_bench_worker.mjs builds and serves it): window.bench.setup(...) loads an app
// bundle's device segments over HTTP on the asked backend, window.bench.steps(n) times steps.

import * as tf from '@tensorflow/tfjs';
import { setThreadsCount, setWasmPaths } from '@tensorflow/tfjs-backend-wasm';
import { createBench } from './step_bench.js';

let bench = null;
window.bench = {
  async setup({ backend, app, batch, key, serverUrl, threads }) {
    if (backend === 'wasm') setWasmPaths(new URL('/wasm/', location.href).href);
    if (backend === 'wasm' && threads) setThreadsCount(threads);
    await tf.setBackend(backend);
    await tf.ready();
    const manifest = await (await fetch(`${app}/split.json`)).json();
    const models = {};
    for (const segment of manifest.segments.filter((s) => s.placement === 'device')) {
      models[segment.name] = await tf.loadLayersModel(`${app}/${segment.tfjs}`);
    }
    bench = await createBench({ tf, manifest, models, serverUrl: serverUrl ?? location.origin, key, batch });
    const multithread = backend === "wasm" ? await tf.env().getAsync("WASM_HAS_MULTITHREAD_SUPPORT") : null;
    const simd = backend === 'wasm' ? await tf.env().getAsync('WASM_HAS_SIMD_SUPPORT') : null;
    return { backend: tf.getBackend(), crossOriginIsolated: globalThis.crossOriginIsolated === true,
      threads: multithread, threadsCount: threads ?? null, simd, userAgent: navigator.userAgent, cores: navigator.hardwareConcurrency };
  },
  steps: (n) => bench.steps(n),
  profile: () => bench.profile(),
  close: () => bench.close(),
};
window.benchReady = true;
