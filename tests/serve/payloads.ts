/**
 * vhost-user request payloads as a front-end builds them (u64, vring state and address, memory
 * table, config access), for the serve tests.
 */
import { encodeRegion, type MemoryRegion } from "../../src/serve/vhost_user/protocol.ts";

export function u64(value: bigint | number): Uint8Array {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, BigInt(value), true);
  return b;
}

export function state(index: number, num: number): Uint8Array {
  const b = new Uint8Array(8);
  const v = new DataView(b.buffer);
  v.setUint32(0, index, true);
  v.setUint32(4, num, true);
  return b;
}

export function vringAddr(index: number, desc: number, used: number, avail: number): Uint8Array {
  const b = new Uint8Array(40);
  const v = new DataView(b.buffer);
  v.setUint32(0, index, true);
  v.setBigUint64(8, BigInt(desc), true);
  v.setBigUint64(16, BigInt(used), true);
  v.setBigUint64(24, BigInt(avail), true);
  return b;
}

export function memTable(regions: readonly MemoryRegion[]): Uint8Array {
  const b = new Uint8Array(8 + 32 * regions.length);
  new DataView(b.buffer).setUint32(0, regions.length, true);
  regions.forEach((r, i) => b.set(encodeRegion(r).subarray(8), 8 + 32 * i));
  return b;
}

/** A GET_CONFIG/SET_CONFIG payload: offset, size, flags 0, then `size` bytes. */
export function config(offset: number, size: number): Uint8Array {
  const b = new Uint8Array(12 + size);
  const v = new DataView(b.buffer);
  v.setUint32(0, offset, true);
  v.setUint32(4, size, true);
  return b;
}
