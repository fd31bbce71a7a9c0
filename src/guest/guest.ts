/**
 * The simulated guest's program, independent of where it runs: enumerate PCI, bring up the
 * virtio-blk device, run fio-like jobs on it (one queue per job clone), and report — the fio
 * report plus the virtio numbers (driver kicks and suppressed kicks, interrupts taken, exits).
 *
 * Where it runs is the {@linkcode GuestEnv}: in the vCPU Worker (`vcpu.ts`) the bus is the exit
 * bus, `vcpu` the shared interrupt words and `idle` a halt; in a single-thread test the bus is
 * the VMM's `PciBus` and `idle` runs the device back-end.
 *
 * @module
 */

import type { GuestBus } from "../virtio/bus.ts";
import type { VcpuInterrupts } from "../virtio/interrupts.ts";
import type { GuestMemory } from "../virtio/memory.ts";
import type { QueueStats } from "../virtio/queue.ts";
import { GuestAllocator } from "./alloc.ts";
import { BlkDriver, type BlkDriverOptions, type BlkTarget } from "./blk_driver.ts";
import type { BlockTarget } from "./block_target.ts";
import { GuestInterrupts } from "./irq.ts";
import { type JobSpec, parseJobArgs, parseJobFile } from "./job.ts";
import { type PciFunctionInfo, scanBus, virtioDeviceId } from "./pci_probe.ts";
import {
  type ExitNumbers,
  formatReport,
  type QueueNumbers,
  type ReportJson,
  reportJson,
  type VirtioNumbers,
} from "./report.ts";
import { haltIdle, type IdleFn } from "./virtio_driver.ts";
import { runWorkload, type WorkloadResult } from "./workload.ts";
import { VIRTIO_ID_BLOCK } from "../virtio/features.ts";

/** A device as the firmware describes it (the machine's `BootDevice`). */
export interface GuestDevice {
  readonly id: string;
  readonly type: string;
  readonly slot: number;
}

/** Where the guest runs. */
export interface GuestEnv {
  readonly bus: GuestBus;
  readonly mem: GuestMemory;
  readonly vcpu: VcpuInterrupts;
  /** The idle step (default: {@linkcode haltIdle} on `vcpu`). */
  readonly idle?: IdleFn;
  /** Devices the firmware described, to name them in the report and select by id. */
  readonly devices?: readonly GuestDevice[];
  /** The exit counters now (the vCPU's exit channel); without it the report has no exit line. */
  readonly exitCounters?: () => ExitNumbers;
  /** Publishes a queue's driver counters to the VMM (the exit bus's `reportQueueStats`). */
  readonly reportQueueStats?: (slot: number, queue: number, stats: Readonly<QueueStats>) => void;
  /** Guest RAM the guest's allocator owns (default: the largest RAM region, minus its first MiB). */
  readonly allocRegion?: { readonly gpa: number; readonly size: number };
  /** The firmware's MMIO window, to check BARs against. */
  readonly mmioWindow?: { readonly base: number; readonly size: number };
}

/** What to run. Structured-cloneable (a vCPU Worker's payload). */
export interface GuestRequest {
  /** fio-style options: `["--name=a", "--rw=randread", "--bs=4k", …]`. */
  readonly args?: readonly string[];
  /** A job file's text (JSON or fio INI), when `args` is absent. */
  readonly jobFile?: string;
  /** The virtio-blk device: a firmware device id or a PCI slot (default: the first one found). */
  readonly device?: string | number;
  /** Front-end options; `queues` defaults to one per job clone (capped by the device). */
  readonly driver?: BlkDriverOptions;
}

/** What a run produced (structured-cloneable). */
export interface GuestRunResult {
  readonly result: WorkloadResult;
  readonly virtio: VirtioNumbers;
  /** The fio-like text report. */
  readonly report: string;
  readonly json: ReportJson;
  readonly device: {
    readonly slot: number;
    readonly label: string;
    /** Negotiated features, hex. */
    readonly features: string;
    readonly queues: number;
    readonly interruptMode: string;
    readonly capacity: number;
    readonly blockSize: number;
  };
}

/** Slots and problems found while looking for the device. */
export class GuestSetupError extends Error {
  override readonly name = "GuestSetupError";
}

/**
 * Runs a request in the guest: enumerate, init virtio-blk, run the jobs, reset the device, report.
 *
 * @throws {JobError} for bad job options (naming the field)
 * @throws {GuestSetupError} when no usable virtio-blk device is found
 * @throws {VirtioDriverError} when the device fails during init or the run
 */
