import assert from "node:assert/strict";
import { ScsiBuffer } from "../../src/scsi/buffer.ts";
import { ScsiBus } from "../../src/scsi/bus.ts";
import type { ScsiOutcome } from "../../src/scsi/request.ts";
import { SENSE_CODE } from "../../src/scsi/sense.ts";
import {
  assertCheck,
  assertGood,
  clearUa,
  drainUa,
  inquiry,
  makeDisk,
  read10,
  reportLuns,
  requestSense,
  tur,
} from "./scsi_helpers.ts";

async function exec(
  bus: ScsiBus,
  target: number,
  lun: number,
  cdb: number[],
  dataIn = 0,
): Promise<{ outcome: ScsiOutcome; data: Uint8Array }> {
  const data = new Uint8Array(dataIn);
  const io = { dataIn: ScsiBuffer.of(data), dataOut: ScsiBuffer.of(new Uint8Array(0)) };
  const outcome = await bus.execute(target, lun, bus.decode(target, lun, Uint8Array.from(cdb)), io);
  return { outcome, data };
}

async function busWith(luns: Array<[number, number]>): Promise<ScsiBus> {
  const bus = new ScsiBus();
  for (const [t, l] of luns) {
    const { disk } = await makeDisk(64 * 1024);
    await clearUa(disk);
    bus.attach(t, l, disk);
  }
  return bus;
}

Deno.test("ScsiBus: REPORT LUNS lists LUN 0 first, then the target's units", async () => {
  const bus = await busWith([[1, 0], [1, 5], [1, 300], [2, 7]]);
  // Attaching siblings raised REPORTED LUNS DATA HAS CHANGED; REPORT LUNS clears it.
  const r = await exec(bus, 1, 0, reportLuns(), 1024);
  assertGood(r.outcome);
  assert.equal(r.outcome.dataIn, 32);
  assert.equal(new DataView(r.data.buffer).getUint32(0), 24);
  assert.deepEqual([...r.data.subarray(16, 18)], [0x00, 5], "peripheral addressing");
  assert.deepEqual([...r.data.subarray(24, 26)], [0x41, 0x2c], "flat space addressing for 300");
  const short = await exec(bus, 1, 0, reportLuns(20), 1024);
  assert.equal(short.outcome.dataIn, 20, "truncated to the allocation length");
  // Target 2 has no LUN 0: the target answers REPORT LUNS there.
  const t2 = await exec(bus, 2, 0, reportLuns(), 1024);
  assertGood(t2.outcome);
  assert.equal(new DataView(t2.data.buffer).getUint32(0), 16);
  assert.equal(t2.data[16 + 1], 7);
});

Deno.test("ScsiBus: a missing LUN 0 answers INQUIRY with qualifier 001b and TEST UNIT READY", async () => {
  const bus = await busWith([[3, 2]]);
  const r = await exec(bus, 3, 0, inquiry(96), 96);
  assertGood(r.outcome);
  assert.equal(r.outcome.dataIn, 36);
  assert.equal(r.data[0], 0x3f);
  assert.equal(new TextDecoder().decode(r.data.subarray(16, 32)), "QEMU TARGET     ");
  assertGood((await exec(bus, 3, 0, tur())).outcome);
  assertCheck((await exec(bus, 3, 0, read10(0, 1), 512)).outcome, SENSE_CODE.INVALID_OPCODE);
  const rs = await exec(bus, 3, 0, requestSense(), 252);
  assertGood(rs.outcome);
  assert.equal(rs.data[2], 0, "NO SENSE");
});

Deno.test("ScsiBus: any other missing LUN is qualifier 011b and LOGICAL UNIT NOT SUPPORTED", async () => {
  const bus = await busWith([[0, 0]]);
  const r = await exec(bus, 0, 9, inquiry(96), 96);
  assertGood(r.outcome);
  assert.equal(r.data[0], 0x7f);
  assert.deepEqual([...r.data.subarray(1, 36)], new Array(35).fill(0));
  const vpd = await exec(bus, 0, 9, inquiry(96, true, 0), 96);
  assert.deepEqual([...vpd.data.subarray(0, 5)], [0x7f, 0, 0, 1, 0]);
  assertCheck(
    (await exec(bus, 0, 9, inquiry(96, true, 0x83), 96)).outcome,
    SENSE_CODE.INVALID_FIELD,
  );
  assertCheck((await exec(bus, 0, 9, tur())).outcome, SENSE_CODE.LUN_NOT_SUPPORTED);
  assertCheck((await exec(bus, 0, 9, read10(0, 1), 512)).outcome, SENSE_CODE.LUN_NOT_SUPPORTED);
  assertCheck((await exec(bus, 0, 9, reportLuns(), 512)).outcome, SENSE_CODE.LUN_NOT_SUPPORTED);
  const rs = await exec(bus, 0, 9, requestSense(), 252);
  assertGood(rs.outcome);
  assert.deepEqual([rs.data[2], rs.data[12]], [5, 0x25], "LOGICAL UNIT NOT SUPPORTED as data");
  assertCheck((await exec(bus, 0, 9, [0x04, 0, 0, 0, 0, 0])).outcome, SENSE_CODE.INVALID_OPCODE);
});

Deno.test("ScsiBus: plugging and unplugging raise REPORTED LUNS DATA HAS CHANGED on siblings", async () => {
  const bus = await busWith([[0, 0]]);
  const { disk } = await makeDisk(64 * 1024);
  bus.attach(0, 1, disk);
  assertCheck((await exec(bus, 0, 0, tur())).outcome, SENSE_CODE.REPORTED_LUNS_CHANGED);
  assertCheck((await exec(bus, 0, 1, tur())).outcome, SENSE_CODE.RESET, "the new unit is fresh");
  assertGood((await exec(bus, 0, 0, tur())).outcome);
  assert.equal(bus.detach(0, 1), disk);
  assertCheck((await exec(bus, 0, 0, tur())).outcome, SENSE_CODE.REPORTED_LUNS_CHANGED);
  assert.equal(bus.find(0, 1), undefined);
  bus.detach(0, 0);
  assert.equal(bus.hasTarget(0), false, "a target goes with its last unit");
});

Deno.test("ScsiBus checks addresses", async () => {
  const bus = new ScsiBus({ maxTarget: 3, maxLun: 10 });
  const { disk } = await makeDisk(4096);
  assert.throws(() => bus.attach(4, 0, disk), RangeError);
  assert.throws(() => bus.attach(0, 11, disk), RangeError);
  assert.throws(() => bus.attach(-1, 0, disk), RangeError);
  bus.attach(3, 10, disk);
  assert.throws(() => bus.attach(3, 10, disk), RangeError, "in use");
  assert.throws(() => bus.detach(3, 9), RangeError);
  assert.throws(() => new ScsiBus({ maxTarget: 256 }), RangeError);
  assert.throws(() => new ScsiBus({ maxLun: 16384 }), RangeError);
  assert.deepEqual(bus.units(3).map((u) => u.lun), [10]);
});

Deno.test("ScsiBus.resetTarget() resets every unit of the target only", async () => {
  const bus = await busWith([[0, 0], [0, 1], [1, 0]]);
  for (const { disk } of bus.all()) await drainUa(disk);
  bus.resetTarget(0);
  assertCheck((await exec(bus, 0, 0, tur())).outcome, SENSE_CODE.RESET);
  assertCheck((await exec(bus, 0, 1, tur())).outcome, SENSE_CODE.RESET);
  assertGood((await exec(bus, 1, 0, tur())).outcome);
});
