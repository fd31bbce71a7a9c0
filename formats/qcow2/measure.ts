/**
 * How many bytes a new qcow2 image needs (qemu-img measure -O qcow2), computed as QEMU 7.2's
 * `qcow2_measure` does: the metadata of a fully allocated image (header, L2 and L1 tables,
 * refcount blocks and table) plus the data clusters the source holds, and the space the source's
 * persistent bitmaps would take. All sizes are bigint: virtual sizes reach 2^63.
 *
 * @module
 */
import { BlockError } from "../../src/errors.ts";
import { MAX_L1_BYTES } from "./header.ts";
import type { Qcow2Node } from "./qcow2.ts";
import { refcountMetadataClusters } from "./refcount.ts";

/** qcow2 creation options that change what a measure reports, as parsed from `-o`. */
export interface Qcow2MeasureOptions {
  /** `cluster_size` in bytes (default 65536). */
  clusterSize?: number;
  /** `compat`: only "0.10" and "1.1" (measure, unlike create, takes no "v2"/"v3"). */
  compat?: string;
  /** `refcount_bits` (default 16). */
  refcountBits?: number;
  /** `extended_l2`. */
  extendedL2?: boolean;
  /** `preallocation`: off, metadata, falloc or full. */
  preallocation?: string;
  /** `backing_file`: only whether one is given matters. */
  backingFile?: string;
  /** `encrypt.format`: "luks" would add a LUKS header, which vstor cannot size. */
  encryptFormat?: string;
  /** `size` (or --size): the virtual size when there is no source image. */
  size?: bigint;
}

/** The options after QEMU's checks and defaults. */
export interface Qcow2MeasureParams {
  clusterSize: number;
  version: 2 | 3;
  refcountOrder: number;
  extendedL2: boolean;
  preallocation: "off" | "metadata" | "falloc" | "full";
  hasBackingFile: boolean;
  /** Virtual size from the options, rounded up to whole clusters. */
  size: bigint;
}

/** What a measure answers, with qemu-img's field meanings. */
export interface MeasureInfo {
  /** Bytes the new image needs for what the source holds (or for an empty image). */
  required: bigint;
  /** Bytes the new image needs with every cluster allocated. */
  fullyAllocated: bigint;
  /** Bytes the source's persistent bitmaps would take; present when source and target both store bitmaps. */
  bitmaps?: bigint;
}

/** What a qcow2 measure needs to know of its source image. */
export interface Qcow2MeasureSource {
  /** Guest bytes of the source, a whole number of sectors (as QEMU's `bdrv_getlength`). */
  size: bigint;
  /** Bytes of the `clusterSize`-sized clusters in which the source holds data (not zeroes). */
  dataBytes(clusterSize: number): Promise<bigint>;
  /** The bytes of the source's persistent bitmaps in a target with `clusterSize` clusters; absent when the source cannot store bitmaps. */
  bitmapsSize?: (clusterSize: number) => bigint;
}

const MIN_CLUSTER_BITS = 9;
const MAX_CLUSTER_BITS = 21;
/** Extended L2 entries split a cluster into 32 subclusters of at least 512 bytes. */
const EXTL2_MIN_CLUSTER_SIZE = 32 << MIN_CLUSTER_BITS;
const L1E_SIZE = 8n;
const PREALLOCATION_MODES = ["off", "metadata", "falloc", "full"] as const;

function invalid(message: string): BlockError {
  return new BlockError("invalid-argument", message);
}

function roundUp(value: bigint, to: bigint): bigint {
  return (value + to - 1n) / to * to;
}

function divRoundUp(value: bigint, by: bigint): bigint {
  return (value + by - 1n) / by;
}

/**
 * Check measure options as `qcow2_measure` does, in its order, and fill in the defaults.
 *
 * @throws {BlockError} `invalid-argument` with QEMU's message for a bad value or a size that needs
 *   more than a 32 MiB L1 table
 * @example
 * ```ts
 * import { resolveQcow2MeasureOptions } from "./measure.ts";
 * const p = resolveQcow2MeasureOptions({ clusterSize: 4096, size: 1000n });
 * if (p.size !== 4096n || p.refcountOrder !== 4) throw new Error("unexpected defaults");
 * ```
 */
