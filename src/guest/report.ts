/**
 * The run report, fio-style: per job and in total IOPS, bandwidth and latency (min, avg, p50, p99,
 * p99.9, max), verify outcome and errors, then the virtio numbers the run is about — kicks,
 * interrupts, exits per request, average batch, suppressed notifications — as text and as JSON.
 *
 * Pure: data in, string or object out. The caller gathers the virtio numbers (the guest's queue
 * counters, the VMM's exit and interrupt counters) and passes them in.
 *
 * @module
 */

import { EMPTY_LATENCY, FIO_PERCENTILES, type LatencySummary } from "./latency.ts";
import { describeFailure } from "./verify.ts";
import type { DirectionResult, JobResult, WorkloadResult, WorkloadTotal } from "./workload.ts";

/** One virtqueue's notification counters. */
export interface QueueNumbers {
  /** Device label (machine id or `slot N`). */
  readonly device: string;
  /** The queue's index on its device. */
  readonly queue: number;
  /** Requests the device completed on this queue. */
  readonly requests: number;
  /** Doorbell writes by the driver. */
  readonly kicks: number;
  /** Kicks the device's event index / NO_NOTIFY made unnecessary. */
  readonly suppressedKicks: number;
  /** Interrupts the guest took for this queue. */
  readonly interrupts: number;
  /** Interrupts the device did not send because the driver asked not to be interrupted. */
  readonly suppressedInterrupts?: number;
  /** Most requests published by one kick. */
  readonly largestBatch?: number;
}

/** The VMM's exit counters over the run. */
export interface ExitNumbers {
  /** PCI config space exits. */
  readonly config: number;
  /** MMIO exits (doorbells that trapped included). */
  readonly mmio: number;
  /** Port I/O exits (emulated IDE registers and data port); absent where nobody counted them. */
  readonly pio?: number;
  /** Doorbell writes that exited to the VMM (trap mode). */
  readonly doorbell: number;
  /** Doorbell writes that rang an ioeventfd without an exit. */
  readonly ioeventfd?: number;
}

/** What the report shows besides the workload. */
export interface VirtioNumbers {
  /** Every request queue of every device the run used. */
  readonly queues: readonly QueueNumbers[];
  /** Exits during the run; absent when nobody counted them. */
  readonly exits?: ExitNumbers;
}

/** Derived virtio figures. */
export interface VirtioSummary {
  /** Requests completed on all queues. */
  readonly requests: number;
  /** Doorbell writes. */
  readonly kicks: number;
  /** Kicks made unnecessary by the device. */
  readonly suppressedKicks: number;
  /** Interrupts taken. */
  readonly interrupts: number;
  /** Interrupts the device did not send. */
  readonly suppressedInterrupts: number;
  /** Average batch per notification: requests completed ÷ doorbell writes (requests per kick). */
  readonly averageBatch: number;
  /** Average batch per interrupt: requests completed ÷ interrupts taken. */
  readonly requestsPerInterrupt: number;
  /** Doorbell writes per request. */
  readonly kicksPerRequest: number;
  /** Interrupts per request. */
  readonly interruptsPerRequest: number;
  /** Exits (config + MMIO) per request; null without exit numbers. */
  readonly exitsPerRequest: number | null;
  /** The exits; null when nobody counted them. */
  readonly exits: ExitNumbers | null;
}

/** Summary and queues of a set of virtio numbers, as the JSON form carries them. */
export type VirtioJson = VirtioSummary & { readonly queues: readonly QueueNumbers[] };

/** The JSON form of a report. */
export interface ReportJson {
  /** Every clone of every run. */
  readonly jobs: readonly JobResult[];
  /** All runs together. */
  readonly total: WorkloadTotal;
  /** Every queue of every device, with the run's exits. */
  readonly virtio: VirtioJson | null;
  /** Multi-device reports: each run's clones and total. */
  readonly runs?: readonly RunReportJson[];
  /** Multi-device reports: each device's queues, exits and figures. */
  readonly devices?: readonly DeviceReportJson[];
}

