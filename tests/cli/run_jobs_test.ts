/**
 * `vstor run` as a user drives it: jobs on every disk a job names (two LUNs, two virtio-blk
 * disks), fio's JSON report, the job file schema and reference, errors that name the file and
 * line, Ctrl-C, and the HTML page in a real browser.
 */
import assert from "node:assert/strict";
import { join, resolve } from "node:path";
import { createImage } from "../../formats/open.ts";
import { EXIT_ERROR, EXIT_OK, main } from "../../src/cli/main.ts";
import { JOB_OPTIONS } from "../../src/guest/job.ts";
import { ignoreWithout, runTool } from "../interop/qemu.ts";
import { ignoreWithoutChromium, inspectPage } from "../html/browser.ts";

/** fio's tests run when fio is installed, and must when VSTOR_REQUIRE_FIO=1 (CI sets it). */
function ignoreWithoutFio(): boolean {
  try {
    if (new Deno.Command("fio", { args: ["--version"], stdout: "null" }).outputSync().success) {
      return false;
    }
  } catch {
    // not installed
  }
  if (Deno.env.get("VSTOR_REQUIRE_FIO") === "1") {
    throw new Error("VSTOR_REQUIRE_FIO=1 but fio is not installed");
  }
  return true;
}

const MiB = 1024 * 1024;
const MOD = resolve(import.meta.dirname!, "../../mod.ts");

async function vstor(...args: string[]) {
  let stdout = "", stderr = "";
  const code = await main(args, { stdout: (t) => stdout += t, stderr: (t) => stderr += t });
  return { code, stdout, stderr };
}

async function withDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "vstor_run_jobs_" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** The README's two-LUN machine: base (read-only) at LUN 0, data at LUN 1 of one virtio-scsi. */
async function twoLuns(dir: string): Promise<string[]> {
  const base = join(dir, "base.qcow2"), data = join(dir, "data.raw");
  await createImage(base, "qcow2", 16 * MiB);
  await createImage(data, "raw", 16 * MiB);
  return [
    "--drive",
    `file=${base},id=b,readonly=on`,
    "--drive",
    `file=${data},id=d`,
    "--device",
    "virtio-scsi,id=s0",
    "--device",
    "scsi-hd,bus=s0,drive=b,lun=0",
    "--device",
    "scsi-hd,bus=s0,drive=d,lun=1",
  ];
}

interface FioJob {
  jobname: string;
  groupid: number;
  "job options": Record<string, string>;
  read: Record<string, unknown> & { total_ios: number; clat_ns: Record<string, unknown> };
  write: Record<string, unknown> & { total_ios: number; clat_ns: Record<string, unknown> };
  vstor: { disk: string | null; device: string; lun: { target: number; lun: number } | null };
}

Deno.test("a job without filename runs on both LUNs, one with filename only on its disk; fio's JSON says where", async () => {
  await withDir(async (dir) => {
    const jobs = join(dir, "jobs.json");
    await Deno.writeTextFile(
      jobs,
      JSON.stringify({
        global: { bs: "4k", size: "4m" },
        jobs: [
          { name: "scan", rw: "randread", iodepth: 8 },
          { name: "fill", rw: "write", iodepth: 4, filename: "d" },
        ],
      }),
    );
    const r = await vstor("run", ...await twoLuns(dir), "--job", jobs, "--output-format=json");
    assert.equal(r.code, EXIT_OK, r.stderr + r.stdout);
    const report = JSON.parse(r.stdout);
    const byJob = (report.jobs as FioJob[]).map((j) => [j.jobname, j.vstor.disk, j.vstor.lun]);
    assert.deepEqual(byJob, [
      ["scan", "b", { target: 0, lun: 0 }],
      ["scan", "d", { target: 0, lun: 1 }],
      ["fill", "d", { target: 0, lun: 1 }],
    ]);
    for (const job of report.jobs as FioJob[]) {
      const dir = job.jobname === "fill" ? job.write : job.read;
      assert.equal(dir.total_ios, 1024, `${job.jobname} on ${job.vstor.disk}: 4 MiB in 4 KiB`);
      assert.equal(dir.io_bytes, 4 * MiB);
      assert.equal(dir.io_kbytes, 4096);
      for (const key of ["bw", "bw_bytes", "runtime", "bw_min", "bw_max", "iops_min", "iops_max"]) {
        assert.ok(Number.isInteger(dir[key]), `${key} is an integer, as fio prints it`);
      }
      assert.equal(typeof dir.iops, "number");
      const clat = dir.clat_ns as { N: number; percentile: Record<string, number> };
      assert.equal(clat.N, 1024);
      assert.deepEqual(Object.keys(clat.percentile).slice(0, 3), [
        "1.000000",
        "5.000000",
        "10.000000",
      ]);
      assert.ok(clat.percentile["99.000000"]! >= clat.percentile["50.000000"]!);
      assert.equal(job["job options"].filename, job.vstor.disk);
    }
    assert.deepEqual(report.vstor.disks.map((d: { disk: string }) => d.disk), ["b", "d"]);
    assert.ok(report.vstor.virtio.requests >= 3 * 1024);
  });
});

