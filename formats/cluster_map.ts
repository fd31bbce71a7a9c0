/**
 * A cluster-by-cluster picture of an image, for `vstor map --html`: where every guest cluster's
 * data lives through the backing chain (this layer, a backing layer by depth, zero, unallocated,
 * compressed), how fragmented the top layer's data is on the host, and — for qcow2 — what every
 * cluster of the top image's host file holds (see {@linkcode qcow2HostMap}). Large images are
 * summed into at most `maxCells` cells, each with its count of clusters per class.
 *
 * @module
 */
import type { BlockNode } from "../src/block/node.ts";
import { type MapEntry, mapImage } from "./map.ts";
import { Qcow2Node } from "./qcow2/qcow2.ts";
import { HOST_CLASSES, type HostClass, qcow2HostMap } from "./qcow2/host_map.ts";

/** The guest classes every image has; `backing-N` (data of the layer at depth N) follow them. */
export const BASE_GUEST_CLASSES = ["data", "zero", "unallocated", "compressed"] as const;

/** The cluster size a raw top image is mapped with (qcow2's default). */
export const RAW_MAP_CLUSTER_SIZE = 65536;

/** Cells a view is summed into at most, unless the caller says otherwise. */
export const DEFAULT_MAX_CELLS = 16384;

/**
 * What a guest range is, from an entry of the chain's map: `unallocated` (nothing in the chain:
 * zeroes), `zero` (reads as zeroes from the layer that has it), `data` (this layer's, 1:1 on its
 * host file), `compressed` (this layer's, compressed), `backing-N` (data of the layer at depth N).
 *
 * @example
 * ```ts
 * import { guestClassOf } from "./cluster_map.ts";
 * const e = { start: 0, length: 512, depth: 2, present: true, zero: false, data: true, filename: "b" };
 * if (guestClassOf(e) !== "backing-2") throw new Error("guestClassOf");
 * ```
 */
export function guestClassOf(e: Omit<MapEntry, "filename">): string {
  if (!e.present) return "unallocated";
  if (e.zero) return "zero";
  if (e.depth > 0) return `backing-${e.depth}`;
  return e.offset === undefined ? "compressed" : "data";
}

/** Clusters summed into cells: `counts[cell * classes + class]` clusters of each class per cell. */
export interface CellGrid {
  /** Clusters per cell (the last cell may hold fewer). */
  unit: number;
  /** Clusters in all. */
  units: number;
  /** Number of cells. */
  cells: number;
  /** Classes per cell. */
  classes: number;
  /** Clusters of each class per cell: `counts[cell * classes + class]`. */
  counts: Uint32Array;
}

/**
 * A grid of `units` clusters and `classes` classes, in at most `maxCells` cells of equal size.
 *
 * @throws {RangeError} for a negative count or fewer than one cell
 */
export function newCellGrid(units: number, classes: number, maxCells: number): CellGrid {
  if (units < 0 || classes < 1 || maxCells < 1) {
    throw new RangeError("A cell grid needs clusters ≥ 0, classes ≥ 1 and cells ≥ 1");
  }
  const unit = Math.max(1, Math.ceil(units / maxCells));
  const cells = Math.ceil(units / unit);
  return { unit, units, cells, classes, counts: new Uint32Array(cells * classes) };
}

/** Count `count` clusters from cluster `first` as class `cls`. */
export function addToCells(grid: CellGrid, first: number, count: number, cls: number): void {
  let cluster = first, left = count;
  while (left > 0) {
    const cell = Math.floor(cluster / grid.unit);
    const n = Math.min(left, (cell + 1) * grid.unit - cluster);
    grid.counts[cell * grid.classes + cls]! += n;
    cluster += n;
    left -= n;
  }
}

/** The class most clusters of `cell` have (the first such class on a tie). */
export function majorityOf(grid: CellGrid, cell: number): number {
  let best = 0, most = -1;
  for (let c = 0; c < grid.classes; c++) {
    const n = grid.counts[cell * grid.classes + c]!;
    if (n > most) [best, most] = [c, n];
  }
  return best;
}

/** The first cluster of `cell` and how many it holds. */
export function cellRange(grid: CellGrid, cell: number): { first: number; count: number } {
  const first = cell * grid.unit;
  return { first, count: Math.min(grid.unit, grid.units - first) };
}

/** One layer of the chain, top first. */
export interface LayerInfo {
  /** 0 for the image itself, 1 for its backing file, … */
  depth: number;
  /** The layer's file. */
  filename: string;
  /** The layer's format (`raw`, `qcow2`). */
  format: string;
  /** Virtual size in bytes. */
  size: number;
  /** The layer's cluster size, for formats that have one. */
  clusterSize?: number;
}

/**
 * How scattered the top layer's data is on its host file: of the guest-adjacent pairs of data
 * clusters, how many are not adjacent on the host, and into how many host runs the data falls.
 */
