/**
 * `vstor convert` against `qemu-img convert`: round trips checked by qemu-img, then the same
 * arguments given to both tools over qemu-img-made sources (raw with holes, qcow2 v2/v3, every
 * cluster size, compressed and zero clusters, extended L2, a 3-deep chain, internal snapshots,
 * concatenated sources, existing targets), the two targets compared for contents (`qemu-img
 * compare`) and allocation (`qemu-img map --output=json`, host offsets included), and the errors.
 *
 * Differences from qemu-img that are known and not yet fixed are pinned by a step of the last test
 * with a minimal repro: when vstor is fixed, that step fails and asks for the pin to be removed.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { EXIT_ERROR, EXIT_OK, EXIT_USAGE, main } from "../../src/cli/main.ts";
import { ignoreWithout, runTool, type ToolResult } from "./qemu.ts";
import { assertCheckClean, KiB, MiB, withTempDir } from "./qcow2_matrix.ts";
import {
  applyOps,
  chain,
  concatSources,
  holesRaw,
  mapDiff,
  type MapEntry,
  matrixSources,
  mergeMap,
  qemuMap,
  qemuOk,
  randomBytes,
  sameMap,
  snapshotImage,
  type Source,
} from "./convert_corpus.ts";

const ignore = ignoreWithout("qemu-img") || ignoreWithout("qemu-io");

/** Seed of every source's random data; printed so a failure can be replayed. */
const SEED = Number(Deno.env.get("VSTOR_CONVERT_SEED") ?? 20261125);

/** Fail a pin test: the difference it holds is gone. */
function fixedMessage(what: string): string {
  return `${what} no longer differs from qemu-img: remove this pin`;
}

// ---- running both tools ----

/** Run `vstor ARGS...` in-process, keeping stdout and stderr apart. */
async function vstor(...args: string[]): Promise<ToolResult> {
  let stdout = "", stderr = "";
  const code = await main(args, { stdout: (s) => stdout += s, stderr: (s) => stderr += s });
  return { code, stdout, stderr };
}

/** One comparison: identical `convert` arguments (target appended) given to both tools. */
interface Case {
  /** Arguments before the target file name. */
  args: string[];
  targetFormat: "raw" | "qcow2";
  /** For -n: make each target before converting (identically for both tools). */
  prepare?: (path: string) => Promise<void>;
  /**
   * The one known layout difference (pinned below): into a written qcow2 target whose freed and
   * discarded clusters both wait for reuse, vstor places some new data at other host offsets
   * than qemu-img convert does. Contents and allocation still agree; only offsets are set aside.
   */
  reuseOrderDiffers?: boolean;
}

function withoutOffsets(map: MapEntry[]): MapEntry[] {
  return mergeMap(map.map(({ offset: _offset, ...rest }) => rest));
}

interface Targets {
  theirs: string;
  ours: string;
}

function shellLine(tool: string, args: string[]): string {
  return `${tool} convert ${args.map((a) => /^[\w./=,:-]+$/.test(a) ? a : `'${a}'`).join(" ")}`;
}

/** Convert with both tools (concurrently); both must succeed. */
async function convertBoth(dir: string, tag: string, c: Case): Promise<Targets> {
  const ext = c.targetFormat;
  const theirs = join(dir, `${tag}.qemu.${ext}`), ours = join(dir, `${tag}.vstor.${ext}`);
  if (c.prepare) await Promise.all([c.prepare(theirs), c.prepare(ours)]);
  const [q, v] = await Promise.all([
    runTool("qemu-img", ["convert", ...c.args, theirs]),
    vstor("convert", ...c.args, ours),
  ]);
  assert.equal(q.code, 0, `${shellLine("qemu-img", [...c.args, theirs])}:\n${q.stderr}`);
  assert.equal(v.code, 0, `${shellLine("vstor", [...c.args, ours])}:\n${v.stdout}${v.stderr}`);
  return { theirs, ours };
}

/**
 * Both tools' targets hold the same guest data and the same allocation (maps equal, host offsets
 * included, after setting aside the case's known differences); vstor's qcow2 target checks clean.
 */
async function assertSameResult(t: Targets, c: Case): Promise<void> {
  const fmt = c.targetFormat;
  const repro = `\n  ${shellLine("qemu-img", [...c.args, t.theirs])}\n  ${
    shellLine("vstor", [...c.args, t.ours])
  }\n  (sources from convert_corpus.ts, seed ${SEED})`;
  const [cmp, theirs, ours] = await Promise.all([
    runTool("qemu-img", ["compare", "-f", fmt, "-F", fmt, t.theirs, t.ours]),
    qemuMap(t.theirs, fmt),
    qemuMap(t.ours, fmt),
    fmt === "qcow2" ? assertCheckClean(t.ours) : Promise.resolve(),
  ]);
  assert.equal(cmp.code, 0, `contents differ: ${cmp.stdout}${cmp.stderr}${repro}`);
  const [a, b] = c.reuseOrderDiffers
    ? [withoutOffsets(theirs), withoutOffsets(ours)]
    : [theirs, ours];
  assert.ok(sameMap(a, b), `qemu-img map differs: ${mapDiff(a, b)}${repro}`);
}

async function runCase(dir: string, tag: string, c: Case): Promise<void> {
  const t = await convertBoth(dir, tag, c);
  try {
    await assertSameResult(t, c);
  } finally {
    await Promise.all([Deno.remove(t.theirs), Deno.remove(t.ours)]);
  }
}

