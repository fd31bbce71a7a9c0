/**
 * The fio-like workload engine of the simulated guest: runs {@linkcode JobSpec}s (see `job.ts` for
 * the options and their parsing) against {@linkcode BlockTarget}s, keeping `iodepth` requests in
 * flight per job, and measures them: per direction ops, bytes, errors and a latency histogram
 * (`performance.now()` at submit and at reap; percentiles from buckets, no samples stored).
 *
 * - Offsets: sequential, or a seeded permutation of the job's blocks per pass (every block once,
 *   as fio's random map), or with `norandommap` independent draws. Directions for rw/randrw are
 *   drawn with probability `rwmixread`. One deterministic stream per clone: same seed, same I/O.
 * - Verify: writes carry fio-style verify headers (`verify.ts`). After a writing workload
 *   (`do_verify`, default on) the engine replays the same stream and reads back every block it
 *   wrote; `verify_only` does only that, against what an earlier run with the same job and seed
 *   wrote (with `time_based`, the first pass — `io_size` — is what is checked). A failure names the
 *   block and the first bad byte with its expected and found value.
 * - Errors: the first failed request ends the job (fio's default continue_on_error=none); verify
 *   failures are all counted (first ones kept) unless `verify_fatal`.
 * - Multiqueue: `numjobs` clones, each on the target the caller opens for it (one queue per clone).
 *
 * All clones run in one loop on the vCPU thread: fill each clone to its depth, commit, reap; when
 * no clone can move, wait on a target (the guest halts, or a test harness runs the device).
 *
 * @module
 */

import type { BlockTarget, IoRequest } from "./block_target.ts";
import { JobError, type JobSpec } from "./job.ts";
import { LatencyHistogram, type LatencySummary } from "./latency.ts";
import { BlockPermutation, MAX_PERMUTATION, mix32, Prng } from "./random.ts";
import { checkBlock, fillBlock, type VerifyFailure, type VerifyStamp } from "./verify.ts";

export { JobError, parseJobArgs, parseJobFile, parseJobObject } from "./job.ts";
export type { JobSpec, RwMode } from "./job.ts";

/** Most verify failures a job keeps in detail (all are counted). */
export const MAX_REPORTED_FAILURES = 16;

/** One direction's results. */
export interface DirectionResult {
  /** Requests completed. */
  readonly ops: number;
  /** Bytes moved by them. */
  readonly bytes: number;
  /** Of those, requests that failed. */
  readonly errors: number;
  /** Operations per second over the job's run time. */
  readonly iops: number;
  /** Bytes per second over the job's run time. */
  readonly bandwidth: number;
  /** Completion latency, ns. */
  readonly latency: LatencySummary;
}

/** Verification results of a job. */
export interface VerifyResult {
  /** Blocks read back and checked. */
  readonly checked: number;
  /** Blocks that failed. */
  readonly failed: number;
  /** The first {@linkcode MAX_REPORTED_FAILURES} failures. */
  readonly failures: readonly VerifyFailure[];
}

/** The first request a job saw fail. */
export interface IoFailure {
  /** The request's operation (`read`, `write`, …). */
  readonly op: string;
  /** Its byte offset on the disk. */
  readonly offset: number;
  /** Its length in bytes. */
  readonly length: number;
  /** How it ended (`ioerr`, `unsupp`). */
  readonly status: string;
  /** What the driver said about it. */
  readonly detail: string;
}

/** One clone's results. */
export interface JobResult {
  /** The job's name. */
  readonly name: string;
  /** Clone number, 0..numjobs-1. */
  readonly clone: number;
  /** The job's I/O pattern. */
  readonly rw: string;
  /** Bytes per request. */
  readonly bs: number;
  /** Requests in flight at once. */
  readonly iodepth: number;
  /** Wall time from the first submission to the last completion, ms. */
  readonly elapsedMs: number;
  /** Reads (verify reads included). */
  readonly read: DirectionResult;
  /** Writes. */
  readonly write: DirectionResult;
  /** Discards. */
  readonly trim: DirectionResult;
  /** Null when the job did not verify. */
  readonly verify: VerifyResult | null;
  /** The request failure that ended the job, or null. */
  readonly error: IoFailure | null;
}

