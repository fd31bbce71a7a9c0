/**
 * The guest program with several runs at once on one thread: a virtio-blk and two LUNs of a
 * virtio-scsi, all over the real back-ends, in one workload loop; per-run and per-device sections,
 * exits attributed per device, and errors that name the run.
 */
import assert from "node:assert/strict";
import { type GuestRequest, GuestSetupError, runGuest } from "../../src/guest/guest.ts";
import { JobError } from "../../src/guest/job.ts";
import type { ExitNumbers } from "../../src/guest/report.ts";
import type { AccessSize, GuestBus } from "../../src/virtio/bus.ts";
import { RealMachine } from "./real_devices.ts";

const MiB = 1024 * 1024;

/** Counts every access as an exit, as a trap-everything exit bus would. */
function countingBus(inner: GuestBus): { bus: GuestBus; counters: ExitNumbers } {
  const counters = { config: 0, mmio: 0, doorbell: 0 };
  const bus: GuestBus = {
    configRead: (s, o, n) => (counters.config++, inner.configRead(s, o, n)),
    configWrite: (s, o, n, v) => (counters.config++, inner.configWrite(s, o, n, v)),
    mmioRead: (g, n) => (counters.mmio++, inner.mmioRead(g, n)),
    mmioWrite: (g: number, n: AccessSize, v: number) => {
      counters.mmio++;
      inner.mmioWrite(g, n, v);
    },
    ioRead: (port, n) => inner.ioRead(port, n),
    ioWrite: (port, n, v) => inner.ioWrite(port, n, v),
  };
  return { bus, counters };
}

async function machine() {
  const m = new RealMachine();
  const blk = await m.addBlk("disk0", 3, 4 * MiB, { numQueues: 2 });
  const hba = m.addScsi("hba0", 4, { numQueues: 2 });
  const rw = await hba.plug(0, 0, 4 * MiB);
  const ro = await hba.plug(0, 1, 2 * MiB, { readOnly: true });
  ro.file.contents(); // present, zero-filled
  m.ready();
  const { bus, counters } = countingBus(m.bus);
  const env = m.env({ bus, exitCounters: () => ({ ...counters }) });
  return { m, blk, hba, rw, ro, env };
}

const WRITE_JOB = ["--rw=randwrite", "--bs=4k", "--iodepth=8", "--verify=crc32c", "--size=1m"];

