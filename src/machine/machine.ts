/**
 * The VMM: guest RAM, PCI bus 0 with one virtio-pci function per configured device, an iothread
 * Worker per device, the vCPU Worker, and the loop serving the vCPU's exits on this thread.
 *
 * ```
 * vCPU Worker ──exit mailbox──▶ VMM thread (this) ── PciBus ── VirtioPciFunction ── model
 *      │  ioeventfd: rings Doorbells directly                      │ activate/reset (control)
 *      ▼                                                          ▼
 *   Doorbells ─────────────────────────────────────────────▶ iothread Worker ── back-end ── drives
 *   VcpuInterrupts ◀──────────────── MSI-X (InterruptState) ──────┘
 * ```
 *
 * @module
 */

import type { BlockNode } from "../block/node.ts";
import type { DeviceSpec, DeviceType } from "../devices/device_type.ts";
import { openDrive } from "../devices/drive.ts";
import {
  type EmulatedController,
  type EmulatedDeviceType,
  isEmulatedType,
} from "../devices/emulated.ts";
import type { DeviceQueueCounters, DeviceThreadCounters } from "../devices/iothread_protocol.ts";
import { PciBus } from "../virtio/bus.ts";
import type { AccessSize } from "../virtio/bus.ts";
import {
  type BootDevice,
  type DoorbellWindow,
  type DriverQueueReport,
  ExitChannel,
  type ExitCounters,
  type ExitHandler,
  ExitServer,
  type VcpuBoot,
} from "../virtio/exits.ts";
import { type InterruptStats, VcpuInterrupts } from "../virtio/interrupts.ts";
import { GuestMemory } from "../virtio/memory.ts";
import {
  VIRTIO_PCI_MODERN_BAR,
  VIRTIO_PCI_NOTIFY_CFG_OFFSET,
  VIRTIO_PCI_NOTIFY_OFF_MULTIPLIER,
  VIRTIO_PCI_REGION_SIZE,
  VirtioPciFunction,
} from "../virtio/pci.ts";
import {
  type ConfigIssue,
  configIssues,
  type DeviceConfig,
  type MachineConfig,
  MachineConfigError,
  MMIO_WINDOW,
  parseMachineConfig,
  ramRegions,
} from "./config.ts";
import { type DeviceFault, DeviceHost } from "./device_host.ts";
import { MachineError } from "./errors.ts";
import { loadDeviceType } from "./registry.ts";
import { VcpuHandle, type VcpuOptions } from "./vcpu_host.ts";

export { MachineError } from "./errors.ts";
export type { DeviceFault } from "./device_host.ts";
export { GuestProgramError, VcpuHandle, type VcpuOptions } from "./vcpu_host.ts";

/** Options of {@linkcode Machine.create} beyond the configuration. */
export interface MachineOptions {
  /** How long an iothread may take to open its drives and start (default 30 s). */
  readonly startTimeoutMs?: number;
  /** µs the exit loop spins for the next exit before sleeping (see `ExitServerOptions`). */
  readonly exitSpinMicros?: number;
}

/** Counters of one queue, gathered from the doorbells, the iothread and the guest's report. */
export interface QueueCounters extends DeviceQueueCounters {
  /** The queue's index on its device. */
  readonly index: number;
  /** Doorbell rings the device saw (ioeventfd and trapped). */
  readonly kicks: number;
  /** Kicks the driver skipped (from the guest's report; 0 if it reported nothing). */
  readonly suppressedKicks: number;
  /** Trapped doorbell writes (exits) of this queue. */
  readonly exits: number;
  /** The driver's own counters, if the guest reported them. */
  readonly driver: DriverQueueReport | null;
}

