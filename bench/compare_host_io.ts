/**
 * The host-I/O ratios of issue #16 in one table: vstor against fio and `qemu-img bench` on the
 * same files (4 KiB requests, O_DIRECT where the case says so), each pair run one after the other
 * (peer first), with the issue's bar for each ratio and the CPU time per request of both.
 *
 *   deno run -A bench/compare_host_io.ts [--seconds=3] [--count=50000] [--size-mib=256]
 *     [--dir=/var/tmp] [--runs=1]
 *
 * --dir must be a disk file system that takes O_DIRECT (not tmpfs); the files live in a temporary
 * directory under it, removed at the end (also on Ctrl-C). A fresh qcow2 case makes an image of
 * count × 64 KiB (3.2 GB at the default count), one tool at a time. Exits 0 when a bar is missed:
 * this is a measurement, not a test. With --runs=N each pair runs N times, alternating, and each
 * side shows its median run.
 *
 * @module
 */
import { parseArgs } from "node:util";
import { join } from "node:path";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    seconds: { type: "string", default: "3" },
    count: { type: "string", default: "50000" },
    "size-mib": { type: "string", default: "256" },
    dir: { type: "string", default: "/var/tmp" },
    runs: { type: "string", default: "1" },
  },
});
const seconds = Number(values.seconds);
const count = Number(values.count);
const sizeMib = Number(values["size-mib"]);
const runs = Number(values.runs);
if (
  !(seconds > 0) || !Number.isSafeInteger(count) || count < 1 || !Number.isSafeInteger(sizeMib) ||
  sizeMib < 1 || !Number.isSafeInteger(runs) || runs < 1
) {
  console.error(
    "compare_host_io: --seconds must be > 0; --count, --size-mib, --runs positive whole numbers",
  );
  Deno.exit(2);
}
const MIB = 1 << 20;
const size = sizeMib * MIB;
const modTs = new URL("../mod.ts", import.meta.url).pathname;
const deno = Deno.execPath();
const dec = new TextDecoder();

/** What one side of a pair did. `cpu` is user + system seconds of the whole process. */
interface Result {
  iops: number;
  ios: number;
  cpu: number;
}

/** The run of median IOPS (the lower middle one of an even count), CPU time and all. */
const median = (rs: Result[]) => [...rs].sort((a, b) => a.iops - b.iops)[(rs.length - 1) >> 1]!;

/** Every command run, in order, as a shell would take it. */
const commands: string[] = [];
const quote = (a: string[]) =>
  a.map((s) => /^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replaceAll("'", `'\\''`)}'`).join(" ");

