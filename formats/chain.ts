/**
 * Backing-chain operations with qemu-img's semantics: commit an overlay's data into a base below
 * it, and rebase an overlay onto another backing file (safe: copy what would change; unsafe:
 * rename only).
 *
 * @module
 */
import { BlockError } from "../src/errors.ts";
import type { BlockNode } from "../src/block/node.ts";
import { openImage, type OpenOptions, resolveBacking } from "./open.ts";
import { Qcow2Node } from "./qcow2/qcow2.ts";
import { serializeHeader } from "./qcow2/header.ts";

const CHUNK = 1 << 20;

/** Progress reports: bytes done out of total. */
export type Progress = (done: number, total: number) => void;

/** How a chain operation opens an image (default {@linkcode openImage}; crash tests record). */
export type ImageOpener = (path: string, opts: OpenOptions) => Promise<BlockNode>;

/** Whether [offset, offset+max) is allocated in `layer` itself, and how far that answer holds. */
async function allocatedIn(
  layer: BlockNode,
  offset: number,
  max: number,
): Promise<[boolean, number]> {
  if (offset >= layer.size) return [false, max];
  const st = await layer.blockStatus(offset, Math.min(max, layer.size - offset));
  return [st.kind !== "unallocated" && st.kind !== "eof", Math.max(1, st.length)];
}

/** Options of {@linkcode commitImage}. */
export interface CommitOptions {
  /** The backing file (as a path) to commit into; default the overlay's immediate backing file. */
  base?: string;
  /** Keep the overlay's data (qemu-img -d); implied by an explicit base. */
  keepOverlay?: boolean;
  /** Called as the commit copies: bytes done out of total. */
  onProgress?: Progress;
  /** Opens every image of the chain (default {@linkcode openImage}). */
  open?: ImageOpener;
}

/**
 * Commit the data of `path` (and of any images between it and the base) into the base image.
 * Without an explicit base, the overlay is emptied afterwards unless `keepOverlay`.
 *
 * @throws {BlockError} `invalid-argument` when the image has no backing file or the base is not in its chain
 */
export async function commitImage(path: string, opts: CommitOptions = {}): Promise<void> {
  const openImage = opts.open ?? defaultOpen;
  // The chain, top first, each image alone; resolved names as the opener would resolve them.
  const names: Array<{ path: string; format?: string }> = [{ path }];
  const layers: BlockNode[] = [];
  try {
    layers.push(await openImage(path, { noBacking: true }));
    for (;;) {
      const last = layers[layers.length - 1]!;
      const next = last.backingName;
      if (next === undefined) break;
      const nextPath = resolveBacking(names[names.length - 1]!.path, next.file);
      if (names.length > 64) {
        throw new BlockError("unsupported", "Backing chain is too deep", { path });
      }
      names.push(
        next.format === undefined ? { path: nextPath } : { path: nextPath, format: next.format },
      );
      // As QEMU's bdrv_find_backing_image: -b is relative to the directory of the layer above.
      const wanted = opts.base === undefined
        ? undefined
        : resolveBacking(names[names.length - 2]!.path, opts.base);
      if (wanted === undefined || sameFile(nextPath, wanted)) break;
      layers.push(
        await openImage(nextPath, { readOnly: true, noBacking: true, ...formatOf(next.format) }),
      );
    }
    if (names.length < 2) {
      throw new BlockError("invalid-argument", "Image does not have a backing file", { path });
    }
    const baseName = names[names.length - 1]!;
    if (
      opts.base !== undefined &&
      !sameFile(baseName.path, resolveBacking(names[names.length - 2]!.path, opts.base))
    ) {
      throw new BlockError(
        "invalid-argument",
        `'${opts.base}' is not in the backing chain of '${path}'`,
        { path },
      );
    }
    // The base opens read-write with its own chain below it (for its copy-on-write).
    const base = await openImage(baseName.path, formatOf(baseName.format));
    try {
      // Reads through the top see top → intermediates → base.
      for (let i = 0; i < layers.length; i++) layers[i]!.attachBacking?.(layers[i + 1] ?? base);
      const top = layers[0]!;
      if (base.size < top.size) {
        if (!base.truncate) {
          throw new BlockError("unsupported", `Cannot grow base image '${baseName.path}'`, {
            path,
          });
        }
        await base.truncate(top.size);
      }
      const buf = new Uint8Array(CHUNK);
      for (let pos = 0; pos < top.size;) {
        let len = Math.min(CHUNK, top.size - pos);
        // The first layer above the base that holds the range decides what is copied: zeroes
        // it records become zero writes that may unmap, anything else is copied as data (as
        // QEMU's commit job, a mirror with unmap on).
        let found: "zero" | "data" | undefined;
        for (const layer of layers) {
          // Past the end of a layer below the top, the layers above read zeroes (a backing file
          // shows nothing beyond its end): those zeroes are what the base must hold.
          if (pos >= layer.size) {
            found = "zero";
            break;
          }
          const st = await layer.blockStatus(pos, Math.min(len, layer.size - pos));
          len = Math.min(len, Math.max(1, st.length));
          if (st.kind !== "unallocated" && st.kind !== "eof") {
            found = st.kind === "zero" ? "zero" : "data";
            break;
          }
        }
        if (found === "zero") {
          await base.writeZeroes(pos, len, { unmap: true });
        } else if (found === "data") {
          const part = buf.subarray(0, len);
          await top.read(pos, part);
          await base.write(pos, part);
        }
        pos += len;
        opts.onProgress?.(pos, top.size);
      }
      await base.flush();
      if (opts.base === undefined && !opts.keepOverlay && top instanceof Qcow2Node) {
        await top.makeEmpty();
      }
      // Detach so closing the layers does not close the base twice.
      for (const layer of layers) layer.attachBacking?.(undefined);
    } finally {
      await base.close();
    }
  } finally {
    for (const layer of layers) await layer.close();
  }
}

