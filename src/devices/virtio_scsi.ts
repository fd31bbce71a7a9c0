/**
 * virtio-scsi (device id 8): the device type the machine plugs in — the options schema and the two
 * factories — and one import point for both halves, the VMM-side {@linkcode VirtioScsiModel} and
 * the iothread's {@linkcode VirtioScsiBackend}, after QEMU's `hw/scsi/virtio-scsi.c`. This module
 * is also the back-end module the iothread imports for {@linkcode createBackend}.
 *
 * Files: `virtio_scsi_shared.ts` (the config words both threads share), `virtio_scsi_model.ts`
 * (features, config space), `virtio_scsi_backend.ts` (the device's life, units and queue loop),
 * whose queue handlers are `virtio_scsi_request.ts` (commands), `virtio_scsi_control.ts` (task
 * management, AN) and `virtio_scsi_events.ts` (events), over `virtio_scsi_framing.ts` (framing
 * rules, LUN field, counters); the SCSI disks themselves are `../scsi/`'s.
 *
 * Across threads: the model lives in the VMM, the back-end in the device's iothread Worker. They
 * share one small `SharedArrayBuffer` ({@linkcode VirtioScsiSharedConfig}) holding the
 * driver-writable `sense_size` and `cdb_size` (and the address limits), so the back-end reads the
 * sizes the driver last wrote for every request, as QEMU does, without a message round trip.
 * `createBackend` makes it and returns its buffer as the back-end info; `createModel` wraps it:
 *
 * ```ts ignore
 * // iothread: createBackend({ spec, drives }) → { backend, info: { shared } }
 * backend.hooks = {
 *   interrupt: (q) => { if (irq.epoch === epoch) irq.notifyQueue(q); },
 *   needsReset: (e) => fault(epoch, 1, e),
 * };
 * // VMM: createModel(spec, { drives, backend: info }) → a model over the same words
 * ```
 *
 * @module
 */
import { DEFAULT_RERROR, DEFAULT_WERROR, errorDecision } from "./error_policy.ts";
import { z } from "zod";
import type { ScsiDiskOptions } from "../scsi/disk.ts";
import { VIRTIO_SCSI_MAX_LUN, VIRTIO_SCSI_MAX_TARGET } from "../virtio/virtio_scsi_constants.ts";
import type {
  BackendInit,
  BackendReady,
  DeviceInfo,
  DeviceSpec,
  DeviceType,
} from "./device_type.ts";
import { VirtioScsiBackend } from "./virtio_scsi_backend.ts";
import { VirtioScsiModel, type VirtioScsiOptions } from "./virtio_scsi_model.ts";
import { VirtioScsiSharedConfig } from "./virtio_scsi_shared.ts";

export * from "./virtio_scsi_backend.ts";
export {
  VirtioScsiError,
  type VirtioScsiFault,
  type VirtioScsiStats,
} from "./virtio_scsi_framing.ts";
export * from "./virtio_scsi_model.ts";
export * from "./virtio_scsi_shared.ts";

const u32 = z.number().int().min(0).max(0xffff_ffff);

/** Where one drive is plugged and how its disk looks (`devices[].options.luns[i]`). */
const lunSchema = z.strictObject({
  target: z.number().int().min(0).max(VIRTIO_SCSI_MAX_TARGET),
  lun: z.number().int().min(0).max(VIRTIO_SCSI_MAX_LUN),
  serial: z.string().max(255).optional(),
  blockSize: z.union([z.literal(512), z.literal(4096)]).optional(),
  discard: z.boolean().optional(),
  rotationRate: z.number().int().min(0).max(0xfffe).optional(),
});

/**
 * The device options of a configured virtio-scsi (`devices[].options`): the queue, ring and
 * read-only settings come from the device and its drives. `luns` places drive i (default:
 * target 0, LUN i); it must have one entry per drive when given.
 */
export const virtioScsiOptionsSchema = z.strictObject({
  hotplug: z.boolean().optional(),
  change: z.boolean().optional(),
  maxSectors: u32.optional(),
  cmdPerLun: u32.optional(),
  maxTarget: z.number().int().min(0).max(VIRTIO_SCSI_MAX_TARGET).optional(),
  maxLun: z.number().int().min(0).max(VIRTIO_SCSI_MAX_LUN).optional(),
  luns: z.array(lunSchema).optional(),
});

/** The validated `devices[].options` of a virtio-scsi. */
export type VirtioScsiDeviceOptions = z.infer<typeof virtioScsiOptionsSchema>;

