/**
 * The qcow2 header and header extensions: parse with every limit QEMU enforces, serialize back
 * with what we do not interpret preserved.
 *
 * @module
 */
import { BlockError } from "../../src/errors.ts";

export const QCOW2_MAGIC = 0x514649fb;
export const V2_HEADER_LENGTH = 72;
export const V3_MIN_HEADER_LENGTH = 104;
/** What QEMU 7.2 writes for v3: the 104 bytes, the compression type byte and padding to 8. */
export const V3_HEADER_LENGTH = 112;

export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
/** L1 table at most 32 MiB (QEMU's QCOW_MAX_L1_SIZE). */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
/** Refcount table at most 8 MiB (QEMU's QCOW_MAX_REFTABLE_SIZE). */
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;
export const MAX_BACKING_NAME = 1023;
export const MAX_SNAPSHOTS = 65536;
/** Host offsets must stay exactly representable: JS numbers are exact below 2^53. */
export const MAX_HOST_OFFSET = Number.MAX_SAFE_INTEGER;

// Incompatible feature bits.
export const INCOMPAT_DIRTY = 1 << 0;
export const INCOMPAT_CORRUPT = 1 << 1;
export const INCOMPAT_DATA_FILE = 1 << 2;
export const INCOMPAT_COMPRESSION = 1 << 3;
export const INCOMPAT_EXTL2 = 1 << 4;
const INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
// Compatible feature bits.
export const COMPAT_LAZY_REFCOUNTS = 1 << 0;
// Autoclear feature bits.
export const AUTOCLEAR_BITMAPS = 1 << 0;
export const AUTOCLEAR_DATA_FILE_RAW = 1 << 1;

export const COMPRESSION_DEFLATE = 0;
export const COMPRESSION_ZSTD = 1;

// Header extension types.
export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

/** One header extension kept as bytes (those we interpret are decoded into fields as well). */
export interface HeaderExtension {
  readonly type: number;
  readonly data: Uint8Array;
}

/** The decoded header. Feature words are kept whole (bigint) so unknown high bits survive. */
export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  /** Header bytes past the fields we know (header_length > 112), preserved verbatim. */
  unknownHeaderTail: Uint8Array;
  backingFile?: string;
  backingFormat?: string;
  /** Feature names from the feature name table, keyed `type:bit` (type 0 incompat, 1 compat, 2 autoclear). */
  featureNames: Map<string, string>;
  /** Extensions other than backing format, feature table and end, in file order, preserved. */
  otherExtensions: HeaderExtension[];
}

/** The names QEMU 7.2 writes in its feature name table, in its order. */
const KNOWN_FEATURE_NAMES: Array<[number, number, string]> = [
  [0, 0, "dirty bit"],
  [0, 1, "corrupt bit"],
  [0, 2, "external data file"],
  [0, 3, "compression type"],
  [0, 4, "extended L2 entries"],
  [1, 0, "lazy refcounts"],
  [2, 0, "bitmaps"],
  [2, 1, "raw external data"],
];

function invalid(path: string, message: string): BlockError {
  return new BlockError("invalid-format", message, { path });
}

/**
 * A table offset field, checked as QEMU's qcow2_validate_table checks it (the table must end
 * below 2^63; vstor also needs an exact JavaScript number, which every host offset below 2^56
 * is): past that it is "TABLE offset invalid".
 */
function u64(view: DataView, at: number, path: string, table: string): number {
  const v = view.getBigUint64(at);
  if (v > BigInt(MAX_HOST_OFFSET)) throw invalid(path, `${table} offset invalid`);
  return Number(v);
}

/** QEMU: a backing file name must start inside the header cluster. */
function backingOffset(view: DataView, clusterSize: number, path: string): number {
  const v = view.getBigUint64(8);
  if (v > BigInt(clusterSize)) throw invalid(path, "Invalid backing file offset");
  return Number(v);
}

/** Bytes of the header cluster the parser needs: at most one cluster, at least the v2 header. */
export const HEADER_PROBE_BYTES = 1 << MAX_CLUSTER_BITS;

/**
 * Parse and validate a qcow2 header from the start of the file (`head` holds the first cluster or
 * the whole file if shorter). As QEMU, no offset is checked against the file's size (what lies past
 * its end reads as zeroes); the size parameter stays for callers.
 *
 * @throws {BlockError} `invalid-format` naming the field; `unsupported` naming the feature
 */