function tagOf(...parts: string[]): string {
  return parts.join("_").replace(/[^\w.=-]+/g, "_");
}

function src(s: Source): string[] {
  return ["-f", s.format, s.path];
}

/**
 * Makes a target for -n: a new image of `size` bytes, written with `pattern` everywhere but a
 * discarded megabyte in the middle (left as created when `pattern` is 0).
 */
function existingTarget(format: "raw" | "qcow2", size: number, pattern: number) {
  return async (path: string) => {
    await qemuOk("qemu-img", ["create", "-q", "-f", format, path, String(size)]);
    if (pattern === 0) return;
    await qemuOk("qemu-io", [
      "-f",
      format,
      "-c",
      `write -q -P ${pattern} 0 ${size}`,
      "-c",
      `discard -q ${size / 2} ${MiB}`,
      path,
    ]);
  };
}

// ---- round trips ----

Deno.test({
  name:
    "vstor convert round-trips raw → qcow2 → compressed qcow2 (zlib, then zstd) → raw, each step checked by qemu-img",
  ignore,
  async fn() {
    console.log(`seed ${SEED}`);
    await withTempDir("vstor_convert_rt_", async (dir) => {
      const original = await holesRaw(dir, SEED);
      const steps: Array<{ file: string; format: "raw" | "qcow2"; args: string[] }> = [
        { file: "plain.qcow2", format: "qcow2", args: ["-O", "qcow2"] },
        { file: "zlib.qcow2", format: "qcow2", args: ["-O", "qcow2", "-c"] },
        {
          file: "zstd.qcow2",
          format: "qcow2",
          args: ["-O", "qcow2", "-c", "-o", "compression_type=zstd"],
        },
        { file: "back.raw", format: "raw", args: ["-O", "raw"] },
      ];
      let from: Source = original;
      for (const step of steps) {
        const to = join(dir, step.file);
        const r = await vstor("convert", ...step.args, ...src(from), to);
        assert.equal(r.code, EXIT_OK, `${step.file}: ${r.stdout}${r.stderr}`);
        if (step.format === "qcow2") {
          await assertCheckClean(to, step.file);
          const info = JSON.parse(await qemuOk("qemu-img", ["info", "--output=json", to])) as {
            "format-specific": { data: { "compression-type": string } };
          };
          const compressed = step.args.includes("-c");
          const type = step.args.includes("compression_type=zstd") ? "zstd" : "zlib";
          assert.equal(info["format-specific"].data["compression-type"], type, step.file);
          const check = await qemuOk("qemu-img", ["check", to]);
          const pct = /(\d+\.\d+)% compressed clusters/.exec(check);
          assert.ok(pct, check);
          assert.equal(Number(pct[1]) > 0, compressed, `${step.file}: ${check}`);
        }
        await assertCompareOk(original.path, "raw", to, step.format, step.file);
        from = { name: step.file, path: to, format: step.format };
      }
    });
  },
});

async function assertCompareOk(a: string, af: string, b: string, bf: string, what: string) {
  const r = await runTool("qemu-img", ["compare", "-f", af, "-F", bf, a, b]);
  assert.equal(r.code, 0, `${what}: qemu-img compare ${a} ${b}: ${r.stdout}${r.stderr}`);
}

// ---- the option matrix over every source ----

/** A step of a comparison test. */
interface Step {
  name: string;
  fn: () => Promise<void>;
}

/**
 * Run `steps` `lanes` at a time: each step is a pair of conversions plus qemu-img checks, mostly
 * waiting on subprocesses. Steps that overlap must run without sanitizers.
 */
async function runSteps(t: Deno.TestContext, steps: Step[], lanes = 2): Promise<void> {
  let next = 0;
  const lane = async () => {
    for (let i = next++; i < steps.length; i = next++) {
      const step = steps[i]!;
      await t.step({
        name: step.name,
        fn: step.fn,
        sanitizeOps: false,
        sanitizeResources: false,
        sanitizeExit: false,
      });
    }
  };
  await Promise.all(Array.from({ length: lanes }, lane));
}

/** The option sets every matrix source is converted with. */
const OPTION_SETS: Array<{ args: string[]; targetFormat: "raw" | "qcow2" }> = [
  { args: ["-O", "raw"], targetFormat: "raw" },
  { args: ["-O", "qcow2"], targetFormat: "qcow2" },
  { args: ["-O", "qcow2", "-o", "cluster_size=4k"], targetFormat: "qcow2" },
  { args: ["-O", "qcow2", "-c"], targetFormat: "qcow2" },
  { args: ["-O", "qcow2", "-S", "0"], targetFormat: "qcow2" },
  { args: ["-O", "qcow2", "-S", "64k"], targetFormat: "qcow2" },
  { args: ["-O", "qcow2", "-o", "compat=0.10"], targetFormat: "qcow2" },
];

Deno.test({
  name:
    "vstor convert gives qemu-img convert's contents and allocation for every qemu-img-made source and option set",
  ignore,
  async fn(t) {
    console.log(`seed ${SEED}`);
    await withTempDir("vstor_convert_matrix_", async (dir) => {
      const sources = await matrixSources(dir, SEED);
      await runSteps(
        t,
        sources.flatMap((s) =>
          OPTION_SETS.map((o) => ({
            name: `${s.name}: ${o.args.join(" ")}`,
            fn: () =>
              runCase(dir, tagOf(s.name, ...o.args), {
                args: [...o.args, ...src(s)],
                targetFormat: o.targetFormat,
              }),
          }))
        ),
      );
    });
  },
});