export function resolveQcow2MeasureOptions(o: Qcow2MeasureOptions): Qcow2MeasureParams {
  const extendedL2 = o.extendedL2 ?? false;
  const clusterSize = o.clusterSize ?? 65536;
  const clusterBits = Math.log2(clusterSize);
  if (
    !Number.isInteger(clusterBits) || clusterBits < MIN_CLUSTER_BITS ||
    clusterBits > MAX_CLUSTER_BITS
  ) {
    throw invalid(
      `Cluster size must be a power of two between ${1 << MIN_CLUSTER_BITS} and ${
        1 << (MAX_CLUSTER_BITS - 10)
      }k`,
    );
  }
  if (extendedL2 && clusterSize < EXTL2_MIN_CLUSTER_SIZE) {
    throw invalid(
      `Extended L2 entries are only supported with cluster sizes of at least ${EXTL2_MIN_CLUSTER_SIZE} bytes`,
    );
  }
  let version: 2 | 3 = 3;
  if (o.compat !== undefined) {
    if (o.compat === "0.10") version = 2;
    else if (o.compat !== "1.1") throw invalid(`Invalid compatibility level: '${o.compat}'`);
  }
  const refcountBits = o.refcountBits ?? 16;
  const refcountOrder = Math.log2(refcountBits);
  if (refcountBits > 64 || !Number.isInteger(refcountOrder)) {
    throw invalid("Refcount width must be a power of two and may not exceed 64 bits");
  }
  if (version < 3 && refcountBits !== 16) {
    throw invalid(
      "Different refcount widths than 16 bits require compatibility level 1.1 or above " +
        "(use compat=1.1 or greater)",
    );
  }
  const preallocation = PREALLOCATION_MODES.find((m) => m === (o.preallocation ?? "off"));
  if (preallocation === undefined) throw invalid(`invalid parameter value: ${o.preallocation}`);
  if (o.encryptFormat === "luks") {
    throw new BlockError("unsupported", "Measuring LUKS-encrypted qcow2 images is not supported");
  }
  const cs = BigInt(clusterSize);
  const size = roundUp(o.size ?? 0n, cs);
  const l2Tables = divRoundUp(size / cs, cs / l2EntrySize(extendedL2));
  if (l2Tables * L1E_SIZE > BigInt(MAX_L1_BYTES)) {
    throw invalid("The image size is too large (try using a larger cluster size)");
  }
  return {
    clusterSize,
    version,
    refcountOrder,
    extendedL2,
    preallocation,
    hasBackingFile: o.backingFile !== undefined,
    size,
  };
}

function l2EntrySize(extendedL2: boolean): bigint {
  return extendedL2 ? 16n : 8n;
}

/**
 * Bytes of refcount blocks and refcount table needed to count `clusters` clusters and themselves
 * (QEMU's `qcow2_refcount_metadata_size`): the fixed point where counting the refcount metadata
 * needs no further blocks. `generousIncrease` leaves room for the table to grow by half.
 */
export function qcow2RefcountMetadataSize(
  clusters: bigint,
  clusterSize: number,
  refcountOrder: number,
  generousIncrease = false,
): bigint {
  const { blocks, table } = refcountMetadataClusters(
    clusters,
    clusterSize,
    refcountOrder,
    generousIncrease,
  );
  return (blocks + table) * BigInt(clusterSize);
}

/**
 * Bytes of a fully allocated qcow2 image of `totalSize` guest bytes (QEMU's
 * `qcow2_calc_prealloc_size`): header cluster, L2 tables (whole tables), L1 table (whole
 * clusters), refcount metadata and every data cluster.
 *
 * @example
 * ```ts
 * import { qcow2PreallocSize } from "./measure.ts";
 * // qemu-img measure --size 1G -O qcow2 reports 1074135040 fully allocated bytes.
 * if (qcow2PreallocSize(1n << 30n, 65536, 4, false) !== 1074135040n) throw new Error("mismatch");
 * ```
 */
export function qcow2PreallocSize(
  totalSize: bigint,
  clusterSize: number,
  refcountOrder: number,
  extendedL2: boolean,
): bigint {
  const cs = BigInt(clusterSize);
  const l2eSize = l2EntrySize(extendedL2);
  const aligned = roundUp(totalSize, cs);
  let meta = cs; // header
  const l2Entries = roundUp(aligned / cs, cs / l2eSize);
  meta += l2Entries * l2eSize;
  const l1Entries = roundUp(l2Entries * l2eSize / cs, cs / L1E_SIZE);
  meta += l1Entries * L1E_SIZE;
  meta += qcow2RefcountMetadataSize((meta + aligned) / cs, clusterSize, refcountOrder);
  return meta + aligned;
}

