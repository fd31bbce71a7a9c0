/**
 * The VMM's handle on one device: its iothread Worker, the numbered control messages it sends it,
 * and the model wrapper that forwards DRIVER_OK and resets from the transport to the iothread.
 *
 * @module
 */

import type { DeviceInfo, DeviceType } from "../devices/device_type.ts";
import {
  type ActivateQueue,
  type ControlMessage,
  ControlWord,
  DeviceCounters,
  type IothreadAttach,
  type IothreadInit,
  type IothreadReply,
} from "../devices/iothread_protocol.ts";
import type { ActivatedQueue, VirtioDeviceModel } from "../virtio/device.ts";
import type { VcpuInterrupts } from "../virtio/interrupts.ts";
import type { GuestMemory } from "../virtio/memory.ts";
import { VirtioPciFunction } from "../virtio/pci.ts";
import type { DeviceConfig } from "./config.ts";
import { MachineError } from "./errors.ts";

const IOTHREAD_ENTRY = new URL("../devices/iothread.ts", import.meta.url);
/** Faults kept per device for {@linkcode DeviceHost.faults}. */
const MAX_FAULTS = 32;

/** A fault the iothread reported: the driver broke a ring (or the back-end failed a drain). */
export interface DeviceFault {
  /** Queue index, or -1 when not tied to one queue. */
  readonly queue: number;
  /** The `VirtqueueFault`, or `backend`. */
  readonly fault: string;
  /** What went wrong. */
  readonly message: string;
}

/** What a {@linkcode DeviceHost} needs from the machine. */
export interface DeviceHostOptions {
  readonly spec: DeviceConfig;
  readonly type: DeviceType;
  /** Index of the device in the machine (doorbell buffer index, INTx source). */
  readonly index: number;
  readonly ram: GuestMemory;
  readonly startTimeoutMs: number;
  readonly controlTimeoutMs: number;
  /** The iothread died or stopped answering: the machine cannot go on with this device. */
  readonly onFatal: (error: MachineError) => void;
  /** A reset the vCPU's exit must wait for (the iothread quiescing). */
  readonly onBarrier: (done: Promise<void>) => void;
  /** The device stopped on a failed request (`werror`/`rerror` `stop`): why. */
  readonly onStop?: (reason: string) => void;
}

type Control =
  | { kind: "activate"; features: bigint; queues: readonly ActivateQueue[]; epoch: number }
  | { kind: "reset" }
  | { kind: "pause" }
  | { kind: "resume" }
  | { kind: "sync" }
  | { kind: "shutdown" };

interface Pending {
  readonly kind: string;
  readonly resolve: () => void;
  readonly reject: (error: Error) => void;
  readonly timer: ReturnType<typeof setTimeout>;
}

interface Expecting {
  readonly kind: "ready" | "attached";
  readonly resolve: (reply: IothreadReply) => void;
  readonly reject: (error: Error) => void;
  readonly timer: ReturnType<typeof setTimeout>;
}

/**
 * One device: iothread Worker, PCI function, control channel.
 *
 * Life: {@linkcode DeviceHost.start} (Worker up, drives open, back-end built) →
 * {@linkcode DeviceHost.plug} (model, PCI function, attach) → control messages → {@linkcode close}.
 */
/** The longest a device's shutdown (its images flushed and closed) may take. */
const SHUTDOWN_TIMEOUT_MS = 60_000;

export class DeviceHost {
  readonly spec: DeviceConfig;
  readonly type: DeviceType;
  readonly index: number;
  /** The control sequence word shared with the iothread. */
  readonly control: ControlWord = new ControlWord();
  /** Recent faults the iothread reported (at most 32, oldest dropped). */
  readonly faults: DeviceFault[] = [];
  /** Why the device stopped on a failed request (`werror`/`rerror` `stop`), else null. */
  stopReason: string | null = null;
  readonly #opts: DeviceHostOptions;
  readonly #worker: Worker;
  readonly #pending = new Map<number, Pending>();
  #expecting: Expecting | null = null;
  #seq = 0;
  #info: DeviceInfo | null = null;
  #fn: VirtioPciFunction | null = null;
  #counters: DeviceCounters | null = null;
  #attached = false;
  /** DRIVER_OK was forwarded since the last reset: a reset must wait for the iothread. */
  #active = false;
  #dead: MachineError | null = null;
  #closed = false;

