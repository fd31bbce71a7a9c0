/**
 * A test device type, "virtio-scsi-hotplug": virtio-scsi whose event-queue kicks bring an operator's
 * hotplug. Each time the driver rings the event queue's doorbell, the back-end first plugs a fresh
 * 64 KiB RAM disk at the next target (1, 2, …) — so that a test can make the device deliver an event
 * (and read the event ring) from the iothread, outside any request, at a moment it chooses. Run it
 * with `poll: false`, or every polled drain of the event queue would plug another disk.
 *
 * The module is both the device type (`deviceType`) and its back-end module (`createBackend`).
 *
 * @module
 */

import { RawNode } from "../../formats/raw.ts";
import type { CreateBackend, DeviceType } from "../../src/devices/device_type.ts";
import {
  createBackend as createScsiBackend,
  createModel,
  VirtioScsiBackend,
  virtioScsiOptionsSchema,
} from "../../src/devices/virtio_scsi.ts";
import { VIRTIO_SCSI_VQ_EVENT } from "../../src/virtio/virtio_scsi_constants.ts";
import { MemoryFile } from "../../src/host/memory.ts";

/** The back-end factory the iothread calls: virtio-scsi with a hotplug on each event-queue kick. */
export const createBackend: CreateBackend = (init) => {
  const ready = createScsiBackend(init);
  const backend = ready.backend;
  if (!(backend instanceof VirtioScsiBackend)) throw new TypeError("Not a virtio-scsi back-end");
  const process = backend.processQueue.bind(backend);
  let target = 1;
  backend.processQueue = async (queue, interrupt) => {
    if (queue === VIRTIO_SCSI_VQ_EVENT) {
      const node = await RawNode.open(new MemoryFile(`hotplug${target}`, new Uint8Array(65536)));
      backend.hotplug(target++, 0, node);
    }
    return process(queue, interrupt);
  };
  return ready;
};

/** The "virtio-scsi-hotplug" device type. */
export const deviceType: DeviceType = {
  name: "virtio-scsi-hotplug",
  backendModule: new URL(import.meta.url),
  drives: { min: 0, max: 256 },
  optionsSchema: virtioScsiOptionsSchema,
  createModel,
};
