/**
 * `vstor check` against `qemu-img check`: on images damaged on purpose (leaks, refcounts too high,
 * too low and zero, wrong COPIED flags, L2 entries pointing into the header, at metadata,
 * unaligned or past the end of the file) both must give the same exit code, human output, stderr
 * lines and `--output=json` object; `-r leaks` and `-r all` on separate copies must end with the
 * same exit codes, and after `vstor check -r all` the image must pass `qemu-img check` and read as
 * before the damage wherever the damage did not destroy data. On an undamaged corpus made by QEMU
 * (raw, v2/v3 at every cluster size, compressed, zero clusters, extended L2, snapshots, backing
 * chains) both must print the same thing.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { main } from "../../src/cli/main.ts";
import { ignoreWithout, runTool, type ToolResult } from "./qemu.ts";
import { COPIED, OFFSET_MASK, patchImage, type Qcow2Patcher } from "./damage.ts";
import { KiB, MiB, randomBytes } from "./qcow2_matrix.ts";

const ignore = ignoreWithout("qemu-img") || ignoreWithout("qemu-io");

const dir = Deno.makeTempDirSync({ prefix: "vstor_check_interop_" });
globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));

/** Seed of the random (incompressible) data in the compressed corpus images. */
const DATA_SEED = 0xc0ffee;

// ---- running both tools ----

/** Run `vstor ARGS...` in-process, keeping stdout and stderr apart. */
async function vstor(...args: string[]): Promise<ToolResult> {
  let stdout = "", stderr = "";
  const code = await main(args, { stdout: (s) => stdout += s, stderr: (s) => stderr += s });
  return { code, stdout, stderr };
}

/** Run a QEMU tool that must succeed. */
async function qemu(tool: "qemu-img" | "qemu-io", ...args: string[]): Promise<string> {
  const r = await runTool(tool, args);
  assert.equal(r.code, 0, `${tool} ${args.join(" ")} exited ${r.code}:\n${r.stdout}${r.stderr}`);
  return r.stdout;
}

/** Stderr as lines, with the program's own name (qemu-img: / vstor:) made neutral. */
function stderrLines(text: string): string[] {
  return text.split("\n").filter((line) => line !== "").map((line) =>
    line.replace(/^(qemu-img|vstor): /, "PROGRAM: ")
  );
}

/** What a check printed, in a form two tools' runs can be compared in. */
function comparable(r: ToolResult, json: boolean) {
  return {
    code: r.code,
    stdout: json && r.stdout !== "" ? JSON.parse(r.stdout) as unknown : r.stdout,
    stderr: stderrLines(r.stderr),
  };
}

function transcript(r: ToolResult): string {
  return `exit ${r.code}\n--- stdout\n${r.stdout}--- stderr\n${r.stderr}`;
}

/** Both checks of `path` (human and JSON) print the same and exit the same. */
async function assertSameCheck(path: string): Promise<void> {
  for (const extra of [[], ["--output=json"]]) {
    const json = extra.length > 0;
    const theirs = await runTool("qemu-img", ["check", ...extra, path]);
    const ours = await vstor("check", ...extra, path);
    assert.deepEqual(
      comparable(ours, json),
      comparable(theirs, json),
      `check ${extra.join(" ")} ${path}\n=== vstor\n${transcript(ours)}\n=== qemu-img\n${
        transcript(theirs)
      }`,
    );
  }
}

// ---- damaged images ----

/** One image configuration the damage runs on. */
interface DamageConfig {
  name: string;
  options: string;
  clusterSize: number;
  size: number;
  v3: boolean;
}

