/**
 * What qemu-img info reports about one image (QEMU's ImageInfo, `bdrv_query_image_info`): virtual
 * and actual size, format, cluster size, backing file, snapshots, dirty flag and the qcow2
 * format-specific data (compat, compression type, lazy refcounts, persistent bitmaps, refcount
 * width, corrupt and extended-L2 bits), as the JSON object `qemu-img info --output=json` prints,
 * fields in its order. `vstor info` and qemu-io's `info` print from it.
 *
 * @module
 */
import type { BlockNode } from "../src/block/node.ts";
import { resolveBacking } from "./open.ts";
import { canonicalNbdName, isNbdUri, parseNbdUri } from "../src/host/nbd.ts";
import { isRbdName, qemuRbdFilename } from "../src/host/rbd.ts";
import { RawNode } from "./raw.ts";
import { Qcow2Node } from "./qcow2/qcow2.ts";
import {
  COMPAT_LAZY_REFCOUNTS,
  COMPRESSION_ZSTD,
  hasFeature,
  INCOMPAT_CORRUPT,
  INCOMPAT_DIRTY,
  INCOMPAT_EXTL2,
} from "./qcow2/header.ts";
import { listedNames, type SnapshotEntry } from "./qcow2/snapshot.ts";
import {
  BME_FLAG_AUTO,
  BME_FLAG_IN_USE,
  parseBitmapsExtension,
  readBitmapDirectory,
} from "./qcow2/bitmap_format.ts";

/** qemu-img's JSON snapshot object. */
export function snapshotJson(e: SnapshotEntry): Record<string, unknown> {
  const ev = new DataView(e.extra.buffer, e.extra.byteOffset, e.extra.byteLength);
  const icount = e.extra.length >= 24 ? ev.getBigUint64(16) : 0xffffffffffffffffn;
  const vmSize = e.extra.length >= 8 ? Number(ev.getBigUint64(0)) : e.vmStateSize;
  const out: Record<string, unknown> = {};
  if (icount !== 0xffffffffffffffffn) out["icount"] = Number(icount);
  out["vm-clock-nsec"] = Number(e.vmClockNsec % 1_000_000_000n);
  out["name"] = listedNames(e).name;
  out["date-sec"] = e.dateSec;
  out["date-nsec"] = e.dateNsec;
  out["vm-clock-sec"] = Number(e.vmClockNsec / 1_000_000_000n);
  out["id"] = listedNames(e).id;
  out["vm-state-size"] = Math.max(vmSize, e.vmStateSize);
  return out;
}

/** The information qemu-img info shows for one image (this image only, not its chain). */
export function imageInfo(node: BlockNode, filename: string): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  const q = node instanceof Qcow2Node ? node : undefined;
  if (q && q.snapshots.entries.length > 0) out["snapshots"] = q.snapshots.entries.map(snapshotJson);
  // A raw image on a host with its own snapshots (RBD) lists them as QEMU's rbd driver does.
  const hostSnaps = node instanceof RawNode ? node.hostSnapshots?.list() ?? [] : [];
  if (hostSnaps.length > 0) {
    out["snapshots"] = hostSnaps.map((s) => ({
      "icount": 0,
      "vm-clock-nsec": 0,
      "name": s.name,
      "date-sec": 0,
      "date-nsec": 0,
      "vm-clock-sec": 0,
      "id": s.name,
      "vm-state-size": s.size,
    }));
  }
  const backing = node.backingName;
  if (backing?.format !== undefined) out["backing-filename-format"] = backing.format;
  out["virtual-size"] = node.size;
  // An NBD node's name as QEMU rebuilds it, whatever form was given.
  out["filename"] = isNbdUri(filename)
    ? canonicalNbdName(parseNbdUri(filename))
    : isRbdName(filename)
    ? qemuRbdFilename(filename)
    : filename;
  if (q) out["cluster-size"] = q.clusterSize;
  else if (node instanceof RawNode && node.hostClusterSize !== undefined) {
    out["cluster-size"] = node.hostClusterSize;
  }
  out["format"] = node.format;
  // Unknown for a file on a server (NBD): qemu-img leaves the key out.
  const actual = node.allocatedSize?.() ?? 0;
  if (actual >= 0) out["actual-size"] = actual;
  if (q) {
    const h = q.header;
    const data: Record<string, unknown> = {
      compat: h.version === 3 ? "1.1" : "0.10",
      "compression-type": h.compressionType === COMPRESSION_ZSTD ? "zstd" : "zlib",
    };
    if (h.version === 3) {
      data["lazy-refcounts"] = hasFeature(h.compatibleFeatures, COMPAT_LAZY_REFCOUNTS);
    }
    const bitmaps = bitmapInfo(q);
    if (bitmaps !== undefined) data["bitmaps"] = bitmaps;
    data["refcount-bits"] = 1 << h.refcountOrder;
    if (h.version === 3) {
      data["corrupt"] = hasFeature(h.incompatibleFeatures, INCOMPAT_CORRUPT);
      data["extended-l2"] = hasFeature(h.incompatibleFeatures, INCOMPAT_EXTL2);
    }
    out["format-specific"] = { type: "qcow2", data };
  }
  if (backing !== undefined) {
    try {
      out["full-backing-filename"] = resolveBacking(filename, backing.file);
    } catch {
      // A relative name under an NBD export: there is no full name to give.
    }
    out["backing-filename"] = backing.file;
  }
  // Raw over a host without its own info (NBD): qemu-img has no dirty flag to show.
  if (q || !isNbdUri(filename)) {
    out["dirty-flag"] = q ? hasFeature(q.header.incompatibleFeatures, INCOMPAT_DIRTY) : false;
  }
  return out;
}

/** qemu-img info's `bitmaps` list for a qcow2 image: the directory as it is on disk. */
export function bitmapInfo(node: Qcow2Node): Array<Record<string, unknown>> | undefined {
  const { ext } = parseBitmapsExtension(node.header, node.filename);
  if (ext === undefined) return undefined;
  const entries = readBitmapDirectory(node.file, ext, node.clusterSize, node.size, node.filename);
  return entries.map((e) => ({
    flags: [
      ...((e.flags & BME_FLAG_IN_USE) ? ["in-use"] : []),
      ...((e.flags & BME_FLAG_AUTO) ? ["auto"] : []),
    ],
    name: e.name,
    granularity: 2 ** e.granularityBits,
  }));
}