  private constructor(opts: DeviceHostOptions) {
    this.#opts = opts;
    this.spec = opts.spec;
    this.type = opts.type;
    this.index = opts.index;
    this.#worker = new Worker(IOTHREAD_ENTRY, { type: "module", name: `iothread ${opts.spec.id}` });
    this.#worker.onmessage = (event: MessageEvent<IothreadReply>) => this.#onReply(event.data);
    this.#worker.onerror = (event: ErrorEvent) => {
      event.preventDefault();
      this.#die(new MachineError(this.spec.id, `iothread crashed: ${event.message}`));
    };
    this.#worker.onmessageerror = () => {
      this.#die(new MachineError(this.spec.id, "iothread sent a message that could not be read"));
    };
  }

  /**
   * Starts the iothread: it opens the drives and builds the back-end.
   *
   * @throws {MachineError} naming the device when the iothread fails or does not answer in time
   *   (the Worker is terminated)
   */
  static async start(opts: DeviceHostOptions): Promise<DeviceHost> {
    const host = new DeviceHost(opts);
    try {
      const init: IothreadInit = {
        kind: "init",
        spec: opts.spec,
        backendModule: new URL(opts.type.backendModule).href,
        ram: { regions: opts.ram.regions, buffer: opts.ram.buffer },
      };
      const ready = host.#expect("ready", opts.startTimeoutMs);
      host.#worker.postMessage(init);
      const reply = await ready;
      if (reply.kind === "ready") host.#info = reply.info;
      return host;
    } catch (error) {
      host.terminate();
      throw error;
    }
  }

  /** What the iothread reported at start. */
  get info(): DeviceInfo {
    if (this.#info === null) throw new Error("Device not started");
    return this.#info;
  }

  /** The PCI function (after {@linkcode plug}). */
  get fn(): VirtioPciFunction {
    if (this.#fn === null) throw new Error(`Device ${this.spec.id} is not plugged`);
    return this.#fn;
  }

  /** The iothread's counters (after {@linkcode plug}). */
  get counters(): DeviceCounters {
    if (this.#counters === null) throw new Error(`Device ${this.spec.id} is not plugged`);
    return this.#counters;
  }

  /** The error that killed the iothread, if it died. */
  get dead(): MachineError | null {
    return this.#dead;
  }

  /**
   * Builds the model and the PCI function, and hands the shared state to the iothread.
   *
   * @throws {MachineError} when the model cannot be built or the iothread does not attach
   */
  async plug(vcpu: VcpuInterrupts): Promise<VirtioPciFunction> {
    let fn: VirtioPciFunction;
    try {
      const model = new ForwardingModel(this.type.createModel(this.spec, this.info), this);
      fn = new VirtioPciFunction({
        model,
        vcpu,
        doorbellMode: this.spec.ioeventfd ? "ioeventfd" : "trap",
        intxSource: this.index % 32,
        ...(this.spec.msixVectors === undefined ? {} : { msixVectors: this.spec.msixVectors }),
      });
    } catch (error) {
      throw new MachineError(this.spec.id, `cannot build the device: ${describe(error)}`, {
        cause: error,
      });
    }
    this.#fn = fn;
    this.#counters = new DeviceCounters(fn.model.numQueues);
    const attach: IothreadAttach = {
      kind: "attach",
      vcpu: vcpu.buffer,
      interrupts: fn.interrupts.buffer,
      doorbells: fn.doorbells.buffer,
      control: this.control.buffer,
      counters: this.#counters.buffer,
    };
    const attached = this.#expect("attached", this.#opts.startTimeoutMs);
    this.#worker.postMessage(attach);
    this.#attached = true;
    await attached;
    return fn;
  }

  /** Pauses the iothread: it finishes its drain and pops nothing more until resumed. */
  pause(): Promise<void> {
    return this.#send({ kind: "pause" });
  }

  /** Resumes popping (every queue is drained once). */
  resume(): Promise<void> {
    return this.#send({ kind: "resume" });
  }

  /** Resolves once the iothread has finished its current drain and published every counter. */
  sync(): Promise<void> {
    return this.#send({ kind: "sync" });
  }

  /**
   * Shuts the iothread down (back-end closed, drives flushed and closed) and terminates it.
   * Idempotent.
   *
   * @throws {MachineError} when closing failed or timed out (the Worker is terminated anyway)
   */
  async close(): Promise<void> {
    if (this.#closed) return;
    try {
      if (this.#dead === null && this.#info !== null) {
        await this.#send({ kind: "shutdown" });
      }
    } finally {
      this.terminate();
    }
  }

  /** Terminates the Worker now, failing whatever waits on it. */
  terminate(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#worker.terminate();
    this.#failAll(new MachineError(this.spec.id, "iothread terminated"));
  }

  // ---- Forwarded from the transport (VMM thread, inside an exit) ---------------------------------

  /** DRIVER_OK: hand the rings to the iothread (no wait: the control word orders later kicks). */
  activated(features: bigint, queues: readonly ActivatedQueue[], epoch: number): void {
    this.#active = true;
    this.#send({
      kind: "activate",
      features,
      queues: queues.map((q) => ({ index: q.index, layout: q.layout })),
      epoch,
    }).catch(() => {}); // a failed activation is NEEDS_RESET in the guest; a dead iothread is fatal
  }

  /** Device reset: the exit waits until the iothread has quiesced, if it was running. */
  reset(): void {
    const wasActive = this.#active;
    this.#active = false;
    const done = this.#send({ kind: "reset" });
    if (wasActive) this.#opts.onBarrier(done);
    else done.catch(() => {});
  }

  // ---- Plumbing ----------------------------------------------------------------------------------

  #send(control: Control): Promise<void> {
    if (this.#dead !== null) return Promise.reject(this.#dead);
    if (this.#closed) {
      return Promise.reject(new MachineError(this.spec.id, "iothread is shut down"));
    }
    const seq = ++this.#seq;
    // A shutdown closes the device's images, which for a remote one (an RBD image whose cluster
    // went away) takes the client's own timeouts: bounded, but longer than a control message.
    const ms = control.kind === "shutdown"
      ? Math.max(this.#opts.controlTimeoutMs, SHUTDOWN_TIMEOUT_MS)
      : this.#opts.controlTimeoutMs;
    const done = new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#die(
          new MachineError(
            this.spec.id,
            `iothread did not acknowledge ${control.kind} within ${ms} ms`,
          ),
        );
      }, ms);
      this.#pending.set(seq, { kind: control.kind, resolve, reject, timer });
    });
    const message: ControlMessage = { ...control, seq };
    this.#worker.postMessage(message);
    if (this.#attached) {
      // After posting: the iothread handles every message up to the announced number before it
      // touches a queue again, so a kick after this exit cannot overtake the message.
      this.control.announce(seq);
      this.#fn?.doorbells.wake();
    }
    return done;
  }

  #expect(kind: "ready" | "attached", ms: number): Promise<IothreadReply> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#die(
          new MachineError(this.spec.id, `iothread did not become ${kind} within ${ms} ms`),
        );
      }, ms);
      this.#expecting = { kind, resolve, reject, timer };
    });
  }

  #onReply(reply: IothreadReply): void {
    switch (reply.kind) {
      case "ready":
      case "attached": {
        const e = this.#expecting;
        if (e === null || e.kind !== reply.kind) return;
        this.#expecting = null;
        clearTimeout(e.timer);
        e.resolve(reply);
        return;
      }
      case "ack": {
        const p = this.#pending.get(reply.seq);
        if (p === undefined) return;
        this.#pending.delete(reply.seq);
        clearTimeout(p.timer);
        if (reply.error === undefined) p.resolve();
        else p.reject(new MachineError(this.spec.id, `${p.kind} failed: ${reply.error}`));
        return;
      }
      case "fault":
        this.faults.push({ queue: reply.queue, fault: reply.fault, message: reply.message });
        if (this.faults.length > MAX_FAULTS) this.faults.shift();
        return;
      case "stopped":
        this.stopReason ??= reply.reason;
        this.#opts.onStop?.(reply.reason);
        return;
      case "failed":
        this.#die(new MachineError(this.spec.id, reply.message));
        return;
    }
  }

  /** The iothread is gone: fail everything waiting, terminate it, tell the machine. */
  #die(error: MachineError): void {
    if (this.#dead !== null || this.#closed) return;
    this.#dead = error;
    this.#worker.terminate();
    this.#failAll(error);
    // The guest must see a device that stopped, not one that silently ignores it.
    this.#fn?.needsReset();
    this.#opts.onFatal(error);
  }

  #failAll(error: MachineError): void {
    const e = this.#expecting;
    if (e !== null) {
      this.#expecting = null;
      clearTimeout(e.timer);
      e.reject(error);
    }
    for (const p of this.#pending.values()) {
      clearTimeout(p.timer);
      p.reject(error);
    }
    this.#pending.clear();
  }
}

