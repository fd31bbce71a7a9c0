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

import type { LatencySummary } from "./latency.ts";
import { describeFailure } from "./verify.ts";
import type { DirectionResult, JobResult, WorkloadResult } from "./workload.ts";

/** One virtqueue's notification counters. */
export interface QueueNumbers {
  /** Device label (machine id or `slot N`). */
  readonly device: string;
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
  /** Doorbell writes that exited to the VMM (trap mode). */
  readonly doorbell: number;
  /** Doorbell writes that rang an ioeventfd without an exit. */
  readonly ioeventfd?: number;
}

/** What the report shows besides the workload. */
export interface VirtioNumbers {
  readonly queues: readonly QueueNumbers[];
  /** Exits during the run; absent when nobody counted them. */
  readonly exits?: ExitNumbers;
}

/** Derived virtio figures. */
export interface VirtioSummary {
  readonly requests: number;
  readonly kicks: number;
  readonly suppressedKicks: number;
  readonly interrupts: number;
  readonly suppressedInterrupts: number;
  /** Requests per kick. */
  readonly averageBatch: number;
  readonly kicksPerRequest: number;
  readonly interruptsPerRequest: number;
  /** Exits (config + MMIO) per request; null without exit numbers. */
  readonly exitsPerRequest: number | null;
  readonly exits: ExitNumbers | null;
}

/** The JSON form of a report. */
export interface ReportJson {
  readonly jobs: readonly JobResult[];
  readonly total: WorkloadResult["total"];
  readonly virtio: (VirtioSummary & { readonly queues: readonly QueueNumbers[] }) | null;
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
    kicksPerRequest: per(kicks),
    interruptsPerRequest: per(interrupts),
    exitsPerRequest: exits === null ? null : per(exits.config + exits.mmio),
    exits,
  };
}

// ---- Number formatting (fio's num2str flavour: three significant digits) ----------------------------

function sig3(n: number): string {
  if (n === 0) return "0";
  const digits = n >= 100 ? 0 : n >= 10 ? 1 : 2;
  return n.toFixed(digits).replace(/\.?0+$/, "");
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

function virtioLines(v: VirtioNumbers): string[] {
  const s = summarizeVirtio(v);
  const lines = ["virtio:"];
  for (const q of v.queues) {
    const parts = [
      `requests=${q.requests}`,
      `kicks=${q.kicks}`,
      `suppressed kicks=${q.suppressedKicks}`,
      `interrupts=${q.interrupts}`,
    ];
    if (q.suppressedInterrupts !== undefined) {
      parts.push(`suppressed interrupts=${q.suppressedInterrupts}`);
    }
    if (q.largestBatch !== undefined) parts.push(`largest batch=${q.largestBatch}`);
    lines.push(`  ${q.device} queue ${q.queue}: ${parts.join(", ")}`);
  }
  lines.push(
    `  total: requests=${s.requests}, kicks/request=${ratio(s.kicksPerRequest)}, ` +
      `interrupts/request=${ratio(s.interruptsPerRequest)}, average batch=${
        ratio(s.averageBatch)
      }, ` +
      `suppressed notifications=${s.suppressedKicks + s.suppressedInterrupts}`,
  );
  if (s.exits !== null && s.exitsPerRequest !== null) {
    const e = s.exits;
    const ioeventfd = e.ioeventfd === undefined ? "" : `, ioeventfd rings=${e.ioeventfd}`;
    lines.push(
      `  exits: config=${e.config}, mmio=${e.mmio} (doorbells ${e.doorbell})${ioeventfd}, ` +
        `per request=${ratio(s.exitsPerRequest)}`,
    );
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
  const t = result.total;
  lines.push(`total: jobs=${result.jobs.length}, elapsed=${Math.round(t.elapsedMs)}msec`);
  lines.push(...directionLines("read", t.read, t.elapsedMs));
  lines.push(...directionLines("write", t.write, t.elapsedMs));
  lines.push(...directionLines("trim", t.trim, t.elapsedMs));
  if (virtio !== undefined) lines.push(...virtioLines(virtio));
  return lines.join("\n") + "\n";
}

/** The report as a JSON-ready object. */
export function reportJson(result: WorkloadResult, virtio?: VirtioNumbers): ReportJson {
  return {
    jobs: result.jobs,
    total: result.total,
    virtio: virtio === undefined ? null : { ...summarizeVirtio(virtio), queues: virtio.queues },
  };
}