/**
 * Measure a new qcow2 image: for `source` when given (its data clusters, or all of it with a
 * backing file or full preallocation), else for an empty image of the options' size.
 *
 * @example
 * ```ts
 * import { measureQcow2, resolveQcow2MeasureOptions } from "./measure.ts";
 * const info = await measureQcow2(resolveQcow2MeasureOptions({ size: 1n << 30n }));
 * if (info.required !== 393216n || info.fullyAllocated !== 1074135040n) throw new Error("mismatch");
 * ```
 */
export async function measureQcow2(
  params: Qcow2MeasureParams,
  source?: Qcow2MeasureSource,
): Promise<MeasureInfo> {
  const cs = BigInt(params.clusterSize);
  let virtualSize = params.size;
  let required = 0n;
  if (source !== undefined) {
    virtualSize = roundUp(source.size, cs);
    // With a backing file the new image may share nothing with the source's chain: count it all.
    required = params.hasBackingFile ? virtualSize : await source.dataBytes(params.clusterSize);
  }
  // Metadata preallocation is already counted: measures always include all metadata.
  if (params.preallocation === "full" || params.preallocation === "falloc") required = virtualSize;
  const fullyAllocated = qcow2PreallocSize(
    virtualSize,
    params.clusterSize,
    params.refcountOrder,
    params.extendedL2,
  );
  const info: MeasureInfo = {
    required: fullyAllocated - virtualSize + required,
    fullyAllocated,
  };
  if (params.version >= 3 && source?.bitmapsSize !== undefined) {
    info.bitmaps = source.bitmapsSize(params.clusterSize);
  }
  return info;
}

/** What sizing one persistent bitmap needs from its directory entry. */
export interface PersistentBitmap {
  /** Bytes of the name up to its first NUL (C's strlen, as QEMU measures it). */
  nameLength: number;
  granularityBits: number;
}

const BITMAP_DIR_ENTRY_HEADER = 24;
const BITMAP_TABLE_ENTRY_SIZE = 8n;

/**
 * The persistent bitmaps a qcow2 image carries, as QEMU loads them (formats/qcow2/bitmap.ts,
 * validated at open): none unless the bitmaps extension is present and its autoclear bit set.
 */
export function persistentBitmaps(node: Qcow2Node): PersistentBitmap[] {
  return (node.bitmaps?.list ?? []).map((b) => ({
    nameLength: b.nameLength,
    granularityBits: b.granularityBits,
  }));
}

/**
 * Bytes persistent bitmaps of a `diskSize`-byte image take in a qcow2 image with `clusterSize`
 * clusters (QEMU's `qcow2_get_persistent_dirty_bitmap_size`): each bitmap fully allocated, its
 * bitmap table, and the directory (entries without extra data), each rounded to clusters.
 */
export function bitmapsSize(
  bitmaps: readonly PersistentBitmap[],
  diskSize: bigint,
  clusterSize: number,
): bigint {
  const cs = BigInt(clusterSize);
  let total = 0n;
  let dirSize = 0n;
  for (const bm of bitmaps) {
    const bits = divRoundUp(diskSize, 1n << BigInt(bm.granularityBits));
    const clusters = divRoundUp(divRoundUp(bits, 8n), cs);
    total += clusters * cs + roundUp(clusters * BITMAP_TABLE_ENTRY_SIZE, cs);
    dirSize += roundUp(BigInt(BITMAP_DIR_ENTRY_HEADER + bm.nameLength), 8n);
  }
  return total + roundUp(dirSize, cs);
}

/**
 * Whether a qcow2 image looks preallocated with metadata, as QEMU's
 * `qcow2_detect_metadata_preallocation` decides: clearly more clusters are in use (nonzero
 * refcount) than the host file has storage for. Only then does QEMU's block status ask the host
 * file whether data clusters are holes, which makes them read as zeroes.
 */
export function detectMetadataPreallocation(node: Qcow2Node): boolean {
  // A host that cannot say what it allocated (NBD): QEMU's check fails and assumes none.
  if (node.file.knowsAllocation === false) return false;
  const cs = node.clusterSize;
  const realClusters = Math.floor(node.file.allocatedSize() / cs);
  const threshold = Math.max(Math.floor(realClusters * 10 / 9), realClusters + 2);
  const endCluster = Math.ceil(node.file.size() / cs);
  let inUse = 0;
  for (let cluster = 0; cluster < endCluster && inUse < threshold; cluster++) {
    if (node.refcounts.get(cluster) !== 0) inUse++;
  }
  return inUse >= threshold;
}
