import assert from "node:assert/strict";
import { join } from "node:path";
import { openImage } from "../../formats/open.ts";
import {
  BDRV_REQUEST_MAX_SECTORS,
  VIRTIO_BLK_CFG_WRITEBACK,
  VIRTIO_BLK_F_BLK_SIZE,
  VIRTIO_BLK_F_CONFIG_WCE,
  VIRTIO_BLK_F_DISCARD,
  VIRTIO_BLK_F_FLUSH,
  VIRTIO_BLK_F_MQ,
  VIRTIO_BLK_F_RO,
  VIRTIO_BLK_F_SEG_MAX,
  VIRTIO_BLK_F_SIZE_MAX,
  VIRTIO_BLK_F_TOPOLOGY,
  VIRTIO_BLK_F_WRITE_ZEROES,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_S_UNSUPP,
  VIRTIO_BLK_T_BARRIER,
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_FLUSH_OUT,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_GET_LIFETIME,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_SCSI_CMD,
  VIRTIO_BLK_T_SECURE_ERASE,
  VIRTIO_BLK_T_WRITE_ZEROES,
  VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
} from "../../src/virtio/virtio_blk_constants.ts";
import {
  createBackend,
  createModel,
  deviceType,
  resolveVirtioBlkOptions,
  VirtioBlkBackend,
  type VirtioBlkBackendInfo,
  VirtioBlkModel,
  virtioBlkOptionsSchema,
  VirtioBlkShared,
} from "../../src/devices/virtio_blk.ts";
import type { DeviceSpec, DriveCache } from "../../src/devices/device_type.ts";
import { PCI_CLASS_STORAGE_SCSI } from "../../src/virtio/device.ts";
import {
  featureBit,
  hasFeature,
  VIRTIO_F_RING_PACKED,
  VIRTIO_F_VERSION_1,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from "../../src/virtio/features.ts";
import { VcpuInterrupts } from "../../src/virtio/interrupts.ts";
import {
  PCI_CLASS_DEVICE,
  PCI_DEVICE_ID,
  VIRTIO_PCI_COMMON_CFGGENERATION,
  VIRTIO_PCI_DEVICE_CFG_OFFSET,
  VIRTIO_PCI_MODERN_BAR,
  VirtioPciFunction,
} from "../../src/virtio/pci.ts";
import { VirtqueueError } from "../../src/virtio/queue.ts";
import { commonRead, negotiate, programBars, readDeviceFeatures } from "../virtio/fake_model.ts";
import { ignoreWithout, runTool } from "../interop/qemu.ts";
import {
  BlkRig,
  type BlkRigOptions,
  CountingNode,
  memoryDisk,
  NullNode,
  patternBytes,
} from "./blk_harness.ts";

const MiB = 1 << 20;
const bit = featureBit;

/** A rig over a counting wrapper of a fresh in-memory disk. */
async function countingRig(
  opts: BlkRigOptions & { diskBytes?: number; readOnly?: boolean } = {},
): Promise<{ rig: BlkRig; node: CountingNode; file: Uint8Array }> {
  const { node: inner, file } = await memoryDisk(opts.diskBytes ?? 4 * MiB, {
    readOnly: opts.readOnly ?? false,
    fill: (i) => (i * 7 + 3) & 0xff,
  });
  const node = new CountingNode(inner);
  const rig = await BlkRig.create({ ...opts, node });
  node.clear();
  return { rig, node, file: file.contents() };
}

function configBytes(model: VirtioBlkModel): DataView {
  const bytes = new Uint8Array(model.configSize);
  model.readConfig(0, bytes);
  return new DataView(bytes.buffer);
}

// ---- Model: features and configuration space ------------------------------------------------------

Deno.test("VirtioBlkModel offers QEMU's default virtio-blk features", () => {
  const model = new VirtioBlkModel({}, { size: 8 * MiB, readOnly: false });
  const f = model.deviceFeatures;
  for (
    const n of [
      VIRTIO_BLK_F_SEG_MAX,
      VIRTIO_BLK_F_BLK_SIZE,
      VIRTIO_BLK_F_TOPOLOGY,
      VIRTIO_BLK_F_FLUSH,
      VIRTIO_BLK_F_CONFIG_WCE,
      VIRTIO_BLK_F_DISCARD,
      VIRTIO_BLK_F_WRITE_ZEROES,
      VIRTIO_RING_F_INDIRECT_DESC,
      VIRTIO_RING_F_EVENT_IDX,
      VIRTIO_F_VERSION_1,
    ]
  ) assert.ok(hasFeature(f, n), `feature ${n}`);
  for (const n of [VIRTIO_BLK_F_RO, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_F_RING_PACKED]) {
    assert.ok(!hasFeature(f, n), `feature ${n} not offered`);
  }
  assert.equal(model.deviceId, 2);
  assert.equal(model.pciClass, PCI_CLASS_STORAGE_SCSI);
  assert.equal(model.numQueues, 1);
  assert.equal(model.queueMaxSize(0), 256);
  assert.equal(model.queueMaxSize(1), 0);
});

Deno.test("VirtioBlkModel offers RO, MQ, SIZE_MAX and RING_PACKED per options and disk", () => {
  const f = new VirtioBlkModel(
    { numQueues: 4, sizeMax: 65536, packed: true, eventIdx: false, indirect: false },
    { size: MiB, readOnly: true },
  ).deviceFeatures;
  for (const n of [VIRTIO_BLK_F_RO, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_F_RING_PACKED]) {
    assert.ok(hasFeature(f, n), `feature ${n}`);
  }
  assert.ok(!hasFeature(f, VIRTIO_RING_F_EVENT_IDX));
  assert.ok(!hasFeature(f, VIRTIO_RING_F_INDIRECT_DESC));
  const ro = new VirtioBlkModel({ readOnly: true }, { size: MiB, readOnly: false });
  assert.ok(hasFeature(ro.deviceFeatures, VIRTIO_BLK_F_RO));
  // QEMU: writethrough without config-wce offers neither FLUSH nor CONFIG_WCE.
  const wt = new VirtioBlkModel({ writeback: false, configWce: false }, {
    size: MiB,
    readOnly: false,
  });
  assert.ok(!hasFeature(wt.deviceFeatures, VIRTIO_BLK_F_FLUSH));
  assert.ok(!hasFeature(wt.deviceFeatures, VIRTIO_BLK_F_CONFIG_WCE));
  assert.equal(wt.writeback, false);
});

Deno.test("VirtioBlkModel config space follows the spec layout field by field", () => {
  const model = new VirtioBlkModel(
    {
      numQueues: 3,
      queueSize: 128,
      sizeMax: 131072,
      logicalBlockSize: 4096,
      physicalBlockSize: 16384,
      minIoSize: 8192,
      optIoSize: 65536,
      maxDiscardSectors: 8192,
      maxDiscardSeg: 4,
      maxWriteZeroesSectors: 2048,
      maxWriteZeroesSeg: 2,
    },
    { size: 10 * MiB + 100, readOnly: false },
  );
  assert.equal(model.configSize, 57);
  const c = configBytes(model);
  assert.equal(c.getBigUint64(0, true), BigInt(Math.ceil((10 * MiB + 100) / 512)), "capacity");
  assert.equal(c.getUint32(8, true), 131072, "size_max");
  assert.equal(c.getUint32(12, true), 126, "seg_max = queue size - 2");
  assert.equal(c.getUint16(16, true), 0, "cylinders");
  assert.equal(c.getUint8(18), 0, "heads");
  assert.equal(c.getUint8(19), 0, "sectors");
  assert.equal(c.getUint32(20, true), 4096, "blk_size");
  assert.equal(c.getUint8(24), 2, "physical_block_exp");
  assert.equal(c.getUint8(25), 0, "alignment_offset");
  assert.equal(c.getUint16(26, true), 2, "min_io_size in blocks");
  assert.equal(c.getUint32(28, true), 16, "opt_io_size in blocks");
  assert.equal(c.getUint8(32), 1, "writeback");
  assert.equal(c.getUint8(33), 0, "unused0");
  assert.equal(c.getUint16(34, true), 3, "num_queues");
  assert.equal(c.getUint32(36, true), 8192, "max_discard_sectors");
  assert.equal(c.getUint32(40, true), 4, "max_discard_seg");
  assert.equal(c.getUint32(44, true), 8, "discard_sector_alignment");
  assert.equal(c.getUint32(48, true), 2048, "max_write_zeroes_sectors");
  assert.equal(c.getUint32(52, true), 2, "max_write_zeroes_seg");
  assert.equal(c.getUint8(56), 1, "write_zeroes_may_unmap");
  // Partial reads see the same bytes.
  const part = new Uint8Array(2);
  model.readConfig(34, part);
  assert.deepEqual([...part], [3, 0]);
});

Deno.test("VirtioBlkModel config size ends where QEMU's does for the offered features", () => {
  const disk = { size: MiB, readOnly: false };
  assert.equal(new VirtioBlkModel({ discard: false, writeZeroes: false }, disk).configSize, 36);
  assert.equal(new VirtioBlkModel({ writeZeroes: false }, disk).configSize, 48);
  assert.equal(new VirtioBlkModel({ discard: false }, disk).configSize, 57);
  const c = configBytes(new VirtioBlkModel({ writeZeroes: false }, disk));
  assert.equal(c.getUint32(36, true), BDRV_REQUEST_MAX_SECTORS);
  assert.equal(c.getUint32(40, true), 1);
});

Deno.test("resolveVirtioBlkOptions rejects bad options", () => {
  assert.throws(() => resolveVirtioBlkOptions({ serial: "x".repeat(21) }), RangeError);
  assert.throws(() => resolveVirtioBlkOptions({ serial: "a\0b" }), RangeError);
  assert.throws(() => resolveVirtioBlkOptions({ serial: "é" }), RangeError);
  assert.throws(() => resolveVirtioBlkOptions({ queueSize: 2 }), RangeError);
  assert.throws(() => resolveVirtioBlkOptions({ queueSize: 100 }), RangeError);
  assert.throws(() => resolveVirtioBlkOptions({ numQueues: 0 }), RangeError);
  assert.throws(() => resolveVirtioBlkOptions({ logicalBlockSize: 1000 }), RangeError);
  assert.throws(() => resolveVirtioBlkOptions({ physicalBlockSize: 256 }), RangeError);
  assert.throws(() => resolveVirtioBlkOptions({ minIoSize: 100 }), RangeError);
  assert.throws(() => resolveVirtioBlkOptions({ maxDiscardSectors: 0 }), RangeError);
  assert.throws(() => resolveVirtioBlkOptions({ sizeMax: 512 }), RangeError);
  assert.throws(() => resolveVirtioBlkOptions({ maxWriteZeroesSeg: 1000 }), RangeError);
  assert.equal(resolveVirtioBlkOptions({ serial: "x".repeat(20) }).serial.length, 20);
  // Structured-cloneable: the same options survive the trip to an iothread.
  const options = { numQueues: 2, serial: "abc", writeback: false };
  assert.deepEqual(
    resolveVirtioBlkOptions(structuredClone(options)),
    resolveVirtioBlkOptions(options),
  );
});

Deno.test("writeback is driver-writable with CONFIG_WCE and reaches the back-end through shared memory", () => {
  const model = new VirtioBlkModel({}, { size: MiB, readOnly: false });
  const remote = new VirtioBlkShared(model.shared.buffer); // the iothread's view
  model.validateFeatures(model.deviceFeatures);
  assert.equal(remote.writeback, true);
  model.writeConfig(VIRTIO_BLK_CFG_WRITEBACK, new Uint8Array([0]));
  assert.equal(remote.writeback, false);
  assert.equal(configBytes(model).getUint8(32), 0);
  model.writeConfig(30, new Uint8Array([9, 9, 1, 0])); // a wider write covering writeback
  assert.equal(remote.writeback, true);
  model.writeConfig(0, new Uint8Array(8).fill(0xff)); // capacity is not writable
  assert.equal(configBytes(model).getBigUint64(0, true), 2048n);
  model.writeConfig(VIRTIO_BLK_CFG_WRITEBACK, new Uint8Array([0]));
  model.reset();
  assert.equal(remote.writeback, true, "reset restores the configured cache mode");

  const fixed = new VirtioBlkModel({ configWce: false }, { size: MiB, readOnly: false });
  fixed.writeConfig(VIRTIO_BLK_CFG_WRITEBACK, new Uint8Array([0]));
  assert.equal(fixed.writeback, true, "ignored without CONFIG_WCE");
});

Deno.test("the cache mode follows the negotiated FLUSH and CONFIG_WCE as QEMU's set_status does", () => {
  const disk = { size: MiB, readOnly: false };
  const all = (m: VirtioBlkModel) => m.deviceFeatures;
  // CONFIG_WCE without FLUSH: writethrough from FEATURES_OK (spec 5.2.5.2).
  let m = new VirtioBlkModel({}, disk);
  m.validateFeatures(all(m) & ~bit(VIRTIO_BLK_F_FLUSH));
  assert.equal(m.writeback, false);
  // Neither: writethrough at DRIVER_OK.
  m = new VirtioBlkModel({}, disk);
  const neither = all(m) & ~bit(VIRTIO_BLK_F_FLUSH) & ~bit(VIRTIO_BLK_F_CONFIG_WCE);
  m.validateFeatures(neither);
  m.activate(neither, [], 0);
  assert.equal(m.writeback, false);
  // FLUSH without CONFIG_WCE: writeback, even when configured writethrough.
  m = new VirtioBlkModel({ writeback: false }, disk);
  const flushOnly = all(m) & ~bit(VIRTIO_BLK_F_CONFIG_WCE);
  m.validateFeatures(flushOnly);
  m.activate(flushOnly, [], 0);
  assert.equal(m.writeback, true);
  // Both: the configured mode stays until the driver writes it.
  m = new VirtioBlkModel({ writeback: false }, disk);
  m.validateFeatures(all(m));
  m.activate(all(m), [], 0);
  assert.equal(m.writeback, false);
});

Deno.test("setCapacity changes the capacity field and fires the config change hook", () => {
  const model = new VirtioBlkModel({}, { size: MiB, readOnly: false });
  let changes = 0;
  model.hooks = { configChange: () => changes++ };
  model.setCapacity(3 * MiB);
  assert.equal(changes, 1);
  assert.equal(model.capacity, 6144);
  assert.equal(configBytes(model).getBigUint64(0, true), 6144n);
  assert.throws(() => model.setCapacity(-1), RangeError);
});

Deno.test("the model behind a virtio-pci function: id 0x1042, features and config through BAR4", () => {
  const model = new VirtioBlkModel({ serial: "pci" }, { size: 2 * MiB, readOnly: false });
  const fn = new VirtioPciFunction({ model, vcpu: new VcpuInterrupts() });
  programBars(fn);
  assert.equal(fn.configRead(PCI_DEVICE_ID, 2), 0x1042);
  assert.equal(fn.configRead(PCI_CLASS_DEVICE, 2), PCI_CLASS_STORAGE_SCSI);
  assert.equal(readDeviceFeatures(fn), model.deviceFeatures);
  negotiate(fn, model.deviceFeatures);
  const cfg = VIRTIO_PCI_DEVICE_CFG_OFFSET;
  assert.equal(fn.mmioRead(VIRTIO_PCI_MODERN_BAR, cfg, 4), 4096, "capacity low word");
  assert.equal(fn.mmioRead(VIRTIO_PCI_MODERN_BAR, cfg + 32, 1), 1, "writeback");
  fn.mmioWrite(VIRTIO_PCI_MODERN_BAR, cfg + 32, 1, 0);
  assert.equal(model.writeback, false);
  const generation = commonRead(fn, VIRTIO_PCI_COMMON_CFGGENERATION, 1);
  model.hooks = { configChange: () => fn.configChanged() };
  model.setCapacity(4 * MiB);
  assert.equal(fn.mmioRead(VIRTIO_PCI_MODERN_BAR, cfg, 4), 8192);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_CFGGENERATION, 1), (generation + 1) & 0xff);
});

