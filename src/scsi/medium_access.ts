/**
 * The medium-access commands of SBC-3 over a block node: READ and WRITE (6/10/12/16), VERIFY
 * (10/12/16), WRITE SAME (10/16), UNMAP and SYNCHRONIZE CACHE (10/16). Data moves straight
 * between the node and the command's buffers (guest memory for virtio); block-layer errors become
 * sense data, never exceptions.
 *
 * @module
 */
import type { BlockNode } from "../block/node.ts";
import { isBlockError } from "../errors.ts";
import type { Cdb } from "./cdb.ts";
import {
  checkCondition,
  good,
  GOOD_NO_DATA,
  type IoErrorPolicy,
  type ScsiIo,
  type ScsiOutcome,
} from "./request.ts";
import { SENSE_CODE, senseForReadError, senseForWriteError } from "./sense.ts";
import type { DiskProfile } from "./profile.ts";

/** The disk as the I/O commands see it. */
export interface IoDisk extends DiskProfile {
  /** The block node holding the medium. */
  readonly node: BlockNode;
  /** What a failed node request does (absent: `report`, as CHECK CONDITION). */
  readonly errorPolicy?: IoErrorPolicy | undefined;
}

/**
 * The outcome of a command whose node request failed with `error`, under the disk's policy:
 * CHECK CONDITION with the error's sense (`report`), `ignored` (`ignore`), or that CHECK CONDITION
 * marked held (`stop`).
 */
function failed(
  disk: IoDisk,
  error: unknown,
  write: boolean,
  ignored: ScsiOutcome,
  moved?: { dataIn?: number; dataOut?: number },
): ScsiOutcome {
  const decision = disk.errorPolicy?.(error, write) ?? "report";
  if (decision === "ignore") return ignored;
  const sense = write ? senseForWriteError(error) : senseForReadError(error);
  const outcome = checkCondition(sense, undefined, moved);
  return decision === "stop" ? { ...outcome, held: { error, write } } : outcome;
}

type CdbOf<K extends Cdb["kind"]> = Extract<Cdb, { kind: K }>;

/** Bytes of the scratch buffer VERIFY compares through and WRITE SAME replicates into. */
const SCRATCH_BYTES = 512 * 1024;
/** Bytes of one UNMAP block descriptor (SBC-3 5.28.2). */
const UNMAP_DESCRIPTOR_LEN = 16;
/** Bytes of the UNMAP parameter list header. */
const UNMAP_HEADER_LEN = 8;

/**
 * True when blocks `[lba, lba + blocks)` lie on the medium. An empty range at the capacity is
 * valid (QEMU's `check_lba_range`); the sum stays exact because both are below 2^53.
 */
export function inRange(disk: DiskProfile, lba: number, blocks: number): boolean {
  return lba <= disk.capacity && blocks <= disk.capacity - lba;
}

/** READ (6/10/12/16). */
export async function read(disk: IoDisk, cmd: CdbOf<"read">, io: ScsiIo): Promise<ScsiOutcome> {
  if (!inRange(disk, cmd.lba, cmd.blocks)) return checkCondition(SENSE_CODE.LBA_OUT_OF_RANGE);
  if (cmd.blocks === 0) return GOOD_NO_DATA;
  const bs = disk.blockSize;
  try {
    // FUA on a read: the data must come from the medium, so write back the cache first (QEMU).
    if (cmd.fua && disk.writeCache) await disk.node.flush();
    const length = cmd.blocks * bs;
    await io.dataIn.readFrom(disk.node, cmd.lba * bs, 0, length);
    return good(Math.min(length, io.dataIn.length));
  } catch (e) {
    return failed(disk, e, false, good(Math.min(cmd.blocks * bs, io.dataIn.length)));
  }
}

/** WRITE (6/10/12/16). With the write cache disabled every write is forced to the medium. */
export async function write(
  disk: IoDisk,
  cmd: CdbOf<"write">,
  io: ScsiIo,
): Promise<ScsiOutcome> {
  if (disk.readOnly) return checkCondition(SENSE_CODE.WRITE_PROTECTED);
  if (!inRange(disk, cmd.lba, cmd.blocks)) return checkCondition(SENSE_CODE.LBA_OUT_OF_RANGE);
  if (cmd.blocks === 0) return GOOD_NO_DATA;
  const bs = disk.blockSize;
  try {
    const fua = cmd.fua || !disk.writeCache;
    const n = await io.dataOut.writeTo(disk.node, cmd.lba * bs, 0, cmd.blocks * bs, fua);
    return good(0, n);
  } catch (e) {
    return failed(disk, e, true, good(0, Math.min(cmd.blocks * bs, io.dataOut.length)));
  }
}

