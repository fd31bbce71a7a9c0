/**
 * Shared pieces of the qcow2 interop tests: the creation-option matrix (a deterministic pairwise
 * selection), the write workload with its byte model, a seeded PRNG, and wrappers around
 * `qemu-img check`/`compare` and vstor's CLI.
 *
 * @module
 */
import assert from "node:assert/strict";
import { main } from "../../src/cli/main.ts";
import { openImage } from "../../formats/open.ts";
import { runTool } from "./qemu.ts";

export const KiB = 1024;
export const MiB = 1024 * KiB;

// ---- the option matrix ----

/** One set of qcow2 creation options (qemu-img `-o` names in {@linkcode createOptions}). */
export interface Qcow2Config {
  clusterSize: number;
  refcountBits: number;
  compat: "0.10" | "1.1";
  extendedL2: boolean;
  compressionType: "zlib" | "zstd";
  preallocation: "off" | "metadata" | "falloc" | "full";
}

const DIMENSIONS = {
  clusterSize: [512, 4 * KiB, 64 * KiB, 2 * MiB],
  refcountBits: [1, 16, 64],
  compat: ["0.10", "1.1"],
  extendedL2: [false, true],
  compressionType: ["zlib", "zstd"],
  preallocation: ["off", "metadata", "falloc", "full"],
} as const;

type Dimension = keyof typeof DIMENSIONS;
const DIMENSION_NAMES = Object.keys(DIMENSIONS) as Dimension[];

/** Whether qemu-img accepts the combination (v2: refcount_bits 16, no extended L2, no zstd). */
export function isValidConfig(c: Qcow2Config): boolean {
  if (c.compat === "0.10") {
    if (c.refcountBits !== 16 || c.extendedL2 || c.compressionType === "zstd") return false;
  }
  return !c.extendedL2 || c.clusterSize >= 16 * KiB;
}

function configAt(choice: readonly number[]): Qcow2Config {
  const pick = <D extends Dimension>(d: D, i: number) =>
    DIMENSIONS[d][choice[i] ?? 0] as (typeof DIMENSIONS)[D][number];
  return {
    clusterSize: pick("clusterSize", 0),
    refcountBits: pick("refcountBits", 1),
    compat: pick("compat", 2),
    extendedL2: pick("extendedL2", 3),
    compressionType: pick("compressionType", 4),
    preallocation: pick("preallocation", 5),
  };
}

/**
 * A pairwise selection of valid configurations: every pair of values (of two dimensions) that some
 * valid configuration has appears in at least one selected configuration, and every value of every
 * dimension appears at least twice. Greedy and deterministic: the same list on every run.
 */
export function pairwiseConfigs(): Qcow2Config[] {
  const sizes = DIMENSION_NAMES.map((d) => DIMENSIONS[d].length);
  const all: number[][] = [];
  const walk = (prefix: number[]) => {
    if (prefix.length === sizes.length) {
      if (isValidConfig(configAt(prefix))) all.push(prefix);
      return;
    }
    for (let v = 0; v < (sizes[prefix.length] ?? 0); v++) walk([...prefix, v]);
  };
  walk([]);
  const pairsOf = (c: number[]) => {
    const keys: string[] = [];
    for (let i = 0; i < c.length; i++) {
      for (let j = i + 1; j < c.length; j++) keys.push(`${i}=${c[i]},${j}=${c[j]}`);
    }
    return keys;
  };
  const uncovered = new Set(all.flatMap(pairsOf));
  const chosen: number[][] = [];
  while (uncovered.size > 0) {
    let best = all[0]!, bestGain = -1;
    for (const c of all) {
      const gain = pairsOf(c).filter((p) => uncovered.has(p)).length;
      if (gain > bestGain) [best, bestGain] = [c, gain];
    }
    chosen.push(best);
    for (const p of pairsOf(best)) uncovered.delete(p);
  }
  // Top up so each value is exercised at least twice.
  const uses = (d: number, v: number) => chosen.filter((c) => c[d] === v).length;
  const scarce = (c: number[]) => c.filter((v, d) => uses(d, v) < 2).length;
  const load = (c: number[]) => c.reduce((sum, v, d) => sum + uses(d, v), 0);
  for (;;) {
    let best: number[] | undefined, bestGain = 0, bestLoad = Infinity;
    for (const c of all) {
      if (chosen.includes(c)) continue;
      // Most scarce values first; among those, the least used values elsewhere (balance).
      const gain = scarce(c), cost = load(c);
      if (gain > bestGain || (gain === bestGain && gain > 0 && cost < bestLoad)) {
        [best, bestGain, bestLoad] = [c, gain, cost];
      }
    }
    if (best === undefined) break;
    chosen.push(best);
  }
  return chosen.map(configAt);
}

