/**
 * Issue #19's bars in one run, side by side: `vstor bench` against `qemu-img bench` and fio's rbd
 * engine on one Ceph RBD image, on a throwaway one-node cluster (tests/ceph/one_node.sh: one
 * monitor, one memstore OSD) that this script starts in a temporary directory and stops at the end.
 *
 *   deno run -A bench/compare_rbd.ts [--runs=1] [--count=100000] [--count-1m=6000]
 *     [--image-mb=512] [--quick] [--json]
 *
 * One image (`rbd create --size … --image-feature layering`), written full once with qemu-io so no
 * job reads holes. Three jobs, each run by the three tools in turn on that image:
 *
 * 1. 4 KiB reads at depth 32, --count requests;
 * 2. 4 KiB writes at depth 32, --count requests;
 * 3. 1 MiB sequential reads at depth 8, --count-1m requests.
 *
 * vstor: `deno run -A mod.ts bench -f raw -c N -d D -s BS [-S STEP] [-w --pattern=P]
 * rbd:rbd/IMG:conf=CONF`; qemu-img: `qemu-img bench` with the same arguments; fio:
 * `fio --ioengine=rbd --clientname=admin --pool=rbd --rbdname=IMG` (its rbd engine has no conf
 * option: librados reads CEPH_CONF, set for it) with --rw=randread/randwrite/read, the same block
 * size and depth, and --io_size = N requests. Neither bench has a random mode: for the 4 KiB jobs
 * both walk the image by a step of one RBD object plus 4 KiB (`-S 4198400`), which qemu-img wraps
 * modulo the image size, so consecutive requests land in different objects (and placement groups)
 * as random ones do, and no block comes twice before all have come once; fio's jobs are random.
 * IOPS: the benches' requests over their own "Run completed in" time (first submission to last
 * completion: Deno's start-up and the cluster connection are outside it, as qemu-img's are); fio's
 * from its JSON. Ratios vstor/fio against the bar 0.9 and vstor/qemu-img against the bar 1.0.
 *
 * Checks: after each of vstor's write jobs qemu-io reads back some of the blocks it wrote (its own
 * pattern byte); at the end `vstor compare` reads the whole image against qemu-img's copy of it.
 *
 * Every figure is the median over --runs; vstor goes first on odd runs, last on even ones. --quick
 * is a smoke run (10,000 and 600 requests, a 128 MiB image) unless the options say otherwise. A
 * measurement, not a test: exits 0 when a bar is missed, 1 when something fails (one line naming
 * it, then the tail of the log that says why), 2 on bad options, 130 when interrupted. Tools, the
 * cluster and the temporary directory go on every path, Ctrl-C included (and should this process
 * be killed outright, one_node.sh's watcher stops the cluster).
 *
 * @module
 */
import { parseArgs } from "node:util";
import { join } from "node:path";
import { BenchFailure, Children, fmt, median, tail } from "./compare_common.ts";

let parsed;
try {
  parsed = parseArgs({
    args: Deno.args,
    options: {
      runs: { type: "string", default: "1" },
      count: { type: "string" },
      "count-1m": { type: "string" },
      "image-mb": { type: "string" },
      quick: { type: "boolean", default: false },
      json: { type: "boolean", default: false },
    },
  });
} catch (e) {
  console.error(`compare_rbd: ${e instanceof Error ? e.message : String(e)}`);
  Deno.exit(2);
}
const { values } = parsed;
const quick = values.quick;
const runs = Number(values.runs);
const count4k = Number(values.count ?? (quick ? 10_000 : 100_000));
const count1m = Number(values["count-1m"] ?? (quick ? 600 : 6_000));
const imageMb = Number(values["image-mb"] ?? (quick ? 128 : 512));
const positive = (n: number) => Number.isSafeInteger(n) && n > 0;
if (![runs, count4k, count1m, imageMb].every(positive)) {
  console.error("compare_rbd: --runs, --count, --count-1m, --image-mb must be positive integers");
  Deno.exit(2);
}
/** The step of the 4 KiB jobs: one RBD object (order 22, the default) plus one request. */
const STEP = 4 * 1024 * 1024 + 4096;
if (imageMb < 8) {
  console.error("compare_rbd: --image-mb must be at least 8 (the 4 KiB jobs step 4 MiB + 4 KiB)");
  Deno.exit(2);
}
const imageBytes = imageMb * 1024 * 1024;
const modTs = new URL("../mod.ts", import.meta.url).pathname;
const root = new URL("..", import.meta.url).pathname;
const ONE_NODE = new URL("../tests/ceph/one_node.sh", import.meta.url).pathname;
const IMAGE = "bench";
/** Bytes written by each tool's write job: vstor's are checked after its job. */
const PATTERN = { vstor: 0x76, "qemu-img": 0x71, fill: 0x07 } as const;
const dec = new TextDecoder();

