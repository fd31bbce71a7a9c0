/**
 * The synchronous exit channel between a vCPU Worker and the VMM thread: the vCPU's
 * {@linkcode GuestBus} turns every PCI configuration access and every MMIO access into an "exit"
 * through a `SharedArrayBuffer` mailbox and blocks until the VMM answers, as a KVM vCPU thread
 * returns from `KVM_RUN` with `KVM_EXIT_MMIO`.
 *
 * - {@linkcode ExitChannel}: the shared words — mailbox, counters, the ioeventfd table and the
 *   driver-side queue counters a guest reports. Both sides build one over the same buffer.
 * - {@linkcode ExitBus}: the vCPU side, a {@linkcode GuestBus}. Doorbell writes that hit the
 *   ioeventfd table ring the device's {@linkcode Doorbells} word directly, without an exit.
 * - {@linkcode ExitServer}: the VMM side; it sleeps with `Atomics.waitAsync`, so the VMM thread's
 *   event loop stays free while no exit is pending.
 * - {@linkcode VcpuBoot} / {@linkcode runVcpu}: how a vCPU Worker is started and answers.
 *
 * Nothing here can hang: the vCPU waits for an answer at most `timeoutMs` and then throws
 * {@linkcode ExitError}; a closed channel fails every exit at once.
 *
 * @module
 */

import type { AccessSize, GuestBus } from "./bus.ts";
import { Doorbells } from "./doorbell.ts";
import { VcpuInterrupts } from "./interrupts.ts";
import { GuestMemory, type GuestRegion } from "./memory.ts";
import type { QueueStats } from "./queue.ts";

// ---- Mailbox layout (Int32 words) ------------------------------------------------------------------

/** Mailbox state word values. */
const S_IDLE = 0;
const S_REQUEST = 1;
const S_RESPONSE = 2;
const S_CLOSED = 3;

/** Exit kind: PCI configuration read. */
export const EXIT_CONFIG_READ = 1;
/** Exit kind: PCI configuration write. */
export const EXIT_CONFIG_WRITE = 2;
/** Exit kind: MMIO read. */
export const EXIT_MMIO_READ = 3;
/** Exit kind: MMIO write. */
export const EXIT_MMIO_WRITE = 4;
/** Exit kind: port I/O read (IN). */
export const EXIT_IO_READ = 5;
/** Exit kind: port I/O write (OUT). */
export const EXIT_IO_WRITE = 6;
/** What an exit asks for. */
export type ExitKind = 1 | 2 | 3 | 4 | 5 | 6;

const W_STATE = 0;
const W_KIND = 1;
const W_SIZE = 2;
const W_SLOT = 3;
const W_ADDR_LO = 4;
const W_ADDR_HI = 5;
const W_VALUE = 6;
const W_SEQ = 7;
const W_STATUS = 8; // response: 0 ok, 1 the VMM failed to handle the exit
const W_CONFIG_EXITS = 9;
const W_MMIO_EXITS = 10;
const W_DOORBELL_EXITS = 11;
const W_IOEVENTFD = 12;
const W_TABLE_GEN = 13; // seqlock: odd while the VMM rewrites the table
const W_TABLE_COUNT = 14;
const W_ERROR_LENGTH = 15;
const W_IO_EXITS = 16;
const HEADER_WORDS = 17;

/** Most ioeventfd windows (one per device) the table holds: one per PCI slot. */
export const MAX_DOORBELL_WINDOWS = 32;
const WINDOW_WORDS = 8; // gpa lo, gpa hi, device, queues, stride, reserved ×3
const TABLE_BASE = HEADER_WORDS;

/** PCI slots whose driver counters the guest may report. */
export const REPORT_SLOTS = 32;
/** Queues per slot whose driver counters the guest may report. */
export const REPORT_QUEUES = 64;
const REPORT_WORDS = 4; // kicks, suppressed kicks, chains reaped, largest batch
const REPORT_BASE = TABLE_BASE + MAX_DOORBELL_WINDOWS * WINDOW_WORDS;

/** Bytes of the UTF-8 message a failed exit carries back to the vCPU. */
const ERROR_BYTES = 512;
const ERROR_BASE = REPORT_BASE + REPORT_SLOTS * REPORT_QUEUES * REPORT_WORDS;
const TOTAL_WORDS = ERROR_BASE + ERROR_BYTES / 4;

const TWO_32 = 0x1_0000_0000;

/** Exit counters, readable on both sides. All wrap at 2^32. */
export interface ExitCounters {
  /** Configuration-space exits (reads and writes). */
  config: number;
  /** MMIO exits (reads and writes, doorbells included). */
  mmio: number;
  /** Port I/O exits (IN and OUT): an emulated IDE controller's registers and data port. */
  pio: number;
  /** MMIO writes to a doorbell (notify region) that reached the VMM: trapped kicks. */
  doorbell: number;
  /** Doorbell writes the vCPU delivered itself through the ioeventfd table: no exit. */
  ioeventfd: number;
}

