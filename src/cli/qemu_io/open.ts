/**
 * Opening an image the way qemu-io does: its cache, aio and discard modes, `-o key=value` option
 * strings (QemuOpts syntax), and `-s`, a temporary qcow2 overlay that takes every write and is
 * deleted when the image closes.
 *
 * @module
 */
import type { BlockNode } from "../../block/node.ts";
import { openHostFile } from "../../host/file.ts";
import { formatNames, openImage, type OpenOptions } from "../../../formats/open.ts";
import { createQcow2 } from "../../../formats/qcow2/create.ts";
import { Qcow2Node } from "../../../formats/qcow2/qcow2.ts";
import {
  OVERLAP_KINDS,
  type OverlapKind,
  type Qcow2RuntimeOptions,
  resolveQcow2Options,
} from "../../../formats/qcow2/runtime_options.ts";
import { parseSize } from "../text/size.ts";
import { messageOf } from "./text.ts";

/** What a cache mode sets (QEMU's bdrv_parse_cache_mode). */
export interface CacheFlags {
  /** cache.direct: O_DIRECT on the host file. */
  readonly direct: boolean;
  /** The guest-visible write cache is off: every write is flushed before it completes. */
  readonly writethrough: boolean;
  /** cache.no-flush: flushes are ignored (cache=unsafe). */
  readonly noFlush: boolean;
}

const CACHE_MODES: Readonly<Record<string, CacheFlags>> = {
  none: { direct: true, writethrough: false, noFlush: false },
  off: { direct: true, writethrough: false, noFlush: false },
  directsync: { direct: true, writethrough: true, noFlush: false },
  writeback: { direct: false, writethrough: false, noFlush: false },
  unsafe: { direct: false, writethrough: false, noFlush: true },
  writethrough: { direct: false, writethrough: true, noFlush: false },
};

/** QEMU's bdrv_parse_cache_mode: undefined for an unknown mode. */
export function parseCacheMode(mode: string): CacheFlags | undefined {
  return Object.hasOwn(CACHE_MODES, mode) ? CACHE_MODES[mode] : undefined;
}

export type DiscardMode = "ignore" | "unmap";

/** QEMU's bdrv_parse_discard_flags. */
export function parseDiscardMode(mode: string): DiscardMode | undefined {
  if (mode === "off" || mode === "ignore") return "ignore";
  if (mode === "on" || mode === "unmap") return "unmap";
  return undefined;
}

export type AioMode = "threads" | "native" | "io_uring";

/** QEMU's bdrv_parse_aio. */
export function parseAioMode(mode: string): AioMode | undefined {
  return mode === "threads" || mode === "native" || mode === "io_uring" ? mode : undefined;
}

/** Everything qemu-io's command line or `open` command asks of an open. */
export interface OpenRequest {
  /** The image path; undefined when only `-o file.filename=` (or nothing) names it. */
  path: string | undefined;
  format?: string | undefined;
  readOnly: boolean;
  snapshot: boolean;
  forceShare: boolean;
  copyOnRead: boolean;
  cache: CacheFlags;
  /** Absent: qemu-io's default, threads, run as synchronous calls; given: a pool or a ring. */
  aio?: AioMode;
  discard: DiscardMode;
  /** `-o` options in the order given (later ones win). */
  options: Array<[string, string]>;
}

/** qemu-io's defaults: read-write, cache=writethrough, aio=threads, discard=unmap. */
export function defaultRequest(): OpenRequest {
  return {
    path: undefined,
    readOnly: false,
    snapshot: false,
    forceShare: false,
    copyOnRead: false,
    cache: CACHE_MODES["writethrough"]!,
    discard: "unmap",
    options: [],
  };
}

/**
 * Parse a QemuOpts string (`key=value,key2=value2`, `,,` for a literal comma). A key without `=`
 * is QEMU's deprecated short-form boolean (`key` is on, `nokey` off); `warn` receives QEMU's
 * warning for it.
 */
