/**
 * The bottom-layer contract: bytes on the host.
 *
 * @module
 */

/** What {@linkcode HostFile.dataStatus} answers: one run of data or hole. */
export interface HostExtent {
  /** False for a hole (reads as zeroes, no storage behind it). */
  readonly data: boolean;
  /** Bytes from the asked offset with this status; ≥ 1. */
  readonly length: number;
  /** Data (allocated) that reads as zeroes, where the host knows it (NBD's NBD_STATE_ZERO). */
  readonly zero?: boolean;
}

/**
 * Bytes on the host: a file, a block device, or memory. Positional and never short; failures
 * throw `BlockError("io")` with the path and offset. The synchronous calls finish before they
 * return (page-cache I/O is fastest that way); `readAtAsync`/`writeAtAsync`, where an adapter has
 * them, let requests overlap in the host.
 */
export interface HostFile {
  /** The path it was opened with (named in errors). */
  readonly path: string;
  /** True when opened read-only: writes, truncates and punches throw. */
  readonly readOnly: boolean;
  /** Current size in bytes. */
  size(): number;
  /** Fill `dst` from `offset`; bytes past the end of the file read as zeroes. */
  readAt(offset: number, dst: Uint8Array): void;
  /** Write all of `src` at `offset`, extending the file when needed. */
  writeAt(offset: number, src: Uint8Array): void;
  /**
   * As {@linkcode readAt}, without holding the thread while the host reads: many may be in flight
   * at once (`aio=io_uring`). `dst` must stay untouched until the promise settles. Optional:
   * callers use `readAt` when it is absent.
   */
  readAtAsync?(offset: number, dst: Uint8Array): Promise<void>;
  /**
   * As {@linkcode writeAt}, with many in flight at once; `src` must stay untouched until the
   * promise settles. Writes in flight are unordered among themselves (overlapping ones land in
   * either order, as on a disk); every synchronous call that writes (`writeAt`, `truncate`,
   * `flush`, `punchHole`, `preallocate`) waits for them first, so `flush` covers them.
   */
  writeAtAsync?(offset: number, src: Uint8Array): Promise<void>;
  /** Set the size; growing adds a hole (zeroes). */
  truncate(size: number): void;
  /** Make completed writes durable (fdatasync). */
  flush(): void;
  /**
   * As {@linkcode flush}, without holding the thread while the disk flushes (`aio=io_uring`):
   * writes accepted before the call complete first. Optional: callers use `flush` when absent.
   */
  flushAsync?(): Promise<void>;
  /** Free `[offset, offset+length)` so it reads as zeroes; falls back to writing zeroes. */
  punchHole(offset: number, length: number): void;
  /**
   * Make `[offset, offset+length)` read as zeroes and stay allocated, without sending the zeroes
   * (NBD's WRITE_ZEROES with NO_HOLE). Optional: callers write zero buffers when it is absent.
   */
  zeroRange?(offset: number, length: number): void;
  /**
   * Tell the host the range is no longer needed (NBD's TRIM): what it reads afterwards is the
   * host's choice. Optional: callers punch a hole when it is absent.
   */
  discard?(offset: number, length: number): void;
  /**
   * Make `[offset, offset+length)` (inside the file) read as zeroes without writing data — a
   * hole punched (`unmap`) or a zeroed range kept allocated; false, with nothing changed, when the
   * host cannot. Optional: absent means it never can.
   */
  zeroWithoutData?(offset: number, length: number, unmap: boolean): boolean;
  /**
   * Snapshots the host itself keeps (a Ceph RBD image's), which a raw image on it offers as its
   * own, as QEMU's raw driver passes snapshot calls down. Optional.
   */
  readonly snapshots?: HostSnapshots;
  /** The host's own allocation unit, which qemu-img info shows as a raw image's cluster_size. */
  readonly clusterSize?: number;
  /** False when the host cannot say how much storage the file takes (see allocatedSize). */
  readonly knowsAllocation?: boolean;
  /** Reserve host storage for `[offset, offset+length)` (fallocate), extending the file; falls back to writing zeroes. */
  preallocate(offset: number, length: number): void;
  /** Data or hole at `offset` (SEEK_DATA/SEEK_HOLE); `length` is capped at `max`. */
  dataStatus(offset: number, max: number): HostExtent;
  /** Bytes of storage the host has allocated for the file. */
  allocatedSize(): number;
  /** Release the file (and its locks). Idempotent. */
  close(): void;
}

/**
 * For a read of `dst.length` bytes at `offset` from a file of `size` bytes: zeroes the part of
 * `dst` past the end (it reads as zeroes, as a file's does) and returns how many bytes are inside.
 */
export function zeroPastEnd(dst: Uint8Array, offset: number, size: number): number {
  const inside = Math.max(0, Math.min(dst.length, size - offset));
  if (inside < dst.length) dst.fill(0, inside);
  return inside;
}

/** A host's own snapshots (see {@linkcode HostFile.snapshots}). */
export interface HostSnapshots {
  /** Oldest first: each one's name and the file's size when it was taken. */
  list(): { readonly name: string; readonly size: number }[];
  /** Takes a snapshot of the file as it is now; throws if `name` is taken. */
  create(name: string): void;
  /** Deletes the snapshot `name`; throws if there is none. */
  remove(name: string): void;
  /** The file's contents become the snapshot's. */
  rollback(name: string): void;
}

/** A view of `file` whose `close` does nothing: lend a file to a node without giving it away. */
export function borrowFile(file: HostFile): HostFile {
  return {
    path: file.path,
    readOnly: file.readOnly,
    size: () => file.size(),
    readAt: (offset, dst) => file.readAt(offset, dst),
    writeAt: (offset, src) => file.writeAt(offset, src),
    ...(file.readAtAsync === undefined
      ? {}
      : { readAtAsync: (offset: number, dst: Uint8Array) => file.readAtAsync!(offset, dst) }),
    ...(file.flushAsync === undefined ? {} : { flushAsync: () => file.flushAsync!() }),
    ...(file.writeAtAsync === undefined
      ? {}
      : { writeAtAsync: (offset: number, src: Uint8Array) => file.writeAtAsync!(offset, src) }),
    truncate: (size) => file.truncate(size),
    flush: () => file.flush(),
    punchHole: (offset, length) => file.punchHole(offset, length),
    ...(file.zeroRange === undefined
      ? {}
      : { zeroRange: (offset: number, length: number) => file.zeroRange!(offset, length) }),
    ...(file.discard === undefined
      ? {}
      : { discard: (offset: number, length: number) => file.discard!(offset, length) }),
    ...(file.knowsAllocation === undefined ? {} : { knowsAllocation: file.knowsAllocation }),
    ...(file.clusterSize === undefined ? {} : { clusterSize: file.clusterSize }),
    ...(file.snapshots === undefined ? {} : { snapshots: file.snapshots }),
    ...(file.zeroWithoutData === undefined ? {} : {
      zeroWithoutData: (offset: number, length: number, unmap: boolean) =>
        file.zeroWithoutData!(offset, length, unmap),
    }),
    preallocate: (offset, length) => file.preallocate(offset, length),
    dataStatus: (offset, max) => file.dataStatus(offset, max),
    allocatedSize: () => file.allocatedSize(),
    close: () => {},
  };
}
