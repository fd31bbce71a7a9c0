/**
 * vstor measure against qemu-img measure: for a corpus of sources (sparse raw files, qcow2 v2/v3
 * at every cluster size, compressed, zero and extended-L2 clusters, a three-deep chain, bitmaps,
 * preallocated images, internal snapshots) and for --size values, times raw and qcow2 targets
 * with many -o sets, the JSON and human output must equal qemu-img's; where qemu-img refuses,
 * vstor must refuse too, with exit 2 for command-line mistakes and 1 for the rest.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { type CliIo, main, UsageError } from "../../src/cli/main.ts";
import { measureMain } from "../../src/cli/measure.ts";
import { ignoreWithout, runTool, type ToolResult } from "./qemu.ts";

const ignore = ignoreWithout("qemu-img") || ignoreWithout("qemu-io");

/** `vstor measure ARGS`, through main() once the verb is registered there. */
async function vstor(args: string[]): Promise<ToolResult> {
  let stdout = "", stderr = "";
  const io: CliIo = { stdout: (s) => stdout += s, stderr: (s) => stderr += s };
  const code = await main(["measure", ...args], io);
  if (code !== 2 || !stderr.includes("unknown verb 'measure'")) return { code, stdout, stderr };
  // Not registered in main.ts yet: dispatch as main() does.
  stdout = stderr = "";
  try {
    return { code: await measureMain(args, io), stdout, stderr };
  } catch (e) {
    return { code: e instanceof UsageError ? 2 : 1, stdout, stderr: stderr + String(e) };
  }
}

async function ok(tool: string, ...args: string[]): Promise<void> {
  const r = await runTool(tool, args);
  assert.equal(r.code, 0, `${tool} ${args.join(" ")}:\n${r.stdout}${r.stderr}`);
}

