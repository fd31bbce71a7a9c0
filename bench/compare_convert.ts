/**
 * Side by side with `qemu-img convert`: one input of the given size, half data and half holes,
 * converted by both tools as subprocesses (`qemu-img convert …` and `deno run -A mod.ts convert …`,
 * so vstor's time includes Deno's start-up), timed by wall clock, median of the runs. Every output
 * is checked against the input with `qemu-img compare`. Prints seconds for both and the ratio
 * qemu-img time / vstor time (above 1: vstor is faster), with the output sizes; and the same
 * vstor conversion run through the CLI entry inside the bench's own process, which leaves out
 * Deno's start-up (qemu-img's own start-up is a few milliseconds).
 *
 * The data is compressible about 2:1 by qcow2's zlib (raw deflate, 4 KiB window) and by zstd:
 * 4 KiB blocks that are 2 KiB of random bytes said twice, one block in eight text-like words.
 *
 *   deno run -A bench/compare_convert.ts [--size-mib=1024] [--runs=1] [--seed=1] [--keep=DIR]
 *
 * `--keep=DIR` makes the inputs in DIR (reusing them when present) and leaves them there.
 *
 * @module
 */
import { parseArgs } from "node:util";
import { join } from "node:path";
import { main as vstorMain } from "../src/cli/main.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    "size-mib": { type: "string", default: "1024" },
    runs: { type: "string", default: "1" },
    seed: { type: "string", default: "1" },
    keep: { type: "string" },
  },
});
const sizeMib = Number(values["size-mib"]);
const runs = Number(values.runs);
const seed = Number(values.seed);
if (
  !Number.isSafeInteger(sizeMib) || sizeMib < 1 || !Number.isSafeInteger(runs) || runs < 1 ||
  !Number.isSafeInteger(seed)
) {
  console.error("compare_convert: --size-mib, --runs and --seed must be whole numbers (> 0)");
  Deno.exit(2);
}

const KIB = 1024;
const MIB = 1024 * KIB;
const CLUSTER = 64 * KIB;
const size = sizeMib * MIB;
const modTs = new URL("../mod.ts", import.meta.url).pathname;

/** One conversion, given to both tools with the same arguments. */
interface Case {
  name: string;
  /** Which input: the raw image or the qcow2 made from it. */
  input: "raw" | "qcow2";
  /** convert arguments between the input and the output names. */
  args: string[];
  output: "raw" | "qcow2";
}

const CASES: Case[] = [
  { name: "raw → qcow2", input: "raw", args: ["-O", "qcow2"], output: "qcow2" },
  { name: "qcow2 → raw", input: "qcow2", args: ["-O", "raw"], output: "raw" },
  { name: "raw → qcow2 -c (zlib)", input: "raw", args: ["-O", "qcow2", "-c"], output: "qcow2" },
  {
    name: "raw → qcow2 -c (zstd)",
    input: "raw",
    args: ["-O", "qcow2", "-c", "-o", "compression_type=zstd"],
    output: "qcow2",
  },
];