Deno.test("the text report has a section per disk and the job's totals over its disks", async () => {
  await withDir(async (dir) => {
    const a = join(dir, "a.raw"), b = join(dir, "b.qcow2");
    await createImage(a, "raw", 8 * MiB);
    await createImage(b, "qcow2", 8 * MiB);
    const r = await vstor(
      "run",
      "--drive",
      `file=${a},id=da`,
      "--drive",
      `file=${b},id=db`,
      "--device",
      "virtio-blk,drive=da,id=blka",
      "--device",
      "virtio-blk,drive=db,id=blkb",
      "--name=w",
      "--rw=randwrite",
      "--bs=4k",
      "--iodepth=4",
      "--size=2m",
    );
    assert.equal(r.code, EXIT_OK, r.stderr + r.stdout);
    // Both virtio-blk disks did the job: neither sits idle.
    assert.match(r.stdout, /^run 0: disk da: blka \(virtio-blk, slot \d+\)$/m);
    assert.match(r.stdout, /^run 1: disk db: blkb \(virtio-blk, slot \d+\)$/m);
    assert.match(r.stdout, /^job w: 2 clones on da, db$/m);
    assert.match(r.stdout, /blka queue 0: requests=512,/);
    assert.match(r.stdout, /blkb queue 0: requests=512,/);
    // The decimal bandwidth agrees with the binary one (120MB/s, not 12MB/s, for 114MiB/s).
    for (const m of r.stdout.matchAll(/BW=([\d.]+)(KiB|MiB|GiB)\/s \(([\d.]+)(kB|MB|GB)\/s\)/g)) {
      const iec = Number(m[1]) * { KiB: 1024, MiB: 1024 ** 2, GiB: 1024 ** 3 }[m[2]!]!;
      const si = Number(m[3]) * { kB: 1e3, MB: 1e6, GB: 1e9 }[m[4]!]!;
      assert.ok(Math.abs(iec - si) / iec < 0.02, `${m[0]}: the two figures disagree`);
    }
  });
});

Deno.test("a filename naming no disk, and bad job and machine files, are refused with FILE:LINE", async () => {
  await withDir(async (dir) => {
    const attach = await twoLuns(dir);
    const json = join(dir, "jobs.json");
    await Deno.writeTextFile(
      json,
      '{\n  "jobs": [\n    { "rw": "randread" },\n    { "rw": "write", "bs": "4q" }\n  ]\n}\n',
    );
    let r = await vstor("run", ...attach, "--job", json);
    assert.equal(r.code, EXIT_ERROR);
    assert.equal(
      r.stderr,
      `vstor: ${json}:4: jobs[1].bs: "4q" is not a size (a number with an optional k, m, g, t suffix)\n`,
    );

    const ini = join(dir, "jobs.fio");
    await Deno.writeTextFile(ini, "[global]\nbs=4k\n\n[r]\nrw=randread\nfilename=nosuch\n");
    r = await vstor("run", ...attach, "--job", ini);
    assert.equal(r.code, EXIT_ERROR);
    assert.match(
      r.stderr,
      /^vstor: .*jobs\.fio: \[r\]\.filename: no disk named "nosuch" \(the disks: b = s0\/0 = s0\/0\/0, d = s0\/1 = s0\/0\/1\)\n$/,
    );

    await Deno.writeTextFile(ini, "[global]\nbs=4k\n\n[r]\nrw=sideways\n");
    r = await vstor("run", ...attach, "--job", ini);
    assert.match(r.stderr, /jobs\.fio:5: \[r\]\.rw: "sideways" is not one of read, write/);

    r = await vstor("run", ...attach, "--job", join(dir, "missing.json"));
    assert.equal(r.code, EXIT_ERROR);
    assert.equal(
      r.stderr,
      `vstor: Could not read the job file '${
        join(dir, "missing.json")
      }': No such file or directory\n`,
    );

    const machine = join(dir, "vm.json");
    await Deno.writeTextFile(
      machine,
      '{\n  "devices": [\n    {\n      "type": "virtio-blk",\n      "id": "d0",\n      "numQueues": 17,\n      "drive": { "file": "x" }\n    }\n  ]\n}\n',
    );
    r = await vstor("run", "--machine", machine);
    assert.equal(r.code, EXIT_ERROR);
    assert.equal(r.stderr, `vstor: ${machine}:6: devices[0].numQueues: must be ≤ 16\n`);
    for (const text of [r.stderr]) assert.doesNotMatch(text, /\w+Error:|os error/);
  });
});

