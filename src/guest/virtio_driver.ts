/**
 * The guest's virtio-pci modern driver core (Linux's `virtio_pci_modern.c` + `virtio_pci_common.c`
 * + the status dance of `virtio.c`), programming a function through a {@linkcode GuestBus}:
 *
 * 1. {@linkcode VirtioPciDriver.begin}: reset (write 0, wait until it reads 0), ACKNOWLEDGE, DRIVER,
 *    read the 64 offered feature bits.
 * 2. {@linkcode VirtioPciDriver.negotiate}: wanted ∩ offered (VERSION_1 required), write them,
 *    FEATURES_OK and read it back — a refusal sets FAILED and throws.
 * 3. Device config reads ({@linkcode VirtioPciDriver.readConfig}) with the config_generation loop.
 * 4. {@linkcode VirtioPciDriver.setupQueues}: interrupts (MSI-X with a vector per queue, else one
 *    shared queue vector, else INTx — see below), then per queue: select, check it is disabled,
 *    read the maximum size, choose a size, allocate the ring from the guest allocator, write its
 *    three addresses, read queue_notify_off; finally enable every queue (Linux enables last: after
 *    that there is no way back but a reset).
 * 5. {@linkcode VirtioPciDriver.driverOk}.
 *
 * Interrupt fallback (as `vp_find_vqs`): MSI-X with one vector for config changes and one per queue
 * needs `queues + 1` table entries; with fewer entries, or when the device answers a vector write
 * with NO_VECTOR, the driver tries one config vector plus one vector shared by all queues; when
 * that fails too (or there is no usable MSI-X capability) it disables MSI-X and uses INTx: clears
 * INTx Disable and registers a handler on the shared line that reads (and so clears) the ISR byte —
 * bit 0 means "look at every queue", bit 1 "configuration changed".
 *
 * A configuration interrupt reads device_status: DEVICE_NEEDS_RESET (or a status of all-ones: the
 * device is gone) marks the driver broken and calls `onNeedsReset`; the front-end reports it
 * instead of waiting for completions that will not come.
 *
 * **The idle hook.** Everything here is synchronous except waiting, which goes through the
 * platform's `idle` function ({@linkcode GuestPlatform.idle}): the step a guest takes when it has
 * nothing to do but wait for an interrupt. In the vCPU Worker it is {@linkcode haltIdle} (a bounded
 * `VcpuInterrupts.waitForInterrupt`: devices run in their own threads and interrupt it); in a
 * single-thread test it runs the device back-end (`processQueue` of each queue) and returns, so
 * the device's completions and interrupts are there when the guest looks. After `idle` the caller
 * dispatches pending interrupts with `GuestInterrupts.dispatchPending`.
 *
 * @module
 */

import type { AccessSize, GuestBus } from "../virtio/bus.ts";
import {
  featureBit,
  hasFeature,
  VIRTIO_CONFIG_S_ACKNOWLEDGE,
  VIRTIO_CONFIG_S_DRIVER,
  VIRTIO_CONFIG_S_DRIVER_OK,
  VIRTIO_CONFIG_S_FAILED,
  VIRTIO_CONFIG_S_FEATURES_OK,
  VIRTIO_CONFIG_S_NEEDS_RESET,
  VIRTIO_F_RING_PACKED,
  VIRTIO_F_VERSION_1,
  VIRTIO_MSI_NO_VECTOR,
  VIRTIO_PCI_ISR_CONFIG,
  VIRTIO_PCI_ISR_QUEUE,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
  VIRTQ_MAX_SIZE,
} from "../virtio/features.ts";
import type { VcpuInterrupts } from "../virtio/interrupts.ts";
import type { GuestMemory } from "../virtio/memory.ts";
import { PackedDriverQueue, packedRingLayout } from "../virtio/packed_queue.ts";
import {
  PCI_MSIX_FLAGS,
  PCI_MSIX_FLAGS_ENABLE,
  PCI_MSIX_FLAGS_MASKALL,
  VIRTIO_PCI_COMMON_CFGGENERATION,
  VIRTIO_PCI_COMMON_DF,
  VIRTIO_PCI_COMMON_DFSELECT,
  VIRTIO_PCI_COMMON_GF,
  VIRTIO_PCI_COMMON_GFSELECT,
  VIRTIO_PCI_COMMON_MSIX,
  VIRTIO_PCI_COMMON_NUMQ,
  VIRTIO_PCI_COMMON_Q_AVAILLO,
  VIRTIO_PCI_COMMON_Q_DESCLO,
  VIRTIO_PCI_COMMON_Q_ENABLE,
  VIRTIO_PCI_COMMON_Q_MSIX,
  VIRTIO_PCI_COMMON_Q_NOFF,
  VIRTIO_PCI_COMMON_Q_SELECT,
  VIRTIO_PCI_COMMON_Q_SIZE,
  VIRTIO_PCI_COMMON_Q_USEDLO,
  VIRTIO_PCI_COMMON_STATUS,
} from "../virtio/pci.ts";
import type { DriverQueue, QueueFeatures } from "../virtio/queue.ts";
import { SplitDriverQueue, splitRingLayout } from "../virtio/split_queue.ts";
import type { GuestAllocator } from "./alloc.ts";
import type { GuestInterrupts } from "./irq.ts";
import {
  enableFunction,
  type PciFunctionInfo,
  setIntxDisabled,
  type VirtioStructures,
  virtioStructures,
} from "./pci_probe.ts";

