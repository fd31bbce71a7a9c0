/**
 * Helpers for the SCSI unit tests: disks over in-memory raw nodes, CDB builders, a runner that
 * decodes and executes a CDB with plain byte buffers, and sense assertions.
 *
 * @module
 */
import assert from "node:assert/strict";
import { RawNode } from "../../formats/raw.ts";
import type { BlockNode } from "../../src/block/node.ts";
import { BlockError } from "../../src/errors.ts";
import { MemoryFile } from "../../src/host/memory.ts";
import { ScsiBuffer } from "../../src/scsi/buffer.ts";
import { CHECK_CONDITION, GOOD } from "../../src/scsi/constants.ts";
import { ScsiDisk, type ScsiDiskOptions } from "../../src/scsi/disk.ts";
import type { ScsiOutcome } from "../../src/scsi/request.ts";
import type { SenseCode } from "../../src/scsi/sense.ts";

/** A disk over a raw node over a memory file of `size` bytes (contents: byte i = i * 7 + 3). */
export async function makeDisk(
  size = 1 << 20,
  options: ScsiDiskOptions = {},
  fileOptions: { readOnly?: boolean } = {},
): Promise<{ disk: ScsiDisk; node: RawNode; file: MemoryFile }> {
  const bytes = new Uint8Array(size);
  for (let i = 0; i < size; i++) bytes[i] = (i * 7 + 3) & 0xff;
  const file = new MemoryFile("mem.img", bytes, fileOptions);
  const node = await RawNode.open(file);
  return { disk: new ScsiDisk(node, options), node, file };
}

/** What {@linkcode run} returns: the outcome and the data-in buffer. */
export interface RunResult {
  outcome: ScsiOutcome;
  data: Uint8Array;
}

/** Decodes and executes `cdb` on `disk` with a `dataIn`-byte data-in buffer and `dataOut`. */
export async function run(
  disk: ScsiDisk,
  cdb: ArrayLike<number>,
  opts: { dataIn?: number; dataOut?: Uint8Array } = {},
): Promise<RunResult> {
  const data = new Uint8Array(opts.dataIn ?? 0);
  const io = {
    dataIn: ScsiBuffer.of(data),
    dataOut: ScsiBuffer.of(opts.dataOut ?? new Uint8Array(0)),
  };
  const outcome = await disk.execute(disk.decode(Uint8Array.from(cdb)), io);
  return { outcome, data };
}

/** Consumes the power-on unit attention with a TEST UNIT READY. */
export async function clearUa(disk: ScsiDisk): Promise<void> {
  const r = await run(disk, tur());
  assert.equal(r.outcome.status, CHECK_CONDITION);
  assert.equal((await run(disk, tur())).outcome.status, GOOD);
}

/** Consumes whatever unit attention conditions are pending. */
export async function drainUa(disk: ScsiDisk): Promise<void> {
  for (let i = 0; i < 4; i++) {
    if ((await run(disk, tur())).outcome.status === GOOD) return;
  }
  throw new Error("TEST UNIT READY keeps failing");
}

/** Asserts a CHECK CONDITION with `code`. */
export function assertCheck(outcome: ScsiOutcome, code: SenseCode, message?: string): void {
  assert.equal(outcome.status, CHECK_CONDITION, message ?? "status");
  assert.deepEqual(
    outcome.sense?.code,
    code,
    message ?? `sense ${JSON.stringify(outcome.sense?.code)}`,
  );
}

/** Asserts GOOD. */
export function assertGood(outcome: ScsiOutcome, message?: string): void {
  assert.equal(
    outcome.status,
    GOOD,
    message ?? `expected GOOD, got sense ${JSON.stringify(outcome.sense)}`,
  );
}

function be(n: number, bytes: number): number[] {
  const out: number[] = [];
  for (let i = bytes - 1; i >= 0; i--) out.push(Math.floor(n / 2 ** (8 * i)) % 256);
  return out;
}

// ---- CDB builders -------------------------------------------------------------------------------

