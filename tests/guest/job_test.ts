import assert from "node:assert/strict";
import {
  JobError,
  parseJobArgs,
  parseJobFile,
  parseJobObject,
  parseSize,
  parseTime,
} from "../../src/guest/job.ts";
import { DEFAULT_SEED } from "../../src/guest/random.ts";

function issuesOf(fn: () => unknown): string[] {
  try {
    fn();
  } catch (error) {
    assert.ok(error instanceof JobError, String(error));
    return error.issues.map((i) => `${i.path}: ${i.message}`);
  }
  assert.fail("expected a JobError");
}

Deno.test("parseSize() and parseTime() read fio's units", () => {
  assert.equal(parseSize("4k"), 4096);
  assert.equal(parseSize("4K"), 4096);
  assert.equal(parseSize("4KiB"), 4096);
  assert.equal(parseSize("1M"), 1024 * 1024);
  assert.equal(parseSize("1.5m"), 1.5 * 1024 * 1024);
  assert.equal(parseSize("2g"), 2 * 1024 ** 3);
  assert.equal(parseSize("512"), 512);
  assert.equal(parseSize(8192), 8192);
  assert.equal(parseSize("4q"), null);
  assert.equal(parseSize("-1"), null);
  assert.equal(parseTime("10"), 10_000);
  assert.equal(parseTime("500ms"), 500);
  assert.equal(parseTime("2m"), 120_000);
  assert.equal(parseTime("250us"), 0.25);
  assert.equal(parseTime("soon"), null);
});

Deno.test("parseJobArgs() reads fio's command line: globals, --name sections, bare flags", () => {
  const jobs = parseJobArgs([
    "--bs=4k",
    "--iodepth=32",
    "--name=reader",
    "--rw=randread",
    "--name",
    "checker",
    "--rw=randwrite",
    "--blocksize=8k",
    "--verify=crc32c",
    "--verify_only",
    "--randseed=42",
    "--runtime=5",
    "--rwmixwrite=30",
    "--direct=1",
    "--ioengine=libaio",
  ]);
  assert.equal(jobs.length, 2);
  const [a, b] = jobs as [typeof jobs[0], typeof jobs[0]];
  assert.deepEqual(a, {
    name: "reader",
    rw: "randread",
    bs: 4096,
    iodepth: 32,
    iodepthBatch: 1,
    size: null,
    offset: 0,
    offsetIncrement: 0,
    ioSize: null,
    runtimeMs: null,
    timeBased: false,
    numjobs: 1,
    rwmixread: 50,
    verify: "none",
    verifyPattern: [0xa5],
    verifyOnly: false,
    doVerify: true,
    verifyFatal: false,
    seed: DEFAULT_SEED,
    norandommap: false,
    filename: null,
  });
  assert.equal(b.name, "checker");
  assert.equal(b.bs, 8192, "blocksize is bs's alias; the job overrides the global");
  assert.equal(b.iodepth, 32, "inherited");
  assert.equal(b.verifyOnly, true);
  assert.equal(b.verify, "crc32c");
  assert.equal(b.seed, 42);
  assert.equal(b.runtimeMs, 5000);
  assert.equal(b.rwmixread, 70);
  // Without --name, one job.
  assert.equal(parseJobArgs(["--rw=read"])[0]!.name, "job0");
  assert.equal(parseJobArgs(["--time_based=0", "--runtime=1"])[0]!.timeBased, false);
});