/** Directions summed over several clones, over their common run time. */
export interface WorkloadTotal {
  /** From the common start to the last of the clones' completions, ms. */
  readonly elapsedMs: number;
  /** Reads of all clones. */
  readonly read: DirectionResult;
  /** Writes of all clones. */
  readonly write: DirectionResult;
  /** Discards of all clones. */
  readonly trim: DirectionResult;
}

/** The clones of the jobs one group (see {@linkcode WorkloadOptions.groupOf}) ran, and their sum. */
export interface WorkloadGroup {
  /** The group number `groupOf` gave. */
  readonly group: number;
  /** Its clones, in job order. */
  readonly jobs: readonly JobResult[];
  /** Its clones summed. */
  readonly total: WorkloadTotal;
}

/**
 * Progress over time: every clone's completed requests and bytes, sampled about every
 * `intervalMs` (the interval doubles as a long run fills the sample budget).
 */
export interface WorkloadTimeline {
  /** The sampling interval at the end of the run, ms. */
  readonly intervalMs: number;
  /** Sample times, ms since the start. */
  readonly atMs: readonly number[];
  /** Per clone, in the order of `jobs`: cumulative requests and bytes at each sample. */
  readonly jobs: ReadonlyArray<
    { readonly ops: readonly number[]; readonly bytes: readonly number[] }
  >;
}

/** Everything a run produced. */
export interface WorkloadResult {
  /** Every clone of every job, in job order. */
  readonly jobs: readonly JobResult[];
  /** All clones together over the whole run. */
  readonly total: WorkloadTotal;
  /** Progress over time, when {@linkcode WorkloadOptions.sampleMs} was given. */
  readonly timeline?: WorkloadTimeline;
  /** The run was stopped early by {@linkcode WorkloadOptions.shouldStop}. */
  readonly stopped?: boolean;
  /** Per group, when {@linkcode WorkloadOptions.groupOf} was given (ascending group numbers). */
  readonly groups?: readonly WorkloadGroup[];
}

/** How the engine gets its targets. */
export interface WorkloadOptions {
  /** The target clone `clone` of job `job` runs on (open one per queue in a multiqueue guest). */
  readonly openTarget: (job: JobSpec, jobIndex: number, clone: number) => BlockTarget;
  /** Called for each target after its clone finished (e.g. to free its slots). */
  readonly closeTarget?: (target: BlockTarget) => void;
  /**
   * Puts job `jobIndex` in a group (e.g. the device it runs on); the result then has a total per
   * group besides the grand total. All groups run at once, in the one loop.
   */
  readonly groupOf?: (jobIndex: number) => number;
  /**
   * Asked on every turn of the loop; once true, clones submit nothing more, finish what is in
   * flight, skip their verify phase and report what they did.
   */
  readonly shouldStop?: () => boolean;
  /** Sample progress about this often (ms) into the result's timeline. */
  readonly sampleMs?: number;
  /** Called at each sample with the requests and bytes completed so far, all clones together. */
  readonly onSample?: (ops: number, bytes: number) => void;
}

/** Most samples a timeline keeps before it halves its resolution. */
const MAX_SAMPLES = 1024;

// Directions, and the tag of verify reads.
const READ = 0;
const WRITE = 1;
const TRIM = 2;
const VERIFY = 3;

/** Accumulates one direction. */
class DirectionStats {
  ops = 0;
  bytes = 0;
  errors = 0;
  readonly latency = new LatencyHistogram();

  result(elapsedMs: number): DirectionResult {
    const seconds = elapsedMs / 1000;
    return {
      ops: this.ops,
      bytes: this.bytes,
      errors: this.errors,
      iops: seconds > 0 ? this.ops / seconds : 0,
      bandwidth: seconds > 0 ? this.bytes / seconds : 0,
      latency: this.latency.summary(),
    };
  }
}

/** The deterministic stream of (direction, block) a clone issues. */
class OpStream {
  direction = READ;
  block = 0;
  #count = 0;
  readonly #spec: JobSpec;
  readonly #blocks: number;
  readonly #random: boolean;
  readonly #dirPrng: Prng;
  readonly #offPrng: Prng;
  readonly #seed: number;
  #perm: BlockPermutation | null = null;
  #pass = -1;

