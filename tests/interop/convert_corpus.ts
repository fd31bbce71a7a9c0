/**
 * Sources for the convert interop tests, all made by qemu-img and qemu-io from a fixed seed, and
 * helpers around `qemu-img map --output=json`: parsing, QEMU's merging of adjacent entries, and a
 * readable diff of two maps.
 *
 * @module
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { runTool } from "./qemu.ts";
import {
  KiB,
  MiB,
  type Op,
  type Qcow2Config,
  qemuIoCommands,
  randomBytes,
  workload,
} from "./qcow2_matrix.ts";

// ---- running the tools ----

/** Run a QEMU tool, which must succeed; returns its stdout. */
export async function qemuOk(tool: "qemu-img" | "qemu-io", args: string[]): Promise<string> {
  const r = await runTool(tool, args);
  assert.equal(r.code, 0, `${tool} ${args.join(" ")} exited ${r.code}:\n${r.stdout}${r.stderr}`);
  return r.stdout;
}

/** Apply `ops` to an image with one qemu-io run; random fills go through files in `dir`. */
export async function applyOps(
  dir: string,
  image: string,
  format: "raw" | "qcow2",
  ops: Op[],
): Promise<void> {
  let n = 0;
  const commands = await qemuIoCommands(ops, async (data) => {
    const path = join(dir, `fill.${n++}.bin`);
    await Deno.writeFile(path, data);
    return path;
  });
  await qemuOk("qemu-io", ["-f", format, ...commands.flatMap((c) => ["-c", c]), image]);
  for (let i = 0; i < n; i++) await Deno.remove(join(dir, `fill.${i}.bin`));
}

// ---- the sources ----

/** One source image and the format to name with `-f`. */
export interface Source {
  /** Short name for test steps and file names. */
  name: string;
  path: string;
  format: "raw" | "qcow2";
}

/**
 * A raw image with holes and written-zero ranges between data runs, the zero runs sized around the
 * `-S` thresholds (3 KiB, 8 KiB, 60 KiB, 64 KiB, 100 KiB, 1 MiB), data unaligned to clusters, and
 * data in the last bytes.
 */
export function holesOps(size: number, seed: number): Op[] {
  const ops: Op[] = [];
  let at = 0;
  const data = (length: number, kind: number) => {
    ops.push({
      op: "write",
      offset: at,
      length,
      fill: kind % 2 === 0 ? { pattern: 0x10 + kind } : { seed: seed + kind },
    });
    at += length;
  };
  const zeroes = (length: number) => {
    ops.push({ op: "write", offset: at, length, fill: { pattern: 0 } });
    at += length;
  };
  data(100 * KiB, 0);
  zeroes(3 * KiB);
  data(7000, 1);
  at = 256 * KiB; // a hole, then data and written zeroes alternating
  data(1000, 2);
  zeroes(8 * KiB);
  data(1000, 3);
  zeroes(60 * KiB);
  data(512, 4);
  zeroes(64 * KiB);
  data(3000, 5);
  zeroes(100 * KiB);
  data(5000, 6);
  at = 1 * MiB;
  zeroes(1 * MiB);
  data(200 * KiB + 77, 7);
  at = 3 * MiB + 4 * KiB; // a hole of almost a megabyte
  data(300 * KiB, 8);
  zeroes(512);
  data(512, 9);
  ops.push({ op: "write", offset: size - 1000, length: 1000, fill: { pattern: 0x77 } });
  return ops;
}

function config(clusterSize: number, extra: Partial<Qcow2Config> = {}): Qcow2Config {
  return {
    clusterSize,
    refcountBits: 16,
    compat: "1.1",
    extendedL2: false,
    compressionType: "zlib",
    preallocation: "off",
    ...extra,
  };
}

function createArgs(c: Qcow2Config): string {
  return [
    `cluster_size=${c.clusterSize}`,
    `compat=${c.compat}`,
    `extended_l2=${c.extendedL2 ? "on" : "off"}`,
    `compression_type=${c.compressionType}`,
  ].join(",");
}

/** A qcow2 image made by qemu-img with `c`'s options, then the shared workload run by qemu-io. */
async function workloadImage(
  dir: string,
  name: string,
  c: Qcow2Config,
  size: number,
  seed: number,
  extra: Op[] = [],
): Promise<Source> {
  const path = join(dir, `${name}.qcow2`);
  await qemuOk("qemu-img", [
    "create",
    "-q",
    "-f",
    "qcow2",
    "-o",
    createArgs(c),
    path,
    String(size),
  ]);
  await applyOps(dir, path, "qcow2", [...workload(c, size, seed, 16), ...extra]);
  return { name, path, format: "qcow2" };
}

