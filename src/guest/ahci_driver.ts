/**
 * The guest's AHCI driver (Linux's `drivers/ata/ahci.c` and `libahci.c` with the bits of libata a
 * disk needs, simulated): brings up one port of an AHCI HBA and serves it as a
 * {@linkcode BlockTarget} — with NCQ (READ/WRITE FPDMA QUEUED, up to 32 tags in flight) or one
 * READ/WRITE DMA EXT at a time.
 *
 * Bring-up, as `ahci_init_one` → `ahci_port_start` → `ata_dev_configure`: enable memory decoding
 * and bus mastering; HBA reset (GHC.HR) and GHC.AE; MSI (the capability programmed with a vector
 * from the guest's interrupt controller) or INTx; stop the port's engine, give it a command list
 * (1 KiB aligned), a FIS receive area (256 B aligned) and a command table per slot (128 B
 * aligned) from guest RAM; FRE, clear PxSERR/PxIS, check the link (COMRESET when it is down), set
 * PxIE, GHC.IE and ST; IDENTIFY DEVICE; capacity from the LBA48 words, NCQ from word 76 bit 8 and
 * the queue depth from word 75, TRIM from word 169.
 *
 * **What a request costs in exits.** `commit()` writes every submitted request into its slot's
 * command header and table (guest RAM, no exit) and then issues the batch with one PxSACT write and
 * one PxCI write — the two exits AHCI charges per batch. The interrupt handler reads PxIS, writes it
 * back (ack), writes IS (ack) and reads PxSACT (or PxCI) to learn which tags completed: four exits
 * per interrupt, however many commands it completes. Non-queued commands go one at a time, so each
 * costs its own doorbell and interrupt.
 *
 * Flush (FLUSH CACHE EXT) and discard (DATA SET MANAGEMENT TRIM) are non-queued: they wait until
 * the queued commands before them have completed, and commands after them wait for them.
 *
 * **Errors** (AHCI 1.3.1 §6.2.2, libahci's `ahci_error_handler`): a fatal PxIS bit (TFES, HBFS,
 * HBDS, IFS) stops the port. The handler only notes it; the next `wait()` recovers: reap what
 * completed before the error, clear ST and wait for CR, COMRESET when the device is busy or the
 * error was the HBA's, clear PxSERR/PxIS/IS, set ST, and find the culprit — for an NCQ error
 * through READ LOG EXT page 10h (the tag and the ATA status/error of the failed command), else
 * PxCMD.CCS. The culprit completes with `ioerr` and a detail naming the ATA error bits; every
 * other outstanding request is issued again.
 *
 * The driver talks to the HBA only through registers (the platform's bus), guest RAM and its
 * interrupt vector: it never imports the device. The register map and the ATA numbers are the
 * shared vocabulary of `src/ata/`; the register access and the bring-up steps are in `ahci_hba.ts`.
 *
 * @module
 */

import type { GuestMemory } from "../virtio/memory.ts";
import {
  HOST_AHCI_EN,
  HOST_CAP,
  HOST_CAP_NCQ,
  HOST_CTL,
  HOST_IRQ_EN,
  HOST_IRQ_STAT,
  HOST_PORTS_IMPL,
  PCI_CAP_ID_MSI,
  PORT_CMD,
  PORT_CMD_FIS_ON,
  PORT_CMD_FIS_RX,
  PORT_CMD_ISSUE,
  PORT_CMD_LIST_ON,
  PORT_CMD_START,
  PORT_IRQ_FATAL,
  PORT_IRQ_HBUS_DATA_ERR,
  PORT_IRQ_HBUS_ERR,
  PORT_IRQ_IF_ERR,
  PORT_IRQ_MASK,
  PORT_IRQ_STAT,
  PORT_IRQ_TF_ERR,
  PORT_SCR_ACT,
  PORT_SCR_ERR,
  PORT_TFDATA,
  RX_FIS_D2H_REG,
  SATA_FIS_REG_H2D_UPDATE_COMMAND,
  SATA_FIS_TYPE_REGISTER_H2D,
} from "../ata/ahci_constants.ts";
import {
  ATA_BUSY,
  ATA_CMD_DATA_SET_MANAGEMENT,
  ATA_CMD_FLUSH_CACHE_EXT,
  ATA_CMD_IDENTIFY_DEVICE,
  ATA_CMD_READ_DMA_EXT,
  ATA_CMD_READ_FPDMA_QUEUED,
  ATA_CMD_READ_LOG_EXT,
  ATA_CMD_WRITE_DMA_EXT,
  ATA_CMD_WRITE_FPDMA_QUEUED,
  ATA_DRQ,
  ATA_DSM_RANGE_MAX,
  ATA_DSM_TRIM,
  ATA_ERR,
  ATA_LBA,
  ATA_LOG_NCQ_NQ,
  ATA_LOG_SATA_NCQ,
  ATA_MAX_SECTORS_LBA48,
  ATA_MAX_TRIM_RNUM,
  ATA_SECT_SIZE,
} from "../ata/constants.ts";
import {
  abarOf,
  AhciDriverError,
  type AhciIdentity,
  choosePort,
  clearFis,
  comReset,
  describeError,
  hex,
  HostRegisters,
  parseIdentify,
  PortMemory,
  PortRegisters,
  resetHba,
  setLba,
  settle,
  setupInterrupts,
  startPort,
  TWO_32,
} from "./ahci_hba.ts";
import type { BlockTarget, IoRequest, IoStatus } from "./block_target.ts";
import { enableFunction, type PciFunctionInfo } from "./pci_probe.ts";
import { SlotRequest } from "./queue_target.ts";
import type { GuestPlatform } from "./virtio_driver.ts";