  constructor(spec: JobSpec, clone: number, blocks: number) {
    this.#spec = spec;
    this.#blocks = blocks;
    this.#random = spec.rw.startsWith("rand");
    this.#seed = mix32(spec.seed, clone);
    this.#dirPrng = new Prng(this.#seed, 1);
    this.#offPrng = new Prng(this.#seed, 2);
  }

  /** Ops drawn so far. */
  get count(): number {
    return this.#count;
  }

  /** Draws the next op into `direction` and `block`. */
  next(): void {
    const spec = this.#spec;
    const i = this.#count++;
    switch (spec.rw) {
      case "read":
      case "randread":
        this.direction = READ;
        break;
      case "write":
      case "randwrite":
        this.direction = WRITE;
        break;
      case "trim":
      case "randtrim":
        this.direction = TRIM;
        break;
      default:
        this.direction = this.#dirPrng.below(100) < spec.rwmixread ? READ : WRITE;
    }
    const n = this.#blocks;
    if (!this.#random) {
      this.block = i % n;
    } else if (spec.norandommap || n > MAX_PERMUTATION) {
      this.block = this.#offPrng.below(n);
    } else {
      const pass = Math.floor(i / n);
      if (pass !== this.#pass) {
        // A new order each pass, as fio re-randomises after its random map fills.
        this.#perm = new BlockPermutation(n, mix32(this.#seed, pass));
        this.#pass = pass;
      }
      this.block = this.#perm!.at(i % n);
    }
  }
}

type Phase = "main" | "verify" | "done";

/** One clone of a job on its target. */
class Runner {
  readonly spec: JobSpec;
  readonly jobIndex: number;
  readonly clone: number;
  readonly target: BlockTarget;
  readonly read = new DirectionStats();
  readonly write = new DirectionStats();
  readonly trim = new DirectionStats();
  phase: Phase = "main";
  error: IoFailure | null = null;
  verifyChecked = 0;
  verifyFailed = 0;
  readonly failures: VerifyFailure[] = [];
  startedAt = 0;
  endedAt = 0;
  readonly #start: number;
  readonly #blocks: number;
  readonly #depth: number;
  readonly #batch: number;
  readonly #mainOps: number;
  readonly #stamp: VerifyStamp | null;
  readonly #views: (DataView | undefined)[] = [];
  readonly #filled: Uint8Array;
  readonly #scratch: Uint8Array;
  #stream: OpStream;
  #replayOps = 0;
  #stopping = false;
  #aborted = false;