// ---- -B, -n, concatenation, snapshots ----

Deno.test({
  name:
    "vstor convert -c packs compressed clusters across host clusters at the offsets qemu-img uses",
  ignore,
  async fn() {
    // qemu-img convert -f raw -O qcow2 -c s.raw q.qcow2, with clusters that compress to just under
    // 64 KiB: each continues from where the previous ended, into the next host cluster.
    await withTempDir("vstor_convert_packing_", async (dir) => {
      const s = join(dir, "s.raw");
      const image = new Uint8Array(MiB);
      for (let c = 0; c < 16; c++) image.set(randomBytes(SEED + c, 65000), c * 64 * KiB);
      await Deno.writeFile(s, image);
      const r = await both(dir, "packing", {
        args: ["-f", "raw", "-O", "qcow2", "-c", s],
        targetFormat: "qcow2",
      });
      assert.ok(r.same);
      const straddling = async (path: string) => {
        const { clusterSize, clusters } = await compressedClusters(path);
        assert.ok(clusters.length > 0, `${path}: no compressed clusters`);
        return clusters.filter((c) =>
          Math.floor(c.host / clusterSize) !== Math.floor((c.end - 1) / clusterSize)
        ).length;
      };
      assert.ok((await straddling(r.theirs)) > 0, "qemu-img packs across host clusters");
      assert.equal(await straddling(r.ours), await straddling(r.theirs));
      // The deflate streams differ by a few bytes (another zlib), so offsets drift; sizes agree.
      const [ours, theirs] = [(await Deno.stat(r.ours)).size, (await Deno.stat(r.theirs)).size];
      assert.ok(Math.abs(ours - theirs) < theirs / 100, `sizes ${ours} and ${theirs}`);
    });
  },
});

Deno.test({
  name:
    "vstor convert -B -F makes an overlay of the given base holding what qemu-img's does, for chained and standalone sources",
  ignore,
  async fn(t) {
    console.log(`seed ${SEED}`);
    await withTempDir("vstor_convert_backing_", async (dir) => {
      const { base, mid, top } = await chain(dir, SEED);
      // A standalone qcow2 (no backing file), its zero runs whole clusters.
      const holes = await holesRaw(dir, SEED);
      const standalone = join(dir, "standalone.qcow2");
      await qemuOk("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", holes.path, standalone]);
      const alone: Source = { name: "standalone", path: standalone, format: "qcow2" };
      const cases: Array<{ source: Source; backing: Source; extra: string[] }> = [
        { source: top, backing: mid, extra: [] },
        { source: top, backing: mid, extra: ["-c"] },
        { source: top, backing: mid, extra: ["-S", "0"] },
        { source: top, backing: mid, extra: ["-o", "cluster_size=4k"] },
        // Only the top layer is copied: mid's data does not reach the new overlay of base.
        { source: top, backing: base, extra: [] },
        { source: mid, backing: base, extra: [] },
        // A source without a backing file over an unrelated base: its zeroes must be written.
        { source: alone, backing: base, extra: [] },
        { source: alone, backing: base, extra: ["-c"] },
      ];
      await runSteps(
        t,
        cases.map((c) => ({
          name: `${c.source.name} -B ${c.backing.name} ${c.extra.join(" ")}`.trim(),
          fn: () =>
            runCase(dir, tagOf(c.source.name, c.backing.name, ...c.extra), {
              args: [
                ...["-O", "qcow2", "-B", c.backing.path, "-F", c.backing.format, ...c.extra],
                ...src(c.source),
              ],
              targetFormat: "qcow2",
            }),
        })),
      );
    });
  },
});

Deno.test({
  name:
    "vstor convert -n writes into an existing target as qemu-img does, with and without --target-is-zero",
  ignore,
  async fn(t) {
    console.log(`seed ${SEED}`);
    await withTempDir("vstor_convert_n_", async (dir) => {
      const { top } = await chain(dir, SEED);
      const holes = await holesRaw(dir, SEED);
      const size = 9 * MiB; // larger than both sources: the tail must stay as it was
      const steps: Step[] = [];
      for (const source of [top, holes]) {
        for (const format of ["raw", "qcow2"] as const) {
          // Into an empty target with and without --target-is-zero; into a written one without
          // (with it, the target would not read as zeroes: the result is then unspecified).
          const variants = [
            { state: "empty", pattern: 0, flags: ["-n"] },
            { state: "empty", pattern: 0, flags: ["-n", "--target-is-zero"] },
            { state: "written", pattern: 0x77, flags: ["-n"] },
          ];
          for (const v of variants) {
            steps.push({
              name: `${source.name} into ${v.state} ${format} ${v.flags.join(" ")}`,
              fn: () =>
                runCase(dir, tagOf(source.name, format, v.state, ...v.flags), {
                  args: [...v.flags, "-O", format, ...src(source)],
                  targetFormat: format,
                  prepare: existingTarget(format, size, v.pattern),
                  reuseOrderDiffers: format === "qcow2" && v.state === "written",
                }),
            });
          }
        }
      }
      steps.push({
        name: "chain_top compressed into an empty qcow2 -n",
        fn: () =>
          runCase(dir, "n_compressed", {
            args: ["-n", "-O", "qcow2", "-c", ...src(top)],
            targetFormat: "qcow2",
            prepare: existingTarget("qcow2", size, 0),
          }),
      });
      await runSteps(t, steps);
    });
  },
});

