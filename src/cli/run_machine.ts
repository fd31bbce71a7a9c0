/**
 * One simulated-VM run for the CLI: boot a machine, run a guest request in its vCPU, shut it
 * down; and the live progress line shown meanwhile.
 *
 * @module
 */
import type { GuestRequest, GuestRunResult } from "../guest/guest.ts";
import { Machine, type MachineStats } from "../machine/machine.ts";
import type { MachineConfigInput } from "../machine/config.ts";
import type { CliIo } from "./cli_io.ts";

const VCPU = new URL("../guest/vcpu.ts", import.meta.url);

/** One machine run: what the guest reported and the VMM's counters after it. */
export interface MachineRun {
  readonly run: GuestRunResult;
  readonly stats: MachineStats;
}

/** How long a whole run may take before it is called stuck. */
const RUN_LIMIT_MS = 15 * 60_000;

/**
 * Boots a machine, runs `request` in its vCPU, shuts it down (images flushed and closed).
 * `progress` gets completed requests so far, a few times a second.
 */
export async function runMachine(
  config: MachineConfigInput | unknown,
  request: GuestRequest,
  progress?: (done: number, elapsedMs: number) => void,
): Promise<MachineRun> {
  const machine = await Machine.create(config);
  let timer: ReturnType<typeof setInterval> | undefined;
  try {
    const started = performance.now();
    const vcpu = await machine.startVcpu(VCPU, request, { timeoutMs: RUN_LIMIT_MS });
    if (progress !== undefined) {
      timer = setInterval(() => {
        let done = 0;
        for (const d of machine.stats().devices) for (const q of d.queues) done += q.chains;
        progress(done, performance.now() - started);
      }, 250);
    }
    const run = await vcpu.result as GuestRunResult;
    await machine.sync();
    return { run, stats: machine.stats() };
  } finally {
    if (timer !== undefined) clearInterval(timer);
    await machine.shutdown();
  }
}

/** A live progress line on a terminal: requests done and the rate. */
export function progressLine(io: CliIo, enabled: boolean) {
  let last = 0;
  return {
    update(done: number, elapsedMs: number): void {
      if (!enabled) return;
      const rate = elapsedMs > 0 ? Math.round(done / (elapsedMs / 1000)) : 0;
      const text = `  [${(elapsedMs / 1000).toFixed(1)}s] ${done} requests, ${rate} req/s`;
      io.stderr(`\r${text.padEnd(last)}`);
      last = text.length;
    },
    end(): void {
      if (enabled && last > 0) io.stderr(`\r${" ".repeat(last)}\r`);
    },
  };
}

/** True when every job finished without an error or a verify failure. */
export function runSucceeded(run: GuestRunResult): boolean {
  return run.result.jobs.every((j) => j.error === null && (j.verify?.failed ?? 0) === 0);
}
