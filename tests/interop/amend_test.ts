/**
 * `vstor amend` against `qemu-img amend` 7.2: images made by qemu-img and qemu-io (data, plain and
 * preallocated zero clusters, compressed clusters, internal snapshots, backing files) are amended
 * by both tools side by side; after every step `qemu-img check` must find vstor's image clean,
 * its guest contents (and every snapshot's) must equal the original's and qemu-img's result, and
 * `qemu-img info --output=json` must print the same for both. Refusals print qemu-img's messages.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { amendMain } from "../../src/cli/amend.ts";
import { type CliIo, reportError, UsageError } from "../../src/cli/main.ts";
import { ignoreWithout, runTool, type ToolResult } from "./qemu.ts";
import {
  assertCheckClean,
  assertCompareEqual,
  assertSameBytes,
  KiB,
  MiB,
  withTempDir,
} from "./qcow2_matrix.ts";

const ignore = ignoreWithout("qemu-img") || ignoreWithout("qemu-io");

// ---- tools ----

/** `vstor amend ARGS` in-process, with the CLI's error reporting and exit codes. */
async function vstorAmend(...args: string[]): Promise<ToolResult> {
  let stdout = "", stderr = "";
  const io: CliIo = { stdout: (s) => stdout += s, stderr: (s) => stderr += s };
  let code: number;
  try {
    code = await amendMain(args, io);
  } catch (e) {
    if (e instanceof UsageError) {
      io.stderr(`vstor amend: ${e.message}\n`);
      code = 2;
    } else {
      reportError(e, io);
      code = 1;
    }
  }
  return { code, stdout, stderr };
}

async function qemu(tool: "qemu-img" | "qemu-io", ...args: string[]): Promise<string> {
  const r = await runTool(tool, args);
  assert.equal(r.code, 0, `${tool} ${args.join(" ")} exited ${r.code}:\n${r.stdout}${r.stderr}`);
  return r.stdout;
}

async function qemuIo(image: string, ...commands: string[]): Promise<void> {
  const out = await qemu("qemu-io", "-f", "qcow2", ...commands.flatMap((c) => ["-c", c]), image);
  assert.doesNotMatch(out, /failed|error/i, out);
}

/** `qemu-img info --output=json` without what differs between two files by nature. */
async function info(path: string): Promise<Record<string, unknown>> {
  const json = JSON.parse(await qemu("qemu-img", "info", "--output=json", path));
  delete json["filename"];
  delete json["actual-size"];
  return json;
}

async function snapshotNames(path: string): Promise<string[]> {
  const json = JSON.parse(await qemu("qemu-img", "info", "--output=json", path));
  return (json["snapshots"] ?? []).map((s: { name: string }) => s.name);
}

/** A snapshot's guest contents as a raw file (read without applying it). */
async function snapshotRaw(path: string, name: string, out: string): Promise<string> {
  await qemu(
    "qemu-img",
    "convert",
    "-f",
    "qcow2",
    "-O",
    "raw",
    "-l",
    `snapshot.name=${name}`,
    path,
    out,
  );
  return out;
}

/** qemu-img's message with the program prefix taken off, vstor's with prefix and file name off. */
function message(r: ToolResult, file: string): string {
  return (r.stdout + r.stderr)
    .replaceAll(`vstor: ${file}: `, "")
    .replaceAll("vstor: ", "")
    .replaceAll("qemu-img: ", "")
    .replaceAll("'vstor rebase'", "'qemu-img rebase'")
    .replaceAll(file, "FILE")
    .trim();
}

/**
 * Amend `vstorCopy` with vstor and `qemuCopy` with qemu-img using the same options; both must
 * succeed, and vstor's image must be clean and equal to the original and to qemu-img's result.
 */
async function amendBoth(
  dir: string,
  original: string,
  copies: { vstor: string; qemu: string },
  options: string,
  { sameContentsAsOriginal = true } = {},
): Promise<void> {
  const ours = await vstorAmend("-f", "qcow2", "-o", options, copies.vstor);
  assert.equal(ours.code, 0, `vstor amend -o ${options}:\n${ours.stdout}${ours.stderr}`);
  assert.equal(ours.stdout + ours.stderr, "", "vstor amend prints nothing on success");
  await qemu("qemu-img", "amend", "-f", "qcow2", "-o", options, copies.qemu);
  await assertCheckClean(copies.vstor, `vstor's image after -o ${options}`);
  await assertCompareEqual(copies.vstor, "qcow2", copies.qemu, "qcow2");
  if (sameContentsAsOriginal) await assertCompareEqual(copies.vstor, "qcow2", original, "qcow2");
  assert.deepEqual(await info(copies.vstor), await info(copies.qemu), `info after -o ${options}`);
  // Snapshots read at the image's current size: against the original while that is unchanged.
  const reference = sameContentsAsOriginal ? original : copies.qemu;
  for (const name of await snapshotNames(original)) {
    const want = await snapshotRaw(reference, name, join(dir, `${name}.want.raw`));
    const got = await snapshotRaw(copies.vstor, name, join(dir, `${name}.got.raw`));
    await assertCompareEqual(got, "raw", want, "raw");
  }
}

