/**
 * Where every guest range of an image comes from, through its backing chain (qemu-img map):
 * the depth of the layer that holds it, whether it reads as zeroes, holds data, and where.
 *
 * @module
 */
import type { BlockNode } from "../src/block/node.ts";

/** One run of the map, with qemu-img map's fields. */
export interface MapEntry {
  start: number;
  length: number;
  /** 0 for the image itself, 1 for its backing file, … */
  depth: number;
  /** Allocated in the layer at `depth` (not inferred from the end of the chain). */
  present: boolean;
  zero: boolean;
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
      const entry: MapEntry = {
        start: pos,
        length,
        depth,
        present: true,
        zero: st.kind === "zero",
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
