/**
 * Consistency check and repair as qemu-img check does it (QEMU's qcow2_check_refcounts): count
 * every reference to every host cluster from the structures themselves into an in-memory refcount
 * table, check entries on the way, compare with the stored refcounts, check COPIED flags, and
 * repair what the mode allows — leaks, refcount errors, COPIED flags, unaligned preallocated
 * clusters, and a refcount structure rebuilt from the counts when a cluster in use has refcount 0.
 *
 * @module
 */
import type { HostFile } from "../../src/host/host_file.ts";
import type { TableCache } from "./cache.ts";
import {
  INCOMPAT_CORRUPT,
  INCOMPAT_DIRTY,
  MAX_L1_BYTES,
  MAX_REFTABLE_BYTES,
  type Qcow2Header,
} from "./header.ts";
import { refcountAccessors, type Refcounts } from "./refcount.ts";
import { countBitmapClusters } from "./bitmap.ts";
import {
  MAX_SNAPSHOT_TABLE_BYTES,
  readSnapshotTable,
  serializeSnapshotTable,
  type SnapshotEntry,
  type SnapshotTable,
} from "./snapshot.ts";
import { BlockError } from "../../src/errors.ts";

/**
 * What the check needs from the image it checks and repairs: its structures as the open node holds
 * them, and the node's own ways to write them. A `Qcow2Node` is one; the node runs the check itself
 * when it opens a dirty image, so the check names this shape instead of the node's class.
 */
export interface CheckHost {
  /** The image file the check reads and repairs. */
  readonly file: HostFile;
  /** Named in the report lines. */
  readonly filename: string;
  /**
   * The parsed header.
   *
   * @internal
   */
  readonly header: Qcow2Header;
  /** Cluster size in bytes. */
  readonly clusterSize: number;
  /** log2 of the cluster size. */
  readonly clusterBits: number;
  /** True with extended L2 entries. */
  readonly extendedL2: boolean;
  /** True when opened read-only (repairs need a writable image). */
  readonly readOnly: boolean;
  /** Guest size of the image. */
  readonly size: number;
  /**
   * The active L1 table as cached in memory.
   *
   * @internal
   */
  readonly l1Table: Uint8Array;
  /**
   * The L2 table cache.
   *
   * @internal
   */
  readonly l2Cache: TableCache;
  /**
   * The refcount structure as loaded.
   *
   * @internal
   */
  readonly refcounts: Refcounts;
  /** The internal snapshots (their L1 tables are counted too). */
  readonly snapshots: SnapshotTable;
  /**
   * Adopt a snapshot table the check rewrote or dropped.
   *
   * @internal
   */
  setSnapshots(table: SnapshotTable): void;
  /**
   * Read the refcount structure again after the check rebuilt it.
   *
   * @internal
   */
  reloadRefcounts(): void;
  /**
   * Write the header (with its extensions) as it is now, and make it durable.
   *
   * @internal
   */
  writeHeader(): void;
  /**
   * Write cached tables and apply deferred frees.
   *
   * @internal
   */
  flushMetadata(): void;
  /**
   * Make what was written durable (fdatasync unless cache=unsafe).
   *
   * @internal
   */
  barrier(): void;
}

/** What to repair (qemu-img check -r leaks / -r all). */
export interface CheckFix {
  /** Free leaked clusters (`-r leaks`). */
  leaks?: boolean;
  /** Also fix refcount and COPIED-flag errors (`-r all`, with `leaks`). */
  errors?: boolean;
}