  constructor(spec: JobSpec, jobIndex: number, clone: number, target: BlockTarget) {
    this.spec = spec;
    this.jobIndex = jobIndex;
    this.clone = clone;
    this.target = target;
    const name = spec.name;
    const fail = (field: string, message: string): never => {
      throw new JobError([{ path: `${name}.${field}`, message }]);
    };
    const bs = spec.bs;
    const start = spec.offset + clone * spec.offsetIncrement;
    const capacity = target.capacity;
    if (bs % target.blockSize !== 0) {
      fail("bs", `${bs} is not a multiple of the device's ${target.blockSize}-byte blocks`);
    }
    if (start % target.blockSize !== 0) {
      fail("offset", `${start} is not a multiple of the device's ${target.blockSize}-byte blocks`);
    }
    if (start >= capacity) fail("offset", `${start} is at or past the capacity ${capacity}`);
    const size = spec.size ?? capacity - start;
    if (start + size > capacity) {
      fail("size", `offset ${start} + size ${size} is past the capacity ${capacity}`);
    }
    const trims = spec.rw === "trim" || spec.rw === "randtrim";
    const writes = !trims && spec.rw !== "read" && spec.rw !== "randread";
    if (trims) {
      if (target.maxDiscard === 0) fail("rw", "the device does not support discard");
      if (bs > target.maxDiscard) fail("bs", `${bs} exceeds the device's discard limit`);
    } else if (bs > target.maxTransfer) {
      fail("bs", `${bs} exceeds the target's largest transfer of ${target.maxTransfer}`);
    }
    if (writes && !spec.verifyOnly && target.readOnly) {
      fail("rw", `rw=${spec.rw} writes, and the device is read-only`);
    }
    if (trims && target.readOnly) fail("rw", "the device is read-only");
    this.#start = start;
    this.#blocks = Math.floor(size / bs);
    if (this.#blocks < 1) fail("size", `${size} holds no ${bs}-byte block`);
    this.#depth = Math.min(spec.iodepth, target.depth);
    this.#batch = Math.max(1, Math.min(spec.iodepthBatch, this.#depth));
    this.#mainOps = spec.timeBased
      ? Infinity
      : Math.max(1, Math.floor((spec.ioSize ?? this.#blocks * bs) / bs));
    this.#stamp = spec.verify === "none"
      ? null
      : { mode: spec.verify, seed: spec.seed, pattern: Uint8Array.from(spec.verifyPattern) };
    this.#filled = new Uint8Array(target.depth);
    this.#scratch = new Uint8Array(this.#stamp === null ? 0 : bs);
    this.#stream = new OpStream(spec, clone, this.#blocks);
    if (spec.verifyOnly) this.#beginVerify(spec.timeBased ? this.#blocks : this.#mainOps);
  }

  get done(): boolean {
    return this.phase === "done";
  }

  /** Stop early: submit nothing more, no verify phase after what is in flight. */
  abort(): void {
    this.#aborted = true;
    this.#stopping = true;
  }

  /** Requests and bytes completed so far, every direction and verify reads included. */
  get completed(): { ops: number; bytes: number } {
    return {
      ops: this.read.ops + this.write.ops + this.trim.ops,
      bytes: this.read.bytes + this.write.bytes + this.trim.bytes,
    };
  }

  /**
   * Reaps, then fills up to the depth (committing every `iodepth_batch_submit` requests).
   * @returns whether anything moved
   */
  pump(now: number): boolean {
    const t = this.target;
    let progress = false;
    for (let r = t.reap(); r !== null; r = t.reap()) {
      this.#complete(r);
      progress = true;
    }
    if (this.phase === "done") return progress;
    const runtime = this.spec.runtimeMs;
    if (this.phase === "main" && runtime !== null && now - this.startedAt >= runtime) {
      this.#stopping = true;
    }
    let batched = 0;
    while (!this.#stopping && t.inFlight < this.#depth && this.#pickNext()) {
      const r = t.acquire();
      // inFlight < depth ≤ target.depth: a free request must exist (the op is already drawn).
      if (r === null) {
        throw new Error(`Target of ${this.spec.name} has no free request below its depth`);
      }
      this.#prepare(r);
      r.startedAt = performance.now();
      t.submit(r);
      progress = true;
      if (++batched >= this.#batch) {
        t.commit();
        batched = 0;
      }
    }
    if (batched > 0) t.commit();
    if (t.inFlight === 0 && (this.#stopping || !this.#hasMore())) {
      this.#endPhase();
      progress = true;
    }
    return progress;
  }

  #hasMore(): boolean {
    return this.phase === "main" ? this.#stream.count < this.#mainOps : this.#replayLeft();
  }

  #replayLeft(): boolean {
    return this.#stream.count < this.#replayOps;
  }

  /** Draws the next op of the phase into the stream; false when the phase has no more. */
  #pickNext(): boolean {
    if (this.phase === "main") {
      if (this.#stream.count >= this.#mainOps) return false;
      this.#stream.next();
      return true;
    }
    // Verify: replay the main stream, reading back only what it wrote.
    while (this.#replayLeft()) {
      this.#stream.next();
      if (this.#stream.direction === WRITE) return true;
    }
    return false;
  }

  #prepare(r: IoRequest): void {
    const bs = this.spec.bs;
    const offset = this.#start + this.#stream.block * bs;
    r.offset = offset;
    r.length = bs;
    if (this.phase === "verify") {
      r.op = "read";
      r.tag = VERIFY;
      return;
    }
    const direction = this.#stream.direction;
    r.tag = direction;
    if (direction === READ) {
      r.op = "read";
    } else if (direction === TRIM) {
      r.op = "discard";
    } else {
      r.op = "write";
      if (this.#stamp !== null) {
        fillBlock(r.data, this.#view(r), bs, offset, this.#stamp);
      } else if (this.#filled[r.index] === 0) {
        // fio writes random buffers; filling each request's buffer once costs nothing per I/O.
        const prng = new Prng(this.spec.seed, 100 + r.index);
        const view = this.#view(r);
        for (let i = 0; i + 4 <= r.data.length; i += 4) view.setUint32(i, prng.nextU32(), true);
        this.#filled[r.index] = 1;
      }
    }
  }

  #view(r: IoRequest): DataView {
    let view = this.#views[r.index];
    if (view === undefined || view.buffer !== r.data.buffer) {
      view = new DataView(r.data.buffer, r.data.byteOffset, r.data.byteLength);
      this.#views[r.index] = view;
    }
    return view;
  }

  #complete(r: IoRequest): void {
    const ns = (performance.now() - r.startedAt) * 1e6;
    const stats = r.tag === WRITE ? this.write : r.tag === TRIM ? this.trim : this.read;
    stats.ops++;
    stats.bytes += r.length;
    stats.latency.add(ns);
    if (r.status !== "ok") {
      stats.errors++;
      if (this.error === null) {
        this.error = {
          op: r.op,
          offset: r.offset,
          length: r.length,
          status: r.status,
          detail: r.detail,
        };
      }
      this.#stopping = true;
    } else if (r.tag === VERIFY && this.#stamp !== null) {
      this.verifyChecked++;
      const failure = checkBlock(
        r.data,
        this.#view(r),
        r.length,
        r.offset,
        this.#stamp,
        this.#scratch,
      );
      if (failure !== null) {
        this.verifyFailed++;
        if (this.failures.length < MAX_REPORTED_FAILURES) this.failures.push(failure);
        if (this.spec.verifyFatal) this.#stopping = true;
      }
    }
    this.target.release(r);
  }

  #beginVerify(ops: number): void {
    this.phase = "verify";
    this.#replayOps = ops;
    this.#stream = new OpStream(this.spec, this.clone, this.#blocks);
    this.#stopping = false;
  }

  #endPhase(): void {
    const writes = this.spec.rw !== "read" && this.spec.rw !== "randread" &&
      this.spec.rw !== "trim" && this.spec.rw !== "randtrim";
    if (
      this.phase === "main" && this.error === null && this.#stamp !== null && this.spec.doVerify &&
      writes && !this.#aborted
    ) {
      this.#beginVerify(this.#stream.count);
      return;
    }
    this.phase = "done";
    this.endedAt = performance.now();
  }

