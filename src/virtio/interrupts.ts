/**
 * Interrupts from a virtio-pci function to the vCPU, over `SharedArrayBuffer`s so that the
 * device's iothread raises them directly while the VMM thread keeps the guest-visible registers.
 *
 * - {@linkcode VcpuInterrupts}: the vCPU's side — a pending bit per x86 vector (256), a level word of
 *   INTx sources, and a wake word the vCPU sleeps on with `Atomics.wait`.
 * - {@linkcode InterruptState}: one function's side — the MSI-X table and pending-bit array (PBA),
 *   the MSI-X enable / function-mask bits, the virtio vectors (config and per queue), the ISR byte
 *   and INTx, plus the device-status word, so that the iothread can set DEVICE_NEEDS_RESET and raise
 *   the config interrupt without a round trip through the VMM.
 *
 * Every word another thread may touch is read and written with `Atomics` (sequentially consistent).
 * Each pair of racing operations (raise vs unmask, ISR set vs ISR read-to-clear) writes its own word
 * then re-reads the other's, so one of the two always sees the other: no interrupt is lost. A
 * spurious INTx (line high, ISR already 0) is possible, as on real level-triggered hardware.
 *
 * @module
 */

import {
  VIRTIO_CONFIG_S_DRIVER_OK,
  VIRTIO_CONFIG_S_NEEDS_RESET,
  VIRTIO_MSI_NO_VECTOR,
  VIRTIO_PCI_ISR_CONFIG,
  VIRTIO_PCI_ISR_QUEUE,
} from "./features.ts";

/** x86 interrupt vectors: the MSI data's low byte selects one. */
export const X86_VECTORS = 256;
/** Largest MSI-X table the PCI spec allows (table size field is 11 bits). */
export const MSIX_MAX_VECTORS = 2048;
/** Bytes per MSI-X table entry: address lo, address hi, data, vector control. */
export const MSIX_ENTRY_SIZE = 16;
/** Vector control bit 0: the entry is masked. */
export const MSIX_ENTRY_CTRL_MASKBIT = 1;
/** Most queues a virtio-pci function has here (QEMU's VIRTIO_QUEUE_MAX). */
export const VIRTIO_QUEUE_MAX = 1024;

/** All-ones of an access size: what a read nobody answers returns. */
export function allOnes(size: number): number {
  return size === 1 ? 0xff : size === 2 ? 0xffff : 0xffffffff;
}

// VcpuInterrupts words.
const V_WAKE = 0; // bumped on every delivery and INTx assertion; the vCPU waits on it
const V_INTX = 1; // bitmask of INTx sources asserting their line
const V_DELIVERED = 2; // vectors delivered
const V_BITMAP = 4; // 8 words: pending bit per vector
const V_WORDS = 16;

/**
 * The vCPU's interrupt inputs, shared by every device that interrupts it.
 *
 * Buffer layout (Int32 words, 64 bytes): 0 wake sequence, 1 INTx source bitmask, 2 delivered count,
 * 3 reserved, 4..11 pending bitmap (vector v is bit v & 31 of word 4 + (v >> 5)), 12..15 reserved.
 *
 * @example
 * ```ts
 * import { VcpuInterrupts } from "./interrupts.ts";
 * const vcpu = new VcpuInterrupts();
 * new VcpuInterrupts(vcpu.buffer).deliver(0x41); // e.g. from an iothread
 * if (!vcpu.waitForInterrupt(0) || vcpu.takeNext() !== 0x41) throw new Error("lost");
 * ```
 */
export class VcpuInterrupts {
  /** Size of the shared buffer. */
  static readonly BYTES = V_WORDS * 4;
  /** The shared words; pass it to another Worker's {@linkcode VcpuInterrupts}. */
  readonly buffer: SharedArrayBuffer;
  readonly #w: Int32Array;

  /**
   * A view of the vCPU's interrupt words.
   * @param buffer an existing buffer from another thread's {@linkcode VcpuInterrupts}; when absent a
   *   zeroed one is allocated
   * @throws {RangeError} when `buffer` is smaller than {@linkcode VcpuInterrupts.BYTES}
   */
  constructor(buffer?: SharedArrayBuffer) {
    if (buffer !== undefined && buffer.byteLength < VcpuInterrupts.BYTES) {
      throw new RangeError(`VcpuInterrupts buffer needs ${VcpuInterrupts.BYTES} bytes`);
    }
    this.buffer = buffer ?? new SharedArrayBuffer(VcpuInterrupts.BYTES);
    this.#w = new Int32Array(this.buffer, 0, V_WORDS);
  }

