/**
 * virtio-blk's per-queue state and the helpers of its request path (see `virtio_blk_backend.ts`):
 * the counters, the merge buffer and scratch of each queue, and the byte moves between a chain's
 * guest views and a flat buffer.
 *
 * @module
 */
import type { DescriptorChain, DeviceQueue } from "../virtio/queue.ts";
import {
  VIRTIO_BLK_MAX_MERGE_REQS,
  VIRTIO_BLK_OUTHDR_SIZE,
} from "../virtio/virtio_blk_constants.ts";

/** What the back-end has done, over all queues. Plain counters; read them any time. */
export interface VirtioBlkStats {
  /** Requests completed (any status). */
  requests: number;
  /** VIRTIO_BLK_T_IN requests completed. */
  reads: number;
  /** VIRTIO_BLK_T_OUT requests completed. */
  writes: number;
  /** VIRTIO_BLK_T_FLUSH requests completed. */
  flushes: number;
  /** VIRTIO_BLK_T_DISCARD requests completed. */
  discards: number;
  /** VIRTIO_BLK_T_WRITE_ZEROES requests completed. */
  writeZeroes: number;
  /** VIRTIO_BLK_T_GET_ID requests completed. */
  getIds: number;
  /** Completions with VIRTIO_BLK_S_IOERR. */
  ioErrors: number;
  /** Completions with VIRTIO_BLK_S_UNSUPP. */
  unsupported: number;
  /** Node reads or writes made from two or more guest requests. */
  merges: number;
  /** Guest requests that went out as part of a merged node request. */
  mergedRequests: number;
  /** Failed requests completed as successes (`werror`/`rerror` `ignore`). */
  ignoredErrors: number;
  /** Failed requests held, not completed, since the device stopped (`stop`, `enospc`). */
  heldRequests: number;
}

export function newStats(): VirtioBlkStats {
  return {
    requests: 0,
    reads: 0,
    writes: 0,
    flushes: 0,
    discards: 0,
    writeZeroes: 0,
    getIds: 0,
    ioErrors: 0,
    unsupported: 0,
    merges: 0,
    mergedRequests: 0,
    ignoredErrors: 0,
    heldRequests: 0,
  };
}

/** Little-endian u32 at `at` of a view (the header may be in any view, so no shared DataView). */
export function le32(v: Uint8Array, at: number): number {
  return (v[at]! | (v[at + 1]! << 8) | (v[at + 2]! << 16) | (v[at + 3]! << 24)) >>> 0;
}

/** Copies `length` bytes of the concatenated `views`, starting `from` bytes in, to `dst` at `at`. */
export function gather(
  views: readonly Uint8Array[],
  from: number,
  dst: Uint8Array,
  at: number,
  length: number,
): void {
  for (let i = 0; i < views.length && length > 0; i++) {
    const v = views[i]!;
    if (from >= v.length) {
      from -= v.length;
      continue;
    }
    const n = Math.min(v.length - from, length);
    dst.set(from === 0 && n === v.length ? v : v.subarray(from, from + n), at);
    at += n;
    length -= n;
    from = 0;
  }
}

/** Copies `length` bytes of `src` from `at` into the concatenated `views`, `from` bytes in. */
export function scatter(
  views: readonly Uint8Array[],
  from: number,
  src: Uint8Array,
  at: number,
  length: number,
): void {
  for (let i = 0; i < views.length && length > 0; i++) {
    const v = views[i]!;
    if (from >= v.length) {
      from -= v.length;
      continue;
    }
    const n = Math.min(v.length - from, length);
    v.set(src.subarray(at, at + n), from);
    at += n;
    length -= n;
    from = 0;
  }
}

/**
 * One request queue's state. Everything a drain mutates lives here, so that queues processed
 * concurrently (interleaving at awaits) never share scratch space.
 */
export class BlkQueue {
  readonly queue: DeviceQueue;
  /** A drain is under way: a second kick meanwhile is served by its final re-check. */
  running = false;
  /** Set by reset: completions of I/O still under way go nowhere. */
  dead = false;
  /** Node requests started from this queue and not yet completed. */
  inflight = 0;
  /** The interrupt callback of the latest drain: completions after it use it too. */
  interrupt: (() => void) | null = null;
  /** A publish of completions that came outside a drain is scheduled. */
  publishScheduled = false;
  /** The bounce buffer serves a merged request in flight: another takes its own. */
  bounceBusy = false;

  // QEMU's MultiReqBuffer: reads or writes waiting to be merged and submitted.
  readonly mrbChains: (DescriptorChain | null)[] = new Array(VIRTIO_BLK_MAX_MERGE_REQS).fill(null);
  readonly mrbSector = new Float64Array(VIRTIO_BLK_MAX_MERGE_REQS);
  readonly mrbBytes = new Float64Array(VIRTIO_BLK_MAX_MERGE_REQS);
  /** Merge-buffer slots sorted by sector. */
  readonly order = new Uint8Array(VIRTIO_BLK_MAX_MERGE_REQS);
  mrbCount = 0;
  mrbWrite = false;

  /** A header split across buffers, or discard / write-zeroes segments, copied out once. */
  readonly scratch: Uint8Array;
  /** Merged requests whose pieces are scattered in guest RAM go through here. */
  bounce = new Uint8Array(0);
  // A run of pieces back to back in guest RAM, found while checking a merge for zero copy.
  spanBuffer: ArrayBufferLike | null = null;
  spanStart = 0;
  spanEnd = 0;

  constructor(queue: DeviceQueue, maxSegments: number) {
    this.queue = queue;
    this.scratch = new Uint8Array(Math.max(VIRTIO_BLK_OUTHDR_SIZE, maxSegments * 16));
  }
}

/**
 * The data of a request when it is exactly one whole buffer (header | data | status), else null:
 * then the I/O needs no piece walk.
 */
export function dataView(
  chain: DescriptorChain,
  isWrite: boolean,
  bytes: number,
): Uint8Array | null {
  if (bytes === 0) return null;
  if (isWrite) {
    const r = chain.readable;
    return r.length === 2 && r[0]!.length === VIRTIO_BLK_OUTHDR_SIZE && r[1]!.length === bytes
      ? r[1]!
      : null;
  }
  const w = chain.writable;
  return w.length === 2 && w[0]!.length === bytes ? w[0]! : null;
}

/** The merge-buffer slot at sorted position `k`. */
export function slotAt(q: BlkQueue, k: number): number {
  return q.order[k]!;
}
