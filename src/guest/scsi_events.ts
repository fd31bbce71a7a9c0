/**
 * The event queue of the guest's virtio-scsi driver and the work it leaves (Linux's
 * `virtscsi_handle_event`, run from the guest's workqueue).
 *
 * With HOTPLUG or CHANGE negotiated, `eventBuffers` 16-byte buffers sit in the event queue. Its
 * interrupt handler only takes the events in ({@linkcode ScsiEventQueue.harvest}); the work they
 * need (SCSI commands, which wait) runs later in {@linkcode ScsiEventQueue.runAll}, which the
 * driver's `processEvents` calls with its command slot held. Unit attentions seen on commands
 * queue work here too (a capacity re-read, a rescan of the target).
 *
 * TRANSPORT_RESET/RESCAN probes that LUN, TRANSPORT_RESET/REMOVED drops it (its targets then fail
 * new requests locally; requests in flight complete with whatever the device answers — BAD_TARGET
 * or LOGICAL UNIT NOT SUPPORTED — so they fail cleanly), PARAM_CHANGE with 2Ah/xx re-reads the
 * capacity, and EVENTS_MISSED rescans everything. A buffer is re-posted once its event was handled
 * (Linux does the same), so a driver that falls behind makes the device drop events and report
 * EVENTS_MISSED.
 *
 * @module
 */

import {
  VIRTIO_SCSI_EVENT_SIZE,
  VIRTIO_SCSI_EVT_RESET_REMOVED,
  VIRTIO_SCSI_EVT_RESET_RESCAN,
  VIRTIO_SCSI_T_EVENTS_MISSED,
  VIRTIO_SCSI_T_PARAM_CHANGE,
  VIRTIO_SCSI_T_TRANSPORT_RESET,
} from "../virtio/virtio_scsi_constants.ts";
import type { LunScanner } from "./scsi_scan.ts";
import type { GuestPlatform, VirtioPciDriver, VirtioQueue } from "./virtio_driver.ts";

/** Counters of the event queue and the work it caused. */
export interface ScsiEventStats {
  /** Event buffers the device completed. */
  received: number;
  /** Of them, with EVENTS_MISSED set. */
  missed: number;
  /** TRANSPORT_RESET events (rescan and removal). */
  transportResets: number;
  /** PARAM_CHANGE events. */
  paramChanges: number;
  /** Events of a kind or reason the driver ignores. */
  ignored: number;
  /** Unit attentions seen on any command. */
  unitAttentions: number;
  /** Commands retried after a unit attention. */
  retries: number;
}

/** Work the event queue or a unit attention left for the driver's `processEvents`. */
export type ScsiWork =
  | {
    readonly kind: "event";
    readonly token: number;
    readonly event: number;
    readonly target: number;
    readonly lun: number;
    readonly reason: number;
  }
  | { readonly kind: "capacity"; readonly target: number; readonly lun: number }
  | { readonly kind: "rescan-target"; readonly target: number };

/** How a {@linkcode ScsiEventQueue} is built. */
export interface ScsiEventQueueOptions {
  readonly platform: GuestPlatform;
  readonly virtio: VirtioPciDriver;
  /** Virtqueue 1. */
  readonly vq: VirtioQueue;
  /** The driver's counters (shared: unit attentions and retries are the driver's to count). */
  readonly stats: ScsiEventStats;
  /** What the work acts on. */
  readonly scanner: LunScanner;
}

/** The event queue's buffers in guest RAM, and the work waiting for the driver. */
export class ScsiEventQueue {
  readonly #platform: GuestPlatform;
  readonly #ram: DataView;
  readonly #virtio: VirtioPciDriver;
  readonly #vq: VirtioQueue;
  readonly #stats: ScsiEventStats;
  readonly #scanner: LunScanner;
  #base = 0;
  #count = 0;
  readonly #work: ScsiWork[] = [];
  #working = false;

  constructor(options: ScsiEventQueueOptions) {
    this.#platform = options.platform;
    this.#ram = new DataView(options.platform.mem.buffer);
    this.#virtio = options.virtio;
    this.#vq = options.vq;
    this.#stats = options.stats;
    this.#scanner = options.scanner;
  }

  /** The event virtqueue. */
  get vq(): VirtioQueue {
    return this.#vq;
  }

  /** True when work waits. */
  get hasWork(): boolean {
    return this.#work.length > 0;
  }

  /** True when work waits and {@linkcode runAll} is not already running it. */
  get due(): boolean {
    return this.#work.length > 0 && !this.#working;
  }

  /** Allocates `count` event buffers and posts them all (once the device is live). */
  post(count: number): void {
    this.#base = this.#platform.alloc.alloc(count * VIRTIO_SCSI_EVENT_SIZE, 16);
    this.#count = count;
    for (let token = 0; token < count; token++) this.#postOne(token);
    this.#vq.kick();
  }

