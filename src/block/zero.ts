/**
 * Zero detection over byte buffers: convert's sparse detection and compression skip clusters that
 * read as zeroes.
 *
 * @module
 */

/**
 * True when every byte of `buf` is zero (a word at a time where aligned).
 *
 * @example
 * ```ts
 * import { isZeroBuffer } from "./zero.ts";
 * if (!isZeroBuffer(new Uint8Array(4096))) throw new Error("zeroes");
 * if (isZeroBuffer(new Uint8Array([0, 0, 1]))) throw new Error("not zeroes");
 * ```
 */
export function isZeroBuffer(buf: Uint8Array): boolean {
  let i = 0;
  if (buf.byteOffset % 4 === 0) {
    const words = new Uint32Array(buf.buffer, buf.byteOffset, buf.length >>> 2);
    for (let w = 0; w < words.length; w++) if (words[w] !== 0) return false;
    i = words.length * 4;
  }
  for (; i < buf.length; i++) if (buf[i] !== 0) return false;
  return true;
}
