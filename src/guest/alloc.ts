/**
 * The simulated guest's allocator of guest RAM: rings, request headers, indirect tables and data
 * buffers, carved out of one region of guest-physical memory the machine hands to the guest.
 *
 * Allocation happens on the setup path only (queue setup, opening a workload target); the hot path
 * reuses what was allocated then. So the allocator favours simplicity over speed: a sorted free
 * list of extents, first fit with alignment, neighbours coalesced on free. Its bookkeeping lives in
 * JavaScript, not in guest RAM, so a device scribbling over memory cannot corrupt it.
 *
 * @module
 */

import type { GuestMemory } from "../virtio/memory.ts";

/** The guest ran out of allocator memory (or of a contiguous piece big enough). */
export class GuestAllocError extends Error {
  override readonly name = "GuestAllocError";
  /** Bytes asked for. */
  readonly size: number;
  /** Alignment asked for. */
  readonly align: number;

  constructor(size: number, align: number, detail: string) {
    super(`Guest allocator cannot provide ${size} bytes aligned to ${align}: ${detail}`);
    this.size = size;
    this.align = align;
  }
}

/** Counters of a {@linkcode GuestAllocator}. */
export interface GuestAllocStats {
  /** Bytes of the region. */
  readonly total: number;
  /** Bytes handed out (alignment padding that stayed free is not counted). */
  readonly used: number;
  /** Largest contiguous free extent. */
  readonly largestFree: number;
  /** Live allocations. */
  readonly allocations: number;
}

/** A free extent `[start, end)`. */
interface Extent {
  start: number;
  end: number;
}

/**
 * First-fit allocator over `[base, base + size)` of guest RAM. Every allocation is zeroed (a fresh
 * ring must start zeroed, and stale request bytes must not masquerade as data).
 *
 * @example
 * ```ts
 * import { GuestMemory } from "../virtio/memory.ts";
 * import { GuestAllocator } from "./alloc.ts";
 * const mem = new GuestMemory([{ gpa: 0, size: 1 << 20 }]);
 * const alloc = new GuestAllocator(mem, { gpa: 0x10000, size: 0x10000 });
 * const ring = alloc.alloc(6000, 4096);
 * if (ring % 4096 !== 0) throw new Error("alignment");
 * alloc.free(ring);
 * if (alloc.stats.used !== 0) throw new Error("leak");
 * ```
 */
export class GuestAllocator {
  /** First byte of the region. */
  readonly base: number;
  /** Bytes of the region. */
  readonly size: number;
  readonly #mem: GuestMemory;
  /** Free extents, sorted by start, never adjacent (coalesced). */
  readonly #free: Extent[];
  /** Live allocations: start → bytes. */
  readonly #live = new Map<number, number>();
  #used = 0;

  /**
   * @param mem guest RAM
   * @param region the part of RAM this allocator owns; it must lie inside one RAM region
   * @throws {RangeError} when the region is empty or not inside one RAM region
   */
  constructor(mem: GuestMemory, region: { readonly gpa: number; readonly size: number }) {
    const { gpa, size } = region;
    if (!Number.isSafeInteger(gpa) || gpa < 0 || !Number.isSafeInteger(size) || size <= 0) {
      throw new RangeError(`Guest allocator region 0x${gpa.toString(16)}+${size} is not valid`);
    }
    if (!mem.contains(gpa, size)) {
      throw new RangeError(
        `Guest allocator region 0x${gpa.toString(16)}+${size} is not inside one RAM region`,
      );
    }
    this.#mem = mem;
    this.base = gpa;
    this.size = size;
    this.#free = [{ start: gpa, end: gpa + size }];
  }

  /**
   * Allocates `size` zeroed bytes at an address that is a multiple of `align`.
   *
   * @param size bytes, at least 1
   * @param align a power of 2 (default 16: descriptors and request headers need no more)
   * @returns the guest-physical address
   * @throws {RangeError} for a bad size or alignment
   * @throws {GuestAllocError} when no free extent fits
   */
  alloc(size: number, align = 16): number {
    if (!Number.isSafeInteger(size) || size <= 0) {
      throw new RangeError(`Allocation size ${size} is not a positive integer`);
    }
    if (!Number.isSafeInteger(align) || align <= 0 || (align & (align - 1)) !== 0) {
      // `align & (align - 1)` is only meaningful below 2^31; larger alignments are not needed.
      throw new RangeError(`Allocation alignment ${align} is not a power of 2 below 2^31`);
    }
    for (let i = 0; i < this.#free.length; i++) {
      const extent = this.#free[i]!;
      const at = Math.ceil(extent.start / align) * align;
      if (at + size > extent.end) continue;
      // Split the extent into the padding before, the allocation, and the rest after.
      const pieces: Extent[] = [];
      if (at > extent.start) pieces.push({ start: extent.start, end: at });
      if (at + size < extent.end) pieces.push({ start: at + size, end: extent.end });
      this.#free.splice(i, 1, ...pieces);
      this.#live.set(at, size);
      this.#used += size;
      this.#mem.fill(at, size, 0);
      return at;
    }
    const s = this.stats;
    throw new GuestAllocError(
      size,
      align,
      `${s.total - s.used} of ${s.total} bytes free, largest free extent ${s.largestFree}`,
    );
  }

  /**
   * Returns an allocation.
   *
   * @throws {RangeError} when `gpa` is not the start of a live allocation (double free)
   */
  free(gpa: number): void {
    const size = this.#live.get(gpa);
    if (size === undefined) {
      throw new RangeError(`Guest address 0x${gpa.toString(16)} is not a live allocation`);
    }
    this.#live.delete(gpa);
    this.#used -= size;
    const end = gpa + size;
    // Insert sorted, then merge with the neighbours it touches.
    let i = 0;
    while (i < this.#free.length && this.#free[i]!.start < gpa) i++;
    this.#free.splice(i, 0, { start: gpa, end });
    const next = this.#free[i + 1];
    if (next !== undefined && next.start === end) {
      this.#free[i]!.end = next.end;
      this.#free.splice(i + 1, 1);
    }
    const prev = this.#free[i - 1];
    if (prev !== undefined && prev.end === gpa) {
      prev.end = this.#free[i]!.end;
      this.#free.splice(i, 1);
    }
  }

  /** Bytes of the live allocation at `gpa`, or undefined. */
  sizeOf(gpa: number): number | undefined {
    return this.#live.get(gpa);
  }

  /** Usage counters. */
  get stats(): GuestAllocStats {
    let largestFree = 0;
    for (const e of this.#free) largestFree = Math.max(largestFree, e.end - e.start);
    return { total: this.size, used: this.#used, largestFree, allocations: this.#live.size };
  }
}
