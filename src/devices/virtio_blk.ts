/**
 * virtio-blk (virtio 1.2 §5.2): the device type the machine plugs in, and one import point for both
 * halves — the VMM-side {@linkcode VirtioBlkModel} and the iothread's {@linkcode VirtioBlkBackend}.
 *
 * Files: `../virtio/virtio_blk_constants.ts` (spec names, shared with the guest's driver),
 * `virtio_blk_options.ts` (options, offered features, shared state), `virtio_blk_model.ts` (config
 * space, cache-mode rules), `virtio_blk_backend.ts` (requests, merging; `createBackend`, the module
 * the iothread imports).
 *
 * @module
 */

import { z } from "zod";
import type { DeviceInfo, DeviceSpec, DeviceType } from "./device_type.ts";
import type { VirtioBlkBackendInfo } from "./virtio_blk_backend.ts";
import { BDRV_REQUEST_MAX_SECTORS, VIRTIO_BLK_ID_BYTES } from "../virtio/virtio_blk_constants.ts";
import { VirtioBlkModel } from "./virtio_blk_model.ts";
import {
  resolveVirtioBlkOptions,
  VIRTIO_BLK_MAX_SEGMENTS,
  type VirtioBlkOptions,
  virtioBlkOptionsFromSpec,
  VirtioBlkShared,
} from "./virtio_blk_options.ts";

export * from "./virtio_blk_backend.ts";
export * from "./virtio_blk_model.ts";
export * from "./virtio_blk_options.ts";

const u32 = z.number().int().min(0).max(0xffff_ffff);
const sectors = z.number().int().min(1).max(BDRV_REQUEST_MAX_SECTORS);
const segments = z.number().int().min(1).max(VIRTIO_BLK_MAX_SEGMENTS);

/**
 * The device options of a configured virtio-blk (`devices[].options`): everything but the queue,
 * ring, read-only and cache settings, which come from the device and its drive. Cross-field rules
 * (block sizes, I/O sizes) are checked by `resolveVirtioBlkOptions`, whose message becomes the issue.
 */
export const virtioBlkOptionsSchema = z.strictObject({
  serial: z.string().max(VIRTIO_BLK_ID_BYTES).optional(),
  discard: z.boolean().optional(),
  writeZeroes: z.boolean().optional(),
  configWce: z.boolean().optional(),
  logicalBlockSize: u32.optional(),
  physicalBlockSize: u32.optional(),
  minIoSize: u32.optional(),
  optIoSize: u32.optional(),
  segMax: u32.min(1).optional(),
  sizeMax: u32.optional(),
  maxDiscardSectors: sectors.optional(),
  maxDiscardSeg: segments.optional(),
  maxWriteZeroesSectors: sectors.optional(),
  maxWriteZeroesSeg: segments.optional(),
  requestMerging: z.boolean().optional(),
  maxMergeBytes: z.number().int().min(512).max(BDRV_REQUEST_MAX_SECTORS * 512).optional(),
}).superRefine((options, ctx) => {
  try {
    resolveVirtioBlkOptions(options as VirtioBlkOptions);
  } catch (e) {
    ctx.addIssue({ code: "custom", message: e instanceof Error ? e.message : String(e) });
  }
});

/**
 * Builds the model on the VMM thread once the iothread is up: options from the spec, size and
 * read-only from the opened drive, and the shared state `createBackend` returned.
 *
 * @throws {RangeError} when the device has no drive or the back-end sent no shared state
 */
export function createModel(spec: DeviceSpec, info: DeviceInfo): VirtioBlkModel {
  const drive = info.drives[0];
  if (drive === undefined) throw new RangeError(`virtio-blk ${spec.id} has no drive`);
  const backend = info.backend as Partial<VirtioBlkBackendInfo> | null;
  if (!(backend?.shared instanceof SharedArrayBuffer)) {
    throw new RangeError(`virtio-blk ${spec.id}: the back-end sent no shared state`);
  }
  return new VirtioBlkModel(
    virtioBlkOptionsFromSpec(spec),
    { size: drive.size, readOnly: drive.readOnly },
    new VirtioBlkShared(backend.shared),
  );
}

/**
 * The "virtio-blk" device type: one drive; the iothread imports `virtio_blk_backend.ts`
 * (`createBackend`), the VMM calls {@linkcode createModel}.
 */
export const deviceType: DeviceType = {
  name: "virtio-blk",
  backendModule: new URL("./virtio_blk_backend.ts", import.meta.url),
  drives: { min: 1, max: 1 },
  optionsSchema: virtioBlkOptionsSchema,
  createModel,
};
