/**
 * Reading guest bytes of a qcow2 image through its mapping: data clusters from the file, zero
 * clusters as zeroes, unallocated ones from the backing node (zeroes past its end), compressed
 * clusters decompressed (the last one kept for sequential reads). No size check: copy-on-write
 * and the VM state area read past the disk's end too.
 *
 * @module
 */
import { decompressCluster } from "./compress.ts";
import { signalCorruption } from "./integrity.ts";
import { l2Table, mapRun } from "./mapping.ts";
import type { Qcow2State } from "./state.ts";
import { compressedLocation } from "./tables.ts";

/** Read guest bytes from `offset` into `dst`, run by run (data clusters synchronously). */
export function readAt(s: Qcow2State, offset: number, dst: Uint8Array): Promise<void> {
  return readRuns(s, offset, dst, false);
}

/**
 * {@linkcode readAt} with the data clusters read through the file's asynchronous path, all runs of
 * the request in flight at once (the caller keeps the clusters in place meanwhile: the node's
 * IoGate). Zero, backing and compressed runs are served as by readAt.
 */
export function readAtAsync(s: Qcow2State, offset: number, dst: Uint8Array): Promise<void> {
  return readRuns(s, offset, dst, true);
}

async function readRuns(
  s: Qcow2State,
  offset: number,
  dst: Uint8Array,
  inFlight: boolean,
): Promise<void> {
  const file = s.file;
  let first: Promise<void> | undefined;
  let more: Promise<void>[] | undefined;
  try {
    let pos = 0;
    while (pos < dst.length) {
      const run = mapRun(s, offset + pos, dst.length - pos);
      const part = dst.subarray(pos, pos + run.length);
      switch (run.kind) {
        case "normal": {
          if (!inFlight) {
            file.readAt(run.hostOffset, part);
            break;
          }
          const io = file.readAtAsync!(run.hostOffset, part);
          if (first === undefined) first = io;
          else (more ??= []).push(io);
          break;
        }
        case "zero-plain":
        case "zero-alloc":
          part.fill(0);
          break;
        case "unallocated":
        case "unallocated-alloc":
          await readBacking(s, offset + pos, part);
          break;
        case "compressed":
          readCompressed(s, offset + pos, part);
          break;
        default:
          throw signalCorruption(
            s,
            `Invalid mapping at guest offset ${offset + pos}`,
            offset + pos,
          );
      }
      pos += run.length;
    }
  } catch (e) {
    // Reads already started still write into dst: let them finish before the caller moves on.
    if (first !== undefined) await Promise.allSettled([first, ...(more ?? [])]);
    throw e;
  }
  if (more === undefined) {
    if (first !== undefined) await first;
  } else {
    await Promise.all([first!, ...more]);
  }
}

async function readBacking(s: Qcow2State, guestOffset: number, dst: Uint8Array): Promise<void> {
  const backing = s.backing;
  if (backing === undefined || guestOffset >= backing.size) {
    dst.fill(0);
    return;
  }
  const inside = Math.min(dst.length, backing.size - guestOffset);
  await backing.read(guestOffset, dst.subarray(0, inside));
  if (inside < dst.length) dst.fill(0, inside);
}

function readCompressed(s: Qcow2State, guestOffset: number, dst: Uint8Array): void {
  const cs = s.clusterSize;
  const clusterIndex = Math.floor(guestOffset / cs);
  const table = l2Table(s, Math.floor(clusterIndex / s.l2Entries))!;
  const at = (clusterIndex % s.l2Entries) * s.entryBytes;
  const hi = table.view.getUint32(at), lo = table.view.getUint32(at + 4);
  const key = `${hi}:${lo}`;
  let data = s.compressedCache?.key === key ? s.compressedCache.data : undefined;
  if (data === undefined) {
    const loc = compressedLocation(hi, lo, s.clusterBits);
    const fileSize = s.file.size();
    if (loc.hostOffset < cs || loc.hostOffset >= fileSize) {
      throw signalCorruption(
        s,
        `Compressed cluster at 0x${
          loc.hostOffset.toString(16)
        } is in the header or past the end of the file`,
        table.offset + at,
      );
    }
    const src = new Uint8Array(Math.min(loc.length, fileSize - loc.hostOffset));
    s.file.readAt(loc.hostOffset, src);
    data = new Uint8Array(cs);
    decompressCluster(s.header.compressionType, src, data, {
      path: s.filename,
      offset: loc.hostOffset,
    });
    s.compressedCache = { key, data };
  }
  const within = guestOffset % cs;
  dst.set(data.subarray(within, within + dst.length));
}
