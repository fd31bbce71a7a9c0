/**
 * Internal snapshots across tools: snapshots `vstor snapshot` makes are listed, applied and deleted
 * by `qemu-img snapshot` and the reverse, on one image the two tools take turns over a seeded
 * sequence, with `qemu-img check` clean after every step, listings compared line for line, and
 * the guest contents checked (qemu-io / vstor io `read -P`) at every snapshot applied.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { main } from "../../src/cli/main.ts";
import { ignoreWithout, runTool, type ToolResult } from "./qemu.ts";
import { assertCheckClean, KiB, MiB, prng, withTempDir } from "./qcow2_matrix.ts";

const ignore = ignoreWithout("qemu-img") || ignoreWithout("qemu-io");

// ---- tools ----

/** Run `vstor ARGS...` in-process, keeping stdout and stderr apart. */
async function vstor(...args: string[]): Promise<ToolResult> {
  let stdout = "", stderr = "";
  const code = await main(args, { stdout: (s) => stdout += s, stderr: (s) => stderr += s });
  return { code, stdout, stderr };
}

async function vstorOk(...args: string[]): Promise<string> {
  const r = await vstor(...args);
  assert.equal(r.code, 0, `vstor ${args.join(" ")} exited ${r.code}:\n${r.stdout}${r.stderr}`);
  return r.stdout;
}

async function qemuOk(tool: "qemu-img" | "qemu-io", ...args: string[]): Promise<string> {
  const r = await runTool(tool, args);
  assert.equal(r.code, 0, `${tool} ${args.join(" ")} exited ${r.code}:\n${r.stdout}${r.stderr}`);
  return r.stdout;
}

type Tool = "vstor" | "qemu";

/** `qemu-img snapshot ARGS` or `vstor snapshot ARGS`, which must succeed. */
async function snapshot(tool: Tool, ...args: string[]): Promise<string> {
  return tool === "vstor"
    ? await vstorOk("snapshot", ...args)
    : await qemuOk("qemu-img", "snapshot", ...args);
}

/** Run qemu-io commands through qemu-io or vstor io; every command must succeed. */
async function io(tool: Tool, image: string, commands: string[]): Promise<void> {
  const args = ["-f", "qcow2", ...commands.flatMap((c) => ["-c", c]), image];
  const r = tool === "vstor" ? await vstor("io", ...args) : await runTool("qemu-io", args);
  const out = r.stdout + r.stderr;
  assert.equal(r.code, 0, `${tool} io ${commands.join("; ")} exited ${r.code}:\n${out}`);
  assert.doesNotMatch(out, /failed|error/i, `${tool} io ${commands.join("; ")}:\n${out}`);
}

// ---- the guest model: a few regions, each holding one pattern ----

interface Region {
  offset: number;
  length: number;
}

/** Aligned, unaligned and cluster-crossing ranges, at the start, the middle and the end. */
function regionsFor(clusterSize: number, size: number): Region[] {
  return [
    { offset: 0, length: clusterSize },
    { offset: 3 * clusterSize + 100, length: clusterSize + 200 },
    { offset: size / 2 - 300, length: 600 },
    { offset: size - clusterSize, length: clusterSize },
  ];
}

/** The pattern each region reads as (0: never written). */
type GuestState = readonly number[];

/** Hands out patterns never used before in a test, so each state is distinguishable. */
function patternSource(): () => number {
  let next = 0;
  return () => 1 + (next++ % 255);
}

function writeCommands(regions: Region[], state: GuestState, changed: number[]): string[] {
  return changed.map((i) => `write -P ${state[i]} ${regions[i]!.offset} ${regions[i]!.length}`);
}

function readCommands(regions: Region[], state: GuestState): string[] {
  return regions.map((r, i) => `read -P ${state[i]} ${r.offset} ${r.length}`);
}

/** Write new patterns to the regions `changed` with `tool`; returns the new state. */
async function writeState(
  tool: Tool,
  image: string,
  regions: Region[],
  state: GuestState,
  changed: number[],
  pattern: () => number,
): Promise<GuestState> {
  const next = [...state];
  for (const i of changed) next[i] = pattern();
  await io(tool, image, writeCommands(regions, next, changed));
  return next;
}

