/**
 * Issue #18's bars in one run, side by side: vstor's NBD server and NBD client against qemu-nbd
 * and qemu-img on one image, over unix sockets.
 *
 *   deno run -A bench/compare_nbd.ts [--runs=1] [--seconds=5] [--image-mb=256] [--json]
 *
 * 1. fio's nbd engine against `vstor serve IMAGE --nbd unix:SOCK --writable -f qcow2` and against
 *    `qemu-nbd -t -f qcow2 -k SOCK IMAGE`, each on a fresh copy of the image, both with their
 *    default cache modes: 4 KiB random reads and writes at depth 32, 1 MiB sequential reads at
 *    depth 8, --seconds each. Per job: IOPS, the ratio vstor/qemu-nbd against the bar 1.0, and
 *    each server's CPU µs per request (user + system time of its process over the job from
 *    /proc/PID/stat, over the requests fio completed). Each copy is checked with `qemu-img check`
 *    after its server stops.
 * 2. `deno run -A mod.ts convert -f raw -O qcow2 nbd+unix:///?socket=SOCK OUT` against
 *    `qemu-img convert` with the same arguments, both from one `qemu-nbd -r -f qcow2` export of the
 *    image: wall time, the ratio qemu-img time / vstor time against the bar 1.0. vstor's time
 *    includes Deno's start-up, reported on its own (`deno run -A mod.ts --version`) for a reader
 *    to subtract. Both outputs must equal the image (`qemu-img compare`).
 * 3. `nbdcopy nbd+unix:///?socket=SOCK OUT.raw` from `vstor serve` and from `qemu-nbd -r` (both
 *    read-only, the same image): wall time, the ratio qemu-nbd time / vstor time against the bar
 *    1.0. Both outputs must equal the image (`qemu-img compare -f raw -F qcow2`).
 *
 * Every figure is the median over --runs; vstor goes first on odd runs, its peer on even ones. The
 * qcow2 (preallocation=metadata) is written full once with qemu-io, so no job reads holes. A
 * measurement, not a test: exits 0 when a bar is missed, 1 when something fails (one line naming
 * it, then the tail of the log that says why), 2 on bad options. Servers, tools and the temporary
 * directory go on every path, Ctrl-C included.
 *
 * @module
 */
import { parseArgs } from "node:util";
import { join } from "node:path";
import {
  BenchFailure,
  Children,
  cpuSeconds,
  fmt,
  median,
  sleep,
  tail,
  type ToolRun,
  type Watched,
} from "./compare_common.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    runs: { type: "string", default: "1" },
    seconds: { type: "string", default: "5" },
    "image-mb": { type: "string", default: "256" },
    json: { type: "boolean", default: false },
  },
});
const runs = Number(values.runs);
const seconds = Number(values.seconds);
const imageMb = Number(values["image-mb"]);
const positive = (n: number) => Number.isSafeInteger(n) && n > 0;
if (![runs, seconds, imageMb].every(positive)) {
  console.error("compare_nbd: --runs, --seconds, --image-mb must be positive integers");
  Deno.exit(2);
}
const modTs = new URL("../mod.ts", import.meta.url).pathname;
const root = new URL("..", import.meta.url).pathname;
/** A fio job past its --seconds by this much, or a copy past this, is killed and reported. */
const FIO_SLACK_MS = 60_000;
const COPY_TIMEOUT_MS = 60_000 + imageMb * 500;
const dec = new TextDecoder();

type Server = "vstor" | "qemu-nbd";
const JOBS = [
  {
    id: "randread",
    name: "randread 4K depth 32",
    fio: ["--rw=randread", "--bs=4k", "--iodepth=32"],
  },
  {
    id: "randwrite",
    name: "randwrite 4K depth 32",
    fio: ["--rw=randwrite", "--bs=4k", "--iodepth=32"],
  },
  { id: "read1m", name: "read 1M depth 8", fio: ["--rw=read", "--bs=1M", "--iodepth=8"] },
] as const;
type JobId = typeof JOBS[number]["id"];