/** The `-o` option list for qemu-img create / vstor create. */
export function createOptions(c: Qcow2Config): string {
  return [
    `cluster_size=${c.clusterSize}`,
    `refcount_bits=${c.refcountBits}`,
    `compat=${c.compat}`,
    `extended_l2=${c.extendedL2 ? "on" : "off"}`,
    `compression_type=${c.compressionType}`,
    `preallocation=${c.preallocation}`,
  ].join(",");
}

/** Image size used for a cluster size: big enough for the workload's 16 clusters. */
export function imageSizeFor(clusterSize: number): number {
  return Math.max(clusterSize === 512 ? 1 * MiB : 8 * MiB, 16 * clusterSize);
}

/** Bytes of guest data one L2 table maps. */
export function l2Span(clusterSize: number, extendedL2: boolean): number {
  return clusterSize * (clusterSize / (extendedL2 ? 16 : 8));
}

// ---- seeded randomness ----

import { mulberry32 as prng } from "../prng.ts";
export { prng };

/** `length` incompressible bytes from `seed`. */
export function randomBytes(seed: number, length: number): Uint8Array {
  const next = prng(seed);
  const out = new Uint8Array(length);
  for (let i = 0; i < length; i++) out[i] = Math.floor(next() * 256);
  return out;
}

// ---- the workload and its model ----

/** Where a write's bytes come from: a qemu-io `-P` pattern or seeded random bytes. */
export type Fill = { pattern: number } | { seed: number };

/** One guest operation, expressible both as a BlockNode call and as a qemu-io command. */
export type Op =
  | { op: "write"; offset: number; length: number; fill: Fill }
  | { op: "zero"; offset: number; length: number; unmap: boolean }
  | { op: "discard"; offset: number; length: number }
  | { op: "compress"; offset: number; length: number; fill: Fill }
  | { op: "flush" };

/** The bytes a write or compressed write stores. */
export function opData(op: { length: number; fill: Fill }): Uint8Array {
  return "pattern" in op.fill
    ? new Uint8Array(op.length).fill(op.fill.pattern)
    : randomBytes(op.fill.seed, op.length);
}

/** How the op reads in a log line or a test failure. */
export function describeOp(op: Op): string {
  if (op.op === "flush") return "flush";
  const fill = "fill" in op
    ? "pattern" in op.fill ? ` -P 0x${op.fill.pattern.toString(16)}` : ` random(${op.fill.seed})`
    : "";
  const unmap = op.op === "zero" && op.unmap ? " -u" : "";
  return `${op.op}${fill}${unmap} ${op.offset} ${op.length}`;
}

/**
 * What the guest reads after `op`, applied to `model` (the whole virtual disk). Discards zero only
 * the whole clusters they cover (the tail cluster counts when the range reaches the end): qcow2
 * ignores partial-cluster discards.
 */
export function applyToModel(model: Uint8Array, op: Op, clusterSize: number): void {
  switch (op.op) {
    case "write":
    case "compress":
      model.set(opData(op), op.offset);
      break;
    case "zero":
      model.fill(0, op.offset, op.offset + op.length);
      break;
    case "discard": {
      const start = Math.ceil(op.offset / clusterSize) * clusterSize;
      const end = op.offset + op.length === model.length
        ? model.length
        : Math.floor((op.offset + op.length) / clusterSize) * clusterSize;
      if (end > start) model.fill(0, start, end);
      break;
    }
    case "flush":
      break;
  }
}

/**
 * The fixed workload for a configuration: aligned and unaligned writes, writes across cluster and
 * L2-table boundaries, subcluster-sized writes, zero writes with and without unmap, whole- and
 * partial-cluster discards, compressed writes (compressible and random data) to clusters nothing
 * touched before, rewrites/zeroing/discard of compressed clusters, and a write ending at the end of
 * the image; then `scatter` seeded random writes, zero writes and discards over the whole image.
 */