/**
 * One device's doorbells as the ioeventfd table publishes them: queue q's doorbell is at
 * `gpa + q × stride`; a write of any size there rings `doorbells[device]` for queue q.
 */
export interface DoorbellWindow {
  /** Guest-physical address of queue 0's doorbell. */
  readonly gpa: number;
  /** Index into the vCPU's doorbell buffers ({@linkcode ExitBusInit.doorbells}). */
  readonly device: number;
  /** Queues of the device. */
  readonly queues: number;
  /** Bytes between two doorbells (virtio-pci's notify_off_multiplier). */
  readonly stride: number;
}

/** Driver-side counters of one queue as the guest last reported them. */
export interface DriverQueueReport {
  /** Doorbell writes the driver made. */
  kicks: number;
  /** Kicks it skipped because the device's suppression said so. */
  suppressedKicks: number;
  /** Completions it reaped. */
  chains: number;
  /** Most chains it published with one kick. */
  largestBatch: number;
}

/**
 * The shared words of one vCPU's exit channel.
 *
 * Buffer layout (Int32 words, little-endian):
 * - 0 state (0 idle, 1 request, 2 response, 3 closed), 1 kind (1 config read, 2 config write,
 *   3 MMIO read, 4 MMIO write), 2 size (1, 2, 4), 3 PCI slot, 4–5 offset or guest-physical address
 *   (low, high 32 bits), 6 value (write data in the request, read data in the response), 7 request
 *   sequence (echoed), 8 response status (0 ok, 1 failed), 9 config exits, 10 MMIO exits,
 *   11 doorbell exits, 12 ioeventfd rings, 13 table generation (odd while written), 14 table
 *   entries, 15 error message length;
 * - 16…: {@linkcode MAX_DOORBELL_WINDOWS} ioeventfd windows of 8 words (gpa low, gpa high, device
 *   index, queue count, stride, 3 reserved);
 * - then driver counters, {@linkcode REPORT_SLOTS} × {@linkcode REPORT_QUEUES} × 4 words (kicks,
 *   suppressed kicks, chains, largest batch), by PCI slot and queue;
 * - then 512 bytes of UTF-8 error message of the last failed exit.
 *
 * The vCPU moves state idle → request (compare-exchange, so it never overwrites "closed"), the VMM
 * request → response, the vCPU response → idle; each side `Atomics.notify`s the state word.
 *
 * @example
 * ```ts
 * import { ExitChannel } from "./exits.ts";
 * const vmm = new ExitChannel();
 * vmm.publishDoorbells([{ gpa: 0xc000_3000, device: 0, queues: 2, stride: 4 }]);
 * const vcpuSide = new ExitChannel(vmm.buffer);
 * if (vcpuSide.doorbellWindows()[0]?.gpa !== 0xc000_3000) throw new Error("not shared");
 * ```
 */
export class ExitChannel {
  /** Bytes of a channel buffer. */
  static readonly BYTES = TOTAL_WORDS * 4;
  /** The shared words; pass it to the vCPU Worker. */
  readonly buffer: SharedArrayBuffer;
  readonly #w: Int32Array;

  /**
   * @param buffer an existing channel from another thread; when absent a new one is allocated
   * @throws {RangeError} when `buffer` is too small
   */
  constructor(buffer?: SharedArrayBuffer) {
    if (buffer !== undefined && buffer.byteLength < ExitChannel.BYTES) {
      throw new RangeError(`Exit channel buffer needs ${ExitChannel.BYTES} bytes`);
    }
    this.buffer = buffer ?? new SharedArrayBuffer(ExitChannel.BYTES);
    this.#w = new Int32Array(this.buffer, 0, TOTAL_WORDS);
  }

  /** Exit counters now. */
  get counters(): ExitCounters {
    const w = this.#w;
    return {
      config: Atomics.load(w, W_CONFIG_EXITS) >>> 0,
      mmio: Atomics.load(w, W_MMIO_EXITS) >>> 0,
      pio: Atomics.load(w, W_IO_EXITS) >>> 0,
      doorbell: Atomics.load(w, W_DOORBELL_EXITS) >>> 0,
      ioeventfd: Atomics.load(w, W_IOEVENTFD) >>> 0,
    };
  }

