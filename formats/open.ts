/**
 * Opening images: the format registry, probing, and (later) backing chains.
 *
 * @module
 */
import { isAbsolute, resolve } from "node:path";
import { BlockError } from "../src/errors.ts";
import type { BlockNode } from "../src/block/node.ts";
import { checkSize } from "../src/block/request.ts";
import type { HostFile } from "../src/host/host_file.ts";
import { openHostFile } from "../src/host/file.ts";
import { isNbdUri, NbdFile } from "../src/host/nbd.ts";
import { isRbdName, RbdFile } from "../src/host/rbd.ts";
import { PROBE_BYTES, probeFormat } from "./probe.ts";
import { RawNode } from "./raw.ts";
import { Qcow2Node } from "./qcow2/qcow2.ts";
import { createQcow2, type Qcow2CreateOptions } from "./qcow2/create.ts";

/** QEMU's cache modes (`bdrv_parse_cache_mode`; `off` is an old spelling of `none`). */
export type CacheMode = "writeback" | "writethrough" | "unsafe" | "none" | "directsync";

/** What a cache mode sets (QEMU's BDRV_O_NOCACHE, write cache off, BDRV_O_NO_FLUSH). */
export interface CacheFlags {
  /** O_DIRECT on the host files (`cache.direct`). */
  readonly direct: boolean;
  /** The write cache is off: every write is durable when it completes. */
  readonly writethrough: boolean;
  /** Flushes are skipped (`cache.no-flush`). */
  readonly noFlush: boolean;
}

const CACHE_FLAGS: Readonly<Record<CacheMode, CacheFlags>> = {
  writeback: { direct: false, writethrough: false, noFlush: false },
  writethrough: { direct: false, writethrough: true, noFlush: false },
  unsafe: { direct: false, writethrough: false, noFlush: true },
  none: { direct: true, writethrough: false, noFlush: false },
  directsync: { direct: true, writethrough: true, noFlush: false },
};

/** The flags of a cache mode. */
export function cacheFlags(mode: CacheMode): CacheFlags {
  return CACHE_FLAGS[mode];
}

/** A cache mode as qemu-img's `-t`/`-T` spell it, or undefined for an unknown one. */
export function parseCacheMode(text: string): CacheMode | undefined {
  if (text === "off") return "none";
  return Object.hasOwn(CACHE_FLAGS, text) ? text as CacheMode : undefined;
}

/** Options of {@linkcode openImage}. */
export interface OpenOptions {
  /** Format name; probed from the first sector when absent. */
  format?: string;
  /** Open read-only (shared lock, no writes). */
  readOnly?: boolean;
  /** Share the image with writers (qemu-img -U); only with `readOnly`. */
  forceShare?: boolean;
  /** raw only: a window into the file. */
  offset?: number;
  /** raw only: length of the window (default: to the end of the file). */
  size?: number;
  /** qcow2 only: QEMU's `l2-cache-size` in bytes. */
  l2CacheSize?: number;
  /** qcow2 only: QEMU's `refcount-cache-size` in bytes. */
  refcountCacheSize?: number;
  /** qcow2 only: QEMU's `cache-clean-interval` in seconds (0 never cleans). */
  cacheCleanInterval?: number;
  /**
   * QEMU's cache mode for the image and its backing chain: `writeback` (default, the page cache
   * and flushes), `writethrough` (every write durable when it completes: O_DSYNC), `none`
   * (O_DIRECT, flushes as writeback), `directsync` (O_DIRECT and O_DSYNC), `unsafe` (flushes are
   * skipped, including the ones that order metadata updates).
   */
  cache?: CacheMode;
  /**
   * QEMU's `aio` for the image and its backing chain. Absent: the synchronous host calls (QEMU's
   * default, threads, one request at a time). `threads` given: many requests in flight through a
   * pool of Workers per file; `io_uring`: through one io_uring per file (raw passes them straight
   * down, qcow2 keeps its data reads and in-place writes in flight together). Fails with
   * `Unable to use io_uring: ...` where the kernel refuses io_uring.
   */
  aio?: "threads" | "io_uring";
  /** Open this image alone, without its backing chain (qemu-img info, rebase -u). */
  noBacking?: boolean;
  /**
   * An NBD image's client options, as QEMU's nbd driver takes them: `reconnectDelay` (seconds a
   * lost connection is tried again while requests wait) and `openTimeout` (seconds the first
   * connection is tried).
   */
  nbd?: { readonly reconnectDelay?: number; readonly openTimeout?: number };
  /** The backing file's format, instead of the one the image records (QEMU's `backing.driver`). */
  backingFormat?: string;
  /** qcow2 only: open for qemu-img check (QEMU's BDRV_O_CHECK; the check reads the snapshot table). */
  check?: boolean;
  /**
   * Warnings QEMU prints with warn_report while opening (the caller adds its `PROGRAM: warning: `
   * prefix and a newline); `trailer`, when given, follows verbatim (QEMU's error_printf).
   */
  onWarning?: (message: string, trailer?: string) => void;
}