/**
 * Assert vstor wrote the same file as qemu-img: same allocations, tables and data. The header
 * cluster is compared only above 4 KiB clusters, where QEMU writes the feature name table
 * (vstor's serializeHeader writes it for every cluster size).
 */
async function assertSameFile(ours: string, theirs: string, what: string): Promise<void> {
  const a = await Deno.readFile(ours), b = await Deno.readFile(theirs);
  const clusterSize = 2 ** new DataView(a.buffer).getUint32(20);
  const from = clusterSize > 4096 ? 0 : clusterSize;
  assertSameBytes(a.subarray(from), b.subarray(from), `${what}: vstor's file vs qemu-img's`);
}

async function copies(dir: string, original: string): Promise<{ vstor: string; qemu: string }> {
  const vstor = join(dir, "vstor.qcow2"), qemuCopy = join(dir, "qemu.qcow2");
  await Deno.copyFile(original, vstor);
  await Deno.copyFile(original, qemuCopy);
  return { vstor, qemu: qemuCopy };
}

// ---- images made by qemu-img and qemu-io ----

/** Data (aligned and not), zero clusters over holes and over data, a compressed cluster. */
async function dataImage(dir: string, clusterSize: number, extra = ""): Promise<string> {
  const path = join(dir, "original.qcow2");
  await qemu(
    "qemu-img",
    "create",
    "-q",
    "-f",
    "qcow2",
    "-o",
    `cluster_size=${clusterSize}${extra}`,
    path,
    "8M",
  );
  await qemuIo(
    path,
    "write -P 0x11 0 1M",
    `write -P 0x22 ${1 * MiB + 512} ${100 * KiB}`,
    `write -z ${3 * MiB} ${128 * KiB}`,
    `write -P 0x33 ${4 * MiB} ${192 * KiB}`,
    `write -z ${4 * MiB} ${128 * KiB}`,
    `write -z -u ${4 * MiB + 128 * KiB} ${64 * KiB}`,
    `write -c -P 0x44 ${6 * MiB} ${clusterSize}`,
    `discard ${512 * KiB} ${128 * KiB}`,
  );
  return path;
}

/** An overlay over a patterned base: zero clusters there must keep hiding the base. */
async function backedImage(dir: string): Promise<string> {
  const base = join(dir, "base.qcow2"), path = join(dir, "original.qcow2");
  await qemu("qemu-img", "create", "-q", "-f", "qcow2", base, "8M");
  await qemuIo(base, "write -P 0x5a 0 8M");
  await qemu("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", path);
  await qemuIo(
    path,
    `write -z 0 ${192 * KiB}`,
    `write -P 0x66 ${1 * MiB} ${128 * KiB}`,
    `write -z ${1 * MiB} ${64 * KiB}`,
    `write -z -u ${2 * MiB + 4096} ${200 * KiB}`,
  );
  return path;
}

/**
 * Two snapshots with writes around them; zeroes over shared clusters are unmapped (plain zero
 * clusters), preallocated zero clusters only where the active layer owns the cluster.
 */
async function snapshotImage(dir: string, clusterSize = 64 * KiB): Promise<string> {
  const path = join(dir, "original.qcow2");
  await qemu(
    "qemu-img",
    "create",
    "-q",
    "-f",
    "qcow2",
    "-o",
    `cluster_size=${clusterSize}`,
    path,
    "8M",
  );
  await qemuIo(path, "write -P 0x21 0 2M", `write -z ${3 * MiB} ${64 * KiB}`);
  await qemu("qemu-img", "snapshot", "-c", "first", path);
  await qemuIo(
    path,
    `write -z -u ${64 * KiB} ${128 * KiB}`,
    `write -P 0x22 ${5 * MiB} ${256 * KiB}`,
    `write -z ${5 * MiB} ${64 * KiB}`,
  );
  await qemu("qemu-img", "snapshot", "-c", "second", path);
  await qemuIo(path, `write -P 0x23 ${1 * MiB} ${64 * KiB}`, `write -z -u ${5 * MiB} ${128 * KiB}`);
  return path;
}