Deno.test("--schema prints a JSON Schema of job files that names every key of the reference", async () => {
  const r = await vstor("run", "--schema");
  assert.equal(r.code, EXIT_OK);
  const schema = JSON.parse(r.stdout);
  assert.equal(schema.$schema, "https://json-schema.org/draft/2020-12/schema");
  assert.deepEqual(schema.required, ["jobs"]);
  const job = schema.properties.jobs.items;
  assert.equal(job.additionalProperties, false);
  for (const doc of JOB_OPTIONS) {
    assert.ok(doc.key in job.properties, `${doc.key} is in the schema`);
    assert.match(
      job.properties[doc.key].description,
      new RegExp(`Default: ${doc.default.replace(/[()]/g, ".")}`),
    );
    for (const alias of doc.aliases ?? []) assert.ok(alias in job.properties, alias);
  }
  // The README's reference lists every key with its default.
  const readme = await Deno.readTextFile(resolve(import.meta.dirname!, "../../README.md"));
  for (const doc of JOB_OPTIONS) {
    assert.ok(readme.includes(`| \`${doc.key}\``), `README's job file reference lists ${doc.key}`);
  }
});

Deno.test({
  name: "Ctrl-C stops a time-based run: a partial report, exit 130, the image closed clean",
  ignore: ignoreWithout("qemu-img"),
  async fn() {
    await withDir(async (dir) => {
      const image = join(dir, "disk.qcow2");
      const made = await runTool("qemu-img", [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        image,
        "32M",
      ]);
      assert.equal(made.code, 0, made.stderr);
      const child = new Deno.Command(Deno.execPath(), {
        args: [
          "run",
          "-A",
          MOD,
          "run",
          "--drive",
          `file=${image},id=d0`,
          "--device",
          "virtio-blk,drive=d0",
          "--name=w",
          "--rw=randwrite",
          "--bs=4k",
          "--iodepth=8",
          "--time_based",
          "--runtime=120",
        ],
        stdout: "piped",
        stderr: "piped",
      }).spawn();
      // The image is in use once vstor holds its lock: qemu-img cannot take the write lock.
      let exited: Deno.CommandStatus | undefined;
      child.status.then((s) => exited = s);
      const deadline = Date.now() + 60_000;
      for (;;) {
        const probe = await runTool("qemu-img", ["info", image]);
        if (probe.code !== 0 && /lock/.test(probe.stderr)) break;
        if (exited !== undefined) {
          const out = await child.output();
          const dec = new TextDecoder();
          assert.fail(
            `vstor exited (${exited.code}) before it held the image: ` +
              dec.decode(out.stderr) + dec.decode(out.stdout),
          );
        }
        assert.ok(Date.now() < deadline, "vstor never opened the image");
        await new Promise((r) => setTimeout(r, 100));
      }
      await new Promise((r) => setTimeout(r, 1000));
      child.kill("SIGINT");
      const watchdog = setTimeout(() => child.kill("SIGKILL"), 60_000);
      const out = await child.output();
      clearTimeout(watchdog);
      const stdout = new TextDecoder().decode(out.stdout);
      const stderr = new TextDecoder().decode(out.stderr);
      assert.equal(out.code, 130, stderr + stdout);
      assert.match(stdout, /^w: \(clone 0\): rw=randwrite/m);
      assert.match(stdout, /stopped early/);
      const check = await runTool("qemu-img", ["check", image]);
      assert.equal(check.code, 0, check.stdout + check.stderr);
      const info = await runTool("qemu-img", ["info", "--output=json", image]);
      assert.equal(JSON.parse(info.stdout)["dirty-flag"], false, "no dirty bit left behind");
    });
  },
});