/** The raw source with holes and written zeroes ({@linkcode holesOps}), 6 MiB. */
export async function holesRaw(dir: string, seed: number, name = "holes"): Promise<Source> {
  const path = join(dir, `${name}.raw`);
  const size = 6 * MiB;
  await qemuOk("qemu-img", ["create", "-q", "-f", "raw", path, String(size)]);
  await applyOps(dir, path, "raw", holesOps(size, seed));
  return { name, path, format: "raw" };
}

/**
 * A three-deep chain raw ← qcow2 ← qcow2 (the middle layer with 4 KiB clusters), each layer with
 * data, zero clusters over the layer below, and the top with compressed clusters.
 */
export async function chain(
  dir: string,
  seed: number,
): Promise<{ base: Source; mid: Source; top: Source }> {
  const base = join(dir, "chain_base.raw"),
    mid = join(dir, "chain_mid.qcow2"),
    top = join(dir, "chain_top.qcow2");
  await qemuOk("qemu-img", ["create", "-q", "-f", "raw", base, String(8 * MiB)]);
  await applyOps(dir, base, "raw", [
    { op: "write", offset: 0, length: 2 * MiB, fill: { pattern: 0x01 } },
    { op: "write", offset: 4 * MiB + 1000, length: MiB, fill: { seed: seed + 100 } },
    { op: "write", offset: 7 * MiB, length: 64 * KiB, fill: { pattern: 0x02 } },
  ]);
  await qemuOk("qemu-img", [
    ..."create -q -f qcow2 -o cluster_size=4096 -F raw -b".split(" "),
    base,
    mid,
  ]);
  await applyOps(dir, mid, "qcow2", [
    { op: "write", offset: 64 * KiB, length: 64 * KiB, fill: { pattern: 0x11 } },
    { op: "zero", offset: 512 * KiB, length: 128 * KiB, unmap: false },
    { op: "write", offset: 3 * MiB, length: 100 * KiB, fill: { seed: seed + 101 } },
    { op: "zero", offset: 4 * MiB, length: 64 * KiB, unmap: true },
    { op: "write", offset: 5 * MiB + 3 * KiB, length: 9 * KiB, fill: { pattern: 0 } },
  ]);
  await qemuOk("qemu-img", ["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", mid, top]);
  await applyOps(dir, top, "qcow2", [
    { op: "write", offset: MiB, length: 4 * KiB, fill: { pattern: 0x21 } },
    { op: "zero", offset: 3 * MiB, length: 64 * KiB, unmap: false },
    { op: "zero", offset: 0, length: 64 * KiB, unmap: true },
    { op: "write", offset: 6 * MiB + 100, length: 70 * KiB, fill: { seed: seed + 102 } },
    { op: "compress", offset: 7 * MiB, length: 128 * KiB, fill: { pattern: 0x23 } },
    { op: "compress", offset: 7 * MiB + 192 * KiB, length: 64 * KiB, fill: { seed: seed + 103 } },
  ]);
  return {
    base: { name: "chain_base", path: base, format: "raw" },
    mid: { name: "chain_mid", path: mid, format: "qcow2" },
    top: { name: "chain_top", path: top, format: "qcow2" },
  };
}

/**
 * A qcow2 image with two internal snapshots ("first", ID 1; "second", ID 2) and a current state
 * that differs from both: data, compressed and zero clusters change between them.
 */
export async function snapshotImage(dir: string, seed: number): Promise<Source> {
  const path = join(dir, "snap.qcow2");
  await qemuOk("qemu-img", ["create", "-q", "-f", "qcow2", path, String(4 * MiB)]);
  await applyOps(dir, path, "qcow2", [
    { op: "write", offset: 0, length: MiB, fill: { pattern: 0x41 } },
    { op: "compress", offset: 2 * MiB, length: 128 * KiB, fill: { pattern: 0x42 } },
    { op: "write", offset: 3 * MiB + 5, length: 10 * KiB, fill: { seed: seed + 200 } },
  ]);
  await qemuOk("qemu-img", ["snapshot", "-c", "first", path]);
  await applyOps(dir, path, "qcow2", [
    { op: "write", offset: 512 * KiB, length: MiB, fill: { pattern: 0x43 } },
    { op: "zero", offset: 0, length: 64 * KiB, unmap: false },
    { op: "zero", offset: 3 * MiB, length: 64 * KiB, unmap: true },
  ]);
  await qemuOk("qemu-img", ["snapshot", "-c", "second", path]);
  await applyOps(dir, path, "qcow2", [
    { op: "write", offset: 3 * MiB, length: 64 * KiB, fill: { pattern: 0x44 } },
    { op: "discard", offset: 2 * MiB, length: 128 * KiB },
  ]);
  return { name: "snap", path, format: "qcow2" };
}

