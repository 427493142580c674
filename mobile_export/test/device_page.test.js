// The device page's own parts under Node (page/chart.js, page/data.js); the page itself runs
// in real Chromium against a real server in tests/test_device_page.py.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import * as tf from '@tensorflow/tfjs';

import { chartSvg, polylinePoints, tick } from '../page/chart.js';
import { PageDataError, pageData } from '../page/data.js';
import { encodeTensors } from '../src/wire.js';

await tf.setBackend('cpu');

test('polylinePoints maps steps and values onto the plot area', () => {
  // plot area: x 48..592 (width 640, pads 48), y 16..232 (height 260, pads 16 and 28)
  assert.equal(polylinePoints([[0, 0], [10, 2], [5, 1]], 10, 2), '48.0,232.0 592.0,16.0 320.0,124.0');
  assert.equal(polylinePoints([[4, 9]], 8, 3), '320.0,16.0'); // over the top: clipped to it
});

test('chartSvg draws one polyline per series with a point per step', () => {
  const svg = chartSvg({ loss: [[1, 2.5], [2, 1.25]], accuracy: [[1, 0.5], [2, 1]], valAccuracy: [[2, 0.75]] });
  const lines = [...svg.matchAll(/data-series="([a-z_]+)"[^>]* points="([^"]*)"/g)].map((m) => [m[1], m[2]]);
  assert.deepEqual(lines, [['loss', '320.0,16.0 592.0,124.0'], ['accuracy', '320.0,124.0 592.0,16.0'],
    ['val_accuracy', '592.0,70.0']]);
  assert.match(svg, />2\.5<\/text>/); // the loss axis' top is the largest loss
  assert.doesNotMatch(chartSvg({ loss: [], accuracy: [] }), /polyline/);
  assert.equal(tick(0.123456), '0.123');
});

const manifest = { model_inputs: [{ name: 'image', shape: [null, 2, 2, 1], dtype: 'float32' }] };
const body = (tensors) => encodeTensors(tensors);
const x = (n) => ({ name: '', dtype: 'float32', shape: [n, 2, 2, 1], data: Float32Array.from({ length: 4 * n }, (_, i) => i / 8) });
const y = (n) => ({ name: '', dtype: 'int32', shape: [n], data: Int32Array.from({ length: n }, (_, i) => i % 3) });
const named = (entries) => entries.map(([name, t]) => ({ ...t, name }));

test('pageData reads x_train, y_train, x_test, y_test into tensors', async () => {
  const data = pageData(tf, body(named([['x_train', x(3)], ['y_train', y(3)], ['x_test', x(2)], ['y_test', y(2)]])), manifest);
  assert.deepEqual(data.xTrain.shape, [3, 2, 2, 1]);
  assert.deepEqual(Array.from(await data.xTrain.data()).slice(0, 3), [0, 0.125, 0.25]);
  assert.equal(data.yTrain.dtype, 'int32');
  assert.deepEqual(Array.from(await data.yTest.data()), [0, 1]);
  const trainOnly = pageData(tf, body(named([['x_train', x(3)], ['y_train', y(3)]])), manifest);
  assert.equal(trainOnly.xTest, undefined);
});

test('pageData refuses data that does not fit the split, saying what is wrong', () => {
  const refuses = (tensors, pattern) => assert.throws(() => pageData(tf, body(named(tensors)), manifest),
    (error) => error instanceof PageDataError && pattern.test(error.message));
  refuses([['x', x(3)], ['y_train', y(3)]], /no tensor 'x_train' \(it holds: x, y_train\)/);
  refuses([['x_train', x(3)]], /no tensor 'y_train'/);
  refuses([['x_train', x(3)], ['y_train', y(2)]], /'y_train' has 2 samples, 'x_train' has 3/);
  refuses([['x_train', { ...x(1), shape: [1, 4, 1, 1] }], ['y_train', y(1)]], /takes \[batch, 2,2,1\]/);
  refuses([['x_train', x(3)], ['y_train', y(3)], ['x_test', x(2)]], /no tensor 'y_test'/);
  assert.throws(() => pageData(tf, new Uint8Array([1, 2, 3]).buffer, manifest), /not a safetensors file/);
  assert.throws(() => pageData(tf, body(named([['x_train', x(1)]])), { model_inputs: [] }), /one model input/);
});