  result(): JobResult {
    const elapsed = Math.max(0, this.endedAt - this.startedAt);
    return {
      name: this.spec.name,
      clone: this.clone,
      rw: this.spec.rw,
      bs: this.spec.bs,
      iodepth: this.#depth,
      elapsedMs: elapsed,
      read: this.read.result(elapsed),
      write: this.write.result(elapsed),
      trim: this.trim.result(elapsed),
      verify: this.#stamp === null
        ? null
        : { checked: this.verifyChecked, failed: this.verifyFailed, failures: this.failures },
      error: this.error,
    };
  }
}

/**
 * Runs `jobs` (each expanded into `numjobs` clones) to completion.
 *
 * @throws {JobError} when a job does not fit its target (naming `name.field`)
 * @throws whatever a target's `wait` throws (a broken device, a timeout)
 */
export async function runWorkload(
  jobs: readonly JobSpec[],
  options: WorkloadOptions,
): Promise<WorkloadResult> {
  const runners: Runner[] = [];
  try {
    for (const [jobIndex, spec] of jobs.entries()) {
      for (let clone = 0; clone < spec.numjobs; clone++) {
        const target = options.openTarget(spec, jobIndex, clone);
        try {
          runners.push(new Runner(spec, jobIndex, clone, target));
        } catch (error) {
          options.closeTarget?.(target);
          throw error;
        }
      }
    }
    const started = performance.now();
    for (const r of runners) r.startedAt = started;
    const active = runners.slice();
    const timeline = options.sampleMs === undefined
      ? null
      : new TimelineRecorder(runners, options.sampleMs, started, options.onSample);
    let stopped = false;
    while (active.length > 0) {
      let progress = false;
      const now = performance.now();
      if (!stopped && options.shouldStop?.() === true) {
        stopped = true;
        for (const r of active) r.abort();
      }
      timeline?.sample(now);
      let live = 0;
      for (const r of active) {
        if (r.pump(now)) progress = true;
        if (!r.done) active[live++] = r;
        else options.closeTarget?.(r.target);
      }
      active.length = live;
      if (progress || live === 0) continue;
      const waiting = active.find((r) => r.target.inFlight > 0);
      if (waiting === undefined) {
        throw new Error("Workload stalled: nothing in flight, nothing to do");
      }
      const pending = waiting.target.wait();
      if (pending !== undefined) await pending;
    }
    const ended = performance.now();
    timeline?.sample(ended, true);
    const result: WorkloadResult = {
      ...summarize(runners.map((r) => r.result()), runners, ended - started),
      ...(timeline === null ? {} : { timeline: timeline.result() }),
      ...(stopped ? { stopped } : {}),
    };
    const groupOf = options.groupOf;
    if (groupOf === undefined) return result;
    // Jobs in order, so each group's clones stay in job order; its time ends with its last clone.
    const members = new Map<number, number[]>();
    runners.forEach((r, i) => {
      const g = groupOf(r.jobIndex);
      const list = members.get(g) ?? [];
      list.push(i);
      members.set(g, list);
    });
    const groups: WorkloadGroup[] = [...members.keys()].sort((a, b) => a - b).map((group) => {
      const mine = members.get(group)!.map((i) => runners[i]!);
      const elapsed = Math.max(0, ...mine.map((r) => r.endedAt - started));
      const sum = summarize(mine.map((r) => r.result()), mine, elapsed);
      return { group, jobs: sum.jobs, total: sum.total };
    });
    return { ...result, groups };
  } catch (error) {
    for (const r of runners) {
      if (!r.done && r.target.inFlight === 0) options.closeTarget?.(r.target);
    }
    throw error;
  }
}

