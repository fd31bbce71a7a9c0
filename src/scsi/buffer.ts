/**
 * A command's data buffer as the transport hands it to a logical unit: a scatter-gather list of
 * byte views (for virtio, zero-copy views of guest memory), minus the bytes at the front that
 * belong to the transport's own header. Block I/O goes straight between the node and the views;
 * emulated commands copy their few bytes in or out.
 *
 * One instance is reused for every request of a queue: {@linkcode ScsiBuffer.set} re-points it.
 *
 * @module
 */
import type { BlockNode, WriteOptions } from "../block/node.ts";

const NO_SEGMENTS: readonly Uint8Array[] = [];

/**
 * Scatter-gather data buffer.
 *
 * @example
 * ```ts
 * import { ScsiBuffer } from "./buffer.ts";
 * const a = new Uint8Array(4), b = new Uint8Array(4);
 * const buf = new ScsiBuffer().set([a, b], 2); // the first 2 bytes of `a` are a header
 * buf.copyIn(new Uint8Array([1, 2, 3, 4]));
 * if (buf.length !== 6 || a[3] !== 2 || b[1] !== 4) throw new Error("scatter");
 * ```
 */
export class ScsiBuffer {
  #segments: readonly Uint8Array[] = NO_SEGMENTS;
  #skip = 0;
  #length = 0;

  /** A buffer over one array (tests, benches). */
  static of(bytes: Uint8Array): ScsiBuffer {
    return new ScsiBuffer().set([bytes], 0);
  }

  /**
   * Re-points the buffer at `segments`, skipping the first `skip` bytes (the transport's header).
   * A skip past the end leaves an empty buffer.
   */
  set(segments: readonly Uint8Array[], skip: number): this {
    let total = 0;
    for (const s of segments) total += s.length;
    this.#segments = segments;
    this.#skip = Math.min(Math.max(0, skip), total);
    this.#length = total - this.#skip;
    return this;
  }

  /** Forgets the segments (no references to guest memory are kept). */
  clear(): void {
    this.#segments = NO_SEGMENTS;
    this.#skip = 0;
    this.#length = 0;
  }

  /** Bytes in the buffer. */
  get length(): number {
    return this.#length;
  }

  /**
   * Visits the views covering `[at, at + length)` of the buffer, in order; `fn` gets each view and
   * its offset from `at`. `length` is clamped to the buffer.
   */
  #walk(
    at: number,
    length: number,
    fn: (view: Uint8Array, done: number) => void,
  ): number {
    const end = Math.min(this.#length, at + length);
    if (at >= end) return 0;
    let pos = at + this.#skip; // position within the concatenated segments
    const stop = end + this.#skip;
    let base = 0;
    let done = 0;
    for (const seg of this.#segments) {
      const segEnd = base + seg.length;
      if (pos < segEnd) {
        const from = pos - base;
        const to = Math.min(seg.length, stop - base);
        fn(from === 0 && to === seg.length ? seg : seg.subarray(from, to), done);
        done += to - from;
        pos = base + to;
        if (pos >= stop) break;
      }
      base = segEnd;
    }
    return done;
  }

  /** Copies `src` into the buffer at `at`, as much as fits; returns the bytes copied. */
  copyIn(src: Uint8Array, at = 0): number {
    return this.#walk(at, src.length, (view, done) => {
      view.set(src.subarray(done, done + view.length));
    });
  }

  /** Copies from the buffer at `at` into `dst`, as much as there is; returns the bytes copied. */
  copyOut(dst: Uint8Array, at = 0): number {
    return this.#walk(at, dst.length, (view, done) => {
      dst.set(view, done);
    });
  }

  /** Zeroes `[at, at + length)` of the buffer (clamped); returns the bytes zeroed. */
  zero(at: number, length: number): number {
    return this.#walk(at, length, (view) => view.fill(0));
  }

  /**
   * Reads `length` bytes of `node` at `nodeOffset` into the buffer at `at`, one node read per
   * segment, straight into the segment's memory. A range that is one whole segment (the usual
   * data descriptor) costs just the node's own read.
   *
   * @returns resolves when the bytes are in; fewer than `length` arrive only when the buffer is
   *   shorter
   */
  readFrom(node: BlockNode, nodeOffset: number, at: number, length: number): Promise<void> {
    const whole = this.#whole(at, length);
    if (whole !== null) return node.read(nodeOffset, whole);
    return this.#readViews(node, nodeOffset, this.#views(at, length));
  }

  async #readViews(node: BlockNode, nodeOffset: number, views: Uint8Array[]): Promise<void> {
    let done = 0;
    for (const view of views) {
      await node.read(nodeOffset + done, view);
      done += view.length;
    }
  }

  /**
   * Writes `length` bytes from the buffer at `at` to `node` at `nodeOffset`, one node write per
   * segment. With `fua`, the data is durable when this resolves: a single segment is written with
   * FUA, several are followed by one flush.
   *
   * @returns the bytes written; fewer than `length` only when the buffer is shorter
   */
  async writeTo(
    node: BlockNode,
    nodeOffset: number,
    at: number,
    length: number,
    fua: boolean,
  ): Promise<number> {
    const whole = this.#whole(at, length);
    if (whole !== null) {
      await node.write(nodeOffset, whole, fua ? FUA : undefined);
      return whole.length;
    }
    const views = this.#views(at, length);
    let done = 0;
    const single = views.length === 1;
    const opts: WriteOptions | undefined = fua && single ? FUA : undefined;
    for (const view of views) {
      await node.write(nodeOffset + done, view, opts);
      done += view.length;
    }
    if (fua && !single && done > 0) await node.flush();
    return done;
  }

  /**
   * The common case of one segment holding exactly the range (a driver's data descriptor): that
   * segment itself, with no view or array to allocate; else null.
   */
  #whole(at: number, length: number): Uint8Array | null {
    let pos = at + this.#skip;
    for (const seg of this.#segments) {
      if (pos < seg.length) {
        return pos === 0 && seg.length === length && at + length <= this.#length ? seg : null;
      }
      pos -= seg.length;
    }
    return null;
  }

  #views(at: number, length: number): Uint8Array[] {
    const views: Uint8Array[] = [];
    this.#walk(at, length, (view) => {
      views.push(view);
    });
    return views;
  }
}

const FUA: WriteOptions = Object.freeze({ fua: true });
