/**
 * The reference walk of the check (QEMU's calculate_refcounts): every reference to every host
 * cluster — header, L1 and L2 tables, data and compressed clusters, snapshot L1 tables, the
 * snapshot table, the refcount table and blocks, bitmaps — counted into an in-memory refcount
 * table, with each entry checked on the way. `visitReferences` tells a caller of each reference
 * (for maps of the host file); the check compares the counts with the stored refcounts.
 *
 * @module
 */
import { MAX_L1_BYTES } from "./header.ts";
import { countBitmapClusters } from "./bitmap_format.ts";
import { type CheckFix, type CheckHost, type CheckReport, newReport } from "./check_host.ts";

/** The L2 table offset of an L1 entry. */
export const L1E_OFFSET_MASK = 0x00fffffffffffe00n;
const L1E_RESERVED_MASK = 0x7f000000000001ffn;
/** The host offset of a standard L2 entry. */
export const L2E_OFFSET_MASK = 0x00fffffffffffe00n;
const L2E_STD_RESERVED_MASK = 0x3f000000000001fen;
const REFT_OFFSET_MASK = 0xfffffffffffffe00n;
const REFT_RESERVED_MASK = 0x1ffn;
/** L1/L2 entry flag: refcount exactly one, writable in place. */
export const COPIED = 1n << 63n;
/** L2 entry flag: the cluster is stored compressed. */
export const COMPRESSED = 1n << 62n;
const ZERO = 1n;
const ALL_ALLOC = 0xffffffffn;

/** A number in hex without a prefix, as QEMU's messages print it. */
export const hex = (v: bigint | number) => v.toString(16);

/** The in-memory refcount table (QEMU's IMRT): one counter per host cluster, growable. */
export class Imrt {
  data: Uint32Array;
  length: number;
  constructor(clusters: number) {
    this.data = new Uint32Array(Math.max(clusters, 1));
    this.length = clusters;
  }
  get(c: number): number {
    return c < this.length ? this.data[c]! : 0;
  }
  set(c: number, v: number): void {
    this.grow(c + 1);
    this.data[c] = v;
  }
  grow(clusters: number): void {
    if (clusters <= this.length) return;
    if (clusters > this.data.length) {
      const grown = new Uint32Array(Math.max(clusters, this.data.length * 2));
      grown.set(this.data.subarray(0, this.length));
      this.data = grown;
    }
    this.length = clusters;
  }
  clear(): void {
    this.data.fill(0);
  }
}

/**
 * What a reference to host clusters is, as the check meets it: the header, the active L1 table, an
 * L2 table, a data cluster, compressed data, an inactive (snapshot) L1 table, the snapshot table,
 * the refcount table, a refcount block, or a bitmap structure (directory, table or data).
 */
export type HostReference =
  | "header"
  | "l1"
  | "l2"
  | "data"
  | "compressed"
  | "snapshot-l1"
  | "snapshot-table"
  | "refcount-table"
  | "refcount-block"
  | "bitmap";

/** One pass of the check: the image, the report it fills, the counts, what it may repair. */
export interface Ctx {
  node: CheckHost;
  /** Told of every reference counted, with what it is (for maps of the host file). */
  visit?: (offset: number, bytes: number, what: HostReference) => void;
  res: CheckReport;
  imrt: Imrt;
  fix: CheckFix;
  cs: number;
  max: number;
  fileLen: number;
}

/** One line of the report, as qemu-img check prints it. */
export function say(ctx: Ctx, line: string): void {
  ctx.res.messages.push(line);
}

/** `count` big-endian 64-bit entries at `offset` of the image file. */
export function readU64s(ctx: Ctx, offset: number, count: number): BigUint64Array {
  const bytes = new Uint8Array(count * 8);
  ctx.node.file.readAt(offset, bytes);
  const view = new DataView(bytes.buffer);
  const out = new BigUint64Array(count);
  for (let i = 0; i < count; i++) out[i] = view.getBigUint64(i * 8);
  return out;
}

function inc(ctx: Ctx, offset: number, size: number, what: HostReference): void {
  if (size <= 0) return;
  ctx.visit?.(offset, size, what);
  if (offset + size - ctx.fileLen >= ctx.cs) {
    say(
      ctx,
      `ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${
        hex(offset)
      } size 0x${hex(size)}`,
    );
    ctx.res.corruptions++;
    return;
  }
  const first = Math.floor(offset / ctx.cs), last = Math.floor((offset + size - 1) / ctx.cs);
  for (let c = first; c <= last; c++) {
    ctx.imrt.grow(c + 1);
    const v = ctx.imrt.get(c);
    if (v === ctx.max) {
      say(ctx, `ERROR: overflow cluster offset=0x${hex(c * ctx.cs)}`);
      say(
        ctx,
        "Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing",
      );
      ctx.res.corruptions++;
      continue;
    }
    ctx.imrt.set(c, v + 1);
  }
}

