/**
 * A host file with a volatile write cache, for crash tests. Every mutation is logged; `flush()`
 * is a barrier (everything logged before it is durable). A crash image is the durable state at
 * the last barrier before a cut plus any subset of the operations issued after that barrier:
 * all of them (a prefix cut), a seeded random subset (optionally torn into 512-byte sectors), or
 * an explicit one ({@linkcode allSubsets} enumerates them all for short flush intervals). Images
 * are replayed in one pass and handed out as copy-on-write overlays, never copied whole.
 *
 * @module
 */
import type { HostExtent, HostFile } from "../../../src/host/host_file.ts";
import { MemoryFile } from "../../../src/host/memory.ts";

/** One logged host operation. */
export type FileOp =
  | { readonly kind: "write"; readonly offset: number; readonly data: Uint8Array }
  | { readonly kind: "truncate"; readonly size: number }
  | { readonly kind: "punch"; readonly offset: number; readonly length: number }
  | { readonly kind: "preallocate"; readonly offset: number; readonly length: number }
  | { readonly kind: "flush" };

/** Sector size a torn write is split into (the unit a disk persists atomically). */
export const SECTOR = 512;

/** xorshift32 in [0, 1): seeded and reproducible; small seeds are mixed so they start apart. */
export function rng(seed: number): () => number {
  let s = Math.imul((seed ^ 0x9e3779b9) >>> 0, 0x85ebca6b) >>> 0;
  s = (s ^ (s >>> 13)) >>> 0 || 1;
  for (let i = 0; i < 4; i++) {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
  }
  return () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) / 4294967296;
  };
}

/**
 * A recording host file: behaves like a {@linkcode MemoryFile} (what the page cache shows the
 * driver) and logs every write, truncate, punch, preallocate and flush.
 */
export class CrashFile implements HostFile {
  readonly path: string;
  readonly readOnly = false;
  /** The contents when recording started (taken as durable). */
  readonly base: Uint8Array;
  readonly log: FileOp[] = [];
  readonly #live: MemoryFile;

  constructor(path: string, base: Uint8Array) {
    this.path = path;
    this.base = base.slice();
    this.#live = new MemoryFile(path, base);
  }

  /** Operations logged so far: the cut point "now". */
  get position(): number {
    return this.log.length;
  }

  /** Indices of the flush operations in the log. */
  flushIndices(): number[] {
    const out: number[] = [];
    this.log.forEach((op, i) => {
      if (op.kind === "flush") out.push(i);
    });
    return out;
  }

  size(): number {
    return this.#live.size();
  }

  readAt(offset: number, dst: Uint8Array): void {
    this.#live.readAt(offset, dst);
  }

  writeAt(offset: number, src: Uint8Array): void {
    this.#live.writeAt(offset, src);
    this.log.push({ kind: "write", offset, data: src.slice() });
  }

  truncate(size: number): void {
    this.#live.truncate(size);
    this.log.push({ kind: "truncate", size });
  }

  flush(): void {
    this.#live.flush();
    this.log.push({ kind: "flush" });
  }

  punchHole(offset: number, length: number): void {
    this.#live.punchHole(offset, length);
    this.log.push({ kind: "punch", offset, length });
  }

  preallocate(offset: number, length: number): void {
    this.#live.preallocate(offset, length);
    this.log.push({ kind: "preallocate", offset, length });
  }

  dataStatus(offset: number, max: number): HostExtent {
    return this.#live.dataStatus(offset, max);
  }

  allocatedSize(): number {
    return this.#live.allocatedSize();
  }

  close(): void {}
}

/** Where the crash happens and what of the unflushed operations reached the disk. */
export interface CrashPoint {
  /** Operations [0, cut) were issued before the crash. */
  readonly cut: number;
  /**
   * Absent: every operation before the cut reached the disk (a prefix cut). Present: the state
   * at the last flush before the cut, plus a seeded random subset of the operations after it
   * (each kept with probability `keep`), with `torn` writes and punches split into sectors.
   */
  readonly subset?: { readonly seed: number; readonly keep: number; readonly torn: boolean };
  /** Instead of a random subset: exactly these log indices after the last flush reached the disk. */
  readonly kept?: readonly number[];
  /**
   * Every operation after the last flush reached the disk except write `index`, torn: only its
   * first sector (`first`) or everything but its first sector (`rest`).
   */
  readonly torn?: { readonly index: number; readonly keep: "first" | "rest" };
}

/**
 * Every crash point in `[from, to]` with every subset of the operations after its last flush:
 * exhaustive where a flush interval is short (at most `maxOps` operations), else a prefix cut.
 */
export function allSubsets(
  log: readonly FileOp[],
  from: number,
  to: number,
  maxOps = 8,
): CrashPoint[] {
  const points: CrashPoint[] = [];
  for (let cut = from; cut <= to; cut++) {
    const first = lastFlushBefore(log, cut) + 1;
    const ops = cut - first;
    if (ops === 0 || ops > maxOps) {
      points.push({ cut });
      continue;
    }
    for (let mask = 0; mask < 1 << ops; mask++) {
      const kept: number[] = [];
      for (let i = 0; i < ops; i++) if (mask & (1 << i)) kept.push(first + i);
      points.push({ cut, kept });
    }
  }
  return points;
}

