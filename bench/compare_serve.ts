/**
 * `vstor serve` against qemu-storage-daemon under a real Linux guest: QEMU (TCG, 2 vCPUs, 512 MiB)
 * boots the guest of ../shared/guest/recipe.sh on a vhost-user-blk-pci disk served by one daemon,
 * then the other, with the same --blockdev and --export options, and fio in the guest runs 4 KiB
 * random reads and writes at depth 32 and 1 MiB sequential reads at depth 4 on /dev/vda.
 *
 *   deno run -A bench/compare_serve.ts [--runs=2] [--image-mb=128] [--seconds=5]
 *     [--options=cache.direct=on,aio=io_uring] [--queues=2] [--iothread=[poll-max-ns=N,…]] [--json]
 *
 * Per job: IOPS of each daemon (median over --runs; vstor first on odd runs, qsd first on even
 * ones), the ratio vstor/qsd against the bar 1.0, and the guest's virtio interrupts per request
 * (/proc/interrupts around each fio job). Per daemon: CPU µs per request, user + system time of
 * the daemon's process over the guest's run from /proc. For vstor also its own log line's kicks
 * and interrupts per request. --json adds every run's numbers. The qcow2 (preallocation=metadata)
 * is written full once with qemu-io, so no run reads holes that an earlier run filled. A
 * measurement, not a test: exits 0 when the bar is missed, 1 when something fails (one line
 * naming it, then the tail of the log that says why). Daemons, guest and temporary directory go
 * on every path, Ctrl-C included.
 *
 * @module
 */
import { parseArgs } from "node:util";
import { join } from "node:path";
import { BenchFailure, Children, cpuSeconds, fmt, median, sleep, tail } from "./compare_common.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    runs: { type: "string", default: "2" },
    "image-mb": { type: "string", default: "128" },
    seconds: { type: "string", default: "5" },
    options: { type: "string", default: "cache.direct=on,aio=io_uring" },
    queues: { type: "string", default: "2" },
    iothread: { type: "string" },
    json: { type: "boolean", default: false },
  },
});
const runs = Number(values.runs);
const imageMb = Number(values["image-mb"]);
const seconds = Number(values.seconds);
const queues = Number(values.queues);
const positive = (n: number) => Number.isSafeInteger(n) && n > 0;
if (![runs, imageMb, seconds, queues].every(positive)) {
  console.error("compare_serve: --runs, --image-mb, --seconds, --queues must be positive integers");
  Deno.exit(2);
}
const fileOptions = values.options === "" ? "" : `,${values.options}`;
/** --iothread[=KEYVAL]: both daemons serve the export from an iothread object with these options. */
const iothread = values.iothread === undefined
  ? undefined
  : values.iothread === ""
  ? ""
  : `,${values.iothread}`;
const modTs = new URL("../mod.ts", import.meta.url).pathname;
const root = new URL("..", import.meta.url).pathname;
const RECIPE = new URL("../../shared/guest/recipe.sh", import.meta.url).pathname;
const GUEST_DIR = "/tmp/vstor-guest";
const INITRD = "initramfs-fio.img";
const GUEST_ENV = { W: GUEST_DIR, ACCEL: "tcg", VHOST: "1", SMP: "2", MEM: "512", INITRD };
/** Boot and three fio jobs under TCG, with room: past this `timeout` kills QEMU. */
const GUEST_TIMEOUT_S = Math.max(120, 90 + 3 * seconds * 2);
const dec = new TextDecoder();

type Daemon = "vstor" | "qsd";
const JOBS = [
  { id: "randread", name: "randread 4K", fio: "--rw=randread --bs=4k --iodepth=32" },
  { id: "randwrite", name: "randwrite 4K", fio: "--rw=randwrite --bs=4k --iodepth=32" },
  { id: "read1m", name: "read 1M", fio: "--rw=read --bs=1M --iodepth=4" },
] as const;
type JobId = typeof JOBS[number]["id"];

/** One fio job seen by the guest: IOPS, requests done, virtio interrupts during the job. */
type JobResult = { iops: number; ios: number; irqs: number };
/** One daemon's run. `kicks`/`interrupts` per request come from vstor's log (NaN for qsd). */
interface RunResult {
  daemon: Daemon;
  run: number;
  jobs: Record<JobId, JobResult>;
  cpuSeconds: number;
  cpuUsPerRequest: number;
  daemonRequests: number;
  kicks: number;
  interrupts: number;
}

