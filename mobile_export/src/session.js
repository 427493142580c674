// The device's side of the split-learning HTTP protocol (docs/protocol.md), on `fetch`.
//
// The JavaScript twin of `splitkeras/client/transport.py`: safetensors bodies
// (wire.js), the session's bearer token, and recovery from what a flaky network
// and a restarting server do, in one place:
//
// * fetch throws (no network, reset, timeout) or 502/503/504: the SAME request
//   again after `backoff * 2**attempt` ms (at most `retries` times; Retry-After is
//   honoured up to `maxBackoff`). Safe: the server is idempotent per
//   (session, step), a repeated forward or backward returns the same bytes and
//   applies nothing.
// * 404 unknown_session (the server restarted without its state): a new session,
//   continuing at its next_step; a pending backward resends its forward first.
// * 409 forward_lost / step_expired / step_out_of_order on a backward: the step's
//   forward again, with the same bytes, then its backward.
// * 409 step_out_of_order on a forward or train: continue at the server's
//   expected_step, or in a new session when the server holds a step of ours that
//   will never finish.
// * any other refusal: a ProtocolError with the server's code and message.
//
// Step numbers are the device's; the session maps them onto the server's.
// Bytes are counted as HTTP bodies (retries included).
//
// Example:
//   const session = new SplitSession({ serverUrl: 'http://10.0.2.2:8000', key });
//   const info = await session.open();            // {mode, max_batch, inputs, outputs, ...}
//   const { tensors } = await session.forward(0, [{ name: 'h', dtype: 'float32',
//     shape: [2, 3], data }]);

import { MEDIA_TYPE, decodeTensors, encodeTensors, WIRE_DTYPES } from './wire.js';

export const RETRY_STATUSES = [502, 503, 504];
const LOST_FORWARD = ['forward_lost', 'step_expired', 'step_out_of_order'];
const MAX_RECOVERIES = 4;

/** The server refused a request, or could not be reached after the retries. */
export class ProtocolError extends Error {
  constructor(message, { status = 0, code = 'protocol_error' } = {}) {
    super(message);
    this.name = 'ProtocolError';
    this.status = status;
    this.code = code;
  }
}

class Refused extends Error {
  constructor(status, code, message, body, what) {
    super(message);
    Object.assign(this, { status, code, body, what });
  }

  get expectedStep() {
    const value = this.body?.expected_step;
    return Number.isInteger(value) ? value : null;
  }

  toError() {
    return new ProtocolError(`The server refused ${this.what} (${this.status} ${this.code}): `
      + `${this.message}`, { status: this.status, code: this.code });
  }
}

// The global fetch, looked up at each call and called as a function (bound to the global):
// `window.fetch` called as a method of another object throws "Illegal invocation".
const globalFetch = (...args) => globalThis.fetch(...args);

const NODE_NETWORK_CODES = ['ECONNREFUSED', 'ECONNRESET', 'ENOTFOUND', 'EAI_AGAIN', 'EHOSTUNREACH',
  'ENETUNREACH', 'ETIMEDOUT', 'UND_ERR_CONNECT_TIMEOUT', 'UND_ERR_SOCKET', 'EPIPE'];

function errorCode(error) {
  return error?.cause?.code ?? error?.code ?? null;
}

/** One line for what fetch threw, with the cause Node's fetch hides in `error.cause`. */
function describeFetchError(error) {
  const base = `${error?.name ?? 'Error'}: ${error?.message ?? error}`;
  const code = errorCode(error?.cause ? error : null);
  return code ? `${base} (${code})` : base;
}

/**
 * What a failure after the retries means, and whose side it is on. `fetch` throwing a bare
 * TypeError in a browser or React Native is the client side (network, CORS, mixed content,
 * a blocked cleartext URL): the server may be fine, so the message does not ask whether it
 * is running.
 * @returns {{hint: string, code: string}}
 */
