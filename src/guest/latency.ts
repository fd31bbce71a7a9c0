/**
 * Latency percentiles without storing samples: fio's log-linear histogram (`stat.h`,
 * FIO_IO_U_PLAT_BITS = 6). Values below 128 ns get a bucket each; above, every power of 2 is split
 * into 64 buckets, so a reported percentile is within 1/64 (1.6 %) of the true value. 29 groups
 * reach ~17 s; slower samples land in the last bucket (min/max/avg stay exact).
 *
 * @module
 */

const PLAT_BITS = 6;
const PLAT_VAL = 1 << PLAT_BITS;
const PLAT_GROUPS = 29;
/** Buckets of a histogram. */
export const PLAT_NR = PLAT_GROUPS * PLAT_VAL;

/** Bucket of a value in nanoseconds (fio's `plat_val_to_idx`). */
export function bucketOf(ns: number): number {
  const v = ns < 0 ? 0 : Math.floor(ns);
  if (v < 2 * PLAT_VAL) return v;
  let msb = Math.floor(Math.log2(v));
  if (2 ** msb > v) msb--; // log2 rounds up just below a power of 2
  const errorBits = msb - PLAT_BITS;
  const base = (errorBits + 1) << PLAT_BITS;
  const offset = Math.floor(v / 2 ** errorBits) & (PLAT_VAL - 1);
  return Math.min(base + offset, PLAT_NR - 1);
}

/** A representative value of bucket `index` (fio's `plat_idx_to_val`: the bucket's middle). */
export function bucketValue(index: number): number {
  if (index < 2 * PLAT_VAL) return index;
  const errorBits = (index >> PLAT_BITS) - 1;
  const base = 2 ** (errorBits + PLAT_BITS);
  const k = index % PLAT_VAL;
  return base + (k + 0.5) * 2 ** errorBits;
}

/** The percentiles fio reports by default (its `percentile_list`). */
export const FIO_PERCENTILES = [
  1,
  5,
  10,
  20,
  30,
  40,
  50,
  60,
  70,
  80,
  90,
  95,
  99,
  99.5,
  99.9,
  99.95,
  99.99,
] as const;

/** Summary of a latency distribution, in nanoseconds. */
export interface LatencySummary {
  /** Samples. */
  readonly count: number;
  /** Smallest sample. */
  readonly min: number;
  /** Mean. */
  readonly avg: number;
  /** Standard deviation (population, as fio's). */
  readonly stddev: number;
  /** Median (50th percentile). */
  readonly p50: number;
  /** 99th percentile. */
  readonly p99: number;
  /** 99.9th percentile. */
  readonly p999: number;
  /** Largest sample. */
  readonly max: number;
  /** {@linkcode FIO_PERCENTILES} in order: `[percent, ns]`. */
  readonly percentiles: ReadonlyArray<readonly [number, number]>;
  /** The histogram's non-empty buckets: `[representative ns, samples]`, ascending. */
  readonly bins: ReadonlyArray<readonly [number, number]>;
}

/** An empty distribution's summary. */
export const EMPTY_LATENCY: LatencySummary = {
  count: 0,
  min: 0,
  avg: 0,
  stddev: 0,
  p50: 0,
  p99: 0,
  p999: 0,
  max: 0,
  percentiles: FIO_PERCENTILES.map((p) => [p, 0] as const),
  bins: [],
};

/**
 * A latency histogram in nanoseconds.
 *
 * @example
 * ```ts
 * import { LatencyHistogram } from "./latency.ts";
 * const h = new LatencyHistogram();
 * for (let i = 1; i <= 1000; i++) h.add(i * 1000);
 * const s = h.summary();
 * if (Math.abs(s.p50 - 500_000) > 500_000 / 64) throw new Error("p50");
 * ```
 */
export class LatencyHistogram {
  readonly buckets: Float64Array = new Float64Array(PLAT_NR);
  /** Samples recorded. */
  count = 0;
  /** Their sum (ns). */
  sum = 0;
  /** The sum of their squares (ns²), for the standard deviation. */
  sumSquares = 0;
  /** Smallest sample (Infinity while empty). */
  min: number = Infinity;
  /** Largest sample. */
  max = 0;

  /** Records one sample (ns). */
  add(ns: number): void {
    this.buckets[bucketOf(ns)]!++;
    this.count++;
    this.sum += ns;
    this.sumSquares += ns * ns;
    if (ns < this.min) this.min = ns;
    if (ns > this.max) this.max = ns;
  }

  /** Adds another histogram's samples. */
  merge(other: LatencyHistogram): void {
    for (let i = 0; i < PLAT_NR; i++) this.buckets[i]! += other.buckets[i]!;
    this.count += other.count;
    this.sum += other.sum;
    this.sumSquares += other.sumSquares;
    if (other.min < this.min) this.min = other.min;
    if (other.max > this.max) this.max = other.max;
  }

  /** The value below which `p` percent of samples fall (0 when empty), clamped to min/max. */
  percentile(p: number): number {
    if (this.count === 0) return 0;
    // fio's rule: the first bucket where the running count reaches p% of all samples.
    const rank = Math.max(1, Math.ceil((p / 100) * this.count));
    let seen = 0;
    for (let i = 0; i < PLAT_NR; i++) {
      seen += this.buckets[i]!;
      if (seen >= rank) return Math.min(this.max, Math.max(this.min, bucketValue(i)));
    }
    return this.max;
  }

  /** min, avg, stddev, p50, p99, p99.9, max, fio's percentile list and the non-empty buckets. */
  summary(): LatencySummary {
    if (this.count === 0) return EMPTY_LATENCY;
    const avg = this.sum / this.count;
    const bins: Array<readonly [number, number]> = [];
    for (let i = 0; i < PLAT_NR; i++) {
      const n = this.buckets[i]!;
      if (n > 0) bins.push([bucketValue(i), n]);
    }
    return {
      count: this.count,
      min: this.min,
      avg,
      stddev: Math.sqrt(Math.max(0, this.sumSquares / this.count - avg * avg)),
      p50: this.percentile(50),
      p99: this.percentile(99),
      p999: this.percentile(99.9),
      max: this.max,
      percentiles: FIO_PERCENTILES.map((p) => [p, this.percentile(p)] as const),
      bins,
    };
  }
}
