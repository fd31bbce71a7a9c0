/**
 * Differential tests: the same qemu-io commands run through `qemu-io` on one copy of a qcow2 image
 * and through `vstor io` on an identical copy must leave images `qemu-img compare` finds equal, and
 * vstor's copy must pass `qemu-img check` with no errors and no leaks. The random scripts come from
 * a fixed seed printed in the test name (override with VSTOR_QCOW2_SEED); on a failure the shortest
 * failing prefix of the script is found and reported.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { ignoreWithout, runTool } from "./qemu.ts";
import {
  assertSameBytes,
  KiB,
  MiB,
  prng,
  randomBytes,
  readWithVstor,
  vstor,
  withTempDir,
} from "./qcow2_matrix.ts";

const ignore = ignoreWithout("qemu-img") || ignoreWithout("qemu-io");
const COMMANDS = 150;

interface Config {
  name: string;
  /** qemu-img create -o. */
  options: string;
  clusterSize: number;
  /** Subcluster size with extended L2, else the cluster size. */
  unit: number;
  size: number;
  seed: number;
}

const seedOverride = Deno.env.get("VSTOR_QCOW2_SEED");

function config(name: string, options: string, clusterSize: number, size: number, seed: number) {
  const extendedL2 = options.includes("extended_l2=on");
  return {
    name,
    options: `${options},cluster_size=${clusterSize}`,
    clusterSize,
    unit: extendedL2 ? clusterSize / 32 : clusterSize,
    size,
    seed: seedOverride === undefined ? seed : Number(seedOverride),
  } satisfies Config;
}

const CONFIGS: Config[] = [
  config("v3, 64 KiB clusters", "compat=1.1", 64 * KiB, 16 * MiB, 0x64000),
  config("v2, 4 KiB clusters", "compat=0.10", 4 * KiB, 6 * MiB, 0x4000),
  config("v3, extended L2, 32 KiB clusters", "compat=1.1,extended_l2=on", 32 * KiB, 8 * MiB, 0x32e),
  config("v3, 512-byte clusters", "compat=1.1", 512, 1 * MiB, 0x512),
  config(
    "v3, zstd, 4 KiB clusters, 64-bit refcounts",
    "compression_type=zstd,refcount_bits=64",
    4 * KiB,
    6 * MiB,
    0x2564,
  ),
];

/** A random script; random data for `-s` sources is returned beside it, keyed by file name. */
function generate(c: Config): { commands: string[]; sources: Map<string, Uint8Array> } {
  const next = prng(c.seed);
  const int = (n: number) => Math.floor(next() * n);
  const cs = c.clusterSize;
  const clusters = c.size / cs;
  /** Clusters any command touched: compressed writes only go to clusters nothing touched. */
  const touched = new Set<number>();
  /** Clusters holding compressed data; touching one may free its host cluster. */
  const compressed = new Set<number>();
  let fenced = false;
  const touch = (offset: number, length: number) => {
    for (let k = Math.floor(offset / cs); k * cs < offset + length; k++) {
      touched.add(k);
      if (compressed.delete(k)) fenced = true;
    }
  };
  const sources = new Map<string, Uint8Array>();
  const source = (length: number) => {
    const name = `source${sources.size}`;
    sources.set(name, randomBytes(c.seed * 7 + sources.size, length));
    return name;
  };
  /** A range: cluster-, unit-, sector- or byte-aligned, up to three clusters long. */
  const range = (): [number, number] => {
    const grain = [cs, c.unit, 512, 1][int(4)]!;
    const slots = Math.floor(c.size / grain);
    const length = grain * (1 + int(Math.max(1, Math.min(slots, Math.ceil(3 * cs / grain)))));
    const offset = grain * int(slots - length / grain + 1);
    return [offset, Math.min(length, c.size - offset)];
  };
  const commands: string[] = [];
  while (commands.length < COMMANDS) {
    const roll = next();
    if (roll < 0.05) {
      commands.push("flush");
    } else if (roll < 0.2) {
      // write -c: one to three whole clusters nothing has touched.
      const count = 1 + int(3);
      const first = int(clusters - count + 1);
      let free = true;
      for (let k = first; k < first + count; k++) if (touched.has(k)) free = false;
      if (!free) continue;
      const length = count * cs;
      const fill = next() < 0.3 ? `-s ${source(length)}` : `-P ${int(256)}`;
      // QEMU 7.2 keeps appending compressed data to the host cluster it last used even after that
      // cluster was freed and handed out again (as an L2 table: it marks the image corrupt; as
      // data: it corrupts it silently). A new process starts a fresh host cluster, so reopen
      // before compressing again once compressed data may have been freed.
      if (fenced) commands.push("reopen");
      fenced = false;
      commands.push(`write -q -c ${fill} ${first * cs} ${length}`);
      touch(first * cs, length);
      for (let k = first; k < first + count; k++) compressed.add(k);
    } else {
      const [offset, length] = range();
      touch(offset, length);
      if (roll < 0.55) {
        const fill = next() < 0.15 ? `-s ${source(length)}` : `-P ${int(256)}`;
        commands.push(`write -q ${fill} ${offset} ${length}`);
      } else if (roll < 0.7) {
        commands.push(`write -q -z ${offset} ${length}`);
      } else if (roll < 0.82) {
        commands.push(`write -q -z -u ${offset} ${length}`);
      } else {
        commands.push(`discard -q ${offset} ${length}`);
      }
    }
  }
  return { commands, sources };
}

