/**
 * `vstor run --html FILE`: one self-contained page (inline SVG, no network) that shows a run —
 * per job the latency histogram with its percentiles, IOPS over time per job, and per queue the
 * notification story: kicks, interrupts and suppressed interrupts per second, and requests per
 * kick (the batch), over time. With `--compare-notifications` the page holds one section per
 * notification mode.
 *
 * @module
 */
import type { DirectionResult, JobResult } from "../../guest/workload.ts";
import { formatBytesIEC, formatCount, summarizeVirtio } from "../../guest/report.ts";
import type { GuestRunResult } from "../../guest/guest.ts";
import {
  type Cell,
  el,
  escapeHtml,
  figures,
  legend,
  page,
  svg,
  svgRect,
  svgText,
  table,
  text,
} from "./page.ts";

/** The devices' cumulative queue counters, sampled by the VMM over a run. */
export interface RunPageTimeline {
  /** Sample times, ms since the run started. */
  readonly atMs: readonly number[];
  readonly queues: ReadonlyArray<{
    readonly device: string;
    readonly queue: number;
    readonly chains: readonly number[];
    readonly kicks: readonly number[];
    readonly interrupts: readonly number[];
    readonly suppressedInterrupts: readonly number[];
  }>;
}

/** One run shown on the page. */
export interface RunPageSection {
  /** A heading (e.g. the notification mode), or empty for a single run. */
  readonly label: string;
  /** What the guest reported, and the VMM's timeline of the run. */
  readonly run: { readonly run: GuestRunResult; readonly timeline: RunPageTimeline };
}

/** What the page shows. */
export interface RunPageInput {
  readonly title: string;
  /** One line saying what ran (the machine, the command). */
  readonly subtitle: string;
  readonly sections: readonly RunPageSection[];
  /** A table shown before the sections (e.g. the device comparison): headers and rows. */
  readonly summary?: { readonly headers: readonly string[]; readonly rows: readonly Cell[][] };
}

const PALETTE = [
  "#1f77b4",
  "#ff7f0e",
  "#2ca02c",
  "#d62728",
  "#9467bd",
  "#8c564b",
  "#e377c2",
  "#7f7f7f",
  "#bcbd22",
  "#17becf",
];
const color = (i: number) => PALETTE[i % PALETTE.length]!;

const CSS = `
section.run { margin-top: 12px; }
svg .axis { stroke: #5c6577; stroke-width: 1; }
svg .grid { stroke: #e3e6ec; stroke-width: 1; }
svg text { font: 11px system-ui, sans-serif; fill: #1d2330; }
svg .series { fill: none; stroke-width: 1.6; }
svg .marker { stroke-width: 1.2; stroke-dasharray: 4 3; }
div.charts { display: flex; flex-wrap: wrap; gap: 12px 24px; }
div.chart h3 { font-size: 13px; margin: 8px 0 2px; }
`;

/** Latency in the unit that suits it: 812ns, 41.2µs, 3.10ms, 1.20s. */
export function formatNs(ns: number): string {
  if (ns < 1_000) return `${Math.round(ns)}ns`;
  if (ns < 1_000_000) return `${(ns / 1_000).toPrecision(3)}µs`;
  if (ns < 1_000_000_000) return `${(ns / 1_000_000).toPrecision(3)}ms`;
  return `${(ns / 1_000_000_000).toPrecision(3)}s`;
}

/** A "nice" upper bound and tick step for an axis from 0 to `max`. */
function niceScale(max: number, ticks = 5): { top: number; step: number } {
  if (!(max > 0)) return { top: 1, step: 0.2 };
  const raw = max / ticks;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) ?? 10 * mag;
  return { top: Math.ceil(max / step) * step, step };
}

interface Series {
  readonly name: string;
  readonly color: string;
  readonly points: ReadonlyArray<readonly [number, number]>;
}

const W = 560, H = 220, L = 58, R = 12, T = 10, B = 34;