type Tool = "vstor" | "qemu-img" | "fio";
const TOOLS: readonly Tool[] = ["vstor", "qemu-img", "fio"];
interface Job {
  id: "randread" | "randwrite" | "read1m";
  name: string;
  count: number;
  bufferSize: number;
  /** Arguments of both benches, but -c, -f, the pattern and the image. */
  bench: string[];
  fio: string[];
  write: boolean;
}
const JOBS: readonly Job[] = [
  {
    id: "randread",
    name: "randread 4K depth 32²",
    count: count4k,
    bufferSize: 4096,
    bench: ["-d", "32", "-s", "4k", "-S", String(STEP)],
    fio: ["--rw=randread", "--bs=4k", "--iodepth=32"],
    write: false,
  },
  {
    id: "randwrite",
    name: "randwrite 4K depth 32²",
    count: count4k,
    bufferSize: 4096,
    bench: ["-w", "-d", "32", "-s", "4k", "-S", String(STEP)],
    fio: ["--rw=randwrite", "--bs=4k", "--iodepth=32"],
    write: true,
  },
  {
    id: "read1m",
    name: "read 1M depth 8",
    count: count1m,
    bufferSize: 1024 * 1024,
    bench: ["-d", "8", "-s", "1M"],
    fio: ["--rw=read", "--bs=1M", "--iodepth=8"],
    write: false,
  },
];
type JobId = Job["id"];

/** One tool's job in one run. */
interface JobRun {
  tool: Tool;
  job: JobId;
  run: number;
  iops: number;
  /** The tool's own time for the requests (the benches' "Run completed", fio's runtime). */
  seconds: number;
  /** Wall time from spawn to exit: start-up, connecting, closing included. */
  wallSeconds: number;
}

/** Children still running: the cleanup stops them on every path, Ctrl-C included. */
const children = new Children(root);

/** A request count's time limit: a minute, plus a millisecond per request (1 MiB: 10 ms). */
const limitMs = (job: Job) => 60_000 + job.count * (job.bufferSize > 4096 ? 10 : 1);

const rbdName = (conf: string) => `rbd:rbd/${IMAGE}:conf=${conf}`;

/** One bench job (vstor or qemu-img): IOPS from its "Run completed in" line. */
async function benchJob(
  tool: "vstor" | "qemu-img",
  job: Job,
  run: number,
  conf: string,
  notes: string[],
): Promise<JobRun> {
  const args = [
    ...["bench", "-f", "raw", "-c", String(job.count), ...job.bench],
    ...(job.write ? [`--pattern=${PATTERN[tool]}`] : []),
    rbdName(conf),
  ];
  const label = `${tool} bench (${job.id})`;
  const out = tool === "vstor"
    ? await children.run(label, Deno.execPath(), ["run", "-A", modTs, ...args], limitMs(job))
    : await children.run(label, "qemu-img", args, limitMs(job));
  const done = /^Run completed in ([\d.]+) seconds\.$/m.exec(out.stdout);
  const seconds = Number(done?.[1] ?? NaN);
  const sending = new RegExp(`^Sending ${job.count} ${job.write ? "write" : "read"} requests`, "m");
  if (!(seconds > 0) || !sending.test(out.stdout)) {
    throw new BenchFailure(`${label}: no "Sending"/"Run completed" lines`, out.stdout + out.stderr);
  }
  if (out.stderr.trim() !== "") {
    notes.push(`run ${run}, ${label} said on stderr: ${tail(out.stderr, 4)}`);
  }
  return { tool, job: job.id, run, iops: job.count / seconds, seconds, wallSeconds: out.seconds };
}

/** What we read of fio's JSON. */
type FioSide = { iops?: number; total_ios?: number; runtime?: number };
type FioJson = { jobs?: { error?: number; read?: FioSide; write?: FioSide }[] };

