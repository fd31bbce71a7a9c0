/**
 * The guest's virtio-scsi front-end against the real VirtioScsiBackend on one thread: the LUN
 * scan, I/O checked against the block nodes, sense and response mapping, unit attentions, and the
 * event queue (hotplug, unplug, capacity change, EVENTS_MISSED).
 */
import assert from "node:assert/strict";
import { runOne } from "../../src/guest/block_target.ts";
import { parseJobArgs } from "../../src/guest/job.ts";
import { runWorkload } from "../../src/guest/workload.ts";
import { probeSlot } from "../../src/guest/pci_probe.ts";
import {
  describeSense,
  ScsiDriver,
  type ScsiDriverOptions,
  type ScsiLunEvent,
  type ScsiTarget,
} from "../../src/guest/scsi_driver.ts";
import { isPackedRing } from "../../src/virtio/device.ts";
import { RealMachine } from "./real_devices.ts";

const MiB = 1024 * 1024;

/** A machine with one virtio-scsi in slot 4 and the given LUNs plugged before the guest starts. */
async function scsiMachine(
  luns: Array<
    {
      target: number;
      lun: number;
      bytes: number;
      readOnly?: boolean;
      blockSize?: number;
      discard?: boolean;
    }
  >,
  deviceOptions: { packed?: boolean; numQueues?: number } = {},
) {
  const m = new RealMachine();
  const hba = m.addScsi("hba0", 4, {
    packed: deviceOptions.packed ?? true,
    numQueues: deviceOptions.numQueues ?? 2,
  });
  const disks = new Map<string, Awaited<ReturnType<typeof hba.plug>>>();
  for (const l of luns) {
    disks.set(
      `${l.target}:${l.lun}`,
      await hba.plug(l.target, l.lun, l.bytes, {
        ...(l.readOnly === undefined ? {} : { readOnly: l.readOnly }),
        ...(l.blockSize === undefined ? {} : { blockSize: l.blockSize }),
        ...(l.discard === undefined ? {} : { discard: l.discard }),
      }),
    );
  }
  m.ready();
  const platform = m.platform();
  const init = (options: ScsiDriverOptions = {}) =>
    ScsiDriver.init(platform, probeSlot(m.bus, hba.slot)!, options);
  const disk = (t: number, l: number) => disks.get(`${t}:${l}`)!;
  return { m, hba, platform, init, disk };
}

function firstDifference(a: Uint8Array, b: Uint8Array): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return -1;
}

Deno.test("ScsiDriver.init() scans the LUNs: disks with capacity, block size, WP and LBPU", async () => {
  const { m, init, hba } = await scsiMachine([
    { target: 0, lun: 0, bytes: 1 * MiB },
    { target: 0, lun: 3, bytes: 2 * MiB, readOnly: true, blockSize: 4096 },
    { target: 2, lun: 1, bytes: 3 * MiB, discard: false },
    // Beyond the scanned targets (0..7 by default): not found by the scan.
    { target: 9, lun: 0, bytes: 1 * MiB },
  ]);
  const seen: ScsiLunEvent[] = [];
  const driver = await init({ queues: 2 });
  driver.onLunEvent = (e) => seen.push(e);
  assert.equal(driver.numQueues, 2);
  assert.equal(driver.config.cdbSize, 32);
  assert.equal(driver.config.senseSize, 96);
  assert.equal(driver.config.maxTarget, 255);
  assert.equal(driver.virtio.interruptMode, "msix-per-queue");
  assert.deepEqual(
    driver.luns.map((l) => [l.target, l.lun, l.capacity, l.blockSize, l.readOnly, l.unmap]),
    [
      [0, 0, 1 * MiB, 512, false, true],
      [0, 3, 2 * MiB, 4096, true, true],
      [2, 1, 3 * MiB, 512, false, false],
    ],
  );
  const first = driver.luns[0]!;
  assert.equal(first.vendor, "QEMU");
  assert.equal(first.product, "QEMU HARDDISK");
  assert.equal(first.writeCache, true);
  assert.equal(first.maxUnmapBlocks, 1024 ** 3 / 512);
  assert.deepEqual(
    driver.lunEvents.map((e) => `${e.kind} ${e.target}:${e.lun} ${e.cause}`),
    ["added 0:0 scan", "added 0:3 scan", "added 2:1 scan"],
  );
  // Every fresh unit reported POWER ON, RESET to its TEST UNIT READY, which was retried.
  assert.ok(driver.eventStats.unitAttentions >= 3, `${driver.eventStats.unitAttentions} UAs`);
  assert.ok(driver.eventStats.retries >= 3);
  assert.equal(hba.backend.stats.eventsDropped, 0);
  // Scanning the others on demand: widen the bound with a fresh driver.
  driver.shutdown();
  const wide = await init({ scanTargets: 9 });
  assert.deepEqual(wide.luns.map((l) => `${l.target}:${l.lun}`), ["0:0", "0:3", "2:1", "9:0"]);
  wide.shutdown();
  assert.equal(seen.length, 0, "no events after the scan");
  assert.deepEqual(m.faults, []);
});