async function assertState(tool: Tool, image: string, regions: Region[], state: GuestState) {
  await io(tool, image, readCommands(regions, state));
}

// ---- listings ----

/** One row of the snapshot table as listed. */
interface Listed {
  id: string;
  tag: string;
}

/**
 * Assert `vstor snapshot -l` prints exactly the lines `qemu-img snapshot -l` prints, and that the
 * tags are `tags`, in order; returns the rows.
 */
async function assertSameListing(image: string, tags: string[]): Promise<Listed[]> {
  const theirs = await qemuOk("qemu-img", "snapshot", "-l", image);
  const ours = await vstorOk("snapshot", "-l", image);
  assert.deepEqual(ours.split("\n"), theirs.split("\n"), "vstor snapshot -l vs qemu-img");
  const lines = theirs.split("\n").filter((l) => l !== "");
  if (tags.length === 0) {
    assert.deepEqual(lines, [], "an image without snapshots lists nothing");
    return [];
  }
  assert.equal(lines[0], "Snapshot list:");
  assert.match(lines[1] ?? "", /^ID\s+TAG\s+VM SIZE\s+DATE\s+VM CLOCK\s+ICOUNT$/);
  const rows = lines.slice(2).map((line) => {
    const [id = "", tag = ""] = line.split(/\s+/);
    return { id, tag };
  });
  assert.deepEqual(rows.map((r) => r.tag), tags, `snapshot tags:\n${theirs}`);
  return rows;
}

// ---- one tool makes, the other uses ----

async function makeImage(tool: Tool, image: string, options: string, size: number) {
  if (tool === "vstor") {
    await vstorOk("create", "-q", "-f", "qcow2", "-o", options, image, `${size}`);
  } else await qemuOk("qemu-img", "create", "-q", "-f", "qcow2", "-o", options, image, `${size}`);
}

/**
 * `maker` writes three states and snapshots each, then a fourth it leaves active; `user` lists,
 * applies each snapshot (checking the contents with its own io), and deletes them all.
 */
async function handOver(maker: Tool, user: Tool): Promise<void> {
  await withTempDir("vstor_snapshot_interop_", async (dir) => {
    const image = join(dir, "image.qcow2");
    const cs = 64 * KiB, size = 8 * MiB;
    const regions = regionsFor(cs, size);
    const pattern = patternSource();
    await makeImage(maker, image, `compat=1.1,cluster_size=${cs}`, size);
    let state: GuestState = regions.map(() => 0);
    const states = new Map<string, GuestState>();
    const tags: string[] = [];
    for (const [k, changed] of [[0, 1, 2, 3], [1, 3], [0, 2]].entries()) {
      state = await writeState(maker, image, regions, state, changed, pattern);
      const tag = `s${k + 1}`;
      await snapshot(maker, "-c", tag, image);
      states.set(tag, state);
      tags.push(tag);
      await assertCheckClean(image, `after ${maker} snapshot -c ${tag}`);
      await assertSameListing(image, tags);
    }
    state = await writeState(maker, image, regions, state, [0, 1, 2, 3], pattern);

    for (const tag of ["s2", "s1", "s3", "s1"]) {
      await snapshot(user, "-a", tag, image);
      await assertCheckClean(image, `after ${user} snapshot -a ${tag}`);
      state = states.get(tag)!;
      await assertState(user, image, regions, state);
      await assertSameListing(image, tags);
    }
    // The applied state is the active one now: writing it must not touch the snapshots.
    state = await writeState(user, image, regions, state, [1, 2], pattern);
    for (const tag of ["s2", "s1", "s3"]) {
      await snapshot(user, "-d", tag, image);
      tags.splice(tags.indexOf(tag), 1);
      await assertCheckClean(image, `after ${user} snapshot -d ${tag}`);
      await assertSameListing(image, tags);
      await assertState(user, image, regions, state);
      if (tags.length > 0) {
        // A surviving snapshot still holds its contents (checked on a copy, by the maker).
        const copy = join(dir, "copy.qcow2");
        await Deno.copyFile(image, copy);
        await snapshot(maker, "-a", tags[0]!, copy);
        await assertState(maker, copy, regions, states.get(tags[0]!)!);
      }
    }
  });
}

