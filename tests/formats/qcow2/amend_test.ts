/**
 * qcow2 amend (formats/qcow2/amend.ts) on in-memory images: every amend leaves an image that
 * checks clean, reads byte for byte as before — active layer and every snapshot — and carries the
 * header fields asked for; refusals carry QEMU's messages and change nothing.
 */
import assert from "node:assert/strict";
import { MemoryFile } from "../../../src/host/memory.ts";
import { borrowFile } from "../../../src/host/host_file.ts";
import { isBlockError } from "../../../src/errors.ts";
import { createQcow2, type Qcow2CreateOptions } from "../../../formats/qcow2/create.ts";
import { Qcow2Node } from "../../../formats/qcow2/qcow2.ts";
import { checkImage } from "../../../formats/qcow2/check.ts";
import { amendQcow2, type Qcow2AmendOptions } from "../../../formats/qcow2/amend.ts";
import { applySnapshot, createSnapshot } from "../../../formats/qcow2/snapshot_ops.ts";
import { serializeSnapshotTable } from "../../../formats/qcow2/snapshot.ts";
import {
  COMPAT_LAZY_REFCOUNTS,
  hasFeature,
  INCOMPAT_DIRTY,
  serializeHeader,
} from "../../../formats/qcow2/header.ts";
import { entryOffset, HI_COMPRESSED, LO_ZERO } from "../../../formats/qcow2/tables.ts";
import { parseAmendOptions } from "../../../src/cli/amend.ts";

const SEED = 0x0a3e9d;
const KiB = 1024;
const MiB = 1024 * KiB;

function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) / 4294967296;
  };
}

function randomBytes(random: () => number, length: number): Uint8Array {
  const out = new Uint8Array(length);
  for (let i = 0; i < length; i++) out[i] = Math.floor(random() * 256);
  return out;
}

/** An image in memory, optionally over a base image (opened afresh each time: a node closes it). */
interface Image {
  file: MemoryFile;
  base?: MemoryFile;
}

async function open(image: Image): Promise<Qcow2Node> {
  const backing = image.base === undefined ? undefined : await Qcow2Node.open(
    borrowFile(new MemoryFile("base.qcow2", image.base.contents(), { readOnly: true })),
    { readOnly: true, cacheCleanInterval: 0 },
  );
  return await Qcow2Node.open(
    borrowFile(image.file),
    backing === undefined ? { cacheCleanInterval: 0 } : { cacheCleanInterval: 0, backing },
  );
}

const amend = (image: Image, opts: Qcow2AmendOptions) => amendQcow2(() => open(image), opts);

async function readAll(node: Qcow2Node): Promise<Uint8Array> {
  const all = new Uint8Array(node.size);
  await node.read(0, all);
  return all;
}

/** What the guest sees: the active layer and each snapshot (read from a scratch copy). */
interface Contents {
  active: Uint8Array;
  snapshots: Map<string, Uint8Array>;
}

async function contents(image: Image): Promise<Contents> {
  const node = await open(image);
  const active = await readAll(node);
  const names = node.snapshots.entries.map((e) => e.name);
  await node.close();
  const snapshots = new Map<string, Uint8Array>();
  for (const name of names) {
    const scratch: Image = {
      ...image,
      file: new MemoryFile("scratch.qcow2", image.file.contents()),
    };
    const copy = await open(scratch);
    await applySnapshot(copy, name);
    snapshots.set(name, await readAll(copy));
    await copy.close();
  }
  return { active, snapshots };
}