async function exec(args: string[]): Promise<string> {
  commands.push(quote(args));
  const out = await new Deno.Command(args[0]!, {
    args: args.slice(1),
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!out.success) {
    throw new Error(`${quote(args)} failed (${out.code}): ${dec.decode(out.stderr).trim()}`);
  }
  return dec.decode(out.stdout);
}

/** Run a measured command under bash's `time`: its stdout and the user + sys seconds it used. */
async function timed(args: string[]): Promise<{ stdout: string; cpu: number }> {
  commands.push(quote(args));
  const out = await new Deno.Command("bash", {
    args: ["-c", 'TIMEFORMAT="%U %S"; time "$@"', "bash", ...args],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const stderr = dec.decode(out.stderr);
  if (!out.success) throw new Error(`${quote(args)} failed (${out.code}): ${stderr.trim()}`);
  const m = /(\d+\.\d+) (\d+\.\d+)\s*$/.exec(stderr);
  return { stdout: dec.decode(out.stdout), cpu: m ? Number(m[1]) + Number(m[2]) : NaN };
}

const installed = async (tool: string) => {
  try {
    return (await new Deno.Command(tool, { args: ["--version"], stdout: "null" }).output()).success;
  } catch { /* not on PATH */ }
};

/** fio on FILE for `seconds`: IOPS and requests from its JSON. */
async function fio(
  file: string,
  rw: "randread" | "randwrite",
  engine: string,
  depth: number,
  extra: string[],
): Promise<Result> {
  const { stdout, cpu } = await timed([
    "fio",
    "--name=peer",
    `--filename=${file}`,
    `--ioengine=${engine}`,
    ...extra,
    `--rw=${rw}`,
    "--bs=4k",
    `--iodepth=${depth}`,
    "--time_based",
    `--runtime=${seconds}`,
    "--output-format=json",
  ]);
  const job = JSON.parse(stdout.slice(stdout.indexOf("{"))).jobs[0];
  const side = rw === "randwrite" ? job.write : job.read;
  return { iops: side.iops, ios: side.total_ios, cpu };
}

/** `qemu-img bench` or `vstor bench` (its clone): IOPS = count / "Run completed in X seconds.". */
async function bench(tool: "qemu-img" | "vstor", args: string[]): Promise<Result> {
  const cmd = tool === "vstor" ? [deno, "run", "-A", modTs, "bench"] : ["qemu-img", "bench"];
  const { stdout, cpu } = await timed([...cmd, "-c", String(count), ...args]);
  const m = /^Run completed in (\d+(?:\.\d+)?) seconds\.$/m.exec(stdout);
  if (m === null) throw new Error(`${tool} bench printed no 'Run completed' line:\n${stdout}`);
  return { iops: count / Number(m[1]), ios: count, cpu };
}

/** The simulated guest: 4 KiB random reads at depth 32 through virtio-blk, fio's JSON out. */
async function guest(file: string, driveOpts: string): Promise<Result> {
  const { stdout, cpu } = await timed([
    ...[deno, "run", "-A", modTs, "run", "-q"],
    ...["--drive", `file=${file},format=raw,id=d0${driveOpts}`, "--device", "virtio-blk,drive=d0"],
    ...["--name=r", "--rw=randread", "--bs=4k", "--iodepth=32", `--runtime=${seconds}`],
    ...["--time_based", "--output-format=json"],
  ]);
  const read = JSON.parse(stdout.slice(stdout.indexOf("{"))).jobs[0].read;
  return { iops: read.iops, ios: read.total_ios, cpu };
}

/** Read the whole file through the page cache, so the cached cases start warm. */
async function warm(file: string): Promise<void> {
  using f = await Deno.open(file, { read: true });
  const buf = new Uint8Array(MIB);
  while ((await f.read(buf)) !== null) { /* reading is the point */ }
}

/** A new qcow2 image with room for `count` requests 64 KiB apart, each one allocating a cluster. */
async function freshQcow2(file: string): Promise<void> {
  await Deno.remove(file).catch(() => {});
  await exec(["qemu-img", "create", "-q", "-f", "qcow2", file, String(count * 65536)]);
}

/** One row: a peer run and a vstor run, and the bar the ratio vstor/peer should reach. */
interface Case {
  name: string;
  peer: string;
  needs: string[];
  bar: number;
  peerRun: () => Promise<Result>;
  vstorRun: () => Promise<Result>;
  after?: () => Promise<void>;
}

const fsType = dec.decode(
  (await new Deno.Command("stat", { args: ["-f", "-c", "%T", values.dir], stdout: "piped" })
    .output()).stdout,
).trim();
if (fsType === "tmpfs" || fsType === "ramfs" || fsType === "") {
  console.error(
    `compare_host_io: ${values.dir} is ${fsType || "not there"}: need O_DIRECT, use --dir`,
  );
  Deno.exit(2);
}
const have = new Map<string, boolean | undefined>();
for (const tool of ["fio", "qemu-img", "qemu-io"]) have.set(tool, await installed(tool));
const dir = await Deno.makeTempDir({ dir: values.dir, prefix: "vstor_host_io_" });
const cleanup = () => {
  try {
    Deno.removeSync(dir, { recursive: true });
  } catch { /* already gone */ }
};
for (const signal of ["SIGINT", "SIGTERM"] as const) {
  Deno.addSignalListener(signal, () => {
    cleanup();
    console.error(`\ncompare_host_io: interrupted, removed ${dir}`);
    Deno.exit(130);
  });
}

const raw = join(dir, "raw.img");
const pre = join(dir, "prealloc.qcow2");
const fresh = join(dir, "fresh.qcow2");
const direct = ["-t", "none", "-i", "io_uring"];
const d32raw = ["-f", "raw", ...direct, "-d", "32", "-S", "8192"];
const d1raw = ["-f", "raw", ...direct, "-d", "1", "-S", "8192"];
const d32pre = ["-f", "qcow2", ...direct, "-d", "32", "-S", "8192"];
const d32fresh = ["-f", "qcow2", ...direct, "-d", "32", "-S", "65536", "-w"];

const CASES: Case[] = [
  {
    name: "1 raw O_DIRECT d32 read",
    peer: "fio io_uring",
    needs: ["fio"],
    bar: 0.9,
    peerRun: () => fio(raw, "randread", "io_uring", 32, ["--direct=1"]),
    vstorRun: () => bench("vstor", [...d32raw, raw]),
  },
  {
    name: "2 raw O_DIRECT d32 read",
    peer: "qemu-img bench",
    needs: ["qemu-img"],
    bar: 1.0,
    peerRun: () => bench("qemu-img", [...d32raw, raw]),
    vstorRun: () => bench("vstor", [...d32raw, raw]),
  },
  {
    name: "2 raw O_DIRECT d32 write",
    peer: "qemu-img bench",
    needs: ["qemu-img"],
    bar: 1.0,
    peerRun: () => bench("qemu-img", [...d32raw, "-w", raw]),
    vstorRun: () => bench("vstor", [...d32raw, "-w", raw]),
  },
  {
    name: "3 raw O_DIRECT d1 read",
    peer: "fio psync",
    needs: ["fio"],
    bar: 0.9,
    peerRun: () => fio(raw, "randread", "psync", 1, ["--direct=1"]),
    vstorRun: () => bench("vstor", [...d1raw, raw]),
  },
  {
    name: "3 raw O_DIRECT d1 write",
    peer: "fio psync",
    needs: ["fio"],
    bar: 0.9,
    peerRun: () => fio(raw, "randwrite", "psync", 1, ["--direct=1"]),
    vstorRun: () => bench("vstor", [...d1raw, "-w", raw]),
  },
  {
    name: "4 qcow2 prealloc d32 read",
    peer: "qemu-img bench",
    needs: ["qemu-img", "qemu-io"],
    bar: 1.2,
    peerRun: () => bench("qemu-img", [...d32pre, pre]),
    vstorRun: () => bench("vstor", [...d32pre, pre]),
  },
  {
    name: "4 qcow2 prealloc d32 write",
    peer: "qemu-img bench",
    needs: ["qemu-img", "qemu-io"],
    bar: 1.2,
    peerRun: () => bench("qemu-img", [...d32pre, "-w", pre]),
    vstorRun: () => bench("vstor", [...d32pre, "-w", pre]),
  },
  {
    name: "4 qcow2 fresh d32 alloc write",
    peer: "qemu-img bench",
    needs: ["qemu-img"],
    bar: 1.2,
    peerRun: async () => (await freshQcow2(fresh), await bench("qemu-img", [...d32fresh, fresh])),
    vstorRun: async () => (await freshQcow2(fresh), await bench("vstor", [...d32fresh, fresh])),
    after: () => Deno.remove(fresh).catch(() => {}),
  },
  {
    name: "5 guest virtio-blk O_DIRECT d32",
    peer: "fio io_uring",
    needs: ["fio"],
    bar: 0.8,
    peerRun: () => fio(raw, "randread", "io_uring", 32, ["--direct=1"]),
    vstorRun: () => guest(raw, ",cache=none,aio=io_uring"),
  },
  {
    name: "6 guest virtio-blk page cache d32",
    peer: "fio psync d1 cached",
    needs: ["fio"],
    bar: 0.4,
    peerRun:
      async () => (await warm(raw), await fio(raw, "randread", "psync", 1, ["--invalidate=0"])),
    vstorRun: async () => (await warm(raw), await guest(raw, "")),
  },
];

const notes: string[] = [];
const kernel = (await exec(["uname", "-r"])).trim();
commands.length = 0;

try {
  {
    commands.push(`# ${raw}: ${sizeMib} MiB of 0x07, written and fsynced by this script`);
    using f = await Deno.open(raw, { create: true, write: true, truncate: true });
    const chunk = new Uint8Array(MIB).fill(7);
    for (let at = 0; at < size; at += MIB) await f.write(chunk);
    await f.sync();
  }
  if (have.get("qemu-img") && have.get("qemu-io")) {
    const create = "create -q -f qcow2 -o preallocation=metadata".split(" ");
    await exec(["qemu-img", ...create, pre, `${sizeMib}M`]);
    await exec(["qemu-io", "-f", "qcow2", "-c", `write -P 7 0 ${sizeMib}M`, pre]);
  }
  // What starting vstor costs alone: the module graph loads as for a bench, then help and exit.
  const startup = (await timed([deno, "run", "-A", modTs, "bench", "--help"]).catch(() => ({
    cpu: NaN,
  }))).cpu;

  console.log(`vstor host I/O vs peers (issue #16), 4 KiB requests`);
  console.log(`date ${new Date().toISOString()}, kernel ${kernel}, ${values.dir}: ${fsType}`);
  console.log(
    `raw file and preallocated qcow2 ${sizeMib} MiB; fio and guest runs ${seconds} s time-based; ` +
      `bench runs ${count} requests (IOPS = count / "Run completed in" seconds); ` +
      `median of ${runs} run(s) per side`,
  );
  const fmt = (n: number) => Number.isFinite(n) ? Math.round(n).toLocaleString("en-US") : "n/a";
  const us = (r: Result) =>
    Number.isFinite(r.cpu) && r.ios > 0 ? (r.cpu / r.ios * 1e6).toFixed(1) : "n/a";
  const rows: string[][] = [[
    "case",
    "peer",
    "peer IOPS",
    "vstor IOPS",
    "vstor/peer",
    "bar",
    "peer CPU µs/IO¹",
    "vstor CPU µs/IO¹",
  ]];
  for (const c of CASES) {
    const missing = c.needs.filter((t) => !have.get(t));
    if (missing.length > 0) {
      notes.push(`skipped "${c.name}": ${missing.join(", ")} not installed`);
      continue;
    }
    console.error(`compare_host_io: ${c.name}, ${c.peer} then vstor…`);
    try {
      const peerRuns: Result[] = [];
      const vstorRuns: Result[] = [];
      let mark = 0; // the commands section shows the first run of a pair only
      for (let i = 0; i < runs; i++, mark ||= commands.length) {
        peerRuns.push(await c.peerRun());
        vstorRuns.push(await c.vstorRun());
      }
      commands.length = mark;
      const each = (rs: Result[]) => rs.map((r) => fmt(r.iops)).join(", ");
      console.error(`  IOPS per run: ${c.peer} ${each(peerRuns)}; vstor ${each(vstorRuns)}`);
      const theirs = median(peerRuns);
      const ours = median(vstorRuns);
      const ratio = ours.iops / theirs.iops;
      rows.push([
        c.name,
        c.peer,
        fmt(theirs.iops),
        fmt(ours.iops),
        ratio.toFixed(2),
        `≥${c.bar.toFixed(1)} ${ratio >= c.bar ? "✓" : "✗"}`,
        us(theirs),
        us(ours),
      ]);
    } catch (e) {
      notes.push(`failed "${c.name}": ${e instanceof Error ? e.message : String(e)}`);
      rows.push([c.name, c.peer, "failed", "failed", "n/a", `≥${c.bar.toFixed(1)} ✗`, "", ""]);
    } finally {
      await c.after?.();
    }
  }

  console.log();
  const widths = rows[0]!.map((_, col) => Math.max(...rows.map((r) => r[col]!.length)));
  for (const row of rows) {
    console.log(
      row.map((cell, col) => col < 2 ? cell.padEnd(widths[col]!) : cell.padStart(widths[col]!))
        .join("  "),
    );
  }
  console.log(
    `\n¹ user + sys CPU seconds of the whole process (bash's time, so process start-up and ` +
      `file opening included) divided by the requests it completed; starting vstor alone ` +
      `(\`bench --help\`) takes ${startup.toFixed(2)} s of CPU, ${
        (startup / count * 1e6).toFixed(1)
      } µs per request of a ` +
      `${count}-request bench.`,
  );
  console.log(
    "Case 6's peer is fio's psync engine, one thread of synchronous 4 KiB preads on the file " +
      "after reading it all into the page cache (--invalidate=0 keeps it there).",
  );
  for (const n of notes) console.log(`note: ${n}`);
  console.log(
    `\ncommands (each measured one run as: bash -c 'TIMEFORMAT="%U %S"; time "$@"' bash CMD…):`,
  );
  for (const cmd of commands) console.log(`  ${cmd}`);
} finally {
  cleanup();
}
Deno.exit(0);
