// Fleet rounds on the device (`splitkeras serve --aggregate fedavg|relay`, docs/protocol.md
// "Fleet rounds"); the twin of splitkeras/client/rounds.py.
//
// When the server announces aggregation in its open-session answer, `SplitDevice.fit` adds a
// `FleetRounds` to its callbacks: before the first step it downloads the global device weights
// (a device that joins late starts from the latest), after each round (`round_steps` steps, or
// an epoch) it uploads every weight of its device segments (safetensors, the same codec as the
// activations; metadata `samples`), waits for the round to close (long poll) and takes the new
// global weights. Optimizer slots stay the device's own. A partial round is uploaded at the end
// of fit. An upload too late for its round (`round_closed`) is dropped: the device takes the
// latest global weights and goes on.
//
// Weights are named `<segment>/<layer>/<weight>` (the Keras variable path, which TF.js keeps
// as a weight's `originalName`), as the Python side names them.

import { MEDIA_TYPE, decodeTensors, encodeTensors } from './wire.js';
import { ProtocolError } from './session.js';

const WAIT_SECONDS = 20; // under the session's 30 s request timeout

export class FleetRounds {
  /**
   * @param {object} device a SplitDevice (its first server stage's session is used)
   * @param {{mode: string, round_steps: number|null, deadline_seconds: number}} announced
   *   the `aggregation` entry of the server's open-session answer
   * @param {{maxWaitMs?: number}} [options] how long to wait for a round to close
   */
  constructor(device, announced, { maxWaitMs } = {}) {
    this.device = device;
    this.openedWith = device.session;
    this.tf = device.tf;
    this.mode = announced.mode;
    this.roundSteps = announced.round_steps ?? null;
    this.maxWaitMs = maxWaitMs ?? (2 * (announced.deadline_seconds ?? 60) + 60) * 1000;
    this.round = 0;
    this.steps = 0;
    this.samples = 0;
    this.stats = { rounds: 0, uploadedBytes: 0, downloadedBytes: 0, droppedUploads: 0 };
    this.variables = [];
    for (const entry of device.manifest.segments.filter((s) => s.placement === 'device')) {
      for (const w of device.models[entry.name].weights) {
        this.variables.push({ name: `${entry.name}/${w.originalName}`, variable: w });
      }
    }
  }

  /**
   * The rounds a device takes part in: null when the server does not aggregate, or when
   * `rounds` is false; kept on the device across fits.
   */
  static async forDevice(device, rounds) {
    if (rounds === false) return null;
    await device.ensureSessions();
    const announced = device.session.info?.aggregation;
    if (!announced) {
      if (rounds === true) {
        throw new ProtocolError('fit({rounds: true}): the server does not aggregate device segments '
          + '(start it with `splitkeras serve OUT --aggregate fedavg`).', { code: 'aggregation_off' });
      }
      return null;
    }
    if (!device.rounds || device.rounds.openedWith !== device.session) {
      device.rounds = new FleetRounds(device, announced);
    }
    return device.rounds;
  }

  // ---------------------------------------------------------------- fit's callbacks

  async onTrainBegin() {
    this.take(await this.download(null));
    this.steps = 0;
    this.samples = 0;
  }

  async onBatchEnd(batch, logs) {
    this.steps += 1;
    this.samples += logs.size;
    if (this.roundSteps !== null && this.steps >= this.roundSteps) await this.sync();
  }

  async onEpochEnd() {
    if (this.roundSteps === null && this.steps) await this.sync();
  }

  async onTrainEnd() {
    if (this.steps) await this.sync();
  }

  // ---------------------------------------------------------------- one round's end

  /** Upload this round's weights, wait for the round to close, take the global weights. */
  async sync() {
    const finished = this.round;
    try {
      await this.upload(finished);
    } catch (error) {
      if (error.code !== 'round_closed' || typeof error.toError !== 'function') throw toError(error);
      this.stats.droppedUploads += 1;
    }
    const started = Date.now();
    let answer;
    for (;;) {
      answer = await this.download(finished, WAIT_SECONDS);
      if (answer.round > finished) break;
      if (Date.now() - started > this.maxWaitMs) {
        throw new ProtocolError(`Round ${finished} did not close within ${this.maxWaitMs / 1000} s `
          + "(the server's --round-quorum and --round-deadline).", { code: 'round_timeout' });
      }
    }
    this.take(answer);
    this.stats.rounds += 1;
    this.steps = 0;
    this.samples = 0;
  }

  // ---------------------------------------------------------------- HTTP

  path() {
    return `${this.device.session.sessionPath()}/fleet`;
  }

  weights() {
    return this.variables.map(({ name, variable }) => ({
      name, dtype: 'float32', shape: variable.shape, data: Float32Array.from(variable.read().dataSync()),
    }));
  }

  async upload(round) {
    const session = this.device.session;
    const body = encodeTensors(this.weights(), {
      wireDtype: session.wireDtype, metadata: { samples: String(Math.max(this.samples, 1)) },
    });
    const path = `${this.path()}/rounds/${round}/weights`;
    await session.send('POST', path, body, MEDIA_TYPE, session.info.token, `POST ${path}`);
    this.stats.uploadedBytes += body.byteLength;
  }

  async download(after, wait = 0) {
    const session = this.device.session;
    const query = after === null ? '' : `?after=${after}&wait=${wait}`;
    const path = `${this.path()}/weights`;
    let response;
    try {
      response = await session.send('GET', path + query, null, null, session.info.token, `GET ${path}`);
    } catch (error) {
      throw toError(error);
    }
    this.stats.downloadedBytes += response.body.byteLength;
    const { tensors, metadata } = decodeTensors(response.body);
    return { round: Number(metadata.round), tensors };
  }

  take({ round, tensors }) {
    const { tf } = this;
    for (const { name, variable } of this.variables) {
      const value = tensors[name];
      if (!value) {
        throw new ProtocolError(`The server's global device weights have no '${name}': serve and train `
          + 'the same split folder.', { code: 'bad_tensor' });
      }
      const tensor = tf.tensor(value.data, value.shape, 'float32');
      variable.write(tensor);
      tensor.dispose();
    }
    this.round = round;
  }
}

function toError(error) {
  return typeof error.toError === 'function' ? error.toError() : error;
}
