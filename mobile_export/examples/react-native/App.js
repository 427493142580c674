// An example React Native app: trains the device segments of a split model on the phone with
// splitkeras-device, and keeps the trained weights across app restarts in AsyncStorage.
//
// `split/` is what `splitkeras export` wrote (split.json, head_tfjs/, tail_tfjs/, assets.js,
// splitkeras-device/); see README.md here for the setup. The training code is training.js
// (the runtime's tests run it under Hermes).

import React, { useState } from 'react';
import { Button, SafeAreaView, Text } from 'react-native';
import * as tf from '@tensorflow/tfjs';
import '@tensorflow/tfjs-react-native';
import { asyncStorageIO } from '@tensorflow/tfjs-react-native';
import { manifest, models as bundled } from './split/assets';
import { loadDeviceModels, trainOnDevice } from './training';

const SERVER_URL = 'https://split.example.org';   // `splitkeras serve` behind TLS
const storageKey = (name) => `splitkeras-${name}`;

async function serverKey() {
  // Fetch the key from your own backend after the user logs in; never ship it in the app.
  const response = await fetch('https://api.example.org/split-key', { credentials: 'include' });
  return (await response.json()).key;
}

// Your data: inputs shaped like split.json's model_inputs, labels as the loss wants them.
function localData() {
  const [input] = manifest.model_inputs;
  const classes = manifest.model_outputs[0].shape[manifest.model_outputs[0].shape.length - 1];
  return { xs: tf.randomUniform([64, ...input.shape.slice(1)]), ys: tf.randomUniform([64], 0, classes, 'int32') };
}

export default function App() {
  const [status, setStatus] = useState('idle');
  const train = async () => {
    try {
      setStatus('loading');
      await tf.ready();               // rn-webgl when the phone has it, else cpu
      const models = await loadDeviceModels(tf, manifest, bundled,
        (name) => tf.loadLayersModel(asyncStorageIO(storageKey(name))));
      const { xs, ys } = localData();
      const { history } = await trainOnDevice({ tf, manifest, models, serverUrl: SERVER_URL,
        key: await serverKey(), xs, ys, batchSize: 32, epochs: 1, wireDtype: 'float16',
        onProgress: ({ batch, loss }) => setStatus(`batch ${batch}: loss ${loss.toFixed(4)}`),
        save: (name, model) => model.save(asyncStorageIO(storageKey(name))) });
      setStatus(`trained on ${tf.getBackend()}: loss ${history.loss[history.loss.length - 1].toFixed(4)}`);
    } catch (error) {
      setStatus(`${error.name}: ${error.message}`);
    }
  };
  return (
    <SafeAreaView style={{ padding: 24 }}>
      <Button title="Train on this phone" onPress={train} />
      <Text>{status}</Text>
    </SafeAreaView>
  );
}