const defaultOpen: ImageOpener = (path, opts) => openImage(path, opts);

function formatOf(format: string | undefined): { format?: string } {
  return format === undefined ? {} : { format };
}

function sameFile(a: string, b: string): boolean {
  try {
    return Deno.realPathSync(a) === Deno.realPathSync(b);
  } catch {
    return a === b;
  }
}

/** Options of {@linkcode rebaseImage}. */
export interface RebaseOptions {
  /** New backing file name as it will be stored ("" for none), relative to the overlay's directory. */
  backing: string;
  /** Format of the new backing file (default: probed). */
  backingFormat?: string;
  /** Only change the name in the header (qemu-img -u). */
  unsafe?: boolean;
  /** Called as the rebase copies: bytes done out of total. */
  onProgress?: Progress;
  /** Opens the overlay and the new backing file (default {@linkcode openImage}). */
  open?: ImageOpener;
}

/**
 * Put `path` on a new backing file. Safe mode copies into the overlay every range it does not
 * hold itself where the old and the new backing chains differ, so the guest sees the same data.
 */
export async function rebaseImage(path: string, opts: RebaseOptions): Promise<void> {
  const openImage = opts.open ?? defaultOpen;
  if (opts.backing !== "" && opts.backingFormat === undefined) {
    throw new BlockError(
      "invalid-argument",
      `Could not change the backing file to '${opts.backing}': backing format must be specified`,
      {
        path,
      },
    );
  }
  const overlay = await openImage(path, opts.unsafe ? { noBacking: true } : {});
  try {
    if (!(overlay instanceof Qcow2Node)) {
      throw new BlockError(
        "unsupported",
        `Format '${overlay.format}' has no backing file to change`,
        { path },
      );
    }
    if (!opts.unsafe) {
      const newBase = opts.backing === ""
        ? undefined
        : await openImage(resolveBacking(path, opts.backing), {
          readOnly: true,
          ...formatOf(opts.backingFormat),
        });
      try {
        await copyDifferences(overlay, newBase, opts.onProgress);
      } finally {
        await newBase?.close();
      }
    }
    const format = opts.backing === "" ? undefined : opts.backingFormat;
    prepareBackingName(overlay, opts.backing, format);
    await overlay.setBackingName(opts.backing, format);
  } finally {
    await overlay.close();
  }
}

const SECTOR = 512;

/**
 * Make the header write that changes the backing name touch only its first sector, which a disk
 * writes atomically. With a feature name table the name sits in the second sector while its
 * offset and length sit in the first, so a torn write could pair the new length with the old
 * name (or the reverse). Each step below leaves a valid header naming the old or the new file:
 * - the old header lies within sector 0: the sectors after it get their new contents first
 *   (nothing looks there yet; flush);
 * - the extensions end where they ended (the name's offset stays): the new name is parked where
 *   no header looks, past both layouts (flush), sector 0 becomes the new one pointing at the
 *   parked name (flush), then the sectors after it get their new contents (flush).
 * The final header write then differs from the disk in sector 0 only. When the extensions grow or
 * shrink and the old header spills past sector 0, nothing is done (a torn write can still mix).
 */
