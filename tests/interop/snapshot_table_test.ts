/**
 * Broken snapshot tables, as QEMU's iotest 261 breaks them (qemu-img made images, bytes poked):
 * v3 entries without a disk size, an entry with 64 KiB of extra data, a table past 64 MiB, more
 * than 65536 snapshots. On each, `vstor qemu-img` and `qemu-img` must print the same and exit
 * the same for info (the open error), check and check -r all (on separate copies); the repaired
 * copies must then be the same files, pass qemu-img check, and list the same snapshots through
 * both tools. Two more cases pin the rest of opening for check: a dirty image and one marked
 * corrupt.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { main } from "../../src/cli/main.ts";
import { ignoreWithout, runTool, type ToolResult } from "./qemu.ts";

const ignore = ignoreWithout("qemu-img") || ignoreWithout("qemu-io");

const dir = Deno.makeTempDirSync({ prefix: "vstor_snapshot_table_" });
globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));

const MiB = 1024 * 1024;
const CLUSTER = 65536;

/** Run `vstor qemu-img ARGS...` in-process. */
async function vstor(...args: string[]): Promise<ToolResult> {
  let stdout = "", stderr = "";
  const code = await main(["qemu-img", ...args], {
    stdout: (s) => stdout += s,
    stderr: (s) => stderr += s,
  });
  return { code, stdout, stderr };
}

async function qemu(...args: string[]): Promise<ToolResult> {
  return await runTool("qemu-img", args);
}

async function qemuOk(...args: string[]): Promise<string> {
  const r = await qemu(...args);
  assert.equal(r.code, 0, `qemu-img ${args.join(" ")} exited ${r.code}:\n${r.stdout}${r.stderr}`);
  return r.stdout;
}

/** Output with the image's path made neutral, so copies can be compared. */
function neutral(r: ToolResult, path: string) {
  const clean = (s: string) => s.split(path).join("IMG");
  return { code: r.code, stdout: clean(r.stdout), stderr: clean(r.stderr) };
}

// ---- byte pokes (as 261's poke_file / peek_file_be) ----

function poke(path: string, offset: number, bytes: Uint8Array): void {
  const f = Deno.openSync(path, { write: true });
  try {
    f.seekSync(offset, Deno.SeekMode.Start);
    let done = 0;
    while (done < bytes.length) done += f.writeSync(bytes.subarray(done));
  } finally {
    f.close();
  }
}

function peek(path: string, offset: number, length: number): Uint8Array {
  const f = Deno.openSync(path);
  try {
    const out = new Uint8Array(length);
    f.seekSync(offset, Deno.SeekMode.Start);
    let done = 0;
    while (done < length) {
      const n = f.readSync(out.subarray(done));
      if (n === null) break;
      done += n;
    }
    return out;
  } finally {
    f.close();
  }
}

function be(value: number | bigint, bytes: 2 | 4 | 8): Uint8Array {
  const out = new Uint8Array(bytes);
  const v = new DataView(out.buffer);
  if (bytes === 2) v.setUint16(0, Number(value));
  else if (bytes === 4) v.setUint32(0, Number(value));
  else v.setBigUint64(0, BigInt(value));
  return out;
}

function peekBe(path: string, offset: number, bytes: 2 | 4 | 8): number {
  const v = new DataView(peek(path, offset, bytes).buffer);
  return bytes === 2 ? v.getUint16(0) : bytes === 4 ? v.getUint32(0) : Number(v.getBigUint64(0));
}

/** A table entry's length on disk, padded to 8 (261's snapshot_table_entry_size). */
function entrySize(path: string, offset: number): number {
  const full = 40 + peekBe(path, offset + 36, 4) + peekBe(path, offset + 12, 2) +
    peekBe(path, offset + 14, 2);
  return Math.ceil(full / 8) * 8;
}

/** Offsets of the snapshot table's entries. */
function entryOffsets(path: string): number[] {
  const count = peekBe(path, 60, 4);
  let at = peekBe(path, 64, 8);
  const out: number[] = [];
  for (let i = 0; i < count; i++) {
    out.push(at);
    at += entrySize(path, at);
  }
  return out;
}

/** Mark clusters [start, end) as used in refblock 0 (261's refblock0_allocate; 16-bit refcounts). */
function refblock0Allocate(path: string, start: number, end: number): void {
  const refblock = peekBe(path, peekBe(path, 48, 8), 8);
  const first = Math.floor(start / CLUSTER), last = Math.ceil(end / CLUSTER);
  const ones = new Uint8Array((last - first) * 2);
  for (let i = 1; i < ones.length; i += 2) ones[i] = 1;
  poke(path, refblock + first * 2, ones);
}

// ---- the images ----

/**
 * A v2 image with three snapshots whose entries carry 0, 50 (with unknown data) and 8 bytes of
 * extra data, then forced to v3 (which requires 16 bytes at least).
 */
