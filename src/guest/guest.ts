/**
 * The simulated guest's program, independent of where it runs: enumerate PCI, bring up the
 * storage devices a request names — virtio-blk or virtio-scsi, told apart by their PCI device id —
 * run fio-like jobs on all of them at once, and report: the fio report plus the virtio numbers
 * (driver kicks and suppressed kicks, interrupts taken, exits), per run, per device and in total.
 *
 * **Requests.** A {@linkcode GuestRequest} is one run (`args` or `jobFile`, on `device`) or several
 * (`runs: [...]`, each with its own device, jobs, driver options and — for virtio-scsi — LUN).
 * Every device is initialised once, however many runs use it, with one request queue per job clone
 * of all its runs (capped by the device; `driver.queues` overrides). All runs go into one workload
 * engine loop on the one vCPU: each clone keeps its own iodepth on its own target, and when nothing
 * can move the engine waits on one target — the guest halts, and every device's interrupts are
 * taken when it wakes.
 *
 * **Numbers.** Queue counters are taken as differences over the run (the SCSI scan's commands are
 * not in them; `largestBatch` is since setup). Exits are the VMM's counters over the run, and per
 * device the exits its own config, MMIO and doorbell accesses caused (see `device_exits.ts`).
 *
 * Where it runs is the {@linkcode GuestEnv}: in the vCPU Worker (`vcpu.ts`) the bus is the exit
 * bus, `vcpu` the shared interrupt words and `idle` a halt; in a single-thread test the bus is
 * the VMM's `PciBus` and `idle` runs the device back-ends.
 *
 * @module
 */

import type { GuestBus } from "../virtio/bus.ts";
import { VIRTIO_ID_BLOCK, VIRTIO_ID_SCSI } from "../virtio/features.ts";
import type { VcpuInterrupts } from "../virtio/interrupts.ts";
import type { GuestMemory } from "../virtio/memory.ts";
import type { QueueStats } from "../virtio/queue.ts";
import { GuestAllocator } from "./alloc.ts";
import { BlkDriver, type BlkDriverOptions, type BlkQueueStats } from "./blk_driver.ts";
import type { BlockTarget } from "./block_target.ts";
import { DeviceExitBus, exitDelta } from "./device_exits.ts";
import { GuestInterrupts } from "./irq.ts";
import { JobError, type JobSpec, parseJobArgs, parseJobFile } from "./job.ts";
import { EMPTY_LATENCY } from "./latency.ts";
import { RunControl } from "./run_control.ts";
import { type PciFunctionInfo, scanBus, virtioDeviceId } from "./pci_probe.ts";
import {
  type DeviceReport,
  type ExitNumbers,
  formatMultiReport,
  formatReport,
  multiReportJson,
  type QueueNumbers,
  type ReportJson,
  reportJson,
  type RunReport,
  summarizeVirtio,
  type VirtioNumbers,
  type VirtioSummary,
} from "./report.ts";
import {
  type ScsiAddress,
  ScsiDriver,
  type ScsiDriverOptions,
  type ScsiEventStats,
  type ScsiLun,
} from "./scsi_driver.ts";
import { type GuestPlatform, haltIdle, type IdleFn } from "./virtio_driver.ts";
import { runWorkload, type WorkloadResult, type WorkloadTotal } from "./workload.ts";
import { type EmulatedDisk, type EmulatedDiskCounters, openEmulatedDisk } from "./emulated_disk.ts";

/** A device as the firmware describes it (the machine's `BootDevice`). */
export interface GuestDevice {
  /** The device's id in the machine configuration. */
  readonly id: string;
  /** Its device type (`virtio-blk`, `virtio-scsi`). */
  readonly type: string;
  /** Its PCI slot on bus 0. */
  readonly slot: number;
  /** An emulated disk's place on its controller (IDE: its channel); absent for virtio devices. */
  readonly unit?: number;
  /** An emulated disk's device options (IDE: `mode`); absent for virtio devices. */
  readonly options?: Readonly<Record<string, unknown>>;
}

/** Device types the guest drives through a fully emulated controller. */
const EMULATED_KINDS = new Set(["ide-hd", "ahci"]);

