/**
 * Crash safety: record every host write, truncate, punch and flush of a qcow2 node over a disk
 * with a volatile write cache, then rebuild the image as a crash would leave it — the state at
 * the last flush plus all (a prefix cut) or a seeded subset (whole or sector-torn) of the later
 * operations — and require that it opens, that check finds no corruption (leaks are allowed;
 * lazy-refcount images must be clean once the open repaired them), and that everything the guest
 * flushed reads back.
 */
import assert from "node:assert/strict";
import { MemoryFile } from "../../../src/host/memory.ts";
import { borrowFile, type HostFile } from "../../../src/host/host_file.ts";
import { createQcow2, type Qcow2CreateOptions } from "../../../formats/qcow2/create.ts";
import { Qcow2Node, type Qcow2OpenOptions } from "../../../formats/qcow2/qcow2.ts";
import { checkImage, type CheckReport } from "../../../formats/qcow2/check.ts";
import { INCOMPAT_DIRTY } from "../../../formats/qcow2/header.ts";
import {
  applySnapshot,
  createSnapshot,
  deleteSnapshot,
} from "../../../formats/qcow2/snapshot_ops.ts";
import {
  allSubsets,
  CrashFile,
  crashImages,
  type CrashPoint,
  describeOps,
  type FileOp,
  lastFlushBefore,
  OverlayFile,
  rng,
} from "./crash_file.ts";

const hex = (n: number) => `0x${n.toString(16)}`;
const KiB = 1024;
const MiB = 1024 * KiB;
/** Snapshot dates are fixed so that runs are reproducible. */
const SNAPSHOT_TIME = 1_700_000_000_000;

// ---- the guest side: windows of the virtual disk, a byte model, a seeded workload ----

/** Cluster-aligned windows of the virtual disk; the byte model is their concatenation. */
class Layout {
  constructor(readonly windows: readonly number[], readonly windowLength: number) {}

  get length(): number {
    return this.windows.length * this.windowLength;
  }

  guest(modelOffset: number): number {
    const w = Math.floor(modelOffset / this.windowLength);
    return this.windows[w]! + (modelOffset % this.windowLength);
  }

  model(guestOffset: number): number {
    for (let w = 0; w < this.windows.length; w++) {
      const start = this.windows[w]!;
      if (guestOffset >= start && guestOffset < start + this.windowLength) {
        return w * this.windowLength + guestOffset - start;
      }
    }
    throw new RangeError(`guest offset ${guestOffset} is outside the windows`);
  }
}

async function readWindows(node: Qcow2Node, layout: Layout): Promise<Uint8Array> {
  const all = new Uint8Array(layout.length);
  for (let w = 0; w < layout.windows.length; w++) {
    const part = all.subarray(w * layout.windowLength, (w + 1) * layout.windowLength);
    await node.read(layout.windows[w]!, part);
  }
  return all;
}

/** A guest operation that changed data, in model coordinates, with where the log stood. */
interface GuestOp {
  readonly kind: "write" | "zero" | "discard" | "compressed";
  readonly modelOffset: number;
  readonly length: number;
  /** What the range holds afterwards (undefined: zeroes). */
  readonly data: Uint8Array | undefined;
  /** Log position when the operation was issued. */
  readonly start: number;
}

/** Data for operation `n` at model offset `at`: distinct per operation and position, never 0. */
function pattern(n: number, at: number, length: number): Uint8Array {
  const data = new Uint8Array(length);
  for (let i = 0; i < length; i++) {
    data[i] = ((n * 37 + (at + i) * 7 + ((at + i) >> 9)) & 0xff) | 1;
  }
  return data;
}

/** Seeded writes, zero writes, reads, discards and compressed writes, kept in a byte model. */
class Workload {
  readonly model: Uint8Array;
  readonly ops: GuestOp[] = [];
  /** Guest clusters ever touched: compressed writes need clusters that never had a host cluster. */
  readonly #touched = new Set<number>();
  #n = 0;

  constructor(
    readonly layout: Layout,
    readonly clusterSize: number,
    readonly size: number,
    readonly random: () => number,
    readonly maxWrite: number,
  ) {
    this.model = new Uint8Array(layout.length);
  }

