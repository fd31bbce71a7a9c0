import assert from "node:assert/strict";
import {
  type Cdb,
  cdbLength,
  DATA_IN,
  DATA_NONE,
  DATA_OUT,
  decodeCdb,
} from "../../src/scsi/cdb.ts";
import { SENSE_CODE } from "../../src/scsi/sense.ts";
import {
  inquiry,
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
  startStop,
  sync10,
  sync16,
  tur,
  unmapCdb,
  verify10,
  verify16,
  write10,
  write16,
  write6,
  writeSame10,
  writeSame16,
} from "./scsi_helpers.ts";

const CTX = { blockSize: 512, maxTransferBlocks: 0x3fffff };

function decode(cdb: ArrayLike<number>, ctx = CTX): Cdb {
  return decodeCdb(Uint8Array.from(cdb), ctx);
}

function assertInvalid(cdb: ArrayLike<number>, field: boolean, message?: string): void {
  const c = decode(cdb);
  assert.equal(c.kind, "invalid", message);
  if (c.kind !== "invalid") return;
  assert.deepEqual(c.sense, field ? SENSE_CODE.INVALID_FIELD : SENSE_CODE.INVALID_OPCODE, message);
  assert.equal(c.direction, DATA_NONE);
}

Deno.test("cdbLength() follows the operation code groups", () => {
  assert.equal(cdbLength(0x00), 6);
  assert.equal(cdbLength(0x28), 10);
  assert.equal(cdbLength(0x5a), 10);
  assert.equal(cdbLength(0x7f), -1);
  assert.equal(cdbLength(0x88), 16);
  assert.equal(cdbLength(0xa8), 12);
  assert.equal(cdbLength(0xc0), -1);
  assert.equal(cdbLength(0xe0), -1);
});

Deno.test("decodeCdb() reports INVALID COMMAND OPERATION CODE for unknown opcodes", () => {
  for (const op of [0x01, 0x04, 0x1e, 0x2e, 0x3b, 0x4d, 0x7f, 0x89, 0xa3, 0xc0, 0xff]) {
    assertInvalid([op, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], false, `opcode ${op}`);
  }
  assertInvalid([], false, "empty CDB");
});

Deno.test("decodeCdb() rejects a CDB longer than the bytes delivered", () => {
  // cdb_size 6 cannot carry READ (10); 10 cannot carry READ (16) or READ (12).
  assertInvalid(read10(0, 1).slice(0, 6), false);
  assertInvalid(read16(0, 1).slice(0, 10), false);
  assertInvalid(read12(0, 1).slice(0, 10), false);
  // More bytes than the command needs are fine (cdb_size 32).
  const padded = [...read10(5, 2), ...new Array(22).fill(0)];
  const c = decode(padded);
  assert.equal(c.kind, "read");
});

Deno.test("decodeCdb() rejects the NACA bit in the control byte", () => {
  const cdb = read10(0, 1);
  cdb[9] = 0x04;
  assertInvalid(cdb, true);
  const t = tur();
  t[5] = 0x04;
  assertInvalid(t, true);
});

Deno.test("decodeCdb() decodes READ and WRITE (6/10/12/16) with transfer lengths", () => {
  const r6 = decode(read6(0x12345, 0));
  assert.equal(r6.kind, "read");
  if (r6.kind === "read") {
    assert.equal(r6.lba, 0x12345);
    assert.equal(r6.blocks, 256, "READ (6) length 0 means 256");
    assert.equal(r6.length, 256 * 512);
    assert.equal(r6.direction, DATA_IN);
    assert.equal(r6.lengthIsLimit, false);
  }
  const w6 = decode(write6(7, 3));
  assert.ok(w6.kind === "write" && w6.lba === 7 && w6.blocks === 3 && w6.direction === DATA_OUT);

  const r10 = decode(read10(0xfffffffe, 0xffff, 0x08));
  assert.ok(r10.kind === "read" && r10.lba === 0xfffffffe && r10.blocks === 0xffff && r10.fua);
  const w12 = decode([0xaa, 0, 0, 0, 1, 0, 0, 0, 0, 9, 0, 0]);
  assert.ok(w12.kind === "write" && w12.lba === 256 && w12.blocks === 9 && !w12.fua);
  const r16 = decode(read16(2 ** 40 + 5, 8));
  assert.ok(r16.kind === "read" && r16.lba === 2 ** 40 + 5 && r16.length === 4096);
  const w16 = decode(write16(1, 0));
  assert.ok(w16.kind === "write" && w16.blocks === 0 && w16.direction === DATA_NONE);
});