/**
 * The guest's waiting step: called when the guest can make no progress until an interrupt.
 * It may return before one arrives (a timeout slice); callers loop.
 */
export type IdleFn = () => void | Promise<void>;

/** What a guest driver runs on: the bus, RAM, its interrupt controller and allocator, and `idle`. */
export interface GuestPlatform {
  readonly bus: GuestBus;
  readonly mem: GuestMemory;
  readonly interrupts: GuestInterrupts;
  readonly alloc: GuestAllocator;
  /** See the module documentation: halt in a Worker, run the device in a single-thread test. */
  readonly idle: IdleFn;
}

/** Longest single halt of {@linkcode haltIdle}, so that callers re-check timeouts and status. */
export const HALT_SLICE_MS = 100;

/**
 * How many times a halting vCPU first looks for an interrupt before it sleeps (tens of µs), as
 * KVM's halt polling (halt_poll_ns): an interrupt that comes within it costs no sleep and wake-up.
 */
export const HALT_POLL_ROUNDS = 4096;

/**
 * The vCPU Worker's idle step: poll {@linkcode HALT_POLL_ROUNDS} times, then sleep until an
 * interrupt is pending, at most `sliceMs`.
 *
 * @example
 * ```ts
 * import { VcpuInterrupts } from "../virtio/interrupts.ts";
 * import { haltIdle } from "./virtio_driver.ts";
 * const vcpu = new VcpuInterrupts();
 * vcpu.deliver(0x40);
 * haltIdle(vcpu)(); // returns at once: an interrupt is pending
 * ```
 */
export function haltIdle(vcpu: VcpuInterrupts, sliceMs: number = HALT_SLICE_MS): IdleFn {
  return () => {
    for (let round = 0; round < HALT_POLL_ROUNDS; round++) if (vcpu.pending) return;
    vcpu.waitForInterrupt(sliceMs);
  };
}

/** Why the driver gave up on a device. */
export type VirtioDriverErrorKind =
  | "reset-timeout" // device_status never read 0 after a reset
  | "legacy-only" // VERSION_1 not offered
  | "features-refused" // FEATURES_OK did not stick
  | "queue-unavailable" // a queue the driver needs reads size 0, or was already enabled
  | "queue-size-refused" // the size written did not read back
  | "bad-notify-offset" // queue_notify_off × multiplier past the notify structure
  | "config-unstable" // config_generation kept changing
  | "config-range" // a device config field past the DEVICE structure
  | "status" // a status bit did not stick
  | "needs-reset" // DEVICE_NEEDS_RESET (or the device vanished), or a ring rule broken
  | "request-timeout"; // requests stopped completing

/** A virtio device the driver cannot (or can no longer) drive. */
export class VirtioDriverError extends Error {
  override readonly name = "VirtioDriverError";
  readonly kind: VirtioDriverErrorKind;
  /** PCI slot of the function. */
  readonly slot: number;

  constructor(kind: VirtioDriverErrorKind, slot: number, detail: string) {
    super(`virtio device in slot ${slot}: ${detail}`);
    this.kind = kind;
    this.slot = slot;
  }
}

/** How interrupts were set up. */
export type InterruptMode = "msix-per-queue" | "msix-shared" | "intx";

/** What the driver asks of one queue. */
export interface QueueRequest {
  /** Largest size wanted; the device's maximum caps it (split rings: rounded down to a power of 2). */
  readonly size: number;
}