function describe(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/**
 * The device type's model, with DRIVER_OK and reset forwarded to the iothread after the model's
 * own handling. Queue resets are not forwarded (the back-end contract has no per-queue reset), so
 * `queueReset`/`queueEnable` are absent and the transport does not offer VIRTIO_F_RING_RESET.
 */
class ForwardingModel implements VirtioDeviceModel {
  readonly #inner: VirtioDeviceModel;
  readonly #host: DeviceHost;

  constructor(inner: VirtioDeviceModel, host: DeviceHost) {
    this.#inner = inner;
    this.#host = host;
  }

  get deviceId(): number {
    return this.#inner.deviceId;
  }
  get deviceFeatures(): bigint {
    return this.#inner.deviceFeatures;
  }
  get numQueues(): number {
    return this.#inner.numQueues;
  }
  get configSize(): number {
    return this.#inner.configSize;
  }
  get pciClass(): number {
    return this.#inner.pciClass;
  }
  get subsystemId(): number {
    return this.#inner.subsystemId;
  }
  queueMaxSize(index: number): number {
    return this.#inner.queueMaxSize(index);
  }
  readConfig(offset: number, dst: Uint8Array): void {
    this.#inner.readConfig(offset, dst);
  }
  writeConfig(offset: number, src: Uint8Array): void {
    this.#inner.writeConfig(offset, src);
  }
  validateFeatures(driverFeatures: bigint): boolean {
    return this.#inner.validateFeatures(driverFeatures);
  }
  activate(features: bigint, queues: readonly ActivatedQueue[], epoch: number): void {
    // A model that refuses the rings throws here; the transport turns that into NEEDS_RESET and
    // the iothread never hears of it.
    this.#inner.activate(features, queues, epoch);
    this.#host.activated(features, queues, epoch);
  }
  reset(): void {
    this.#inner.reset();
    this.#host.reset();
  }
}
