// Type declarations of the public API of splitkeras-device (src/runtime.js), written by hand.
// Checked by test/package.test.js: `tsc --noEmit` on a consumer that must compile and on one
// that must not.

import type * as tfjs from '@tensorflow/tfjs';

type TF = typeof tfjs;
type Tensor = tfjs.Tensor;
type IOHandler = tfjs.io.IOHandler;
type LayersModel = tfjs.LayersModel;

/** A tensor of split.json: `null` in `shape` is the batch. */
export interface TensorSpec {
  name: string;
  shape: Array<number | null>;
  dtype: string;
}

export interface SegmentEntry {
  name: string;
  placement: 'device' | 'server';
  host?: string;
  keras_file?: string;
  tfjs?: string;
  inputs: TensorSpec[];
  outputs: TensorSpec[];
  [key: string]: unknown;
}

/** The parsed split.json of an app bundle. */
export interface SplitManifest {
  format: 'splitkeras.split';
  format_version: number;
  model_inputs: TensorSpec[];
  model_outputs: TensorSpec[];
  segments: SegmentEntry[];
  training?: { optimizer?: unknown; loss?: unknown; metrics?: unknown; [key: string]: unknown };
  [key: string]: unknown;
}

export type WireDtype = 'float32' | 'float16';
/** What `fetch` the runtime needs (the WHATWG one, or a stand-in). */
export type FetchLike = (input: string, init: {
  method: string; headers: Record<string, string>; body?: Uint8Array; signal?: AbortSignal;
}) => Promise<Response>;

export type ServerEntry = string | { url: string; key?: string };

export interface CreateOptions {
  /** The @tensorflow/tfjs module (`import * as tf from '@tensorflow/tfjs'`). */
  tf: TF;
  manifest: SplitManifest;
  /** Each device segment by name: a loaded model, an IOHandler or a URL for tf.loadLayersModel. */
  models: Record<string, LayersModel | IOHandler | string>;
  /** The server of a split with one server stage. */
  serverUrl?: string;
  /** Several server stages: `{<stage name or host>: url | {url, key}}`. */
  servers?: Record<string, ServerEntry>;
  /** The server key (`Authorization: Bearer <key>` opens a session); default of every server. */
  key?: string;
  wireDtype?: WireDtype;
  /** The codec of each direction: `'int8'`, `'forward=int8,backward=topk:0.05+int8'`
   *  (docs/protocol.md, Codecs); default: `wireDtype` both ways. */
  compress?: string;
  fetch?: FetchLike;
  retries?: number;
  /** Milliseconds. */
  backoff?: number;
  maxBackoff?: number;
  timeoutMs?: number;
  /** Seeds the per-step Dropout masks (default: random). */
  seed?: number;
  sleep?: (ms: number) => Promise<void>;
  /** Register the runtime's training kernels for cpu and wasm (default true). */
  kernels?: boolean;
  /** Privacy defences for the training steps (src/privacy.js, docs/privacy.md). */
  defences?: Defence[];
}

/** A privacy defence of the device (the Python client's splitkeras.privacy). */
export type Defence =
  | { name: 'max-norm'; strength?: number; seed?: number }
  | { name: 'gradient-noise'; scale: number; seed?: number }
  | { name: 'activation-noise'; clip?: number | null; sigma?: number; seed?: number }
  | { name: 'randomized-response'; epsilon: number; seed?: number }
  /** alpha * dCor(model inputs, sent activations) added to the device's loss (default alpha 0.1;
   * 0: off); both split modes. `device.defences[i].lastDcor` keeps its value per step and server stage. */
  | { name: 'nopeek'; alpha?: number };

/** A model input: a tensor, an array of them in model-input order, or {inputName: tensor}. */
export type Inputs = Tensor | Tensor[] | Record<string, Tensor> | number[] | number[][];
export type Labels = Tensor | number[] | number[][];

export interface SessionStats {
  bytesSent: number;
  bytesReceived: number;
  requests: number;
  retries: number;
  recoveries: number;
}

export interface StepResult {
  step: number;
  loss: number;
  metrics: Record<string, number>;
  metricCounts?: Record<string, number>;
  bytesSent: number;
  bytesReceived: number;
  seconds: number;
  details?: {
    serverInputGradients: Record<string, { shape: number[]; data: Float32Array }>;
    stageInputGradients?: Record<string, Record<string, { shape: number[]; data: Float32Array }>>;
  };
}

