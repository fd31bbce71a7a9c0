/**
 * Several devices at once on a real machine: the vCPU Worker runs a verified job on a virtio-blk
 * over a qcow2 clone while it checks, read-only through a virtio-scsi LUN, the blocks of the
 * clone's backing image; both iothreads serve at once. Afterwards the machine shuts down and the
 * clone checks clean.
 */
import assert from "node:assert/strict";
import { createImage, openImage } from "../../formats/open.ts";
import { checkImage } from "../../formats/qcow2/check.ts";
import { Qcow2Node } from "../../formats/qcow2/qcow2.ts";
import type { GuestRunResult } from "../../src/guest/guest.ts";
import { parseJobArgs } from "../../src/guest/job.ts";
import type { VcpuPayload } from "../../src/guest/vcpu.ts";
import { fillBlock } from "../../src/guest/verify.ts";
import { Machine } from "../../src/machine/machine.ts";
import { within } from "../timeout.ts";

const VCPU = new URL("../../src/guest/vcpu.ts", import.meta.url);
const LIMIT_MS = 60_000;
const MiB = 1024 * 1024;

/** The job that "installed" the base image: 64 KiB fio blocks over its first 4 MiB. */
const BASE_JOB = [
  "--name=base",
  "--rw=write",
  "--bs=64k",
  "--size=4m",
  "--verify=crc32c",
  "--randseed=77",
];

/** Writes the blocks BASE_JOB would write, on the host, into a fresh qcow2. */
async function makeBase(path: string): Promise<void> {
  await createImage(path, "qcow2", 8 * MiB);
  const node = await openImage(path, { format: "qcow2" });
  try {
    const spec = parseJobArgs(BASE_JOB)[0]!;
    const stamp = {
      mode: "crc32c" as const,
      seed: spec.seed,
      pattern: Uint8Array.from(spec.verifyPattern),
    };
    const block = new Uint8Array(spec.bs);
    const view = new DataView(block.buffer);
    for (let offset = 0; offset < 4 * MiB; offset += spec.bs) {
      fillBlock(block, view, spec.bs, offset, stamp);
      await node.write(offset, block);
    }
    await node.flush();
  } finally {
    await node.close();
  }
}

Deno.test("a vCPU runs a verified job on a virtio-blk clone and a read-only check on a virtio-scsi LUN at once", async () => {
  const dir = await Deno.makeTempDir();
  const base = `${dir}/base.qcow2`;
  const clone = `${dir}/clone.qcow2`;
  await makeBase(base);
  await createImage(clone, "qcow2", 8 * MiB, { backingFile: "base.qcow2", backingFormat: "qcow2" });
  const machine = await Machine.create({
    memoryMiB: 64,
    devices: [
      { type: "virtio-blk", id: "clone", numQueues: 2, drive: { file: clone, format: "qcow2" } },
      {
        type: "virtio-scsi",
        id: "base",
        ioeventfd: false, // one device traps its kicks, the other rings ioeventfds
        drives: [{ file: base, format: "qcow2", readOnly: true }],
      },
    ],
  });
  try {
    const payload: VcpuPayload = {
      runs: [
        {
          device: "clone",
          args: [
            "--name=new",
            "--rw=randrw",
            "--rwmixread=50",
            "--bs=4k",
            "--iodepth=16",
            "--numjobs=2",
            "--offset=4m",
            "--size=2m",
            "--offset_increment=2m",
            "--verify=crc32c",
          ],
        },
        { device: "base", lun: { target: 0, lun: 0 }, args: [...BASE_JOB, "--verify_only"] },
      ],
    };
    const vcpu = await machine.startVcpu(VCPU, payload, { timeoutMs: LIMIT_MS });
    const run = await within(vcpu.result, LIMIT_MS, "the guest") as GuestRunResult;
    for (const j of run.result.jobs) {
      assert.equal(j.error, null, `${j.name}: ${JSON.stringify(j.error)}`);
    }
    const [cloneRun, baseRun] = run.runs;
    assert.equal(cloneRun!.kind, "virtio-blk");
    assert.equal(baseRun!.kind, "virtio-scsi");
    assert.deepEqual(baseRun!.lun, { target: 0, lun: 0 });
    // The clone's writes were read back; the base's 64 blocks all check, through SCSI, untouched.
    for (const j of cloneRun!.jobs) assert.equal(j.verify?.failed, 0);
    assert.ok(cloneRun!.jobs.every((j) => (j.verify?.checked ?? 0) > 0));
    assert.deepEqual(baseRun!.jobs[0]!.verify, { checked: 64, failed: 0, failures: [] });
    assert.equal(baseRun!.jobs[0]!.write.ops, 0);
    const scsi = run.devices.find((d) => d.kind === "virtio-scsi")!;
    assert.deepEqual(scsi.luns?.map((l) => [l.target, l.lun, l.readOnly, l.capacity]), [[
      0,
      0,
      true,
      8 * MiB,
    ]]);
    assert.equal(scsi.interruptMode, "msix-per-queue");
    // Exits per device: the clone's kicks ring ioeventfds, the base's trap.
    const blk = run.devices.find((d) => d.kind === "virtio-blk")!;
    const blkKicks = blk.virtio.queues.reduce((n, q) => n + q.kicks, 0);
    const scsiKicks = scsi.virtio.queues.reduce((n, q) => n + q.kicks, 0);
    assert.equal(blk.virtio.exits!.doorbell, 0);
    assert.equal(blk.virtio.exits!.ioeventfd, blkKicks);
    assert.equal(scsi.virtio.exits!.doorbell, scsiKicks);
    assert.equal(scsi.virtio.exits!.ioeventfd, 0);
    assert.equal(run.virtio.exits!.doorbell, scsiKicks);
    assert.equal(run.virtio.exits!.ioeventfd, blkKicks);
    assert.match(run.report, /^run 1: base lun 0:0 \(virtio-scsi, slot \d+\)$/m);
    // The VMM saw what the drivers reported.
    await machine.sync();
    const stats = machine.stats();
    const blkStats = stats.devices[0]!;
    for (const [q, queue] of blkStats.queues.entries()) {
      assert.equal(queue.driver?.kicks, blk.virtio.queues[q]!.kicks);
    }
    if (Deno.env.get("SHOW_REPORT")) console.log(run.report);
  } finally {
    await machine.shutdown();
  }
  // Shut down cleanly: the clone is a consistent qcow2 holding the guest's writes, the base intact.
  const node = await openImage(clone, { format: "qcow2", readOnly: true });
  try {
    assert.ok(node instanceof Qcow2Node);
    const report = checkImage(node);
    assert.equal(report.corruptions, 0);
    assert.equal(report.leaks, 0);
    assert.ok(report.allocatedClusters > 0, "the guest's writes are in the clone");
  } finally {
    await node.close();
  }
  await Deno.remove(dir, { recursive: true });
});