/** One fio job on one server: IOPS, requests completed, the server's CPU over the job. */
type JobResult = { iops: number; ios: number; cpuSeconds: number; cpuUsPerRequest: number };
/** One server's three fio jobs in one run. */
interface ServeRun {
  server: Server;
  run: number;
  jobs: Record<JobId, JobResult>;
}
/** One timed copy (or Deno's start-up) in one run. */
interface CopyRun {
  what: "convert" | "nbdcopy" | "startup";
  /** vstor's side, or the peer's (qemu-img convert; nbdcopy from qemu-nbd). */
  side: "vstor" | "peer";
  run: number;
  seconds: number;
}

/** Children still running: the cleanup stops them on every path, Ctrl-C included. */
const children = new Children(root);

/** The server a tool talks to, watched while the tool runs. */
const watched = (s: Running): Watched => ({ name: s.server, child: s.child, log: s.log });

/** Read stdout and stderr of a child as they come (a full pipe would stall it). */
function capture(child: Deno.ChildProcess): () => string {
  const parts: string[] = [];
  const drain = async (stream: ReadableStream<Uint8Array>) => {
    for await (const chunk of stream.pipeThrough(new TextDecoderStream())) parts.push(chunk);
  };
  void Promise.allSettled([drain(child.stdout), drain(child.stderr)]);
  return () => parts.join("");
}

/** A command that must succeed (set-up and checks); its output. */
async function exec(cmd: string, args: string[]): Promise<string> {
  const out = await new Deno.Command(cmd, { args, cwd: root, stdout: "piped", stderr: "piped" })
    .output();
  const log = dec.decode(out.stdout) + dec.decode(out.stderr);
  if (!out.success) {
    throw new BenchFailure(`${cmd} ${args.join(" ")} failed (exit ${out.code})`, log);
  }
  return log;
}

/** A server listening on its socket: its process (the server itself, no wrapper) and log. */
interface Running {
  server: Server;
  child: Deno.ChildProcess;
  sock: string;
  log: () => string;
}

const uriOf = (sock: string) => `nbd+unix:///?socket=${sock}`;

/** Start a server on `image`; resolves once it listens (vstor: once it also says so). */
async function startServer(
  server: Server,
  image: string,
  sock: string,
  writable: boolean,
): Promise<Running> {
  await Deno.remove(sock).catch(() => {});
  const child = server === "vstor"
    ? children.spawn(Deno.execPath(), [
      ...["run", "-A", modTs, "serve", image, "--nbd", `unix:${sock}`],
      ...(writable ? ["--writable"] : []),
      ...["-f", "qcow2"],
    ])
    : children.spawn("qemu-nbd", [
      "-t",
      "-f",
      "qcow2",
      ...(writable ? [] : ["-r"]),
      "-k",
      sock,
      image,
    ]);
  const log = capture(child);
  let exit: number | null = null;
  child.status.then((s) => exit = s.code);
  for (const deadline = Date.now() + 30_000; Date.now() < deadline; await sleep(50)) {
    if (exit !== null) throw new BenchFailure(`${server} exited (${exit}) before listening`, log());
    const listening = await Deno.stat(sock).then((s) => s.isSocket, () => false);
    const said = server !== "vstor" || log().includes(`NBD server on unix:${sock}`);
    if (listening && said) return { server, child, sock, log };
  }
  throw new BenchFailure(`${server} did not listen on ${sock} within 30 s`, log());
}

/** SIGTERM, then the exit; a server that does not stop in 20 s is killed and reported. */
async function stopServer(s: Running, notes: string[], run: number): Promise<void> {
  children.kill(s.child, "SIGTERM");
  const code = await Promise.race([s.child.status.then((st) => st.code), sleep(20_000)]);
  if (code === undefined) {
    children.kill(s.child, "SIGKILL");
    await s.child.status;
    notes.push(`run ${run}: ${s.server} did not stop within 20 s of SIGTERM; killed`);
  } else if (code !== 0) {
    notes.push(`run ${run}: ${s.server} exited ${code} after SIGTERM:\n${tail(s.log())}`);
  }
  if (s.server === "vstor") {
    for (const l of s.log().split("\n").filter((l) => /error|fail|warn|panic/i.test(l))) {
      notes.push(`run ${run}, vstor's log: ${l.trim()}`);
    }
  }
}