/** The logs of one batch: the step's result and the batch's size. */
export interface BatchLogs extends StepResult {
  size: number;
}

/** Epoch logs: `loss`, the metrics, and `val_<name>` with validation data. */
export type EpochLogs = Record<string, number>;

export interface FitCallbacks {
  onTrainBegin?: (logs: EpochLogs) => unknown;
  onEpochBegin?: (epoch: number) => unknown;
  onBatchBegin?: (batch: number) => unknown;
  onBatchEnd?: (batch: number, logs: BatchLogs) => unknown;
  onEpochEnd?: (epoch: number, logs: EpochLogs) => unknown;
  onTrainEnd?: (logs: EpochLogs) => unknown;
  /** A warning of fit's (e.g. pipelineDepth capped by the server); without it, console.warn. */
  onWarning?: (message: string) => unknown;
}

export interface FitOptions extends FitCallbacks {
  /** Default 32, at most the server's max_batch. */
  batchSize?: number;
  epochs?: number;
  shuffle?: boolean;
  validationData?: [Inputs, Labels];
  /** The fraction of the LAST samples held out for validation (before shuffling). */
  validationSplit?: number;
  validationBatchSize?: number;
  initialEpoch?: number;
  callbacks?: FitCallbacks | FitCallbacks[];
  /** Take part in the server's fleet rounds (`splitkeras serve --aggregate`): default when the
   * server announces them; false: this device keeps its own segments; true: refuse a server
   * without aggregation. */
  rounds?: boolean;
  /** Steps in flight at once, 1 (default: sequential) to 4, capped by the server's
   * max_pending_steps (pipeline.js; docs/training.md, "Pipelining in the JS runtime"). */
  pipelineDepth?: 1 | 2 | 3 | 4;
}

/** Counters of the fleet rounds a device took part in (rounds.js). */
export interface RoundStats {
  rounds: number;
  uploadedBytes: number;
  downloadedBytes: number;
  droppedUploads: number;
}

/** Fleet rounds of device aggregation: fit adds one to its callbacks (rounds.js). */
export class FleetRounds implements FitCallbacks {
  static forDevice(device: SplitDevice, rounds?: boolean): Promise<FleetRounds | null>;
  readonly mode: 'fedavg' | 'relay';
  readonly roundSteps: number | null;
  /** The round of the global device weights the device holds. */
  readonly round: number;
  readonly stats: RoundStats;
  sync(): Promise<void>;
}

export interface FitResult {
  history: Record<string, number[]>;
  epoch: number[];
  steps: number;
  bytesSent: number;
  bytesReceived: number;
}

export interface Stage {
  kind: 'device' | 'server';
  name: string;
  host: string;
  segments: string[];
  inputs: TensorSpec[];
  outputs: TensorSpec[];
  holdsLabels: boolean;
  mode: 'u_shaped' | 'labels_on_server' | null;
}

export interface Topology {
  segments: Array<SegmentEntry & { host: string }>;
  stages: Stage[];
  labelSegment: string;
  labelStage: string;
  mode: 'u_shaped' | 'labels_on_server';
}

/** The server's answer to POST /v1/sessions. */
export interface SessionInfo {
  session_id: string;
  token: string;
  wire_dtype: WireDtype;
  segment: string;
  mode: 'u_shaped' | 'labels_on_server';
  max_batch: number;
  next_step: number;
  inputs: TensorSpec[];
  outputs: TensorSpec[];
  [key: string]: unknown;
}

