/**
 * Guest RAM: one `SharedArrayBuffer` laid out as regions of guest-physical addresses, with holes
 * between them (RAM below and above the PCI hole, as on a PC). The VMM, the iothread Workers and the
 * vCPU Worker each build a {@linkcode GuestMemory} over the same buffer and see the same bytes.
 *
 * Every access is bounds-checked: a range that leaves RAM or crosses from one region into the next
 * throws {@linkcode GuestMemoryError}; nothing wraps and no view reaches outside its region.
 *
 * @module
 */

/** One region of guest RAM: `size` bytes at guest-physical address `gpa`. */
export interface GuestRegion {
  /** Guest-physical address of the first byte (4096-aligned). */
  readonly gpa: number;
  /** Bytes in the region (a multiple of 4096). */
  readonly size: number;
}

/** A guest-physical range the device may not touch: outside RAM, or across a region boundary. */
export class GuestMemoryError extends Error {
  /** Always `GuestMemoryError`. */
  override readonly name = "GuestMemoryError";
  /** Guest-physical address of the refused range. */
  readonly gpa: number;
  /** Length in bytes of the refused range. */
  readonly length: number;

  /**
   * Makes the error for the range `[gpa, gpa + length)`.
   *
   * @param gpa start of the refused range
   * @param length its length in bytes
   * @param why what is wrong with it, completing "Guest range 0x… +N …"
   */
  constructor(gpa: number, length: number, why: string) {
    super(`Guest range 0x${hex(gpa)}+${length} ${why}`);
    this.gpa = gpa;
    this.length = length;
  }
}

function hex(n: number): string {
  return Number.isFinite(n) && n >= 0 ? n.toString(16) : String(n);
}

/** Largest guest RAM vstor allocates: a bound so a bad machine file fails instead of exhausting memory. */
export const MAX_GUEST_RAM = 16 * 1024 ** 3;

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** A region as laid out in the buffer. */
interface Placed {
  gpa: number;
  end: number;
  base: number;
}

/**
 * Guest RAM as a device or driver sees it.
 *
 * Scalar accessors are little-endian (virtio 1.x is little-endian). The `atomic*` accessors use
 * `Atomics` (sequentially consistent) and need natural alignment; they are for ring indexes, event
 * words and flags that another thread reads or writes concurrently.
 *
 * @example
 * ```ts
 * import { GuestMemory } from "./memory.ts";
 * const mem = new GuestMemory([{ gpa: 0, size: 4096 }, { gpa: 0x10000, size: 4096 }]);
 * mem.setU32(0x10000, 0xdeadbeef);
 * if (mem.u32(0x10000) !== 0xdeadbeef) throw new Error("u32");
 * let threw = false;
 * try { mem.slice(4000, 200); } catch { threw = true; }
 * if (!threw) throw new Error("crossed into the hole");
 * ```
 */
export class GuestMemory {
  /** The shared bytes; pass it with {@linkcode regions} to another Worker's {@linkcode GuestMemory}. */
  readonly buffer: SharedArrayBuffer;
  /** The RAM regions, sorted by address. */
  readonly regions: readonly GuestRegion[];
  readonly #placed: Placed[];
  readonly #bytes: Uint8Array;
  readonly #view: DataView;
  readonly #u16: Uint16Array;
  readonly #u32: Int32Array;
  #last: Placed;

