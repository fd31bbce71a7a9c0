/**
 * Image conversion with qemu-img convert's semantics: one or more sources (concatenated, whole
 * backing chains flattened, or one internal snapshot) into a new or existing target, skipping
 * what reads as zeroes, optionally compressed on a Worker pool, or over a backing file.
 *
 * @module
 */
import { BlockError } from "../src/errors.ts";
import type { BlockNode } from "../src/block/node.ts";
import { createImage, type CreateOptions, openImage } from "./open.ts";
import { entryAt } from "./map.ts";
import { Qcow2Node } from "./qcow2/qcow2.ts";
import {
  CLUSTER_INCOMPRESSIBLE,
  CLUSTER_ZERO,
  type CompressedChunk,
  CompressPool,
} from "./qcow2/compress_pool.ts";

/** Options of {@linkcode convertImages}, with qemu-img convert's flags in comments. */
export interface ConvertOptions {
  /** -O: target format (default raw). */
  targetFormat?: string;
  /** -o: target creation options. */
  createOptions?: CreateOptions;
  /** -f: source format (probed when absent). */
  sourceFormat?: string;
  /** -U: share the sources with writers. */
  forceShare?: boolean;
  /** -c: compress the target's clusters (qcow2). */
  compress?: boolean;
  /** -B: the target gets this backing file; only what the source's top layer holds is copied. */
  backingFile?: string;
  /** -F: the format of the `backingFile`. */
  backingFormat?: string;
  /** -S: runs of zeroes at least this long are not written (default 4096; 0 writes everything). */
  sparseSize?: number;
  /** -n: write into an existing target instead of creating it. */
  noCreate?: boolean;
  /** --target-is-zero: with -n, the target already reads as zeroes. */
  targetIsZero?: boolean;
  /**
   * -l: convert this internal snapshot of the source: a string is an ID, else a name; an object
   * matches only the fields it gives (snapshot.id=, snapshot.name=).
   */
  snapshot?: string | { id?: string; name?: string };
  /** Target cache mode (qemu-img -t): `unsafe` (convert's default) does not flush. */
  cache?: "writeback" | "unsafe";
  /** Workers for compression (default: one per core). */
  workers?: number;
  /** Progress reports: bytes done out of total (qemu-img -p). */
  onProgress?: (done: number, total: number) => void;
  /**
   * Runs on the open target once the data is copied (convert --bitmaps adds the bitmaps there,
   * so the target stores them when it closes); what it throws fails the convert, the target stays.
   */
  afterCopy?: (target: BlockNode) => Promise<void>;
}

const CHUNK = 2 << 20;
/** Data chunks read ahead of the one being written (qemu-img convert keeps 8 requests going). */
const READ_AHEAD = 4;
/** Longest status run asked for at once (QEMU's BDRV_REQUEST_MAX_BYTES is just under 2 GiB). */
const MAX_STATUS = 1 << 30;
/** Zeroes in the target may drop its allocation, as qemu-img's BDRV_REQ_MAY_UNMAP. */
const UNMAP = { unmap: true } as const;
const SECTOR = 512;

type Status = "data" | "zero" | "backing";

/**
 * The sources as one concatenated guest space. Each source takes whole sectors, as in QEMU, where
 * a raw file of 1000003 bytes is an image of 1000448: the tail of its last sector reads as zeroes.
 */
