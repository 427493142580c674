// Activations Keras 3 has and TF.js 4.22 lacks (or defines differently), registered under
// the names the exporter writes (`splitkeras_hard_silu` in model.json, camel-cased by TF.js to
// `splitkerasHardSilu` when it loads). Each composes TF.js ops, so the gradients are TF.js'.

/** relu6(x + 3) / 6: Keras 3's hard_sigmoid (TF.js' own hardSigmoid is 0.2 x + 0.5). */
export const hardSigmoid = (tf, x) => tf.div(tf.relu6(tf.add(x, 3)), 6);

export function defineActivations(tf) {
  const { Serializable } = tf.serialization;
  const make = (className, fn) => {
    const cls = class extends Serializable {
      apply(x) {
        return tf.tidy(() => fn(x));
      }

      getConfig() {
        return {};
      }
    };
    cls.className = className;
    return cls;
  };
  return [
    make('splitkerasHardSigmoid', (x) => hardSigmoid(tf, x)),
    make('splitkerasHardSilu', (x) => tf.mul(x, hardSigmoid(tf, x))),
    make('splitkerasLeakyRelu', (x) => tf.leakyRelu(x, 0.2)),
    make('splitkerasExponential', (x) => tf.exp(x)),
  ];
}