/** What a check found, with qemu-img check's fields. */
export interface CheckReport {
  /** Errors found that are corruptions (refcount too low, bad tables), before fixing. */
  corruptions: number;
  /** Leaked clusters found (refcount above the references), before fixing. */
  leaks: number;
  /** Errors that stopped part of the check (e.g. unreadable tables). */
  checkErrors: number;
  /** Corruptions the repair fixed. */
  corruptionsFixed: number;
  /** Leaks the repair freed. */
  leaksFixed: number;
  /** Guest clusters of the virtual disk. */
  totalClusters: number;
  /** Guest clusters the active L1 maps to host clusters (normal, preallocated zero, compressed). */
  allocatedClusters: number;
  /** Allocated guest clusters not host-contiguous with the previous one. */
  fragmentedClusters: number;
  /** Allocated guest clusters stored compressed. */
  compressedClusters: number;
  /** One past the highest cluster in use or counted. */
  imageEndOffset: number;
  /** Lines qemu-img prints to stderr while checking ("ERROR …", "Leaked cluster …", "Repairing …"). */
  messages: string[];
  /** The check itself failed (qemu-img: "Check failed: …"); the counts are incomplete. */
  failed?: string;
  /**
   * Indexes of `messages` qemu-img prints through error_report, after its program name
   * ("qemu-img: ERROR failed to read the snapshot table: …"); the others it prints bare.
   */
  reported?: number[];
}

const L1E_OFFSET_MASK = 0x00fffffffffffe00n;
const L1E_RESERVED_MASK = 0x7f000000000001ffn;
const L2E_OFFSET_MASK = 0x00fffffffffffe00n;
const L2E_STD_RESERVED_MASK = 0x3f000000000001fen;
const REFT_OFFSET_MASK = 0xfffffffffffffe00n;
const REFT_RESERVED_MASK = 0x1ffn;
const COPIED = 1n << 63n;
const COMPRESSED = 1n << 62n;
const ZERO = 1n;
const ALL_ALLOC = 0xffffffffn;

const hex = (v: bigint | number) => v.toString(16);