interface Verdict {
  problems: string[];
}

/**
 * Run `commands` on two identical copies of a fresh image (one through qemu-io, one through
 * vstor io) and collect what is wrong. `dir` holds the `-s` sources.
 */
async function differential(
  c: Config,
  commands: string[],
  dir: string,
  tag: string,
  opts: { expectQemuOk?: boolean } = {},
): Promise<Verdict> {
  const qemuImage = join(dir, `${tag}.qemu.qcow2`);
  const vstorImage = join(dir, `${tag}.vstor.qcow2`);
  const created = await runTool("qemu-img", [
    "create",
    "-q",
    "-f",
    "qcow2",
    "-o",
    c.options,
    qemuImage,
    `${c.size}`,
  ]);
  assert.equal(created.code, 0, created.stderr);
  await Deno.copyFile(qemuImage, vstorImage);
  const resolved = commands.map((cmd) =>
    cmd.replace(/-s (\S+)/, (_, name) => `-s ${join(dir, name)}`)
  );
  // "reopen" splits the script: each part is one qemu-io / vstor io process.
  const sessions: string[][] = [[]];
  for (const cmd of resolved) {
    if (cmd === "reopen") sessions.push([]);
    else sessions.at(-1)!.push("-c", cmd);
  }
  const problems: string[] = [];
  try {
    let qemuCode = 0, vstorCode = 0, qemuSaid = "", vstorSaid = "";
    for (const args of sessions) {
      if (args.length === 0) continue;
      const qemu = await runTool("qemu-io", ["-f", "qcow2", ...args, qemuImage]);
      qemuCode = Math.max(qemuCode, qemu.code);
      qemuSaid += qemu.stdout + qemu.stderr;
      const ours = await vstor("io", "-f", "qcow2", ...args, vstorImage);
      vstorCode = Math.max(vstorCode, ours.code);
      vstorSaid += ours.output;
    }
    if ((opts.expectQemuOk ?? true) && qemuCode !== 0) {
      // A test bug (a script QEMU itself rejects), not a vstor one.
      throw new Error(`qemu-io failed:\n${qemuSaid}`);
    }
    // With -q only failures print: the same commands must fail, with the same errno.
    if (vstorCode !== qemuCode || vstorSaid.trim() !== qemuSaid.trim()) {
      problems.push(
        `vstor io exited ${vstorCode}, qemu-io ${qemuCode}:\n` +
          `vstor io said:\n${vstorSaid.trim()}\nqemu-io said:\n${qemuSaid.trim()}`,
      );
    }
    const compare = await runTool("qemu-img", [
      "compare",
      "-f",
      "qcow2",
      "-F",
      "qcow2",
      qemuImage,
      vstorImage,
    ]);
    if (compare.code !== 0) {
      problems.push(`qemu-img compare exited ${compare.code}: ${compare.stdout}${compare.stderr}`);
    }
    for (const [image, who] of [[vstorImage, "vstor"], [qemuImage, "qemu"]] as const) {
      const check = await runTool("qemu-img", ["check", "-f", "qcow2", image]);
      const text = (check.stdout + check.stderr).trim();
      if (check.code !== 0 || !text.includes("No errors were found") || /leak/i.test(text)) {
        problems.push(`qemu-img check on ${who}'s copy exited ${check.code}: ${text}`);
      }
    }
    // vstor also reads QEMU's copy as QEMU does.
    if (compare.code === 0) {
      try {
        assertSameBytes(
          await readWithVstor(qemuImage),
          await readWithVstor(vstorImage),
          "vstor reading qemu's copy vs its own",
        );
      } catch (e) {
        problems.push(e instanceof Error ? e.message : String(e));
      }
    }
  } finally {
    await Promise.all([Deno.remove(qemuImage), Deno.remove(vstorImage)]);
  }
  return { problems };
}

