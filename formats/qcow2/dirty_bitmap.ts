/**
 * One dirty bitmap in memory: its bits in cluster-sized chunks allocated when first dirtied, the
 * granularity math from guest bytes to bits, and merge and resize.
 *
 * @module
 */
import { bitmapBytes } from "./bitmap_format.ts";

/** One all-ones chunk per cluster size, shared: an all-ones table entry costs no memory. */
const ONES = new Map<number, Uint8Array>();
function onesChunk(clusterSize: number): Uint8Array {
  let chunk = ONES.get(clusterSize);
  if (chunk === undefined) ONES.set(clusterSize, chunk = new Uint8Array(clusterSize).fill(0xff));
  return chunk;
}

/**
 * One dirty bitmap in memory: bit k covers guest bytes [k·g, (k+1)·g) for granularity g, stored
 * in chunks of one cluster each (the on-disk data cluster layout: least significant bit first),
 * allocated when first dirtied — memory follows what is dirty, not the image size.
 *
 * @example
 * ```ts
 * import { DirtyBitmap } from "./dirty_bitmap.ts";
 * const bm = new DirtyBitmap("b0", {
 *   granularityBits: 16,
 *   enabled: true,
 *   clusterSize: 65536,
 *   size: 1 << 30,
 * });
 * bm.mark(65535, 2); // the last byte of granule 0, the first of granule 1
 * if (!bm.get(0) || !bm.get(1) || bm.get(2) || bm.count() !== 2) throw new Error("bits");
 * ```
 */
export class DirtyBitmap {
  /** The bitmap's name, unique in the image. */
  readonly name: string;
  /** Bytes of the name as the image stores it (up to a NUL). */
  readonly nameLength: number;
  /** log2 of the granularity: one bit covers this many guest bytes. */
  granularityBits: number;
  /** Tracks writes (the AUTO flag). */
  enabled: boolean;
  /** Found IN_USE at open: its data is lost; it is never stored and refuses use. */
  readonly inconsistent: boolean;
  readonly #clusterSize: number;
  readonly #chunkBits: number;
  #size: number;
  #chunks: Array<Uint8Array | undefined> = [];
  /** The shared all-ones chunk, once one is used (compared by identity, never written). */
  #ones: Uint8Array | undefined;

  /**
   * Makes an empty bitmap (no bit set) of the given geometry.
   *
   * @param name the bitmap's name
   * @param opts granularity, AUTO flag, whether it was found inconsistent, the image's cluster size
   *   (the chunk size of the bit store), the guest size covered and the stored name length
   */
  constructor(
    name: string,
    opts: {
      granularityBits: number;
      enabled: boolean;
      inconsistent?: boolean;
      clusterSize: number;
      size: number;
      nameLength?: number;
    },
  ) {
    this.name = name;
    this.nameLength = opts.nameLength ?? new TextEncoder().encode(name).length;
    this.granularityBits = opts.granularityBits;
    this.enabled = opts.enabled;
    this.inconsistent = opts.inconsistent ?? false;
    this.#clusterSize = opts.clusterSize;
    this.#chunkBits = opts.clusterSize * 8;
    this.#size = opts.size;
  }

  /** Guest bytes one bit covers (`2 ** granularityBits`). */
  get granularity(): number {
    return 2 ** this.granularityBits;
  }

  /** Guest bytes the bitmap covers. */
  get size(): number {
    return this.#size;
  }

