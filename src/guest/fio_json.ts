/**
 * The run report in fio's JSON shape (`fio --output-format=json`, and `json+` with latency bins),
 * so fio's own tools and scripts written for fio read it: `jobs[]` with `jobname`, `groupid`,
 * `error`, `job options`, and per direction `io_bytes`, `io_kbytes`, `bw_bytes`, `bw` (KiB/s),
 * `iops`, `runtime` (ms), `total_ios`, `clat_ns`/`lat_ns` with fio's percentile list, the bandwidth
 * and IOPS sample statistics, `iodepth_level` and `latency_ns/us/ms` distributions. Integers where
 * fio prints integers. What fio has no place for — virtio numbers, verify results, the disk and
 * device of each job — sits under `vstor` keys (top level and per job).
 *
 * Latency is measured from submission to completion in the guest: fio's `clat` and `lat` are the
 * same here and `slat` is zero (a virtqueue submission does not block).
 *
 * Pure: data in, object out.
 *
 * @module
 */

import type { LatencySummary } from "./latency.ts";
import type { RunReport, VirtioJson } from "./report.ts";
import type { DirectionResult, JobResult, WorkloadResult } from "./workload.ts";

/** The fio version string vstor's JSON reports (fio's field is free text). */
export const FIO_JSON_VERSION = "fio-3.33 (vstor)";

/** What else the JSON needs besides the workload result. */
export interface FioJsonInput {
  /** What the workload engine produced. */
  readonly result: WorkloadResult;
  /** Per disk (run): its jobs, in the order of `result.jobs`. */
  readonly runs?: readonly RunReport[];
  /** vstor's virtio figures for the whole run. */
  readonly virtio?: VirtioJson | null;
  /** Per device virtio figures. */
  readonly devices?: readonly unknown[];
  /** When the run started (ms since the epoch). */
  readonly startedAt: number;
  /** `json+`: latency bins too. */
  readonly plus?: boolean;
  /** More top-level vstor fields (e.g. the main job's checks). */
  readonly extra?: Record<string, unknown>;
}

/** A JSON object as fio writes it. */
export type Json = Record<string, unknown>;

/**
 * A number fio prints as a float (`0.000000`, not `0`): JSON.stringify cannot tell them apart, so
 * such fields carry this wrapper and {@linkcode fioJsonText} writes them with six decimals.
 */
export class FioFloat {
  /** The value (a non-finite one prints as 0). */
  readonly value: number;
  constructor(value: number) {
    this.value = Number.isFinite(value) ? value : 0;
  }
  /** A marker {@linkcode fioJsonText} replaces by the bare number. */
  toJSON(): string {
    return `\u0000F${this.value.toFixed(6)}`;
  }
}

const f = (value: number) => new FioFloat(value);

/**
 * The JSON text of a report from {@linkcode fioJson}, as fio writes it: two-space indentation,
 * floats with six decimals where fio has floats, integers where it has integers.
 */
export function fioJsonText(json: unknown): string {
  return JSON.stringify(json, null, 2).replace(/"\\u0000F(-?\d+\.\d+)"/g, "$1") + "\n";
}

function stat(lat: LatencySummary): Json {
  return {
    min: Math.round(lat.min),
    max: Math.round(lat.max),
    mean: f(lat.avg),
    stddev: f(lat.stddev),
    N: lat.count,
  };
}

function percentiles(lat: LatencySummary): Json {
  const out: Json = {};
  for (const [p, ns] of lat.percentiles) out[p.toFixed(6)] = Math.round(ns);
  return out;
}

/** Per-interval rates from cumulative samples: fio's bw_* / iops_* figures. */
function rateStats(
  atMs: readonly number[],
  cumulative: readonly number[],
  scale: number,
): { min: number; max: number; mean: number; dev: number; samples: number } {
  const rates: number[] = [];
  for (let i = 1; i < atMs.length; i++) {
    const dt = (atMs[i]! - atMs[i - 1]!) / 1000;
    if (dt <= 0) continue;
    rates.push((cumulative[i]! - cumulative[i - 1]!) / dt / scale);
  }
  if (rates.length === 0) return { min: 0, max: 0, mean: 0, dev: 0, samples: 0 };
  const mean = rates.reduce((a, b) => a + b, 0) / rates.length;
  const variance = rates.reduce((a, r) => a + (r - mean) ** 2, 0) /
    Math.max(1, rates.length - 1);
  return {
    min: Math.round(Math.min(...rates)),
    max: Math.round(Math.max(...rates)),
    mean,
    dev: Math.sqrt(variance),
    samples: rates.length,
  };
}