/** Smallest `n` for which the first `n` commands already fail (binary search; a good lower end). */
async function shortestFailingPrefix(
  c: Config,
  commands: string[],
  dir: string,
): Promise<number> {
  let good = 0, bad = commands.length;
  while (bad - good > 1) {
    const mid = Math.floor((good + bad) / 2);
    const { problems } = await differential(c, commands.slice(0, mid), dir, `prefix${mid}`);
    if (problems.length > 0) bad = mid;
    else good = mid;
  }
  return bad;
}

async function writeSources(dir: string, sources: Map<string, Uint8Array>): Promise<void> {
  for (const [name, data] of sources) await Deno.writeFile(join(dir, name), data);
}

for (const c of CONFIGS) {
  Deno.test({
    name: `vstor io and qemu-io leave the same qcow2 image after ${COMMANDS} random commands ` +
      `(${c.name}, ${c.options}, seed ${c.seed})`,
    ignore,
    async fn() {
      const { commands, sources } = generate(c);
      await withTempDir("vstor_qcow2_diff_", async (dir) => {
        await writeSources(dir, sources);
        const { problems } = await differential(c, commands, dir, "full");
        if (problems.length === 0) return;
        const n = await shortestFailingPrefix(c, commands, dir);
        const last = await differential(c, commands.slice(0, n), dir, "minimal");
        assert.fail(
          `${problems.join("\n")}\n\nThe first ${n} commands already fail; the last is ` +
            `'${commands[n - 1]}'. There:\n${last.problems.join("\n")}\n` +
            `Commands (qemu-io -c each; -s sources are seeded random data; reopen starts a new ` +
            `process):\n` +
            commands.slice(0, n).map((cmd, i) => `  ${i + 1}: ${cmd}`).join("\n"),
        );
      });
    },
  });
}

/**
 * Run a fixed script on each variant through both tools; assert they agree (output, exit code,
 * contents) and that vstor's copies pass qemu-img check.
 */
async function assertSameAsQemu(variants: Config[], commands: string[]): Promise<void> {
  const failures: string[] = [];
  await withTempDir("vstor_qcow2_diff_script_", async (dir) => {
    await Deno.writeFile(join(dir, "random"), randomBytes(99, 64 * KiB));
    for (const c of variants) {
      const { problems } = await differential(c, commands, dir, "script", {
        expectQemuOk: false,
      });
      if (problems.length > 0) failures.push(`${c.name}:\n${problems.join("\n")}`);
    }
  });
  assert.deepEqual(failures, [], `commands:\n${commands.join("\n")}`);
}