Deno.test("runGuest() with runs: virtio-blk and two virtio-scsi LUNs at once, sections per run and device", async () => {
  const { m, env, rw, blk: blkDevice, hba } = await machine();
  const request: GuestRequest = {
    runs: [
      {
        device: "disk0",
        args: ["--name=blk", ...WRITE_JOB, "--numjobs=2", "--offset_increment=1m"],
      },
      {
        device: "hba0",
        lun: { target: 0, lun: 0 },
        args: ["--name=scsi", ...WRITE_JOB, "--randseed=9"],
      },
      {
        device: 4,
        lun: { target: 0, lun: 1 },
        args: ["--name=ro", "--rw=randread", "--bs=16k", "--iodepth=4"],
      },
    ],
  };
  const run = await runGuest(env, request);
  assert.deepEqual(m.faults, []);
  // Per run: its clones and its total.
  assert.deepEqual(run.runs.map((r) => [r.device, r.kind, r.slot, r.lun, r.jobs.length]), [
    ["disk0", "virtio-blk", 3, null, 2],
    ["hba0", "virtio-scsi", 4, { target: 0, lun: 0 }, 1],
    ["hba0", "virtio-scsi", 4, { target: 0, lun: 1 }, 1],
  ]);
  for (const j of run.result.jobs) {
    assert.equal(j.error, null, `${j.name}: ${JSON.stringify(j.error)}`);
  }
  assert.deepEqual(run.result.jobs.map((j) => j.verify?.checked ?? null), [256, 256, 256, null]);
  assert.deepEqual(run.result.jobs.map((j) => j.verify?.failed ?? null), [0, 0, 0, null]);
  assert.equal(run.runs[0]!.total.write.ops, 512);
  assert.equal(run.runs[1]!.total.write.ops, 256);
  assert.equal(run.runs[2]!.total.read.ops, 128);
  assert.equal(run.result.total.read.ops, 512 + 256 + 128);
  assert.equal(run.runs[2]!.capacity, 2 * MiB);
  // The SCSI LUN really holds fio blocks: the verify header's magic at each 4 KiB block it wrote.
  const lunBytes = rw.file.contents();
  let stamped = 0;
  for (let at = 0; at < MiB; at += 4096) {
    if (lunBytes[at] === 0xca && lunBytes[at + 1] === 0xac) stamped++;
  }
  assert.equal(stamped, 256);

  // Per device: queues (one per clone of its runs), numbers over the run, exits attributed.
  const [blk, scsi] = run.devices;
  assert.equal(blk!.kind, "virtio-blk");
  assert.equal(blk!.queues, 2);
  assert.deepEqual(blk!.virtio.queues.map((q) => [q.queue, q.requests]), [[0, 512], [1, 512]]);
  assert.equal(scsi!.kind, "virtio-scsi");
  assert.equal(scsi!.queues, 2);
  assert.deepEqual(scsi!.virtio.queues.map((q) => [q.queue, q.requests]), [[2, 512], [3, 128]]);
  assert.deepEqual(scsi!.luns!.map((l) => [l.target, l.lun, l.readOnly]), [[0, 0, false], [
    0,
    1,
    true,
  ]]);
  assert.equal(scsi!.summary.requests, 640);
  assert.ok(scsi!.summary.averageBatch >= 1);
  const total = run.virtio.exits!;
  let mmio = 0;
  for (const d of run.devices) {
    const e = d.virtio.exits!;
    const kicks = d.virtio.queues.reduce((n, q) => n + q.kicks, 0);
    assert.equal(e.doorbell, kicks, `${d.label}: every kick trapped`);
    assert.equal(e.config, 0);
    assert.equal(e.ioeventfd, undefined);
    mmio += e.mmio;
  }
  assert.equal(mmio, total.mmio, "every exit of the run belongs to one device");

  // The report: a section per run, the grand total, a summary line per device.
  const text = run.report;
  assert.match(text, /^run 0: disk0 \(virtio-blk, slot 3\)$/m);
  assert.match(text, /^run 1: hba0 lun 0:0 \(virtio-scsi, slot 4\)$/m);
  assert.match(text, /^run 2: hba0 lun 0:1 \(virtio-scsi, slot 4\)$/m);
  assert.match(text, /^run 1 total: jobs=1, elapsed=\d+msec$/m);
  assert.match(text, /^total: jobs=4, elapsed=\d+msec$/m);
  assert.match(text, /^ {2}hba0 queue 3: requests=128, /m);
  assert.match(
    text,
    /^ {2}hba0 \(virtio-scsi, slot 4\): requests=640, kicks\/request=[\d.]+, interrupts\/request=[\d.]+, batch\/kick=[\d.]+, batch\/interrupt=[\d.]+, suppressed kicks=\d+, exits\/request=[\d.]+ \(config=0, mmio=\d+ \(doorbells \d+\)\)$/m,
  );
  assert.match(text, /^ {2}exits: config=0, mmio=\d+ \(doorbells 0\), per request=/m);
  // JSON: the same sections.
  assert.equal(run.json.runs?.length, 3);
  assert.deepEqual(run.json.devices?.map((d) => [d.device, d.virtio.requests]), [["disk0", 1024], [
    "hba0",
    640,
  ]]);
  assert.deepEqual(structuredClone(run), run, "the result crosses a Worker boundary");
  assert.deepEqual(JSON.parse(JSON.stringify(run.json)), run.json);
  // Both devices were reset afterwards.
  assert.equal(blkDevice.fn.deviceStatus, 0);
  assert.equal(hba.fn.deviceStatus, 0);
  if (Deno.env.get("SHOW_REPORT")) console.log(run.report);
});

Deno.test("runGuest() with runs names the run in errors: bad jobs, missing LUNs, writes to a read-only LUN", async () => {
  const { env } = await machine();
  await assert.rejects(
    () =>
      runGuest(env, {
        runs: [{ device: "disk0", args: ["--rw=read"] }, { device: "hba0", args: ["--bs=7"] }],
      }),
    (e: unknown) => e instanceof JobError && e.field === "runs[1].--bs",
  );
  await assert.rejects(
    () =>
      runGuest(env, {
        runs: [{ device: "hba0", lun: { target: 0, lun: 7 }, args: ["--rw=read"] }],
      }),
    (e: unknown) =>
      e instanceof GuestSetupError &&
      e.message === "runs[0]: hba0 has no disk at target 0 LUN 7 (found: 0:0, 0:1)",
  );
  await assert.rejects(
    () =>
      runGuest(env, {
        runs: [{ device: "disk0", lun: { target: 0, lun: 0 }, args: ["--rw=read"] }],
      }),
    /runs\[0\]: lun is for virtio-scsi; slot 3 is virtio-blk/,
  );
  await assert.rejects(
    () =>
      runGuest(env, {
        runs: [
          { device: "disk0", args: ["--rw=read", "--size=1m"] },
          { device: "hba0", lun: { target: 0, lun: 1 }, args: ["--name=w", "--rw=write"] },
        ],
      }),
    (e: unknown) =>
      e instanceof JobError && e.field === "runs[1].w.rw" && /read-only/.test(e.message),
  );
  await assert.rejects(
    () => runGuest(env, { args: ["--rw=read"], runs: [{ args: ["--rw=read"] }] }),
    /Give either runs or args for one run, not both/,
  );
  // An inline request on the SCSI host: the first LUN, the classic report.
  const inline = await runGuest(env, {
    device: "hba0",
    args: ["--rw=read", "--bs=64k", "--size=1m"],
  });
  assert.equal(inline.device.kind, "virtio-scsi");
  assert.equal(inline.device.capacity, 4 * MiB);
  assert.equal(inline.runs[0]!.lun?.lun, 0);
  assert.match(inline.report, /^total: jobs=1, /m);
  assert.doesNotMatch(inline.report, /^run 0:/m);
});