function checkL2(ctx: Ctx, l2Offset: number, frag: boolean): void {
  const { node, cs, res } = ctx;
  const ext = node.extendedL2;
  const entryWords = ext ? 2 : 1;
  const entries = cs / (8 * entryWords);
  const table = readU64s(ctx, l2Offset, entries * entryWords);
  const csizeShift = BigInt(62 - (node.clusterBits - 8));
  const offsetMask = (1n << csizeShift) - 1n;
  let nextContiguous = 0;
  for (let i = 0; i < entries; i++) {
    let entry = table[i * entryWords]!;
    const bitmap = ext ? table[i * entryWords + 1]! : 0n;
    const compressed = (entry & COMPRESSED) !== 0n;
    const host = Number(entry & L2E_OFFSET_MASK);
    const zeroFlag = !ext && (entry & ZERO) !== 0n && node.header.version === 3;
    if (!compressed && (entry & L2E_STD_RESERVED_MASK) !== 0n) {
      say(ctx, `ERROR found l2 entry with reserved bits set: ${hex(entry)}`);
      res.corruptions++;
    }
    if (compressed) {
      if (entry & COPIED) {
        say(
          ctx,
          `ERROR: coffset=0x${
            hex(entry & offsetMask)
          }: copied flag must never be set for compressed clusters`,
        );
        entry &= ~COPIED;
        res.corruptions++;
      }
      if (bitmap !== 0n) {
        say(
          ctx,
          `ERROR compressed cluster ${i} with non-zero subcluster allocation bitmap, entry=0x${
            hex(entry)
          }`,
        );
        res.corruptions++;
        continue;
      }
      const coffset = Number(entry & offsetMask);
      const sectors = Number((entry >> csizeShift) & ((1n << BigInt(node.clusterBits - 8)) - 1n)) +
        1;
      inc(ctx, coffset, sectors * 512 - (coffset & 511), "compressed");
      if (frag) {
        res.allocatedClusters++;
        res.compressedClusters++;
        res.fragmentedClusters++;
      }
      continue;
    }
    if (host !== 0) {
      // NORMAL or ZERO_ALLOC.
      if (((bitmap >> 32n) & bitmap) !== 0n) {
        res.corruptions++;
        say(
          ctx,
          `ERROR offset=${hex(host)}: Allocated cluster has corrupted subcluster allocation bitmap`,
        );
      }
      if (host % cs !== 0) {
        res.corruptions++;
        const containsData = ext ? (bitmap & ALL_ALLOC) !== 0n : !zeroFlag;
        if (!containsData) {
          say(
            ctx,
            `${ctx.fix.errors ? "Repairing" : "ERROR"} offset=${
              hex(host)
            }: Preallocated cluster is not properly aligned; L2 entry corrupted.`,
          );
          if (ctx.fix.errors) {
            // Make it a plain zero cluster (or its allocated subclusters zero).
            const at = l2Offset + i * 8 * entryWords;
            const bytes = new Uint8Array(8 * entryWords);
            const v = new DataView(bytes.buffer);
            if (ext) {
              let b = bitmap | (bitmap << 32n);
              b &= 0xffffffff00000000n;
              v.setBigUint64(0, 0n);
              v.setBigUint64(8, b);
            } else {
              v.setBigUint64(0, ZERO);
            }
            node.l2Cache.discard(l2Offset);
            node.file.writeAt(at, bytes);
            node.barrier();
            res.corruptions--;
            res.corruptionsFixed++;
            continue;
          }
        } else {
          say(
            ctx,
            `ERROR offset=${hex(host)}: Data cluster is not properly aligned; L2 entry corrupted.`,
          );
        }
      }
      if (frag) {
        res.allocatedClusters++;
        if (nextContiguous !== 0 && host !== nextContiguous) res.fragmentedClusters++;
        nextContiguous = host + cs;
      }
      inc(ctx, host, cs, "data");
      continue;
    }
    if (!zeroFlag && (bitmap & ALL_ALLOC) !== 0n) {
      res.corruptions++;
      say(ctx, "ERROR: Unallocated cluster has non-zero subcluster allocation map");
    }
  }
}

function checkL1(ctx: Ctx, l1Offset: number, l1Size: number, frag: boolean): void {
  if (l1Size === 0) return;
  inc(ctx, l1Offset, l1Size * 8, frag ? "l1" : "snapshot-l1");
  const l1 = readU64s(ctx, l1Offset, l1Size);
  for (const entry of l1) {
    if (entry === 0n) continue;
    if (entry & L1E_RESERVED_MASK) {
      say(ctx, `ERROR found L1 entry with reserved bits set: ${hex(entry)}`);
      ctx.res.corruptions++;
    }
    const l2 = Number(entry & L1E_OFFSET_MASK);
    inc(ctx, l2, ctx.cs, "l2");
    if (l2 % ctx.cs !== 0) {
      say(ctx, `ERROR l2_offset=${hex(l2)}: Table is not cluster aligned; L1 entry corrupted`);
      ctx.res.corruptions++;
    }
    checkL2(ctx, l2, frag);
  }
}