  /**
   * Lays out guest RAM as `regions` in one shared buffer.
   *
   * @param regions RAM regions, sorted, non-overlapping, each a positive multiple of 4096 bytes at a
   *   4096-aligned address
   * @param buffer an existing buffer from another thread's {@linkcode GuestMemory} (same regions);
   *   when absent a zeroed one is allocated
   * @throws {RangeError} for a bad layout, or a buffer of the wrong size
   */
  constructor(regions: readonly GuestRegion[], buffer?: SharedArrayBuffer) {
    if (!LITTLE_ENDIAN) throw new RangeError("vstor needs a little-endian host");
    if (regions.length === 0) throw new RangeError("Guest RAM needs at least one region");
    const placed: Placed[] = [];
    let total = 0;
    let prevEnd = -1;
    for (const [i, r] of regions.entries()) {
      if (!Number.isSafeInteger(r.gpa) || r.gpa < 0 || r.gpa % 4096 !== 0) {
        throw new RangeError(`Guest RAM region ${i}: address must be a 4096-aligned integer`);
      }
      if (!Number.isSafeInteger(r.size) || r.size <= 0 || r.size % 4096 !== 0) {
        throw new RangeError(`Guest RAM region ${i}: size must be a positive multiple of 4096`);
      }
      if (r.gpa < prevEnd) {
        throw new RangeError(`Guest RAM region ${i} overlaps or precedes region ${i - 1}`);
      }
      prevEnd = r.gpa + r.size;
      placed.push({ gpa: r.gpa, end: r.gpa + r.size, base: total });
      total += r.size;
    }
    if (total > MAX_GUEST_RAM) {
      throw new RangeError(`Guest RAM of ${total} bytes exceeds the limit of ${MAX_GUEST_RAM}`);
    }
    if (buffer !== undefined && buffer.byteLength !== total) {
      throw new RangeError(`Guest RAM buffer is ${buffer.byteLength} bytes, regions need ${total}`);
    }
    this.buffer = buffer ?? new SharedArrayBuffer(total);
    this.regions = regions.map((r) => ({ gpa: r.gpa, size: r.size }));
    this.#placed = placed;
    this.#last = placed[0]!;
    // Fixed-length views: over a growable SharedArrayBuffer (vhost-user's guest RAM, mapped from
    // the front-end's fds) a view without a length tracks the buffer's, at ~20× the cost per access.
    this.#bytes = new Uint8Array(this.buffer, 0, total);
    this.#view = new DataView(this.buffer, 0, total);
    this.#u16 = new Uint16Array(this.buffer, 0, Math.floor(total / 2));
    this.#u32 = new Int32Array(this.buffer, 0, Math.floor(total / 4));
  }

  /** Total bytes of RAM (the holes not counted). */
  get size(): number {
    return this.#bytes.length;
  }

  /**
   * The buffer offset of guest range `[gpa, gpa + length)`.
   *
   * @throws {GuestMemoryError} when the range is not wholly inside one region
   */
  translate(gpa: number, length: number): number {
    const last = this.#last;
    // Guest-controlled numbers: reject non-integers and negatives before any arithmetic.
    if (
      gpa >= last.gpa && length >= 0 && gpa + length <= last.end && Number.isInteger(gpa + length)
    ) {
      return last.base + (gpa - last.gpa);
    }
    return this.#translateSlow(gpa, length);
  }