  #postOne(token: number): void {
    const addr = this.#base + token * VIRTIO_SCSI_EVENT_SIZE;
    this.#platform.mem.fill(addr, VIRTIO_SCSI_EVENT_SIZE, 0);
    // The ring holds every buffer at once (checked at init): add cannot run out of room.
    this.#vq.ring.add([], [{ addr, length: VIRTIO_SCSI_EVENT_SIZE }], token);
  }

  /** Queues work a unit attention asked for. */
  queue(work: ScsiWork): void {
    this.#work.push(work);
  }

  /**
   * The interrupt handler: takes events in; the work they need runs in {@linkcode runAll} (an
   * interrupt cannot wait).
   *
   * @throws {RangeError} when the device completes a buffer it does not have
   */
  harvest(): void {
    const ring = this.#vq.ring;
    const ram = this.#ram;
    const mem = this.#platform.mem;
    do {
      ring.disableInterrupts();
      for (let used = ring.getUsed(); used !== null; used = ring.getUsed()) {
        if (used.token < 0 || used.token >= this.#count) {
          throw new RangeError(
            `Device completed event buffer ${used.token}, which it does not have`,
          );
        }
        const at = mem.translate(this.#base + used.token * VIRTIO_SCSI_EVENT_SIZE, 16);
        const b1 = ram.getUint8(at + 5);
        const b2 = ram.getUint8(at + 6);
        const b3 = ram.getUint8(at + 7);
        this.#stats.received++;
        this.#work.push({
          kind: "event",
          token: used.token,
          event: ram.getUint32(at, true),
          target: b1,
          // REPORT LUNS encoding: peripheral below 256, flat space (40h) above.
          lun: ((b2 & 0x3f) << 8) | b3,
          reason: ram.getUint32(at + 12, true),
        });
      }
    } while (ring.enableInterrupts());
  }

  /**
   * Runs the waiting work in order: probes, removals, capacity re-reads, rescans; re-posts each
   * event buffer once its event is handled. The caller holds the driver's command slot.
   *
   * @returns the work items done
   */
  async runAll(): Promise<number> {
    let done = 0;
    this.#working = true;
    try {
      while (this.#work.length > 0) {
        const work = this.#work.shift()!;
        await this.#do(work);
        done++;
      }
    } finally {
      this.#working = false;
    }
    return done;
  }

  async #do(work: ScsiWork): Promise<void> {
    const scanner = this.#scanner;
    switch (work.kind) {
      case "capacity":
        await scanner.probeLun(work.target, work.lun, "unit-attention");
        return;
      case "rescan-target":
        await scanner.scanTarget(work.target, "unit-attention");
        return;
      case "event":
        break;
    }
    const stats = this.#stats;
    try {
      const missed = (work.event & VIRTIO_SCSI_T_EVENTS_MISSED) !== 0;
      const event = (work.event & ~VIRTIO_SCSI_T_EVENTS_MISSED) >>> 0;
      if (missed) {
        stats.missed++;
        // virtscsi_handle_event: events were lost, so look at everything again.
        await scanner.scanAll("events-missed");
      }
      if (event === VIRTIO_SCSI_T_TRANSPORT_RESET) {
        stats.transportResets++;
        if (work.reason === VIRTIO_SCSI_EVT_RESET_RESCAN) {
          await scanner.probeLun(work.target, work.lun, "rescan-event");
        } else if (work.reason === VIRTIO_SCSI_EVT_RESET_REMOVED) {
          scanner.remove(work.target, work.lun, "removed-event");
        } else {
          stats.ignored++;
        }
      } else if (event === VIRTIO_SCSI_T_PARAM_CHANGE) {
        stats.paramChanges++;
        const asc = work.reason & 0xff;
        const ascq = (work.reason >>> 8) & 0xff;
        // virtscsi_handle_param_change: capacity data changed (2Ah/00, /01, /09) → rescan device.
        if (asc === 0x2a && (ascq === 0x00 || ascq === 0x01 || ascq === 0x09)) {
          await scanner.probeLun(work.target, work.lun, "param-change");
        } else if (asc === 0x3f && ascq === 0x0e) {
          await scanner.scanTarget(work.target, "param-change");
        } else {
          stats.ignored++;
        }
      } else if (event !== 0 || !missed) {
        // NO_EVENT carries only EVENTS_MISSED; ASYNC_NOTIFY is not subscribed to.
        stats.ignored++;
      }
    } finally {
      if (this.#virtio.broken === null) {
        this.#postOne(work.token);
        this.#vq.kick();
      }
    }
  }

  /** Frees the event buffers (after the device reset). */
  free(): void {
    if (this.#count > 0) this.#platform.alloc.free(this.#base);
    this.#count = 0;
  }
}
