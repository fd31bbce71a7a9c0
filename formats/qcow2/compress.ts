/**
 * Compressed clusters: raw deflate (QEMU's "zlib", window 4 KiB) and zstd, as QEMU writes and
 * reads them. Compressed data sits in whole 512-byte sectors, so what is read back carries
 * trailing bytes after the stream; both decoders stop at the end of their stream.
 *
 * @module
 */
import type * as Zlib from "node:zlib";
import { BlockError } from "../../src/errors.ts";
import { COMPRESSION_ZSTD } from "./header.ts";
import { zstdCompressNative } from "./compress_native.ts";

let zlibModule: typeof Zlib | undefined;

/** node:zlib, loaded on first use: importing it costs about 40 ms of start-up every verb would pay. */
function zlib(): typeof Zlib {
  const proc = (globalThis as unknown as { process: { getBuiltinModule(id: string): unknown } })
    .process;
  return zlibModule ??= proc.getBuiltinModule("node:zlib") as typeof Zlib;
}

/**
 * Compress one cluster. Returns undefined when the result would not be smaller than a cluster
 * (QEMU then writes the cluster uncompressed).
 */
export function compressCluster(type: number, data: Uint8Array): Uint8Array | undefined {
  let out: Uint8Array;
  if (type === COMPRESSION_ZSTD) {
    const native = zstdCompressNative(data);
    if (native !== undefined) return native ?? undefined;
    out = zlib().zstdCompressSync(data);
  } else {
    out = zlib().deflateRawSync(data, { windowBits: 12, level: 6, memLevel: 9 });
  }
  return out.length < data.length
    ? new Uint8Array(out.buffer, out.byteOffset, out.length)
    : undefined;
}

/** Length of the zstd frame at the start of `src`, or -1 when it is malformed or cut short. */
export function zstdFrameLength(src: Uint8Array): number {
  if (src.length < 6) return -1;
  const magic = src[0]! | (src[1]! << 8) | (src[2]! << 16) | (src[3]! << 24);
  if (magic >>> 0 !== 0xfd2fb528) return -1;
  const fhd = src[4]!;
  const fcsFlag = fhd >> 6,
    singleSegment = (fhd >> 5) & 1,
    checksum = (fhd >> 2) & 1,
    dictFlag = fhd & 3;
  let at = 5 + (singleSegment ? 0 : 1) + [0, 1, 2, 4][dictFlag]! +
    [singleSegment ? 1 : 0, 2, 4, 8][fcsFlag]!;
  for (;;) {
    if (at + 3 > src.length) return -1;
    const header = src[at]! | (src[at + 1]! << 8) | (src[at + 2]! << 16);
    const last = header & 1, type = (header >> 1) & 3, size = header >> 3;
    if (type === 3) return -1;
    at += 3 + (type === 1 ? 1 : size);
    if (last) break;
  }
  at += checksum ? 4 : 0;
  return at <= src.length ? at : -1;
}

/**
 * Decompress one cluster into `dst` (cluster-sized).
 *
 * @throws {BlockError} `corrupt`-free `io` error naming the offset when the data does not decode
 *   to a full cluster
 */
export function decompressCluster(
  type: number,
  src: Uint8Array,
  dst: Uint8Array,
  context: { path: string; offset: number },
): void {
  let out: Uint8Array;
  try {
    if (type === COMPRESSION_ZSTD) {
      const frame = zstdFrameLength(src);
      if (frame < 0) throw new Error("malformed zstd frame");
      out = zlib().zstdDecompressSync(src.subarray(0, frame), { maxOutputLength: dst.length });
    } else {
      out = zlib().inflateRawSync(src, {
        maxOutputLength: dst.length,
        finishFlush: zlib().constants.Z_SYNC_FLUSH,
      });
    }
  } catch (e) {
    throw new BlockError(
      "io",
      `Compressed cluster at host offset 0x${context.offset.toString(16)} does not decompress: ${
        (e as Error).message
      }`,
      { path: context.path, offset: context.offset, cause: e },
    );
  }
  if (out.length !== dst.length) {
    throw new BlockError(
      "io",
      `Compressed cluster at host offset 0x${
        context.offset.toString(16)
      } decompresses to ${out.length} bytes, not ${dst.length}`,
      { path: context.path, offset: context.offset },
    );
  }
  dst.set(out);
}
