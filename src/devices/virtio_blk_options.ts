/**
 * virtio-blk options, the feature bits they offer, and the small state the VMM-side model and the
 * iothread back-end share. Plain data and no VMM or zod imports: the iothread Worker imports this.
 *
 * @module
 */

import {
  featureBit,
  VIRTIO_F_RING_PACKED,
  VIRTIO_F_VERSION_1,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
  VIRTQ_MAX_SIZE,
} from "../virtio/features.ts";
import { VIRTIO_QUEUE_MAX } from "../virtio/interrupts.ts";
import type { DeviceSpec } from "./device_type.ts";
import {
  BLOCK_ERROR_ACTIONS,
  type BlockErrorAction,
  DEFAULT_RERROR,
  DEFAULT_WERROR,
} from "./error_policy.ts";
import {
  BDRV_REQUEST_MAX_SECTORS,
  VIRTIO_BLK_F_BLK_SIZE,
  VIRTIO_BLK_F_CONFIG_WCE,
  VIRTIO_BLK_F_DISCARD,
  VIRTIO_BLK_F_FLUSH,
  VIRTIO_BLK_F_MQ,
  VIRTIO_BLK_F_RO,
  VIRTIO_BLK_F_SEG_MAX,
  VIRTIO_BLK_F_SIZE_MAX,
  VIRTIO_BLK_F_TOPOLOGY,
  VIRTIO_BLK_F_WRITE_ZEROES,
  VIRTIO_BLK_ID_BYTES,
  VIRTIO_BLK_SECTOR_SIZE,
} from "../virtio/virtio_blk_constants.ts";

/**
 * How a virtio-blk device is built. Plain data (structured-cloneable): the machine sends the same
 * object to the iothread Worker that builds the {@linkcode VirtioBlkBackend}. Defaults are QEMU's.
 */
export interface VirtioBlkOptions {
  /** Request queues (QEMU `num-queues`), 1..1024; MQ is offered above 1. Default 1. */
  numQueues?: number;
  /** Largest size of each queue (QEMU `queue-size`), a power of 2 from 4 to 32768. Default 256. */
  queueSize?: number;
  /** The GET_ID string: ASCII, at most 20 bytes, no NUL. Default empty. */
  serial?: string;
  /** Offer VIRTIO_RING_F_EVENT_IDX. Default true. */
  eventIdx?: boolean;
  /** Offer VIRTIO_RING_F_INDIRECT_DESC. Default true. */
  indirect?: boolean;
  /** Offer VIRTIO_F_RING_PACKED (QEMU `packed`). Default false. */
  packed?: boolean;
  /** Offer VIRTIO_BLK_F_DISCARD. Default true. */
  discard?: boolean;
  /** Offer VIRTIO_BLK_F_WRITE_ZEROES. Default true. */
  writeZeroes?: boolean;
  /** Cache mode after reset: writeback (true, QEMU's `cache.writeback=on`) or writethrough. */
  writeback?: boolean;
  /** Offer VIRTIO_BLK_F_CONFIG_WCE: the driver may toggle `writeback` (QEMU `config-wce`). Default true. */
  configWce?: boolean;
  /** Present the device read-only (VIRTIO_BLK_F_RO); also when the node is read-only. Default false. */
  readOnly?: boolean;
  /** `blk_size`: a power of 2 from 512 to 65536. Default 512. */
  logicalBlockSize?: number;
  /** Physical block size (topology `physical_block_exp`), a power of 2 ≥ the logical one. */
  physicalBlockSize?: number;
  /** Topology `min_io_size` in bytes, a multiple of the logical block size. Default 0. */
  minIoSize?: number;
  /** Topology `opt_io_size` in bytes, a multiple of the logical block size. Default 0. */
  optIoSize?: number;
  /** `seg_max` (QEMU `seg-max-adjust`: queue size − 2). */
  segMax?: number;
  /** `size_max` in bytes, 0 or ≥ 4096; 0 does not offer VIRTIO_BLK_F_SIZE_MAX (QEMU's choice). */
  sizeMax?: number;
  /** `max_discard_sectors`, 1..4194303 (QEMU `max-discard-sectors`). */
  maxDiscardSectors?: number;
  /** `max_discard_seg`, 1..256 (QEMU always 1). Default 1. */
  maxDiscardSeg?: number;
  /** `max_write_zeroes_sectors`, 1..4194303 (QEMU `max-write-zeroes-sectors`). */
  maxWriteZeroesSectors?: number;
  /** `max_write_zeroes_seg`, 1..256 (QEMU always 1). Default 1. */
  maxWriteZeroesSeg?: number;
  /** Merge adjacent reads or writes popped in one drain (QEMU `request-merging`). Default true. */
  requestMerging?: boolean;
  /** Largest merged request in bytes (QEMU: the node's max transfer). Default 1 MiB. */
  maxMergeBytes?: number;
  /** A failed write (QEMU `werror`). Default `enospc`. */
  werror?: BlockErrorAction;
  /** A failed read (QEMU `rerror`). Default `report`. */
  rerror?: BlockErrorAction;
  /** The drive's name in a stop reason. Default `virtio-blk`. */
  driveName?: string;
}