/** Callbacks of {@linkcode VirtioPciDriver.setupQueues}. */
export interface QueueCallbacks {
  /** Queue `index` may have completions (an interrupt for it, or a shared one). */
  readonly onQueue: (index: number) => void;
  /** The device configuration changed (config_generation moved). */
  readonly onConfigChange?: () => void;
  /** DEVICE_NEEDS_RESET seen: the driver is now broken. */
  readonly onNeedsReset?: () => void;
}

/** Interrupt preference of {@linkcode QueueSetupOptions}. */
export type InterruptPreference = "auto" | "msix-shared" | "intx";

/** Options of {@linkcode VirtioPciDriver.setupQueues}. */
export interface QueueSetupOptions {
  /** "auto" (per-queue MSI-X, then shared, then INTx), or start lower in that list. */
  readonly interrupts?: InterruptPreference;
}

/** One live virtqueue of the driver. */
export class VirtioQueue {
  /** Queue index. */
  readonly index: number;
  /** Size chosen. */
  readonly size: number;
  /** The driver side of the ring; tokens are the front-end's request slot numbers. */
  readonly ring: DriverQueue<number>;
  /** Guest-physical address of the doorbell. */
  readonly notifyAddress: number;
  /** x86 vector, or null under INTx. */
  vector: number | null = null;
  /** MSI-X table entry, or null under INTx. */
  msixEntry: number | null = null;
  /** Interrupts taken for this queue (shared and INTx ones included). */
  interrupts = 0;
  /** Guest address of the ring allocation. */
  readonly ringAddress: number;
  readonly #bus: GuestBus;

  constructor(
    bus: GuestBus,
    index: number,
    ring: DriverQueue<number>,
    notifyAddress: number,
    ringAddress: number,
  ) {
    this.#bus = bus;
    this.index = index;
    this.size = ring.layout.size;
    this.ring = ring;
    this.notifyAddress = notifyAddress;
    this.ringAddress = ringAddress;
  }

  /**
   * Publishes what was added and rings the doorbell when the device asked for it (EVENT_IDX /
   * NO_NOTIFY): a 16-bit write of the queue index at the doorbell address, which the machine
   * turns into an ioeventfd ring or a trap exit.
   *
   * @returns true when the doorbell was written
   */
  kick(): boolean {
    if (!this.ring.kick()) return false;
    this.#bus.mmioWrite(this.notifyAddress, 2, this.index);
    return true;
  }
}

/** Typed reads of the DEVICE structure, offsets relative to its start. */
export interface DeviceConfigReader {
  u8(offset: number): number;
  u16(offset: number): number;
  u32(offset: number): number;
  /** A u64 as a number (fields here are sector counts: below 2^53 in any sane device). */
  u64(offset: number): number;
  /** Bytes of the DEVICE structure. */
  readonly length: number;
}

/** Retries of the config_generation loop before giving up. */
const CONFIG_TRIES = 64;
/** MSI-X message address (x86: the local APIC's window, destination APIC 0). */
export const MSI_ADDRESS = 0xfee0_0000;

/**
 * The virtio-pci modern driver core for one function. See the module documentation for the
 * sequence and the interrupt fallback.
 */
export class VirtioPciDriver {
  /** The function as probed. */
  readonly fn: PciFunctionInfo;
  /** Its validated virtio structures. */
  readonly structures: VirtioStructures;
  /** Features the device offered (after {@linkcode begin}). */
  offered = 0n;
  /** Features negotiated (after {@linkcode negotiate}). */
  features = 0n;
  /** How interrupts were set up (after {@linkcode setupQueues}). */
  interruptMode: InterruptMode | null = null;
  /** Config-change interrupts taken. */
  configInterrupts = 0;
  /** Queues set up, by index. */
  readonly queues: VirtioQueue[] = [];
  readonly #platform: GuestPlatform;
  readonly #bus: GuestBus;
  #broken: string | null = null;
  #callbacks: QueueCallbacks | null = null;
  readonly #vectors: number[] = [];
  #removeIntx: (() => void) | null = null;
  #configVector: number | null = null;
  /** x86 vector of each queue (one entry when they share). */
  #queueVectors: number[] = [];

  /**
   * Validates the function's virtio structures; touches nothing on the device.
   *
   * @throws {PciProbeError} when the structures are missing or do not fit their BARs
   */
  constructor(platform: GuestPlatform, fn: PciFunctionInfo) {
    this.#platform = platform;
    this.#bus = platform.bus;
    this.fn = fn;
    this.structures = virtioStructures(fn);
  }

