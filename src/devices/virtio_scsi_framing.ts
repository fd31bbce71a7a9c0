/**
 * What virtio-scsi's three kinds of queue (control, event, request) share on the iothread: the
 * framing rules of their buffers and the error for a driver that breaks them, the 8-byte LUN field,
 * header copies between descriptor buffers and scratch, and the back-end's counters.
 *
 * @module
 */

import { VirtqueueError } from "../virtio/queue.ts";

/** Which virtio-scsi framing rule the driver broke. */
export type VirtioScsiFault =
  | "short-request" // readable part shorter than the request header
  | "short-response" // writable part shorter than the response header
  | "short-event-buffer"; // an event buffer with fewer than 16 writable bytes

/**
 * The driver broke the virtio-scsi framing rules (QEMU's `virtio_scsi_bad_req`: "wrong size for
 * virtio-scsi headers"): a {@linkcode VirtqueueError} with fault `bad-request`, as the back-end
 * contract names, so the iothread turns it into DEVICE_NEEDS_RESET. It is thrown from
 * `VirtioScsiBackend.processQueue` (or passed to `VirtioScsiHooks.needsReset` when met outside
 * it); the back-end then ignores its queues until reset.
 */
export class VirtioScsiError extends VirtqueueError {
  /** The rule broken. */
  readonly reason: VirtioScsiFault;

  constructor(reason: VirtioScsiFault, queue: number, detail: string) {
    super("bad-request", queue, `virtio-scsi ${detail} [${reason}]`);
    this.reason = reason;
  }
}

/** Counters of the back-end: each queue's handler bumps its own. */
export interface VirtioScsiStats {
  /** Command requests completed (any response). */
  commands: number;
  /** Control requests completed. */
  controls: number;
  /** Events delivered. */
  events: number;
  /** Events dropped because the driver had posted no event buffer. */
  eventsDropped: number;
}

/** A parsed 8-byte virtio-scsi LUN. */
export interface LunAddress {
  target: number;
  lun: number;
}

/**
 * The single-level LUN structure of virtio-scsi, checked as QEMU's `virtio_scsi_device_find`:
 * byte 0 must be 1, byte 2 either 0 or a flat-space byte (40h–7Fh). Bytes 4–7 are not checked.
 */
export function parseLun(b: Uint8Array, at: number): LunAddress | null {
  if (b[at] !== 1) return null;
  const hi = b[at + 2]!;
  if (hi !== 0 && (hi < 0x40 || hi >= 0x80)) return null;
  return { target: b[at + 1]!, lun: ((hi << 8) | b[at + 3]!) & 0x3fff };
}

/**
 * Copies the first `length` bytes of `buffers` into `dst`; returns the bytes copied. Headers are a
 * few dozen bytes: a byte loop beats allocating views to `set` them.
 */
export function gather(buffers: readonly Uint8Array[], dst: Uint8Array, length: number): number {
  let done = 0;
  for (const b of buffers) {
    const n = Math.min(b.length, length - done);
    for (let i = 0; i < n; i++) dst[done + i] = b[i]!;
    done += n;
    if (done >= length) break;
  }
  return done;
}

/** Copies the first `length` bytes of `src` into `buffers` from their start; returns the bytes copied. */
export function scatter(buffers: readonly Uint8Array[], src: Uint8Array, length: number): number {
  let done = 0;
  for (const b of buffers) {
    const n = Math.min(b.length, length - done);
    for (let i = 0; i < n; i++) b[i] = src[done + i]!;
    done += n;
    if (done >= length) break;
  }
  return done;
}