Deno.test({
  name: "snapshots vstor makes are listed, applied and deleted by qemu-img",
  ignore,
  fn: () => handOver("vstor", "qemu"),
});

Deno.test({
  name: "snapshots qemu-img makes are listed, applied and deleted by vstor",
  ignore,
  fn: () => handOver("qemu", "vstor"),
});

// ---- mixed: the tools take turns over a seeded sequence ----

interface MixedConfig {
  name: string;
  options: string;
  clusterSize: number;
  size: number;
  seed: number;
}

const seedOverride = Deno.env.get("VSTOR_SNAPSHOT_SEED");
const MIXED_STEPS = 28;
/** Live snapshots at most: 4-bit refcounts overflow past 15 references. */
const MAX_LIVE = 4;

const MIXED: MixedConfig[] = [
  { name: "v3, 64 KiB clusters", options: "compat=1.1,cluster_size=65536" },
  { name: "v2, 4 KiB clusters", options: "compat=0.10,cluster_size=4096" },
  {
    name: "v3, extended L2, 64 KiB clusters",
    options: "compat=1.1,extended_l2=on,cluster_size=65536",
  },
  {
    name: "v3, 4-bit refcounts, 512-byte clusters",
    options: "compat=1.1,refcount_bits=4,cluster_size=512",
  },
].map((c, i) => {
  const clusterSize = Number(c.options.match(/cluster_size=(\d+)/)![1]);
  return {
    ...c,
    clusterSize,
    size: clusterSize === 512 ? 1 * MiB : 8 * MiB,
    seed: seedOverride === undefined ? 0x5ab0 + i : Number(seedOverride),
  };
});

const other = (tool: Tool): Tool => tool === "vstor" ? "qemu" : "vstor";

for (const config of MIXED) {
  Deno.test({
    name: `vstor and qemu-img take turns creating, applying and deleting snapshots on one image ` +
      `(${config.name}, seed ${config.seed})`,
    ignore,
    async fn() {
      await withTempDir("vstor_snapshot_mixed_", async (dir) => {
        const image = join(dir, "image.qcow2");
        const random = prng(config.seed);
        const pick = <T>(items: readonly T[]): T => items[Math.floor(random() * items.length)]!;
        const regions = regionsFor(config.clusterSize, config.size);
        const pattern = patternSource();
        const log: string[] = [];
        let tool: Tool = random() < 0.5 ? "vstor" : "qemu";
        await makeImage(tool, image, config.options, config.size);
        log.push(`${tool} create ${config.options}`);
        let state: GuestState = regions.map(() => 0);
        const live: { tag: string; id: string; state: GuestState }[] = [];
        let made = 0;
        const context = () => `seed ${config.seed}, steps:\n  ${log.join("\n  ")}`;
        try {
          for (let step = 0; step < MIXED_STEPS; step++) {
            tool = other(tool);
            const roll = random();
            if (roll < 0.3 || live.length === 0 && roll < 0.5) {
              const changed = regions.map((_, i) => i).filter(() => random() < 0.5);
              if (changed.length === 0) changed.push(Math.floor(random() * regions.length));
              state = await writeState(tool, image, regions, state, changed, pattern);
              log.push(`${tool} io write regions ${changed.join(",")} -> [${state.join(",")}]`);
              await assertState(other(tool), image, regions, state);
            } else if (roll < 0.6 && live.length < MAX_LIVE || live.length === 0) {
              const tag = `snap${++made}`;
              log.push(`${tool} snapshot -c ${tag}`);
              await snapshot(tool, "-c", tag, image);
              const rows = await assertSameListing(image, [...live.map((s) => s.tag), tag]);
              live.push({ tag, id: rows.at(-1)!.id, state });
            } else if (roll < 0.82) {
              const target = pick(live);
              const key = random() < 0.3 ? target.id : target.tag;
              log.push(`${tool} snapshot -a ${key} (${target.tag})`);
              await snapshot(tool, "-a", key, image);
              state = target.state;
              await assertState(other(tool), image, regions, state);
              await assertSameListing(image, live.map((s) => s.tag));
            } else {
              const target = pick(live);
              log.push(`${tool} snapshot -d ${target.tag}`);
              await snapshot(tool, "-d", target.tag, image);
              live.splice(live.indexOf(target), 1);
              await assertSameListing(image, live.map((s) => s.tag));
              await assertState(other(tool), image, regions, state);
            }
            await assertCheckClean(image, `after step ${step}`);
          }
          // Every surviving snapshot holds its contents, as each tool reads them.
          log.push("final: apply every live snapshot");
          for (const snap of live) {
            tool = other(tool);
            await snapshot(tool, "-a", snap.tag, image);
            await assertCheckClean(image, `after the final ${tool} snapshot -a ${snap.tag}`);
            await assertState("vstor", image, regions, snap.state);
            await assertState("qemu", image, regions, snap.state);
          }
        } catch (e) {
          throw new Error(`${e instanceof Error ? e.message : String(e)}\n${context()}`, {
            cause: e,
          });
        }
      });
    },
  });
}