/** Counters and state of one device. */
export interface DeviceStats {
  /** The device's id in the configuration. */
  readonly id: string;
  /** The device type (`virtio-blk`, `virtio-scsi`, …). */
  readonly type: string;
  /** Its PCI slot on bus 0. */
  readonly slot: number;
  /** `device_status` now. */
  readonly status: number;
  /** Device resets so far. */
  readonly epoch: number;
  /** True when its doorbells are ioeventfds (else trapped exits). */
  readonly ioeventfd: boolean;
  /** Counters per virtqueue. */
  readonly queues: readonly QueueCounters[];
  /** MSI-X/INTx counters of the function. */
  readonly interrupts: InterruptStats;
  /** The iothread's own counters. */
  readonly thread: DeviceThreadCounters;
  /** Recent ring faults the iothread reported. */
  readonly faults: readonly DeviceFault[];
  /** Why the device stopped on a failed request (`werror`/`rerror` `stop`), else null. */
  readonly stopReason: string | null;
}

/** Counters of one fully emulated controller (IDE, AHCI). */
export interface EmulatedStats {
  /** The ids of the configured devices it serves (every `ide-hd` shares one IDE controller). */
  readonly ids: readonly string[];
  /** The device type (`ide-hd`, `ahci`). */
  readonly type: string;
  /** Its PCI slot on bus 0. */
  readonly slot: number;
  /** The controller's own counters (commands, sectors, interrupts, errors …). */
  readonly counters: Readonly<Record<string, number>>;
}

/** Everything {@linkcode Machine.stats} gathers. */
export interface MachineStats {
  /** The vCPU's exits by kind. */
  readonly exits: ExitCounters & {
    /** MMIO and port accesses nothing decoded. */
    readonly unclaimed: number;
  };
  /** Every virtio device, in configuration order. */
  readonly devices: readonly DeviceStats[];
  /** Every emulated controller (IDE, AHCI), in configuration order of their first device. */
  readonly emulated: readonly EmulatedStats[];
}

/** An emulated controller the machine runs on its own thread, with the drives it opened. */
interface EmulatedHost {
  readonly type: EmulatedDeviceType;
  readonly specs: readonly DeviceSpec[];
  readonly drives: readonly BlockNode[];
  readonly controller: EmulatedController;
}

/** What a machine is doing: see {@linkcode Machine.state}. */
export type MachineState = "created" | "running" | "paused" | "shut down";

/**
 * A virtual machine without a CPU model: the VMM side of vstor's storage demo.
 *
 * @example A guest runs a verified fio-like job on a qcow2 disk (needs `-A`: Workers, files, FFI)
 * ```ts
 * import { createImage, GUEST_VCPU_MODULE, type GuestRunResult, Machine } from "../../mod.ts";
 *
 * const image = await Deno.makeTempFile({ suffix: ".qcow2" });
 * await createImage(image, "qcow2", 4 << 20);
 * const machine = await Machine.create({
 *   memoryMiB: 64,
 *   devices: [{ type: "virtio-blk", id: "disk0", drive: { file: image } }],
 * });
 * try {
 *   machine.start();
 *   const vcpu = await machine.startVcpu(GUEST_VCPU_MODULE, {
 *     args: ["--name=w", "--rw=randwrite", "--bs=4k", "--size=1m", "--verify=crc32c"],
 *   });
 *   const run = await vcpu.result as GuestRunResult;
 *   if (run.result.jobs[0]!.verify?.failed !== 0) throw new Error("verified");
 *   if (machine.stats().devices[0]!.thread.drains === 0) throw new Error("the iothread served");
 * } finally {
 *   await machine.shutdown();
 *   await Deno.remove(image);
 * }
 * ```
 */
export class Machine implements ExitHandler {
  /** The validated configuration, defaults applied. */
  readonly config: MachineConfig;
  /** Guest RAM (shared with every Worker). */
  readonly memory: GuestMemory;
  /** PCI bus 0. */
  readonly bus: PciBus = new PciBus();
  /** The vCPU's interrupt inputs. */
  readonly vcpu: VcpuInterrupts = new VcpuInterrupts();
  /**
   * The vCPU's exit channel.
   *
   * @internal
   */
  readonly exits: ExitChannel = new ExitChannel();
  readonly #devices: DeviceHost[] = [];
  readonly #emulated: EmulatedHost[] = [];
  readonly #options: MachineOptions;
  #server: ExitServer | null = null;
  #vcpuHandle: VcpuHandle | null = null;
  #barriers: Promise<void>[] = [];
  #state: MachineState = "created";
  #error: MachineError | null = null;
  #closing: Promise<void> | null = null;
  #stopReason: string | null = null;
  readonly #stopped: Promise<string>;
  #resolveStopped: (reason: string) => void = () => {};