/** Index of the last flush operation before `cut` (−1 when none). */
export function lastFlushBefore(log: readonly FileOp[], cut: number): number {
  for (let i = cut - 1; i >= 0; i--) if (log[i]!.kind === "flush") return i;
  return -1;
}

/** What a logged operation is replayed onto. */
type Target = Pick<HostFile, "writeAt" | "truncate" | "punchHole" | "preallocate">;

/** A growable byte array: the replayed state of the disk. */
class Bytes implements Target {
  data = new Uint8Array(0);
  size = 0;

  constructor(base: Uint8Array) {
    this.data = base.slice();
    this.size = base.length;
  }

  #reserve(size: number): void {
    if (size <= this.data.length) return;
    const grown = new Uint8Array(Math.max(size, this.data.length * 2));
    grown.set(this.data.subarray(0, this.size));
    this.data = grown;
  }

  writeAt(offset: number, src: Uint8Array): void {
    const end = offset + src.length;
    this.#reserve(end);
    if (offset > this.size) this.data.fill(0, this.size, offset);
    this.data.set(src, offset);
    if (end > this.size) this.size = end;
  }

  truncate(size: number): void {
    this.#reserve(size);
    if (size > this.size) this.data.fill(0, this.size, size);
    this.size = size;
  }

  punchHole(offset: number, length: number): void {
    const end = Math.min(this.size, offset + length);
    if (end > offset) this.data.fill(0, offset, end);
  }

  preallocate(offset: number, length: number): void {
    if (offset + length > this.size) this.truncate(offset + length);
  }
}

const PAGE = 4096;

/**
 * A crash image: a read-only view of a replayed state plus the pages written since (what the
 * driver writes when it reopens, checks or repairs the image). Valid until the replay moves on.
 */
export class OverlayFile implements HostFile {
  readonly path: string;
  readonly readOnly = false;
  readonly #base: Uint8Array;
  /** Base bytes below this offset are still visible (a shrink hides the rest for good). */
  #baseLimit: number;
  #size: number;
  readonly #pages = new Map<number, Uint8Array>();

  constructor(path: string, base: Uint8Array, size: number) {
    this.path = path;
    this.#base = base;
    this.#baseLimit = size;
    this.#size = size;
  }

