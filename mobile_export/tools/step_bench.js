// The device step of benchmarks/device_step.py, shared by the Node worker
// (step_bench_worker.mjs) and the browser page (step_bench_page.js): one SplitDevice on the
// app bundle's device segments against a real server, `trainStep` timed step by step, with
// the time spent in `fetch` (network + server, the response body read) counted apart.

import { SplitDevice } from '../src/runtime.js';

const now = () => (typeof performance !== 'undefined' ? performance.now() : Date.now());

/**
 * @param {{tf: object, manifest: object, models: object, serverUrl: string, key: string,
 *   batch: number, kernels?: boolean}} options
 */
export async function createBench({ tf, manifest, models, serverUrl, key, batch, kernels = true }) {
  let transportMs = 0;
  const timedFetch = async (...args) => {
    const started = now();
    const response = await globalThis.fetch(...args);
    const body = await response.arrayBuffer();
    transportMs += now() - started;
    return new Response(response.status === 204 || response.status === 304 ? null : body,
      { status: response.status, headers: response.headers });
  };
  const device = await SplitDevice.create({ tf, manifest, models, serverUrl, key, fetch: timedFetch,
    seed: 1, retries: 2, kernels });
  await device.openSession();
  const [input] = manifest.model_inputs;
  const classes = manifest.model_outputs[0].shape[manifest.model_outputs[0].shape.length - 1];
  const xs = [0, 1].map((i) => tf.randomUniform([batch, ...input.shape.slice(1)], 0, 1, 'float32', 11 + i));
  const ys = [0, 1].map((i) => tf.randomUniform([batch], 0, classes, 'int32', 21 + i));
  let k = 0;
  const one = async () => {
    const before = transportMs;
    const started = now();
    const { loss } = await device.trainStep(xs[k % 2], ys[k % 2]);
    k += 1;
    return { ms: now() - started, transportMs: transportMs - before, loss };
  };
  return {
    backend: tf.getBackend(),
    async steps(n) {
      const out = [];
      for (let i = 0; i < n; i += 1) out.push(await one());
      return out;
    },
    /** One step under tf.profile: kernel milliseconds summed by kernel name (and shapes). */
    async profile(top = 12) {
      const info = await tf.profile(() => one());
      const byKernel = new Map();
      for (const kernel of info.kernels) {
        const ms = await kernel.kernelTimeMs;
        const name = `${kernel.name} ${JSON.stringify(kernel.inputShapes)}`;
        byKernel.set(name, (byKernel.get(name) ?? 0) + (typeof ms === 'number' ? ms : 0));
      }
      return [...byKernel].sort((a, b) => b[1] - a[1]).slice(0, top)
        .map(([name, ms]) => ({ kernel: name, ms: Math.round(ms * 10) / 10 }));
    },
    async close() {
      await device.closeSession();
    },
  };
}
