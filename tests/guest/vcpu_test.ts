/**
 * The guest on a real vCPU Worker: the machine's iothread runs virtio-blk over a raw file, the
 * guest enumerates PCI through exits, runs a verified job, and the counters on both sides agree.
 */
import assert from "node:assert/strict";
import type { GuestRunResult } from "../../src/guest/guest.ts";
import type { VcpuPayload } from "../../src/guest/vcpu.ts";
import { Machine } from "../../src/machine/machine.ts";
import { within } from "../timeout.ts";

const VCPU = new URL("../../src/guest/vcpu.ts", import.meta.url);
const LIMIT_MS = 60_000;

async function rawImage(bytes: number): Promise<string> {
  const path = await Deno.makeTempFile({ suffix: ".raw" });
  await Deno.truncate(path, bytes);
  return path;
}

for (const ioeventfd of [true, false]) {
  Deno.test(`the guest runs a verified job on a vCPU Worker (ioeventfd=${ioeventfd})`, async () => {
    const image = await rawImage(8 * 1024 * 1024);
    const machine = await Machine.create({
      memoryMiB: 64,
      devices: [{
        type: "virtio-blk",
        id: "disk0",
        numQueues: 2,
        ioeventfd,
        drive: { file: image, format: "raw" },
      }],
    });
    try {
      const payload: VcpuPayload = {
        args: [
          "--bs=4k",
          "--iodepth=16",
          "--size=2m",
          "--name=w",
          "--rw=randwrite",
          "--numjobs=2",
          "--offset_increment=2m",
          "--verify=crc32c",
        ],
      };
      const vcpu = await machine.startVcpu(VCPU, payload, { timeoutMs: LIMIT_MS });
      const run = await within(vcpu.result, LIMIT_MS, "the guest") as GuestRunResult;
      assert.equal(run.device.label, "disk0");
      assert.equal(run.device.queues, 2);
      assert.equal(run.device.interruptMode, "msix-per-queue");
      for (const j of run.result.jobs) {
        assert.equal(j.error, null);
        assert.deepEqual(j.verify, { checked: 512, failed: 0, failures: [] });
      }
      assert.deepEqual(run.virtio.queues.map((q) => q.requests), [1024, 1024]);
      const exits = run.virtio.exits!;
      const kicks = run.virtio.queues.reduce((n, q) => n + q.kicks, 0);
      if (ioeventfd) {
        assert.equal(exits.doorbell, 0, "ioeventfd doorbells never exit");
        assert.equal(exits.ioeventfd, kicks);
      } else {
        assert.equal(exits.doorbell, kicks, "every kick traps");
      }
      assert.match(run.report, /^ {2}exits: config=0, mmio=\d+ \(doorbells \d+\)/m);

      // The VMM sees what the driver reported, and the device completed what the guest reaped.
      await machine.sync();
      const stats = machine.stats();
      const disk = stats.devices[0]!;
      for (const [q, queue] of disk.queues.entries()) {
        assert.equal(queue.driver?.kicks, run.virtio.queues[q]!.kicks);
        assert.equal(queue.driver?.chains, 1024);
      }
    } finally {
      await machine.shutdown();
      await Deno.remove(image);
    }
  });
}

Deno.test("a serving vCPU answers one run per request, and job errors come back named", async () => {
  const image = await rawImage(4 * 1024 * 1024);
  const machine = await Machine.create({
    memoryMiB: 32,
    devices: [{ type: "virtio-blk", id: "disk0", drive: { file: image, format: "raw" } }],
  });
  try {
    const vcpu = await machine.startVcpu(VCPU, { serve: true } satisfies VcpuPayload, {
      timeoutMs: LIMIT_MS,
    });
    const write = ["--rw=write", "--bs=64k", "--iodepth=4", "--verify=pattern", "--do_verify=0"];
    const first = await vcpu.request({ args: write }) as GuestRunResult;
    assert.equal(first.result.jobs[0]!.write.ops, 64);
    const check = await vcpu.request({ args: [...write, "--verify_only"] }) as GuestRunResult;
    assert.deepEqual(check.result.jobs[0]!.verify, { checked: 64, failed: 0, failures: [] });
    await assert.rejects(
      () => vcpu.request({ args: ["--iodepth=0"] }),
      /--iodepth: must be an integer/,
    );
  } finally {
    await machine.shutdown();
    await Deno.remove(image);
  }
});
