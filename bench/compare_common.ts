/**
 * What the side-by-side comparison scripts (compare_serve.ts, compare_nbd.ts, compare_rbd.ts)
 * share: a failure reported in one line with the tail of the log that explains it, medians,
 * number formatting, a process's CPU time from /proc, and the child processes they start
 * ({@linkcode Children}: tracked, run to their end with a time limit, all stopped on exit).
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

const decoder = new TextDecoder();

/** What a tool printed, its exit code, and its wall time from spawn to exit. */
export interface ToolRun {
  stdout: string;
  stderr: string;
  code: number;
  seconds: number;
}

/** A process the tool talks to: if it exits while the tool runs, the tool's run fails. */
export interface Watched {
  /** Its name in messages. */
  readonly name: string;
  readonly child: Deno.ChildProcess;
  /** Its log so far. */
  log(): string;
}

/**
 * The child processes a comparison script started, so that every exit path (Ctrl-C included)
 * can stop them; and how a tool is run to its end with a time limit.
 */
export class Children {
  readonly live = new Set<Deno.ChildProcess>();
  readonly #cwd: string;

  constructor(cwd: string) {
    this.#cwd = cwd;
  }

  /** Starts `cmd` with piped output (read it, or it stalls), tracked until it exits. */
  spawn(cmd: string, args: string[], env: Record<string, string> = {}): Deno.ChildProcess {
    const io = { stdin: "null", stdout: "piped", stderr: "piped" } as const;
    let child: Deno.ChildProcess;
    try {
      child = new Deno.Command(cmd, { args, env, cwd: this.#cwd, ...io }).spawn();
    } catch (e) {
      throw new BenchFailure(`cannot run ${cmd}: ${e instanceof Error ? e.message : String(e)}`);
    }
    this.live.add(child);
    child.status.finally(() => this.live.delete(child));
    return child;
  }

  /** Sends a signal to a child unless it has exited (Deno throws for those). */
  kill(child: Deno.ChildProcess, signal: Deno.Signal): void {
    if (!this.live.has(child)) return;
    try {
      child.kill(signal);
    } catch { /* exited meanwhile */ }
  }

  /** SIGTERM to every child, up to 10 s for them to go, then SIGKILL. */
  async stopAll(): Promise<void> {
    for (const child of this.live) this.kill(child, "SIGTERM");
    await Promise.race([Promise.allSettled([...this.live].map((c) => c.status)), sleep(10_000)]);
    for (const child of this.live) this.kill(child, "SIGKILL");
  }

  /**
   * Runs a tool to its end, timed by wall clock from spawn to exit: a failure when it exits
   * non-zero (unless `anyExit`), outlives `timeoutMs` (it is then killed), or when `watch` (the
   * process it talks to) exits first.
   */
  async run(
    label: string,
    cmd: string,
    args: string[],
    timeoutMs: number,
    opts: { env?: Record<string, string>; anyExit?: boolean; watch?: Watched } = {},
  ): Promise<ToolRun> {
    const start = performance.now();
    const child = this.spawn(cmd, args, opts.env);
    const ended = child.status.then(() => performance.now());
    const output = child.output();
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<"timeout">((r) =>
      timer = setTimeout(() => r("timeout"), timeoutMs)
    );
    const watch = opts.watch;
    const died = watch === undefined
      ? new Promise<never>(() => {})
      : watch.child.status.then((s) => ({ died: s.code }));
    const withWatchLog = (log: string, lines?: number) =>
      watch === undefined
        ? log
        : `${log}\n--- ${watch.name}'s log ---\n${
          lines === undefined ? watch.log() : tail(watch.log(), lines)
        }`;
    try {
      const first = await Promise.race([output, timeout, died]);
      if (first === "timeout" || "died" in first) {
        this.kill(child, "SIGKILL");
        const out = await output;
        const log = decoder.decode(out.stdout) + decoder.decode(out.stderr);
        if (first === "timeout") {
          throw new BenchFailure(
            `${label} did not finish within ${timeoutMs / 1000} s (killed)`,
            withWatchLog(log, 8),
          );
        }
        throw new BenchFailure(
          `${watch!.name} exited (${first.died}) during ${label}`,
          withWatchLog(log),
        );
      }
      const stdout = decoder.decode(first.stdout), stderr = decoder.decode(first.stderr);
      if (!first.success && opts.anyExit !== true) {
        const how = first.signal === null ? `exit ${first.code}` : `signal ${first.signal}`;
        throw new BenchFailure(`${label} failed (${how})`, withWatchLog(stdout + stderr, 8));
      }
      return { stdout, stderr, code: first.code, seconds: (await ended - start) / 1000 };
    } finally {
      clearTimeout(timer);
    }
  }
}