/** Samples every clone's progress into a bounded timeline. */
class TimelineRecorder {
  #interval: number;
  readonly #runners: readonly Runner[];
  readonly #started: number;
  readonly #onSample: ((ops: number, bytes: number) => void) | undefined;
  #next: number;
  readonly #at: number[] = [];
  readonly #ops: number[][];
  readonly #bytes: number[][];

  constructor(
    runners: readonly Runner[],
    intervalMs: number,
    started: number,
    onSample: ((ops: number, bytes: number) => void) | undefined,
  ) {
    this.#interval = Math.max(1, intervalMs);
    this.#runners = runners;
    this.#started = started;
    this.#onSample = onSample;
    this.#next = started + this.#interval;
    this.#ops = runners.map(() => []);
    this.#bytes = runners.map(() => []);
    this.sample(started, true); // the origin: nothing done yet
  }

  /** Take a sample when one is due (or `force`, for the end of the run). */
  sample(now: number, force = false): void {
    if (now < this.#next && !force) return;
    this.#next = now + this.#interval;
    let ops = 0, bytes = 0;
    this.#at.push(now - this.#started);
    this.#runners.forEach((r, i) => {
      const c = r.completed;
      this.#ops[i]!.push(c.ops);
      this.#bytes[i]!.push(c.bytes);
      ops += c.ops;
      bytes += c.bytes;
    });
    this.#onSample?.(ops, bytes);
    if (this.#at.length >= MAX_SAMPLES) this.#halve();
  }

  /** Keep every other sample (the last one included) and sample half as often. */
  #halve(): void {
    const keep = (list: number[]) => {
      const kept = list.filter((_, i) => i % 2 === 1 || i === list.length - 1);
      list.length = 0;
      list.push(...kept);
    };
    keep(this.#at);
    for (const list of this.#ops) keep(list);
    for (const list of this.#bytes) keep(list);
    this.#interval *= 2;
  }

  result(): WorkloadTimeline {
    return {
      intervalMs: this.#interval,
      atMs: this.#at,
      jobs: this.#runners.map((_, i) => ({ ops: this.#ops[i]!, bytes: this.#bytes[i]! })),
    };
  }
}

function summarize(
  jobs: JobResult[],
  runners: readonly Runner[],
  elapsedMs: number,
): WorkloadResult {
  const totals = [new DirectionStats(), new DirectionStats(), new DirectionStats()] as const;
  for (const r of runners) {
    for (const [i, d] of [r.read, r.write, r.trim].entries()) {
      const t = totals[i]!;
      t.ops += d.ops;
      t.bytes += d.bytes;
      t.errors += d.errors;
      t.latency.merge(d.latency);
    }
  }
  return {
    jobs,
    total: {
      elapsedMs,
      read: totals[0].result(elapsedMs),
      write: totals[1].result(elapsedMs),
      trim: totals[2].result(elapsedMs),
    },
  };
}
