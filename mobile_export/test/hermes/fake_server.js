// An in-memory splitkeras server (docs/protocol.md: open, forward, backward, close) whose
// middle segment is fixed, m = tanh(h @ W), for the Hermes test: it needs no Node API, no
// Response class and no TextDecoder, so the same code runs under Hermes and in Node.
// Its routes are the real server's (POST /v1/sessions/{id}/forward|backward, the step number
// in the Splitkeras-Step header), and it refuses a step header the real server refuses (400
// bad_request: missing, not a whole number in 0..2**53) and a backward of another step (409).

import { MEDIA_TYPE, decodeTensors, encodeTensors } from '../../src/wire.js';
import { utf8Decode, utf8Encode } from '../../src/utf8.js';
import { MAX_STEP, STEP_HEADER } from '../../src/protocol.js';

const refusal = (status, code, message, extra = {}) => answer(status, { error: { code, message, ...extra } },
  'application/json');

/** The step number of a request's headers (any letter case), or a refusal as the server words it. */
export function stepOf(headers) {
  const key = Object.keys(headers ?? {}).find((k) => k.toLowerCase() === STEP_HEADER.toLowerCase());
  const value = key === undefined ? undefined : headers[key];
  const how = `send the step number as \`${STEP_HEADER}: <k>\` (a whole number in 0..2**53) with each `
    + 'forward, backward and train request';
  if (value === undefined || value === null) {
    return { refused: refusal(400, 'bad_request', `The ${STEP_HEADER} header is missing: ${how}.`) };
  }
  const text = String(value).trim();
  // compared as digits: Number('9007199254740993') rounds to 2**53
  const digits = text.replace(/^0+(?=.)/, '');
  const max = String(MAX_STEP);
  if (!/^[0-9]{1,16}$/.test(text) || digits.length > max.length || (digits.length === max.length && digits > max)) {
    return { refused: refusal(400, 'bad_request', `The ${STEP_HEADER} header is '${value}', not a step `
      + `number: ${how}.`) };
  }
  return { step: Number(text) };
}

function answer(status, body, contentType) {
  const bytes = body instanceof Uint8Array ? body : utf8Encode(JSON.stringify(body));
  return {
    ok: status >= 200 && status < 300, status,
    headers: { get: (name) => (name.toLowerCase() === 'content-type' ? contentType : null) },
    arrayBuffer: async () => bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength),
  };
}

export function fakeServer(tf, { W, segment = 'middle', maxBatch = 16 }) {
  const log = [];
  let pending = null;
  let pendingStep = null;
  const tensorsOut = (list) => encodeTensors(list.map(([name, t]) => ({ name, dtype: 'float32',
    shape: t.shape, data: Float32Array.from(t.dataSync()) })));
  const fetch = async (url, init) => {
    const path = url.replace(/^https?:\/\/[^/]+/, '');
    const route = path === '/v1/sessions' ? 'open' : (init.method === 'DELETE' ? 'close' : path.split('/').pop());
    log.push(route);
    if (route === 'open') {
      return answer(201, { session_id: 's', token: 't', wire_dtype: JSON.parse(utf8Decode(init.body)).wire_dtype,
        segment, mode: 'u_shaped', max_batch: maxBatch, next_step: 0, inputs: [], outputs: [] }, 'application/json');
    }
    if (route === 'close') return answer(204, new Uint8Array(0), null);
    if (path !== `/v1/sessions/s/${route}` || !['forward', 'backward'].includes(route)) {
      return refusal(404, 'not_found', 'Not Found');
    }
    const { step, refused } = stepOf(init.headers);
    if (refused) return refused;
    if (route === 'backward' && step !== pendingStep) {
      return refusal(409, 'step_out_of_order', `Expected backward for step ${pendingStep}, got ${step}.`,
        { expected_step: pendingStep });
    }
    const { tensors } = decodeTensors(init.body);
    const [name] = Object.keys(tensors);
    const t = tf.tensor(tensors[name].data, tensors[name].shape);
    if (route === 'forward') {
      pending?.dispose();
      pending = t;
      pendingStep = step;
      const body = tf.tidy(() => tensorsOut([['m', tf.tanh(tf.matMul(tf.reshape(t, [t.shape[0], -1]), W))]]));
      return answer(200, body, MEDIA_TYPE);
    }
    if (route === 'backward') {
      const h = pending;
      pending = null;
      pendingStep = null;
      const body = tf.tidy(() => {
        const flat = tf.reshape(h, [h.shape[0], -1]);
        const grad = tf.grad((x) => tf.sum(tf.mul(tf.tanh(tf.matMul(x, W)), t)))(flat);
        return tensorsOut([['h', tf.reshape(grad, h.shape)]]);
      });
      h.dispose();
      t.dispose();
      return answer(200, body, MEDIA_TYPE);
    }
    throw new Error(`fake server: unexpected ${init.method} ${path}`);
  };
  return { fetch, log };
}
