/**
 * Untrusted images: every bad header field, table pointer and flag gives a clear error naming
 * what is wrong (never a crash, hang or huge allocation), and detected corruption marks the image.
 */
import assert from "node:assert/strict";
import { MemoryFile } from "../../../src/host/memory.ts";
import { borrowFile } from "../../../src/host/host_file.ts";
import { isBlockError } from "../../../src/errors.ts";
import { createQcow2, type Qcow2CreateOptions } from "../../../formats/qcow2/create.ts";
import { Qcow2Node } from "../../../formats/qcow2/qcow2.ts";
import { checkImage } from "../../../formats/qcow2/check.ts";
import { parseHeader } from "../../../formats/qcow2/header.ts";

async function image(opts: Qcow2CreateOptions = {}, size = 1 << 20): Promise<MemoryFile> {
  const file = new MemoryFile("hostile.qcow2");
  await createQcow2(file, size, opts);
  return file;
}

function patch(file: MemoryFile, offset: number, bytes: number[] | Uint8Array): void {
  file.writeAt(offset, bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes));
}

function u32(v: number): number[] {
  return [(v >>> 24) & 0xff, (v >>> 16) & 0xff, (v >>> 8) & 0xff, v & 0xff];
}

function u64(v: number): number[] {
  return [...u32(Math.floor(v / 2 ** 32)), ...u32(v % 2 ** 32)];
}

/** Corruption notices the nodes printed (QEMU prints them on stderr). */
const notices: string[] = [];
const open = (file: MemoryFile, readOnly = false) =>
  Qcow2Node.open(borrowFile(file), {
    readOnly,
    cacheCleanInterval: 0,
    onCorruption: (line) => notices.push(line),
  });

async function refuses(file: MemoryFile, kind: string, message: RegExp): Promise<void> {
  await assert.rejects(() => open(file, true), (e) => {
    assert.ok(isBlockError(e), String(e));
    assert.equal(e.kind, kind, e.message);
    assert.match(e.message, message);
    return true;
  });
}

// Tables past the end of the file are not refused: QEMU opens such a (truncated) image and reads
// zeroes there; tests/interop/truncated_test.ts compares what both tools make of it.
Deno.test("a qcow2 header with a bad field is refused with a message naming the field", async () => {
  const cases: Array<[string, (f: MemoryFile) => void, string, RegExp]> = [
    ["version 4", (f) => patch(f, 4, u32(4)), "unsupported", /Unsupported qcow2 version 4/],
    ["cluster_bits 8", (f) => patch(f, 20, u32(8)), "invalid-format", /cluster size: 2\^8/],
    ["cluster_bits 22", (f) => patch(f, 20, u32(22)), "invalid-format", /cluster size: 2\^22/],
    ["AES encryption", (f) => patch(f, 32, u32(1)), "unsupported", /Encrypted.*AES/],
    ["LUKS encryption", (f) => patch(f, 32, u32(2)), "unsupported", /Encrypted.*LUKS/],
    [
      "a 64 MiB L1 table",
      (f) => patch(f, 36, u32(8 << 20)),
      "invalid-format",
      /L1 table too large/,
    ],
    [
      "an L1 table too small for the size",
      (f) => patch(f, 24, u64(2 ** 40)),
      "invalid-format",
      /L1 table is too small/,
    ],
    [
      "an unaligned L1 table",
      (f) => patch(f, 40, u64(0x30200)),
      "invalid-format",
      /Active L1 table offset invalid/,
    ],
    [
      "an L1 table in the header",
      (f) => patch(f, 40, u64(0)),
      "invalid-format",
      /L1 table is at offset 0/,
    ],
    [
      "a 16 MiB refcount table",
      (f) => patch(f, 56, u32(256)),
      "invalid-format",
      /Reference count table too large/,
    ],
    [
      "no refcount table",
      (f) => patch(f, 56, u32(0)),
      "invalid-format",
      /does not contain a reference count table/,
    ],
    ["refcount_order 7", (f) => patch(f, 96, u32(7)), "invalid-format", /may not exceed 64 bits/],
    ["header_length 100", (f) => patch(f, 100, u32(100)), "invalid-format", /header too short/],
    ["header_length 106", (f) => patch(f, 100, u32(106)), "invalid-format", /not a multiple of 8/],
    [
      "header_length past the cluster",
      (f) => patch(f, 100, u32(0x20000)),
      "invalid-format",
      /exceeds cluster size/,
    ],
    [
      "70000 snapshots",
      (f) => patch(f, 60, u32(70000)),
      "invalid-format",
      /Snapshot table too large/,
    ],
    [
      "a huge virtual size",
      (f) => patch(f, 24, u64(2 ** 62)),
      "invalid-format",
      /^Image is too big$/,
    ],
    [
      "a backing name past the cluster",
      (f) => {
        patch(f, 8, u64(0xff00));
        patch(f, 16, u32(0x200));
      },
      "invalid-format",
      /Backing file name too long/,
    ],
    [
      "an extension longer than the cluster",
      (f) => {
        // The first extension (the feature name table) claims 1 MiB.
        patch(f, 0x74, u32(1 << 20));
      },
      "invalid-format",
      /^Header extension too large$/,
    ],
    [
      "zstd without the compression type bit",
      (f) => patch(f, 104, [1]),
      "invalid-format",
      /needs the compression type feature bit/,
    ],
    [
      "an unknown compression type",
      (f) => {
        patch(f, 72, u64(8));
        patch(f, 104, [7]);
      },
      "unsupported",
      /Unknown compression type 7/,
    ],
    ["an external data file", (f) => patch(f, 72, u64(4)), "unsupported", /external data file/],
  ];
  for (const [what, mutate, kind, message] of cases) {
    const file = await image();
    mutate(file);
    await refuses(file, kind, message).catch((e) => {
      throw new Error(`${what}: ${e.message}`);
    });
  }
});

