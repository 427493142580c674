// One HTTP request to a splitkeras server on `fetch`, repeated on what is transient: fetch
// throws (no network, reset, timeout) or 502/503/504, the SAME request again after
// `backoff * 2**attempt` ms, jittered (at most `retries` times; Retry-After is honoured up to
// `maxBackoff`). Any other answer that is not a success is a `Refused` (the server's code and
// message), which `SplitSession` recovers from or turns into a ProtocolError.
// Bytes are counted as HTTP bodies (retries included).

import { MEDIA_TYPE } from './wire.js';
import { ProtocolError, describeFetchError, failureHint } from './fetch_errors.js';

export const RETRY_STATUSES = [502, 503, 504];

export class Refused extends Error {
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
export const globalFetch = (...args) => globalThis.fetch(...args);

// In a browser a request body is sent as a Blob: Chromium's fetch takes ~5x longer to send a
// 256 KB Uint8Array body than the same bytes as a Blob (measured: 31 ms vs 6.5 ms per request,
// benchmarks/results/device_step.md). Not in React Native (its fetch sends typed arrays as
// they are) nor in Node.
export function browserBlobBodies() {
  return typeof Blob === 'function' && typeof globalThis.document !== 'undefined'
    && globalThis.navigator?.product !== 'ReactNative';
}

/**
 * One request of `session` (its fetch, retries, backoff, maxBackoff, jitter, timeoutMs, sleep,
 * blobBodies, baseUrl and stats), repeated on transient failures.
 * @returns {Promise<{status: number, body: Uint8Array}>} or throws a Refused or a ProtocolError
 */
export async function sendWithRetries(session, { method, path, body, contentType, bearer, what,
headers: extra = {} }) {
  const headers = { Accept: `${MEDIA_TYPE}, application/json`, ...extra };
  if (contentType) headers['Content-Type'] = contentType;
  if (bearer) headers.Authorization = `Bearer ${bearer}`;
  const size = body ? body.byteLength : 0;
  const payload = body && session.blobBodies ? new Blob([body]) : body;
  let failure = '';
  let status = 0;
  let lastError = null;
  for (let attempt = 0; attempt <= session.retries; attempt += 1) {
    if (attempt) session.stats.retries += 1;
    session.stats.requests += 1;
    session.stats.bytesSent += size;
    let retryAfter = null;
    let response = null;
    const controller = typeof AbortController === 'function' && session.timeoutMs
      ? new AbortController() : null;
    const timer = controller ? setTimeout(() => controller.abort(), session.timeoutMs) : null;
    try {
      const fetchFn = session.fetch;
      response = await fetchFn(session.baseUrl + path, {
        method, headers, body: payload ?? undefined, signal: controller?.signal,
      });
      const data = new Uint8Array(await response.arrayBuffer());
      session.stats.bytesReceived += data.byteLength;
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
    if (attempt < session.retries) {
      // the default budget (12 retries, 0.5 s doubling to 10 s, +-25 % jitter: 64-107 s)
      // outlasts a server restart, as the Python client's does
      let delay = Math.min(session.backoff * 2 ** attempt, session.maxBackoff)
        * (1 - session.jitter + 2 * session.jitter * Math.random());
      if (retryAfter !== null) delay = Math.max(delay, Math.min(retryAfter, session.maxBackoff));
      await session.sleep(delay);
    }
  }
  const { hint, code } = failureHint(lastError, status, session.baseUrl, session.timeoutMs);
  throw new ProtocolError(`Could not complete ${what} on ${session.baseUrl} after `
    + `${session.retries + 1} attempts (last: ${failure}). ${hint}`, { status, code });
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
export function utf8Text(bytes) {
  if (typeof TextDecoder !== 'undefined') return new TextDecoder().decode(bytes);
  let escaped = '';
  for (const byte of bytes) escaped += `%${byte.toString(16).padStart(2, '0')}`;
  return decodeURIComponent(escaped);
}

export function utf8Bytes(text) {
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