export function failureHint(error, status, baseUrl, timeoutMs) {
  const serve = '`splitkeras serve`';
  if (!error) {
    return { code: 'unreachable', hint: `The server, or a proxy in front of it, answered HTTP ${status} `
      + `every time: is ${serve} overloaded or restarting?` };
  }
  const code = errorCode(error);
  if (error.name === 'AbortError' || error.name === 'TimeoutError') {
    return { code: 'timeout', hint: `No answer within timeoutMs (${timeoutMs} ms): the server is `
      + 'slow or the network drops the request; raise timeoutMs for large batches.' };
  }
  if (code && NODE_NETWORK_CODES.includes(code)) {
    const what = code === 'ECONNREFUSED' ? 'nothing accepted the connection'
      : (code === 'ENOTFOUND' || code === 'EAI_AGAIN' ? 'the host name does not resolve'
        : 'the connection failed');
    return { code: 'unreachable', hint: `The network said ${code}: ${what}. Is the server `
      + `(${serve}) running on that host and port, and reachable from this device?` };
  }
  if (error.name === 'TypeError' && /Illegal invocation/i.test(error.message ?? '')) {
    return { code: 'client_network', hint: 'The fetch function given was called with the wrong `this` '
      + '(a browser\'s fetch must be called bound to window): pass fetch: (...a) => window.fetch(...a).' };
  }
  const page = globalThis.location?.protocol;
  const inBrowser = typeof globalThis.document !== 'undefined' && typeof page === 'string';
  const reactNative = globalThis.navigator?.product === 'ReactNative';
  if (error.name === 'TypeError' && inBrowser) {
    let hint = 'The browser refused or could not send the request before any answer came '
      + '(fetch threw a TypeError; the browser hides why from the page): a network error, a CORS '
      + `refusal (the server must allow this page's origin ${globalThis.location.origin}: `
      + `${serve} --cors-origin ${globalThis.location.origin}), or mixed content (an https page `
      + 'cannot call an http server). This is not an error the server reported; the browser '
      + "console names the cause.";
    if (page === 'https:' && /^http:/i.test(baseUrl)) {
      hint = `Mixed content: this page is https and the server URL ${baseUrl} is http, which `
        + 'browsers block; serve the split over https (TLS in front of the server). ' + hint;
    }
    return { code: 'client_network', hint };
  }
  if (error.name === 'TypeError' && reactNative) {
    return { code: 'client_network', hint: 'React Native\'s fetch failed before any answer '
      + '(TypeError): no network, a host the phone cannot reach (the emulator reaches the '
      + 'computer at 10.0.2.2), or a cleartext http URL, which Android (usesCleartextTraffic) '
      + 'and iOS (App Transport Security) block by default; use https.' };
  }
  return { code: 'unreachable', hint: `Is the server (${serve}) running and reachable?` };
}

// In a browser a request body is sent as a Blob: Chromium's fetch takes ~5x longer to send a
// 256 KB Uint8Array body than the same bytes as a Blob (measured: 31 ms vs 6.5 ms per request,
// benchmarks/results/device_step.md). Not in React Native (its fetch sends typed arrays as
// they are) nor in Node.
export function browserBlobBodies() {
  return typeof Blob === 'function' && typeof globalThis.document !== 'undefined'
    && globalThis.navigator?.product !== 'ReactNative';
}

const defaultSleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

