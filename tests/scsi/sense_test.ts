import assert from "node:assert/strict";
import { BlockError } from "../../src/errors.ts";
import {
  SENSE_CODE,
  senseForReadError,
  senseForWriteError,
  uaPrecedence,
  writeDescriptorSense,
  writeFixedSense,
} from "../../src/scsi/sense.ts";

Deno.test("writeFixedSense() lays out fixed-format sense data", () => {
  const buf = new Uint8Array(32).fill(0xee);
  const n = writeFixedSense(buf, { code: SENSE_CODE.WRITE_PROTECTED }, 4);
  assert.equal(n, 18);
  const s = buf.subarray(4, 22);
  assert.equal(s[0], 0x70, "current, fixed format, VALID clear");
  assert.equal(s[2], 0x07, "DATA PROTECT");
  assert.equal(s[7], 10, "additional sense length");
  assert.equal(s[12], 0x27);
  assert.equal(s[13], 0x00);
  assert.deepEqual([...s.subarray(3, 7)], [0, 0, 0, 0]);
  assert.equal(buf[3], 0xee, "nothing before the offset");
  assert.equal(buf[22], 0xee, "nothing after the sense");
});

Deno.test("writeFixedSense() sets VALID and INFORMATION, and truncates to the room", () => {
  const buf = new Uint8Array(18);
  writeFixedSense(buf, { code: SENSE_CODE.MISCOMPARE, information: 0x01020304 });
  assert.equal(buf[0], 0xf0);
  assert.equal(buf[2], 0x0e);
  assert.deepEqual([...buf.subarray(3, 7)], [1, 2, 3, 4]);
  assert.equal(buf[12], 0x1d);
  const short = new Uint8Array(8);
  assert.equal(writeFixedSense(short, { code: SENSE_CODE.INVALID_FIELD }), 8);
  assert.equal(short[2], 5);
  assert.equal(writeFixedSense(new Uint8Array(0), { code: SENSE_CODE.INVALID_FIELD }), 0);
});

Deno.test("writeDescriptorSense() lays out descriptor-format sense data", () => {
  const buf = new Uint8Array(32);
  assert.equal(writeDescriptorSense(buf, { code: SENSE_CODE.LBA_OUT_OF_RANGE }), 8);
  assert.deepEqual([...buf.subarray(0, 8)], [0x72, 0x05, 0x21, 0x00, 0, 0, 0, 0]);
  const n = writeDescriptorSense(buf, { code: SENSE_CODE.MISCOMPARE, information: 513 });
  assert.equal(n, 20);
  assert.equal(buf[7], 12, "additional length: one information descriptor");
  assert.deepEqual([...buf.subarray(8, 12)], [0x00, 0x0a, 0x80, 0x00]);
  assert.equal(buf[18], 2);
  assert.equal(buf[19], 1);
});

Deno.test("the sense table has the SPC key/ASC/ASCQ values", () => {
  const table: Array<[keyof typeof SENSE_CODE, number, number, number]> = [
    ["INVALID_OPCODE", 5, 0x20, 0],
    ["LBA_OUT_OF_RANGE", 5, 0x21, 0],
    ["INVALID_FIELD", 5, 0x24, 0],
    ["LUN_NOT_SUPPORTED", 5, 0x25, 0],
    ["INVALID_PARAM", 5, 0x26, 0],
    ["INVALID_PARAM_LEN", 5, 0x1a, 0],
    ["SAVING_PARAMS_NOT_SUPPORTED", 5, 0x39, 0],
    ["WRITE_PROTECTED", 7, 0x27, 0],
    ["READ_ERROR", 3, 0x11, 0],
    ["WRITE_ERROR", 3, 0x0c, 0],
    ["SPACE_ALLOC_FAILED", 7, 0x27, 7],
    ["RESET", 6, 0x29, 0],
    ["CAPACITY_CHANGED", 6, 0x2a, 9],
    ["REPORTED_LUNS_CHANGED", 6, 0x3f, 0x0e],
    ["MISCOMPARE", 0x0e, 0x1d, 0],
    ["LUN_NOT_READY", 2, 0x04, 0x03],
  ];
  for (const [name, key, asc, ascq] of table) {
    assert.deepEqual(SENSE_CODE[name], { key, asc, ascq }, name);
  }
});

Deno.test("uaPrecedence() ranks a reset above capacity and LUN inventory changes", () => {
  assert.ok(uaPrecedence(SENSE_CODE.RESET) < uaPrecedence(SENSE_CODE.CAPACITY_CHANGED));
  assert.ok(
    uaPrecedence(SENSE_CODE.CAPACITY_CHANGED) < uaPrecedence(SENSE_CODE.REPORTED_LUNS_CHANGED),
  );
  assert.ok(uaPrecedence(SENSE_CODE.REPORTED_LUNS_CHANGED) < uaPrecedence(null));
  assert.equal(uaPrecedence(SENSE_CODE.INVALID_FIELD), uaPrecedence(null), "not a UA");
});

Deno.test("block-layer errors map to read and write sense codes", () => {
  assert.deepEqual(senseForReadError(new BlockError("io", "x")), SENSE_CODE.READ_ERROR);
  assert.deepEqual(senseForReadError(new Error("bug")), SENSE_CODE.READ_ERROR);
  assert.deepEqual(
    senseForReadError(new BlockError("out-of-range", "x")),
    SENSE_CODE.LBA_OUT_OF_RANGE,
  );
  assert.deepEqual(senseForWriteError(new BlockError("io", "x")), SENSE_CODE.WRITE_ERROR);
  assert.deepEqual(
    senseForWriteError(new BlockError("io", "x", { errno: 28 })),
    SENSE_CODE.SPACE_ALLOC_FAILED,
  );
  assert.deepEqual(
    senseForWriteError(new BlockError("read-only", "x")),
    SENSE_CODE.WRITE_PROTECTED,
  );
  assert.deepEqual(
    senseForWriteError(new BlockError("corrupt", "x")),
    SENSE_CODE.WRITE_PROTECTED,
  );
});