/** One run of a multi-device report: jobs on one device (one LUN of a SCSI host). */
export interface RunReport {
  /** The disk's name (its drive id) when the run was given one. */
  readonly disk?: string | null;
  /** The device label (machine id or `slot N`). */
  readonly device: string;
  /** `virtio-blk` or `virtio-scsi`. */
  readonly kind: string;
  /** The device's PCI slot. */
  readonly slot: number;
  /** The SCSI LUN the run used, or null. */
  readonly lun: { readonly target: number; readonly lun: number } | null;
  /** The run's clones. */
  readonly jobs: readonly JobResult[];
  /** Its clones summed. */
  readonly total: WorkloadTotal;
}

/** One device of a multi-device report. */
export interface DeviceReport {
  readonly device: string;
  readonly kind: string;
  readonly slot: number;
  /** Its request queues; `exits` are the exits its accesses caused during the run. */
  readonly virtio: VirtioNumbers;
}

/** Everything a multi-device report shows. */
export interface MultiReport {
  readonly runs: readonly RunReport[];
  readonly devices: readonly DeviceReport[];
  /** All runs together (`jobs` of every run, the grand total). */
  readonly result: WorkloadResult;
  /** Every device's queues, and the global exits. */
  readonly virtio: VirtioNumbers;
}

/** {@linkcode RunReport} in JSON. */
export type RunReportJson = RunReport;

/** {@linkcode DeviceReport} in JSON: the figures derived too. */
export interface DeviceReportJson {
  /** The device label (machine id or `slot N`). */
  readonly device: string;
  /** `virtio-blk` or `virtio-scsi`. */
  readonly kind: string;
  /** Its PCI slot. */
  readonly slot: number;
  /** Its queues and figures, with the exits its accesses caused. */
  readonly virtio: VirtioJson;
}

/** Sums and ratios of the virtio numbers (ratios 0 when their denominator is 0). */
export function summarizeVirtio(v: VirtioNumbers): VirtioSummary {
  let requests = 0, kicks = 0, suppressedKicks = 0, interrupts = 0, suppressedInterrupts = 0;
  for (const q of v.queues) {
    requests += q.requests;
    kicks += q.kicks;
    suppressedKicks += q.suppressedKicks;
    interrupts += q.interrupts;
    suppressedInterrupts += q.suppressedInterrupts ?? 0;
  }
  const per = (n: number) => (requests > 0 ? n / requests : 0);
  const exits = v.exits ?? null;
  return {
    requests,
    kicks,
    suppressedKicks,
    interrupts,
    suppressedInterrupts,
    averageBatch: kicks > 0 ? requests / kicks : 0,
    requestsPerInterrupt: interrupts > 0 ? requests / interrupts : 0,
    kicksPerRequest: per(kicks),
    interruptsPerRequest: per(interrupts),
    exitsPerRequest: exits === null ? null : per(exits.config + exits.mmio + (exits.pio ?? 0)),
    exits,
  };
}

// ---- Number formatting (fio's num2str flavour: three significant digits) ----------------------------

function sig3(n: number): string {
  if (n === 0) return "0";
  const digits = n >= 100 ? 0 : n >= 10 ? 1 : 2;
  const text = n.toFixed(digits);
  // Trailing zeros go only after a decimal point: 120 stays 120.
  return digits === 0 ? text : text.replace(/\.?0+$/, "");
}

/** 12345 → "12.3k" (decimal units, as fio's IOPS). */
export function formatCount(n: number): string {
  const units = ["", "k", "M", "G", "T"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i++;
  }
  return `${sig3(n)}${units[i]}`;
}

