/**
 * qcow2's runtime options (QEMU's qcow2_runtime_opts): cache sizes, cache cleaning, lazy
 * refcounts, overlap checks and discard passthrough, resolved for one image as QEMU's
 * qcow2_update_options_prepare resolves them on open and on reopen, with its messages.
 *
 * @module
 */
import { BlockError } from "../../src/errors.ts";

/** QEMU's DEFAULT_L2_CACHE_MAX_SIZE on Linux. */
export const DEFAULT_L2_CACHE_MAX = 32 * 1024 * 1024;
/** QEMU's DEFAULT_CACHE_CLEAN_INTERVAL on Linux, in seconds. */
export const DEFAULT_CACHE_CLEAN_INTERVAL = 600;
const MIN_L2_TABLES = 2;
const MIN_REFCOUNT_BLOCKS = 4;
const INT_MAX = 2 ** 31 - 1;
const UINT_MAX = 2 ** 32 - 1;

/** The structures QEMU's overlap-check.* booleans name, in QEMU's bit order. */
export const OVERLAP_KINDS = [
  "main-header",
  "active-l1",
  "active-l2",
  "refcount-table",
  "refcount-block",
  "snapshot-table",
  "inactive-l1",
  "inactive-l2",
  "bitmap-directory",
] as const;
export type OverlapKind = typeof OVERLAP_KINDS[number];

const bit = (kind: OverlapKind) => 1 << OVERLAP_KINDS.indexOf(kind);
/** QCOW2_OL_CONSTANT: the structures whose place only changes with the header. */
const OVERLAP_CONSTANT = bit("main-header") | bit("active-l1") | bit("refcount-table") |
  bit("snapshot-table") | bit("bitmap-directory");
/** QEMU's overlap-check templates as bit masks over OVERLAP_KINDS. */
const OVERLAP_TEMPLATES: Readonly<Record<string, number>> = {
  none: 0,
  constant: OVERLAP_CONSTANT,
  cached: OVERLAP_CONSTANT | bit("active-l2") | bit("refcount-block") | bit("inactive-l1"),
  all: (1 << OVERLAP_KINDS.length) - 1,
};

/** The options as given (already parsed into their types); absent means QEMU's default. */
export interface Qcow2RuntimeOptions {
  cacheSize?: number;
  l2CacheSize?: number;
  l2CacheEntrySize?: number;
  refcountCacheSize?: number;
  /** Seconds; may be any non-negative number (too big is refused here, as QEMU does). */
  cacheCleanInterval?: number;
  lazyRefcounts?: boolean;
  overlapCheck?: string;
  overlapCheckTemplate?: string;
  overlapBits?: Partial<Record<OverlapKind, boolean>>;
  passDiscardRequest?: boolean;
  passDiscardSnapshot?: boolean;
  passDiscardOther?: boolean;
}

/** What the image needs to know to resolve its options. */
export interface Qcow2OptionContext {
  clusterSize: number;
  /** Virtual size in bytes. */
  size: number;
  /** 8, or 16 with extended L2 entries. */
  l2EntryBytes: number;
  version: number;
  /** The image header's lazy-refcounts bit (the default). */
  lazyRefcountsBit: boolean;
  /** The node was opened with discard=unmap (pass-discard-request's default). */
  unmap: boolean;
  path?: string | undefined;
}

/** The resolved settings an open qcow2 node runs with. */
export interface Qcow2RuntimeSettings {
  /** L2 table cache budget in bytes (at least two tables). */
  l2CacheBytes: number;
  /** QEMU's cache slice size; vstor caches whole tables, so it is checked and reported only. */
  l2CacheEntrySize: number;
  /** Refcount block cache budget in bytes (at least four blocks). */
  refcountCacheBytes: number;
  cacheCleanInterval: number;
  lazyRefcounts: boolean;
  /** Bit mask over OVERLAP_KINDS. vstor checks every metadata write whatever this says. */
  overlapCheck: number;
  passDiscard: { request: boolean; snapshot: boolean; other: boolean };
}

function refuse(message: string, path: string | undefined): never {
  throw new BlockError("invalid-argument", message, path === undefined ? {} : { path });
}

/**
 * Resolve `options` for an image as QEMU's read_cache_sizes and qcow2_update_options_prepare do,
 * in their order, so the first problem QEMU would report is the one reported.
 *
 * @throws {BlockError} `invalid-argument` with QEMU's message
 */