/** A line chart of `series` (x from 0 to the last point, y from 0), with axes and ticks. */
function lineChart(
  opts: { label: string; xLabel: string; yFormat: (v: number) => string },
  series: readonly Series[],
): string {
  const xs = series.flatMap((s) => s.points.map((p) => p[0]));
  const ys = series.flatMap((s) => s.points.map((p) => p[1]));
  const xMax = Math.max(1e-9, ...xs);
  const { top, step } = niceScale(Math.max(0, ...ys));
  const px = (x: number) => L + (x / xMax) * (W - L - R);
  const py = (y: number) => H - B - (y / top) * (H - T - B);
  const parts: string[] = [];
  for (let v = 0; v <= top + step / 2; v += step) {
    parts.push(`<line class="grid" x1="${L}" x2="${W - R}" y1="${py(v)}" y2="${py(v)}"/>`);
    parts.push(
      svgText({ x: L - 6, y: py(v) + 4, text: opts.yFormat(v), attrs: { "text-anchor": "end" } }),
    );
  }
  const xStep = niceScale(xMax, 6).step;
  for (let v = 0; v <= xMax + 1e-9; v += xStep) {
    parts.push(
      svgText({
        x: px(v),
        y: H - B + 14,
        text: `${+v.toFixed(2)}`,
        attrs: { "text-anchor": "middle" },
      }),
    );
  }
  parts.push(`<line class="axis" x1="${L}" x2="${W - R}" y1="${H - B}" y2="${H - B}"/>`);
  parts.push(`<line class="axis" x1="${L}" x2="${L}" y1="${T}" y2="${H - B}"/>`);
  parts.push(
    svgText({
      x: (L + W - R) / 2,
      y: H - 4,
      text: opts.xLabel,
      attrs: { "text-anchor": "middle" },
    }),
  );
  for (const s of series) {
    if (s.points.length === 0) continue;
    const pts = s.points.map(([x, y]) => `${px(x).toFixed(1)},${py(y).toFixed(1)}`).join(" ");
    parts.push(
      `<polyline class="series" data-series="${
        escapeHtml(s.name)
      }" stroke="${s.color}" points="${pts}"><title>${escapeHtml(s.name)}</title></polyline>`,
    );
  }
  return svg({ width: W, height: H, label: opts.label, attrs: { class: "line-chart" } }, parts);
}

/** Rates per second between consecutive cumulative samples, at each interval's end. */
function rates(atMs: readonly number[], values: readonly number[]): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (let i = 1; i < atMs.length; i++) {
    const dt = (atMs[i]! - atMs[i - 1]!) / 1000;
    if (dt > 0) out.push([atMs[i]! / 1000, (values[i]! - values[i - 1]!) / dt]);
  }
  return out;
}

/** Requests per kick in each interval (none where the interval had no kick). */
function batches(
  atMs: readonly number[],
  chains: readonly number[],
  kicks: readonly number[],
): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (let i = 1; i < atMs.length; i++) {
    const k = kicks[i]! - kicks[i - 1]!;
    if (k > 0) out.push([atMs[i]! / 1000, (chains[i]! - chains[i - 1]!) / k]);
  }
  return out;
}

/** One job direction's latency histogram (log-scaled time axis) with p50/p99/p99.9 markers. */
function histogram(label: string, dirs: ReadonlyArray<[string, DirectionResult, string]>): string {
  const bins = dirs.flatMap(([, d]) => d.latency.bins.map((b) => b[0]));
  if (bins.length === 0) return el("p", { class: "note" }, "No completed requests.");
  const lo = Math.log10(Math.max(1, Math.min(...bins)) * 0.9);
  const hi = Math.log10(Math.max(...bins) * 1.1);
  const span = Math.max(hi - lo, 0.5);
  const maxShare = Math.max(
    ...dirs.flatMap(([, d]) => d.latency.bins.map((b) => b[1] / Math.max(1, d.latency.count))),
  );
  const { top, step } = niceScale(maxShare * 100);
  const px = (ns: number) => L + ((Math.log10(ns) - lo) / span) * (W - L - R);
  const py = (pct: number) => H - B - (pct / top) * (H - T - B);
  const parts: string[] = [];
  for (let v = 0; v <= top + step / 2; v += step) {
    parts.push(`<line class="grid" x1="${L}" x2="${W - R}" y1="${py(v)}" y2="${py(v)}"/>`);
    parts.push(
      svgText({
        x: L - 6,
        y: py(v) + 4,
        text: `${+v.toFixed(1)}%`,
        attrs: { "text-anchor": "end" },
      }),
    );
  }
  for (let e = Math.ceil(lo); e <= hi; e++) {
    parts.push(
      svgText({
        x: px(10 ** e),
        y: H - B + 14,
        text: formatNs(10 ** e),
        attrs: { "text-anchor": "middle" },
      }),
    );
  }
  parts.push(`<line class="axis" x1="${L}" x2="${W - R}" y1="${H - B}" y2="${H - B}"/>`);
  parts.push(`<line class="axis" x1="${L}" x2="${L}" y1="${T}" y2="${H - B}"/>`);
  parts.push(
    svgText({
      x: (L + W - R) / 2,
      y: H - 4,
      text: "completion latency (log scale)",
      attrs: { "text-anchor": "middle" },
    }),
  );
  for (const [name, d, c] of dirs) {
    const n = Math.max(1, d.latency.count);
    for (const [ns, count] of d.latency.bins) {
      // Each fio bucket spans 1/64 of a power of two: about 1.1 % of its value on each side.
      const x0 = px(ns / 1.011), x1 = px(ns * 1.011);
      const pct = (count / n) * 100;
      parts.push(svgRect({
        x: +x0.toFixed(2),
        y: +py(pct).toFixed(2),
        width: Math.max(1, +(x1 - x0).toFixed(2)),
        height: +(H - B - py(pct)).toFixed(2),
        title: `${name}: ${formatNs(ns)}: ${count} requests (${pct.toFixed(2)}%)`,
        attrs: { class: "bin", fill: c, "fill-opacity": 0.75, "data-direction": name },
      }));
    }
    for (
      const [p, ns] of [["p50", d.latency.p50], ["p99", d.latency.p99], [
        "p99.9",
        d.latency.p999,
      ]] as const
    ) {
      if (!(ns > 0)) continue;
      const x = +px(ns).toFixed(1);
      parts.push(
        `<line class="marker" data-percentile="${p}" x1="${x}" x2="${x}" y1="${T}" y2="${
          H - B
        }" stroke="${c}"><title>${name} ${p} = ${formatNs(ns)}</title></line>`,
      );
      parts.push(svgText({ x: x + 3, y: T + 10, text: p, attrs: { fill: c } }));
    }
  }
  return svg({ width: W, height: H, label, attrs: { class: "histogram" } }, parts);
}