// ---- Device type (the machine's plug-in contract) --------------------------------------------------

function blkSpec(
  cache: DriveCache,
  readOnly: boolean,
  options: Record<string, unknown>,
): DeviceSpec {
  return {
    type: "virtio-blk",
    id: "vda",
    drives: [{ file: "disk.raw", format: "raw", readOnly, cache }],
    numQueues: 2,
    queueSize: 128,
    eventIdx: true,
    indirect: false,
    packed: true,
    ioeventfd: true,
    options,
  };
}

Deno.test("virtioBlkOptionsSchema accepts device options and names what is wrong", () => {
  const ok = virtioBlkOptionsSchema.safeParse({ serial: "vda", discard: false, maxDiscardSeg: 4 });
  assert.ok(ok.success);
  for (
    const bad of [
      { serial: "x".repeat(21) },
      { numQueues: 2 }, // a device setting, not an option
      { writeback: false }, // the drive's cache mode decides
      { logicalBlockSize: 1000 },
      { minIoSize: 100 },
      { maxDiscardSeg: 0 },
    ]
  ) {
    const r = virtioBlkOptionsSchema.safeParse(bad);
    assert.ok(!r.success, JSON.stringify(bad));
    if (!r.success) assert.ok(r.error.issues.length > 0);
  }
});