const IMAGES: Array<[string, (dir: string) => Promise<string>]> = [
  ["data, 64 KiB clusters", (dir) => dataImage(dir, 64 * KiB)],
  ["data, 4 KiB clusters", (dir) => dataImage(dir, 4 * KiB)],
  ["backing file", backedImage],
  ["snapshots", (dir) => snapshotImage(dir)],
];

// ---- amends equal to qemu-img's ----

for (const [what, make] of IMAGES) {
  Deno.test({
    name: `vstor amend compat 1.1 → 0.10 → 1.1 matches qemu-img amend (${what})`,
    ignore,
    fn: () =>
      withTempDir("vstor_amend_", async (dir) => {
        const original = await make(dir);
        const both = await copies(dir, original);
        for (const compat of ["0.10", "1.1"]) {
          await amendBoth(dir, original, both, `compat=${compat}`);
          // Same allocation order as QEMU: the files come out identical.
          await assertSameFile(both.vstor, both.qemu, `compat=${compat}`);
        }
      }),
  });
}

Deno.test({
  name: "vstor amend refcount_bits 16 → 1 → 64 → 16 matches qemu-img amend",
  ignore,
  fn: () =>
    withTempDir("vstor_amend_", async (dir) => {
      const original = await dataImage(dir, 4 * KiB);
      const both = await copies(dir, original);
      for (const bits of [1, 64, 16]) {
        await amendBoth(dir, original, both, `refcount_bits=${bits}`);
        await assertSameFile(both.vstor, both.qemu, `refcount_bits=${bits}`);
      }
      // Narrower widths through a v2 round trip on the way back need 16 bits again.
      await amendBoth(dir, original, both, "refcount_bits=8");
      await amendBoth(dir, original, both, "compat=0.10,refcount_bits=16");
      await amendBoth(dir, original, both, "compat=1.1,refcount_bits=2");
    }),
});

Deno.test({
  name:
    "vstor amend refcount_bits on an image with snapshots: wider works, 1 bit is refused as qemu-img refuses it",
  ignore,
  fn: () =>
    withTempDir("vstor_amend_", async (dir) => {
      // 4 KiB clusters: qemu-img walks every entry the refcount table could cover, which takes
      // seconds with 64 KiB clusters.
      const original = await snapshotImage(dir, 4 * KiB);
      const both = await copies(dir, original);
      await amendBoth(dir, original, both, "refcount_bits=64");
      const before = await Deno.readFile(both.vstor);
      const ours = await vstorAmend("-o", "refcount_bits=1", both.vstor);
      const theirs = await runTool("qemu-img", ["amend", "-o", "refcount_bits=1", both.qemu]);
      assert.equal(ours.code, 1);
      assert.equal(theirs.code, 1);
      assert.equal(message(ours, both.vstor), message(theirs, both.qemu));
      assertSameBytes(await Deno.readFile(both.vstor), before, "after a refused amend");
      await amendBoth(dir, original, both, "refcount_bits=4");
      await amendBoth(dir, original, both, "refcount_bits=16");
    }),
});

Deno.test({
  name:
    "vstor amend lazy_refcounts on and off matches qemu-img amend, also after writes with lazy refcounts",
  ignore,
  fn: () =>
    withTempDir("vstor_amend_", async (dir) => {
      const original = await dataImage(dir, 64 * KiB);
      const both = await copies(dir, original);
      await amendBoth(dir, original, both, "lazy_refcounts=on");
      await assertSameFile(both.vstor, both.qemu, "lazy_refcounts=on");
      for (const image of [both.vstor, both.qemu, original]) {
        await qemuIo(image, `write -P 0x77 ${7 * MiB} ${300 * KiB}`);
      }
      await amendBoth(dir, original, both, "lazy_refcounts=off");
      await assertSameFile(both.vstor, both.qemu, "lazy_refcounts=off");
      await amendBoth(dir, original, both, "compat=0.10,lazy_refcounts=off");
      await amendBoth(dir, original, both, "compat=1.1,lazy_refcounts=on");
    }),
});

