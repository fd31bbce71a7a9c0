/**
 * Layout as QEMU lays it out: the same qemu-io commands on two copies of a qemu-img-made image,
 * one through qemu-io and one through vstor's qemu-io, must leave byte-identical files (host
 * offsets, tables, refcounts, file length, even the bytes of freed clusters) — freed clusters
 * reused in the session, shrink's table allocation and file trim, growing with falloc/full.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { ignoreWithout, runTool } from "./qemu.ts";
import { vstor, withTempDir } from "./qcow2_matrix.ts";

const ignore = ignoreWithout("qemu-img") || ignoreWithout("qemu-io");

const CASES: Array<{ name: string; create: string[]; commands: string[] }> = [
  {
    name: "a cluster freed by discard is reused by the next allocation",
    create: ["1M"],
    commands: ["write -P 1 0 4k", "discard 0 64k", "write -P 2 128k 64k"],
  },
  {
    name: "a cluster freed by a zero write with unmap is reused by a compressed write",
    create: ["1M"],
    commands: ["write -P 1 0 64k", "write -z -u 0 64k", "write -c -P 3 128k 64k"],
  },
  {
    name: "clusters freed by a shrink are reused after growing again",
    create: ["-o", "cluster_size=4k", "1M"],
    commands: ["write -P 1 0 1M", "truncate 256k", "truncate 1M", "write -P 2 512k 128k"],
  },
  {
    name: "a shrink takes the L2 table of the new end and trims the file; a grow adds nothing",
    create: ["1M"],
    commands: ["truncate 512k", "truncate 2M"],
  },
  {
    name: "a discard inside a written run is refilled by the overwrite that follows",
    create: ["-o", "cluster_size=4k", "256k"],
    commands: ["write -P 1 0 64k", "discard 8k 8k", "write -P 2 4k 12k"],
  },
  {
    name: "growing with falloc moves the refcount table past the data's end, as QEMU's",
    create: ["1M"],
    commands: ["write -P 1 0 1M", "truncate -m falloc 5M"],
  },
  {
    name: "growing with full from an unaligned end copies the old last cluster into the new run",
    create: ["1000K"],
    commands: ["write -P 1 0 1000K", "truncate -m full 1500K", "write -P 2 1400K 4k"],
  },
  {
    name: "growing with falloc on extended L2 with 16 KiB clusters",
    create: ["-o", "extended_l2=on,cluster_size=16k", "100K"],
    commands: ["write -P 1 3k 50k", "truncate -m falloc 3M"],
  },
  {
    name: "VM state (write -b) lives past the disk, the L1 table growing by half as QEMU's",
    create: ["64M"],
    commands: [
      "write -b -P 0x11 1T 4k",
      "read -b -P 0x11 1T 4k",
      "write -b -P 0x22 0 4M",
      "read -b -P 0x22 2M 4k",
      "write -P 0x33 0 64k",
    ],
  },
];

for (const c of CASES) {
  Deno.test({
    name: `layout as QEMU's: ${c.name}`,
    ignore,
    fn: () =>
      withTempDir("vstor-layout-", async (dir) => {
        const q = join(dir, "q.qcow2"), v = join(dir, "v.qcow2");
        const made = await runTool("qemu-img", ["create", "-q", "-f", "qcow2", q, ...c.create]);
        assert.equal(made.code, 0, made.stderr);
        await Deno.copyFile(q, v);
        const args = c.commands.flatMap((cmd) => ["-c", cmd]);
        const theirs = await runTool("qemu-io", [...args, q]);
        assert.equal(theirs.code, 0, theirs.stdout + theirs.stderr);
        const ours = await vstor("qemu-io", ...args, v);
        assert.equal(ours.code, 0, ours.output);
        const [a, b] = [await Deno.readFile(q), await Deno.readFile(v)];
        assert.equal(b.length, a.length, "file length");
        const at = a.findIndex((x, i) => x !== b[i]);
        assert.equal(at, -1, `files differ first at byte 0x${at.toString(16)}`);
      }),
  });
}
