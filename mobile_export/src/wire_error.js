// The error wire.js and codecs.js throw for a malformed tensor body (a 4xx on the server).

/** A tensor payload does not match what was expected (a 4xx on the server). */
export class WireFormatError extends Error {
  constructor(message) {
    super(message);
    this.name = 'WireFormatError';
  }
}