export const tur = (): number[] => [0x00, 0, 0, 0, 0, 0];
export const inquiry = (alloc = 96, evpd = false, page = 0): number[] => [
  0x12,
  evpd ? 1 : 0,
  page,
  ...be(alloc, 2),
  0,
];
export const requestSense = (alloc = 252, desc = false): number[] => [
  0x03,
  desc ? 1 : 0,
  0,
  0,
  alloc,
  0,
];
export const readCapacity10 = (): number[] => [0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0];
export const readCapacity16 = (alloc = 32): number[] => [
  0x9e,
  0x10,
  ...be(0, 8),
  ...be(alloc, 4),
  0,
  0,
];
export const read6 = (lba: number, blocks: number): number[] => [
  0x08,
  (lba >> 16) & 0x1f,
  (lba >> 8) & 0xff,
  lba & 0xff,
  blocks,
  0,
];
export const write6 = (
  lba: number,
  blocks: number,
): number[] => [0x0a, ...read6(lba, blocks).slice(1)];
export const read10 = (lba: number, blocks: number, flags = 0): number[] => [
  0x28,
  flags,
  ...be(lba, 4),
  0,
  ...be(blocks, 2),
  0,
];
export const write10 = (lba: number, blocks: number, flags = 0): number[] => [
  0x2a,
  ...read10(lba, blocks, flags).slice(1),
];
export const read12 = (lba: number, blocks: number, flags = 0): number[] => [
  0xa8,
  flags,
  ...be(lba, 4),
  ...be(blocks, 4),
  0,
  0,
];
export const write12 = (lba: number, blocks: number, flags = 0): number[] => [
  0xaa,
  ...read12(lba, blocks, flags).slice(1),
];
export const read16 = (lba: number, blocks: number, flags = 0): number[] => [
  0x88,
  flags,
  ...be(lba, 8),
  ...be(blocks, 4),
  0,
  0,
];
export const write16 = (lba: number, blocks: number, flags = 0): number[] => [
  0x8a,
  ...read16(lba, blocks, flags).slice(1),
];
export const verify10 = (lba: number, blocks: number, bytchk = 0): number[] => [
  0x2f,
  bytchk << 1,
  ...be(lba, 4),
  0,
  ...be(blocks, 2),
  0,
];
export const verify16 = (lba: number, blocks: number, bytchk = 0): number[] => [
  0x8f,
  bytchk << 1,
  ...be(lba, 8),
  ...be(blocks, 4),
  0,
  0,
];
export const sync10 = (lba = 0, blocks = 0): number[] => [
  0x35,
  0,
  ...be(lba, 4),
  0,
  ...be(blocks, 2),
  0,
];
export const sync16 = (lba = 0, blocks = 0): number[] => [
  0x91,
  0,
  ...be(lba, 8),
  ...be(blocks, 4),
  0,
  0,
];
export const writeSame10 = (lba: number, blocks: number, flags = 0): number[] => [
  0x41,
  flags,
  ...be(lba, 4),
  0,
  ...be(blocks, 2),
  0,
];
export const writeSame16 = (lba: number, blocks: number, flags = 0): number[] => [
  0x93,
  flags,
  ...be(lba, 8),
  ...be(blocks, 4),
  0,
  0,
];
export const unmapCdb = (paramLen: number, anchor = false): number[] => [
  0x42,
  anchor ? 1 : 0,
  0,
  0,
  0,
  0,
  0,
  ...be(paramLen, 2),
  0,
];
export const modeSense6 = (page: number, pc = 0, alloc = 255, dbd = false, sub = 0): number[] => [
  0x1a,
  dbd ? 8 : 0,
  (pc << 6) | page,
  sub,
  alloc,
  0,
];
export const modeSense10 = (page: number, pc = 0, alloc = 1024, dbd = false): number[] => [
  0x5a,
  dbd ? 8 : 0,
  (pc << 6) | page,
  0,
  0,
  0,
  0,
  ...be(alloc, 2),
  0,
];
export const modeSelect6 = (len: number, flags = 0x10): number[] => [0x15, flags, 0, 0, len, 0];
export const modeSelect10 = (len: number, flags = 0x10): number[] => [
  0x55,
  flags,
  0,
  0,
  0,
  0,
  0,
  ...be(len, 2),
  0,
];
export const reportLuns = (alloc = 1024, select = 0): number[] => [
  0xa0,
  0,
  select,
  0,
  0,
  0,
  ...be(alloc, 4),
  0,
  0,
];
export const startStop = (start = true): number[] => [0x1b, 0, 0, 0, start ? 1 : 0, 0];

/** An UNMAP parameter list with `ranges` as [lba, blocks] descriptors. */
export function unmapParams(ranges: Array<[number, number]>): Uint8Array {
  const out = new Uint8Array(8 + 16 * ranges.length);
  const v = new DataView(out.buffer);
  v.setUint16(0, 6 + 16 * ranges.length);
  v.setUint16(2, 16 * ranges.length);
  ranges.forEach(([lba, blocks], i) => {
    v.setBigUint64(8 + 16 * i, BigInt(lba));
    v.setUint32(16 + 16 * i, blocks);
  });
  return out;
}

/** A node whose every data operation fails with BlockError `kind` (size from `inner`). */
export function failingNode(inner: BlockNode, kind: "io" | "read-only" = "io"): BlockNode {
  const fail = (): Promise<never> => Promise.reject(new BlockError(kind, "Injected failure"));
  return {
    format: inner.format,
    filename: inner.filename,
    get size() {
      return inner.size;
    },
    readOnly: false,
    requestAlignment: 1,
    read: fail,
    write: fail,
    writeZeroes: fail,
    discard: fail,
    flush: fail,
    blockStatus: (o, m) => inner.blockStatus(o, m),
    close: () => inner.close(),
  };
}