export function parseOptionString(
  text: string,
  warn: (message: string) => void,
  implied?: string,
): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  let at = 0;
  while (at < text.length) {
    let name = "";
    while (at < text.length && text[at] !== "=" && text[at] !== ",") name += text[at++];
    if (implied !== undefined && at === name.length && text[at] !== "=") {
      // QemuOpts' implied name: a first value without a key belongs to it (`,,` escapes a comma).
      let value = name;
      while (at < text.length && !(text[at] === "," && text[at + 1] !== ",")) {
        if (text[at] === ",") at++;
        value += text[at++];
      }
      out.push([implied, value]);
    } else if (text[at] === "=") {
      at++;
      let value = "";
      while (at < text.length) {
        if (text[at] === ",") {
          if (text[at + 1] !== ",") break;
          at++;
        }
        value += text[at++];
      }
      out.push([name, value]);
    } else {
      const off = name.startsWith("no");
      const key = off ? name.slice(2) : name;
      const value = off ? "off" : "on";
      warn(`short-form boolean option '${name}' deprecated\nPlease use ${key}=${value} instead`);
      out.push([key, value]);
    }
    at++; // the separating comma
  }
  return out;
}

/** An open that failed, with QEMU's message (without the `can't open device` head). */
export class OpenError extends Error {
  override readonly name = "OpenError";
}

function parseBool(key: string, value: string): boolean {
  if (value === "on" || value === "yes" || value === "true") return true;
  if (value === "off" || value === "no" || value === "false") return false;
  throw new OpenError(`Parameter '${key}' expects 'on' or 'off'`);
}

function sizeMessage(key: string): string {
  return `Parameter '${key}' expects a non-negative number below 2^64\n` +
    "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n" +
    "and exabytes, respectively.";
}

function parseBytes(key: string, value: string): number {
  const r = parseSize(value);
  if (!r.ok || r.value > BigInt(Number.MAX_SAFE_INTEGER)) throw new OpenError(sizeMessage(key));
  return Number(r.value);
}

/** Block drivers QEMU 7.2 has that vstor does not open (yet). */
const QEMU_ONLY_DRIVERS = new Set([
  "blkdebug",
  "blklogwrites",
  "blkreplay",
  "blkverify",
  "bochs",
  "cloop",
  "compress",
  "copy-before-write",
  "copy-on-read",
  "dmg",
  "file",
  "ftp",
  "ftps",
  "gluster",
  "host_cdrom",
  "host_device",
  "http",
  "https",
  "iscsi",
  "luks",
  "nbd",
  "nfs",
  "null-aio",
  "null-co",
  "nvme",
  "parallels",
  "preallocate",
  "qcow",
  "qed",
  "quorum",
  "rbd",
  "replication",
  "snapshot-access",
  "ssh",
  "throttle",
  "vdi",
  "vhdx",
  "vmdk",
  "vpc",
  "vvfat",
]);

/** QEMU's protocol drivers vstor opens as raw over a host file, with the file type each needs. */
const PROTOCOL_DRIVERS: Readonly<Record<string, "regular" | "device">> = {
  file: "regular",
  host_device: "device",
  host_cdrom: "device",
};

/**
 * QEMU's file-posix open: the file is opened first (a directory cannot be opened for writing),
 * then its type is checked against the driver.
 */
function protocolCheck(driver: string, path: string, readOnly: boolean): void {
  let info: Deno.FileInfo;
  try {
    info = Deno.statSync(path);
  } catch (e) {
    throw new OpenError(
      `Could not open '${path}': ${messageOf(e).replace(/ \(os error \d+\).*$/, "")}`,
    );
  }
  if (!readOnly && info.isDirectory) {
    throw new OpenError(`Could not open '${path}': Is a directory`);
  }
  const device = info.isCharDevice === true || info.isBlockDevice === true;
  if (PROTOCOL_DRIVERS[driver] === "regular" && !info.isFile) {
    throw new OpenError(`'${driver}' driver requires '${path}' to be a regular file`);
  }
  if (PROTOCOL_DRIVERS[driver] === "device" && !device) {
    throw new OpenError(
      `'${driver}' driver requires '${path}' to be either a character or block device`,
    );
  }
}