function direction(
  d: DirectionResult,
  runtimeMs: number,
  plus: boolean,
  share: { ops: readonly number[]; bytes: readonly number[] } | null,
  atMs: readonly number[],
  groupBw: number,
): Json {
  const clat: Json = { ...stat(d.latency), percentile: percentiles(d.latency) };
  if (plus && d.latency.count > 0) {
    // As fio: a direction without samples has no bins (its tools read a present map as non-empty).
    const bins: Json = {};
    for (const [ns, n] of d.latency.bins) bins[String(Math.round(ns))] = n;
    clat.bins = bins;
  }
  // The timeline counts every direction of the clone together: a direction's share of it
  // is its share of the clone's bytes and requests.
  const bw = share === null ? null : rateStats(atMs, share.bytes, 1024);
  const iops = share === null ? null : rateStats(atMs, share.ops, 1);
  const kib = Math.round(d.bandwidth / 1024);
  return {
    io_bytes: d.bytes,
    io_kbytes: Math.round(d.bytes / 1024),
    bw_bytes: Math.round(d.bandwidth),
    bw: kib,
    iops: f(d.iops),
    runtime: d.ops > 0 ? Math.round(runtimeMs) : 0,
    total_ios: d.ops,
    short_ios: 0,
    drop_ios: 0,
    slat_ns: { min: 0, max: 0, mean: f(0), stddev: f(0), N: 0 },
    clat_ns: clat,
    lat_ns: stat(d.latency),
    bw_min: d.ops > 0 ? bw?.min ?? kib : 0,
    bw_max: d.ops > 0 ? bw?.max ?? kib : 0,
    bw_agg: f(d.ops > 0 && groupBw > 0 ? (100 * d.bandwidth) / groupBw : 0),
    bw_mean: f(d.ops > 0 ? bw?.mean ?? kib : 0),
    bw_dev: f(d.ops > 0 ? bw?.dev ?? 0 : 0),
    bw_samples: d.ops > 0 ? bw?.samples ?? 0 : 0,
    iops_min: d.ops > 0 ? iops?.min ?? Math.round(d.iops) : 0,
    iops_max: d.ops > 0 ? iops?.max ?? Math.round(d.iops) : 0,
    iops_mean: f(d.ops > 0 ? iops?.mean ?? d.iops : 0),
    iops_stddev: f(d.ops > 0 ? iops?.dev ?? 0 : 0),
    iops_samples: d.ops > 0 ? iops?.samples ?? 0 : 0,
  };
}

/** The share of a clone's cumulative timeline that belongs to one direction. */
function scaled(
  series: { readonly ops: readonly number[]; readonly bytes: readonly number[] },
  job: JobResult,
  d: DirectionResult,
): { ops: number[]; bytes: number[] } {
  const ops = job.read.ops + job.write.ops + job.trim.ops;
  const bytes = job.read.bytes + job.write.bytes + job.trim.bytes;
  const fo = ops > 0 ? d.ops / ops : 0;
  const fb = bytes > 0 ? d.bytes / bytes : 0;
  return { ops: series.ops.map((n) => n * fo), bytes: series.bytes.map((n) => n * fb) };
}

/** fio's latency distribution buckets, as percentages of the samples. */
function latencyBuckets(lats: readonly LatencySummary[]): { ns: Json; us: Json; ms: Json } {
  const edges = [2, 4, 10, 20, 50, 100, 250, 500, 750, 1000];
  const msEdges = [...edges, 2000];
  let total = 0;
  const all: Array<readonly [number, number]> = [];
  for (const lat of lats) {
    total += lat.count;
    all.push(...lat.bins);
  }
  const bucketize = (unit: number, list: number[], over: boolean) => {
    const out: Json = {};
    const lower = unit === 1 ? 0 : unit; // each unit's list starts where the smaller one ends
    list.forEach((edge, i) => {
      const lo = i === 0 ? lower : list[i - 1]! * unit;
      const hi = edge * unit;
      let n = 0;
      for (const [ns, count] of all) if (ns > lo && ns <= hi) n += count;
      out[String(edge)] = f(total > 0 ? (100 * n) / total : 0);
    });
    if (over) {
      let n = 0;
      const top = list.at(-1)! * unit;
      for (const [ns, count] of all) if (ns > top) n += count;
      out[`>=${list.at(-1)}`] = f(total > 0 ? (100 * n) / total : 0);
    }
    return out;
  };
  return {
    ns: bucketize(1, edges, false),
    us: bucketize(1000, edges, false),
    ms: bucketize(1_000_000, msEdges, true),
  };
}