/** One fio job through its rbd engine: `job.count` requests. */
async function fioJob(job: Job, run: number, conf: string): Promise<JobRun> {
  const args = [
    ...["--name=j", "--ioengine=rbd", "--clientname=admin", "--pool=rbd", `--rbdname=${IMAGE}`],
    ...[...job.fio, `--io_size=${job.count * job.bufferSize}`, "--output-format=json"],
  ];
  const label = `fio (${job.id})`;
  const out = await children.run(label, "fio", args, limitMs(job), { env: { CEPH_CONF: conf } });
  const at = out.stdout.search(/^\{/m);
  let fio: NonNullable<FioJson["jobs"]>[number] | undefined;
  try {
    fio = (JSON.parse(at < 0 ? "" : out.stdout.slice(at)) as FioJson).jobs?.[0];
  } catch { /* reported below */ }
  const side = job.write ? fio?.write : fio?.read;
  const iops = side?.iops ?? NaN, ios = side?.total_ios ?? 0;
  if (fio?.error !== 0 || !(iops > 0) || ios !== job.count) {
    const why = ios !== job.count && iops > 0 ? ` (${ios} requests, not ${job.count})` : "";
    throw new BenchFailure(
      `${label}: fio's JSON is unparseable or says error${why}`,
      out.stdout + out.stderr,
    );
  }
  const seconds = (side?.runtime ?? NaN) / 1000;
  return { tool: "fio", job: job.id, run, iops, seconds, wallSeconds: out.seconds };
}

/** Offsets of vstor's write job that qemu-io reads back: the first 8 requests and the last. */
function writtenOffsets(job: Job): number[] {
  const ks = [...Array(Math.min(8, job.count)).keys(), job.count - 1];
  return [...new Set(ks)].map((k) => Number(BigInt(k) * BigInt(STEP) % BigInt(imageBytes)));
}

/** qemu-io reads back blocks vstor's write job wrote: a failure when one lacks vstor's byte. */
async function checkWrites(job: Job, conf: string): Promise<number> {
  const offsets = writtenOffsets(job);
  const hex = `0x${PATTERN.vstor.toString(16)}`;
  const cmds = offsets.flatMap((o) => ["-c", `read -P ${hex} ${o} ${job.bufferSize}`]);
  const out = await children.run(
    "qemu-io read-back",
    "qemu-io",
    [
      ...["-r", "-f", "raw", ...cmds, rbdName(conf)],
    ],
    60_000,
    { anyExit: true },
  );
  const text = out.stdout + out.stderr;
  if (out.code !== 0 || /verification failed|error|fail/i.test(text)) {
    throw new BenchFailure(
      `vstor bench -w wrote wrong data: qemu-io does not read its byte ${hex} back at ` +
        `offsets ${offsets.join(", ")} (exit ${out.code})`,
      text,
    );
  }
  return offsets.length;
}

/** `vstor compare` of the whole image against qemu-img's raw copy of it. */
async function checkReads(conf: string, dir: string): Promise<void> {
  const copy = join(dir, "copy.raw");
  const limit = 60_000 + imageMb * 200;
  await children.run("qemu-img convert (the reference copy)", "qemu-img", [
    ...["convert", "-f", "raw", "-O", "raw", rbdName(conf), copy],
  ], limit);
  const out = await children.run(
    "vstor compare",
    Deno.execPath(),
    [
      ...["run", "-A", modTs, "compare", "-f", "raw", "-F", "raw", rbdName(conf), copy],
    ],
    limit,
    { anyExit: true },
  );
  if (out.code !== 0) {
    const how = out.code === 1 ? "differs from" : `could not be compared (exit ${out.code}) with`;
    throw new BenchFailure(
      `vstor compare: the image as vstor reads it ${how} qemu-img's copy`,
      out.stdout + out.stderr,
    );
  }
  await Deno.remove(copy);
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

function report(results: JobRun[], notes: string[], checked: string[]): void {
  const med = (tool: Tool, job: JobId) =>
    median(results.filter((r) => r.tool === tool && r.job === job).map((r) => r.iops));
  const rows = [
    "IOPS¹|vstor|qemu-img|fio rbd|vstor/qemu-img|bar ≥1.0|vstor/fio|bar ≥0.9".split("|"),
  ];
  for (const job of JOBS) {
    const ours = med("vstor", job.id), qemu = med("qemu-img", job.id), fio = med("fio", job.id);
    const vsQemu = ours / qemu, vsFio = ours / fio;
    rows.push([
      job.name,
      fmt(ours),
      fmt(qemu),
      fmt(fio),
      fixed(vsQemu, 2),
      vsQemu >= 1 ? "met" : "missed",
      fixed(vsFio, 2),
      vsFio >= 0.9 ? "met" : "missed",
    ]);
  }
  console.log();
  printTable(rows);
  console.log(
    `\n¹ One ${imageMb} MiB image (layering only, 4 MiB objects, written full once), every tool ` +
      `on it in turn, librbd's defaults (rbd_cache on, as qemu-img's default cache=writeback ` +
      `also sets it). vstor: 'deno run -A mod.ts bench -f raw -c N ARGS rbd:rbd/${IMAGE}:` +
      `conf=CONF'; qemu-img: 'qemu-img bench' with the same arguments; IOPS = N over the time of ` +
      `their 'Run completed in' line (first submission to last completion; Deno's start-up and ` +
      "the cluster connection are outside it, as qemu-img's are). fio: '--ioengine=rbd " +
      `--clientname=admin --pool=rbd --rbdname=${IMAGE}' with CEPH_CONF=CONF (the engine has no ` +
      "conf option), the same block size and depth, --io_size = N requests; IOPS as fio reports " +
      `them. N = ${count4k} for the 4K jobs, ${count1m} for 1M.\n` +
      "² Neither bench has a random mode: vstor and qemu-img walk the image by -S " +
      `${STEP} (4 MiB + 4 KiB, wrapping modulo the image size), so consecutive requests land in ` +
      "different objects and placement groups, as random ones do, and no block comes twice " +
      "before every block has come once; fio's jobs are --rw=randread/randwrite. Writes: " +
      `--pattern=${PATTERN.vstor} (vstor), ${PATTERN["qemu-img"]} (qemu-img); fio's own buffers.`,
  );
  for (const c of checked) console.log(`checked: ${c}`);
  for (const n of notes) console.log(`note: ${n}`);
  if (values.json) {
    console.log(JSON.stringify({ runs, imageMb, count4k, count1m, step: STEP, results }));
  }
}

/** First line of `cmd ARGS`, or "CMD ?" when it fails. */
const versionOf = (cmd: string, args = ["--version"]) =>
  children.run(`${cmd} --version`, cmd, args, 30_000).then(
    (v) => (v.stdout + v.stderr).split("\n")[0]!.trim().replace(/^\/\S*\//, ""),
    () => `${cmd} ?`,
  );

// Under /tmp whatever TMPDIR says: the daemons' admin socket paths must stay under 108 bytes.
const dir = await Deno.makeTempDir({ dir: "/tmp", prefix: "vstor_rbd_cmp_" });
const cephDir = join(dir, "ceph");
let clusterTried = false;

/** `one_node.sh stop`: kills exactly the daemons it started, removes their directory. */
async function stopCluster(): Promise<string | undefined> {
  const out = await new Deno.Command("timeout", {
    args: ["-k", "5", "30", "bash", ONE_NODE, "stop", cephDir],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output().catch((e) => e as Error);
  if (out instanceof Error) return out.message;
  if (!out.success) return tail(dec.decode(out.stdout) + dec.decode(out.stderr), 8);
}

let cleaning: Promise<boolean> | undefined;
/** Stops tools and the cluster and removes the directory; false when the cluster did not stop. */
function cleanup(): Promise<boolean> {
  cleaning ??= (async () => {
    await children.stopAll();
    let ok = true;
    if (clusterTried) {
      const why = await stopCluster();
      if (why !== undefined) {
        console.error(`compare_rbd: stopping the cluster in ${cephDir} failed:\n${why}`);
        ok = false;
      }
    }
    if (ok) await Deno.remove(dir, { recursive: true }).catch(() => {});
    return ok;
  })();
  return cleaning;
}
let interrupted = false;
for (const signal of ["SIGINT", "SIGTERM"] as const) {
  Deno.addSignalListener(signal, async () => {
    interrupted = true;
    console.error(`\ncompare_rbd: interrupted; stopping tools and the cluster, removing ${dir}`);
    await cleanup();
    Deno.exit(130);
  });
}

/** The cluster, up: the path of its ceph.conf. */
async function startCluster(): Promise<string> {
  clusterTried = true;
  const out = await children.run(
    "one_node.sh start",
    "timeout",
    [
      ...["-k", "5", "120", "bash", ONE_NODE, "start", cephDir],
    ],
    130_000,
    { env: { VSTOR_CEPH_OWNER_PID: String(Deno.pid) } },
  );
  const conf = out.stdout.trim();
  if (conf !== join(cephDir, "ceph.conf")) {
    throw new BenchFailure("one_node.sh start printed no ceph.conf", out.stdout + out.stderr);
  }
  return conf;
}

let code = 0;
try {
  const started = performance.now();
  console.error(`compare_rbd: starting a one-node cluster in ${cephDir}…`);
  const conf = await startCluster();
  const limit = 60_000 + imageMb * 200;
  await children.run("rbd create", "rbd", [
    ...["-c", conf, "create", "--size", `${imageMb}M`, "--image-feature", "layering"],
    `rbd/${IMAGE}`,
  ], 60_000);
  console.error(`compare_rbd: writing the ${imageMb} MiB image full with qemu-io…`);
  const fill = [];
  for (let mb = 0; mb < imageMb; mb += 64) {
    const hex = `0x${PATTERN.fill.toString(16)}`;
    fill.push("-c", `write -P ${hex} ${mb}M ${Math.min(64, imageMb - mb)}M`);
  }
  await children.run("qemu-io (fill)", "qemu-io", ["-f", "raw", ...fill, rbdName(conf)], limit);

  const kernel = (await Deno.readTextFile("/proc/sys/kernel/osrelease")).trim();
  const load = (await Deno.readTextFile("/proc/loadavg")).split(" ")[0];
  const versions = await Promise.all([
    versionOf("fio"),
    versionOf("qemu-img"),
    versionOf("ceph"),
  ]);
  console.log("vstor bench vs qemu-img bench and fio's rbd engine on one Ceph RBD image");
  console.log(
    `date ${new Date().toISOString()}, kernel ${kernel}, ${navigator.hardwareConcurrency} CPUs, ` +
      `load ${load} at start; one-node cluster (tests/ceph/one_node.sh: 1 mon, 1 memstore OSD, ` +
      `cephx, pool rbd of 8 PGs, size 1); ${imageMb} MiB image; --runs=${runs} ` +
      `--count=${count4k} --count-1m=${count1m}${quick ? " (--quick)" : ""}; median of ${runs} ` +
      "run(s), vstor first on odd runs, last on even ones",
  );
  console.log(`Deno ${Deno.version.deno}, ${versions.join(", ")}`);

  const results: JobRun[] = [];
  const notes: string[] = [];
  let blocksChecked = 0;
  for (let run = 1; run <= runs; run++) {
    const order = run % 2 === 1 ? [...TOOLS] : [...TOOLS].reverse();
    for (const job of JOBS) {
      const line: string[] = [];
      for (const tool of order) {
        console.error(`compare_rbd: run ${run}/${runs}, ${job.id}, ${tool}…`);
        const r = tool === "fio"
          ? await fioJob(job, run, conf)
          : await benchJob(tool, job, run, conf, notes);
        results.push(r);
        line.push(`${tool} ${fmt(r.iops)}`);
        if (tool === "vstor" && job.write) blocksChecked += await checkWrites(job, conf);
      }
      console.error(`  IOPS ${line.join(", ")}`);
    }
  }
  console.error("compare_rbd: vstor compare of the whole image against qemu-img's copy…");
  await checkReads(conf, dir);
  const checked = [
    `qemu-io read vstor's byte back from ${blocksChecked} block(s) its write job(s) wrote`,
    `'vstor compare' of the whole image equals qemu-img's raw copy of it (read afterwards)`,
  ];
  report(results, notes, checked);
  console.log(`total ${((performance.now() - started) / 1000).toFixed(1)} s`);
} catch (e) {
  code = interrupted ? 130 : 1;
  if (interrupted) {
    // The signal listener said so; its cleanup made this run fail.
  } else if (e instanceof BenchFailure) {
    console.error(`compare_rbd: ${e.message}`);
    if (e.log.trim() !== "") console.error(e.log.replace(/^/gm, "  | "));
  } else {
    console.error(`compare_rbd: ${e instanceof Error ? e.stack ?? e.message : String(e)}`);
  }
} finally {
  if (!await cleanup() && code === 0) code = 1;
}
Deno.exit(code);