const DAMAGE_CONFIGS: DamageConfig[] = [
  {
    name: "v3, 64 KiB clusters",
    options: "compat=1.1,cluster_size=65536",
    clusterSize: 64 * KiB,
    size: 4 * MiB,
    v3: true,
  },
  {
    name: "v2, 4 KiB clusters",
    options: "compat=0.10,cluster_size=4096",
    clusterSize: 4 * KiB,
    size: 4 * MiB,
    v3: false,
  },
  {
    name: "v3, extended L2, 64 KiB clusters",
    options: "compat=1.1,extended_l2=on,cluster_size=65536",
    clusterSize: 64 * KiB,
    size: 4 * MiB,
    v3: true,
  },
  {
    name: "v3, 4-bit refcounts, 512-byte clusters",
    options: "compat=1.1,refcount_bits=4,cluster_size=512",
    clusterSize: 512,
    size: 1 * MiB,
    v3: true,
  },
];

/** The undamaged images one configuration's damage starts from. */
interface Bases {
  /**
   * Data in guest clusters 0..2, 5 and the last; 3 discarded (a free hole); 4 zeroed in place;
   * 6 compressed.
   */
  plain: string;
  /** `plain` with one snapshot and no writes since: every table and data cluster is shared. */
  snapshot: string;
}

const bases = new Map<string, Promise<Bases>>();

function basesFor(c: DamageConfig): Promise<Bases> {
  let made = bases.get(c.name);
  if (made === undefined) {
    made = makeBases(c);
    bases.set(c.name, made);
  }
  return made;
}

async function makeBases(c: DamageConfig): Promise<Bases> {
  const cs = c.clusterSize;
  const stem = join(dir, c.name.replace(/[^a-z0-9]+/gi, "_"));
  const plain = `${stem}_plain.qcow2`, snapshot = `${stem}_snapshot.qcow2`;
  await qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", c.options, plain, `${c.size}`);
  await qemu(
    "qemu-io",
    ...[
      `write -P 0x11 0 ${3 * cs}`,
      `write -P 0x22 ${3 * cs} ${cs}`,
      `write -P 0x33 ${4 * cs} ${cs}`,
      `write -P 0x44 ${5 * cs} ${cs}`,
      `write -P 0x55 ${c.size - cs} ${cs}`,
      `write -c -P 0x66 ${6 * cs} ${cs}`,
      `discard ${3 * cs} ${cs}`,
      `write -z ${4 * cs} ${cs}`,
      "flush",
    ].flatMap((cmd) => ["-c", cmd]),
    plain,
  );
  await Deno.copyFile(plain, snapshot);
  await qemu("qemu-img", "snapshot", "-c", "s1", snapshot);
  return { plain, snapshot };
}

/** One kind of damage, and what QEMU's repair makes of it. */
interface Damage {
  name: string;
  base: keyof Bases;
  /** Whether `qemu-img check -r all` leaves the image clean. */
  repairable: boolean;
  /** Whether the guest data survives (reads as before the damage once repaired). */
  dataIntact: boolean;
  /** Whether the damage can be expressed in this configuration. */
  applies?: (c: DamageConfig) => boolean;
  apply(image: Qcow2Patcher): void;
}

const clusterOver512 = (c: DamageConfig) => c.clusterSize > 512;

/** Rewrite the active L2 entry of guest byte `guestOffset`. */
function patchL2(image: Qcow2Patcher, guestOffset: number, fn: (entry: bigint) => bigint): void {
  const slot = image.slotFor(guestOffset);
  if (slot === undefined) throw new Error(`guest offset ${guestOffset} has no L2 table`);
  image.setL2Entry(slot.l2Offset, slot.l2Index, fn(slot.entry));
}

