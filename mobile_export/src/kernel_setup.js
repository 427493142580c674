// What every training kernel of this runtime shares: reading and writing a backend's tensors
// (the cpu backend's arrays, or the wasm heap through the backend's typed arrays), TF.js' own
// conv/pool geometry, and the window taps of a convolution or pooling, computed once per call.

// wasm: a tensor's values are read and written in place on the wasm heap (no copies); a view
// is valid until the next allocation (a growing heap moves), so a kernel allocates its outputs
// (`alloc`) first and reads its inputs after.
const onHeap = (backend) => typeof backend.typedArrayFromHeap === 'function';

/** The values of a kernel input (TensorInfo) as a typed array (wasm: a view of the heap). */
export const read = (backend, info) => (onHeap(backend) ? backend.typedArrayFromHeap(info)
  : backend.readSync(info.dataId));

/** A float32 TensorInfo of `shape` holding `values`, written to the backend. */
export const output = (backend, shape, values) => ({ dataId: backend.write(values, shape, 'float32'),
  shape: [...shape], dtype: 'float32' });

/**
 * Allocate zero-filled float32 outputs of `shapes`, then run `fn(...values)` to compute into
 * them (reading the inputs inside `fn`, after the allocation); returns their TensorInfos.
 * wasm: the values are views of the heap; cpu: the arrays the backend keeps.
 */
export function computeInto(backend, shapes, fn) {
  let infos;
  let values;
  if (onHeap(backend)) {
    infos = shapes.map((shape) => backend.makeOutput([...shape], 'float32'));
    values = infos.map((info) => backend.typedArrayFromHeap(info).fill(0)); // after every allocation
  } else {
    values = shapes.map((shape) => new Float32Array(shape.reduce((a, b) => a * b, 1)));
    infos = shapes.map((shape, i) => output(backend, shape, values[i]));
  }
  fn(...values);
  return infos;
}

/** The same data under another shape (a reshape without a copy). */
export const view = (info, shape) => ({ dataId: info.dataId, shape, dtype: info.dtype });

/** A kernel refusing what it does not handle, saying what it handles. */
export function unsupported(name, backendName, why) {
  throw new Error(`${name} on the ${backendName} backend: ${why} (splitkeras-device kernels handle `
    + 'NHWC float32 only)');
}

/** The stock kernel's result where there is one, else `unsupported`. */
export function stockOr(stock, name, backendName, why, call) {
  return stock ? stock.kernelFunc(call) : unsupported(name, backendName, why);
}

/** TF.js' conv info (backend_util.computeConv2DInfo); null for NCHW (the caller falls back). */
export function convInfo(tf, xShape, filterShape, strides, dilations, pad, dimRoundingMode, depthwise,
  dataFormat = 'NHWC') {
  const format = tf.backend_util.convertConv2DDataFormat(dataFormat);
  if (format !== 'channelsLast') return null;
  return tf.backend_util.computeConv2DInfo(xShape, filterShape, strides, dilations ?? 1, pad,
    dimRoundingMode, depthwise, format);
}

/** TF.js' pool info (backend_util.computePool2DInfo) of a pooling gradient's attrs. */
export const poolInfo = (tf, inputShape, { filterSize, strides, pad, dimRoundingMode }) => tf.backend_util
  .computePool2DInfo(inputShape, filterSize, strides, 1, pad, dimRoundingMode);

/** A 1x1 convolution with stride 1 and no padding: x itself is the im2col matrix. */
export const isPointwise = (info) => info.filterHeight === 1 && info.filterWidth === 1
  && info.strideHeight === 1 && info.strideWidth === 1 && info.padInfo.top === 0
  && info.padInfo.left === 0 && info.outHeight === info.inHeight && info.outWidth === info.inWidth;

/**
 * The window taps of every output position p = oh * OW + ow of one image: for t in
 * [start[p], start[p + 1]), input pixel `pixel[t]` (ih * W + iw) meets filter tap `tap[t]`
 * (kh * FW + kw), in row-major order (kh, then kw), the taps in the padding left out.
 * @param {object} info TF.js conv or pool info
 * @returns {{start: Int32Array, pixel: Int32Array, tap: Int32Array}}
 */
export function windowTaps(info) {
  const { inHeight: H, inWidth: W, outHeight: OH, outWidth: OW, strideHeight: SH, strideWidth: SW,
    dilationHeight: DH, dilationWidth: DW, filterHeight: FH, filterWidth: FW, padInfo } = info;
  const start = new Int32Array(OH * OW + 1);
  const pixel = new Int32Array(OH * OW * FH * FW);
  const tap = new Int32Array(OH * OW * FH * FW);
  let t = 0;
  for (let oh = 0; oh < OH; oh += 1) {
    for (let ow = 0; ow < OW; ow += 1) {
      start[oh * OW + ow] = t;
      for (let kh = 0; kh < FH; kh += 1) {
        const ih = oh * SH - padInfo.top + kh * DH;
        if (ih < 0 || ih >= H) continue;
        for (let kw = 0; kw < FW; kw += 1) {
          const iw = ow * SW - padInfo.left + kw * DW;
          if (iw < 0 || iw >= W) continue;
          pixel[t] = ih * W + iw;
          tap[t] = kh * FW + kw;
          t += 1;
        }
      }
    }
  }
  start[OH * OW] = t;
  return { start, pixel, tap };
}