export interface Fragmentation {
  /** Guest clusters whose data is in the top layer, 1:1 on its host file. */
  dataClusters: number;
  /** Pairs of guest-consecutive such clusters. */
  adjacentPairs: number;
  /** Of those, the pairs whose host clusters are not consecutive. */
  discontiguousPairs: number;
  /** Runs of data clusters consecutive both in the guest and on the host. */
  hostRuns: number;
}

/** The guest view: every cluster of the virtual disk by class. */
export interface GuestClusterMap {
  /** Bytes per cluster (the top layer's cluster size; 64 KiB for raw). */
  clusterSize: number;
  /** Virtual size in bytes. */
  size: number;
  /** Clusters of the virtual disk. */
  clusters: number;
  /** The chain, top first. */
  layers: LayerInfo[];
  /** Class names: {@linkcode BASE_GUEST_CLASSES}, then `backing-1` … `backing-N`. */
  classes: string[];
  /** Clusters per class (a cluster split between classes counts as the one with most bytes). */
  counts: number[];
  /** The clusters summed into cells, for drawing. */
  cells: CellGrid;
  /** How scattered the top layer's data is on its host file. */
  fragmentation: Fragmentation;
}

/** The host view of a qcow2 top image: every cluster of its file by {@linkcode HOST_CLASSES}. */
export interface HostView {
  /** The image file. */
  filename: string;
  /** The image's cluster size in bytes. */
  clusterSize: number;
  /** Bytes of the file. */
  fileSize: number;
  /** Clusters of the file (the last one may be partial). */
  clusters: number;
  /** Class names, in the order of the cells' class index. */
  classes: readonly HostClass[];
  /** Host clusters per class. */
  counts: Record<HostClass, number>;
  /** The host clusters summed into cells, for drawing. */
  cells: CellGrid;
  /** Host clusters met under two roles (corruption). */
  conflicts: number;
  /** Corruptions met while walking the structures. */
  corruptions: number;
}

/** Both views of an image. `host` is there for qcow2 (a raw file is the guest disk itself). */
export interface ImageClusterMap {
  /** The guest view: every cluster of the virtual disk by class. */
  guest: GuestClusterMap;
  /** The host view (qcow2 only). */
  host?: HostView;
}

/** Options of {@linkcode imageClusterMap}. */
export interface ClusterMapOptions {
  /** Cells per view at most (default {@linkcode DEFAULT_MAX_CELLS}). */
  maxCells?: number;
}

function layersOf(top: BlockNode): LayerInfo[] {
  const layers: LayerInfo[] = [];
  for (let node: BlockNode | undefined = top, depth = 0; node; node = node.backing, depth++) {
    const info: LayerInfo = {
      depth,
      filename: node.filename,
      format: node.format,
      size: node.size,
    };
    if (node instanceof Qcow2Node) info.clusterSize = node.clusterSize;
    layers.push(info);
  }
  return layers;
}

/** Counts the clusters of a run of map entries, each cluster as the class with most of its bytes. */
class ClusterTally {
  readonly counts: number[];
  readonly #cs: number;
  readonly #size: number;
  readonly #grid: CellGrid;
  /** Bytes per class of the cluster being filled (when runs split it). */
  readonly #partial: Float64Array;
  #partialCluster = -1;

  constructor(classes: number, clusterSize: number, size: number, grid: CellGrid) {
    this.counts = new Array<number>(classes).fill(0);
    this.#cs = clusterSize;
    this.#size = size;
    this.#grid = grid;
    this.#partial = new Float64Array(classes);
  }

  #clusterEnd(cluster: number): number {
    return Math.min((cluster + 1) * this.#cs, this.#size);
  }

  #count(first: number, n: number, cls: number): void {
    this.counts[cls]! += n;
    addToCells(this.#grid, first, n, cls);
  }

