// Pooling with settings TF.js 4.22 lacks or trains wrongly.
//
// Average pooling with padding='same': TensorFlow divides each window by the number of input
// elements it covers (the padding is not counted); TF.js' forward pass does too, but its
// gradient counts the padding. Here: zero padding as TensorFlow places it, 'valid' average
// pooling (whose TF.js gradient is right), times (window size / elements covered), a constant.
// Global pooling with keepdims=True: a mean / max over the spatial axes, dimensions kept.

import { samePadding, single, tuple, windowOutput } from './common.js';

/** Per output position of one axis: window size / number of input elements the window covers. */
function coverageScale(size, window, stride) {
  const [before] = samePadding(size, window, stride);
  const out = Math.ceil(size / stride);
  const scale = [];
  for (let i = 0; i < out; i += 1) {
    const start = i * stride - before;
    const covered = Math.min(start + window, size) - Math.max(start, 0);
    scale.push(window / covered);
  }
  return scale;
}

export function definePooling(tf) {
  const { Layer } = tf.layers;

  class SplitkerasAveragePooling extends Layer {
    constructor(config, rank) {
      super(config);
      this.rank = rank;
      this.poolSize = tuple(config.poolSize, rank);
      this.strides = tuple(config.strides ?? this.poolSize, rank);
      this.padding = config.padding ?? 'valid';
    }

    computeOutputShape(inputShape) {
      const shape = inputShape.slice();
      for (let i = 0; i < this.rank; i += 1) {
        shape[i + 1] = windowOutput(shape[i + 1], this.poolSize[i], this.strides[i], this.padding);
      }
      return shape;
    }

    pool2d(x, poolSize, strides) {
      if (this.padding !== 'same') return tf.avgPool(x, poolSize, strides, 'valid');
      const [, height, width] = x.shape;
      const [top, bottom] = samePadding(height, poolSize[0], strides[0]);
      const [left, right] = samePadding(width, poolSize[1], strides[1]);
      const padded = tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]]);
      const pooled = tf.avgPool(padded, poolSize, strides, 'valid');
      const rows = coverageScale(height, poolSize[0], strides[0]);
      const cols = coverageScale(width, poolSize[1], strides[1]);
      const scale = tf.tensor4d(rows.flatMap((r) => cols.map((c) => r * c)), [1, rows.length, cols.length, 1]);
      return tf.mul(pooled, scale);
    }

    getConfig() {
      return { ...super.getConfig(), poolSize: this.poolSize, strides: this.strides, padding: this.padding };
    }
  }

  class SplitkerasAveragePooling2D extends SplitkerasAveragePooling {
    constructor(config) {
      super(config, 2);
    }

    call(inputs) {
      return tf.tidy(() => this.pool2d(single(inputs), this.poolSize, this.strides));
    }
  }
  SplitkerasAveragePooling2D.className = 'SplitkerasAveragePooling2D';

  class SplitkerasAveragePooling1D extends SplitkerasAveragePooling {
    constructor(config) {
      super(config, 1);
    }

    call(inputs) {
      return tf.tidy(() => {
        const y = this.pool2d(tf.expandDims(single(inputs), 1), [1, this.poolSize[0]], [1, this.strides[0]]);
        return tf.squeeze(y, [1]);
      });
    }
  }
  SplitkerasAveragePooling1D.className = 'SplitkerasAveragePooling1D';

  const globalPooling = (className, rank, reduce) => {
    const cls = class extends Layer {
      constructor(config) {
        super(config);
        this.keepdims = config.keepdims ?? false;
      }

      computeOutputShape(inputShape) {
        if (!this.keepdims) return [inputShape[0], inputShape[inputShape.length - 1]];
        return inputShape.map((d, i) => (i >= 1 && i <= rank ? 1 : d));
      }

      call(inputs) {
        return tf.tidy(() => reduce(single(inputs), Array.from({ length: rank }, (_, i) => i + 1),
          this.keepdims));
      }

      getConfig() {
        return { ...super.getConfig(), keepdims: this.keepdims };
      }
    };
    cls.className = className;
    return cls;
  };
  const mean = (x, axes, keep) => tf.mean(x, axes, keep);
  const max = (x, axes, keep) => tf.max(x, axes, keep);

  return [
    SplitkerasAveragePooling1D, SplitkerasAveragePooling2D,
    globalPooling('SplitkerasGlobalAveragePooling1D', 1, mean),
    globalPooling('SplitkerasGlobalAveragePooling2D', 2, mean),
    globalPooling('SplitkerasGlobalMaxPooling1D', 1, max),
    globalPooling('SplitkerasGlobalMaxPooling2D', 2, max),
  ];
}
