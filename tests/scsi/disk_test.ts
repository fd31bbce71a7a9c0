import assert from "node:assert/strict";
import { RawNode } from "../../formats/raw.ts";
import type { BlockNode } from "../../src/block/node.ts";
import { MemoryFile } from "../../src/host/memory.ts";
import { ScsiDisk } from "../../src/scsi/disk.ts";
import { SENSE_CODE, type SenseCode } from "../../src/scsi/sense.ts";
import {
  assertCheck,
  assertGood,
  clearUa,
  failingNode,
  inquiry,
  makeDisk,
  modeSelect10,
  modeSelect6,
  modeSense10,
  modeSense6,
  read10,
  read12,
  read16,
  read6,
  readCapacity10,
  readCapacity16,
  reportLuns,
  requestSense,
  run,
  startStop,
  sync10,
  sync16,
  tur,
  unmapCdb,
  unmapParams,
  verify10,
  verify16,
  write10,
  write12,
  write16,
  write6,
  writeSame10,
  writeSame16,
} from "./scsi_helpers.ts";

const MiB = 1 << 20;

async function ready(options: ConstructorParameters<typeof ScsiDisk>[1] = {}, size = MiB) {
  const made = await makeDisk(size, options);
  await clearUa(made.disk);
  return made;
}

function ascii(bytes: Uint8Array): string {
  return new TextDecoder().decode(bytes);
}

function pattern(n: number, seed: number): Uint8Array {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = (i * 13 + seed * 101 + 1) & 0xff;
  return out;
}

async function nodeBytes(node: BlockNode, offset: number, length: number): Promise<Uint8Array> {
  const out = new Uint8Array(length);
  await node.read(offset, out);
  return out;
}

// ---- Unit attention ------------------------------------------------------------------------------

Deno.test("ScsiDisk reports POWER ON, RESET to the first command, then clears it", async () => {
  const { disk } = await makeDisk();
  assert.deepEqual(disk.unitAttention, SENSE_CODE.RESET);
  assertCheck((await run(disk, read10(0, 1), { dataIn: 512 })).outcome, SENSE_CODE.RESET);
  assert.equal(disk.unitAttention, null);
  assertGood((await run(disk, read10(0, 1), { dataIn: 512 })).outcome);
});

Deno.test("ScsiDisk: INQUIRY and REPORT LUNS neither report nor clear a reset unit attention", async () => {
  const { disk } = await makeDisk();
  assertGood((await run(disk, inquiry(36), { dataIn: 36 })).outcome);
  assertGood((await run(disk, reportLuns(64), { dataIn: 64 })).outcome);
  assertCheck((await run(disk, tur())).outcome, SENSE_CODE.RESET);
});

Deno.test("ScsiDisk: REQUEST SENSE returns a pending unit attention as data and clears it", async () => {
  const { disk } = await makeDisk();
  const r = await run(disk, requestSense(18), { dataIn: 18 });
  assertGood(r.outcome);
  assert.equal(r.outcome.dataIn, 18);
  assert.equal(r.data[0], 0x70);
  assert.equal(r.data[2], 0x06);
  assert.equal(r.data[12], 0x29);
  assert.equal(disk.unitAttention, null);
  assertGood((await run(disk, tur())).outcome);
  // Now there is nothing to report.
  const again = await run(disk, requestSense(18), { dataIn: 18 });
  assert.equal(again.data[2], 0);
  assert.equal(again.data[12], 0);
});

Deno.test("ScsiDisk: a unit attention outranks an invalid opcode", async () => {
  const { disk } = await makeDisk();
  assertCheck((await run(disk, [0x04, 0, 0, 0, 0, 0])).outcome, SENSE_CODE.RESET);
  assertCheck((await run(disk, [0x04, 0, 0, 0, 0, 0])).outcome, SENSE_CODE.INVALID_OPCODE);
});

Deno.test("ScsiDisk: reset() re-establishes POWER ON, RESET over other conditions", async () => {
  const { disk } = await ready();
  disk.setUnitAttention(SENSE_CODE.REPORTED_LUNS_CHANGED);
  disk.reset();
  assertCheck((await run(disk, tur())).outcome, SENSE_CODE.RESET);
  assertGood((await run(disk, tur())).outcome);
  // A pending reset is not displaced by a less important condition.
  disk.reset();
  disk.setUnitAttention(SENSE_CODE.CAPACITY_CHANGED);
  assertCheck((await run(disk, tur())).outcome, SENSE_CODE.RESET);
});

Deno.test("ScsiDisk notices a resized node: CAPACITY DATA HAS CHANGED and a report", async () => {
  const { disk, node } = await ready();
  const reports: SenseCode[] = [];
  disk.onChange = (code) => reports.push(code);
  await node.truncate(2 * MiB);
  assertCheck(
    (await run(disk, readCapacity10(), { dataIn: 8 })).outcome,
    SENSE_CODE.CAPACITY_CHANGED,
  );
  assert.deepEqual(reports, [SENSE_CODE.CAPACITY_CHANGED]);
  const rc = await run(disk, readCapacity10(), { dataIn: 8 });
  assertGood(rc.outcome);
  assert.equal(new DataView(rc.data.buffer).getUint32(0), 2 * MiB / 512 - 1);
  // The new blocks are addressable at once.
  assertGood((await run(disk, read10(2 * MiB / 512 - 1, 1), { dataIn: 512 })).outcome);
});