for (
  const [name, options, packed] of [
    ["split", {}, false],
    ["packed", { packed: true }, true],
    ["split without indirect or event idx", { indirect: false, eventIdx: false }, false],
  ] as [string, ScsiDriverOptions, boolean][]
) {
  Deno.test(`ScsiTarget (${name}): write, read, flush and trim reach the node`, async () => {
    const { m, init, disk } = await scsiMachine([{ target: 0, lun: 0, bytes: 4 * MiB }]);
    const driver = await init(options);
    assert.equal(isPackedRing(driver.features), packed);
    const node = disk(0, 0);
    const t = driver.openTarget({ lun: { target: 0, lun: 0 }, depth: 4, maxTransfer: 65536 });
    assert.equal(t.capacity, 4 * MiB);
    assert.equal(t.maxDiscard, 1024 ** 3);
    const pattern = new Uint8Array(65536).map((_, i) => (i * 13 + 5) & 0xff);
    assert.equal(
      await runOne(t, (r) => {
        r.op = "write";
        r.offset = 3 * MiB;
        r.length = 65536;
        r.data.set(pattern);
      }),
      "ok",
    );
    assert.equal(
      firstDifference(node.file.contents().subarray(3 * MiB, 3 * MiB + 65536), pattern),
      -1,
    );
    let back = new Uint8Array(0);
    assert.equal(
      await runOne(t, (r) => {
        r.op = "read";
        r.offset = 3 * MiB + 512;
        r.length = 8192;
        r.data.fill(0);
      }, (r) => {
        back = r.data.slice(0, 8192);
      }),
      "ok",
    );
    assert.equal(firstDifference(back, pattern.subarray(512, 512 + 8192)), -1);
    assert.equal(
      await runOne(t, (r) => {
        r.op = "flush";
        r.offset = 0;
        r.length = 0;
      }),
      "ok",
    );
    // UNMAP of 4 KiB in the middle of the pattern: zeroes there, the rest untouched.
    assert.equal(
      await runOne(t, (r) => {
        r.op = "discard";
        r.offset = 3 * MiB + 16384;
        r.length = 4096;
      }),
      "ok",
    );
    const after = node.file.contents().subarray(3 * MiB, 3 * MiB + 65536);
    assert.ok(after.subarray(16384, 20480).every((b) => b === 0));
    assert.equal(firstDifference(after.subarray(0, 16384), pattern.subarray(0, 16384)), -1);
    assert.equal(firstDifference(after.subarray(20480), pattern.subarray(20480)), -1);
    // Past the end: refused by the guest, never sent.
    const commands = driver.stats()[0]!.completions;
    assert.equal(
      await runOne(t, (r) => {
        r.op = "read";
        r.offset = 4 * MiB;
        r.length = 512;
      }),
      "ioerr",
    );
    assert.equal(driver.stats()[0]!.completions, commands);
    t.close();
    driver.shutdown();
    assert.equal(m.faults.length, 0);
  });
}