Deno.test("decodeCdb() clamps a 64-bit LBA past 2^53 instead of losing precision", () => {
  const cdb = read16(0, 1);
  cdb[2] = 0xff; // LBA FF00…00
  const c = decode(cdb);
  assert.ok(c.kind === "read" && c.lba === Number.MAX_SAFE_INTEGER);
});

Deno.test("decodeCdb() rejects protection bits and over-long transfers", () => {
  assertInvalid(read10(0, 1, 0x20), true, "RDPROTECT");
  assertInvalid(write16(0, 1, 0x40), true, "WRPROTECT");
  assertInvalid([0x08, 0x20, 0, 0, 1, 0], true, "READ (6) reserved bits");
  const small = { blockSize: 512, maxTransferBlocks: 8 };
  assert.equal(decodeCdb(Uint8Array.from(read10(0, 9)), small).kind, "invalid");
  assert.equal(decodeCdb(Uint8Array.from(read10(0, 8)), small).kind, "read");
});

Deno.test("decodeCdb() uses the block size for the data phase", () => {
  const c = decodeCdb(Uint8Array.from(write10(0, 3)), { blockSize: 4096, maxTransferBlocks: 100 });
  assert.ok(c.kind === "write" && c.length === 3 * 4096);
});

Deno.test("decodeCdb() decodes the allocation-length commands as upper bounds", () => {
  const inq = decode(inquiry(0x1234, true, 0x83));
  assert.ok(inq.kind === "inquiry" && inq.evpd && inq.pageCode === 0x83);
  assert.equal(inq.length, 0x1234);
  assert.equal(inq.lengthIsLimit, true);
  assertInvalid(inquiry(36, false, 0x80), true, "page code without EVPD");
  assert.equal(decode(inquiry(0)).direction, DATA_NONE, "allocation length 0");

  const rs = decode(requestSense(18, true));
  assert.ok(rs.kind === "request-sense" && rs.desc && rs.length === 18 && rs.lengthIsLimit);

  const rl = decode(reportLuns(64, 2));
  assert.ok(rl.kind === "report-luns" && rl.selectReport === 2 && rl.allocationLength === 64);
  assertInvalid(reportLuns(15), true, "allocation length under 16");
  assertInvalid(reportLuns(64, 3), true, "select report 3");

  const ms6 = decode(modeSense6(0x08, 1, 200, true, 0));
  assert.ok(ms6.kind === "mode-sense" && !ms6.ten && ms6.dbd && ms6.pageControl === 1);
  assert.ok(ms6.kind === "mode-sense" && ms6.pageCode === 8 && ms6.allocationLength === 200);
  const ms10 = decode(modeSense10(0x3f, 3, 0x1ff));
  assert.ok(ms10.kind === "mode-sense" && ms10.ten && ms10.pageControl === 3);
  assert.equal(ms10.length, 0x1ff);
});