// ---- edges ----

Deno.test({
  name: "vstor snapshot -a takes an ID, and an ID wins over an equal name as in qemu-img",
  ignore,
  async fn() {
    await withTempDir("vstor_snapshot_edge_", async (dir) => {
      const image = join(dir, "image.qcow2");
      const cs = 64 * KiB, size = 4 * MiB;
      const regions = regionsFor(cs, size);
      const pattern = patternSource();
      await vstorOk("create", "-q", "-f", "qcow2", image, `${size}`);
      // Snapshot ID 1 is named "2"; ID 2 is named "x".
      const first = await writeState("vstor", image, regions, [0, 0, 0, 0], [0, 1, 2, 3], pattern);
      await snapshot("vstor", "-c", "2", image);
      const second = await writeState("vstor", image, regions, first, [0, 2], pattern);
      await snapshot("vstor", "-c", "x", image);
      const rows = await assertSameListing(image, ["2", "x"]);
      assert.deepEqual(rows.map((r) => r.id), ["1", "2"]);
      await writeState("vstor", image, regions, second, [1, 3], pattern);

      await vstorOk("snapshot", "-a", "1", image);
      await assertState("qemu", image, regions, first);
      await assertCheckClean(image, "after vstor snapshot -a 1");

      const ours = join(dir, "ours.qcow2"), theirs = join(dir, "theirs.qcow2");
      await Deno.copyFile(image, ours);
      await Deno.copyFile(image, theirs);
      await vstorOk("snapshot", "-a", "2", ours);
      await qemuOk("qemu-img", "snapshot", "-a", "2", theirs);
      await assertState("qemu", theirs, regions, second);
      await assertState("qemu", ours, regions, second);
      await assertCheckClean(ours, "after vstor snapshot -a 2");
    });
  },
});

Deno.test({
  name: "vstor snapshot -d of a missing name exits 1 with qemu-img's message and changes nothing",
  ignore,
  async fn() {
    await withTempDir("vstor_snapshot_edge_", async (dir) => {
      const image = join(dir, "image.qcow2");
      await vstorOk("create", "-q", "-f", "qcow2", image, "1M");
      await vstorOk("snapshot", "-c", "s1", image);
      const before = await Deno.readFile(image);
      // Delete goes by name only: the ID "1" is not a name either.
      for (const name of ["x", "1"]) {
        const ours = await vstor("snapshot", "-d", name, image);
        assert.equal(ours.code, 1, ours.stderr);
        assert.equal(ours.stdout, "");
        assert.equal(
          ours.stderr,
          `vstor: ${image}: Could not delete snapshot '${name}': snapshot not found\n`,
        );
        const theirs = await runTool("qemu-img", ["snapshot", "-d", name, image]);
        assert.equal(theirs.code, 1, theirs.stderr);
        assert.equal(
          theirs.stderr,
          `qemu-img: Could not delete snapshot '${name}': snapshot not found\n`,
        );
      }
      assert.deepEqual(await Deno.readFile(image), before, "a failed delete wrote to the image");
      await assertSameListing(image, ["s1"]);
    });
  },
});

