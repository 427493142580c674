// An in-memory splitkeras server (docs/protocol.md: open, forward, backward, close) whose
// middle segment is fixed, m = tanh(h @ W), for the Hermes test: it needs no Node API, no
// Response class and no TextDecoder, so the same code runs under Hermes and in Node.

import { MEDIA_TYPE, decodeTensors, encodeTensors } from '../../src/wire.js';
import { utf8Decode, utf8Encode } from '../../src/utf8.js';

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
    const { tensors } = decodeTensors(init.body);
    const [name] = Object.keys(tensors);
    const t = tf.tensor(tensors[name].data, tensors[name].shape);
    if (route === 'forward') {
      pending = t;
      const body = tf.tidy(() => tensorsOut([['m', tf.tanh(tf.matMul(tf.reshape(t, [t.shape[0], -1]), W))]]));
      return answer(200, body, MEDIA_TYPE);
    }
    if (route === 'backward') {
      const h = pending;
      pending = null;
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