/** QEMU's check of a driver name, before anything is opened. */
function checkDriver(format: string): void {
  if (formatNames().includes(format)) return;
  if (QEMU_ONLY_DRIVERS.has(format)) {
    throw new OpenError(`Block driver '${format}' is not supported by vstor yet`);
  }
  throw new OpenError(`Unknown driver '${format}'`);
}

/** qcow2's runtime options (QEMU's qcow2_runtime_opts), on open and on reopen. */
export const QCOW2_KEYS: ReadonlySet<string> = new Set([
  "cache-size",
  "l2-cache-entry-size",
  "l2-cache-size",
  "refcount-cache-size",
  "cache-clean-interval",
  "lazy-refcounts",
  "pass-discard-request",
  "pass-discard-snapshot",
  "pass-discard-other",
  // vstor checks every metadata write against every structure whatever these say (QEMU's
  // overlap checks are a subset of that); they are parsed and checked as QEMU does.
  "overlap-check",
  "overlap-check.template",
  ...OVERLAP_KINDS.map((kind) => `overlap-check.${kind}`),
]);

/** QemuOpts' QEMU_OPT_NUMBER (qemu_strtou64: a leading minus wraps around, as strtoull). */
function parseNumber(key: string, value: string): number {
  const m = /^\s*(-?)(0x[0-9a-f]+|0[0-7]*|[1-9][0-9]*)$/i.exec(value);
  if (m === null) throw new OpenError(`Parameter '${key}' expects a number`);
  const n = BigInt(
    m[2]!.length > 1 && m[2]![0] === "0" && !/^0x/i.test(m[2]!) ? `0o${m[2]!.slice(1)}` : m[2]!,
  );
  if (n >= 2n ** 64n) throw new OpenError(`Parameter '${key}' expects a number`);
  return Number(m[1] === "-" && n !== 0n ? 2n ** 64n - n : n);
}

/** QemuOpts' QEMU_OPT_SIZE for a cache size: any value below 2^64 (only compared, so inexact is fine). */
function parseCacheBytes(key: string, value: string): number {
  const r = parseSize(value);
  if (!r.ok || r.value >= 2n ** 64n) throw new OpenError(sizeMessage(key));
  return Number(r.value);
}

/** The qcow2 runtime options among `pairs`, parsed into their types (later keys win). */
export function parseQcow2Options(
  pairs: ReadonlyArray<readonly [string, string]>,
): Qcow2RuntimeOptions {
  const o: Qcow2RuntimeOptions = {};
  const bits: Partial<Record<OverlapKind, boolean>> = {};
  for (const [key, value] of pairs) {
    switch (key) {
      case "cache-size":
        o.cacheSize = parseCacheBytes(key, value);
        break;
      case "l2-cache-size":
        o.l2CacheSize = parseCacheBytes(key, value);
        break;
      case "l2-cache-entry-size":
        o.l2CacheEntrySize = parseCacheBytes(key, value);
        break;
      case "refcount-cache-size":
        o.refcountCacheSize = parseCacheBytes(key, value);
        break;
      case "cache-clean-interval":
        o.cacheCleanInterval = parseNumber(key, value);
        break;
      case "lazy-refcounts":
        o.lazyRefcounts = parseBool(key, value);
        break;
      case "pass-discard-request":
        o.passDiscardRequest = parseBool(key, value);
        break;
      case "pass-discard-snapshot":
        o.passDiscardSnapshot = parseBool(key, value);
        break;
      case "pass-discard-other":
        o.passDiscardOther = parseBool(key, value);
        break;
      case "overlap-check":
        o.overlapCheck = value;
        break;
      case "overlap-check.template":
        o.overlapCheckTemplate = value;
        break;
      default:
        if (key.startsWith("overlap-check.")) {
          const kind = key.slice("overlap-check.".length) as OverlapKind;
          if (OVERLAP_KINDS.includes(kind)) bits[kind] = parseBool(key, value);
        }
    }
  }
  if (Object.keys(bits).length > 0) o.overlapBits = bits;
  return o;
}

/**
 * Resolve and apply the qcow2 runtime options among `pairs` to an open node, as QEMU's
 * qcow2_update_options: nothing changes when an option is refused.
 *
 * @throws {OpenError} with QEMU's message
 */
