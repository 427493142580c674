// GRU with reset_after=True, the Keras 3 default, which TF.js 4.22 refuses ("GRUCell does not
// support reset_after parameter set to true"). As Keras 3's GRUCell:
//   x W + b_in = [x_z, x_r, x_h],   h W_rec + b_rec = [r_z, r_r, r_h]   (bias: [2, 3 * units])
//   z = rec_act(x_z + r_z),  r = rec_act(x_r + r_r),  hh = act(x_h + r * r_h)
//   h = z * h_prev + (1 - z) * hh
// (reset_after=False, bias [3 * units]: hh = act(x_h + (r * h_prev) W_rec_h), as TF.js' GRU.)
// The recurrence, return_sequences/return_state and go_backwards are TF.js' RNN layer's.
// Dropout masks are drawn once per call and reused at every step, as TF.js' GRU does.
//
// Regularizers: TF.js' RNN layers keep their cell's weight regularizers to the cell, so
// `model.calculateLosses()` misses them (measured: 0 where Keras counts 0.17). SplitkerasGRU
// counts them, and SplitkerasLSTM / SplitkerasSimpleRNN are TF.js' LSTM / SimpleRNN doing the
// same (the exporter writes them for recurrent layers with a regularizer).

import { activationOf, regularizerOf } from './common.js';