/** What we read of fio's JSON. */
type FioSide = { iops?: number; total_ios?: number };
type FioJson = { jobs?: { error?: number; read?: FioSide; write?: FioSide }[] };

/** One fio job through the nbd engine against a running server. */
async function fioJob(s: Running, job: typeof JOBS[number]): Promise<JobResult> {
  const args = [
    ...["--name=j", "--ioengine=nbd", `--uri=${uriOf(s.sock)}`, ...job.fio],
    ...[`--size=${imageMb}M`, `--runtime=${seconds}`, "--time_based", "--output-format=json"],
  ];
  const label = `fio ${job.id} against ${s.server}`;
  const before = await cpuSeconds(s.child.pid);
  const out = await children.run(label, "fio", args, seconds * 1000 + FIO_SLACK_MS, {
    watch: watched(s),
  });
  const cpu = await cpuSeconds(s.child.pid) - before;
  // fio's nbd engine says "fio: connected to NBD server" on stdout before the JSON.
  const at = out.stdout.search(/^\{/m);
  let fio: NonNullable<FioJson["jobs"]>[number] | undefined;
  try {
    fio = (JSON.parse(at < 0 ? "" : out.stdout.slice(at)) as FioJson).jobs?.[0];
  } catch { /* reported below */ }
  const side = job.id === "randwrite" ? fio?.write : fio?.read;
  const iops = side?.iops ?? NaN, ios = side?.total_ios ?? 0;
  if (fio?.error !== 0 || !(iops > 0) || !(ios > 0)) {
    throw new BenchFailure(`${label}: fio's JSON is unparseable or says error`, out.stdout);
  }
  return { iops, ios, cpuSeconds: cpu, cpuUsPerRequest: cpu / ios * 1e6 };
}

/** A copy of the image on disk, not in dirty pages that writeback would flush during a job. */
async function freshCopy(from: string, to: string): Promise<void> {
  await Deno.copyFile(from, to);
  const file = await Deno.open(to, { read: true, write: true });
  try {
    await file.sync();
  } finally {
    file.close();
  }
}

/** `qemu-img check` of an image a server wrote or a tool made: errors fail, leaks are noted. */
async function check(image: string, whose: string, notes: string[], run: number): Promise<void> {
  const args = ["check", image];
  const out = await new Deno.Command("qemu-img", { args, stdout: "piped", stderr: "piped" })
    .output();
  const text = dec.decode(out.stdout) + dec.decode(out.stderr);
  if (out.code === 3) notes.push(`run ${run}: qemu-img check of ${whose}: leaks\n${tail(text, 4)}`);
  else if (out.code !== 0) {
    throw new BenchFailure(`qemu-img check of ${whose} failed (exit ${out.code})`, text);
  }
}

/** `qemu-img compare`: a failure naming `whose` when the images differ. */
async function compare(args: string[], whose: string): Promise<void> {
  const all = ["compare", ...args];
  const out = await new Deno.Command("qemu-img", { args: all, stdout: "piped", stderr: "piped" })
    .output();
  if (out.code !== 0) {
    const text = dec.decode(out.stdout) + dec.decode(out.stderr);
    const how = out.code === 1 ? "differs from the image" : `could not be compared (${out.code})`;
    throw new BenchFailure(`${whose} ${how}`, text);
  }
}

/** fio's three jobs on one server, on its own fresh copy of the image. */
async function serveRun(
  server: Server,
  run: number,
  base: string,
  dir: string,
  notes: string[],
): Promise<ServeRun> {
  const image = join(dir, `serve-${server}.qcow2`);
  await freshCopy(base, image);
  const s = await startServer(server, image, join(dir, `${server}.sock`), true);
  const jobs = {} as Record<JobId, JobResult>;
  try {
    for (const job of JOBS) jobs[job.id] = await fioJob(s, job);
  } finally {
    await stopServer(s, notes, run);
  }
  await check(image, `the image ${server} served to fio`, notes, run);
  await Deno.remove(image);
  return { server, run, jobs };
}

/** Deno's start-up, then both conversions from one qemu-nbd -r export, checked against the image. */
async function convertRun(run: number, base: string, dir: string, notes: string[]) {
  const results: CopyRun[] = [];
  const startup = await children.run("deno run -A mod.ts --version", Deno.execPath(), [
    ...["run", "-A", modTs, "--version"],
  ], 60_000);
  results.push({ what: "startup", side: "vstor", run, seconds: startup.seconds });
  const s = await startServer("qemu-nbd", base, join(dir, "convert.sock"), false);
  try {
    const sides = run % 2 === 1 ? ["vstor", "peer"] as const : ["peer", "vstor"] as const;
    for (const side of sides) {
      const out = join(dir, `convert-${side}.qcow2`);
      await Deno.remove(out).catch(() => {});
      const args = ["convert", "-f", "raw", "-O", "qcow2", uriOf(s.sock), out];
      const t = side === "vstor"
        ? await children.run(
          "vstor convert",
          Deno.execPath(),
          ["run", "-A", modTs, ...args],
          COPY_TIMEOUT_MS,
          { watch: watched(s) },
        )
        : await children.run("qemu-img convert", "qemu-img", args, COPY_TIMEOUT_MS, {
          watch: watched(s),
        });
      results.push({ what: "convert", side, run, seconds: t.seconds });
    }
  } finally {
    await stopServer(s, notes, run);
  }
  for (const side of ["vstor", "peer"] as const) {
    const whose = side === "vstor" ? "vstor convert's output" : "qemu-img convert's output";
    const out = join(dir, `convert-${side}.qcow2`);
    await compare(["-f", "qcow2", "-F", "qcow2", out, base], whose);
    await check(out, whose, notes, run);
    await Deno.remove(out);
  }
  return results;
}

/** nbdcopy from one server (read-only on the image itself), checked against the image. */
async function nbdcopyRun(
  server: Server,
  run: number,
  base: string,
  dir: string,
  notes: string[],
  multiConn: Partial<Record<Server, string>>,
): Promise<CopyRun> {
  const s = await startServer(server, base, join(dir, `copy-${server}.sock`), false);
  const out = join(dir, `nbdcopy-${server}.raw`);
  let t: ToolRun;
  try {
    if (multiConn[server] === undefined) {
      const can = await new Deno.Command("nbdinfo", {
        args: ["--can", "multi-conn", uriOf(s.sock)],
        stdout: "null",
        stderr: "null",
      }).output();
      multiConn[server] = can.code === 0 ? "yes" : can.code === 2 ? "no" : "unknown";
    }
    await Deno.remove(out).catch(() => {});
    t = await children.run(
      `nbdcopy from ${server}`,
      "nbdcopy",
      [uriOf(s.sock), out],
      COPY_TIMEOUT_MS,
      { watch: watched(s) },
    );
  } finally {
    await stopServer(s, notes, run);
  }
  await compare(["-f", "raw", "-F", "qcow2", out, base], `nbdcopy's copy from ${server}`);
  await Deno.remove(out);
  return { what: "nbdcopy", side: server === "vstor" ? "vstor" : "peer", run, seconds: t.seconds };
}

const fixed = (n: number, digits: number) => Number.isFinite(n) ? n.toFixed(digits) : "n/a";

function printTable(rows: string[][]): void {
  const widths = rows[0]!.map((_, col) => Math.max(...rows.map((r) => r[col]!.length)));
  for (const row of rows) {
    console.log(
      row.map((c, col) => col === 0 ? c.padEnd(widths[col]!) : c.padStart(widths[col]!)).join("  "),
    );
  }
}

function report(
  serve: ServeRun[],
  copies: CopyRun[],
  notes: string[],
  multiConn: Partial<Record<Server, string>>,
): void {
  const med = (server: Server, pick: (r: ServeRun) => number) =>
    median(serve.filter((r) => r.server === server).map(pick));
  const rows = [
    "fio nbd engine¹|vstor IOPS|qemu-nbd IOPS|vstor/qemu-nbd|bar ≥1.0|vstor CPU²|" +
    "qemu-nbd CPU²",
  ].map((h) => h.split("|"));
  for (const job of JOBS) {
    const ours = med("vstor", (r) => r.jobs[job.id].iops);
    const theirs = med("qemu-nbd", (r) => r.jobs[job.id].iops);
    const cpu = (s: Server) => fixed(med(s, (r) => r.jobs[job.id].cpuUsPerRequest), 1);
    const ratio = ours / theirs;
    const bar = ratio >= 1 ? "met" : "missed";
    rows.push([
      job.name,
      fmt(ours),
      fmt(theirs),
      fixed(ratio, 2),
      bar,
      cpu("vstor"),
      cpu("qemu-nbd"),
    ]);
  }
  console.log();
  printTable(rows);

  const time = (what: CopyRun["what"], side: CopyRun["side"]) =>
    median(copies.filter((c) => c.what === what && c.side === side).map((c) => c.seconds));
  const copyRows = [["copy, wall time", "vstor s", "qemu s", "qemu/vstor", "bar ≥1.0"]];
  for (
    const [what, name] of [
      ["convert", "convert nbd → qcow2³"],
      ["nbdcopy", "nbdcopy server → raw⁴"],
    ] as const
  ) {
    const ours = time(what, "vstor"), theirs = time(what, "peer");
    const ratio = theirs / ours;
    const bar = ratio >= 1 ? "met" : "missed";
    copyRows.push([name, fixed(ours, 3), fixed(theirs, 3), fixed(ratio, 2), bar]);
  }
  copyRows.push(["deno start-up⁵", fixed(time("startup", "vstor"), 3), "", "", ""]);
  console.log();
  printTable(copyRows);
  console.log(
    `\n¹ fio --ioengine=nbd --uri=nbd+unix:///?socket=SOCK --size=${imageMb}M ` +
      `--runtime=${seconds} --time_based, one job at a time, against 'vstor serve IMAGE --nbd ` +
      "unix:SOCK --writable -f qcow2' and 'qemu-nbd -t -f qcow2 -k SOCK IMAGE' (each its default " +
      "cache mode), each on its own fresh copy of the image; IOPS as fio reports them.\n" +
      "² CPU µs per request: user + sys time of the server's process (/proc/PID/stat, all " +
      "threads, 10 ms ticks) from just before fio starts to its exit, over the requests fio " +
      "completed in that job.\n" +
      "³ 'deno run -A mod.ts convert -f raw -O qcow2 URI OUT' against 'qemu-img convert' with the " +
      "same arguments, from one 'qemu-nbd -r -t -f qcow2' export of the image; wall time from " +
      "spawn to exit, vstor's including Deno's start-up; ratio qemu-img time / vstor time. Both " +
      "outputs equal the image (qemu-img compare).\n" +
      "⁴ 'nbdcopy URI OUT.raw' from 'vstor serve IMAGE --nbd unix:SOCK -f qcow2' and from " +
      "'qemu-nbd -r -t -f qcow2 -k SOCK IMAGE' (both read-only); ratio qemu-nbd time / vstor " +
      "time. nbdcopy opens up to 4 connections when the server advertises multi-conn: vstor " +
      `${multiConn.vstor ?? "unknown"}, qemu-nbd ${multiConn["qemu-nbd"] ?? "unknown"}. Both ` +
      "copies equal the image.\n" +
      "⁵ 'deno run -A mod.ts --version': the fixed start-up inside vstor convert's time " +
      "(mod.ts's whole module graph loaded, no work done).",
  );
  for (const n of notes) console.log(`note: ${n}`);
  if (values.json) {
    console.log(JSON.stringify({ runs, imageMb, seconds, multiConn, serve, copies }));
  }
}

async function prepare(dir: string): Promise<string> {
  const image = join(dir, "base.qcow2");
  const create = "create -q -f qcow2 -o preallocation=metadata".split(" ");
  await exec("qemu-img", [...create, image, `${imageMb}M`]);
  await exec("qemu-io", ["-f", "qcow2", "-c", `write -P 7 0 ${imageMb}M`, image]);
  return image;
}

/** First line of `cmd --version`, or "CMD ?" when it has none. */
const versionOf = (cmd: string) =>
  exec(cmd, ["--version"]).then(
    (v) => v.split("\n")[0]!.trim().replace(/^\/\S*\//, ""),
    () => `${cmd} ?`,
  );

const dir = await Deno.makeTempDir({ prefix: "vstor_nbd_cmp_" });
async function cleanup(): Promise<void> {
  await children.stopAll();
  await Deno.remove(dir, { recursive: true }).catch(() => {});
}
let interrupted = false;
for (const signal of ["SIGINT", "SIGTERM"] as const) {
  Deno.addSignalListener(signal, async () => {
    interrupted = true;
    console.error(`\ncompare_nbd: interrupted; stopping servers and tools, removing ${dir}`);
    await cleanup();
    Deno.exit(130);
  });
}

let code = 0;
try {
  const base = await prepare(dir);
  const kernel = (await Deno.readTextFile("/proc/sys/kernel/osrelease")).trim();
  const load = (await Deno.readTextFile("/proc/loadavg")).split(" ")[0];
  const versions = await Promise.all(["fio", "qemu-nbd", "qemu-img", "nbdcopy"].map(versionOf));
  console.log("vstor vs qemu-nbd and qemu-img over NBD (unix sockets): fio, convert, nbdcopy");
  console.log(
    `date ${new Date().toISOString()}, kernel ${kernel}, ${navigator.hardwareConcurrency} CPUs, ` +
      `load ${load} at start; ${imageMb} MiB qcow2 (preallocation=metadata, written full); ` +
      `--runs=${runs} --seconds=${seconds} --image-mb=${imageMb}; median of ${runs} run(s), ` +
      "vstor first on odd runs",
  );
  console.log(`Deno ${Deno.version.deno}, ${versions.join(", ")}`);
  const serve: ServeRun[] = [];
  const copies: CopyRun[] = [];
  const notes: string[] = [];
  const multiConn: Partial<Record<Server, string>> = {};
  for (let run = 1; run <= runs; run++) {
    const order: Server[] = run % 2 === 1 ? ["vstor", "qemu-nbd"] : ["qemu-nbd", "vstor"];
    for (const server of order) {
      console.error(`compare_nbd: run ${run}/${runs}, fio against ${server}…`);
      const r = await serveRun(server, run, base, dir, notes);
      const iops = JOBS.map((j) => fmt(r.jobs[j.id].iops)).join(", ");
      const cpu = JOBS.map((j) => fixed(r.jobs[j.id].cpuUsPerRequest, 1)).join(", ");
      console.error(`  IOPS ${iops}; CPU ${cpu} µs/request`);
      serve.push(r);
    }
    console.error(`compare_nbd: run ${run}/${runs}, convert…`);
    const converts = await convertRun(run, base, dir, notes);
    copies.push(...converts);
    console.error(
      `  ${converts.map((c) => `${c.what} ${c.side} ${c.seconds.toFixed(3)} s`).join(", ")}`,
    );
    for (const server of order) {
      console.error(`compare_nbd: run ${run}/${runs}, nbdcopy from ${server}…`);
      const c = await nbdcopyRun(server, run, base, dir, notes, multiConn);
      console.error(`  ${c.seconds.toFixed(3)} s`);
      copies.push(c);
    }
  }
  report(serve, copies, notes, multiConn);
} catch (e) {
  code = interrupted ? 130 : 1;
  if (interrupted) {
    // The signal listener said so; its cleanup made this run fail.
  } else if (e instanceof BenchFailure) {
    console.error(`compare_nbd: ${e.message}`);
    if (e.log.trim() !== "") console.error(e.log.replace(/^/gm, "  | "));
  } else {
    console.error(`compare_nbd: ${e instanceof Error ? e.stack ?? e.message : String(e)}`);
  }
} finally {
  await cleanup();
}
Deno.exit(code);
