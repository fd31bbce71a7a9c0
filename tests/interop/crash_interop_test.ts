/**
 * Crash safety judged by real `qemu-img check`: every host write and flush of `snapshot -c/-a/-d`,
 * guest I/O, `resize`, `amend`, `commit` and `rebase` is recorded over a disk with a volatile write
 * cache (tests/formats/qcow2/crash_file.ts). Each crash image — a prefix cut at a write boundary,
 * or the state at the last flush plus a seeded subset (whole or sector-torn) of what followed — is
 * written to a file and must pass `qemu-img check` with exit 0 or 3 (leaks only), pass vstor's
 * check without corruption, and show the guest data as it was at the last completed flush (or
 * before/after the operation that was cut).
 *
 * Counts (cut points, subsets, images clean, images with leaks) are printed per operation.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import type { BlockNode } from "../../src/block/node.ts";
import { MemoryFile } from "../../src/host/memory.ts";
import { borrowFile, type HostFile } from "../../src/host/host_file.ts";
import { createQcow2, type Qcow2CreateOptions } from "../../formats/qcow2/create.ts";
import { Qcow2Node } from "../../formats/qcow2/qcow2.ts";
import { checkImage } from "../../formats/qcow2/check.ts";
import { amendQcow2, type Qcow2AmendOptions } from "../../formats/qcow2/amend.ts";
import { applySnapshot, createSnapshot, deleteSnapshot } from "../../formats/qcow2/snapshot_ops.ts";
import { commitImage, type ImageOpener, rebaseImage } from "../../formats/chain.ts";
import {
  CrashFile,
  crashImages,
  type CrashPoint,
  describeOps,
  type FileOp,
  lastFlushBefore,
  type OverlayFile,
  rng,
} from "../formats/qcow2/crash_file.ts";
import { ignoreWithout, runTool } from "./qemu.ts";

const ignore = ignoreWithout("qemu-img");
const KiB = 1024;
const MiB = 1024 * KiB;
const NOW = 1_700_000_000_000;
const hex = (n: number) => `0x${n.toString(16)}`;

// ---- the guest: a byte model of the whole disk, its operations and flushes ----

interface GuestOp {
  readonly start: number;
  readonly offset: number;
  readonly length: number;
  /** Contents afterwards; undefined for zeroes. */
  readonly data: Uint8Array | undefined;
}

interface FlushMark {
  readonly end: number;
  readonly model: Uint8Array;
  readonly ops: number;
}

function pattern(n: number, at: number, length: number): Uint8Array {
  const data = new Uint8Array(length);
  for (let i = 0; i < length; i++) data[i] = ((n * 37 + (at + i) * 7 + ((at + i) >> 9)) & 0xff) | 1;
  return data;
}

/** Seeded guest writes, zero writes, discards and compressed writes over a byte model. */
class Guest {
  model: Uint8Array;
  readonly ops: GuestOp[] = [];
  readonly marks: FlushMark[] = [];
  #n = 0;

  constructor(size: number, readonly clusterSize: number, readonly random: () => number) {
    this.model = new Uint8Array(size);
  }

