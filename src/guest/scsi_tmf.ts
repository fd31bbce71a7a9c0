/**
 * Task management for the guest's virtio-scsi driver: the control queue (virtqueue 0) with one
 * TMF request in guest RAM, and LOGICAL UNIT RESET — what Linux's `eh_device_reset_handler` sends
 * (virtio 1.2 §5.6.6.2).
 *
 * @module
 */

import {
  VIRTIO_SCSI_T_TMF,
  VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET,
  VIRTIO_SCSI_TMF_REQ_SIZE,
  VIRTIO_SCSI_TMF_RESP_SIZE,
} from "../virtio/virtio_scsi_constants.ts";
import { COMPLETED, FREE, IN_DEVICE } from "./queue_target.ts";
import { writeLun } from "./scsi_commands.ts";
import type { GuestPlatform, VirtioQueue } from "./virtio_driver.ts";

/** The control queue and its one TMF slot. */
export class ScsiControlQueue {
  readonly #platform: GuestPlatform;
  readonly #ram: DataView;
  readonly #vq: VirtioQueue;
  #at = 0;
  #state = FREE;
  #tag = 0;

  /** `vq` is virtqueue 0; {@linkcode alloc} gives the TMF its guest RAM. */
  constructor(platform: GuestPlatform, vq: VirtioQueue) {
    this.#platform = platform;
    this.#ram = new DataView(platform.mem.buffer);
    this.#vq = vq;
  }

  /**
   * Allocates the TMF request and response in guest RAM.
   *
   * @throws {GuestAllocError} when guest RAM runs out
   */
  alloc(): void {
    this.#at = this.#platform.alloc.alloc(VIRTIO_SCSI_TMF_REQ_SIZE + 8, 16);
  }

  /**
   * The interrupt handler: takes the TMF's completion, calling `completed` for it.
   *
   * @throws {RangeError} when the device completes a request that is not in flight
   */
  harvest(completed: () => void): void {
    const ring = this.#vq.ring;
    do {
      ring.disableInterrupts();
      for (let used = ring.getUsed(); used !== null; used = ring.getUsed()) {
        if (used.token !== 0 || this.#state !== IN_DEVICE) {
          throw new RangeError(`Device completed control request ${used.token}, not in flight`);
        }
        this.#state = COMPLETED;
        completed();
      }
    } while (ring.enableInterrupts());
  }

  /**
   * Sends LOGICAL UNIT RESET for `target`:`lun` and waits through `waitFor` (the driver's idle
   * loop with its timeout) until the device answers. One at a time: the caller serializes.
   *
   * @returns the TMF response code (0, FUNCTION COMPLETE, on success)
   */
  async resetLun(
    target: number,
    lun: number,
    waitFor: (done: () => boolean) => Promise<void>,
  ): Promise<number> {
    const mem = this.#platform.mem;
    const ram = this.#ram;
    const at = mem.translate(this.#at, VIRTIO_SCSI_TMF_REQ_SIZE + 1);
    ram.setUint32(at, VIRTIO_SCSI_T_TMF, true);
    ram.setUint32(at + 4, VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, true);
    writeLun(ram, at + 8, target, lun);
    ram.setUint32(at + 16, ++this.#tag, true);
    ram.setUint32(at + 20, 0, true);
    const respAt = at + VIRTIO_SCSI_TMF_REQ_SIZE;
    ram.setUint8(respAt, 0xff);
    const vq = this.#vq;
    const added = vq.ring.add(
      [{ addr: this.#at, length: VIRTIO_SCSI_TMF_REQ_SIZE }],
      [{ addr: this.#at + VIRTIO_SCSI_TMF_REQ_SIZE, length: VIRTIO_SCSI_TMF_RESP_SIZE }],
      0,
    );
    if (!added) throw new Error("The control queue has no room for a TMF");
    this.#state = IN_DEVICE;
    vq.kick();
    await waitFor(() => this.#state === COMPLETED);
    this.#state = FREE;
    return ram.getUint8(respAt);
  }

  /** Frees the TMF's guest RAM (after the device reset). */
  free(): void {
    if (this.#at !== 0) this.#platform.alloc.free(this.#at);
    this.#at = 0;
  }
}
