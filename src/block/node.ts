/**
 * The block-graph contract: every image format and filter is a {@linkcode BlockNode}.
 *
 * @module
 */

/**
 * Where a guest range lives, answered for THIS layer only (a format never looks through its
 * backing node to answer).
 *
 * - `data`: allocated here and holds data; `hostOffset` when it maps 1:1 to a host byte offset.
 * - `zero`: reads as zeroes from this layer (a hole, a zero cluster); `hostOffset` when still
 *   allocated on the host.
 * - `unallocated`: this layer has nothing; reads go to the backing node, or zeroes without one.
 * - `compressed`: data that exists here but has no 1:1 host offset.
 * - `eof`: `offset` is at or past the end of the node; `length` is 0.
 */
export type ExtentKind = "data" | "zero" | "unallocated" | "compressed" | "eof";

/** One run of same-status guest bytes starting at `offset`. */
export interface Extent {
  /** The status of the run (see {@linkcode ExtentKind}). */
  readonly kind: ExtentKind;
  /** Guest byte offset where the run starts (the asked offset). */
  readonly offset: number;
  /** Bytes from `offset` with this status; ≥ 1 unless `kind` is `eof`. */
  readonly length: number;
  /** Host byte offset of `offset` in this layer's file, where known. */
  readonly hostOffset?: number;
  /** `data` that reads as zeroes, where the host says so (an NBD export's ZERO flag). */
  readonly readsZero?: boolean;
}

/** Options of a write. */
export interface WriteOptions {
  /** Force unit access: the data is on stable storage when the write resolves. */
  fua?: boolean;
}

/** Options of a zero write. */
export interface WriteZeroesOptions {
  /** The node may free the storage behind the range (reads still return zeroes). */
  unmap?: boolean;
  /** Force unit access: the zeroes are on stable storage when the write resolves. */
  fua?: boolean;
  /**
   * Fail with BlockError `unsupported` rather than write zero bytes: the zeroes must cost no data
   * writes (QEMU's BDRV_REQ_NO_FALLBACK, NBD's FAST_ZERO). Nothing is changed when it fails.
   */
  noFallback?: boolean;
}

/** Options of a resize. */
export interface TruncateOptions {
  /** How to allocate what a grow adds, as qemu-img resize --preallocation. */
  preallocation?: "off" | "metadata" | "falloc" | "full";
}

/**
 * A node of the block graph: raw, qcow2, a filter. Offsets and lengths are guest bytes, integers,
 * within `[0, size]`. Implementations validate every request with `checkRequest` before acting.
 */
export interface BlockNode {
  /** Format name as qemu-img prints it (`raw`, `qcow2`). */
  readonly format: string;
  /** The host file behind this node, where there is one. */
  readonly filename: string;
  /** Virtual size in bytes. */
  readonly size: number;
  /** True when the node refuses writes, zero writes, discards and resizes. */
  readonly readOnly: boolean;
  /** The node reads fall through to where this layer is unallocated. */
  readonly backing?: BlockNode | undefined;
  /** The backing file this image names (as stored) and its format when recorded; the opener opens it. */
  readonly backingName?: { readonly file: string; readonly format?: string } | undefined;
  /** Hand the opened backing node to this node (it closes it when it closes); undefined detaches. */
  attachBacking?(backing: BlockNode | undefined): void;
  /** Smallest alignment requests are served without read-modify-write (1 for byte-granular). */
  readonly requestAlignment: number;

  /** Fill `dst` with the bytes at `offset`. Unallocated ranges read as backing data or zeroes. */
  read(offset: number, dst: Uint8Array): Promise<void>;
  /** Write `src` at `offset`. */
  write(offset: number, src: Uint8Array, opts?: WriteOptions): Promise<void>;
  /** Make `[offset, offset+length)` read as zeroes, freeing storage where `unmap` allows. */
  writeZeroes(offset: number, length: number, opts?: WriteZeroesOptions): Promise<void>;
  /** Hint that the range is no longer needed; contents afterwards are unspecified but stable. */
  discard(offset: number, length: number): Promise<void>;
  /** Make every completed write durable. */
  flush(): Promise<void>;
  /** Where `[offset, offset+max)` lives, for THIS layer only; the returned extent is ≤ max long. */
  blockStatus(offset: number, max: number): Promise<Extent>;
  /** Change the virtual size (grow with zeroes, or shrink); `preallocation` applies to the new part. */
  truncate?(size: number, opts?: TruncateOptions): Promise<void>;
  /** Allocated bytes on the host ("disk size"). */
  allocatedSize?(): number;
  /** Flush and release everything; the node is unusable afterwards. Idempotent. */
  close(): Promise<void>;
}
