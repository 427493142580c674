// The device's side of the split-learning HTTP protocol (docs/protocol.md), on `fetch`.
//
// The JavaScript twin of `splitkeras/client/transport.py`: safetensors bodies
// (wire.js), the session's bearer token, and recovery from what a flaky network
// and a restarting server do, in one place:
//
// * fetch throws (no network, reset, timeout) or 502/503/504: the SAME request
//   again after `backoff * 2**attempt` ms (http.js; at most `retries` times;
//   Retry-After is honoured up to `maxBackoff`). Safe: the server is idempotent per
//   (session, step), a repeated forward or backward returns the same bytes and
//   applies nothing.
// * 404 unknown_session (the server restarted without its state): a new session,
//   continuing at its next_step; a pending backward resends its forward first.
// * 409 forward_lost / step_expired / step_out_of_order on a backward: the step's
//   forward again, with the same bytes, then its backward.
// * 409 step_out_of_order on a forward or train: continue at the server's
//   expected_step, or in a new session when the server holds a step of ours that
//   will never finish.
// * pipelined (`pipelineDepth` > 1, docs/training.md): several steps' forwards are in flight;
//   every recovery above resends the forwards of all of them, oldest first (a new session
//   and a lost forward alike), one recovery at a time: a request waits for a recovery in
//   progress, and a request refused as unknown_session by a session that is already
//   replaced only goes again. 409 pipeline_full is a ProtocolError (the device sent more
//   steps than the server's max_pending_steps).
// * any other refusal: a ProtocolError with the server's code and message.
//
// Step numbers are the device's; the session maps them onto the server's, sent in the
// Splitkeras-Step header (protocol.js). What a failure means: fetch_errors.js.
// Bytes are counted as HTTP bodies (retries included).
//
// Example:
//   const session = new SplitSession({ serverUrl: 'http://10.0.2.2:8000', key });
//   const info = await session.open();            // {mode, max_batch, inputs, outputs, ...}
//   const { tensors } = await session.forward(0, [{ name: 'h', dtype: 'float32',
//     shape: [2, 3], data }]);

import { MEDIA_TYPE, decodeTensors, encodeTensors, WIRE_DTYPES } from './wire.js';
import { formatCompress, parseCodec, parseCompress } from './codecs.js';
import { ProtocolError } from './fetch_errors.js';
import {
  Refused, browserBlobBodies, globalFetch, sendWithRetries, utf8Bytes, utf8Text,
} from './http.js';
import {
  LOST_FORWARD_CODES, PIPELINE_FULL, STEP_HEADER, STEP_OUT_OF_ORDER, UNKNOWN_SESSION, stepPath,
} from './protocol.js';

export { ProtocolError, failureHint } from './fetch_errors.js';
export { RETRY_STATUSES, browserBlobBodies } from './http.js';

const MAX_RECOVERIES = 4;

const defaultSleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

