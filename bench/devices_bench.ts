/**
 * Device back-ends: 4 KiB random reads through virtio-blk, driver and device in one thread, in
 * batches of 32 (one kick, one drain, one publish per batch), on a node that moves no bytes (the
 * device's own cost), an in-memory disk and a raw file in the page cache. Three rows per disk:
 *
 * - `node.read ×32`: the node alone (the baseline);
 * - `virtqueue only ×32`: the ring round trip with no back-end (add, kick, pop, push, publish, reap);
 * - `virtio-blk ×32`: the whole path.
 *
 * `deno bench -A bench/devices_bench.ts` for the tables; `deno run -A bench/devices_bench.ts` prints
 * requests per second and the per-request cost above the node's own (each loop's fastest of many
 * short windows, so that a busy machine disturbs the figures less).
 *
 * Another device joins by adding a {@linkcode DeviceSuite} to {@linkcode SUITES} (its loops built
 * with the exported helpers: {@linkcode benchDisk}, {@linkcode RandomBlocks}, {@linkcode BenchRing},
 * {@linkcode measure}).
 *
 * @module
 */
import { join } from "node:path";
import { RawNode } from "../formats/raw.ts";
import type { BlockNode, Extent } from "../src/block/node.ts";
import { openHostFile } from "../src/host/file.ts";
import { MemoryFile } from "../src/host/memory.ts";
import { VirtioBlkBackend, VirtioBlkModel } from "../src/devices/virtio_blk.ts";
import { VIRTIO_BLK_T_IN } from "../src/virtio/virtio_blk_constants.ts";
import { queueFeaturesOf } from "../src/virtio/device.ts";
import { GuestMemory } from "../src/virtio/memory.ts";
import type { DriverBuffer } from "../src/virtio/queue.ts";
import { SplitDeviceQueue, SplitDriverQueue, splitRingLayout } from "../src/virtio/split_queue.ts";

/** Requests per kick. */
export const BATCH = 32;
/** Bytes per request. */
export const BLOCK = 4096;
/** Disk size. */
export const DISK_BYTES = 256 << 20;

/** A disk for a bench, and how to dispose of it. */
export interface BenchDisk {
  readonly name: string;
  readonly node: BlockNode;
  dispose(): void;
}

/**
 * A node that moves no bytes: every call resolves at once. Through it the bench sees the device's
 * own cost, without the memory traffic of the copies.
 */
export class NullBenchNode implements BlockNode {
  readonly format = "null";
  readonly filename = "null";
  readonly requestAlignment = 1;
  readonly readOnly = false;
  readonly size: number;

  constructor(size: number) {
    this.size = size;
  }
  read(): Promise<void> {
    return Promise.resolve();
  }
  write(): Promise<void> {
    return Promise.resolve();
  }
  writeZeroes(): Promise<void> {
    return Promise.resolve();
  }
  discard(): Promise<void> {
    return Promise.resolve();
  }
  flush(): Promise<void> {
    return Promise.resolve();
  }
  blockStatus(offset: number, max: number): Promise<Extent> {
    return Promise.resolve({ kind: "data", offset, length: max });
  }
  close(): Promise<void> {
    return Promise.resolve();
  }
}

/**
 * A disk of `size` bytes: `null` ({@linkcode NullBenchNode}), `memory` (raw over a MemoryFile) or
 * `file` (raw over a temporary file written in full first, so that its pages are in the page cache).
 */
export async function benchDisk(
  kind: "null" | "memory" | "file",
  size = DISK_BYTES,
): Promise<BenchDisk> {
  if (kind === "null") {
    return { name: "null node", node: new NullBenchNode(size), dispose: () => {} };
  }
  if (kind === "memory") {
    const node = await RawNode.open(new MemoryFile("bench", new Uint8Array(size).fill(0x5a)));
    return { name: "memory", node, dispose: () => {} };
  }
  const dir = Deno.makeTempDirSync({ prefix: "vstor_dev_bench_" });
  const path = join(dir, "disk.raw");
  const f = openHostFile(path, { create: true, lock: false });
  const chunk = new Uint8Array(1 << 20).fill(0x5a);
  for (let at = 0; at < size; at += chunk.length) f.writeAt(at, chunk);
  f.close();
  const node = await RawNode.open(openHostFile(path, { lock: false }));
  return {
    name: "page-cached file",
    node,
    dispose: () => Deno.removeSync(dir, { recursive: true }),
  };
}

