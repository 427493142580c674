/**
 * UTF-8 for the safetensors header: TextEncoder/TextDecoder where the JavaScript engine has
 * them, else a strict built-in codec (React Native's Hermes may lack TextDecoder).
 */


export function utf8Encode(text) {
  if (typeof TextEncoder !== 'undefined') return new TextEncoder().encode(text);
  const bytes = [];
  for (const character of text) {
    let code = character.codePointAt(0);
    if (code >= 0xd800 && code <= 0xdfff) code = 0xfffd; // lone surrogate
    if (code < 0x80) bytes.push(code);
    else if (code < 0x800) bytes.push(0xc0 | (code >> 6), 0x80 | (code & 63));
    else if (code < 0x10000) {
      bytes.push(0xe0 | (code >> 12), 0x80 | ((code >> 6) & 63), 0x80 | (code & 63));
    } else {
      bytes.push(0xf0 | (code >> 18), 0x80 | ((code >> 12) & 63), 0x80 | ((code >> 6) & 63),
        0x80 | (code & 63));
    }
  }
  return new Uint8Array(bytes);
}

export function utf8Decode(bytes) {
  if (typeof TextDecoder !== 'undefined') {
    return new TextDecoder('utf-8', { fatal: true, ignoreBOM: true }).decode(bytes);
  }
  // Strict: no overlong forms, surrogates, or code points past U+10FFFF.
  let text = '';
  for (let i = 0; i < bytes.length;) {
    const lead = bytes[i];
    const length = lead < 0x80 ? 1 : lead >= 0xc2 && lead < 0xe0 ? 2 : lead >= 0xe0 && lead < 0xf0
      ? 3 : lead >= 0xf0 && lead < 0xf5 ? 4 : 0;
    if (length === 0 || i + length > bytes.length) throw new TypeError(`invalid byte at ${i}`);
    let code = length === 1 ? lead : lead & (0x7f >> length);
    for (let k = 1; k < length; k += 1) {
      if ((bytes[i + k] & 0xc0) !== 0x80) throw new TypeError(`invalid byte at ${i + k}`);
      code = (code << 6) | (bytes[i + k] & 63);
    }
    if ((length === 3 && (code < 0x800 || (code >= 0xd800 && code <= 0xdfff)))
      || (length === 4 && (code < 0x10000 || code > 0x10ffff))) {
      throw new TypeError(`invalid sequence at ${i}`);
    }
    text += String.fromCodePoint(code);
    i += length;
  }
  return text;
}