function assertSameContents(actual: Contents, expected: Contents, what: string): void {
  assert.ok(equalBytes(actual.active, expected.active), `${what}: active layer differs`);
  assert.deepEqual([...actual.snapshots.keys()], [...expected.snapshots.keys()], what);
  for (const [name, bytes] of expected.snapshots) {
    assert.ok(equalBytes(actual.snapshots.get(name)!, bytes), `${what}: snapshot ${name} differs`);
  }
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** Open, check (no messages: no errors, no leaks), and return the header for assertions. */
async function assertClean(image: Image, what: string): Promise<Qcow2Node["header"]> {
  const node = await open(image);
  try {
    const report = checkImage(node);
    assert.deepEqual(report.messages, [], `${what}: check found problems`);
    assert.equal(report.corruptions + report.leaks + report.checkErrors, 0, what);
    return structuredClone(node.header);
  } finally {
    await node.close();
  }
}

/** Every standard L2 entry of every table (active and snapshots), read from the file. */
function l2Entries(file: MemoryFile): Array<{ hi: number; lo: number }> {
  const bytes = file.contents();
  const view = new DataView(bytes.buffer);
  const cs = 2 ** view.getUint32(20);
  const l1s: Array<[number, number]> = [[
    Number(view.getBigUint64(40)),
    view.getUint32(36),
  ]];
  let at = Number(view.getBigUint64(64));
  for (let i = 0; i < view.getUint32(60); i++) {
    l1s.push([Number(view.getBigUint64(at)), view.getUint32(at + 8)]);
    const len = 40 + view.getUint32(at + 36) + view.getUint16(at + 12) + view.getUint16(at + 14);
    at += Math.ceil(len / 8) * 8;
  }
  const out: Array<{ hi: number; lo: number }> = [];
  for (const [l1, size] of l1s) {
    for (let i = 0; i < size; i++) {
      const l2 = entryOffset(view.getUint32(l1 + i * 8), view.getUint32(l1 + i * 8 + 4));
      if (l2 === 0) continue;
      for (let e = 0; e < cs; e += 8) {
        out.push({ hi: view.getUint32(l2 + e), lo: view.getUint32(l2 + e + 4) });
      }
    }
  }
  return out;
}

/**
 * An image with data, zero clusters of both kinds (plain and preallocated), a compressed
 * cluster and (optionally) snapshots between the writes, from a fixed seed.
 */
async function populatedImage(
  opts: Qcow2CreateOptions,
  { backing = false, snapshots = 2, size = 4 * MiB } = {},
): Promise<Image> {
  const random = rng(SEED);
  const image: Image = { file: new MemoryFile("img.qcow2") };
  if (backing) {
    image.base = new MemoryFile("base.qcow2");
    await createQcow2(image.base, size, { clusterSize: 64 * KiB });
    const base = await Qcow2Node.open(borrowFile(image.base), { cacheCleanInterval: 0 });
    await base.write(0, randomBytes(random, size));
    await base.close();
  }
  await createQcow2(image.file, size, {
    ...opts,
    ...(backing ? { backingFile: "base.qcow2", backingFormat: "qcow2" } : {}),
  });
  const node = await open(image);
  const cs = node.clusterSize;
  const rounds = snapshots + 1;
  for (let round = 0; round < rounds; round++) {
    for (let i = 0; i < 6; i++) {
      const offset = Math.floor(random() * (size / cs - 4)) * cs + Math.floor(random() * 3) * 512;
      await node.write(offset, randomBytes(random, cs + 1024));
    }
    // Zeroes over data (preallocated zero clusters) and over holes (plain zero clusters).
    const zeroAt = Math.floor(random() * (size / cs - 4)) * cs;
    await node.write(zeroAt, randomBytes(random, 2 * cs));
    await node.writeZeroes(zeroAt, 2 * cs);
    await node.writeZeroes(Math.floor(random() * (size / cs - 4)) * cs, 3 * cs, { unmap: true });
    if (round === 0) await node.writeCompressed(size - cs, new Uint8Array(cs).fill(0x5c));
    if (round < snapshots) await createSnapshot(node, `snap${round + 1}`, 1_700_000_000_000);
  }
  await node.close();
  return image;
}

Deno.test("amend compat=0.10 expands zero clusters in the active layer and snapshots, and compat=1.1 brings v3 back", async () => {
  for (const backing of [false, true]) {
    const what = backing ? "with a backing file" : "without a backing file";
    const image = await populatedImage({ clusterSize: 4 * KiB }, { backing });
    const before = await contents(image);
    assert.ok(l2Entries(image.file).some((e) => (e.lo & LO_ZERO) !== 0), "zero clusters to expand");

    await amend(image, { compat: "0.10" });
    const v2 = await assertClean(image, `${what}, v2`);
    assert.equal(v2.version, 2);
    assert.equal(v2.compatibleFeatures, 0n);
    for (const e of l2Entries(image.file)) {
      if ((e.hi & HI_COMPRESSED) === 0) assert.equal(e.lo & LO_ZERO, 0, `${what}: zero flag left`);
    }
    assertSameContents(await contents(image), before, `${what}, v2`);

    await amend(image, { compat: "1.1" });
    const v3 = await assertClean(image, `${what}, v3 again`);
    assert.equal(v3.version, 3);
    assert.equal(v3.headerLength, 112);
    assert.equal(v3.refcountOrder, 4);
    // QEMU (and vstor) write the feature name table only for clusters above 4 KiB.
    assert.equal(v3.featureNames.size, 0);
    assertSameContents(await contents(image), before, `${what}, v3 again`);
  }
});

Deno.test("amend compat=0.10 keeps a snapshot's data where the active layer zeroed a shared cluster in place", async () => {
  // QEMU 7.2 writes zeroes into such a cluster and so changes the snapshot; vstor gives the
  // active entry a cluster of its own.
  const image: Image = { file: new MemoryFile("shared.qcow2") };
  await createQcow2(image.file, 1 * MiB, { clusterSize: 64 * KiB });
  const node = await open(image);
  await node.write(0, new Uint8Array(128 * KiB).fill(7));
  await createSnapshot(node, "before", 1_700_000_000_000);
  await node.writeZeroes(0, 64 * KiB);
  await node.close();
  const before = await contents(image);
  assert.ok(before.snapshots.get("before")!.subarray(0, 64 * KiB).every((b) => b === 7));

  await amend(image, { compat: "0.10" });
  await assertClean(image, "downgraded");
  assertSameContents(await contents(image), before, "downgraded");
});

Deno.test("amend refcount_bits goes 16 → 1 → 64 → 16 keeping data, snapshots and consistency", async () => {
  const image = await populatedImage({ clusterSize: 4 * KiB }, { snapshots: 0 });
  const before = await contents(image);
  for (const bits of [1, 64, 8, 2, 32, 4, 16]) {
    await amend(image, { refcountBits: bits });
    const h = await assertClean(image, `refcount_bits=${bits}`);
    assert.equal(1 << h.refcountOrder, bits);
    assertSameContents(await contents(image), before, `refcount_bits=${bits}`);
  }
  // With snapshots (refcounts of 2 and more) the wide widths work too.
  const withSnapshots = await populatedImage({ clusterSize: 512 }, { size: 1 * MiB });
  const snapBefore = await contents(withSnapshots);
  // (Reading a snapshot here applies it, which needs one more reference than the width holds at 2.)
  for (const bits of [64, 4, 16]) {
    await amend(withSnapshots, { refcountBits: bits });
    const h = await assertClean(withSnapshots, `snapshots, refcount_bits=${bits}`);
    assert.equal(1 << h.refcountOrder, bits);
    assertSameContents(await contents(withSnapshots), snapBefore, `refcount_bits=${bits}`);
  }
});

Deno.test("amend refuses to narrow refcounts below a refcount in use, with QEMU's message, and changes nothing", async () => {
  const image = await populatedImage({ clusterSize: 64 * KiB }, { snapshots: 1 });
  const bytes = image.file.contents();
  await assert.rejects(
    () => amend(image, { refcountBits: 1 }),
    (e) =>
      isBlockError(e, "invalid-argument") &&
      /^Cannot decrease refcount entry width to 1 bits: Cluster at offset 0x[0-9a-f]+ has a refcount of 2$/
        .test(e.message),
  );
  assert.ok(equalBytes(image.file.contents(), bytes), "the image changed");
});

Deno.test("amend lazy_refcounts=off after a crash with lazy refcounts leaves a clean image without the feature", async () => {
  const image: Image = { file: new MemoryFile("lazy.qcow2") };
  await createQcow2(image.file, 2 * MiB, { clusterSize: 4 * KiB, lazyRefcounts: true });
  const node = await open(image);
  await node.write(12 * KiB, new Uint8Array(40 * KiB).fill(3));
  await node.flush();
  // The process dies here: the dirty bit stays set in the file.
  const crashed: Image = { file: new MemoryFile("lazy.qcow2", image.file.contents()) };
  await node.close();
  const dirtyHeader = new DataView(crashed.file.contents().buffer).getBigUint64(72);
  assert.ok(hasFeature(dirtyHeader, INCOMPAT_DIRTY), "dirty before the amend");

  await amend(crashed, { lazyRefcounts: false });
  const h = await assertClean(crashed, "lazy off");
  assert.ok(!hasFeature(h.compatibleFeatures, COMPAT_LAZY_REFCOUNTS));
  assert.ok(!hasFeature(h.incompatibleFeatures, INCOMPAT_DIRTY));
  const data = await contents(crashed);
  assert.ok(data.active.subarray(12 * KiB, 52 * KiB).every((b) => b === 3));

  await amend(crashed, { lazyRefcounts: true });
  const on = await assertClean(crashed, "lazy on");
  assert.ok(hasFeature(on.compatibleFeatures, COMPAT_LAZY_REFCOUNTS));
});

Deno.test("amend compat=0.10 on a lazy-refcount image drops the feature, as QEMU does", async () => {
  const image = await populatedImage({ clusterSize: 4 * KiB, lazyRefcounts: true }, {
    snapshots: 1,
  });
  const before = await contents(image);
  await amend(image, { compat: "0.10" });
  const h = await assertClean(image, "v2");
  assert.equal(h.version, 2);
  assert.equal(h.compatibleFeatures, 0n);
  assertSameContents(await contents(image), before, "v2");
});

Deno.test("amend size grows and shrinks the virtual disk, with and without snapshots", async () => {
  for (const snapshots of [0, 1]) {
    const image = await populatedImage({ clusterSize: 4 * KiB }, { snapshots });
    const before = await contents(image);
    await amend(image, { size: 6 * MiB });
    assert.equal((await assertClean(image, "grown")).size, 6 * MiB);
    let now = await contents(image);
    assert.ok(equalBytes(now.active.subarray(0, 4 * MiB), before.active));
    assert.ok(now.active.subarray(4 * MiB).every((b) => b === 0));

    await amend(image, { size: 1 * MiB + 512 });
    assert.equal((await assertClean(image, "shrunk")).size, 1 * MiB + 512);
    now = await contents(image);
    assert.ok(equalBytes(now.active, before.active.subarray(0, 1 * MiB + 512)));
    for (const [name, bytes] of before.snapshots) {
      assert.ok(equalBytes(now.snapshots.get(name)!, bytes), `snapshot ${name} kept its size`);
    }

    // What lay past the cut reads as zeroes when the disk grows again.
    await amend(image, { size: 2 * MiB });
    now = await contents(image);
    assert.ok(
      equalBytes(now.active.subarray(0, 1 * MiB + 512), before.active.subarray(0, 1 * MiB + 512)),
    );
    assert.ok(now.active.subarray(1 * MiB + 512).every((b) => b === 0), "stale data after regrow");
    await assertClean(image, "grown again");
  }
});

Deno.test("amend refuses what QEMU refuses, with its messages, before changing anything", async () => {
  const cases: Array<[string, Qcow2AmendOptions, RegExp, () => Promise<Image>]> = [];
  const plain = (o: Qcow2CreateOptions) => async () => {
    const image: Image = { file: new MemoryFile("r.qcow2") };
    await createQcow2(image.file, 1 * MiB, o);
    return image;
  };
  const withSnapshot = (o: Qcow2CreateOptions) => async () => {
    const image = await plain(o)();
    const node = await open(image);
    await node.write(0, new Uint8Array(512).fill(1));
    await createSnapshot(node, "s", 1_700_000_000_000);
    await node.close();
    return image;
  };
  const zstdCompressed = async () => {
    const image = await plain({ compressionType: "zstd" })();
    const node = await open(image);
    await node.writeCompressed(0, new Uint8Array(64 * KiB).fill(9));
    await node.close();
    return image;
  };
  cases.push(
    [
      "extended L2",
      { compat: "0.10" },
      /^Cannot downgrade an image with incompatible features 0x10 set$/,
      plain({ extendedL2: true }),
    ],
    [
      "zstd data",
      { compat: "0.10" },
      /^Cannot downgrade an image with zstd compression type and existing compressed clusters$/,
      zstdCompressed,
    ],
    [
      "8-bit refcounts",
      { compat: "0.10" },
      /^compat=0\.10 requires refcount_bits=16$/,
      plain({ refcountBits: 8 }),
    ],
    [
      "snapshot of another size",
      { compat: "0.10", size: 2 * MiB },
      /^Internal snapshots prevent downgrade of image$/,
      withSnapshot({}),
    ],
    [
      "lazy refcounts on v2",
      { compat: "0.10", lazyRefcounts: true },
      /^Lazy refcounts only supported with compatibility level 1\.1 and above \(use compat=1\.1 or greater\)$/,
      plain({}),
    ],
    [
      "refcount width on v2",
      { refcountBits: 8 },
      /^Refcount widths other than 16 bits require compatibility level 1\.1 or above/,
      plain({ compat: "0.10" }),
    ],
    [
      "resize of v2 with snapshots",
      { size: 2 * MiB },
      /^Can't resize a v2 image which has snapshots$/,
      withSnapshot({ compat: "0.10" }),
    ],
    ["odd size", { size: 1000 }, /^The new size must be a multiple of 512$/, plain({})],
    ["unknown compat", { compat: "2" }, /^Unknown compatibility level 2$/, plain({})],
    [
      "refcount width 3",
      { refcountBits: 3 },
      /^Refcount width must be a power of two and may not exceed 64 bits$/,
      plain({}),
    ],
    [
      "backing file",
      { backingFile: "other.qcow2" },
      /^Cannot amend the backing file\nYou can use 'vstor rebase' instead\.$/,
      plain({}),
    ],
    [
      "data file",
      { dataFile: "x.raw" },
      /^data-file can only be set for images that use an external data file$/,
      plain({}),
    ],
    [
      "data_file_raw",
      { dataFileRaw: true },
      /^data-file-raw cannot be set on existing images$/,
      plain({}),
    ],
    [
      "encryption",
      { encryption: true },
      /^Can't amend encryption options - encryption not present$/,
      plain({}),
    ],
    // Refused after an upgrade in QEMU (which has then upgraded); refused first here.
    [
      "upgrade with a backing file change",
      { compat: "1.1", backingFile: "b" },
      /^Cannot amend the backing file/,
      plain({ compat: "0.10" }),
    ],
    [
      "upgrade with refcounts too narrow",
      { compat: "1.1", refcountBits: 1 },
      /^Cannot decrease refcount entry width to 1 bits: Cluster at offset 0x[0-9a-f]+ has a refcount of 2$/,
      withSnapshot({ compat: "0.10" }),
    ],
  );
  for (const [what, opts, message, make] of cases) {
    const image = await make();
    const bytes = image.file.contents();
    await assert.rejects(
      () => amend(image, opts),
      (e) => isBlockError(e) && message.test(e.message),
      what,
    );
    assert.ok(equalBytes(image.file.contents(), bytes), `${what}: the image changed`);
  }
});

Deno.test("amend accepts the backing file names the image already has, and no others", async () => {
  const image = await populatedImage({ clusterSize: 4 * KiB }, { backing: true, snapshots: 0 });
  await amend(image, { backingFile: "base.qcow2", backingFormat: "qcow2" });
  for (
    const opts of [{ backingFile: "base.qcow2" }, { backingFormat: "qcow2" }, { backingFile: "" }]
  ) {
    await assert.rejects(() => amend(image, opts), /Cannot amend the backing file/);
  }
  await assertClean(image, "after backing amends");
});

Deno.test("amend compat=1.1 gives v2 snapshot entries the extra data v3 requires", async () => {
  const image: Image = { file: new MemoryFile("old.qcow2") };
  await createQcow2(image.file, 1 * MiB, { compat: "0.10", clusterSize: 4 * KiB });
  const node = await open(image);
  await node.write(0, new Uint8Array(8 * KiB).fill(4));
  await createSnapshot(node, "old", 1_700_000_000_000);
  await node.write(0, new Uint8Array(4 * KiB).fill(5));
  // Rewrite the table as an old writer would have: no extra data.
  const entries = node.snapshots.entries.map((e) => ({ ...e, extra: new Uint8Array(0) }));
  const table = serializeSnapshotTable(entries);
  node.file.writeAt(node.header.snapshotsOffset, table);
  await node.close();
  const stale = await open(image);
  assert.equal(stale.snapshots.entries[0]!.extra.length, 0);
  await stale.close();
  const before = await contents(image);

  await amend(image, { compat: "1.1" });
  const h = await assertClean(image, "upgraded");
  assert.equal(h.version, 3);
  const after = await open(image);
  const entry = after.snapshots.entries[0]!;
  assert.equal(entry.extra.length, 24);
  assert.equal(entry.diskSize, 1 * MiB);
  await after.close();
  assertSameContents(await contents(image), before, "upgraded");
});

Deno.test("amend writes the header cluster zero-padded, so a downgrade leaves no stale extension bytes", async () => {
  const image: Image = { file: new MemoryFile("pad.qcow2") };
  await createQcow2(image.file, 1 * MiB, { clusterSize: 4 * KiB });
  await amend(image, { compat: "0.10" });
  const bytes = image.file.contents();
  const node = await open(image);
  const header = serializeHeader(structuredClone(node.header), "pad.qcow2");
  await node.close();
  assert.ok(equalBytes(bytes.subarray(0, header.length), header));
  assert.ok(bytes.subarray(header.length, 4 * KiB).every((b) => b === 0));
});

Deno.test("parseAmendOptions reads qemu option lists: later values win, types as QEMU parses them", () => {
  assert.deepEqual(parseAmendOptions("compat=1.1,compat=0.10,size=1M,refcount_bits=0x10"), {
    compat: "0.10",
    size: 1 * MiB,
    refcountBits: 16,
  });
  assert.deepEqual(parseAmendOptions("lazy_refcounts"), { lazyRefcounts: true });
  assert.deepEqual(parseAmendOptions("nolazy_refcounts"), { lazyRefcounts: false });
  assert.deepEqual(parseAmendOptions("backing_file=a,,b"), { backingFile: "a,b" });
  assert.deepEqual(parseAmendOptions("refcount_bits=010"), { refcountBits: 8 });
  assert.throws(() => parseAmendOptions("cluster_size=4k"), {
    message: "Invalid parameter 'cluster_size'\nThis option is only supported for image creation",
  });
  assert.throws(() => parseAmendOptions("cluster_size=4k,foo=1"), {
    message: "Invalid parameter 'cluster_size'",
  });
  assert.throws(() => parseAmendOptions("refcount_bits=16k"), {
    message: "Parameter 'refcount_bits' expects a number",
  });
  assert.throws(() => parseAmendOptions("lazy_refcounts=maybe"), {
    message: "Parameter 'lazy_refcounts' expects 'on' or 'off'",
  });
});
