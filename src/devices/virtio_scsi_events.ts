/**
 * virtio-scsi's event queue on the iothread (queue 1): the driver's event buffers wait there until
 * the device has something to tell — TRANSPORT_RESET for hotplug and unplug, PARAM_CHANGE for a
 * capacity change (virtio 1.2 §5.6.6.3). An event with no buffer posted is dropped and remembered:
 * the next one delivered carries EVENTS_MISSED, as QEMU's `virtio_scsi_push_event` does.
 *
 * @module
 */

import type { DeviceQueue } from "../virtio/queue.ts";
import {
  VIRTIO_SCSI_EVENT_SIZE,
  VIRTIO_SCSI_T_EVENTS_MISSED,
  VIRTIO_SCSI_VQ_EVENT,
} from "../virtio/virtio_scsi_constants.ts";
import { scatter, VirtioScsiError, type VirtioScsiStats } from "./virtio_scsi_framing.ts";

/** The event delivery of a back-end: its scratch and the EVENTS_MISSED state. */
export class VirtioScsiEvents {
  /** An event was dropped for want of a buffer: flag the next one EVENTS_MISSED. */
  dropped = false;
  readonly #stats: VirtioScsiStats;
  readonly #event = new Uint8Array(VIRTIO_SCSI_EVENT_SIZE);
  readonly #eventView = new DataView(this.#event.buffer);

  /** `stats.events` and `stats.eventsDropped` count what happens. */
  constructor(stats: VirtioScsiStats) {
    this.#stats = stats;
  }

  /**
   * Delivers an event into the next buffer of `eq` and calls `interrupt` when the driver wants
   * to hear of it, or remembers that one was dropped.
   *
   * @param target -1 for an event without a LUN (NO_EVENT)
   * @throws {VirtioScsiError} for an event buffer too short to hold the event
   * @throws {VirtqueueError} when the driver broke the ring rules
   */
  deliver(
    eq: DeviceQueue | undefined,
    event: number,
    target: number,
    lun: number,
    reason: number,
    interrupt: () => void,
  ): void {
    const chain = eq?.pop() ?? null;
    if (eq === undefined || chain === null) {
      this.dropped = true;
      this.#stats.eventsDropped++;
      return;
    }
    if (chain.writableLength < VIRTIO_SCSI_EVENT_SIZE) {
      throw new VirtioScsiError(
        "short-event-buffer",
        VIRTIO_SCSI_VQ_EVENT,
        `event buffer of ${chain.writableLength} writable bytes`,
      );
    }
    if (this.dropped) {
      event |= VIRTIO_SCSI_T_EVENTS_MISSED;
      this.dropped = false;
    }
    const ev = this.#event;
    const view = this.#eventView;
    ev.fill(0);
    view.setUint32(0, event >>> 0, true);
    if (target >= 0) {
      // Linux wants the REPORT LUNS encoding: flat space only from LUN 256 (QEMU).
      ev[4] = 1;
      ev[5] = target;
      ev[6] = lun >= 256 ? 0x40 | (lun >>> 8) : 0;
      ev[7] = lun & 0xff;
    }
    view.setUint32(12, reason >>> 0, true);
    scatter(chain.writable, ev, ev.length);
    eq.push(chain, VIRTIO_SCSI_EVENT_SIZE);
    this.#stats.events++;
    if (eq.publish()) interrupt();
    // Nothing polls the event queue: ask for a kick when the driver posts past this buffer, as
    // QEMU's pop does (avail_event), so that a later drop is reported when buffers come back.
    eq.enableNotifications();
  }
}