/** Where the guest runs. */
export interface GuestEnv {
  /** Config and MMIO accesses: the exit bus in a vCPU Worker, the VMM's `PciBus` in one thread. */
  readonly bus: GuestBus;
  /** Guest RAM. */
  readonly mem: GuestMemory;
  /** The vCPU's interrupt inputs (MSI-X vectors and INTx). */
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

/**
 * Front-end options of a run's device: virtio-blk's and virtio-scsi's (each driver reads its own;
 * `queues` defaults to one per job clone on the device).
 */
export type GuestDriverOptions = BlkDriverOptions & ScsiDriverOptions;

/** One run: jobs on one device (for virtio-scsi, on one LUN). Structured-cloneable. */
export interface GuestRun {
  /** fio-style options: `["--name=a", "--rw=randread", "--bs=4k", …]`. */
  readonly args?: readonly string[];
  /** A job file's text (JSON or fio INI), when `args` is absent. */
  readonly jobFile?: string;
  /** Jobs already parsed (e.g. by a CLI that assigned them to disks), instead of args/jobFile. */
  readonly jobs?: readonly JobSpec[];
  /** The disk's name in the report (e.g. its drive id); default: the device label. */
  readonly name?: string;
  /**
   * The device: a firmware device id or a PCI slot (default: the first virtio-blk or virtio-scsi
   * function in slot order).
   */
  readonly device?: string | number;
  /**
   * Front-end options of the device. When several runs share a device, the first of them that
   * gives `driver` sets them.
   */
  readonly driver?: GuestDriverOptions;
  /** virtio-scsi only: the LUN (default: the first disk found, by target then LUN). */
  readonly lun?: ScsiAddress;
}

/**
 * What to run (structured-cloneable: a vCPU Worker's payload): one run given inline
 * (`{ args, device }`), or several at once (`{ runs: [{ device: "d0", args }, { device: "s0",
 * lun: { target: 0, lun: 0 }, args }] }`) — not both.
 */
export interface GuestRequest extends GuestRun {
  /** Runs executed concurrently; the report then has a section per run and per device. */
  readonly runs?: readonly GuestRun[];
  /**
   * A {@linkcode RunControl}'s buffer: the host may ask the guest to stop early, and the guest
   * publishes its progress there.
   */
  readonly control?: SharedArrayBuffer;
  /** Sample each job's progress this often (ms) into `result.timeline`; default 50. */
  readonly sampleMs?: number;
}

/** A disk behind a virtio-scsi device. */
export interface GuestLunInfo {
  /** SCSI target number. */
  readonly target: number;
  /** Logical unit number. */
  readonly lun: number;
  /** Bytes of the disk (READ CAPACITY). */
  readonly capacity: number;
  /** Logical block size in bytes. */
  readonly blockSize: number;
  /** Write-protected (MODE SENSE's WP bit). */
  readonly readOnly: boolean;
  /** INQUIRY vendor identification. */
  readonly vendor: string;
  /** INQUIRY product identification. */
  readonly product: string;
}

/** What the guest set up on one device. */
export interface GuestDeviceInfo {
  /** PCI slot on bus 0. */
  readonly slot: number;
  /** The firmware device id, or `slot N`. */
  readonly label: string;
  /** Which driver brought it up. */
  readonly kind: GuestDeviceKind;
  /** Negotiated features, hex. */
  readonly features: string;
  /** Request queues set up. */
  readonly queues: number;
  /** How its interrupts arrive (`msix-per-queue`, `msix-shared`, `intx`; `none` before setup). */
  readonly interruptMode: string;
  /** virtio-blk: the disk's bytes; virtio-scsi: the first run's LUN's (0 without one). */
  readonly capacity: number;
  /** Logical block size in bytes of the disk (or the first run's LUN). */
  readonly blockSize: number;
  /** virtio-scsi: the disks the scan (and events) found, at the end of the run. */
  readonly luns?: readonly GuestLunInfo[];
  /** virtio-scsi: event queue counters. */
  readonly events?: ScsiEventStats;
}

/** One run's results. */
export interface GuestRunSection extends RunReport {
  /** Index in the request's runs (0 for an inline run). */
  readonly index: number;
  /** Bytes of the device (or LUN) the run used. */
  readonly capacity: number;
  /** Logical block size in bytes of the device (or LUN). */
  readonly blockSize: number;
}

/** One device's results: what was set up, and its virtio numbers over the run. */
export interface GuestDeviceSection extends GuestDeviceInfo {
  /** Its request queues (differences over the run) and the exits its accesses caused. */
  readonly virtio: VirtioNumbers;
  /** Per-request figures of those numbers (kicks, interrupts, exits per request). */
  readonly summary: VirtioSummary;
}

/** What a request produced (structured-cloneable). */
export interface GuestRunResult {
  /** Every clone of every run, and the grand total (`result.groups`: per run). */
  readonly result: WorkloadResult;
  /** Every device's request queues, and the VMM's exits over the run. */
  readonly virtio: VirtioNumbers;
  /** The fio-like text report (sectioned per run and device for a `runs` request). */
  readonly report: string;
  /** The report as JSON (what `--output-format=json` builds on). */
  readonly json: ReportJson;
  /** The first run's device (the only one for an inline run). */
  readonly device: GuestDeviceInfo;
  /** Per run, in request order. */
  readonly runs: readonly GuestRunSection[];
  /** Per device, in slot order. */
  readonly devices: readonly GuestDeviceSection[];
}

/** Slots and problems found while looking for the devices, or a request that makes no sense. */
export class GuestSetupError extends Error {
  /** Always `GuestSetupError`. */
  override readonly name = "GuestSetupError";
}

/** The driver that brings a device up: virtio's, or an emulated controller's (IDE, AHCI). */
export type GuestDeviceKind = "virtio-blk" | "virtio-scsi" | "ide-hd" | "ahci";
type Kind = GuestDeviceKind;

/** A device brought up for the request. */
interface Device {
  readonly fn: PciFunctionInfo;
  readonly kind: Kind;
  readonly label: string;
  readonly blk: BlkDriver | null;
  readonly scsi: ScsiDriver | null;
  readonly emu: EmulatedDisk | null;
  /** Clones opened on it so far, to spread them over its queues. */
  clones: number;
}

/** A run resolved: its jobs, its device (slot and, for an emulated disk, unit), its LUN. */
interface Plan {
  readonly index: number;
  readonly jobs: JobSpec[];
  readonly fn: PciFunctionInfo;
  readonly kind: Kind;
  /** The emulated disk's firmware entry (IDE unit, options); null for virtio. */
  readonly disk: GuestDevice | null;
  readonly run: GuestRun;
  device: Device | null;
  lun: ScsiLun | null;
}

/** Which device a plan brings up: virtio devices by slot, emulated disks by slot and unit. */
function deviceKey(p: Plan): string {
  return p.disk === null ? `${p.fn.slot}` : `${p.fn.slot}/${p.disk.unit ?? 0}`;
}

const INLINE_FIELDS = ["args", "jobFile", "jobs", "name", "device", "driver", "lun"] as const;

/**
 * Runs a request in the guest: enumerate, bring up each named device, run every run's jobs at
 * once, reset the devices, report.
 *
 * @throws {JobError} for bad job options (naming the field, prefixed `runs[i].` in a `runs` request)
 * @throws {GuestSetupError} when a device or LUN is not found, or the request is malformed
 * @throws {VirtioDriverError} when a device fails during init or the run
 */
export async function runGuest(env: GuestEnv, request: GuestRequest): Promise<GuestRunResult> {
  const multi = request.runs !== undefined;
  const runs = checkRuns(request);
  const control = request.control === undefined ? null : new RunControl(request.control);
  const plans: Plan[] = [];
  const scan = scanBus(env.bus, env.mmioWindow === undefined ? {} : { mmioWindow: env.mmioWindow });
  for (const [index, run] of runs.entries()) {
    const jobs = prefixed(multi, index, () => jobsOf(run));
    const disk = findEmulated(env, run.device);
    const fn = disk === null
      ? findDevice(env, scan.functions, scan.errors, run.device, multi ? index : null)
      : findEmulatedFunction(scan.functions, scan.errors, disk, multi ? index : null);
    const kind: Kind = disk !== null
      ? disk.type as Kind
      : virtioDeviceId(fn) === VIRTIO_ID_SCSI
      ? "virtio-scsi"
      : "virtio-blk";
    if (run.lun !== undefined && kind !== "virtio-scsi") {
      throw new GuestSetupError(
        `${where(multi, index)}lun is for virtio-scsi; slot ${fn.slot} is ${kind}`,
      );
    }
    plans.push({ index, jobs, fn, kind, disk, run, device: null, lun: null });
  }

  const exitBus = new DeviceExitBus(env.bus, env.exitCounters);
  const platform: GuestPlatform = {
    bus: exitBus,
    mem: env.mem,
    interrupts: new GuestInterrupts(env.vcpu),
    alloc: new GuestAllocator(env.mem, env.allocRegion ?? defaultAllocRegion(env.mem)),
    idle: env.idle ?? haltIdle(env.vcpu),
  };
  const devices: Device[] = [];
  try {
    // One bring-up per device, in slot order, with a queue per clone of all its runs.
    const keys = [...new Set(plans.map(deviceKey))].sort((a, b) =>
      a.localeCompare(b, "en", { numeric: true })
    );
    for (const key of keys) {
      const mine = plans.filter((p) => deviceKey(p) === key);
      const first = mine[0]!;
      const slot = first.fn.slot;
      const clones = mine.reduce((n, p) => n + p.jobs.reduce((c, j) => c + j.numjobs, 0), 0);
      const options: GuestDriverOptions = {
        queues: clones,
        ...mine.find((p) => p.run.driver !== undefined)?.run.driver,
      };
      const label = first.disk?.id ?? env.devices?.find((d) => d.slot === slot)?.id ??
        `slot ${slot}`;
      const device: Device = {
        fn: first.fn,
        kind: first.kind,
        label,
        blk: null,
        scsi: null,
        emu: null,
        clones: 0,
      };
      if (first.disk !== null) {
        if (clones > 1) {
          throw new GuestSetupError(
            `${label} (${first.kind}) takes one job clone: its controller runs one queue ` +
              `(got ${clones})`,
          );
        }
        const depth = Math.max(...mine.flatMap((p) => p.jobs.map((j) => j.iodepth)));
        const emu = await openEmulatedDisk(platform, first.fn, first.disk, { depth });
        devices.push({ ...device, emu });
        exitBus.watchEmulated(first.fn, emu.ports);
      } else if (first.kind === "virtio-scsi") {
        const scsi = await ScsiDriver.init(platform, first.fn, options);
        devices.push({ ...device, scsi });
        exitBus.watch(first.fn, scsi.virtio.structures);
      } else {
        const blk = BlkDriver.init(platform, first.fn, options);
        devices.push({ ...device, blk });
        exitBus.watch(first.fn, blk.virtio.structures);
      }
      for (const p of mine) p.device = devices.at(-1)!;
    }
    for (const p of plans) p.lun = p.kind === "virtio-scsi" ? pickLun(p, multi) : null;

    // All runs' jobs in one engine; job j belongs to run jobRun[j].
    const jobs: JobSpec[] = [];
    const jobRun: number[] = [];
    for (const p of plans) {
      for (const j of p.jobs) {
        jobs.push(j);
        jobRun.push(p.index);
      }
    }
    const closers = new Map<BlockTarget, () => void>();
    let opening = 0;
    const statsBefore = devices.map(queueStatsOf);
    const exitsBefore = env.exitCounters?.();
    const deviceExitsBefore = devices.map((d) => exitBus.exitsOf(d.fn.slot));
    const emuBefore = devices.map((d) => d.emu?.counters() ?? null);
    let result: WorkloadResult;
    try {
      result = await runWorkload(jobs, {
        openTarget: (job, jobIndex) => {
          opening = jobIndex;
          const plan = plans[jobRun[jobIndex]!]!;
          const target = openFor(plan, job);
          closers.set(target, () => target.close());
          return target;
        },
        closeTarget: (target) => {
          closers.get(target)?.();
          closers.delete(target);
        },
        groupOf: (jobIndex) => jobRun[jobIndex]!,
        sampleMs: request.sampleMs ?? 50,
        ...(control === null ? {} : {
          shouldStop: () => control.stopped,
          onSample: (ops: number, bytes: number) => control.publish(ops, bytes),
        }),
      });
    } catch (error) {
      // A job that does not fit its target: say which run it belongs to.
      throw prefixError(multi, jobRun[opening] ?? 0, error);
    }
    const exitsAfter = env.exitCounters?.();

    const sections: GuestDeviceSection[] = devices.map((d, i) => {
      const queues = d.emu !== null
        ? [emulatedQueueNumbers(d, emuBefore[i]!, d.emu.counters())]
        : queueNumbers(d, statsBefore[i]!, queueStatsOf(d));
      const before = deviceExitsBefore[i];
      const after = exitBus.exitsOf(d.fn.slot);
      let exits: ExitNumbers | undefined;
      if (before !== null && before !== undefined && after !== null) {
        const delta = exitDelta(before, after);
        // ioeventfd rings only where the global counters know them (the exit bus's).
        exits = exitsAfter?.ioeventfd === undefined
          ? {
            config: delta.config,
            mmio: delta.mmio,
            ...(delta.pio === undefined ? {} : { pio: delta.pio }),
            doorbell: delta.doorbell,
          }
          : delta;
      }
      const virtio: VirtioNumbers = exits === undefined ? { queues } : { queues, exits };
      return { ...deviceInfo(d, plans), virtio, summary: summarizeVirtio(virtio) };
    });
    for (const d of devices) {
      const virtio = d.blk?.virtio ?? d.scsi?.virtio;
      for (const q of virtio?.queues ?? []) {
        env.reportQueueStats?.(d.fn.slot, q.index, q.ring.stats);
      }
    }
    const allQueues = sections.flatMap((s) => s.virtio.queues);
    const virtio: VirtioNumbers = exitsBefore !== undefined && exitsAfter !== undefined
      ? { queues: allQueues, exits: exitDelta(exitsBefore, exitsAfter) }
      : { queues: allQueues };
    const runSections: GuestRunSection[] = plans.map((p) => {
      const group = result.groups?.find((g) => g.group === p.index);
      const lun = p.lun === null ? null : { target: p.lun.target, lun: p.lun.lun };
      return {
        index: p.index,
        disk: p.run.name ?? null,
        device: p.device!.label,
        kind: p.kind,
        slot: p.fn.slot,
        lun,
        capacity: p.lun?.capacity ?? p.device!.blk?.capacityBytes ??
          p.device!.emu?.target.capacity ?? 0,
        blockSize: p.lun?.blockSize ?? p.device!.blk?.blockSize ??
          p.device!.emu?.target.blockSize ?? 512,
        jobs: group?.jobs ?? [],
        total: group?.total ?? emptyTotal(),
      };
    });
    const deviceReports: DeviceReport[] = sections.map((s) => ({
      device: s.label,
      kind: s.kind,
      slot: s.slot,
      virtio: s.virtio,
    }));
    const multiReport = { runs: runSections, devices: deviceReports, result, virtio };
    return {
      result,
      virtio,
      report: multi ? formatMultiReport(multiReport) : formatReport(result, virtio),
      json: multi ? multiReportJson(multiReport) : reportJson(result, virtio),
      device: stripSection(sections.find((s) => s.slot === plans[0]!.fn.slot)!, plans[0]!),
      runs: runSections,
      devices: sections,
    };
  } finally {
    for (const d of devices) {
      d.blk?.shutdown();
      d.scsi?.shutdown();
      d.emu?.shutdown();
    }
  }
}

/** The runs of a request: `runs`, or the inline one. */
function checkRuns(request: GuestRequest): readonly GuestRun[] {
  if (request.runs === undefined) return [request];
  const inline = INLINE_FIELDS.filter((f) => request[f] !== undefined);
  if (inline.length > 0) {
    throw new GuestSetupError(
      `Give either runs or ${inline.join(", ")} for one run, not both`,
    );
  }
  if (request.runs.length === 0) throw new GuestSetupError("runs is empty");
  return request.runs;
}

function where(multi: boolean, index: number): string {
  return multi ? `runs[${index}]: ` : "";
}

function prefixError(multi: boolean, index: number, error: unknown): unknown {
  if (!multi || !(error instanceof JobError)) return error;
  return new JobError(
    error.issues.map((i) => ({ path: `runs[${index}].${i.path}`, message: i.message })),
  );
}

function prefixed<T>(multi: boolean, index: number, fn: () => T): T {
  try {
    return fn();
  } catch (error) {
    throw prefixError(multi, index, error);
  }
}

function jobsOf(run: GuestRun): JobSpec[] {
  if (run.jobs !== undefined) return [...run.jobs];
  if (run.args !== undefined) return parseJobArgs(run.args);
  if (run.jobFile !== undefined) return parseJobFile(run.jobFile);
  throw new GuestSetupError("The request has neither args nor a jobFile");
}

function findDevice(
  env: GuestEnv,
  functions: readonly PciFunctionInfo[],
  errors: readonly Error[],
  device: string | number | undefined,
  runIndex: number | null,
): PciFunctionInfo {
  const prefix = runIndex === null ? "" : `runs[${runIndex}]: `;
  let slot: number | undefined;
  if (typeof device === "number") slot = device;
  else if (typeof device === "string") {
    slot = env.devices?.find((d) => d.id === device)?.slot;
    if (slot === undefined) {
      throw new GuestSetupError(`${prefix}No device "${device}" in the firmware's list`);
    }
  }
  const fn = functions.find((f) => {
    const id = virtioDeviceId(f);
    return (id === VIRTIO_ID_BLOCK || id === VIRTIO_ID_SCSI) &&
      (slot === undefined || f.slot === slot);
  });
  if (fn === undefined) {
    const broken = errors.map((e) => e.message).join("; ");
    const at = slot === undefined ? "on bus 0" : `in slot ${slot}`;
    throw new GuestSetupError(
      `${prefix}No usable virtio-blk or virtio-scsi device ${at}${broken ? ` (${broken})` : ""}`,
    );
  }
  return fn;
}

/** The emulated disk a run names by id, or null (virtio devices, or no device named). */
function findEmulated(env: GuestEnv, device: string | number | undefined): GuestDevice | null {
  if (typeof device !== "string") return null;
  const d = env.devices?.find((x) => x.id === device);
  return d !== undefined && EMULATED_KINDS.has(d.type) ? d : null;
}

/** The PCI function of an emulated disk's controller, checked to be what its type says. */
function findEmulatedFunction(
  functions: readonly PciFunctionInfo[],
  errors: readonly Error[],
  disk: GuestDevice,
  runIndex: number | null,
): PciFunctionInfo {
  const prefix = runIndex === null ? "" : `runs[${runIndex}]: `;
  const fn = functions.find((f) => f.slot === disk.slot);
  // IDE: mass storage (0x01), IDE (0x01); AHCI: mass storage, SATA (0x06).
  const subclass = disk.type === "ide-hd" ? 0x01 : 0x06;
  if (fn === undefined || fn.classCode >> 8 !== 0x01 || (fn.classCode & 0xff) !== subclass) {
    const broken = errors.map((e) => e.message).join("; ");
    throw new GuestSetupError(
      `${prefix}No ${disk.type} controller in slot ${disk.slot}${broken ? ` (${broken})` : ""}`,
    );
  }
  return fn;
}

function pickLun(plan: Plan, multi: boolean): ScsiLun {
  const scsi = plan.device!.scsi!;
  const want = plan.run.lun;
  const lun = want === undefined ? scsi.luns[0] : scsi.findLun(want.target, want.lun);
  if (lun === undefined) {
    const found = scsi.luns.map((l) => `${l.target}:${l.lun}`).join(", ") || "none";
    const what = want === undefined
      ? "no disk"
      : `no disk at target ${want.target} LUN ${want.lun}`;
    throw new GuestSetupError(
      `${where(multi, plan.index)}${plan.device!.label} has ${what} (found: ${found})`,
    );
  }
  return lun;
}

/** The target clone of `job` runs on: the next queue of its device (round robin over clones). */
function openFor(plan: Plan, job: JobSpec): BlockTarget & { close(): void } {
  const d = plan.device!;
  if (d.emu !== null) {
    d.clones++;
    return d.emu.target;
  }
  const trims = job.rw === "trim" || job.rw === "randtrim";
  const queue = d.clones++;
  if (d.blk !== null) {
    // A trim moves no data: its buffer only has to exist. A bs beyond what the device takes
    // opens a smaller target, and the engine names the field.
    const limit = Math.min(d.blk.maxTransferLimit, trims ? 4096 : Infinity);
    return d.blk.openTarget({
      queue: queue % d.blk.numQueues,
      depth: job.iodepth,
      maxTransfer: Math.min(job.bs, Math.floor(limit / 512) * 512),
    });
  }
  const scsi = d.scsi!;
  const lun = plan.lun!;
  const bs = lun.blockSize;
  const limit = Math.min(scsi.maxTransferFor(lun), trims ? Math.max(4096, bs) : Infinity);
  return scsi.openTarget({
    lun,
    queue: queue % scsi.numQueues,
    depth: job.iodepth,
    maxTransfer: Math.max(bs, Math.min(Math.floor(job.bs / bs) * bs, Math.floor(limit / bs) * bs)),
  });
}

function queueStatsOf(d: Device): BlkQueueStats[] {
  return d.blk?.stats() ?? d.scsi?.stats() ?? [];
}

/** An emulated disk's one queue over the run, in the terms of a virtqueue's numbers. */
function emulatedQueueNumbers(
  d: Device,
  before: EmulatedDiskCounters,
  after: EmulatedDiskCounters,
): QueueNumbers {
  return {
    device: d.label,
    queue: 0,
    requests: after.completions - before.completions,
    kicks: after.notifications - before.notifications,
    suppressedKicks: 0,
    interrupts: after.interrupts - before.interrupts,
    largestBatch: after.largestBatch,
  };
}

/** Request queue counters over the run (largest batch: since setup, it is a maximum). */
function queueNumbers(d: Device, before: BlkQueueStats[], after: BlkQueueStats[]): QueueNumbers[] {
  return after.map((a, i) => {
    const b = before[i]!;
    return {
      device: d.label,
      queue: a.queue,
      requests: a.completions - b.completions,
      kicks: a.kicks - b.kicks,
      suppressedKicks: a.suppressedKicks - b.suppressedKicks,
      interrupts: a.interrupts - b.interrupts,
      largestBatch: a.largestBatch,
    };
  });
}

function deviceInfo(d: Device, plans: readonly Plan[]): GuestDeviceInfo {
  if (d.emu !== null) {
    return {
      slot: d.fn.slot,
      label: d.label,
      kind: d.kind,
      features: "0x0",
      interruptMode: d.emu.interruptMode,
      queues: 1,
      capacity: d.emu.target.capacity,
      blockSize: d.emu.target.blockSize,
    };
  }
  const virtio = d.blk?.virtio ?? d.scsi!.virtio;
  const base = {
    slot: d.fn.slot,
    label: d.label,
    kind: d.kind,
    features: `0x${virtio.features.toString(16)}`,
    interruptMode: virtio.interruptMode ?? "none",
  };
  if (d.blk !== null) {
    return {
      ...base,
      queues: d.blk.numQueues,
      capacity: d.blk.capacityBytes,
      blockSize: d.blk.blockSize,
    };
  }
  const scsi = d.scsi!;
  const lun = plans.find((p) => p.device === d)?.lun ?? null;
  return {
    ...base,
    queues: scsi.numQueues,
    capacity: lun?.capacity ?? 0,
    blockSize: lun?.blockSize ?? 512,
    luns: scsi.luns.map((l) => ({
      target: l.target,
      lun: l.lun,
      capacity: l.capacity,
      blockSize: l.blockSize,
      readOnly: l.readOnly,
      vendor: l.vendor,
      product: l.product,
    })),
    events: { ...scsi.eventStats },
  };
}

/** The device info of the first run (its LUN's size for virtio-scsi), without the numbers. */
function stripSection(s: GuestDeviceSection, plan: Plan): GuestDeviceInfo {
  const { virtio: _virtio, summary: _summary, ...info } = s;
  if (plan.lun === null) return info;
  return { ...info, capacity: plan.lun.capacity, blockSize: plan.lun.blockSize };
}

function emptyTotal(): WorkloadTotal {
  const none = {
    ops: 0,
    bytes: 0,
    errors: 0,
    iops: 0,
    bandwidth: 0,
    latency: EMPTY_LATENCY,
  };
  return { elapsedMs: 0, read: none, write: none, trim: none };
}

/** The largest RAM region minus its first MiB (left to firmware-like use, as on a PC). */
function defaultAllocRegion(mem: GuestMemory): { gpa: number; size: number } {
  let best = mem.regions[0]!;
  for (const r of mem.regions) if (r.size > best.size) best = r;
  const skip = best.gpa === 0 && best.size > 2 * 1024 * 1024 ? 1024 * 1024 : 0;
  return { gpa: best.gpa + skip, size: best.size - skip };
}
