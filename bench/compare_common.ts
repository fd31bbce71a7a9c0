/**
 * What the side-by-side comparison scripts (compare_serve.ts, compare_nbd.ts, compare_rbd.ts)
 * share: a failure reported in one line with the tail of the log that explains it, medians,
 * number formatting, and a process's CPU time from /proc.
 *
 * @module
 */

/** A log line cut at 200 characters (fio's JSON has long lines). */
export const cut = (line: string): string => line.length > 200 ? line.slice(0, 200) + "…" : line;

/** The last `n` lines of a log, each cut. */
export const tail = (text: string, n = 15): string =>
  text.trimEnd().split(/\r?\n/).slice(-n).map(cut).join("\n");

/** A failure to report in one line, with the tail of the log that explains it. */
export class BenchFailure extends Error {
  /** The last lines of the log, as printed under the message. */
  readonly log: string;
  constructor(message: string, log = "", lines = 15) {
    super(message);
    this.log = tail(log, lines);
  }
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** The median of the finite values (NaN for none). */
export const median = (xs: number[]): number => {
  const s = xs.filter(Number.isFinite).sort((a, b) => a - b);
  if (s.length === 0) return NaN;
  const mid = s.length >> 1;
  return s.length % 2 === 1 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
};

/** A whole number with thousands separators, or "n/a". */
export const fmt = (n: number): string =>
  Number.isFinite(n) ? Math.round(n).toLocaleString("en-US") : "n/a";

/** Clock ticks per second of /proc's times (USER_HZ on Linux). */
export const CLK_TCK = 100;

/**
 * User + system CPU seconds of process `pid` so far, over all its threads, the exited ones
 * included (which /proc/PID/task/* lacks).
 */
export async function cpuSeconds(pid: number): Promise<number> {
  const stat = await Deno.readTextFile(`/proc/${pid}/stat`);
  // Fields after the command name, which may hold spaces: the first is field 3 (state).
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[14 - 3]) + Number(fields[15 - 3])) / CLK_TCK;
}