/** mulberry32: a small seedable PRNG returning numbers in [0, 1). */
function prng(s: number): () => number {
  let a = s >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const WORDS = [
  "the",
  "block",
  "layer",
  "cluster",
  "of",
  "qcow2",
  "image",
  "and",
  "refcount",
  "table",
  "guest",
  "offset",
  "data",
  "to",
  "a",
  "is",
  "write",
  "read",
];

/** A 64 KiB cluster of data compressible about 2:1 (see the module comment). */
function dataCluster(next: () => number): Uint8Array {
  const cluster = new Uint8Array(CLUSTER);
  const enc = new TextEncoder();
  for (let b = 0; b < CLUSTER / 4096; b++) {
    const block = cluster.subarray(b * 4096, (b + 1) * 4096);
    if (next() < 1 / 8) {
      for (let at = 0; at < block.length;) {
        const w = enc.encode(
          WORDS[Math.floor(next() * WORDS.length)]! + (next() < 0.1 ? ".\n" : " "),
        );
        block.set(w.subarray(0, Math.min(w.length, block.length - at)), at);
        at += w.length;
      }
    } else {
      for (let i = 0; i < 2048; i++) block[i] = Math.floor(next() * 256);
      block.copyWithin(2048, 0, 2048);
    }
  }
  return cluster;
}

/**
 * The input: runs of data and holes of equal length (4 KiB to 4 MiB, seeded), so half the image
 * is data. The data comes from a pool of 256 distinct clusters (qcow2 compresses each cluster on
 * its own, so reuse across clusters does not help either tool).
 */
async function makeInput(path: string): Promise<number> {
  const next = prng(seed);
  const pool = Array.from({ length: 256 }, () => dataCluster(next));
  const file = await Deno.open(path, { create: true, write: true, truncate: true });
  let dataBytes = 0;
  try {
    await file.truncate(size);
    let clusterIndex = 0;
    for (let at = 0; at < size;) {
      const run = Math.min(size - at, 4 * KIB * (1 + Math.floor(next() * 1024)));
      await file.seek(at, Deno.SeekMode.Start);
      for (let done = 0; done < run;) {
        const piece = pool[clusterIndex++ % pool.length]!.subarray(
          0,
          Math.min(CLUSTER, run - done),
        );
        for (let w = 0; w < piece.length;) w += await file.write(piece.subarray(w));
        done += piece.length;
      }
      dataBytes += run;
      at += 2 * run; // the hole after the data run is as long as the run
    }
  } finally {
    file.close();
  }
  return dataBytes;
}

/** Run a command to completion; throws with its stderr when it fails. */
async function run(cmd: string, args: string[]): Promise<string> {
  const out = await new Deno.Command(cmd, { args, stdout: "piped", stderr: "piped" }).output();
  const dec = new TextDecoder();
  if (!out.success) {
    throw new Error(`${cmd} ${args.join(" ")} failed (${out.code}): ${dec.decode(out.stderr)}`);
  }
  return dec.decode(out.stdout);
}

/** Wall-clock seconds of one run. */
async function timed(cmd: string, args: string[]): Promise<number> {
  const start = performance.now();
  await run(cmd, args);
  return (performance.now() - start) / 1000;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 === 1 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

/** Read a file once so every timed run starts with it in the page cache. */
async function warm(path: string): Promise<void> {
  const file = await Deno.open(path);
  try {
    const buf = new Uint8Array(4 * MIB);
    while ((await file.read(buf)) !== null) { /* reading is the point */ }
  } finally {
    file.close();
  }
}

function mib(bytes: number): string {
  return (bytes / MIB).toFixed(1);
}

let qemuVersion: string;
try {
  qemuVersion = (await run("qemu-img", ["--version"])).split("\n")[0]!;
} catch {
  console.error("compare_convert: qemu-img is not installed");
  Deno.exit(1);
}

const keep = values.keep;
if (keep !== undefined) await Deno.mkdir(keep, { recursive: true });
const dir = keep ?? await Deno.makeTempDir({ prefix: "vstor_convert_bench_" });
try {
  const raw = join(dir, "input.raw");
  const qcow2 = join(dir, "input.qcow2");
  const reuse = keep !== undefined && (await Deno.stat(qcow2).catch(() => null)) !== null;
  const dataBytes = reuse ? 0 : await makeInput(raw);
  if (!reuse) await run("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", raw, qcow2]);
  await warm(raw);
  await warm(qcow2);
  console.log(
    `qemu-img convert vs vstor convert (deno run -A mod.ts convert): ${sizeMib} MiB input, ` +
      `${
        reuse ? "reused" : `${mib(dataBytes)} MiB`
      } data (~2:1 compressible) and the rest holes, seed ${seed}, ` +
      `median of ${runs} run(s), wall clock, inputs in the page cache\n` +
      `${qemuVersion}; deno ${Deno.version.deno}; ${navigator.hardwareConcurrency} CPUs\n`,
  );
  const rows: string[][] = [[
    "case",
    "qemu-img s",
    "vstor s",
    "qemu-img/vstor",
    "in-process s",
    "qemu-img/in-process",
    "qemu-img MiB",
    "vstor MiB",
    "compare",
  ]];
  for (const c of CASES) {
    const input = c.input === "raw" ? raw : qcow2;
    const theirs = join(dir, `qemu.${c.output}`), ours = join(dir, `vstor.${c.output}`);
    const qemuSeconds: number[] = [], vstorSeconds: number[] = [], inProcess: number[] = [];
    for (let i = 0; i < runs; i++) {
      await Deno.remove(theirs).catch(() => {});
      await Deno.remove(ours).catch(() => {});
      const args = ["convert", "-f", c.input, ...c.args, input];
      const qemu = () => timed("qemu-img", [...args, theirs]);
      const vstor = () => timed(Deno.execPath(), ["run", "-A", modTs, ...args, ours]);
      // Alternate which tool goes first, so neither always finds the other's dirty pages.
      if (i % 2 === 0) {
        qemuSeconds.push(await qemu());
        vstorSeconds.push(await vstor());
      } else {
        vstorSeconds.push(await vstor());
        qemuSeconds.push(await qemu());
      }
      // The same conversion through the CLI entry in this process: no start-up of Deno.
      await Deno.remove(ours).catch(() => {});
      const start = performance.now();
      const code = await vstorMain([...args, ours]);
      inProcess.push((performance.now() - start) / 1000);
      if (code !== 0) throw new Error(`vstor ${args.join(" ")} exited ${code}`);
    }
    const compare = async (out: string) => {
      const r = await new Deno.Command("qemu-img", {
        args: ["compare", "-f", c.input, "-F", c.output, input, out],
        stdout: "null",
        stderr: "null",
      }).output();
      return r.code === 0;
    };
    const [okTheirs, okOurs] = [await compare(theirs), await compare(ours)];
    const q = median(qemuSeconds), v = median(vstorSeconds), p = median(inProcess);
    rows.push([
      c.name,
      q.toFixed(2),
      v.toFixed(2),
      (q / v).toFixed(2),
      p.toFixed(2),
      (q / p).toFixed(2),
      mib((await Deno.stat(theirs)).size),
      mib((await Deno.stat(ours)).size),
      okTheirs && okOurs ? "equal" : `DIFFER (qemu-img ${okTheirs}, vstor ${okOurs})`,
    ]);
    console.error(
      `${c.name}: qemu-img ${qemuSeconds.map((s) => s.toFixed(2)).join(", ")} s; ` +
        `vstor ${vstorSeconds.map((s) => s.toFixed(2)).join(", ")} s`,
    );
    await Deno.remove(theirs);
    await Deno.remove(ours);
  }
  const widths = rows[0]!.map((_, col) => Math.max(...rows.map((r) => r[col]!.length)));
  for (const row of rows) {
    console.log(
      row.map((cell, col) => col === 0 ? cell.padEnd(widths[col]!) : cell.padStart(widths[col]!))
        .join("  "),
    );
  }
  if (rows.some((r) => r[8]!.startsWith("DIFFER"))) Deno.exitCode = 1;
} finally {
  if (keep === undefined) await Deno.remove(dir, { recursive: true });
}