Deno.test("a read-only LUN answers writes with DATA PROTECT, named in the request's detail", async () => {
  const { init, disk } = await scsiMachine([
    { target: 1, lun: 2, bytes: 1 * MiB, readOnly: true },
  ]);
  const driver = await init();
  const lun = driver.findLun(1, 2)!;
  assert.equal(lun.readOnly, true);
  const t = driver.openTarget({ lun, depth: 2, maxTransfer: 4096 });
  assert.equal(t.readOnly, true);
  let detail = "";
  const status = await runOne(t, (r) => {
    r.op = "write";
    r.offset = 0;
    r.length = 4096;
    r.data.fill(0xee);
  }, (r) => detail = r.detail);
  assert.equal(status, "ioerr");
  assert.equal(detail, "CHECK CONDITION: DATA PROTECT 07/27/00 (write protected)");
  assert.ok(disk(1, 2).file.contents().subarray(0, 4096).every((b) => b === 0));
  // Reads work.
  assert.equal(
    await runOne(t, (r) => {
      r.op = "read";
      r.offset = 4096;
      r.length = 4096;
    }),
    "ok",
  );
  t.close();
  driver.shutdown();
  assert.equal(
    describeSense(6, 0x29, 0),
    "UNIT ATTENTION 06/29/00 (power on, reset, or bus device reset occurred)",
  );
});

Deno.test("after LOGICAL UNIT RESET the unit attention is retried once and the write succeeds", async () => {
  const { init, disk, hba } = await scsiMachine([{ target: 0, lun: 0, bytes: 1 * MiB }]);
  const driver = await init();
  const t = driver.openTarget({ lun: { target: 0, lun: 0 }, depth: 2, maxTransfer: 4096 });
  assert.equal(await driver.resetLun(0, 0), 0, "FUNCTION COMPLETE");
  assert.equal(hba.backend.find(0, 0)!.unitAttention?.asc, 0x29, "the unit holds POWER ON, RESET");
  const before = { ...driver.eventStats };
  const status = await runOne(t, (r) => {
    r.op = "write";
    r.offset = 8192;
    r.length = 4096;
    r.data.fill(0x5a);
  });
  assert.equal(status, "ok");
  assert.equal(driver.eventStats.unitAttentions, before.unitAttentions + 1);
  assert.equal(driver.eventStats.retries, before.retries + 1);
  assert.ok(disk(0, 0).file.contents().subarray(8192, 12288).every((b) => b === 0x5a));
  // A second reset with a retry budget of one: the reset UA, then the retry succeeds again.
  assert.equal(await driver.resetLun(0, 0), 0);
  assert.equal(
    await runOne(t, (r) => {
      r.op = "read";
      r.offset = 0;
      r.length = 512;
    }),
    "ok",
  );
  // A TMF to a LUN that does not exist is answered, not hung.
  assert.equal(await driver.resetLun(0, 5), 12, "INCORRECT_LUN");
  t.close();
  driver.shutdown();
});

