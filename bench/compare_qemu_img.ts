/**
 * Side by side with `qemu-img bench`: the same bench arguments on identical fresh images, one run of
 * each tool per image. Prints the requests per second of both (median of the runs, from each tool's
 * own "Run completed in X seconds." line, so process start-up is not counted) and the ratio
 * vstor/qemu-img.
 *
 *   deno run -A bench/compare_qemu_img.ts [--count=75000] [--runs=3]
 *
 * @module
 */
import { parseArgs } from "node:util";
import { join } from "node:path";

/** One comparison: how to make the image and what to bench on it. */
interface Case {
  name: string;
  format: string;
  /** Extra `qemu-img create` arguments (e.g. `["-o", "cluster_size=65536"]`). */
  create: string[];
  /** Write every byte first (with `qemu-img bench -w`) so reads hit data, not holes. */
  fill: boolean;
  /** `bench` arguments besides the shared ones, `-f` and the file. */
  bench: string[];
}

/** The cases: raw, then qcow2 (64 KiB clusters) for allocating writes and reads of allocated data. */
const CASES: Case[] = [
  {
    name: "qcow2: 4 KiB sequential allocating writes, fresh image",
    format: "qcow2",
    create: [],
    fill: false,
    bench: ["-w"],
  },
  {
    name: "qcow2: 4 KiB sequential reads, fully allocated image",
    format: "qcow2",
    create: [],
    fill: true,
    bench: [],
  },
  {
    name: "4 KiB sequential writes, fresh image",
    format: "raw",
    create: [],
    fill: false,
    bench: ["-w"],
  },
  {
    name: "4 KiB sequential reads, written image",
    format: "raw",
    create: [],
    fill: true,
    bench: [],
  },
];

const { values } = parseArgs({
  args: Deno.args,
  options: {
    count: { type: "string", default: "75000" },
    runs: { type: "string", default: "3" },
  },
});
const count = Number(values.count);
const runs = Number(values.runs);
if (!Number.isSafeInteger(count) || count < 1 || !Number.isSafeInteger(runs) || runs < 1) {
  console.error("compare_qemu_img: --count and --runs must be positive whole numbers");
  Deno.exit(2);
}

const BUFFER = 4096;
const MIB = 1 << 20;
/** Every request lands on its own block once: the image holds the whole run without wrapping. */
const imageSize = Math.ceil((count * BUFFER) / MIB) * MIB;
const shared = ["-c", String(count), "-d", "32", "-s", String(BUFFER), "-t", "writeback"];
const modTs = new URL("../mod.ts", import.meta.url).pathname;

/** Run a command; its stdout, or an error with its stderr. */
async function run(cmd: string, args: string[]): Promise<string> {
  const out = await new Deno.Command(cmd, { args, stdout: "piped", stderr: "piped" }).output();
  const dec = new TextDecoder();
  if (!out.success) {
    throw new Error(`${cmd} ${args.join(" ")} failed (${out.code}): ${dec.decode(out.stderr)}`);
  }
  return dec.decode(out.stdout);
}

function seconds(stdout: string, tool: string): number {
  const m = /^Run completed in (\d+\.\d+) seconds\.$/m.exec(stdout);
  if (m === null) throw new Error(`${tool} printed no 'Run completed' line:\n${stdout}`);
  return Number(m[1]);
}

async function freshImage(path: string, c: Case): Promise<void> {
  await Deno.remove(path).catch(() => {});
  await run("qemu-img", ["create", "-q", "-f", c.format, ...c.create, path, String(imageSize)]);
  if (c.fill) {
    await run("qemu-img", [
      ..."bench -w -d 4 -s 1M --pattern=0x5a -t writeback".split(" "),
      "-c",
      String(imageSize / MIB),
      "-f",
      c.format,
      path,
    ]);
  }
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 === 1 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

try {
  await run("qemu-img", ["--version"]);
} catch {
  console.error("compare_qemu_img: qemu-img is not installed");
  Deno.exit(1);
}

const dir = await Deno.makeTempDir({ prefix: "vstor_qemu_img_" });
try {
  console.log(
    `qemu-img bench vs vstor bench: ${count} requests each, ${shared.join(" ")}, ` +
      `${imageSize / MIB} MiB images, median of ${runs} run(s)\n`,
  );
  const rows: string[][] = [["case", "format", "qemu-img ops/s", "vstor ops/s", "vstor/qemu-img"]];
  for (const c of CASES) {
    const args = [...shared, ...c.bench, "-f", c.format];
    const qemuSeconds: number[] = [];
    const vstorSeconds: number[] = [];
    for (let i = 0; i < runs; i++) {
      const theirs = join(dir, `qemu.${c.format}`);
      await freshImage(theirs, c);
      qemuSeconds.push(seconds(await run("qemu-img", ["bench", ...args, theirs]), "qemu-img"));
      await Deno.remove(theirs);
      const ours = join(dir, `vstor.${c.format}`);
      await freshImage(ours, c);
      vstorSeconds.push(
        seconds(await run(Deno.execPath(), ["run", "-A", modTs, "bench", ...args, ours]), "vstor"),
      );
      await Deno.remove(ours);
    }
    const qemuOps = count / median(qemuSeconds);
    const vstorOps = count / median(vstorSeconds);
    rows.push([
      c.name,
      c.format,
      Number.isFinite(qemuOps) ? Math.round(qemuOps).toString() : "n/a",
      Number.isFinite(vstorOps) ? Math.round(vstorOps).toString() : "n/a",
      Number.isFinite(qemuOps) && Number.isFinite(vstorOps)
        ? (vstorOps / qemuOps).toFixed(2)
        : "n/a",
    ]);
    console.error(
      `${c.name} (${c.format}): qemu-img ${qemuSeconds.join(", ")} s; vstor ${
        vstorSeconds.join(", ")
      } s`,
    );
  }
  const widths = rows[0]!.map((_, col) => Math.max(...rows.map((r) => r[col]!.length)));
  for (const row of rows) {
    console.log(
      row.map((cell, col) => col < 2 ? cell.padEnd(widths[col]!) : cell.padStart(widths[col]!))
        .join("  "),
    );
  }
} finally {
  await Deno.remove(dir, { recursive: true });
}
