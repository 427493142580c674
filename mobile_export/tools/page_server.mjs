// A static file server on 127.0.0.1 for pages that run the runtime in a browser, which also
// reverse-proxies `/v1/...` to a splitkeras server: the page and the protocol share one
// origin, so the browser needs no CORS (a page of another origin needs `splitkeras serve
// --cors-origin ORIGIN`). For the benchmarks and the browser tests; not part of the npm package.
//
//   const server = await startPageServer({ root: 'web', proxy: 'http://127.0.0.1:8000',
//     isolate: true });          // COOP/COEP headers: crossOriginIsolated, wasm threads
//   ... open server.url + '/index.html' ...
//   await server.close();

import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import http from 'node:http';
import path from 'node:path';

const TYPES = {
  '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8', '.json': 'application/json', '.wasm': 'application/wasm',
  '.bin': 'application/octet-stream', '.map': 'application/json', '.css': 'text/css',
};

/**
 * @param {{root: string, proxy?: string|Function, isolate?: boolean, port?: number,
 *   routes?: Object<string, (req: object, res: object) => void>}} options `proxy`: the base URL
 *   that `/v1` requests go to, or a handler (req, res) that answers them (a test's in-memory
 *   server); `routes`: extra handlers by exact path.
 * @returns {Promise<{url: string, port: number, close: () => Promise<void>, requests: number}>}
 */
export async function startPageServer({ root, proxy, isolate = false, port = 0, routes = {} }) {
  const base = path.resolve(root);
  const target = typeof proxy === 'string' ? new URL(proxy) : null;
  const state = { requests: 0 };
  const headers = isolate ? { 'Cross-Origin-Opener-Policy': 'same-origin',
    'Cross-Origin-Embedder-Policy': 'require-corp', 'Cross-Origin-Resource-Policy': 'same-origin' } : {};
  const server = http.createServer(async (req, res) => {
    state.requests += 1;
    const url = new URL(req.url, 'http://page');
    if (routes[url.pathname]) {
      routes[url.pathname](req, res);
      return;
    }
    if (typeof proxy === 'function' && url.pathname.startsWith('/v1')) {
      proxy(req, res);
      return;
    }
    if (target && url.pathname.startsWith('/v1')) {
      const forwarded = http.request({ hostname: target.hostname, port: target.port, method: req.method,
        path: url.pathname + url.search, headers: { ...req.headers, host: target.host } }, (answer) => {
        res.writeHead(answer.statusCode, { ...answer.headers, ...headers });
        answer.pipe(res);
      });
      forwarded.on('error', (error) => {
        res.writeHead(502, { 'content-type': 'text/plain' });
        res.end(`page_server proxy: ${error.message}`);
      });
      req.pipe(forwarded);
      return;
    }
    const file = path.resolve(base, `.${decodeURIComponent(url.pathname)}`);
    if (file !== base && !file.startsWith(base + path.sep)) {
      res.writeHead(403).end();
      return;
    }
    let info = null;
    try {
      info = await stat(file);
    } catch {
      info = null;
    }
    const served = info?.isDirectory() ? path.join(file, 'index.html') : file;
    try {
      const { size } = await stat(served);
      res.writeHead(200, { 'content-type': TYPES[path.extname(served)] ?? 'application/octet-stream',
        'content-length': size, 'cache-control': 'no-store', ...headers });
      createReadStream(served).pipe(res);
    } catch {
      res.writeHead(404, { 'content-type': 'text/plain', ...headers }).end(`not found: ${url.pathname}`);
    }
  });
  await new Promise((resolve) => { server.listen(port, '127.0.0.1', resolve); });
  const { port: bound } = server.address();
  return {
    url: `http://127.0.0.1:${bound}`,
    port: bound,
    get requests() { return state.requests; },
    close: () => new Promise((resolve) => {
      server.closeAllConnections?.();
      server.close(() => resolve());
    }),
  };
}