Deno.test({
  name:
    "vstor convert concatenates sources whose sizes are no cluster multiples exactly as qemu-img does",
  ignore,
  async fn(t) {
    console.log(`seed ${SEED}`);
    await withTempDir("vstor_convert_cat_", async (dir) => {
      const sources = await concatSources(dir, SEED);
      // qemu-img takes one -f for all sources: mixed formats are probed instead.
      const probed = sources.map((s) => s.path);
      const sets: Array<{ args: string[]; targetFormat: "raw" | "qcow2" }> = [
        { args: ["-O", "raw"], targetFormat: "raw" },
        { args: ["-O", "qcow2"], targetFormat: "qcow2" },
        { args: ["-O", "qcow2", "-c"], targetFormat: "qcow2" },
        { args: ["-O", "qcow2", "-S", "0"], targetFormat: "qcow2" },
        { args: ["-O", "qcow2", "-o", "cluster_size=4k"], targetFormat: "qcow2" },
        { args: ["-O", "qcow2", "-o", "cluster_size=2M"], targetFormat: "qcow2" },
      ];
      const steps: Step[] = sets.map((o) => ({
        name: `cat_a.raw cat_b.qcow2 cat_c.raw ${o.args.join(" ")}`,
        fn: () =>
          runCase(dir, tagOf("cat", ...o.args), {
            args: [...o.args, ...probed],
            targetFormat: o.targetFormat,
          }),
      }));
      steps.push({
        name: "the same raw source twice",
        fn: () =>
          runCase(dir, "cat_twice", {
            args: ["-O", "qcow2", "-f", "raw", sources[0]!.path, sources[0]!.path],
            targetFormat: "qcow2",
          }),
      });
      await runSteps(t, steps);
    });
  },
});

Deno.test({
  name:
    "vstor convert -l converts the internal snapshot named by name, by ID, and by snapshot.name=/snapshot.id=",
  ignore,
  async fn(t) {
    console.log(`seed ${SEED}`);
    await withTempDir("vstor_convert_snap_", async (dir) => {
      const snap = await snapshotImage(dir, SEED);
      const selectors = ["first", "1", "second", "2", "snapshot.name=first", "snapshot.id=2"];
      await runSteps(
        t,
        selectors.flatMap((l) =>
          (["raw", "qcow2"] as const).map((format) => ({
            name: `-l ${l} -O ${format}`,
            fn: () =>
              runCase(dir, tagOf("snap", l, format), {
                args: ["-O", format, "-l", l, ...src(snap)],
                targetFormat: format,
              }),
          }))
        ),
      );
      // The snapshots really differ from each other and from the current state.
      const flat = async (l: string) => {
        const out = join(dir, `flat_${l}.raw`);
        assert.equal((await vstor("convert", "-O", "raw", "-l", l, ...src(snap), out)).code, 0);
        return out;
      };
      const [first, second] = [await flat("first"), await flat("second")];
      const differ = await runTool("qemu-img", [
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        first,
        second,
      ]);
      assert.equal(differ.code, 1, "snapshots 'first' and 'second' should differ");
      const now = await runTool("qemu-img", [
        ..."compare -f raw -F qcow2".split(" "),
        second,
        snap.path,
      ]);
      assert.equal(now.code, 1, "snapshot 'second' should differ from the current state");
    });
  },
});

// ---- errors ----

/** Exactly one line on stderr, `vstor: …`, nothing on stdout. */
function assertOneErrorLine(r: ToolResult, pattern: RegExp, what: string): void {
  assert.equal(r.stdout, "", `${what}: stdout`);
  const lines = r.stderr.split("\n").filter((l) => l !== "");
  assert.equal(lines.length, 1, `${what}: one line expected:\n${r.stderr}`);
  assert.match(lines[0]!, /^vstor: /, what);
  assert.match(lines[0]!, pattern, what);
}

/** A usage error: exit 2, `vstor convert: message` and the usage line. */
function assertUsage(r: ToolResult, pattern: RegExp, what: string): void {
  assert.equal(r.code, EXIT_USAGE, `${what}: exit code\n${r.stderr}`);
  assert.match(r.stderr, /^vstor convert: /, what);
  assert.match(r.stderr, pattern, what);
  assert.match(r.stderr, /\nusage: vstor convert /, what);
}

/** qemu-img refuses the same arguments too (exit 1). */
async function assertQemuRefuses(args: string[], what: string): Promise<void> {
  const q = await runTool("qemu-img", ["convert", ...args]);
  assert.equal(q.code, 1, `${what}: qemu-img should refuse too:\n${q.stderr}`);
}

async function exists(path: string): Promise<boolean> {
  return await Deno.stat(path).then(() => true, () => false);
}