export async function applyQcow2Options(
  node: Qcow2Node,
  pairs: ReadonlyArray<readonly [string, string]>,
  unmap: boolean,
): Promise<void> {
  const relevant = pairs.filter(([key]) => QCOW2_KEYS.has(key));
  let settings;
  try {
    settings = resolveQcow2Options(parseQcow2Options(relevant), node.optionContext(unmap));
  } catch (e) {
    if (e instanceof OpenError) throw e;
    throw new OpenError(messageOf(e));
  }
  await node.applyRuntimeSettings(settings);
}

const RAW_KEYS = new Set(["offset", "size"]);

/** The request with its `-o` options folded in; throws OpenError for a bad value. */
export function applyOptions(
  request: OpenRequest,
): {
  request: OpenRequest;
  open: OpenOptions;
  formatKeys: string[];
} {
  const r: OpenRequest = { ...request, cache: { ...request.cache } };
  const open: OpenOptions = {};
  const formatKeys: string[] = [];
  for (const [key, value] of request.options) {
    switch (key) {
      case "driver":
        r.format = value;
        break;
      case "file":
      case "file.filename":
      case "filename":
        r.path = value;
        break;
      case "file.driver":
        if (value !== "file") throw new OpenError(`Unknown protocol driver '${value}'`);
        break;
      case "read-only":
        r.readOnly = parseBool(key, value);
        break;
      case "force-share":
        r.forceShare = parseBool(key, value);
        break;
      case "cache.direct":
        r.cache = { ...r.cache, direct: parseBool(key, value) };
        break;
      case "cache.no-flush":
        r.cache = { ...r.cache, noFlush: parseBool(key, value) };
        break;
      case "cache.writeback":
        r.cache = { ...r.cache, writethrough: !parseBool(key, value) };
        break;
      case "discard": {
        const mode = parseDiscardMode(value);
        if (mode === undefined) throw new OpenError(`Invalid discard option: ${value}`);
        r.discard = mode;
        break;
      }
      case "aio":
      case "file.aio": {
        const mode = parseAioMode(value);
        if (mode === undefined) {
          throw new OpenError(`Parameter 'aio' does not accept value '${value}'`);
        }
        r.aio = mode;
        break;
      }
      case "copy-on-read":
        r.copyOnRead = parseBool(key, value);
        break;
      case "locking":
      case "file.locking":
        // vstor always takes QEMU's OFD locks (they cannot hurt an exclusive user).
        if (!["on", "off", "auto"].includes(value)) {
          throw new OpenError(`Parameter 'locking' does not accept value '${value}'`);
        }
        break;
      case "backing.driver":
        // The backing file's format, whatever the image records (it must be one vstor has).
        if (!formatNames().includes(value)) throw new OpenError(`Unknown driver '${value}'`);
        open.backingFormat = value;
        break;
      case "offset":
        open.offset = parseBytes(key, value);
        formatKeys.push(key);
        break;
      case "size":
        open.size = parseBytes(key, value);
        formatKeys.push(key);
        break;
      default:
        formatKeys.push(key);
    }
  }
  parseQcow2Options(request.options); // type errors first, as QemuOpts absorbs them
  return { request: r, open, formatKeys };
}

/** An open image and how qemu-io drives it. */
export interface OpenedImage {
  readonly node: BlockNode;
  /** The request with its `-o` options applied (what `reopen` starts from). */
  readonly request: OpenRequest;
  /** The name qemu-io's messages use for it. */
  readonly name: string;
  /** Opened by probing a writable raw image: QEMU's warning is due. */
  readonly probedRaw: boolean;
}

function unsupportedKey(format: string, keys: readonly string[]): string | undefined {
  for (const key of keys) {
    if (QCOW2_KEYS.has(key) && format === "qcow2") continue;
    if (RAW_KEYS.has(key) && format === "raw") continue;
    return key;
  }
  return undefined;
}

/**
 * Open what `request` names, as qemu-io's blk_new_open: checks the cache and aio modes, opens the
 * image (or, with `snapshot`, a temporary qcow2 overlay over the image opened read-only).
 *
 * @throws {OpenError} with QEMU's message, or the opener's error
 */