/** A fixed-seed xorshift over block numbers, so every run touches the same blocks. */
export class RandomBlocks {
  #seed = 0x9e3779b9;
  readonly blocks: number;

  constructor(diskBytes: number, blockBytes = BLOCK) {
    this.blocks = Math.floor(diskBytes / blockBytes);
  }

  next(): number {
    let s = this.#seed;
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    this.#seed = s;
    return (s >>> 0) % this.blocks;
  }
}

/** One slot of the bench driver: a chain's buffers, built once and offered again and again. */
interface Slot {
  readonly readable: DriverBuffer[];
  readonly writable: DriverBuffer[];
  /** Buffer offset of the 16-byte request header, to rewrite per request. */
  readonly headerAt: number;
  /** Buffer offset of the status byte. */
  readonly statusAt: number;
}

/**
 * A lean driver for benches: guest RAM, one split ring of `queueSize`, and `BATCH` request slots
 * with a 16-byte header, a `BLOCK`-byte data buffer and a status byte, all allocated up front, so
 * that submitting costs a header store and a `driver.add`.
 */
export class BenchRing {
  readonly mem: GuestMemory;
  readonly ram: DataView;
  readonly driver: SplitDriverQueue<number>;
  readonly device: SplitDeviceQueue;
  readonly slots: Slot[] = [];

  constructor(features: bigint, queueSize = 256) {
    this.mem = new GuestMemory([{ gpa: 0, size: 1 << 20 }]);
    this.ram = new DataView(this.mem.buffer);
    const layout = splitRingLayout(queueSize, 0x1000);
    const qf = queueFeaturesOf(features);
    this.driver = new SplitDriverQueue<number>(this.mem, layout, qf);
    this.device = new SplitDeviceQueue(this.mem, 0, layout, qf);
    let at = 0x2_0000;
    for (let i = 0; i < BATCH; i++) {
      const header = at;
      const data = header + 512;
      const status = data + BLOCK;
      at = status + 512;
      this.slots.push({
        readable: [{ addr: header, length: 16 }],
        writable: [{ addr: data, length: BLOCK }, { addr: status, length: 1 }],
        headerAt: this.mem.translate(header, 16),
        statusAt: this.mem.translate(status, 1),
      });
    }
  }

  /** Offers slot `i` as a request of `type` at `sector` (not yet kicked). */
  offer(i: number, type: number, sector: number): void {
    const slot = this.slots[i]!;
    this.ram.setUint32(slot.headerAt, type, true);
    this.ram.setUint32(slot.headerAt + 8, sector >>> 0, true);
    this.ram.setUint32(slot.headerAt + 12, Math.floor(sector / 0x1_0000_0000), true);
    if (!this.driver.add(slot.readable, slot.writable, i)) throw new Error("Bench ring is full");
  }

  /** Reaps every completion; returns how many, throwing on a status other than 0. */
  reap(): number {
    let n = 0;
    for (let u = this.driver.getUsed(); u !== null; u = this.driver.getUsed()) {
      if (this.ram.getUint8(this.slots[u.token]!.statusAt) !== 0) throw new Error("Request failed");
      n++;
    }
    return n;
  }
}

/**
 * Nanoseconds per call of each of `loops`, robust against a busy machine: the loops take turns in
 * short windows, round after round, and each keeps its fastest window.
 */
export async function measure<K extends string>(
  loops: Record<K, () => Promise<void>>,
  rounds = 25,
  windowMs = 40,
): Promise<Record<K, number>> {
  const names = Object.keys(loops) as K[];
  const best = {} as Record<K, number>;
  for (const name of names) {
    for (let i = 0; i < 200; i++) await loops[name]();
    best[name] = Infinity;
  }
  for (let round = 0; round < rounds; round++) {
    for (const name of names) {
      const fn = loops[name];
      let calls = 0;
      const start = performance.now();
      let now = start;
      while (now - start < windowMs) {
        for (let i = 0; i < 20; i++) await fn();
        calls += 20;
        now = performance.now();
      }
      best[name] = Math.min(best[name], ((now - start) * 1e6) / calls);
    }
  }
  return best;
}

