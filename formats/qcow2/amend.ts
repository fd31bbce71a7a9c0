/**
 * Changing a qcow2 image's options in place, as qemu-img amend does (QEMU 7.2's
 * qcow2_amend_options): compat 0.10 ↔ 1.1, lazy refcounts, the refcount width and the virtual
 * size. Backing file names are refused unless unchanged (QEMU points to rebase for that).
 *
 * The steps run in QEMU's order — upgrade, refcount width, header, backing check, lazy refcounts,
 * size, downgrade — but every refusal is decided before the first change, so a refused amend
 * leaves the image as it was. Each structural step keeps QEMU's crash ordering: new structures
 * are allocated and written first, one header write switches over, old structures are freed last.
 *
 * @module
 */
import { BlockError } from "../../src/errors.ts";
import {
  COMPAT_LAZY_REFCOUNTS,
  COMPRESSION_DEFLATE,
  hasFeature,
  INCOMPAT_COMPRESSION,
  INCOMPAT_DIRTY,
  MAX_REFTABLE_BYTES,
  serializeHeader,
  V3_HEADER_LENGTH,
} from "./header.ts";
import type { Qcow2Node } from "./qcow2.ts";
import { refcountAccessors } from "./refcount.ts";
import { serializeSnapshotTable, type SnapshotEntry } from "./snapshot.ts";
import { encodeEntry, entryOffset, HI_COMPRESSED, LO_ZERO } from "./tables.ts";

/**
 * What qemu-img amend's `-o` list asks for (QEMU's qcow2 amend options). Absent fields stay as
 * they are. Values are checked by {@linkcode amendQcow2}, with QEMU's messages.
 */
export interface Qcow2AmendOptions {
  /** `compat`: "0.10"/"v2" or "1.1"/"v3"; anything else is refused. */
  compat?: string;
  /** `size`: the new virtual size in bytes; 0 means unchanged (as QEMU). */
  size?: number;
  /** `backing_file`: accepted only when equal to what the header records. */
  backingFile?: string;
  /** `backing_fmt`: accepted only when equal to what the header records. */
  backingFormat?: string;
  /** `lazy_refcounts`. */
  lazyRefcounts?: boolean;
  /** `refcount_bits`: a power of two from 1 to 64. */
  refcountBits?: number;
  /** `data_file`: refused (vstor images never use an external data file). */
  dataFile?: string;
  /** `data_file_raw`: `on` is refused, `off` is what every image already is. */
  dataFileRaw?: boolean;
  /** Whether any `encrypt.*` option was given: refused (the image is not encrypted). */
  encryption?: boolean;
}

/** How {@linkcode amendQcow2} reports progress: work done out of a total, over all steps. */
export type AmendProgress = (done: number, total: number) => void;