export async function openRequest(request: OpenRequest): Promise<OpenedImage> {
  const named = (key: string) => request.options.some(([k]) => k === key);
  if (
    request.path === undefined && request.format === undefined && !named("driver") &&
    !named("file") && !named("file.filename") && !named("filename")
  ) {
    throw new OpenError("Must specify either driver or file");
  }
  const { request: r, open, formatKeys } = applyOptions(request);
  if (r.path === undefined) throw new OpenError('A block device must be specified for "file"');
  const path = r.path;
  if (r.format !== undefined && r.format in PROTOCOL_DRIVERS) {
    protocolCheck(r.format, path, r.readOnly || r.snapshot);
    r.format = "raw"; // a protocol driver alone shows the file's bytes, as raw does
  }
  if (r.format !== undefined) checkDriver(r.format);
  if (r.aio === "native" && !r.cache.direct) {
    throw new OpenError(
      "aio=native was specified, but it requires cache.direct=on, which was not specified.",
    );
  }
  if (r.format !== undefined) {
    const bad = unsupportedKey(r.format, formatKeys);
    if (bad !== undefined) {
      throw new OpenError(`Block format '${r.format}' does not support the option '${bad}'`);
    }
  }
  if (r.copyOnRead && r.readOnly) throw new OpenError("Can't use copy-on-read on read-only device");
  // Writethrough is the session's (FUA writes); the host files see O_DIRECT and no-flush.
  const cache = r.cache.direct ? "none" as const : r.cache.noFlush ? "unsafe" as const : undefined;
  const base: OpenOptions = {
    ...open,
    ...(r.format === undefined ? {} : { format: r.format }),
    ...(cache === undefined ? {} : { cache }),
  };
  const readOnly = r.readOnly || r.snapshot;
  // vstor has no linux-aio: aio=native (O_DIRECT only, checked above) runs on io_uring; threads
  // given explicitly runs on a pool of Workers, the default on synchronous calls.
  const aio = r.aio === undefined ? {} : { aio: r.aio === "threads" ? r.aio : "io_uring" as const };
  const node = await openImage(path, { ...base, ...aio, readOnly, forceShare: r.forceShare });
  if (r.format === undefined) {
    const bad = unsupportedKey(node.format, formatKeys);
    if (bad !== undefined) {
      await node.close();
      throw new OpenError(`Block format '${node.format}' does not support the option '${bad}'`);
    }
  }
  if (node instanceof Qcow2Node) {
    try {
      await applyQcow2Options(node, request.options, r.discard === "unmap");
    } catch (e) {
      await node.close();
      throw e;
    }
  }
  const probedRaw = r.format === undefined && node.format === "raw" && !readOnly;
  if (!r.snapshot) return { node, request: r, name: path, probedRaw };
  try {
    return { node: await temporaryOverlay(node, r), request: r, name: path, probedRaw };
  } catch (e) {
    await node.close();
    throw new OpenError(`Could not create temporary overlay: ${messageOf(e)}`);
  }
}

/** QEMU's bdrv_append_temp_snapshot: a qcow2 file of the image's size, unlinked at once. */
async function temporaryOverlay(base: BlockNode, r: OpenRequest): Promise<BlockNode> {
  let tmpdir = "/var/tmp"; // QEMU's default; $TMPDIR wins where we may read it
  try {
    tmpdir = Deno.env.get("TMPDIR") || tmpdir;
  } catch {
    // no env permission: QEMU's default it is
  }
  const path = Deno.makeTempFileSync({ dir: tmpdir, prefix: "vl." });
  const file = openHostFile(path, {});
  try {
    Deno.removeSync(path);
    await createQcow2(file, Math.ceil(base.size / 512) * 512, {});
    // Always writable: -r and reopen -r/-w are the session's read-only flag over it.
    const overlay = await Qcow2Node.open(file, {
      ...(r.cache.noFlush ? { cache: "unsafe" as const } : {}),
    });
    overlay.attachBacking(base);
    return overlay;
  } catch (e) {
    file.close();
    throw e;
  }
}