  private constructor(config: MachineConfig, options: MachineOptions) {
    this.config = config;
    this.#options = options;
    this.memory = new GuestMemory(ramRegions(config.memoryMiB));
    this.#stopped = new Promise((resolve) => this.#resolveStopped = resolve);
  }

  /**
   * Builds the machine: validates `config` (and each device's type, drives and options), starts one
   * iothread per device (which opens its drives), plugs the PCI functions and assigns their BARs
   * in the PCI hole, as firmware would.
   *
   * @throws {MachineConfigError} naming each bad field
   * @throws {MachineError} naming the device that failed to start (everything started is stopped)
   */
  static async create(config: unknown, options: MachineOptions = {}): Promise<Machine> {
    const parsed = parseMachineConfig(config);
    const { devices, types } = await resolveDevices(parsed);
    const machine = new Machine({ ...parsed, devices }, options);
    try {
      await machine.#startDevices(types);
    } catch (error) {
      await machine.shutdown().catch(() => {});
      throw error;
    }
    return machine;
  }

  async #startDevices(types: readonly (DeviceType | EmulatedDeviceType)[]): Promise<void> {
    const config = this.config;
    const virtio = config.devices.flatMap((spec, index) => {
      const type = types[index]!;
      return isEmulatedType(type) ? [] : [{ spec, type }];
    });
    const started = await Promise.allSettled(
      virtio.map(({ spec, type }, index) =>
        DeviceHost.start({
          spec,
          type,
          // The doorbell buffers and INTx sources are numbered among the virtio devices.
          index,
          ram: this.memory,
          startTimeoutMs: this.#options.startTimeoutMs ?? 30_000,
          controlTimeoutMs: config.controlTimeoutMs,
          onFatal: (error) => this.#fatal(error),
          onBarrier: (done) => this.#barriers.push(done),
          onStop: (reason) => this.#ioErrorStop(reason),
        })
      ),
    );
    for (const s of started) if (s.status === "fulfilled") this.#devices.push(s.value);
    const failed = started.find((s) => s.status === "rejected");
    if (failed !== undefined) throw failed.reason;
    await this.#startEmulated(types);
    // Explicit slots first, then the rest in order from slot 1 (slot 0 is a PC's host bridge).
    const explicit = new Set(config.devices.flatMap((d) => d.slot === undefined ? [] : [d.slot]));
    const functions: { fn: VirtioPciFunction | EmulatedController; spec: DeviceSpec }[] = [];
    for (const host of this.#devices) {
      functions.push({ fn: await host.plug(this.vcpu), spec: host.spec });
    }
    for (const e of this.#emulated) functions.push({ fn: e.controller, spec: e.specs[0]! });
    const order = new Map(config.devices.map((d, i) => [d.id, i]));
    functions.sort((a, b) => order.get(a.spec.id)! - order.get(b.spec.id)!);
    let next = 1;
    const slots = new Map(config.devices.map((d) => [d.id, d.slot]));
    for (const { fn, spec } of functions) {
      let slot = slots.get(spec.id);
      if (slot === undefined) {
        while (explicit.has(next) || this.bus.function(next) !== undefined) next++;
        slot = next;
      }
      this.bus.plug(fn, slot);
    }
    this.bus.assignBars(MMIO_WINDOW);
    this.#refreshDoorbells();
  }