/**
 * VERIFY (10/12/16). BYTCHK 0 checks the range only (the medium has no media errors to find);
 * BYTCHK 1 compares the data-out buffer with the medium, BYTCHK 3 compares one data-out block with
 * every block, and the first difference is a MISCOMPARE whose INFORMATION field is its offset in
 * the data-out buffer (SBC-3 5.28).
 */
export async function verify(
  disk: IoDisk,
  cmd: CdbOf<"verify">,
  io: ScsiIo,
): Promise<ScsiOutcome> {
  if (!inRange(disk, cmd.lba, cmd.blocks)) return checkCondition(SENSE_CODE.LBA_OUT_OF_RANGE);
  if (cmd.bytchk === 0 || cmd.blocks === 0) return GOOD_NO_DATA;
  const bs = disk.blockSize;
  const total = cmd.blocks * bs;
  const chunk = Math.min(total, Math.max(bs, SCRATCH_BYTES - (SCRATCH_BYTES % bs)));
  const medium = new Uint8Array(chunk);
  const expected = new Uint8Array(chunk);
  if (cmd.bytchk === 3) {
    // One block of data-out is the expected content of every block.
    const block = expected.subarray(0, bs);
    io.dataOut.copyOut(block, 0);
    for (let at = bs; at < chunk; at += bs) expected.copyWithin(at, 0, bs);
  }
  for (let done = 0; done < total; done += chunk) {
    const n = Math.min(chunk, total - done);
    try {
      await disk.node.read(cmd.lba * bs + done, medium.subarray(0, n));
    } catch (e) {
      return failed(disk, e, false, good(0, cmd.length));
    }
    if (cmd.bytchk === 1) io.dataOut.copyOut(expected.subarray(0, n), done);
    for (let i = 0; i < n; i++) {
      if (medium[i] !== expected[i]) {
        // BYTCHK 11b: the offset is within the single data-out block.
        const offset = cmd.bytchk === 1 ? done + i : (done + i) % bs;
        return checkCondition(SENSE_CODE.MISCOMPARE, offset, { dataOut: cmd.length });
      }
    }
  }
  return good(0, cmd.length);
}

/**
 * WRITE SAME (10/16). A zero block (or NDOB) becomes one zero-write of the whole range, which may
 * deallocate when UNMAP is set and discard is enabled; other data is replicated and written.
 */
export async function writeSame(
  disk: IoDisk,
  cmd: CdbOf<"write-same">,
  io: ScsiIo,
): Promise<ScsiOutcome> {
  if (disk.readOnly) return checkCondition(SENSE_CODE.WRITE_PROTECTED);
  if (!inRange(disk, cmd.lba, cmd.blocks)) return checkCondition(SENSE_CODE.LBA_OUT_OF_RANGE);
  const bs = disk.blockSize;
  const offset = cmd.lba * bs;
  const total = cmd.blocks * bs;
  const fua = !disk.writeCache;
  const block = new Uint8Array(bs);
  const consumed = cmd.ndob ? 0 : io.dataOut.copyOut(block, 0);
  try {
    if (cmd.ndob || isZero(block)) {
      await disk.node.writeZeroes(offset, total, { unmap: cmd.unmap && disk.discard, fua });
      return good(0, consumed);
    }
    const chunk = new Uint8Array(
      Math.min(total, Math.max(bs, SCRATCH_BYTES - (SCRATCH_BYTES % bs))),
    );
    chunk.set(block);
    for (let at = bs; at < chunk.length; at += bs) chunk.copyWithin(at, 0, bs);
    for (let done = 0; done < total; done += chunk.length) {
      const n = Math.min(chunk.length, total - done);
      await disk.node.write(offset + done, chunk.subarray(0, n));
    }
    if (fua) await disk.node.flush();
    return good(0, consumed);
  } catch (e) {
    return failed(disk, e, true, good(0, consumed));
  }
}

function isZero(bytes: Uint8Array): boolean {
  for (let i = 0; i < bytes.length; i++) if (bytes[i] !== 0) return false;
  return true;
}

