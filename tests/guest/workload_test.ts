import assert from "node:assert/strict";
import { parseJobArgs } from "../../src/guest/job.ts";
import {
  JobError,
  type JobSpec,
  runWorkload,
  type WorkloadResult,
} from "../../src/guest/workload.ts";
import { MemTarget, type MemTargetOptions } from "./mem_target.ts";

function job(args: string): JobSpec {
  const [spec] = parseJobArgs(["--name=t", ...args.split(/\s+/).filter((a) => a !== "")]);
  return spec!;
}

async function run(
  spec: JobSpec,
  options: MemTargetOptions & { target?: MemTarget } = {},
): Promise<{ result: WorkloadResult; target: MemTarget }> {
  const target = options.target ?? new MemTarget({ capacity: 256 * 1024, ...options });
  const result = await runWorkload([spec], { openTarget: () => target });
  return { result, target };
}

Deno.test("a sequential write job with crc32c verify writes every block, then reads each back", async () => {
  const { result, target } = await run(job("--rw=write --bs=4k --iodepth=8 --verify=crc32c"));
  const j = result.jobs[0]!;
  assert.equal(j.write.ops, 64);
  assert.equal(j.write.bytes, 256 * 1024);
  assert.equal(j.read.ops, 64, "the verify phase reads back what was written");
  assert.deepEqual(j.verify, { checked: 64, failed: 0, failures: [] });
  assert.equal(j.error, null);
  assert.deepEqual(
    target.log.slice(0, 3).map((l) => [l.op, l.offset]),
    [["write", 0], ["write", 4096], ["write", 8192]],
  );
  assert.equal(target.maxInFlight, 8);
  // Every block carries fio's header magic at its start.
  for (let b = 0; b < 64; b++) {
    assert.equal(target.disk[b * 4096]! | (target.disk[b * 4096 + 1]! << 8), 0xacca);
  }
});

Deno.test("verify catches a flipped byte and names its offset, expected and found value", async () => {
  for (const mode of ["crc32c", "pattern"]) {
    const target = new MemTarget({ capacity: 64 * 1024 });
    target.onRead = (offset, data) => {
      if (offset === 12288) data[777]! ^= 0x40;
    };
    const { result } = await run(job(`--rw=randwrite --bs=4k --iodepth=4 --verify=${mode}`), {
      target,
    });
    const v = result.jobs[0]!.verify!;
    assert.equal(v.checked, 16);
    assert.equal(v.failed, 1, mode);
    const f = v.failures[0]!;
    assert.equal(f.blockOffset, 12288);
    assert.equal(f.reason, "data");
    assert.equal(f.offset, 12288 + 777);
    assert.equal(f.found, f.expected ^ 0x40);
    assert.equal(f.foundByte, f.expectedByte ^ 0x40);
  }
});

Deno.test("verify tells a misdirected block from a corrupt header", async () => {
  const spec = job("--rw=write --bs=4k --verify=crc32c --do_verify=0");
  const { target } = await run(spec, { capacity: 32 * 1024 });
  // Block 1's content lands at block 3 (a misdirected write), and block 5's header is torn.
  target.disk.copyWithin(3 * 4096, 4096, 2 * 4096);
  target.disk[5 * 4096 + 17]! ^= 1; // inside the offset field
  const check = await run(job("--rw=write --bs=4k --verify=crc32c --verify_only"), { target });
  const failures = check.result.jobs[0]!.verify!.failures;
  assert.deepEqual(failures.map((f) => [f.blockOffset, f.reason]), [
    [3 * 4096, "offset"],
    [5 * 4096, "header-crc"],
  ]);
  assert.equal(failures[0]!.expected, 3 * 4096);
  assert.equal(failures[0]!.found, 4096);
  assert.equal(failures[1]!.offset, 5 * 4096 + 17);
});