/**
 * Every source the option matrix runs over: the raw image with holes; qcow2 v2 and v3; cluster
 * sizes 512, 4K, 64K (the shared workload: data, compressed, zero and discarded clusters) and 2M
 * (one cluster of each kind);
 * mostly-compressed images (zlib, zstd) that qemu-img compressed; zero clusters, plain and
 * allocated; extended L2 with partial subclusters; the top of a 3-deep chain.
 */
export async function matrixSources(dir: string, seed: number): Promise<Source[]> {
  const holes = await holesRaw(dir, seed);
  const sources: Source[] = [holes];
  sources.push(await workloadImage(dir, "v2", config(64 * KiB, { compat: "0.10" }), 8 * MiB, seed));
  sources.push(await workloadImage(dir, "v3_64k", config(64 * KiB), 8 * MiB, seed + 1));
  sources.push(await workloadImage(dir, "c512", config(512), MiB, seed + 2));
  sources.push(await workloadImage(dir, "c4k", config(4 * KiB), 4 * MiB, seed + 3));
  // 2 MiB clusters: the shared workload needs 16 of them; four hold its kinds of cluster.
  const c2m = join(dir, "c2m.qcow2");
  await qemuOk("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", c2m, "9M"]);
  await applyOps(dir, c2m, "qcow2", [
    { op: "write", offset: 1000, length: 100 * KiB, fill: { seed: seed + 4 } },
    { op: "write", offset: 2 * MiB - 512, length: 1024, fill: { pattern: 0x21 } },
    { op: "compress", offset: 4 * MiB, length: 2 * MiB, fill: { pattern: 0x22 } },
    { op: "zero", offset: 6 * MiB, length: 2 * MiB, unmap: false },
    { op: "write", offset: 8 * MiB + 7, length: 7777, fill: { seed: seed + 5 } },
  ]);
  sources.push({ name: "c2m", path: c2m, format: "qcow2" });
  for (const type of ["zlib", "zstd"] as const) {
    // qemu-img's own compressed clusters, then a few plain writes over some of them.
    const path = join(dir, `compressed_${type}.qcow2`);
    await qemuOk("qemu-img", [
      ..."convert -f raw -O qcow2 -c -o".split(" "),
      `compression_type=${type}`,
      holes.path,
      path,
    ]);
    await applyOps(dir, path, "qcow2", [
      { op: "write", offset: 64 * KiB + 10, length: 100, fill: { pattern: 0x5a } },
      { op: "zero", offset: 1 * MiB + 200 * KiB, length: 64 * KiB, unmap: false },
    ]);
    sources.push({ name: `compressed_${type}`, path, format: "qcow2" });
  }
  // Zero clusters: ZERO_ALLOC (zeroed over data, host cluster kept) and ZERO_PLAIN (unmapped or
  // never allocated), and partial-cluster zero writes that become data.
  const zero = join(dir, "zero.qcow2");
  await qemuOk("qemu-img", ["create", "-q", "-f", "qcow2", zero, String(4 * MiB)]);
  await applyOps(dir, zero, "qcow2", [
    { op: "write", offset: 0, length: 2 * MiB, fill: { seed: seed + 300 } },
    { op: "zero", offset: 0, length: 256 * KiB, unmap: false },
    { op: "zero", offset: 512 * KiB, length: 128 * KiB, unmap: true },
    { op: "zero", offset: 3 * MiB, length: 192 * KiB, unmap: false },
    { op: "zero", offset: MiB + 1000, length: 10 * KiB, unmap: false },
    { op: "write", offset: 4 * MiB - 4 * KiB, length: 4 * KiB, fill: { pattern: 0x66 } },
  ]);
  sources.push({ name: "zero", path: zero, format: "qcow2" });
  // Extended L2: the workload's subcluster writes and zeroes, and a cluster with one subcluster.
  sources.push(
    await workloadImage(dir, "xl2", config(64 * KiB, { extendedL2: true }), 8 * MiB, seed + 5, [
      { op: "write", offset: 7 * MiB + 6 * KiB, length: 2 * KiB, fill: { pattern: 0x71 } },
      { op: "write", offset: 7 * MiB + 64 * KiB + 1, length: 5000, fill: { seed: seed + 6 } },
    ]),
  );
  sources.push((await chain(dir, seed)).top);
  return sources;
}

/**
 * Sources for concatenation: sizes that are no multiple of the cluster size (raw 1000448 bytes,
 * qcow2 777777 rounded by qemu-img to 778240, raw 65536 + 512), each with data at its edges.
 */