/** {@linkcode VirtioBlkOptions} with every default filled in and every value checked. */
export type ResolvedVirtioBlkOptions = Readonly<Required<VirtioBlkOptions>>;

/** The facts of the disk the model needs; a `BlockNode` has them (`size` in bytes, `readOnly`). */
export interface VirtioBlkDisk {
  readonly size: number;
  readonly readOnly: boolean;
}

/** Most discard / write-zeroes segments per request vstor accepts: one scratch copy per queue. */
export const VIRTIO_BLK_MAX_SEGMENTS = 256;
/** Default largest merged request: a bounce buffer of this size per queue, allocated on first use. */
export const VIRTIO_BLK_DEFAULT_MERGE_BYTES = 1 << 20;

function isPowerOfTwo(n: number): boolean {
  return Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

function checkInt(name: string, value: number, min: number, max: number): number {
  if (!Number.isInteger(value) || value < min || value > max) {
    throw new RangeError(`virtio-blk ${name} ${value} is not an integer from ${min} to ${max}`);
  }
  return value;
}

/** 0 (not offered) or at least a page: Linux cannot use segments smaller than a page. */
function checkSizeMax(sizeMax: number): number {
  checkInt("sizeMax", sizeMax, 0, 0xffff_ffff);
  if (sizeMax !== 0 && sizeMax < 4096) {
    throw new RangeError(`virtio-blk sizeMax ${sizeMax} is neither 0 nor at least 4096`);
  }
  return sizeMax;
}

/**
 * Fills in the defaults of `options` and checks every value.
 *
 * @throws {RangeError} naming the first bad option
 */
export function resolveVirtioBlkOptions(options: VirtioBlkOptions = {}): ResolvedVirtioBlkOptions {
  const numQueues = checkInt("numQueues", options.numQueues ?? 1, 1, VIRTIO_QUEUE_MAX);
  const queueSize = options.queueSize ?? 256;
  // QEMU: more than 2 (seg_max is size − 2) and a power of 2 (split rings need it).
  if (!isPowerOfTwo(queueSize) || queueSize < 4 || queueSize > VIRTQ_MAX_SIZE) {
    throw new RangeError(
      `virtio-blk queueSize ${queueSize} is not a power of 2 from 4 to ${VIRTQ_MAX_SIZE}`,
    );
  }
  const serial = options.serial ?? "";
  // deno-lint-ignore no-control-regex
  if (serial.length > VIRTIO_BLK_ID_BYTES || !/^[\x01-\x7f]*$/.test(serial)) {
    throw new RangeError(
      `virtio-blk serial ${JSON.stringify(serial)} is not ASCII of at most 20 bytes without NUL`,
    );
  }
  const logicalBlockSize = options.logicalBlockSize ?? VIRTIO_BLK_SECTOR_SIZE;
  if (!isPowerOfTwo(logicalBlockSize) || logicalBlockSize < 512 || logicalBlockSize > 65536) {
    throw new RangeError(
      `virtio-blk logicalBlockSize ${logicalBlockSize} is not a power of 2 from 512 to 65536`,
    );
  }
  const physicalBlockSize = options.physicalBlockSize ?? logicalBlockSize;
  if (
    !isPowerOfTwo(physicalBlockSize) || physicalBlockSize < logicalBlockSize ||
    physicalBlockSize / logicalBlockSize > 2 ** 30
  ) {
    throw new RangeError(
      `virtio-blk physicalBlockSize ${physicalBlockSize} is not a power of 2 ≥ the logical block size`,
    );
  }
  const minIoSize = options.minIoSize ?? 0;
  const optIoSize = options.optIoSize ?? 0;
  if (minIoSize % logicalBlockSize !== 0 || optIoSize % logicalBlockSize !== 0) {
    throw new RangeError("virtio-blk minIoSize and optIoSize must be multiples of the block size");
  }
  checkInt("minIoSize", minIoSize / logicalBlockSize, 0, 0xffff);
  checkInt("optIoSize", optIoSize / logicalBlockSize, 0, 0xffff_ffff);
  return {
    numQueues,
    queueSize,
    serial,
    eventIdx: options.eventIdx ?? true,
    indirect: options.indirect ?? true,
    packed: options.packed ?? false,
    discard: options.discard ?? true,
    writeZeroes: options.writeZeroes ?? true,
    writeback: options.writeback ?? true,
    configWce: options.configWce ?? true,
    readOnly: options.readOnly ?? false,
    logicalBlockSize,
    physicalBlockSize,
    minIoSize,
    optIoSize,
    segMax: checkInt("segMax", options.segMax ?? queueSize - 2, 1, 0xffff_ffff),
    sizeMax: checkSizeMax(options.sizeMax ?? 0),
    maxDiscardSectors: checkInt(
      "maxDiscardSectors",
      options.maxDiscardSectors ?? BDRV_REQUEST_MAX_SECTORS,
      1,
      BDRV_REQUEST_MAX_SECTORS,
    ),
    maxDiscardSeg: checkInt(
      "maxDiscardSeg",
      options.maxDiscardSeg ?? 1,
      1,
      VIRTIO_BLK_MAX_SEGMENTS,
    ),
    maxWriteZeroesSectors: checkInt(
      "maxWriteZeroesSectors",
      options.maxWriteZeroesSectors ?? BDRV_REQUEST_MAX_SECTORS,
      1,
      BDRV_REQUEST_MAX_SECTORS,
    ),
    maxWriteZeroesSeg: checkInt(
      "maxWriteZeroesSeg",
      options.maxWriteZeroesSeg ?? 1,
      1,
      VIRTIO_BLK_MAX_SEGMENTS,
    ),
    requestMerging: options.requestMerging ?? true,
    maxMergeBytes: checkInt(
      "maxMergeBytes",
      options.maxMergeBytes ?? VIRTIO_BLK_DEFAULT_MERGE_BYTES,
      VIRTIO_BLK_SECTOR_SIZE,
      BDRV_REQUEST_MAX_SECTORS * VIRTIO_BLK_SECTOR_SIZE,
    ),
    werror: checkAction("werror", options.werror ?? DEFAULT_WERROR),
    rerror: checkAction("rerror", options.rerror ?? DEFAULT_RERROR),
    driveName: options.driveName ?? "virtio-blk",
  };
}

function checkAction(name: string, value: BlockErrorAction): BlockErrorAction {
  if (!BLOCK_ERROR_ACTIONS.includes(value)) {
    throw new RangeError(
      `virtio-blk ${name} ${JSON.stringify(value)} is not one of ${BLOCK_ERROR_ACTIONS.join(", ")}`,
    );
  }
  return value;
}

/**
 * The feature bits a device built from `options` offers for a disk that is (or is not) read-only.
 * VERSION_1 is included; the transport would add it anyway.
 */
export function virtioBlkFeatures(options: ResolvedVirtioBlkOptions, readOnly: boolean): bigint {
  let f = featureBit(VIRTIO_F_VERSION_1) | featureBit(VIRTIO_BLK_F_SEG_MAX) |
    featureBit(VIRTIO_BLK_F_BLK_SIZE) | featureBit(VIRTIO_BLK_F_TOPOLOGY);
  if (options.sizeMax > 0) f |= featureBit(VIRTIO_BLK_F_SIZE_MAX);
  // QEMU offers FLUSH (legacy WCE) when caching is on or the driver may turn it on.
  if (options.writeback || options.configWce) f |= featureBit(VIRTIO_BLK_F_FLUSH);
  if (options.configWce) f |= featureBit(VIRTIO_BLK_F_CONFIG_WCE);
  if (readOnly || options.readOnly) f |= featureBit(VIRTIO_BLK_F_RO);
  if (options.numQueues > 1) f |= featureBit(VIRTIO_BLK_F_MQ);
  if (options.discard) f |= featureBit(VIRTIO_BLK_F_DISCARD);
  if (options.writeZeroes) f |= featureBit(VIRTIO_BLK_F_WRITE_ZEROES);
  if (options.indirect) f |= featureBit(VIRTIO_RING_F_INDIRECT_DESC);
  if (options.eventIdx) f |= featureBit(VIRTIO_RING_F_EVENT_IDX);
  if (options.packed) f |= featureBit(VIRTIO_F_RING_PACKED);
  return f;
}

/** Capacity in 512-byte sectors of a disk of `size` bytes: rounded up, as QEMU's total_sectors. */
export function capacitySectors(size: number): number {
  return Math.ceil(size / VIRTIO_BLK_SECTOR_SIZE);
}

/** Bytes of the shared state buffer. */
export const VIRTIO_BLK_SHARED_BYTES = 16;

/**
 * The state the VMM-side model and the iothread back-end share, over a small `SharedArrayBuffer`:
 * `writeback` (driver-writable through config space; the back-end reads it once per drain) and
 * the capacity in sectors (changed by a resize on either side).
 *
 * Layout: i32 writeback @0, i64 capacity @8.
 */
export class VirtioBlkShared {
  /** Pass this to the other thread and wrap it there with `new VirtioBlkShared(buffer)`. */
  readonly buffer: SharedArrayBuffer;
  readonly #words: Int32Array;
  readonly #capacity: BigInt64Array;

  /**
   * Wraps the shared words of `buffer`, or makes fresh ones.
   *
   * @param buffer an existing shared buffer (from the other thread); a fresh zeroed one if absent
   * @throws {RangeError} when `buffer` is not {@linkcode VIRTIO_BLK_SHARED_BYTES} long
   */
  constructor(buffer?: SharedArrayBuffer) {
    if (buffer !== undefined && buffer.byteLength !== VIRTIO_BLK_SHARED_BYTES) {
      throw new RangeError(
        `virtio-blk shared state is ${buffer.byteLength} bytes, not ${VIRTIO_BLK_SHARED_BYTES}`,
      );
    }
    this.buffer = buffer ?? new SharedArrayBuffer(VIRTIO_BLK_SHARED_BYTES);
    this.#words = new Int32Array(this.buffer, 0, 2);
    this.#capacity = new BigInt64Array(this.buffer, 8, 1);
  }

  /** The cache mode: true writeback, false writethrough. */
  get writeback(): boolean {
    return Atomics.load(this.#words, 0) !== 0;
  }
  set writeback(on: boolean) {
    Atomics.store(this.#words, 0, on ? 1 : 0);
  }

  /** Capacity in 512-byte sectors. */
  get capacity(): number {
    return Number(Atomics.load(this.#capacity, 0));
  }
  set capacity(sectors: number) {
    Atomics.store(this.#capacity, 0, BigInt(sectors));
  }
}

/** The options of a device as the machine configures it (`DeviceSpec`): its device options. */
export type VirtioBlkDeviceOptions = Omit<
  VirtioBlkOptions,
  | "numQueues"
  | "queueSize"
  | "eventIdx"
  | "indirect"
  | "packed"
  | "readOnly"
  | "writeback"
  | "werror"
  | "rerror"
  | "driveName"
>;

/**
 * The options of a configured device: queue and ring settings from the spec, read-only and the
 * cache mode from its drive (`cache=writethrough` shows the guest a writethrough cache, as QEMU's
 * `cache.writeback=off`), the rest from its (schema-validated) device options.
 */
export function virtioBlkOptionsFromSpec(spec: DeviceSpec): VirtioBlkOptions {
  const drive = spec.drives[0];
  return {
    ...(spec.options as VirtioBlkDeviceOptions),
    numQueues: spec.numQueues,
    queueSize: spec.queueSize,
    eventIdx: spec.eventIdx,
    indirect: spec.indirect,
    packed: spec.packed,
    readOnly: drive?.readOnly ?? false,
    writeback: drive?.cache !== "writethrough" && drive?.cache !== "directsync",
    werror: drive?.werror ?? DEFAULT_WERROR,
    rerror: drive?.rerror ?? DEFAULT_RERROR,
    driveName: drive?.id ?? spec.id,
  };
}