/** What the opener hands a driver. */
export type DriverOpenOptions =
  & Omit<
    OpenOptions,
    "format" | "forceShare" | "readOnly" | "noBacking" | "backingFormat" | "cache" | "aio"
  >
  & {
    readOnly: boolean;
    probed: boolean;
    /** `unsafe` skips the flushes that order metadata updates (the opener's cache=unsafe). */
    cache?: "writeback" | "unsafe";
  };

/** What a format driver offers the opener and the CLI. */
export interface FormatDriver {
  readonly name: string;
  /** Open a node over an already opened host file. */
  open(file: HostFile, opts: DriverOpenOptions): Promise<BlockNode>;
  /** Create an empty image of `size` bytes in `file`. */
  create(file: HostFile, size: number, opts: CreateOptions): Promise<void>;
}

/** Options of {@linkcode createImage}: qemu-img's `-o` options (raw takes only preallocation). */
export interface CreateOptions extends Qcow2CreateOptions {
  /** `off` (sparse), `metadata` (qcow2), `falloc` or `full` (zeroes written), as qemu-img. */
  preallocation?: "off" | "metadata" | "falloc" | "full";
}

const rawDriver: FormatDriver = {
  name: "raw",
  open: (file, opts) => {
    if (opts.l2CacheSize !== undefined || opts.refcountCacheSize !== undefined) {
      throw new BlockError("invalid-argument", "Cache size options are for qcow2 images", {
        path: file.path,
      });
    }
    return RawNode.open(file, opts);
  },
  create: (file, size, opts) => {
    file.truncate(0);
    if (opts.preallocation === "metadata") {
      throw new BlockError(
        "invalid-argument",
        "Unsupported preallocation mode 'metadata' for raw",
        {
          path: file.path,
        },
      );
    }
    if (opts.preallocation === "full") {
      const zeroes = new Uint8Array(Math.min(size, 1 << 20));
      for (let at = 0; at < size; at += zeroes.length) {
        file.writeAt(at, zeroes.subarray(0, Math.min(zeroes.length, size - at)));
      }
    } else if (opts.preallocation === "falloc") {
      file.preallocate(0, size);
    }
    file.truncate(size);
    if ((opts.preallocation ?? "off") === "off" && size >= 512) {
      // As QEMU's allocate_first_block: the first block is allocated, so later probes of the
      // file's block size and allocation see a real block there.
      file.writeAt(0, new Uint8Array(size < 4096 ? 512 : 4096));
    }
    file.flush();
    return Promise.resolve();
  },
};

const qcow2Driver: FormatDriver = {
  name: "qcow2",
  open: (file, opts) => {
    if (opts.offset !== undefined || opts.size !== undefined) {
      throw new BlockError("invalid-argument", "The offset and size options are for raw images", {
        path: file.path,
      });
    }
    const { probed: _probed, ...rest } = opts;
    return Qcow2Node.open(file, rest);
  },
  create: (file, size, opts) => createQcow2(file, size, opts),
};

const drivers = new Map<string, FormatDriver>([["raw", rawDriver], ["qcow2", qcow2Driver]]);

/** Formats vstor knows of but cannot open yet. */
const PLANNED_FORMATS = new Set<string>();

/** Names of the formats vstor opens and creates. */
export function formatNames(): string[] {
  return [...drivers.keys()];
}

function driverFor(name: string, path: string): FormatDriver {
  const driver = drivers.get(name);
  if (driver) return driver;
  const known = PLANNED_FORMATS.has(name);
  throw new BlockError(
    known ? "unsupported" : "invalid-argument",
    known ? `Image format '${name}' is not supported yet` : `Unknown driver '${name}'`, // QEMU's words for a format it has no driver for
    { path },
  );
}

