/**
 * zstd cluster compression through the system's libzstd, when it is there (Debian's qemu-utils
 * depends on it), with one compression context kept for the life of the thread. node:zlib makes a
 * new context for every call, and for 64 KiB clusters that set-up costs about as much as the
 * compression itself. Without libzstd (or without FFI permission) callers fall back to node:zlib.
 * (Deflate stays on node:zlib: the system zlib, tried the same way, writes QEMU's exact bytes but
 * at half node:zlib's speed.)
 *
 * @module
 */

/** zstd's default level, the one QEMU's qcow2 compression uses (it sets no level). */
const ZSTD_CLEVEL_DEFAULT = 3;

const symbols = {
  ZSTD_createCCtx: { parameters: [], result: "pointer" },
  ZSTD_compressCCtx: {
    parameters: ["pointer", "buffer", "usize", "buffer", "usize", "i32"],
    result: "usize",
  },
  ZSTD_isError: { parameters: ["usize"], result: "u32" },
} as const;

interface Zstd {
  compress(src: Uint8Array, dst: Uint8Array): number;
}

let loaded: Zstd | null | undefined;

/** The libzstd binding with this thread's context, or null when it cannot be loaded. */
function zstd(): Zstd | null {
  if (loaded !== undefined) return loaded;
  try {
    const lib = Deno.dlopen("libzstd.so.1", symbols).symbols;
    const cctx = lib.ZSTD_createCCtx();
    if (cctx === null) throw new Error("ZSTD_createCCtx failed");
    loaded = {
      compress(src, dst) {
        const n = lib.ZSTD_compressCCtx(
          cctx,
          dst,
          BigInt(dst.length),
          src,
          BigInt(src.length),
          ZSTD_CLEVEL_DEFAULT,
        );
        // An error (dst too small: the data does not shrink) comes back as a huge size_t.
        return lib.ZSTD_isError(n) !== 0 ? -1 : Number(n);
      },
    };
  } catch {
    loaded = null;
  }
  return loaded;
}

/**
 * Compresses `src` as one zstd frame with libzstd into a new buffer shorter than `src`; `null`
 * when it does not shrink; `undefined` when libzstd is not available (use node:zlib).
 */
export function zstdCompressNative(src: Uint8Array): Uint8Array | null | undefined {
  const z = zstd();
  if (z === null) return undefined;
  if (scratch.length < src.length) scratch = new Uint8Array(src.length);
  // Room for one byte less than the input: anything that does not shrink is refused.
  const n = z.compress(src, scratch.subarray(0, Math.max(0, src.length - 1)));
  return n < 0 ? null : scratch.slice(0, n);
}

let scratch = new Uint8Array(0);