export function parseHeader(
  head: Uint8Array,
  _fileSize: number,
  path: string,
  opts: { check?: boolean } = {},
): Qcow2Header {
  if (head.length < V2_HEADER_LENGTH) {
    throw invalid(path, "Image is not in qcow2 format (file too short)");
  }
  const view = new DataView(head.buffer, head.byteOffset, head.byteLength);
  if (view.getUint32(0) !== QCOW2_MAGIC) throw invalid(path, "Image is not in qcow2 format");
  const version = view.getUint32(4);
  if (version !== 2 && version !== 3) {
    throw new BlockError("unsupported", `Unsupported qcow2 version ${version}`, { path });
  }
  const clusterBits = view.getUint32(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw invalid(path, `Unsupported cluster size: 2^${clusterBits}`);
  }
  const clusterSize = 2 ** clusterBits;
  const h: Qcow2Header = {
    version,
    backingFileOffset: backingOffset(view, clusterSize, path),
    backingFileSize: view.getUint32(16),
    clusterBits,
    // Checked against the L1 table's reach below, once the entry size is known.
    size: Number(view.getBigUint64(24)),
    cryptMethod: view.getUint32(32),
    l1Size: view.getUint32(36),
    l1TableOffset: u64(view, 40, path, "Active L1 table"),
    refcountTableOffset: u64(view, 48, path, "Reference count table"),
    refcountTableClusters: view.getUint32(56),
    nbSnapshots: view.getUint32(60),
    snapshotsOffset: u64(view, 64, path, "Snapshot table"),
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: 4,
    headerLength: V2_HEADER_LENGTH,
    compressionType: COMPRESSION_DEFLATE,
    unknownHeaderTail: new Uint8Array(0),
    featureNames: new Map(),
    otherExtensions: [],
  };
  if (version === 3) {
    if (head.length < V3_MIN_HEADER_LENGTH) {
      throw invalid(path, "qcow2 header exceeds cluster size");
    }
    h.incompatibleFeatures = view.getBigUint64(72);
    h.compatibleFeatures = view.getBigUint64(80);
    h.autoclearFeatures = view.getBigUint64(88);
    h.refcountOrder = view.getUint32(96);
    h.headerLength = view.getUint32(100);
    if (h.headerLength < V3_MIN_HEADER_LENGTH) throw invalid(path, "qcow2 header too short");
    if (h.headerLength > clusterSize || h.headerLength > head.length) {
      throw invalid(path, "qcow2 header exceeds cluster size");
    }
    if (h.headerLength % 8 !== 0) {
      throw invalid(path, `qcow2 header length ${h.headerLength} is not a multiple of 8`);
    }
    if (h.headerLength > V3_MIN_HEADER_LENGTH) h.compressionType = head[104]!;
    if (h.headerLength > V3_HEADER_LENGTH) {
      h.unknownHeaderTail = head.slice(V3_HEADER_LENGTH, h.headerLength);
    }
  }
  if (h.refcountOrder > 6) {
    throw invalid(path, `Reference count entry width too large; may not exceed 64 bits`);
  }

  // Extensions come before they can name unknown features in errors.
  parseExtensions(h, head, clusterSize, path);

  const incompat = h.incompatibleFeatures;
  const unknownIncompat = incompat & ~BigInt(INCOMPAT_KNOWN);
  if (unknownIncompat !== 0n) {
    throw new BlockError(
      "unsupported",
      `Unsupported qcow2 feature(s): ${unsupportedFeatures(h, unknownIncompat)}`,
      {
        path,
      },
    );
  }
  if (incompat & BigInt(INCOMPAT_DATA_FILE)) {
    throw new BlockError("unsupported", "Unsupported qcow2 feature(s): external data file", {
      path,
    });
  }
  if (h.cryptMethod !== 0) {
    const how = h.cryptMethod === 1
      ? "AES"
      : h.cryptMethod === 2
      ? "LUKS"
      : `method ${h.cryptMethod}`;
    throw new BlockError("unsupported", `Encrypted qcow2 images (${how}) are not supported`, {
      path,
    });
  }
  if (incompat & BigInt(INCOMPAT_COMPRESSION)) {
    if (h.compressionType !== COMPRESSION_ZSTD && h.compressionType !== COMPRESSION_DEFLATE) {
      throw new BlockError("unsupported", `Unknown compression type ${h.compressionType}`, {
        path,
      });
    }
    if (h.compressionType === COMPRESSION_DEFLATE) {
      throw invalid(path, "Compression type bit is set but the compression type is zlib");
    }
  } else if (h.compressionType !== COMPRESSION_DEFLATE) {
    throw invalid(
      path,
      `Compression type ${h.compressionType} needs the compression type feature bit`,
    );
  }
  if ((incompat & BigInt(INCOMPAT_EXTL2)) && clusterBits < 14) {
    throw invalid(path, "Extended L2 entries need a cluster size of at least 16 KiB");
  }

  // Offsets and table sizes, against QEMU's limits.
  if (h.refcountTableClusters === 0) {
    throw invalid(path, "Image does not contain a reference count table");
  }
  if (h.refcountTableClusters * clusterSize > MAX_REFTABLE_BYTES) {
    throw invalid(path, "Reference count table too large");
  }
  // As QEMU's qcow2_validate_table: aligned offsets, no check against the file's length (a
  // truncated image still opens; what lies past the end reads as zeroes, check reports it).
  if (h.refcountTableOffset % clusterSize !== 0) {
    throw invalid(path, "Reference count table offset invalid");
  }
  if (h.refcountTableOffset === 0) {
    throw invalid(path, "The refcount table is at offset 0 (in the header)");
  }

  const entryBytes = (incompat & BigInt(INCOMPAT_EXTL2)) ? 16 : 8;
  const l2Entries = clusterSize / entryBytes;
  if (h.l1Size * 8 > MAX_L1_BYTES) throw invalid(path, "Active L1 table too large");
  // As QEMU: an image whose L1 index would pass INT_MAX is too big; vstor's guest offsets are
  // exact JavaScript numbers, so a size past 2^53 is refused too.
  const sizeBig = view.getBigUint64(24);
  const span = BigInt(clusterSize * l2Entries);
  if ((sizeBig + span - 1n) / span > 0x7fffffffn) throw invalid(path, "Image is too big");
  if (sizeBig > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new BlockError(
      "unsupported",
      `Image size ${sizeBig} is past what vstor supports (2^53)`,
      {
        path,
      },
    );
  }
  const minL1 = Math.ceil(h.size / (clusterSize * l2Entries));
  if (h.l1Size < minL1) throw invalid(path, "L1 table is too small");
  if (h.l1Size > 0) {
    if (h.l1TableOffset % clusterSize !== 0) throw invalid(path, "Active L1 table offset invalid");
    if (h.l1TableOffset === 0) throw invalid(path, "The L1 table is at offset 0 (in the header)");
  }
  // As qcow2_validate_table, whatever the count; what lies past the end of the file reads as
  // zeroes. qemu-img check validates and reads the snapshot table itself (and may repair it).
  if (!opts.check && h.nbSnapshots > MAX_SNAPSHOTS) throw invalid(path, "Snapshot table too large");
  if (!opts.check && h.snapshotsOffset % clusterSize !== 0) {
    throw invalid(path, "Snapshot table offset invalid");
  }
  if (h.backingFileOffset !== 0) {
    if (
      h.backingFileSize > MAX_BACKING_NAME || h.backingFileOffset + h.backingFileSize > clusterSize
    ) {
      throw invalid(path, "Backing file name too long");
    }
    if (h.backingFileOffset + h.backingFileSize > head.length) {
      throw invalid(path, "Backing file name is past the end of the file");
    }
    h.backingFile = new TextDecoder().decode(
      head.subarray(h.backingFileOffset, h.backingFileOffset + h.backingFileSize),
    );
  }
  return h;
}