/** The guest's script (busybox sh): per job `IRQ <job> <delta>` and `FIO <job> <one-line JSON>`. */
const GUEST_SCRIPT = `
echo
i=0; while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
[ -b /dev/vda ] || { echo "NO /dev/vda"; exit 1; }
irqs() { awk 'NR==1{n=NF} /virtio/{for(i=2;i<=n+1;i++)s+=$i} END{print s+0}' /proc/interrupts; }
F="--filename=/dev/vda --direct=1 --ioengine=libaio --size=${imageMb}M --output-format=json"
F="$F --runtime=${seconds} --time_based"
job() {
  n=$1; shift; a=$(irqs); out=$(fio --name=$n $F "$@" | tr -d '\\n'); b=$(irqs)
  echo "IRQ $n $((b-a))"; echo "FIO $n $out"
}
${JOBS.map((j) => `job ${j.id} ${j.fio}`).join("\n")}
`;

/** Children still running: the cleanup stops them on every path, Ctrl-C included. */
const children = new Children(root);

/** Read stdout and stderr of a child as they come (a full pipe would stall it). */
function capture(child: Deno.ChildProcess): { text: () => string; done: Promise<unknown> } {
  const parts: string[] = [];
  const drain = async (stream: ReadableStream<Uint8Array>) => {
    for await (const chunk of stream.pipeThrough(new TextDecoderStream())) parts.push(chunk);
  };
  const done = Promise.allSettled([drain(child.stdout), drain(child.stderr)]);
  return { text: () => parts.join(""), done };
}

async function exec(cmd: string, args: string[], env: Record<string, string> = {}): Promise<void> {
  const out = await new Deno.Command(cmd, { args, env, stdout: "piped", stderr: "piped" }).output();
  if (!out.success) {
    const log = dec.decode(out.stdout) + dec.decode(out.stderr);
    throw new BenchFailure(`${cmd} ${args.join(" ")} failed (exit ${out.code})`, log);
  }
}

/** A daemon listening on its socket, its pid (from its pid file: the process itself) and log. */
interface Running {
  daemon: Daemon;
  child: Deno.ChildProcess;
  pid: number;
  log: () => string;
}

/** The same options for both daemons (qemu-storage-daemon's syntax). */
const daemonArgs = (image: string, sock: string, pidfile: string) => [
  ...["--blockdev", `driver=file,node-name=f,filename=${image}${fileOptions}`],
  ...["--blockdev", "driver=qcow2,node-name=n,file=f"],
  ...(iothread === undefined ? [] : ["--object", `iothread,id=t0${iothread}`]),
  "--export",
  `type=vhost-user-blk,id=e0,node-name=n,addr.type=unix,addr.path=${sock},writable=on,` +
  `num-queues=${queues}${iothread === undefined ? "" : ",iothread=t0"}`,
  ...["--pidfile", pidfile],
];

async function startDaemon(daemon: Daemon, image: string, dir: string): Promise<Running> {
  const sock = join(dir, `${daemon}.sock`), pidfile = join(dir, `${daemon}.pid`);
  const args = daemonArgs(image, sock, pidfile);
  const child = daemon === "vstor"
    ? children.spawn(Deno.execPath(), ["run", "-A", modTs, "serve", ...args])
    : children.spawn("qemu-storage-daemon", args);
  const { text } = capture(child);
  let exit: number | null = null;
  child.status.then((s) => exit = s.code);
  for (const deadline = Date.now() + 30_000; Date.now() < deadline; await sleep(50)) {
    if (exit !== null) {
      throw new BenchFailure(`${daemon} exited (${exit}) before listening`, text());
    }
    const pid = Number(await Deno.readTextFile(pidfile).catch(() => ""));
    const listening = await Deno.stat(sock).then((s) => s.isSocket, () => false);
    if (listening && pid > 0) return { daemon, child, pid, log: text };
  }
  throw new BenchFailure(`${daemon} did not listen on ${sock} within 30 s`, text());
}

/** What we read of fio's JSON. */
type FioSide = { iops?: number; total_ios?: number };
type FioJson = { jobs?: { read?: FioSide; write?: FioSide }[] };

/** The three jobs from the guest's console, or a failure naming the job whose output is missing. */
function parseGuest(serial: string): Record<JobId, JobResult> {
  const jobs = {} as Record<JobId, JobResult>;
  for (const job of JOBS) {
    const fio = new RegExp(`FIO ${job.id} (.*)$`, "m").exec(serial)?.[1] ?? "";
    const irq = new RegExp(`IRQ ${job.id} (\\d+)`).exec(serial)?.[1];
    const rw = job.id === "randwrite" ? "write" : "read";
    let side: FioSide | undefined;
    try {
      side = (JSON.parse(fio.slice(fio.indexOf("{"))) as FioJson).jobs?.[0]?.[rw];
    } catch { /* reported below */ }
    const iops = side?.iops ?? NaN, ios = side?.total_ios ?? 0;
    if (!(iops > 0) || !(ios > 0) || irq === undefined) {
      throw new BenchFailure(`fio output of job ${job.id} in the guest is unparseable`, serial);
    }
    jobs[job.id] = { iops, ios, irqs: Number(irq) };
  }
  return jobs;
}