  /**
   * Opens the drives of the emulated devices here, on the VMM thread, and builds their
   * controllers: devices of one type share a controller up to its `perController`.
   */
  async #startEmulated(types: readonly (DeviceType | EmulatedDeviceType)[]): Promise<void> {
    const groups: { type: EmulatedDeviceType; specs: DeviceSpec[] }[] = [];
    for (const [index, spec] of this.config.devices.entries()) {
      const type = types[index]!;
      if (!isEmulatedType(type)) continue;
      const open = groups.findLast((g) => g.type === type);
      if (open !== undefined && open.specs.length < type.perController) open.specs.push(spec);
      else groups.push({ type, specs: [spec] });
    }
    // INTx sources from 31 down, away from the virtio devices' (numbered from 0).
    let source = 31;
    for (const { type, specs } of groups) {
      const drives: BlockNode[] = [];
      try {
        const members = [];
        for (const spec of specs) {
          const mine: BlockNode[] = [];
          for (const drive of spec.drives) {
            try {
              const node = await openDrive(drive);
              mine.push(node);
              drives.push(node);
            } catch (error) {
              throw new MachineError(
                spec.id,
                `drive ${drive.id ?? drive.file}: ${
                  error instanceof Error ? error.message : String(error)
                }`,
              );
            }
          }
          members.push({ spec, drives: mine });
        }
        // Sources 0..31: the lines this controller drives must all be left.
        if (source - type.intxLines + 1 < 0) {
          throw new MachineError(specs[0]!.id, "Too many emulated controllers (INTx sources)");
        }
        const intxSources = Array.from({ length: type.intxLines }, () => source--);
        const controller = type.create({
          members,
          memory: this.memory,
          vcpu: this.vcpu,
          intxSources,
        });
        this.#emulated.push({ type, specs, drives, controller });
      } catch (error) {
        await Promise.allSettled(drives.map((d) => d.close()));
        throw error instanceof MachineError
          ? error
          : new MachineError(specs[0]!.id, error instanceof Error ? error.message : String(error));
      }
    }
  }

  /**
   * Why the machine stopped on an I/O error — a device failed a request under a drive's
   * `werror`/`rerror` `stop` (or `enospc` on ENOSPC) and holds it: `io error on drive d0 (write):
   * No space left on device` — else null. QEMU's `io-error` run state: the guest waits on the held
   * requests; the VMM decides (shut down, or reset the device).
   */
  get stopReason(): string | null {
    return this.#stopReason;
  }

  /** Settles with {@linkcode stopReason} when the machine first stops on an I/O error. */
  get stopped(): Promise<string> {
    return this.#stopped;
  }

  /** The first fatal error (a device's iothread died), if any. */
  get error(): MachineError | null {
    return this.#error;
  }

  /** `created`, `running`, `paused` or `shut down`. */
  get state(): MachineState {
    return this.#state;
  }

  /** The devices, in configuration order: id, type, slot and PCI function. */
  get devices(): readonly { id: string; type: string; slot: number; spec: DeviceSpec }[] {
    return this.#bootDevices().map((b) => ({ ...b.device, spec: b.spec }));
  }

  /** Every configured device with its slot (emulated ones with their place on the controller). */
  #bootDevices(): { device: BootDevice; spec: DeviceSpec }[] {
    const out: { device: BootDevice; spec: DeviceSpec }[] = [];
    for (const d of this.#devices) {
      out.push({
        device: { id: d.spec.id, type: d.spec.type, slot: this.#slotOf(d) },
        spec: d.spec,
      });
    }
    for (const e of this.#emulated) {
      const slot = this.bus.slots().find((s) => this.bus.function(s) === e.controller) ?? -1;
      for (const [unit, spec] of e.specs.entries()) {
        out.push({
          device: { id: spec.id, type: spec.type, slot, unit, options: { ...spec.options } },
          spec,
        });
      }
    }
    const order = new Map(this.config.devices.map((d, i) => [d.id, i]));
    return out.sort((a, b) => order.get(a.spec.id)! - order.get(b.spec.id)!);
  }

  /**
   * The PCI function of device `id` (its interrupt and doorbell state, registers).
   *
   * @throws {RangeError} for an unknown id
   */
  pciFunction(id: string): VirtioPciFunction {
    return this.#device(id).fn;
  }

  /** Starts serving the vCPU's exits on this thread. Idempotent. */
  start(): void {
    this.#checkAlive();
    if (this.#server !== null) return;
    this.#server = new ExitServer(this.exits, this, {
      ...(this.#options.exitSpinMicros === undefined
        ? {}
        : { spinMicros: this.#options.exitSpinMicros }),
    });
    this.#state = "running";
  }

  /**
   * Boots a vCPU Worker at `entry` (a module that calls `runVcpu`) with `payload` for its program.
   * One vCPU at a time; a previous one must have ended.
   *
   * @throws {MachineError} when the machine failed or is shut down, or a vCPU is running
   */
  async startVcpu(
    entry: string | URL,
    payload?: unknown,
    options: VcpuOptions = {},
  ): Promise<VcpuHandle> {
    this.start();
    if (this.#vcpuHandle?.running) throw new MachineError(undefined, "A vCPU is already running");
    // A vCPU terminated mid-exit may have left the mailbox busy: wait for the answer, then clear.
    await this.#server!.idle();
    this.#checkAlive();
    this.exits.abandon();
    const boot: VcpuBoot = {
      kind: "boot",
      ram: { regions: this.memory.regions, buffer: this.memory.buffer },
      vcpu: this.vcpu.buffer,
      exits: {
        channel: this.exits.buffer,
        doorbells: this.#devices.map((d) => d.fn.doorbells.buffer),
        timeoutMs: this.config.exitTimeoutMs,
      },
      devices: this.#bootDevices().map((b) => b.device),
      payload,
    };
    const handle = new VcpuHandle(entry, boot, options, () => {});
    this.#vcpuHandle = handle;
    return handle;
  }

  /** Pauses every iothread: in-flight drains finish, nothing more is popped until {@linkcode resume}. */
  async pause(): Promise<void> {
    this.#checkAlive();
    await Promise.all(this.#devices.map((d) => d.pause()));
    this.#state = "paused";
  }

  /** Resumes every iothread (each drains its queues once, for kicks that came while paused). */
  async resume(): Promise<void> {
    this.#checkAlive();
    await Promise.all(this.#devices.map((d) => d.resume()));
    this.#state = this.#server === null ? "created" : "running";
  }

  /**
   * System reset: every PCI function reset (each iothread quiesces and forgets its queues), BARs
   * assigned again as firmware would, the ioeventfd table republished and the driver reports
   * cleared. The guest must enumerate and initialise its devices again.
   */
  async reset(): Promise<void> {
    this.#checkAlive();
    for (const d of this.#devices) d.fn.reset();
    for (const e of this.#emulated) e.controller.reset();
    this.bus.assignBars(MMIO_WINDOW);
    this.#refreshDoorbells();
    this.exits.clearReports();
    await this.#settle();
  }

  /**
   * Stops everything: the vCPU Worker is terminated, the exit channel closed, every iothread
   * closes its back-end, flushes and closes its drives and is terminated. Idempotent; nothing is
   * left running, even when a step fails.
   *
   * @throws {MachineError} (after stopping everything) when a device could not close cleanly
   */
  shutdown(): Promise<void> {
    this.#closing ??= this.#shutdown();
    return this.#closing;
  }

  async #shutdown(): Promise<void> {
    this.#state = "shut down";
    this.#vcpuHandle?.terminate(new MachineError(undefined, "The machine shut down"));
    this.exits.close();
    await this.#server?.close();
    const closed = await Promise.allSettled([
      ...this.#devices.map((d) => d.close()),
      ...this.#emulated.map((e) => this.#closeEmulated(e)),
    ]);
    this.#barriers = [];
    const failed = closed.find((c) => c.status === "rejected");
    if (failed !== undefined) throw failed.reason;
  }

  /**
   * Waits until every iothread has finished the drain in progress and published its counters, so
   * that {@linkcode stats} then counts every completion the guest has seen.
   */
  async sync(): Promise<void> {
    this.#checkAlive();
    await Promise.all([
      ...this.#devices.map((d) => d.sync()),
      ...this.#emulated.map((e) => e.controller.idle()),
    ]);
  }

  /**
   * Counters of the exits and of every device and queue, read from the shared words now. A
   * completion the guest reaped by polling may not be counted yet: {@linkcode sync} first for
   * exact device-side numbers.
   */
  stats(): MachineStats {
    return {
      exits: { ...this.exits.counters, unclaimed: this.bus.unclaimed },
      devices: this.#devices.map((d) => this.#deviceStats(d)),
      emulated: this.#emulated.map((e) => ({
        ids: e.specs.map((spec) => spec.id),
        type: e.type.name,
        slot: this.bus.slots().find((s) => this.bus.function(s) === e.controller) ?? -1,
        counters: { ...e.controller.stats },
      })),
    };
  }

  // ---- Exits (ExitHandler) ------------------------------------------------------------------------

  // The exit handlers: the ExitServer calls them for the vCPU; a test may call them directly to
  // play the guest from this thread.

  /** A configuration read exit. */
  configRead(slot: number, offset: number, size: AccessSize): number {
    return this.bus.configRead(slot, offset, size);
  }

  /** A configuration write exit; BARs or memory decoding may move the doorbells. */
  configWrite(slot: number, offset: number, size: AccessSize, value: number): void | Promise<void> {
    this.bus.configWrite(slot, offset, size, value);
    this.#refreshDoorbells();
    return this.#settle();
  }

  /** An MMIO read exit. */
  mmioRead(gpa: number, size: AccessSize): number {
    return this.bus.mmioRead(gpa, size);
  }

  /** A port read exit (IN): an emulated controller's registers or data port. */
  ioRead(port: number, size: AccessSize): number {
    return this.bus.ioRead(port, size);
  }

  /** A port write exit (OUT). */
  ioWrite(port: number, size: AccessSize, value: number): void {
    this.bus.ioWrite(port, size, value);
  }

  /** An MMIO write exit: a trapped doorbell is counted; a reset waits for the iothread. */
  mmioWrite(gpa: number, size: AccessSize, value: number): void | Promise<void> {
    const hit = this.bus.route(gpa);
    if (hit === null) {
      this.bus.unclaimed++;
      return;
    }
    if (
      hit.fn instanceof VirtioPciFunction && hit.bar === VIRTIO_PCI_MODERN_BAR &&
      hit.offset >= VIRTIO_PCI_NOTIFY_CFG_OFFSET &&
      hit.offset < VIRTIO_PCI_NOTIFY_CFG_OFFSET + VIRTIO_PCI_REGION_SIZE
    ) {
      this.exits.countDoorbellExit();
    }
    hit.fn.mmioWrite(hit.bar, hit.offset, size, value);
    return this.#settle();
  }

  // ---- Internals ----------------------------------------------------------------------------------

  /** Waits for the iothreads a reset asked to quiesce (none: returns nothing, synchronously). */
  #settle(): void | Promise<void> {
    if (this.#barriers.length === 0) return;
    const barriers = this.#barriers;
    this.#barriers = [];
    return Promise.all(barriers).then(() => {});
  }

  /** Publishes where the ioeventfd devices' doorbells decode now. */
  #refreshDoorbells(): void {
    const windows: DoorbellWindow[] = [];
    for (const d of this.#devices) {
      if (!d.spec.ioeventfd) continue;
      const gpa = d.fn.notifyAddress(0);
      if (gpa === null) continue;
      windows.push({
        gpa,
        device: d.index,
        queues: d.fn.model.numQueues,
        stride: VIRTIO_PCI_NOTIFY_OFF_MULTIPLIER,
      });
    }
    this.exits.publishDoorbells(windows);
  }

  #deviceStats(d: DeviceHost): DeviceStats {
    const fn = d.fn;
    const slot = this.#slotOf(d);
    const queues: QueueCounters[] = [];
    for (let q = 0; q < fn.model.numQueues; q++) {
      const driver = this.exits.driverReport(slot, q);
      queues.push({
        index: q,
        ...d.counters.queue(q),
        kicks: fn.doorbells.kicks(q),
        suppressedKicks: driver?.suppressedKicks ?? 0,
        exits: fn.doorbells.exits(q),
        driver,
      });
    }
    return {
      id: d.spec.id,
      type: d.spec.type,
      slot,
      status: fn.deviceStatus,
      epoch: fn.interrupts.epoch,
      ioeventfd: d.spec.ioeventfd,
      queues,
      interrupts: fn.interrupts.stats,
      thread: d.counters.thread,
      faults: [...d.faults],
      stopReason: d.stopReason,
    };
  }

  /** Waits for the controller's I/O, then flushes and closes its drives (all of them, always). */
  async #closeEmulated(e: EmulatedHost): Promise<void> {
    let failure: unknown = null;
    try {
      await e.controller.close();
    } catch (error) {
      failure = error;
    }
    for (const node of e.drives) {
      try {
        if (!node.readOnly) await node.flush();
      } catch (error) {
        failure ??= error;
      }
      try {
        await node.close();
      } catch (error) {
        failure ??= error;
      }
    }
    if (failure !== null) {
      throw new MachineError(
        e.specs[0]!.id,
        `closing its drives failed: ${
          failure instanceof Error ? failure.message : String(failure)
        }`,
      );
    }
  }

  #slotOf(d: DeviceHost): number {
    return this.bus.slots().find((s) => this.bus.function(s) === d.fn) ?? -1;
  }

  #device(id: string): DeviceHost {
    const d = this.#devices.find((x) => x.spec.id === id);
    if (d === undefined) throw new RangeError(`No device "${id}"`);
    return d;
  }

  #checkAlive(): void {
    if (this.#error !== null) throw this.#error;
    if (this.#state === "shut down") throw new MachineError(undefined, "The machine is shut down");
  }

  #ioErrorStop(reason: string): void {
    if (this.#stopReason !== null) return;
    this.#stopReason = reason;
    this.#resolveStopped(reason);
  }

  /** A device's iothread died: the vCPU cannot go on (it would wait for it for ever). */
  #fatal(error: MachineError): void {
    this.#error ??= error;
    this.#vcpuHandle?.terminate(error);
  }
}