export function resolveQcow2Options(
  options: Qcow2RuntimeOptions,
  image: Qcow2OptionContext,
): Qcow2RuntimeSettings {
  const cs = image.clusterSize;
  const path = image.path;
  const maxL2Entries = Math.ceil(image.size / cs);
  const maxL2Cache = Math.ceil(maxL2Entries * image.l2EntryBytes / cs) * cs;
  const minRefcountCache = MIN_REFCOUNT_BLOCKS * cs;
  const l2Setting = options.l2CacheSize ?? DEFAULT_L2_CACHE_MAX;
  let refcountCache = options.refcountCacheSize ?? 0;
  let l2EntrySize = options.l2CacheEntrySize ?? cs;
  let l2Cache = Math.min(maxL2Cache, l2Setting);
  const combined = options.cacheSize;
  if (combined !== undefined) {
    const l2Set = options.l2CacheSize !== undefined;
    const refcountSet = options.refcountCacheSize !== undefined;
    if (l2Set && refcountSet) {
      refuse(
        "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time",
        path,
      );
    } else if (l2Set && l2Setting > combined) {
      refuse("l2-cache-size may not exceed cache-size", path);
    } else if (refcountCache > combined) {
      refuse("refcount-cache-size may not exceed cache-size", path);
    }
    if (l2Set) {
      refcountCache = combined - l2Cache;
    } else if (refcountSet) {
      l2Cache = combined - refcountCache;
    } else if (combined >= maxL2Cache + minRefcountCache) {
      l2Cache = maxL2Cache;
      refcountCache = combined - l2Cache;
    } else {
      refcountCache = Math.min(combined, minRefcountCache);
      l2Cache = combined - refcountCache;
    }
  }
  if (l2Cache < maxL2Cache && options.l2CacheEntrySize === undefined) {
    l2EntrySize = Math.min(cs, 4096);
  }
  if (l2EntrySize < 512 || l2EntrySize > cs || !Number.isInteger(Math.log2(l2EntrySize))) {
    refuse(
      `L2 cache entry size must be a power of two between 512 and the cluster size (${cs})`,
      path,
    );
  }
  const l2Slices = Math.max(MIN_L2_TABLES, Math.floor(l2Cache / l2EntrySize));
  if (l2Slices > INT_MAX) refuse("L2 cache size too big", path);
  const refcountBlocks = Math.max(MIN_REFCOUNT_BLOCKS, Math.floor(refcountCache / cs));
  if (refcountBlocks > INT_MAX) refuse("Refcount cache size too big", path);
  const interval = options.cacheCleanInterval ?? DEFAULT_CACHE_CLEAN_INTERVAL;
  if (interval > UINT_MAX) refuse("Cache clean interval too big", path);
  const lazy = options.lazyRefcounts ?? image.lazyRefcountsBit;
  if (lazy && image.version < 3) {
    refuse(
      "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level",
      path,
    );
  }
  const given = options.overlapCheck, template = options.overlapCheckTemplate;
  if (given !== undefined && template !== undefined && given !== template) {
    refuse(
      `Conflicting values for qcow2 options 'overlap-check' ('${given}') and ` +
        `'overlap-check.template' ('${template}')`,
      path,
    );
  }
  const name = given ?? template ?? "cached";
  if (!Object.hasOwn(OVERLAP_TEMPLATES, name)) {
    refuse(
      `Unsupported value '${name}' for qcow2 option 'overlap-check'. Allowed are any of the ` +
        "following: none, constant, cached, all",
      path,
    );
  }
  let overlap = 0;
  OVERLAP_KINDS.forEach((kind, bit) => {
    const on = options.overlapBits?.[kind] ?? (OVERLAP_TEMPLATES[name]! & (1 << bit)) !== 0;
    if (on) overlap |= 1 << bit;
  });
  // vstor's table caches hold whole tables: the budget is what the slices would hold together.
  const l2Bytes = Math.max(MIN_L2_TABLES * cs, Math.min(l2Slices * l2EntrySize, 2 ** 52));
  return {
    l2CacheBytes: l2Bytes,
    l2CacheEntrySize: l2EntrySize,
    refcountCacheBytes: Math.min(refcountBlocks * cs, 2 ** 52),
    cacheCleanInterval: interval,
    lazyRefcounts: lazy,
    overlapCheck: overlap,
    passDiscard: {
      request: options.passDiscardRequest ?? image.unmap,
      snapshot: options.passDiscardSnapshot ?? true,
      other: options.passDiscardOther ?? false,
    },
  };
}

/**
 * QEMU's qcow2_join_options for a reopen: the options given now over those retained from before,
 * where a new overlap template replaces every old overlap option and a new cache-size every old
 * cache size. Both lists are `[key, value]` in order; the result holds each key once.
 */
export function joinQcow2Options(
  given: ReadonlyArray<readonly [string, string]>,
  old: ReadonlyArray<readonly [string, string]>,
): Array<[string, string]> {
  const out = new Map<string, string>();
  for (const [key, value] of given) out.set(key, value);
  const has = (key: string) => out.has(key);
  const newTemplate = has("overlap-check") || has("overlap-check.template");
  const newTotal = has("cache-size");
  for (const [key, value] of old) {
    if (out.has(key)) continue;
    if (newTemplate && (key === "overlap-check" || key.startsWith("overlap-check."))) continue;
    if (newTotal && (key === "l2-cache-size" || key === "refcount-cache-size")) continue;
    out.set(key, value);
  }
  // QEMU's has_all_cache_options counts cache-size itself, so an old total never survives a
  // reopen that does not give it again.
  if (!newTotal) out.delete("cache-size");
  return [...out];
}
