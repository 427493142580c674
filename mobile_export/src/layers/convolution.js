// Convolutions with the settings TF.js 4.22 cannot train: dilation (TF.js has no gradient for
// a dilated convolution, and its DepthwiseConv2D ignores the dilation), causal padding, groups.
//
// A dilated kernel is the kernel with (rate - 1) zeros between its taps: the convolution with
// that kernel and no dilation is the dilated convolution, term for term (the added terms are
// exact zeros), and its gradient is TF.js' own conv2d / depthwiseConv2d gradient followed by
// the (exact) gradients of pad, reshape and slice. 'same' padding is computed by TF.js from the
// dilated kernel's size, as TensorFlow computes it from the effective filter size.
// Causal Conv1D: (kernel - 1) * rate zeros on the left, then 'valid'.
// Groups: one convolution per group, concatenated; with one input channel per group
// (ConvNeXt's 7x7 "depthwise" Conv2D) the grouped convolution is a depthwise convolution with the
// kernel reshaped to [kh, kw, groups, filters / groups] (output channel g * m + j in both).

import { activationOf, regularizerOf, single, tuple, windowOutput } from './common.js';

/** The kernel [k0, k1, ..., ...] with rates[i] - 1 zeros between taps along spatial axis i. */
export function dilateKernel(tf, kernel, rates) {
  let k = kernel;
  rates.forEach((rate, axis) => {
    if (rate === 1) return;
    const shape = k.shape;
    const taps = shape[axis];
    const padding = shape.map(() => [0, 0]);
    padding.splice(axis + 1, 0, [0, rate - 1]);
    const spread = tf.pad(tf.expandDims(k, axis + 1), padding);
    const merged = shape.slice();
    merged[axis] = taps * rate;
    const size = shape.slice();
    size[axis] = (taps - 1) * rate + 1;
    k = tf.slice(tf.reshape(spread, merged), shape.map(() => 0), size);
  });
  return k;
}

function groupedConv2d(tf, x, kernel, strides, padding, groups) {
  if (groups === 1) return tf.conv2d(x, kernel, strides, padding);
  const [kh, kw, perGroup, filters] = kernel.shape;
  if (perGroup === 1) {
    return tf.depthwiseConv2d(x, tf.reshape(kernel, [kh, kw, groups, filters / groups]), strides, padding);
  }
  const xs = tf.split(x, groups, 3);
  const ks = tf.split(kernel, groups, 3);
  return tf.concat(xs.map((part, g) => tf.conv2d(part, ks[g], strides, padding)), 3);
}