  #touch(guest: number, length: number): void {
    const cs = this.clusterSize;
    for (let c = Math.floor(guest / cs); c * cs < guest + length; c++) this.#touched.add(c);
  }

  /** Write model range [at, at+length) with fresh data (one window). */
  async write(node: Qcow2Node, at: number, length: number, start: number): Promise<void> {
    const data = pattern(++this.#n, at, length);
    const guest = this.layout.guest(at);
    await node.write(guest, data);
    this.model.set(data, at);
    this.#touch(guest, length);
    this.ops.push({ kind: "write", modelOffset: at, length, data, start });
  }

  /** Zero model range [at, at+length) with a zero write. */
  async zero(node: Qcow2Node, at: number, length: number, start: number, unmap = false) {
    const guest = this.layout.guest(at);
    await node.writeZeroes(guest, length, { unmap });
    this.model.fill(0, at, at + length);
    this.#touch(guest, length);
    this.ops.push({ kind: "zero", modelOffset: at, length, data: undefined, start });
  }

  /** Store `data` compressed in the never-touched cluster at model offset `at`. */
  async compressed(node: Qcow2Node, at: number, data: Uint8Array, start: number): Promise<void> {
    const guest = this.layout.guest(at);
    await node.write(guest, data, { compressed: true });
    this.model.set(data, at);
    this.#touched.add(guest / this.clusterSize);
    this.ops.push({ kind: "compressed", modelOffset: at, length: data.length, data, start });
  }

  /** Discard whole clusters of model range [at, at+length). */
  async discard(node: Qcow2Node, at: number, length: number, start: number): Promise<void> {
    const cs = this.clusterSize;
    const guest = this.layout.guest(at);
    await node.discard(guest, length);
    const first = Math.ceil(guest / cs) * cs;
    const end = guest + length === this.size ? this.size : Math.floor((guest + length) / cs) * cs;
    if (end <= first) return;
    const from = this.layout.model(first);
    this.model.fill(0, from, from + end - first);
    this.ops.push({
      kind: "discard",
      modelOffset: from,
      length: end - first,
      data: undefined,
      start,
    });
  }

  /** One random data operation; `start` is the log position when it is issued. */
  async step(node: Qcow2Node, start: number): Promise<void> {
    const random = this.random;
    const int = (n: number) => Math.floor(random() * n);
    const cs = this.clusterSize;
    const W = this.layout.windowLength;
    const w = int(this.layout.windows.length);
    const within = random() < 0.3 ? int(W / cs) * cs : int(W);
    const length = Math.min(W - within, 1 + int(random() < 0.7 ? 3 * cs : this.maxWrite));
    const at = w * W + within;
    const guest = this.layout.guest(at);
    const r = random();
    if (r < 0.5) {
      await this.write(node, at, length, start);
    } else if (r < 0.68) {
      await this.zero(node, at, length, start, random() < 0.5);
    } else if (r < 0.78) {
      // Reads load tables into the caches: evictions write dirty ones back between flushes.
      await node.read(guest, new Uint8Array(length));
    } else if (r < 0.88) {
      await this.discard(node, at, length, start);
    } else {
      const c = w * (W / cs) + int(W / cs);
      if (this.#touched.has(this.layout.guest(c * cs) / cs)) return;
      const data = new Uint8Array(cs);
      // Mostly compressible; noise is stored as an ordinary write.
      if (random() < 0.7) data.set(pattern(++this.#n, c * cs, cs / 4));
      else for (let i = 0; i < cs; i++) data[i] = int(256);
      await this.compressed(node, c * cs, data, start);
    }
  }
}

function openOptions(clusterSize: number, smallCaches: boolean): Qcow2OpenOptions {
  return smallCaches
    ? { cacheCleanInterval: 0, l2CacheSize: 2 * clusterSize, refcountCacheSize: 2 * clusterSize }
    : { cacheCleanInterval: 0 };
}

// ---- judging a crash image ----

/**
 * Check messages that are not damage: leaks only. A COPIED flag that disagrees with its refcount
 * either way is a corruption to qemu-img check (exit 2), and snapshot operations switch state
 * with one header write (formats/qcow2/switch.ts), so no crash image may show one.
 */
function harmless(message: string): boolean {
  return message.startsWith("Leaked cluster");
}

function judgeCheck(report: CheckReport, repaired: boolean): string | undefined {
  if (repaired) {
    // The open ran check with both repairs (as QEMU does for a dirty lazy-refcount image).
    const clean = report.messages.length === 0 && report.corruptions === 0 &&
      report.leaks === 0 && report.checkErrors === 0;
    if (clean) return undefined;
    return `not clean after the lazy-refcount repair at open (${report.corruptions} corruptions, ${report.leaks} leaks): ${
      report.messages.slice(0, 6).join("; ")
    }`;
  }
  const harmful = report.messages.filter((m) => !harmless(m));
  if (harmful.length === 0 && report.checkErrors === 0) return undefined;
  return `check found ${report.corruptions} corruptions: ${harmful.slice(0, 6).join("; ")}`;
}

/**
 * True when a lazy-refcount image is marked dirty, so that the read-write open rebuilds its
 * refcounts and check must then be clean. A lazy image whose bit is clear (the crash came before
 * the first allocation after a clean close) is held to the ordinary rule: leaks are fine.
 */
function markedDirty(image: HostFile): boolean {
  const header = new Uint8Array(80);
  image.readAt(0, header);
  const version = new DataView(header.buffer).getUint32(4);
  return version >= 3 && (header[79]! & INCOMPAT_DIRTY) !== 0;
}

async function openCrashed(image: HostFile): Promise<Qcow2Node | string> {
  try {
    return await Qcow2Node.open(borrowFile(image), { cacheCleanInterval: 0 });
  } catch (e) {
    return `open failed: ${e instanceof Error ? e.message : String(e)}`;
  }
}

/** Byte equality a word at a time (both arrays start at offset 0 of their own buffers). */
function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  const words = a.length >>> 2;
  const wa = new Uint32Array(a.buffer, a.byteOffset, words);
  const wb = new Uint32Array(b.buffer, b.byteOffset, words);
  for (let i = 0; i < words; i++) if (wa[i] !== wb[i]) return false;
  for (let i = words * 4; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

function firstDifference(a: Uint8Array, b: Uint8Array): number {
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return -1;
}

/** A completed guest flush: what the guest may rely on once the log passed `end`. */
interface FlushMark {
  readonly end: number;
  readonly model: Uint8Array;
  /** Guest operations issued before it. */
  readonly ops: number;
}

/** A recorded run of guest data operations and flushes. */
interface Recording {
  readonly file: CrashFile;
  readonly layout: Layout;
  readonly lazy: boolean;
  readonly ops: readonly GuestOp[];
  readonly marks: FlushMark[];
}

/**
 * Flushed data intact: every byte no later operation touched reads as it was at the last
 * completed guest flush. With strict ordering (not lazy refcounts) the touched bytes must show
 * the flushed value or one a later operation wrote: never stale data from elsewhere.
 */
function judgeData(rec: Recording, cut: number, got: Uint8Array): string | undefined {
  const durable = lastFlushBefore(rec.file.log, cut) + 1;
  let mark = rec.marks[0]!;
  for (const m of rec.marks) if (m.end <= durable) mark = m;
  const want = mark.model;
  if (sameBytes(got, want)) return undefined;
  const covered = new Uint8Array(want.length);
  const explained = new Uint8Array(want.length);
  for (const op of rec.ops.slice(mark.ops)) {
    if (op.start >= cut) break;
    for (let i = 0; i < op.length; i++) {
      const at = op.modelOffset + i;
      covered[at] = 1;
      if (got[at] === (op.data ? op.data[i] : 0)) explained[at] = 1;
    }
  }
  for (let i = 0; i < want.length; i++) {
    if (got[i] === want[i]) continue;
    const guest = hex(rec.layout.guest(i));
    if (!covered[i]) {
      return `flushed data lost at guest ${guest}: reads ${got[i]}, flushed ${
        want[i]
      } (guest flush completed at log ${mark.end})`;
    }
    // Lazy refcounts skip the data-before-L2 barrier for whole new clusters, as QEMU does.
    if (!explained[i] && !rec.lazy) {
      return `stale data at guest ${guest}: reads ${got[i]}, neither the flushed ${
        want[i]
      } nor what a later write left there`;
    }
  }
  return undefined;
}

async function judgeDataImage(
  rec: Recording,
  point: CrashPoint,
  image: HostFile,
): Promise<string | undefined> {
  const repaired = rec.lazy && markedDirty(image);
  const node = await openCrashed(image);
  if (typeof node === "string") return node;
  try {
    const problem = judgeCheck(checkImage(node), repaired);
    if (problem !== undefined) return problem;
    return judgeData(rec, point.cut, await readWindows(node, rec.layout));
  } catch (e) {
    return `threw: ${e instanceof Error ? e.message : String(e)}`;
  } finally {
    await node.close().catch(() => {});
  }
}

/** Every prefix cut in [from, to] (a seeded sample past `maxPrefix`) and seeded subsets. */
function choosePoints(
  from: number,
  to: number,
  opts: { seed: number; maxPrefix: number; subsets: number },
): CrashPoint[] {
  const random = rng(opts.seed);
  const points: CrashPoint[] = [];
  const span = to - from + 1;
  if (span <= opts.maxPrefix) {
    for (let cut = from; cut <= to; cut++) points.push({ cut });
  } else {
    const cuts = new Set([from, to]);
    while (cuts.size < opts.maxPrefix) cuts.add(from + Math.floor(random() * span));
    for (const cut of cuts) points.push({ cut });
  }
  for (let i = 0; i < opts.subsets && to > from; i++) {
    points.push({
      cut: from + 1 + Math.floor(random() * (to - from)),
      subset: {
        seed: Math.floor(random() * 2 ** 32),
        keep: 0.15 + 0.7 * random(),
        torn: random() < 0.5,
      },
    });
  }
  return points;
}

function pointName(p: CrashPoint): string {
  if (p.kept !== undefined) return `cut ${p.cut} keeping only [${p.kept.map((i) => `#${i}`)}]`;
  if (p.subset === undefined) return `prefix cut ${p.cut}`;
  return `subset at cut ${p.cut} (seed ${hex(p.subset.seed)}, keep ${p.subset.keep.toFixed(2)}${
    p.subset.torn ? ", torn sectors" : ""
  })`;
}

/** Run `judge` on the crash image of every point; a readable list of what failed. */
async function crashFailures(
  base: Uint8Array,
  log: readonly FileOp[],
  points: readonly CrashPoint[],
  judge: (point: CrashPoint, image: OverlayFile) => Promise<string | undefined>,
): Promise<string[]> {
  const failures: string[] = [];
  for (const [point, image] of crashImages(base, log, points)) {
    const problem = await judge(point, image);
    if (problem !== undefined) failures.push(`${pointName(point)}: ${problem}`);
  }
  return failures;
}

function assertNoFailures(failures: string[], log: readonly FileOp[], context: string): void {
  if (failures.length === 0) return;
  const cut = Number(/cut (\d+)/.exec(failures[0]!)?.[1] ?? 0);
  const flush = lastFlushBefore(log, cut);
  assert.fail(
    `${failures.length} crash images failed (${context}); the first ones:\n  ${
      failures.slice(0, 8).join("\n  ")
    }\nhost operations from the last flush before the first failing cut:\n${
      describeOps(log, flush, cut + 2)
    }`,
  );
}

// ---- the crash model itself ----

Deno.test("crash images are a prefix of the log, or the last flush plus a subset of what followed", () => {
  const file = new CrashFile("model", new Uint8Array(8).fill(1));
  file.writeAt(0, new Uint8Array(4).fill(2)); // #0
  file.flush(); // #1
  file.writeAt(4, new Uint8Array(4).fill(3)); // #2
  file.writeAt(1024, new Uint8Array(1024).fill(4)); // #3, two sectors
  file.truncate(4); // #4
  const points: CrashPoint[] = [
    { cut: 0 },
    { cut: 1 },
    { cut: 4 },
    { cut: 5 },
    { cut: 5, subset: { seed: 1, keep: 0, torn: false } },
    { cut: 5, subset: { seed: 1, keep: 1, torn: true } },
    { cut: 5, kept: [3] },
  ];
  // An image is valid until the next one is asked for: look at each inside the loop.
  const seen: string[] = [];
  for (const [p, image] of crashImages(file.base, file.log, points)) {
    const bytes = image.contents();
    seen.push(
      `${pointName(p)}: ${bytes.length} ${bytes[0]} ${bytes[7] ?? "-"} ${bytes[2047] ?? "-"}`,
    );
  }
  assert.deepEqual(seen, [
    "prefix cut 0: 8 1 1 -",
    "prefix cut 1: 8 2 1 -",
    // Subsets come when the replay reaches their flush.
    "subset at cut 5 (seed 0x1, keep 0.00): 8 2 1 -",
    "subset at cut 5 (seed 0x1, keep 1.00, torn sectors): 4 2 - -",
    "cut 5 keeping only [#3]: 2048 2 1 4",
    "prefix cut 4: 2048 2 3 4",
    "prefix cut 5: 4 2 - -",
  ]);
  // Exhaustive subsets: cut 2 has nothing unflushed, cuts 3, 4 and 5 have 2, 4 and 8 subsets.
  assert.equal(allSubsets(file.log, 2, 5).length, 1 + 2 + 4 + 8);
  // Sector-torn subsets keep some sectors of a write and drop others.
  const torn = new CrashFile("torn", new Uint8Array(0));
  torn.writeAt(0, new Uint8Array(64 * 512).fill(9));
  const [, image] = [
    ...crashImages(torn.base, torn.log, [{ cut: 1, subset: { seed: 7, keep: 0.5, torn: true } }]),
  ][0]!;
  const sectors = new Set<number>();
  const bytes = image.contents();
  for (let s = 0; s < 64; s++) sectors.add(bytes[s * 512] ?? 0);
  assert.deepEqual([...sectors].sort(), [0, 9]);
  // The overlay keeps what the reopened driver writes apart from the replayed state.
  image.writeAt(5, new Uint8Array([5]));
  image.truncate(10);
  image.truncate(40 * 512);
  const again = image.contents();
  assert.equal(again[5], 5);
  assert.ok(again.subarray(10).every((b) => b === 0), "a shrink hides the replayed bytes");
});

// ---- test 1: random allocating writes ----

interface WriteConfig {
  name: string;
  opts: Qcow2CreateOptions;
  size: number;
  windows: number[];
  windowLength: number;
  smallCaches: boolean;
  /** Longest write in bytes (most writes are up to three clusters). */
  maxWrite: number;
  /** Fill the model windows sequentially until the host file reaches this size, unrecorded. */
  prefillHostBytes?: number;
  /** The recorded run must move the refcount table (it grows). */
  growsRefcountTable?: boolean;
  /** Guest operations recorded (data operations, flushes, reopens). */
  ops: number;
  maxPrefix: number;
  subsets: number;
}

const writeConfigs: WriteConfig[] = [
  {
    name: "v3 64 KiB",
    opts: {},
    size: 1536 * MiB,
    // The second window straddles the boundary of the first two L2 tables (512 MiB).
    windows: [0, 512 * MiB - 256 * KiB],
    windowLength: 512 * KiB,
    smallCaches: false,
    maxWrite: 256 * KiB,
    ops: 70,
    maxPrefix: 600,
    subsets: 300,
  },
  {
    name: "v2 4 KiB, two-table caches",
    opts: { compat: "0.10", clusterSize: 4096 },
    size: 8 * MiB,
    windows: [0, 2 * MiB - 128 * KiB, 6 * MiB],
    windowLength: 256 * KiB,
    smallCaches: true,
    maxWrite: 64 * KiB,
    ops: 70,
    maxPrefix: 600,
    subsets: 300,
  },
  {
    name: "v3 512 B refcount_bits=64 across refcount table growth",
    opts: { clusterSize: 512, refcountBits: 64 },
    size: 4 * MiB,
    windows: [0],
    windowLength: 3 * MiB,
    smallCaches: true,
    maxWrite: 64 * KiB,
    // 64 refcount blocks of 64 entries cover 2 MiB of host: the table grows while recording.
    prefillHostBytes: 2 * MiB - 8 * KiB,
    growsRefcountTable: true,
    ops: 70,
    maxPrefix: 600,
    subsets: 300,
  },
  {
    name: "v3 extended L2 32 KiB",
    opts: { clusterSize: 32768, extendedL2: true },
    size: 192 * MiB,
    windows: [0, 64 * MiB - 256 * KiB],
    windowLength: 512 * KiB,
    smallCaches: false,
    maxWrite: 256 * KiB,
    ops: 70,
    maxPrefix: 600,
    subsets: 300,
  },
  {
    name: "v3 4 KiB lazy refcounts, two-table caches",
    opts: { clusterSize: 4096, lazyRefcounts: true },
    size: 8 * MiB,
    windows: [0, 2 * MiB - 128 * KiB],
    windowLength: 256 * KiB,
    smallCaches: true,
    maxWrite: 64 * KiB,
    ops: 70,
    maxPrefix: 600,
    subsets: 300,
  },
];

async function recordWrites(cfg: WriteConfig, seed: number): Promise<Recording> {
  const random = rng(seed);
  const cs = cfg.opts.clusterSize ?? 65536;
  const layout = new Layout(cfg.windows, cfg.windowLength);
  const work = new Workload(layout, cs, cfg.size, random, cfg.maxWrite);
  const mem = new MemoryFile("crash.qcow2");
  await createQcow2(mem, cfg.size, cfg.opts);
  if (cfg.prefillHostBytes !== undefined) {
    const node = await Qcow2Node.open(borrowFile(mem), openOptions(cs, cfg.smallCaches));
    const chunk = 8 * cs;
    for (
      let at = 0;
      mem.size() < cfg.prefillHostBytes && at + chunk <= layout.length;
      at += chunk
    ) {
      await work.write(node, at, chunk, 0);
    }
    await node.close();
    work.ops.length = 0;
  }
  const file = new CrashFile("crash.qcow2", mem.contents());
  const rec: Recording = {
    file,
    layout,
    lazy: cfg.opts.lazyRefcounts ?? false,
    ops: work.ops,
    marks: [{ end: 0, model: work.model.slice(), ops: 0 }],
  };
  const mark = () =>
    rec.marks.push({ end: file.position, model: work.model.slice(), ops: work.ops.length });
  const open = () => Qcow2Node.open(file, openOptions(cs, cfg.smallCaches));
  let node = await open();
  const table = node.refcounts.tableOffset;
  for (let n = 0; n < cfg.ops; n++) {
    const r = random();
    if (r < 0.8) {
      await work.step(node, file.position);
    } else if (r < 0.96) {
      await node.flush();
      mark();
    } else {
      // A clean close and reopen (lazy refcounts: the dirty bit is cleared, then set again).
      await node.close();
      mark();
      node = await open();
    }
  }
  if (cfg.growsRefcountTable) {
    assert.notEqual(node.refcounts.tableOffset, table, "the refcount table grew while recording");
  }
  await node.close();
  mark();
  return rec;
}

for (const [i, cfg] of writeConfigs.entries()) {
  const seed = 0xc7a50000 + i * 0x101;
  Deno.test(
    `qcow2 (${cfg.name}) keeps flushed data and consistent metadata through a crash at every write boundary (seed ${
      hex(seed)
    })`,
    async () => {
      const rec = await recordWrites(cfg, seed);
      const log = rec.file.log;
      const points = choosePoints(0, log.length, {
        seed: seed ^ 0x5eed,
        maxPrefix: cfg.maxPrefix,
        subsets: cfg.subsets,
      });
      const failures = await crashFailures(
        rec.file.base,
        log,
        points,
        (point, image) => judgeDataImage(rec, point, image),
      );
      assertNoFailures(failures, log, `${log.length} host operations`);
    },
  );
}

// ---- test 2: snapshot create, apply and delete ----

/** A recorded stretch of the snapshot scenario and what a crash inside it may show. */
interface SnapshotWindow {
  readonly label: string;
  readonly from: number;
  readonly to: number;
  /** Snapshot lists the image may show (before and after an operation). */
  readonly names: readonly (readonly string[])[];
  /**
   * Active contents the image may show (before and after an operation); undefined for a stretch
   * of guest writes, judged against the byte model and its flushes instead.
   */
  readonly active: readonly Uint8Array[] | undefined;
  /** Contents of every snapshot the lists name. */
  readonly saved: ReadonlyMap<string, Uint8Array>;
}

interface SnapshotConfig {
  name: string;
  opts: Qcow2CreateOptions;
  size: number;
  windows: number[];
  windowLength: number;
  smallCaches: boolean;
  subsetsPerWindow: number;
}

const snapshotConfigs: SnapshotConfig[] = [
  {
    name: "v3 64 KiB",
    opts: {},
    size: 1536 * MiB,
    windows: [0, 512 * MiB - 256 * KiB],
    windowLength: 512 * KiB,
    smallCaches: false,
    subsetsPerWindow: 40,
  },
  {
    name: "v2 4 KiB, two-table caches",
    opts: { compat: "0.10", clusterSize: 4096 },
    size: 8 * MiB,
    windows: [0, 2 * MiB - 128 * KiB, 6 * MiB],
    windowLength: 256 * KiB,
    smallCaches: true,
    subsetsPerWindow: 40,
  },
  {
    name: "v3 extended L2 32 KiB, refcount_bits=4",
    opts: { clusterSize: 32768, extendedL2: true, refcountBits: 4 },
    size: 192 * MiB,
    windows: [0, 64 * MiB - 256 * KiB],
    windowLength: 512 * KiB,
    smallCaches: false,
    subsetsPerWindow: 40,
  },
  {
    name: "v3 4 KiB lazy refcounts",
    opts: { clusterSize: 4096, lazyRefcounts: true },
    size: 8 * MiB,
    windows: [0, 2 * MiB - 128 * KiB],
    windowLength: 256 * KiB,
    smallCaches: true,
    subsetsPerWindow: 40,
  },
];

/**
 * Records a snapshot scenario on a node over a {@linkcode CrashFile}: each snapshot operation is
 * one window (flushed before and after), and so is each stretch of guest writes between them.
 */
class SnapshotRecorder {
  readonly windows: SnapshotWindow[] = [];
  readonly saved = new Map<string, Uint8Array>();
  readonly rec: Recording;

  constructor(
    readonly node: Qcow2Node,
    readonly file: CrashFile,
    readonly work: Workload,
    lazy: boolean,
  ) {
    this.rec = {
      file,
      layout: work.layout,
      lazy,
      ops: work.ops,
      marks: [{ end: file.position, model: work.model.slice(), ops: work.ops.length }],
    };
  }

  names(): string[] {
    return this.node.snapshots.entries.map((e) => e.name);
  }

  async #flush(): Promise<void> {
    await this.node.flush();
    const { marks, ops } = this.rec;
    marks.push({ end: this.file.position, model: this.work.model.slice(), ops: ops.length });
  }

  /** Guest writes (copy-on-write of shared clusters once snapshots exist), some flushes. */
  async writes(count: number): Promise<void> {
    const from = this.file.position;
    for (let i = 0; i < count; i++) {
      if (this.work.random() < 0.2) await this.#flush();
      else await this.work.step(this.node, this.file.position);
    }
    await this.#flush();
    this.windows.push({
      label: `writes with snapshots [${this.names()}]`,
      from,
      to: this.file.position,
      names: [this.names()],
      active: undefined,
      saved: new Map(this.saved),
    });
  }

  /** Run `fn` as one window between flushes; `activeAfter` when it changes the active data. */
  async op(label: string, fn: () => Promise<unknown>, activeAfter?: Uint8Array): Promise<void> {
    await this.#flush();
    const from = this.file.position;
    const names = this.names();
    const active = this.work.model.slice();
    await fn();
    if (activeAfter) this.work.model.set(activeAfter);
    await this.#flush();
    this.windows.push({
      label,
      from,
      to: this.file.position,
      names: [names, this.names()],
      active: [active, activeAfter ?? active],
      saved: new Map(this.saved),
    });
  }

  async create(name: string): Promise<void> {
    this.saved.set(name, this.work.model.slice());
    await this.op(`create "${name}"`, () => createSnapshot(this.node, name, SNAPSHOT_TIME));
  }

  async apply(name: string): Promise<void> {
    const contents = this.saved.get(name)!;
    await this.op(`apply "${name}"`, () => applySnapshot(this.node, name), contents);
  }

  async delete(name: string): Promise<void> {
    await this.op(`delete "${name}"`, () => deleteSnapshot(this.node, name));
    this.saved.delete(name);
  }
}

async function judgeSnapshotImage(
  rec: Recording,
  win: SnapshotWindow,
  point: CrashPoint,
  image: HostFile,
): Promise<string | undefined> {
  const repaired = rec.lazy && markedDirty(image);
  const node = await openCrashed(image);
  if (typeof node === "string") return node;
  try {
    const problem = judgeCheck(checkImage(node), repaired);
    if (problem !== undefined) return problem;
    const listed = node.snapshots.entries.map((e) => e.name);
    if (!win.names.some((names) => names.join("/") === listed.join("/"))) {
      return `snapshots [${listed}] are none of ${win.names.map((n) => `[${n}]`).join(", ")}`;
    }
    const active = await readWindows(node, rec.layout);
    if (win.active === undefined) {
      const lost = judgeData(rec, point.cut, active);
      if (lost !== undefined) return lost;
    } else if (!win.active.some((a) => sameBytes(active, a))) {
      const at = firstDifference(active, win.active[0]!);
      return `active data is neither the old nor the new (first difference at guest ${
        hex(rec.layout.guest(at))
      })`;
    }
    for (const name of listed) {
      await applySnapshot(node, name);
      const got = await readWindows(node, rec.layout);
      const want = win.saved.get(name)!;
      if (!sameBytes(got, want)) {
        const at = rec.layout.guest(firstDifference(got, want));
        return `snapshot "${name}" lost data at guest ${hex(at)}`;
      }
    }
    const after = judgeCheck(checkImage(node), false);
    if (after !== undefined) return `after applying every snapshot: ${after}`;
    return undefined;
  } catch (e) {
    return `threw: ${e instanceof Error ? e.message : String(e)}`;
  } finally {
    await node.close().catch(() => {});
  }
}

/** Crash points for every window of a recorded snapshot scenario; failures named by window. */
async function snapshotFailures(
  recorder: SnapshotRecorder,
  opts: { seed: number; maxPrefix: number; subsets: number },
): Promise<string[]> {
  const { rec, windows } = recorder;
  const failures: string[] = [];
  for (const [w, win] of windows.entries()) {
    const points = choosePoints(win.from, win.to, { ...opts, seed: opts.seed + w });
    const found = await crashFailures(
      rec.file.base,
      rec.file.log,
      points,
      (point, image) => judgeSnapshotImage(rec, win, point, image),
    );
    failures.push(...found.map((f) => `${win.label} [log ${win.from}..${win.to}] ${f}`));
  }
  return failures;
}

for (const [i, cfg] of snapshotConfigs.entries()) {
  const seed = 0x5a9c0000 + i * 0x101;
  Deno.test(
    `qcow2 (${cfg.name}) snapshot create, apply and delete leave the old or the new state after a crash at every boundary (seed ${
      hex(seed)
    })`,
    async () => {
      const random = rng(seed);
      const cs = cfg.opts.clusterSize ?? 65536;
      const layout = new Layout(cfg.windows, cfg.windowLength);
      const mem = new MemoryFile("crash.qcow2");
      await createQcow2(mem, cfg.size, cfg.opts);
      const file = new CrashFile("crash.qcow2", mem.contents());
      const work = new Workload(layout, cs, cfg.size, random, 4 * cs);
      const node = await Qcow2Node.open(file, openOptions(cs, cfg.smallCaches));
      const rec = new SnapshotRecorder(node, file, work, cfg.opts.lazyRefcounts ?? false);
      await rec.writes(12);
      await rec.create("a");
      await rec.writes(10);
      await rec.create("b");
      await rec.writes(10);
      await rec.apply("a");
      await rec.writes(8);
      await rec.create("c");
      await rec.delete("b");
      await rec.writes(6);
      await rec.delete("a");
      await rec.apply("c");
      await node.close();
      const failures = await snapshotFailures(rec, {
        seed,
        maxPrefix: 400,
        subsets: cfg.subsetsPerWindow,
      });
      assertNoFailures(failures, file.log, `${rec.windows.length} windows`);
    },
  );
}

// ---- test 3: refcount table growth ----

/**
 * refcount_bits=64 with 512-byte clusters: a block counts 64 clusters, a one-cluster table 64
 * blocks, so the table grows when the host file passes 2 MiB (and again at 4 MiB).
 */
const GROWTH_OPTS: Qcow2CreateOptions = { clusterSize: 512, refcountBits: 64 };

for (const [i, hostLimit] of [2 * MiB, 4 * MiB].entries()) {
  const seed = 0x960e0000 + i;
  Deno.test(
    `qcow2 refcount table growth past ${
      hostLimit / MiB
    } MiB of host survives a crash at every boundary of the write that grows it (seed ${
      hex(seed)
    })`,
    async () => {
      const cs = 512;
      const size = 8 * MiB;
      const layout = new Layout([0], 5 * MiB);
      const work = new Workload(layout, cs, size, rng(seed), 4 * KiB);
      const mem = new MemoryFile("crash.qcow2");
      await createQcow2(mem, size, GROWTH_OPTS);
      // Unrecorded: fill sequentially to just below the limit.
      const chunk = 8 * KiB;
      let at = 0;
      const filler = await Qcow2Node.open(borrowFile(mem), { cacheCleanInterval: 0 });
      for (; mem.size() < hostLimit - 24 * KiB; at += chunk) await work.write(filler, at, chunk, 0);
      const tableBefore = filler.refcounts.tableOffset;
      await filler.close();
      work.ops.length = 0;

      const file = new CrashFile("crash.qcow2", mem.contents());
      const rec: Recording = {
        file,
        layout,
        lazy: false,
        ops: work.ops,
        marks: [{ end: 0, model: work.model.slice(), ops: 0 }],
      };
      const node = await Qcow2Node.open(file, openOptions(cs, true));
      // Writes of 4 KiB, a flush after every third; the window runs from the write that moves
      // the table to the end of the flush after it.
      const windows: Array<[number, number]> = [];
      let growing: number | undefined;
      for (let n = 0; n < 60; n++, at += 4 * KiB) {
        const start = file.position;
        const table = node.refcounts.tableOffset;
        await work.write(node, at, 4 * KiB, start);
        if (node.refcounts.tableOffset !== table) growing ??= start;
        if (n % 3 === 2) {
          await node.flush();
          rec.marks.push({ end: file.position, model: work.model.slice(), ops: work.ops.length });
          if (growing !== undefined) windows.push([growing, file.position]);
          growing = undefined;
        }
      }
      await node.close();
      assert.notEqual(node.refcounts.tableOffset, tableBefore, "the refcount table moved");
      assert.equal(windows.length, 1, "one write grew the table");
      const [from, to] = windows[0]!;
      const points = choosePoints(from, to, { seed, maxPrefix: 1000, subsets: 200 });
      const failures = await crashFailures(
        file.base,
        file.log,
        points,
        (point, image) => judgeDataImage(rec, point, image),
      );
      assertNoFailures(failures, file.log, `growth window ${from}..${to}`);
    },
  );
}

Deno.test(
  `qcow2 snapshot creation that grows the refcount table survives a crash at every boundary (seed ${
    hex(0x960e5a9c)
  })`,
  async () => {
    const cs = 512;
    const size = 4 * MiB;
    const layout = new Layout([0], 3 * MiB);
    const failures: Array<[string[], readonly FileOp[], number]> = [];
    const grown: number[] = [];
    // Free clusters left below the 2 MiB limit before the snapshot decide which step of the
    // creation grows the table: with none, allocating the L1 copy; with two, the snapshot table.
    const spares = [0, 2];
    for (const spare of spares) {
      const work = new Workload(layout, cs, size, rng(0x960e5a9c + spare), 4 * KiB);
      const mem = new MemoryFile("crash.qcow2");
      await createQcow2(mem, size, GROWTH_OPTS);
      const filler = await Qcow2Node.open(borrowFile(mem), { cacheCleanInterval: 0 });
      for (let at = 0; mem.size() < 2 * MiB - spare * cs; at += cs) {
        await work.write(filler, at, cs, 0);
      }
      await filler.close();
      const file = new CrashFile("crash.qcow2", mem.contents());
      const node = await Qcow2Node.open(file, { cacheCleanInterval: 0 });
      const rec = new SnapshotRecorder(node, file, work, false);
      const table = node.refcounts.tableOffset;
      await rec.create("grow");
      if (node.refcounts.tableOffset !== table) grown.push(spare);
      await node.close();
      const found = await snapshotFailures(rec, {
        seed: 0x960e5a9c + spare,
        maxPrefix: 400,
        subsets: 30,
      });
      if (found.length > 0) {
        failures.push([found.map((f) => `${spare} spare clusters: ${f}`), file.log, spare]);
      }
    }
    assert.deepEqual(grown, spares, "the refcount table grew during every snapshot creation");
    if (failures.length > 0) {
      const [found, log, spare] = failures[0]!;
      assertNoFailures(
        found,
        log,
        `snapshot creation with ${spare} spare clusters; ${failures.length} of ${spares.length} creations failed`,
      );
    }
  },
);

// ---- test 4: an L2 table evicted between flushes ----

/**
 * Data reaches the disk before an L2 table that points at it, also when the table leaves the
 * cache by eviction rather than by a flush. Two-table caches: a zero write dirties a second
 * table, a read loads a third, and the dirty first table is written back. Every subset of the
 * unflushed host writes is tried.
 */
const evictionCases: Array<[string, boolean, "copy-on-write" | "whole new"]> = [
  ["v3 4 KiB", false, "copy-on-write"],
  ["v3 4 KiB", false, "whole new"],
  ["v3 4 KiB lazy refcounts", true, "copy-on-write"],
  ["v3 4 KiB lazy refcounts", true, "whole new"],
];

for (const [name, lazy, kind] of evictionCases) {
  Deno.test(`qcow2 (${name}) keeps flushed data and stays openable when an L2 table pointing at a ${kind} cluster is evicted between flushes, for every subset of unflushed writes`, async () => {
    const cs = 4096;
    const size = 8 * MiB;
    // Three windows in three L2 tables (2 MiB each).
    const layout = new Layout([0, 2 * MiB, 4 * MiB], 4 * cs);
    const W = layout.windowLength;
    const work = new Workload(layout, cs, size, rng(0xe71c7), cs);
    const mem = new MemoryFile("crash.qcow2");
    await createQcow2(mem, size, { clusterSize: cs, lazyRefcounts: lazy });
    const file = new CrashFile("crash.qcow2", mem.contents());
    const rec: Recording = {
      file,
      layout,
      lazy,
      ops: work.ops,
      marks: [{ end: 0, model: work.model.slice(), ops: 0 }],
    };
    const node = await Qcow2Node.open(file, openOptions(cs, true));
    const flush = async () => {
      await node.flush();
      rec.marks.push({ end: file.position, model: work.model.slice(), ops: work.ops.length });
    };
    // Cluster 0 compressed, one cluster in each other table.
    await work.compressed(node, 0, new Uint8Array(cs).fill(0x11), file.position);
    await work.write(node, W, cs, file.position);
    await work.write(node, 2 * W, cs, file.position);
    if (kind === "copy-on-write") {
      // A freed cluster inside the file for the copy to land in (it reads as zeroes).
      await work.write(node, cs, cs, file.position);
      await flush();
      await work.discard(node, cs, cs, file.position);
    }
    await flush();
    const from = file.position;
    if (kind === "copy-on-write") {
      // The rest of cluster 0 is copied from the compressed data, which was flushed.
      await work.write(node, 100, 512, file.position);
    } else {
      // A cluster at the end of the file.
      await work.write(node, 3 * cs, cs, file.position);
    }
    await work.zero(node, W, cs, file.position);
    await node.read(layout.guest(2 * W), new Uint8Array(cs));
    await flush();
    await node.close();
    const points = allSubsets(file.log, from, file.position);
    const failures = await crashFailures(
      file.base,
      file.log,
      points,
      (point, image) => judgeDataImage(rec, point, image),
    );
    assertNoFailures(failures, file.log, `${points.length} crash images`);
  });
}