Deno.test("decodeCdb() decodes READ CAPACITY (10) and (16)", () => {
  const rc10 = decode(readCapacity10());
  assert.ok(rc10.kind === "read-capacity-10" && rc10.length === 8 && !rc10.lengthIsLimit);
  assertInvalid([0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0], true, "LBA without PMI");
  assert.equal(decode([0x25, 0, 0, 0, 0, 1, 0, 0, 1, 0]).kind, "read-capacity-10");

  const rc16 = decode(readCapacity16(12));
  assert.ok(rc16.kind === "read-capacity-16" && rc16.length === 12 && rc16.lengthIsLimit);
  const otherSa = readCapacity16();
  otherSa[1] = 0x12; // GET LBA STATUS
  assertInvalid(otherSa, true, "another SERVICE ACTION IN (16)");
});

Deno.test("decodeCdb() decodes MODE SELECT, UNMAP and their parameter lists", () => {
  const s6 = decode(modeSelect6(28, 0x11));
  assert.ok(s6.kind === "mode-select" && s6.pf && s6.sp && s6.length === 28);
  assert.equal(s6.direction, DATA_OUT);
  const s10 = decode(modeSelect10(0));
  assert.ok(s10.kind === "mode-select" && s10.ten && s10.direction === DATA_NONE);
  const u = decode(unmapCdb(24));
  assert.ok(u.kind === "unmap" && u.parameterListLength === 24 && u.direction === DATA_OUT);
  assertInvalid(unmapCdb(24, true), true, "ANCHOR");
});

Deno.test("decodeCdb() decodes WRITE SAME with its flags", () => {
  const ws = decode(writeSame10(10, 20, 0x08));
  assert.ok(ws.kind === "write-same" && ws.unmap && !ws.ndob && ws.length === 512);
  const nd = decode(writeSame16(0, 4, 0x09));
  assert.ok(nd.kind === "write-same" && nd.ndob && nd.unmap && nd.direction === DATA_NONE);
  assertInvalid(writeSame10(0, 0), true, "zero blocks with WSNZ");
  assertInvalid(writeSame10(0, 1, 0x01), true, "bit 0 is reserved in WRITE SAME (10)");
  assertInvalid(writeSame16(0, 1, 0x02), true, "LBDATA");
  assertInvalid(writeSame16(0, 1, 0x04), true, "PBDATA");
  assertInvalid(writeSame16(0, 1, 0x10), true, "ANCHOR");
  assertInvalid(writeSame16(0, 0x400000, 0), true, "past the maximum write same length");
});

Deno.test("decodeCdb() decodes VERIFY by BYTCHK", () => {
  const v0 = decode(verify10(3, 4, 0));
  assert.ok(v0.kind === "verify" && v0.bytchk === 0 && v0.direction === DATA_NONE);
  const v1 = decode(verify16(3, 4, 1));
  assert.ok(v1.kind === "verify" && v1.bytchk === 1 && v1.length === 2048);
  const v3 = decode(verify10(3, 4, 3));
  assert.ok(v3.kind === "verify" && v3.bytchk === 3 && v3.length === 512);
  assertInvalid(verify10(0, 1, 2), true, "BYTCHK 10b is reserved");
  assertInvalid([0x2f, 0x20, 0, 0, 0, 0, 0, 0, 1, 0], true, "VRPROTECT");
  const v12 = decode([0xaf, 0x02, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0]);
  assert.ok(v12.kind === "verify" && v12.lba === 1 && v12.blocks === 2 && v12.bytchk === 1);
});

Deno.test("decodeCdb() decodes SYNCHRONIZE CACHE, START STOP UNIT and TEST UNIT READY", () => {
  const s = decode(sync10(5, 6));
  assert.ok(s.kind === "synchronize-cache" && s.lba === 5 && s.blocks === 6);
  const s16 = decode(sync16(2 ** 33, 1));
  assert.ok(s16.kind === "synchronize-cache" && s16.lba === 2 ** 33);
  const ss = decode(startStop(false));
  assert.ok(ss.kind === "start-stop-unit" && !ss.start && ss.direction === DATA_NONE);
  assert.equal(decode(tur()).kind, "test-unit-ready");
});