const DAMAGES: Damage[] = [
  {
    name: "a leaked cluster inside the file",
    base: "plain",
    repairable: true,
    dataIntact: true,
    apply(image) {
      const free = image.freeClusterInFile();
      if (free === undefined) throw new Error("the base image has no free cluster to leak");
      image.setRefcount(free, 1);
    },
  },
  {
    name: "leaked clusters in a grown file",
    base: "plain",
    repairable: true,
    dataIntact: true,
    apply(image) {
      const cs = image.layout.clusterSize;
      const end = Math.ceil(image.fileSize() / cs);
      image.truncate((end + 2) * cs);
      image.setRefcount(end, 1);
      image.setRefcount(end + 1, 3);
    },
  },
  {
    name: "a refcount past the end of the file (ignored)",
    base: "plain",
    repairable: true,
    dataIntact: true,
    apply(image) {
      const cs = image.layout.clusterSize;
      image.setRefcount(Math.ceil(image.fileSize() / cs) + 1, 1);
    },
  },
  {
    name: "a used data cluster's refcount too high",
    base: "plain",
    repairable: true,
    dataIntact: true,
    apply(image) {
      image.setRefcount(image.hostClusterOf(0), 2);
    },
  },
  {
    name: "a shared data cluster's refcount too low after a snapshot",
    base: "snapshot",
    repairable: true,
    dataIntact: true,
    apply(image) {
      image.setRefcount(image.hostClusterOf(0), 1);
    },
  },
  {
    name: "a used data cluster's refcount 0",
    base: "plain",
    repairable: true,
    dataIntact: true,
    apply(image) {
      image.setRefcount(image.hostClusterOf(image.layout.clusterSize), 0);
    },
  },
  {
    name: "an L2 table's refcount 0",
    base: "plain",
    repairable: true,
    dataIntact: true,
    apply(image) {
      const slot = image.slotFor(0)!;
      image.setRefcount(slot.l2Offset / image.layout.clusterSize, 0);
    },
  },
  {
    name: "COPIED missing from an L1 entry",
    base: "plain",
    repairable: true,
    dataIntact: true,
    apply(image) {
      image.setL1Entry(0, image.l1Entry(0) & ~COPIED);
    },
  },
  {
    name: "COPIED set in an L1 entry of a shared L2 table",
    base: "snapshot",
    repairable: true,
    dataIntact: true,
    apply(image) {
      image.setL1Entry(0, image.l1Entry(0) | COPIED);
    },
  },
  {
    name: "COPIED missing from an L2 entry",
    base: "plain",
    repairable: true,
    dataIntact: true,
    apply(image) {
      patchL2(image, 0, (entry) => entry & ~COPIED);
    },
  },
  {
    name: "COPIED set in an L2 entry of a shared cluster",
    base: "snapshot",
    repairable: true,
    dataIntact: true,
    apply(image) {
      patchL2(image, 0, (entry) => entry | COPIED);
    },
  },
  {
    name: "COPIED set on a compressed L2 entry",
    base: "plain",
    repairable: false,
    dataIntact: true,
    apply(image) {
      patchL2(image, 6 * image.layout.clusterSize, (entry) => entry | COPIED);
    },
  },
  {
    name: "a subcluster both allocated and reading as zeroes",
    base: "plain",
    repairable: false,
    dataIntact: false,
    applies: (c) => c.options.includes("extended_l2=on"),
    apply(image) {
      const slot = image.slotFor(0)!;
      const bitmap = image.l2Bitmap(slot.l2Offset, slot.l2Index);
      image.setL2Bitmap(slot.l2Offset, slot.l2Index, bitmap | 1n | (1n << 32n));
    },
  },
  {
    name: "a compressed entry with a subcluster bitmap",
    base: "plain",
    repairable: false,
    dataIntact: true,
    applies: (c) => c.options.includes("extended_l2=on"),
    apply(image) {
      const slot = image.slotFor(6 * image.layout.clusterSize)!;
      image.setL2Bitmap(slot.l2Offset, slot.l2Index, 1n);
    },
  },
  {
    name: "an L2 entry pointing into the header, unaligned",
    base: "plain",
    repairable: false,
    dataIntact: false,
    applies: clusterOver512,
    apply(image) {
      patchL2(image, 0, (entry) => (entry & ~OFFSET_MASK) | 0x200n);
    },
  },
  {
    name: "an L2 entry pointing at the refcount table",
    base: "plain",
    repairable: true,
    dataIntact: false,
    apply(image) {
      const table = BigInt(image.layout.refcountTableOffset);
      patchL2(image, 0, (entry) => (entry & ~OFFSET_MASK) | table);
    },
  },
  {
    name: "an unaligned L2 entry of a data cluster",
    base: "plain",
    repairable: false,
    dataIntact: false,
    applies: clusterOver512,
    apply(image) {
      patchL2(image, 0, (entry) => entry + 0x200n);
    },
  },
  {
    name: "an unaligned L2 entry of a preallocated zero cluster",
    base: "plain",
    repairable: true,
    dataIntact: true,
    applies: (c) => c.v3 && clusterOver512(c),
    apply(image) {
      patchL2(image, 4 * image.layout.clusterSize, (entry) => entry + 0x200n);
    },
  },
  {
    name: "an L2 entry with reserved bits set",
    base: "plain",
    repairable: false,
    dataIntact: true,
    apply(image) {
      patchL2(image, 0, (entry) => entry | 0x2n);
    },
  },
  {
    name: "an L1 entry with reserved bits set",
    base: "plain",
    repairable: false,
    dataIntact: true,
    apply(image) {
      image.setL1Entry(0, image.l1Entry(0) | 0x2n);
    },
  },
  {
    name: "an L2 entry pointing past the end of the file",
    base: "plain",
    repairable: false,
    dataIntact: false,
    apply(image) {
      const cs = image.layout.clusterSize;
      const past = BigInt((Math.ceil(image.fileSize() / cs) + 10) * cs);
      patchL2(image, 0, (entry) => (entry & ~OFFSET_MASK) | past);
    },
  },
  {
    name: "an L1 entry pointing at an unaligned L2 table",
    base: "plain",
    repairable: false,
    dataIntact: false,
    applies: clusterOver512,
    apply(image) {
      image.setL1Entry(0, image.l1Entry(0) + 0x200n);
    },
  },
];