  #translateSlow(gpa: number, length: number): number {
    if (!Number.isSafeInteger(gpa) || gpa < 0 || !Number.isSafeInteger(length) || length < 0) {
      throw new GuestMemoryError(gpa, length, "is not a valid address and length");
    }
    for (const p of this.#placed) {
      if (gpa >= p.gpa && gpa < p.end) {
        if (gpa + length > p.end) {
          throw new GuestMemoryError(gpa, length, "crosses the end of a RAM region");
        }
        this.#last = p;
        return p.base + (gpa - p.gpa);
      }
      if (length === 0 && gpa === p.end) return p.base + (p.end - p.gpa);
    }
    throw new GuestMemoryError(gpa, length, "is outside guest RAM");
  }

  /** True when `[gpa, gpa + length)` lies inside one region. */
  contains(gpa: number, length: number): boolean {
    try {
      this.translate(gpa, length);
      return true;
    } catch {
      return false;
    }
  }

  /**
   * A zero-copy view of `[gpa, gpa + length)`.
   *
   * @throws {GuestMemoryError} outside RAM or across a region boundary
   */
  slice(gpa: number, length: number): Uint8Array {
    const at = this.translate(gpa, length);
    return new Uint8Array(this.buffer, at, length);
  }

  /** Copies `src` into guest RAM at `gpa`. */
  write(gpa: number, src: Uint8Array): void {
    this.#bytes.set(src, this.translate(gpa, src.length));
  }

  /** Copies guest RAM at `gpa` into `dst`. */
  read(gpa: number, dst: Uint8Array): void {
    const at = this.translate(gpa, dst.length);
    dst.set(this.#bytes.subarray(at, at + dst.length));
  }

  /** Fills `[gpa, gpa + length)` with `value`. */
  fill(gpa: number, length: number, value = 0): void {
    const at = this.translate(gpa, length);
    this.#bytes.fill(value, at, at + length);
  }

  /** Reads the byte at `gpa`. */
  u8(gpa: number): number {
    return this.#bytes[this.translate(gpa, 1)]!;
  }
  /** Writes the byte `v` at `gpa`. */
  setU8(gpa: number, v: number): void {
    this.#bytes[this.translate(gpa, 1)] = v;
  }
  /** Reads the little-endian u16 at `gpa`. */
  u16(gpa: number): number {
    return this.#view.getUint16(this.translate(gpa, 2), true);
  }
  /** Writes `v` as a little-endian u16 at `gpa`. */
  setU16(gpa: number, v: number): void {
    this.#view.setUint16(this.translate(gpa, 2), v, true);
  }
  /** Reads the little-endian u32 at `gpa`. */
  u32(gpa: number): number {
    return this.#view.getUint32(this.translate(gpa, 4), true);
  }
  /** Writes `v` as a little-endian u32 at `gpa`. */
  setU32(gpa: number, v: number): void {
    this.#view.setUint32(this.translate(gpa, 4), v, true);
  }
  /** Reads the little-endian u64 at `gpa`. */
  u64(gpa: number): bigint {
    return this.#view.getBigUint64(this.translate(gpa, 8), true);
  }
  /** Writes `v` as a little-endian u64 at `gpa`. */
  setU64(gpa: number, v: bigint): void {
    this.#view.setBigUint64(this.translate(gpa, 8), v, true);
  }
  /**
   * A u64 as a number; values above 2^53 come back as `Infinity`-free sentinels: they are returned as
   * `Number.MAX_SAFE_INTEGER + 1`, which no bounds check accepts. For guest addresses and lengths.
   */
  u64Number(gpa: number): number {
    const at = this.translate(gpa, 8);
    const hi = this.#view.getUint32(at + 4, true);
    if (hi >= 0x200000) return Number.MAX_SAFE_INTEGER + 1;
    return hi * 0x1_0000_0000 + this.#view.getUint32(at, true);
  }
  /** Stores a number below 2^53 as a little-endian u64. */
  setU64Number(gpa: number, v: number): void {
    const at = this.translate(gpa, 8);
    this.#view.setUint32(at, v >>> 0, true);
    this.#view.setUint32(at + 4, Math.floor(v / 0x1_0000_0000), true);
  }

  #aligned(gpa: number, width: 2 | 4): number {
    const at = this.translate(gpa, width);
    if (at % width !== 0) {
      throw new GuestMemoryError(gpa, width, `is not ${width}-byte aligned for an atomic access`);
    }
    return at / width;
  }

  /** Atomic little-endian u16 load (ring indexes, flags, event words). */
  atomicU16(gpa: number): number {
    return Atomics.load(this.#u16, this.#aligned(gpa, 2));
  }
  /** Atomic u16 store. */
  atomicSetU16(gpa: number, v: number): void {
    Atomics.store(this.#u16, this.#aligned(gpa, 2), v);
  }
  /** Atomic u32 load, as an unsigned number. */
  atomicU32(gpa: number): number {
    return Atomics.load(this.#u32, this.#aligned(gpa, 4)) >>> 0;
  }
  /** Atomic u32 store. */
  atomicSetU32(gpa: number, v: number): void {
    Atomics.store(this.#u32, this.#aligned(gpa, 4), v | 0);
  }

  /**
   * A full memory barrier between this thread's earlier and later accesses to guest RAM (the
   * `smp_mb()` of the virtio ordering rules): an atomic read-modify-write on a private word.
   */
  fence(): void {
    Atomics.add(FENCE_WORD, 0, 0);
  }
}

const FENCE_WORD = new Int32Array(new SharedArrayBuffer(4));
