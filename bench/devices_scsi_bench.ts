/**
 * virtio-scsi: 4 KiB random READ (16) through the whole device — request header, LUN lookup, CDB
 * decode, unit checks, the read straight into guest memory, response — with driver and device in
 * one thread, in batches of 32 (one kick, one drain, one publish per batch), on a node that moves
 * no bytes (the device's own cost) and on an in-memory raw disk.
 *
 * Rows per disk: `node.read ×32` (the node alone, the baseline) and `virtio-scsi ×32`.
 *
 * `deno bench -A bench/devices_scsi_bench.ts` for the tables; `deno run -A bench/devices_scsi_bench.ts`
 * prints requests per second and the per-request cost above the node's own (each loop's fastest of
 * many short windows, so that a busy machine disturbs the figures less).
 *
 * @module
 */
import { RawNode } from "../formats/raw.ts";
import type { BlockNode, Extent } from "../src/block/node.ts";
import { VirtioScsiBackend, VirtioScsiModel } from "../src/devices/virtio_scsi.ts";
import { MemoryFile } from "../src/host/memory.ts";
import { queueFeaturesOf } from "../src/virtio/device.ts";
import { featureBit, VIRTIO_F_VERSION_1 } from "../src/virtio/features.ts";
import { GuestMemory } from "../src/virtio/memory.ts";
import type { DriverBuffer } from "../src/virtio/queue.ts";
import { SplitDeviceQueue, SplitDriverQueue, splitRingLayout } from "../src/virtio/split_queue.ts";

/** Requests per kick. */
const BATCH = 32;
/** Bytes per request. */
const BLOCK = 4096;
/** Disk size. */
const DISK_BYTES = 256 << 20;
/** Request header (19 bytes) with the default 32-byte CDB; response header with 96 sense bytes. */
const REQ_BYTES = 19 + 32;
const RESP_BYTES = 12 + 96;

/** A node that moves no bytes: through it the bench sees the device's own cost. */
class NullNode implements BlockNode {
  readonly format = "null";
  readonly filename = "null";
  readonly requestAlignment = 1;
  readonly readOnly = false;
  readonly size = DISK_BYTES;
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

/** A fixed-seed xorshift over 4 KiB block numbers, so every run touches the same blocks. */
class RandomBlocks {
  #seed = 0x9e3779b9;
  next(): number {
    let s = this.#seed;
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    this.#seed = s;
    return (s >>> 0) % (DISK_BYTES / BLOCK);
  }
}

/** Driver, device and `BATCH` request slots laid out once in guest RAM. */
class ScsiBenchRig {
  readonly mem = new GuestMemory([{ gpa: 0, size: 2 << 20 }]);
  readonly ram = new DataView(this.mem.buffer);
  readonly driver: SplitDriverQueue<number>;
  readonly backend: VirtioScsiBackend;
  readonly slots: Array<
    { readable: DriverBuffer[]; writable: DriverBuffer[]; reqAt: number; respAt: number }
  > = [];

  constructor(node: BlockNode) {
    const model = new VirtioScsiModel();
    const features = model.deviceFeatures | featureBit(VIRTIO_F_VERSION_1);
    const qf = queueFeaturesOf(features);
    const layouts = [0x1000, 0x6000, 0xb000].map((base) => splitRingLayout(256, base));
    const devices = layouts.map((l, i) => new SplitDeviceQueue(this.mem, i, l, qf));
    this.driver = new SplitDriverQueue<number>(this.mem, layouts[2]!, qf);
    this.backend = new VirtioScsiBackend({ shared: model.shared });
    this.backend.activate(this.mem, features, devices);
    this.backend.hotplug(0, 0, node);
    let at = 0x2_0000;
    for (let i = 0; i < BATCH; i++) {
      const req = at;
      const resp = req + 64;
      const data = resp + 128 + 3968; // page-aligned data buffer
      at = data + BLOCK;
      // LUN 0 of target 0, READ (16) of 8 blocks; the LBA is rewritten per request.
      const header = new Uint8Array(REQ_BYTES);
      header.set([1, 0, 0, 0, 0, 0, 0, 0]);
      header.set([0x88, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0], 19);
      this.mem.write(req, header);
      this.slots.push({
        readable: [{ addr: req, length: REQ_BYTES }],
        writable: [{ addr: resp, length: RESP_BYTES }, { addr: data, length: BLOCK }],
        reqAt: this.mem.translate(req, REQ_BYTES),
        respAt: this.mem.translate(resp, RESP_BYTES),
      });
    }
  }