  /** True once the VMM closed the channel: every exit fails. */
  get closed(): boolean {
    return Atomics.load(this.#w, W_STATE) === S_CLOSED;
  }

  /**
   * VMM side: counts an MMIO write that hit a doorbell. The VMM decides, since only it knows where
   * every notify region is (trap-mode devices are not in the ioeventfd table).
   */
  countDoorbellExit(): void {
    Atomics.add(this.#w, W_DOORBELL_EXITS, 1);
  }

  /**
   * VMM side: replaces the ioeventfd table (after a BAR, memory-enable or device change). Writes
   * nothing, and returns false, when the table already holds exactly `windows`.
   *
   * @throws {RangeError} for more than {@linkcode MAX_DOORBELL_WINDOWS} windows or bad numbers
   */
  publishDoorbells(windows: readonly DoorbellWindow[]): boolean {
    if (windows.length > MAX_DOORBELL_WINDOWS) {
      throw new RangeError(`At most ${MAX_DOORBELL_WINDOWS} doorbell windows fit the table`);
    }
    for (const d of windows) {
      if (
        !Number.isSafeInteger(d.gpa) || d.gpa < 0 || !Number.isInteger(d.device) || d.device < 0 ||
        !Number.isInteger(d.queues) || d.queues < 0 || !Number.isInteger(d.stride) ||
        d.stride < 1
      ) {
        throw new RangeError(`Bad doorbell window ${JSON.stringify(d)}`);
      }
    }
    if (sameWindows(this.doorbellWindows(), windows)) return false;
    const w = this.#w;
    // Seqlock: an odd generation tells a reader the table is being rewritten.
    Atomics.add(w, W_TABLE_GEN, 1);
    for (const [i, d] of windows.entries()) {
      const at = TABLE_BASE + i * WINDOW_WORDS;
      Atomics.store(w, at, d.gpa % TWO_32);
      Atomics.store(w, at + 1, Math.floor(d.gpa / TWO_32));
      Atomics.store(w, at + 2, d.device);
      Atomics.store(w, at + 3, d.queues);
      Atomics.store(w, at + 4, d.stride);
    }
    Atomics.store(w, W_TABLE_COUNT, windows.length);
    Atomics.add(w, W_TABLE_GEN, 1);
    return true;
  }

  /** The ioeventfd table now (VMM side, and tests). */
  doorbellWindows(): DoorbellWindow[] {
    const w = this.#w;
    for (;;) {
      const gen = Atomics.load(w, W_TABLE_GEN);
      if ((gen & 1) !== 0) continue;
      const count = Math.min(Atomics.load(w, W_TABLE_COUNT), MAX_DOORBELL_WINDOWS);
      const out: DoorbellWindow[] = [];
      for (let i = 0; i < count; i++) {
        const at = TABLE_BASE + i * WINDOW_WORDS;
        out.push({
          gpa: (Atomics.load(w, at + 1) >>> 0) * TWO_32 + (Atomics.load(w, at) >>> 0),
          device: Atomics.load(w, at + 2),
          queues: Atomics.load(w, at + 3),
          stride: Atomics.load(w, at + 4),
        });
      }
      if (Atomics.load(w, W_TABLE_GEN) === gen) return out;
    }
  }

  /**
   * Guest side: records the driver counters of queue `queue` of the function in `slot` (from a
   * driver queue's `stats`), for the VMM's statistics. Queues past {@linkcode REPORT_QUEUES} are
   * not recorded.
   */
  reportQueueStats(slot: number, queue: number, stats: Readonly<QueueStats>): void {
    const at = reportIndex(slot, queue);
    if (at < 0) return;
    const w = this.#w;
    Atomics.store(w, at, stats.kicks | 0);
    Atomics.store(w, at + 1, stats.suppressedKicks | 0);
    Atomics.store(w, at + 2, stats.chains | 0);
    Atomics.store(w, at + 3, stats.largestBatch | 0);
  }

  /** VMM side: the driver counters the guest last reported for `slot`/`queue`, or null if none. */
  driverReport(slot: number, queue: number): DriverQueueReport | null {
    const at = reportIndex(slot, queue);
    if (at < 0) return null;
    const w = this.#w;
    const report = {
      kicks: Atomics.load(w, at) >>> 0,
      suppressedKicks: Atomics.load(w, at + 1) >>> 0,
      chains: Atomics.load(w, at + 2) >>> 0,
      largestBatch: Atomics.load(w, at + 3) >>> 0,
    };
    const empty = report.kicks === 0 && report.suppressedKicks === 0 && report.chains === 0 &&
      report.largestBatch === 0;
    return empty ? null : report;
  }

  /** VMM side: forgets every driver report (machine reset). */
  clearReports(): void {
    this.#w.fill(0, REPORT_BASE, ERROR_BASE);
  }

  /**
   * VMM side: the vCPU is gone (terminated mid-exit); forgets its pending exit so that the next
   * vCPU finds the mailbox idle. Call it only while no exit is being served.
   */
  abandon(): void {
    const w = this.#w;
    Atomics.compareExchange(w, W_STATE, S_RESPONSE, S_IDLE);
    Atomics.compareExchange(w, W_STATE, S_REQUEST, S_IDLE);
  }

  /**
   * VMM side: closes the channel. A vCPU waiting for an answer wakes and throws; every later exit
   * throws at once. Idempotent.
   */
  close(): void {
    Atomics.store(this.#w, W_STATE, S_CLOSED);
    Atomics.notify(this.#w, W_STATE);
  }
}

/** The channel's words, for the two sides in this module. */
function wordsOf(channel: ExitChannel): Int32Array {
  return new Int32Array(channel.buffer, 0, TOTAL_WORDS);
}

function reportIndex(slot: number, queue: number): number {
  if (
    !Number.isInteger(slot) || slot < 0 || slot >= REPORT_SLOTS || !Number.isInteger(queue) ||
    queue < 0 || queue >= REPORT_QUEUES
  ) {
    return -1;
  }
  return REPORT_BASE + (slot * REPORT_QUEUES + queue) * REPORT_WORDS;
}

function sameWindows(a: readonly DoorbellWindow[], b: readonly DoorbellWindow[]): boolean {
  if (a.length !== b.length) return false;
  return a.every((x, i) => {
    const y = b[i]!;
    return x.gpa === y.gpa && x.device === y.device && x.queues === y.queues &&
      x.stride === y.stride;
  });
}

// ---- vCPU side -------------------------------------------------------------------------------------

/** Why an exit failed: a timeout, a closed channel, or the VMM could not handle it. */
export class ExitError extends Error {
  override readonly name = "ExitError";
}

/** What a vCPU Worker needs to build its {@linkcode ExitBus}. */
export interface ExitBusInit {
  /** {@linkcode ExitChannel.buffer}. */
  readonly channel: SharedArrayBuffer;
  /** Each device's `Doorbells` buffer, indexed as {@linkcode DoorbellWindow.device}. */
  readonly doorbells: readonly SharedArrayBuffer[];
  /** Longest wait for the VMM's answer to one exit, in ms. */
  readonly timeoutMs: number;
}

/** Spins on the state word before sleeping: the VMM usually answers within a few µs. */
const VCPU_SPINS = 2000;

/**
 * The vCPU's bus: config and MMIO accesses exit to the VMM and block until it answers; doorbell
 * writes listed in the ioeventfd table ring the device directly.
 *
 * Hot-path rules: no allocation per exit; the ioeventfd table is copied into local typed arrays
 * only when its generation moves. Accesses are 1, 2 or 4 bytes: split an 8-byte register access
 * with {@linkcode mmioRead64}/{@linkcode mmioWrite64} (low half first), as a 32-bit guest does.
 *
 * @example
 * ```ts ignore
 * const bus = new ExitBus(boot.exits);
 * const id = bus.configRead(1, 0, 4); // vendor and device id of slot 1
 * ```
 */
export class ExitBus implements GuestBus {
  /** The channel's shared words (counters, reports). */
  readonly channel: ExitChannel;
  readonly #w: Int32Array;
  readonly #doorbells: Doorbells[];
  readonly #timeoutMs: number;
  #seq = 0;
  #broken: string | null = null;
  // Local copy of the ioeventfd table, refreshed when the generation moves.
  #tableGen = -1;
  #tableCount = 0;
  readonly #winGpa = new Float64Array(MAX_DOORBELL_WINDOWS);
  readonly #winEnd = new Float64Array(MAX_DOORBELL_WINDOWS);
  readonly #winDevice = new Int32Array(MAX_DOORBELL_WINDOWS);
  readonly #winStride = new Int32Array(MAX_DOORBELL_WINDOWS);

  /**
   * @throws {RangeError} for a buffer that is not a channel or a doorbell buffer
   */
  constructor(init: ExitBusInit) {
    this.channel = new ExitChannel(init.channel);
    this.#w = wordsOf(this.channel);
    this.#doorbells = init.doorbells.map((b) => Doorbells.attach(b));
    if (!(init.timeoutMs > 0)) throw new RangeError(`Exit timeout ${init.timeoutMs} is not > 0`);
    this.#timeoutMs = init.timeoutMs;
  }

  configRead(slot: number, offset: number, size: AccessSize): number {
    checkSize(size);
    return this.#exit(EXIT_CONFIG_READ, slot, offset, 0, size, 0);
  }

  configWrite(slot: number, offset: number, size: AccessSize, value: number): void {
    checkSize(size);
    this.#exit(EXIT_CONFIG_WRITE, slot, offset, 0, size, value);
  }

  mmioRead(gpa: number, size: AccessSize): number {
    checkSize(size);
    checkGpa(gpa);
    return this.#exit(EXIT_MMIO_READ, 0, gpa % TWO_32, Math.floor(gpa / TWO_32), size, 0);
  }

  mmioWrite(gpa: number, size: AccessSize, value: number): void {
    checkSize(size);
    checkGpa(gpa);
    if (this.#ioeventfd(gpa)) return;
    this.#exit(EXIT_MMIO_WRITE, 0, gpa % TWO_32, Math.floor(gpa / TWO_32), size, value);
  }

  ioRead(port: number, size: AccessSize): number {
    checkSize(size);
    checkPort(port);
    return this.#exit(EXIT_IO_READ, 0, port, 0, size, 0);
  }

  ioWrite(port: number, size: AccessSize, value: number): void {
    checkSize(size);
    checkPort(port);
    this.#exit(EXIT_IO_WRITE, 0, port, 0, size, value);
  }

  /** An 8-byte register read as two 4-byte exits, low half first. */
  mmioRead64(gpa: number): bigint {
    const lo = this.mmioRead(gpa, 4);
    const hi = this.mmioRead(gpa + 4, 4);
    return (BigInt(hi) << 32n) | BigInt(lo);
  }

  /** An 8-byte register write as two 4-byte exits, low half first. */
  mmioWrite64(gpa: number, value: bigint): void {
    this.mmioWrite(gpa, 4, Number(value & 0xffffffffn));
    this.mmioWrite(gpa + 4, 4, Number((value >> 32n) & 0xffffffffn));
  }

  /** Records a driver queue's counters for the VMM's statistics. */
  reportQueueStats(slot: number, queue: number, stats: Readonly<QueueStats>): void {
    this.channel.reportQueueStats(slot, queue, stats);
  }

  /** Exit counters now. */
  get counters(): ExitCounters {
    return this.channel.counters;
  }

  /** A doorbell in the ioeventfd table: ring it here. True when it was one. */
  #ioeventfd(gpa: number): boolean {
    const w = this.#w;
    if (Atomics.load(w, W_TABLE_GEN) !== this.#tableGen) this.#refreshTable();
    for (let i = 0; i < this.#tableCount; i++) {
      const base = this.#winGpa[i]!;
      if (gpa < base || gpa >= this.#winEnd[i]!) continue;
      const stride = this.#winStride[i]!;
      const delta = gpa - base;
      // Between two doorbells: not an ioeventfd address; let the VMM decide (it ignores it).
      if (delta % stride !== 0) return false;
      this.#doorbells[this.#winDevice[i]!]?.ring(delta / stride);
      Atomics.add(w, W_IOEVENTFD, 1);
      return true;
    }
    return false;
  }

  #refreshTable(): void {
    const w = this.#w;
    for (;;) {
      const gen = Atomics.load(w, W_TABLE_GEN);
      if ((gen & 1) !== 0) continue; // the VMM is rewriting it: a few stores, spin
      const count = Math.min(Atomics.load(w, W_TABLE_COUNT), MAX_DOORBELL_WINDOWS);
      let n = 0;
      for (let i = 0; i < count; i++) {
        const at = TABLE_BASE + i * WINDOW_WORDS;
        const device = Atomics.load(w, at + 2);
        // A window for a device this vCPU has no doorbell buffer for cannot be rung here.
        if (device < 0 || device >= this.#doorbells.length) continue;
        const gpa = (Atomics.load(w, at + 1) >>> 0) * TWO_32 + (Atomics.load(w, at) >>> 0);
        const stride = Atomics.load(w, at + 4);
        const queues = Math.min(Atomics.load(w, at + 3), this.#doorbells[device]!.numQueues);
        this.#winGpa[n] = gpa;
        this.#winEnd[n] = gpa + queues * stride;
        this.#winDevice[n] = device;
        this.#winStride[n] = stride > 0 ? stride : 1;
        n++;
      }
      if (Atomics.load(w, W_TABLE_GEN) !== gen) continue;
      this.#tableCount = n;
      this.#tableGen = gen;
      return;
    }
  }

  #exit(kind: ExitKind, slot: number, lo: number, hi: number, size: number, value: number): number {
    if (this.#broken !== null) throw new ExitError(this.#broken);
    const w = this.#w;
    const seq = (this.#seq + 1) | 0;
    this.#seq = seq;
    w[W_KIND] = kind;
    w[W_SIZE] = size;
    w[W_SLOT] = slot;
    w[W_ADDR_LO] = lo;
    w[W_ADDR_HI] = hi;
    w[W_VALUE] = value;
    w[W_SEQ] = seq;
    // Compare-exchange: a channel the VMM closed stays closed.
    const was = Atomics.compareExchange(w, W_STATE, S_IDLE, S_REQUEST);
    if (was !== S_IDLE) {
      throw new ExitError(
        was === S_CLOSED
          ? "The VMM closed the exit channel"
          : `Exit channel is busy (state ${was})`,
      );
    }
    Atomics.notify(w, W_STATE);
    let state = S_REQUEST;
    for (let spin = 0; spin < VCPU_SPINS; spin++) {
      state = Atomics.load(w, W_STATE);
      if (state !== S_REQUEST) break;
    }
    if (state === S_REQUEST) {
      const deadline = performance.now() + this.#timeoutMs;
      for (;;) {
        state = Atomics.load(w, W_STATE);
        if (state !== S_REQUEST) break;
        const left = deadline - performance.now();
        if (left <= 0) {
          this.#broken = `${describeExit(kind, slot, lo, hi, size)} got no answer from the VMM ` +
            `within ${this.#timeoutMs} ms`;
          throw new ExitError(this.#broken);
        }
        Atomics.wait(w, W_STATE, S_REQUEST, left);
      }
    }
    if (state === S_CLOSED) throw new ExitError("The VMM closed the exit channel");
    if (state !== S_RESPONSE || w[W_SEQ] !== seq) {
      this.#broken = `Exit channel protocol error (state ${state})`;
      throw new ExitError(this.#broken);
    }
    const status = w[W_STATUS]!;
    const result = w[W_VALUE]! >>> 0;
    Atomics.compareExchange(w, W_STATE, S_RESPONSE, S_IDLE);
    if (status !== 0) {
      throw new ExitError(`${describeExit(kind, slot, lo, hi, size)} failed: ${readError(w)}`);
    }
    return result;
  }
}

function checkSize(size: number): void {
  if (size !== 1 && size !== 2 && size !== 4) {
    throw new RangeError(`Access size ${size} is not 1, 2 or 4 (split 8-byte accesses)`);
  }
}

function checkPort(port: number): void {
  if (!Number.isInteger(port) || port < 0 || port > 0xffff) {
    throw new RangeError(`Bad I/O port ${port}`);
  }
}

function checkGpa(gpa: number): void {
  if (!Number.isSafeInteger(gpa) || gpa < 0) throw new RangeError(`Bad guest address ${gpa}`);
}

function describeExit(kind: number, slot: number, lo: number, hi: number, size: number): string {
  const gpa = (hi >>> 0) * TWO_32 + (lo >>> 0);
  switch (kind) {
    case EXIT_CONFIG_READ:
      return `Config read of slot ${slot} offset 0x${lo.toString(16)} size ${size}`;
    case EXIT_CONFIG_WRITE:
      return `Config write of slot ${slot} offset 0x${lo.toString(16)} size ${size}`;
    case EXIT_MMIO_READ:
      return `MMIO read at 0x${gpa.toString(16)} size ${size}`;
    case EXIT_IO_READ:
      return `Port read at 0x${lo.toString(16)} size ${size}`;
    case EXIT_IO_WRITE:
      return `Port write at 0x${lo.toString(16)} size ${size}`;
    default:
      return `MMIO write at 0x${gpa.toString(16)} size ${size}`;
  }
}

function readError(w: Int32Array): string {
  const length = Math.min(Math.max(w[W_ERROR_LENGTH]!, 0), ERROR_BYTES);
  const bytes = new Uint8Array(w.buffer, ERROR_BASE * 4, length).slice();
  return new TextDecoder().decode(bytes);
}

function writeError(w: Int32Array, message: string): void {
  const dst = new Uint8Array(w.buffer, ERROR_BASE * 4, ERROR_BYTES);
  const { written } = new TextEncoder().encodeInto(message, dst);
  w[W_ERROR_LENGTH] = written;
}

// ---- VMM side --------------------------------------------------------------------------------------

/**
 * What the VMM does for each exit. A method may return a promise: the vCPU stays blocked until it
 * settles (a device reset waits for the iothread to quiesce, as the vCPU waits in QEMU). A throw
 * or rejection fails the exit: the vCPU throws {@linkcode ExitError} with the message.
 */
export interface ExitHandler {
  /** A config space read of the function in `slot`. */
  configRead(slot: number, offset: number, size: AccessSize): number | Promise<number>;
  /** A config space write to the function in `slot`. */
  configWrite(
    slot: number,
    offset: number,
    size: AccessSize,
    value: number,
  ): void | Promise<void>;
  /** An MMIO read at guest-physical `gpa`. */
  mmioRead(gpa: number, size: AccessSize): number | Promise<number>;
  /** An MMIO write at guest-physical `gpa`. */
  mmioWrite(gpa: number, size: AccessSize, value: number): void | Promise<void>;
  /** A port read (IN) of `port`; without it, ports read all-ones. */
  ioRead?(port: number, size: AccessSize): number | Promise<number>;
  /** A port write (OUT) to `port`; without it, port writes are dropped. */
  ioWrite?(port: number, size: AccessSize, value: number): void | Promise<void>;
}

/** The exit loop returns to the event loop at least this often, however busy the vCPU. */
const YIELD_EVERY_MS = 5;

/** Options of {@linkcode ExitServer}. */
export interface ExitServerOptions {
  /**
   * After answering, spin this many µs for the next exit before sleeping in `Atomics.waitAsync`:
   * a guest programming a device exits back to back, and waking from `waitAsync` costs tens of µs.
   * The event loop is blocked at most this long per exit. Default 30; 0 never spins.
   */
  spinMicros?: number;
  /** Longest `waitAsync` before the loop looks again (so a lost wake-up costs at most this). */
  pollMs?: number;
  /** Called with every error a handler threw (the vCPU gets the message too). */
  onError?: (error: unknown) => void;
}

/**
 * Serves one channel's exits on the VMM thread until {@linkcode close}.
 *
 * @example
 * ```ts ignore
 * const server = new ExitServer(channel, machineHandler);
 * // … later
 * await server.close();
 * ```
 */
export class ExitServer {
  readonly #channel: ExitChannel;
  readonly #w: Int32Array;
  readonly #handler: ExitHandler;
  readonly #spinMs: number;
  readonly #pollMs: number;
  readonly #onError: ((error: unknown) => void) | undefined;
  #closing = false;
  #serving: Promise<void> | null = null;
  readonly #closed: Promise<void>;
  #signalClosed!: () => void;
  readonly #done: Promise<void>;

  /** Starts serving at once. */
  constructor(channel: ExitChannel, handler: ExitHandler, options: ExitServerOptions = {}) {
    this.#channel = channel;
    this.#w = wordsOf(channel);
    this.#handler = handler;
    this.#spinMs = Math.max(0, options.spinMicros ?? 30) / 1000;
    this.#pollMs = Math.max(1, options.pollMs ?? 1000);
    this.#onError = options.onError;
    this.#closed = new Promise((resolve) => this.#signalClosed = resolve);
    this.#done = this.#loop();
  }

  /**
   * Closes the channel (failing the vCPU's pending and later exits) and ends the loop. A handler
   * still running is abandoned: its answer, if it ever comes, is not delivered.
   */
  async close(): Promise<void> {
    this.#closing = true;
    this.#channel.close();
    this.#signalClosed();
    await this.#done;
  }

  /** Resolves when no exit is being served (now, when the current one is answered, or on close). */
  async idle(): Promise<void> {
    while (this.#serving !== null && !this.#closing) {
      await Promise.race([this.#serving, this.#closed]);
    }
  }

  async #loop(): Promise<void> {
    const w = this.#w;
    let served = false;
    let lastYield = performance.now();
    while (!this.#closing) {
      if (performance.now() - lastYield > YIELD_EVERY_MS) {
        // Exits caught by the spin are served without returning to the event loop: let timers
        // and Worker messages in now and then.
        await new Promise((resolve) => setTimeout(resolve, 0));
        lastYield = performance.now();
        continue;
      }
      let state = Atomics.load(w, W_STATE);
      if (state === S_CLOSED) return;
      if (state !== S_REQUEST && served && this.#spinMs > 0) {
        const end = performance.now() + this.#spinMs;
        do state = Atomics.load(w, W_STATE); while (state !== S_REQUEST && performance.now() < end);
      }
      if (state !== S_REQUEST) {
        served = false;
        const wait = Atomics.waitAsync(w, W_STATE, state, this.#pollMs);
        if (wait.async) await wait.value;
        lastYield = performance.now();
        continue;
      }
      const pending = this.#serve();
      if (pending !== null) {
        this.#serving = pending;
        await Promise.race([pending, this.#closed]);
        this.#serving = null;
      }
      served = true;
    }
  }

  /**
   * Serves the pending exit. A handler that answers synchronously is answered here, without a
   * promise (the common case: no allocation per exit); an async one returns the promise to await.
   */
  #serve(): Promise<void> | null {
    const w = this.#w;
    const kind = w[W_KIND]!;
    const size = w[W_SIZE]! as AccessSize;
    const handler = this.#handler;
    try {
      let result: number | void | Promise<number> | Promise<void>;
      if (kind === EXIT_CONFIG_READ || kind === EXIT_CONFIG_WRITE) {
        Atomics.add(w, W_CONFIG_EXITS, 1);
        const slot = w[W_SLOT]!;
        const offset = w[W_ADDR_LO]!;
        result = kind === EXIT_CONFIG_READ
          ? handler.configRead(slot, offset, size)
          : handler.configWrite(slot, offset, size, w[W_VALUE]! >>> 0);
      } else if (kind === EXIT_MMIO_READ || kind === EXIT_MMIO_WRITE) {
        Atomics.add(w, W_MMIO_EXITS, 1);
        const gpa = (w[W_ADDR_HI]! >>> 0) * TWO_32 + (w[W_ADDR_LO]! >>> 0);
        result = kind === EXIT_MMIO_READ
          ? handler.mmioRead(gpa, size)
          : handler.mmioWrite(gpa, size, w[W_VALUE]! >>> 0);
      } else if (kind === EXIT_IO_READ || kind === EXIT_IO_WRITE) {
        Atomics.add(w, W_IO_EXITS, 1);
        const port = w[W_ADDR_LO]! & 0xffff;
        result = kind === EXIT_IO_READ
          ? (handler.ioRead?.(port, size) ?? (size === 4 ? 0xffffffff : (1 << (8 * size)) - 1))
          : handler.ioWrite?.(port, size, w[W_VALUE]! >>> 0);
      } else {
        throw new Error(`Unknown exit kind ${kind}`);
      }
      if (typeof result === "object") {
        return result.then(
          (value: number | void) => this.#respond(0, typeof value === "number" ? value : 0),
          (error: unknown) => this.#fail(error),
        );
      }
      this.#respond(0, typeof result === "number" ? result : 0);
    } catch (error) {
      this.#fail(error);
    }
    return null;
  }

  #fail(error: unknown): void {
    writeError(this.#w, error instanceof Error ? error.message : String(error));
    this.#onError?.(error);
    this.#respond(1, 0);
  }

  #respond(status: number, value: number): void {
    const w = this.#w;
    w[W_VALUE] = value;
    w[W_STATUS] = status;
    // Compare-exchange: a close() while the handler ran must stay visible to the vCPU.
    Atomics.compareExchange(w, W_STATE, S_REQUEST, S_RESPONSE);
    Atomics.notify(w, W_STATE);
  }
}

// ---- vCPU Worker protocol --------------------------------------------------------------------------

/** A device as firmware tables would describe it to the guest. */
export interface BootDevice {
  /** The machine configuration's device id. */
  readonly id: string;
  /** Device type name (`virtio-blk`, …). */
  readonly type: string;
  /** PCI slot on bus 0. */
  readonly slot: number;
  /**
   * An emulated disk's place on its controller (IDE: 0 the primary channel's master, 1 the
   * secondary's); absent for virtio devices.
   */
  readonly unit?: number;
  /** An emulated disk's device options (IDE: `mode` pio or dma); absent for virtio devices. */
  readonly options?: Readonly<Record<string, unknown>>;
}

/** The first message a vCPU Worker receives. */
export interface VcpuBoot {
  readonly kind: "boot";
  /** Guest RAM: build `new GuestMemory(ram.regions, ram.buffer)`. */
  readonly ram: { readonly regions: readonly GuestRegion[]; readonly buffer: SharedArrayBuffer };
  /** The vCPU's interrupt words: `new VcpuInterrupts(vcpu)`. */
  readonly vcpu: SharedArrayBuffer;
  /** The exit bus: `new ExitBus(exits)`. */
  readonly exits: ExitBusInit;
  /** The devices plugged in (the guest still enumerates PCI to find them). */
  readonly devices: readonly BootDevice[];
  /** Whatever the program being run needs (structured-cloneable). */
  readonly payload: unknown;
}

/** A request the VMM sends a running vCPU Worker (after boot). */
export interface VcpuRequest {
  readonly kind: "request";
  readonly id: number;
  readonly body: unknown;
}

/** What a vCPU Worker posts to the VMM. */
export type VcpuMessage =
  | { readonly kind: "reply"; readonly id: number; readonly body: unknown }
  | { readonly kind: "reply-error"; readonly id: number; readonly message: string }
  | { readonly kind: "done"; readonly result: unknown }
  | {
    readonly kind: "error";
    readonly message: string;
    /** The error's class name (`JobError`, `GuestSetupError`…), when it was an Error. */
    readonly name?: string;
    readonly stack?: string;
  };

/** What a guest program gets from {@linkcode runVcpu}. */
export interface VcpuContext {
  readonly mem: GuestMemory;
  readonly interrupts: VcpuInterrupts;
  readonly bus: ExitBus;
  readonly devices: readonly BootDevice[];
  readonly payload: unknown;
}

/** A guest program: `main` runs once after boot; `onRequest` answers the VMM's requests. */
export interface VcpuProgram {
  main?(ctx: VcpuContext): unknown | Promise<unknown>;
  onRequest?(ctx: VcpuContext, body: unknown): unknown | Promise<unknown>;
}

/** The scope a Worker entry runs in, as far as {@linkcode runVcpu} needs it. */
interface WorkerScope {
  onmessage: ((event: MessageEvent) => void) | null;
  postMessage(message: unknown): void;
}

/**
 * The body of a vCPU Worker entry: waits for {@linkcode VcpuBoot}, builds guest memory, interrupts
 * and the exit bus, runs `program.main` and posts `done` (or `error`), and answers requests with
 * `program.onRequest`. Requests are served only while `main` is not running (the vCPU is one
 * thread); a program without `main` only serves requests.
 *
 * @example
 * ```ts ignore
 * /// <reference lib="deno.worker" />
 * import { runVcpu } from "../virtio/exits.ts";
 * runVcpu(self, { main: (ctx) => ctx.bus.configRead(1, 0, 4) });
 * ```
 */
export function runVcpu(scope: WorkerScope, program: VcpuProgram): void {
  let ctx: VcpuContext | null = null;
  const post = (m: VcpuMessage) => scope.postMessage(m);
  scope.onmessage = async (event: MessageEvent<VcpuBoot | VcpuRequest>) => {
    const msg = event.data;
    if (msg.kind === "boot") {
      try {
        ctx = {
          mem: new GuestMemory(msg.ram.regions, msg.ram.buffer),
          interrupts: new VcpuInterrupts(msg.vcpu),
          bus: new ExitBus(msg.exits),
          devices: msg.devices,
          payload: msg.payload,
        };
        if (program.main !== undefined) post({ kind: "done", result: await program.main(ctx) });
      } catch (error) {
        post(errorMessage(error));
      }
      return;
    }
    if (msg.kind === "request") {
      try {
        if (ctx === null || program.onRequest === undefined) {
          throw new Error("This vCPU program takes no requests");
        }
        post({ kind: "reply", id: msg.id, body: await program.onRequest(ctx, msg.body) });
      } catch (error) {
        post({
          kind: "reply-error",
          id: msg.id,
          message: error instanceof Error ? error.message : String(error),
        });
      }
    }
  };
}

function errorMessage(error: unknown): VcpuMessage {
  if (error instanceof Error) {
    return {
      kind: "error",
      message: error.message,
      name: error.name,
      ...(error.stack === undefined ? {} : { stack: error.stack }),
    };
  }
  return { kind: "error", message: String(error) };
}