  add(start: number, length: number, cls: number): void {
    const end = start + length;
    let pos = start;
    while (pos < end) {
      const cluster = Math.floor(pos / this.#cs);
      const clusterEnd = this.#clusterEnd(cluster);
      if (pos === cluster * this.#cs && end >= clusterEnd) {
        // Whole clusters: as many as the run covers.
        const whole = end >= this.#size
          ? Math.ceil(this.#size / this.#cs) - cluster
          : Math.floor((end - pos) / this.#cs);
        this.#count(cluster, whole, cls);
        pos = this.#clusterEnd(cluster + whole - 1);
        continue;
      }
      const upTo = Math.min(end, clusterEnd);
      this.#partialCluster = cluster;
      this.#partial[cls]! += upTo - pos;
      pos = upTo;
      if (pos === clusterEnd) this.#settle();
    }
  }

  /** The split cluster goes to its class with most bytes. */
  #settle(): void {
    let best = 0;
    for (let c = 1; c < this.#partial.length; c++) {
      if (this.#partial[c]! > this.#partial[best]!) best = c;
    }
    this.#count(this.#partialCluster, 1, best);
    this.#partial.fill(0);
    this.#partialCluster = -1;
  }
}

function fragmentationOf(entries: MapEntry[], cs: number): Fragmentation {
  const f: Fragmentation = {
    dataClusters: 0,
    adjacentPairs: 0,
    discontiguousPairs: 0,
    hostRuns: 0,
  };
  let prev: { lastCluster: number; hostEnd: number } | undefined;
  for (const e of entries) {
    if (guestClassOf(e) !== "data" || e.offset === undefined || e.length === 0) continue;
    const firstCluster = Math.floor(e.start / cs);
    const lastCluster = Math.floor((e.start + e.length - 1) / cs);
    // A cluster shared with the previous run (split by subclusters) counts once.
    const shared = prev !== undefined && prev.lastCluster === firstCluster;
    const n = lastCluster - firstCluster + 1 - (shared ? 1 : 0);
    f.dataClusters += n;
    f.adjacentPairs += Math.max(0, n - 1);
    // Runs join when their clusters follow each other in the guest and on the host (or share
    // a guest cluster and its host cluster).
    let joined = false;
    if (prev !== undefined && n > 0 && prev.lastCluster === firstCluster - 1) {
      f.adjacentPairs++;
      joined = Math.floor(e.offset / cs) === Math.floor((prev.hostEnd - 1) / cs) + 1;
      if (!joined) f.discontiguousPairs++;
    } else if (shared) {
      joined = Math.floor(e.offset / cs) === Math.floor((prev!.hostEnd - 1) / cs);
    }
    if (!joined) f.hostRuns++;
    prev = { lastCluster, hostEnd: e.offset + e.length };
  }
  return f;
}

/**
 * Map `top` (its backing chain attached) cluster by cluster: the guest view through the chain,
 * and for a qcow2 top image the host view of its file.
 *
 * @example
 * ```ts
 * import { createImage, openImage } from "./open.ts";
 * import { imageClusterMap } from "./cluster_map.ts";
 * const path = Deno.makeTempFileSync({ suffix: ".qcow2" });
 * await createImage(path, "qcow2", 4 << 20);
 * const node = await openImage(path);
 * await node.write(0, new Uint8Array(131072).fill(7));
 * const map = await imageClusterMap(node);
 * await node.close();
 * Deno.removeSync(path);
 * const data = map.guest.counts[map.guest.classes.indexOf("data")];
 * if (data !== 2 || map.guest.clusters !== 64 || map.host?.counts.data !== 2) {
 *   throw new Error("cluster map");
 * }
 * ```
 */
export async function imageClusterMap(
  top: BlockNode,
  opts: ClusterMapOptions = {},
): Promise<ImageClusterMap> {
  const maxCells = opts.maxCells ?? DEFAULT_MAX_CELLS;
  const layers = layersOf(top);
  const cs = top instanceof Qcow2Node ? top.clusterSize : RAW_MAP_CLUSTER_SIZE;
  const classes: string[] = [...BASE_GUEST_CLASSES];
  for (let depth = 1; depth < layers.length; depth++) classes.push(`backing-${depth}`);
  const clusters = Math.ceil(top.size / cs);
  const cells = newCellGrid(clusters, classes.length, maxCells);
  const tally = new ClusterTally(classes.length, cs, top.size, cells);
  const entries = top.size === 0 ? [] : await mapImage(top);
  for (const e of entries) tally.add(e.start, e.length, classes.indexOf(guestClassOf(e)));
  const guest: GuestClusterMap = {
    clusterSize: cs,
    size: top.size,
    clusters,
    layers,
    classes,
    counts: tally.counts,
    cells,
    fragmentation: fragmentationOf(entries, cs),
  };
  if (!(top instanceof Qcow2Node)) return { guest };
  const hostMap = qcow2HostMap(top);
  const hostCells = newCellGrid(hostMap.clusters, HOST_CLASSES.length, maxCells);
  for (let cluster = 0; cluster < hostMap.clusters;) {
    const code = hostMap.classes[cluster]!;
    let end = cluster + 1;
    while (end < hostMap.clusters && hostMap.classes[end] === code) end++;
    addToCells(hostCells, cluster, end - cluster, code);
    cluster = end;
  }
  return {
    guest,
    host: {
      filename: top.filename,
      clusterSize: hostMap.clusterSize,
      fileSize: hostMap.fileSize,
      clusters: hostMap.clusters,
      classes: HOST_CLASSES,
      counts: hostMap.counts,
      cells: hostCells,
      conflicts: hostMap.conflicts,
      corruptions: hostMap.corruptions,
    },
  };
}
