// What a failed request means, for people: `ProtocolError` (the server refused a request, or
// could not be reached after the retries) and `failureHint`, which tells a network or CORS
// failure on the client's side from a server that is down.

/** The server refused a request, or could not be reached after the retries. */
export class ProtocolError extends Error {
  constructor(message, { status = 0, code = 'protocol_error' } = {}) {
    super(message);
    this.name = 'ProtocolError';
    this.status = status;
    this.code = code;
  }
}

const NODE_NETWORK_CODES = ['ECONNREFUSED', 'ECONNRESET', 'ENOTFOUND', 'EAI_AGAIN', 'EHOSTUNREACH',
  'ENETUNREACH', 'ETIMEDOUT', 'UND_ERR_CONNECT_TIMEOUT', 'UND_ERR_SOCKET', 'EPIPE'];

function errorCode(error) {
  return error?.cause?.code ?? error?.code ?? null;
}

/** One line for what fetch threw, with the cause Node's fetch hides in `error.cause`. */
export function describeFetchError(error) {
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