/** Run `f` over `items`, `limit` at a time, keeping the order of the results. */
async function pool<T, R>(items: T[], limit: number, f: (item: T) => Promise<R>): Promise<R[]> {
  const out: R[] = new Array(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const i = next++;
      out[i] = await f(items[i]!);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return out;
}

/**
 * Compare every `args` list's JSON output with qemu-img's, and the human output too for the lists
 * `human` picks (the human text prints the same numbers: checking it everywhere only costs time).
 */
async function compareAll(
  cases: string[][],
  human: (args: string[]) => boolean = () => true,
): Promise<void> {
  const runs = cases.flatMap((args) =>
    human(args) ? [[...args, "--output=json"], args] : [[...args, "--output=json"]]
  );
  const expected = await pool(runs, 8, (args) => runTool("qemu-img", ["measure", ...args]));
  for (const [i, args] of runs.entries()) {
    const want = expected[i]!;
    const got = await vstor(args);
    const what = `measure ${args.join(" ")}`;
    if (want.code !== 0) {
      assert.notEqual(
        got.code,
        0,
        `${what}: qemu-img failed (${want.stderr.trim()}), vstor did not`,
      );
      continue;
    }
    assert.equal(got.code, 0, `${what}: ${got.stderr}`);
    if (args.includes("--output=json")) {
      assert.deepEqual(JSON.parse(got.stdout), JSON.parse(want.stdout), what);
    }
    // Exact text too: sizes past 2^53 lose digits in JSON.parse.
    assert.equal(got.stdout, want.stdout, what);
  }
}

/** Whether `args` measures for a default raw or qcow2 target (no -o). */
const plainTarget = (args: string[]) => !args.includes("-o");

/**
 * Targets every source is measured for: what a source adds depends only on the target's cluster
 * size, whether it has a backing file and its preallocation.
 */
const SOURCE_TARGETS: string[][] = [
  [],
  ["-O", "qcow2"],
  ["-O", "qcow2", "-o", "cluster_size=512"],
  ["-O", "qcow2", "-o", "cluster_size=4k,refcount_bits=1"],
  ["-O", "qcow2", "-o", "cluster_size=2M,refcount_bits=64"],
  ["-O", "qcow2", "-o", "preallocation=falloc,cluster_size=8k"],
  ["-O", "qcow2", "-o", "backing_file=base.qcow2,backing_fmt=qcow2"],
];

/** Every target format and -o set, for --size values and a few sources. */
const TARGETS: string[][] = [
  ...SOURCE_TARGETS,
  ["-O", "raw"],
  ["-O", "qcow2", "-o", "compat=0.10"],
  ["-O", "qcow2", "-o", "extended_l2=on"],
  ["-O", "qcow2", "-o", "extended_l2=on,cluster_size=16k"],
  ["-O", "qcow2", "-o", "preallocation=metadata"],
  ["-O", "qcow2", "-o", "preallocation=full", "-o", "refcount_bits=8"],
  ["-O", "qcow2", "-o", "lazy_refcounts=on,compression_type=zlib,nocow=off"],
];

/** Build the source corpus in `dir`; returns each source's arguments. */
async function corpus(dir: string): Promise<string[][]> {
  const p = (name: string) => join(dir, name);
  const io = (fmt: string, file: string, ...cmds: string[]) =>
    ok("qemu-io", "-f", fmt, ...cmds.flatMap((c) => ["-c", c]), p(file));
  const create = (file: string, size: string, ...opts: string[]) =>
    ok("qemu-img", "create", "-q", "-f", "qcow2", ...opts, p(file), size);
  const sources: string[][] = [];

  await Deno.writeFile(p("empty.raw"), new Uint8Array());
  await Deno.writeFile(p("odd.raw"), new Uint8Array(1000).fill(7));
  await Deno.writeFile(p("holes.raw"), new Uint8Array());
  await Deno.truncate(p("holes.raw"), 50 << 20);
  await io(
    "raw",
    "holes.raw",
    "write -P 1 0 1000",
    "write -P 2 3M 100k",
    "write -P 3 10M 4096",
    "write -P 4 49M 1M",
  );
  sources.push(["-f", "raw", p("empty.raw")], ["-f", "raw", p("odd.raw")], [
    "-f",
    "raw",
    p("holes.raw"),
  ]);

  // Data, zero clusters (v3; v2 writes zeroes as data), a partial discard, at each cluster size.
  const writes = [
    "write -P 1 0 1000",
    "write -P 2 3M 100k",
    "write -z 5M 3M",
    "write -P 3 10M 4096",
    "write -P 4 63M 1M",
    "write -P 5 20M 64k",
    "discard 20M 32k",
  ];
  for (const compat of ["0.10", "1.1"]) {
    for (const cs of [512, 4096, 65536, 2 << 20]) {
      const name = `v${compat}_${cs}.qcow2`;
      await create(name, "64M", "-o", `compat=${compat},cluster_size=${cs}`);
      await io("qcow2", name, ...writes);
      sources.push([p(name)]);
    }
  }

  await create("compressed.qcow2", "32M");
  await io(
    "qcow2",
    "compressed.qcow2",
    "write -c -P 7 0 64k",
    "write -c -P 8 1M 128k",
    "write -P 9 2M 4k",
  );
  await create("extl2.qcow2", "32M", "-o", "extended_l2=on,cluster_size=128k");
  await io(
    "qcow2",
    "extl2.qcow2",
    "write -P 1 0 4k",
    "write -P 2 1M 8k",
    "write -z 2M 64k",
    "write -P 3 2M 4k",
  );
  sources.push([p("compressed.qcow2")], [p("extl2.qcow2")]);

  // raw ← qcow2 (longer) ← qcow2 (longer still, 4k clusters), with zeroes hiding lower data.
  await ok("qemu-img", "create", "-q", "-f", "raw", p("base.raw"), "16M");
  await io("raw", "base.raw", "write -P 1 0 1M", "write -P 1 8M 64k");
  await create("mid.qcow2", "20M", "-b", "base.raw", "-F", "raw");
  await io("qcow2", "mid.qcow2", "write -P 2 2M 1M", "write -z 0 512k", "write -P 2 17M 4k");
  await create("top.qcow2", "24M", "-o", "cluster_size=4k", "-b", "mid.qcow2", "-F", "qcow2");
  await io("qcow2", "top.qcow2", "write -P 3 4M 4k", "write -z 2M 64k", "write -P 3 22M 1k");
  sources.push([p("mid.qcow2")], [p("top.qcow2")]);

  await create("bitmaps.qcow2", "100M");
  await ok("qemu-img", "bitmap", "--add", p("bitmaps.qcow2"), "b0");
  await ok("qemu-img", "bitmap", "--add", "-g", "512", p("bitmaps.qcow2"), "a_longer_bitmap_name");
  await io("qcow2", "bitmaps.qcow2", "write 0 1M");
  sources.push([p("bitmaps.qcow2")]);

  for (const mode of ["metadata", "falloc", "full"]) {
    await create(`prealloc_${mode}.qcow2`, "10M", "-o", `preallocation=${mode}`);
    sources.push([p(`prealloc_${mode}.qcow2`)]);
  }
  await create("prealloc_written.qcow2", "10M", "-o", "preallocation=metadata");
  await io("qcow2", "prealloc_written.qcow2", "write -P 1 1M 64k");
  // Metadata-preallocated images under an overlay, and with extended L2 over a backing file.
  await create(
    "prealloc_top.qcow2",
    "12M",
    "-o",
    "cluster_size=4k",
    "-b",
    "prealloc_written.qcow2",
    "-F",
    "qcow2",
  );
  await io("qcow2", "prealloc_top.qcow2", "write -P 2 6M 4k");
  await create(
    "prealloc_extl2.qcow2",
    "8M",
    "-o",
    "extended_l2=on,preallocation=metadata",
    "-b",
    "prealloc_written.qcow2",
    "-F",
    "qcow2",
  );
  await io("qcow2", "prealloc_extl2.qcow2", "write -P 1 3M 1k");
  await create("empty.qcow2", "0");
  sources.push(
    [p("prealloc_written.qcow2")],
    [p("prealloc_top.qcow2")],
    [p("prealloc_extl2.qcow2")],
    [p("empty.qcow2")],
  );

  // Two snapshots of different sizes; the active state differs from both.
  await create("snap.qcow2", "16M");
  await io("qcow2", "snap.qcow2", "write -P 1 0 4M");
  await ok("qemu-img", "snapshot", "-c", "s1", p("snap.qcow2"));
  await io("qcow2", "snap.qcow2", "discard 0 4M", "write -P 2 8M 64k");
  await ok("qemu-img", "resize", "-q", p("snap.qcow2"), "32M");
  await io("qcow2", "snap.qcow2", "write -P 3 30M 64k");
  await ok("qemu-img", "snapshot", "-c", "s2", p("snap.qcow2"));
  await io("qcow2", "snap.qcow2", "write -P 4 12M 1M");
  sources.push([p("snap.qcow2")]);

  // On ext4, SEEK_DATA counts an unwritten extent (QEMU's COW zeroing) as data once its pages are
  // cached, and QEMU asks the host file for small images it takes as metadata-preallocated. Read
  // every file once so both tools see the same answer whoever reads first.
  for await (const entry of Deno.readDir(dir)) await Deno.readFile(p(entry.name));
  return sources;
}

Deno.test({
  name: "vstor measure prints what qemu-img measure prints",
  ignore,
  async fn(t) {
    const dir = await Deno.makeTempDir({ prefix: "vstor_measure_" });
    try {
      const sources = await corpus(dir);
      const snap = join(dir, "snap.qcow2");

      await t.step("for every source and target", async () => {
        const everyTarget = [
          "holes.raw",
          "v1.1_65536.qcow2",
          "extl2.qcow2",
          "top.qcow2",
          "bitmaps.qcow2",
        ];
        await compareAll(
          sources.flatMap((source) =>
            (everyTarget.some((name) => source.at(-1)!.endsWith(name)) ? TARGETS : SOURCE_TARGETS)
              .map((target) => [...target, ...source])
          ),
          plainTarget,
        );
      });

      await t.step("for internal snapshots loaded with -l", async () => {
        const specs = ["s1", "2", "snapshot.name=s1", "snapshot.id=2,snapshot.name=s2"];
        await compareAll(
          specs.flatMap((spec) =>
            [[], ["-O", "qcow2"], ["-O", "qcow2", "-o", "cluster_size=4k"]].map((target) => [
              ...target,
              "-l",
              spec,
              snap,
            ])
          ),
        );
      });

      await t.step("for --size values, including sizes too large for a cluster size", async () => {
        const sizes = [
          "0",
          "1",
          "511",
          "513",
          "1000",
          "12345678901",
          "64k",
          "1.5G",
          "0x1000",
          "1T",
          "16T",
        ];
        const cases = sizes.flatMap((size) => TARGETS.map((target) => [...target, "--size", size]));
        // Past 2^53 bytes, and the largest sizes each target takes.
        cases.push(
          ["--size", "7E"],
          ["--size", "9223372036854775807"],
          ["-O", "qcow2", "-o", "cluster_size=2M", "--size", "2E"],
          ["-O", "qcow2", "-o", "cluster_size=2M,refcount_bits=1", "--size", "1E"],
          ["-O", "qcow2", "-o", "cluster_size=2M,extended_l2=on", "--size", "1025P"],
          ["-O", "qcow2", "-o", "cluster_size=512", "--size", "137438953473"],
        );
        await compareAll(cases, (args) => plainTarget(args) || args.includes("1E"));
      });

      await t.step("for option spellings QemuOpts accepts", async () => {
        await compareAll([
          ["-O", "qcow2", "-o", "refcount_bits=0x8", "--size", "1G"],
          ["-O", "qcow2", "-o", "refcount_bits=010", "--size", "1G"],
          ["-O", "qcow2", "-o", "extended_l2=yes,lazy_refcounts", "--size", "1G"],
          ["-O", "qcow2", "-o", "compat=1.1,compat=0.10", "--size", "1G"],
          ["-O", "qcow2", "-o", "cluster_size=4k", "-o", "cluster_size=1M", "--size", "1G"],
          ["-O", "qcow2", "-o", "compat=0.10,extended_l2=on", "--size", "1G"],
          ["-O", "qcow2", "-o", "data_file=x,data_file_raw=on,encrypt.format=aes", "--size", "1G"],
          ["-O", "raw", "-o", "preallocation=whatever,extent_size_hint=1M", "--size", "1G"],
          ["--output", "json", "-O", "qcow2", "--size", "1G"],
          ["-O", "qcow2", "-o", "size=100G", join(dir, "top.qcow2")],
        ]);
      });
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "vstor measure refuses what qemu-img measure refuses, exit 2 for usage mistakes",
  ignore,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vstor_measure_" });
    try {
      const image = join(dir, "a.qcow2"), raw = join(dir, "a.raw");
      await ok("qemu-img", "create", "-q", "-f", "qcow2", image, "1M");
      await ok("qemu-img", "create", "-q", "-f", "raw", raw, "1M");
      const cases: Array<[number, string[]]> = [
        [2, []],
        [2, ["--size", "1G", image]],
        [2, [image, raw]],
        [2, ["-f", "qcow2"]],
        [2, ["-l", "s1"]],
        [2, ["--size", "1G", "--output=xml"]],
        [2, ["--size", "1x"]],
        [2, ["--size", "-1"]],
        [2, ["--size", "8E"]],
        [2, ["--size", "1G", "-O", "foo"]],
        [2, ["--size", "1G", "-O", "qcow2", "-o", "foo=1"]],
        [2, ["--size", "1G", "-O", "qcow2", "-o", "help"]],
        [2, ["--size", "1G", "-O", "qcow2", "-o", ","]],
        [2, ["--size", "1G", "-O", "qcow2", "-o", "cluster_size=4k,"]],
        [2, ["--size", "1G", "-O", "qcow2", "-o", "cluster_size=abc"]],
        [2, ["--size", "1G", "-O", "qcow2", "-o", "cluster_size=1000"]],
        [2, ["--size", "1G", "-O", "qcow2", "-o", "extended_l2=on,cluster_size=8k"]],
        [2, ["--size", "1G", "-O", "qcow2", "-o", "refcount_bits=3"]],
        [2, ["--size", "1G", "-O", "qcow2", "-o", "refcount_bits=abc"]],
        [2, ["--size", "1G", "-O", "qcow2", "-o", "compat=0.10,refcount_bits=1"]],
        [2, ["--size", "1G", "-O", "qcow2", "-o", "compat=v3"]],
        [2, ["--size", "1G", "-O", "qcow2", "-o", "preallocation=bogus"]],
        [2, ["--size", "1G", "-O", "qcow2", "-o", "lazy_refcounts=maybe"]],
        [2, ["--size", "1G", "-O", "raw", "-o", "cluster_size=4k"]],
        [2, ["--size", "16T", "-O", "qcow2", "-o", "cluster_size=512"]],
        [1, [join(dir, "missing.qcow2")]],
        [1, ["-f", "qcow2", raw]],
        [1, ["-l", "nosuch", image]],
        [1, ["-f", "raw", "-l", "s1", raw]],
        [1, ["--size", "1G", "-O", "vmdk"]],
      ];
      for (const [code, args] of cases) {
        const want = await runTool("qemu-img", ["measure", ...args]);
        assert.notEqual(want.code, 0, `qemu-img measure ${args.join(" ")} succeeded`);
        const got = await vstor(args);
        assert.equal(got.code, code, `measure ${args.join(" ")}: ${got.stderr}`);
        assert.equal(got.stdout, "", `measure ${args.join(" ")}`);
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