Deno.test("createBackend and createModel pair up through the shared state, as across threads", async () => {
  const { node } = await memoryDisk(3 * MiB);
  const spec = blkSpec("writethrough", false, { serial: "vda-serial" });
  assert.equal(deviceType.name, "virtio-blk");
  assert.deepEqual(deviceType.drives, { min: 1, max: 1 });
  const backendModule = await import(String(deviceType.backendModule));
  assert.equal(backendModule.createBackend, createBackend);
  const ready = createBackend({ spec, drives: [node] });
  assert.ok(ready.backend instanceof VirtioBlkBackend);
  // The reply crosses to the VMM by structured clone; the buffer stays shared.
  const info = structuredClone(ready.info) as VirtioBlkBackendInfo;
  const drive = {
    file: "disk.raw",
    format: "raw",
    size: node.size,
    readOnly: false,
    requestAlignment: 1,
  };
  const model = createModel(spec, { drives: [{ ...drive, cache: "writethrough" }], backend: info });
  assert.equal(model.numQueues, 2);
  assert.equal(model.queueMaxSize(1), 128);
  assert.ok(hasFeature(model.deviceFeatures, VIRTIO_F_RING_PACKED));
  assert.ok(!hasFeature(model.deviceFeatures, VIRTIO_RING_F_INDIRECT_DESC));
  assert.ok(hasFeature(model.deviceFeatures, VIRTIO_BLK_F_MQ));
  assert.equal(model.capacity, 6144);
  assert.equal(model.writeback, false, "cache=writethrough shows a writethrough cache");
  const backendView = new VirtioBlkShared((ready.info as VirtioBlkBackendInfo).shared);
  model.writeConfig(VIRTIO_BLK_CFG_WRITEBACK, new Uint8Array([1]));
  assert.equal(backendView.writeback, true, "the driver's write reaches the back-end");
  assert.equal((ready.backend as VirtioBlkBackend).options.serial, "vda-serial");

  const ro = createModel(blkSpec("writeback", true, {}), {
    drives: [{ ...drive, readOnly: true, cache: "writeback" }],
    backend: info,
  });
  assert.ok(hasFeature(ro.deviceFeatures, VIRTIO_BLK_F_RO));
  assert.throws(() => createBackend({ spec, drives: [] }), RangeError);
  assert.throws(
    () => createModel(spec, { drives: [{ ...drive, cache: "writeback" }], backend: null }),
    RangeError,
  );
});

// ---- Requests -----------------------------------------------------------------------------------

Deno.test("OUT then IN round-trips data; used.len is data + status for reads, 1 for writes", async () => {
  const { rig, node } = await countingRig();
  const data = patternBytes(8192, 1);
  const [w] = await rig.batch([{ type: VIRTIO_BLK_T_OUT, sector: 100, data }]);
  assert.deepEqual([w!.status, w!.written], [VIRTIO_BLK_S_OK, 1]);
  const r = await rig.one({ type: VIRTIO_BLK_T_IN, sector: 100, readBytes: 8192 });
  assert.deepEqual([r.status, r.written], [VIRTIO_BLK_S_OK, 8193]);
  assert.deepEqual(r.data, data);
  assert.deepEqual(
    node.calls.map((c) => [c.op, c.offset, c.length]),
    [["write", 51200, 8192], ["read", 51200, 8192]],
  );
  assert.equal(rig.backend.stats.requests, 2);
});