export function defineConvolutions(tf) {
  const { Layer } = tf.layers;
  const zeros = () => tf.initializers.zeros();

  class SplitkerasConvBase extends Layer {
    constructor(config, rank) {
      super(config);
      this.rank = rank;
      this.filters = config.filters;
      this.kernelSize = tuple(config.kernelSize, rank);
      this.strides = tuple(config.strides ?? 1, rank);
      this.padding = config.padding ?? 'valid';
      this.dilationRate = tuple(config.dilationRate ?? 1, rank);
      this.groups = config.groups ?? 1;
      this.useBias = config.useBias ?? true;
      this.activationName = config.activation ?? 'linear';
      this.activation = activationOf(tf, this.activationName);
      this.kernelRegularizerConfig = config.kernelRegularizer ?? null;
      this.biasRegularizerConfig = config.biasRegularizer ?? null;
    }

    build(inputShape) {
      const channels = inputShape[inputShape.length - 1];
      if (channels % this.groups !== 0 || this.filters % this.groups !== 0) {
        throw new Error(`${this.name}: ${channels} input channels and ${this.filters} filters do not `
          + `divide into ${this.groups} groups`);
      }
      this.kernel = this.addWeight('kernel', [...this.kernelSize, channels / this.groups, this.filters],
        'float32', zeros(), regularizerOf(tf, this.kernelRegularizerConfig), true);
      if (this.useBias) {
        this.bias = this.addWeight('bias', [this.filters], 'float32', zeros(),
          regularizerOf(tf, this.biasRegularizerConfig), true);
      }
      this.built = true;
    }

    effectiveKernel(i) {
      return (this.kernelSize[i] - 1) * this.dilationRate[i] + 1;
    }

    computeOutputShape(inputShape) {
      const shape = inputShape.slice();
      for (let i = 0; i < this.rank; i += 1) {
        shape[i + 1] = windowOutput(shape[i + 1], this.effectiveKernel(i), this.strides[i], this.padding);
      }
      shape[shape.length - 1] = this.filters;
      return shape;
    }

    finish(y) {
      let out = y;
      if (this.useBias) out = tf.add(out, this.bias.read());
      return this.activation.apply(out);
    }

    getConfig() {
      return {
        ...super.getConfig(),
        filters: this.filters,
        kernelSize: this.kernelSize,
        strides: this.strides,
        padding: this.padding,
        dilationRate: this.dilationRate,
        groups: this.groups,
        useBias: this.useBias,
        activation: this.activation.getClassName(),
        kernelRegularizer: this.kernelRegularizerConfig,
        biasRegularizer: this.biasRegularizerConfig,
      };
    }
  }

  class SplitkerasConv2D extends SplitkerasConvBase {
    constructor(config) {
      super(config, 2);
    }

    call(inputs) {
      return tf.tidy(() => {
        const x = single(inputs);
        const kernel = dilateKernel(tf, this.kernel.read(), this.dilationRate);
        return this.finish(groupedConv2d(tf, x, kernel, this.strides, this.padding, this.groups));
      });
    }
  }
  SplitkerasConv2D.className = 'SplitkerasConv2D';

  class SplitkerasConv1D extends SplitkerasConvBase {
    constructor(config) {
      super(config, 1);
    }

    call(inputs) {
      return tf.tidy(() => {
        let x = single(inputs);
        let padding = this.padding;
        if (padding === 'causal') {
          x = tf.pad(x, [[0, 0], [this.effectiveKernel(0) - 1, 0], [0, 0]]);
          padding = 'valid';
        }
        const kernel = dilateKernel(tf, tf.expandDims(this.kernel.read(), 0), [1, this.dilationRate[0]]);
        const y = groupedConv2d(tf, tf.expandDims(x, 1), kernel, [1, this.strides[0]], padding, this.groups);
        return this.finish(tf.squeeze(y, [1]));
      });
    }
  }
  SplitkerasConv1D.className = 'SplitkerasConv1D';

  // The depthwise convolution of DepthwiseConv2D and SeparableConv2D (weight `depthwise_kernel`
  // [kh, kw, channels, depthMultiplier], dilated as above), then `project` (SeparableConv2D: its
  // 1x1 pointwise convolution), the bias and the activation.
  class SplitkerasDepthwiseBase extends Layer {
    constructor(config, regularizers) {
      super(config);
      this.kernelSize = tuple(config.kernelSize, 2);
      this.strides = tuple(config.strides ?? 1, 2);
      this.padding = config.padding ?? 'valid';
      this.dilationRate = tuple(config.dilationRate ?? 1, 2);
      this.depthMultiplier = config.depthMultiplier ?? 1;
      this.useBias = config.useBias ?? true;
      this.activation = activationOf(tf, config.activation);
      this.regularizerConfigs = Object.fromEntries(regularizers.map((name) => [name,
        config[`${name}Regularizer`] ?? null]));
    }

    addKernel(name, shape) {
      const regularizer = regularizerOf(tf, this.regularizerConfigs[name.split('_')[0]]);
      return this.addWeight(name, shape, 'float32', zeros(), regularizer, true);
    }

    build(inputShape) {
      const channels = inputShape[inputShape.length - 1];
      this.depthwiseKernel = this.addKernel('depthwise_kernel', [...this.kernelSize, channels, this.depthMultiplier]);
      this.buildProjection(channels * this.depthMultiplier);
      if (this.useBias) this.bias = this.addKernel('bias', [this.outChannels(channels)]);
      this.built = true;
    }

    buildProjection() {}

    project(y) {
      return y;
    }

    computeOutputShape(inputShape) {
      const shape = inputShape.slice();
      for (let i = 0; i < 2; i += 1) {
        const window = (this.kernelSize[i] - 1) * this.dilationRate[i] + 1;
        shape[i + 1] = windowOutput(shape[i + 1], window, this.strides[i], this.padding);
      }
      shape[3] = this.outChannels(shape[3]);
      return shape;
    }

    call(inputs) {
      return tf.tidy(() => {
        const kernel = dilateKernel(tf, this.depthwiseKernel.read(), this.dilationRate);
        let y = this.project(tf.depthwiseConv2d(single(inputs), kernel, this.strides, this.padding));
        if (this.useBias) y = tf.add(y, this.bias.read());
        return this.activation.apply(y);
      });
    }

    getConfig() {
      return {
        ...super.getConfig(),
        kernelSize: this.kernelSize,
        strides: this.strides,
        padding: this.padding,
        dilationRate: this.dilationRate,
        depthMultiplier: this.depthMultiplier,
        useBias: this.useBias,
        activation: this.activation.getClassName(),
        ...Object.fromEntries(Object.entries(this.regularizerConfigs).map(([name, value]) => [`${name}Regularizer`,
          value])),
      };
    }
  }

  class SplitkerasDepthwiseConv2D extends SplitkerasDepthwiseBase {
    constructor(config) {
      super(config, ['depthwise', 'bias']);
    }

    outChannels(channels) {
      return channels == null ? null : channels * this.depthMultiplier;
    }
  }
  SplitkerasDepthwiseConv2D.className = 'SplitkerasDepthwiseConv2D';

  class SplitkerasSeparableConv2D extends SplitkerasDepthwiseBase {
    constructor(config) {
      super(config, ['depthwise', 'pointwise', 'bias']);
      this.filters = config.filters;
    }

    outChannels() {
      return this.filters;
    }

    buildProjection(channels) {
      this.pointwiseKernel = this.addKernel('pointwise_kernel', [1, 1, channels, this.filters]);
    }

    project(y) {
      return tf.conv2d(y, this.pointwiseKernel.read(), 1, 'valid');
    }

    getConfig() {
      return { ...super.getConfig(), filters: this.filters };
    }
  }
  SplitkerasSeparableConv2D.className = 'SplitkerasSeparableConv2D';

  return [SplitkerasConv1D, SplitkerasConv2D, SplitkerasDepthwiseConv2D, SplitkerasSeparableConv2D];
}
