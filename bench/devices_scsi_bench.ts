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
import type { BlockNode } from "../src/block/node.ts";
import { VirtioScsiBackend, VirtioScsiModel } from "../src/devices/virtio_scsi.ts";
import { queueFeaturesOf } from "../src/virtio/device.ts";
import { featureBit, VIRTIO_F_VERSION_1 } from "../src/virtio/features.ts";
import { GuestMemory } from "../src/virtio/memory.ts";
import type { DriverBuffer } from "../src/virtio/queue.ts";
import { SplitDeviceQueue, SplitDriverQueue, splitRingLayout } from "../src/virtio/split_queue.ts";
import { BATCH, benchDisk, BLOCK, measure, RandomBlocks } from "./devices_bench.ts";

/** Request header (19 bytes) with the default 32-byte CDB; response header with 96 sense bytes. */
const REQ_BYTES = 19 + 32;
const RESP_BYTES = 12 + 96;

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

/** The node alone and the whole device, `BATCH` 4 KiB random reads per call. */
async function loops(
  node: BlockNode,
): Promise<{ node: () => Promise<void>; device: () => Promise<void> }> {
  const random = new RandomBlocks(node.size);
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

const isMain = Deno.mainModule === import.meta.url;
const benchDisks = isMain ? [await benchDisk("null"), await benchDisk("memory")] : [];
globalThis.addEventListener("unload", () => benchDisks.forEach((d) => d.dispose()));

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