Deno.test("the legacy BARRIER bit is ignored and FLUSH_OUT is a flush", async () => {
  const { rig, node } = await countingRig();
  const data = patternBytes(512, 2);
  const w = await rig.one({ type: VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_BARRIER, sector: 1, data });
  assert.equal(w.status, VIRTIO_BLK_S_OK);
  assert.deepEqual(await rig.read(1, 512), data);
  assert.equal((await rig.one({ type: VIRTIO_BLK_T_FLUSH_OUT })).status, VIRTIO_BLK_S_OK);
  assert.equal(node.flushes, 1);
});

Deno.test("FLUSH flushes the node and first submits writes merged before it", async () => {
  const { rig, node } = await countingRig();
  const done = await rig.batch([
    { type: VIRTIO_BLK_T_OUT, sector: 8, data: patternBytes(4096, 3) },
    { type: VIRTIO_BLK_T_FLUSH },
    { type: VIRTIO_BLK_T_OUT, sector: 16, data: patternBytes(4096, 4) },
  ]);
  assert.ok(done.every((c) => c.status === VIRTIO_BLK_S_OK));
  assert.deepEqual(node.calls.map((c) => c.op), ["write", "flush", "write"]);
  assert.equal(rig.backend.stats.flushes, 1);
});

Deno.test("GET_ID returns the serial NUL-padded, unterminated at 20 bytes, cut to the buffer", async () => {
  const short = await BlkRig.create({ options: { serial: "vstor-disk-0" } });
  const c = await short.getId();
  assert.equal(c.status, VIRTIO_BLK_S_OK);
  assert.equal(c.written, 21);
  const expected = new Uint8Array(20);
  expected.set(new TextEncoder().encode("vstor-disk-0"));
  assert.deepEqual(c.data, expected);

  const full = await BlkRig.create({ options: { serial: "ABCDEFGHIJKLMNOPQRST" } });
  assert.equal(new TextDecoder().decode((await full.getId()).data), "ABCDEFGHIJKLMNOPQRST");
  const cut = await full.getId(8);
  assert.equal(new TextDecoder().decode(cut.data), "ABCDEFGH");
  const big = await full.getId(32);
  assert.equal(new TextDecoder().decode(big.data.subarray(0, 20)), "ABCDEFGHIJKLMNOPQRST");
  assert.ok(big.data.subarray(20).every((b) => b === 0xee), "nothing written past 20 bytes");

  const none = await BlkRig.create();
  assert.deepEqual((await none.getId()).data, new Uint8Array(20));
});

Deno.test("DISCARD reaches the node; unmap or unknown flags are UNSUPP, too many sectors IOERR", async () => {
  const { rig, node } = await countingRig({ options: { maxDiscardSectors: 64, maxDiscardSeg: 2 } });
  assert.equal(await rig.segments(false, [{ sector: 8, sectors: 16 }]), VIRTIO_BLK_S_OK);
  assert.equal(
    await rig.segments(false, [{ sector: 40, sectors: 8 }, { sector: 80, sectors: 8 }]),
    VIRTIO_BLK_S_OK,
  );
  assert.deepEqual(
    node.calls.map((c) => [c.op, c.offset, c.length]),
    [["discard", 4096, 8192], ["discard", 20480, 4096], ["discard", 40960, 4096]],
  );
  node.clear();
  const unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
  assert.equal(
    await rig.segments(false, [{ sector: 8, sectors: 8, flags: unmap }]),
    VIRTIO_BLK_S_UNSUPP,
  );
  assert.equal(
    await rig.segments(false, [{ sector: 8, sectors: 8, flags: 4 }]),
    VIRTIO_BLK_S_UNSUPP,
  );
  assert.equal(await rig.segments(false, [{ sector: 8, sectors: 65 }]), VIRTIO_BLK_S_IOERR);
  assert.equal(await rig.segments(false, [{ sector: 8192, sectors: 8 }]), VIRTIO_BLK_S_IOERR);
  assert.equal(
    await rig.segments(false, [{ sector: 0, sectors: 8 }, { sector: 8, sectors: 8 }, {
      sector: 16,
      sectors: 8,
    }]),
    VIRTIO_BLK_S_UNSUPP,
    "more segments than max_discard_seg (QEMU: UNSUPP)",
  );
  // A bad second segment fails the request before the first is done.
  assert.equal(
    await rig.segments(false, [{ sector: 0, sectors: 8 }, { sector: 8, sectors: 8, flags: 2 }]),
    VIRTIO_BLK_S_UNSUPP,
  );
  assert.equal(node.calls.length, 0, "no rejected segment reached the node");
});

Deno.test("WRITE_ZEROES zeroes the range with and without unmap", async () => {
  const { rig, node } = await countingRig();
  const unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
  assert.equal(await rig.segments(true, [{ sector: 2, sectors: 4 }]), VIRTIO_BLK_S_OK);
  assert.equal(
    await rig.segments(true, [{ sector: 16, sectors: 8, flags: unmap }]),
    VIRTIO_BLK_S_OK,
  );
  assert.deepEqual(
    node.calls.map((c) => [c.op, c.offset, c.length, c.unmap, c.fua]),
    [["writeZeroes", 1024, 2048, false, false], ["writeZeroes", 8192, 4096, true, false]],
  );
  assert.deepEqual(await rig.read(2, 2048), new Uint8Array(2048));
  assert.deepEqual(await rig.read(16, 4096), new Uint8Array(4096));
  const around = await rig.read(0, 1024);
  assert.ok(around.some((b) => b !== 0), "bytes before the range keep their data");
  assert.equal(
    await rig.segments(true, [{ sector: 0, sectors: 1, flags: 2 }]),
    VIRTIO_BLK_S_UNSUPP,
  );
});

Deno.test("DISCARD and WRITE_ZEROES the driver did not negotiate are UNSUPP", async () => {
  const { rig, node } = await countingRig({
    refuse: bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES),
  });
  assert.equal(await rig.segments(false, [{ sector: 0, sectors: 8 }]), VIRTIO_BLK_S_UNSUPP);
  assert.equal(await rig.segments(true, [{ sector: 0, sectors: 8 }]), VIRTIO_BLK_S_UNSUPP);
  assert.equal(node.calls.length, 0);
});

