/**
 * qemu-img measure: the bytes a new image of a given format needs to hold a source image (its
 * whole backing chain, as the guest sees it) or an empty image of a given size.
 *
 * @module
 */
import type { BlockNode } from "../src/block/node.ts";
import { BlockError } from "../src/errors.ts";
import { Qcow2Node } from "./qcow2/qcow2.ts";
import { hostStatusUnder } from "./map.ts";
import {
  bitmapsSize,
  type MeasureInfo,
  measureQcow2,
  persistentBitmaps,
  type Qcow2MeasureOptions,
  type Qcow2MeasureSource,
  resolveQcow2MeasureOptions,
} from "./qcow2/measure.ts";

export type { MeasureInfo };

/** Target options of a measure; raw uses only `size`. */
export type MeasureOptions = Qcow2MeasureOptions;

/** The image to measure. */
export interface MeasureSource {
  /** The top of the source chain (backing nodes attached). */
  node: BlockNode;
  /**
   * Guest bytes to measure (default `node.size`); rounded up to whole sectors, as QEMU's
   * `bdrv_getlength`. Pass the size from before loading an internal snapshot: QEMU keeps it.
   */
  size?: number;
}

/**
 * An internal snapshot to measure, as qemu-img measure -l names it: `{ key }` is an ID, else a
 * name; `{ id, name }` (snapshot.id=, snapshot.name=) matches only what it gives.
 */
export type MeasureSnapshot = { key: string } | { id?: string; name?: string };

/**
 * Show an internal snapshot of `node` instead of its active state, as QEMU's
 * bdrv_snapshot_load_tmp does for qemu-img measure -l.
 *
 * @throws {BlockError} `unsupported` for a format without internal snapshots, `not-found` when no
 *   snapshot matches
 * @example
 * ```ts
 * import { loadMeasureSnapshot } from "./measure.ts";
 * import { RawNode } from "./raw.ts";
 * import { MemoryFile } from "../src/host/memory.ts";
 * const node = await RawNode.open(new MemoryFile("m", new Uint8Array(512)));
 * let refused = false;
 * try {
 *   loadMeasureSnapshot(node, { key: "1" });
 * } catch {
 *   refused = true;
 * }
 * if (!refused) throw new Error("raw has no snapshots");
 * ```
 */
export function loadMeasureSnapshot(node: BlockNode, spec: MeasureSnapshot): void {
  if (!(node instanceof Qcow2Node)) {
    throw new BlockError(
      "unsupported",
      `Failed to load snapshot: Block format '${node.format}' does not support temporarily loading internal snapshots`,
      { path: node.filename },
    );
  }
  const entries = node.snapshots.entries;
  const entry = "key" in spec
    ? entries.find((e) => e.id === spec.key) ?? entries.find((e) => e.name === spec.key)
    : spec.id === undefined && spec.name === undefined
    ? undefined
    : entries.find((e) =>
      (spec.id === undefined || e.id === spec.id) &&
      (spec.name === undefined || e.name === spec.name)
    );
  if (entry === undefined) {
    throw new BlockError("not-found", "Failed to load snapshot: Can't find snapshot", {
      path: node.filename,
    });
  }
  node.loadSnapshotForReading(entry.id);
}

/** Target formats vstor can measure. */
export const MEASURE_FORMATS: readonly string[] = ["raw", "qcow2"];

const SECTOR = 512;

function sectorSize(source: MeasureSource): number {
  return Math.ceil((source.size ?? source.node.size) / SECTOR) * SECTOR;
}

/**
 * Check the target options without measuring: bad values and sizes too large for the format.
 *
 * @throws {BlockError} `invalid-argument` with QEMU's message, `unsupported` for an unknown target
 *   format or a feature vstor cannot size
 */
export function checkMeasureOptions(format: string, opts: MeasureOptions): void {
  if (format === "qcow2") resolveQcow2MeasureOptions(opts);
  else if (format !== "raw") {
    throw new BlockError(
      "unsupported",
      `Block driver '${format}' does not support size measurement`,
    );
  }
}