export function workload(c: Qcow2Config, size: number, seed: number, scatter = 24): Op[] {
  const cs = c.clusterSize;
  const sc = c.extendedL2 ? cs / 32 : Math.max(16, cs / 32);
  const span = l2Span(cs, c.extendedL2);
  const ops: Op[] = [
    // Data clusters 0..9.
    { op: "write", offset: 0, length: 2 * cs, fill: { pattern: 0x11 } },
    {
      op: "write",
      offset: 2 * cs + 100,
      length: Math.min(1000, cs - 200),
      fill: { pattern: 0x22 },
    },
    { op: "write", offset: 4 * cs - 700, length: 1500, fill: { seed: seed + 1 } },
    { op: "write", offset: 5 * cs + 13, length: cs, fill: { seed: seed + 2 } },
    { op: "write", offset: 9 * cs + 3 * sc, length: sc, fill: { pattern: 0x33 } },
    { op: "write", offset: 9 * cs + 7 * sc + 5, length: 3 * sc, fill: { pattern: 0x34 } },
    { op: "flush" },
    // Compressed clusters 10..14: compressible, two in one request, random, all zeroes.
    { op: "compress", offset: 10 * cs, length: 2 * cs, fill: { pattern: 0x44 } },
    { op: "compress", offset: 12 * cs, length: cs, fill: { seed: seed + 3 } },
    { op: "compress", offset: 13 * cs, length: cs, fill: { pattern: 0 } },
    { op: "compress", offset: 14 * cs, length: cs, fill: { pattern: 0x45 } },
    // Zeroes: over data without and with unmap, partial and whole clusters, over nothing.
    { op: "zero", offset: 0, length: cs, unmap: false },
    { op: "zero", offset: cs + 100, length: Math.floor(cs / 2), unmap: false },
    { op: "zero", offset: 6 * cs, length: cs, unmap: true },
    { op: "zero", offset: 7 * cs - 300, length: 600, unmap: true },
    { op: "zero", offset: 8 * cs, length: cs, unmap: false },
    { op: "zero", offset: 9 * cs + 4 * sc, length: 2 * sc, unmap: true },
    { op: "zero", offset: 9 * cs + 8 * sc, length: sc, unmap: false },
    // Discards: a whole cluster, and a range with partial clusters at both ends.
    { op: "discard", offset: 3 * cs, length: cs },
    { op: "discard", offset: 4 * cs - 100, length: 2 * cs + 200 },
    { op: "flush" },
    // Compressed clusters rewritten: whole, partly (COW of decompressed data), zeroed, discarded.
    { op: "write", offset: 10 * cs, length: cs, fill: { pattern: 0x55 } },
    { op: "write", offset: 14 * cs + Math.floor(cs / 4), length: 100, fill: { pattern: 0x56 } },
    { op: "zero", offset: 11 * cs, length: cs, unmap: true },
    { op: "zero", offset: 12 * cs + 64, length: 128, unmap: false },
    { op: "discard", offset: 13 * cs, length: cs },
    // Zeroed and discarded clusters written again.
    { op: "write", offset: 3 * cs + 10, length: 50, fill: { pattern: 0x66 } },
    { op: "write", offset: 6 * cs, length: cs, fill: { pattern: 0x67 } },
    { op: "write", offset: 100, length: 200, fill: { pattern: 0x68 } },
    // The last bytes of the image.
    { op: "write", offset: size - 1000, length: 1000, fill: { pattern: 0x77 } },
  ];
  // Across L2 tables, where the image spans more than one.
  for (let boundary = span, n = 0; boundary < size && n < 3; boundary += span, n++) {
    const kinds: Op[] = [
      { op: "write", offset: boundary - 3000, length: 6000, fill: { seed: seed + 10 + n } },
      { op: "zero", offset: boundary - Math.floor(cs / 2), length: cs, unmap: n === 2 },
      { op: "discard", offset: boundary - cs, length: 2 * cs },
    ];
    ops.push(kinds[n]!);
    if (n === 0) ops.push(kinds[1]!, kinds[2]!);
  }
  // Seeded scatter over the whole image (no compressed writes: their targets must be untouched).
  const next = prng(seed);
  const int = (n: number) => Math.floor(next() * n);
  for (let i = 0; i < scatter; i++) {
    const length = 1 + int(3 * cs);
    const offset = int(size - length);
    const roll = next();
    if (roll < 0.6) {
      const fill: Fill = next() < 0.5 ? { pattern: 1 + int(255) } : { seed: seed * 31 + i };
      ops.push({ op: "write", offset, length, fill });
    } else if (roll < 0.85) {
      ops.push({ op: "zero", offset, length, unmap: next() < 0.5 });
    } else {
      ops.push({ op: "discard", offset, length });
    }
  }
  ops.push({ op: "flush" });
  return ops;
}