Deno.test("Ctrl-C during the main job: exit 130 and its temporary directory removed", async () => {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MOD, "run"],
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const reader = child.stdout.getReader();
  let text = "";
  const decoder = new TextDecoder();
  while (!/\n/.test(text)) {
    const { value, done } = await reader.read();
    if (done) break;
    text += decoder.decode(value, { stream: true });
  }
  const dir = /main job in (\S+)/.exec(text)?.[1];
  assert.ok(dir !== undefined, text);
  child.kill("SIGINT");
  const watchdog = setTimeout(() => child.kill("SIGKILL"), 60_000);
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    text += decoder.decode(value, { stream: true });
  }
  const status = await child.status;
  await child.stderr.cancel();
  clearTimeout(watchdog);
  assert.equal(status.code, 130, text);
  assert.throws(() => Deno.statSync(dir), Deno.errors.NotFound);
});

Deno.test({
  name:
    "--html writes a self-contained page a real browser loads: histograms, IOPS and notifications",
  ignore: ignoreWithoutChromium(),
  async fn() {
    await withDir(async (dir) => {
      const page = join(dir, "run.html");
      const r = await vstor(
        "run",
        ...await twoLuns(dir),
        "--name=r",
        "--rw=randread",
        "--bs=4k",
        "--iodepth=8",
        "--size=4m",
        "--html",
        page,
      );
      assert.equal(r.code, EXIT_OK, r.stderr + r.stdout);
      const report = await inspectPage(page, {
        jobs: "document.querySelectorAll('div.chart.job').length",
        histograms: "document.querySelectorAll('svg.histogram').length",
        bins: "document.querySelectorAll('svg.histogram rect.bin').length",
        markers: "document.querySelectorAll('svg.histogram line.marker').length",
        iops: "document.querySelectorAll('div.chart.iops polyline.series').length",
        queues: "document.querySelectorAll('div.chart.queue').length",
        rows: "document.querySelectorAll('table')[0].rows.length",
      }, { timeoutMs: 60_000 });
      assert.deepEqual(report.exceptions, []);
      assert.deepEqual(report.consoleErrors, []);
      assert.deepEqual(report.requests, []);
      assert.equal(report.values.jobs, 2, "one latency chart per job and disk");
      assert.equal(report.values.histograms, 2);
      assert.ok((report.values.bins as number) >= 2);
      assert.equal(report.values.markers, 6, "p50, p99, p99.9 for each");
      assert.equal(report.values.iops, 2);
      assert.ok((report.values.queues as number) >= 1);
    });
  },
});

