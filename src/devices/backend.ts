/**
 * The iothread half of a virtio device: what turns popped chains into block I/O. The VMM half (PCI
 * config, features, device config space) is a {@linkcode VirtioDeviceModel}; the machine builds
 * the queues from the layouts the driver programmed and hands them here at DRIVER_OK.
 *
 * @module
 */
import type { GuestMemory } from "../virtio/memory.ts";
import type { DeviceQueue } from "../virtio/queue.ts";

export type { VirtioDeviceModel } from "../virtio/device.ts";

/**
 * What a back-end may call outside {@linkcode DeviceBackend.processQueue}: device-initiated events
 * (a hotplug, a capacity change) need an interrupt, and a ring found broken there a reset.
 */
export interface BackendHooks {
  /** Raise queue `queue`'s interrupt (after publishing its used ring). */
  interrupt(queue: number): void;
  /** The driver broke the ring rules outside a kick: DEVICE_NEEDS_RESET. */
  needsReset(error: Error): void;
  /**
   * The device stopped on a failed request (`werror`/`rerror` `stop`, or `enospc` on ENOSPC): it
   * holds the request and takes no more until reset; the VMM learns `reason` (QEMU's
   * BLOCK_IO_ERROR event and the `io-error` run state).
   */
  stop?(reason: string): void;
}

/**
 * A device back-end, running in its iothread Worker (or on the caller's thread in tests and
 * benches). It never throws at the guest: malformed requests become per-request status codes;
 * a broken ring surfaces as a `VirtqueueError` (or a `GuestMemoryError`, taken as `outside-ram`)
 * thrown from {@linkcode processQueue}, or, outside a kick, through
 * {@linkcode BackendHooks.needsReset}; the caller turns either into DEVICE_NEEDS_RESET for this
 * device alone and stops serving its queues until {@linkcode reset}.
 */
export interface DeviceBackend {
  /**
   * DRIVER_OK: the negotiated features and the device queues, indexed by queue number (a queue
   * the driver did not enable is `undefined`).
   */
  activate(
    mem: GuestMemory,
    features: bigint,
    queues: ReadonlyArray<DeviceQueue | undefined>,
  ): void;
  /**
   * Drains queue `queue` after a kick, the QEMU way: `do { disable notifications; pop, process,
   * push; publish (calling `interrupt` when it says so) } while (enable notifications finds more)`.
   *
   * @throws {VirtqueueError} when the driver broke the ring rules
   */
  processQueue(queue: number, interrupt: () => void): Promise<void>;
  /**
   * Whether the runtime may poll queue `queue` for new buffers after a drain (absent: every queue).
   * False for a queue whose buffers the device takes only for events of its own, such as
   * virtio-scsi's event queue: its posted buffers look like work for ever, and polling it would
   * spin (QEMU's `virtio_queue_aio_attach_host_notifier_no_poll`). Such a queue is still drained
   * on every kick.
   */
  pollable?(queue: number): boolean;
  /**
   * Set by the device's runtime (the iothread) at DRIVER_OK, and cleared at reset, when the
   * back-end raises events of its own. Back-ends without events ignore it.
   */
  hooks?: BackendHooks | null;
  /**
   * Node requests started and not yet completed (absent: the back-end completes every request
   * within its drain). While there are any, the runtime keeps its event loop turning instead of
   * sleeping on the doorbells, so that completions arrive; they are published and interrupt on
   * their own.
   */
  readonly inflight?: number;
  /** Resolves when no node request is in flight (absent: never any after a drain). */
  drained?(): Promise<void>;
  /** Device reset: forget queues and in-flight state; images stay open. */
  reset(): void;
  /** Flush and close what the back-end owns. */
  close(): Promise<void>;
}