Deno.test("a LUN hotplugged at run time appears through the event queue; unplugged, it is gone and its requests fail cleanly", async () => {
  const { m, init, hba } = await scsiMachine([{ target: 0, lun: 0, bytes: 1 * MiB }]);
  const driver = await init();
  const events: string[] = [];
  driver.onLunEvent = (e) => events.push(`${e.kind} ${e.target}:${e.lun} ${e.cause}`);
  assert.deepEqual(driver.luns.map((l) => `${l.target}:${l.lun}`), ["0:0"]);

  // Same target, and a new target.
  const added = await hba.plug(0, 1, 2 * MiB);
  await hba.plug(3, 0, 1 * MiB);
  assert.equal(hba.backend.stats.events, 2);
  assert.ok(await driver.waitForEvents() >= 2);
  assert.deepEqual(driver.luns.map((l) => `${l.target}:${l.lun}`), ["0:0", "0:1", "3:0"]);
  assert.deepEqual(events, ["added 0:1 rescan-event", "added 3:0 rescan-event"]);
  assert.equal(driver.findLun(0, 1)!.capacity, 2 * MiB);

  // I/O to the new LUN works, then a read is in the ring when the LUN goes away.
  const t = driver.openTarget({ lun: { target: 0, lun: 1 }, depth: 4, maxTransfer: 4096 });
  assert.equal(
    await runOne(t, (r) => {
      r.op = "write";
      r.offset = 0;
      r.length = 4096;
      r.data.fill(7);
    }),
    "ok",
  );
  assert.equal(added.file.contents()[100], 7);
  const inFlight = t.acquire()!;
  inFlight.op = "read";
  inFlight.offset = 0;
  inFlight.length = 4096;
  t.submit(inFlight);
  t.commit();
  const unplugged = await hba.backend.unplug(0, 1);
  assert.equal(unplugged, added.node);
  // The device answers the read for a LUN that is no longer there: the request fails, no hang.
  while (t.reap() === null) await t.wait();
  assert.equal(inFlight.status, "ioerr");
  assert.equal(
    inFlight.detail,
    "CHECK CONDITION: ILLEGAL REQUEST 05/25/00 (logical unit not supported)",
  );
  t.release(inFlight);
  await driver.processEvents();
  assert.deepEqual(driver.luns.map((l) => `${l.target}:${l.lun}`), ["0:0", "3:0"]);
  assert.equal(events.at(-1), "removed 0:1 removed-event");
  assert.equal(t.lun.removed, true);
  assert.equal(t.capacity, 0);
  let detail = "";
  assert.equal(
    await runOne(t, (r) => {
      r.op = "read";
      r.offset = 0;
      r.length = 512;
    }, (r) => detail = r.detail),
    "ioerr",
  );
  assert.equal(detail, "LUN 0:1 was removed");
  t.close();

  // The last LUN of target 3 goes: a request in flight there gets BAD_TARGET.
  const t3 = driver.openTarget({ lun: { target: 3, lun: 0 }, depth: 1, maxTransfer: 4096 });
  const r3 = t3.acquire()!;
  r3.op = "read";
  r3.offset = 0;
  r3.length = 4096;
  t3.submit(r3);
  t3.commit();
  await hba.backend.unplug(3, 0);
  while (t3.reap() === null) await t3.wait();
  assert.equal(r3.detail, "virtio-scsi response BAD_TARGET");
  t3.release(r3);
  t3.close();
  // The target's wait ran the REMOVED event's work while it waited (the guest's workqueue).
  assert.equal(await driver.processEvents(), 0);
  assert.deepEqual(driver.luns.map((l) => `${l.target}:${l.lun}`), ["0:0"]);
  assert.equal(driver.eventStats.transportResets, 4);
  driver.shutdown();
  assert.deepEqual(m.faults, []);
});

Deno.test("with no event buffer posted the device drops an event, and EVENTS_MISSED makes the driver rescan", async () => {
  const { init, hba } = await scsiMachine([{ target: 0, lun: 0, bytes: 1 * MiB }]);
  const driver = await init({ eventBuffers: 1 });
  const events: string[] = [];
  driver.onLunEvent = (e) => events.push(`${e.kind} ${e.target}:${e.lun} ${e.cause}`);
  await hba.plug(0, 1, 1 * MiB); // takes the only buffer
  await hba.plug(0, 2, 1 * MiB); // none left: dropped
  await hba.plug(5, 0, 1 * MiB); // dropped too
  assert.equal(hba.backend.stats.eventsDropped, 2);
  // Handling the first event re-posts its buffer; the device then reports what it dropped.
  await driver.waitForEvents();
  assert.deepEqual(events, ["added 0:1 rescan-event"]);
  await driver.waitForEvents();
  assert.equal(driver.eventStats.missed, 1);
  assert.deepEqual(events, [
    "added 0:1 rescan-event",
    "added 0:2 events-missed",
    "added 5:0 events-missed",
  ]);
  assert.deepEqual(driver.luns.map((l) => `${l.target}:${l.lun}`), ["0:0", "0:1", "0:2", "5:0"]);
  driver.shutdown();
});

Deno.test("PARAM_CHANGE after a resize re-reads the capacity; open targets see it", async () => {
  const { init, disk, hba } = await scsiMachine([{ target: 0, lun: 0, bytes: 1 * MiB }]);
  const driver = await init();
  const t = driver.openTarget({ lun: { target: 0, lun: 0 }, depth: 2, maxTransfer: 4096 });
  assert.equal(t.capacity, 1 * MiB);
  await disk(0, 0).node.truncate(3 * MiB);
  hba.backend.find(0, 0)!.capacityChanged();
  await driver.waitForEvents();
  assert.equal(driver.eventStats.paramChanges, 1);
  assert.deepEqual(driver.lunEvents.at(-1), {
    kind: "capacity-changed",
    target: 0,
    lun: 0,
    capacity: 3 * MiB,
    cause: "param-change",
  });
  assert.equal(t.capacity, 3 * MiB);
  // The probe's TEST UNIT READY took the CAPACITY DATA HAS CHANGED attention; I/O past the old
  // end now works.
  assert.equal(
    await runOne(t, (r) => {
      r.op = "write";
      r.offset = 2 * MiB;
      r.length = 4096;
    }),
    "ok",
  );
  t.close();
  driver.shutdown();
});

