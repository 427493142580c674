// The page of tests/test_browser_cors.py and benchmarks/cors_preflight.py (bundled by esbuild):
// a SplitSession on the browser's own fetch trains the server segment of a split for `steps`
// steps (forward, then backward) against a server of ANOTHER origin (CORS), and reports how
// long each request spent inside fetch (from the call until its body has arrived: a CORS
// preflight, when the browser sends one, is inside that time).

import { SplitSession } from '../../src/session.js';

window.runSteps = async ({ serverUrl, key, steps, batch }) => {
  const requests = [];
  const fetch = async (url, init) => {
    const started = performance.now();
    const response = await window.fetch(url, init);
    const body = await response.arrayBuffer();
    requests.push({ method: init.method, path: new URL(url).pathname, ms: performance.now() - started });
    return { ok: response.ok, status: response.status, headers: response.headers, arrayBuffer: async () => body };
  };
  try {
    const session = new SplitSession({ serverUrl, key, fetch, retries: 0 });
    const info = await session.open();
    const tensor = (spec, scale) => {
      const shape = [batch, ...spec.shape.slice(1)];
      const data = Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, (_, i) => scale * Math.sin(i + 1));
      return { name: spec.name, dtype: 'float32', shape, data };
    };
    const stepMs = [];
    for (let step = 0; step < steps; step += 1) {
      const before = requests.length;
      await session.forward(step, info.inputs.map((spec) => tensor(spec, 1)));
      await session.backward(step, info.outputs.map((spec) => tensor(spec, 0.01 * (step % 2 ? -1 : 1))));
      stepMs.push(requests.slice(before).reduce((total, r) => total + r.ms, 0));
    }
    await session.close();
    return { requests, stepMs, origin: location.origin };
  } catch (error) {
    return { error: { name: error.name, code: error.code, message: error.message }, requests };
  }
};
window.pageReady = true;
