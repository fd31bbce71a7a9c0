/**
 * The snapshot table reader as QEMU's qcow2_do_read_snapshots: its refusals (with QEMU's messages
 * and hints), its repair mode, C strings, zeroes past the end of the file, QEMU's table size.
 */
import assert from "node:assert/strict";
import { BlockError } from "../../../src/errors.ts";
import { MemoryFile } from "../../../src/host/memory.ts";
import {
  listedNames,
  readSnapshotTable,
  serializeSnapshotTable,
  type SnapshotEntry,
} from "../../../formats/qcow2/snapshot.ts";

const TABLE = 4096;

function entry(id: string, name: string, extra: number): SnapshotEntry {
  return {
    l1TableOffset: 0x30000,
    l1Size: 1,
    id,
    name,
    dateSec: 1,
    dateNsec: 2,
    vmClockNsec: 3n,
    vmStateSize: 0,
    extra: new Uint8Array(extra),
  };
}

/** A file holding `entries` at TABLE; `extraSizes` overrides stored extra data sizes by index. */
function fileWith(entries: SnapshotEntry[], extraSizes: Record<number, number> = {}): MemoryFile {
  const file = new MemoryFile("t.qcow2");
  const table = serializeSnapshotTable(entries);
  file.writeAt(TABLE, table);
  let at = TABLE;
  entries.forEach((e, i) => {
    const size = extraSizes[i];
    if (size !== undefined) {
      const v = new Uint8Array(4);
      new DataView(v.buffer).setUint32(0, size);
      file.writeAt(at + 36, v);
    }
    at += Math.ceil((40 + e.extra.length + e.id.length + e.name.length) / 8) * 8;
  });
  return file;
}

function errorOf(fn: () => unknown): BlockError {
  try {
    fn();
  } catch (e) {
    if (e instanceof BlockError) return e;
    throw e;
  }
  throw new Error("no error");
}

Deno.test("readSnapshotTable refuses too much extra data with QEMU's message and hint", () => {
  const file = fileWith([entry("1", "a", 24), entry("2", "b", 24)], { 1: 1025 });
  const e = errorOf(() => readSnapshotTable(file, TABLE, 2, file.path));
  assert.equal(
    e.message,
    "Too much extra metadata in snapshot table entry 1\n" +
      "You can force-remove this extra metadata with qemu-img check -r all",
  );
  assert.equal(e.context.errno, 27);
});

Deno.test("readSnapshotTable in repair mode keeps 1 KiB of oversized extra data and counts the rest of the entry", () => {
  // Entry 1 claims 64 KiB: its name lies past that (zeroes here, so an empty C string).
  const file = fileWith([entry("1", "a", 24), entry("2", "b", 24)], { 1: 65536 });
  const lines: string[] = [];
  const t = readSnapshotTable(file, TABLE, 2, file.path, {
    repair: true,
    say: (l) => lines.push(l),
  });
  assert.deepEqual(lines, [
    "Discarding too much extra metadata in snapshot table entry 1 (65536 > 1024)",
  ]);
  assert.equal(t.extraDropped, 1);
  assert.equal(t.entries[1]!.extra.length, 1024);
  assert.equal(t.entries[1]!.id, "");
  // QEMU's snapshots_size: up to the end of the stored entry, unpadded.
  assert.equal(t.bytes, 72 + 40 + 65536 + 2);
});

Deno.test("readSnapshotTable cuts names at the first NUL as QEMU's C strings", () => {
  const file = fileWith([entry("1\0x", "name\0tail", 24)]);
  const t = readSnapshotTable(file, TABLE, 1, file.path);
  assert.equal(t.entries[0]!.id, "1");
  assert.equal(t.entries[0]!.name, "name");
});

Deno.test("readSnapshotTable refuses a table past 64 MiB, or drops the overhanging snapshots in repair mode", () => {
  // Entries of 40 + 1024 + 2 * 65535 bytes (zeroes past the file's end), one more than fits.
  const file = new MemoryFile("t.qcow2");
  const head = new Uint8Array(40);
  const v = new DataView(head.buffer);
  v.setUint16(12, 0xffff);
  v.setUint16(14, 0xffff);
  v.setUint32(36, 1024);
  const size = 40 + 1024 + 65535 * 2 + 2;
  const count = Math.floor(64 * 1024 * 1024 / size) + 1;
  for (let i = 0; i < count; i++) file.writeAt(TABLE + i * size, head);
  const e = errorOf(() => readSnapshotTable(file, TABLE, count, file.path));
  assert.equal(
    e.message,
    "Snapshot table is too big\n" +
      "You can force-remove all 1 overhanging snapshots with qemu-img check -r all",
  );
  const lines: string[] = [];
  const t = readSnapshotTable(file, TABLE, count, file.path, {
    repair: true,
    say: (l) => lines.push(l),
  });
  assert.deepEqual(lines, ["Discarding 1 overhanging snapshots (snapshot table is too big)"]);
  assert.equal(t.reduced, 1);
  assert.equal(t.entries.length, count - 1);
  assert.equal(t.bytes, (count - 1) * size - 2);
});

Deno.test("listedNames cuts IDs to 127 and names to 255 bytes, as QEMUSnapshotInfo holds them", () => {
  const e = entry("i".repeat(200), "n".repeat(300), 24);
  assert.deepEqual(listedNames(e), { id: "i".repeat(127), name: "n".repeat(255) });
  assert.deepEqual(listedNames(entry("1", "short", 24)), { id: "1", name: "short" });
});