Deno.test({
  name:
    "vstor convert refuses a missing source, -c to raw, bad -S/-m, --target-is-zero without -n and a too-small -n target",
  ignore,
  async fn() {
    await withTempDir("vstor_convert_err_", async (dir) => {
      const source = join(dir, "src.raw");
      await qemuOk("qemu-img", ["create", "-q", "-f", "raw", source, String(2 * MiB)]);
      await qemuOk("qemu-io", ["-f", "raw", "-c", "write -q -P 0x5 0 1M", source]);
      const out = join(dir, "out.img");

      const missing = join(dir, "no-such.qcow2");
      let r = await vstor("convert", "-O", "qcow2", missing, out);
      assert.equal(r.code, EXIT_ERROR, r.stderr);
      assertOneErrorLine(r, /no-such\.qcow2.*(No such file|not found)/i, "missing source");
      assert.equal(await exists(out), false, "no target is created for a missing source");
      await assertQemuRefuses(["-O", "qcow2", missing, out], "missing source");

      r = await vstor("convert", "-O", "raw", "-c", "-f", "raw", source, out);
      assert.equal(r.code, EXIT_ERROR, r.stderr);
      assertOneErrorLine(r, /Compression not supported/, "-c -O raw");
      await Deno.remove(out).catch(() => {}); // known difference: vstor leaves it (pinned below)
      await assertQemuRefuses(["-O", "raw", "-c", "-f", "raw", source, out], "-c -O raw");

      for (const bad of ["foo", "1k5", "-1"]) {
        r = await vstor("convert", `-S${bad}`, "-f", "raw", source, out);
        assertUsage(r, /Invalid buffer size for sparse output specified/, `-S ${bad}`);
        await assertQemuRefuses([`-S${bad}`, "-f", "raw", source, out], `-S ${bad}`);
      }
      for (const m of ["17", "0", "x"]) {
        r = await vstor("convert", "-m", m, "-f", "raw", source, out);
        assertUsage(r, /Invalid number of coroutines.*between 1 and 16/, `-m ${m}`);
        await assertQemuRefuses(["-m", m, "-f", "raw", source, out], `-m ${m}`);
      }
      assert.equal(await exists(out), false, "usage errors create no target");

      r = await vstor("convert", "--target-is-zero", "-f", "raw", source, out);
      // A usage error (2) is wanted; vstor exits 1 today (pinned below, then tighten this).
      assert.notEqual(r.code, EXIT_OK, r.stderr);
      assert.match(r.stderr, /--target-is-zero requires use of -n flag/);
      assert.equal(await exists(out), false, "--target-is-zero without -n creates no target");
      await assertQemuRefuses(["--target-is-zero", "-f", "raw", source, out], "--target-is-zero");

      for (const format of ["raw", "qcow2"] as const) {
        const small = join(dir, `small.${format}`);
        await qemuOk("qemu-img", ["create", "-q", "-f", format, small, String(MiB)]);
        await qemuOk("qemu-io", ["-f", format, "-c", "write -q -P 0x9 0 1M", small]);
        const before = await Deno.readFile(small);
        r = await vstor("convert", "-n", "-O", format, "-f", "raw", source, small);
        assert.equal(r.code, EXIT_ERROR, r.stderr);
        assertOneErrorLine(r, /too small/, `-n into a smaller ${format} target`);
        assert.deepEqual(await Deno.readFile(small), before, "the small target is untouched");
        await assertQemuRefuses(["-n", "-O", format, "-f", "raw", source, small], "too small");
      }
    });
  },
});

// ---- pins: one step per known difference, failing once vstor behaves as qemu-img ----

/** Convert with both tools and return the maps as printed and the file sizes. */
async function both(dir: string, tag: string, c: Case) {
  const t = await convertBoth(dir, tag, c);
  const [theirs, ours] = await Promise.all([
    qemuMap(t.theirs, c.targetFormat),
    qemuMap(t.ours, c.targetFormat),
  ]);
  const cmp = await runTool("qemu-img", [
    ..."compare -f".split(" "),
    c.targetFormat,
    "-F",
    c.targetFormat,
    t.theirs,
    t.ours,
  ]);
  return {
    ...t,
    theirsMap: theirs,
    oursMap: ours,
    same: cmp.code === 0,
    theirsSize: (await Deno.stat(t.theirs)).size,
    oursSize: (await Deno.stat(t.ours)).size,
  };
}

/** A raw image made by qemu-img with `commands` run by qemu-io. */
async function rawWith(dir: string, name: string, size: number, commands: string[]) {
  const path = join(dir, name);
  await qemuOk("qemu-img", ["create", "-q", "-f", "raw", path, String(size)]);
  if (commands.length > 0) {
    await qemuOk("qemu-io", ["-f", "raw", ...commands.flatMap((c) => ["-c", c]), path]);
  }
  return path;
}

/**
 * The compressed clusters of a qcow2 file with one L2 table: guest cluster index, host offset and
 * the byte just past the sectors the descriptor claims.
 */
async function compressedClusters(path: string) {
  const file = await Deno.readFile(path);
  const view = new DataView(file.buffer);
  const clusterBits = view.getUint32(20);
  const clusterSize = 1 << clusterBits;
  const l2 = Number(view.getBigUint64(Number(view.getBigUint64(40))) & 0x00fffffffffffe00n);
  const offsetBits = 62n - BigInt(clusterBits - 8);
  const out: Array<{ guestCluster: number; host: number; end: number; file: Uint8Array }> = [];
  for (let i = 0; i < clusterSize / 8; i++) {
    const entry = view.getBigUint64(l2 + 8 * i);
    if (((entry >> 62n) & 1n) === 0n) continue;
    const host = Number(entry & ((1n << offsetBits) - 1n));
    const sectors = Number((entry >> offsetBits) & ((1n << (62n - offsetBits)) - 1n)) + 1;
    out.push({ guestCluster: i, host, end: (host & ~511) + sectors * 512, file });
  }
  return { clusterSize, clusters: out };
}

