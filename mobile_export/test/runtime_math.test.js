// Losses, metrics and optimizers of src/losses.js and src/optimizers.js against the
// numbers Keras 3 computes (fixtures/runtime_fixtures.json, written by
// fixtures/make_runtime_fixtures.py), in the real @tensorflow/tfjs (CPU backend).

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import * as tf from '@tensorflow/tfjs';

import {
  UnsupportedTrainingConfigError, computeLoss, metricValues, resolveLoss, resolveMetrics,
} from '../src/losses.js';
import { createOptimizer } from '../src/optimizers.js';
import { captureLogits } from '../src/segment.js';

await tf.setBackend('cpu');
const FIXTURES = JSON.parse(readFileSync(new URL('./fixtures/runtime_fixtures.json',
  import.meta.url), 'utf8'));
const LOSS_TOLERANCE = 2e-6; // relative to max(1, |value|)
const WEIGHT_TOLERANCE = 1e-6;

const toTensor = ({ shape, dtype, data }) => tf.tensor(data, shape, dtype);
const maxAbsDiff = (a, b) => {
  assert.equal(a.length, b.length, 'lengths differ');
  let max = 0;
  for (let i = 0; i < a.length; i += 1) max = Math.max(max, Math.abs(a[i] - b[i]));
  return max;
};

for (const c of FIXTURES.losses) {
  test(`loss ${c.id} matches Keras (value and gradient)`, () => {
    const spec = resolveLoss(c.loss);
    const yTrue = toTensor(c.y_true);
    const source = toTensor(c.grad_wrt === 'logits' ? c.logits : c.y_pred);
    let value;
    const grad = tf.grad((input) => {
      if (c.grad_wrt !== 'logits') return spec.compute(tf, yTrue, input);
      // The prediction comes out of a real TF.js softmax/sigmoid layer; the runtime
      // captures its pre-activation as Keras keeps `_keras_logits`.
      const activation = c.y_pred.shape.at(-1) === 1 && c.id.includes('sigmoid') ? 'sigmoid' : 'softmax';
      const layer = tf.layers.activation({ activation });
      const model = tf.sequential({ layers: [tf.layers.inputLayer({ inputShape: [input.shape[1]] }),
        layer] });
      const { output, logits } = captureLogits(tf, model, () => model.apply(input));
      assert.ok(logits, 'the logits were captured');
      return spec.compute(tf, yTrue, output, logits);
    });
    const g = grad(source);
    value = c.grad_wrt === 'logits' ? null : spec.compute(tf, yTrue, source).dataSync()[0];
    if (value !== null) {
      assert.ok(Math.abs(value - c.expected_loss) <= LOSS_TOLERANCE * Math.max(1, Math.abs(c.expected_loss)),
        `loss ${value} vs Keras ${c.expected_loss}`);
    }
    const diff = maxAbsDiff(g.dataSync(), c.expected_grad.data);
    assert.ok(diff <= LOSS_TOLERANCE, `max |grad diff| ${diff}`);
  });
}

test('loss through captured logits equals Keras on saturated outputs (not the clipped value)', () => {
  const c = FIXTURES.losses.find((x) => x.id === 'sparse_cce_softmax_logits_saturated');
  const spec = resolveLoss(c.loss);
  const yTrue = toTensor(c.y_true);
  const withLogits = computeLoss(tf, spec, yTrue, toTensor(c.y_pred), toTensor(c.logits));
  const clipped = computeLoss(tf, spec, yTrue, toTensor(c.y_pred));
  assert.ok(Math.abs(withLogits.dataSync()[0] - c.expected_loss) < 1e-5);
  assert.ok(Math.abs(clipped.dataSync()[0] - c.expected_loss) > 1, 'the clipped path differs');
});

for (const c of FIXTURES.metrics) {
  test(`metric ${c.id} matches Keras`, () => {
    const { metrics, skipped } = resolveMetrics([c.metric]);
    assert.deepEqual(skipped, []);
    assert.equal(metrics[0].name, c.name);
    const values = metricValues(tf, metrics[0], toTensor(c.y_true), toTensor(c.y_pred));
    const mean = tf.mean(values).dataSync()[0];
    assert.ok(Math.abs(mean - c.expected) < 1e-6, `${mean} vs Keras ${c.expected}`);
  });
}

test('unsupported losses, reductions and metrics are named', () => {
  assert.throws(() => resolveLoss('huber'), (e) => e instanceof UnsupportedTrainingConfigError
    && /'huber' is not implemented on the device; supported: sparse_categorical_crossentropy/.test(e.message));
  assert.throws(() => resolveLoss({ class_name: 'MeanSquaredError', config: { reduction: 'sum' } }),
    /reduction 'sum' is not implemented/);
  assert.throws(() => resolveLoss(null), /no loss in "training"/);
  assert.throws(() => resolveLoss(['mse', 'mse']), /one output and one loss/);
  assert.deepEqual(resolveMetrics(['accuracy', 'auc']).skipped, ['auc']);
});

for (const c of FIXTURES.optimizers) {
  test(`optimizer ${c.id} follows Keras 3 over three steps`, () => {
    const variables = c.initial.map((v) => tf.variable(toTensor(v)));
    const optimizer = createOptimizer(tf, c.optimizer).build(variables);
    c.grads.forEach((grads, step) => {
      optimizer.apply(grads.map(toTensor));
      variables.forEach((v, i) => {
        const diff = maxAbsDiff(v.dataSync(), c.expected[step][i].data);
        assert.ok(diff <= WEIGHT_TOLERANCE, `step ${step + 1}, variable ${i}: max |diff| ${diff}`);
      });
    });
    assert.equal(optimizer.iterations, 3);
    optimizer.dispose();
  });
}

test("TF.js's own tf.train.adam is NOT Keras 3 Adam (why optimizers.js exists)", () => {
  const c = FIXTURES.optimizers.find((x) => x.id === 'adam');
  const variable = tf.variable(toTensor(c.initial[0]));
  const adam = tf.train.adam(0.01, 0.9, 0.999, 1e-7);
  c.grads.forEach((grads) => adam.applyGradients([{ name: variable.name, tensor: toTensor(grads[0]) }]));
  const diff = maxAbsDiff(variable.dataSync(), c.expected[2][0].data);
  // Epsilon sits after bias correction in TF.js: the difference is small but systematic.
  assert.ok(diff > 0, `max |diff| ${diff}`);
});

test('unsupported optimizer settings are refused with a fix', () => {
  assert.throws(() => createOptimizer(tf, { class_name: 'Adagrad', config: {} }),
    /'?"Adagrad"'? is not implemented on the device; supported: SGD/);
  assert.throws(() => createOptimizer(tf, { class_name: 'SGD', config: { global_clipnorm: 1 } }),
    /global_clipnorm needs the norm of ALL gradients/);
  assert.throws(() => createOptimizer(tf, { class_name: 'SGD', config: { learning_rate: {
    class_name: 'CosineDecay', config: {} } } }), /schedule 'CosineDecay' is not implemented/);
  assert.equal(createOptimizer(tf, 'adam').className, 'Adam');
});