  /**
   * Marks `vector` pending and wakes the vCPU. Any thread.
   * @throws {RangeError} when `vector` is not an integer 0..255
   */
  deliver(vector: number): void {
    if (!Number.isInteger(vector) || vector < 0 || vector >= X86_VECTORS) {
      throw new RangeError(`Vector ${vector} is not 0..255`);
    }
    Atomics.or(this.#w, V_BITMAP + (vector >>> 5), 1 << (vector & 31));
    Atomics.add(this.#w, V_DELIVERED, 1);
    this.#wake();
  }

  /** True when `vector` is pending. */
  isPending(vector: number): boolean {
    if (!Number.isInteger(vector) || vector < 0 || vector >= X86_VECTORS) return false;
    return (Atomics.load(this.#w, V_BITMAP + (vector >>> 5)) & (1 << (vector & 31))) !== 0;
  }

  /** True when a vector is pending or an INTx line is asserted. */
  get pending(): boolean {
    if (Atomics.load(this.#w, V_INTX) !== 0) return true;
    for (let i = 0; i < 8; i++) {
      if (Atomics.load(this.#w, V_BITMAP + i) !== 0) return true;
    }
    return false;
  }

  /**
   * Takes the pending vector of highest priority (the highest number, as a local APIC does) and
   * clears its bit; `null` when none is pending. INTx is level-triggered and is not taken here:
   * see {@linkcode intxAsserted}.
   */
  takeNext(): number | null {
    for (let i = 7; i >= 0; i--) {
      for (;;) {
        const word = Atomics.load(this.#w, V_BITMAP + i);
        if (word === 0) break;
        const bit = 31 - Math.clz32(word);
        const old = Atomics.and(this.#w, V_BITMAP + i, ~(1 << bit));
        // Another consumer may have taken it between load and and: then look again.
        if ((old & (1 << bit)) !== 0) return i * 32 + bit;
      }
    }
    return null;
  }

  /**
   * Sleeps until an interrupt is pending (vector or INTx) or `timeoutMs` passes.
   * Returns whether one is pending. `0` polls; `Infinity` waits for ever.
   */
  waitForInterrupt(timeoutMs: number): boolean {
    const deadline = performance.now() + Math.max(0, timeoutMs);
    for (;;) {
      // Read the sequence before checking: a delivery after the check changes it, so wait returns.
      const seq = Atomics.load(this.#w, V_WAKE);
      if (this.pending) return true;
      const left = deadline - performance.now();
      if (!(left > 0)) return false;
      Atomics.wait(this.#w, V_WAKE, seq, left === Infinity ? undefined : left);
    }
  }

  /**
   * Drives INTx source `source` (0..31, one per function sharing the vCPU's INTx input).
   * Asserting a line that was low wakes the vCPU.
   * @throws {RangeError} when `source` is not 0..31
   */
  setIntx(source: number, level: boolean): void {
    if (!Number.isInteger(source) || source < 0 || source > 31) {
      throw new RangeError(`INTx source ${source} is not 0..31`);
    }
    const bit = 1 << source;
    if (level) {
      const old = Atomics.or(this.#w, V_INTX, bit);
      if ((old & bit) === 0) this.#wake();
    } else {
      Atomics.and(this.#w, V_INTX, ~bit);
    }
  }

  /** True when any INTx source asserts its line. */
  get intxAsserted(): boolean {
    return Atomics.load(this.#w, V_INTX) !== 0;
  }

  /** Bitmask of the INTx sources asserting their line. */
  get intxSources(): number {
    return Atomics.load(this.#w, V_INTX) >>> 0;
  }

  /** Vectors delivered so far (mod 2^32). */
  get delivered(): number {
    return Atomics.load(this.#w, V_DELIVERED) >>> 0;
  }

  #wake(): void {
    Atomics.add(this.#w, V_WAKE, 1);
    Atomics.notify(this.#w, V_WAKE);
  }
}

// InterruptState header words.
const H_FLAGS = 0; // F_* below
const H_ISR = 1; // virtio ISR status (bits 0..7)
const H_STATUS = 2; // device_status (bits 0..7) | reset epoch << 8
const H_GENERATION = 3; // config_generation (low 8 bits shown)
const H_CONFIG_VECTOR = 4; // config_msix_vector
const H_NUM_VECTORS = 5;
const H_NUM_QUEUES = 6;
const H_INTX_SOURCE = 7;
const H_DELIVERED = 8;
const H_SUPPRESSED = 9;
const H_INTX = 10;
const H_DROPPED = 11;
const HEADER_WORDS = 16;

/** MSI-X enable (message control bit 15). */
const F_MSIX_ENABLE = 1;
/** MSI-X function mask (message control bit 14). */
const F_FUNCTION_MASK = 2;
/** PCI command register bit 10: the function may not assert INTx. */
const F_INTX_DISABLE = 4;

const EPOCH_SHIFT = 8;
const EPOCH_MASK = 0xffffff;

/** Shape of one function's interrupt state. */
export interface InterruptStateOptions {
  /** MSI-X table entries, 1..2048. */
  readonly numVectors: number;
  /** Virtqueues, 0..1024: each gets a vector word. */
  readonly numQueues: number;
  /** Which INTx source bit of the vCPU this function drives, 0..31 (default 0). */
  readonly intxSource?: number;
}

/** Counters of one function's interrupts. */
export interface InterruptStats {
  /** MSI-X messages sent to the vCPU (including pending ones sent on unmask). */
  delivered: number;
  /** MSI-X messages held back because the entry or the function was masked (PBA bit set). */
  suppressed: number;
  /** Notifications signalled through ISR and INTx (MSI-X disabled). */
  intx: number;
  /** Notifications dropped: vector NO_VECTOR or out of range, or MSI-X disabled for `raise`. */
  dropped: number;
}

/**
 * One PCI function's interrupt state: MSI-X table and PBA, virtio vector mapping, ISR/INTx, and the
 * device-status word, in one `SharedArrayBuffer` that the VMM and the device's iothread share.
 *
 * Buffer layout (Int32 words, little-endian as the platform):
 * - header, 16 words: 0 flags (bit 0 MSI-X enable, bit 1 function mask, bit 2 INTx disable),
 *   1 ISR, 2 device status (bits 0..7) | reset epoch (bits 8..31), 3 config generation,
 *   4 config vector, 5 numVectors, 6 numQueues, 7 INTx source, 8 delivered, 9 suppressed,
 *   10 INTx notifications, 11 dropped, 12..15 reserved;
 * - queue vectors: `numQueues` words (NO_VECTOR = 0xffff when unmapped);
 * - MSI-X table: `numVectors` × 4 words (address lo, address hi, data, vector control), exactly the
 *   bytes the guest sees in the table;
 * - PBA: `ceil(numVectors / 64)` × 2 words (the PCI spec's array of QWORDs).
 *
 * Who calls what: the VMM thread handles guest accesses ({@linkcode msixTableRead},
 * {@linkcode msixTableWrite}, {@linkcode msixPbaRead}, {@linkcode setMsixControl},
 * {@linkcode readIsr}, the vector setters, {@linkcode addDeviceStatus}, {@linkcode resetDevice});
 * the iothread raises ({@linkcode notifyQueue}, {@linkcode notifyConfig},
 * {@linkcode signalNeedsReset}). Raising is safe from any thread.
 *
 * @example
 * ```ts
 * import { InterruptState, VcpuInterrupts } from "./interrupts.ts";
 * const vcpu = new VcpuInterrupts();
 * const irq = new InterruptState(vcpu, { numVectors: 2, numQueues: 1 });
 * irq.msixTableWrite(8, 4, 0x41); // entry 0 data: vector 0x41
 * irq.msixTableWrite(12, 4, 0); // unmask entry 0
 * irq.setMsixControl(true, false);
 * irq.setQueueVector(0, 0);
 * irq.notifyQueue(0); // e.g. from the iothread, through InterruptState.attach
 * if (vcpu.takeNext() !== 0x41) throw new Error("lost");
 * ```
 */
export class InterruptState {
  /** The shared words; pass it with the vCPU's buffer to {@linkcode InterruptState.attach}. */
  readonly buffer: SharedArrayBuffer;
  /** Where messages and INTx go. */
  readonly vcpu: VcpuInterrupts;
  /** MSI-X table size. */
  readonly numVectors: number;
  /** Virtqueues with a vector word. */
  readonly numQueues: number;
  /** The vCPU INTx source bit this function drives. */
  readonly intxSource: number;
  readonly #w: Int32Array;
  readonly #queueBase: number;
  readonly #tableBase: number;
  readonly #pbaBase: number;
  readonly #pbaWords: number;

  /** Bytes of buffer a function of this shape needs. */
  static bytesFor(numVectors: number, numQueues: number): number {
    return (HEADER_WORDS + numQueues + numVectors * 4 + Math.ceil(numVectors / 64) * 2) * 4;
  }

  /**
   * Another thread's view of an existing state (the shape is read from the buffer's header).
   * @throws {RangeError} when the buffer is not an interrupt state
   */
  static attach(vcpu: VcpuInterrupts, buffer: SharedArrayBuffer): InterruptState {
    if (buffer.byteLength < HEADER_WORDS * 4) throw new RangeError("Not an interrupt state buffer");
    const header = new Int32Array(buffer, 0, HEADER_WORDS);
    return new InterruptState(vcpu, {
      numVectors: Atomics.load(header, H_NUM_VECTORS),
      numQueues: Atomics.load(header, H_NUM_QUEUES),
      intxSource: Atomics.load(header, H_INTX_SOURCE),
    }, buffer);
  }

  /**
   * A view of one function's interrupt state, new or shared.
   * @param vcpu where MSI-X messages and the INTx line go
   * @param options table size, queue count, INTx source
   * @param buffer an existing state of the same shape (see {@linkcode attach}); when absent a new
   *   one is allocated and reset (all entries masked, all vectors NO_VECTOR)
   * @throws {RangeError} for a shape out of range or a buffer that does not match it
   */
  constructor(vcpu: VcpuInterrupts, options: InterruptStateOptions, buffer?: SharedArrayBuffer) {
    const { numVectors, numQueues } = options;
    const intxSource = options.intxSource ?? 0;
    if (!Number.isInteger(numVectors) || numVectors < 1 || numVectors > MSIX_MAX_VECTORS) {
      throw new RangeError(`MSI-X table size ${numVectors} is not 1..${MSIX_MAX_VECTORS}`);
    }
    if (!Number.isInteger(numQueues) || numQueues < 0 || numQueues > VIRTIO_QUEUE_MAX) {
      throw new RangeError(`Queue count ${numQueues} is not 0..${VIRTIO_QUEUE_MAX}`);
    }
    if (!Number.isInteger(intxSource) || intxSource < 0 || intxSource > 31) {
      throw new RangeError(`INTx source ${intxSource} is not 0..31`);
    }
    const bytes = InterruptState.bytesFor(numVectors, numQueues);
    if (buffer !== undefined && buffer.byteLength < bytes) {
      throw new RangeError(`Interrupt state buffer needs ${bytes} bytes`);
    }
    this.vcpu = vcpu;
    this.numVectors = numVectors;
    this.numQueues = numQueues;
    this.intxSource = intxSource;
    this.buffer = buffer ?? new SharedArrayBuffer(bytes);
    this.#w = new Int32Array(this.buffer, 0, bytes / 4);
    this.#queueBase = HEADER_WORDS;
    this.#tableBase = this.#queueBase + numQueues;
    this.#pbaBase = this.#tableBase + numVectors * 4;
    this.#pbaWords = Math.ceil(numVectors / 64) * 2;
    if (buffer === undefined) {
      Atomics.store(this.#w, H_NUM_VECTORS, numVectors);
      Atomics.store(this.#w, H_NUM_QUEUES, numQueues);
      Atomics.store(this.#w, H_INTX_SOURCE, intxSource);
      this.resetFunction();
    } else if (
      Atomics.load(this.#w, H_NUM_VECTORS) !== numVectors ||
      Atomics.load(this.#w, H_NUM_QUEUES) !== numQueues ||
      Atomics.load(this.#w, H_INTX_SOURCE) !== intxSource
    ) {
      throw new RangeError("Interrupt state buffer has a different shape");
    }
  }

  /** Bytes of the MSI-X table as the guest sees it in the BAR. */
  get tableBytes(): number {
    return this.numVectors * MSIX_ENTRY_SIZE;
  }

  /** Bytes of the PBA as the guest sees it in the BAR (whole QWORDs). */
  get pbaBytes(): number {
    return this.#pbaWords * 4;
  }

  // ---- MSI-X capability (VMM thread) ------------------------------------------------------------

  /** MSI-X enable bit of the capability's message control. */
  get msixEnabled(): boolean {
    return (Atomics.load(this.#w, H_FLAGS) & F_MSIX_ENABLE) !== 0;
  }

  /** Function mask bit of the capability's message control. */
  get functionMasked(): boolean {
    return (Atomics.load(this.#w, H_FLAGS) & F_FUNCTION_MASK) !== 0;
  }

  /**
   * The guest wrote the MSI-X message control. Enabling MSI-X stops INTx (PCI spec); a transition
   * that leaves entries unmasked sends their pending messages.
   */
  setMsixControl(enabled: boolean, functionMasked: boolean): void {
    for (;;) {
      const old = Atomics.load(this.#w, H_FLAGS);
      const next = (old & F_INTX_DISABLE) | (enabled ? F_MSIX_ENABLE : 0) |
        (functionMasked ? F_FUNCTION_MASK : 0);
      if (Atomics.compareExchange(this.#w, H_FLAGS, old, next) === old) break;
    }
    this.#syncIntx();
    if (enabled && !functionMasked) {
      for (let v = 0; v < this.numVectors; v++) {
        if (this.isPending(v) && !this.isMasked(v)) this.#claimPending(v);
      }
    }
  }

  /** True when an MSI-X message for `vector` would be held back (entry or function masked, or MSI-X off). */
  isMasked(vector: number): boolean {
    if (!Number.isInteger(vector) || vector < 0 || vector >= this.numVectors) return true;
    const flags = Atomics.load(this.#w, H_FLAGS);
    if ((flags & F_MSIX_ENABLE) === 0 || (flags & F_FUNCTION_MASK) !== 0) return true;
    return (Atomics.load(this.#w, this.#tableBase + vector * 4 + 3) & MSIX_ENTRY_CTRL_MASKBIT) !==
      0;
  }

  /** True when `vector`'s PBA bit is set. */
  isPending(vector: number): boolean {
    if (!Number.isInteger(vector) || vector < 0 || vector >= this.numVectors) return false;
    return (Atomics.load(this.#w, this.#pbaBase + (vector >>> 5)) & (1 << (vector & 31))) !== 0;
  }

  /** The MSI-X message of `vector` (address, data, mask), for tests and diagnostics. */
  message(vector: number): { address: bigint; data: number; masked: boolean } | null {
    if (!Number.isInteger(vector) || vector < 0 || vector >= this.numVectors) return null;
    const base = this.#tableBase + vector * 4;
    const lo = Atomics.load(this.#w, base) >>> 0;
    const hi = Atomics.load(this.#w, base + 1) >>> 0;
    return {
      address: (BigInt(hi) << 32n) | BigInt(lo),
      data: Atomics.load(this.#w, base + 2) >>> 0,
      masked: (Atomics.load(this.#w, base + 3) & MSIX_ENTRY_CTRL_MASKBIT) !== 0,
    };
  }

  /**
   * A guest read of the MSI-X table at byte `offset`. The PCI spec allows only aligned DWORD (or
   * QWORD, which the VMM splits) accesses; anything else reads all-ones.
   */
  msixTableRead(offset: number, size: number): number {
    if (!this.#dwordIn(offset, size, this.tableBytes)) return allOnes(size);
    return Atomics.load(this.#w, this.#tableBase + offset / 4) >>> 0;
  }

  /**
   * A guest write of the MSI-X table at byte `offset` (aligned DWORDs only; others are ignored).
   * Unmasking an entry sends its pending message.
   */
  msixTableWrite(offset: number, size: number, value: number): void {
    if (!this.#dwordIn(offset, size, this.tableBytes)) return;
    const word = offset / 4;
    if (word % 4 !== 3) {
      Atomics.store(this.#w, this.#tableBase + word, value >>> 0);
      return;
    }
    // Vector control: only the mask bit is implemented; the rest is reserved (reads 0).
    const vector = word >>> 2;
    const old = Atomics.exchange(this.#w, this.#tableBase + word, value & MSIX_ENTRY_CTRL_MASKBIT);
    if ((old & MSIX_ENTRY_CTRL_MASKBIT) !== 0 && !this.isMasked(vector)) this.#claimPending(vector);
  }

  /** A guest read of the PBA at byte `offset` (aligned DWORDs; bits past the table read 0). */
  msixPbaRead(offset: number, size: number): number {
    if (!this.#dwordIn(offset, size, this.pbaBytes)) return allOnes(size);
    return Atomics.load(this.#w, this.#pbaBase + offset / 4) >>> 0;
  }

  #dwordIn(offset: number, size: number, limit: number): boolean {
    return size === 4 && Number.isInteger(offset) && offset >= 0 && offset % 4 === 0 &&
      offset + 4 <= limit;
  }

  // ---- Raising (any thread) ---------------------------------------------------------------------

  /**
   * Sends the MSI-X message of table entry `vector`: delivered to the vCPU now, or, when the entry
   * or the function is masked, recorded in the PBA and sent on unmask. Returns true when delivered
   * now. With MSI-X disabled, or a vector outside the table, nothing happens (counted as dropped):
   * use {@linkcode notifyQueue}/{@linkcode notifyConfig}, which fall back to INTx.
   */
  raise(vector: number): boolean {
    if (
      !Number.isInteger(vector) || vector < 0 || vector >= this.numVectors || !this.msixEnabled
    ) {
      Atomics.add(this.#w, H_DROPPED, 1);
      return false;
    }
    if (!this.isMasked(vector)) {
      this.#send(vector);
      return true;
    }
    Atomics.or(this.#w, this.#pbaBase + (vector >>> 5), 1 << (vector & 31));
    Atomics.add(this.#w, H_SUPPRESSED, 1);
    // An unmask may have run between the mask check and the PBA store and found nothing pending;
    // re-checking after the store means one of us sends it.
    if (!this.isMasked(vector)) this.#claimPending(vector);
    return false;
  }

  /**
   * A used-buffer notification for queue `queue`: its MSI-X vector when MSI-X is enabled (nothing
   * for NO_VECTOR, as the spec requires), else ISR bit 0 and INTx. Returns true when an interrupt
   * was delivered or INTx signalled.
   */
  notifyQueue(queue: number): boolean {
    if (!Number.isInteger(queue) || queue < 0 || queue >= this.numQueues) {
      Atomics.add(this.#w, H_DROPPED, 1);
      return false;
    }
    if (this.msixEnabled) return this.raise(this.queueVector(queue));
    Atomics.or(this.#w, H_ISR, VIRTIO_PCI_ISR_QUEUE);
    Atomics.add(this.#w, H_INTX, 1);
    this.#syncIntx();
    return true;
  }

  /**
   * A configuration-change notification: ISR bit 1 (always, as the spec asks) and the config
   * vector with MSI-X, else INTx. Callers check DRIVER_OK (no config interrupt before it).
   */
  notifyConfig(): boolean {
    Atomics.or(this.#w, H_ISR, VIRTIO_PCI_ISR_CONFIG);
    if (this.msixEnabled) return this.raise(this.configVector);
    Atomics.add(this.#w, H_INTX, 1);
    this.#syncIntx();
    return true;
  }

  #send(vector: number): void {
    const data = Atomics.load(this.#w, this.#tableBase + vector * 4 + 2);
    // x86 MSI: the data's low byte is the vector; delivery mode and trigger bits are not modelled.
    this.vcpu.deliver(data & 0xff);
    Atomics.add(this.#w, H_DELIVERED, 1);
  }

  /** Sends `vector`'s pending message if its PBA bit is still set; the bit's clearer sends it. */
  #claimPending(vector: number): void {
    const bit = 1 << (vector & 31);
    const old = Atomics.and(this.#w, this.#pbaBase + (vector >>> 5), ~bit);
    if ((old & bit) !== 0) this.#send(vector);
  }

  // ---- virtio vectors (VMM thread writes, iothread reads) ---------------------------------------

  /** `config_msix_vector`. */
  get configVector(): number {
    return Atomics.load(this.#w, H_CONFIG_VECTOR) & 0xffff;
  }

  /** Maps config changes to `vector`; a vector outside the table maps to NO_VECTOR. Returns the stored value. */
  setConfigVector(vector: number): number {
    const v = this.#validVector(vector);
    Atomics.store(this.#w, H_CONFIG_VECTOR, v);
    return v;
  }

  /** `queue_msix_vector` of `queue` (NO_VECTOR for a queue that does not exist). */
  queueVector(queue: number): number {
    if (!Number.isInteger(queue) || queue < 0 || queue >= this.numQueues) {
      return VIRTIO_MSI_NO_VECTOR;
    }
    return Atomics.load(this.#w, this.#queueBase + queue) & 0xffff;
  }

  /**
   * Maps `queue`'s notifications to `vector`; a vector outside the table maps to NO_VECTOR (how the
   * spec has a device report a mapping failure). Returns the stored value.
   */
  setQueueVector(queue: number, vector: number): number {
    if (!Number.isInteger(queue) || queue < 0 || queue >= this.numQueues) {
      return VIRTIO_MSI_NO_VECTOR;
    }
    const v = this.#validVector(vector);
    Atomics.store(this.#w, this.#queueBase + queue, v);
    return v;
  }

  #validVector(vector: number): number {
    return Number.isInteger(vector) && vector >= 0 && vector < this.numVectors
      ? vector
      : VIRTIO_MSI_NO_VECTOR;
  }

  // ---- ISR and INTx -----------------------------------------------------------------------------

  /** The ISR byte without clearing it (diagnostics; the guest's read is {@linkcode readIsr}). */
  get isr(): number {
    return Atomics.load(this.#w, H_ISR) & 0xff;
  }

  /** The guest read the ISR: returns it, clears it and deasserts INTx. */
  readIsr(): number {
    const old = Atomics.exchange(this.#w, H_ISR, 0);
    this.#syncIntx();
    return old & 0xff;
  }

  /**
   * The function's INTx level: ISR not zero, MSI-X disabled and INTx not disabled in the command
   * register. Also the PCI status register's Interrupt Status bit, except that INTx disable does not
   * hide it.
   */
  get intxLevel(): boolean {
    const flags = Atomics.load(this.#w, H_FLAGS);
    return (flags & (F_MSIX_ENABLE | F_INTX_DISABLE)) === 0 && Atomics.load(this.#w, H_ISR) !== 0;
  }

  /** The PCI status register's Interrupt Status bit (pending INTx, whether or not disabled). */
  get intxStatus(): boolean {
    return (Atomics.load(this.#w, H_FLAGS) & F_MSIX_ENABLE) === 0 &&
      Atomics.load(this.#w, H_ISR) !== 0;
  }

  /** The PCI command register's Interrupt Disable bit changed. */
  setIntxDisabled(disabled: boolean): void {
    if (disabled) Atomics.or(this.#w, H_FLAGS, F_INTX_DISABLE);
    else Atomics.and(this.#w, H_FLAGS, ~F_INTX_DISABLE);
    this.#syncIntx();
  }

  /**
   * Makes the vCPU's line follow {@linkcode intxLevel}. Whoever changes ISR or flags calls this
   * after the change; the last writer re-checks the level after driving the line, so the line ends
   * equal to the level whatever the interleaving.
   */
  #syncIntx(): void {
    for (;;) {
      const level = this.intxLevel;
      this.vcpu.setIntx(this.intxSource, level);
      if (this.intxLevel === level) return;
    }
  }

  // ---- Device status, reset epoch, config generation ---------------------------------------------

  /** `device_status` as the guest reads it. */
  get deviceStatus(): number {
    return Atomics.load(this.#w, H_STATUS) & 0xff;
  }

  /** Device resets so far (mod 2^24): a device compares the epoch it was activated in with this. */
  get epoch(): number {
    return (Atomics.load(this.#w, H_STATUS) >>> EPOCH_SHIFT) & EPOCH_MASK;
  }

  /** Adds status bits (the transport's checked driver write). Returns the new status. */
  addDeviceStatus(bits: number): number {
    return (Atomics.or(this.#w, H_STATUS, bits & 0xff) | (bits & 0xff)) & 0xff;
  }

  /** `config_generation` as the guest reads it. */
  get configGeneration(): number {
    return Atomics.load(this.#w, H_GENERATION) & 0xff;
  }

  /** The device configuration changed: the driver must see a new generation. */
  bumpConfigGeneration(): void {
    Atomics.add(this.#w, H_GENERATION, 1);
  }

  /**
   * The device hit an error it cannot recover from (a malformed ring): sets DEVICE_NEEDS_RESET,
   * bumps config_generation and, once DRIVER_OK, raises the config interrupt — QEMU's
   * `virtio_error`. Safe from the iothread. With `epoch`, does nothing unless the device is still in
   * that epoch (a reset since then makes the error stale). Returns whether the bit is now set.
   */
  signalNeedsReset(epoch?: number): boolean {
    for (;;) {
      const old = Atomics.load(this.#w, H_STATUS);
      if (epoch !== undefined && ((old >>> EPOCH_SHIFT) & EPOCH_MASK) !== epoch) return false;
      if ((old & VIRTIO_CONFIG_S_NEEDS_RESET) !== 0) return true;
      const next = old | VIRTIO_CONFIG_S_NEEDS_RESET;
      if (Atomics.compareExchange(this.#w, H_STATUS, old, next) !== old) continue;
      this.bumpConfigGeneration();
      if ((next & VIRTIO_CONFIG_S_DRIVER_OK) !== 0) this.notifyConfig();
      return true;
    }
  }

  // ---- Reset ------------------------------------------------------------------------------------

  /**
   * Virtio device reset (driver wrote 0 to device_status): status 0 in a new epoch, every vector
   * unmapped, ISR and PBA cleared, INTx deasserted. The MSI-X table and capability are PCI state and
   * stay (QEMU: `msix_unuse_all_vectors` clears only pending bits).
   */
  resetDevice(): void {
    for (;;) {
      const old = Atomics.load(this.#w, H_STATUS);
      const epoch = (((old >>> EPOCH_SHIFT) & EPOCH_MASK) + 1) & EPOCH_MASK;
      if (Atomics.compareExchange(this.#w, H_STATUS, old, epoch << EPOCH_SHIFT) === old) break;
    }
    Atomics.store(this.#w, H_CONFIG_VECTOR, VIRTIO_MSI_NO_VECTOR);
    for (let q = 0; q < this.numQueues; q++) {
      Atomics.store(this.#w, this.#queueBase + q, VIRTIO_MSI_NO_VECTOR);
    }
    for (let i = 0; i < this.#pbaWords; i++) Atomics.store(this.#w, this.#pbaBase + i, 0);
    Atomics.store(this.#w, H_ISR, 0);
    this.#syncIntx();
  }

  /**
   * PCI function reset: {@linkcode resetDevice}, plus MSI-X disabled and unmasked at function level,
   * every table entry zeroed and masked (the PCI spec's reset state), INTx enabled.
   */
  resetFunction(): void {
    Atomics.store(this.#w, H_FLAGS, 0);
    for (let v = 0; v < this.numVectors; v++) {
      const base = this.#tableBase + v * 4;
      Atomics.store(this.#w, base, 0);
      Atomics.store(this.#w, base + 1, 0);
      Atomics.store(this.#w, base + 2, 0);
      Atomics.store(this.#w, base + 3, MSIX_ENTRY_CTRL_MASKBIT);
    }
    this.resetDevice();
  }

  /** Counters, readable from any thread. */
  get stats(): InterruptStats {
    return {
      delivered: Atomics.load(this.#w, H_DELIVERED) >>> 0,
      suppressed: Atomics.load(this.#w, H_SUPPRESSED) >>> 0,
      intx: Atomics.load(this.#w, H_INTX) >>> 0,
      dropped: Atomics.load(this.#w, H_DROPPED) >>> 0,
    };
  }
}
