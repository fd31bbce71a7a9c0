/**
 * The case generator: a seeded random chain of raw/qcow2 layers and a random command list over it.
 * It keeps a rough model of the chain (sizes, backing links, snapshot names) so most commands are
 * meaningful, while some are deliberately out of range or invalid (both tools must refuse them).
 *
 * @module
 */
import { mulberry32 } from "../../prng.ts";
import type { Case, IoCmd, LayerSpec, Step } from "./case.ts";

const KiB = 1024;
const MiB = 1024 * KiB;

/** How big cases get. */
export interface GenerateOptions {
  /** Most layers in a chain (at least 1). */
  maxLayers: number;
  /** Most steps after the creates. */
  maxSteps: number;
  /** Most requests in one qemu-io session. */
  maxIoCmds: number;
}

export const DEFAULT_GENERATE: GenerateOptions = { maxLayers: 4, maxSteps: 14, maxIoCmds: 4 };

/** A small random toolkit over one seeded stream. */
export class Rand {
  #next: () => number;
  constructor(seed: number) {
    this.#next = mulberry32(seed);
  }
  /** A float in [0, 1). */
  float(): number {
    return this.#next();
  }
  /** An integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.#next() * n);
  }
  /** True with probability `p`. */
  chance(p: number): boolean {
    return this.#next() < p;
  }
  /** One of `items`, by `weights` (equal when omitted). */
  pick<T>(items: readonly T[], weights?: readonly number[]): T {
    if (weights === undefined) return items[this.int(items.length)]!;
    const total = weights.reduce((a, b) => a + b, 0);
    let roll = this.#next() * total;
    for (let i = 0; i < items.length; i++) {
      roll -= weights[i]!;
      if (roll < 0) return items[i]!;
    }
    return items[items.length - 1]!;
  }
}

const CLUSTER_SIZES = [512, 1 * KiB, 2 * KiB, 4 * KiB, 16 * KiB, 32 * KiB, 64 * KiB, 2 * MiB];
const CLUSTER_WEIGHTS = [4, 2, 1, 4, 2, 2, 3, 0.5];
const REFCOUNT_BITS = [1, 2, 4, 8, 16, 32, 64];

function randomLayer(r: Rand, index: number, below: LayerSpec | undefined): LayerSpec {
  const format = index === 0 && r.chance(0.3) ? "raw" : "qcow2";
  const compat = r.chance(0.25) ? "0.10" : "1.1";
  const v3 = compat === "1.1";
  let clusterSize = r.pick(CLUSTER_SIZES, CLUSTER_WEIGHTS);
  const extendedL2 = v3 && r.chance(0.3);
  // Extended L2 needs 16 KiB clusters or more (32 subclusters of at least 512 bytes).
  if (extendedL2 && clusterSize < 16 * KiB) clusterSize = r.pick([16 * KiB, 32 * KiB, 64 * KiB]);
  // Sizes: mostly a handful of clusters to a few hundred; sometimes the size of the layer below,
  // sometimes unaligned to the cluster (a multiple of 512, as qemu-img rounds up anyway).
  const unit = 512;
  let size: number;
  if (below !== undefined && r.chance(0.4)) size = below.size;
  else {
    const clusters = r.pick([1, 2, 3, 5, 8, 16, 40, 100], [1, 1, 2, 2, 3, 3, 2, 1]);
    const base = Math.min(clusters * clusterSize, clusterSize >= 2 * MiB ? 6 * MiB : 4 * MiB);
    size = Math.max(unit, base + (r.chance(0.3) ? unit * (1 + r.int(7)) : 0));
    if (r.chance(0.15)) size = Math.max(unit, size - unit * (1 + r.int(3)));
  }
  // qemu-img refuses preallocation with a backing file unless extended L2 is on; mostly obey.
  let preallocation = r.pick(["off", "metadata", "falloc", "full"] as const, [12, 3, 1, 1]);
  if (index > 0 && !extendedL2 && r.chance(0.9)) preallocation = "off";
  return {
    format,
    size,
    compat,
    clusterSize,
    extendedL2,
    refcountBits: v3 && r.chance(0.5) ? r.pick(REFCOUNT_BITS) : 16,
    lazyRefcounts: v3 && r.chance(0.2),
    preallocation,
    compressionType: v3 && r.chance(0.15) ? "zstd" : "zlib",
  };
}

/** Rough state of the chain as the generator expects it to be. */
interface Model {
  sizes: number[];
  backing: (number | null)[];
  snapshots: string[][];
  nextSnapshot: number;
}

function randomRange(r: Rand, size: number, grain: number): { offset: number; length: number } {
  if (size <= 0) return { offset: 0, length: 512 };
  const align = r.pick([grain, grain / 2, 512, 1], [4, 1, 2, 1]);
  const a = Math.max(1, Math.floor(align));
  const slots = Math.max(1, Math.floor(size / a));
  const offset = r.int(slots) * a;
  const lengthUnits = r.pick([1, 1, 2, 3, 8, slots], [3, 2, 2, 2, 1, 0.5]);
  let length = lengthUnits * a;
  if (r.chance(0.1)) length += 1 + r.int(a);
  // Mostly inside the image; now and then across its end (both tools must refuse).
  if (offset + length > size && !r.chance(0.1)) length = Math.max(1, size - offset);
  return { offset, length };
}