export async function concatSources(dir: string, seed: number): Promise<Source[]> {
  const a = join(dir, "cat_a.raw"), b = join(dir, "cat_b.qcow2"), c = join(dir, "cat_c.raw");
  await qemuOk("qemu-img", ["create", "-q", "-f", "raw", a, "1000448"]);
  await applyOps(dir, a, "raw", [
    { op: "write", offset: 0, length: 300_000, fill: { pattern: 0x31 } },
    { op: "write", offset: 900_000, length: 100_448, fill: { seed: seed + 400 } },
  ]);
  await qemuOk("qemu-img", ["create", "-q", "-f", "qcow2", b, "777777"]);
  await applyOps(dir, b, "qcow2", [
    { op: "write", offset: 1000, length: 70_000, fill: { pattern: 0x33 } },
    { op: "zero", offset: 131_072, length: 65_536, unmap: false },
    { op: "write", offset: 700_000, length: 78_240, fill: { seed: seed + 401 } },
  ]);
  await qemuOk("qemu-img", ["create", "-q", "-f", "raw", c, String(64 * KiB + 512)]);
  await applyOps(dir, c, "raw", [
    { op: "write", offset: 512, length: 1000, fill: { pattern: 0x35 } },
    { op: "write", offset: 64 * KiB, length: 512, fill: { pattern: 0x36 } },
  ]);
  return [
    { name: "cat_a", path: a, format: "raw" },
    { name: "cat_b", path: b, format: "qcow2" },
    { name: "cat_c", path: c, format: "raw" },
  ];
}

/** `length` bytes of seeded random data (re-exported for the pins in convert_test.ts). */
export { randomBytes };

// ---- qemu-img map --output=json ----

/** One entry of `qemu-img map --output=json`. */
export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

/** `qemu-img map --output=json` of an image (its backing chain included). */
export async function qemuMap(path: string, format: string): Promise<MapEntry[]> {
  const out = await qemuOk("qemu-img", ["map", "--output=json", "-f", format, path]);
  const parsed = JSON.parse(out) as MapEntry[];
  return parsed.map((e) => {
    const entry: MapEntry = {
      start: e.start,
      length: e.length,
      depth: e.depth,
      present: e.present,
      zero: e.zero,
      data: e.data,
    };
    if (e.offset !== undefined) entry.offset = e.offset;
    return entry;
  });
}

/** Merge neighbours as qemu-img map does: same flags and depth, host offsets contiguous. */
export function mergeMap(entries: MapEntry[]): MapEntry[] {
  const out: MapEntry[] = [];
  for (const e of entries) {
    const last = out[out.length - 1];
    if (
      last !== undefined && last.start + last.length === e.start && last.depth === e.depth &&
      last.present === e.present && last.zero === e.zero && last.data === e.data &&
      (last.offset === undefined) === (e.offset === undefined) &&
      (last.offset === undefined || last.offset + last.length === e.offset)
    ) {
      last.length += e.length;
    } else {
      out.push({ ...e });
    }
  }
  return out;
}

/** Split entries so that `at` is an entry boundary (host offsets follow). */
export function splitMapAt(entries: MapEntry[], at: number): MapEntry[] {
  return entries.flatMap((e) => {
    if (at <= e.start || at >= e.start + e.length) return [e];
    const head: MapEntry = { ...e, length: at - e.start };
    const tail: MapEntry = { ...e, start: at, length: e.start + e.length - at };
    if (e.offset !== undefined) tail.offset = e.offset + head.length;
    return [head, tail];
  });
}

/** One map entry as qemu-img prints it. */
export function showEntry(e: MapEntry): string {
  const offset = e.offset === undefined ? "" : `, "offset": ${e.offset}`;
  return `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, ` +
    `"present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}${offset}}`;
}

/** The entries of two maps from the first difference on (a few lines), for failure messages. */
export function mapDiff(theirs: MapEntry[], ours: MapEntry[]): string {
  let i = 0;
  while (
    i < theirs.length && i < ours.length && showEntry(theirs[i]!) === showEntry(ours[i]!)
  ) i++;
  const lines = [`first difference at entry ${i}:`];
  for (let j = i; j < Math.min(i + 4, Math.max(theirs.length, ours.length)); j++) {
    if (theirs[j]) lines.push(`  qemu-img: ${showEntry(theirs[j]!)}`);
    if (ours[j]) lines.push(`  vstor:    ${showEntry(ours[j]!)}`);
  }
  return lines.join("\n");
}

/** Whether two maps are entry for entry the same. */
export function sameMap(a: MapEntry[], b: MapEntry[]): boolean {
  return a.length === b.length && a.every((e, i) => showEntry(e) === showEntry(b[i]!));
}