Deno.test("verify_only after a write run passes, and fails after tampering", async () => {
  const write = job("--rw=randwrite --bs=8k --iodepth=16 --verify=crc32c --randseed=99");
  const { target } = await run(write);
  const reads = target.log.length;

  const verifyOnly = job(
    "--rw=randwrite --bs=8k --iodepth=16 --verify=crc32c --randseed=99 --verify_only",
  );
  const ok = await run(verifyOnly, { target });
  assert.deepEqual(ok.result.jobs[0]!.verify, { checked: 32, failed: 0, failures: [] });
  assert.equal(ok.result.jobs[0]!.write.ops, 0, "verify_only writes nothing");
  assert.ok(target.log.slice(reads).every((l) => l.op === "read"));

  target.disk[100_000]! ^= 0xff;
  const bad = await run(verifyOnly, { target });
  const v = bad.result.jobs[0]!.verify!;
  assert.equal(v.failed, 1);
  assert.equal(v.failures[0]!.offset, 100_000);
  assert.equal(v.failures[0]!.blockOffset, Math.floor(100_000 / 8192) * 8192);

  // Another seed expects other blocks: every block fails its seed check.
  const other = await run(
    job("--rw=randwrite --bs=8k --verify=crc32c --randseed=7 --verify_only"),
    {
      target,
    },
  );
  assert.equal(other.result.jobs[0]!.verify!.failed, 32);
  assert.equal(other.result.jobs[0]!.verify!.failures[0]!.reason, "seed");
});

Deno.test("randrw keeps the rwmixread ratio", async () => {
  const { result } = await run(
    job("--rw=randrw --rwmixread=70 --bs=512 --iodepth=32 --io_size=5M"),
    {
      capacity: 1024 * 1024,
    },
  );
  const j = result.jobs[0]!;
  const total = j.read.ops + j.write.ops;
  assert.equal(total, 10240);
  const share = j.read.ops / total;
  assert.ok(Math.abs(share - 0.7) < 0.02, `read share ${share}`);
  const w = await run(job("--rw=randrw --rwmixwrite=90 --bs=512 --io_size=1M"));
  const jw = w.result.jobs[0]!;
  assert.ok(Math.abs(jw.write.ops / (jw.read.ops + jw.write.ops) - 0.9) < 0.04);
});

Deno.test("the same seed gives the same I/O; random jobs touch every block once per pass", async () => {
  const a = await run(job("--rw=randrw --bs=4k --iodepth=4 --randseed=5 --io_size=512k"));
  const b = await run(job("--rw=randrw --bs=4k --iodepth=4 --randseed=5 --io_size=512k"));
  const c = await run(job("--rw=randrw --bs=4k --iodepth=4 --randseed=6 --io_size=512k"));
  assert.deepEqual(a.target.log, b.target.log);
  assert.notDeepEqual(a.target.log, c.target.log);
  assert.deepEqual(a.target.disk, b.target.disk, "same data too");

  const r = await run(job("--rw=randread --bs=4k --io_size=512k"));
  const offsets = r.target.log.map((l) => l.offset);
  for (const pass of [offsets.slice(0, 64), offsets.slice(64)]) {
    assert.deepEqual(
      [...pass].sort((x, y) => x - y),
      Array.from({ length: 64 }, (_, i) => i * 4096),
    );
  }
  assert.notDeepEqual(offsets.slice(0, 64), offsets.slice(64), "a new order each pass");
});

Deno.test("norandommap draws offsets independently (repeats allowed)", async () => {
  const { target } = await run(job("--rw=randread --bs=4k --norandommap"));
  const offsets = new Set(target.log.map((l) => l.offset));
  assert.equal(target.log.length, 64);
  assert.ok(offsets.size < 64);
});

Deno.test("time_based jobs run for their runtime and stop", async () => {
  // It stops: the run returns (a job that never stopped would hang the test); it ran its runtime
  // at least. No upper bound on the time: a loaded machine may run it late.
  const { result } = await run(
    job("--rw=randread --bs=4k --iodepth=4 --runtime=60ms --time_based"),
  );
  const j = result.jobs[0]!;
  assert.ok(j.elapsedMs >= 60, `${j.elapsedMs}`);
  assert.ok(j.read.ops > 64, "loops over the region");
  assert.ok(j.read.iops > 0 && j.read.bandwidth === j.read.iops * 4096);
});

Deno.test("runtime caps a job that would run longer", async () => {
  const { result } = await run(job("--rw=read --bs=512 --runtime=20ms --io_size=1g"));
  assert.ok(result.jobs[0]!.read.ops < 2 * 1024 * 1024);
});