Deno.test("unknown types, GET_LIFETIME, SECURE_ERASE and SCSI commands are UNSUPP", async () => {
  const { rig, node } = await countingRig();
  for (
    const type of [
      VIRTIO_BLK_T_GET_LIFETIME,
      VIRTIO_BLK_T_SECURE_ERASE,
      VIRTIO_BLK_T_SCSI_CMD,
      VIRTIO_BLK_T_SCSI_CMD | 1,
      0x55,
      0x7fff_ffff,
    ]
  ) {
    const c = await rig.one({ type, readBytes: 8 });
    assert.equal(c.status, VIRTIO_BLK_S_UNSUPP, `type ${type}`);
    assert.equal(c.written, 9);
  }
  assert.equal(node.calls.length, 0);
  assert.equal(rig.backend.stats.unsupported, 6);
});

Deno.test("out-of-range, misaligned and oversize requests fail with IOERR and touch nothing", async () => {
  const { rig, node } = await countingRig({ diskBytes: MiB });
  const last = MiB / 512;
  const cases = [
    { type: VIRTIO_BLK_T_IN, sector: last, readBytes: 512 },
    { type: VIRTIO_BLK_T_IN, sector: last - 1, readBytes: 1024 },
    { type: VIRTIO_BLK_T_OUT, sector: last, data: new Uint8Array(512) },
    { type: VIRTIO_BLK_T_IN, sector: 2n ** 63n, readBytes: 512 },
    { type: VIRTIO_BLK_T_IN, sector: 2n ** 64n - 1n, readBytes: 512 },
    { type: VIRTIO_BLK_T_IN, sector: 0, readBytes: 100 },
    { type: VIRTIO_BLK_T_OUT, sector: 0, data: new Uint8Array(700) },
  ];
  for (const [i, req] of cases.entries()) {
    assert.equal((await rig.one(req)).status, VIRTIO_BLK_S_IOERR, `case ${i}`);
  }
  // The last sector itself is fine, and a zero-length read at the end too.
  assert.equal(
    (await rig.one({ type: VIRTIO_BLK_T_IN, sector: last - 1, readBytes: 512 })).status,
    0,
  );
  assert.equal((await rig.one({ type: VIRTIO_BLK_T_IN, sector: last, readBytes: 0 })).status, 0);
  assert.deepEqual(node.calls.map((c) => c.op), ["read"]);
});

Deno.test("with 4 KiB logical blocks, sectors and lengths must be block multiples", async () => {
  const { rig, node } = await countingRig({ options: { logicalBlockSize: 4096 } });
  assert.equal((await rig.one({ type: VIRTIO_BLK_T_IN, sector: 4, readBytes: 4096 })).status, 1);
  assert.equal((await rig.one({ type: VIRTIO_BLK_T_IN, sector: 8, readBytes: 512 })).status, 1);
  assert.equal(await rig.segments(true, [{ sector: 8, sectors: 1 }]), VIRTIO_BLK_S_IOERR);
  assert.equal(node.calls.length, 0);
  assert.equal((await rig.one({ type: VIRTIO_BLK_T_IN, sector: 8, readBytes: 4096 })).status, 0);
});

Deno.test("a request above BDRV_REQUEST_MAX_SECTORS is IOERR even inside a huge disk", async () => {
  const node = new CountingNode(new NullNode(2 ** 40));
  const rig = await BlkRig.create({ node });
  // 1022 descriptors aliasing one 4 MiB buffer: 4088 MiB of read buffer, in an indirect table.
  const buf = rig.alloc(4 * MiB);
  const header = new Uint8Array(16);
  const status = rig.alloc(1);
  const writable = Array.from({ length: 1022 }, () => ({ addr: buf, length: 4 * MiB }));
  writable.push({ addr: status, length: 1 });
  const c = await rig.one({
    type: VIRTIO_BLK_T_IN,
    raw: { readable: [{ addr: rig.put(header), length: 16 }], writable },
    indirect: true,
  });
  assert.equal(rig.mem.u8(status), VIRTIO_BLK_S_IOERR);
  assert.equal(c.written, 1022 * 4 * MiB + 1);
  assert.equal(node.calls.length, 0);
});

Deno.test("a writable part above 4 GiB (aliased buffers) is IOERR with used.len saturated", async () => {
  const node = new CountingNode(new NullNode(2 ** 40));
  const rig = await BlkRig.create({ node, bufferBytes: 16 * MiB });
  const buf = rig.alloc(8 * MiB);
  const status = rig.alloc(1);
  const writable = Array.from({ length: 600 }, () => ({ addr: buf, length: 8 * MiB }));
  writable.push({ addr: status, length: 1 });
  const c = await rig.one({
    type: VIRTIO_BLK_T_IN,
    raw: { readable: [{ addr: rig.put(new Uint8Array(16)), length: 16 }], writable },
    indirect: true,
  });
  assert.equal(rig.mem.u8(status), VIRTIO_BLK_S_IOERR);
  assert.equal(c.written, 0xffff_ffff);
  assert.equal(node.calls.length, 0);
});

Deno.test("a node error becomes IOERR and the queue keeps going", async () => {
  const { rig, node } = await countingRig();
  node.failAt = 4096 * 3;
  const done = await rig.batch([
    { type: VIRTIO_BLK_T_IN, sector: 0, readBytes: 4096 },
    { type: VIRTIO_BLK_T_IN, sector: 24, readBytes: 4096 },
    { type: VIRTIO_BLK_T_IN, sector: 64, readBytes: 4096 },
  ]);
  assert.deepEqual(done.map((c) => c.status), [0, VIRTIO_BLK_S_IOERR, 0]);
  assert.ok(rig.backend.lastError instanceof Error);
  assert.equal(rig.backend.broken, false);
});

// ---- Framing ------------------------------------------------------------------------------------

async function assertDeviceError(rig: BlkRig, run: () => Promise<unknown>): Promise<void> {
  await assert.rejects(
    run,
    (e: unknown) => e instanceof VirtqueueError && e.fault === "bad-request",
  );
  assert.equal(rig.backend.broken, true);
}

Deno.test("a request without a status byte is a device error; the device stops until reset", async () => {
  const { rig, node, file } = await countingRig();
  const header = new Uint8Array(16);
  rig.submit({ type: 0, raw: { readable: [{ addr: rig.put(header), length: 16 }], writable: [] } });
  rig.kick();
  await assertDeviceError(rig, () => rig.process());
  // Kicks while broken do nothing.
  rig.submit({ type: VIRTIO_BLK_T_IN, sector: 0, readBytes: 512 });
  rig.kick();
  await rig.process();
  assert.equal(rig.reap().length, 0);
  assert.equal(node.calls.length, 0);
  rig.reactivate();
  assert.equal(rig.backend.broken, false);
  assert.deepEqual(await rig.read(0, 512), file.subarray(0, 512));
});

Deno.test("a header shorter than 16 bytes is a device error", async () => {
  const rig = await BlkRig.create();
  const status = rig.alloc(1);
  rig.submit({
    type: 0,
    raw: {
      readable: [{ addr: rig.put(new Uint8Array(12)), length: 12 }],
      writable: [{ addr: status, length: 1 }],
    },
  });
  rig.kick();
  await assertDeviceError(rig, () => rig.process());
});