function randomIo(r: Rand, layer: LayerSpec, size: number): IoCmd {
  const grain = layer.format === "raw"
    ? 4 * KiB
    : layer.extendedL2 && r.chance(0.5)
    ? layer.clusterSize / 32
    : layer.clusterSize;
  const op = r.pick(["write", "zero", "discard", "compress"] as const, [5, 3, 2, 2]);
  if (op === "compress") {
    // Compressed writes need whole clusters (the last one may end at the end of the image).
    const cs = layer.format === "raw" ? 64 * KiB : layer.clusterSize;
    const clusters = Math.max(1, Math.ceil(size / cs));
    const first = r.int(clusters);
    const count = 1 + (r.chance(0.3) ? r.int(3) : 0);
    let length = Math.min(count * cs, size - first * cs);
    if (r.chance(0.1)) length = Math.max(512, length - 512);
    return { op, offset: first * cs, length: Math.max(512, length), pattern: 1 + r.int(255) };
  }
  const { offset, length } = randomRange(r, size, grain);
  if (op === "write") return { op, offset, length, pattern: 1 + r.int(255) };
  if (op === "zero") return { op, offset, length, unmap: r.chance(0.5) };
  return { op, offset, length };
}

function randomStep(r: Rand, c: Case, m: Model, opts: GenerateOptions): Step {
  const n = c.layers.length;
  // Mostly the top layer; sometimes one below.
  const layer = r.chance(0.7) ? n - 1 : r.int(n);
  const spec = c.layers[layer]!;
  const kind = r.pick(
    ["io", "resize", "snapshot", "commit", "rebase"] as const,
    [10, 2, 2, n > 1 ? 1.5 : 0.2, n > 1 ? 1.5 : 0.2],
  );
  switch (kind) {
    case "io": {
      const count = 1 + r.int(opts.maxIoCmds);
      const cmds: IoCmd[] = [];
      for (let i = 0; i < count; i++) cmds.push(randomIo(r, spec, m.sizes[layer]!));
      return { kind, layer, cmds };
    }
    case "resize": {
      const old = m.sizes[layer]!;
      const grain = r.pick([512, spec.clusterSize], [2, 1]);
      const delta = grain * (1 + r.int(r.chance(0.5) ? 4 : 64));
      const grow = r.chance(0.55);
      const size = grow ? old + delta : Math.max(512, old - delta);
      // Shrinking without --shrink now and then (refused by both for qcow2, warned for raw).
      const shrink = !grow && !r.chance(0.1);
      if (grow || shrink) m.sizes[layer] = size;
      return { kind, layer, size, shrink };
    }
    case "snapshot": {
      const names = m.snapshots[layer]!;
      const op = names.length === 0 || r.chance(0.45)
        ? "create"
        : r.pick(["apply", "delete"] as const);
      if (op === "create") {
        const name = `s${m.nextSnapshot++}`;
        names.push(name);
        return { kind, layer, op, name };
      }
      const name = r.chance(0.9) ? r.pick(names) : "nosuch";
      if (op === "delete") m.snapshots[layer] = names.filter((x) => x !== name);
      return { kind, layer, op, name };
    }
    case "commit": {
      const top = layer === 0 ? n - 1 : layer;
      // A deeper base: one of the layers below the immediate backing file.
      const below = m.backing[top] ?? null;
      const deeper = below !== null ? m.backing[below] ?? null : null;
      const base = deeper !== null && r.chance(0.3) ? deeper : null;
      return { kind, layer: top, base, drop: r.chance(0.3) };
    }
    case "rebase": {
      const top = layer === 0 ? n - 1 : layer;
      // Only layers below: a chain looping back on itself hangs qemu-img compare (QEMU's own
      // `rebase -u` does not refuse a loop).
      const backing = top === 0 || r.chance(0.15) ? null : r.int(top);
      m.backing[top] = backing;
      return { kind, layer: top, backing, unsafe: r.chance(0.35) };
    }
  }
}

/** A random case from `seed`. */
export function generateCase(seed: number, opts: GenerateOptions = DEFAULT_GENERATE): Case {
  const r = new Rand(seed);
  const layerCount = 1 + r.int(opts.maxLayers);
  const layers: LayerSpec[] = [];
  for (let i = 0; i < layerCount; i++) layers.push(randomLayer(r, i, layers[i - 1]));
  const c: Case = { layers, steps: [] };
  const m: Model = {
    sizes: layers.map((l) => l.size),
    backing: layers.map((_, i) => (i === 0 ? null : i - 1)),
    snapshots: layers.map(() => []),
    nextSnapshot: 1,
  };
  const steps = 1 + r.int(opts.maxSteps);
  for (let i = 0; i < steps; i++) c.steps.push(randomStep(r, c, m, opts));
  return c;
}

/** The seed of case `index` of a run with `seed`: distinct, reproducible streams. */
export function caseSeed(seed: number, index: number): number {
  return (Math.imul(seed >>> 0, 0x9e3779b1) ^ Math.imul(index + 1, 0x85ebca6b)) >>> 0;
}
