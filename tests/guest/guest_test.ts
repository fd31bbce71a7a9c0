import assert from "node:assert/strict";
import { GuestSetupError, runGuest } from "../../src/guest/guest.ts";
import type { ExitNumbers } from "../../src/guest/report.ts";
import type { AccessSize, GuestBus } from "../../src/virtio/bus.ts";
import { FakeModel } from "../virtio/fake_model.ts";
import { FakeBlk, makeMachine, MMIO_WINDOW } from "./harness.ts";

/** Counts accesses as exits, the way the vCPU's exit bus would (every access traps here). */
function countingBus(
  inner: GuestBus,
  notifyBase: number,
): { bus: GuestBus; counters: ExitNumbers } {
  const counters = { config: 0, mmio: 0, doorbell: 0 };
  const bus: GuestBus = {
    configRead: (s, o, n) => (counters.config++, inner.configRead(s, o, n)),
    configWrite: (s, o, n, v) => (counters.config++, inner.configWrite(s, o, n, v)),
    mmioRead: (g, n) => (counters.mmio++, inner.mmioRead(g, n)),
    mmioWrite: (g: number, n: AccessSize, v: number) => {
      counters.mmio++;
      if (g >= notifyBase && g < notifyBase + 0x1000) counters.doorbell++;
      inner.mmioWrite(g, n, v);
    },
    ioRead: (port, n) => inner.ioRead(port, n),
    ioWrite: (port, n, v) => inner.ioWrite(port, n, v),
  };
  return { bus, counters };
}

Deno.test("runGuest() finds the disk, runs the jobs one queue per clone, and reports", async () => {
  const model = new FakeBlk({ diskBytes: 4 * 1024 * 1024, numQueues: 4 });
  const m = makeMachine(model);
  const { bus, counters } = countingBus(m.bus, m.fn.notifyAddress(0)!);
  const run = await runGuest(
    {
      bus,
      mem: m.mem,
      vcpu: m.vcpu,
      idle: () => model.processAll(),
      devices: [{ id: "disk0", type: "virtio-blk", slot: m.slot }],
      exitCounters: () => ({ ...counters }),
      mmioWindow: MMIO_WINDOW,
    },
    {
      args: [
        "--bs=4k",
        "--iodepth=8",
        "--size=1m",
        "--name=w",
        "--rw=randwrite",
        "--numjobs=2",
        "--offset_increment=1m",
        "--verify=crc32c",
        "--name=r",
        "--rw=randread",
        "--offset=2m",
      ],
    },
  );
  assert.equal(run.device.label, "disk0");
  assert.equal(run.device.queues, 3, "one per clone");
  assert.equal(run.device.interruptMode, "msix-per-queue");
  assert.equal(run.result.jobs.length, 3);
  for (const j of run.result.jobs) assert.equal(j.error, null);
  assert.deepEqual(run.result.jobs.map((j) => j.verify?.failed ?? null), [0, 0, null]);
  assert.equal(run.result.total.write.ops, 512);
  assert.equal(run.result.total.read.ops, 512 + 256);
  assert.deepEqual(run.virtio.queues.map((q) => q.requests), [512, 512, 256]);
  const exits = run.virtio.exits!;
  assert.equal(exits.doorbell, run.virtio.queues.reduce((n, q) => n + q.kicks, 0));
  assert.equal(exits.config, 0, "no config access during the run");
  assert.match(run.report, /^w: \(clone 0\): rw=randwrite, bs=4096, iodepth=8: err=0$/m);
  assert.match(run.report, /^ {2}disk0 queue 2: requests=256, /m);
  assert.match(run.report, /^ {2}exits: config=0, mmio=\d+ \(doorbells \d+\), per request=/m);
  assert.equal(m.fn.deviceStatus, 0, "the device is reset after the run");
  assert.deepEqual(structuredClone(run), run, "the result crosses a Worker boundary");
});

Deno.test("runGuest() reads INI job files and reports job errors by field", async () => {
  const model = new FakeBlk();
  const m = makeMachine(model);
  const env = { bus: m.bus, mem: m.mem, vcpu: m.vcpu, idle: () => model.processAll() };
  const run = await runGuest(env, {
    jobFile: "[seq]\nrw=write\nbs=64k\niodepth=4\nverify=pattern\nverify_pattern=0xc3\n",
  });
  assert.equal(run.result.jobs[0]!.verify!.checked, 16);
  assert.equal(model.disk[40], 0xc3);
  await assert.rejects(
    () => runGuest(env, { args: ["--bs=1000"] }),
    /--bs: 1000 is not a multiple/,
  );
  await assert.rejects(
    () => runGuest(env, { args: ["--bs=16m", "--rw=read"] }),
    /job0\.bs: 16777216 exceeds the target's largest transfer of 8388608/,
  );
  assert.equal(m.fn.deviceStatus, 0, "reset after a failed run too");
});

Deno.test("runGuest() explains when there is no virtio storage device", async () => {
  const m = makeMachine(new FakeModel(), {});
  // FakeModel claims to be virtio-blk (device id 2): hide it behind another id.
  const env = { bus: m.bus, mem: m.mem, vcpu: m.vcpu, idle: () => {} };
  await assert.rejects(
    () => runGuest(env, { args: ["--rw=read"], device: 9 }),
    (e: unknown) =>
      e instanceof GuestSetupError &&
      /No usable virtio-blk or virtio-scsi device in slot 9/.test(e.message),
  );
  await assert.rejects(
    () => runGuest(env, { args: ["--rw=read"], device: "nope" }),
    /No device "nope"/,
  );
});