const V3 = config("v3", "compat=1.1", 64 * KiB, 4 * MiB, 1);
const V3_EXTL2 = config("v3, extended L2", "compat=1.1,extended_l2=on", 64 * KiB, 4 * MiB, 1);
const V2 = config("v2", "compat=0.10", 64 * KiB, 4 * MiB, 1);
const V3_PREALLOC = config(
  "v3, preallocated",
  "compat=1.1,preallocation=metadata",
  64 * KiB,
  4 * MiB,
  1,
);

Deno.test({
  name: "vstor io writes compressed clusters over zeroed and discarded clusters as qemu-io does",
  ignore,
  async fn() {
    // QEMU refuses a compressed write only where the L2 entry holds a host offset; a cluster made
    // zero by unmapping, zeroed while unallocated, or discarded has none.
    // (v2 images: see the write -z test below.)
    await assertSameAsQemu([V3, V3_EXTL2], [
      "write -q -P 1 0 64k",
      "write -q -z -u 0 64k",
      "write -q -c -P 2 0 64k",
      "write -q -z 64k 64k",
      "write -q -c -P 3 64k 64k",
      "write -q -P 4 128k 64k",
      "discard -q 128k 64k",
      "write -q -c -P 5 128k 64k",
    ]);
  },
});

Deno.test({
  name: "vstor io writes incompressible data given to write -c over allocated clusters as " +
    "qemu-io does",
  ignore,
  async fn() {
    // QEMU compresses first; data that does not shrink is written normally, wherever it goes.
    await assertSameAsQemu([V3, V3_EXTL2, V2, V3_PREALLOC], [
      "write -q -P 8 256k 64k",
      "write -q -c -s random 256k 64k",
      "write -q -c -s random 512k 64k",
    ]);
  },
});

Deno.test({
  name: "vstor io fails write -c over allocated clusters with qemu-io's error",
  ignore,
  async fn() {
    // Compression never overwrites: QEMU fails with EIO over data, a zero-allocated cluster
    // (v3 write -z without unmap keeps the cluster) and preallocated clusters.
    await assertSameAsQemu([V3, V3_EXTL2, V3_PREALLOC], [
      "write -q -P 9 320k 64k",
      "write -q -c -P 10 320k 64k",
      "write -q -P 6 192k 64k",
      "write -q -z 192k 64k",
      "write -q -c -P 7 192k 64k",
      "write -q -c -P 11 1M 64k",
    ]);
  },
});

Deno.test({
  name: "vstor io frees whole clusters write -z zeroes in a v2 image as qemu-io does",
  ignore,
  async fn() {
    // v2 has no zero flag: without a backing file QEMU discards whole clusters instead (so a
    // compressed write may follow); vstor must not keep them allocated.
    await assertSameAsQemu([V2], [
      "write -q -P 1 0 128k",
      "write -q -z 0 64k",
      "write -q -z -u 64k 64k",
      "write -q -c -P 2 0 64k",
      "write -q -c -P 3 64k 64k",
    ]);
  },
});

Deno.test({
  name: "vstor io handles the partial last cluster (compressed, rewritten, zeroed, discarded) " +
    "as qemu-io does",
  ignore,
  async fn() {
    // 1 MiB + 1536 bytes: the last cluster is partial; write -c and discard may cover it.
    const size = MiB + 1536;
    await assertSameAsQemu([
      config("v3", "compat=1.1", 64 * KiB, size, 1),
      config("v3, extended L2", "compat=1.1,extended_l2=on", 64 * KiB, size, 1),
      config("v2", "compat=0.10", 64 * KiB, size, 1),
      config("v3, 512-byte clusters", "compat=1.1", 512, size, 1),
    ], [
      `write -q -c -P 1 ${MiB} 1536`,
      `write -q -P 2 ${MiB + 424} 500`,
      `write -q -c -P 5 ${MiB - 64 * KiB} 64k`,
      `write -q -P 4 ${MiB - 576} 2112`,
      `write -q -z ${MiB + 512} 1024`,
      `write -q -z -u ${MiB} 1536`,
      `discard -q ${MiB - 64 * KiB} ${64 * KiB + 1536}`,
      `write -q -P 7 ${size - 112} 112`,
    ]);
  },
});