  /** The whole image as bytes (for saving a failing case). */
  contents(): Uint8Array {
    const out = new Uint8Array(this.#size);
    this.readAt(0, out);
    return out;
  }

  size(): number {
    return this.#size;
  }

  readAt(offset: number, dst: Uint8Array): void {
    const end = offset + dst.length;
    let at = offset;
    while (at < end) {
      const page = Math.floor(at / PAGE);
      const next = Math.min(end, (page + 1) * PAGE);
      const part = dst.subarray(at - offset, next - offset);
      const own = this.#pages.get(page);
      if (own !== undefined) {
        part.set(own.subarray(at - page * PAGE, next - page * PAGE));
      } else {
        // Runs of pages without their own copy read straight from the base.
        let runEnd = next;
        while (runEnd < end && !this.#pages.has(Math.floor(runEnd / PAGE))) {
          runEnd = Math.min(end, runEnd + PAGE);
        }
        const run = dst.subarray(at - offset, runEnd - offset);
        const visible = Math.max(0, Math.min(runEnd, this.#baseLimit, this.#size) - at);
        if (visible > 0) run.set(this.#base.subarray(at, at + visible));
        run.fill(0, visible);
        at = runEnd;
        continue;
      }
      if (next > this.#size) part.fill(0, Math.max(0, this.#size - at));
      at = next;
    }
  }

  #page(page: number): Uint8Array {
    let own = this.#pages.get(page);
    if (own === undefined) {
      own = new Uint8Array(PAGE);
      const start = page * PAGE;
      const visible = Math.max(0, Math.min(start + PAGE, this.#baseLimit, this.#size) - start);
      if (visible > 0) own.set(this.#base.subarray(start, start + visible));
      this.#pages.set(page, own);
    }
    return own;
  }

  writeAt(offset: number, src: Uint8Array): void {
    const end = offset + src.length;
    for (let at = offset; at < end;) {
      const page = Math.floor(at / PAGE);
      const next = Math.min(end, (page + 1) * PAGE);
      this.#page(page).set(src.subarray(at - offset, next - offset), at - page * PAGE);
      at = next;
    }
    if (end > this.#size) this.#size = end;
  }

  truncate(size: number): void {
    if (size < this.#size) {
      // Bytes past the new end read as zeroes if the file grows again.
      const page = Math.floor(size / PAGE);
      if (size % PAGE !== 0) this.#page(page).fill(0, size % PAGE);
      for (const key of [...this.#pages.keys()]) if (key * PAGE >= size) this.#pages.delete(key);
      this.#baseLimit = Math.min(this.#baseLimit, size);
    }
    this.#size = size;
  }

  flush(): void {}

  punchHole(offset: number, length: number): void {
    const end = Math.min(this.#size, offset + length);
    if (end > offset) this.writeAt(offset, new Uint8Array(end - offset));
  }

  preallocate(offset: number, length: number): void {
    if (offset + length > this.#size) this.truncate(offset + length);
  }

  dataStatus(offset: number, max: number): HostExtent {
    if (offset >= this.#size) return { data: false, length: max };
    return { data: true, length: Math.min(max, this.#size - offset) };
  }

  allocatedSize(): number {
    return this.#size;
  }

  close(): void {}
}

function apply(file: Target, op: FileOp): void {
  switch (op.kind) {
    case "write":
      file.writeAt(op.offset, op.data);
      break;
    case "truncate":
      file.truncate(op.size);
      break;
    case "punch":
      file.punchHole(op.offset, op.length);
      break;
    case "preallocate":
      file.preallocate(op.offset, op.length);
      break;
    case "flush":
      break;
  }
}

/** Apply part of `op`: each sector-aligned piece of a write or punch kept when `keep()` says so. */
function applyTorn(file: OverlayFile, op: FileOp, keep: () => boolean): void {
  if (op.kind !== "write" && op.kind !== "punch") {
    if (keep()) apply(file, op);
    return;
  }
  const length = op.kind === "write" ? op.data.length : op.length;
  const end = op.offset + length;
  for (let at = op.offset; at < end;) {
    const next = Math.min(end, (Math.floor(at / SECTOR) + 1) * SECTOR);
    if (keep()) {
      if (op.kind === "write") {
        file.writeAt(at, op.data.subarray(at - op.offset, next - op.offset));
      } else {
        file.punchHole(at, next - at);
      }
    }
    at = next;
  }
}

/**
 * The crash images of `points` over `base` and `log`, each as an {@linkcode OverlayFile} that is
 * valid until the next iteration. One pass over the log, no copy of the image per point: a prefix
 * point is the replayed state at its cut, a subset point the state at its last flush plus the
 * kept operations in the overlay. Points come in the order the replay reaches them.
 */
export function* crashImages(
  base: Uint8Array,
  log: readonly FileOp[],
  points: readonly CrashPoint[],
): Generator<[CrashPoint, OverlayFile]> {
  const at = (p: CrashPoint) =>
    p.subset || p.kept || p.torn ? lastFlushBefore(log, p.cut) + 1 : p.cut;
  const sorted = [...points].sort((a, b) => at(a) - at(b) || a.cut - b.cut);
  const state = new Bytes(base);
  let pos = 0;
  for (const p of sorted) {
    const from = at(p);
    while (pos < from) apply(state, log[pos++]!);
    const file = new OverlayFile("crash.qcow2", state.data, state.size);
    if (p.torn !== undefined) {
      const { index, keep } = p.torn;
      for (let i = from; i < p.cut; i++) {
        const op = log[i]!;
        if (i !== index) {
          apply(file, op);
          continue;
        }
        if (op.kind !== "write") throw new RangeError(`log index ${i} is not a write`);
        const split = Math.min(op.data.length, SECTOR - (op.offset % SECTOR));
        if (keep === "first") file.writeAt(op.offset, op.data.subarray(0, split));
        else if (split < op.data.length) file.writeAt(op.offset + split, op.data.subarray(split));
      }
    } else if (p.kept !== undefined) {
      for (const i of p.kept) {
        if (i < from || i >= p.cut) {
          throw new RangeError(`log index ${i} is not after the last flush`);
        }
        apply(file, log[i]!);
      }
    } else if (p.subset !== undefined) {
      const random = rng(p.subset.seed);
      const keep = () => random() < p.subset!.keep;
      for (let i = from; i < p.cut; i++) {
        const op = log[i]!;
        if (p.subset.torn) applyTorn(file, op, keep);
        else if (keep()) apply(file, op);
      }
    }
    yield [p, file];
  }
}

/** A short description of the operations in `[from, to)` of the log, for failure messages. */
export function describeOps(log: readonly FileOp[], from: number, to: number): string {
  const lines: string[] = [];
  for (let i = Math.max(0, from); i < Math.min(log.length, to); i++) {
    const op = log[i]!;
    const hex = (n: number) => `0x${n.toString(16)}`;
    switch (op.kind) {
      case "write":
        lines.push(`#${i} write ${hex(op.offset)}+${hex(op.data.length)}`);
        break;
      case "truncate":
        lines.push(`#${i} truncate ${hex(op.size)}`);
        break;
      case "punch":
        lines.push(`#${i} punch ${hex(op.offset)}+${hex(op.length)}`);
        break;
      case "preallocate":
        lines.push(`#${i} preallocate ${hex(op.offset)}+${hex(op.length)}`);
        break;
      case "flush":
        lines.push(`#${i} flush`);
        break;
    }
  }
  return lines.join("\n");
}
