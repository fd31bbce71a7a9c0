/**
 * The virtio-scsi device configuration (virtio 1.2 §5.6.4) as the guest's driver reads it, and the
 * checks on what the driver relies on: guest-side bounds on the device's numbers.
 *
 * @module
 */

import {
  VIRTIO_SCSI_CONFIG_CDB_SIZE,
  VIRTIO_SCSI_CONFIG_CMD_PER_LUN,
  VIRTIO_SCSI_CONFIG_EVENT_INFO_SIZE,
  VIRTIO_SCSI_CONFIG_MAX_CHANNEL,
  VIRTIO_SCSI_CONFIG_MAX_LUN,
  VIRTIO_SCSI_CONFIG_MAX_SECTORS,
  VIRTIO_SCSI_CONFIG_MAX_TARGET,
  VIRTIO_SCSI_CONFIG_NUM_QUEUES,
  VIRTIO_SCSI_CONFIG_SEG_MAX,
  VIRTIO_SCSI_CONFIG_SENSE_SIZE,
  VIRTIO_SCSI_MAX_LUN,
  VIRTIO_SCSI_MAX_TARGET,
} from "../virtio/virtio_scsi_constants.ts";
import { VirtioDriverError, type VirtioPciDriver } from "./virtio_driver.ts";

/** The device configuration (virtio 1.2 §5.6.4) as read after the driver wrote its sizes. */
export interface ScsiConfig {
  /** Request queues the device has. */
  readonly numQueues: number;
  /** Most data segments per command (0: no limit given). */
  readonly segMax: number;
  /** Largest transfer hint, 512-byte sectors. */
  readonly maxSectors: number;
  /** Most commands in flight per LUN the device wants. */
  readonly cmdPerLun: number;
  readonly eventInfoSize: number;
  /** Bytes of sense in each response, as the device reads it back. */
  readonly senseSize: number;
  /** Bytes of CDB in each request, as the device reads it back. */
  readonly cdbSize: number;
  readonly maxChannel: number;
  readonly maxTarget: number;
  readonly maxLun: number;
}

/**
 * Reads `struct virtio_scsi_config` under the config_generation loop and checks what the driver
 * relies on.
 *
 * @throws {VirtioDriverError} for a field past the DEVICE structure or an unusable value
 */
export function readScsiConfig(virtio: VirtioPciDriver): ScsiConfig {
  const raw = virtio.readConfig((c) => ({
    numQueues: c.u32(VIRTIO_SCSI_CONFIG_NUM_QUEUES),
    segMax: c.u32(VIRTIO_SCSI_CONFIG_SEG_MAX),
    maxSectors: c.u32(VIRTIO_SCSI_CONFIG_MAX_SECTORS),
    cmdPerLun: c.u32(VIRTIO_SCSI_CONFIG_CMD_PER_LUN),
    eventInfoSize: c.u32(VIRTIO_SCSI_CONFIG_EVENT_INFO_SIZE),
    senseSize: c.u32(VIRTIO_SCSI_CONFIG_SENSE_SIZE),
    cdbSize: c.u32(VIRTIO_SCSI_CONFIG_CDB_SIZE),
    maxChannel: c.u16(VIRTIO_SCSI_CONFIG_MAX_CHANNEL),
    maxTarget: c.u16(VIRTIO_SCSI_CONFIG_MAX_TARGET),
    maxLun: c.u32(VIRTIO_SCSI_CONFIG_MAX_LUN),
  }));
  const bad = (what: string): never => {
    throw new VirtioDriverError("status", virtio.slot, `virtio-scsi config: ${what}`);
  };
  if (raw.numQueues === 0) bad("num_queues is 0");
  // The request header carries 16-byte CDBs; a smaller cdb_size cannot hold READ(16).
  if (raw.cdbSize < 16 || raw.cdbSize > 255) bad(`cdb_size ${raw.cdbSize} is not 16..255`);
  // Sense beyond 4 KiB is nonsense and would make every slot huge.
  if (raw.senseSize > 4096) bad(`sense_size ${raw.senseSize} is above 4096`);
  return {
    ...raw,
    // Guest-controlled bounds for loops and addressing: clamp to what the LUN format can say.
    maxTarget: Math.min(raw.maxTarget, VIRTIO_SCSI_MAX_TARGET),
    maxLun: Math.min(raw.maxLun, VIRTIO_SCSI_MAX_LUN),
  };
}