/**
 * QEMU's report_unsupported_feature: names from the feature table, in table order up to its
 * first empty name, then the bits left as one hexadecimal mask.
 */
function unsupportedFeatures(h: Qcow2Header, mask: bigint): string {
  const names: string[] = [];
  for (const [key, name] of h.featureNames) {
    if (name === "") break;
    const [type, bit] = key.split(":").map(Number) as [number, number];
    if (type === 0 && (mask & (1n << BigInt(bit)))) {
      names.push(name);
      mask &= ~(1n << BigInt(bit));
    }
  }
  if (mask !== 0n) names.push(`Unknown incompatible feature: ${mask.toString(16)}`);
  return names.join(", ");
}

function parseExtensions(
  h: Qcow2Header,
  head: Uint8Array,
  clusterSize: number,
  path: string,
): void {
  // v2 images may carry extensions too (backing format), right after the 72-byte header.
  const end = Math.min(clusterSize, head.length, h.backingFileOffset || Infinity);
  const view = new DataView(head.buffer, head.byteOffset, head.byteLength);
  let at = h.headerLength;
  // As qcow2_read_extensions: every extension, the end marker included, must fit before the
  // backing file name (or the end of the header cluster).
  while (at < end) {
    if (at + 8 > end) throw invalid(path, "Header extension too large");
    const type = view.getUint32(at);
    const len = view.getUint32(at + 4);
    at += 8;
    if (len > end - at) throw invalid(path, "Header extension too large");
    if (type === EXT_END) return;
    const data = head.slice(at, at + len);
    at += Math.ceil(len / 8) * 8;
    if (type === EXT_BACKING_FORMAT) {
      if (len > 1023) throw invalid(path, "Backing format name too long");
      h.backingFormat = new TextDecoder().decode(data);
    } else if (type === EXT_FEATURE_TABLE) {
      h.featureNames.clear(); // as in QEMU, the last table read is the one used
      // A short last entry reads as zero-padded, as QEMU reads the table into a zeroed buffer.
      for (let i = 0; i + 2 <= len; i += 48) {
        const name = new TextDecoder().decode(data.subarray(i + 2, Math.min(len, i + 48)))
          .replace(/\0.*$/s, "");
        h.featureNames.set(`${data[i]}:${data[i + 1]}`, name);
      }
    } else {
      h.otherExtensions.push({ type, data });
    }
  }
}