function directions(job: JobResult): Array<[string, DirectionResult, string]> {
  const out: Array<[string, DirectionResult, string]> = [];
  if (job.read.ops > 0) out.push(["read", job.read, "#1f77b4"]);
  if (job.write.ops > 0) out.push(["write", job.write, "#d62728"]);
  if (job.trim.ops > 0) out.push(["trim", job.trim, "#2ca02c"]);
  return out;
}

function jobTitle(job: JobResult, disk: string | undefined): string {
  return `${job.name} (clone ${job.clone})${disk === undefined ? "" : ` on ${disk}`}`;
}

function section(s: RunPageSection): string {
  const { run, timeline } = s.run;
  const result = run.result;
  const disks: string[] = [];
  for (const r of run.runs) {
    const name = r.disk ??
      `${r.device}${r.lun === null ? "" : ` lun ${r.lun.target}:${r.lun.lun}`}`;
    for (const _ of r.jobs) disks.push(name);
  }
  const t = result.total;
  const totalOps = t.read.ops + t.write.ops + t.trim.ops;
  const totalBytes = t.read.bytes + t.write.bytes + t.trim.bytes;
  const v = summarizeVirtio(run.virtio);
  const out: string[] = [];
  if (s.label !== "") out.push(el("h2", {}, text(s.label)));
  out.push(figures([
    ["elapsed", `${Math.round(t.elapsedMs)} ms${result.stopped ? " (stopped early)" : ""}`],
    ["requests", totalOps],
    ["IOPS", formatCount(totalOps / Math.max(1e-9, t.elapsedMs / 1000))],
    ["bandwidth", `${formatBytesIEC(totalBytes / Math.max(1e-9, t.elapsedMs / 1000))}/s`],
    ["kicks per request", v.kicksPerRequest.toFixed(3)],
    ["interrupts per request", v.interruptsPerRequest.toFixed(3)],
    ["requests per kick", v.averageBatch.toFixed(1)],
    ["exits per request", v.exitsPerRequest === null ? "—" : v.exitsPerRequest.toFixed(3)],
  ]));

  out.push(el("h2", {}, "Jobs"));
  out.push(table(
    [
      "job",
      "disk",
      "rw",
      "bs",
      "iodepth",
      "IOPS",
      "bandwidth",
      "avg",
      "p50",
      "p99",
      "p99.9",
      "max",
      "verify",
    ],
    result.jobs.map((job, i) => {
      const all = directions(job);
      const ops = all.reduce((n, [, d]) => n + d.ops, 0);
      const bytes = all.reduce((n, [, d]) => n + d.bytes, 0);
      const secs = Math.max(1e-9, job.elapsedMs / 1000);
      const main = all[0]?.[1];
      const lat = (f: (d: DirectionResult) => number) =>
        main === undefined ? "—" : formatNs(f(main));
      return [
        `${job.name} #${job.clone}`,
        disks[i] ?? "",
        job.rw,
        job.bs,
        job.iodepth,
        Math.round(ops / secs),
        `${formatBytesIEC(bytes / secs)}/s`,
        lat((d) => d.latency.avg),
        lat((d) => d.latency.p50),
        lat((d) => d.latency.p99),
        lat((d) => d.latency.p999),
        lat((d) => d.latency.max),
        job.verify === null ? "—" : `${job.verify.checked} checked, ${job.verify.failed} failed`,
      ];
    }),
  ));

  out.push(el("h2", {}, "Latency"));
  out.push(
    el(
      "p",
      { class: "note" },
      "Share of each job's requests by completion latency; dashed lines mark p50, p99 and p99.9.",
    ),
  );
  out.push(el(
    "div",
    { class: "charts" },
    result.jobs.map((job, i) => {
      const dirs = directions(job);
      const rows = dirs.map(([name, d]) => [
        name,
        d.latency.count,
        formatNs(d.latency.min),
        formatNs(d.latency.avg),
        ...d.latency.percentiles.filter(([p]) => [50, 90, 99, 99.9, 99.99].includes(p)).map((
          [, ns],
        ) => formatNs(ns)),
        formatNs(d.latency.max),
      ]);
      return el("div", { class: "chart job", "data-job": `${job.name}#${job.clone}` }, [
        el("h3", {}, text(jobTitle(job, disks[i]))),
        legend(dirs.map(([name, , c]) => ({ color: c, label: name }))),
        histogram(`latency histogram of ${jobTitle(job, disks[i])}`, dirs),
        table(["", "requests", "min", "avg", "p50", "p90", "p99", "p99.9", "p99.99", "max"], rows),
      ]);
    }),
  ));

  const tl = result.timeline;
  if (tl !== undefined && tl.atMs.length > 1) {
    out.push(el("h2", {}, "IOPS over time"));
    const series = result.jobs.map((job, i) => ({
      name: jobTitle(job, disks[i]),
      color: color(i),
      points: rates(tl.atMs, tl.jobs[i]?.ops ?? []),
    }));
    out.push(legend(series.map((s) => ({ color: s.color, label: s.name }))));
    out.push(
      el(
        "div",
        { class: "chart iops" },
        lineChart({ label: "IOPS over time", xLabel: "seconds", yFormat: formatCount }, series),
      ),
    );
  }

  out.push(el("h2", {}, "Notifications per queue"));
  out.push(el(
    "p",
    { class: "note" },
    "Doorbell kicks the device saw, interrupts it raised and interrupts the driver's event index or flags saved it, per second; and requests completed per kick (the batch a notification carried).",
  ));
  out.push(table(
    [
      "queue",
      "requests",
      "kicks",
      "suppressed kicks",
      "interrupts",
      "suppressed interrupts",
      "requests/kick",
      "requests/interrupt",
    ],
    run.virtio.queues.map((q) => [
      `${q.device} queue ${q.queue}`,
      q.requests,
      q.kicks,
      q.suppressedKicks,
      q.interrupts,
      q.suppressedInterrupts ?? 0,
      q.kicks > 0 ? (q.requests / q.kicks).toFixed(1) : "—",
      q.interrupts > 0 ? (q.requests / q.interrupts).toFixed(1) : "—",
    ]),
  ));
  const busy = timeline.queues.filter((q) => (q.chains.at(-1) ?? 0) > (q.chains[0] ?? 0));
  out.push(el(
    "div",
    { class: "charts" },
    busy.map((q) => {
      const name = `${q.device} queue ${q.queue}`;
      const notify: Series[] = [
        { name: "kicks/s", color: "#1f77b4", points: rates(timeline.atMs, q.kicks) },
        { name: "interrupts/s", color: "#d62728", points: rates(timeline.atMs, q.interrupts) },
        {
          name: "suppressed interrupts/s",
          color: "#7f7f7f",
          points: rates(timeline.atMs, q.suppressedInterrupts),
        },
      ];
      const batch: Series[] = [
        {
          name: "requests per kick",
          color: "#2ca02c",
          points: batches(timeline.atMs, q.chains, q.kicks),
        },
      ];
      return el("div", { class: "chart queue", "data-queue": name }, [
        el("h3", {}, text(name)),
        legend([...notify, ...batch].map((s) => ({ color: s.color, label: s.name }))),
        lineChart(
          { label: `notifications of ${name}`, xLabel: "seconds", yFormat: formatCount },
          notify,
        ),
        lineChart({
          label: `batch size of ${name}`,
          xLabel: "seconds",
          yFormat: (n) => `${+n.toFixed(1)}`,
        }, batch),
      ]);
    }),
  ));
  return el("section", { class: "run" }, out);
}

/** The whole page. */
export function runPage(input: RunPageInput): string {
  const body = [
    el("h1", {}, text(input.title)),
    el("p", { class: "note" }, text(input.subtitle)),
    ...(input.summary === undefined
      ? []
      : [table([...input.summary.headers], input.summary.rows.map((r) => [...r]))]),
    ...input.sections.map(section),
  ].join("\n");
  return page({ title: input.title, body, css: CSS });
}
