/**
 * QEMU's VM state area of a qcow2 image (qcow2_save_vmstate, qcow2_load_vmstate): guest bytes
 * past the disk, from the first offset the L1 table no longer maps on; the L1 table grows for
 * them as QEMU grows it (by half again each time).
 *
 * @module
 */
import { BlockError } from "../../src/errors.ts";
import { MAX_L1_BYTES } from "./header.ts";
import { growL1 } from "./resize.ts";
import { barrier, type Qcow2State } from "./state.ts";

/** Guest offset where QEMU would keep VM state: just past what the L1 table maps. */
export function vmStateOffset(s: Qcow2State): number {
  const span = s.clusterSize * s.l2Entries;
  return Math.ceil(s.size / span) * span;
}

/**
 * The guest offset of VM state position `pos`, checked for `length` bytes.
 *
 * @throws {BlockError} `out-of-range` past what an L1 table can map
 */
export function vmStateRange(s: Qcow2State, pos: number, length: number): number {
  const offset = vmStateOffset(s) + pos;
  const limit = (MAX_L1_BYTES / 8) * s.clusterSize * s.l2Entries;
  if (!Number.isSafeInteger(pos) || pos < 0 || offset + length > limit) {
    throw new BlockError("out-of-range", `VM state range ${pos}+${length} is out of range`, {
      path: s.filename,
      errno: 22,
    });
  }
  return offset;
}

/** Grow the L1 table (the guest size unchanged) until it maps `length` bytes from `offset`. */
export function mapVmState(s: Qcow2State, offset: number, length: number): void {
  const needed = Math.ceil((offset + length) / (s.clusterSize * s.l2Entries));
  if (needed > s.header.l1Size) {
    let entries = Math.max(1, s.header.l1Size);
    while (needed > entries) entries = Math.floor((entries * 3 + 1) / 2);
    growL1(s, entries, s.header.size);
    barrier(s);
  }
}
