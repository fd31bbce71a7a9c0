/**
 * Creating qcow2 images with qemu-img's options and QEMU's layout: header in cluster 0, refcount
 * table in cluster 1, its first block in cluster 2, then the L1 table.
 *
 * @module
 */
import { BlockError } from "../../src/errors.ts";
import { borrowFile, type HostFile } from "../../src/host/host_file.ts";
import {
  COMPAT_LAZY_REFCOUNTS,
  COMPRESSION_DEFLATE,
  COMPRESSION_ZSTD,
  INCOMPAT_COMPRESSION,
  INCOMPAT_EXTL2,
  MAX_L1_BYTES,
  type Qcow2Header,
  serializeHeader,
  V3_HEADER_LENGTH,
} from "./header.ts";
import { Qcow2Node } from "./qcow2.ts";
import { refcountAccessors } from "./refcount.ts";

/** qcow2 creation options (qemu-img `-o` names in comments). */
export interface Qcow2CreateOptions {
  /** `compat`: "0.10" (v2) or "1.1" (v3, default). */
  compat?: "0.10" | "1.1";
  /** `cluster_size`: a power of two from 512 to 2 MiB (default 64 KiB). */
  clusterSize?: number;
  /** `refcount_bits`: 1, 2, 4, 8, 16 (default), 32 or 64; v2 allows only 16. */
  refcountBits?: number;
  /** `lazy_refcounts` (v3). */
  lazyRefcounts?: boolean;
  /** `extended_l2` (v3, cluster size ≥ 16 KiB). */
  extendedL2?: boolean;
  /** `compression_type`: zlib (default) or zstd (v3). */
  compressionType?: "zlib" | "zstd";
  /** `preallocation`: off, metadata, falloc, full. */
  preallocation?: "off" | "metadata" | "falloc" | "full";
  /** `backing_file`: recorded in the header (the chain is opened by the opener). */
  backingFile?: string;
  /** `backing_fmt`: the backing file's format, recorded in the header. */
  backingFormat?: string;
}

function bad(path: string, message: string): BlockError {
  return new BlockError("invalid-argument", message, { path });
}

/** Validate options the way qemu-img does, with its messages. */
export function validateQcow2Options(o: Qcow2CreateOptions, size: number, path: string): void {
  const v3 = (o.compat ?? "1.1") === "1.1";
  const cs = o.clusterSize ?? 65536;
  if (!Number.isSafeInteger(cs) || cs < 512 || cs > 2 * 1024 * 1024 || (cs & (cs - 1)) !== 0) {
    throw bad(path, "Cluster size must be a power of two between 512 and 2048k");
  }
  const rb = o.refcountBits ?? 16;
  if (![1, 2, 4, 8, 16, 32, 64].includes(rb)) {
    throw bad(path, "Refcount width must be a power of two and may not exceed 64 bits");
  }
  if (!v3 && rb !== 16) {
    throw bad(
      path,
      "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)",
    );
  }
  if (!v3 && o.lazyRefcounts) {
    throw bad(
      path,
      "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)",
    );
  }
  if (o.extendedL2) {
    if (!v3) {
      throw bad(
        path,
        "Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)",
      );
    }
    if (cs < 16384) {
      throw bad(
        path,
        "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
      );
    }
  }
  // Without subclusters a preallocated cluster would hide the backing file's data.
  if (
    o.backingFile !== undefined && (o.preallocation ?? "off") !== "off" && !o.extendedL2
  ) {
    throw bad(
      path,
      "Backing file and preallocation can only be used at the same time if extended_l2 is on",
    );
  }
  if (!v3 && o.compressionType === "zstd") {
    throw bad(
      path,
      "Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)",
    );
  }
  const l2Entries = cs / (o.extendedL2 ? 16 : 8);
  if (Math.ceil(size / (cs * l2Entries)) * 8 > MAX_L1_BYTES) {
    throw bad(
      path,
      `Image size ${size} is too large for cluster size ${cs} (the L1 table would exceed 32 MiB)`,
    );
  }
}

/**
 * Write a new qcow2 image of `size` bytes into `file` (which is truncated first).
 *
 * @throws {BlockError} `invalid-argument` with qemu-img's message for a bad option
 */
export async function createQcow2(
  file: HostFile,
  size: number,
  o: Qcow2CreateOptions = {},
): Promise<void> {
  validateQcow2Options(o, size, file.path);
  const v3 = (o.compat ?? "1.1") === "1.1";
  const cs = o.clusterSize ?? 65536;
  const clusterBits = Math.log2(cs);
  const refcountOrder = Math.log2(o.refcountBits ?? 16);
  let incompat = 0n;
  if (o.extendedL2) incompat |= BigInt(INCOMPAT_EXTL2);
  if (o.compressionType === "zstd") incompat |= BigInt(INCOMPAT_COMPRESSION);
  const header: Qcow2Header = {
    version: v3 ? 3 : 2,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits,
    size: 0,
    cryptMethod: 0,
    l1Size: 0,
    l1TableOffset: 0,
    refcountTableOffset: cs,
    refcountTableClusters: 1,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: incompat,
    compatibleFeatures: o.lazyRefcounts ? BigInt(COMPAT_LAZY_REFCOUNTS) : 0n,
    autoclearFeatures: 0n,
    refcountOrder,
    headerLength: V3_HEADER_LENGTH,
    compressionType: o.compressionType === "zstd" ? COMPRESSION_ZSTD : COMPRESSION_DEFLATE,
    unknownHeaderTail: new Uint8Array(0),
    featureNames: new Map(),
    otherExtensions: [],
  };
  if (o.backingFile !== undefined) header.backingFile = o.backingFile;
  if (o.backingFormat !== undefined) header.backingFormat = o.backingFormat;
  file.truncate(0);
  const headerBytes = serializeHeader(header, file.path);
  const cluster0 = new Uint8Array(cs);
  cluster0.set(headerBytes);
  file.writeAt(0, cluster0);
  // Refcount table (cluster 1) → block (cluster 2) counting clusters 0..2.
  const table = new Uint8Array(cs);
  new DataView(table.buffer).setBigUint64(0, BigInt(2 * cs));
  file.writeAt(cs, table);
  const block = new Uint8Array(cs);
  const blockView = new DataView(block.buffer);
  const [, setRefcount] = refcountAccessors(refcountOrder);
  for (let c = 0; c < 3; c++) setRefcount(blockView, block, c, 1);
  file.writeAt(2 * cs, block);
  file.flush();

  // The driver does the rest, as a resize from 0 with the preallocation (QEMU's blk_truncate).
  const node = await Qcow2Node.open(borrowFile(file), { cacheCleanInterval: 0 });
  try {
    const preallocation = o.preallocation ?? "off";
    await node.truncate(size, preallocation === "off" ? {} : { preallocation });
  } finally {
    await node.close();
  }
}