/**
 * Open an image file as a block node. The format is probed (qcow2 by magic, raw otherwise) unless
 * given; a probed raw image refuses writes that would put a format signature into sector 0.
 *
 * @throws {BlockError} `not-found`, `busy` (another process holds it), `invalid-format`,
 *   `unsupported`, `invalid-argument`
 *
 * @example A backing chain in a temporary directory (needs `--allow-read --allow-write --allow-ffi`)
 * ```ts
 * import { createImage, openImage } from "./open.ts";
 *
 * const dir = await Deno.makeTempDir();
 * await createImage(`${dir}/base.qcow2`, "qcow2", 1 << 20);
 * const base = await openImage(`${dir}/base.qcow2`);
 * await base.write(0, new TextEncoder().encode("base"));
 * await base.close();
 * await createImage(`${dir}/top.qcow2`, "qcow2", 1 << 20, {
 *   backingFile: "base.qcow2",
 *   backingFormat: "qcow2",
 * });
 * const top = await openImage(`${dir}/top.qcow2`); // format probed, backing chain opened
 * const head = new Uint8Array(4);
 * await top.read(0, head);
 * if (new TextDecoder().decode(head) !== "base" || top.backing === undefined) throw new Error();
 * await top.close();
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function openImage(path: string, opts: OpenOptions = {}): Promise<BlockNode> {
  return await openChain(path, opts, []);
}

/** Deepest backing chain the opener follows. */
export const MAX_CHAIN_DEPTH = 64;

async function openChain(path: string, opts: OpenOptions, chain: string[]): Promise<BlockNode> {
  const readOnly = opts.readOnly ?? false;
  if (opts.forceShare && !readOnly) {
    throw new BlockError(
      "invalid-argument",
      "force-share=on can only be used with read-only images",
      {
        path,
      },
    );
  }
  if (opts.format !== undefined) driverFor(opts.format, path);
  const flags = cacheFlags(opts.cache ?? "writeback");
  // An NBD export is a file on a server: its cache and aio modes are the server's.
  const file = isRbdName(path)
    ? await RbdFile.open(path, { readOnly, cache: !flags.direct })
    : isNbdUri(path)
    ? NbdFile.open(path, {
      readOnly,
      reconnectDelayMs: (opts.nbd?.reconnectDelay ?? 0) * 1000,
      openTimeoutMs: (opts.nbd?.openTimeout ?? 0) * 1000,
    })
    : openHostFile(path, {
      readOnly,
      forceShare: opts.forceShare ?? false,
      direct: flags.direct,
      dsync: flags.writethrough,
      ...(opts.aio === undefined ? {} : { aio: opts.aio }),
    });
  let node: BlockNode | undefined;
  try {
    let format = opts.format;
    const probed = format === undefined;
    if (format === undefined) {
      const head = new Uint8Array(PROBE_BYTES);
      file.readAt(0, head);
      format = probeFormat(head);
    }
    const driver = driverFor(format, path);
    const {
      format: _format,
      forceShare: _share,
      readOnly: _ro,
      noBacking: _nb,
      backingFormat: _bf,
      cache: _cache,
      aio: _aio,
      nbd: _nbd,
      ...rest
    } = opts;
    node = await driver.open(file, {
      ...rest,
      ...(flags.noFlush ? { cache: "unsafe" as const } : {}),
      readOnly,
      probed,
    });
  } catch (e) {
    file.close();
    throw e;
  }
  const name = node.backingName;
  if (name === undefined || node.attachBacking === undefined || opts.noBacking) return node;
  try {
    const here = realPath(path);
    const seen = [...chain, here];
    if (seen.length > MAX_CHAIN_DEPTH) {
      throw new BlockError(
        "unsupported",
        `Backing chain is deeper than ${MAX_CHAIN_DEPTH} images`,
        { path },
      );
    }
    const backingPath = resolveBacking(path, name.file);
    const target = realPath(backingPath);
    if (seen.includes(target)) {
      throw new BlockError(
        "invalid-format",
        `Backing chain loop: '${name.file}' is already in the chain`,
        { path },
      );
    }
    let backing: BlockNode;
    try {
      // The chain below an image is read-only and shared with other readers, as in QEMU.
      backing = await openChain(backingPath, {
        readOnly: true,
        forceShare: opts.forceShare ?? false,
        ...((opts.backingFormat ?? name.format) === undefined
          ? {}
          : { format: opts.backingFormat ?? name.format }),
        ...(opts.onWarning === undefined ? {} : { onWarning: opts.onWarning }),
        // The chain inherits the cache mode, as QEMU's children inherit cache.direct/no-flush.
        ...(opts.cache === undefined ? {} : { cache: opts.cache }),
        ...(opts.aio === undefined ? {} : { aio: opts.aio }),
      }, seen);
    } catch (e) {
      if (e instanceof BlockError && e.message.startsWith("Backing chain")) throw e;
      throw new BlockError(
        e instanceof BlockError ? e.kind : "io",
        `Could not open backing file: ${(e as Error).message}`,
        { path, cause: e },
      );
    }
    node.attachBacking(backing);
    return node;
  } catch (e) {
    await node.close();
    throw e;
  }
}