function deviceOptions(spec: DeviceSpec): VirtioScsiDeviceOptions {
  const parsed = virtioScsiOptionsSchema.safeParse(spec.options);
  if (!parsed.success) {
    throw new RangeError(`virtio-scsi ${spec.id}: bad options: ${parsed.error.message}`);
  }
  return parsed.data;
}

/** What `createBackend` reports to the VMM, where `createModel` builds the model from it. */
export interface VirtioScsiBackendInfo {
  /** {@linkcode VirtioScsiSharedConfig}'s buffer: the model wraps the same words. */
  readonly shared: SharedArrayBuffer;
}

/**
 * The machine's back-end factory (`DeviceType.backendModule` is this module), run in the iothread:
 * a {@linkcode VirtioScsiBackend} with drive i plugged in as a disk at `options.luns[i]` (default
 * target 0, LUN i), read-only as its drive, WCE off for `cache: writethrough` or `directsync` (as
 * QEMU).
 *
 * The iothread should also set `backend.hooks` so that events delivered outside a kick
 * (capacity changes, run-time hotplug) raise the event queue's interrupt.
 *
 * @throws {RangeError} for bad options, or `luns` not matching the drives
 */
export function createBackend(init: BackendInit): BackendReady {
  const { spec, drives } = init;
  const options = deviceOptions(spec);
  if (options.luns !== undefined && options.luns.length !== drives.length) {
    throw new RangeError(
      `virtio-scsi ${spec.id}: ${options.luns.length} luns for ${drives.length} drives`,
    );
  }
  const limits: { maxTarget?: number; maxLun?: number } = {};
  if (options.maxTarget !== undefined) limits.maxTarget = options.maxTarget;
  if (options.maxLun !== undefined) limits.maxLun = options.maxLun;
  const shared = new VirtioScsiSharedConfig(undefined, limits);
  const backend = new VirtioScsiBackend({ shared });
  drives.forEach((node, i) => {
    const place = options.luns?.[i] ?? { target: 0, lun: i };
    const drive = spec.drives[i];
    const werror = drive?.werror ?? DEFAULT_WERROR;
    const rerror = drive?.rerror ?? DEFAULT_RERROR;
    const disk: ScsiDiskOptions = {
      readOnly: drive?.readOnly ?? node.readOnly,
      writeCache: drive?.cache !== "writethrough" && drive?.cache !== "directsync",
      // QEMU's scsi-disk honours the drive's werror/rerror as virtio-blk does.
      errorPolicy: (error, write) => errorDecision(write ? werror : rerror, error),
    };
    if (place.serial !== undefined) disk.serial = place.serial;
    if (place.blockSize !== undefined) disk.blockSize = place.blockSize;
    if (place.discard !== undefined) disk.discard = place.discard;
    if (place.rotationRate !== undefined) disk.rotationRate = place.rotationRate;
    backend.lend(place.target, place.lun, node, disk, drive?.id ?? `${spec.id}/${place.lun}`);
  });
  const info: VirtioScsiBackendInfo = { shared: shared.buffer };
  return { backend, info };
}

/**
 * Builds the model on the VMM thread once the iothread is up, sharing the back-end's config words.
 *
 * @throws {RangeError} when the back-end sent no shared config
 */
export function createModel(spec: DeviceSpec, info: DeviceInfo): VirtioScsiModel {
  const backend = info.backend as Partial<VirtioScsiBackendInfo> | null;
  if (!(backend?.shared instanceof SharedArrayBuffer)) {
    throw new RangeError(`virtio-scsi ${spec.id}: the back-end sent no shared config`);
  }
  const options = deviceOptions(spec);
  const model: VirtioScsiOptions = {
    numQueues: spec.numQueues,
    queueSize: spec.queueSize,
    indirectDesc: spec.indirect,
    eventIdx: spec.eventIdx,
    packed: spec.packed,
    shared: backend.shared,
  };
  if (options.hotplug !== undefined) model.hotplug = options.hotplug;
  if (options.change !== undefined) model.change = options.change;
  if (options.maxSectors !== undefined) model.maxSectors = options.maxSectors;
  if (options.cmdPerLun !== undefined) model.cmdPerLun = options.cmdPerLun;
  return new VirtioScsiModel(model);
}

/**
 * The "virtio-scsi" device type: 0 to 256 drives, each a disk LUN; the iothread imports this
 * module (`createBackend`), the VMM calls {@linkcode createModel}.
 */
export const deviceType: DeviceType = {
  name: "virtio-scsi",
  backendModule: new URL(import.meta.url),
  drives: { min: 0, max: 256 },
  optionsSchema: virtioScsiOptionsSchema,
  createModel,
};