/** Run `qemu-img check -r` and `vstor check -r` on copies at one path, so outputs name it alike. */
async function repairBoth(damaged: string, mode: "leaks" | "all", work: string) {
  const path = join(work, "repair.qcow2");
  await Deno.copyFile(damaged, path);
  const theirs = await runTool("qemu-img", ["check", "-r", mode, path]);
  const qemuCopy = join(work, `qemu_${mode}.qcow2`);
  await Deno.rename(path, qemuCopy);
  await Deno.copyFile(damaged, path);
  const ours = await vstor("check", "-r", mode, path);
  const vstorCopy = join(work, `vstor_${mode}.qcow2`);
  await Deno.rename(path, vstorCopy);
  return { theirs, ours, qemuCopy, vstorCopy };
}

for (const config of DAMAGE_CONFIGS) {
  for (const damage of DAMAGES) {
    if (damage.applies && !damage.applies(config)) continue;
    Deno.test({
      name:
        `vstor check reports and repairs ${damage.name} as qemu-img check does (${config.name})`,
      ignore,
      async fn(t) {
        const base = (await basesFor(config))[damage.base];
        const work = await Deno.makeTempDir({ dir, prefix: "case_" });
        const damaged = join(work, "damaged.qcow2");
        await Deno.copyFile(base, damaged);
        patchImage(damaged, (image) => damage.apply(image));
        const before = await Deno.readFile(damaged);

        await t.step("the check prints the same, human and JSON", async () => {
          await assertSameCheck(damaged);
          assert.deepEqual(await Deno.readFile(damaged), before, "a check without -r wrote");
        });

        for (const mode of ["leaks", "all"] as const) {
          await t.step(`-r ${mode} ends as qemu-img check -r ${mode} does`, async () => {
            const r = await repairBoth(damaged, mode, work);
            const both = `=== vstor check -r ${mode}\n${transcript(r.ours)}\n` +
              `=== qemu-img check -r ${mode}\n${transcript(r.theirs)}`;
            assert.equal(r.ours.code, r.theirs.code, `exit codes differ\n${both}`);
            const after = await runTool("qemu-img", ["check", r.vstorCopy]);
            const afterQemu = await runTool("qemu-img", ["check", r.qemuCopy]);
            assert.equal(
              after.code,
              afterQemu.code,
              `qemu-img check after each tool's repair\n=== after vstor\n${
                transcript(after)
              }\n=== after qemu-img\n${transcript(afterQemu)}`,
            );
            if (mode === "all" && damage.repairable) {
              assert.equal(
                after.code,
                0,
                `qemu-img check after vstor -r all\n${transcript(after)}`,
              );
            }
            // Guest data must survive a repair that leaves the image clean (a still-corrupt one
            // may not even open).
            if (damage.dataIntact && after.code === 0) {
              const cmp = await runTool("qemu-img", ["compare", base, r.vstorCopy]);
              assert.equal(cmp.code, 0, `guest data after vstor -r ${mode}\n${transcript(cmp)}`);
            }
            // Beyond the exit code: what the repair prints.
            assert.deepEqual(
              comparable(r.ours, false),
              comparable(r.theirs, false),
              `repair output differs\n${both}`,
            );
          });
        }
      },
    });
  }
}