/** Boot the guest on a running daemon and wait: its console, or a failure naming what broke. */
async function guestRun(d: Running, sock: string, script: string): Promise<string> {
  const boot = [String(GUEST_TIMEOUT_S), "bash", RECIPE, "boot", script];
  const qemu = ["-chardev", `socket,id=c0,path=${sock}`, "-device"];
  const device = `vhost-user-blk-pci,chardev=c0,num-queues=${queues}`;
  const child = children.spawn("timeout", [...boot, ...qemu, device], GUEST_ENV);
  const output = capture(child);
  const first = await Promise.race([
    child.status.then((s) => ({ who: "guest", code: s.code })),
    d.child.status.then((s) => ({ who: "daemon", code: s.code })),
  ]);
  if (first.who === "daemon") {
    child.kill("SIGTERM");
    await child.status;
    throw new BenchFailure(`${d.daemon} exited (${first.code}) during the guest's run`);
  }
  await output.done;
  const serial = output.text();
  if (first.code === 124) {
    throw new BenchFailure(`the guest on ${d.daemon} timed out after ${GUEST_TIMEOUT_S} s`, serial);
  }
  if (!/GUEST-EXIT=0/.test(serial)) {
    throw new BenchFailure(`the guest on ${d.daemon} failed (QEMU exit ${first.code})`, serial);
  }
  return serial;
}

const DROPPED =
  /front-end dropped: .*\((\d+) requests, ([\d.]+) kicks and ([\d.]+) interrupts per request\)/g;

/** vstor's line for the disconnect, once it is logged (QEMU has exited; give it 10 s). */
async function droppedLine(d: Running): Promise<RegExpExecArray | undefined> {
  for (const deadline = Date.now() + 10_000; Date.now() < deadline; await sleep(100)) {
    const last = [...d.log().matchAll(DROPPED)].at(-1);
    if (last) return last;
  }
}

/** SIGTERM, then the exit; a daemon that does not stop in 20 s is killed and reported. */
async function stopDaemon(d: Running, notes: string[]): Promise<void> {
  d.child.kill("SIGTERM");
  const exit = d.child.status.then((s) => s.code);
  const code = await Promise.race([exit, sleep(20_000).then(() => null)]);
  if (code === null) {
    d.child.kill("SIGKILL");
    await d.child.status;
    notes.push(`${d.daemon} did not stop within 20 s of SIGTERM; killed`);
  } else if (code !== 0) {
    notes.push(`${d.daemon} exited ${code} after SIGTERM:\n${tail(d.log())}`);
  }
}