export {
  AhciDriverError,
  type AhciDriverErrorKind,
  type AhciIdentity,
  parseIdentify,
} from "./ahci_hba.ts";

// Request states.
const FREE = 0;
const ACQUIRED = 1;
const PENDING = 2; // submitted, not yet issued
const ISSUED = 3;
const COMPLETED = 4;

/** Options of {@linkcode AhciDriver.open}. */
export interface AhciDriverOptions {
  /** Requests (and command slots) of the target: 1..32, default 32 (NCQ: capped by the disk's). */
  readonly depth?: number;
  /** Use NCQ when the HBA and the disk support it (default true); else DMA EXT one at a time. */
  readonly ncq?: boolean;
  /** Requests stop completing for this long: `wait` throws (default 30 s, as libata's). */
  readonly timeoutMs?: number;
  /** The port to drive (default: the first implemented port with a disk). */
  readonly port?: number;
  /** Largest read/write in bytes (default 128 KiB; a multiple of 512, at most 32 MiB). */
  readonly maxTransfer?: number;
  /** Interrupts: MSI when the HBA has it (default "auto"), or INTx. */
  readonly interrupts?: "auto" | "intx";
  /** Reset the whole HBA first (default true; false when another driver owns its other ports). */
  readonly hbaReset?: boolean;
}

/** Counters of an {@linkcode AhciDriver}. */
export interface AhciDriverStats {
  /** Requests sent to the device (not the ones the guest answered itself). */
  commands: number;
  /** Of them, READ/WRITE FPDMA QUEUED. */
  ncqCommands: number;
  /** Batches issued: PxCI writes of `commit()` and of the interrupt handler. */
  doorbells: number;
  /** Most commands one doorbell (PxCI write) issued. */
  largestBatch: number;
  /** Requests completed (the ones the guest answered itself too). */
  completions: number;
  /** Interrupts handled (PxIS was non-zero). */
  interrupts: number;
  /** Interrupts that found PxIS zero. */
  spurious: number;
  /** Requests that completed with an error the device reported. */
  errors: number;
  /** Port recoveries after a fatal error. */
  recoveries: number;
  /** Requests issued again after another request's error stopped the port. */
  retries: number;
  /** The driver's register reads (each a VM exit). */
  registerReads: number;
  /** The driver's register writes (each a VM exit). */
  registerWrites: number;
}

/**
 * One port of an AHCI HBA as a {@linkcode BlockTarget}: request `i` owns command slot `i` (and, with
 * NCQ, tag `i`), its command table and a `maxTransfer`-byte data buffer in guest RAM.
 *
 * Requests the guest answers itself complete at once: ranges past the capacity (ioerr),
 * write-zeroes (unsupp: ATA has no such command the driver uses), discard without TRIM (unsupp),
 * get-id (the serial number from IDENTIFY). `submit()` throws a RangeError for a length that is not
 * a multiple of 512 or exceeds the maximum.
 *
 * @example
 * ```ts ignore
 * const fn = scanBus(platform.bus).functions.find((f) => f.classCode === 0x0106)!;
 * const disk = await AhciDriver.open(platform, fn, { depth: 32 });
 * await runOne(disk, (r) => { r.op = "read"; r.offset = 0; r.length = 4096; });
 * ```
 */
export class AhciDriver implements BlockTarget {
  /** Capacity in bytes. */
  readonly capacity: number;
  /** Always 512. */
  readonly blockSize: number = ATA_SECT_SIZE;
  /** ATA disks have no write protection the driver can see: a refused write fails with ioerr. */
  readonly readOnly: boolean = false;
  /** Requests, 1..32: request `i` owns command slot (and NCQ tag) `i`. */
  readonly depth: number;
  /** Largest read or write in bytes. */
  readonly maxTransfer: number;
  /** Largest discard: one TRIM block of 64 ranges of 65535 sectors; 0 without TRIM. */
  readonly maxDiscard: number;
  /** Write-zeroes is not offered. */
  readonly maxWriteZeroes: number = 0;
  /** IDENTIFY model number. */
  readonly model: string;
  /** IDENTIFY serial number. */
  readonly serial: string;
  /** What IDENTIFY said. */
  readonly identity: AhciIdentity;
  /** Requests go out as READ/WRITE FPDMA QUEUED. */
  readonly ncq: boolean;
  /** The port driven. */
  readonly port: number;
  /** The HBA's PCI slot. */
  readonly slot: number;
  /** "msi" or "intx". */
  readonly interruptMode: "msi" | "intx";
  /** Counters. */
  readonly stats: AhciDriverStats;