Deno.test("a discard without a whole segment is a device error", async () => {
  const rig = await BlkRig.create();
  rig.submit({ type: VIRTIO_BLK_T_DISCARD, data: new Uint8Array(8) });
  rig.kick();
  await assertDeviceError(rig, () => rig.process());
});

Deno.test("requests merged before a framing error are still performed, as QEMU submits them", async () => {
  const { rig, node } = await countingRig();
  rig.submit({ type: VIRTIO_BLK_T_OUT, sector: 0, data: patternBytes(512, 5) });
  rig.submit({
    type: 0,
    raw: { readable: [{ addr: rig.put(new Uint8Array(16)), length: 16 }], writable: [] },
  });
  rig.kick();
  await assertDeviceError(rig, () => rig.process());
  assert.deepEqual(node.calls.map((c) => c.op), ["write"]);
  assert.equal(rig.reap().length, 0, "nothing is published once the device is broken");
});

Deno.test("odd but legal layouts: split header, header with data, status with data, many pieces", async () => {
  const { rig, node } = await countingRig();
  const data = patternBytes(3 * 4096, 6);
  const w1 = await rig.one({ type: VIRTIO_BLK_T_OUT, sector: 0, data, splitHeader: true });
  const w2 = await rig.one({ type: VIRTIO_BLK_T_OUT, sector: 64, data, headerWithData: true });
  const w3 = await rig.one({ type: VIRTIO_BLK_T_OUT, sector: 128, data, pieceBytes: 1024 });
  assert.deepEqual([w1.status, w2.status, w3.status], [0, 0, 0]);
  assert.equal(node.writes, 1 + 1 + 12);
  for (const sector of [0, 64, 128]) {
    const r = await rig.one({
      type: VIRTIO_BLK_T_IN,
      sector,
      readBytes: data.length,
      statusWithData: true,
      pieceBytes: 5120,
    });
    assert.equal(r.status, 0);
    assert.equal(r.written, data.length + 1);
    assert.deepEqual(r.data, data);
  }
  // A status buffer longer than one byte: the status is its last byte, used.len the whole buffer.
  const wide = await rig.one({ type: VIRTIO_BLK_T_FLUSH, statusBytes: 4 });
  assert.deepEqual([wide.status, wide.written], [0, 4]);
});

// ---- Read-only ----------------------------------------------------------------------------------

for (const how of ["node", "options"] as const) {
  Deno.test(`a read-only device (${how}) fails writes, discards and write zeroes with IOERR and keeps the image`, async () => {
    const { rig, node, file } = await countingRig({
      readOnly: how === "node",
      options: { readOnly: how === "options" },
    });
    assert.ok(hasFeature(rig.model.deviceFeatures, VIRTIO_BLK_F_RO));
    const done = await rig.batch([
      { type: VIRTIO_BLK_T_OUT, sector: 0, data: patternBytes(4096, 7) },
      { type: VIRTIO_BLK_T_DISCARD, segments: [{ sector: 0, sectors: 8 }] },
      { type: VIRTIO_BLK_T_WRITE_ZEROES, segments: [{ sector: 0, sectors: 8, flags: 1 }] },
      { type: VIRTIO_BLK_T_IN, sector: 0, readBytes: 4096 },
      { type: VIRTIO_BLK_T_FLUSH },
    ]);
    assert.deepEqual(done.map((c) => c.status), [1, 1, 1, 0, 0]);
    assert.deepEqual(done[3]!.data, file.subarray(0, 4096));
    // The flush overtakes the read waiting in the merge buffer, as in QEMU (only writes go first).
    assert.deepEqual(node.calls.map((c) => c.op), ["flush", "read"]);
    const after = new Uint8Array(node.size);
    await node.read(0, after);
    assert.deepEqual(after, file);
  });
}

// ---- Cache mode ---------------------------------------------------------------------------------

Deno.test("writeback: writes carry no FUA and only FLUSH flushes", async () => {
  const { rig, node } = await countingRig();
  await rig.write(0, patternBytes(4096, 8));
  await rig.one({
    type: VIRTIO_BLK_T_OUT,
    sector: 8,
    data: patternBytes(4096, 9),
    pieceBytes: 512,
  });
  assert.equal(node.fuaWrites, 0);
  assert.equal(node.flushes, 0);
  await rig.one({ type: VIRTIO_BLK_T_FLUSH });
  assert.equal(node.flushes, 1);
});

Deno.test("writethrough after the driver clears writeback: FUA writes, a flush after split writes", async () => {
  const { rig, node } = await countingRig();
  rig.model.writeConfig(VIRTIO_BLK_CFG_WRITEBACK, new Uint8Array([0]));
  await rig.write(0, patternBytes(4096, 10));
  assert.deepEqual(node.calls.map((c) => [c.op, c.fua]), [["write", true]]);
  node.clear();
  await rig.one({
    type: VIRTIO_BLK_T_OUT,
    sector: 8,
    data: patternBytes(2048, 11),
    pieceBytes: 1024,
  });
  assert.deepEqual(node.calls.map((c) => [c.op, c.fua]), [["write", false], ["write", false], [
    "flush",
    false,
  ]]);
  node.clear();
  await rig.segments(true, [{ sector: 0, sectors: 8 }]);
  assert.deepEqual(node.calls.map((c) => [c.op, c.fua]), [["writeZeroes", true]]);
  node.clear();
  // Merged writes go out as one FUA write.
  await rig.batch(
    [0, 8, 16].map((s) => ({ type: VIRTIO_BLK_T_OUT, sector: s, data: patternBytes(4096, s) })),
  );
  assert.deepEqual(node.calls.map((c) => [c.op, c.length, c.fua]), [["write", 12288, true]]);
  node.clear();
  rig.model.writeConfig(VIRTIO_BLK_CFG_WRITEBACK, new Uint8Array([1]));
  await rig.write(0, patternBytes(4096, 12));
  assert.deepEqual(node.calls.map((c) => [c.op, c.fua]), [["write", false]]);
});

Deno.test("a driver with neither FLUSH nor CONFIG_WCE gets writethrough", async () => {
  const { rig, node } = await countingRig({
    refuse: bit(VIRTIO_BLK_F_FLUSH) | bit(VIRTIO_BLK_F_CONFIG_WCE),
  });
  await rig.write(0, patternBytes(512, 13));
  assert.equal(node.fuaWrites, 1);
});

// ---- Merging and batching -------------------------------------------------------------------------

