// Pipelined training (SplitDevice.fit's `pipelineDepth`, 2-4; docs/training.md, "Pipelining
// in the JS runtime"): while the server works on step k, the device starts step k+1 -- the
// head's forward and its server forward go out -- instead of waiting for step k's round trip.
//
//   forwards:  startTrainStep (steps.js) of step k+1 begins once step k's forward phase has
//              answered and fewer than `depth` steps are in flight; forwards are sent in step
//              order, one phase at a time (a server takes forward k+1 only while k+1 is newer
//              than every step it holds pending).
//   finishes:  finishTrainStep (the label stage, the backwards) of the oldest step, one at a
//              time, in step order (backwards are FIFO on the server).
//
// TF.js ops are synchronous, so what overlaps is the network and the server's work with the
// device's compute, not two computations. Staleness at depth d: the forward of step k (the
// head's and the servers') runs on weights that lack the updates of steps k-d+1 .. k-1 (up to
// d-1); each device segment's backward recomputes its forward on the inputs of ITS step and
// the weights as they are then (every earlier update applied), and its update applies to
// those weights (no weight stashing). The label segment runs once, on its current weights.
// Depth 1 never comes here: fit runs today's loop (batches.js).

import { abandonTrainStep, finishTrainStep, startTrainStep } from './steps.js';
import { SplitDeviceError } from './tensors.js';

export const MAX_PIPELINE_DEPTH = 4;

/** `depth` as a pipeline depth: a whole number from 1 to 4. */
export function checkPipelineDepth(depth) {
  if (!Number.isInteger(depth) || depth < 1 || depth > MAX_PIPELINE_DEPTH) {
    throw new SplitDeviceError(`pipelineDepth ${depth} must be an integer from 1 (no pipelining) `
      + `to ${MAX_PIPELINE_DEPTH}: the number of steps in flight at once`);
  }
  return depth;
}

/**
 * Refuse what pipelining does not do (before any request): a split other than U-shaped with
 * one server stage and the labels on the device, privacy defences (their random streams and
 * NoPeek's statistics are per step in order), as the Python client refuses them.
 */
export function checkPipelinable(device, depth) {
  if (depth === 1) return;
  const servers = device.runners.filter((r) => r.session).length;
  if (servers !== 1 || !device.tail || (device.defences ?? []).length) {
    throw new SplitDeviceError(`fit({pipelineDepth: ${depth}}) needs a U-shaped split with one server `
      + 'stage (labels on the device), without defences; this split has '
      + `${servers} server stage(s), the labels ${device.tail ? 'on the device' : 'on a server'}`
      + `${(device.defences ?? []).length ? ', defences' : ''}. Train it with pipelineDepth 1.`);
  }
}

/** Fleet rounds upload the device's weights between steps: not with steps in flight. */
export function checkNoRounds(rounds, depth) {
  if (rounds && depth > 1) {
    throw new SplitDeviceError(`fit({pipelineDepth: ${depth}}): the server runs fleet rounds `
      + '(--aggregate), which upload the weights between steps; train with pipelineDepth 1 '
      + '(or fit(..., {rounds: false}) to keep this device out of the rounds).');
  }
}

/**
 * The depth the servers allow: `depth`, capped by the max_pending_steps of every server
 * stage that gets forwards (the label stage's `train` holds nothing pending), with a
 * warning (`warn(message)`) when it is lower.
 */
export function servedDepth(device, depth, warn) {
  const forwarding = device.runners.slice(0, -1).filter((r) => r.session);
  const limit = Math.min(depth, ...forwarding.map((r) => r.session.maxPendingSteps));
  if (limit < depth) {
    const which = forwarding.filter((r) => r.session.maxPendingSteps < depth)
      .map((r) => `${r.stage.name}: ${r.session.maxPendingSteps}`).join(', ');
    warn(`pipelineDepth ${depth} is capped at ${limit}: the server takes at most that many steps `
      + `in flight per session (max_pending_steps ${which}; \`splitkeras serve --max-pending-steps\`).`);
  }
  return limit;
}

/**
 * Run the steps of `nextBatch()` ({x, y, ...} or null when there is none; it may dispose
 * nothing: the caller disposes x and y in `release(item)`, called once the step copied them)
 * with up to `depth` in flight; `finished(result, item)` is awaited for each step, in step
 * order. On a failure, the steps in flight are abandoned (their pending state freed) and
 * the first error is thrown.
 */
export async function runPipelined(device, depth, { nextBatch, release, finished }) {
  const inFlight = []; // {item, forwarded: Promise<state>}, oldest first
  let mark = { stats: device.stats, time: Date.now() };
  const finishOldest = async () => {
    const { item, forwarded } = inFlight.shift();
    const result = await finishTrainStep(await forwarded);
    const now = { stats: device.stats, time: Date.now() };
    // bytes and seconds since the previous step finished (steps overlap: they sum to the epoch's)
    result.bytesSent = now.stats.bytesSent - mark.stats.bytesSent;
    result.bytesReceived = now.stats.bytesReceived - mark.stats.bytesReceived;
    result.seconds = (now.time - mark.time) / 1000;
    mark = now;
    await finished(result, item);
  };
  try {
    for (;;) {
      if (inFlight.length === depth) await finishOldest();
      const item = await nextBatch();
      if (!item) break;
      const step = device.stepCount;
      device.stepCount += 1;
      const start = () => {
        try {
          return startTrainStep(device, step, item.x, item.y); // copies x and y at once
        } finally {
          release(item);
        }
      };
      const previous = inFlight.length ? inFlight[inFlight.length - 1].forwarded : null;
      const forwarded = previous
        ? previous.then(start, (error) => { release(item); throw error; }) : start();
      forwarded.catch(() => {}); // awaited in finishOldest; not an unhandled rejection meanwhile
      inFlight.push({ item, forwarded });
    }
    while (inFlight.length) await finishOldest();
  } catch (error) {
    for (const { forwarded } of inFlight.splice(0)) {
      try {
        abandonTrainStep(await forwarded);
      } catch {
        // that step failed too (or never started); the first error is the one to report
      }
    }
    throw error;
  }
}