Deno.test("an I/O error ends the job and is reported", async () => {
  const target = new MemTarget({ capacity: 64 * 1024 });
  target.failAt = 8192;
  const { result } = await run(job("--rw=write --bs=4k --verify=crc32c"), { target });
  const j = result.jobs[0]!;
  assert.deepEqual(j.error, {
    op: "write",
    offset: 8192,
    length: 4096,
    status: "ioerr",
    detail: "injected",
  });
  assert.equal(j.write.errors, 1);
  assert.equal(j.read.ops, 0, "no verify after an error");
  assert.ok(j.write.ops < 16);
});

Deno.test("iodepth_batch_submit commits in batches", async () => {
  const { target } = await run(job("--rw=read --bs=4k --iodepth=16 --iodepth_batch_submit=8"));
  assert.equal(target.log.length, 64);
  assert.equal(target.commits, 8);
  const single = await run(job("--rw=read --bs=4k --iodepth=16"));
  assert.equal(single.target.commits, 64, "fio's default: commit each request");
});

Deno.test("numjobs clones run on their own targets, offset_increment apart", async () => {
  const disk = new Uint8Array(256 * 1024);
  const targets: MemTarget[] = [];
  const spec = job(
    "--rw=write --bs=4k --numjobs=3 --size=64k --offset_increment=64k --verify=pattern --verify_pattern=0x5aa5",
  );
  const result = await runWorkload([spec], {
    openTarget: () => {
      const t = new MemTarget({ disk, depth: 4 });
      targets.push(t);
      return t;
    },
  });
  assert.equal(result.jobs.length, 3);
  assert.deepEqual(result.jobs.map((j) => j.clone), [0, 1, 2]);
  assert.deepEqual(targets.map((t) => t.log[0]!.offset), [0, 65536, 131072]);
  assert.equal(result.total.write.ops, 48);
  assert.equal(result.total.read.ops, 48);
  assert.ok(result.jobs.every((j) => j.verify!.failed === 0));
  assert.deepEqual([...disk.subarray(40, 44)], [0x5a, 0xa5, 0x5a, 0xa5]);
  assert.deepEqual([...disk.subarray(196608, 196612)], [0, 0, 0, 0], "beyond the 3 regions");
});

Deno.test("a job that does not fit its target is refused naming the field", async () => {
  await assert.rejects(
    () => run(job("--rw=read --bs=256k"), { maxTransfer: 65536 }),
    (e: unknown) =>
      e instanceof JobError && e.field === "t.bs" && /largest transfer of 65536/.test(e.message),
  );
  await assert.rejects(
    () => run(job("--rw=trim --bs=4k"), { discard: false }),
    /t\.rw: the device does not support discard/,
  );
  await assert.rejects(
    () => run(job("--rw=write --bs=4k"), { readOnly: true }),
    /t\.rw: rw=write writes, and the device is read-only/,
  );
  await assert.rejects(
    () => run(job("--rw=read --bs=4k --offset=1m")),
    /t\.offset: 1048576 is at or past the capacity 262144/,
  );
  await assert.rejects(
    () => run(job("--rw=read --bs=4k --size=1m")),
    /t\.size: offset 0 \+ size 1048576/,
  );
  await assert.rejects(
    () => run(job("--rw=read --bs=512"), { blockSize: 4096 }),
    /t\.bs: 512 is not a multiple of the device's 4096-byte blocks/,
  );
});

Deno.test("trim jobs discard their region", async () => {
  const disk = new Uint8Array(64 * 1024).fill(9);
  const { result } = await run(job("--rw=randtrim --bs=8k"), { disk, capacity: disk.length });
  assert.equal(result.jobs[0]!.trim.ops, 8);
  assert.deepEqual(disk, new Uint8Array(64 * 1024));
});

Deno.test("latency is measured per request and summarized per direction and in total", async () => {
  const { result } = await run(job("--rw=randrw --bs=4k --iodepth=8 --io_size=1m"));
  const j = result.jobs[0]!;
  for (const d of [j.read, j.write]) {
    const l = d.latency;
    assert.equal(l.count, d.ops);
    assert.ok(l.min <= l.p50 && l.p50 <= l.p99 && l.p99 <= l.p999 && l.p999 <= l.max);
    assert.ok(l.min > 0);
  }
  assert.equal(result.total.read.latency.count + result.total.write.latency.count, 256);
});