/**
 * UNMAP. The parameter list is checked whole before anything is discarded: lengths (PARAMETER
 * LIST LENGTH ERROR), descriptor and block counts against the block limits page (INVALID FIELD IN
 * PARAMETER LIST), then every range (LBA OUT OF RANGE). A node that cannot discard is not an
 * error: UNMAP is advisory.
 */
export async function unmap(
  disk: IoDisk,
  cmd: CdbOf<"unmap">,
  io: ScsiIo,
): Promise<ScsiOutcome> {
  // Without logical block provisioning (LBPU 0) the command does not exist.
  if (!disk.discard) return checkCondition(SENSE_CODE.INVALID_OPCODE);
  const len = cmd.parameterListLength;
  if (len === 0) return GOOD_NO_DATA; // no parameter data: nothing to do (SBC-3 5.28.1)
  const params = new Uint8Array(len);
  io.dataOut.copyOut(params, 0);
  if (len < UNMAP_HEADER_LEN) return checkCondition(SENSE_CODE.INVALID_PARAM_LEN);
  const dataLength = (params[0]! << 8) | params[1]!;
  const descLength = (params[2]! << 8) | params[3]!;
  // The header's lengths must fit the list the CDB announced, in whole descriptors (QEMU).
  if (len < dataLength + 2 || len < descLength + UNMAP_HEADER_LEN) {
    return checkCondition(SENSE_CODE.INVALID_PARAM_LEN, undefined, { dataOut: len });
  }
  if (descLength % UNMAP_DESCRIPTOR_LEN !== 0) {
    return checkCondition(SENSE_CODE.INVALID_PARAM_LEN, undefined, { dataOut: len });
  }
  if (disk.readOnly) return checkCondition(SENSE_CODE.WRITE_PROTECTED);
  const count = descLength / UNMAP_DESCRIPTOR_LEN;
  if (count > disk.maxUnmapDescriptors) {
    return checkCondition(SENSE_CODE.INVALID_PARAM, undefined, { dataOut: len });
  }
  const view = new DataView(params.buffer, params.byteOffset, params.byteLength);
  let blocksTotal = 0;
  for (let i = 0; i < count; i++) {
    const at = UNMAP_HEADER_LEN + i * UNMAP_DESCRIPTOR_LEN;
    const hi = view.getUint32(at);
    // An LBA past 2^53 is past any medium: clamp it so the range check rejects it.
    const lba = hi >= 0x20_0000 ? Number.MAX_SAFE_INTEGER : hi * 0x1_0000_0000 +
      view.getUint32(at + 4);
    const blocks = view.getUint32(at + 8);
    blocksTotal += blocks;
    if (blocks > disk.maxUnmapBlocks || blocksTotal > disk.maxUnmapBlocks) {
      return checkCondition(SENSE_CODE.INVALID_PARAM, undefined, { dataOut: len });
    }
    if (!inRange(disk, lba, blocks)) {
      return checkCondition(SENSE_CODE.LBA_OUT_OF_RANGE, undefined, { dataOut: len });
    }
  }
  const bs = disk.blockSize;
  for (let i = 0; i < count; i++) {
    const at = UNMAP_HEADER_LEN + i * UNMAP_DESCRIPTOR_LEN;
    const lba = view.getUint32(at) * 0x1_0000_0000 + view.getUint32(at + 4);
    const blocks = view.getUint32(at + 8);
    if (blocks === 0) continue;
    try {
      await disk.node.discard(lba * bs, blocks * bs);
    } catch (e) {
      if (isBlockError(e, "unsupported")) continue;
      return failed(disk, e, true, good(0, len), { dataOut: len });
    }
  }
  return good(0, len);
}

/** SYNCHRONIZE CACHE (10/16): the range is checked, then the whole node is flushed. */
export async function synchronizeCache(
  disk: IoDisk,
  cmd: CdbOf<"synchronize-cache">,
): Promise<ScsiOutcome> {
  if (!inRange(disk, cmd.lba, cmd.blocks)) return checkCondition(SENSE_CODE.LBA_OUT_OF_RANGE);
  try {
    await disk.node.flush();
    return GOOD_NO_DATA;
  } catch (e) {
    return failed(disk, e, true, GOOD_NO_DATA);
  }
}
