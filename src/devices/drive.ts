/**
 * Opening a device's drives in its iothread: the image (and its backing chain) through the format
 * registry.
 *
 * @module
 */

import type { BlockNode } from "../block/node.ts";
import { openImage } from "../../formats/open.ts";
import type { DriveInfo, DriveSpec } from "./device_type.ts";

/**
 * Opens `spec` as a block node (probing the format when not given). `cache=unsafe` reaches the
 * format (no metadata flushes) and `none`/`directsync` the host file (O_DIRECT); whether the write
 * cache is on is the device's business, since the
 * guest may switch it (virtio-blk CONFIG_WCE, the SCSI WCE bit): the device reads `cache` from
 * the spec and adds FUA or flushes itself.
 *
 * @throws {BlockError} as `openImage` does: `not-found`, `busy`, `invalid-format`, …
 */
export async function openDrive(spec: DriveSpec): Promise<BlockNode> {
  return await openImage(spec.file, {
    readOnly: spec.readOnly,
    // O_DIRECT and no-flush reach the host file and the format; the write cache is the device's.
    cache: spec.cache === "unsafe"
      ? "unsafe"
      : spec.cache === "none" || spec.cache === "directsync"
      ? "none"
      : "writeback",
    ...(spec.format === undefined ? {} : { format: spec.format }),
    // QEMU's aio=native is Linux AIO; vstor's kernel interface for it is io_uring.
    ...(spec.aio === undefined ? {} : { aio: spec.aio === "native" ? "io_uring" : spec.aio }),
  });
}

/** What the model needs to know of an opened drive. */
export function driveInfo(spec: DriveSpec, node: BlockNode): DriveInfo {
  return {
    file: spec.file,
    format: node.format,
    size: node.size,
    readOnly: node.readOnly,
    requestAlignment: node.requestAlignment,
    cache: spec.cache,
  };
}