/**
 * The workload as qemu-io commands. Random fills become `-s FILE` sources written by `source`
 * (which returns the file's path).
 */
export async function qemuIoCommands(
  ops: Op[],
  source: (data: Uint8Array) => Promise<string>,
): Promise<string[]> {
  const commands: string[] = [];
  for (const op of ops) {
    if (op.op === "flush") {
      commands.push("flush");
      continue;
    }
    const range = `${op.offset} ${op.length}`;
    if (op.op === "zero") commands.push(`write -q -z${op.unmap ? " -u" : ""} ${range}`);
    else if (op.op === "discard") commands.push(`discard -q ${range}`);
    else {
      const fill = "pattern" in op.fill
        ? `-P ${op.fill.pattern}`
        : `-s ${await source(opData(op))}`;
      commands.push(`write -q${op.op === "compress" ? " -c" : ""} ${fill} ${range}`);
    }
  }
  return commands;
}

// ---- tools ----

/** Run `vstor ARGS...` in-process and capture its output. */
export async function vstor(...args: string[]): Promise<{ code: number; output: string }> {
  let output = "";
  const code = await main(args, { stdout: (s) => output += s, stderr: (s) => output += s });
  return { code, output };
}

/** Assert `qemu-img check` finds nothing wrong: exit 0, no errors, no leaks. */
export async function assertCheckClean(path: string, what = path): Promise<void> {
  const r = await runTool("qemu-img", ["check", "-f", "qcow2", path]);
  const text = r.stdout + r.stderr;
  assert.equal(r.code, 0, `qemu-img check on ${what} exited ${r.code}:\n${text}`);
  assert.match(text, /No errors were found on the image/, `qemu-img check on ${what}:\n${text}`);
  assert.doesNotMatch(text, /leak/i, `qemu-img check on ${what}:\n${text}`);
}

/** Assert `qemu-img compare` finds the two images' guest contents equal. */
export async function assertCompareEqual(
  a: string,
  aFormat: string,
  b: string,
  bFormat: string,
): Promise<void> {
  const r = await runTool("qemu-img", ["compare", "-f", aFormat, "-F", bFormat, a, b]);
  assert.equal(r.code, 0, `qemu-img compare ${a} ${b} exited ${r.code}:\n${r.stdout}${r.stderr}`);
}

/** Every guest byte of an image as vstor reads it, in one request and in odd-sized pieces. */
export async function readWithVstor(path: string, format = "qcow2"): Promise<Uint8Array> {
  const node = await openImage(path, { format, readOnly: true });
  try {
    const whole = new Uint8Array(node.size);
    await node.read(0, whole);
    // Unaligned pieces cross every cluster, subcluster and compressed-cluster boundary differently.
    const pieces = new Uint8Array(node.size);
    const step = 77_777;
    for (let at = 0; at < node.size; at += step) {
      await node.read(at, pieces.subarray(at, Math.min(node.size, at + step)));
    }
    assertSameBytes(pieces, whole, "piecewise read vs whole read");
    return whole;
  } finally {
    await node.close();
  }
}

/** Assert equal byte arrays, naming the first difference (not dumping megabytes). */
export function assertSameBytes(actual: Uint8Array, expected: Uint8Array, what: string): void {
  assert.equal(actual.length, expected.length, `${what}: lengths differ`);
  let at = -1;
  for (let i = 0; i < actual.length; i++) {
    if (actual[i] !== expected[i]) {
      at = i;
      break;
    }
  }
  if (at < 0) return;
  let end = at;
  while (end < actual.length && actual[end] !== expected[end]) end++;
  assert.fail(
    `${what}: bytes differ from offset ${at} (0x${at.toString(16)}) for ${end - at} bytes: ` +
      `got 0x${actual[at]!.toString(16)}, expected 0x${expected[at]!.toString(16)}`,
  );
}

/** Run `fn` with a fresh temporary directory, removed afterwards. */
export async function withTempDir<T>(prefix: string, fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = await Deno.makeTempDir({ prefix });
  try {
    return await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}