  offer(i: number, block: number): void {
    const slot = this.slots[i]!;
    const lba = block * (BLOCK / 512);
    // READ (16) LBA field, big-endian 64-bit at CDB byte 2.
    this.ram.setUint32(slot.reqAt + 19 + 2, Math.floor(lba / 0x1_0000_0000));
    this.ram.setUint32(slot.reqAt + 19 + 6, lba >>> 0);
    if (!this.driver.add(slot.readable, slot.writable, i)) throw new Error("Bench ring is full");
  }

  reap(): number {
    let n = 0;
    for (let u = this.driver.getUsed(); u !== null; u = this.driver.getUsed()) {
      const at = this.slots[u.token]!.respAt;
      // response OK and status GOOD
      if (this.ram.getUint8(at + 11) !== 0 || this.ram.getUint8(at + 10) !== 0) {
        throw new Error("Request failed");
      }
      n++;
    }
    return n;
  }
}

async function disks(): Promise<Array<{ name: string; node: BlockNode }>> {
  const memory = await RawNode.open(new MemoryFile("bench", new Uint8Array(DISK_BYTES).fill(0x5a)));
  return [{ name: "null node", node: new NullNode() }, { name: "memory", node: memory }];
}

/** The node alone and the whole device, `BATCH` 4 KiB random reads per call. */
async function loops(
  node: BlockNode,
): Promise<{ node: () => Promise<void>; device: () => Promise<void> }> {
  const random = new RandomBlocks();
  const shared = new SharedArrayBuffer(BATCH * BLOCK);
  const direct = Array.from({ length: BATCH }, (_, i) => new Uint8Array(shared, i * BLOCK, BLOCK));
  const nodeLoop = async () => {
    for (let i = 0; i < BATCH; i++) await node.read(random.next() * BLOCK, direct[i]!);
  };
  const rig = new ScsiBenchRig(node);
  const noInterrupt = () => {};
  const deviceLoop = async () => {
    for (let i = 0; i < BATCH; i++) rig.offer(i, random.next());
    rig.driver.kick();
    await rig.backend.processQueue(2, noInterrupt);
    if (rig.reap() !== BATCH) throw new Error("Lost completions");
  };
  // The first command reports the power-on unit attention: consume it.
  rig.offer(0, 0);
  rig.driver.kick();
  await rig.backend.processQueue(2, noInterrupt);
  rig.driver.getUsed();
  await deviceLoop();
  return { node: nodeLoop, device: deviceLoop };
}

/** Nanoseconds per call of each loop: the fastest of many short windows, loops taking turns. */
async function measure(
  fns: Record<"node" | "device", () => Promise<void>>,
  rounds = 25,
  windowMs = 40,
): Promise<Record<"node" | "device", number>> {
  const best = { node: Infinity, device: Infinity };
  for (const name of ["node", "device"] as const) for (let i = 0; i < 200; i++) await fns[name]();
  for (let round = 0; round < rounds; round++) {
    for (const name of ["node", "device"] as const) {
      let calls = 0;
      const start = performance.now();
      let now = start;
      while (now - start < windowMs) {
        for (let i = 0; i < 20; i++) await fns[name]();
        calls += 20;
        now = performance.now();
      }
      best[name] = Math.min(best[name], ((now - start) * 1e6) / calls);
    }
  }
  return best;
}

const isMain = Deno.mainModule === import.meta.url;
const benchDisks = isMain ? await disks() : [];

for (const disk of benchDisks) {
  const l = await loops(disk.node);
  const group = `virtio-scsi: 4k randread ×${BATCH}, ${disk.name}`;
  Deno.bench({ group, name: `node.read ×${BATCH}`, baseline: true }, l.node);
  Deno.bench({ group, name: `virtio-scsi READ (16) ×${BATCH}` }, l.device);
}

if (import.meta.main) {
  const rows = [];
  for (const disk of benchDisks) {
    const t = await measure(await loops(disk.node));
    const [node, device] = [t.node / BATCH, t.device / BATCH];
    rows.push({
      disk: disk.name,
      "node ns/req": node.toFixed(0),
      "virtio-scsi ns/req": device.toFixed(0),
      "virtio-scsi req/s": Math.round(1e9 / device).toLocaleString("en-US"),
      "overhead ns/req": (device - node).toFixed(0),
    });
  }
  console.table(rows);
}