Deno.test("ScsiDisk.capacityChanged() raises the unit attention even without a size change", async () => {
  const { disk } = await ready();
  let reports = 0;
  disk.onChange = () => reports++;
  disk.capacityChanged();
  assert.equal(reports, 1);
  assertCheck((await run(disk, tur())).outcome, SENSE_CODE.CAPACITY_CHANGED);
  assertGood((await run(disk, tur())).outcome);
});

Deno.test("ScsiDisk: REPORT LUNS clears REPORTED LUNS DATA HAS CHANGED only", async () => {
  const { disk } = await ready();
  disk.setUnitAttention(SENSE_CODE.REPORTED_LUNS_CHANGED);
  assertGood((await run(disk, reportLuns(), { dataIn: 1024 })).outcome);
  assert.equal(disk.unitAttention, null);
  disk.setUnitAttention(SENSE_CODE.CAPACITY_CHANGED);
  assertGood((await run(disk, reportLuns(), { dataIn: 1024 })).outcome);
  assertCheck((await run(disk, tur())).outcome, SENSE_CODE.CAPACITY_CHANGED);
});

// ---- INQUIRY -------------------------------------------------------------------------------------

Deno.test("ScsiDisk: standard INQUIRY data is QEMU scsi-hd's", async () => {
  const { disk } = await ready();
  const r = await run(disk, inquiry(96), { dataIn: 96 });
  assertGood(r.outcome);
  assert.equal(r.outcome.dataIn, 36, "36 bytes of standard data, whatever the allocation");
  const d = r.data;
  assert.equal(d[0], 0x00, "connected direct-access device");
  assert.equal(d[1], 0x00, "not removable");
  assert.equal(d[2], 0x05, "SPC-3");
  assert.equal(d[3], 0x12, "HISUP, format 2");
  assert.equal(d[4], 31);
  assert.equal(d[7], 0x12, "SYNC, CMDQUE");
  assert.equal(ascii(d.subarray(8, 16)), "QEMU    ");
  assert.equal(ascii(d.subarray(16, 32)), "QEMU HARDDISK   ");
  assert.equal(ascii(d.subarray(32, 36)), "2.5+");
});

Deno.test("ScsiDisk: INQUIRY truncates to the allocation length and the buffer", async () => {
  const { disk } = await ready({ vendor: "VSTOR", product: "disk" });
  const r = await run(disk, inquiry(5), { dataIn: 96 });
  assert.equal(r.outcome.dataIn, 5);
  assert.equal(r.data[4], 31, "ADDITIONAL LENGTH still names all the data");
  const short = await run(disk, inquiry(96), { dataIn: 20 });
  assert.equal(short.outcome.dataIn, 20);
  assert.equal(ascii(short.data.subarray(8, 16)), "VSTOR   ");
  const none = await run(disk, inquiry(0), { dataIn: 0 });
  assertGood(none.outcome);
  assert.equal(none.outcome.dataIn, 0);
});

