// Small layers: ELU with any alpha, Rescaling per channel, UpSampling2D, and the custom layers
// of keras.applications (ConvNeXt's LayerScale, InceptionResNetV2's CustomScaleLayer).
//
// UpSampling2D: TF.js' ResizeNearestNeighborGrad mixes the samples of a batch and its bilinear
// resize differs from TensorFlow's. Nearest here is Keras' repeat (reshape + tile, whose gradient
// is a sum); bilinear is a product with fixed interpolation matrices along height and width,
// built with tf.image.resize's half-pixel centers (its gradient is a product with their
// transposes).

import { single, tuple } from './common.js';

/** [out, size] matrix of TensorFlow's bilinear resize (half-pixel centers, no antialiasing). */
export function bilinearMatrix(size, out) {
  const scale = size / out;
  const rows = [];
  for (let o = 0; o < out; o += 1) {
    const row = new Array(size).fill(0);
    const position = (o + 0.5) * scale - 0.5;
    const floor = Math.floor(position);
    const lower = Math.max(floor, 0);
    const upper = Math.min(Math.ceil(position), size - 1);
    const lerp = position - floor;
    row[lower] += 1 - lerp;
    row[upper] += lerp;
    rows.push(row);
  }
  return rows;
}

export function defineMisc(tf) {
  const { Layer } = tf.layers;

  class SplitkerasELU extends Layer {
    constructor(config) {
      super(config);
      this.alpha = config.alpha ?? 1;
    }

    call(inputs) {
      // Keras: where(x > 0, elu(x), alpha * elu(x)), i.e. elu(x) * (alpha + (1 - alpha) * step(x))
      // (elu(x) = x where x > 0, so no overflow in the gradient; step's gradient is zero)
      return tf.tidy(() => {
        const x = single(inputs);
        return tf.mul(tf.elu(x), tf.add(this.alpha, tf.mul(1 - this.alpha, tf.step(x))));
      });
    }

    computeOutputShape(inputShape) {
      return inputShape;
    }

    getConfig() {
      return { ...super.getConfig(), alpha: this.alpha };
    }
  }
  SplitkerasELU.className = 'SplitkerasELU';

  class SplitkerasRescaling extends Layer {
    constructor(config) {
      super(config);
      this.scale = config.scale ?? 1;
      this.offset = config.offset ?? 0;
    }

    call(inputs) {
      return tf.tidy(() => {
        const x = tf.cast(single(inputs), 'float32');
        const vector = (value) => (Array.isArray(value) ? tf.tensor1d(value, 'float32') : value);
        return tf.add(tf.mul(x, vector(this.scale)), vector(this.offset));
      });
    }

    computeOutputShape(inputShape) {
      return inputShape;
    }

    getConfig() {
      return { ...super.getConfig(), scale: this.scale, offset: this.offset };
    }
  }
  SplitkerasRescaling.className = 'SplitkerasRescaling';

  class SplitkerasLayerScale extends Layer {
    constructor(config) {
      super(config);
      this.initValues = config.initValues;
      this.projectionDim = config.projectionDim;
    }

    build() {
      this.gamma = this.addWeight('gamma', [this.projectionDim], 'float32',
        tf.initializers.constant({ value: this.initValues }), null, true);
      this.built = true;
    }

    call(inputs) {
      return tf.tidy(() => tf.mul(single(inputs), this.gamma.read()));
    }

    computeOutputShape(inputShape) {
      return inputShape;
    }

    getConfig() {
      return { ...super.getConfig(), initValues: this.initValues, projectionDim: this.projectionDim };
    }
  }
  SplitkerasLayerScale.className = 'SplitkerasLayerScale';

  class SplitkerasCustomScale extends Layer {
    constructor(config) {
      super(config);
      this.scale = config.scale;
    }

    call(inputs) {
      return tf.tidy(() => tf.add(inputs[0], tf.mul(inputs[1], this.scale)));
    }

    computeOutputShape(inputShape) {
      return inputShape[0];
    }

    getConfig() {
      return { ...super.getConfig(), scale: this.scale };
    }
  }
  SplitkerasCustomScale.className = 'SplitkerasCustomScale';

  class SplitkerasUpSampling2D extends Layer {
    constructor(config) {
      super(config);
      this.size = tuple(config.size ?? 2, 2);
      this.interpolation = config.interpolation ?? 'nearest';
    }

    computeOutputShape(inputShape) {
      const [batch, height, width, channels] = inputShape;
      return [batch, height == null ? null : height * this.size[0], width == null ? null : width * this.size[1],
        channels];
    }

    call(inputs) {
      return tf.tidy(() => {
        const x = single(inputs);
        const [batch, height, width, channels] = x.shape;
        const [sh, sw] = this.size;
        if (this.interpolation === 'nearest') { // rank-4 tiles (TF.js has no gradient beyond rank 4)
          const rows = tf.tile(tf.reshape(x, [batch, height, 1, width * channels]), [1, 1, sh, 1]);
          const cols = tf.tile(tf.reshape(rows, [batch * height * sh, width, 1, channels]), [1, 1, sw, 1]);
          return tf.reshape(cols, [batch, height * sh, width * sw, channels]);
        }
        // along height: [b, w, c, h] x [h, H] -> [b, w, c, H]; then along width the same way
        const alongHeight = tf.tensor2d(bilinearMatrix(height, height * sh)).transpose();
        const alongWidth = tf.tensor2d(bilinearMatrix(width, width * sw)).transpose();
        let y = tf.reshape(tf.transpose(x, [0, 2, 3, 1]), [-1, height]);
        y = tf.reshape(tf.matMul(y, alongHeight), [batch, width, channels, height * sh]);
        y = tf.reshape(tf.transpose(y, [0, 3, 2, 1]), [-1, width]); // [b, H, c, w]
        y = tf.reshape(tf.matMul(y, alongWidth), [batch, height * sh, channels, width * sw]);
        return tf.transpose(y, [0, 1, 3, 2]);
      });
    }

    getConfig() {
      return { ...super.getConfig(), size: this.size, interpolation: this.interpolation };
    }
  }
  SplitkerasUpSampling2D.className = 'SplitkerasUpSampling2D';

  return [SplitkerasELU, SplitkerasRescaling, SplitkerasLayerScale, SplitkerasCustomScale, SplitkerasUpSampling2D];
}