Deno.test({
  name:
    "fio's JSON: every field real fio writes is there with fio's type, and fio's json+ tool reads the bins",
  ignore: ignoreWithoutFio(),
  async fn() {
    await withDir(async (dir) => {
      const data = join(dir, "fio.dat");
      const fio = await runTool("fio", [
        "--name=r",
        `--filename=${data}`,
        "--size=4m",
        "--rw=randrw",
        "--bs=4k",
        "--ioengine=psync",
        "--output-format=json+",
      ]);
      assert.equal(fio.code, 0, fio.stderr);
      const ours = await vstor(
        "run",
        "--drive",
        `file=${data},format=raw,id=d0`,
        "--device",
        "virtio-blk,drive=d0",
        "--name=r",
        "--rw=randrw",
        "--bs=4k",
        "--size=4m",
        "--output-format=json+",
      );
      assert.equal(ours.code, EXIT_OK, ours.stderr);
      // Types as Python's json (and fio's consumers) see them: 0.000000 is a float, 0 an int.
      const shapes = (text: string) => {
        const out = new Map<string, string>();
        const literals = numberLiterals(text);
        const json = JSON.parse(text);
        const walk = (value: unknown, path: string) => {
          if (value !== null && typeof value === "object" && !Array.isArray(value)) {
            for (const [k, v] of Object.entries(value)) {
              if (["job options", "bins", "percentile", "vstor"].includes(k)) continue;
              walk(v, `${path}.${k}`);
            }
            return;
          }
          const literal = literals.get(path);
          out.set(
            path,
            literal === undefined ? typeof value : /^-?\d+$/.test(literal) ? "int" : "float",
          );
        };
        walk(json.jobs[0], "jobs[0]");
        return { out, top: Object.keys(json) };
      };
      const theirs = shapes(fio.stdout), mine = shapes(ours.stdout);
      for (const key of theirs.top) assert.ok(mine.top.includes(key), `top-level ${key}`);
      for (const [path, type] of theirs.out) {
        assert.ok(mine.out.has(path), `${path} is missing`);
        if (type === "int" || type === "float") {
          assert.equal(mine.out.get(path), type, `${path}: fio writes a ${type}`);
        }
      }
      // fio's own json+ tool turns our bins into CSV and validates them.
      const report = join(dir, "vstor.json");
      await Deno.writeTextFile(report, ours.stdout);
      const csv = await runTool("fio_jsonplus_clat2csv", [report, join(dir, "lat.csv")]);
      assert.equal(csv.code, 0, csv.stdout + csv.stderr);
      const check = await runTool("fio_jsonplus_clat2csv", [
        "--validate",
        report,
        join(dir, "lat.csv"),
      ]);
      assert.equal(check.code, 0, check.stdout + check.stderr);
      assert.match(check.stdout, /validated/);
    });
  },
});

/** Every number literal of a JSON text, as written, by path (`jobs[0].read.iops`). */
function numberLiterals(text: string): Map<string, string> {
  const out = new Map<string, string>();
  let at = 0;
  const space = () => {
    while (/\s/.test(text[at] ?? "")) at++;
  };
  const string = (): string => {
    const start = at++;
    while (text[at] !== '"') at += text[at] === "\\" ? 2 : 1;
    return JSON.parse(text.slice(start, ++at));
  };
  const value = (path: string): void => {
    space();
    const c = text[at];
    if (c === "{" || c === "[") {
      const close = c === "{" ? "}" : "]";
      at++;
      for (let i = 0;; i++) {
        space();
        if (text[at] === close) break;
        if (c === "{") {
          const key = string();
          space();
          at++; // :
          value(path === "" ? key : `${path}.${key}`);
        } else {
          value(`${path}[${i}]`);
        }
        space();
        if (text[at] === ",") at++;
      }
      at++;
    } else if (c === '"') {
      string();
    } else {
      const m = /^[^,\s}\]]+/.exec(text.slice(at, at + 64))!;
      out.set(path, m[0]);
      at += m[0].length;
    }
  };
  value("");
  return out;
}

Deno.test("a guest writes through cache=none (O_DIRECT) and verifies through directsync, on raw and qcow2", async () => {
  await withDir(async (dir) => {
    for (const format of ["raw", "qcow2"] as const) {
      const image = join(dir, `direct.${format}`);
      await createImage(image, format, 8 * MiB);
      const job = [
        "--name=w",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=8",
        "--size=2m",
        "--verify=crc32c",
        "--seed=16",
      ];
      const written = await vstor(
        "run",
        "--drive",
        `file=${image},format=${format},id=d0,cache=none`,
        "--device",
        "virtio-blk,drive=d0",
        ...job,
      );
      assert.equal(written.code, EXIT_OK, written.stderr + written.stdout);
      assert.match(written.stdout, /verify: 512 blocks checked, 0 failed/);
      const again = await vstor(
        "run",
        "--drive",
        `file=${image},format=${format},id=d0,cache=directsync,readonly=on`,
        "--device",
        "virtio-scsi,id=s0",
        "--device",
        "scsi-hd,bus=s0,drive=d0",
        ...job,
        "--verify_only",
      );
      assert.equal(again.code, EXIT_OK, again.stderr + again.stdout);
      assert.match(again.stdout, /verify: 512 blocks checked, 0 failed/);
    }
  });
});
