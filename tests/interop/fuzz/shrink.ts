/**
 * The shrinker: delta debugging (ddmin) over a failing case's command list, then over the requests
 * of each qemu-io session, then dropping layers and resetting layer options to qemu-img's defaults,
 * keeping every change after which the case still diverges with the same signature.
 *
 * @module
 */
import { type Case, DEFAULT_QCOW2, type LayerSpec, type Step } from "./case.ts";
import { type Divergence, runCase } from "./run.ts";

/** Limits on how long shrinking may take. */
export interface ShrinkOptions {
  /** Most case runs (default 400). */
  maxRuns?: number;
  /** Wall-clock budget in milliseconds (default 120 s). */
  maxMillis?: number;
  /** Called after each run that kept a smaller case. */
  onProgress?: (c: Case) => void;
}

/** A smaller case with the same divergence, and how many runs it took. */
export interface Shrunk {
  case: Case;
  divergence: Divergence;
  runs: number;
}

/**
 * Classic ddmin: the smallest sublist (1-minimal when the budget allows) for which `fails` holds.
 * `fails(items)` must hold for the input.
 */
export async function ddmin<T>(
  items: T[],
  fails: (candidate: T[]) => Promise<boolean>,
): Promise<T[]> {
  let n = 2;
  while (items.length >= 2) {
    const chunk = Math.ceil(items.length / n);
    let reduced = false;
    for (let start = 0; start < items.length; start += chunk) {
      const complement = [...items.slice(0, start), ...items.slice(start + chunk)];
      if (await fails(complement)) {
        items = complement;
        n = Math.max(n - 1, 2);
        reduced = true;
        break;
      }
    }
    if (!reduced) {
      if (n >= items.length) break;
      n = Math.min(items.length, 2 * n);
    }
  }
  if (items.length === 1 && await fails([])) return [];
  return items;
}

/** `c` without layer `k`: the layer above backs onto the one below; steps naming `k` go. */
export function withoutLayer(c: Case, k: number): Case {
  const map = (i: number) => (i > k ? i - 1 : i);
  const steps: Step[] = [];
  for (const s of c.steps) {
    if (s.layer === k) continue;
    if (s.kind === "commit" && s.base === k) continue;
    if (s.kind === "rebase" && s.backing === k) continue;
    const moved = { ...s, layer: map(s.layer) } as Step;
    if (moved.kind === "commit" && moved.base !== null) moved.base = map(moved.base);
    if (moved.kind === "rebase" && moved.backing !== null) moved.backing = map(moved.backing);
    steps.push(moved);
  }
  return { layers: c.layers.filter((_, i) => i !== k), steps };
}

/** Simpler versions of a layer, one option back to its default at a time. */
function simplerLayers(l: LayerSpec): LayerSpec[] {
  if (l.format === "raw") return [];
  const out: LayerSpec[] = [];
  const d = DEFAULT_QCOW2;
  if (l.preallocation !== d.preallocation) out.push({ ...l, preallocation: d.preallocation });
  if (l.lazyRefcounts) out.push({ ...l, lazyRefcounts: false });
  if (l.compressionType !== d.compressionType) out.push({ ...l, compressionType: "zlib" });
  if (l.refcountBits !== d.refcountBits) out.push({ ...l, refcountBits: d.refcountBits });
  if (l.extendedL2) out.push({ ...l, extendedL2: false });
  if (l.compat !== d.compat) out.push({ ...l, compat: d.compat });
  return out;
}

/** Shrink `c`, which diverges as `d`, to a small case that diverges the same way. */
export async function shrink(c: Case, d: Divergence, opts: ShrinkOptions = {}): Promise<Shrunk> {
  const maxRuns = opts.maxRuns ?? 400;
  const deadline = Date.now() + (opts.maxMillis ?? 120_000);
  let runs = 0;
  let best: Shrunk = { case: c, divergence: d, runs: 0 };
  const fails = async (candidate: Case): Promise<boolean> => {
    if (runs >= maxRuns || Date.now() > deadline) return false;
    runs++;
    const r = await runCase(candidate);
    if (r.divergence?.signature !== d.signature) return false;
    best = { case: candidate, divergence: r.divergence, runs };
    opts.onProgress?.(candidate);
    return true;
  };

  const shrinkSteps = async () => {
    const layers = best.case.layers;
    await ddmin(best.case.steps, (steps) => fails({ layers, steps }));
  };
  await shrinkSteps();

  // Layers: drop one at a time, the top first (lower indices keep their meaning longer).
  for (let k = best.case.layers.length - 1; k >= 0 && best.case.layers.length > 1; k--) {
    if (k < best.case.layers.length) await fails(withoutLayer(best.case, k));
  }

  // Requests inside each qemu-io session.
  for (let i = 0; i < best.case.steps.length; i++) {
    const s = best.case.steps[i];
    if (s?.kind !== "io" || s.cmds.length < 2) continue;
    await ddmin(s.cmds, async (cmds) => {
      if (cmds.length === 0) return false;
      const steps = best.case.steps.map((x, j) => (j === i ? { ...s, cmds } : x));
      return await fails({ layers: best.case.layers, steps });
    });
  }

  // Layer options back to their defaults, one at a time, until none can go.
  for (let changed = true; changed;) {
    changed = false;
    for (let k = 0; k < best.case.layers.length; k++) {
      for (const simpler of simplerLayers(best.case.layers[k]!)) {
        const layers = best.case.layers.map((l, j) => (j === k ? simpler : l));
        if (await fails({ layers, steps: best.case.steps })) {
          changed = true;
          break;
        }
      }
    }
  }
  await shrinkSteps();
  return { ...best, runs };
}

/**
 * The shape of a (shrunk) case for deduplication: the divergence's signature, the layers'
 * formats and non-default options (no sizes), and the steps' kinds and flags (no offsets).
 */
export function shape(c: Case, d: Divergence): string {
  const layers = c.layers.map((l) => {
    if (l.format === "raw") return "raw";
    const o: string[] = [];
    if (l.compat === "0.10") o.push("v2");
    if (l.extendedL2) o.push("el2");
    if (l.refcountBits !== 16) o.push(l.refcountBits === 1 ? "rc1" : "rcN");
    if (l.lazyRefcounts) o.push("lazy");
    if (l.preallocation !== "off") o.push(l.preallocation);
    if (l.compressionType !== "zlib") o.push("zstd");
    return `qcow2${o.length > 0 ? `(${o.join(",")})` : ""}`;
  });
  const steps = c.steps.map((s) => {
    switch (s.kind) {
      case "io":
        return `io[${
          s.cmds.map((x) => x.op === "zero" && x.unmap ? "zero-u" : x.op).join(",")
        }]@${s.layer}`;
      case "resize":
        return `resize${s.shrink ? "-shrink" : ""}@${s.layer}`;
      case "snapshot":
        return `snapshot-${s.op}@${s.layer}`;
      case "commit":
        return `commit${s.drop ? "-d" : ""}${s.base === null ? "" : "-b"}@${s.layer}`;
      case "rebase":
        return `rebase${s.unsafe ? "-u" : ""}${s.backing === null ? "-none" : ""}@${s.layer}`;
    }
  });
  return `${d.signature} | ${layers.join(" <- ")} | ${steps.join(" ")}`;
}