  /** PCI slot. */
  get slot(): number {
    return this.fn.slot;
  }

  /** Why the device is unusable (DEVICE_NEEDS_RESET or gone), or null. */
  get broken(): string | null {
    return this.#broken;
  }

  // ---- Registers ----------------------------------------------------------------------------------

  #read(gpa: number, size: AccessSize): number {
    const v = this.#bus.mmioRead(gpa, size);
    if (size === 4) return v >>> 0;
    return (v >>> 0) & (size === 2 ? 0xffff : 0xff);
  }

  #commonRead(offset: number, size: AccessSize): number {
    return this.#read(this.structures.commonAddress + offset, size);
  }

  #commonWrite(offset: number, size: AccessSize, value: number): void {
    this.#bus.mmioWrite(this.structures.commonAddress + offset, size, value);
  }

  #write64(lo: number, value: number): void {
    this.#commonWrite(lo, 4, value % 2 ** 32);
    this.#commonWrite(lo + 4, 4, Math.floor(value / 2 ** 32));
  }

  /** device_status now. */
  readStatus(): number {
    return this.#commonRead(VIRTIO_PCI_COMMON_STATUS, 1);
  }

  #addStatus(bits: number): void {
    this.#commonWrite(VIRTIO_PCI_COMMON_STATUS, 1, this.readStatus() | bits);
  }

  /** Number of queues the device has (num_queues). */
  get numQueues(): number {
    return this.#commonRead(VIRTIO_PCI_COMMON_NUMQ, 2);
  }

  // ---- Initialisation -----------------------------------------------------------------------------

  /**
   * Resets the device: writes 0 to device_status and reads it until it is 0 (Linux's
   * `vp_modern_set_status(0)` loop), bounded by `timeoutMs`.
   *
   * @throws {VirtioDriverError} "reset-timeout"
   */
  reset(timeoutMs = 1000): void {
    this.#commonWrite(VIRTIO_PCI_COMMON_STATUS, 1, 0);
    const deadline = performance.now() + timeoutMs;
    // Each read is an exit in the vCPU Worker; a device that never finishes must not hang us.
    for (let polls = 0;; polls++) {
      const status = this.readStatus();
      if (status === 0) break;
      if (polls > 16 && performance.now() > deadline) {
        throw new VirtioDriverError(
          "reset-timeout",
          this.slot,
          `device_status reads 0x${status.toString(16)} ${timeoutMs} ms after a reset`,
        );
      }
    }
    this.#broken = null;
  }

  /**
   * Enables the function on the bus (memory, bus master), resets the device, sets ACKNOWLEDGE and
   * DRIVER, and reads the offered features.
   *
   * @returns the 64 offered feature bits
   * @throws {VirtioDriverError} on a reset timeout, or a status bit that does not stick
   */
  begin(resetTimeoutMs = 1000): bigint {
    enableFunction(this.#bus, this.slot);
    this.reset(resetTimeoutMs);
    this.#addStatus(VIRTIO_CONFIG_S_ACKNOWLEDGE);
    this.#addStatus(VIRTIO_CONFIG_S_DRIVER);
    const status = this.readStatus();
    const want = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
    if ((status & want) !== want) {
      throw new VirtioDriverError(
        "status",
        this.slot,
        `device_status reads 0x${status.toString(16)} after ACKNOWLEDGE and DRIVER`,
      );
    }
    this.#commonWrite(VIRTIO_PCI_COMMON_DFSELECT, 4, 0);
    const lo = BigInt(this.#commonRead(VIRTIO_PCI_COMMON_DF, 4));
    this.#commonWrite(VIRTIO_PCI_COMMON_DFSELECT, 4, 1);
    const hi = BigInt(this.#commonRead(VIRTIO_PCI_COMMON_DF, 4));
    this.offered = (hi << 32n) | lo;
    return this.offered;
  }

  /**
   * Negotiates `wanted ∩ offered` (plus VERSION_1), writes it, sets FEATURES_OK and re-reads it.
   *
   * @returns the negotiated features
   * @throws {VirtioDriverError} "legacy-only" when VERSION_1 is not offered; "features-refused"
   *   when FEATURES_OK does not stick (FAILED is set first, as the spec asks)
   */
  negotiate(wanted: bigint): bigint {
    if (!hasFeature(this.offered, VIRTIO_F_VERSION_1)) {
      this.fail();
      throw new VirtioDriverError(
        "legacy-only",
        this.slot,
        "the device does not offer VIRTIO_F_VERSION_1 (legacy-only devices are not supported)",
      );
    }
    const features = (wanted | featureBit(VIRTIO_F_VERSION_1)) & this.offered;
    this.#commonWrite(VIRTIO_PCI_COMMON_GFSELECT, 4, 0);
    this.#commonWrite(VIRTIO_PCI_COMMON_GF, 4, Number(features & 0xffffffffn));
    this.#commonWrite(VIRTIO_PCI_COMMON_GFSELECT, 4, 1);
    this.#commonWrite(VIRTIO_PCI_COMMON_GF, 4, Number((features >> 32n) & 0xffffffffn));
    this.#addStatus(VIRTIO_CONFIG_S_FEATURES_OK);
    const status = this.readStatus();
    if ((status & VIRTIO_CONFIG_S_FEATURES_OK) === 0) {
      this.fail();
      throw new VirtioDriverError(
        "features-refused",
        this.slot,
        `the device refused features 0x${features.toString(16)} (FEATURES_OK did not stick)`,
      );
    }
    this.features = features;
    return features;
  }

  /** Sets FAILED: the driver gave up on the device (the spec's way to say so before a reset). */
  fail(): void {
    this.#addStatus(VIRTIO_CONFIG_S_FAILED);
  }

  /** Sets DRIVER_OK: the device may now process the queues. */
  driverOk(): void {
    this.#addStatus(VIRTIO_CONFIG_S_DRIVER_OK);
    const status = this.readStatus();
    if ((status & VIRTIO_CONFIG_S_NEEDS_RESET) !== 0) {
      this.#markBroken("device_status has DEVICE_NEEDS_RESET right after DRIVER_OK");
      throw new VirtioDriverError("needs-reset", this.slot, this.#broken!);
    }
    if ((status & VIRTIO_CONFIG_S_DRIVER_OK) === 0) {
      throw new VirtioDriverError(
        "status",
        this.slot,
        `device_status reads 0x${status.toString(16)} after DRIVER_OK`,
      );
    }
  }

  // ---- Device configuration -----------------------------------------------------------------------

  /**
   * Reads device configuration consistently: reads config_generation, runs `read`, reads it again,
   * and retries while it moved (the device changed config in between).
   *
   * @throws {VirtioDriverError} "config-unstable" after 64 tries; "config-range" for a field past the
   *   DEVICE structure (or when the device has none)
   */
  readConfig<T>(read: (config: DeviceConfigReader) => T): T {
    const device = this.structures.device;
    const base = this.structures.deviceAddress;
    const length = device?.length ?? 0;
    const field = (offset: number, size: number): number => {
      if (base === null || !Number.isInteger(offset) || offset < 0 || offset + size > length) {
        throw new VirtioDriverError(
          "config-range",
          this.slot,
          `device config field at ${offset} (${size} bytes) is outside the ${length}-byte structure`,
        );
      }
      return base + offset;
    };
    const reader: DeviceConfigReader = {
      length,
      u8: (offset) => this.#read(field(offset, 1), 1),
      u16: (offset) => this.#read(field(offset, 2), 2),
      u32: (offset) => this.#read(field(offset, 4), 4),
      u64: (offset) => {
        const at = field(offset, 8);
        // Spec 4.1.3.1: 64-bit fields are read as two 32-bit accesses, low first.
        const lo = this.#read(at, 4);
        const hi = this.#read(at + 4, 4);
        return hi * 2 ** 32 + lo;
      },
    };
    for (let tries = 0; tries < CONFIG_TRIES; tries++) {
      const before = this.#commonRead(VIRTIO_PCI_COMMON_CFGGENERATION, 1);
      const value = read(reader);
      const after = this.#commonRead(VIRTIO_PCI_COMMON_CFGGENERATION, 1);
      if (before === after) return value;
    }
    throw new VirtioDriverError(
      "config-unstable",
      this.slot,
      `config_generation changed on each of ${CONFIG_TRIES} reads`,
    );
  }

  /**
   * Writes a device config field (e.g. virtio-blk's writeback byte).
   *
   * @throws {VirtioDriverError} "config-range" for a field past the DEVICE structure
   */
  writeConfig(offset: number, size: AccessSize, value: number): void {
    const base = this.structures.deviceAddress;
    const length = this.structures.device?.length ?? 0;
    if (base === null || !Number.isInteger(offset) || offset < 0 || offset + size > length) {
      throw new VirtioDriverError(
        "config-range",
        this.slot,
        `device config field at ${offset} (${size} bytes) is outside the ${length}-byte structure`,
      );
    }
    this.#bus.mmioWrite(base + offset, size, value);
  }

  // ---- Queues and interrupts ----------------------------------------------------------------------

  /**
   * Sets up interrupts and the queues `0..requests.length-1`, then enables them all.
   * Call between {@linkcode negotiate} and {@linkcode driverOk}.
   *
   * @throws {VirtioDriverError} for a queue the device does not have or refuses, a bad notify offset
   * @throws {GuestAllocError} when the allocator has no room for a ring
   */
  setupQueues(
    requests: readonly QueueRequest[],
    callbacks: QueueCallbacks,
    options: QueueSetupOptions = {},
  ): VirtioQueue[] {
    const count = requests.length;
    const available = this.numQueues;
    if (count > available) {
      throw new VirtioDriverError(
        "queue-unavailable",
        this.slot,
        `${count} queues wanted, the device has ${available}`,
      );
    }
    this.#callbacks = callbacks;
    const preference = options.interrupts ?? "auto";
    const plans: InterruptMode[] = preference === "intx"
      ? ["intx"]
      : preference === "msix-shared"
      ? ["msix-shared", "intx"]
      : ["msix-per-queue", "msix-shared", "intx"];
    let entries: (number | null)[] = [];
    for (const plan of plans) {
      const mapped = this.#tryInterrupts(plan, count);
      if (mapped !== null) {
        this.interruptMode = plan;
        entries = mapped;
        break;
      }
    }

    const packed = hasFeature(this.features, VIRTIO_F_RING_PACKED);
    const qf: QueueFeatures = {
      indirect: hasFeature(this.features, VIRTIO_RING_F_INDIRECT_DESC),
      eventIdx: hasFeature(this.features, VIRTIO_RING_F_EVENT_IDX),
    };
    for (let index = 0; index < count; index++) {
      const queue = this.#setupQueue(index, requests[index]!.size, packed, qf);
      queue.msixEntry = entries[index] ?? null;
      queue.vector = queue.msixEntry === null ? null : this.#queueVectorOf(index);
      this.queues.push(queue);
    }
    // Enabling is last: once a queue is enabled only a reset takes it back.
    for (const queue of this.queues) {
      this.#commonWrite(VIRTIO_PCI_COMMON_Q_SELECT, 2, queue.index);
      this.#commonWrite(VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1);
    }
    return this.queues;
  }

  #queueVectorOf(index: number): number | null {
    return this.#queueVectors[index] ?? this.#queueVectors[0] ?? null;
  }

  /**
   * Tries one interrupt plan. Returns the MSI-X entry of each queue (null entries under INTx), or
   * null when the plan does not fit the table or the device refused a vector (then undone).
   */
  #tryInterrupts(plan: InterruptMode, count: number): (number | null)[] | null {
    const irqs = this.#platform.interrupts;
    const msix = this.fn.msix;
    if (plan === "intx") {
      this.#disableMsix();
      setIntxDisabled(this.#bus, this.slot, false);
      this.#removeIntx = irqs.addIntxHandler(() => this.#onIntx());
      return new Array<number | null>(count).fill(null);
    }
    const needed = plan === "msix-per-queue" ? count + 1 : 2;
    if (msix === null || msix.tableSize < needed) return null;

    // Vectors: entry 0 is config changes; queues get 1.. (per queue) or all share entry 1.
    const configVector = irqs.allocateVector(() => this.#onConfig());
    const queueVectors: number[] = [];
    const allocated = [configVector];
    if (plan === "msix-per-queue") {
      for (let q = 0; q < count; q++) {
        const v = irqs.allocateVector(() => this.#onQueue(q));
        queueVectors.push(v);
        allocated.push(v);
      }
    } else {
      const v = irqs.allocateVector(() => {
        for (let q = 0; q < this.queues.length; q++) this.#onQueue(q);
      });
      queueVectors.push(v);
      allocated.push(v);
    }
    // As the PCI core does: enable with the function masked, program the entries, then unmask.
    this.#msixControl(PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL);
    for (let entry = 0; entry < allocated.length; entry++) {
      this.#programMsixEntry(entry, allocated[entry]!);
    }
    this.#msixControl(PCI_MSIX_FLAGS_ENABLE);

    const entries: number[] = [];
    let ok = this.#mapConfigVector(0);
    for (let q = 0; ok && q < count; q++) {
      const entry = plan === "msix-per-queue" ? q + 1 : 1;
      ok = this.#mapQueueVector(q, entry);
      entries.push(entry);
    }
    if (!ok) {
      // Undo: unmap every vector, release the x86 vectors, and let the next plan try.
      this.#commonWrite(VIRTIO_PCI_COMMON_MSIX, 2, VIRTIO_MSI_NO_VECTOR);
      for (let q = 0; q < count; q++) {
        this.#commonWrite(VIRTIO_PCI_COMMON_Q_SELECT, 2, q);
        this.#commonWrite(VIRTIO_PCI_COMMON_Q_MSIX, 2, VIRTIO_MSI_NO_VECTOR);
      }
      for (const v of allocated) irqs.freeVector(v);
      this.#disableMsix();
      return null;
    }
    setIntxDisabled(this.#bus, this.slot, true);
    this.#vectors.push(...allocated);
    this.#configVector = configVector;
    this.#queueVectors = queueVectors;
    return entries;
  }

  #msixControl(bits: number): void {
    const msix = this.fn.msix;
    if (msix === null) return;
    const at = msix.capOffset + PCI_MSIX_FLAGS;
    const old = this.#bus.configRead(this.slot, at, 2) & 0xffff;
    const next = (old & ~(PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)) | bits;
    this.#bus.configWrite(this.slot, at, 2, next);
  }

  #disableMsix(): void {
    this.#msixControl(0);
  }

  #programMsixEntry(entry: number, vector: number): void {
    const msix = this.fn.msix!;
    const at = this.fn.bars[msix.tableBar]!.address + msix.tableOffset + 16 * entry;
    this.#bus.mmioWrite(at, 4, MSI_ADDRESS);
    this.#bus.mmioWrite(at + 4, 4, 0);
    this.#bus.mmioWrite(at + 8, 4, vector);
    this.#bus.mmioWrite(at + 12, 4, 0); // vector control: unmasked
  }

  /** Writes config_msix_vector and reads it back (NO_VECTOR back means the device refused). */
  #mapConfigVector(entry: number): boolean {
    this.#commonWrite(VIRTIO_PCI_COMMON_MSIX, 2, entry);
    return this.#commonRead(VIRTIO_PCI_COMMON_MSIX, 2) === entry;
  }

  #mapQueueVector(queue: number, entry: number): boolean {
    this.#commonWrite(VIRTIO_PCI_COMMON_Q_SELECT, 2, queue);
    this.#commonWrite(VIRTIO_PCI_COMMON_Q_MSIX, 2, entry);
    return this.#commonRead(VIRTIO_PCI_COMMON_Q_MSIX, 2) === entry;
  }

  #setupQueue(index: number, wanted: number, packed: boolean, qf: QueueFeatures): VirtioQueue {
    this.#commonWrite(VIRTIO_PCI_COMMON_Q_SELECT, 2, index);
    const max = this.#commonRead(VIRTIO_PCI_COMMON_Q_SIZE, 2);
    if (max === 0) {
      throw new VirtioDriverError("queue-unavailable", this.slot, `queue ${index} has size 0`);
    }
    if (this.#commonRead(VIRTIO_PCI_COMMON_Q_ENABLE, 2) !== 0) {
      throw new VirtioDriverError(
        "queue-unavailable",
        this.slot,
        `queue ${index} is already enabled before setup`,
      );
    }
    // queue_size is a u16 from the device: clamp to what the spec allows before using it.
    let size = Math.min(max, Math.max(1, Math.floor(wanted)), VIRTQ_MAX_SIZE);
    if (!packed) size = 2 ** Math.floor(Math.log2(size)); // split rings: a power of 2
    this.#commonWrite(VIRTIO_PCI_COMMON_Q_SIZE, 2, size);
    const readBack = this.#commonRead(VIRTIO_PCI_COMMON_Q_SIZE, 2);
    if (readBack !== size) {
      throw new VirtioDriverError(
        "queue-size-refused",
        this.slot,
        `queue ${index}: wrote size ${size} (maximum ${max}), reads back ${readBack}`,
      );
    }
    const notifyOff = this.#commonRead(VIRTIO_PCI_COMMON_Q_NOFF, 2);
    const notify = this.structures.notify;
    const doorbell = notifyOff * notify.multiplier;
    if (doorbell + 2 > notify.length) {
      throw new VirtioDriverError(
        "bad-notify-offset",
        this.slot,
        `queue ${index}: notify offset ${notifyOff} × ${notify.multiplier} is past the ${notify.length}-byte notify structure`,
      );
    }

    const mem = this.#platform.mem;
    const alloc = this.#platform.alloc;
    const bytes = (packed ? packedRingLayout(size, 0) : splitRingLayout(size, 0)).bytes;
    // Page-aligned, as Linux's vring allocation: no ring shares a page with request buffers.
    const base = alloc.alloc(bytes, 4096);
    const layout = packed ? packedRingLayout(size, base) : splitRingLayout(size, base);
    const ring: DriverQueue<number> = packed
      ? new PackedDriverQueue<number>(mem, layout, qf)
      : new SplitDriverQueue<number>(mem, layout, qf);
    this.#write64(VIRTIO_PCI_COMMON_Q_DESCLO, layout.desc);
    this.#write64(VIRTIO_PCI_COMMON_Q_AVAILLO, layout.driver);
    this.#write64(VIRTIO_PCI_COMMON_Q_USEDLO, layout.device);
    return new VirtioQueue(
      this.#bus,
      index,
      ring,
      this.structures.notifyAddress + doorbell,
      base,
    );
  }

  // ---- Interrupt handlers -------------------------------------------------------------------------

  #onQueue(index: number): void {
    const queue = this.queues[index];
    if (queue === undefined) return;
    queue.interrupts++;
    this.#callbacks?.onQueue(index);
  }

  #onConfig(): void {
    this.configInterrupts++;
    const status = this.readStatus();
    if (status === 0xff) {
      this.#markBroken("device_status reads 0xff: the device is gone");
    } else if ((status & VIRTIO_CONFIG_S_NEEDS_RESET) !== 0) {
      this.#markBroken("the device set DEVICE_NEEDS_RESET");
    } else {
      this.#callbacks?.onConfigChange?.();
    }
  }

  /** INTx: the ISR read tells which (and clears it, deasserting our line). */
  #onIntx(): boolean {
    const isr = this.#read(this.structures.isrAddress, 1);
    if (isr === 0) return false;
    if ((isr & VIRTIO_PCI_ISR_CONFIG) !== 0) this.#onConfig();
    if ((isr & VIRTIO_PCI_ISR_QUEUE) !== 0) {
      for (let q = 0; q < this.queues.length; q++) this.#onQueue(q);
    }
    return true;
  }

  /**
   * Marks the device unusable (a front-end found it breaking the ring rules, as Linux's
   * `BAD_RING` marks a virtqueue broken); `onNeedsReset` runs once.
   */
  markBroken(why: string): void {
    this.#markBroken(why);
  }

  #markBroken(why: string): void {
    if (this.#broken !== null) return;
    this.#broken = why;
    this.#callbacks?.onNeedsReset?.();
  }

  /**
   * Reads device_status and marks the driver broken on DEVICE_NEEDS_RESET or all-ones — for callers
   * that stopped seeing progress and want to know whether a config interrupt was missed.
   *
   * @returns why the device is unusable, or null
   */
  checkStatus(): string | null {
    const status = this.readStatus();
    if (status === 0xff) this.#markBroken("device_status reads 0xff: the device is gone");
    else if ((status & VIRTIO_CONFIG_S_NEEDS_RESET) !== 0) {
      this.#markBroken("the device set DEVICE_NEEDS_RESET");
    }
    return this.#broken;
  }

  /** The x86 vector of config changes, or null under INTx. */
  get configVector(): number | null {
    return this.#configVector;
  }

  /**
   * Resets the device, releases vectors, the INTx handler and ring memory. The driver can
   * {@linkcode begin} again afterwards.
   */
  shutdown(): void {
    try {
      this.reset();
    } finally {
      const irqs = this.#platform.interrupts;
      for (const v of this.#vectors) irqs.freeVector(v);
      this.#vectors.length = 0;
      this.#configVector = null;
      this.#queueVectors = [];
      this.#removeIntx?.();
      this.#removeIntx = null;
      this.#disableMsix();
      for (const q of this.queues) this.#platform.alloc.free(q.ringAddress);
      this.queues.length = 0;
      this.interruptMode = null;
      this.#callbacks = null;
    }
  }
}