Deno.test("adjacent writes popped together become one node write, in any submission order", async () => {
  const { rig, node } = await countingRig();
  const sectors = [24, 0, 16, 8, 40, 32, 56, 48];
  const datas = sectors.map((s) => patternBytes(4096, 100 + s));
  const done = await rig.batch(
    sectors.map((sector, i) => ({ type: VIRTIO_BLK_T_OUT, sector, data: datas[i]! })),
  );
  assert.ok(done.every((c) => c.status === 0 && c.written === 1));
  assert.deepEqual(node.calls.map((c) => [c.op, c.offset, c.length]), [["write", 0, 32768]]);
  assert.equal(rig.backend.stats.merges, 1);
  assert.equal(rig.backend.stats.mergedRequests, 8);
  node.clear();
  const back = await rig.read(0, 32768);
  sectors.forEach((s, i) => assert.deepEqual(back.subarray(s * 512, s * 512 + 4096), datas[i]));
  assert.equal(rig.interrupts[0], 2, "one interrupt per batch");
});

Deno.test("adjacent reads merge; scattered buffers go through the bounce buffer, data lands right", async () => {
  const { rig, node, file } = await countingRig();
  const reqs = [0, 8, 16, 24].map((sector) => ({
    type: VIRTIO_BLK_T_IN,
    sector,
    readBytes: 4096,
    pieceBytes: 1536, // several views per request, not contiguous with the next request's
  }));
  const done = await rig.batch(reqs);
  assert.deepEqual(node.calls.map((c) => [c.op, c.offset, c.length]), [["read", 0, 16384]]);
  done.forEach((c, i) => {
    assert.equal(c.status, 0);
    assert.equal(c.written, 4097);
    assert.deepEqual(c.data, file.subarray(i * 4096, i * 4096 + 4096));
  });
});

Deno.test("merging stops at gaps, direction changes, 32 requests and maxMergeBytes", async () => {
  const { rig, node } = await countingRig({ options: { maxMergeBytes: 16384 } });
  const out = (sector: number) => ({
    type: VIRTIO_BLK_T_OUT,
    sector,
    data: patternBytes(4096, sector),
  });
  const inn = (sector: number) => ({ type: VIRTIO_BLK_T_IN, sector, readBytes: 4096 });
  await rig.batch([
    out(0),
    out(8),
    out(24),
    inn(32),
    inn(40),
    out(48),
    out(56),
    out(64),
    out(72),
    out(80),
  ]);
  assert.deepEqual(
    node.calls.map((c) => [c.op, c.offset / 4096, c.length / 4096]),
    [["write", 0, 2], ["write", 3, 1], ["read", 4, 2], ["write", 6, 4], ["write", 10, 1]],
  );
  node.clear();
  // 40 adjacent 512-byte writes: the buffer holds 32, so two node writes.
  await rig.batch(Array.from({ length: 40 }, (_, i) => ({
    type: VIRTIO_BLK_T_OUT,
    sector: i,
    data: patternBytes(512, i),
  })));
  assert.deepEqual(node.calls.map((c) => [c.op, c.offset, c.length]), [["write", 0, 16384], [
    "write",
    16384,
    4096,
  ]]);
  const back = await rig.read(0, 40 * 512);
  for (let i = 0; i < 40; i++) {
    assert.deepEqual(back.subarray(i * 512, i * 512 + 512), patternBytes(512, i));
  }
});

Deno.test("requestMerging off sends every request on its own", async () => {
  const { rig, node } = await countingRig({ options: { requestMerging: false } });
  await rig.batch(
    [0, 8, 16, 24].map((sector) => ({
      type: VIRTIO_BLK_T_OUT,
      sector,
      data: patternBytes(4096, sector),
    })),
  );
  assert.equal(node.writes, 4);
  assert.equal(rig.backend.stats.merges, 0);
});

Deno.test("writes to the same sector in one batch keep their submission order", async () => {
  const { rig } = await countingRig();
  await rig.batch(
    [1, 2, 3].map((seed) => ({ type: VIRTIO_BLK_T_OUT, sector: 0, data: patternBytes(512, seed) })),
  );
  assert.deepEqual(await rig.read(0, 512), patternBytes(512, 3));
});

Deno.test("a write-zeroes after merged writes is done after them", async () => {
  const { rig } = await countingRig();
  await rig.batch([
    { type: VIRTIO_BLK_T_OUT, sector: 0, data: patternBytes(4096, 20) },
    { type: VIRTIO_BLK_T_WRITE_ZEROES, segments: [{ sector: 0, sectors: 8 }] },
  ]);
  assert.deepEqual(await rig.read(0, 4096), new Uint8Array(4096));
});

Deno.test("a batch of 32 with EVENT_IDX off: one kick, one interrupt", async () => {
  const { rig } = await countingRig({ refuse: bit(VIRTIO_RING_F_EVENT_IDX) });
  const done = await rig.batch(Array.from({ length: 32 }, (_, i) => ({
    type: VIRTIO_BLK_T_IN,
    sector: (i * 37) % 4096,
    readBytes: 4096,
  })));
  assert.equal(done.length, 32);
  assert.deepEqual([rig.kicks[0], rig.interrupts[0]], [1, 1]);
});

// ---- Multiqueue, ring variants ------------------------------------------------------------------

Deno.test("multiqueue: queues are drained independently, concurrently, over one node", async () => {
  const { rig, node } = await countingRig({ options: { numQueues: 4 } });
  assert.ok(hasFeature(rig.features, VIRTIO_BLK_F_MQ));
  for (let q = 0; q < 4; q++) {
    for (let i = 0; i < 8; i++) {
      rig.submit({
        type: VIRTIO_BLK_T_OUT,
        sector: q * 1024 + i * 16,
        data: patternBytes(2048, q * 8 + i),
      }, q);
    }
    rig.kick(q);
  }
  await Promise.all([0, 1, 2, 3].map((q) => rig.process(q)));
  for (let q = 0; q < 4; q++) {
    const done = rig.reap(q);
    assert.equal(done.length, 8, `queue ${q}`);
    assert.ok(done.every((c) => c.status === 0));
    assert.equal(rig.interrupts[q], 1);
  }
  assert.equal(node.writes, 32);
  for (let q = 0; q < 4; q++) {
    for (let i = 0; i < 8; i++) {
      assert.deepEqual(
        await rig.read(q * 1024 + i * 16, 2048, (q + 1) % 4),
        patternBytes(2048, q * 8 + i),
      );
    }
  }
});

Deno.test("processQueue on a queue already draining returns at once; the drain picks up the rest", async () => {
  const { rig } = await countingRig();
  rig.submit({ type: VIRTIO_BLK_T_IN, sector: 0, readBytes: 512 });
  rig.kick();
  const first = rig.process();
  const second = rig.process();
  await Promise.all([first, second]);
  assert.equal(rig.reap().length, 1);
});

const VARIANTS: { name: string; refuse: bigint; packed: boolean }[] = [
  { name: "split", refuse: bit(VIRTIO_RING_F_INDIRECT_DESC), packed: false },
  { name: "split indirect", refuse: 0n, packed: false },
  { name: "split indirect, no EVENT_IDX", refuse: bit(VIRTIO_RING_F_EVENT_IDX), packed: false },
  { name: "packed", refuse: bit(VIRTIO_RING_F_INDIRECT_DESC), packed: true },
  { name: "packed indirect", refuse: 0n, packed: true },
  { name: "packed indirect, no EVENT_IDX", refuse: bit(VIRTIO_RING_F_EVENT_IDX), packed: true },
];

