// An emulated network link around a fetch, for benchmarks and tests (not part of the runtime):
// each request waits `latencyMs` one way plus its body's bytes at `upMbit` before it goes out,
// and its answer waits `latencyMs` plus the answer's bytes at `downMbit` after it came back.
// The link is shared, as one radio link is: with several requests in flight, the transfers
// of one direction are serialised (a transfer starts when the one before it in that direction
// is through), only the latency overlaps. The same rule as the Python client's
// `NetworkConditions` (splitkeras/client/network.py); sleeps, does not drop or reorder.
//
// Example: const fetch = slowLink(globalThis.fetch, { latencyMs: 40, upMbit: 15, downMbit: 15 });

const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, Math.max(ms, 0)); });

/** `fetch` behind an emulated link; `stats()` says how long each direction was busy. */
export function slowLink(fetch, { latencyMs = 0, upMbit = null, downMbit = null } = {}) {
  const freeAt = { up: 0, down: 0 };
  const busy = { up: 0, down: 0 };
  const transferMs = (bytes, mbit) => (mbit ? (bytes * 8) / (mbit * 1e3) : 0);
  const pass = async (direction, bytes, mbit) => {
    const now = performance.now();
    const start = Math.max(now, freeAt[direction]);
    const transfer = transferMs(bytes, mbit);
    freeAt[direction] = start + transfer;
    busy[direction] += transfer;
    await sleep(start + transfer + latencyMs - now);
  };
  const linked = async (url, init = {}) => {
    const body = init.body;
    const size = body ? (body.byteLength ?? body.size ?? 0) : 0;
    await pass('up', size, upMbit);
    const response = await fetch(url, init);
    const data = new Uint8Array(await response.arrayBuffer());
    await pass('down', data.byteLength, downMbit);
    return new Response(response.status === 204 ? null : data,
      { status: response.status, headers: response.headers });
  };
  linked.stats = () => ({ upBusyMs: busy.up, downBusyMs: busy.down });
  return linked;
}