function checkRefblocks(ctx: Ctx): boolean {
  const { node, cs, res } = ctx;
  let rebuild = false;
  const rc = node.refcounts;
  const table = rc.table;
  const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
  for (let i = 0; i < rc.tableEntries; i++) {
    const raw = view.getBigUint64(i * 8);
    const offset = Number(raw & REFT_OFFSET_MASK);
    const cluster = Math.floor(offset / cs);
    if (raw & REFT_RESERVED_MASK) {
      say(ctx, `ERROR refcount table entry ${i} has reserved bits set`);
      res.corruptions++;
      rebuild = true;
      continue;
    }
    if (offset % cs !== 0) {
      say(ctx, `ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
      res.corruptions++;
      rebuild = true;
      continue;
    }
    if (cluster >= ctx.imrt.length) {
      res.corruptions++;
      say(ctx, `${ctx.fix.errors ? "Repairing" : "ERROR"} refcount block ${i} is outside image`);
      if (ctx.fix.errors) {
        node.file.truncate(offset + cs);
        ctx.fileLen = node.file.size();
        ctx.imrt.grow(Math.ceil(ctx.fileLen / cs));
        res.corruptions--;
        res.corruptionsFixed++;
        inc(ctx, offset, cs, "refcount-block");
      }
      continue;
    }
    if (offset !== 0) {
      inc(ctx, offset, cs, "refcount-block");
      if (ctx.imrt.get(cluster) !== 1) {
        say(ctx, `ERROR refcount block ${i} refcount=${ctx.imrt.get(cluster)}`);
        res.corruptions++;
        rebuild = true;
      }
    }
  }
  return rebuild;
}

/** QEMU's calculate_refcounts: returns whether the refcount structure needs a rebuild. */
export function calculate(ctx: Ctx): boolean {
  const { node } = ctx;
  const h = node.header;
  inc(ctx, 0, ctx.cs, "header");
  checkL1(ctx, h.l1TableOffset, h.l1Size, true);
  for (const sn of node.snapshots.entries) {
    if (sn.l1TableOffset % ctx.cs !== 0) {
      say(
        ctx,
        `ERROR snapshot ${sn.id} (${sn.name}) l1_offset=0x${
          hex(sn.l1TableOffset)
        }: L1 table is not cluster aligned; snapshot table entry corrupted`,
      );
      ctx.res.corruptions++;
      continue;
    }
    if (sn.l1Size * 8 > MAX_L1_BYTES) {
      say(
        ctx,
        `ERROR snapshot ${sn.id} (${sn.name}) l1_size=0x${
          hex(sn.l1Size)
        }: L1 table is too large; snapshot table entry corrupted`,
      );
      ctx.res.corruptions++;
      continue;
    }
    checkL1(ctx, sn.l1TableOffset, sn.l1Size, false);
  }
  inc(ctx, h.snapshotsOffset, node.snapshots.bytes, "snapshot-table");
  inc(ctx, node.refcounts.tableOffset, node.refcounts.tableEntries * 8, "refcount-table");
  // Bitmap directory, tables and data clusters (QEMU's qcow2_check_bitmaps_refcounts).
  ctx.res.corruptions += countBitmapClusters(
    node.file,
    h,
    node.size,
    node.filename,
    (offset, bytes) => inc(ctx, offset, bytes, "bitmap"),
  );
  return checkRefblocks(ctx);
}

/** A fresh pass over `node`: the in-memory refcount table sized to the file, nothing counted. */
export function newCtx(node: CheckHost, res: CheckReport, fix: CheckFix): Ctx {
  const cs = node.clusterSize;
  const fileLen = node.file.size();
  const order = node.header.refcountOrder;
  return {
    node,
    res,
    imrt: new Imrt(Math.ceil(fileLen / cs)),
    fix,
    cs,
    max: order === 6 ? 0xffffffff : Math.min(0xffffffff, 2 ** (1 << order) - 1),
    fileLen,
  };
}

/**
 * Walk every structure of the image as the check counts it — header, L1 and L2 tables, data and
 * compressed clusters, snapshots, refcount table and blocks, bitmaps — telling `visit` of each
 * reference (byte range and what it is). Nothing is repaired or written; the image's structures
 * are read as they are on disk (pending metadata of a writable node is written out first).
 *
 * @returns the report of this counting pass (corruptions met on the way, allocation counts); the
 *   stored refcounts are not compared
 */
export function visitReferences(
  node: CheckHost,
  visit: (offset: number, bytes: number, what: HostReference) => void,
): CheckReport {
  if (!node.readOnly) node.flushMetadata();
  const res = newReport(node);
  const ctx = newCtx(node, res, {});
  ctx.visit = visit;
  calculate(ctx);
  return res;
}