/** Bytes with binary units: 50438144 → "48.1MiB". */
export function formatBytesIEC(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${sig3(n)}${units[i]}`;
}

/** Bytes with decimal units: 50438144 → "50.4MB". */
export function formatBytesSI(n: number): string {
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i++;
  }
  return `${sig3(n)}${units[i]}`;
}

/** The latency unit fio would pick for a distribution: by its maximum. */
function latencyUnit(max: number): { name: string; divisor: number } {
  if (max < 10_000) return { name: "nsec", divisor: 1 };
  if (max < 10_000_000) return { name: "usec", divisor: 1_000 };
  return { name: "msec", divisor: 1_000_000 };
}

function fixed2(n: number): string {
  return n.toFixed(2);
}

function latencyLine(lat: LatencySummary): string {
  const u = latencyUnit(lat.max);
  const v = (ns: number) => {
    const x = ns / u.divisor;
    return x >= 100 ? String(Math.round(x)) : fixed2(x);
  };
  return `lat (${u.name}): min=${v(lat.min)}, avg=${v(lat.avg)}, p50=${v(lat.p50)}, ` +
    `p99=${v(lat.p99)}, p99.9=${v(lat.p999)}, max=${v(lat.max)}`;
}

function directionLines(label: string, d: DirectionResult, elapsedMs: number): string[] {
  if (d.ops === 0) return [];
  const bw = `BW=${formatBytesIEC(d.bandwidth)}/s (${formatBytesSI(d.bandwidth)}/s)`;
  const volume = `(${formatBytesIEC(d.bytes)}/${Math.round(elapsedMs)}msec)`;
  const errors = d.errors > 0 ? `, errors=${d.errors}` : "";
  return [
    `  ${label}: IOPS=${formatCount(d.iops)}, ${bw}${volume}${errors}`,
    `    ${latencyLine(d.latency)}`,
  ];
}

function jobLines(job: JobResult): string[] {
  const err = job.error === null ? 0 : 1;
  const lines = [
    `${job.name}: (clone ${job.clone}): rw=${job.rw}, bs=${job.bs}, iodepth=${job.iodepth}: err=${err}`,
    ...directionLines("read", job.read, job.elapsedMs),
    ...directionLines("write", job.write, job.elapsedMs),
    ...directionLines("trim", job.trim, job.elapsedMs),
  ];
  if (job.verify !== null) {
    lines.push(`  verify: ${job.verify.checked} blocks checked, ${job.verify.failed} failed`);
    for (const f of job.verify.failures) lines.push(`    ${describeFailure(f)}`);
    if (job.verify.failed > job.verify.failures.length) {
      lines.push(`    … and ${job.verify.failed - job.verify.failures.length} more`);
    }
  }
  if (job.error !== null) {
    const e = job.error;
    const detail = e.detail === "" ? "" : ` (${e.detail})`;
    lines.push(`  error: ${e.op} offset=${e.offset}, length=${e.length}: ${e.status}${detail}`);
  }
  return lines;
}

function ratio(n: number): string {
  return n.toFixed(2);
}

function queueLine(q: QueueNumbers): string {
  const parts = [
    `requests=${q.requests}`,
    `kicks=${q.kicks}`,
    `suppressed kicks=${q.suppressedKicks}`,
    `interrupts=${q.interrupts}`,
  ];
  if (q.suppressedInterrupts !== undefined) {
    parts.push(`suppressed interrupts=${q.suppressedInterrupts}`);
  }
  // largestBatch (chains one avail.idx store published) stays in the JSON: the guest publishes
  // each request as it adds it, so in text it only ever read 1 next to the real batch figures.
  return `  ${q.device} queue ${q.queue}: ${parts.join(", ")}`;
}

function exitsText(e: ExitNumbers): string {
  const ioeventfd = e.ioeventfd === undefined ? "" : `, ioeventfd rings=${e.ioeventfd}`;
  const pio = e.pio === undefined || e.pio === 0 ? "" : `, pio=${e.pio}`;
  return `config=${e.config}, mmio=${e.mmio} (doorbells ${e.doorbell})${pio}${ioeventfd}`;
}

/** A device's one-line summary: its ratios, and its exits when attributed. */
function deviceLine(d: DeviceReport): string {
  const s = summarizeVirtio(d.virtio);
  const exits = s.exits === null || s.exitsPerRequest === null
    ? ""
    : `, exits/request=${ratio(s.exitsPerRequest)} (${exitsText(s.exits)})`;
  return `  ${d.device} (${d.kind}, slot ${d.slot}): requests=${s.requests}, ` +
    `kicks/request=${ratio(s.kicksPerRequest)}, interrupts/request=${
      ratio(s.interruptsPerRequest)
    }, ` +
    `batch/kick=${ratio(s.averageBatch)}, batch/interrupt=${ratio(s.requestsPerInterrupt)}, ` +
    `suppressed kicks=${s.suppressedKicks}${exits}`;
}

function virtioLines(v: VirtioNumbers, devices: readonly DeviceReport[] = []): string[] {
  const s = summarizeVirtio(v);
  const lines = ["virtio:"];
  if (devices.length > 0) {
    for (const d of devices) {
      for (const q of d.virtio.queues) lines.push(queueLine(q));
      lines.push(deviceLine(d));
    }
  }
  for (const q of devices.length > 0 ? [] : v.queues) lines.push(queueLine(q));
  lines.push(
    `  total: requests=${s.requests}, kicks/request=${ratio(s.kicksPerRequest)}, ` +
      `interrupts/request=${ratio(s.interruptsPerRequest)}, average batch=${
        ratio(s.averageBatch)
      }, ` +
      `suppressed notifications=${s.suppressedKicks + s.suppressedInterrupts}`,
  );
  if (s.exits !== null && s.exitsPerRequest !== null) {
    lines.push(`  exits: ${exitsText(s.exits)}, per request=${ratio(s.exitsPerRequest)}`);
  }
  return lines;
}

/**
 * The report as text: each job, the total, and the virtio section when numbers are given.
 *
 * @example
 * ```ts ignore
 * console.log(formatReport(await runWorkload(jobs, { openTarget }), virtioNumbers));
 * ```
 */
export function formatReport(result: WorkloadResult, virtio?: VirtioNumbers): string {
  const lines: string[] = [];
  for (const job of result.jobs) lines.push(...jobLines(job));
  lines.push(...totalLines("total", result.jobs.length, result.total));
  if (virtio !== undefined) lines.push(...virtioLines(virtio));
  return lines.join("\n") + "\n";
}

function totalLines(label: string, jobs: number, t: WorkloadTotal): string[] {
  return [
    `${label}: jobs=${jobs}, elapsed=${Math.round(t.elapsedMs)}msec`,
    ...directionLines("read", t.read, t.elapsedMs),
    ...directionLines("write", t.write, t.elapsedMs),
    ...directionLines("trim", t.trim, t.elapsedMs),
  ];
}

/** `clone (virtio-blk, slot 1)`, `base lun 0:0 (virtio-scsi, slot 2)`, `d1: s0 lun 0:1 (…)`. */
function runTitle(r: RunReport): string {
  const lun = r.lun === null ? "" : ` lun ${r.lun.target}:${r.lun.lun}`;
  const disk = r.disk === undefined || r.disk === null ? "" : `disk ${r.disk}: `;
  return `${disk}${r.device}${lun} (${r.kind}, slot ${r.slot})`;
}

/**
 * The report of several runs at once (one per device or LUN): each run's heading, its jobs and its
 * total; the grand total; then the virtio section — per device its queues and a summary line
 * (requests, kicks and interrupts per request, batch per kick and per interrupt, its exits per
 * request), and the overall line and global exits as in {@linkcode formatReport}.
 *
 * @example
 * ```ts ignore
 * console.log(formatMultiReport({ runs, devices, result, virtio }));
 * // run 0: clone (virtio-blk, slot 1)
 * // clone: (clone 0): rw=randrw, bs=4096, iodepth=16: err=0
 * // …
 * // run 0 total: jobs=2, elapsed=812msec
 * // …
 * // total: jobs=3, elapsed=815msec
 * // virtio:
 * //   clone queue 0: requests=2048, kicks=31, …
 * //   clone (virtio-blk, slot 1): requests=4096, kicks/request=0.02, …, batch/kick=51.20, …
 * ```
 */
export function formatMultiReport(report: MultiReport): string {
  const lines: string[] = [];
  for (const [i, run] of report.runs.entries()) {
    lines.push(`run ${i}: ${runTitle(run)}`);
    for (const job of run.jobs) lines.push(...jobLines(job));
    lines.push(...totalLines(`run ${i} total`, run.jobs.length, run.total));
  }
  for (const job of jobsAcrossDisks(report.runs)) {
    lines.push(`job ${job.name}: ${job.clones} clones on ${job.disks.join(", ")}`);
    lines.push(...directionLines("read", job.read, job.elapsedMs));
    lines.push(...directionLines("write", job.write, job.elapsedMs));
    lines.push(...directionLines("trim", job.trim, job.elapsedMs));
  }
  lines.push(...totalLines("total", report.result.jobs.length, report.result.total));
  lines.push(...virtioLines(report.virtio, report.devices));
  return lines.join("\n") + "\n";
}

/** One job's figures over every disk it ran on. */
export interface JobAcrossDisks {
  readonly name: string;
  readonly disks: readonly string[];
  readonly clones: number;
  /** The longest of its clones' times. */
  readonly elapsedMs: number;
  readonly read: DirectionResult;
  readonly write: DirectionResult;
  readonly trim: DirectionResult;
}

/** The jobs that ran on more than one disk, each summed over its disks (by job name). */
export function jobsAcrossDisks(runs: readonly RunReport[]): JobAcrossDisks[] {
  const byName = new Map<string, { disks: string[]; jobs: JobResult[] }>();
  for (const run of runs) {
    const disk = run.disk ??
      `${run.device}${run.lun === null ? "" : `/${run.lun.target}/${run.lun.lun}`}`;
    for (const job of run.jobs) {
      const entry = byName.get(job.name) ?? { disks: [], jobs: [] };
      if (!entry.disks.includes(disk)) entry.disks.push(disk);
      entry.jobs.push(job);
      byName.set(job.name, entry);
    }
  }
  const out: JobAcrossDisks[] = [];
  for (const [name, { disks, jobs }] of byName) {
    if (disks.length < 2) continue;
    const elapsedMs = Math.max(...jobs.map((j) => j.elapsedMs));
    out.push({
      name,
      disks,
      clones: jobs.length,
      elapsedMs,
      read: sumDirections(jobs.map((j) => j.read), elapsedMs),
      write: sumDirections(jobs.map((j) => j.write), elapsedMs),
      trim: sumDirections(jobs.map((j) => j.trim), elapsedMs),
    });
  }
  return out;
}

/** Directions added up: counts summed, rates over `elapsedMs`, latency from the merged bins. */
function sumDirections(list: readonly DirectionResult[], elapsedMs: number): DirectionResult {
  let ops = 0, bytes = 0, errors = 0, sum = 0, squares = 0, min = Infinity, max = 0;
  const bins = new Map<number, number>();
  for (const d of list) {
    ops += d.ops;
    bytes += d.bytes;
    errors += d.errors;
    if (d.latency.count === 0) continue;
    sum += d.latency.avg * d.latency.count;
    squares += (d.latency.stddev ** 2 + d.latency.avg ** 2) * d.latency.count;
    min = Math.min(min, d.latency.min);
    max = Math.max(max, d.latency.max);
    for (const [ns, n] of d.latency.bins) bins.set(ns, (bins.get(ns) ?? 0) + n);
  }
  const sorted = [...bins].sort((a, b) => a[0] - b[0]);
  const count = sorted.reduce((n, [, c]) => n + c, 0);
  const at = (p: number) => {
    if (count === 0) return 0;
    const rank = Math.max(1, Math.ceil((p / 100) * count));
    let seen = 0;
    for (const [ns, c] of sorted) {
      seen += c;
      if (seen >= rank) return Math.min(max, Math.max(min, ns));
    }
    return max;
  };
  const avg = count > 0 ? sum / count : 0;
  const seconds = elapsedMs / 1000;
  return {
    ops,
    bytes,
    errors,
    iops: seconds > 0 ? ops / seconds : 0,
    bandwidth: seconds > 0 ? bytes / seconds : 0,
    latency: count === 0 ? EMPTY_LATENCY : {
      count,
      min,
      avg,
      stddev: Math.sqrt(Math.max(0, squares / count - avg * avg)),
      p50: at(50),
      p99: at(99),
      p999: at(99.9),
      max,
      percentiles: FIO_PERCENTILES.map((p) => [p, at(p)] as const),
      bins: sorted,
    },
  };
}

/** The multi-device report as a JSON-ready object: {@linkcode ReportJson} with `runs` and `devices`. */
export function multiReportJson(report: MultiReport): ReportJson {
  return {
    ...reportJson(report.result, report.virtio),
    runs: report.runs,
    devices: report.devices.map((d) => ({
      device: d.device,
      kind: d.kind,
      slot: d.slot,
      virtio: { ...summarizeVirtio(d.virtio), queues: d.virtio.queues },
    })),
  };
}

/** The report as a JSON-ready object. */
export function reportJson(result: WorkloadResult, virtio?: VirtioNumbers): ReportJson {
  // `groups` stays out: a multi-device report carries the same as `runs`.
  return {
    jobs: result.jobs,
    total: result.total,
    virtio: virtio === undefined ? null : { ...summarizeVirtio(virtio), queues: virtio.queues },
  };
}