async function botchedV3(path: string): Promise<void> {
  await qemuOk("create", "-q", "-f", "qcow2", "-o", "compat=0.10", path, "64M");
  for (const sn of ["sn0", "sn1", "sn2"]) await qemuOk("snapshot", "-c", sn, path);
  const sizes = [0, 50, 8];
  const parts: Uint8Array[] = [];
  entryOffsets(path).forEach((at, i) => {
    const pre = peek(path, at, 40);
    const oldExtra = peekBe(path, at + 36, 4);
    const names = peekBe(path, at + 12, 2) + peekBe(path, at + 14, 2);
    const extra = new Uint8Array(sizes[i]!);
    extra.set(peek(path, at + 40, Math.min(oldExtra, extra.length)));
    if (i === 1) extra.set(new TextEncoder().encode("very important data"), 24);
    new DataView(pre.buffer).setUint32(36, extra.length);
    const entry = new Uint8Array(Math.ceil((40 + extra.length + names) / 8) * 8);
    entry.set(pre);
    entry.set(extra, 40);
    entry.set(peek(path, at + 40 + oldExtra, names), 40 + extra.length);
    parts.push(entry);
  });
  let at = peekBe(path, 64, 8);
  for (const p of parts) {
    poke(path, at, p);
    at += p.length;
  }
  poke(path, 4, be(3, 4));
  poke(path, 100, be(104, 4));
  poke(path, 96, be(4, 4));
}

/** A v3 image with four snapshots, the last claiming 64 KiB of extra data. */
async function tooMuchExtra(path: string): Promise<void> {
  await qemuOk("create", "-q", "-f", "qcow2", path, "64M");
  for (const sn of ["sn0", "sn1", "sn2", "sn3"]) await qemuOk("snapshot", "-c", sn, path);
  poke(path, entryOffsets(path)[3]! + 36, be(65536, 4));
}

/**
 * A table at 1 MiB of entries with 1 KiB of extra data and 64 KiB - 1 of ID and of name (all
 * zeroes, sparse), one more than fits in 64 MiB; the last has an L1 and an L2 table.
 */
async function tableTooBig(path: string): Promise<void> {
  await qemuOk("create", "-q", "-f", "qcow2", path, "64M");
  poke(path, 64, be(MiB, 8));
  const template = new Uint8Array(40);
  const t = new DataView(template.buffer);
  t.setUint16(12, 0xffff);
  t.setUint16(14, 0xffff);
  t.setUint32(36, 1024);
  const entryBytes = 40 + 1024 + 65535 + 65535 + 2;
  let offset = MiB, written = 0, count = 0;
  while (written <= 64 * MiB) {
    poke(path, offset, template);
    offset += entryBytes;
    written += entryBytes;
    count++;
  }
  Deno.truncateSync(path, offset);
  poke(path, offset - entryBytes, be(0xe0000, 8));
  poke(path, offset - entryBytes + 8, be(1, 4));
  poke(path, MiB - 2 * CLUSTER, be(0x80000000000f0000n, 8));
  refblock0Allocate(path, MiB - 2 * CLUSTER, offset);
  poke(path, 60, be(count, 4));
}

/** A v2 image claiming 131072 all-zero snapshots; snapshot 65536 has an L1 and an L2 table. */
async function tooManySnapshots(path: string): Promise<void> {
  await qemuOk("create", "-q", "-f", "qcow2", "-o", "compat=0.10", path, "64M");
  poke(path, 64, be(MiB, 8));
  poke(path, 60, be(0x20000, 4));
  Deno.truncateSync(path, MiB + 40 * 131072);
  poke(path, MiB + 40 * 65536, be(0xe0000, 8));
  poke(path, MiB + 40 * 65536 + 8, be(1, 4));
  poke(path, MiB - 2 * CLUSTER, be(0x80000000000f0000n, 8));
  refblock0Allocate(path, MiB - 2 * CLUSTER, MiB + 40 * 131072);
}

/** The first offset two files differ at (their lengths too), or undefined. */
function firstDifference(a: string, b: string): number | undefined {
  const x = Deno.readFileSync(a), y = Deno.readFileSync(b);
  const n = Math.min(x.length, y.length);
  for (let i = 0; i < n; i++) if (x[i] !== y[i]) return i;
  return x.length === y.length ? undefined : n;
}

/**
 * A v3 table of 64 MiB (IDs and names of 'a's), entry 0 without a disk size: the repair
 * rewrites every entry with 24 bytes of extra data, which no longer fits (EFBIG, the check fails).
 */