Deno.test("parseJobArgs() errors name the option", () => {
  assert.deepEqual(issuesOf(() => parseJobArgs(["--bs=4q"])), [
    '--bs: "4q" is not a size (a number with an optional k, m, g, t suffix)',
  ]);
  assert.deepEqual(issuesOf(() => parseJobArgs(["--iodepth=0"])), [
    "--iodepth: must be an integer from 1 to 65536",
  ]);
  assert.deepEqual(issuesOf(() => parseJobArgs(["--rw=sideways"])), [
    '--rw: "sideways" is not one of read, write, randread, randwrite, rw, randrw, trim, randtrim',
  ]);
  assert.deepEqual(issuesOf(() => parseJobArgs(["--fancy=1"])), [
    '--fancy: unknown option "fancy"',
  ]);
  assert.deepEqual(issuesOf(() => parseJobArgs(["--bs"])), [
    "--bs: needs a value (--option=value)",
  ]);
  assert.deepEqual(issuesOf(() => parseJobArgs(["--rw=trim", "--verify=crc32c"])), [
    "--verify: a trim job writes nothing to verify",
  ]);
  assert.deepEqual(issuesOf(() => parseJobArgs(["--rw=read", "--verify_only"])), [
    "--verify_only: rw=read writes nothing; give the writing workload to check",
  ]);
  assert.deepEqual(issuesOf(() => parseJobArgs(["--time_based"])), ["--time_based: needs runtime"]);
  assert.deepEqual(issuesOf(() => parseJobArgs(["--bs=1000"])), [
    "--bs: 1000 is not a multiple of 512",
  ]);
  assert.deepEqual(issuesOf(() => parseJobArgs(["--verify_only=maybe", "--rw=write"])), [
    '--verify_only: "maybe" is not a boolean (0 or 1)',
  ]);
  assert.deepEqual(issuesOf(() => parseJobArgs(["stray"])), [
    'argument 1: unexpected "stray" (options are --option=value)',
  ]);
  assert.deepEqual(issuesOf(() => parseJobArgs(["--runtime=soon"])), [
    '--runtime: "soon" is not a time (seconds, or a number with us, ms, s, m, h)',
  ]);
});

Deno.test("parseJobFile() reads JSON with global options, errors name jobs[i].field", () => {
  const jobs = parseJobFile(JSON.stringify({
    global: { bs: "64k", iodepth: 8 },
    jobs: [{ name: "seq", rw: "write" }, { name: "rand", rw: "randread", bs: 4096 }],
  }));
  assert.deepEqual(jobs.map((j) => [j.name, j.rw, j.bs, j.iodepth]), [
    ["seq", "write", 65536, 8],
    ["rand", "randread", 4096, 8],
  ]);
  assert.deepEqual(
    issuesOf(() => parseJobObject({ jobs: [{ rw: "read" }, { rw: "read", bs: "huge" }] })),
    ['jobs[1].bs: "huge" is not a size (a number with an optional k, m, g, t suffix)'],
  );
  assert.deepEqual(
    issuesOf(() => parseJobObject({ global: { iodepth: -3 }, jobs: [{ rw: "read" }] })),
    ["global.iodepth: must be an integer from 1 to 65536"],
  );
  assert.deepEqual(issuesOf(() => parseJobObject({ jobs: [{ colour: "blue" }] })), [
    'jobs[0].colour: unknown option "colour"',
  ]);
  assert.deepEqual(issuesOf(() => parseJobObject({ jobs: [] })), ["jobs: needs at least one job"]);
  assert.deepEqual(issuesOf(() => parseJobObject({ jobs: [{}], extra: 1 })), [
    'extra: unknown key "extra" (a job file holds "global" and "jobs")',
  ]);
  assert.deepEqual(issuesOf(() => parseJobObject({ jobs: [{ bs: { k: 4 } }] })).length, 1);
  assert.deepEqual(issuesOf(() => parseJobFile("{ nope")).length, 1);
});

Deno.test("parseJobFile() reads fio INI files", () => {
  const jobs = parseJobFile(`
; a comment
[global]
bs=4k
iodepth=16
direct=1

[writer]
rw=randwrite
verify=crc32c
size=1m

[reader]   # trailing comment
rw=randread
norandommap
`);
  assert.deepEqual(jobs.map((j) => [j.name, j.rw, j.bs, j.iodepth, j.size, j.norandommap]), [
    ["writer", "randwrite", 4096, 16, 1024 * 1024, false],
    ["reader", "randread", 4096, 16, null, true],
  ]);
  assert.deepEqual(issuesOf(() => parseJobFile("[a]\nbs=7\n")), [
    "[a].bs: must be at least 512 bytes",
  ]);
  assert.deepEqual(issuesOf(() => parseJobFile("bs=4k\n")), ["line 1: option outside a [section]"]);
});
