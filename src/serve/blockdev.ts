/**
 * From `--blockdev` nodes to what vstor's opener takes: the image path, its format and the open
 * options (cache mode from cache.direct/cache.no-flush, aio, read-only, backing). An export's node
 * is a format node over a file node (or a file node served raw); the opener then opens the image
 * and, unless `backing=null`, the backing chain it records.
 *
 * @module
 */
import type { CacheMode, OpenOptions } from "../../formats/open.ts";
import { type BlockdevSpec, ServeUsageError } from "./options.ts";

/** What opening an export's node takes. */
export interface NodeOpen {
  readonly path: string;
  readonly options: OpenOptions;
}

/** QEMU's cache flags as vstor's cache mode (writethrough comes from the device's WCE). */
function cacheMode(file: BlockdevSpec): CacheMode {
  if (file.cacheDirect) return "none";
  if (file.cacheNoFlush) return "unsafe";
  return "writeback";
}

/**
 * The open of node `name` for an export (`writable` on or off).
 *
 * @throws {ServeUsageError} for a node that does not exist, a backing given by node name (vstor
 *   opens the chain the image records, or none with backing=null), or a read-only node exported
 *   writable
 */
export function resolveNode(
  blockdevs: readonly BlockdevSpec[],
  name: string,
  writable: boolean,
): NodeOpen {
  const byName = new Map<string, BlockdevSpec>();
  const index = (b: BlockdevSpec) => {
    byName.set(b.nodeName, b);
    if (typeof b.file === "object") index(b.file);
  };
  blockdevs.forEach(index);
  const node = byName.get(name);
  if (node === undefined) throw new ServeUsageError(`no node named '${name}'`);
  let file: BlockdevSpec;
  if (node.driver === "file" || node.driver === "nbd" || node.driver === "rbd") {
    file = node;
  } else {
    const ref = node.file!;
    const found = typeof ref === "string" ? byName.get(ref) : ref;
    if (found === undefined) throw new ServeUsageError(`node '${name}': no file node '${ref}'`);
    if (found.driver !== "file" && found.driver !== "nbd" && found.driver !== "rbd") {
      throw new ServeUsageError(
        `node '${name}': its file '${found.nodeName}' is a ${found.driver} node (a format over a ` +
          "format is not supported; give a driver=file node)",
      );
    }
    file = found;
  }
  if (typeof node.backing === "string") {
    throw new ServeUsageError(
      `node '${name}': backing='${node.backing}' by node name is not supported; vstor opens the ` +
        "backing chain the image records (or none with backing=null)",
    );
  }
  const readOnly = node.readOnly || file.readOnly;
  if (writable && readOnly) {
    throw new ServeUsageError(`node '${name}' is read-only but the export is writable=on`);
  }
  const options: OpenOptions = {
    readOnly: !writable,
    cache: cacheMode(file),
    ...(node.probe === true ? {} : {
      format: node.driver === "file" || node.driver === "nbd" || node.driver === "rbd"
        ? "raw"
        : node.driver,
    }),
    ...(file.aio === undefined ? {} : { aio: file.aio === "native" ? "io_uring" : file.aio }),
    ...(node.backing === null ? { noBacking: true } : {}),
    ...(file.reconnectDelay === undefined && file.openTimeout === undefined ? {} : {
      nbd: {
        ...(file.reconnectDelay === undefined ? {} : { reconnectDelay: file.reconnectDelay }),
        ...(file.openTimeout === undefined ? {} : { openTimeout: file.openTimeout }),
      },
    }),
  };
  return { path: file.filename!, options };
}