Deno.test({
  name: "vstor snapshot -c refuses a duplicate name, where qemu-img 7.2 would add a second",
  ignore,
  async fn() {
    await withTempDir("vstor_snapshot_edge_", async (dir) => {
      const image = join(dir, "image.qcow2");
      await vstorOk("create", "-q", "-f", "qcow2", image, "1M");
      await io("vstor", image, ["write -P 0x5a 0 64k"]);
      await vstorOk("snapshot", "-c", "s1", image);
      const before = await Deno.readFile(image);
      const r = await vstor("snapshot", "-c", "s1", image);
      assert.equal(r.code, 1, r.stderr);
      assert.equal(r.stdout, "");
      assert.match(
        r.stderr,
        /^vstor: .*image\.qcow2: Could not create snapshot 's1': .*already exists\n$/,
      );
      assert.deepEqual(await Deno.readFile(image), before, "a refused create wrote to the image");
      await assertSameListing(image, ["s1"]);
      await assertCheckClean(image, "after the refused duplicate");
    });
  },
});

Deno.test({
  name: "vstor lists, applies and deletes qemu-img's duplicate snapshot names as qemu-img does",
  ignore,
  async fn() {
    await withTempDir("vstor_snapshot_edge_", async (dir) => {
      const image = join(dir, "image.qcow2");
      const cs = 64 * KiB, size = 4 * MiB;
      const regions = regionsFor(cs, size);
      const pattern = patternSource();
      await qemuOk("qemu-img", "create", "-q", "-f", "qcow2", image, `${size}`);
      const first = await writeState("qemu", image, regions, [0, 0, 0, 0], [0, 1, 2, 3], pattern);
      await qemuOk("qemu-img", "snapshot", "-c", "dup", image);
      const second = await writeState("qemu", image, regions, first, [1, 2], pattern);
      await qemuOk("qemu-img", "snapshot", "-c", "dup", image);
      await writeState("qemu", image, regions, second, [0, 3], pattern);
      await assertSameListing(image, ["dup", "dup"]);

      // Apply by name takes the first match in both tools.
      const ours = join(dir, "ours.qcow2"), theirs = join(dir, "theirs.qcow2");
      await Deno.copyFile(image, ours);
      await Deno.copyFile(image, theirs);
      await vstorOk("snapshot", "-a", "dup", ours);
      await qemuOk("qemu-img", "snapshot", "-a", "dup", theirs);
      await assertState("qemu", theirs, regions, first);
      await assertState("qemu", ours, regions, first);

      // Delete by name removes the same one (the first) in both tools.
      await Deno.copyFile(image, ours);
      await Deno.copyFile(image, theirs);
      await vstorOk("snapshot", "-d", "dup", ours);
      await qemuOk("qemu-img", "snapshot", "-d", "dup", theirs);
      await assertCheckClean(ours, "after vstor snapshot -d of a duplicate name");
      const left = await assertSameListing(ours, ["dup"]);
      const leftTheirs = await assertSameListing(theirs, ["dup"]);
      assert.deepEqual(left, leftTheirs);
      await vstorOk("snapshot", "-a", "dup", ours);
      await assertState("qemu", ours, regions, second);
    });
  },
});

Deno.test({
  name: "vstor snapshot -c, -a and -d on a raw image fail clearly and leave it untouched",
  ignore,
  async fn() {
    await withTempDir("vstor_snapshot_edge_", async (dir) => {
      const image = join(dir, "disk.raw");
      await qemuOk("qemu-img", "create", "-q", "-f", "raw", image, "1M");
      await qemuOk("qemu-io", "-f", "raw", "-c", "write -P 0x77 0 4k", image);
      const before = await Deno.readFile(image);
      for (const format of [[], ["-f", "raw"]]) {
        for (const action of ["-c", "-a", "-d"]) {
          const args = ["snapshot", ...format, action, "s1", image];
          const ours = await vstor(...args);
          assert.equal(ours.code, 1, `vstor ${args.join(" ")}: ${ours.stderr}`);
          assert.equal(ours.stdout, "");
          assert.equal(
            ours.stderr,
            `vstor: ${image}: Format 'raw' does not support internal snapshots\n`,
          );
          const theirs = await runTool("qemu-img", args);
          assert.equal(theirs.code, 1, `qemu-img ${args.join(" ")} exits 1 too`);
        }
      }
      assert.deepEqual(await Deno.readFile(image), before, "the raw image changed");
    });
  },
});