class Concat {
  readonly nodes: BlockNode[];
  readonly starts: number[] = [];
  readonly size: number;
  readonly topOnly: boolean;
  constructor(nodes: BlockNode[], topOnly: boolean) {
    this.nodes = nodes;
    this.topOnly = topOnly;
    let at = 0;
    for (const n of nodes) {
      this.starts.push(at);
      at += Math.ceil(n.size / SECTOR) * SECTOR;
    }
    this.size = at;
  }
  #find(pos: number): number {
    let i = this.nodes.length - 1;
    while (i > 0 && this.starts[i]! > pos) i--;
    return i;
  }
  /** Status of the run at `pos`, at most `max` bytes, within one source. */
  async status(pos: number, max: number): Promise<[Status, number]> {
    const i = this.#find(pos);
    const node = this.nodes[i]!;
    const local = pos - this.starts[i]!;
    // The padding after a source's last byte, up to its sector end.
    if (local >= node.size) return ["zero", Math.min(max, this.#end(i) - pos)];
    const limit = Math.min(max, node.size - local);
    if (this.topOnly) {
      // Target has a backing file: only what the source's own layer holds is copied.
      const st = await node.blockStatus(local, limit);
      const length = Math.max(1, Math.min(limit, st.length));
      if (st.kind === "data" || st.kind === "compressed") return ["data", length];
      if (st.kind === "zero") return ["zero", length];
      // Unallocated with nothing below reads as zeroes: the target's backing must not show there.
      if (node.backing === undefined || local >= node.backing.size) return ["zero", length];
      return ["backing", length];
    }
    const e = await entryAt(node, local, limit);
    return [e.zero && !e.data ? "zero" : "data", Math.max(1, e.length)];
  }
  #end(i: number): number {
    return this.starts[i + 1] ?? this.size;
  }
  /** Where the source holding `pos` starts in the concatenation. */
  startOf(pos: number): number {
    return this.starts[this.#find(pos)]!;
  }
  /** The request alignment of the source at `pos`: its cluster size, at least a sector. */
  alignmentOf(pos: number): number {
    const node = this.nodes[this.#find(pos)]!;
    return node instanceof Qcow2Node ? Math.max(SECTOR, node.clusterSize) : SECTOR;
  }
  async read(pos: number, dst: Uint8Array): Promise<void> {
    let done = 0;
    while (done < dst.length) {
      const i = this.#find(pos + done);
      const node = this.nodes[i]!;
      const local = pos + done - this.starts[i]!;
      if (local >= node.size) {
        const n = Math.min(dst.length - done, this.#end(i) - (pos + done));
        dst.fill(0, done, done + n);
        done += n;
        continue;
      }
      const n = Math.min(dst.length - done, node.size - local);
      await node.read(local, dst.subarray(done, done + n));
      done += n;
    }
  }
}

/** Reads 512-byte sectors of one buffer as zero or not, a word at a time. */
class SectorScan {
  readonly #buf: Uint8Array;
  readonly #words: Uint32Array | undefined;
  readonly sectors: number;
  constructor(buf: Uint8Array) {
    this.#buf = buf;
    this.#words = buf.byteOffset % 4 === 0
      ? new Uint32Array(buf.buffer, buf.byteOffset, buf.length >>> 2)
      : undefined;
    this.sectors = Math.ceil(buf.length / SECTOR);
  }
  zero(s: number): boolean {
    const from = s * SECTOR, to = Math.min(this.#buf.length, from + SECTOR);
    const words = this.#words;
    if (words !== undefined && to - from === SECTOR) {
      for (let w = from >>> 2, end = to >>> 2; w < end; w++) if (words[w] !== 0) return false;
      return true;
    }
    for (let i = from; i < to; i++) if (this.#buf[i] !== 0) return false;
    return true;
  }
}

/**
 * qemu-img's is_allocated_sectors: whether the run of sectors at `first` (of `n`) holds data, and
 * its length — the end of a data run aligned up to `alignment` sectors (counted from absolute
 * sector `sectorNum`), and a short zero run before data taken as data, so writes stay aligned.
 */
function allocatedRun(
  scan: SectorScan,
  first: number,
  n: number,
  sectorNum: number,
  alignment: number,
): [boolean, number] {
  if (n <= 0) return [false, 0];
  let isZero = scan.zero(first);
  let i = 1;
  while (i < n && scan.zero(first + i) === isZero) i++;
  if (i === n) return [!isZero, i];
  const tail = (sectorNum + i) % alignment;
  if (tail !== 0) {
    if (isZero && i <= tail) isZero = false;
    if (!isZero) i = Math.min(i + alignment - tail, n);
    else i -= tail;
  }
  return [!isZero, i];
}

/**
 * qemu-img's is_allocated_sectors_min: a data run and the zero runs shorter than `min` sectors
 * inside it, as one run to write; or the zero run that starts the buffer.
 */
function allocatedRunMin(
  scan: SectorScan,
  first: number,
  n: number,
  min: number,
  sectorNum: number,
  alignment: number,
): [boolean, number] {
  if (n < min) min = n;
  const [data, length] = allocatedRun(scan, first, n, sectorNum, alignment);
  if (!data) return [false, length];
  let used = length, checked = length;
  while (checked < n) {
    const [more, run] = allocatedRun(
      scan,
      first + checked,
      n - checked,
      sectorNum + checked,
      alignment,
    );
    checked += run;
    if (more) used = checked;
    else if (run >= min) break;
  }
  return [true, used];
}

/**
 * The runs of `buf` (guest bytes at `pos`, a multiple of 512) to write as data and to leave as
 * zeroes under qemu-img's `-S sparse` rules, in order: [start, end, isData] in buffer bytes.
 * `sparse` 0 writes everything. `alignment` is in sectors (a power of 2).
 */
export function sparseRuns(
  buf: Uint8Array,
  pos: number,
  sparse: number,
  alignment: number,
): Array<[number, number, boolean]> {
  if (sparse === 0) return buf.length === 0 ? [] : [[0, buf.length, true]];
  const scan = new SectorScan(buf);
  const min = Math.max(1, Math.floor(sparse / SECTOR));
  const runs: Array<[number, number, boolean]> = [];
  for (let s = 0; s < scan.sectors;) {
    const [data, n] = allocatedRunMin(scan, s, scan.sectors - s, min, pos / SECTOR + s, alignment);
    const end = Math.min(buf.length, (s + n) * SECTOR);
    const last = runs[runs.length - 1];
    if (last !== undefined && last[2] === data && last[1] === s * SECTOR) last[1] = end;
    else runs.push([s * SECTOR, end, data]);
    s += n;
  }
  return runs;
}

/**
 * Convert `sources` (concatenated) into `target`.
 *
 * @throws {BlockError} `invalid-argument` for option combinations qemu-img refuses
 */
export async function convertImages(
  sources: string[],
  target: string,
  opts: ConvertOptions = {},
): Promise<void> {
  if (sources.length === 0) {
    throw new BlockError("invalid-argument", "Expecting at least one source image");
  }
  const format = opts.targetFormat ?? "raw";
  const sparse = opts.sparseSize ?? 4096;
  if (!Number.isSafeInteger(sparse) || sparse < 0) {
    throw new BlockError("invalid-argument", `Invalid sparse size ${sparse}`);
  }
  if (opts.targetIsZero && !opts.noCreate) {
    throw new BlockError("invalid-argument", "--target-is-zero requires use of -n flag");
  }
  if (opts.snapshot !== undefined && sources.length > 1) {
    throw new BlockError("invalid-argument", "No support for concatenating multiple snapshot");
  }
  // With -n, -B only says the target has a backing file (what the source's top layer does not
  // hold is left alone); the existing target is not changed, so nothing about it is checked.
  if (opts.backingFile !== undefined && !opts.noCreate && format === "raw") {
    throw new BlockError("unsupported", "Backing file not supported for file format 'raw'");
  }
  if (opts.backingFile !== undefined && !opts.noCreate && opts.backingFormat === undefined) {
    throw new BlockError(
      "invalid-argument",
      "Use of backing file requires explicit backing format",
    );
  }
  if (opts.compress && !opts.noCreate && format !== "qcow2") {
    throw new BlockError("unsupported", "Compression not supported for this file format", {
      path: target,
    });
  }
  // A target this call creates is removed again when the conversion fails.
  const created = !opts.noCreate && (await Deno.lstat(target).catch(() => null)) === null;
  let ok = false;
  const nodes: BlockNode[] = [];
  let out: BlockNode | undefined;
  let pool: CompressPool | undefined;
  try {
    for (const src of sources) {
      const node = await openImage(src, {
        ...(opts.sourceFormat === undefined ? {} : { format: opts.sourceFormat }),
        readOnly: true,
        forceShare: opts.forceShare ?? false,
      });
      nodes.push(node);
      if (opts.snapshot !== undefined) {
        if (!(node instanceof Qcow2Node)) {
          throw new BlockError("unsupported", `Format '${node.format}' has no internal snapshots`, {
            path: src,
          });
        }
        node.loadSnapshotForReading(opts.snapshot);
      }
    }
    const concat = new Concat(nodes, opts.backingFile !== undefined);
    const total = concat.size;
    if (!opts.noCreate) {
      await createImage(target, format, total, {
        ...opts.createOptions,
        ...(opts.backingFile === undefined ? {} : { backingFile: opts.backingFile }),
        ...(opts.backingFormat === undefined ? {} : { backingFormat: opts.backingFormat }),
      });
    }
    out = await openImage(target, {
      ...(opts.noCreate ? {} : { format }),
      cache: opts.cache ?? "unsafe",
    });
    if (out.size < total) {
      throw new BlockError("invalid-argument", "Output image is too small", { path: target });
    }
    const cs = out instanceof Qcow2Node ? out.clusterSize : SECTOR;
    if (opts.compress) {
      if (!(out instanceof Qcow2Node)) {
        throw new BlockError("unsupported", "Compression not supported for this file format", {
          path: target,
        });
      }
      pool = new CompressPool(opts.workers);
    }
    // A fresh target without a backing file reads as zeroes: zero runs need no writes.
    const zeroInit = opts.noCreate ? opts.targetIsZero === true : out.backing === undefined;
    const chunk = Math.max(CHUNK, cs);
    const compressing = out instanceof Qcow2Node && pool !== undefined;
    // One scratch buffer for the uncompressed path: writes finish before the next read.
    const scratch = new Uint8Array(chunk);
    // Writes aligned to pow2floor(-S) sectors avoid read-modify-write cycles (qemu-img's
    // s.alignment; vstor's targets take any byte alignment).
    const alignment = sparse < SECTOR ? 1 : 2 ** Math.floor(Math.log2(sparse / SECTOR));
    const backingEnd = opts.backingFile !== undefined ? out.backing?.size : undefined;
    let statusEnd = 0;
    let runStatus: Status = "data";
    // Compressed chunks in flight, oldest first; bounded so reading does not run far ahead.
    const inflight: Array<Promise<void>> = [];
    const spare: Array<Uint8Array<ArrayBuffer>> = [];
    // Data chunks read ahead of the writes, by guest offset, and their reusable buffers.
    const ahead = new Map<number, { n: number; buf: Uint8Array<ArrayBuffer>; io: Promise<void> }>();
    const spareReads: Array<Uint8Array<ArrayBuffer>> = [];
    let lastWrite: Promise<void> = Promise.resolve();
    // Progress counts what will be copied (data, and zero runs under -S 0) out of all of it,
    // found by one pass over the source's status first, as qemu-img's convert_do_copy does.
    const copied = (status: Status) => status === "data" || (status === "zero" && sparse === 0);
    let allocatedTotal = 0, allocatedDone = 0;
    if (opts.onProgress) {
      for (let at = 0; at < total;) {
        const [status, length] = await concat.status(at, Math.min(total - at, MAX_STATUS));
        if (copied(status)) allocatedTotal += length;
        at += Math.max(1, length);
      }
    }
    const progress = (n: number) => {
      allocatedDone += n;
      if (allocatedTotal > 0) opts.onProgress?.(allocatedDone, allocatedTotal);
    };
    for (let pos = 0; pos < total;) {
      // Compressed output works in whole target clusters: one chunk, whatever the status inside.
      const span = Math.min(chunk, total - pos);
      if (compressing) {
        const node = out as Qcow2Node;
        // Reused chunk buffers: a chunk comes back from its Worker before its buffer is needed again.
        const buf = spare.pop() ?? new Uint8Array(chunk);
        // As QEMU: a target cluster is written whole, so a cluster with any data is read whole
        // (through the source's backing chain where its top layer has nothing); clusters without
        // data are left alone, or zeroed where the target would not read as zeroes.
        const clusters = Math.ceil(span / cs);
        const hasData = new Uint8Array(clusters);
        const parts: Array<[number, number, Status]> = [];
        for (let at = 0; at < span;) {
          const [status, n] = await concat.status(pos + at, span - at);
          parts.push([at, n, status]);
          // -S 0 keeps the target fully allocated: zero runs are written too (as zero data).
          if (status === "data" || (status === "zero" && sparse === 0)) {
            hasData.fill(1, Math.floor(at / cs), Math.ceil((at + n) / cs));
          }
          at += n;
        }
        const zeroRuns: Array<[number, number]> = [];
        for (const [at, n, status] of parts) {
          if (status === "data") {
            await concat.read(pos + at, buf.subarray(at, at + n));
            continue;
          }
          for (let piece = at; piece < at + n;) {
            const c = Math.floor(piece / cs);
            const end = Math.min(at + n, (c + 1) * cs);
            if (hasData[c] === 1 && status === "backing") {
              await concat.read(pos + piece, buf.subarray(piece, end));
            } else {
              buf.fill(0, piece, end);
              if (hasData[c] === 0 && status === "zero" && !zeroInit) {
                const last = zeroRuns[zeroRuns.length - 1];
                if (last !== undefined && last[0] + last[1] === pos + piece) last[1] += end - piece;
                else zeroRuns.push([pos + piece, end - piece]);
              }
            }
            piece = end;
          }
        }
        const anyData = hasData.includes(1);
        buf.fill(0, span);
        const start = pos;
        const compressed = anyData
          ? pool!.compressChunk(node.header.compressionType, cs, buf, span)
          : undefined;
        if (!anyData) spare.push(buf);
        // Writes keep source order, so the target's layout does not depend on Worker timing.
        const previous = lastWrite;
        lastWrite = (async () => {
          const result = await compressed;
          await previous;
          for (const [at, n] of zeroRuns) await node.writeZeroes(at, n, UNMAP);
          if (result === undefined) return;
          // A zero cluster is left out only where the target already reads as zeroes (as QEMU).
          await writeCompressedChunk(node, start, span, result, hasData, zeroInit && sparse > 0);
          spare.push(result.data);
        })();
        inflight.push(lastWrite);
        while (inflight.length > 2 * pool!.size) await inflight.shift();
        pos += span;
        progress(parts.reduce((sum, [, n, st]) => copied(st) ? sum + n : sum, 0));
        continue;
      }
      // As qemu-img's convert_iteration_sectors: one status run as far as it goes, its end
      // aligned down to the source's clusters when that leaves something; data in buffer-sized
      // pieces; zero and backing runs whole.
      if (pos >= statusEnd) {
        const [status, length] = await concat.status(pos, Math.min(total - pos, MAX_STATUS));
        let end = pos + Math.ceil(length / SECTOR) * SECTOR;
        const tail = (end - concat.startOf(pos)) % concat.alignmentOf(pos);
        if (end - pos > tail) end -= tail;
        // Beyond the end of the target's backing file a zero run needs no write.
        runStatus = status === "zero" && backingEnd !== undefined && pos >= backingEnd
          ? "backing"
          : status;
        statusEnd = end;
        if (backingEnd !== undefined && pos < backingEnd && statusEnd > backingEnd) {
          statusEnd = backingEnd;
        }
      }
      let n = Math.min(statusEnd, total) - pos;
      const status = runStatus;
      if (status === "data" || (status === "zero" && sparse === 0)) {
        n = Math.min(n, chunk);
        let buf: Uint8Array<ArrayBuffer>;
        let own: Uint8Array<ArrayBuffer> | undefined;
        const early = ahead.get(pos);
        if (status === "data" && early !== undefined && early.n === n) {
          ahead.delete(pos);
          own = early.buf;
          buf = own.subarray(0, n);
          await early.io;
        } else {
          buf = scratch.subarray(0, n);
          if (status === "data") await concat.read(pos, buf);
          else buf.fill(0);
        }
        // The next chunks of this data run are read while this one is written (qemu-img keeps
        // several requests in flight too): a source with requests in flight (io_uring, NBD)
        // serves them together.
        if (status === "data") {
          let at = pos + n;
          for (const p of ahead.keys()) at = Math.max(at, p + ahead.get(p)!.n);
          const runEnd = Math.min(statusEnd, total);
          while (ahead.size < READ_AHEAD && at < runEnd) {
            const m = Math.min(chunk, runEnd - at);
            const b = spareReads.pop() ?? new Uint8Array(chunk);
            const io = concat.read(at, b.subarray(0, m));
            io.catch(() => {}); // surfaced where it is awaited; dropped if the copy fails first
            ahead.set(at, { n: m, buf: b, io });
            at += m;
          }
        }
        for (const [a, b, data] of sparseRuns(buf, pos, sparse, alignment)) {
          if (data) await out.write(pos + a, buf.subarray(a, b));
          else if (!zeroInit) await out.writeZeroes(pos + a, b - a, UNMAP);
        }
        if (own !== undefined) spareReads.push(own);
      } else if (status === "zero" && !zeroInit) {
        await out.writeZeroes(pos, n, UNMAP);
      }
      pos += n;
      if (copied(status)) progress(n);
    }
    await Promise.all(inflight);
    // As QEMU's final zero-length compressed write: the file ends on a sector boundary.
    if (compressing) await (out as Qcow2Node).alignFileEnd(SECTOR);
    await out.flush();
    ok = true;
    await opts.afterCopy?.(out);
  } finally {
    pool?.close();
    await out?.close().catch((e) => {
      if (ok) throw e;
    });
    for (const n of nodes) await n.close();
    if (!ok && created) await Deno.remove(target).catch(() => {});
  }
}

/**
 * Writes one compressed chunk at guest offset `start`: runs of the clusters that have data, each
 * cluster either precompressed (its bytes start its slot in `data`), incompressible (written as it
 * is) or zero (skipped when `skipZero`, else compressed here like any other cluster).
 */
async function writeCompressedChunk(
  node: Qcow2Node,
  start: number,
  span: number,
  result: CompressedChunk,
  hasData: Uint8Array,
  skipZero: boolean,
): Promise<void> {
  const cs = node.clusterSize;
  const { data, lengths } = result;
  const packed: Array<Uint8Array | null | undefined> = [];
  const skip = (c: number) => hasData[c] === 0 || (lengths[c] === CLUSTER_ZERO && skipZero);
  for (let c = 0; c < lengths.length;) {
    if (skip(c)) {
      c++;
      continue;
    }
    const first = c;
    packed.length = 0;
    for (; c < lengths.length && !skip(c); c++) {
      const length = lengths[c]!;
      packed.push(
        length > 0
          ? data.subarray(c * cs, c * cs + length)
          : length === CLUSTER_INCOMPRESSIBLE
          ? null
          : undefined,
      );
    }
    const from = first * cs, to = Math.min(span, c * cs);
    await node.write(start + from, data.subarray(from, to), {
      compressed: true,
      precompressed: packed,
    });
  }
}