export class SplitSession {
  /**
   * @param {{serverUrl: string, key?: string, wireDtype?: 'float32'|'float16',
   *   fetch?: Function, retries?: number, backoff?: number, maxBackoff?: number,
   *   timeoutMs?: number, sleep?: (ms: number) => Promise<void>, client?: string,
   *   blobBodies?: boolean}} options
   *   backoff and maxBackoff in milliseconds. blobBodies: send request bodies as Blobs
   *   (default: in a browser, see browserBlobBodies).
   */
  constructor({
    serverUrl, key, wireDtype = 'float32', fetch = globalFetch, retries = 12, backoff = 500,
    maxBackoff = 10000, jitter = 0.25, timeoutMs = 30000, sleep = defaultSleep,
    client = 'splitkeras-device/0.1.0', blobBodies = browserBlobBodies(),
  }) {
    if (!serverUrl) throw new TypeError('serverUrl is required, e.g. "http://10.0.2.2:8000"');
    if (typeof fetch !== 'function' || (fetch === globalFetch && typeof globalThis.fetch !== 'function')) {
      throw new TypeError('No fetch: pass fetch=... (React Native and Node >= 18 have one)');
    }
    if (!WIRE_DTYPES.includes(wireDtype)) {
      throw new TypeError(`wireDtype must be one of ${WIRE_DTYPES.join(', ')}, got ${wireDtype}`);
    }
    if (!(retries >= 0 && backoff >= 0 && maxBackoff >= 0 && jitter >= 0 && jitter < 1)) {
      throw new TypeError('retries, backoff and maxBackoff must be >= 0, jitter in [0, 1)');
    }
    Object.assign(this, {
      key, wireDtype, retries, backoff, maxBackoff, jitter, timeoutMs, sleep, client, blobBodies,
    });
    this.baseUrl = serverUrl.replace(/\/+$/, '');
    // Called as a plain function, never as a method of this session: a browser's fetch
    // throws "Illegal invocation" when `this` is not the global object.
    this.fetch = fetch;
    this.info = null; // the server's answer to POST /v1/sessions
    this.offset = null; // server step - device step
    this.forwardBodies = new Map(); // the step awaiting its backward -> its forward body
    this.stats = { bytesSent: 0, bytesReceived: 0, requests: 0, retries: 0, recoveries: 0 };
  }

  // ---------------------------------------------------------------- sessions

  /** Open a session (needs the key); returns the server's description of it. */
  async open() {
    const body = utf8Bytes(JSON.stringify({ wire_dtype: this.wireDtype, client: this.client }));
    let response;
    try {
      response = await this.send('POST', '/v1/sessions', body, 'application/json', this.key,
        'POST /v1/sessions');
    } catch (error) {
      if (!(error instanceof Refused)) throw error;
      const hint = error.status === 401 && !this.key ? ' No key was given: pass key=... (the '
        + 'server prints where its key is).' : '';
      const refused = error.toError();
      refused.message += hint;
      throw refused;
    }
    this.info = JSON.parse(utf8Text(response.body));
    this.offset = null;
    return this.info;
  }

  /** Close the session on the server (best effort for an unknown one). */
  async close() {
    if (!this.info) return;
    const path = this.sessionPath();
    const { token } = this.info;
    this.info = null;
    this.offset = null;
    this.forwardBodies.clear();
    try {
      await this.send('DELETE', path, null, null, token, `DELETE ${path}`);
    } catch (error) {
      if (!(error instanceof Refused)) throw error;
      if (error.code !== 'unknown_session') throw error.toError();
    }
  }

  /** The session's counters: next_step, pending_step, applied_steps. */
  async state() {
    const path = this.sessionPath();
    try {
      const response = await this.send('GET', path, null, null, this.info.token, `GET ${path}`);
      return JSON.parse(utf8Text(response.body));
    } catch (error) {
      throw error instanceof Refused ? error.toError() : error;
    }
  }

  // ---------------------------------------------------------------- steps

  /** The server segment's training forward of `step`; its body is kept for recovery. */
  async forward(step, tensors) {
    const body = this.encode(tensors);
    this.forwardBodies = new Map([[step, body]]);
    return this.decode(await this.withSessionRecovery('forward', step, body), 'forward');
  }