/** Behaviours that once differed from qemu-img's and now match, each shown both ways. */
const MATCHED: Step[] = [
  {
    name: "a host cluster freed during convert -n is reused at once, as QEMU reuses it",
    fn: async () => {
      // t.qcow2 2M written with 0x77, s.raw 2M with data at [1M,1M+64k) only: the data at 1M
      // lands in a host cluster freed by the zero write of [0,1M), at qemu-img's offset.
      await withTempDir("vstor_convert_match_", async (dir) => {
        const s = await rawWith(dir, "s.raw", 2 * MiB, ["write -q -P 0x11 1M 64k"]);
        const r = await both(dir, "frees", {
          args: ["-n", "-f", "raw", "-O", "qcow2", s],
          targetFormat: "qcow2",
          prepare: existingTarget("qcow2", 2 * MiB, 0x77),
        });
        assert.ok(r.same);
        assert.deepEqual(r.oursMap, r.theirsMap);
      });
    },
  },
  {
    name: "a new refcount block goes after the data run that needs it, as QEMU places it",
    fn: async () => {
      // With 4 KiB clusters one refcount block covers 8 MiB of file; this data run crosses 8 MiB.
      await withTempDir("vstor_convert_match_", async (dir) => {
        const s = await rawWith(dir, "big.raw", 32 * MiB, ["write -q -P 0x11 0 12M"]);
        const r = await both(dir, "refblock", {
          args: ["-f", "raw", "-O", "qcow2", "-o", "cluster_size=4k", s],
          targetFormat: "qcow2",
        });
        assert.ok(r.same);
        assert.deepEqual(r.oursMap, r.theirsMap);
        assert.equal(r.oursSize, r.theirsSize);
      });
    },
  },
  {
    name: "-S zero detection aligns data and zero runs as qemu-img's is_allocated_sectors",
    fn: async () => {
      await withTempDir("vstor_convert_match_", async (dir) => {
        const s = await rawWith(dir, "s.raw", MiB, [
          "write -q -P 0x11 0 512",
          "write -q -P 0x12 8k 512",
        ]);
        const r = await both(dir, "align", {
          args: ["-f", "raw", "-O", "qcow2", "-o", "cluster_size=512", s],
          targetFormat: "qcow2",
        });
        assert.ok(r.same);
        assert.deepEqual(r.oursMap, r.theirsMap);
        const islands = await rawWith(dir, "i.raw", MiB, [
          "write -q -P 0x11 0 512",
          "write -q -P 0 512 100k",
          "write -q -P 0x12 102912 1000",
        ]);
        const raw = await both(dir, "align_raw", {
          args: ["-f", "raw", "-O", "raw", "-S", "64k", islands],
          targetFormat: "raw",
        });
        assert.ok(raw.same);
        assert.deepEqual(raw.oursMap, raw.theirsMap);
      });
    },
  },
  {
    name: "a zero run that starts mid-cluster is handled whole, not split at 2 MiB steps (-B)",
    fn: async () => {
      await withTempDir("vstor_convert_match_", async (dir) => {
        const s = await rawWith(dir, "s.raw", 4 * MiB, ["write -q -P 0x11 0 1000"]);
        const b = await rawWith(dir, "b.raw", 4 * MiB, ["write -q -P 0x22 0 4M"]);
        const r = await both(dir, "split", {
          args: ["-f", "raw", "-O", "qcow2", "-B", b, "-F", "raw", s],
          targetFormat: "qcow2",
        });
        assert.ok(r.same);
        assert.deepEqual(r.oursMap, r.theirsMap);
      });
    },
  },
  {
    name: "the unwritten rest of a new cluster is allocated, not left as host holes",
    fn: async () => {
      await withTempDir("vstor_convert_match_", async (dir) => {
        const s = await rawWith(dir, "s.raw", MiB, ["write -q -P 0x11 0 4k"]);
        const r = await both(dir, "holes", {
          args: ["-f", "raw", "-O", "qcow2", s],
          targetFormat: "qcow2",
        });
        assert.ok(r.same);
        assert.deepEqual(r.oursMap, r.theirsMap);
        assert.equal(r.oursSize % (64 * KiB), 0, "vstor's file ends on a cluster boundary");
        assert.equal(r.theirsSize, r.oursSize);
      });
    },
  },
  {
    name: "a raw target has its first block allocated, as QEMU's allocate_first_block does",
    fn: async () => {
      await withTempDir("vstor_convert_match_", async (dir) => {
        const s = await rawWith(dir, "s.raw", MiB, ["write -q -P 0x11 512k 4k"]);
        const r = await both(dir, "first", {
          args: ["-f", "raw", "-O", "raw", s],
          targetFormat: "raw",
        });
        assert.ok(r.same);
        assert.deepEqual(r.oursMap, r.theirsMap);
      });
    },
  },
  {
    name: "-n without --target-is-zero unmaps zero ranges of qcow2 and raw targets",
    fn: async () => {
      await withTempDir("vstor_convert_match_", async (dir) => {
        const s = await rawWith(dir, "s.raw", 2 * MiB, ["write -q -P 0x11 0 64k"]);
        for (const format of ["qcow2", "raw"] as const) {
          const r = await both(dir, `n_${format}`, {
            args: ["-n", "-f", "raw", "-O", format, s],
            targetFormat: format,
            prepare: existingTarget(format, 2 * MiB, 0x77),
          });
          assert.ok(r.same);
          assert.deepEqual(r.oursMap, r.theirsMap, format);
        }
      });
    },
  },
  {
    name: "a compressed target ends on a 512-byte boundary",
    fn: async () => {
      await withTempDir("vstor_convert_match_", async (dir) => {
        const s = await rawWith(dir, "s.raw", MiB, ["write -q -P 0x11 0 1000k"]);
        const r = await both(dir, "pad", {
          args: ["-f", "raw", "-O", "qcow2", "-c", s],
          targetFormat: "qcow2",
        });
        assert.ok(r.same);
        assert.equal(r.theirsSize % 512, 0);
        assert.equal(r.oursSize % 512, 0);
      });
    },
  },
  {
    name: "a failed convert leaves no target behind, and an existing file it did not create stays",
    fn: async () => {
      await withTempDir("vstor_convert_match_", async (dir) => {
        const s = await rawWith(dir, "s.raw", MiB, ["write -q -P 0x11 0 4k"]);
        const argSets = [
          ["-c", "-O", "raw"],
          ["-c", "-O", "qcow2", "-o", "compat=0.10,compression_type=zstd"],
        ];
        for (const [i, args] of argSets.entries()) {
          const q = join(dir, `q${i}.out`), v = join(dir, `v${i}.out`);
          assert.equal(
            (await runTool("qemu-img", ["convert", ...args, "-f", "raw", s, q])).code,
            1,
          );
          assert.equal((await vstor("convert", ...args, "-f", "raw", s, v)).code, EXIT_ERROR);
          assert.equal(await exists(q), false, `qemu-img ${args.join(" ")} leaves no target`);
          assert.equal(await exists(v), false, `vstor ${args.join(" ")} leaves no target`);
        }
        // A missing source fails after nothing was created; a target that was there stays.
        const kept = join(dir, "kept.raw");
        await Deno.writeFile(kept, new Uint8Array([1, 2, 3]));
        const r = await vstor("convert", "-c", "-O", "raw", "-f", "raw", s, kept);
        assert.equal(r.code, EXIT_ERROR);
        assert.deepEqual(await Deno.readFile(kept), new Uint8Array([1, 2, 3]));
      });
    },
  },
  {
    name: "-B is refused for a raw target and without -F, with qemu-img's messages",
    fn: async () => {
      await withTempDir("vstor_convert_match_", async (dir) => {
        const s = await rawWith(dir, "s.raw", MiB, ["write -q -P 0x11 0 4k"]);
        const b = await rawWith(dir, "b.raw", MiB, []);
        const cases: Array<[string[], string]> = [
          [["-O", "raw", "-B", b, "-F", "raw"], "Backing file not supported for file format 'raw'"],
          [["-O", "qcow2", "-B", b], "Use of backing file requires explicit backing format"],
        ];
        for (const [i, [args, message]] of cases.entries()) {
          const q = join(dir, `q${i}.out`), v = join(dir, `v${i}.out`);
          const theirs = await runTool("qemu-img", ["convert", ...args, "-f", "raw", s, q]);
          assert.equal(theirs.code, 1);
          assert.match(theirs.stderr, new RegExp(message.replace(/[()']/g, ".")));
          const r = await vstor("convert", ...args, "-f", "raw", s, v);
          assert.equal(r.code, EXIT_ERROR, args.join(" "));
          assert.match(r.stderr, new RegExp(message.replace(/[()']/g, ".")));
          assert.equal(await exists(v), false);
        }
      });
    },
  },
  {
    name: "a raw source's size is rounded up to a whole sector, as qemu-img does",
    fn: async () => {
      await withTempDir("vstor_convert_match_", async (dir) => {
        const odd = join(dir, "odd.raw");
        await Deno.writeFile(odd, new Uint8Array(1_000_003).fill(0x5a));
        const c = await rawWith(dir, "c.raw", 64 * KiB, ["write -q -P 0x11 0 64k"]);
        const r = await both(dir, "odd", {
          args: ["-f", "raw", "-O", "raw", odd, c],
          targetFormat: "raw",
        });
        assert.equal(r.theirsSize, 1_000_448 + 64 * KiB);
        assert.equal(r.oursSize, r.theirsSize);
        assert.ok(r.same);
        const q = await both(dir, "odd_q", {
          args: ["-f", "raw", "-O", "qcow2", odd],
          targetFormat: "qcow2",
        });
        assert.ok(q.same);
      });
    },
  },
  {
    name: "-S sizes that are not multiples of 512 or exceed 16 MiB are refused",
    fn: async () => {
      await withTempDir("vstor_convert_match_", async (dir) => {
        const s = await rawWith(dir, "s.raw", MiB, ["write -q -P 0x11 0 4k"]);
        for (const size of ["1000", "17M"]) {
          const out = join(dir, `t${size}.raw`);
          const theirs = await runTool("qemu-img", ["convert", "-S", size, "-f", "raw", s, out]);
          assert.equal(theirs.code, 1);
          const r = await vstor("convert", "-S", size, "-f", "raw", s, out);
          assert.equal(r.code, EXIT_USAGE, `-S ${size}`);
          assert.match(r.stderr, /Valid sizes are multiples of 512 up to 16777216/);
        }
      });
    },
  },
  {
    name: "-l snapshot.name= and snapshot.id= match only what they name",
    fn: async () => {
      await withTempDir("vstor_convert_match_", async (dir) => {
        const snap = await snapshotImage(dir, SEED);
        await applyOps(dir, snap.path, "qcow2", [
          { op: "write", offset: 0, length: 64 * KiB, fill: { pattern: 0x99 } },
        ]);
        await qemuOk("qemu-img", ["snapshot", "-c", "1", snap.path]);
        const r = await both(dir, "byname", {
          args: ["-O", "raw", "-l", "snapshot.name=1", ...src(snap)],
          targetFormat: "raw",
        });
        assert.ok(r.same, "-l snapshot.name=1 picks the snapshot named 1, not ID 1");
        const out = join(dir, "byid.raw");
        const v = await vstor("convert", "-O", "raw", "-l", "snapshot.id=first", ...src(snap), out);
        assert.equal(v.code, EXIT_ERROR, "-l snapshot.id=first: no snapshot has that ID");
      });
    },
  },
];

Deno.test({
  name: "vstor convert matches qemu-img convert where it once differed",
  ignore,
  async fn(t) {
    console.log(`seed ${SEED}`);
    await runSteps(t, MATCHED);
  },
});

/** The known differences, each with a minimal repro that must still show it. */
const PINS: Step[] = [
  {
    name: "convert -n into a written qcow2 reuses freed clusters in another order than qemu-img",
    fn: async () => {
      // repro: t.qcow2 9M written with 0x77, [4.5M,5.5M) discarded; convert -n of chain_top:
      //        qemu-img puts the new data of [4.5M,5M) right after the owned run at 4.375M;
      //        vstor puts it into the clusters the convert's zero writes freed just before.
      await withTempDir("vstor_convert_pin_", async (dir) => {
        const { top } = await chain(dir, SEED);
        const r = await both(dir, "reuse", {
          args: ["-n", "-O", "qcow2", ...src(top)],
          targetFormat: "qcow2",
          prepare: existingTarget("qcow2", 9 * MiB, 0x77),
        });
        assert.ok(r.same);
        assert.ok(!sameMap(r.theirsMap, r.oursMap), fixedMessage("reuse order"));
        assert.ok(sameMap(withoutOffsets(r.theirsMap), withoutOffsets(r.oursMap)));
      });
    },
  },
  {
    name: "--target-is-zero without -n exits 1, as a failure, not 2 as the usage error it is",
    fn: async () => {
      // repro: vstor convert --target-is-zero -f raw s.raw t.raw; echo $? → 1 (qemu-img: 1 too,
      //        but vstor's convention is 2 for option mistakes, as for bad -S and -m)
      await withTempDir("vstor_convert_pin_", async (dir) => {
        const s = await rawWith(dir, "s.raw", MiB, []);
        const r = await vstor("convert", "--target-is-zero", "-f", "raw", s, join(dir, "t.raw"));
        assert.equal(
          r.code,
          EXIT_ERROR,
          fixedMessage("--target-is-zero exit code") +
            "; then expect EXIT_USAGE in the errors test",
        );
      });
    },
  },
  {
    name: "node:zlib deflates small clusters into other bytes than QEMU's system zlib",
    fn: async () => {
      // Deno's node:zlib is zlib 1.3.1 (Chromium's fork); qemu-img 7.2 here links zlib 1.2.13.
      // Same parameters (raw deflate, window 4 KiB, level 6, memLevel 9), other streams:
      // 512 bytes of 0x11 → QEMU 13 14 1c 05 23 19 00 (8 bytes), vstor 13 14 1c 05 82 23 18 00 00
      // repro: qemu-img create -f raw s.raw 64k; qemu-io -f raw -c 'write -P 0x11 0 512' s.raw
      //        qemu-img convert -f raw -O qcow2 -c -o cluster_size=512 s.raw q.qcow2; vstor (same)
      //        and read the compressed cluster of guest offset 0 in each
      await withTempDir("vstor_convert_pin_", async (dir) => {
        const s = await rawWith(dir, "s.raw", 64 * KiB, ["write -q -P 0x11 0 512"]);
        const r = await both(dir, "deflate", {
          args: ["-f", "raw", "-O", "qcow2", "-c", "-o", "cluster_size=512", s],
          targetFormat: "qcow2",
        });
        assert.ok(r.same);
        const first = async (path: string) => {
          const c = (await compressedClusters(path)).clusters[0];
          assert.ok(c !== undefined && c.guestCluster === 0, `${path}: cluster 0 not compressed`);
          return c.file.slice(c.host, c.host + 9);
        };
        const [q, v] = [await first(r.theirs), await first(r.ours)];
        assert.notDeepEqual(v, q, fixedMessage("deflate output for a 512-byte cluster"));
      });
    },
  },
  {
    name: "a qcow2 target with 512-byte clusters has no feature name table, as qemu-img's",
    fn: async () => {
      // repro: qemu-img create -f qcow2 -o cluster_size=512 q.qcow2 1M; vstor create (same) v.qcow2
      //        cmp: byte 0x70 on: vstor has header extension 0x6803f857 (feature names), QEMU has none
      await withTempDir("vstor_convert_pin_", async (dir) => {
        const s = await rawWith(dir, "s.raw", MiB, []);
        const r = await both(dir, "hdr", {
          args: ["-f", "raw", "-O", "qcow2", "-o", "cluster_size=512", s],
          targetFormat: "qcow2",
        });
        const [q, v] = [await Deno.readFile(r.theirs), await Deno.readFile(r.ours)];
        const magic = (b: Uint8Array) => new DataView(b.buffer).getUint32(112);
        assert.equal(magic(q), 0, "qemu-img: no header extension after the v3 header");
        assert.equal(magic(v), 0, "vstor: no header extension after the v3 header either");
      });
    },
  },
];

Deno.test({
  name:
    "vstor convert still differs from qemu-img convert in each known way (a step fails once its difference is gone)",
  ignore,
  async fn(t) {
    console.log(`seed ${SEED}`);
    await runSteps(t, PINS);
  },
});
