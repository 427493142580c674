// The device's server stages: one SplitSession (session, token, retries, stats) per
// server stage of the topology (topology.js). A chain of servers is one stage: the
// device talks to its first server only, at the URL given for the stage.
//
// URLs: `servers: {<stage name or host>: url | {url, key}}` (a stage is named after its
// first segment, its host is that segment's host), or `serverUrl` when the split has
// exactly one server stage. `key` is the default key of every server.

import { SplitSession } from './session.js';
import { SplitDeviceError } from './tensors.js';

const describe = (stage) => `stage '${stage.name}' (segment${stage.segments.length > 1 ? 's' : ''} `
  + `${stage.segments.join(', ')} on server '${stage.host}')`;

/**
 * The URL and key of each server stage.
 * @returns {Array<{url: string, key: string|undefined}>} in the order of `stages`
 * @throws {SplitDeviceError} a stage without a URL, an unknown `servers` key, or
 *   `serverUrl` for a split with several server stages
 */
export function stageServers(stages, { serverUrl, servers, key }) {
  if (servers !== undefined && (servers === null || typeof servers !== 'object')) {
    throw new SplitDeviceError('servers must be an object {<stage name or host>: url}');
  }
  const given = servers ?? {};
  const known = new Set(stages.flatMap((s) => [s.name, s.host]));
  const unknown = Object.keys(given).filter((name) => !known.has(name));
  if (unknown.length) {
    throw new SplitDeviceError(`servers names ${unknown.map((n) => `'${n}'`).join(', ')}, which `
      + `${unknown.length > 1 ? 'are' : 'is'} neither a server stage nor a host of this split; its `
      + `server stages: ${stages.map(describe).join('; ')}`);
  }
  if (stages.length > 1 && serverUrl) {
    throw new SplitDeviceError(`The split has ${stages.length} server stages `
      + `(${stages.map(describe).join('; ')}): serverUrl cannot say which it is. Pass servers: `
      + `{${stages.map((s) => `${s.name}: url`).join(', ')}} instead.`);
  }
  return stages.map((stage) => {
    let entry = given[stage.name] ?? given[stage.host] ?? (stages.length === 1 ? serverUrl : null);
    if (typeof entry === 'string') entry = { url: entry };
    if (!entry || typeof entry.url !== 'string' || !entry.url) {
      const hint = stages.length === 1 ? 'pass serverUrl (or servers: '
        + `{${stage.name}: url})` : `pass servers: {${stages.map((s) => `${s.name}: url`)
        .join(', ')}}`;
      throw new SplitDeviceError(`No server URL for ${describe(stage)}: ${hint}, the URL of `
        + `the server that runs segment '${stage.segments[0]}'.`);
    }
    return { url: entry.url, key: entry.key ?? key };
  });
}

function sameSpecs(served, expected) {
  if (!Array.isArray(served) || served.length === 0) return true; // not described: not checked
  const byName = new Map(served.map((s) => [s?.name, s]));
  return byName.size === expected.length && expected.every((spec) => {
    const other = byName.get(spec.name);
    return other && other.dtype === spec.dtype
      && JSON.stringify(other.shape) === JSON.stringify(spec.shape);
  });
}

const specList = (specs) => `[${specs.map((s) => s?.name).join(', ')}]`;

export class StageSessions {
  /**
   * @param {object[]} stages the server stages of the topology, in order
   * @param {object} options SplitSession options (serverUrl and key come from `servers`)
   */
  constructor(stages, { serverUrl, servers, key, ...options }) {
    this.stages = stages;
    this.servers = stageServers(stages, { serverUrl, servers, key });
    this.sessions = this.servers.map(({ url, key: stageKey }) => new SplitSession({
      ...options, serverUrl: url, key: stageKey }));
    this.byStage = new Map(stages.map((stage, i) => [stage.name, this.sessions[i]]));
    this.maxBatch = undefined;
  }

  /** The session of a server stage (by its name). */
  get(stageName) {
    return this.byStage.get(stageName);
  }

  /** Every stage has a session open. */
  get isOpen() {
    return this.sessions.every((s) => s.info);
  }

  /**
   * Open a session on each server stage (`onlyClosed`: those without one) and check that
   * each serves its stage; on any failure the sessions this call opened are closed.
   * @returns {Promise<object[]>} the servers' session descriptions, in stage order
   */
  async open({ onlyClosed = false } = {}) {
    const opened = [];
    try {
      for (const [i, session] of this.sessions.entries()) {
        if (onlyClosed && session.info) continue;
        const info = await session.open();
        opened.push(session);
        this.check(this.stages[i], this.servers[i].url, info);
      }
    } catch (error) {
      for (const session of opened) {
        try {
          await session.close();
        } catch {
          // best effort: the first error is the one to report
        }
      }
      throw error;
    }
    const limits = this.sessions.map((s) => s.info.max_batch).filter((m) => m > 0);
    this.maxBatch = limits.length ? Math.min(...limits) : undefined;
    return this.sessions.map((s) => s.info);
  }

  check(stage, url, info) {
    const where = this.stages.length > 1 ? ` of stage '${stage.name}' (${url})` : '';
    if (info.segment !== stage.segments[0] || info.mode !== stage.mode) {
      throw new SplitDeviceError(`The server${where} serves segment '${info.segment}' in mode `
        + `'${info.mode}', this device's split needs '${stage.segments[0]}' in mode `
        + `'${stage.mode}'. Serve the split folder this app bundle was exported from.`);
    }
    for (const side of ['inputs', 'outputs']) {
      if (!sameSpecs(info[side], stage[side])) {
        throw new SplitDeviceError(`The server${where} takes ${side} ${specList(info[side])}, `
          + `this device's split has ${describe(stage)} with ${side} ${specList(stage[side])} `
          + '(or other shapes or dtypes). Serve the split folder this app bundle was exported from.');
      }
    }
  }

  /** Close every open session (all are tried; the first failure is thrown). */
  async close() {
    let failure = null;
    for (const session of this.sessions) {
      try {
        await session.close();
      } catch (error) {
        failure ??= error;
      }
    }
    if (failure) throw failure;
  }

  /** Bytes, requests, retries and recoveries, summed over the stages. */
  get stats() {
    const total = { bytesSent: 0, bytesReceived: 0, requests: 0, retries: 0, recoveries: 0 };
    for (const session of this.sessions) {
      for (const [name, value] of Object.entries(session.stats)) total[name] = (total[name] ?? 0) + value;
    }
    return total;
  }

  /** The same counters for each stage, by stage name. */
  get stageStats() {
    return Object.fromEntries(this.stages.map((stage, i) => [stage.name,
      { ...this.sessions[i].stats }]));
  }
}