Deno.test({
  name:
    "vstor amend size grows and shrinks as qemu-img amend does (data past the end goes, snapshots stay)",
  ignore,
  fn: () =>
    withTempDir("vstor_amend_", async (dir) => {
      for (const make of [(d: string) => dataImage(d, 64 * KiB), (d: string) => snapshotImage(d)]) {
        const original = await make(dir);
        const both = await copies(dir, original);
        for (const size of ["12M", "3M", "5M", `${5 * MiB + 1536}`]) {
          await amendBoth(dir, original, both, `size=${size}`, { sameContentsAsOriginal: false });
        }
        for (const f of [original, both.vstor, both.qemu]) await Deno.remove(f);
      }
    }),
});

Deno.test({
  name: "vstor amend accepts the backing file names an image has and refuses others, as qemu-img",
  ignore,
  fn: () =>
    withTempDir("vstor_amend_", async (dir) => {
      const original = await backedImage(dir);
      const both = await copies(dir, original);
      await amendBoth(dir, original, both, "backing_file=base.qcow2,backing_fmt=qcow2");
      const before = await Deno.readFile(both.vstor);
      for (
        const options of [
          "backing_file=other.qcow2,backing_fmt=qcow2",
          "backing_file=base.qcow2",
          "backing_fmt=raw",
        ]
      ) {
        const ours = await vstorAmend("-o", options, both.vstor);
        const theirs = await runTool("qemu-img", ["amend", "-o", options, both.qemu]);
        assert.equal(ours.code, theirs.code, options);
        assert.equal(message(ours, both.vstor), message(theirs, both.qemu), options);
      }
      assertSameBytes(await Deno.readFile(both.vstor), before, "after refused backing amends");
    }),
});

Deno.test({
  name:
    "vstor amend compat=0.10 keeps a snapshot's data in a cluster the active layer zeroed in place",
  ignore,
  fn: () =>
    withTempDir("vstor_amend_", async (dir) => {
      // qemu-img 7.2 writes the zeroes into the shared cluster (the snapshot changes, check
      // reports an OFLAG_COPIED error); vstor gives the active layer a new cluster.
      const original = join(dir, "original.qcow2"), ours = join(dir, "vstor.qcow2");
      await qemu("qemu-img", "create", "-q", "-f", "qcow2", original, "1M");
      await qemuIo(original, `write -P 7 0 ${128 * KiB}`);
      await qemu("qemu-img", "snapshot", "-c", "s1", original);
      await qemuIo(original, `write -z 0 ${64 * KiB}`);
      await Deno.copyFile(original, ours);
      const r = await vstorAmend("-o", "compat=0.10", ours);
      assert.equal(r.code, 0, r.stderr);
      await assertCheckClean(ours);
      await assertCompareEqual(ours, "qcow2", original, "qcow2");
      const want = await snapshotRaw(original, "s1", join(dir, "want.raw"));
      const got = await snapshotRaw(ours, "s1", join(dir, "got.raw"));
      await assertCompareEqual(got, "raw", want, "raw");
    }),
});

// ---- refusals ----