/** Loads each device's type and checks its drives and options; all problems in one error. */
async function resolveDevices(
  config: MachineConfig,
): Promise<{ devices: DeviceConfig[]; types: (DeviceType | EmulatedDeviceType)[] }> {
  const issues: ConfigIssue[] = [];
  const devices: DeviceConfig[] = [];
  const types: (DeviceType | EmulatedDeviceType)[] = [];
  for (const [i, d] of config.devices.entries()) {
    let type: DeviceType | EmulatedDeviceType;
    try {
      type = await loadDeviceType(d.type);
    } catch (error) {
      issues.push({
        path: `devices[${i}].type`,
        message: error instanceof Error ? error.message : String(error),
      });
      continue;
    }
    const { min, max } = type.drives ?? { min: 0, max: 256 };
    if (d.drives.length < min || d.drives.length > max) {
      const want = min === max ? `exactly ${min}` : `${min} to ${max}`;
      issues.push({
        path: `devices[${i}].drives`,
        message: `${type.name} takes ${want} drive${max === 1 ? "" : "s"}, got ${d.drives.length}`,
      });
    }
    let options = d.options;
    if (type.optionsSchema !== undefined) {
      const parsed = type.optionsSchema.safeParse(d.options);
      if (parsed.success) {
        options = parsed.data as Record<string, unknown>;
      } else {
        issues.push(
          ...configIssues(
            parsed.error.issues as Parameters<typeof configIssues>[0],
            ["devices", i, "options"],
          ),
        );
      }
    }
    if (isEmulatedType(type) && type.maxControllers !== undefined) {
      const most = type.perController * type.maxControllers;
      const before = types.filter((t) => t === type).length;
      if (before >= most) {
        issues.push({
          path: `devices[${i}].type`,
          message: `a machine holds at most ${most} ${type.name} device${most === 1 ? "" : "s"}` +
            (type.name === "ide-hd" ? " (two IDE channels, one master each)" : ""),
        });
      }
    }
    devices.push({ ...d, options });
    types.push(type);
  }
  if (issues.length > 0) throw new MachineConfigError(issues);
  return { devices, types };
}