export class SplitDevice {
  static create(options: CreateOptions): Promise<SplitDevice>;
  readonly mode: 'u_shaped' | 'labels_on_server';
  readonly topology: Topology;
  /** The server's max_batch (the smallest over the server stages), once a session is open. */
  readonly maxBatch: number | undefined;
  /** Set it to true in a fit callback to stop training after that batch. */
  stopTraining: boolean;
  /** Metrics of the training config the device does not compute. */
  readonly skippedMetrics?: string[];
  readonly sessions: SplitSession[];
  readonly session: SplitSession;
  readonly stats: SessionStats;
  /** The fleet rounds of the last fit against a server with `--aggregate` (else undefined). */
  readonly rounds?: FleetRounds;
  readonly stageStats: Record<string, SessionStats>;
  openSession(): Promise<SessionInfo | Record<string, SessionInfo>>;
  closeSession(): Promise<void>;
  trainStep(x: Inputs, y: Labels, options?: { details?: boolean }): Promise<StepResult>;
  fit(xs: Inputs, ys: Labels, options?: FitOptions): Promise<FitResult>;
  evaluate(x: Inputs, y: Labels, options?: { batchSize?: number }): Promise<Record<string, number>>;
  predict(x: Inputs, options?: { batchSize?: number }): Promise<Tensor>;
  /** The device segments' weights by Keras name `<layer>/<weight>`. */
  getWeights(segmentName?: string): Record<string, Float32Array>;
  /** A device segment's model (e.g. to `model.save(handler)` after training). */
  model(segmentName: string): LayersModel;
  dispose(): void;
}

export interface SessionOptions {
  serverUrl: string;
  key?: string;
  wireDtype?: WireDtype;
  compress?: string;
  fetch?: FetchLike;
  retries?: number;
  backoff?: number;
  maxBackoff?: number;
  timeoutMs?: number;
  sleep?: (ms: number) => Promise<void>;
  client?: string;
  /** Send request bodies as Blobs (default: in a browser, where it is ~5x faster). */
  blobBodies?: boolean;
}

export interface WireTensor {
  name: string;
  dtype: 'float32' | 'int32' | 'float16';
  shape: number[];
  data: Float32Array | Int32Array;
}

export interface DecodedBody {
  tensors: Record<string, { dtype: string; shape: number[]; data: Float32Array | Int32Array }>;
  metadata: Record<string, string>;
}

/** One server session of the protocol (docs/protocol.md), with retries and recoveries. */
export class SplitSession {
  constructor(options: SessionOptions);
  readonly baseUrl: string;
  info: SessionInfo | null;
  readonly stats: SessionStats;
  open(): Promise<SessionInfo>;
  close(): Promise<void>;
  state(): Promise<{ next_step: number; pending_step: number | null; applied_steps: number }>;
  forward(step: number, tensors: WireTensor[]): Promise<DecodedBody>;
  backward(step: number, tensors: WireTensor[]): Promise<DecodedBody>;
  train(step: number, tensors: WireTensor[]): Promise<DecodedBody>;
  predict(tensors: WireTensor[]): Promise<DecodedBody>;
}

export class StageSessions {
  constructor(stages: Stage[], options: Omit<SessionOptions, 'serverUrl'> & {
    serverUrl?: string; servers?: Record<string, ServerEntry>; });
  readonly sessions: SplitSession[];
  readonly isOpen: boolean;
  get(stageName: string): SplitSession | undefined;
}

export function stageServers(stages: Stage[], options: {
  serverUrl?: string; servers?: Record<string, ServerEntry>; key?: string;
}): Array<{ url: string; key: string | undefined }>;

/** Arguments, manifest or a split the device cannot train. */
export class SplitDeviceError extends Error {}
export class TopologyError extends SplitDeviceError {}
/** A device segment that cannot be trained as split. */
export class SegmentError extends Error {}
/** A loss, metric or optimizer setting the device does not implement. */
export class UnsupportedTrainingConfigError extends Error {}
/** A server refusal (`status`, `code` from the server) or a failure after the retries
 *  (`code` 'unreachable', 'timeout' or 'client_network': network, CORS, mixed content). */
export class ProtocolError extends Error {
  readonly status: number;
  readonly code: string;
}

export function deriveTopology(manifest: SplitManifest): Topology;
export function segmentHost(entry: SegmentEntry): string;

export type TrainingBackend = 'cpu' | 'wasm';
/** The kernels registerTrainingKernels registers for each backend. */
export const TRAINING_KERNELS: Readonly<Record<TrainingBackend, readonly string[]>>;
/** Register the training kernels (fast conv/depthwise gradients on cpu; the ones wasm lacks
 *  or gets wrong). Idempotent; SplitDevice.create calls it unless `kernels: false`. */
export function registerTrainingKernels(tf: TF, options?: { backends?: TrainingBackend[] }): {
  registered: Array<{ kernelName: string; backendName: string; replaced: boolean }>;
  restore: () => void;
};