Deno.test("ScsiDisk: VPD 00h lists the pages, 80h only with a serial", async () => {
  const plain = (await ready()).disk;
  const p = await run(plain, inquiry(255, true, 0x00), { dataIn: 255 });
  assert.deepEqual([...p.data.subarray(0, 4 + p.data[3]!)], [
    0,
    0,
    0,
    5,
    0x00,
    0x83,
    0xb0,
    0xb1,
    0xb2,
  ]);
  assertCheck(
    (await run(plain, inquiry(255, true, 0x80), { dataIn: 255 })).outcome,
    SENSE_CODE.INVALID_FIELD,
  );

  const serial = (await ready({ serial: "SN-0001" })).disk;
  const ps = await run(serial, inquiry(255, true, 0x00), { dataIn: 255 });
  assert.deepEqual([...ps.data.subarray(4, 10)], [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
  const sn = await run(serial, inquiry(255, true, 0x80), { dataIn: 255 });
  assert.deepEqual([...sn.data.subarray(0, 4)], [0, 0x80, 0, 7]);
  assert.equal(ascii(sn.data.subarray(4, 11)), "SN-0001");
  assert.equal(sn.outcome.dataIn, 11);
});

Deno.test("ScsiDisk: VPD 83h carries the device identifier and a NAA name", async () => {
  const { disk } = await ready({
    serial: "SERIAL-NUMBER-LONGER-THAN-20",
    wwn: 0x5000c50012345678n,
  });
  const r = await run(disk, inquiry(255, true, 0x83), { dataIn: 255 });
  const d = r.data;
  assert.equal(d[1], 0x83);
  // ASCII vendor-specific designator: the serial's first 20 characters (QEMU's default).
  assert.deepEqual([...d.subarray(4, 8)], [0x02, 0x00, 0x00, 20]);
  assert.equal(ascii(d.subarray(8, 28)), "SERIAL-NUMBER-LONGER");
  assert.deepEqual([...d.subarray(28, 32)], [0x01, 0x03, 0x00, 8]);
  assert.deepEqual([...d.subarray(32, 40)], [0x50, 0x00, 0xc5, 0x00, 0x12, 0x34, 0x56, 0x78]);
  assert.equal((d[2]! << 8) | d[3]!, 36);
  // Without a serial the node's filename identifies the unit.
  const plain = (await ready()).disk;
  const p = await run(plain, inquiry(255, true, 0x83), { dataIn: 255 });
  assert.equal(ascii(p.data.subarray(8, 8 + p.data[7]!)), "mem.img");
});

Deno.test("ScsiDisk: VPD B0h, B1h and B2h report limits, a non-rotating medium and provisioning", async () => {
  const { disk } = await ready();
  const b0 = (await run(disk, inquiry(255, true, 0xb0), { dataIn: 255 })).data;
  const v = new DataView(b0.buffer);
  assert.equal(v.getUint16(2), 0x3c);
  assert.equal(b0[4], 1, "WSNZ");
  assert.equal(v.getUint32(8), Math.floor(0x7fffffff / 512), "MAXIMUM TRANSFER LENGTH");
  assert.equal(v.getUint32(20), (1 << 30) / 512, "MAXIMUM UNMAP LBA COUNT");
  assert.equal(v.getUint32(24), 255, "MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT");
  assert.equal(v.getUint32(28), 8, "OPTIMAL UNMAP GRANULARITY: 4 KiB");
  assert.equal(
    v.getBigUint64(36),
    BigInt(Math.floor(0x7fffffff / 512)),
    "MAXIMUM WRITE SAME LENGTH",
  );

  const b1 = (await run(disk, inquiry(255, true, 0xb1), { dataIn: 255 })).data;
  assert.equal(new DataView(b1.buffer).getUint16(2), 0x3c);
  assert.equal(new DataView(b1.buffer).getUint16(4), 1, "non-rotating medium");

  const b2 = (await run(disk, inquiry(255, true, 0xb2), { dataIn: 255 })).data;
  assert.deepEqual([...b2.subarray(0, 8)], [0, 0xb2, 0, 4, 0, 0xe0, 0x02, 0]);

  const noDiscard = (await ready({ discard: false })).disk;
  const nb2 = (await run(noDiscard, inquiry(255, true, 0xb2), { dataIn: 255 })).data;
  assert.equal(nb2[5], 0, "no LBPU/LBPWS without discard");
  const nb0 = new DataView(
    (await run(noDiscard, inquiry(255, true, 0xb0), { dataIn: 255 })).data.buffer,
  );
  assert.equal(nb0.getUint32(20), 0);
});

Deno.test("ScsiDisk: an unknown VPD page is INVALID FIELD IN CDB", async () => {
  const { disk } = await ready();
  for (const page of [0x81, 0x86, 0xb3, 0xff]) {
    assertCheck(
      (await run(disk, inquiry(255, true, page), { dataIn: 255 })).outcome,
      SENSE_CODE.INVALID_FIELD,
    );
  }
});

// ---- READ CAPACITY ------------------------------------------------------------------------------

Deno.test("ScsiDisk: READ CAPACITY (10) and (16) report the last LBA and block size", async () => {
  // A raw file of 3 MiB + 300 bytes is 3 MiB + 512 bytes long, as QEMU rounds it to sectors.
  const { disk } = await ready({}, 3 * MiB + 300);
  const rc10 = await run(disk, readCapacity10(), { dataIn: 8 });
  const v10 = new DataView(rc10.data.buffer);
  assert.equal(v10.getUint32(0), 3 * MiB / 512);
  assert.equal(v10.getUint32(4), 512);
  const rc16 = await run(disk, readCapacity16(32), { dataIn: 32 });
  const v16 = new DataView(rc16.data.buffer);
  assert.equal(v16.getBigUint64(0), BigInt(3 * MiB / 512));
  assert.equal(v16.getUint32(8), 512);
  assert.equal(rc16.data[14], 0x80, "LBPME");
  assert.equal(rc16.outcome.dataIn, 32);
  const cut = await run(disk, readCapacity16(12), { dataIn: 32 });
  assert.equal(cut.outcome.dataIn, 12);

  // With 4 KiB blocks a partial last block is not addressable.
  const big = (await ready({ blockSize: 4096, discard: false }, MiB + 1024)).disk;
  const b16 = await run(big, readCapacity16(), { dataIn: 32 });
  assert.equal(new DataView(b16.data.buffer).getUint32(8), 4096);
  assert.equal(new DataView(b16.data.buffer).getBigUint64(0), 255n);
  assert.equal(b16.data[14], 0, "no LBPME without discard");
});

Deno.test("ScsiDisk: READ CAPACITY (10) clips at 2^32 blocks; an empty disk is NOT READY", async () => {
  const huge = fakeNode(2 ** 45);
  const disk = new ScsiDisk(huge);
  await clearUa(disk);
  const rc10 = await run(disk, readCapacity10(), { dataIn: 8 });
  assert.equal(new DataView(rc10.data.buffer).getUint32(0), 0xffffffff);
  const rc16 = await run(disk, readCapacity16(), { dataIn: 32 });
  assert.equal(new DataView(rc16.data.buffer).getBigUint64(0), BigInt(2 ** 45 / 512 - 1));
  // MODE SENSE's short block descriptor clamps too.
  const ms = await run(disk, modeSense6(0x08), { dataIn: 255 });
  assert.equal(new DataView(ms.data.buffer).getUint32(4), 0xffffffff);

  const empty = new ScsiDisk(fakeNode(0));
  await clearUa(empty);
  assertCheck(
    (await run(empty, readCapacity10(), { dataIn: 8 })).outcome,
    SENSE_CODE.LUN_NOT_READY,
  );
  assertCheck(
    (await run(empty, readCapacity16(), { dataIn: 32 })).outcome,
    SENSE_CODE.LUN_NOT_READY,
  );
});

/** A node of `size` bytes that holds nothing (for capacity reporting only). */
function fakeNode(size: number): BlockNode {
  const fail = () => Promise.reject(new Error("no data"));
  return {
    format: "raw",
    filename: "fake",
    size,
    readOnly: true,
    requestAlignment: 1,
    read: fail,
    write: fail,
    writeZeroes: fail,
    discard: fail,
    flush: () => Promise.resolve(),
    blockStatus: fail,
    close: () => Promise.resolve(),
  };
}

// ---- READ / WRITE --------------------------------------------------------------------------------

Deno.test("ScsiDisk: WRITE and READ (6/10/12/16) round-trip through the node", async () => {
  const { disk, node } = await ready();
  const cases: Array<[number[], number[], number, number]> = [
    [write6(1, 2), read6(1, 2), 1, 2],
    [write10(10, 3, 0x08), read10(10, 3, 0x08), 10, 3],
    [write12(100, 4), read12(100, 4), 100, 4],
    [write16(2000, 5), read16(2000, 5), 2000, 5],
  ];
  let seed = 0;
  for (const [w, r, lba, blocks] of cases) {
    const data = pattern(blocks * 512, ++seed);
    const wr = await run(disk, w, { dataOut: data });
    assertGood(wr.outcome);
    assert.equal(wr.outcome.dataOut, data.length);
    assert.deepEqual(await nodeBytes(node, lba * 512, data.length), data, `node after ${w[0]}`);
    const rd = await run(disk, r, { dataIn: blocks * 512 });
    assertGood(rd.outcome);
    assert.equal(rd.outcome.dataIn, data.length);
    assert.deepEqual(rd.data, data, `read back with ${r[0]}`);
  }
});

Deno.test("ScsiDisk: READ (6) with length 0 reads 256 blocks", async () => {
  const { disk, node } = await ready();
  const r = await run(disk, read6(0, 0), { dataIn: 256 * 512 });
  assertGood(r.outcome);
  assert.deepEqual(r.data, await nodeBytes(node, 0, 256 * 512));
});

Deno.test("ScsiDisk: LBA OUT OF RANGE for transfers past the end, none for an empty one at it", async () => {
  const { disk } = await ready(); // 2048 blocks
  assertCheck(
    (await run(disk, read10(2048, 1), { dataIn: 512 })).outcome,
    SENSE_CODE.LBA_OUT_OF_RANGE,
  );
  assertCheck(
    (await run(disk, read10(2047, 2), { dataIn: 1024 })).outcome,
    SENSE_CODE.LBA_OUT_OF_RANGE,
  );
  assertCheck(
    (await run(disk, write16(2 ** 40, 1), { dataOut: new Uint8Array(512) })).outcome,
    SENSE_CODE.LBA_OUT_OF_RANGE,
  );
  const cdb = read16(0, 1);
  cdb[2] = 0xff;
  assertCheck((await run(disk, cdb, { dataIn: 512 })).outcome, SENSE_CODE.LBA_OUT_OF_RANGE);
  assertGood((await run(disk, read10(2047, 1), { dataIn: 512 })).outcome);
  assertGood((await run(disk, read10(2048, 0))).outcome);
  assertCheck((await run(disk, read10(2049, 0))).outcome, SENSE_CODE.LBA_OUT_OF_RANGE);
  // The failed command's sense is what REQUEST SENSE returns next.
  await run(disk, read10(5000, 1), { dataIn: 512 });
  const rs = await run(disk, requestSense(), { dataIn: 252 });
  assert.equal(rs.outcome.dataIn, 18);
  assert.equal(rs.data[2], 5);
  assert.equal(rs.data[12], 0x21);
  const after = await run(disk, requestSense(), { dataIn: 252 });
  assert.equal(after.data[12], 0, "REQUEST SENSE completed GOOD: nothing pending");
});

Deno.test("ScsiDisk: REQUEST SENSE in descriptor format", async () => {
  const { disk } = await ready();
  await run(disk, read10(5000, 1), { dataIn: 512 });
  const r = await run(disk, requestSense(252, true), { dataIn: 252 });
  assert.deepEqual([...r.data.subarray(0, 8)], [0x72, 5, 0x21, 0, 0, 0, 0, 0]);
  assert.equal(r.outcome.dataIn, 8);
});

Deno.test("ScsiDisk: a read-only unit refuses every write with DATA PROTECT", async () => {
  for (const how of ["option", "node"] as const) {
    const made = how === "option"
      ? await makeDisk(MiB, { readOnly: true })
      : await makeDisk(MiB, {}, { readOnly: true });
    const { disk, node } = made;
    await clearUa(disk);
    assert.equal(disk.readOnly, true);
    const before = await nodeBytes(node, 0, 4096);
    const block = new Uint8Array(512).fill(9);
    assertCheck(
      (await run(disk, write10(0, 1), { dataOut: block })).outcome,
      SENSE_CODE.WRITE_PROTECTED,
      how,
    );
    assertCheck(
      (await run(disk, write6(0, 1), { dataOut: block })).outcome,
      SENSE_CODE.WRITE_PROTECTED,
    );
    assertCheck(
      (await run(disk, writeSame16(0, 8), { dataOut: block })).outcome,
      SENSE_CODE.WRITE_PROTECTED,
    );
    const params = unmapParams([[0, 8]]);
    assertCheck(
      (await run(disk, unmapCdb(params.length), { dataOut: params })).outcome,
      SENSE_CODE.WRITE_PROTECTED,
    );
    assert.deepEqual(await nodeBytes(node, 0, 4096), before);
    assertGood((await run(disk, read10(0, 8), { dataIn: 4096 })).outcome);
    const ms = await run(disk, modeSense6(0x3f), { dataIn: 255 });
    assert.equal(ms.data[2]! & 0x80, 0x80, "WP in the device-specific parameter");
    assertGood((await run(disk, sync10())).outcome);
  }
});

Deno.test("ScsiDisk: block-layer errors become MEDIUM ERROR sense", async () => {
  const { node } = await makeDisk();
  const disk = new ScsiDisk(failingNode(node));
  await clearUa(disk);
  assertCheck((await run(disk, read10(0, 1), { dataIn: 512 })).outcome, SENSE_CODE.READ_ERROR);
  assertCheck(
    (await run(disk, write10(0, 1), { dataOut: new Uint8Array(512) })).outcome,
    SENSE_CODE.WRITE_ERROR,
  );
  assertCheck((await run(disk, sync16())).outcome, SENSE_CODE.WRITE_ERROR);
  const ro = new ScsiDisk(failingNode(node, "read-only"));
  await clearUa(ro);
  assertCheck(
    (await run(ro, write10(0, 1), { dataOut: new Uint8Array(512) })).outcome,
    SENSE_CODE.WRITE_PROTECTED,
  );
});

Deno.test("ScsiDisk: the error policy reports, ignores, or holds a failed command (werror/rerror)", async () => {
  const { node } = await makeDisk();
  const seen: Array<[boolean, string]> = [];
  const disk = (decision: "report" | "ignore" | "stop") =>
    new ScsiDisk(failingNode(node), {
      errorPolicy: (e, write) => {
        seen.push([write, e instanceof Error ? e.message : String(e)]);
        return decision;
      },
    });
  const report = disk("report");
  await clearUa(report);
  assertCheck((await run(report, read10(0, 1), { dataIn: 512 })).outcome, SENSE_CODE.READ_ERROR);
  const ignore = disk("ignore");
  await clearUa(ignore);
  assertGood((await run(ignore, read10(0, 1), { dataIn: 512 })).outcome);
  assertGood((await run(ignore, write10(0, 1), { dataOut: new Uint8Array(512) })).outcome);
  const stop = disk("stop");
  await clearUa(stop);
  const held = (await run(stop, write10(0, 1), { dataOut: new Uint8Array(512) })).outcome;
  assertCheck(held, SENSE_CODE.WRITE_ERROR);
  assert.equal(held.held?.write, true);
  assert.ok(held.held?.error instanceof Error);
  assert.equal((await run(stop, sync16())).outcome.held?.write, true, "a failed flush is a write");
  assert.equal((await run(stop, read10(0, 1), { dataIn: 512 })).outcome.held?.write, false);
  assert.deepEqual(seen.map(([write]) => write), [false, false, true, true, true, false]);
});

Deno.test("ScsiDisk: with WCE off every write is forced to the medium", async () => {
  const { node } = await makeDisk();
  let fuaWrites = 0;
  let flushes = 0;
  const spy: BlockNode = {
    format: node.format,
    filename: node.filename,
    size: node.size,
    readOnly: false,
    requestAlignment: 1,
    read: (o, d) => node.read(o, d),
    write: (o, s, opts) => {
      if (opts?.fua) fuaWrites++;
      return node.write(o, s, opts);
    },
    writeZeroes: (o, l, opts) => node.writeZeroes(o, l, opts),
    discard: (o, l) => node.discard(o, l),
    flush: () => {
      flushes++;
      return node.flush();
    },
    blockStatus: (o, m) => node.blockStatus(o, m),
    close: () => node.close(),
  };
  const disk = new ScsiDisk(spy, { writeCache: false });
  await clearUa(disk);
  await run(disk, write10(0, 1), { dataOut: new Uint8Array(512) });
  assert.equal(fuaWrites, 1);
  const cached = new ScsiDisk(spy);
  await clearUa(cached);
  await run(cached, write10(0, 1), { dataOut: new Uint8Array(512) });
  assert.equal(fuaWrites, 1, "no FUA with the write cache on");
  await run(cached, write10(0, 1, 0x08), { dataOut: new Uint8Array(512) });
  assert.equal(fuaWrites, 2, "FUA bit");
  await run(cached, read10(0, 1, 0x08), { dataIn: 512 });
  assert.equal(flushes, 1, "a FUA read writes the cache back first");
});

// ---- WRITE SAME, UNMAP, VERIFY, SYNCHRONIZE CACHE -----------------------------------------------

Deno.test("ScsiDisk: WRITE SAME replicates a block; zero data and NDOB write zeroes", async () => {
  const { disk, node } = await ready();
  const block = pattern(512, 5);
  assertGood((await run(disk, writeSame10(16, 40), { dataOut: block })).outcome);
  const got = await nodeBytes(node, 16 * 512, 40 * 512);
  for (let b = 0; b < 40; b++) assert.deepEqual(got.subarray(b * 512, (b + 1) * 512), block);
  assert.notDeepEqual(await nodeBytes(node, 15 * 512, 512), block, "nothing before the range");

  assertGood((await run(disk, writeSame16(16, 8, 0x08), { dataOut: new Uint8Array(512) })).outcome);
  assert.deepEqual(await nodeBytes(node, 16 * 512, 8 * 512), new Uint8Array(8 * 512));
  assertGood((await run(disk, writeSame16(100, 4, 0x09))).outcome);
  assert.deepEqual(await nodeBytes(node, 100 * 512, 4 * 512), new Uint8Array(4 * 512));
  assert.deepEqual(await nodeBytes(node, 24 * 512, 32 * 512), got.subarray(8 * 512, 40 * 512));

  assertCheck(
    (await run(disk, writeSame16(2040, 9), { dataOut: block })).outcome,
    SENSE_CODE.LBA_OUT_OF_RANGE,
  );
  assertCheck(
    (await run(disk, writeSame10(0, 0), { dataOut: block })).outcome,
    SENSE_CODE.INVALID_FIELD,
  );
});

Deno.test("ScsiDisk: UNMAP discards every descriptor's range", async () => {
  const { disk, node } = await ready();
  const params = unmapParams([[8, 8], [64, 16], [1000, 0]]);
  const r = await run(disk, unmapCdb(params.length), { dataOut: params });
  assertGood(r.outcome);
  assert.equal(r.outcome.dataOut, params.length);
  assert.deepEqual(await nodeBytes(node, 8 * 512, 8 * 512), new Uint8Array(8 * 512));
  assert.deepEqual(await nodeBytes(node, 64 * 512, 16 * 512), new Uint8Array(16 * 512));
  assert.notDeepEqual(await nodeBytes(node, 16 * 512, 512), new Uint8Array(512));
  assertGood((await run(disk, unmapCdb(0))).outcome, "no parameter list: nothing to do");
});

Deno.test("ScsiDisk: UNMAP checks the parameter list before discarding anything", async () => {
  const { disk, node } = await ready();
  const before = await nodeBytes(node, 0, 64 * 512);
  const unmap = (params: Uint8Array, len = params.length) =>
    run(disk, unmapCdb(len), { dataOut: params });

  assertCheck(
    (await unmap(new Uint8Array(7))).outcome,
    SENSE_CODE.INVALID_PARAM_LEN,
    "under 8 bytes",
  );
  const long = unmapParams([[0, 8]]);
  new DataView(long.buffer).setUint16(0, 100);
  assertCheck(
    (await unmap(long)).outcome,
    SENSE_CODE.INVALID_PARAM_LEN,
    "data length past the list",
  );
  const desc = unmapParams([[0, 8]]);
  new DataView(desc.buffer).setUint16(2, 32);
  assertCheck(
    (await unmap(desc)).outcome,
    SENSE_CODE.INVALID_PARAM_LEN,
    "descriptors past the list",
  );
  const odd = unmapParams([[0, 8]]);
  new DataView(odd.buffer).setUint16(2, 12);
  assertCheck((await unmap(odd)).outcome, SENSE_CODE.INVALID_PARAM_LEN, "not whole descriptors");
  const many = unmapParams(Array.from({ length: 256 }, (_, i): [number, number] => [i, 1]));
  assertCheck((await unmap(many)).outcome, SENSE_CODE.INVALID_PARAM, "256 descriptors");
  const huge = unmapParams([[0, (1 << 30) / 512 + 1]]);
  assertCheck((await unmap(huge)).outcome, SENSE_CODE.INVALID_PARAM, "past the maximum LBA count");
  // The first range is fine, the second is not: neither is discarded.
  const mixed = unmapParams([[0, 8], [2047, 2]]);
  assertCheck((await unmap(mixed)).outcome, SENSE_CODE.LBA_OUT_OF_RANGE);
  assert.deepEqual(await nodeBytes(node, 0, 64 * 512), before);

  const noDiscard = (await ready({ discard: false })).disk;
  const p = unmapParams([[0, 8]]);
  assertCheck(
    (await run(noDiscard, unmapCdb(p.length), { dataOut: p })).outcome,
    SENSE_CODE.INVALID_OPCODE,
  );
});

Deno.test("ScsiDisk: VERIFY checks the range, and compares with BYTCHK", async () => {
  const { disk, node } = await ready();
  assertGood((await run(disk, verify10(0, 2048))).outcome);
  assertCheck((await run(disk, verify16(2000, 49))).outcome, SENSE_CODE.LBA_OUT_OF_RANGE);

  const medium = await nodeBytes(node, 512 * 7, 512 * 3);
  assertGood((await run(disk, verify10(7, 3, 1), { dataOut: medium })).outcome);
  const wrong = medium.slice();
  wrong[700] = wrong[700]! ^ 0xff;
  const r = await run(disk, verify16(7, 3, 1), { dataOut: wrong });
  assertCheck(r.outcome, SENSE_CODE.MISCOMPARE);
  assert.equal(r.outcome.sense?.information, 700, "offset of the first miscompare");

  // BYTCHK 11b: one block compared with every block of the range.
  const block = pattern(512, 9);
  await run(disk, writeSame10(300, 4), { dataOut: block });
  assertGood((await run(disk, verify10(300, 4, 3), { dataOut: block })).outcome);
  const r3 = await run(disk, verify10(299, 4, 3), { dataOut: block });
  assertCheck(r3.outcome, SENSE_CODE.MISCOMPARE);
});

Deno.test("ScsiDisk: SYNCHRONIZE CACHE flushes and checks its range", async () => {
  const { disk } = await ready();
  assertGood((await run(disk, sync10())).outcome);
  assertGood((await run(disk, sync16(2000, 48))).outcome);
  assertCheck((await run(disk, sync10(2000, 49))).outcome, SENSE_CODE.LBA_OUT_OF_RANGE);
});

Deno.test("ScsiDisk: START STOP UNIT and TEST UNIT READY succeed", async () => {
  const { disk } = await ready();
  assertGood((await run(disk, startStop(false))).outcome);
  assertGood((await run(disk, startStop(true))).outcome);
  assertGood((await run(disk, tur())).outcome);
});

Deno.test("ScsiDisk: every other opcode is INVALID COMMAND OPERATION CODE", async () => {
  const { disk } = await ready();
  // RESERVE, RELEASE, FORMAT UNIT, PREVENT ALLOW MEDIUM REMOVAL, WRITE AND VERIFY, READ TOC.
  for (const op of [0x16, 0x17, 0x04, 0x1e, 0x2e, 0x43, 0x7f, 0xc1]) {
    const cdb = new Array(16).fill(0);
    cdb[0] = op;
    assertCheck((await run(disk, cdb)).outcome, SENSE_CODE.INVALID_OPCODE, `opcode ${op}`);
  }
});

// ---- MODE SENSE / MODE SELECT --------------------------------------------------------------------

Deno.test("ScsiDisk: MODE SENSE (6) returns all pages with a block descriptor", async () => {
  const { disk } = await ready();
  const r = await run(disk, modeSense6(0x3f), { dataIn: 255 });
  assertGood(r.outcome);
  const d = r.data;
  const len = d[0]! + 1;
  assert.equal(r.outcome.dataIn, len);
  assert.equal(d[2], 0x10, "DPOFUA, not write protected");
  assert.equal(d[3], 8, "block descriptor length");
  const v = new DataView(d.buffer);
  assert.equal(v.getUint32(4), 2048, "blocks");
  assert.equal(v.getUint32(8) & 0xffffff, 512, "block length");
  const pages: number[] = [];
  for (let at = 12; at < len; at += 2 + d[at + 1]!) pages.push(d[at]!);
  assert.deepEqual(pages, [0x01, 0x04, 0x05, 0x08]);
  assert.equal(len, 4 + 8 + 12 + 24 + 32 + 20);
  // Caching page: WCE on.
  const caching = 12 + 12 + 24 + 32;
  assert.deepEqual([d[caching], d[caching + 1], d[caching + 2]], [0x08, 0x12, 0x04]);
  // Rigid disk geometry: 16 heads, cylinders from the size (clamped to 2).
  assert.equal(d[24 + 2 + 3], 16);
  assert.equal((d[24 + 2]! << 16) | (d[24 + 3]! << 8) | d[24 + 4]!, 2);
});

Deno.test("ScsiDisk: MODE SENSE (10), DBD, page control and errors", async () => {
  const { disk } = await ready();
  const r = await run(disk, modeSense10(0x08, 0, 1024, true), { dataIn: 1024 });
  const d = r.data;
  assert.equal((d[0]! << 8) | d[1]!, 8 + 20 - 2);
  assert.equal(d[3], 0x10);
  assert.equal((d[6]! << 8) | d[7]!, 0, "DBD: no block descriptor");
  assert.deepEqual([d[8], d[9], d[10]], [0x08, 0x12, 0x04]);

  const ch = await run(disk, modeSense6(0x3f, 1, 255, true), { dataIn: 255 });
  // Changeable: only WCE in the caching page.
  const c = ch.data;
  let ones = 0;
  for (let at = 4; at < c[0]! + 1; at += 2 + c[at + 1]!) {
    for (let i = 2; i < 2 + c[at + 1]!; i++) if (c[at + i] !== 0) ones++;
  }
  assert.equal(ones, 1);

  assertCheck(
    (await run(disk, modeSense6(0x08, 3), { dataIn: 255 })).outcome,
    SENSE_CODE.SAVING_PARAMS_NOT_SUPPORTED,
  );
  assertCheck(
    (await run(disk, modeSense6(0x0a), { dataIn: 255 })).outcome,
    SENSE_CODE.INVALID_FIELD,
  );
  assertCheck(
    (await run(disk, modeSense6(0x08, 0, 255, false, 1), { dataIn: 255 })).outcome,
    SENSE_CODE.INVALID_FIELD,
  );
  assertGood((await run(disk, modeSense6(0x3f, 0, 255, false, 0xff), { dataIn: 255 })).outcome);
  // Truncated to the allocation length.
  const cut = await run(disk, modeSense6(0x3f, 0, 4), { dataIn: 255 });
  assert.equal(cut.outcome.dataIn, 4);
});

function cachingPage(wce: boolean, ten = false): Uint8Array {
  const hdr = ten ? 8 : 4;
  const out = new Uint8Array(hdr + 20);
  out[hdr] = 0x08;
  out[hdr + 1] = 0x12;
  out[hdr + 2] = wce ? 0x04 : 0;
  return out;
}

Deno.test("ScsiDisk: MODE SELECT turns the write cache off and on", async () => {
  const { disk } = await ready();
  const off = cachingPage(false);
  assertGood((await run(disk, modeSelect6(off.length), { dataOut: off })).outcome);
  assert.equal(disk.writeCache, false);
  const ms = await run(disk, modeSense6(0x08, 0, 255, true), { dataIn: 255 });
  assert.equal(ms.data[6], 0, "WCE reads back off");
  const def = await run(disk, modeSense6(0x08, 2, 255, true), { dataIn: 255 });
  assert.equal(def.data[6], 0x04, "the default stays on");
  const on = cachingPage(true, true);
  assertGood((await run(disk, modeSelect10(on.length), { dataOut: on })).outcome);
  assert.equal(disk.writeCache, true);
});

Deno.test("ScsiDisk: MODE SELECT validates the parameter list and changes nothing on error", async () => {
  const { disk } = await ready();
  const sel = (params: Uint8Array, flags = 0x10) =>
    run(disk, modeSelect6(params.length, flags), { dataOut: params });
  assertCheck((await sel(cachingPage(false), 0x00)).outcome, SENSE_CODE.INVALID_FIELD, "PF=0");
  assertCheck((await sel(cachingPage(false), 0x11)).outcome, SENSE_CODE.INVALID_FIELD, "SP=1");
  assertCheck((await sel(new Uint8Array(3))).outcome, SENSE_CODE.INVALID_PARAM_LEN, "short header");
  const bd = new Uint8Array(4 + 4);
  bd[3] = 8;
  assertCheck(
    (await sel(bd)).outcome,
    SENSE_CODE.INVALID_PARAM_LEN,
    "block descriptor past the list",
  );
  const bd5 = new Uint8Array(4 + 5);
  bd5[3] = 5;
  assertCheck((await sel(bd5)).outcome, SENSE_CODE.INVALID_PARAM, "block descriptor of 5");
  const bs = new Uint8Array(4 + 8);
  bs[3] = 8;
  bs[4 + 6] = 0x10; // block length 4096
  assertCheck((await sel(bs)).outcome, SENSE_CODE.INVALID_PARAM, "another block size");
  const same = new Uint8Array(4 + 8);
  same[3] = 8;
  same[4 + 6] = 0x02; // 512
  assertGood((await sel(same)).outcome);

  const changed = cachingPage(false);
  changed[4 + 3] = 0x01; // a bit that is not changeable
  assertCheck((await sel(changed)).outcome, SENSE_CODE.INVALID_PARAM);
  const truncated = cachingPage(false).subarray(0, 12);
  assertCheck((await sel(truncated)).outcome, SENSE_CODE.INVALID_PARAM_LEN, "page past the list");
  const wrongLen = cachingPage(false);
  wrongLen[5] = 0x10;
  assertCheck((await sel(wrongLen)).outcome, SENSE_CODE.INVALID_PARAM, "wrong page length");
  const unknown = cachingPage(false);
  unknown[4] = 0x0a;
  assertCheck((await sel(unknown)).outcome, SENSE_CODE.INVALID_PARAM, "unknown page");
  // A good caching page followed by a bad page: the cache setting is not applied.
  const two = new Uint8Array(4 + 20 + 12);
  two.set(cachingPage(false).subarray(4), 4);
  two[24] = 0x01;
  two[25] = 0x0a;
  two[26] = 0x00; // AWRE cleared: not changeable
  assertCheck((await sel(two)).outcome, SENSE_CODE.INVALID_PARAM);
  assert.equal(disk.writeCache, true);
  // The read-write error recovery page as reported is accepted.
  const rw = new Uint8Array(4 + 12);
  rw[4] = 0x01;
  rw[5] = 0x0a;
  rw[6] = 0x80;
  assertGood((await sel(rw)).outcome);
});

Deno.test("ScsiDisk: REPORT LUNS alone lists LUN 0", async () => {
  const { disk } = await ready();
  const r = await run(disk, reportLuns(64), { dataIn: 64 });
  assertGood(r.outcome);
  assert.equal(r.outcome.dataIn, 16);
  assert.deepEqual([...r.data.subarray(0, 16)], [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
});

Deno.test("ScsiDisk rejects a bad block size or transfer limit", async () => {
  const node = await RawNode.open(new MemoryFile("m", new Uint8Array(4096)));
  assert.throws(() => new ScsiDisk(node, { blockSize: 1000 }), RangeError);
  assert.throws(() => new ScsiDisk(node, { blockSize: 256 }), RangeError);
  assert.throws(() => new ScsiDisk(node, { maxTransferBlocks: 0 }), RangeError);
  assert.equal(new ScsiDisk(node, { blockSize: 4096 }).capacity, 1);
});