export class SplitSession {
  /**
   * @param {{serverUrl: string, key?: string, wireDtype?: 'float32'|'float16', compress?: string,
   *   fetch?: Function, retries?: number, backoff?: number, maxBackoff?: number,
   *   timeoutMs?: number, sleep?: (ms: number) => Promise<void>, client?: string,
   *   blobBodies?: boolean}} options
   *   compress: the codec of each direction (codecs.js: 'int8',
   *   'forward=int8,backward=topk:0.05+int8'; default: wireDtype both ways).
   *   backoff and maxBackoff in milliseconds. blobBodies: send request bodies as Blobs
   *   (default: in a browser, see browserBlobBodies).
   */
  constructor({
    serverUrl, key, wireDtype = 'float32', compress = null, fetch = globalFetch, retries = 12, backoff = 500,
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
    this.compress = compress === null || compress === undefined ? null
      : formatCompress(parseCompress(compress)); // a bad SPEC: a TypeError saying the syntax
    this.codecs = parseCompress(wireDtype); // what the server agreed, after open()
    this.residuals = { forward: new Map(), backward: new Map() }; // top-k error feedback
    Object.assign(this, {
      key, wireDtype, retries, backoff, maxBackoff, jitter, timeoutMs, sleep, client, blobBodies,
    });
    this.baseUrl = serverUrl.replace(/\/+$/, '');
    // Called as a plain function, never as a method of this session: a browser's fetch
    // throws "Illegal invocation" when `this` is not the global object.
    this.fetch = fetch;
    this.info = null; // the server's answer to POST /v1/sessions
    this.offset = null; // server step - device step
    this.forwardBodies = new Map(); // the steps awaiting their backward -> their forward bodies
    this.pipelineDepth = 1; // steps in flight at once (pipeline.js sets it for a pipelined fit)
    this.recovery = null; // the recovery in progress (a promise), which other requests wait for
    this.stats = { bytesSent: 0, bytesReceived: 0, requests: 0, retries: 0, recoveries: 0 };
  }

  // ---------------------------------------------------------------- sessions

  /** Open a session (needs the key); returns the server's description of it. */
  async open() {
    const request = { wire_dtype: this.wireDtype, client: this.client };
    if (this.compress !== null) request.compress = this.compress;
    const body = utf8Bytes(JSON.stringify(request));
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
    const info = JSON.parse(utf8Text(response.body));
    const asked = formatCompress(parseCompress(this.compress ?? this.wireDtype));
    this.codecs = parseCompress(info.codecs ?? this.wireDtype);
    if (formatCompress(this.codecs) !== asked) {
      throw new ProtocolError(`The server opened the session with codecs ${formatCompress(this.codecs)}, `
        + `not the ${asked} asked for; upgrade the server.`);
    }
    this.info = info;
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
      if (error.code !== UNKNOWN_SESSION) throw error.toError();
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
    const body = this.encode(tensors, 'forward');
    if (this.pipelineDepth === 1) this.forwardBodies.clear(); // one step in flight at a time
    this.forwardBodies.set(step, body);
    return this.decode(await this.withSessionRecovery('forward', step, body), 'forward');
  }

  /** Forget the forward body of a step that will not get its backward (it failed). */
  forget(step) {
    this.forwardBodies.delete(step);
  }

  /** The server's max_pending_steps (1 when the server does not say: no pipelining). */
  get maxPendingSteps() {
    const value = this.info?.max_pending_steps;
    return Number.isInteger(value) && value >= 1 ? value : 1;
  }

  /** The gradients of the server outputs for `step`; returns the input gradients. */
  async backward(step, tensors) {
    const body = this.encode(tensors, 'backward');
    let refusal = null;
    for (let attempt = 0; attempt < MAX_RECOVERIES; attempt += 1) {
      try {
        const data = await this.step('backward', step, body);
        this.forwardBodies.delete(step);
        return this.decode(data, 'backward');
      } catch (error) {
        if (!(error instanceof Refused)) throw error;
        refusal = error;
        if (error.code === PIPELINE_FULL) throw this.pipelineFull(error);
        if (error.code === UNKNOWN_SESSION && this.replaced(error)) {
          await this.waitForRecovery();
          continue; // another request of this session has opened a new one and resent the forwards
        }
        if (error.code !== UNKNOWN_SESSION && !LOST_FORWARD_CODES.includes(error.code)) throw error.toError();
        await this.recovering(async () => {
          if (error.code === UNKNOWN_SESSION) await this.reopen(step);
          if (!this.forwardBodies.get(step)) {
            throw new ProtocolError(`The server lost the forward pass of step ${step} `
              + `(${error.code}) and this session no longer holds its body to resend: run the `
              + 'step again.', { status: error.status, code: error.code });
          }
          this.stats.recoveries += 1;
          // every step still in flight, oldest first (one step: this one)
          for (const [pending, body] of this.inFlight()) {
            await this.withSessionRecovery('forward', pending, body, { internal: true });
          }
        });
      }
    }
    throw refusal.toError();
  }

  /** Labels on the server: inputs + `label:<output>` tensors; returns input gradients
   *  and the metadata (loss, metrics). */
  async train(step, tensors) {
    const labels = tensors.map((t) => t.name).filter((n) => n.startsWith('label:') || n === 'sample_weight');
    const body = this.encode(tensors, 'forward', labels);
    return this.decode(await this.withSessionRecovery('train', step, body), 'train');
  }

  /** Inference-mode outputs of the server segment (nothing changes on the server). */
  async predict(tensors) {
    const body = this.encode(tensors, 'predict');
    return this.decode(await this.withSessionRecovery('predict', null, body), 'predict');
  }

  // ---------------------------------------------------------------- recovery

  async withSessionRecovery(route, step, body, { internal = false } = {}) {
    let refusal = null;
    for (let attempt = 0; attempt < MAX_RECOVERIES; attempt += 1) {
      try {
        return await this.step(route, step, body, { internal });
      } catch (error) {
        if (!(error instanceof Refused)) throw error;
        refusal = error;
        if (error.code === PIPELINE_FULL) throw this.pipelineFull(error);
        if (error.code === UNKNOWN_SESSION && !internal && this.replaced(error)) {
          await this.waitForRecovery(); // a new session is open already: only go again
          continue;
        }
        const recover = async () => {
          if (error.code === UNKNOWN_SESSION) await this.reopen(step);
          else if (error.code === STEP_OUT_OF_ORDER && step !== null) await this.resync(step, error);
          else throw error.toError();
          this.stats.recoveries += 1;
          if (route === 'forward' && this.info?.session_id !== error.sessionId) { // a new session
            // the older steps in flight go to the new session first (none at depth 1)
            for (const [pending, older] of this.inFlight().filter(([s]) => s < step)) {
              await this.withSessionRecovery('forward', pending, older, { internal: true });
            }
          }
        };
        if (internal) await recover();
        else await this.recovering(recover);
      }
    }
    throw refusal.toError();
  }

  /** The steps in flight (forward sent, backward not answered), oldest first, with their bodies. */
  inFlight() {
    return [...this.forwardBodies].sort((a, b) => a[0] - b[0]);
  }

  // Whether the session that refused `error` has been replaced since (by another request's
  // recovery): then the request only needs to go again, to the new session.
  replaced(error) {
    return Boolean(this.recovery) || (Boolean(this.info) && error.sessionId !== this.info.session_id);
  }

  /** Run `fn`, a recovery, once no other is in progress; requests wait for it (step()). */
  async recovering(fn) {
    await this.waitForRecovery();
    const run = fn();
    this.recovery = run.catch(() => {});
    try {
      return await run;
    } finally {
      this.recovery = null;
    }
  }

  async waitForRecovery() {
    while (this.recovery) await this.recovery;
  }

  pipelineFull(error) {
    return new ProtocolError(`${error.toError().message} The server takes at most `
      + `${this.maxPendingSteps} step(s) in flight per session: lower pipelineDepth to it.`,
    { status: error.status, code: error.code });
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
    // the oldest step in flight becomes the new session's next step (one step: this one)
    if (step !== null) this.offset = info.next_step - Math.min(step, ...forwardBodies.keys());
  }

  async resync(step, refusal) {
    const state = await this.state();
    const pending = state.pending_step;
    if (this.pipelineDepth > 1 && Array.isArray(state.pending_steps) && state.pending_steps.length) {
      // pipelined: the server holds steps; unless they are ours and older than this one (it
      // was refused for another reason), a new session, where the steps in flight are resent
      const serverStep = await this.serverStep(step);
      const ours = new Set([...this.forwardBodies.keys()].map((s) => s + this.offset));
      if (state.pending_steps.some((s) => !ours.has(s) || s >= serverStep)) {
        await this.reopen(step);
        return;
      }
    } else if (pending !== null && pending !== undefined && pending !== await this.serverStep(step)) {
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

  // A step's number goes in the Splitkeras-Step header: the URL is the same at every step, so
  // a browser pays one CORS preflight per route of the session, not one per request.
  async step(route, step, body, { internal = false } = {}) {
    if (this.recovery && !internal) await this.waitForRecovery();
    if (!this.info) await this.open();
    const sessionId = this.info.session_id;
    const path = stepPath(sessionId, route);
    try {
      if (step === null) return (await this.send('POST', path, body, MEDIA_TYPE, this.info.token, `POST ${path}`)).body;
      const serverStep = await this.serverStep(step);
      const what = `${route} of step ${step} (POST ${path}, ${STEP_HEADER}: ${serverStep})`;
      return (await this.send('POST', path, body, MEDIA_TYPE, this.info.token, what,
        { [STEP_HEADER]: String(serverStep) })).body;
    } catch (error) {
      if (error instanceof Refused) error.sessionId = sessionId; // which session refused it
      throw error;
    }
  }

  /** One request, repeated on transient failures: {status, body: Uint8Array} or throws. */
  send(method, path, body, contentType, bearer, what, headers = {}) {
    return sendWithRetries(this, { method, path, body, contentType, bearer, what, headers });
  }

  // ---------------------------------------------------------------- bodies

  // Forward and train bodies and forward answers travel under the forward codec, backward
  // bodies and input gradients under the backward one; predict as the forward codec when it
  // is plain, else float32 (as transport.py).
  codecOf(route) {
    if (route === 'predict') return parseCodec(this.codecs.forward.labelDtype);
    return route === 'forward' ? this.codecs.forward : this.codecs.backward;
  }

  encode(tensors, direction, uncompressed = []) {
    return encodeTensors(tensors, { codec: this.codecOf(direction),
      residuals: this.residuals[direction], uncompressed });
  }

  decode(data, route) {
    try {
      return decodeTensors(data, { codec: this.codecOf(route) });
    } catch (error) {
      throw new ProtocolError(`The server's ${route} response is not a valid tensor body: `
        + `${error.message}`);
    }
  }
}