/** The in-memory refcount table (QEMU's IMRT): one counter per host cluster, growable. */
class Imrt {
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

interface Ctx {
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

function say(ctx: Ctx, line: string): void {
  ctx.res.messages.push(line);
}

function readU64s(ctx: Ctx, offset: number, count: number): BigUint64Array {
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
function calculate(ctx: Ctx): boolean {
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

/** QEMU's compare_refcounts; returns [rebuild needed, highest cluster]. */
function compare(ctx: Ctx, fix: CheckFix): [boolean, number] {
  const { node, res, imrt } = ctx;
  const rc = node.refcounts;
  let rebuild = false;
  let highest = 0;
  for (let i = 0; i < imrt.length; i++) {
    let stored: number;
    try {
      stored = rc.get(i);
    } catch (e) {
      say(ctx, `Can't get refcount for cluster ${i}: ${(e as Error).message}`);
      res.checkErrors++;
      continue;
    }
    const counted = imrt.get(i);
    if (stored > 0 || counted > 0) highest = i;
    if (stored === counted) continue;
    let fixing: "leaks" | "errors" | undefined;
    if (stored === 0) rebuild = true;
    else if (stored > counted && fix.leaks) fixing = "leaks";
    else if (stored < counted && fix.errors) fixing = "errors";
    say(
      ctx,
      `${fixing ? "Repairing" : stored < counted ? "ERROR" : "Leaked"} cluster ${i} refcount=${
        rc.text(i)
      } reference=${counted}`,
    );
    if (fixing) {
      try {
        rc.change(i, 1, counted - stored);
        // QEMU repairs with QCOW2_DISCARD_ALWAYS: a cluster freed here is discarded.
        if (counted === 0) node.file.punchHole(i * ctx.cs, ctx.cs);
        if (fixing === "leaks") res.leaksFixed++;
        else res.corruptionsFixed++;
        continue;
      } catch {
        // Counted below as not fixed.
      }
    }
    if (stored < counted) res.corruptions++;
    else res.leaks++;
  }
  rc.flush();
  node.barrier();
  return [rebuild, highest];
}

/** QEMU's check_oflag_copied. */
function checkCopied(ctx: Ctx): void {
  const { node, res, cs } = ctx;
  const fix = ctx.fix;
  const repair = fix.errors
    ? true
    : fix.leaks
    ? res.checkErrors === 0 && res.corruptions === 0 && res.leaks === 0
    : false;
  const rc = node.refcounts;
  const ext = node.extendedL2;
  const entryWords = ext ? 2 : 1;
  const l1 = node.l1Table;
  const l1View = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
  for (let i = 0; i < l1.length / 8; i++) {
    const l1Entry = l1View.getBigUint64(i * 8);
    const l2 = Number(l1Entry & L1E_OFFSET_MASK);
    if (l2 === 0) continue;
    let refcount: number;
    try {
      refcount = rc.get(Math.floor(l2 / cs));
    } catch {
      continue;
    }
    if ((refcount === 1) !== ((l1Entry & COPIED) !== 0n)) {
      res.corruptions++;
      say(
        ctx,
        `${repair ? "Repairing" : "ERROR"} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${
          hex(l1Entry)
        } refcount=${rc.text(Math.floor(l2 / cs))}`,
      );
      if (repair) {
        l1View.setBigUint64(i * 8, refcount === 1 ? l1Entry | COPIED : l1Entry & ~COPIED);
        node.file.writeAt(node.header.l1TableOffset + i * 8, l1.subarray(i * 8, i * 8 + 8));
        res.corruptions--;
        res.corruptionsFixed++;
      }
    }
    const entries = cs / (8 * entryWords);
    const table = readU64s(ctx, l2, entries * entryWords);
    let dirty = 0;
    for (let j = 0; j < entries; j++) {
      const entry = table[j * entryWords]!;
      if (entry & COMPRESSED) continue;
      const host = Number(entry & L2E_OFFSET_MASK);
      if (host === 0) continue;
      let count: number;
      try {
        count = rc.get(Math.floor(host / cs));
      } catch {
        continue;
      }
      if ((count === 1) !== ((entry & COPIED) !== 0n)) {
        res.corruptions++;
        say(
          ctx,
          `${repair ? "Repairing" : "ERROR"} OFLAG_COPIED data cluster: l2_entry=${
            hex(entry)
          } refcount=${rc.text(Math.floor(host / cs))}`,
        );
        if (repair) {
          table[j * entryWords] = count === 1 ? entry | COPIED : entry & ~COPIED;
          dirty++;
        }
      }
    }
    if (dirty > 0) {
      const bytes = new Uint8Array(cs);
      const v = new DataView(bytes.buffer);
      for (let k = 0; k < table.length; k++) v.setBigUint64(k * 8, table[k]!);
      node.l2Cache.discard(l2);
      node.file.writeAt(l2, bytes);
      res.corruptions -= dirty;
      res.corruptionsFixed += dirty;
    }
  }
  node.barrier();
}

/** QEMU's alloc_clusters_imrt: `count` free clusters from `*from` on, marked used; returns the first. */
function allocImrt(imrt: Imrt, count: number, from: { cluster: number }): number {
  let cluster = from.cluster, run = 0, firstGap = true;
  for (; cluster < imrt.length && run < count; cluster++) {
    if (imrt.get(cluster) === 0) {
      run++;
      if (firstGap) {
        from.cluster = cluster;
        firstGap = false;
      }
    } else {
      run = 0;
    }
  }
  if (run < count) imrt.grow(cluster + count - run);
  cluster -= run;
  for (let i = 0; i < count; i++) imrt.set(cluster + i, 1);
  return cluster;
}

/**
 * Write a new refcount structure built from `imrt` (QEMU's rebuild_refcount_structure): each
 * refblock at the first free cluster from its own range on, the table at the first free place;
 * one header write switches over. The old structure is leaked (a leak repair frees it).
 */
function rebuildStructure(node: CheckHost, imrt: Imrt): void {
  const cs = node.clusterSize;
  const order = node.header.refcountOrder;
  const perBlock = 2 ** (node.clusterBits + 3 - order);
  const [, setRefcount] = refcountAccessors(order);
  const reftable: number[] = [];
  const writeBlocks = (first: number, endCluster: number): boolean => {
    let grown = false;
    const from = { cluster: 0 };
    let end = endCluster;
    for (let cluster = first; cluster < end; cluster++) {
      if (imrt.get(cluster) === 0) continue;
      const index = Math.floor(cluster / perBlock);
      const start = index * perBlock;
      let blockCluster = reftable[index] ?? 0;
      if (blockCluster === 0) {
        if (from.cluster < start) from.cluster = start;
        blockCluster = allocImrt(imrt, 1, from);
        if (blockCluster >= end) end = blockCluster + 1;
        if (reftable.length <= index) {
          const entries = Math.ceil((index + 1) * 8 / cs) * cs / 8;
          while (reftable.length < entries) reftable.push(0);
          grown = true;
        }
        reftable[index] = blockCluster;
      }
      const block = new Uint8Array(cs);
      const view = new DataView(block.buffer);
      for (let k = 0; k < perBlock; k++) {
        const v = imrt.get(start + k);
        if (v !== 0) setRefcount(view, block, k, v);
      }
      node.file.writeAt(blockCluster * cs, block);
      cluster = start + perBlock - 1;
    }
    return grown;
  };
  writeBlocks(0, imrt.length);
  let tableCluster = 0, tableClusters = 0;
  for (let grown = true; grown;) {
    tableClusters = Math.ceil(reftable.length * 8 / cs);
    if (tableClusters * cs > MAX_REFTABLE_BYTES) {
      throw new Error("refcount table would exceed 8 MiB");
    }
    tableCluster = allocImrt(imrt, tableClusters, { cluster: 0 });
    grown = writeBlocks(tableCluster, tableCluster + tableClusters);
  }
  const table = new Uint8Array(reftable.length * 8);
  const tv = new DataView(table.buffer);
  reftable.forEach((c, i) => tv.setBigUint64(i * 8, BigInt(c * cs)));
  node.file.writeAt(tableCluster * cs, table);
  node.file.flush();
  node.header.refcountTableOffset = tableCluster * cs;
  node.header.refcountTableClusters = tableClusters;
  node.writeHeader();
  node.reloadRefcounts();
}

const MAX_SNAPSHOTS = 65536;
const SNAPSHOT_HEADER_BYTES = 40;
/** strerror of the errnos the snapshot table check fails with. */
const STRERROR: Record<number, string> = {
  5: "Input/output error",
  22: "Invalid argument",
  27: "File too large",
};

/** The snapshot table part of a check (QEMU keeps it apart from the refcount part). */
interface SnapshotCheck {
  corruptions: number;
  corruptionsFixed: number;
  checkErrors: number;
}

function report(res: CheckReport, line: string): void {
  (res.reported ??= []).push(res.messages.length);
  res.messages.push(line);
}

/**
 * QEMU's qcow2_check_read_snapshot_table: read the table from what the header says now, in repair
 * mode with -r all (overhanging snapshots are cut off at once, with the header's count; too much
 * extra data is dropped when the table is rewritten after the refcount check), and count v3
 * entries without a disk size. Returns undefined when the table cannot be read: the check fails.
 */
function readSnapshotsForCheck(
  node: CheckHost,
  res: CheckReport,
  fix: CheckFix,
): SnapshotCheck | undefined {
  const snap: SnapshotCheck = { corruptions: 0, corruptionsFixed: 0, checkErrors: 0 };
  const pointer = new Uint8Array(12);
  node.file.readAt(60, pointer);
  const pv = new DataView(pointer.buffer);
  let count = pv.getUint32(0);
  const offset = Number(pv.getBigUint64(4));
  const h = node.header;
  const fail = (errno: number): undefined => {
    snap.checkErrors++;
    res.checkErrors += snap.checkErrors;
    res.failed = STRERROR[errno] ?? `errno ${errno}`;
    // What was not read is not there.
    h.nbSnapshots = 0;
    h.snapshotsOffset = 0;
    node.setSnapshots({ entries: [], bytes: 0 });
    return undefined;
  };
  let reduced = 0;
  if (count > MAX_SNAPSHOTS && fix.errors) {
    res.messages.push(`Discarding ${count - MAX_SNAPSHOTS} overhanging snapshots`);
    reduced += count - MAX_SNAPSHOTS;
    count = MAX_SNAPSHOTS;
  }
  // qcow2_validate_table
  if (count > MAX_SNAPSHOTS) {
    report(res, "ERROR snapshot table too large");
    res.messages.push(
      `You can force-remove all ${
        count - MAX_SNAPSHOTS
      } overhanging snapshots with qemu-img check -r all`,
    );
    return fail(27);
  }
  if (
    offset % node.clusterSize !== 0 ||
    offset > Number.MAX_SAFE_INTEGER - count * SNAPSHOT_HEADER_BYTES
  ) {
    report(res, "ERROR snapshot table offset invalid");
    return fail(22);
  }
  let table;
  try {
    table = readSnapshotTable(node.file, offset, count, node.filename, {
      repair: fix.errors ?? false,
      say: (line) => res.messages.push(line),
    });
  } catch (e) {
    if (!(e instanceof BlockError)) throw e;
    report(res, `ERROR failed to read the snapshot table: ${e.message}`);
    return fail(e.context.errno ?? 5);
  }
  h.nbSnapshots = table.entries.length;
  h.snapshotsOffset = offset;
  node.setSnapshots({ entries: table.entries, bytes: table.bytes });
  reduced += table.reduced;
  snap.corruptions += reduced + table.extraDropped;
  if (reduced > 0) {
    // The header's count first: the refcount check counts what the header describes (and frees
    // the rest as leaks).
    const nb = new Uint8Array(4);
    new DataView(nb.buffer).setUint32(0, table.entries.length);
    node.file.writeAt(60, nb);
    node.file.flush();
    snap.corruptionsFixed += reduced;
    snap.corruptions -= reduced;
  }
  // v3 entries need extra data through the disk size.
  if (h.version >= 3) {
    table.entries.forEach((e, i) => {
      if (e.extra.length < 16) {
        snap.corruptions++;
        res.messages.push(
          `${fix.errors ? "Repairing" : "ERROR"} snapshot table entry ${i} is incomplete`,
        );
      }
    });
  }
  return snap;
}

/**
 * An entry as QEMU writes it back (qcow2_write_snapshots): at least 24 bytes of extra data, the
 * 64-bit VM state size, the disk size (the image's when the entry had none) and icount (-1 when
 * it had none), then any unknown extra data.
 */
function completeEntry(e: SnapshotEntry, diskSize: number): SnapshotEntry {
  const old = new DataView(e.extra.buffer, e.extra.byteOffset, e.extra.byteLength);
  const vmState = e.extra.length >= 8 ? old.getBigUint64(0) : BigInt(e.vmStateSize);
  const size = e.extra.length >= 16 ? old.getBigUint64(8) : BigInt(diskSize);
  const icount = e.extra.length >= 24 ? old.getBigUint64(16) : 0xffffffffffffffffn;
  const extra = new Uint8Array(Math.max(24, e.extra.length));
  extra.set(e.extra);
  const v = new DataView(extra.buffer);
  v.setBigUint64(0, vmState);
  v.setBigUint64(8, size);
  v.setBigUint64(16, icount);
  return {
    ...e,
    vmStateSize: vmState <= 0xffffffffn ? Number(vmState) : 0,
    extra,
    diskSize: Number(size),
  };
}

/**
 * QEMU's qcow2_check_fix_snapshot_table: with -r all, snapshot table corruptions are repaired by
 * writing the whole table anew (qcow2_write_snapshots) — into newly allocated clusters, the
 * header switched to it, the old table freed.
 */
function fixSnapshotTable(node: CheckHost, res: CheckReport, snap: SnapshotCheck, fix: CheckFix) {
  if (snap.corruptions === 0 || !fix.errors) return;
  const cs = node.clusterSize;
  const entries = node.snapshots.entries.map((e) => completeEntry(e, node.size));
  const padded = serializeSnapshotTable(entries);
  // QEMU's snapshots_size: each entry starts 8-aligned, the last one is not padded.
  const enc = new TextEncoder();
  let size = 0;
  for (const e of entries) {
    size = Math.ceil(size / 8) * 8 + SNAPSHOT_HEADER_BYTES + e.extra.length +
      enc.encode(e.id).length + enc.encode(e.name).length;
  }
  if (size > MAX_SNAPSHOT_TABLE_BYTES) {
    // qcow2_write_snapshots fails with EFBIG, and so does the whole check.
    snap.checkErrors++;
    res.messages.push("ERROR failed to update snapshot table: File too large");
    res.failed = STRERROR[27]!;
    return;
  }
  const rc = node.refcounts;
  const clusters = Math.ceil(size / cs);
  const offset = clusters === 0 ? 0 : rc.allocate(clusters);
  rc.flush();
  node.barrier();
  if (size > 0) node.file.writeAt(offset, padded.subarray(0, size));
  node.barrier();
  const h = node.header;
  const oldOffset = h.snapshotsOffset, oldBytes = node.snapshots.bytes;
  const pointer = new Uint8Array(12);
  const pv = new DataView(pointer.buffer);
  pv.setUint32(0, entries.length);
  pv.setBigUint64(4, BigInt(offset));
  node.file.writeAt(60, pointer);
  node.file.flush();
  h.nbSnapshots = entries.length;
  h.snapshotsOffset = offset;
  node.setSnapshots({ entries, bytes: size });
  if (oldBytes > 0) {
    const first = Math.floor(oldOffset / cs);
    const count = Math.ceil((oldOffset + oldBytes) / cs) - first;
    rc.change(first, count, -1);
    rc.flush();
    // QCOW2_DISCARD_SNAPSHOT passes the free down to the file.
    for (let c = first; c < first + count; c++) {
      if (rc.get(c) === 0) node.file.punchHole(c * cs, cs);
    }
  }
  node.barrier();
  snap.corruptionsFixed += snap.corruptions;
  snap.corruptions = 0;
}

function newReport(node: CheckHost): CheckReport {
  return {
    corruptions: 0,
    leaks: 0,
    checkErrors: 0,
    corruptionsFixed: 0,
    leaksFixed: 0,
    totalClusters: Math.ceil(node.size / node.clusterSize),
    allocatedClusters: 0,
    fragmentedClusters: 0,
    compressedClusters: 0,
    imageEndOffset: 0,
    messages: [],
  };
}

function newCtx(node: CheckHost, res: CheckReport, fix: CheckFix): Ctx {
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

/**
 * Check the image as qemu-img check does, repairing what `fix` allows. Caches are written out
 * first. With a repair, qemu-img then checks again without one; so do callers.
 *
 * @param node the image: a {@linkcode Qcow2Node}
 * @param fix what to repair (nothing by default)
 * @returns the counts and messages of qemu-img check
 *
 * @example
 * ```ts
 * import { MemoryFile } from "../../src/host/memory.ts";
 * import { checkImage } from "./check.ts";
 * import { createQcow2 } from "./create.ts";
 * import { Qcow2Node } from "./qcow2.ts";
 *
 * const file = new MemoryFile("disk.qcow2");
 * await createQcow2(file, 1 << 20);
 * const node = await Qcow2Node.open(file);
 * await node.write(0, new Uint8Array(4096).fill(1));
 * const report = checkImage(node);
 * if (report.corruptions + report.leaks + report.checkErrors !== 0) throw new Error("clean");
 * if (report.allocatedClusters !== 1) throw new Error("one cluster");
 * await node.close();
 * ```
 */
export function checkImage(node: CheckHost, fix: CheckFix = {}): CheckReport {
  node.flushMetadata();
  const res = newReport(node);
  const snap = readSnapshotsForCheck(node, res, fix);
  if (snap === undefined) return res;
  checkRefcounts(node, res, fix);
  if (res.failed === undefined) fixSnapshotTable(node, res, snap, fix);
  res.corruptions += snap.corruptions;
  res.corruptionsFixed += snap.corruptionsFixed;
  res.checkErrors += snap.checkErrors;
  if (
    (fix.leaks || fix.errors) && res.failed === undefined && res.checkErrors === 0 &&
    res.corruptions === 0
  ) {
    markClean(node);
  }
  return res;
}

/** QEMU's qcow2_check_refcounts, into `res`. */
function checkRefcounts(node: CheckHost, res: CheckReport, fix: CheckFix): void {
  const ctx = newCtx(node, res, fix);
  let rebuild = calculate(ctx);
  const preCompare = { ...res, messages: [] as string[] };
  let [needRebuild, highest] = compare(ctx, {});
  rebuild ||= needRebuild;
  if (rebuild && fix.errors) {
    const old = { corruptions: res.corruptions, leaks: res.leaks };
    say(ctx, "Rebuilding refcount structure");
    rebuildStructure(node, ctx.imrt);
    res.corruptions = 0;
    res.leaks = 0;
    res.allocatedClusters = res.fragmentedClusters = res.compressedClusters = 0;
    const again = newCtx(node, res, {});
    calculate(again);
    let freshLeaks = 0;
    if (fix.leaks) {
      const saved = { ...res };
      Object.assign(res, {
        corruptions: 0,
        leaks: 0,
        checkErrors: 0,
        corruptionsFixed: 0,
        leaksFixed: 0,
      });
      [needRebuild, highest] = compare(again, { leaks: true });
      if (needRebuild) say(ctx, "ERROR rebuilt refcount structure is still broken");
      freshLeaks = res.leaks;
      Object.assign(res, { ...saved, messages: res.messages });
    }
    if (res.corruptions < old.corruptions) {
      res.corruptionsFixed += old.corruptions - res.corruptions;
    }
    if (res.leaks < old.leaks) res.leaksFixed += old.leaks - res.leaks;
    res.leaks += freshLeaks;
  } else if (fix.leaks || fix.errors) {
    if (rebuild) {
      say(ctx, "ERROR need to rebuild refcount structures");
      res.checkErrors++;
      res.failed = "Input/output error";
      return;
    }
    if (res.leaks > 0 || res.corruptions > 0) {
      const messages = res.messages;
      Object.assign(res, preCompare, { messages });
      [, highest] = compare(ctx, fix);
    }
  }
  checkCopied(ctx);
  res.imageEndOffset = (highest + 1) * node.clusterSize;
}

/** After a successful repair the image is consistent: clear the dirty and corrupt bits. */
function markClean(node: CheckHost): void {
  const h = node.header;
  const bits = BigInt(INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
  if ((h.incompatibleFeatures & bits) === 0n) return;
  h.incompatibleFeatures &= ~bits;
  node.writeHeader();
}

/**
 * Repair after a crash with lazy refcounts (QEMU runs check with both repairs on open): refcounts
 * are made to match the references, the structure rebuilt where a cluster in use has none.
 *
 * @returns the check's report (its lines are what QEMU prints while it repairs)
 * @throws {Error} when the image cannot be made consistent
 */
export function rebuildRefcounts(node: CheckHost): CheckReport {
  const report = checkImage(node, { leaks: true, errors: true });
  if (report.failed !== undefined || report.corruptions > 0 || report.checkErrors > 0) {
    throw new Error(
      `Could not repair the image's refcounts: ${report.messages.slice(-3).join("; ")}`,
    );
  }
  return report;
}