async function oneRun(daemon: Daemon, run: number, image: string, dir: string, notes: string[]) {
  const script = join(dir, "guest.sh");
  const d = await startDaemon(daemon, image, dir);
  try {
    const before = await cpuSeconds(d.pid);
    const serial = await guestRun(d, join(dir, `${daemon}.sock`), script);
    const cpu = await cpuSeconds(d.pid) - before;
    const jobs = parseGuest(serial);
    const requests = JOBS.reduce((sum, j) => sum + jobs[j.id].ios, 0);
    const line = daemon === "vstor" ? await droppedLine(d) : undefined;
    if (daemon === "vstor" && line === undefined) {
      notes.push(`run ${run}: vstor logged no 'front-end dropped' line:\n${tail(d.log())}`);
    }
    await stopDaemon(d, notes);
    for (const l of d.log().split("\n").filter((l) => /error|fail|warn|panic/i.test(l))) {
      notes.push(`run ${run}, ${daemon} log: ${l.trim()}`);
    }
    return {
      daemon,
      run,
      jobs,
      cpuSeconds: cpu,
      cpuUsPerRequest: cpu / requests * 1e6,
      daemonRequests: Number(line?.[1] ?? NaN),
      kicks: Number(line?.[2] ?? NaN),
      interrupts: Number(line?.[3] ?? NaN),
    } satisfies RunResult;
  } catch (e) {
    if (children.live.has(d.child)) d.child.kill("SIGKILL");
    if (!(e instanceof BenchFailure)) throw e;
    // The guest's console says what the guest saw; the daemon's log ends the story.
    const log = e.log === "" ? d.log() : `${e.log}\n--- ${daemon}'s log ---\n${tail(d.log(), 8)}`;
    throw new BenchFailure(e.message, log, 30);
  }
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

function report(results: RunResult[], notes: string[]): void {
  const of = (daemon: Daemon) => results.filter((r) => r.daemon === daemon);
  const med = (daemon: Daemon, pick: (r: RunResult) => number) => median(of(daemon).map(pick));
  const rows = ["job|vstor IOPS|qsd IOPS|vstor/qsd|bar ≥1.0|vstor irq/req|qsd irq/req"
    .split("|")];
  for (const job of JOBS) {
    const ours = med("vstor", (r) => r.jobs[job.id].iops);
    const theirs = med("qsd", (r) => r.jobs[job.id].iops);
    const irq = (d: Daemon) => fixed(med(d, (r) => r.jobs[job.id].irqs / r.jobs[job.id].ios), 3);
    const ratio = ours / theirs;
    const bar = ratio >= 1 ? "met" : "missed";
    rows.push([job.name, fmt(ours), fmt(theirs), fixed(ratio, 2), bar, irq("vstor"), irq("qsd")]);
  }
  console.log();
  printTable(rows);
  console.log();
  const cpu = (d: Daemon) => fixed(med(d, (r) => r.cpuUsPerRequest), 1);
  const perRequest = (k: "kicks" | "interrupts") => fixed(med("vstor", (r) => r[k]), 3);
  printTable([
    ["daemon", "CPU µs/request¹", "kicks/request²", "interrupts/request²"],
    ["vstor", cpu("vstor"), perRequest("kicks"), perRequest("interrupts")],
    ["qsd", cpu("qsd"), "n/a", "n/a"],
  ]);
  console.log(
    "\n¹ user + sys time of the daemon's process (/proc/PID/stat, all threads) from just before " +
      "the guest boots to QEMU's exit, over the requests fio completed in the three jobs.\n" +
      "² vstor's own log line at the disconnect (boot-time requests included).",
  );
  for (const n of notes) console.log(`note: ${n}`);
  const { options } = values;
  if (values.json) {
    console.log(JSON.stringify({ runs, imageMb, seconds, queues, options, results }));
  }
}

async function prepare(dir: string): Promise<string> {
  try {
    await Deno.stat(join(GUEST_DIR, INITRD));
  } catch {
    console.error(`compare_serve: building the guest in ${GUEST_DIR} (recipe.sh build)…`);
    await exec("bash", [RECIPE, "build"], GUEST_ENV);
  }
  const image = join(dir, "disk.qcow2");
  const create = "create -q -f qcow2 -o preallocation=metadata".split(" ");
  await exec("qemu-img", [...create, image, `${imageMb}M`]);
  await exec("qemu-io", ["-f", "qcow2", "-c", `write -P 7 0 ${imageMb}M`, image]);
  await Deno.writeTextFile(join(dir, "guest.sh"), GUEST_SCRIPT);
  return image;
}

const dir = await Deno.makeTempDir({ prefix: "vstor_serve_cmp_" });
async function cleanup(): Promise<void> {
  await children.stopAll();
  await Deno.remove(dir, { recursive: true }).catch(() => {});
}
let interrupted = false;
for (const signal of ["SIGINT", "SIGTERM"] as const) {
  Deno.addSignalListener(signal, async () => {
    interrupted = true;
    console.error(`\ncompare_serve: interrupted; stopping daemons and guest, removing ${dir}`);
    await cleanup();
    Deno.exit(130);
  });
}

let code = 0;
try {
  const image = await prepare(dir);
  const kernel = (await Deno.readTextFile("/proc/sys/kernel/osrelease")).trim();
  console.log("vstor serve vs qemu-storage-daemon: Linux guest under QEMU TCG, vhost-user-blk");
  console.log(
    `date ${new Date().toISOString()}, host kernel ${kernel}; ${imageMb} MiB preallocated qcow2, ` +
      `file options '${values.options}', ${queues} queue(s); fio ${seconds} s per job; ` +
      `median of ${runs} run(s)`,
  );
  const results: RunResult[] = [];
  const notes: string[] = [];
  for (let run = 1; run <= runs; run++) {
    const order: Daemon[] = run % 2 === 1 ? ["vstor", "qsd"] : ["qsd", "vstor"];
    for (const daemon of order) {
      console.error(`compare_serve: run ${run}/${runs}, ${daemon}…`);
      const r = await oneRun(daemon, run, image, dir, notes);
      const iops = JOBS.map((j) => fmt(r.jobs[j.id].iops)).join(", ");
      console.error(`  IOPS ${iops}; CPU ${r.cpuUsPerRequest.toFixed(1)} µs/request`);
      results.push(r);
    }
  }
  report(results, notes);
} catch (e) {
  code = interrupted ? 130 : 1;
  if (interrupted) {
    // The signal listener said so; its cleanup made this run fail.
  } else if (e instanceof BenchFailure) {
    console.error(`compare_serve: ${e.message}`);
    if (e.log.trim() !== "") console.error(e.log.replace(/^/gm, "  | "));
  } else {
    console.error(`compare_serve: ${e instanceof Error ? e.stack ?? e.message : String(e)}`);
  }
} finally {
  await cleanup();
}
Deno.exit(code);