export function defineRecurrent(tf) {
  class SplitkerasGRUCell extends tf.layers.RNNCell {
    constructor(config) {
      super(config);
      this.units = config.units;
      this.resetAfter = config.resetAfter ?? true;
      this.activation = activationOf(tf, config.activation ?? 'tanh');
      this.recurrentActivation = activationOf(tf, config.recurrentActivation ?? 'sigmoid');
      this.useBias = config.useBias ?? true;
      this.dropout = Math.min(1, Math.max(0, config.dropout ?? 0));
      this.recurrentDropout = Math.min(1, Math.max(0, config.recurrentDropout ?? 0));
      this.regularizerConfigs = {
        kernel: config.kernelRegularizer ?? null,
        recurrent: config.recurrentRegularizer ?? null,
        bias: config.biasRegularizer ?? null,
      };
      this.stateSize = this.units;
      this.dropoutMask = null;
      this.recurrentDropoutMask = null;
    }

    build(inputShape) {
      const shape = Array.isArray(inputShape[0]) ? inputShape[0] : inputShape;
      const inputDim = shape[shape.length - 1];
      const zeros = tf.initializers.zeros();
      const regs = this.regularizerConfigs;
      this.kernel = this.addWeight('kernel', [inputDim, 3 * this.units], 'float32', zeros,
        regularizerOf(tf, regs.kernel), true);
      this.recurrentKernel = this.addWeight('recurrent_kernel', [this.units, 3 * this.units], 'float32', zeros,
        regularizerOf(tf, regs.recurrent), true);
      if (this.useBias) {
        this.bias = this.addWeight('bias', this.resetAfter ? [2, 3 * this.units] : [3 * this.units], 'float32',
          zeros, regularizerOf(tf, regs.bias), true);
      }
      this.built = true;
    }

    mask(rate, like, training) {
      return training ? tf.keep(tf.dropout(tf.onesLike(like), rate)) : tf.keep(tf.onesLike(like));
    }

    call(inputs, kwargs) {
      return tf.tidy(() => {
        const training = kwargs?.training ?? false;
        let [x, hPrev] = inputs;
        if (this.dropout > 0 && this.dropout < 1) {
          if (this.dropoutMask == null) this.dropoutMask = this.mask(this.dropout, x, training);
          x = tf.mul(x, this.dropoutMask);
        }
        let hRec = hPrev;
        if (this.recurrentDropout > 0 && this.recurrentDropout < 1) {
          if (this.recurrentDropoutMask == null) {
            this.recurrentDropoutMask = this.mask(this.recurrentDropout, hPrev, training);
          }
          hRec = tf.mul(hPrev, this.recurrentDropoutMask);
        }
        let matrixX = tf.matMul(x, this.kernel.read());
        if (!this.resetAfter) {
          if (this.useBias) matrixX = tf.add(matrixX, this.bias.read());
          const [kernelZR, kernelH] = tf.split(this.recurrentKernel.read(), [2 * this.units, this.units], 1);
          const [xZ, xR, xH] = tf.split(matrixX, 3, -1);
          const [rZ, rR] = tf.split(tf.matMul(hRec, kernelZR), 2, -1);
          const z = this.recurrentActivation.apply(tf.add(xZ, rZ));
          const r = this.recurrentActivation.apply(tf.add(xR, rR));
          const hh = this.activation.apply(tf.add(xH, tf.matMul(tf.mul(r, hRec), kernelH)));
          const h = tf.add(tf.mul(z, hPrev), tf.mul(tf.sub(1, z), hh));
          return [h, h];
        }
        let matrixInner = tf.matMul(hRec, this.recurrentKernel.read());
        if (this.useBias) {
          const [inputBias, recurrentBias] = tf.unstack(this.bias.read());
          matrixX = tf.add(matrixX, inputBias);
          matrixInner = tf.add(matrixInner, recurrentBias);
        }
        const [xZ, xR, xH] = tf.split(matrixX, 3, -1);
        const [rZ, rR, rH] = tf.split(matrixInner, 3, -1);
        const z = this.recurrentActivation.apply(tf.add(xZ, rZ));
        const r = this.recurrentActivation.apply(tf.add(xR, rR));
        const hh = this.activation.apply(tf.add(xH, tf.mul(r, rH)));
        const h = tf.add(tf.mul(z, hPrev), tf.mul(tf.sub(1, z), hh));
        return [h, h];
      });
    }

    getConfig() {
      return {
        ...super.getConfig(),
        units: this.units,
        activation: this.activation.getClassName(),
        recurrentActivation: this.recurrentActivation.getClassName(),
        useBias: this.useBias,
        dropout: this.dropout,
        recurrentDropout: this.recurrentDropout,
        kernelRegularizer: this.regularizerConfigs.kernel,
        recurrentRegularizer: this.regularizerConfigs.recurrent,
        biasRegularizer: this.regularizerConfigs.bias,
        resetAfter: this.resetAfter,
      };
    }
  }
  SplitkerasGRUCell.className = 'SplitkerasGRUCell';

  class SplitkerasGRU extends tf.layers.RNN {
    constructor(config) {
      super({ ...config, cell: new SplitkerasGRUCell(config) });
    }

    call(inputs, kwargs) {
      return tf.tidy(() => {
        for (const key of ['dropoutMask', 'recurrentDropoutMask']) {
          if (this.cell[key] != null) {
            tf.dispose(this.cell[key]);
            this.cell[key] = null;
          }
        }
        return super.call(inputs, { mask: kwargs?.mask ?? null, training: kwargs?.training ?? null,
          initialState: kwargs?.initialState ?? null });
      });
    }

    get losses() {
      return [...super.losses, ...this.cell.losses];
    }

    static fromConfig(cls, config) {
      return new cls(config);
    }
  }
  SplitkerasGRU.className = 'SplitkerasGRU';

  const countingCellLosses = (Base, className) => {
    const cls = class extends Base {
      get losses() {
        return [...super.losses, ...this.cell.losses];
      }
    };
    cls.className = className;
    return cls;
  };
  const SplitkerasLSTM = countingCellLosses(tf.layers.lstm({ units: 1 }).constructor, 'SplitkerasLSTM');
  const SplitkerasSimpleRNN = countingCellLosses(tf.layers.simpleRNN({ units: 1 }).constructor,
    'SplitkerasSimpleRNN');

  return [SplitkerasGRU, SplitkerasLSTM, SplitkerasSimpleRNN];
}