// ---- the undamaged corpus ----

/** Guest writes that leave data, zero-plain and zero-alloc clusters and a discarded hole. */
function corpusWrites(clusterSize: number, size: number): string[] {
  const cs = clusterSize;
  return [
    `write -P 0x11 0 ${Math.max(100 * KiB, 3 * cs)}`,
    `write -z ${Math.max(300 * KiB, 4 * cs)} ${cs}`,
    `write -P 0x22 ${size - 3000} 3000`,
    `write -z -u ${Math.max(64 * KiB, cs)} ${cs}`,
    `discard 0 ${cs}`,
    `write -P 0x33 ${size / 2 + 1000} ${2 * cs}`,
  ];
}

async function qemuIo(image: string, commands: string[]): Promise<void> {
  await qemu("qemu-io", ...commands.flatMap((cmd) => ["-c", cmd]), image);
}

async function newQcow2(path: string, options: string, size: number, writes = true) {
  await qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", options, path, `${size}`);
  if (writes) {
    const cs = Number(options.match(/cluster_size=(\d+)/)?.[1] ?? 65536);
    await qemuIo(path, corpusWrites(cs, size));
  }
}

/** A source for compressed images: runs that compress, random runs that do not, zero runs. */
async function mixedSource(path: string): Promise<void> {
  const size = 4 * MiB, chunk = 64 * KiB;
  const data = new Uint8Array(size);
  for (let at = 0, i = 0; at < size; at += chunk, i++) {
    if (i % 3 === 0) data.fill(1 + (i % 250), at, at + chunk);
    else if (i % 3 === 1) data.set(randomBytes(DATA_SEED + i, chunk), at);
  }
  await Deno.writeFile(path, data);
}

interface CorpusImage {
  name: string;
  /** Make the image under `work`, returning the paths to check. */
  make(work: string): Promise<string[]>;
}