/** One bench loop: `BATCH` requests per call. */
export type BenchLoop = () => Promise<void>;

/** The loops of one device over one disk: the node alone, the ring alone, the whole device. */
export interface DeviceLoops {
  node: BenchLoop;
  ring: BenchLoop;
  device: BenchLoop;
}

/** A device under bench: its name and how to build its loops over a node. */
export interface DeviceSuite {
  readonly name: string;
  loops(node: BlockNode): DeviceLoops;
}

/** virtio-blk's loops over `node`, each doing `BATCH` 4 KiB random reads per call. */
export function blkLoops(node: BlockNode): DeviceLoops {
  const random = new RandomBlocks(node.size);
  const sectorsPerBlock = BLOCK / 512;

  // 32 destinations in a SharedArrayBuffer, as the device reads into 32 buffers of guest RAM:
  // the same kind of memory and the same cache footprint.
  const shared = new SharedArrayBuffer(BATCH * BLOCK);
  const direct = Array.from({ length: BATCH }, (_, i) => new Uint8Array(shared, i * BLOCK, BLOCK));
  const nodeLoop = async () => {
    for (let i = 0; i < BATCH; i++) await node.read(random.next() * BLOCK, direct[i]!);
  };

  const model = new VirtioBlkModel({}, node);
  const features = model.deviceFeatures;
  const ringOnly = new BenchRing(features);
  const ringLoop = () => {
    const r = ringOnly;
    for (let i = 0; i < BATCH; i++) r.offer(i, VIRTIO_BLK_T_IN, random.next() * sectorsPerBlock);
    r.driver.kick();
    const dev = r.device;
    do {
      dev.disableNotifications();
      for (let c = dev.pop(); c !== null; c = dev.pop()) {
        const s = c.writable[1]!;
        s[0] = 0;
        dev.push(c, c.writableLength);
      }
    } while (dev.enableNotifications());
    dev.publish();
    if (r.reap() !== BATCH) throw new Error("Lost completions");
    return Promise.resolve();
  };

  const ring = new BenchRing(features);
  const backend = new VirtioBlkBackend(node, model.options, model.shared);
  backend.activate(ring.mem, features, [ring.device]);
  const noInterrupt = () => {};
  const blkLoop = async () => {
    for (let i = 0; i < BATCH; i++) ring.offer(i, VIRTIO_BLK_T_IN, random.next() * sectorsPerBlock);
    ring.driver.kick();
    await backend.processQueue(0, noInterrupt);
    if (ring.reap() !== BATCH) throw new Error("Lost completions");
  };
  return { node: nodeLoop, ring: ringLoop, device: blkLoop };
}

/** The devices this bench measures; virtio-scsi adds itself here. */
export const SUITES: readonly DeviceSuite[] = [{ name: "virtio-blk", loops: blkLoops }];

/** True when this file is the program (`deno bench` or `deno run`), not a module imported for its helpers. */
const isMain = Deno.mainModule === import.meta.url;
const disks = isMain
  ? [await benchDisk("null"), await benchDisk("memory"), await benchDisk("file")]
  : [];
globalThis.addEventListener("unload", () => disks.forEach((d) => d.dispose()));

for (const suite of SUITES) {
  for (const disk of disks) {
    const loops = suite.loops(disk.node);
    const group = `${suite.name}: 4k randread ×${BATCH}, ${disk.name}`;
    Deno.bench({ group, name: `node.read ×${BATCH}`, baseline: true }, loops.node);
    Deno.bench({ group, name: `virtqueue only ×${BATCH}` }, loops.ring);
    Deno.bench({ group, name: `${suite.name} ×${BATCH}` }, loops.device);
  }
}

if (import.meta.main) {
  const rows = [];
  for (const suite of SUITES) {
    for (const disk of disks) {
      const t = await measure({ ...suite.loops(disk.node) });
      const [node, ring, device] = [t.node / BATCH, t.ring / BATCH, t.device / BATCH];
      rows.push({
        device: suite.name,
        disk: disk.name,
        "node ns/req": node.toFixed(0),
        "device ns/req": device.toFixed(0),
        "device req/s": Math.round(1e9 / device).toLocaleString("en-US"),
        "overhead ns/req": (device - node).toFixed(0),
        "ring ns/req": ring.toFixed(0),
      });
    }
  }
  console.table(rows);
}