/**
 * Whether the guest bytes at `pos` (at most `max` of them) read as data somewhere in the chain
 * under `top`, and for how many bytes — QEMU's `bdrv_block_status_above` with zero detection:
 * zero clusters, holes, ranges unallocated down the whole chain or past the end of a shorter
 * backing file read as zeroes, and so do qcow2 data clusters over holes in the host file when
 * the image looks metadata-preallocated (QEMU asks the host file only then). Compressed clusters
 * are data.
 */
export async function dataAt(
  top: BlockNode,
  pos: number,
  max: number,
): Promise<{ data: boolean; length: number }> {
  let layer = top;
  let length = max;
  for (;;) {
    // Past the layer's end (the top after loading a smaller snapshot) the layer holds nothing.
    const st = pos < layer.size
      ? await layer.blockStatus(pos, Math.min(length, layer.size - pos))
      : { kind: "unallocated" as const, length };
    if (st.kind !== "eof") length = Math.min(length, st.length);
    switch (st.kind) {
      case "zero":
        return { data: false, length };
      case "compressed":
        return { data: true, length };
      case "data": {
        const host = hostStatusUnder(layer, st.hostOffset, length);
        return host === undefined
          ? { data: true, length }
          : { data: host.data, length: Math.min(length, host.length) };
      }
      case "eof":
      case "unallocated": {
        const below = layer.backing;
        if (below === undefined || pos >= below.size) return { data: false, length };
        length = Math.min(length, below.size - pos);
        layer = below;
      }
    }
  }
}

/**
 * Bytes of the `clusterSize`-sized target clusters holding any data of the first `size` guest
 * bytes of the chain under `top`, as `qcow2_measure` counts them.
 */
export async function dataClusterBytes(
  top: BlockNode,
  size: number,
  clusterSize: number,
): Promise<bigint> {
  let required = 0;
  for (let offset = 0; offset < size;) {
    const st = await dataAt(top, offset, size - offset);
    let length = st.length;
    if (st.data) {
      // The rest of the cluster goes with the data: the next run starts on a cluster boundary.
      length = Math.ceil((offset + length) / clusterSize) * clusterSize - offset;
      required += offset % clusterSize + length;
    }
    offset += length;
  }
  return BigInt(required);
}

/**
 * Measure a new image of `format` for `source`, or for an empty image of `opts.size` bytes.
 *
 * @throws {BlockError} as {@linkcode checkMeasureOptions}; I/O errors of the source
 * @example
 * ```ts
 * import { measureImage } from "./measure.ts";
 * const info = await measureImage("raw", { size: 1000n });
 * if (info.required !== 1024n || info.fullyAllocated !== 1024n) throw new Error("mismatch");
 * ```
 */
export async function measureImage(
  format: string,
  opts: MeasureOptions,
  source?: MeasureSource,
): Promise<MeasureInfo> {
  checkMeasureOptions(format, opts);
  if (format === "raw") {
    // Unallocated sectors take room in a raw file too: required is everything.
    const required = source === undefined
      ? ((opts.size ?? 0n) + BigInt(SECTOR - 1)) / BigInt(SECTOR) * BigInt(SECTOR)
      : BigInt(sectorSize(source));
    return { required, fullyAllocated: required };
  }
  const params = resolveQcow2MeasureOptions(opts);
  if (source === undefined) return await measureQcow2(params);
  const size = sectorSize(source);
  const node = source.node;
  const qsource: Qcow2MeasureSource = {
    size: BigInt(size),
    dataBytes: (clusterSize) => dataClusterBytes(node, size, clusterSize),
  };
  // QEMU's qcow2 stores persistent bitmaps from v3 on; other source formats cannot.
  if (node instanceof Qcow2Node && node.header.version >= 3) {
    const bitmaps = persistentBitmaps(node);
    qsource.bitmapsSize = (clusterSize) => bitmapsSize(bitmaps, BigInt(size), clusterSize);
  }
  return await measureQcow2(params, qsource);
}