function iodepthLevels(iodepth: number): Json {
  const out: Json = {};
  const levels = [1, 2, 4, 8, 16, 32];
  for (const level of levels) out[String(level)] = f(0);
  out[">=64"] = f(0);
  const key = iodepth >= 64 ? ">=64" : String(levels.filter((l) => l <= iodepth).at(-1) ?? 1);
  out[key] = f(100);
  return out;
}

/**
 * fio's submit/complete distribution (requests per call): the guest's driver adds requests to the
 * ring one call each, which is fio's 1–4 bucket.
 */
function submitLevels(): Json {
  const out: Json = {};
  for (const key of ["0", "4", "8", "16", "32", "64", ">=64"]) out[key] = f(key === "4" ? 100 : 0);
  return out;
}

/**
 * The report as fio's JSON.
 *
 * @example
 * ```ts ignore
 * const json = fioJson({ result, runs, virtio, startedAt: Date.now() });
 * console.log(JSON.stringify(json, null, 2));
 * ```
 */
export function fioJson(input: FioJsonInput): Json {
  const { result } = input;
  const plus = input.plus ?? false;
  const timeline = result.timeline;
  const atMs = timeline?.atMs ?? [];
  // Which disk each clone ran on: runs list their jobs in the order of result.jobs.
  const diskOf: Array<RunReport | undefined> = [];
  const groupOf: number[] = [];
  (input.runs ?? []).forEach((run, g) => {
    for (const _ of run.jobs) {
      diskOf.push(run);
      groupOf.push(g);
    }
  });
  const groupBw = (g: number, dir: "read" | "write" | "trim") => {
    const run = input.runs?.[g];
    return run === undefined ? result.total[dir].bandwidth : run.total[dir].bandwidth;
  };
  const jobs = result.jobs.map((job, i) => {
    const series = timeline?.jobs[i] ?? null;
    const run = diskOf[i];
    const g = groupOf[i] ?? 0;
    const options: Json = {
      name: job.name,
      rw: job.rw,
      bs: String(job.bs),
      iodepth: String(job.iodepth),
    };
    if (run !== undefined) options.filename = run.disk ?? run.device;
    const dirJson = (key: "read" | "write" | "trim") =>
      direction(
        job[key],
        job.elapsedMs,
        plus,
        series === null ? null : scaled(series, job, job[key]),
        atMs,
        groupBw(g, key),
      );
    const buckets = latencyBuckets([job.read.latency, job.write.latency, job.trim.latency]);
    return {
      jobname: job.name,
      groupid: g,
      error: job.error === null ? 0 : 5, // EIO, as fio reports a failed I/O
      eta: 0,
      elapsed: Math.max(1, Math.round(job.elapsedMs / 1000)),
      "job options": options,
      read: dirJson("read"),
      write: dirJson("write"),
      trim: dirJson("trim"),
      sync: { total_ios: 0, lat_ns: { min: 0, max: 0, mean: f(0), stddev: f(0), N: 0 } },
      job_runtime: Math.round(job.elapsedMs),
      usr_cpu: f(0),
      sys_cpu: f(0),
      ctx: 0,
      majf: 0,
      minf: 0,
      iodepth_level: iodepthLevels(job.iodepth),
      iodepth_submit: submitLevels(),
      iodepth_complete: submitLevels(),
      latency_ns: buckets.ns,
      latency_us: buckets.us,
      latency_ms: buckets.ms,
      latency_depth: job.iodepth,
      latency_target: 0,
      latency_percentile: f(100),
      latency_window: 0,
      vstor: {
        clone: job.clone,
        disk: run === undefined ? null : run.disk ?? null,
        device: run?.device ?? null,
        lun: run?.lun ?? null,
        verify: job.verify,
        error: job.error,
      },
    };
  });
  const started = new Date(input.startedAt);
  return {
    "fio version": FIO_JSON_VERSION,
    timestamp: Math.floor(input.startedAt / 1000),
    timestamp_ms: Math.floor(input.startedAt),
    time: started.toString().slice(0, 24),
    "global options": {},
    jobs,
    disk_util: [],
    vstor: {
      stopped: result.stopped ?? false,
      elapsed_ms: result.total.elapsedMs,
      disks: (input.runs ?? []).map((r) => ({
        disk: r.disk ?? null,
        device: r.device,
        kind: r.kind,
        slot: r.slot,
        lun: r.lun,
        jobs: r.jobs.length,
        total: r.total,
      })),
      virtio: input.virtio ?? null,
      devices: input.devices ?? [],
      ...input.extra,
    },
  };
}