  /** The gradients of the server outputs for `step`; returns the input gradients. */
  async backward(step, tensors) {
    const body = this.encode(tensors);
    let refusal = null;
    for (let attempt = 0; attempt < MAX_RECOVERIES; attempt += 1) {
      try {
        const data = await this.step('backward', step, body);
        this.forwardBodies.delete(step);
        return this.decode(data, 'backward');
      } catch (error) {
        if (!(error instanceof Refused)) throw error;
        refusal = error;
        if (error.code === 'unknown_session') await this.reopen(step);
        else if (!LOST_FORWARD.includes(error.code)) throw error.toError();
        const forwardBody = this.forwardBodies.get(step);
        if (!forwardBody) {
          throw new ProtocolError(`The server lost the forward pass of step ${step} `
            + `(${error.code}) and this session no longer holds its body to resend: run the `
            + 'step again.', { status: error.status, code: error.code });
        }
        this.stats.recoveries += 1;
        await this.withSessionRecovery('forward', step, forwardBody);
      }
    }
    throw refusal.toError();
  }

  /** Labels on the server: inputs + `label:<output>` tensors; returns input gradients
   *  and the metadata (loss, metrics). */
  async train(step, tensors) {
    const body = this.encode(tensors);
    return this.decode(await this.withSessionRecovery('train', step, body), 'train');
  }

  /** Inference-mode outputs of the server segment (nothing changes on the server). */
  async predict(tensors) {
    const body = this.encode(tensors);
    return this.decode(await this.withSessionRecovery('predict', null, body), 'predict');
  }

  // ---------------------------------------------------------------- recovery

  async withSessionRecovery(route, step, body) {
    let refusal = null;
    for (let attempt = 0; attempt < MAX_RECOVERIES; attempt += 1) {
      try {
        return await this.step(route, step, body);
      } catch (error) {
        if (!(error instanceof Refused)) throw error;
        refusal = error;
        if (error.code === 'unknown_session') await this.reopen(step);
        else if (error.code === 'step_out_of_order' && step !== null) await this.resync(step, error);
        else throw error.toError();
        this.stats.recoveries += 1;
      }
    }
    throw refusal.toError();
  }

  async reopen(step) {
    const forwardBodies = new Map(this.forwardBodies); // close() forgets them; kept for the new one
    if (this.info) {
      try {
        await this.close();
      } catch (error) {
        if (!(error instanceof ProtocolError)) throw error;
      }
    }
    this.forwardBodies = forwardBodies;
    const info = await this.open();
    if (step !== null) this.offset = info.next_step - step;
  }

  async resync(step, refusal) {
    const state = await this.state();
    const pending = state.pending_step;
    if (pending !== null && pending !== undefined && pending !== await this.serverStep(step)) {
      await this.reopen(step); // a step of ours that will never get its backward
      return;
    }
    const expected = refusal.expectedStep;
    this.offset = (expected !== null ? expected : state.next_step) - step;
  }

  // ---------------------------------------------------------------- HTTP

  sessionPath() {
    if (!this.info) throw new ProtocolError('No session is open: call open() first.');
    return `/v1/sessions/${this.info.session_id}`;
  }

  async serverStep(step) {
    if (!this.info) await this.open();
    if (this.offset === null) this.offset = this.info.next_step - step;
    return step + this.offset;
  }

  async step(route, step, body) {
    if (!this.info) await this.open();
    const path = this.sessionPath() + (step !== null
      ? `/steps/${await this.serverStep(step)}/${route}` : `/${route}`);
    const what = step !== null ? `${route} of step ${step} (POST ${path})` : `POST ${path}`;
    return (await this.send('POST', path, body, MEDIA_TYPE, this.info.token, what)).body;
  }