Deno.test({
  name: "vstor amend refuses what qemu-img amend refuses, with the same messages and exit codes",
  ignore,
  fn: () =>
    withTempDir("vstor_amend_", async (dir) => {
      const make: Record<string, () => Promise<void>> = {
        "v3.qcow2": () =>
          qemu("qemu-img", "create", "-q", "-f", "qcow2", join(dir, "v3.qcow2"), "16M").then(
            () => {},
          ),
        "snap.qcow2": async () => {
          const p = join(dir, "snap.qcow2");
          await qemu("qemu-img", "create", "-q", "-f", "qcow2", p, "16M");
          await qemuIo(p, "write -P 1 0 64k");
          await qemu("qemu-img", "snapshot", "-c", "s", p);
        },
        "v2snap.qcow2": async () => {
          const p = join(dir, "v2snap.qcow2");
          await qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", p, "16M");
          await qemu("qemu-img", "snapshot", "-c", "s", p);
        },
        "extl2.qcow2": () =>
          qemu(
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            join(dir, "extl2.qcow2"),
            "16M",
          ).then(() => {}),
        "zstd.qcow2": async () => {
          const p = join(dir, "zstd.qcow2");
          await qemu(
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compression_type=zstd",
            p,
            "16M",
          );
          await qemuIo(p, "write -c -P 3 0 64k");
        },
        "r8.qcow2": () =>
          qemu(
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=8",
            join(dir, "r8.qcow2"),
            "16M",
          ).then(() => {}),
        "plain.raw": () =>
          qemu("qemu-img", "create", "-q", "-f", "raw", join(dir, "plain.raw"), "1M").then(
            () => {},
          ),
      };
      const cases: Array<[string, string[]]> = [
        ["snap.qcow2", ["-o", "refcount_bits=1"]],
        ["snap.qcow2", ["-o", "compat=0.10,size=32M"]],
        ["extl2.qcow2", ["-o", "compat=0.10"]],
        ["zstd.qcow2", ["-o", "compat=0.10"]],
        ["r8.qcow2", ["-o", "compat=0.10"]],
        ["v2snap.qcow2", ["-o", "size=32M"]],
        ["v2snap.qcow2", ["-o", "lazy_refcounts=on"]],
        ["v2snap.qcow2", ["-o", "refcount_bits=8"]],
        ["v3.qcow2", ["-o", "compat=0.10,lazy_refcounts=on"]],
        ["v3.qcow2", ["-o", "cluster_size=4k"]],
        ["v3.qcow2", ["-o", "extended_l2=on"]],
        ["v3.qcow2", ["-o", "compression_type=zstd"]],
        ["v3.qcow2", ["-o", "preallocation=full"]],
        ["v3.qcow2", ["-o", "encryption=on"]],
        ["v3.qcow2", ["-o", "encrypt.format=luks"]],
        ["v3.qcow2", ["-o", "encrypt.state=active"]],
        ["v3.qcow2", ["-o", "foo=bar"]],
        ["v3.qcow2", ["-o", "compat=2.0"]],
        ["v3.qcow2", ["-o", "refcount_bits=3"]],
        ["v3.qcow2", ["-o", "refcount_bits=abc"]],
        ["v3.qcow2", ["-o", "lazy_refcounts=maybe"]],
        ["v3.qcow2", ["-o", "size=abc"]],
        ["v3.qcow2", ["-o", "size=1000000"]],
        ["v3.qcow2", ["-o", "data_file=x.raw"]],
        ["v3.qcow2", ["-o", "data_file_raw=on"]],
        ["v3.qcow2", ["-o", "refcount_bits=3,compat=2"]],
        ["v3.qcow2", ["-o", "backing_file=x.qcow2"]],
        ["plain.raw", ["-o", "size=2M"]],
        ["plain.raw", ["-f", "raw", "-o", "size=2M"]],
        ["plain.raw", ["-o", "help"]],
      ];
      for (const build of Object.values(make)) await build();
      for (const [image, args] of cases) {
        const source = join(dir, image), path = join(dir, `work_${image}`);
        const what = `amend ${args.join(" ")} ${image}`;
        await Deno.copyFile(source, path);
        const before = await Deno.readFile(path);
        const ours = await vstorAmend(...args, path);
        // Refused before anything changed.
        assertSameBytes(await Deno.readFile(path), before, `${what}: vstor's image`);
        await Deno.copyFile(source, path);
        const theirs = await runTool("qemu-img", ["amend", ...args, path]);
        assert.equal(ours.code, theirs.code, `${what}: exit codes`);
        assert.equal(message(ours, path), message(theirs, path), `${what}: messages`);
      }
    }),
});

Deno.test({
  name: "vstor amend -o help prints qemu-img's list of amendable qcow2 options",
  ignore,
  fn: () =>
    withTempDir("vstor_amend_", async (dir) => {
      const path = join(dir, "a.qcow2");
      await qemu("qemu-img", "create", "-q", "-f", "qcow2", path, "1M");
      for (
        const args of [["-o", "help", path], ["-f", "qcow2", "-o", "help"], [
          "-o",
          "compat=1.1,?",
          path,
        ]]
      ) {
        const ours = await vstorAmend(...args);
        const theirs = await runTool("qemu-img", ["amend", ...args]);
        assert.equal(ours.code, 0);
        assert.equal(ours.stdout, theirs.stdout, args.join(" "));
      }
    }),
});

Deno.test("vstor amend needs -o options and exactly one image file", async () => {
  assert.match((await vstorAmend("x.qcow2")).stderr, /Must specify options \(-o\)/);
  assert.match((await vstorAmend("-o", "", "x.qcow2")).stderr, /Invalid option list: $/m);
  assert.match((await vstorAmend("-o", "compat=1.1")).stderr, /Expecting one image file name/);
  assert.match(
    (await vstorAmend("-o", "compat=1.1", "a", "b")).stderr,
    /Unexpected argument 'b'/,
  );
  assert.equal((await vstorAmend("-o", "compat=1.1", "a", "b")).code, 2);
});