for (const v of VARIANTS) {
  Deno.test(`every request type works over a ${v.name} ring`, async () => {
    const { rig, node } = await countingRig({
      options: { packed: v.packed, serial: "ring", queueSize: 64 },
      refuse: v.refuse,
    });
    assert.equal(hasFeature(rig.features, VIRTIO_F_RING_PACKED), v.packed);
    const indirect = !hasFeature(v.refuse, VIRTIO_RING_F_INDIRECT_DESC);
    // Without indirect tables a 4-buffer request takes 4 of the 64 descriptors.
    const perRound = indirect ? 20 : 12;
    // Several laps of the ring, so wrap counters and index wrap are exercised.
    for (let round = 0; round < 6; round++) {
      const reqs = Array.from({ length: perRound }, (_, i) => ({
        type: VIRTIO_BLK_T_OUT,
        sector: (round * perRound + i) * 8,
        data: patternBytes(4096, round * perRound + i),
        indirect,
        pieceBytes: 2048,
      }));
      const done = await rig.batch(reqs);
      assert.ok(done.every((c) => c.status === 0));
    }
    for (let round = 0; round < 6; round++) {
      const done = await rig.batch(Array.from({ length: perRound }, (_, i) => ({
        type: VIRTIO_BLK_T_IN,
        sector: (round * perRound + i) * 8,
        readBytes: 4096,
        indirect,
      })));
      done.forEach((c, i) => assert.deepEqual(c.data, patternBytes(4096, round * perRound + i)));
    }
    const misc = await rig.batch([
      { type: VIRTIO_BLK_T_FLUSH, indirect },
      { type: VIRTIO_BLK_T_GET_ID, readBytes: 20, indirect },
      { type: VIRTIO_BLK_T_DISCARD, segments: [{ sector: 2048, sectors: 8 }], indirect },
      { type: VIRTIO_BLK_T_WRITE_ZEROES, segments: [{ sector: 0, sectors: 8 }], indirect },
      { type: 0x99, indirect },
    ]);
    assert.deepEqual(misc.map((c) => c.status), [0, 0, 0, 0, VIRTIO_BLK_S_UNSUPP]);
    assert.equal(new TextDecoder().decode(misc[1]!.data.subarray(0, 4)), "ring");
    assert.deepEqual(await rig.read(0, 4096), new Uint8Array(4096));
    assert.ok(node.flushes >= 1);
  });
}

// ---- Resize ---------------------------------------------------------------------------------------

Deno.test("resize grows the disk, updates the shared capacity, and the new range becomes valid", async () => {
  const { rig } = await countingRig({ diskBytes: MiB });
  const beyond = MiB / 512;
  assert.equal(await rig.write(beyond, patternBytes(512, 30)), VIRTIO_BLK_S_IOERR);
  let changes = 0;
  rig.model.hooks = { configChange: () => changes++ };
  await rig.backend.resize(2 * MiB);
  assert.equal(rig.model.shared.capacity, 4096, "the back-end published the new capacity");
  rig.model.setCapacity(2 * MiB); // what the VMM does when the iothread reports the resize
  assert.equal(changes, 1);
  assert.equal(await rig.write(beyond, patternBytes(512, 30)), VIRTIO_BLK_S_OK);
  assert.deepEqual(await rig.read(beyond, 512), patternBytes(512, 30));
});

Deno.test("a back-end built without shared state follows its options and the node", async () => {
  const { node } = await memoryDisk(MiB);
  const backend = new VirtioBlkBackend(node, { writeback: false });
  assert.equal(backend.options.writeback, false);
  await backend.processQueue(0, () => {}); // no queues yet: nothing to do
  await backend.close();
});

// ---- Interop --------------------------------------------------------------------------------------

const noQemu = ignoreWithout("qemu-img");

for (const format of ["qcow2", "raw"] as const) {
  Deno.test({
    name:
      `guest writes through virtio-blk to a ${format} image made by qemu-img pass check and compare`,
    ignore: noQemu,
    fn: async () => {
      const dir = await Deno.makeTempDir({ prefix: "vstor_blk_" });
      try {
        const image = join(dir, `disk.${format}`);
        const reference = join(dir, "reference.raw");
        const size = 16 * MiB;
        const made = await runTool("qemu-img", ["create", "-q", "-f", format, image, String(size)]);
        assert.equal(made.code, 0, made.stderr);
        const node = await openImage(image, { format });
        const rig = await BlkRig.create({ node, options: { serial: "interop" } });
        const expected = new Uint8Array(size);
        // Batches of writes: some adjacent (merged), some scattered, some across 64 KiB clusters.
        let seed = 1;
        for (let batch = 0; batch < 8; batch++) {
          const reqs = [];
          for (let i = 0; i < 16; i++) {
            const sector = batch % 2 === 0
              ? batch * 4096 + i * 8 // adjacent 4 KiB writes
              : ((seed * 7919 + i * 104729) % (size / 512 - 256)) & ~7; // scattered
            const length = batch % 2 === 0 ? 4096 : 512 * (1 + (i % 16));
            const data = patternBytes(length, seed++);
            expected.set(data, sector * 512);
            reqs.push({ type: VIRTIO_BLK_T_OUT, sector, data, pieceBytes: 1024 });
          }
          const done = await rig.batch(reqs);
          assert.ok(done.every((c) => c.status === 0), `batch ${batch}`);
        }
        // Zeroes with and without unmap, over written data and across a cluster boundary.
        for (
          const [sector, sectors, flags] of [[0, 64, 0], [120, 200, 1], [30000, 16, 1]] as const
        ) {
          assert.equal(await rig.segments(true, [{ sector, sectors, flags }]), VIRTIO_BLK_S_OK);
          expected.fill(0, sector * 512, (sector + sectors) * 512);
        }
        assert.equal((await rig.one({ type: VIRTIO_BLK_T_FLUSH })).status, VIRTIO_BLK_S_OK);
        // Read back through the device before closing.
        for (const at of [0, 4096 * 2, 4096 * 512]) {
          assert.deepEqual(await rig.read(at / 512, 4096), expected.subarray(at, at + 4096));
        }
        await rig.backend.close();
        await node.close();
        await Deno.writeFile(reference, expected);
        if (format === "qcow2") {
          const check = await runTool("qemu-img", ["check", image]);
          assert.equal(check.code, 0, check.stdout + check.stderr);
          assert.match(check.stdout, /No errors were found/);
        }
        const cmp = await runTool("qemu-img", [
          "compare",
          "-f",
          format,
          "-F",
          "raw",
          image,
          reference,
        ]);
        assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    },
  });
}