  /** One request, repeated on transient failures: {status, body: Uint8Array} or throws. */
  async send(method, path, body, contentType, bearer, what) {
    const headers = { Accept: `${MEDIA_TYPE}, application/json` };
    if (contentType) headers['Content-Type'] = contentType;
    if (bearer) headers.Authorization = `Bearer ${bearer}`;
    const size = body ? body.byteLength : 0;
    const payload = body && this.blobBodies ? new Blob([body]) : body;
    let failure = '';
    let status = 0;
    let lastError = null;
    for (let attempt = 0; attempt <= this.retries; attempt += 1) {
      if (attempt) this.stats.retries += 1;
      this.stats.requests += 1;
      this.stats.bytesSent += size;
      let retryAfter = null;
      let response = null;
      const controller = typeof AbortController === 'function' && this.timeoutMs
        ? new AbortController() : null;
      const timer = controller ? setTimeout(() => controller.abort(), this.timeoutMs) : null;
      try {
        const fetchFn = this.fetch;
        response = await fetchFn(this.baseUrl + path, {
          method, headers, body: payload ?? undefined, signal: controller?.signal,
        });
        const data = new Uint8Array(await response.arrayBuffer());
        this.stats.bytesReceived += data.byteLength;
        if (response.ok) return { status: response.status, body: data };
        if (!RETRY_STATUSES.includes(response.status)) throw refusedFrom(response, data, what);
        failure = `HTTP ${response.status}`;
        status = response.status;
        lastError = null;
        retryAfter = parseRetryAfter(response.headers?.get?.('retry-after'));
      } catch (error) {
        if (error instanceof Refused) throw error;
        failure = describeFetchError(error);
        status = 0;
        lastError = error ?? new Error(String(error));
      } finally {
        if (timer) clearTimeout(timer);
      }
      if (attempt < this.retries) {
        // the default budget (12 retries, 0.5 s doubling to 10 s, +-25 % jitter: 64-107 s)
        // outlasts a server restart, as the Python client's does
        let delay = Math.min(this.backoff * 2 ** attempt, this.maxBackoff)
          * (1 - this.jitter + 2 * this.jitter * Math.random());
        if (retryAfter !== null) delay = Math.max(delay, Math.min(retryAfter, this.maxBackoff));
        await this.sleep(delay);
      }
    }
    const { hint, code } = failureHint(lastError, status, this.baseUrl, this.timeoutMs);
    throw new ProtocolError(`Could not complete ${what} on ${this.baseUrl} after `
      + `${this.retries + 1} attempts (last: ${failure}). ${hint}`, { status, code });
  }

  // ---------------------------------------------------------------- bodies

  encode(tensors) {
    return encodeTensors(tensors, { wireDtype: this.wireDtype });
  }

  decode(data, route) {
    try {
      return decodeTensors(data);
    } catch (error) {
      throw new ProtocolError(`The server's ${route} response is not a valid tensor body: `
        + `${error.message}`);
    }
  }
}

function refusedFrom(response, data, what) {
  let code = 'http_error';
  let message = `HTTP ${response.status}`;
  let body = {};
  try {
    const parsed = JSON.parse(utf8Text(data));
    if (parsed?.error?.code && parsed?.error?.message) {
      body = parsed.error;
      code = String(body.code);
      message = String(body.message);
    }
  } catch {
    const text = utf8Text(data).split(/\s+/).join(' ').slice(0, 200);
    if (text) message += `: ${text}`;
  }
  return new Refused(response.status, code, message, body, what);
}

function parseRetryAfter(value) {
  if (value === null || value === undefined) return null;
  const seconds = Number(value);
  return Number.isFinite(seconds) ? Math.max(0, seconds) * 1000 : null;
}

// UTF-8 without TextEncoder/TextDecoder (Hermes, the React Native engine, may lack them).
function utf8Text(bytes) {
  if (typeof TextDecoder !== 'undefined') return new TextDecoder().decode(bytes);
  let escaped = '';
  for (const byte of bytes) escaped += `%${byte.toString(16).padStart(2, '0')}`;
  return decodeURIComponent(escaped);
}

function utf8Bytes(text) {
  if (typeof TextEncoder !== 'undefined') return new TextEncoder().encode(text);
  const escaped = encodeURIComponent(text);
  const bytes = [];
  for (let i = 0; i < escaped.length; i += 1) {
    if (escaped[i] === '%') {
      bytes.push(parseInt(escaped.slice(i + 1, i + 3), 16));
      i += 2;
    } else bytes.push(escaped.charCodeAt(i));
  }
  return new Uint8Array(bytes);
}
