/**
 * One simulated-VM run for the CLI: boot a machine, run a guest request in its vCPU, shut it
 * down (images flushed and closed); meanwhile sample the devices' notification counters into a
 * timeline, feed the live progress line, and pass a stop request (Ctrl-C) to the guest.
 *
 * @module
 */
import { cpuUsage } from "node:process";
import type { GuestRequest, GuestRunResult } from "../guest/guest.ts";
import { RunControl } from "../guest/run_control.ts";
import { Machine, type MachineStats } from "../machine/machine.ts";
import type { MachineConfigInput } from "../machine/config.ts";
import type { CliIo } from "./cli_io.ts";

const VCPU = new URL("../guest/vcpu.ts", import.meta.url);

/** One queue's cumulative counters at each sample of a {@linkcode HostTimeline}. */
export interface QueueTimeline {
  readonly device: string;
  readonly queue: number;
  /** Chains the device completed. */
  readonly chains: number[];
  /** Doorbell rings the device saw. */
  readonly kicks: number[];
  /** Interrupts the device raised. */
  readonly interrupts: number[];
  /** Interrupts the driver's suppression saved. */
  readonly suppressedInterrupts: number[];
}

/** The devices' counters over the run, sampled by the VMM. */
export interface HostTimeline {
  /** Sample times, ms since the vCPU started. */
  readonly atMs: number[];
  readonly queues: QueueTimeline[];
}

/** One machine run: what the guest reported and the VMM's counters after it. */
export interface MachineRun {
  readonly run: GuestRunResult;
  readonly stats: MachineStats;
  /** The devices' notification counters over the run. */
  readonly timeline: HostTimeline;
  /** When the vCPU started, ms since the epoch. */
  readonly startedAt: number;
  /**
   * CPU time the whole process spent (every thread: VMM, vCPU, iothreads; user and system) from
   * the vCPU's start to the guest's result, µs.
   */
  readonly cpuMicros: number;
}

/** How a run is watched and steered. */
export interface RunMachineOptions {
  /** Shared with the guest: `stop()` ends the jobs early (they report what they did). */
  readonly control?: RunControl;
  /** Called a few times a second with the guest's progress. */
  readonly onProgress?: (ops: number, bytes: number, elapsedMs: number) => void;
  /** Host sampling interval in ms (default 50). */
  readonly sampleMs?: number;
}

/**
 * The machine stopped on an I/O error (a drive's `werror`/`rerror` `stop`, or `enospc` on
 * ENOSPC): the run ended there, the machine was shut down (images flushed and closed; the held
 * requests were never acknowledged to the guest).
 */
export class VmStoppedError extends Error {
  override readonly name = "VmStoppedError";
  /** Why, as the machine gave it: `io error on drive d0 (write): No space left on device`. */
  readonly reason: string;

  /** @param reason {@linkcode Machine.stopReason} */
  constructor(reason: string) {
    super(`the VM stopped: ${reason}`);
    this.reason = reason;
  }
}

/** How long a whole run may take before it is called stuck. */
const RUN_LIMIT_MS = 15 * 60_000;
/** Samples kept before the timeline halves its resolution. */
const MAX_SAMPLES = 2048;

/** Boots a machine, runs `request` in its vCPU, shuts it down (images flushed and closed). */
export async function runMachine(
  config: MachineConfigInput | unknown,
  request: GuestRequest,
  options: RunMachineOptions = {},
): Promise<MachineRun> {
  const control = options.control ?? new RunControl();
  const machine = await Machine.create(config);
  const timers: Array<ReturnType<typeof setInterval>> = [];
  const timeline: HostTimeline = { atMs: [], queues: [] };
  try {
    const startedAt = Date.now();
    const started = performance.now();
    const cpuBefore = cpuUsage();
    const vcpu = await machine.startVcpu(VCPU, { ...request, control: control.buffer }, {
      timeoutMs: RUN_LIMIT_MS,
    });
    let interval = options.sampleMs ?? 50;
    let nextSample = 0;
    const sample = (force = false) => {
      const now = performance.now() - started;
      if (!force && now < nextSample) return;
      nextSample = now + interval;
      const stats = machine.stats();
      timeline.atMs.push(now);
      let i = 0;
      for (const d of stats.devices) {
        for (const q of d.queues) {
          let t = timeline.queues[i];
          if (t === undefined) {
            t = {
              device: d.id,
              queue: q.index,
              chains: timeline.atMs.slice(1).map(() => 0),
              kicks: timeline.atMs.slice(1).map(() => 0),
              interrupts: timeline.atMs.slice(1).map(() => 0),
              suppressedInterrupts: timeline.atMs.slice(1).map(() => 0),
            };
            timeline.queues[i] = t;
          }
          t.chains.push(q.chains);
          t.kicks.push(q.kicks);
          t.interrupts.push(q.interrupts);
          t.suppressedInterrupts.push(q.suppressedInterrupts);
          i++;
        }
      }
      if (timeline.atMs.length >= MAX_SAMPLES) {
        halve(timeline.atMs);
        for (const q of timeline.queues) {
          halve(q.chains);
          halve(q.kicks);
          halve(q.interrupts);
          halve(q.suppressedInterrupts);
        }
        interval *= 2;
      }
    };
    sample(true);
    timers.push(setInterval(() => sample(), Math.max(10, Math.min(interval, 100))));
    if (options.onProgress !== undefined) {
      const report = options.onProgress;
      timers.push(setInterval(() => {
        const p = control.progress();
        report(p.ops, p.bytes, performance.now() - started);
      }, 250));
    }
    // A device stopped on an I/O error holds the request the guest waits for: end the run.
    const stopped = machine.stopped.then((reason) => Promise.reject(new VmStoppedError(reason)));
    stopped.catch(() => {});
    const run = await Promise.race([vcpu.result, stopped]) as GuestRunResult;
    const cpu = cpuUsage(cpuBefore);
    sample(true);
    await machine.sync();
    return { run, stats: machine.stats(), timeline, startedAt, cpuMicros: cpu.user + cpu.system };
  } finally {
    for (const t of timers) clearInterval(t);
    await machine.shutdown();
  }
}

/** Keep every other sample (the last one included). */
function halve(list: number[]): void {
  const kept = list.filter((_, i) => i % 2 === 1 || i === list.length - 1);
  list.length = 0;
  list.push(...kept);
}

/** A live progress line on a terminal: elapsed time, IOPS and MB/s. */
export function progressLine(io: CliIo, enabled: boolean) {
  let last = 0;
  let prev = { ops: 0, bytes: 0, at: 0 };
  return {
    update(ops: number, bytes: number, elapsedMs: number): void {
      if (!enabled) return;
      const dt = (elapsedMs - prev.at) / 1000;
      const iops = dt > 0 ? Math.round((ops - prev.ops) / dt) : 0;
      const mbs = dt > 0 ? (bytes - prev.bytes) / dt / 1e6 : 0;
      prev = { ops, bytes, at: elapsedMs };
      const text = `  [${(elapsedMs / 1000).toFixed(1)}s] ${iops} IOPS, ${
        mbs.toFixed(1)
      } MB/s, ${ops} requests`;
      io.stderr(`\r${text.padEnd(last)}`);
      last = text.length;
    },
    end(): void {
      if (enabled && last > 0) io.stderr(`\r${" ".repeat(last)}\r`);
      last = 0;
      prev = { ops: 0, bytes: 0, at: 0 };
    },
  };
}

/** True when every job finished without an error or a verify failure. */
export function runSucceeded(run: GuestRunResult): boolean {
  return run.result.jobs.every((j) => j.error === null && (j.verify?.failed ?? 0) === 0);
}