Deno.test("an unknown incompatible feature is named from the feature name table, or as QEMU's mask", async () => {
  const file = await image();
  // Bit 5 is unknown to vstor; the table QEMU writes names bits 0-4 only.
  patch(file, 72, u64(1 << 5));
  await refuses(file, "unsupported", /: Unknown incompatible feature: 20$/);
  // Rename the table's entry for bit 4 to bit 5: now it has a name.
  const head = new Uint8Array(512);
  file.readAt(0, head);
  const at = new TextDecoder("latin1").decode(head).indexOf("extended L2 entries") - 2;
  patch(file, at + 1, [5]);
  await refuses(file, "unsupported", /Unsupported qcow2 feature\(s\): extended L2 entries/);
});

Deno.test("parseHeader never allocates from an untrusted size: a short file is refused", () => {
  assert.throws(() => parseHeader(new Uint8Array(40), 40, "short"), /file too short/);
  const notQcow2 = new Uint8Array(512);
  assert.throws(() => parseHeader(notQcow2, 512, "zero"), /not in qcow2 format/);
});

Deno.test("unknown autoclear bits are cleared and unknown extensions kept on a read-write open", async () => {
  const file = await image();
  patch(file, 88, u64(0x8001));
  // Replace the end marker after the feature table with an unknown extension, then an end marker.
  const head = new Uint8Array(4096);
  file.readAt(0, head);
  const view = new DataView(head.buffer);
  let at = 112;
  while (view.getUint32(at) !== 0) at += 8 + Math.ceil(view.getUint32(at + 4) / 8) * 8;
  patch(file, at, [...u32(0x12345678), ...u32(5), 1, 2, 3, 4, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
  const node = await open(file);
  await node.write(0, new Uint8Array(512).fill(1));
  await node.close();
  const after = new Uint8Array(4096);
  file.readAt(0, after);
  const h = parseHeader(after, file.size(), "x");
  // Bit 0 (bitmaps) is one vstor maintains now: kept, as QEMU keeps it.
  assert.equal(h.autoclearFeatures, 1n);
  assert.deepEqual(h.otherExtensions.map((e) => [e.type, [...e.data]]), [[0x12345678, [
    1,
    2,
    3,
    4,
    5,
  ]]]);
});

Deno.test("an L2 entry pointing into the header marks the image corrupt with QEMU's notice and makes the node unusable", async () => {
  const file = await image({ clusterSize: 4096 });
  let node = await open(file);
  await node.write(0, new Uint8Array(4096).fill(7));
  await node.close();
  // The first L2 table: cluster after the L1 table (header, reftable, refblock, L1, L2, data).
  const l1 = new Uint8Array(8);
  file.readAt(3 * 4096, l1);
  const l2Offset = Number(new DataView(l1.buffer).getBigUint64(0) & 0x00fffffffffffe00n);
  patch(file, l2Offset, [0x80, 0, 0, 0, 0, 0, 0x02, 0]); // COPIED, host offset 0x200: in the header
  node = await open(file);
  notices.length = 0;
  await assert.rejects(
    () => node.read(0, new Uint8Array(512)),
    (e) => isBlockError(e, "corrupt") && e.message.includes("0x200 unaligned"),
  );
  assert.equal(notices.length, 1);
  assert.match(
    notices[0]!,
    /^qcow2: Marking image as corrupt: Cluster allocation offset 0x200 unaligned \(L2 offset: 0x[0-9a-f]+, L2 index: 0\); further corruption events will be suppressed$/,
  );
  assert.equal(node.corrupt, true);
  assert.equal(node.readOnly, true);
  // As QEMU's node without a driver: every later request fails with ENOMEDIUM, nothing printed.
  await assert.rejects(
    () => node.read(8192, new Uint8Array(1)),
    (e) => isBlockError(e, "io") && e.message === "No medium found",
  );
  await assert.rejects(() => node.write(8192, new Uint8Array(1)), (e) => isBlockError(e));
  assert.equal(notices.length, 1);
  await node.close();
  // The corrupt bit is on disk: a read-write open is refused, read-only works.
  await assert.rejects(
    () => open(file),
    (e) => isBlockError(e, "corrupt") && /cannot be opened read\/write/.test(e.message),
  );
  const ro = await open(file, true);
  await ro.read(8192, new Uint8Array(512));
  await ro.close();
});

Deno.test("a data write that would land on the L1 table is refused and marks the image corrupt", async () => {
  const file = await image({ clusterSize: 4096 });
  let node = await open(file);
  await node.write(0, new Uint8Array(4096).fill(7));
  await node.close();
  const l1Before = new Uint8Array(4096);
  file.readAt(3 * 4096, l1Before);
  const l2Offset = Number(new DataView(l1Before.buffer).getBigUint64(0) & 0x00fffffffffffe00n);
  // Guest cluster 1 now claims to live in the L1 table's cluster, owned (COPIED).
  patch(file, l2Offset + 8, [0x80, 0, 0, 0, ...u32(3 * 4096)]);
  node = await open(file);
  await assert.rejects(
    () => node.write(4096, new Uint8Array(4096).fill(0xee)),
    (e) => isBlockError(e, "corrupt") && /overlaps with active L1 table/.test(e.message),
  );
  await node.close();
  const l1After = new Uint8Array(4096);
  file.readAt(3 * 4096, l1After);
  assert.deepEqual(l1After, l1Before);
});

Deno.test("a compressed cluster that does not decompress is a read error naming its offset", async () => {
  const file = await image({ clusterSize: 4096 });
  let node = await open(file);
  const data = new Uint8Array(4096).fill(3);
  await node.write(0, data, { compressed: true });
  await node.close();
  const l1 = new Uint8Array(8);
  file.readAt(3 * 4096, l1);
  const l2Offset = Number(new DataView(l1.buffer).getBigUint64(0) & 0x00fffffffffffe00n);
  const entry = new Uint8Array(8);
  file.readAt(l2Offset, entry);
  const hostOffset = Number(new DataView(entry.buffer).getBigUint64(0) & ((1n << 54n) - 1n));
  patch(file, hostOffset, new Uint8Array(64).fill(0xff));
  node = await open(file, true);
  await assert.rejects(
    () => node.read(0, new Uint8Array(4096)),
    (e) => isBlockError(e, "io") && /does not decompress/.test(e.message),
  );
  await node.close();
});

Deno.test("lazy refcounts: an image left dirty by a crash is repaired on the next read-write open", async () => {
  const file = await image({ clusterSize: 4096, lazyRefcounts: true }, 4 << 20);
  const node = await open(file);
  const data = new Uint8Array(300_000);
  for (let i = 0; i < data.length; i++) data[i] = i % 251;
  await node.write(12345, data);
  // Crash: the L2 tables reach the disk but the refcount blocks do not.
  node.l2Cache.flush();
  const dirty = new Uint8Array(80);
  file.readAt(0, dirty);
  assert.equal(new DataView(dirty.buffer).getBigUint64(72) & 1n, 1n, "dirty bit set while open");
  // Reopen without closing (the crashed process is gone).
  const repaired = await open(file);
  assert.deepEqual(checkImage(repaired).messages, []);
  const back = new Uint8Array(data.length);
  await repaired.read(12345, back);
  assert.deepEqual(back, data);
  await repaired.close();
  const clean = new Uint8Array(80);
  file.readAt(0, clean);
  assert.equal(new DataView(clean.buffer).getBigUint64(72) & 1n, 0n, "dirty bit cleared");
});

Deno.test("bad open options are refused", async () => {
  const file = await image();
  await assert.rejects(
    () => Qcow2Node.open(borrowFile(file), { l2CacheSize: -1 }),
    (e) => isBlockError(e, "invalid-argument") && /l2-cache-size/.test(e.message),
  );
});