  /** Bits of the bitmap. */
  get bits(): number {
    return Math.ceil(this.#size / this.granularity);
  }

  /** Entries its bitmap table needs: one per cluster of bitmap data. */
  get tableSize(): number {
    return Math.ceil(bitmapBytes(this.#size, this.granularityBits) / this.#clusterSize);
  }

  /** The chunk (one cluster of bitmap data) at `index`, if any bit of it was ever set. */
  chunk(index: number): Uint8Array | undefined {
    return this.#chunks[index];
  }

  /** Set chunk `index` from a data cluster (load). */
  setChunk(index: number, data: Uint8Array | undefined): void {
    this.#chunks[index] = data;
  }

  /**
   * Set every bit of chunk `index` (an all-ones table entry) without allocating: the chunk is
   * shared and never written (marking it changes nothing; shrinking copies it first).
   */
  setChunkOnes(index: number): void {
    this.#chunks[index] = this.#ones = onesChunk(this.#clusterSize);
  }

  /** Mark guest bytes [offset, offset+length) dirty. Hot path: no allocation once chunks exist. */
  mark(offset: number, length: number): void {
    if (length <= 0) return;
    const g = this.granularity;
    let bit = Math.floor(offset / g);
    const end = Math.min(Math.floor((offset + length - 1) / g) + 1, this.bits);
    const per = this.#chunkBits;
    while (bit < end) {
      const index = Math.floor(bit / per);
      let chunk = this.#chunks[index];
      if (chunk === undefined) chunk = this.#chunks[index] = new Uint8Array(this.#clusterSize);
      const base = index * per;
      const stop = Math.min(end, base + per) - base;
      if (chunk === this.#ones) {
        bit = base + stop;
        continue;
      }
      let b = bit - base;
      // Single bits up to a byte boundary, whole bytes, then single bits.
      while (b < stop && (b & 7) !== 0) chunk[b >> 3]! |= 1 << (b & 7), b++;
      if (stop - b >= 8) {
        chunk.fill(0xff, b >> 3, stop >> 3);
        b = stop & ~7;
      }
      while (b < stop) chunk[b >> 3]! |= 1 << (b & 7), b++;
      bit = base + stop;
    }
  }

  /** Whether bit `k` is set. */
  get(k: number): boolean {
    const chunk = this.#chunks[Math.floor(k / this.#chunkBits)];
    if (chunk === undefined) return false;
    const b = k % this.#chunkBits;
    return (chunk[b >> 3]! & (1 << (b & 7))) !== 0;
  }

  /** Number of set bits (qemu's dirty count in granules). */
  count(): number {
    let n = 0;
    for (const chunk of this.#chunks) {
      if (chunk === undefined) continue;
      for (const byte of chunk) {
        let x = byte;
        while (x) {
          x &= x - 1;
          n++;
        }
      }
    }
    return n;
  }

  /** Clears every bit. */
  clear(): void {
    this.#chunks = [];
  }

  /** The chunk size of this bitmap (bytes of one data cluster). */
  get chunkBytes(): number {
    return this.#clusterSize;
  }

  /** OR `src` into this bitmap (same size; any granularity and cluster size). */
  merge(src: DirtyBitmap): void {
    if (src.granularityBits === this.granularityBits && src.chunkBytes === this.#clusterSize) {
      for (let i = 0; i < src.tableSize; i++) {
        const from = src.chunk(i);
        if (from === undefined) continue;
        let to = this.#chunks[i];
        if (to !== undefined && to === this.#ones) continue;
        if (from === ONES.get(this.#clusterSize)) {
          this.#chunks[i] = this.#ones = from;
          continue;
        }
        if (to === undefined) to = this.#chunks[i] = new Uint8Array(this.#clusterSize);
        const n = Math.min(to.length, from.length);
        for (let k = 0; k < n; k++) to[k]! |= from[k]!;
      }
      return;
    }
    // Different layouts: every set source granule marks its guest bytes here (set bits only).
    const g = src.granularity;
    const per = src.chunkBytes * 8;
    for (let i = 0; i < src.tableSize; i++) {
      const from = src.chunk(i);
      if (from === undefined) continue;
      for (let byte = 0; byte < from.length; byte++) {
        const x = from[byte]!;
        if (x === 0) continue;
        for (let b = 0; b < 8; b++) {
          if ((x & (1 << b)) === 0) continue;
          const k = i * per + byte * 8 + b;
          if (k >= src.bits) break;
          this.mark(k * g, Math.min(g, this.#size - k * g));
        }
      }
    }
  }

  /** Follow an image resize: bits past the new end are dropped, new bits are clean. */
  resize(size: number): void {
    this.#size = size;
    const bits = this.bits;
    const chunks = Math.ceil(bits / this.#chunkBits);
    this.#chunks.length = Math.min(this.#chunks.length, chunks);
    let last = this.#chunks[chunks - 1];
    if (last !== undefined && last === this.#ones) {
      last = this.#chunks[chunks - 1] = last.slice();
    }
    if (last !== undefined) {
      const from = bits - (chunks - 1) * this.#chunkBits;
      for (let b = from; b < this.#chunkBits && (b & 7) !== 0; b++) {
        last[b >> 3]! &= ~(1 << (b & 7));
      }
      last.fill(0, Math.ceil(from / 8));
    }
  }
}