export async function runGuest(env: GuestEnv, request: GuestRequest): Promise<GuestRunResult> {
  const jobs = jobsOf(request);
  const fn = findBlockDevice(env, request.device);
  const label = env.devices?.find((d) => d.slot === fn.slot)?.id ?? `slot ${fn.slot}`;
  const clones = jobs.reduce((n, j) => n + j.numjobs, 0);
  const platform = {
    bus: env.bus,
    mem: env.mem,
    interrupts: new GuestInterrupts(env.vcpu),
    alloc: new GuestAllocator(env.mem, env.allocRegion ?? defaultAllocRegion(env.mem)),
    idle: env.idle ?? haltIdle(env.vcpu),
  };
  const driver = BlkDriver.init(platform, fn, { queues: clones, ...request.driver });
  try {
    let clone = 0;
    const before = env.exitCounters?.();
    const result = await runWorkload(jobs, {
      openTarget: (job) => {
        const trims = job.rw === "trim" || job.rw === "randtrim";
        // A trim moves no data: its buffer only has to exist. A bs beyond what the device takes
        // opens a smaller target, and the engine names the field.
        const limit = Math.min(driver.maxTransferLimit, trims ? 4096 : Infinity);
        return driver.openTarget({
          queue: clone++ % driver.numQueues,
          depth: job.iodepth,
          maxTransfer: Math.min(job.bs, Math.floor(limit / 512) * 512),
        });
      },
      closeTarget: (target: BlockTarget) => (target as BlkTarget).close(),
    });
    const after = env.exitCounters?.();
    const queues: QueueNumbers[] = driver.stats().map((s) => ({
      device: label,
      queue: s.queue,
      requests: s.completions,
      kicks: s.kicks,
      suppressedKicks: s.suppressedKicks,
      interrupts: s.interrupts,
      largestBatch: s.largestBatch,
    }));
    for (const q of driver.virtio.queues) env.reportQueueStats?.(fn.slot, q.index, q.ring.stats);
    const virtio: VirtioNumbers = before !== undefined && after !== undefined
      ? { queues, exits: exitDelta(before, after) }
      : { queues };
    return {
      result,
      virtio,
      report: formatReport(result, virtio),
      json: reportJson(result, virtio),
      device: {
        slot: fn.slot,
        label,
        features: `0x${driver.features.toString(16)}`,
        queues: driver.numQueues,
        interruptMode: driver.virtio.interruptMode ?? "none",
        capacity: driver.capacityBytes,
        blockSize: driver.blockSize,
      },
    };
  } finally {
    driver.shutdown();
  }
}

function jobsOf(request: GuestRequest): JobSpec[] {
  if (request.args !== undefined) return parseJobArgs(request.args);
  if (request.jobFile !== undefined) return parseJobFile(request.jobFile);
  throw new GuestSetupError("The request has neither args nor a jobFile");
}

function findBlockDevice(env: GuestEnv, device: string | number | undefined): PciFunctionInfo {
  const scan = scanBus(env.bus, env.mmioWindow === undefined ? {} : { mmioWindow: env.mmioWindow });
  let slot: number | undefined;
  if (typeof device === "number") slot = device;
  else if (typeof device === "string") {
    slot = env.devices?.find((d) => d.id === device)?.slot;
    if (slot === undefined) {
      throw new GuestSetupError(`No device "${device}" in the firmware's list`);
    }
  }
  const candidates = scan.functions.filter((f) =>
    virtioDeviceId(f) === VIRTIO_ID_BLOCK && (slot === undefined || f.slot === slot)
  );
  const fn = candidates[0];
  if (fn === undefined) {
    const broken = scan.errors.map((e) => e.message).join("; ");
    const where = slot === undefined ? "on bus 0" : `in slot ${slot}`;
    throw new GuestSetupError(
      `No usable virtio-blk device ${where}${broken ? ` (${broken})` : ""}`,
    );
  }
  return fn;
}

/** The largest RAM region minus its first MiB (left to firmware-like use, as on a PC). */
function defaultAllocRegion(mem: GuestMemory): { gpa: number; size: number } {
  let best = mem.regions[0]!;
  for (const r of mem.regions) if (r.size > best.size) best = r;
  const skip = best.gpa === 0 && best.size > 2 * 1024 * 1024 ? 1024 * 1024 : 0;
  return { gpa: best.gpa + skip, size: best.size - skip };
}

function exitDelta(a: ExitNumbers, b: ExitNumbers): ExitNumbers {
  // Counters wrap at 2^32.
  const d = (x: number, y: number) => (y - x) >>> 0;
  return {
    config: d(a.config, b.config),
    mmio: d(a.mmio, b.mmio),
    doorbell: d(a.doorbell, b.doorbell),
    ...(a.ioeventfd !== undefined && b.ioeventfd !== undefined
      ? { ioeventfd: d(a.ioeventfd, b.ioeventfd) }
      : {}),
  };
}