function prepareBackingName(node: Qcow2Node, file: string, format: string | undefined): void {
  const h = node.header;
  const next = { ...h };
  if (file === "") {
    delete next.backingFile;
    delete next.backingFormat;
  } else {
    next.backingFile = file;
    if (format === undefined) delete next.backingFormat;
    else next.backingFormat = format;
  }
  const want = serializeHeader(next, node.filename);
  if (want.length <= SECTOR) return;
  const current = serializeHeader({ ...h }, node.filename);
  const onDisk = new Uint8Array(Math.max(want.length, current.length));
  node.file.readAt(0, onDisk);
  const tail = want.subarray(SECTOR);
  if (sameBytesFrom(tail, onDisk.subarray(SECTOR, want.length))) return;
  if (current.length <= SECTOR) {
    node.file.writeAt(SECTOR, tail);
    node.barrier();
    return;
  }
  const view = new DataView(want.buffer, want.byteOffset, want.byteLength);
  const nameOffset = Number(view.getBigUint64(8));
  if (nameOffset !== h.backingFileOffset) return;
  const name = new TextEncoder().encode(file);
  const parked = Math.ceil(onDisk.length / SECTOR) * SECTOR;
  if (parked + name.length > node.clusterSize) return;
  node.file.writeAt(parked, name);
  node.barrier();
  const head = want.slice(0, SECTOR);
  const headView = new DataView(head.buffer);
  headView.setBigUint64(8, BigInt(parked));
  headView.setUint32(16, name.length);
  node.file.writeAt(0, head);
  node.barrier();
  node.file.writeAt(SECTOR, tail);
  node.barrier();
}

function sameBytesFrom(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

async function readView(
  node: BlockNode | undefined,
  offset: number,
  dst: Uint8Array,
): Promise<void> {
  if (node === undefined || offset >= node.size) {
    dst.fill(0);
    return;
  }
  const inside = Math.min(dst.length, node.size - offset);
  await node.read(offset, dst.subarray(0, inside));
  dst.fill(0, inside);
}

/**
 * Whether `node`'s view of [offset, offset+length) reads as zeroes, known from block status alone
 * (zero extents, unallocated down the chain, past the end): no data is read.
 */
async function readsAsZeroes(
  node: BlockNode | undefined,
  offset: number,
  length: number,
): Promise<boolean> {
  const end = offset + length;
  for (let pos = offset; pos < end;) {
    if (node === undefined || pos >= node.size) return true;
    const st = await node.blockStatus(pos, Math.min(end, node.size) - pos);
    if (st.kind === "eof") return true;
    const step = Math.max(1, st.length);
    if (st.kind === "unallocated") {
      if (!(await readsAsZeroes(node.backing, pos, step))) return false;
    } else if (st.kind !== "zero") {
      return false;
    }
    pos += step;
  }
  return true;
}

/** Whether the 512-byte sectors at `at` of `a` and `b` differ (word by word; `n` bytes in all). */
function sectorDiffers(
  a: Uint8Array,
  b: Uint8Array,
  wa: Int32Array,
  wb: Int32Array,
  at: number,
  n: number,
): boolean {
  const end = Math.min(at + 512, n);
  let i = at;
  for (; i + 4 <= end; i += 4) if (wa[i >> 2] !== wb[i >> 2]) return true;
  for (; i < end; i++) if (a[i] !== b[i]) return true;
  return false;
}

/** Copy the old backing view into the overlay wherever it differs from the new one (by sectors). */
async function copyDifferences(
  overlay: Qcow2Node,
  newBase: BlockNode | undefined,
  onProgress?: Progress,
): Promise<void> {
  const oldBase = overlay.backing;
  const oldEnd = oldBase?.size ?? 0;
  const a = new Uint8Array(CHUNK), b = new Uint8Array(CHUNK);
  const wa = new Int32Array(a.buffer), wb = new Int32Array(b.buffer);
  for (let pos = 0; pos < overlay.size;) {
    let [here, n] = await allocatedIn(overlay, pos, Math.min(CHUNK, overlay.size - pos));
    // As qemu-img rebase: a piece lies wholly below or wholly past the old backing file's end;
    // past it the old view is zeroes, kept with zero writes rather than zero data.
    if (pos < oldEnd && pos + n > oldEnd) n = oldEnd - pos;
    // (v2 has no zero flag: a zero write there could deallocate, and the new backing file would
    // show through — QEMU 7.2 loses data that way; vstor writes the zeroes as data.)
    const oldIsZero = pos >= oldEnd && overlay.header.version === 3;
    // Where both backing views read as zeroes (holes, zero clusters, past their ends) nothing
    // can differ: block status says so without reading a byte (an empty 10 GiB chain in ms).
    const same = !here && await readsAsZeroes(oldBase, pos, n) &&
      await readsAsZeroes(newBase, pos, n);
    if (!here && !same) {
      const oldPart = a.subarray(0, n), newPart = b.subarray(0, n);
      await readView(oldBase, pos, oldPart);
      await readView(newBase, pos, newPart);
      // Runs of differing 512-byte sectors go into the overlay.
      let runStart = -1;
      for (let s = 0; s <= n; s += 512) {
        const differs = s < n && sectorDiffers(a, b, wa, wb, s, n);
        if (differs && runStart < 0) runStart = s;
        if (!differs && runStart >= 0) {
          if (oldIsZero) await overlay.writeZeroes(pos + runStart, s - runStart);
          else await overlay.write(pos + runStart, oldPart.subarray(runStart, s));
          runStart = -1;
        }
      }
    }
    pos += n;
    onProgress?.(pos, overlay.size);
  }
  await overlay.flush();
}