const CORPUS: CorpusImage[] = [
  {
    name: "a raw image (no checks: exit 63)",
    async make(work) {
      const path = join(work, "raw.img");
      await qemu("qemu-img", "create", "-q", "-f", "raw", path, "1M");
      await qemu("qemu-io", "-f", "raw", "-c", "write -P 0x11 4096 4096", path);
      return [path];
    },
  },
  ...["0.10", "1.1"].flatMap((compat) =>
    [512, 4 * KiB, 64 * KiB, 2 * MiB].map((clusterSize): CorpusImage => ({
      name: `a qcow2 ${compat === "0.10" ? "v2" : "v3"} image with ${clusterSize}-byte clusters`,
      async make(work) {
        const path = join(work, "image.qcow2");
        const size = Math.max(8 * MiB, 16 * clusterSize);
        await newQcow2(path, `compat=${compat},cluster_size=${clusterSize}`, size);
        return [path];
      },
    }))
  ),
  ...(["zlib", "zstd"] as const).map((type): CorpusImage => ({
    name: `a compressed image (qemu-img convert -c, ${type}, data seed 0x${
      DATA_SEED.toString(16)
    })`,
    async make(work) {
      const source = join(work, "source.raw"), path = join(work, "image.qcow2");
      await mixedSource(source);
      await qemu(
        "qemu-img",
        ...["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", `compression_type=${type}`],
        source,
        path,
      );
      // Partly overwritten compressed clusters become normal ones.
      await qemuIo(path, ["write -P 0x99 100000 5000", "write -z 200000 70000"]);
      return [path];
    },
  })),
  {
    name: "an image with zero-plain and preallocated zero clusters",
    async make(work) {
      const path = join(work, "image.qcow2");
      await newQcow2(path, "compat=1.1,preallocation=metadata", 4 * MiB, false);
      await qemuIo(path, [
        "write -P 0x11 0 1M",
        "write -z 0 128k",
        "write -z -u 256k 128k",
        "write -z 2M 64k",
        "write -z -u 3M 64k",
      ]);
      return [path];
    },
  },
  {
    name: "an image with extended L2 entries and subcluster writes",
    async make(work) {
      const path = join(work, "image.qcow2");
      await newQcow2(path, "compat=1.1,extended_l2=on,cluster_size=65536", 8 * MiB);
      await qemuIo(path, ["write -P 0x44 1M 2048", "write -z 1M 4096", "write -P 0x45 2M 65536"]);
      return [path];
    },
  },
  {
    name: "images with 1-bit and 64-bit refcounts",
    async make(work) {
      const one = join(work, "one.qcow2"), wide = join(work, "wide.qcow2");
      await newQcow2(one, "compat=1.1,refcount_bits=1,cluster_size=4096", 4 * MiB);
      await newQcow2(wide, "compat=1.1,refcount_bits=64,cluster_size=4096", 4 * MiB);
      return [one, wide];
    },
  },
  {
    name: "an image with snapshots",
    async make(work) {
      const path = join(work, "image.qcow2");
      await newQcow2(path, "compat=1.1", 8 * MiB);
      await qemu("qemu-img", "snapshot", "-c", "a", path);
      await qemuIo(path, ["write -P 0x66 0 200k", "write -z -u 5M 64k"]);
      await qemu("qemu-img", "snapshot", "-c", "b", path);
      await qemuIo(path, ["write -P 0x67 64k 64k"]);
      await qemu("qemu-img", "snapshot", "-c", "c", path);
      await qemu("qemu-img", "snapshot", "-d", "b", path);
      return [path];
    },
  },
  {
    name: "every layer of a 3-deep backing chain",
    async make(work) {
      const names = ["base.qcow2", "middle.qcow2", "top.qcow2"];
      const paths = names.map((name) => join(work, name));
      await newQcow2(paths[0]!, "compat=1.1", 8 * MiB);
      for (let i = 1; i < 3; i++) {
        await qemu(
          "qemu-img",
          ...["create", "-q", "-f", "qcow2", "-b", names[i - 1]!, "-F", "qcow2"],
          paths[i]!,
        );
        await qemuIo(paths[i]!, [`write -P ${0x70 + i} ${i * MiB} 1M`, `write -z ${i * 64}k 64k`]);
      }
      return paths;
    },
  },
];

for (const image of CORPUS) {
  Deno.test({
    name: `vstor check prints what qemu-img check prints for ${image.name}`,
    ignore,
    async fn() {
      const work = await Deno.makeTempDir({ dir, prefix: "corpus_" });
      for (const path of await image.make(work)) await assertSameCheck(path);
    },
  });
}

Deno.test({
  name: "vstor check on a raw image exits 63 like qemu-img check, with -f raw and with -r",
  ignore,
  async fn() {
    const path = join(dir, "plain.raw");
    await qemu("qemu-img", "create", "-q", "-f", "raw", path, "64k");
    for (const extra of [["-f", "raw"], ["-r", "all"], ["-f", "raw", "--output=json"]]) {
      const theirs = await runTool("qemu-img", ["check", ...extra, path]);
      const ours = await vstor("check", ...extra, path);
      assert.equal(theirs.code, 63, transcript(theirs));
      assert.deepEqual(comparable(ours, false), comparable(theirs, false), extra.join(" "));
    }
  },
});