/**
 * Where a backing name stored in `overlay` points: relative names are relative to the overlay's
 * directory, joined as QEMU's path_combine does (no normalisation: `sub/../b.raw`).
 */
export function resolveBacking(overlay: string, name: string): string {
  if (isAbsolute(name) || isNbdUri(name) || isRbdName(name)) return name;
  if (isNbdUri(overlay) || isRbdName(overlay)) {
    // QEMU's words: an export has no directory to be relative to.
    throw new BlockError("unsupported", "Cannot generate a base directory for NBD nodes", {
      path: overlay,
    });
  }
  const slash = overlay.lastIndexOf("/");
  return slash < 0 ? name : overlay.slice(0, slash + 1) + name;
}

function realPath(path: string): string {
  if (isNbdUri(path) || isRbdName(path)) return path;
  try {
    return Deno.realPathSync(path);
  } catch {
    return resolve(path);
  }
}

/**
 * qemu-img create -f raw on an NBD export (QEMU's bdrv_co_create_opts_simple): the export must
 * exist and be large enough (it cannot grow); its first sector is zeroed so no old header is
 * probed.
 */
function createOnNbd(path: string, format: string, size: number): void {
  driverFor(format, path);
  if (format !== "raw") {
    throw new BlockError(
      "unsupported",
      `Creating a ${format} image inside an NBD export is not supported: create it locally and ` +
        "copy it in with convert -n",
      { path },
    );
  }
  let file: NbdFile;
  try {
    file = NbdFile.open(path);
  } catch (e) {
    throw new BlockError(
      e instanceof BlockError ? e.kind : "io",
      `Protocol driver 'nbd' does not support image creation, and opening the image failed: ${
        (e as Error).message
      }`,
      { path, cause: e },
    );
  }
  try {
    if (size > file.size()) throw new BlockError("unsupported", "Cannot grow NBD nodes", { path });
    // A raw image is the export itself, its first sector zeroed (no old header to probe).
    file.writeAt(0, new Uint8Array(Math.min(512, file.size())));
    file.flush();
  } finally {
    file.close();
  }
}

/**
 * Create an image file of `size` bytes (truncating an existing file, as qemu-img does).
 *
 * @throws {BlockError} `invalid-argument` for an unknown format or a bad size
 */
export async function createImage(
  path: string,
  format: string,
  size: number,
  opts: CreateOptions = {},
): Promise<void> {
  checkSize(size);
  const driver = driverFor(format, path);
  if (isNbdUri(path)) return createOnNbd(path, format, size);
  if (isRbdName(path)) {
    // The image is made on the cluster, then the format lays itself out in it (raw: nothing).
    await RbdFile.create(path, format === "raw" ? size : 0);
    if (format === "raw") return;
    const rbdFile = await RbdFile.open(path);
    try {
      await driver.create(rbdFile, size, opts);
    } finally {
      rbdFile.close();
    }
    return;
  }
  const file = openHostFile(path, { create: true });
  try {
    await driver.create(file, size, opts);
  } catch (e) {
    file.close();
    // As QEMU's image creation: a failed create deletes the (regular) file it was making.
    try {
      if (Deno.statSync(path).isFile) Deno.removeSync(path);
    } catch {
      // Already gone, or not ours to remove: the creation error is what matters.
    }
    throw e;
  }
  file.close();
}