/** Where the amend steps stand, for the progress report (QEMU's amend helper callback). */
class Steps {
  readonly #total: number;
  readonly #report: AmendProgress | undefined;
  #index = -1;
  constructor(total: number, report: AmendProgress | undefined) {
    this.#total = total;
    this.#report = report;
  }
  /** Start the next counted step. */
  next(): void {
    this.#index++;
    this.update(0, 1);
  }
  /** Progress `done` of `of` within the current step. */
  update(done: number, of: number): void {
    if (this.#report === undefined || this.#total === 0) return;
    const within = of === 0 ? 1 : Math.min(1, done / of);
    this.#report(Math.max(0, this.#index) + within, this.#total);
  }
}

const invalid = (node: Qcow2Node, message: string) =>
  new BlockError("invalid-argument", message, { path: node.filename });
const unsupported = (node: Qcow2Node, message: string) =>
  new BlockError("unsupported", message, { path: node.filename });

/** QEMU's `%#x`: "0" for zero, else 0x-prefixed lower-case hex. */
function hexAlt(value: number | bigint): string {
  return value === 0 || value === 0n ? "0" : `0x${value.toString(16)}`;
}

/** The unit a disk writes atomically: a write torn by a crash keeps or drops whole sectors. */
const SECTOR = 512;

/**
 * Write the header cluster as QEMU's qcow2_update_header does: the whole cluster, zero-padded (no
 * stale extension bytes survive a shorter header), then a barrier. So that a torn write never
 * pairs the first sector of one header with the rest of the other (a v3 header with a feature
 * name table and a backing name reaches past sector 0, a v2 one does not), when the old header
 * lies within sector 0 the sectors after it are written first, and when the new one does, sector
 * 0 is written first; either way the other header looks at nothing the first write changes.
 */
function writeHeaderCluster(node: Qcow2Node): void {
  const cs = node.clusterSize;
  const bytes = serializeHeader(node.header, node.filename);
  const cluster = new Uint8Array(cs);
  cluster.set(bytes);
  if (cs > SECTOR) {
    const onDisk = new Uint8Array(cs);
    node.file.readAt(0, onDisk);
    const rest = cluster.subarray(SECTOR);
    if (!rest.every((b, i) => b === onDisk[SECTOR + i])) {
      if (headerExtent(onDisk) <= SECTOR) {
        node.file.writeAt(SECTOR, rest);
        node.barrier();
      } else if (bytes.length <= SECTOR) {
        node.file.writeAt(0, cluster.subarray(0, SECTOR));
        node.barrier();
      }
    }
  }
  node.file.writeAt(0, cluster);
  node.barrier();
}

/** How far into cluster 0 a header on disk reaches: fields, extensions, backing file name. */
function headerExtent(bytes: Uint8Array): number {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let pos = view.getUint32(4) >= 3 ? view.getUint32(100) : 72;
  while (pos + 8 <= bytes.length) {
    const type = view.getUint32(pos), length = view.getUint32(pos + 4);
    pos += 8;
    if (type === 0) break;
    pos += Math.ceil(length / 8) * 8;
  }
  const nameOffset = Number(view.getBigUint64(8)), nameLength = view.getUint32(16);
  return Math.max(Math.min(pos, bytes.length), nameOffset > 0 ? nameOffset + nameLength : 0);
}

/** The requested version: 2 or 3, or the current one when `compat` is absent. */
function targetVersion(node: Qcow2Node, compat: string | undefined): 2 | 3 {
  if (compat === undefined) return node.header.version;
  if (compat === "0.10" || compat === "v2") return 2;
  if (compat === "1.1" || compat === "v3") return 3;
  throw invalid(node, `Unknown compatibility level ${compat}`);
}

/** The 64-bit VM state size and disk size a snapshot has for QEMU (extra data, else defaults). */
function snapshotSizes(entry: SnapshotEntry, imageSize: number): { vmState: bigint; disk: number } {
  const extra = new DataView(entry.extra.buffer, entry.extra.byteOffset, entry.extra.byteLength);
  const vmState = entry.extra.length >= 8 ? extra.getBigUint64(0) : BigInt(entry.vmStateSize);
  return { vmState, disk: entry.diskSize ?? imageSize };
}

/** True when the active layer holds a compressed cluster (QEMU's qcow2_has_compressed_clusters). */
async function hasCompressedClusters(node: Qcow2Node): Promise<boolean> {
  for (let pos = 0; pos < node.size;) {
    const extent = await node.blockStatus(pos, node.size - pos);
    if (extent.kind === "compressed") return true;
    if (extent.length <= 0) break;
    pos += extent.length;
  }
  return false;
}

/** What the amend will do, decided (and refused) before anything changes. */
interface Plan {
  oldVersion: 2 | 3;
  newVersion: 2 | 3;
  refcountOrder: number | undefined;
  lazy: boolean | undefined;
  size: number | undefined;
}

/**
 * Check the options as QEMU does (its option order, its messages) and every condition a later
 * step would refuse, so that nothing is changed when the amend cannot complete.
 */
async function plan(node: Qcow2Node, opts: Qcow2AmendOptions): Promise<Plan> {
  const h = node.header;
  // QEMU checks options in its option list order: encryption, compat, data file, refcount width.
  if (opts.encryption) {
    throw invalid(node, "Can't amend encryption options - encryption not present");
  }
  const oldVersion = h.version;
  const newVersion = targetVersion(node, opts.compat);
  if (opts.dataFile !== undefined) {
    throw invalid(node, "data-file can only be set for images that use an external data file");
  }
  if (opts.dataFileRaw === true) {
    throw invalid(node, "data-file-raw cannot be set on existing images");
  }
  let refcountOrder: number | undefined;
  if (opts.refcountBits !== undefined) {
    const bits = opts.refcountBits;
    if (!Number.isInteger(bits) || bits <= 0 || bits > 64 || (bits & (bits - 1)) !== 0) {
      throw invalid(node, "Refcount width must be a power of two and may not exceed 64 bits");
    }
    const order = Math.log2(bits);
    if (order !== h.refcountOrder) refcountOrder = order;
    // Narrower entries must hold every refcount (QEMU finds out in its first walk).
    if (order < h.refcountOrder) {
      eachRefcount(node, (cluster, refcount) => fits(node, order, cluster, refcount));
    }
  }

  if (newVersion > oldVersion) {
    // The v3 header (112 bytes and the feature name table) must fit beside the backing file name.
    serializeHeader({ ...h, version: 3, headerLength: V3_HEADER_LENGTH }, node.filename);
  }
  // Upgrade and refcount width come first in QEMU; their own refusals.
  if (refcountOrder !== undefined && newVersion < 3 && refcountOrder !== 4) {
    throw invalid(
      node,
      "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
    );
  }
  // The backing file can only be named as it is (QEMU: g_strcmp0 on both).
  if (opts.backingFile !== undefined || opts.backingFormat !== undefined) {
    if (opts.backingFile !== h.backingFile || opts.backingFormat !== h.backingFormat) {
      throw invalid(node, "Cannot amend the backing file\nYou can use 'vstor rebase' instead.");
    }
  }
  const lazyNow = hasFeature(h.compatibleFeatures, COMPAT_LAZY_REFCOUNTS);
  const lazy = opts.lazyRefcounts === undefined || opts.lazyRefcounts === lazyNow
    ? undefined
    : opts.lazyRefcounts;
  if (lazy === true && newVersion < 3) {
    throw invalid(
      node,
      "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
    );
  }
  const size = opts.size === undefined || opts.size === 0 ? undefined : opts.size;
  if (size !== undefined) {
    if (size % 512 !== 0) throw invalid(node, "The new size must be a multiple of 512");
    if (!Number.isSafeInteger(size)) throw invalid(node, `Image size ${size} is too large`);
    // The resize runs between upgrade and downgrade: on the higher of the two versions.
    const versionThen = newVersion > oldVersion ? newVersion : oldVersion;
    if (h.nbSnapshots > 0 && versionThen < 3) {
      throw unsupported(node, "Can't resize a v2 image which has snapshots");
    }
  }

  if (newVersion < oldVersion) {
    // qcow2_downgrade's refusals, against the state the earlier steps leave.
    if ((refcountOrder ?? h.refcountOrder) !== 4) {
      throw unsupported(node, "compat=0.10 requires refcount_bits=16");
    }
    const finalSize = size ?? node.size;
    for (const sn of node.snapshots.entries) {
      const { vmState, disk } = snapshotSizes(sn, node.size);
      if (vmState > 0xffffffffn || disk !== finalSize) {
        throw unsupported(node, "Internal snapshots prevent downgrade of image");
      }
    }
    const blocking = h.incompatibleFeatures & ~BigInt(INCOMPAT_DIRTY | INCOMPAT_COMPRESSION);
    if (blocking !== 0n) {
      throw unsupported(
        node,
        `Cannot downgrade an image with incompatible features ${hexAlt(blocking)} set`,
      );
    }
    if (hasFeature(h.incompatibleFeatures, INCOMPAT_COMPRESSION)) {
      // QEMU looks after expanding zero clusters (which leaves no compressed cluster behind).
      if (await hasCompressedClusters(node)) {
        throw unsupported(
          node,
          "Cannot downgrade an image with zstd compression type and existing compressed clusters",
        );
      }
    }
  }
  return { oldVersion, newVersion, refcountOrder, lazy, size };
}

/**
 * Amend a qcow2 image as `qemu-img amend -o …` does. `open` opens the image read-write with its
 * backing chain (the amend reopens it after feature changes, so the driver's state matches the
 * header); every node it opens is closed before this returns.
 *
 * @throws {BlockError} `invalid-argument` or `unsupported` with qemu-img's message when an option
 *   cannot be applied (nothing has changed then); `io` or `corrupt` from the steps themselves
 * @example
 * ```ts
 * import { MemoryFile } from "../../src/host/memory.ts";
 * import { borrowFile } from "../../src/host/host_file.ts";
 * import { createQcow2 } from "./create.ts";
 * import { Qcow2Node } from "./qcow2.ts";
 * import { amendQcow2 } from "./amend.ts";
 * const file = new MemoryFile("img.qcow2");
 * await createQcow2(file, 1 << 20, {});
 * const open = () => Qcow2Node.open(borrowFile(file), { cacheCleanInterval: 0 });
 * await amendQcow2(open, { compat: "0.10" });
 * const node = await open();
 * if (node.header.version !== 2) throw new Error("not downgraded");
 * await node.close();
 * ```
 */
export async function amendQcow2(
  open: () => Promise<Qcow2Node>,
  opts: Qcow2AmendOptions,
  onProgress?: AmendProgress,
): Promise<void> {
  let node: Qcow2Node | undefined = await open();
  try {
    const p = await plan(node, opts);
    const steps = new Steps(
      (p.newVersion !== p.oldVersion ? 1 : 0) + (p.refcountOrder !== undefined ? 1 : 0),
      onProgress,
    );
    let stale = false;
    if (p.newVersion > p.oldVersion) {
      steps.next();
      await node.exclusive(() => Promise.resolve(upgrade(node!, steps)));
      stale = true;
    }
    if (p.refcountOrder !== undefined) {
      steps.next();
      const order = p.refcountOrder;
      await node.exclusive(() => Promise.resolve(changeRefcountOrder(node!, order, steps)));
    }
    // QEMU rewrites the header here whatever changed (feature table, cleared autoclear bits).
    await node.exclusive(() => Promise.resolve(writeHeaderCluster(node!)));
    if (p.lazy !== undefined) {
      const on = p.lazy;
      await node.exclusive(() => Promise.resolve(setLazyRefcounts(node!, on)));
      stale = true;
    }
    if (p.size !== undefined && p.size !== node.size) {
      if (stale) {
        // The driver keeps version and lazy refcounts from open: let it see the new header.
        const old: Qcow2Node = node;
        node = undefined;
        await old.close();
        node = await open();
      }
      await resize(node, p.size);
    }
    if (p.newVersion < p.oldVersion) {
      steps.next();
      await node.exclusive(() => Promise.resolve(downgrade(node!, steps)));
    }
  } finally {
    await node?.close();
  }
}

// ---- upgrade (v2 → v3) ----

/** A snapshot entry with the extra data v3 requires (QEMU writes 24 bytes: all three fields). */
function withV3Extra(entry: SnapshotEntry, imageSize: number): SnapshotEntry {
  if (entry.extra.length >= 24) return entry;
  const extra = new Uint8Array(24);
  extra.set(entry.extra);
  const view = new DataView(extra.buffer);
  const { vmState, disk } = snapshotSizes(entry, imageSize);
  view.setBigUint64(0, vmState);
  view.setBigUint64(8, BigInt(disk));
  // icount unknown: -1, as QEMU records it for snapshots taken without icount.
  view.setBigInt64(16, -1n);
  return { ...entry, extra, diskSize: disk };
}

/**
 * QEMU's qcow2_upgrade: snapshot entries get the extra data v3 requires (a new table, switched to
 * in the same header write), then the header becomes v3 (112 bytes and the feature name table).
 */
function upgrade(node: Qcow2Node, steps: Steps): void {
  const h = node.header;
  const cs = node.clusterSize;
  const table = node.snapshots;
  const needsUpdate = table.entries.some((e) => e.extra.length < 16);
  let oldTable: { offset: number; clusters: number } | undefined;
  let newEntries = table.entries;
  let newBytes = table.bytes;
  if (needsUpdate) {
    newEntries = table.entries.map((e) => withV3Extra(e, node.size));
    const bytes = serializeSnapshotTable(newEntries);
    const offset = node.refcounts.allocate(Math.ceil(bytes.length / cs));
    node.refcounts.flush();
    node.barrier();
    node.file.writeAt(offset, bytes);
    node.barrier();
    oldTable = { offset: h.snapshotsOffset, clusters: Math.ceil(table.bytes / cs) };
    h.snapshotsOffset = offset;
    newBytes = bytes.length;
  }
  steps.update(1, 2);
  h.version = 3;
  h.headerLength = V3_HEADER_LENGTH;
  h.refcountOrder = 4;
  h.incompatibleFeatures = 0n;
  h.compatibleFeatures = 0n;
  h.autoclearFeatures = 0n;
  h.compressionType = COMPRESSION_DEFLATE;
  writeHeaderCluster(node);
  if (oldTable !== undefined) {
    node.setSnapshots({ entries: newEntries, bytes: newBytes });
    if (oldTable.clusters > 0) node.refcounts.change(oldTable.offset / cs, oldTable.clusters, -1);
    node.refcounts.flush();
    node.barrier();
  }
  steps.update(2, 2);
}

// ---- refcount width ----

/** Call `fn` for every cluster with a non-zero refcount, in order, through the current structure. */
function eachRefcount(node: Qcow2Node, fn: (cluster: number, refcount: number) => void): void {
  const rc = node.refcounts;
  const perBlock = 2 ** rc.blockBits;
  for (let b = 0; b < rc.tableEntries; b++) {
    if (rc.blockOffset(b) === 0) continue;
    for (let c = b * perBlock; c < (b + 1) * perBlock; c++) {
      const refcount = rc.get(c);
      if (refcount !== 0) fn(c, refcount);
    }
  }
}

/** Refuse, with QEMU's message, a refcount that entries of refcount order `order` cannot hold. */
function fits(node: Qcow2Node, order: number, cluster: number, refcount: number): void {
  const bits = 1 << order;
  if (bits < 64 && refcount > 2 ** bits - 1) {
    throw invalid(
      node,
      `Cannot decrease refcount entry width to ${bits} bits: Cluster at offset ${
        hexAlt(cluster * node.clusterSize)
      } has a refcount of ${refcount}`,
    );
  }
}

/**
 * QEMU's qcow2_change_refcount_order: allocate the new refcount blocks and table in the current
 * structure until no allocation is needed any more (allocating changes refcounts), write the new
 * blocks and table, switch the header (order, table offset and size in one write), then free the
 * old blocks and table in the new structure.
 *
 * @throws {BlockError} `invalid-argument` when a refcount does not fit the new width
 */
function changeRefcountOrder(node: Qcow2Node, order: number, steps: Steps): void {
  node.flushMetadata();
  const cs = node.clusterSize;
  const newPer = 2 ** (node.clusterBits + 3 - order);
  const entriesPerTableCluster = cs / 8;
  /** New refcount table entries (refblock host offsets; 0 for none). */
  let newTable: number[] = [];
  let newTableOffset = 0, newTableClusters = 0;

  let passes = 0;
  for (let allocated = true; allocated;) {
    allocated = false;
    const needed = new Set<number>();
    eachRefcount(node, (cluster, refcount) => {
      fits(node, order, cluster, refcount);
      needed.add(Math.floor(cluster / newPer));
    });
    for (const index of [...needed].sort((a, b) => a - b)) {
      if (index >= newTable.length) {
        const entries = Math.ceil((index + 1) / entriesPerTableCluster) * entriesPerTableCluster;
        if (entries * 8 > MAX_REFTABLE_BYTES) {
          throw unsupported(
            node,
            "This operation would make the refcount table grow beyond the maximum size supported by QEMU, aborting",
          );
        }
        while (newTable.length < entries) newTable.push(0);
      }
      if (newTable[index] === 0) {
        newTable[index] = node.refcounts.allocate(1);
        allocated = true;
      }
    }
    if (allocated) {
      // A table sized for the blocks so far; allocating it may need more blocks: walk again.
      if (newTableClusters > 0) node.refcounts.change(newTableOffset / cs, newTableClusters, -1);
      newTableClusters = newTable.length / entriesPerTableCluster;
      newTableOffset = node.refcounts.allocate(newTableClusters);
    }
    steps.update(++passes, passes + 2);
  }
  node.refcounts.flush();
  node.barrier();

  // The new blocks, from the refcounts as they stand now (allocations included).
  const [, setRefcount] = refcountAccessors(order);
  const rc = node.refcounts;
  const oldPer = 2 ** rc.blockBits;
  const block = new Uint8Array(cs);
  const blockView = new DataView(block.buffer);
  for (let index = 0; index < newTable.length; index++) {
    const offset = newTable[index]!;
    if (offset === 0) continue;
    block.fill(0);
    const first = index * newPer, end = first + newPer;
    for (let c = first; c < end;) {
      if (rc.blockOffset(Math.floor(c / oldPer)) === 0) {
        c = (Math.floor(c / oldPer) + 1) * oldPer;
        continue;
      }
      const refcount = rc.get(c);
      if (refcount !== 0) setRefcount(blockView, block, c - first, refcount);
      c++;
    }
    node.file.writeAt(offset, block);
  }
  const tableBytes = new Uint8Array(newTableClusters * cs);
  const tableView = new DataView(tableBytes.buffer);
  newTable.forEach((offset, i) => tableView.setBigUint64(i * 8, BigInt(offset)));
  node.file.writeAt(newTableOffset, tableBytes);
  node.barrier();
  steps.update(passes + 1, passes + 2);

  // One header write switches to the new structure.
  const oldBlocks = [...rc.blockOffsets()];
  const oldTableOffset = rc.tableOffset, oldTableClusters = rc.tableClusters;
  const h = node.header;
  h.refcountOrder = order;
  h.refcountTableOffset = newTableOffset;
  h.refcountTableClusters = newTableClusters;
  writeHeaderCluster(node);
  node.reloadRefcounts();
  newTable = [];

  // The old structure is garbage now: free it in the new one.
  for (const offset of oldBlocks) node.refcounts.change(offset / cs, 1, -1);
  node.refcounts.change(oldTableOffset / cs, oldTableClusters, -1);
  node.refcounts.flush();
  node.barrier();
  steps.update(1, 1);
}

// ---- lazy refcounts ----

/** Turn lazy refcounts on (a header bit) or off (everything written, clean, then the bit). */
function setLazyRefcounts(node: Qcow2Node, on: boolean): void {
  const h = node.header;
  if (on) {
    h.compatibleFeatures |= BigInt(COMPAT_LAZY_REFCOUNTS);
  } else {
    // QEMU's qcow2_mark_clean, then the feature bit: the refcounts are exact before it goes.
    node.flushMetadata();
    h.incompatibleFeatures &= ~BigInt(INCOMPAT_DIRTY);
    h.compatibleFeatures &= ~BigInt(COMPAT_LAZY_REFCOUNTS);
  }
  writeHeaderCluster(node);
}

// ---- size ----

/**
 * Grow or shrink as QEMU's qcow2_co_truncate (exact, no preallocation): what lies past the new end
 * is discarded first. With internal snapshots (v3) the active clusters past the end are discarded
 * and the header records the new size; the snapshots keep theirs.
 */
async function resize(node: Qcow2Node, size: number): Promise<void> {
  if (size > node.size) {
    await node.truncate(size);
    return;
  }
  await node.discard(size, node.size - size);
  if (node.header.nbSnapshots === 0) {
    await node.truncate(size);
    return;
  }
  await node.exclusive(() => {
    node.flushMetadata();
    node.header.size = size;
    writeHeaderCluster(node);
    return Promise.resolve();
  });
}

// ---- downgrade (v3 → v2) ----

/**
 * QEMU's qcow2_downgrade: clean the image, drop compatible and autoclear features, expand zero
 * clusters (v2 has no zero flag) in the active and every snapshot's tables, drop the compression
 * type, and write a v2 header.
 */
function downgrade(node: Qcow2Node, steps: Steps): void {
  const h = node.header;
  node.flushMetadata();
  if (hasFeature(h.incompatibleFeatures, INCOMPAT_DIRTY)) {
    h.incompatibleFeatures &= ~BigInt(INCOMPAT_DIRTY);
    writeHeaderCluster(node);
  }
  expandZeroClusters(node, steps);
  h.compatibleFeatures = 0n;
  h.autoclearFeatures = 0n;
  h.incompatibleFeatures &= ~BigInt(INCOMPAT_COMPRESSION);
  h.compressionType = COMPRESSION_DEFLATE;
  h.version = 2;
  writeHeaderCluster(node);
}

/**
 * QEMU's qcow2_expand_zero_clusters, for every L1 table (active first, then the snapshots'),
 * straight on disk with the L2 cache emptied:
 * - zero cluster without a host cluster: unallocated when the image has no backing file, else a
 *   new cluster of zeroes (its refcount that of the L2 table, which may be shared);
 * - zero cluster with a host cluster: zeroes written into it and the flag cleared — unless some
 *   other table also references that cluster (a snapshot that still sees its data there: QEMU
 *   7.2 overwrites it), when the entry gets a new cluster of zeroes instead.
 */
function expandZeroClusters(node: Qcow2Node, steps: Steps): void {
  const cs = node.clusterSize;
  const backed = node.backing !== undefined || node.backingName !== undefined;
  node.flushMetadata();
  node.l2Cache.clear();
  const tables: Uint8Array[] = [node.l1Table.slice()];
  for (const sn of node.snapshots.entries) {
    const l1 = new Uint8Array(sn.l1Size * 8);
    if (l1.length > 0) node.file.readAt(sn.l1TableOffset, l1);
    tables.push(l1);
  }
  const totalEntries = tables.reduce((n, l1) => n + l1.length / 8, 0);
  let visited = 0;
  const l2 = new Uint8Array(cs);
  const view = new DataView(l2.buffer);
  const zeroes = new Uint8Array(cs);
  for (const l1 of tables) {
    const l1View = new DataView(l1.buffer);
    for (let i = 0; i < l1.length / 8; i++, visited++) {
      steps.update(visited, totalEntries);
      const l2Offset = entryOffset(l1View.getUint32(i * 8), l1View.getUint32(i * 8 + 4));
      if (l2Offset === 0) continue;
      if (l2Offset < 0 || l2Offset % cs !== 0) {
        throw new BlockError(
          "corrupt",
          `L2 table offset ${hexAlt(l2Offset)} unaligned (L1 index: ${hexAlt(i)})`,
          { path: node.filename, offset: l2Offset },
        );
      }
      const l2Refcount = node.refcounts.get(l2Offset / cs);
      node.file.readAt(l2Offset, l2);
      /** Clusters to fill with zeroes, and references to drop once the table is written. */
      const fill: number[] = [];
      const release: number[] = [];
      let dirty = false;
      for (let at = 0; at < cs; at += 8) {
        const hi = view.getUint32(at), lo = view.getUint32(at + 4);
        if ((hi & HI_COMPRESSED) !== 0 || (lo & LO_ZERO) === 0) continue;
        const host = entryOffset(hi, lo);
        let target: number;
        if (host === 0 && !backed) {
          view.setUint32(at, 0);
          view.setUint32(at + 4, 0);
          dirty = true;
          continue;
        }
        if (host !== 0 && node.refcounts.get(host / cs) === l2Refcount) {
          // Only this entry references the cluster: zero it in place.
          target = host;
        } else {
          target = node.refcounts.allocate(1);
          if (l2Refcount > 1) node.refcounts.change(target / cs, 1, l2Refcount - 1);
          if (host !== 0) release.push(host);
        }
        if (target % cs !== 0) {
          throw new BlockError(
            "corrupt",
            `Cluster allocation offset ${hexAlt(target)} unaligned (L2 offset: ${
              hexAlt(l2Offset)
            }, L2 index: ${hexAlt(at / 8)})`,
            { path: node.filename, offset: target },
          );
        }
        fill.push(target);
        // COPIED exactly when the cluster has one reference (QEMU sets it in snapshot tables too).
        const [nhi, nlo] = encodeEntry(target, l2Refcount === 1, false);
        view.setUint32(at, nhi);
        view.setUint32(at + 4, nlo);
        dirty = true;
      }
      if (!dirty) continue;
      // New refcounts, then the zeroes, then the table that points at them, then the frees.
      node.refcounts.flush();
      node.barrier();
      for (const target of fill) node.file.writeAt(target, zeroes);
      node.barrier();
      node.file.writeAt(l2Offset, l2);
      node.barrier();
      for (const host of release) node.refcounts.change(host / cs, 1, -l2Refcount);
      node.refcounts.flush();
    }
  }
  node.barrier();
  node.l2Cache.clear();
  steps.update(1, 1);
}