  async write(node: Qcow2Node, start: number, at: number, length: number): Promise<void> {
    const data = pattern(++this.#n, at, length);
    await node.write(at, data);
    this.model.set(data, at);
    this.ops.push({ start, offset: at, length, data });
  }

  async step(node: Qcow2Node, start: number): Promise<void> {
    const cs = this.clusterSize;
    const int = (n: number) => Math.floor(this.random() * n);
    const size = this.model.length;
    const at = this.random() < 0.4 ? int(size / cs) * cs : int(size - 1);
    const length = Math.min(size - at, 1 + int(3 * cs));
    const r = this.random();
    if (r < 0.55) {
      await this.write(node, start, at, length);
    } else if (r < 0.75) {
      await node.writeZeroes(at, length, { unmap: this.random() < 0.5 });
      this.model.fill(0, at, at + length);
      this.ops.push({ start, offset: at, length, data: undefined });
    } else if (r < 0.9) {
      await node.discard(at, length);
      const first = Math.ceil(at / cs) * cs;
      const end = at + length === size ? size : Math.floor((at + length) / cs) * cs;
      if (end > first) {
        this.model.fill(0, first, end);
        this.ops.push({ start, offset: first, length: end - first, data: undefined });
      }
    } else {
      // A compressed cluster where the guest never wrote (compressed writes need one).
      const c = int(size / cs) * cs;
      const touched = this.ops.some((op) => op.offset < c + cs && c < op.offset + op.length) ||
        this.model.subarray(c, c + cs).some((b) => b !== 0);
      if (touched) return;
      const data = new Uint8Array(cs);
      data.set(pattern(++this.#n, c, cs / 4));
      await node.write(c, data, { compressed: true });
      this.model.set(data, c);
      this.ops.push({ start, offset: c, length: cs, data });
    }
  }

  mark(end: number): void {
    this.marks.push({ end, model: this.model.slice(), ops: this.ops.length });
  }
}

/**
 * Flushed data intact: bytes no later operation touched read as at the last completed guest
 * flush; touched bytes read as that or as what a later operation left there.
 */
function judgeGuestData(
  guest: Guest,
  log: readonly FileOp[],
  cut: number,
  got: Uint8Array,
): string | undefined {
  const durable = lastFlushBefore(log, cut) + 1;
  let mark = guest.marks[0]!;
  for (const m of guest.marks) if (m.end <= durable) mark = m;
  const want = mark.model;
  if (got.length !== want.length) return `virtual size ${got.length}, want ${want.length}`;
  const explained = new Uint8Array(want.length);
  const covered = new Uint8Array(want.length);
  for (const op of guest.ops.slice(mark.ops)) {
    if (op.start >= cut) break;
    for (let i = 0; i < op.length; i++) {
      covered[op.offset + i] = 1;
      if (got[op.offset + i] === (op.data ? op.data[i] : 0)) explained[op.offset + i] = 1;
    }
  }
  for (let i = 0; i < want.length; i++) {
    if (got[i] === want[i]) continue;
    if (!covered[i]) return `flushed data lost at guest ${hex(i)} (flush at log ${mark.end})`;
    if (!explained[i]) return `stale data at guest ${hex(i)}`;
  }
  return undefined;
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
  for (let i = 0; i < Math.min(a.length, b.length); i++) if (a[i] !== b[i]) return i;
  return Math.min(a.length, b.length);
}

// ---- opening and judging a crash image with vstor ----

const QUIET = { cacheCleanInterval: 0 } as const;

async function openReadOnly(file: HostFile, backing?: BlockNode): Promise<Qcow2Node> {
  const node = await Qcow2Node.open(borrowFile(file), { ...QUIET, readOnly: true });
  if (backing !== undefined) node.attachBacking(backing);
  return node;
}

async function readAll(node: BlockNode): Promise<Uint8Array> {
  const out = new Uint8Array(node.size);
  for (let at = 0; at < out.length; at += MiB) {
    await node.read(at, out.subarray(at, Math.min(out.length, at + MiB)));
  }
  return out;
}

/** vstor's check: no corruption and no check error (leaks are allowed). */
function vstorCheck(node: Qcow2Node): string | undefined {
  const report = checkImage(node);
  if (report.corruptions === 0 && report.checkErrors === 0) return undefined;
  return `vstor check: ${report.corruptions} corruptions, ${report.checkErrors} errors: ${
    report.messages.filter((m) => !m.startsWith("Leaked")).slice(0, 4).join("; ")
  }`;
}

/** What a crash inside a window may show: judged on the crash image opened read-only. */
type Judge = (
  image: OverlayFile,
  point: CrashPoint,
  qemu?: QemuReader,
) => Promise<string | undefined>;

/** The guest view as `qemu-img convert` reads it (the active state, or a snapshot's). */
type QemuReader = (snapshot?: string) => Promise<Uint8Array>;

/** Compare what QEMU reads with what vstor read (sampled images only). */
async function sameAsQemu(
  qemu: QemuReader | undefined,
  read: Uint8Array,
  snapshot?: string,
): Promise<string | undefined> {
  if (qemu === undefined) return undefined;
  let vstor = read;
  let got = await qemu(snapshot);
  // `convert -l` reads a snapshot at the image's current size (vstor at the snapshot's): past
  // the snapshot's size QEMU shows zeroes; the common part must agree.
  if (snapshot !== undefined && got.length !== vstor.length) {
    if (got.subarray(vstor.length).some((b) => b !== 0)) {
      return `qemu-img convert -l snapshot.name=${snapshot} reads data past the snapshot's size`;
    }
    const common = Math.min(got.length, vstor.length);
    got = got.slice(0, common);
    vstor = vstor.slice(0, common);
  }
  if (sameBytes(got, vstor)) return undefined;
  return `qemu-img convert${
    snapshot ? ` -l snapshot.name=${snapshot}` : ""
  } reads ${got.length} bytes differing from vstor's ${vstor.length} at ${
    hex(firstDifference(got, vstor))
  }`;
}

/** A stretch of one file's log, with the files beside it and what its crash images must show. */
interface Window {
  readonly op: string;
  readonly label: string;
  readonly file: CrashFile;
  /** Name of the recorded file in the scratch directory. */
  readonly name: string;
  readonly from: number;
  readonly to: number;
  /** Other files the image needs (its backing files), by name. */
  readonly beside: ReadonlyMap<string, Uint8Array>;
  readonly judge: Judge;
  /** The file QEMU reads the guest view through (the top of the chain); default `name`. */
  readonly top?: string;
}

/** Active contents, snapshot list and snapshot contents a crash may show (old or new state). */
function stateJudge(
  states: readonly { active: Uint8Array; names: readonly string[] }[],
  saved: ReadonlyMap<string, Uint8Array>,
  guest?: { guest: Guest; log: readonly FileOp[] },
  /** Each byte may come from any state of the image's size (a guest discard is not atomic). */
  mixed = false,
  /** The backing file's contents (it is beside the image as base.qcow2). */
  backing?: Uint8Array,
): Judge {
  const open = async (image: HostFile) =>
    await openReadOnly(image, backing && await memNode(backing));
  return async (image, point, qemu) => {
    const node = await open(image);
    try {
      const problem = vstorCheck(node);
      if (problem !== undefined) return problem;
      if (backing !== undefined && node.backingName?.file !== "base.qcow2") {
        return `backing file name is ${JSON.stringify(node.backingName?.file)}`;
      }
      const names = node.snapshots.entries.map((e) => e.name);
      if (!states.some((s) => s.names.join("/") === names.join("/"))) {
        return `snapshots [${names}] are none of ${states.map((s) => `[${s.names}]`).join(", ")}`;
      }
      const active = await readAll(node);
      const differs = await sameAsQemu(qemu, active);
      if (differs !== undefined) return differs;
      if (guest !== undefined) {
        const lost = judgeGuestData(guest.guest, guest.log, point.cut, active);
        if (lost !== undefined) return lost;
      } else if (
        !states.some((s) => sameBytes(s.active, active)) && !(mixed && mixOf(states, active))
      ) {
        const at = firstDifference(active, states[0]!.active);
        return `active data is neither the old nor the new (size ${active.length}, first difference at ${
          hex(at)
        })`;
      }
      for (const name of names) {
        const view = await open(image);
        try {
          view.loadSnapshotForReading({ name });
          const got = await readAll(view);
          const want = saved.get(name)!;
          if (!sameBytes(got, want)) {
            return `snapshot "${name}" lost data at ${hex(firstDifference(got, want))}`;
          }
          if (name === names[0]) {
            const differs = await sameAsQemu(qemu, got, name);
            if (differs !== undefined) return differs;
          }
        } finally {
          await view.close();
        }
      }
      return undefined;
    } finally {
      await node.close();
    }
  };
}

function mixOf(states: readonly { active: Uint8Array }[], got: Uint8Array): boolean {
  const same = states.filter((s) => s.active.length === got.length).map((s) => s.active);
  if (same.length === 0) return false;
  for (let i = 0; i < got.length; i++) if (!same.some((s) => s[i] === got[i])) return false;
  return true;
}

// ---- choosing crash points and running the judges ----

interface Budget {
  seed: number;
  /** Every prefix cut when a window has at most this many; else a seeded sample of this many. */
  maxPrefix: number;
  /** Seeded subsets of the operations after the last flush, per window. */
  subsets: number;
}

function choosePoints(from: number, to: number, budget: Budget, seed: number): CrashPoint[] {
  const random = rng(seed);
  const points: CrashPoint[] = [];
  const span = to - from + 1;
  if (span <= budget.maxPrefix) {
    for (let cut = from; cut <= to; cut++) points.push({ cut });
  } else {
    const cuts = new Set([from, to]);
    while (cuts.size < budget.maxPrefix) cuts.add(from + Math.floor(random() * span));
    for (const cut of cuts) points.push({ cut });
  }
  for (let i = 0; i < budget.subsets && to > from; i++) {
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

/**
 * Crash points right after every header write longer than a sector, torn between its first
 * sector (offsets, sizes) and the rest (extensions, backing name): each half alone, with
 * everything else since the last flush on the disk.
 */
function tornHeaders(log: readonly FileOp[], from: number, to: number): CrashPoint[] {
  const points: CrashPoint[] = [];
  for (let i = from; i < to; i++) {
    const op = log[i]!;
    if (op.kind !== "write" || op.offset !== 0 || op.data.length <= 512) continue;
    points.push({ cut: i + 1, torn: { index: i, keep: "first" } });
    points.push({ cut: i + 1, torn: { index: i, keep: "rest" } });
  }
  return points;
}

function pointName(p: CrashPoint): string {
  if (p.torn !== undefined) {
    return `cut ${p.cut} with header write #${p.torn.index} torn (${
      p.torn.keep === "first" ? "first sector only" : "all but its first sector"
    })`;
  }
  if (p.subset === undefined) return `prefix cut ${p.cut}`;
  return `subset at cut ${p.cut} (seed ${hex(p.subset.seed)}, keep ${p.subset.keep.toFixed(2)}${
    p.subset.torn ? ", torn sectors" : ""
  })`;
}

/** Per operation: cut points tried, subsets tried, qemu-img check exit 0 and exit 3. */
interface Count {
  /** Write boundaries in the recorded windows (cut points possible). */
  boundaries: number;
  cuts: number;
  subsets: number;
  /** Header writes torn between their first sector and the rest. */
  torn: number;
  clean: number;
  leaks: number;
}

class Tally {
  readonly counts = new Map<string, Count>();
  readonly failures: string[] = [];
  images = 0;
  /** `qemu-img convert` reads compared with vstor's (active views and snapshots). */
  qemuReads = 0;
  firstFailure?: { log: readonly FileOp[]; cut: number };

  add(op: string, point: CrashPoint, code: number): void {
    let c = this.counts.get(op);
    if (c === undefined) {
      this.counts.set(op, c = { boundaries: 0, cuts: 0, subsets: 0, torn: 0, clean: 0, leaks: 0 });
    }
    if (point.torn) c.torn++;
    else if (point.subset) c.subsets++;
    else c.cuts++;
    if (code === 0) c.clean++;
    if (code === 3) c.leaks++;
  }

  window(op: string, boundaries: number): void {
    let c = this.counts.get(op);
    if (c === undefined) {
      this.counts.set(op, c = { boundaries: 0, cuts: 0, subsets: 0, torn: 0, clean: 0, leaks: 0 });
    }
    c.boundaries += boundaries;
  }

  report(title: string): void {
    const lines = [...this.counts].map(([op, c]) =>
      `  ${op}: ${c.cuts} of ${c.boundaries} cut points + ${c.subsets} seeded subsets + ${c.torn} torn headers; qemu-img check: ${c.clean} clean, ${c.leaks} leaks only, ${
        c.cuts + c.subsets + c.torn - c.clean - c.leaks
      } other`
    );
    console.log(
      `${title}\n${lines.join("\n")}\n  data read back through qemu-img convert and compared ` +
        `with vstor's reading: ${this.qemuReads} reads`,
    );
  }

  assertNone(): void {
    if (this.failures.length === 0) return;
    const f = this.firstFailure!;
    const flush = lastFlushBefore(f.log, f.cut);
    assert.fail(
      `${this.failures.length} crash images failed; the first ones:\n  ${
        this.failures.slice(0, 8).join("\n  ")
      }\nhost operations from the last flush before the first failing cut:\n${
        describeOps(f.log, flush, f.cut + 2)
      }`,
    );
  }
}

async function qemuCheck(path: string): Promise<{ code: number; text: string }> {
  const r = await runTool("qemu-img", ["check", "-f", "qcow2", path]);
  const lines = (r.stderr + r.stdout).trim().split("\n");
  const errors = lines.filter((l) => !l.startsWith("Leaked cluster"));
  return { code: r.code, text: errors.slice(0, 4).join(" | ") };
}

/** Every this many crash images (and every torn header), QEMU's reading is compared with vstor's. */
const QEMU_READ_EVERY = 5;

async function qemuRead(path: string, raw: string, snapshot?: string): Promise<Uint8Array> {
  const args = ["convert", "-f", "qcow2", "-O", "raw"];
  if (snapshot !== undefined) args.push("-l", `snapshot.name=${snapshot}`);
  const r = await runTool("qemu-img", [...args, path, raw]);
  if (r.code !== 0) throw new Error(`qemu-img convert exited ${r.code}: ${r.stderr.trim()}`);
  return Deno.readFileSync(raw);
}

async function judgeWindows(
  dir: string,
  windows: readonly Window[],
  budget: Budget,
  tally: Tally,
): Promise<void> {
  for (const [w, win] of windows.entries()) {
    for (const [name, bytes] of win.beside) Deno.writeFileSync(join(dir, name), bytes);
    const path = join(dir, win.name);
    const points = [
      ...choosePoints(win.from, win.to, budget, budget.seed + w * 7919),
      ...tornHeaders(win.file.log, win.from, win.to),
    ];
    tally.window(win.op, win.to - win.from + 1);
    const top = join(dir, win.top ?? win.name);
    for (const [point, image] of crashImages(win.file.base, win.file.log, points)) {
      const sampled = tally.images++ % QEMU_READ_EVERY === 0 || point.torn !== undefined;
      const qemu: QemuReader | undefined = sampled
        ? async (snapshot) => {
          tally.qemuReads++;
          return await qemuRead(top, join(dir, "view.raw"), snapshot);
        }
        : undefined;
      Deno.writeFileSync(path, image.contents());
      // qemu-img checks the file while vstor judges the same bytes in memory.
      const checking = qemuCheck(path);
      let problem: string | undefined;
      try {
        problem = await win.judge(image, point, qemu);
      } catch (e) {
        problem = `threw: ${e instanceof Error ? e.message : String(e)}`;
      }
      const checked = await checking;
      tally.add(win.op, point, checked.code);
      if (checked.code !== 0 && checked.code !== 3) {
        problem = `qemu-img check exit ${checked.code}: ${checked.text}`;
      }
      if (problem !== undefined) {
        tally.failures.push(
          `${win.label} [log ${win.from}..${win.to}] ${pointName(point)}: ${problem}`,
        );
        tally.firstFailure ??= { log: win.file.log, cut: point.cut };
      }
    }
  }
}

async function withDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = Deno.makeTempDirSync({ prefix: "vstor_crash_interop_" });
  try {
    await fn(dir);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
}

// ---- recording ----

/** An image made unrecorded: data in every L2 table, a compressed and a zero cluster. */
async function prefilled(
  size: number,
  opts: Qcow2CreateOptions,
  guest: Guest,
): Promise<Uint8Array> {
  const mem = new MemoryFile("prefill.qcow2");
  await createQcow2(mem, size, opts);
  const node = await Qcow2Node.open(borrowFile(mem), QUIET);
  const cs = guest.clusterSize;
  const tables = 4;
  for (let t = 0; t < tables; t++) {
    const at = Math.floor((t * size) / tables / cs) * cs;
    await guest.write(node, 0, at + cs, 3 * cs + 100);
  }
  const c = Math.floor(size / 2 / cs) * cs + 8 * cs;
  const data = new Uint8Array(cs);
  data.set(pattern(99, c, cs / 4));
  await node.write(c, data, { compressed: true });
  guest.model.set(data, c);
  await node.writeZeroes(cs, cs);
  guest.model.fill(0, cs, 2 * cs);
  await node.close();
  guest.ops.length = 0;
  return mem.contents();
}

/** Records windows over one node: each snapshot operation alone, and stretches of guest I/O. */
class Recorder {
  readonly windows: Window[] = [];
  readonly saved = new Map<string, Uint8Array>();

  constructor(
    readonly node: Qcow2Node,
    readonly file: CrashFile,
    readonly guest: Guest,
    readonly tag: string,
  ) {
    guest.mark(file.position);
  }

  names(): string[] {
    return this.node.snapshots.entries.map((e) => e.name);
  }

  async flush(): Promise<void> {
    await this.node.flush();
    this.guest.mark(this.file.position);
  }

  async io(count: number): Promise<void> {
    await this.flush();
    const from = this.file.position;
    for (let i = 0; i < count; i++) {
      if (this.guest.random() < 0.2) await this.flush();
      else await this.guest.step(this.node, this.file.position);
    }
    await this.flush();
    const names = this.names();
    this.windows.push({
      op: "guest I/O",
      label: `${this.tag}: guest I/O with snapshots [${names}]`,
      file: this.file,
      name: "image.qcow2",
      from,
      to: this.file.position,
      beside: new Map(),
      judge: stateJudge([{ active: this.guest.model, names }], new Map(this.saved), {
        guest: this.guest,
        log: this.file.log,
      }),
    });
  }

  async op(
    op: string,
    label: string,
    fn: () => Promise<unknown>,
    after?: Uint8Array,
  ): Promise<void> {
    await this.flush();
    const from = this.file.position;
    const before = { active: this.guest.model.slice(), names: this.names() };
    const saved = new Map(this.saved);
    await fn();
    if (after !== undefined) this.guest.model = after.slice();
    await this.flush();
    for (const [k, v] of this.saved) saved.set(k, v);
    const states = [before, { active: this.guest.model.slice(), names: this.names() }];
    this.windows.push({
      op,
      label: `${this.tag}: ${label}`,
      file: this.file,
      name: "image.qcow2",
      from,
      to: this.file.position,
      beside: new Map(),
      judge: stateJudge(states, saved),
    });
  }

  create(name: string): Promise<void> {
    this.saved.set(name, this.guest.model.slice());
    return this.op(
      "snapshot -c",
      `snapshot -c ${name}`,
      () => createSnapshot(this.node, name, NOW),
    );
  }

  apply(name: string): Promise<void> {
    const contents = this.saved.get(name)!;
    return this.op(
      "snapshot -a",
      `snapshot -a ${name}`,
      () => applySnapshot(this.node, name),
      contents,
    );
  }

  async delete(name: string): Promise<void> {
    await this.op("snapshot -d", `snapshot -d ${name}`, () => deleteSnapshot(this.node, name));
  }
}

interface Config {
  name: string;
  opts: Qcow2CreateOptions;
  size: number;
}

const CONFIGS: Config[] = [
  { name: "v3 4 KiB", opts: { clusterSize: 4 * KiB }, size: 8 * MiB },
  { name: "v2 4 KiB", opts: { compat: "0.10", clusterSize: 4 * KiB }, size: 8 * MiB },
  {
    name: "v3 extended L2 16 KiB",
    opts: { clusterSize: 16 * KiB, extendedL2: true },
    size: 16 * MiB,
  },
];

const SNAPSHOT_BUDGET = { maxPrefix: 40, subsets: 8 };

for (const [i, cfg] of CONFIGS.entries()) {
  const seed = 0xc0a50000 + i;
  Deno.test({
    name: `qemu-img check finds no corruption after a crash at any write of snapshot -c/-a/-d ` +
      `and guest I/O (${cfg.name}, seed ${hex(seed)})`,
    ignore,
    async fn() {
      const random = rng(seed);
      const cs = cfg.opts.clusterSize!;
      const guest = new Guest(cfg.size, cs, random);
      const base = await prefilled(cfg.size, cfg.opts, guest);
      const file = new CrashFile("image.qcow2", base);
      const node = await Qcow2Node.open(file, QUIET);
      const rec = new Recorder(node, file, guest, cfg.name);
      await rec.create("a");
      await rec.io(10);
      await rec.create("b");
      await rec.io(10);
      await rec.apply("a");
      await rec.io(6);
      await rec.delete("b");
      await rec.create("c");
      await rec.apply("c");
      await rec.delete("a");
      await rec.io(6);
      await rec.delete("c");
      await node.close();
      const tally = new Tally();
      await withDir((dir) => judgeWindows(dir, rec.windows, { seed, ...SNAPSHOT_BUDGET }, tally));
      tally.report(`${cfg.name} (seed ${hex(seed)}):`);
      tally.assertNone();
    },
  });
}

// ---- resize and amend: one operation per window, over a fresh recording each ----

/** Record `fn` over a copy of `base`; the window covers everything it wrote. */
async function recordOne(
  op: string,
  label: string,
  base: Uint8Array,
  fn: (file: CrashFile) => Promise<void>,
  states: readonly { active: Uint8Array; names: readonly string[] }[],
  saved: ReadonlyMap<string, Uint8Array>,
  mixed = false,
): Promise<Window> {
  const file = new CrashFile("image.qcow2", base);
  await fn(file);
  return {
    op,
    label,
    file,
    name: "image.qcow2",
    from: 0,
    to: file.position,
    beside: new Map(),
    judge: stateJudge(states, saved, undefined, mixed),
  };
}

function resized(model: Uint8Array, size: number): Uint8Array {
  const out = new Uint8Array(size);
  out.set(model.subarray(0, Math.min(size, model.length)));
  return out;
}

/** A prefilled image with snapshot "s" (taken unrecorded) and writes after it. */
async function withSnapshot(cfg: Config, seed: number) {
  const cs = cfg.opts.clusterSize!;
  const guest = new Guest(cfg.size, cs, rng(seed));
  const filled = await prefilled(cfg.size, cfg.opts, guest);
  const mem = new MemoryFile("s.qcow2", filled);
  const node = await Qcow2Node.open(borrowFile(mem), QUIET);
  await createSnapshot(node, "s", NOW);
  const snap = guest.model.slice();
  for (let n = 0; n < 6; n++) await guest.step(node, 0);
  await node.close();
  return { bytes: mem.contents(), active: guest.model.slice(), snap };
}

const OPEN_BUDGET = { maxPrefix: 40, subsets: 12 };

Deno.test({
  name: "qemu-img check finds no corruption after a crash at any write of resize and amend " +
    "(and of snapshot -c/-a/-d on an image with a backing file)",
  ignore,
  async fn() {
    const seed = 0xc0a5a000;
    const windows: Window[] = [];
    for (const [i, cfg] of CONFIGS.entries()) {
      const cs = cfg.opts.clusterSize!;
      const guest = new Guest(cfg.size, cs, rng(seed + i));
      const plain = await prefilled(cfg.size, cfg.opts, guest);
      const active = guest.model.slice();
      const open = (file: CrashFile) => () => Qcow2Node.open(file, QUIET);
      // Grow past the L1 table (a new one), then shrink back (data past the end discarded first).
      const big = cfg.size * 8;
      windows.push(
        await recordOne(
          "resize",
          `${cfg.name}: resize to ${big}`,
          plain,
          async (file) => {
            const node = await open(file)();
            await node.truncate(big);
            await node.close();
          },
          [{ active, names: [] }, { active: resized(active, big), names: [] }],
          new Map(),
        ),
      );
      const small = cfg.size / 2;
      windows.push(
        await recordOne(
          "resize",
          `${cfg.name}: resize --shrink to ${small}`,
          plain,
          async (file) => {
            const node = await open(file)();
            await node.discard(small, cfg.size - small);
            await node.truncate(small);
            await node.close();
          },
          [
            { active, names: [] },
            { active: resized(active, small), names: [] },
            {
              active: (() => {
                const a = active.slice();
                a.fill(0, small);
                return a;
              })(),
              names: [],
            },
          ],
          new Map(),
          true,
        ),
      );
      const snap = await withSnapshot(cfg, seed + 0x10 + i);
      const saved = new Map([["s", snap.snap]]);
      type State = { active: Uint8Array; names: string[] };
      const same: State[] = [{ active: snap.active, names: ["s"] }];
      const half = cfg.size / 2;
      const zeroTail = snap.active.slice().fill(0, half);
      /** What, options, states a crash may show, and whether bytes may mix (a discard). */
      const amends: Array<[string, Qcow2AmendOptions, State[], boolean?]> = [
        ["refcount_bits=4", { refcountBits: 4 }, same],
        ["refcount_bits=64", { refcountBits: 64 }, same],
        ["lazy_refcounts=on", { lazyRefcounts: true }, same],
        ["size (grow, with a snapshot)", { size: big }, [...same, {
          active: resized(snap.active, big),
          names: ["s"],
        }]],
      ];
      if (cfg.opts.compat !== "0.10") {
        // v3 shrinks with snapshots (they keep their size): the tail is discarded first.
        amends.push(["size (shrink, with a snapshot)", { size: half }, [
          ...same,
          { active: zeroTail, names: ["s"] },
          { active: resized(snap.active, half), names: ["s"] },
        ], true]);
      }
      if (cfg.opts.compat === "0.10") amends.push(["compat=1.1", { compat: "1.1" }, same]);
      else if (!cfg.opts.extendedL2) amends.push(["compat=0.10", { compat: "0.10" }, same]);
      for (const [what, opts, states, mixed] of amends) {
        // v2 has no lazy refcounts, only 16-bit refcounts, and no resize with snapshots.
        if (cfg.opts.compat === "0.10" && !what.startsWith("compat")) continue;
        windows.push(
          await recordOne(
            "amend",
            `${cfg.name}: amend ${what}`,
            snap.bytes,
            async (file) => {
              await amendQcow2(open(file), opts);
            },
            states,
            saved,
            mixed ?? false,
          ),
        );
      }
    }
    // compat changes of images with a backing file and 64 KiB clusters: the v3 header (feature
    // name table, then the backing name) reaches past sector 0, the v2 one does not.
    for (const [from, to] of [["1.1", "0.10"], ["0.10", "1.1"]] as const) {
      const cs = 64 * KiB, size = 4 * MiB;
      const baseBytes = await makeImage(size, { clusterSize: cs }, [[0, 12 * cs]], 1);
      const mem = new MemoryFile("top.qcow2");
      await createQcow2(mem, size, {
        clusterSize: cs,
        compat: from,
        backingFile: "base.qcow2",
        backingFormat: "qcow2",
      });
      const node = await Qcow2Node.open(borrowFile(mem), QUIET);
      node.attachBacking(await memNode(baseBytes));
      await node.write(3 * cs + 5, pattern(7, 0, 2 * cs));
      await node.writeZeroes(6 * cs, 2 * cs);
      await createSnapshot(node, "s", NOW);
      await node.write(cs, pattern(8, 0, cs));
      node.attachBacking(undefined);
      await node.close();
      const top = mem.contents();
      const active = await chainView(new MemoryFile("t", top), baseBytes);
      const snapView = await openReadOnly(new MemoryFile("t", top), await memNode(baseBytes));
      snapView.loadSnapshotForReading({ name: "s" });
      const saved = new Map([["s", await readAll(snapView)]]);
      await snapView.close();
      if (from === "1.1") {
        // Snapshot operations on it: their header write spans two sectors, the first changes.
        const snaps: Array<[string, (node: Qcow2Node) => Promise<unknown>, string[], boolean]> = [
          ["snapshot -c t", (node) => createSnapshot(node, "t", NOW), ["s", "t"], false],
          ["snapshot -a s", (node) => applySnapshot(node, "s"), ["s"], true],
          ["snapshot -d s", (node) => deleteSnapshot(node, "s"), [], false],
        ];
        for (const [what, fn, after, applies] of snaps) {
          const file = new CrashFile("image.qcow2", top);
          const node = await Qcow2Node.open(file, QUIET);
          await fn(node);
          await node.close();
          const states = [{ active, names: ["s"] }, {
            active: applies ? saved.get("s")! : active,
            names: after,
          }];
          windows.push({
            op: what.slice(0, 11),
            label: `64 KiB with a backing file: ${what}`,
            file,
            name: "image.qcow2",
            from: 0,
            to: file.position,
            beside: new Map([["base.qcow2", baseBytes]]),
            judge: stateJudge(
              states,
              new Map([...saved, ["t", active]]),
              undefined,
              false,
              baseBytes,
            ),
          });
        }
      }
      const file = new CrashFile("image.qcow2", top);
      await amendQcow2(() => Qcow2Node.open(file, QUIET), { compat: to });
      windows.push({
        op: "amend",
        label: `64 KiB with a backing file: amend compat ${from} -> ${to}`,
        file,
        name: "image.qcow2",
        from: 0,
        to: file.position,
        beside: new Map([["base.qcow2", baseBytes]]),
        judge: stateJudge([{ active, names: ["s"] }], saved, undefined, false, baseBytes),
      });
    }
    const tally = new Tally();
    await withDir((dir) => judgeWindows(dir, windows, { seed, ...OPEN_BUDGET }, tally));
    tally.report(`resize and amend (seed ${hex(seed)}):`);
    tally.assertNone();
  },
});

// ---- commit and rebase: two or three files, each recorded alone ----

/** A qcow2 image in memory with `writes` of seeded data, optionally over a backing file. */
async function makeImage(
  size: number,
  opts: Qcow2CreateOptions,
  writes: Array<[number, number]>,
  n: number,
  backing?: { name: string; node: BlockNode },
): Promise<Uint8Array> {
  const mem = new MemoryFile("make.qcow2");
  await createQcow2(mem, size, {
    ...opts,
    ...(backing ? { backingFile: backing.name, backingFormat: "qcow2" } : {}),
  });
  const node = await Qcow2Node.open(borrowFile(mem), QUIET);
  if (backing) node.attachBacking(backing.node);
  for (const [at, length] of writes) await node.write(at, pattern(n++, at, length));
  node.attachBacking(undefined);
  await node.close();
  return mem.contents();
}

const memNode = (bytes: Uint8Array, path = "mem.qcow2") =>
  openReadOnly(new MemoryFile(path, bytes));

/** What `top` over `base` (images in memory) shows. */
async function chainView(top: HostFile, base: Uint8Array): Promise<Uint8Array> {
  const b = await memNode(base);
  const t = await openReadOnly(top, b);
  try {
    return await readAll(t);
  } finally {
    await t.close();
  }
}

/** What an image without a backing file shows. */
async function aloneView(image: HostFile): Promise<Uint8Array> {
  const node = await openReadOnly(image);
  try {
    return await readAll(node);
  } finally {
    await node.close();
  }
}

const CHAIN_BUDGET = { maxPrefix: 60, subsets: 20 };

Deno.test({
  name: "qemu-img check finds no corruption after a crash at any write of commit and rebase",
  ignore,
  async fn() {
    const seed = 0xc0a5c000;
    const windows: Window[] = [];
    for (const cfg of CONFIGS) {
      const cs = cfg.opts.clusterSize!;
      const size = cfg.size;
      const baseBytes = await makeImage(size, cfg.opts, [[0, 40 * cs], [size / 2, 9 * cs]], 1);
      const topBytes = await makeImage(
        size,
        cfg.opts,
        [[3 * cs + 7, 5 * cs], [size / 2 + cs, 20 * cs], [size - 4 * cs, 4 * cs]],
        50,
        { name: "base.qcow2", node: await memNode(baseBytes) },
      );
      const view = await chainView(new MemoryFile("t", topBytes), baseBytes);

      // commit: the base is written and flushed, then the top is emptied.
      const baseFile = new CrashFile("base.qcow2", baseBytes);
      const topFile = new CrashFile("top.qcow2", topBytes);
      const opener: ImageOpener = (path, opts) =>
        Qcow2Node.open(path.endsWith("base.qcow2") ? baseFile : topFile, {
          ...QUIET,
          readOnly: opts.readOnly ?? false,
        });
      await commitImage("/nonexistent/top.qcow2", { open: opener });
      const baseAfter = [
        ...crashImages(baseFile.base, baseFile.log, [{ cut: baseFile.position }]),
      ][0]![1]
        .contents();
      const judgeCommit =
        (top: (image: OverlayFile) => HostFile, base: (image: OverlayFile) => Uint8Array): Judge =>
        async (image, _point, qemu) => {
          const alone = await openReadOnly(image);
          try {
            const problem = vstorCheck(alone);
            if (problem !== undefined) return problem;
          } finally {
            await alone.close();
          }
          const got = await chainView(top(image), base(image));
          if (!sameBytes(got, view)) {
            return `the chain view changed at ${hex(firstDifference(got, view))}`;
          }
          return await sameAsQemu(qemu, got);
        };
      windows.push({
        op: "commit",
        label: `${cfg.name}: commit (writes into the base)`,
        file: baseFile,
        name: "base.qcow2",
        from: 0,
        to: baseFile.position,
        beside: new Map([["top.qcow2", topBytes]]),
        top: "top.qcow2",
        judge: judgeCommit(() => new MemoryFile("top", topBytes), (image) => image.contents()),
      });
      windows.push({
        op: "commit",
        label: `${cfg.name}: commit (empties the top)`,
        file: topFile,
        name: "top.qcow2",
        from: 0,
        to: topFile.position,
        beside: new Map([["base.qcow2", baseAfter]]),
        judge: judgeCommit((image) => image, () => baseAfter),
      });

      // rebase onto a different base: what the overlay shows must not change.
      const otherBytes = await makeImage(
        size,
        cfg.opts,
        [[cs * 2, 30 * cs], [size / 2, 3 * cs]],
        200,
      );
      const overlayFile = new CrashFile("top.qcow2", topBytes);
      const rebaseOpener: ImageOpener = async (path, opts) => {
        if (path.endsWith("top.qcow2")) {
          const node = await Qcow2Node.open(overlayFile, QUIET);
          if (!opts.noBacking) node.attachBacking(await memNode(baseBytes));
          return node;
        }
        return await memNode(otherBytes);
      };
      await rebaseImage("/nonexistent/top.qcow2", {
        backing: "other.qcow2",
        backingFormat: "qcow2",
        open: rebaseOpener,
      });
      windows.push({
        op: "rebase",
        label: `${cfg.name}: rebase onto other.qcow2`,
        file: overlayFile,
        name: "top.qcow2",
        from: 0,
        to: overlayFile.position,
        beside: new Map([["base.qcow2", baseBytes], ["other.qcow2", otherBytes]]),
        judge: async (image, _point, qemu) => {
          const node = await openReadOnly(image);
          let backing: Uint8Array;
          try {
            const problem = vstorCheck(node);
            if (problem !== undefined) return problem;
            const name = node.backingName?.file;
            if (name === "base.qcow2") backing = baseBytes;
            else if (name === "other.qcow2") backing = otherBytes;
            else return `backing file name is ${JSON.stringify(name)}`;
          } finally {
            await node.close();
          }
          const got = await chainView(image, backing);
          if (!sameBytes(got, view)) {
            return `the overlay's view changed at ${hex(firstDifference(got, view))}`;
          }
          return await sameAsQemu(qemu, got);
        },
      });

      // rebase -b "": the overlay takes in everything it showed from its base.
      const aloneFile = new CrashFile("top.qcow2", topBytes);
      await rebaseImage("/nonexistent/top.qcow2", {
        backing: "",
        open: async (_path, opts) => {
          const node = await Qcow2Node.open(aloneFile, QUIET);
          if (!opts.noBacking) node.attachBacking(await memNode(baseBytes));
          return node;
        },
      });
      windows.push({
        op: "rebase",
        label: `${cfg.name}: rebase -b ""`,
        file: aloneFile,
        name: "top.qcow2",
        from: 0,
        to: aloneFile.position,
        beside: new Map([["base.qcow2", baseBytes]]),
        judge: async (image, _point, qemu) => {
          const node = await openReadOnly(image);
          let backing: Uint8Array | undefined;
          try {
            const problem = vstorCheck(node);
            if (problem !== undefined) return problem;
            const name = node.backingName?.file;
            if (name === "base.qcow2") backing = baseBytes;
            else if (name !== undefined) return `backing file name is ${JSON.stringify(name)}`;
          } finally {
            await node.close();
          }
          const got = backing === undefined
            ? await aloneView(image)
            : await chainView(image, backing);
          if (!sameBytes(got, view)) {
            return `the overlay's view changed at ${hex(firstDifference(got, view))}`;
          }
          return await sameAsQemu(qemu, got);
        },
      });

      // rebase an image without a backing file onto base.qcow2.
      const standalone = await makeImage(size, cfg.opts, [[cs, 6 * cs], [size / 2, 2 * cs]], 300);
      const standaloneView = await aloneView(new MemoryFile("s", standalone));
      const adoptFile = new CrashFile("top.qcow2", standalone);
      await rebaseImage("/nonexistent/top.qcow2", {
        backing: "base.qcow2",
        backingFormat: "qcow2",
        open: async (path) =>
          path.endsWith("top.qcow2")
            ? await Qcow2Node.open(adoptFile, QUIET)
            : await memNode(baseBytes),
      });
      windows.push({
        op: "rebase",
        label: `${cfg.name}: rebase of an image without backing onto base.qcow2`,
        file: adoptFile,
        name: "top.qcow2",
        from: 0,
        to: adoptFile.position,
        beside: new Map([["base.qcow2", baseBytes]]),
        judge: async (image, _point, qemu) => {
          const node = await openReadOnly(image);
          let backed = false;
          try {
            const problem = vstorCheck(node);
            if (problem !== undefined) return problem;
            const name = node.backingName?.file;
            if (name === "base.qcow2") backed = true;
            else if (name !== undefined) return `backing file name is ${JSON.stringify(name)}`;
          } finally {
            await node.close();
          }
          const got = backed ? await chainView(image, baseBytes) : await aloneView(image);
          if (!sameBytes(got, standaloneView)) {
            return `the image's view changed at ${hex(firstDifference(got, standaloneView))}`;
          }
          return await sameAsQemu(qemu, got);
        },
      });
    }
    const tally = new Tally();
    await withDir((dir) => judgeWindows(dir, windows, { seed, ...CHAIN_BUDGET }, tally));
    tally.report(`commit and rebase (seed ${hex(seed)}):`);
    tally.assertNone();
  },
});