  readonly #hw: PortRegisters;
  readonly #platform: GuestPlatform;
  readonly #ram: DataView;
  readonly #mem: GuestMemory;
  readonly #timeoutMs: number;
  readonly #memory: PortMemory;
  readonly #requests: SlotRequest[] = [];
  readonly #state: Uint8Array;
  /** Submitted requests not yet issued: a ring of request indexes (push front on retry). */
  readonly #pending: Int32Array;
  #pendingHead = 0;
  #pendingCount = 0;
  /** Completed requests waiting to be reaped: a ring. */
  readonly #done: Int32Array;
  #doneHead = 0;
  #doneCount = 0;
  readonly #free: Int32Array;
  #freeCount: number;
  #inFlight = 0;
  /** Queued commands issued and not completed. */
  #ncqOutstanding = 0;
  /** The issued non-queued command's slot, or -1. */
  #running = -1;
  /** Fatal PxIS bits the handler saw; the next wait() recovers. */
  #errorIs = 0;
  /** Set while bring-up or recovery polls: the handler only acknowledges. */
  #quiet = false;
  #recovery: Promise<void> | null = null;
  #completions = 0;
  #seenCompletions = -1;
  #progressAt = 0;
  #release: () => void = () => {};
  #closed = false;

  private constructor(
    platform: GuestPlatform,
    hw: PortRegisters,
    memory: PortMemory,
    setup: {
      identity: AhciIdentity;
      ncq: boolean;
      depth: number;
      maxTransfer: number;
      timeoutMs: number;
      interruptMode: "msi" | "intx";
      stats: AhciDriverStats;
    },
  ) {
    this.stats = setup.stats;
    this.#platform = platform;
    this.#mem = platform.mem;
    this.#ram = new DataView(platform.mem.buffer);
    this.#hw = hw;
    this.#memory = memory;
    this.port = hw.port;
    this.slot = hw.slot;
    this.identity = setup.identity;
    this.model = setup.identity.model;
    this.serial = setup.identity.serial;
    this.capacity = setup.identity.sectors * ATA_SECT_SIZE;
    this.ncq = setup.ncq;
    this.depth = setup.depth;
    this.maxTransfer = setup.maxTransfer;
    this.maxDiscard = setup.identity.trim
      ? ATA_MAX_TRIM_RNUM * ATA_DSM_RANGE_MAX * ATA_SECT_SIZE
      : 0;
    this.#timeoutMs = setup.timeoutMs;
    this.interruptMode = setup.interruptMode;
    const depth = setup.depth;
    this.#state = new Uint8Array(depth);
    this.#pending = new Int32Array(depth);
    this.#done = new Int32Array(depth);
    this.#free = new Int32Array(depth);
    for (let i = 0; i < depth; i++) {
      this.#requests.push(
        new SlotRequest(i, platform.mem.slice(memory.data(i), setup.maxTransfer)),
      );
      this.#free[i] = depth - 1 - i;
    }
    this.#freeCount = depth;
  }

  /**
   * Brings up the HBA in `fn` and one of its ports, and identifies the disk.
   *
   * @throws {AhciDriverError} when the function is not AHCI, no port has a disk, the port does not
   *   come up, or IDENTIFY fails
   * @throws {PciProbeError} when memory decoding or bus mastering does not stick
   * @throws {GuestAllocError} when guest RAM for the command structures runs out
   * @throws {RangeError} for options out of range
   */
  static async open(
    platform: GuestPlatform,
    fn: PciFunctionInfo,
    options: AhciDriverOptions = {},
  ): Promise<AhciDriver> {
    const slot = fn.slot;
    const abar = abarOf(fn);
    const depthWanted = options.depth ?? 32;
    const maxTransfer = options.maxTransfer ?? 128 * 1024;
    if (!Number.isInteger(depthWanted) || depthWanted < 1 || depthWanted > 32) {
      throw new RangeError(`AHCI depth ${depthWanted} is not 1..32`);
    }
    if (
      !Number.isInteger(maxTransfer) || maxTransfer < ATA_SECT_SIZE ||
      maxTransfer % ATA_SECT_SIZE !== 0 ||
      maxTransfer > ATA_MAX_SECTORS_LBA48 * ATA_SECT_SIZE
    ) {
      throw new RangeError(
        `AHCI transfer size ${maxTransfer} is not a multiple of 512 up to 32 MiB`,
      );
    }
    const bus = platform.bus;
    const useIntx = options.interrupts === "intx" ||
      !fn.capabilities.some((c) => c.id === PCI_CAP_ID_MSI);
    enableFunction(bus, slot, { intx: useIntx });
    const stats = emptyDriverStats();
    const host = new HostRegisters(bus, abar, slot, stats);
    const timeoutMs = options.timeoutMs ?? 30_000;

    await resetHba(platform, host, options.hbaReset ?? true);
    const cap = host.read(HOST_CAP);
    const pi = host.read(HOST_PORTS_IMPL);
    const port = choosePort(host, pi, options.port);
    const hw = new PortRegisters(host, port);

    const memory = PortMemory.allocate(platform, depthWanted, maxTransfer);
    let release = () => memory.free();
    try {
      let driver: AhciDriver | null = null;
      const irq = setupInterrupts(
        platform,
        fn,
        () => (driver === null ? false : driver.#interrupt()),
        useIntx,
      );
      const interruptMode = irq.mode;
      const freeMemory = release;
      release = () => {
        irq.release();
        freeMemory();
      };

      await startPort(platform, hw, memory);
      host.write(HOST_CTL, HOST_AHCI_EN | HOST_IRQ_EN);
      hw.write(PORT_CMD, hw.read(PORT_CMD) | PORT_CMD_START);

      const placeholder = {
        identity: EMPTY_IDENTITY,
        ncq: false,
        depth: depthWanted,
        maxTransfer,
        timeoutMs,
        interruptMode,
        stats,
      };
      // IDENTIFY runs through the driver's internal-command path, before the target is sized.
      const probe = new AhciDriver(platform, hw, memory, placeholder);
      driver = probe;
      const raw = await probe.#identify();
      const identity = parseIdentify(raw);
      if (identity.sectors === 0) {
        throw new AhciDriverError("identify-failed", slot, "IDENTIFY reports a capacity of 0");
      }
      const ncq = (options.ncq ?? true) && (cap & HOST_CAP_NCQ) !== 0 && identity.ncq;
      const slots = ((cap >>> 8) & 0x1f) + 1;
      const depth = Math.min(depthWanted, slots, ncq ? identity.queueDepth : 32);
      driver = new AhciDriver(platform, hw, memory, {
        identity,
        ncq,
        depth,
        maxTransfer,
        timeoutMs,
        interruptMode,
        stats,
      });
      driver.#release = release;
      return driver;
    } catch (error) {
      hw.write(PORT_CMD, hw.read(PORT_CMD) & ~(PORT_CMD_START | PORT_CMD_FIS_RX));
      release();
      throw error;
    }
  }

  // ---- BlockTarget ----------------------------------------------------------------------------

  /** Requests submitted and not yet reaped. */
  get inFlight(): number {
    return this.#inFlight;
  }

  /** A free request, or null when all `depth` are in use. */
  acquire(): IoRequest | null {
    if (this.#freeCount === 0 || this.#closed) return null;
    const index = this.#free[--this.#freeCount]!;
    this.#state[index] = ACQUIRED;
    return this.#requests[index]!;
  }

  /**
   * Queues a filled request; requests the guest answers itself complete at once.
   *
   * @throws {RangeError} for a request not acquired from this target, an offset or length that is
   *   not a multiple of 512, or a length past the maximum
   */
  submit(request: IoRequest): void {
    const index = request.index;
    const r = this.#requests[index];
    if (r === undefined || r !== request || this.#state[index] !== ACQUIRED) {
      throw new RangeError(`Request ${index} was not acquired from this target`);
    }
    r.written = 0;
    r.detail = "";
    const local = this.#local(r);
    r.status = "pending";
    this.#inFlight++;
    if (local !== null) {
      r.status = local;
      this.#complete(index);
      return;
    }
    this.#state[index] = PENDING;
    this.#pendingPush(index);
  }

  /** Issues every submitted request the port can take now: one PxSACT and one PxCI write. */
  commit(): void {
    this.#kick();
  }

  /** A completed request, or null. Takes interrupts that arrived meanwhile first. */
  reap(): IoRequest | null {
    if (this.#doneCount === 0) {
      this.#platform.interrupts.dispatchPending();
      if (this.#doneCount === 0) return null;
    }
    const index = this.#done[this.#doneHead]!;
    this.#doneHead = (this.#doneHead + 1) % this.depth;
    this.#doneCount--;
    this.#inFlight--;
    return this.#requests[index]!;
  }

  /** Gives a reaped request back. */
  release(request: IoRequest): void {
    const index = request.index;
    if (this.#requests[index] !== request || this.#state[index] !== COMPLETED) {
      throw new RangeError(`Request ${index} is not a reaped request of this target`);
    }
    this.#state[index] = FREE;
    this.#free[this.#freeCount++] = index;
  }

  /**
   * Waits for a completion: recovers the port after an error, else idles and takes interrupts.
   *
   * @throws {AhciDriverError} when nothing completed for the request timeout, or the port cannot
   *   be recovered
   */
  wait(): void | Promise<void> {
    if (this.#doneCount > 0) return;
    if (this.#recovery !== null) return this.#recovery;
    if (this.#errorIs !== 0) return this.#recover();
    if (this.#inFlight === 0) return;
    const idle = this.#platform.idle();
    if (idle instanceof Promise) return idle.then(() => this.#afterIdle());
    return this.#afterIdle();
  }

  #afterIdle(): void | Promise<void> {
    this.#platform.interrupts.dispatchPending();
    if (this.#errorIs !== 0) return this.#recover();
    const now = performance.now();
    if (this.#completions !== this.#seenCompletions || this.#doneCount > 0) {
      this.#seenCompletions = this.#completions;
      this.#progressAt = now;
      return;
    }
    if (now - this.#progressAt < this.#timeoutMs) return;
    throw new AhciDriverError(
      "request-timeout",
      this.slot,
      `port ${this.port}: ${this.#inFlight} requests without a completion for ${this.#timeoutMs} ms`,
    );
  }

  /**
   * Stops the port (ST and FRE cleared, interrupts masked) and frees its guest memory and vector.
   *
   * @throws {RangeError} while requests are in flight
   */
  async close(): Promise<void> {
    if (this.#closed) return;
    if (this.#inFlight !== 0) {
      throw new RangeError(`Cannot close an AHCI target with ${this.#inFlight} requests in flight`);
    }
    this.#closed = true;
    const hw = this.#hw;
    hw.write(PORT_IRQ_MASK, 0);
    hw.write(PORT_CMD, hw.read(PORT_CMD) & ~PORT_CMD_START);
    await settle(this.#platform, () => (hw.read(PORT_CMD) & PORT_CMD_LIST_ON) === 0, () => {});
    hw.write(PORT_CMD, hw.read(PORT_CMD) & ~PORT_CMD_FIS_RX);
    await settle(this.#platform, () => (hw.read(PORT_CMD) & PORT_CMD_FIS_ON) === 0, () => {});
    this.#release();
  }

  /**
   * Stops the port at once (interrupts masked, ST and FRE cleared) and frees its guest memory and
   * vector, without waiting for PxCMD.CR and FR: with nothing in flight the engine has nothing to
   * finish. {@linkcode close} is the patient version.
   *
   * @throws {RangeError} while requests are in flight
   */
  shutdown(): void {
    if (this.#closed) return;
    if (this.#inFlight !== 0) {
      throw new RangeError(
        `Cannot shut down an AHCI target with ${this.#inFlight} requests in flight`,
      );
    }
    this.#closed = true;
    const hw = this.#hw;
    hw.write(PORT_IRQ_MASK, 0);
    hw.write(PORT_CMD, hw.read(PORT_CMD) & ~(PORT_CMD_START | PORT_CMD_FIS_RX));
    this.#release();
  }

  // ---- building and issuing commands ------------------------------------------------------------

  /** A status the guest answers itself, or null to send the request to the device. */
  #local(r: SlotRequest): IoStatus | null {
    const { offset, length } = r;
    switch (r.op) {
      case "read":
      case "write":
        this.#checkLength(r, this.maxTransfer);
        if (offset + length > this.capacity) return local(r, "ioerr", "beyond the capacity");
        return null;
      case "flush":
        return null;
      case "discard":
        if (this.maxDiscard === 0) return local(r, "unsupp", "the disk does not support TRIM");
        this.#checkLength(r, this.maxDiscard);
        if (offset + length > this.capacity) return local(r, "ioerr", "beyond the capacity");
        return null;
      case "write-zeroes":
        return local(r, "unsupp", "AHCI disks take no write-zeroes command");
      case "get-id": {
        const id = new TextEncoder().encode(this.serial.slice(0, 20));
        r.data.fill(0, 0, 20);
        r.data.set(id);
        r.written = 20;
        return "ok";
      }
      default:
        throw new RangeError(`Unknown operation ${String(r.op)}`);
    }
  }

  #checkLength(r: IoRequest, limit: number): void {
    const { offset, length } = r;
    if (
      !Number.isSafeInteger(offset) || offset < 0 || offset % ATA_SECT_SIZE !== 0 ||
      !Number.isSafeInteger(length) || length <= 0 || length % ATA_SECT_SIZE !== 0 || length > limit
    ) {
      throw new RangeError(
        `${r.op} at ${offset}+${length}: offset and length must be multiples of 512, length 1..${limit}`,
      );
    }
  }

  /**
   * Writes every pending request the port can take into its slot and rings the doorbell once.
   * Queued commands go out together; a non-queued one goes alone, once nothing else is
   * outstanding, and holds back what follows it.
   */
  #kick(): void {
    if (this.#quiet || this.#recovery !== null || this.#errorIs !== 0 || this.#closed) return;
    let sact = 0;
    let ci = 0;
    while (this.#pendingCount > 0 && this.#running < 0) {
      const index = this.#pending[this.#pendingHead]!;
      const r = this.#requests[index]!;
      const queued = this.ncq && (r.op === "read" || r.op === "write");
      if (!queued && (this.#ncqOutstanding !== 0 || ci !== 0)) break;
      this.#pendingHead = (this.#pendingHead + 1) % this.depth;
      this.#pendingCount--;
      this.#build(index, r, queued);
      this.#state[index] = ISSUED;
      this.stats.commands++;
      const bit = 1 << index;
      ci |= bit;
      if (queued) {
        this.stats.ncqCommands++;
        sact |= bit;
        this.#ncqOutstanding |= bit;
      } else {
        this.#running = index;
      }
    }
    if (sact !== 0) this.#hw.write(PORT_SCR_ACT, sact >>> 0);
    if (ci !== 0) {
      const stats = this.stats;
      stats.doorbells++;
      const batch = popcount(ci);
      if (batch > stats.largestBatch) stats.largestBatch = batch;
      this.#hw.write(PORT_CMD_ISSUE, ci >>> 0);
    }
  }

  /** Fills slot `index`'s command header, command FIS and PRDT for request `r`. */
  #build(index: number, r: SlotRequest, queued: boolean): void {
    const ram = this.#ram;
    const m = this.#memory;
    const table = m.tableAt[index]!;
    const sectors = r.length / ATA_SECT_SIZE;
    const lba = r.offset / ATA_SECT_SIZE;
    let write = false;
    let prdBytes = 0;
    let prdAddress = m.data(index);
    clearFis(ram, table);
    ram.setUint8(table, SATA_FIS_TYPE_REGISTER_H2D);
    ram.setUint8(table + 1, SATA_FIS_REG_H2D_UPDATE_COMMAND);
    ram.setUint8(table + 7, ATA_LBA);
    switch (r.op) {
      case "read":
      case "write": {
        write = r.op === "write";
        prdBytes = r.length;
        setLba(ram, table, lba);
        const count = sectors === ATA_MAX_SECTORS_LBA48 ? 0 : sectors;
        if (queued) {
          ram.setUint8(table + 2, write ? ATA_CMD_WRITE_FPDMA_QUEUED : ATA_CMD_READ_FPDMA_QUEUED);
          ram.setUint8(table + 3, count & 0xff); // FPDMA: sector count in the features field
          ram.setUint8(table + 11, count >>> 8);
          ram.setUint8(table + 12, index << 3); // the tag, in count bits 7:3
        } else {
          ram.setUint8(table + 2, write ? ATA_CMD_WRITE_DMA_EXT : ATA_CMD_READ_DMA_EXT);
          ram.setUint8(table + 12, count & 0xff);
          ram.setUint8(table + 13, count >>> 8);
        }
        break;
      }
      case "flush":
        ram.setUint8(table + 2, ATA_CMD_FLUSH_CACHE_EXT);
        break;
      case "discard": {
        write = true;
        prdBytes = ATA_SECT_SIZE;
        prdAddress = m.dsm(index);
        const dsmAt = m.dsmAt[index]!;
        for (let i = 0; i < ATA_MAX_TRIM_RNUM * 2; i++) ram.setUint32(dsmAt + i * 4, 0, true);
        let first = lba;
        let left = sectors;
        for (let i = 0; left > 0; i++) {
          const n = Math.min(left, ATA_DSM_RANGE_MAX);
          ram.setUint32(dsmAt + i * 8, first % TWO_32, true);
          ram.setUint32(dsmAt + i * 8 + 4, (Math.floor(first / TWO_32) & 0xffff) | (n << 16), true);
          first += n;
          left -= n;
        }
        ram.setUint8(table + 2, ATA_CMD_DATA_SET_MANAGEMENT);
        ram.setUint8(table + 3, ATA_DSM_TRIM);
        ram.setUint8(table + 12, 1); // one 512-byte block of ranges
        break;
      }
      default:
        throw new RangeError(`Unknown operation ${String(r.op)}`);
    }
    this.#memory.writeHeader(index, write, prdAddress, prdBytes);
  }

  // ---- completion -----------------------------------------------------------------------------

  /**
   * The interrupt handler (libahci's `ahci_port_intr`): read PxIS, acknowledge it and the port's IS
   * bit, then read PxSACT (or PxCI) and complete what cleared. A fatal cause is left to `wait()`.
   */
  #interrupt(): boolean {
    const hw = this.#hw;
    const status = hw.read(PORT_IRQ_STAT);
    if (status === 0) {
      this.stats.spurious++;
      return false;
    }
    hw.write(PORT_IRQ_STAT, status);
    hw.host.write(HOST_IRQ_STAT, 1 << this.port);
    this.stats.interrupts++;
    if ((status & PORT_IRQ_FATAL) !== 0) this.#errorIs |= status & PORT_IRQ_FATAL;
    if (this.#quiet || this.#errorIs !== 0) return true;
    if (this.#harvest() && this.#pendingCount > 0) this.#kick();
    return true;
  }

  /** Completes the issued commands whose PxSACT / PxCI bits cleared; true when some did. */
  #harvest(): boolean {
    let any = false;
    if (this.#ncqOutstanding !== 0) {
      const active = this.#hw.read(PORT_SCR_ACT);
      const done = (this.#ncqOutstanding & ~active) >>> 0;
      this.#ncqOutstanding = (this.#ncqOutstanding & active) >>> 0;
      for (let bits = done; bits !== 0; bits &= bits - 1) {
        this.#finish(31 - Math.clz32(bits & -bits), "ok", "");
        any = true;
      }
    }
    if (this.#running >= 0) {
      const issued = this.#hw.read(PORT_CMD_ISSUE);
      if ((issued & (1 << this.#running)) === 0) {
        const index = this.#running;
        this.#running = -1;
        // The D2H FIS of a non-queued command carries its status; an ERR raised TFES anyway.
        const status = this.#ram.getUint8(this.#memory.fisAt + RX_FIS_D2H_REG + 2);
        if ((status & ATA_ERR) !== 0) this.#finish(index, "ioerr", `ATA status 0x${hex(status)}`);
        else this.#finish(index, "ok", "");
        any = true;
      }
    }
    return any;
  }

  #finish(index: number, status: IoStatus, detail: string): void {
    const r = this.#requests[index]!;
    if (this.#state[index] !== ISSUED) return;
    r.status = status;
    r.detail = detail;
    if (status === "ok" && (r.op === "read" || r.op === "write")) r.written = r.length;
    if (status === "ioerr") this.stats.errors++;
    this.#complete(index);
  }

  #complete(index: number): void {
    this.#state[index] = COMPLETED;
    this.#completions++;
    this.stats.completions++;
    this.#done[(this.#doneHead + this.#doneCount) % this.depth] = index;
    this.#doneCount++;
  }

  #pendingPush(index: number): void {
    this.#pending[(this.#pendingHead + this.#pendingCount) % this.depth] = index;
    this.#pendingCount++;
  }

  #pendingPushFront(index: number): void {
    this.#pendingHead = (this.#pendingHead - 1 + this.depth) % this.depth;
    this.#pending[this.#pendingHead] = index;
    this.#pendingCount++;
  }

  // ---- internal commands and recovery ----------------------------------------------------------

  /** IDENTIFY DEVICE into the internal buffer. */
  async #identify(): Promise<Uint8Array> {
    const ok = await this.#internal(ATA_CMD_IDENTIFY_DEVICE, 0, 0);
    if (!ok) {
      throw new AhciDriverError(
        "identify-failed",
        this.slot,
        `IDENTIFY DEVICE failed on port ${this.port} (PxTFD 0x${hex(this.#hw.read(PORT_TFDATA))})`,
      );
    }
    return this.#mem.slice(this.#memory.internal, ATA_SECT_SIZE).slice();
  }

  /**
   * Runs a non-queued PIO data-in command (512 bytes into the internal buffer) in slot 0 and polls
   * PxCI for its end; nothing else may be outstanding. False when the port reported an error (the
   * port is restarted).
   */
  async #internal(command: number, lba: number, count: number): Promise<boolean> {
    const ram = this.#ram;
    const table = this.#memory.tableAt[0]!;
    clearFis(ram, table);
    ram.setUint8(table, SATA_FIS_TYPE_REGISTER_H2D);
    ram.setUint8(table + 1, SATA_FIS_REG_H2D_UPDATE_COMMAND);
    ram.setUint8(table + 2, command);
    ram.setUint8(table + 7, ATA_LBA);
    setLba(ram, table, lba);
    ram.setUint8(table + 12, count);
    this.#memory.writeHeader(0, false, this.#memory.internal, ATA_SECT_SIZE);
    const quiet = this.#quiet;
    this.#quiet = true;
    try {
      this.#hw.write(PORT_CMD_ISSUE, 1);
      let done = false;
      await settle(this.#platform, () => {
        this.#platform.interrupts.dispatchPending();
        if (this.#errorIs !== 0) return true;
        done = (this.#hw.read(PORT_CMD_ISSUE) & 1) === 0;
        return done;
      }, () => {
        throw new AhciDriverError(
          "request-timeout",
          this.slot,
          `port ${this.port}: internal command 0x${hex(command)} did not complete`,
        );
      }, this.#timeoutMs);
      if (this.#errorIs === 0) return done;
      this.#errorIs = 0;
      await this.#restartPort(false);
      return false;
    } finally {
      this.#quiet = quiet;
    }
  }

  /** Runs the recovery once; concurrent waiters share it. */
  #recover(): Promise<void> {
    if (this.#recovery === null) {
      this.#recovery = this.#doRecover().finally(() => {
        this.#recovery = null;
      });
    }
    return this.#recovery;
  }

  async #doRecover(): Promise<void> {
    const hw = this.#hw;
    this.#quiet = true;
    const cause = this.#errorIs;
    this.stats.recoveries++;
    try {
      const tfd = hw.read(PORT_TFDATA);
      const ccs = (hw.read(PORT_CMD) >>> 8) & 0x1f;
      // Completions that made it out before the error are good.
      this.#harvest();
      const queued = this.#ncqOutstanding;
      const running = this.#running;
      this.#errorIs = 0;
      const hostBus =
        (cause & (PORT_IRQ_HBUS_ERR | PORT_IRQ_HBUS_DATA_ERR | PORT_IRQ_IF_ERR)) !== 0;
      await this.#restartPort(hostBus || (tfd & (ATA_BUSY | ATA_DRQ)) !== 0);
      let culprit = -1;
      let status = tfd & 0xff;
      let error = (tfd >>> 8) & 0xff;
      if ((cause & PORT_IRQ_TF_ERR) !== 0 && queued !== 0) {
        // ata_eh_read_log_10h: which queued command failed, and how.
        if (await this.#internal(ATA_CMD_READ_LOG_EXT, ATA_LOG_SATA_NCQ, 1)) {
          const log = this.#mem.slice(this.#memory.internal, ATA_SECT_SIZE);
          if ((log[0]! & ATA_LOG_NCQ_NQ) === 0) culprit = log[0]! & 0x1f;
          status = log[2]!;
          error = log[3]!;
        }
      } else if (running >= 0) {
        culprit = running;
      } else if (((queued >>> ccs) & 1) !== 0) {
        culprit = ccs;
      }
      const detail = describeError(cause, status, error);
      const outstanding = (queued | (running >= 0 ? 1 << running : 0)) >>> 0;
      this.#ncqOutstanding = 0;
      this.#running = -1;
      if (culprit < 0 || ((outstanding >>> culprit) & 1) === 0) {
        // Nobody to blame: every outstanding command shares the error.
        for (let bits = outstanding; bits !== 0; bits &= bits - 1) {
          this.#finish(31 - Math.clz32(bits & -bits), "ioerr", detail);
        }
      } else {
        this.#finish(culprit, "ioerr", detail);
        // The rest were aborted by the stop, not failed: issue them again, in slot order (pushed
        // to the front highest first).
        for (let index = 31; index >= 0; index--) {
          if (index === culprit || ((outstanding >>> index) & 1) === 0) continue;
          this.#state[index] = PENDING;
          this.#pendingPushFront(index);
          this.stats.retries++;
        }
      }
    } finally {
      this.#quiet = false;
    }
    this.#recovery = null;
    this.#kick();
  }

  /**
   * Stops the engine (ST clear, CR clear), resets the link when asked or when the device stays
   * busy, clears PxSERR/PxIS/IS and starts it again (libahci's `ahci_stop_engine`,
   * `ahci_do_hardreset`, `ahci_start_engine`).
   */
  async #restartPort(comreset: boolean): Promise<void> {
    const hw = this.#hw;
    const platform = this.#platform;
    hw.write(PORT_CMD, hw.read(PORT_CMD) & ~PORT_CMD_START);
    await settle(platform, () => (hw.read(PORT_CMD) & PORT_CMD_LIST_ON) === 0, () => {
      throw new AhciDriverError("reset-timeout", this.slot, `port ${this.port}: CR stays set`);
    });
    if (comreset || (hw.read(PORT_TFDATA) & (ATA_BUSY | ATA_DRQ)) !== 0) {
      await comReset(platform, hw);
    }
    hw.write(PORT_SCR_ERR, 0xffffffff);
    hw.write(PORT_IRQ_STAT, 0xffffffff);
    hw.host.write(HOST_IRQ_STAT, 1 << this.port);
    this.#errorIs = 0;
    hw.write(PORT_CMD, hw.read(PORT_CMD) | PORT_CMD_START);
  }
}

// ---- helpers ---------------------------------------------------------------------------------------

function emptyDriverStats(): AhciDriverStats {
  return {
    commands: 0,
    ncqCommands: 0,
    doorbells: 0,
    largestBatch: 0,
    completions: 0,
    interrupts: 0,
    spurious: 0,
    errors: 0,
    recoveries: 0,
    retries: 0,
    registerReads: 0,
    registerWrites: 0,
  };
}

const EMPTY_IDENTITY: AhciIdentity = {
  sectors: 0,
  model: "",
  serial: "",
  firmware: "",
  ncq: false,
  queueDepth: 1,
  trim: false,
  writeCache: false,
};

/** Set bits of a 32-bit mask. */
function popcount(mask: number): number {
  let n = 0;
  for (let bits = mask >>> 0; bits !== 0; bits &= bits - 1) n++;
  return n;
}

/** Completes a request without the device: sets its detail and returns `status`. */
function local(r: IoRequest, status: IoStatus, detail: string): IoStatus {
  r.detail = detail;
  return status;
}