async function outgrowsWhenRepaired(path: string): Promise<void> {
  await qemuOk("create", "-q", "-f", "qcow2", path, "64M");
  poke(path, 64, be(MiB, 8));
  /** An entry with `extra` bytes of extra data, a full ID and a name of `nameLen` 'a's. */
  const entry = (extra: number, nameLen: number) => {
    const full = 40 + extra + 65535 + nameLen;
    const out = new Uint8Array(Math.ceil(full / 8) * 8);
    const v = new DataView(out.buffer);
    v.setUint16(12, 0xffff);
    v.setUint16(14, nameLen);
    v.setUint32(36, extra);
    out.fill(0x61, 40 + extra, full);
    return { bytes: out, full };
  };
  // 512 entries of 128 KiB make exactly 64 MiB; entry 0 has 8 bytes of extra data (incomplete
  // for v3), the others 16. Rewritten with 24 bytes each, the table no longer fits.
  const first = entry(8, 65481), normal = entry(16, 65481);
  poke(path, MiB, first.bytes);
  let offset = MiB + first.bytes.length;
  for (let i = 1; i < 512; i++) {
    poke(path, offset, normal.bytes);
    offset += normal.bytes.length;
  }
  refblock0Allocate(path, MiB, offset);
  poke(path, 60, be(512, 4));
}

/**
 * Not a snapshot table, but the same open for check (QEMU's BDRV_O_CHECK): a lazy-refcounts image
 * left dirty by a crash is repaired by the check, not silently at open.
 */
async function dirtyImage(path: string): Promise<void> {
  await qemuOk("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", path, "64M");
  // qemu-io's abort leaves the dirty bit and the refcounts of the new clusters unwritten.
  await runTool("qemu-io", ["-c", "write 0 128k", "-c", "write 1M 64k", "-c", "abort", path]);
  assert.equal(peek(path, 79, 1)[0]! & 1, 1, "the image is dirty");
}

/** An image marked corrupt: check -r all opens it read-write anyway and clears the mark. */
async function markedCorrupt(path: string): Promise<void> {
  await qemuOk("create", "-q", "-f", "qcow2", path, "64M");
  poke(path, 79, be(2, 2).subarray(1));
}

// ---- the comparison ----

interface Case {
  name: string;
  build: (path: string) => Promise<void>;
  /** What qemu-img info says (a substring), to be sure the image is broken as meant. */
  infoError?: string;
  /** A line qemu-img check -r all prints. */
  repairLine: string;
}

const cases: Case[] = [
  {
    name: "v3 entries without a disk size",
    build: botchedV3,
    repairLine: "Repairing snapshot table entry 0 is incomplete",
  },
  {
    name: "64 KiB of extra data",
    build: tooMuchExtra,
    infoError: "Too much extra metadata in snapshot table entry 3\n" +
      "You can force-remove this extra metadata with qemu-img check -r all",
    repairLine: "Discarding too much extra metadata in snapshot table entry 3 (65536 > 1024)",
  },
  {
    name: "a table past 64 MiB",
    build: tableTooBig,
    infoError: "Snapshot table is too big\n" +
      "You can force-remove all 1 overhanging snapshots with qemu-img check -r all",
    repairLine: "Discarding 1 overhanging snapshots (snapshot table is too big)",
  },
  {
    name: "131072 snapshots",
    build: tooManySnapshots,
    infoError: "Snapshot table too large",
    repairLine: "Discarding 65536 overhanging snapshots",
  },
  {
    name: "a table that outgrows 64 MiB when repaired",
    build: outgrowsWhenRepaired,
    repairLine: "ERROR failed to update snapshot table: File too large",
  },
  { name: "a dirty image", build: dirtyImage, repairLine: "Rebuilding refcount structure" },
  { name: "an image marked corrupt", build: markedCorrupt, repairLine: "" },
];

for (const c of cases) {
  Deno.test({
    name: `vstor qemu-img info, check and check -r all treat ${c.name} as qemu-img does`,
    ignore,
    async fn() {
      const base = join(dir, c.name.replaceAll(" ", "_"));
      const image = `${base}.qcow2`;
      await c.build(image);
      const q = await qemu("info", image);
      const v = await vstor("info", image);
      if (c.infoError !== undefined) assert.ok(q.stderr.includes(c.infoError), q.stderr);
      assert.deepEqual(v, q, "info");
      assert.deepEqual(await vstor("check", image), await qemu("check", image), "check");

      const vCopy = `${base}.vstor.qcow2`, qCopy = `${base}.qemu.qcow2`;
      Deno.copyFileSync(image, vCopy);
      Deno.copyFileSync(image, qCopy);
      const qRepair = await qemu("check", "-r", "all", qCopy);
      const vRepair = await vstor("check", "-r", "all", vCopy);
      assert.ok(qRepair.stderr.includes(c.repairLine), qRepair.stderr);
      assert.deepEqual(neutral(vRepair, vCopy), neutral(qRepair, qCopy), "check -r all");

      // The repaired images: the same bytes, clean for qemu-img, the same snapshots either way.
      assert.equal(firstDifference(vCopy, qCopy), undefined, "repaired images differ");
      assert.deepEqual(
        neutral(await qemu("check", vCopy), vCopy),
        neutral(await qemu("check", qCopy), qCopy),
      );
      const qList = await qemu("snapshot", "-l", qCopy);
      assert.deepEqual(neutral(await qemu("snapshot", "-l", vCopy), vCopy), neutral(qList, qCopy));
      assert.deepEqual(neutral(await vstor("snapshot", "-l", vCopy), vCopy), neutral(qList, qCopy));
    },
  });
}