Deno.test("ScsiDriver.init() refuses a device that is not virtio-scsi, and bad options", async () => {
  const m = new RealMachine();
  const blk = await m.addBlk("d0", 3, 1 * MiB);
  m.ready();
  await assert.rejects(
    () => ScsiDriver.init(m.platform(), probeSlot(m.bus, blk.slot)!),
    /virtio device id 2 is not a SCSI host/,
  );
  const { init } = await scsiMachine([]);
  await assert.rejects(() => init({ cdbSize: 10 }), /cdbSize 10 is not 16\.\.255/);
  const empty = await init();
  assert.deepEqual(empty.luns, []);
  assert.throws(
    () => empty.openTarget({ lun: { target: 0, lun: 0 } }),
    /No disk at target 0 LUN 0 \(found: none\)/,
  );
  empty.shutdown();
});

Deno.test("without CHANGE, a resize shows as CAPACITY DATA HAS CHANGED on the next command: retried, then re-read", async () => {
  const { init, disk, hba } = await scsiMachine([{ target: 0, lun: 0, bytes: 1 * MiB }]);
  const driver = await init({ change: false });
  const t = driver.openTarget({ lun: { target: 0, lun: 0 }, depth: 2, maxTransfer: 4096 });
  await disk(0, 0).node.truncate(2 * MiB);
  hba.backend.find(0, 0)!.capacityChanged();
  assert.equal(hba.backend.stats.events, 0, "no PARAM_CHANGE without the feature");
  const retries = driver.eventStats.retries;
  assert.equal(
    await runOne(t, (r) => {
      r.op = "read";
      r.offset = 0;
      r.length = 4096;
    }),
    "ok",
  );
  assert.equal(driver.eventStats.retries, retries + 1, "the unit attention was retried");
  // The re-read ran in the target's wait, while the retried read was in flight.
  assert.equal(t.capacity, 2 * MiB);
  assert.equal(await driver.processEvents(), 0);
  assert.equal(driver.lunEvents.at(-1)?.cause, "unit-attention");
  t.close();
  driver.shutdown();
});

Deno.test("a LUN hotplugged while a workload runs appears during the run (a target's wait runs the event work)", async () => {
  const { m, init, hba } = await scsiMachine([{ target: 0, lun: 0, bytes: 1 * MiB }]);
  const driver = await init();
  let plugged = false;
  let seenDuringRun = false;
  // The host hotplugs a disk while the guest halts for the 5th time in the run.
  const start = m.idles;
  m.onIdle = async (idles) => {
    if (idles === start + 5) {
      plugged = true;
      await hba.plug(0, 5, 1 * MiB);
    }
  };
  const jobs = parseJobArgs(["--name=r", "--rw=randread", "--bs=4k", "--iodepth=4", "--size=1m"]);
  const result = await runWorkload(jobs, {
    openTarget: () => {
      const t = driver.openTarget({ lun: { target: 0, lun: 0 }, depth: 4, maxTransfer: 4096 });
      const wait = t.wait.bind(t);
      t.wait = () => {
        if (driver.findLun(0, 5) !== undefined) seenDuringRun = true;
        return wait();
      };
      return t;
    },
    closeTarget: (t) => (t as ScsiTarget).close(),
  });
  assert.equal(result.jobs[0]!.error, null);
  assert.equal(result.total.read.ops, 256);
  assert.ok(plugged);
  assert.ok(seenDuringRun, "the new LUN was there before the run ended");
  // Whichever came first found it: the RESCAN event, or the REPORTED LUNS DATA HAS CHANGED
  // attention the next read to 0:0 got (the other then finds it known).
  const added = driver.lunEvents.filter((e) => e.kind === "added" && e.lun === 5);
  assert.equal(added.length, 1);
  assert.ok(["rescan-event", "unit-attention"].includes(added[0]!.cause));
  assert.equal(driver.eventStats.transportResets, 1);
  assert.ok(driver.eventStats.unitAttentions >= 2, "power-on at the scan, LUNs changed in the run");
  driver.shutdown();
});