/** True when `bit` is set in a feature word. */
export function hasFeature(word: bigint, bit: number): boolean {
  return (word & BigInt(bit)) !== 0n;
}

/**
 * Serialize the header cluster: header fields, extensions (backing format, feature table,
 * preserved others), the end marker and the backing file name. Sets `backingFileOffset/Size`.
 *
 * @throws {BlockError} `invalid-argument` when it does not fit in one cluster
 */
export function serializeHeader(h: Qcow2Header, path: string): Uint8Array {
  const clusterSize = 2 ** h.clusterBits;
  const headerLength = h.version === 2
    ? V2_HEADER_LENGTH
    : Math.max(h.headerLength, V3_HEADER_LENGTH);
  const parts: Uint8Array[] = [];
  const ext = (type: number, data: Uint8Array) => {
    const padded = new Uint8Array(8 + Math.ceil(data.length / 8) * 8);
    const v = new DataView(padded.buffer);
    v.setUint32(0, type);
    v.setUint32(4, data.length);
    padded.set(data, 8);
    parts.push(padded);
  };
  const enc = new TextEncoder();
  if (h.backingFormat !== undefined) ext(EXT_BACKING_FORMAT, enc.encode(h.backingFormat));
  // QEMU 7.2 writes the feature name table only where it leaves room: clusters above 4 KiB.
  if (h.version === 3 && clusterSize > 4096) {
    const table = new Uint8Array(48 * KNOWN_FEATURE_NAMES.length);
    KNOWN_FEATURE_NAMES.forEach(([type, bit, name], i) => {
      table[i * 48] = type;
      table[i * 48 + 1] = bit;
      table.set(enc.encode(name), i * 48 + 2);
    });
    ext(EXT_FEATURE_TABLE, table);
  }
  for (const e of h.otherExtensions) ext(e.type, e.data);
  ext(EXT_END, new Uint8Array(0));
  const backing = h.backingFile === undefined ? new Uint8Array(0) : enc.encode(h.backingFile);
  if (backing.length > MAX_BACKING_NAME) {
    throw new BlockError("invalid-argument", "Backing file name too long", { path });
  }
  const extBytes = parts.reduce((n, p) => n + p.length, 0);
  const total = headerLength + extBytes + backing.length;
  if (total > clusterSize) {
    throw new BlockError(
      "invalid-argument",
      "Header, extensions and backing file name do not fit in one cluster",
      {
        path,
      },
    );
  }
  const out = new Uint8Array(total);
  const v = new DataView(out.buffer);
  v.setUint32(0, QCOW2_MAGIC);
  v.setUint32(4, h.version);
  h.backingFileOffset = backing.length > 0 ? headerLength + extBytes : 0;
  h.backingFileSize = backing.length;
  v.setBigUint64(8, BigInt(h.backingFileOffset));
  v.setUint32(16, h.backingFileSize);
  v.setUint32(20, h.clusterBits);
  v.setBigUint64(24, BigInt(h.size));
  v.setUint32(32, h.cryptMethod);
  v.setUint32(36, h.l1Size);
  v.setBigUint64(40, BigInt(h.l1TableOffset));
  v.setBigUint64(48, BigInt(h.refcountTableOffset));
  v.setUint32(56, h.refcountTableClusters);
  v.setUint32(60, h.nbSnapshots);
  v.setBigUint64(64, BigInt(h.snapshotsOffset));
  if (h.version === 3) {
    v.setBigUint64(72, h.incompatibleFeatures);
    v.setBigUint64(80, h.compatibleFeatures);
    v.setBigUint64(88, h.autoclearFeatures);
    v.setUint32(96, h.refcountOrder);
    h.headerLength = headerLength;
    v.setUint32(100, headerLength);
    out[104] = h.compressionType;
    out.set(h.unknownHeaderTail, V3_HEADER_LENGTH);
  }
  let at = headerLength;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  out.set(backing, at);
  return out;
}
