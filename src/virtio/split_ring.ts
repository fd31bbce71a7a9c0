/**
 * The split ring's layout in guest memory (virtio 1.2 §2.7): the sizes of the descriptor table,
 * avail ring and used ring, how a driver lays them out, and the checks both sides make before
 * touching a layout the guest chose.
 *
 * @module
 */

import type { GuestMemory } from "./memory.ts";
import { VIRTQ_MAX_SIZE } from "./features.ts";
import type { QueueLayout } from "./queue.ts";

/** Bytes of one descriptor (direct or indirect). */
export const DESC_SIZE = 16;
/** Bytes of one used ring element: id u32, len u32. */
export const USED_ELEM_SIZE = 8;
/** QEMU's VIRTQUEUE_MAX_SIZE: the buffers per chain QEMU maps whatever the queue size. */
const QEMU_MAX_CHAIN = 1024;

/** Bytes of the descriptor table of a queue of `size` entries. */
export function descBytes(size: number): number {
  return DESC_SIZE * size;
}
/** Bytes of the avail ring: flags, idx, ring[size], used_event. */
export function availBytes(size: number): number {
  return 6 + 2 * size;
}
/** Bytes of the used ring: flags, idx, ring[size], avail_event. */
export function usedBytes(size: number): number {
  return 6 + USED_ELEM_SIZE * size;
}

/**
 * Most buffers one chain may hold. The spec says no longer than the queue size (§2.7.5.3.1); QEMU
 * maps up to 1024 whatever the size, so guests that rely on that with small queues keep working.
 * The bound also caps the views one pop allocates.
 */
export function maxChainBuffers(size: number): number {
  return Math.max(size, QEMU_MAX_CHAIN);
}

function isPowerOfTwoQueueSize(size: number): boolean {
  return Number.isInteger(size) && size >= 1 && size <= VIRTQ_MAX_SIZE && (size & (size - 1)) === 0;
}

/**
 * Lays out a split ring of `size` entries from guest address `base`, as a driver allocating one
 * contiguous block would: descriptor table (16-aligned), avail ring (2-aligned, with `used_event`),
 * used ring (4-aligned, with `avail_event`), back to back.
 *
 * @param size queue size: a power of 2 from 1 to 32768
 * @param base guest-physical address to start from (rounded up to 16)
 * @returns the layout and `bytes`, the span from `base` to the end of the used ring
 * @throws {RangeError} for a bad size or base
 *
 * @example
 * ```ts
 * import { splitRingLayout } from "./split_ring.ts";
 * const l = splitRingLayout(256, 0x1000);
 * if (l.desc !== 0x1000 || l.driver !== 0x2000 || l.device !== 0x2208) throw new Error("layout");
 * ```
 */
export function splitRingLayout(size: number, base: number): QueueLayout & { bytes: number } {
  if (!isPowerOfTwoQueueSize(size)) {
    throw new RangeError(
      `Split queue size ${size} is not a power of 2 from 1 to ${VIRTQ_MAX_SIZE}`,
    );
  }
  if (!Number.isSafeInteger(base) || base < 0) {
    throw new RangeError(`Split ring base ${base} is not a guest address`);
  }
  const desc = alignUp(base, 16);
  const driver = desc + descBytes(size); // a multiple of 16, so 2-aligned
  const device = alignUp(driver + availBytes(size), 4);
  return { size, desc, driver, device, bytes: device + usedBytes(size) - base };
}

function alignUp(n: number, align: number): number {
  return Math.ceil(n / align) * align;
}

/**
 * Why `layout` is not a usable split ring in `mem`, or `null` when it is: size a power of 2 up to
 * 32768, areas naturally aligned, each wholly inside one RAM region, no two overlapping.
 */
export function splitLayoutProblem(mem: GuestMemory, layout: QueueLayout): string | null {
  const { size } = layout;
  if (!isPowerOfTwoQueueSize(size)) {
    return `queue size ${size} is not a power of 2 from 1 to ${VIRTQ_MAX_SIZE}`;
  }
  const areas = [
    { name: "descriptor table", gpa: layout.desc, bytes: descBytes(size), align: 16 },
    { name: "avail ring", gpa: layout.driver, bytes: availBytes(size), align: 2 },
    { name: "used ring", gpa: layout.device, bytes: usedBytes(size), align: 4 },
  ];
  for (const a of areas) {
    // The addresses come from the guest's queue_desc/driver/device registers: check before use.
    if (!Number.isSafeInteger(a.gpa) || a.gpa < 0) return `${a.name} address ${a.gpa} is invalid`;
    if (a.gpa % a.align !== 0) {
      return `${a.name} at 0x${a.gpa.toString(16)} is not ${a.align}-byte aligned`;
    }
    if (!mem.contains(a.gpa, a.bytes)) {
      return `${a.name} at 0x${a.gpa.toString(16)}+${a.bytes} is not inside one RAM region`;
    }
  }
  for (let i = 0; i < areas.length; i++) {
    for (let j = i + 1; j < areas.length; j++) {
      const a = areas[i]!;
      const b = areas[j]!;
      if (a.gpa < b.gpa + b.bytes && b.gpa < a.gpa + a.bytes) {
        return `${a.name} overlaps the ${b.name}`;
      }
    }
  }
  return null;
}
