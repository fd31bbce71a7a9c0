/**
 * Where every guest range of an image comes from, through its backing chain (qemu-img map):
 * the depth of the layer that holds it, whether it reads as zeroes, holds data, and where.
 *
 * @module
 */
import type { BlockNode } from "../src/block/node.ts";
import type { HostExtent } from "../src/host/host_file.ts";
import { Qcow2Node } from "./qcow2/qcow2.ts";
import { detectMetadataPreallocation } from "./qcow2/measure.ts";

const preallocated = new WeakMap<Qcow2Node, boolean>();

/**
 * What the host file holds under a run of data at `hostOffset` in `layer`, when QEMU would ask:
 * only for qcow2 images that look metadata-preallocated (its BDRV_BLOCK_RECURSE), whose data
 * clusters over holes in the file read as zeroes. Undefined when QEMU would not ask.
 */
export function hostStatusUnder(
  layer: BlockNode,
  hostOffset: number | undefined,
  length: number,
): HostExtent | undefined {
  if (!(layer instanceof Qcow2Node) || hostOffset === undefined) return undefined;
  let known = preallocated.get(layer);
  if (known === undefined) {
    known = detectMetadataPreallocation(layer);
    preallocated.set(layer, known);
  }
  return known ? layer.file.dataStatus(hostOffset, length) : undefined;
}

/** One run of the map, with qemu-img map's fields. */
export interface MapEntry {
  /** Guest offset where the run starts. */
  start: number;
  /** Bytes in the run. */
  length: number;
  /** 0 for the image itself, 1 for its backing file, … */
  depth: number;
  /** Allocated in the layer at `depth` (not inferred from the end of the chain). */
  present: boolean;
  /** The run reads as zeroes. */
  zero: boolean;
  /** The run has data in the layer at `depth` (qemu-img map's `data`). */
  data: boolean;
  /** Host offset in the layer's file, when the data maps 1:1 (not for compressed clusters). */
  offset?: number;
  /** The file of the layer at `depth`. */
  filename: string;
}

/** The map entry for the run at `pos` (at most `max` bytes), walking down the chain. */
export async function entryAt(top: BlockNode, pos: number, max: number): Promise<MapEntry> {
  let layer: BlockNode = top;
  let depth = 0;
  let length = max;
  for (;;) {
    const st = await layer.blockStatus(pos, length);
    length = Math.min(length, st.length);
    if (st.kind !== "unallocated" && st.kind !== "eof") {
      // Data over a hole in a metadata-preallocated image reads as zeroes (and is still data).
      const host = st.kind === "data" ? hostStatusUnder(layer, st.hostOffset, length) : undefined;
      if (host !== undefined) length = Math.min(length, host.length);
      const entry: MapEntry = {
        start: pos,
        length,
        depth,
        present: true,
        zero: st.kind === "zero" || st.readsZero === true || (host !== undefined && !host.data),
        data: st.kind === "data" || st.kind === "compressed",
        filename: layer.filename,
      };
      if (st.hostOffset !== undefined && st.kind !== "compressed") entry.offset = st.hostOffset;
      return entry;
    }
    const below = layer.backing;
    if (below === undefined || pos >= below.size) {
      // Unallocated at the bottom of the chain, or past the end of the backing file: zeroes.
      const entry: MapEntry = {
        start: pos,
        length,
        depth,
        present: false,
        zero: true,
        data: false,
        filename: layer.filename,
      };
      // Unallocated subclusters of an allocated cluster keep their host offset (as QEMU reports).
      if (below === undefined && st.hostOffset !== undefined) entry.offset = st.hostOffset;
      return entry;
    }
    length = Math.min(length, below.size - pos);
    layer = below;
    depth++;
  }
}

function mergeable(a: MapEntry, b: MapEntry): boolean {
  if (a.start + a.length !== b.start) return false;
  if (a.depth !== b.depth || a.present !== b.present || a.zero !== b.zero || a.data !== b.data) {
    return false;
  }
  if (a.filename !== b.filename) return false;
  if ((a.offset === undefined) !== (b.offset === undefined)) return false;
  return a.offset === undefined || a.offset + a.length === b.offset;
}

/**
 * Map `[start, start+length)` of `top` (its backing chain attached), merging runs as qemu-img does.
 *
 * @example
 * ```ts
 * import { MemoryFile } from "../src/host/memory.ts";
 * import { mapImage } from "./map.ts";
 * import { createQcow2 } from "./qcow2/create.ts";
 * import { Qcow2Node } from "./qcow2/qcow2.ts";
 *
 * const file = new MemoryFile("disk.qcow2");
 * await createQcow2(file, 1 << 20);
 * const node = await Qcow2Node.open(file);
 * await node.write(65536, new Uint8Array(65536).fill(1));
 * const map = await mapImage(node);
 * const data = map.filter((e) => e.data);
 * if (data.length !== 1 || data[0]!.start !== 65536 || data[0]!.length !== 65536) {
 *   throw new Error("one data run");
 * }
 * await node.close();
 * ```
 */
export async function mapImage(
  top: BlockNode,
  start = 0,
  length = top.size - start,
): Promise<MapEntry[]> {
  const end = Math.min(top.size, start + Math.max(0, length));
  const entries: MapEntry[] = [];
  if (start >= top.size) {
    return [{
      start,
      length: 0,
      depth: 0,
      present: false,
      zero: false,
      data: false,
      filename: top.filename,
    }];
  }
  for (let pos = start; pos < end;) {
    const e = await entryAt(top, pos, end - pos);
    const last = entries[entries.length - 1];
    if (last !== undefined && mergeable(last, e)) last.length += e.length;
    else entries.push(e);
    pos += e.length;
  }
  return entries;
}
