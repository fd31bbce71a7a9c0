import assert from "node:assert/strict";
import type { BlockNode } from "../../src/block/node.ts";
import type { DeviceSpec } from "../../src/devices/device_type.ts";
import {
  createBackend,
  createModel,
  deviceType,
  VirtioScsiBackend,
  VirtioScsiError,
  VirtioScsiModel,
  VirtioScsiSharedConfig,
} from "../../src/devices/virtio_scsi.ts";
import {
  VIRTIO_SCSI_CONFIG_CDB_SIZE,
  VIRTIO_SCSI_CONFIG_SENSE_SIZE,
  VIRTIO_SCSI_EVT_RESET_REMOVED,
  VIRTIO_SCSI_EVT_RESET_RESCAN,
  VIRTIO_SCSI_F_CHANGE,
  VIRTIO_SCSI_F_HOTPLUG,
  VIRTIO_SCSI_S_BAD_TARGET,
  VIRTIO_SCSI_S_FAILURE,
  VIRTIO_SCSI_S_FUNCTION_REJECTED,
  VIRTIO_SCSI_S_INCORRECT_LUN,
  VIRTIO_SCSI_S_OK,
  VIRTIO_SCSI_S_OVERRUN,
  VIRTIO_SCSI_T_AN_SUBSCRIBE,
  VIRTIO_SCSI_T_EVENTS_MISSED,
  VIRTIO_SCSI_T_NO_EVENT,
  VIRTIO_SCSI_T_PARAM_CHANGE,
  VIRTIO_SCSI_T_TMF_ABORT_TASK,
  VIRTIO_SCSI_T_TMF_ABORT_TASK_SET,
  VIRTIO_SCSI_T_TMF_CLEAR_ACA,
  VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET,
  VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET,
  VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET,
  VIRTIO_SCSI_T_TMF_QUERY_TASK,
  VIRTIO_SCSI_T_TMF_QUERY_TASK_SET,
  VIRTIO_SCSI_T_TRANSPORT_RESET,
  VIRTIO_SCSI_VQ_CONTROL,
  VIRTIO_SCSI_VQ_EVENT,
  VIRTIO_SCSI_VQ_REQUEST,
} from "../../src/virtio/virtio_scsi_constants.ts";
import { CHECK_CONDITION, GOOD } from "../../src/scsi/constants.ts";
import {
  featureBit,
  VIRTIO_F_RING_PACKED,
  VIRTIO_ID_SCSI,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from "../../src/virtio/features.ts";
import {
  inquiry,
  read10,
  read16,
  readCapacity16,
  reportLuns,
  requestSense,
  tur,
  write10,
  write16,
} from "../scsi/scsi_helpers.ts";
import { lunBytes, memoryNode, ScsiHarness } from "./scsi_harness.ts";

const MiB = 1 << 20;

function pattern(n: number, seed: number): Uint8Array {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = (i * 13 + seed * 101 + 1) & 0xff;
  return out;
}

async function nodeBytes(node: BlockNode, offset: number, length: number): Promise<Uint8Array> {
  const out = new Uint8Array(length);
  await node.read(offset, out);
  return out;
}

function senseKey(r: { sense: Uint8Array }): [number, number, number] {
  return [r.sense[2]! & 0x0f, r.sense[12]!, r.sense[13]!];
}

// ---- The model -----------------------------------------------------------------------------------

Deno.test("VirtioScsiModel offers QEMU's features and config", () => {
  const m = new VirtioScsiModel({ numQueues: 4, queueSize: 128 });
  assert.equal(m.deviceId, VIRTIO_ID_SCSI);
  assert.equal(m.numQueues, 6);
  assert.equal(m.queueMaxSize(5), 128);
  assert.equal(m.queueMaxSize(6), 0);
  assert.equal(
    m.deviceFeatures,
    featureBit(VIRTIO_SCSI_F_HOTPLUG) | featureBit(VIRTIO_SCSI_F_CHANGE) |
      featureBit(VIRTIO_RING_F_INDIRECT_DESC) | featureBit(VIRTIO_RING_F_EVENT_IDX),
  );
  const cfg = new Uint8Array(36);
  m.readConfig(0, cfg);
  const v = new DataView(cfg.buffer);
  assert.equal(v.getUint32(0, true), 4, "num_queues");
  assert.equal(v.getUint32(4, true), 126, "seg_max");
  assert.equal(v.getUint32(8, true), 0xffff, "max_sectors");
  assert.equal(v.getUint32(12, true), 128, "cmd_per_lun");
  assert.equal(v.getUint32(16, true), 16, "event_info_size");
  assert.equal(v.getUint32(20, true), 96, "sense_size");
  assert.equal(v.getUint32(24, true), 32, "cdb_size");
  assert.equal(v.getUint16(28, true), 0, "max_channel");
  assert.equal(v.getUint16(30, true), 255, "max_target");
  assert.equal(v.getUint32(32, true), 16383, "max_lun");
  const part = new Uint8Array(2);
  m.readConfig(30, part);
  assert.deepEqual([...part], [255, 0]);

  const packed = new VirtioScsiModel({ packed: true, hotplug: false, change: false });
  assert.ok((packed.deviceFeatures & featureBit(VIRTIO_F_RING_PACKED)) !== 0n);
  assert.equal(packed.deviceFeatures & featureBit(VIRTIO_SCSI_F_HOTPLUG), 0n);
  assert.throws(() => new VirtioScsiModel({ numQueues: 0 }), RangeError);
  assert.throws(() => new VirtioScsiModel({ numQueues: 1023 }), RangeError);
  assert.throws(() => new VirtioScsiModel({ maxTarget: 256 }), RangeError);
  assert.throws(() => new VirtioScsiModel({ maxLun: 16384 }), RangeError);
});

Deno.test("VirtioScsiModel: sense_size and cdb_size are driver-writable and reset restores them", () => {
  const m = new VirtioScsiModel();
  const le32 = (n: number) => new Uint8Array(new Uint32Array([n]).buffer);
  m.writeConfig(VIRTIO_SCSI_CONFIG_SENSE_SIZE, le32(252));
  m.writeConfig(VIRTIO_SCSI_CONFIG_CDB_SIZE, Uint8Array.of(16)); // a one-byte write
  assert.equal(m.shared.senseSize, 252);
  assert.equal(m.shared.cdbSize, 16);
  // What the device cannot use is ignored (QEMU: a device error).
  m.writeConfig(VIRTIO_SCSI_CONFIG_SENSE_SIZE, le32(65536));
  m.writeConfig(VIRTIO_SCSI_CONFIG_CDB_SIZE, le32(256));
  assert.equal(m.shared.senseSize, 252);
  assert.equal(m.shared.cdbSize, 16);
  // Read-only fields stay.
  m.writeConfig(0, le32(9));
  m.writeConfig(30, Uint8Array.of(1, 0));
  const cfg = new Uint8Array(36);
  m.readConfig(0, cfg);
  assert.equal(new DataView(cfg.buffer).getUint32(0, true), 1);
  assert.equal(new DataView(cfg.buffer).getUint16(30, true), 255);
  m.reset();
  assert.equal(m.shared.senseSize, 96);
  assert.equal(m.shared.cdbSize, 32);
  // The back-end in another thread sees the same words.
  const other = new VirtioScsiSharedConfig(m.shared.buffer);
  m.writeConfig(VIRTIO_SCSI_CONFIG_SENSE_SIZE, le32(18));
  assert.equal(other.senseSize, 18);
  assert.throws(() => new VirtioScsiSharedConfig(new SharedArrayBuffer(4)), RangeError);
});

// ---- Commands end to end -------------------------------------------------------------------------

Deno.test("virtio-scsi: INQUIRY and READ CAPACITY through the rings", async () => {
  const h = new ScsiHarness();
  await h.plug(0, 0, 2 * MiB);
  const r = await h.command(0, 0, inquiry(96), { dataIn: 96 });
  assert.equal(r.response, VIRTIO_SCSI_S_OK);
  assert.equal(r.status, GOOD);
  assert.equal(r.senseLen, 0);
  assert.equal(r.residual, 60, "36 of 96 bytes transferred");
  assert.equal(r.written, 12 + 96 + 36);
  assert.equal(new TextDecoder().decode(r.data.subarray(16, 29)), "QEMU HARDDISK");
  const rc = await h.command(0, 0, readCapacity16(), { dataIn: 32 });
  assert.equal(new DataView(rc.data.buffer).getBigUint64(0), BigInt(2 * MiB / 512 - 1));
  assert.equal(rc.residual, 0);
  assert.ok(h.interrupts[VIRTIO_SCSI_VQ_REQUEST]! > 0);
});

Deno.test("virtio-scsi: WRITE and READ move data between guest memory and the node", async () => {
  for (const layout of ["plain", "segmented", "merged", "indirect"] as const) {
    const h = new ScsiHarness();
    const { node } = await h.plug(0, 0, 2 * MiB);
    const data = pattern(16 * 512, layout.length);
    const opts = {
      segments: layout === "segmented" ? 5 : 1,
      merged: layout === "merged",
      indirect: layout === "indirect",
    };
    const w = await h.command(0, 0, write10(100, 16), { dataOut: data, ...opts });
    assert.equal(w.status, GOOD, layout);
    assert.equal(w.residual, 0);
    assert.equal(w.written, 12 + 96);
    assert.deepEqual(await nodeBytes(node, 100 * 512, data.length), data, layout);
    const r = await h.command(0, 0, read16(100, 16), { dataIn: data.length, ...opts });
    assert.equal(r.status, GOOD);
    assert.deepEqual(r.data, data, layout);
    assert.equal(r.written, 12 + 96 + data.length);
  }
});

Deno.test("virtio-scsi: residuals for short and long data buffers", async () => {
  const h = new ScsiHarness();
  await h.plug(0, 0);
  // Data-in shorter than the allocation length: what fits, no residual.
  const short = await h.command(0, 0, inquiry(96), { dataIn: 20 });
  assert.equal(short.status, GOOD);
  assert.equal(short.residual, 0);
  assert.equal(short.data[0], 0);
  assert.equal(short.written, 12 + 96 + 20);
  // A longer data-in buffer than the read: the difference is the residual.
  const long = await h.command(0, 0, read10(0, 2), { dataIn: 5000 });
  assert.equal(long.status, GOOD);
  assert.equal(long.residual, 5000 - 1024);
  // Data-out longer than the write.
  const w = await h.command(0, 0, write10(0, 1), { dataOut: new Uint8Array(700) });
  assert.equal(w.status, GOOD);
  assert.equal(w.residual, 188);
  // A command without data phase and a buffer anyway.
  const t = await h.command(0, 0, tur(), { dataIn: 100 });
  assert.equal(t.status, GOOD);
  assert.equal(t.residual, 100);
});

Deno.test("virtio-scsi: OVERRUN when the buffers cannot hold the transfer, FAILURE for both directions", async () => {
  const h = new ScsiHarness();
  const { node } = await h.plug(0, 0);
  const before = await nodeBytes(node, 0, 4096);
  const cases = [
    { cdb: read10(0, 4), opts: { dataIn: 2047 } },
    { cdb: read10(0, 1), opts: {} },
    { cdb: read10(0, 1), opts: { dataOut: new Uint8Array(512) } },
    { cdb: write10(0, 2), opts: { dataOut: new Uint8Array(1000) } },
    { cdb: write10(0, 1), opts: { dataIn: 512 } },
    { cdb: inquiry(36), opts: { dataOut: new Uint8Array(36) } },
  ];
  for (const { cdb, opts } of cases) {
    const r = await h.command(0, 0, cdb, opts);
    assert.equal(r.response, VIRTIO_SCSI_S_OVERRUN, JSON.stringify(cdb));
    assert.equal(r.status, 0);
    assert.equal(r.senseLen, 0);
  }
  const both = await h.command(0, 0, write10(0, 1), {
    dataOut: new Uint8Array(512).fill(1),
    dataIn: 512,
  });
  assert.equal(both.response, VIRTIO_SCSI_S_FAILURE);
  assert.deepEqual(await nodeBytes(node, 0, 4096), before, "nothing was written");
});

Deno.test("virtio-scsi: CHECK CONDITION carries fixed-format sense cut to sense_size", async () => {
  const h = new ScsiHarness();
  await h.plug(0, 0);
  const r = await h.command(0, 0, read10(1 << 20, 1), { dataIn: 512 });
  assert.equal(r.response, VIRTIO_SCSI_S_OK);
  assert.equal(r.status, CHECK_CONDITION);
  assert.equal(r.senseLen, 18);
  assert.equal(r.residual, 0);
  assert.equal(r.sense[0], 0x70);
  assert.deepEqual(senseKey(r), [5, 0x21, 0]);

  h.model.writeConfig(VIRTIO_SCSI_CONFIG_SENSE_SIZE, Uint8Array.of(8, 0, 0, 0));
  const cut = await h.command(0, 0, read10(1 << 20, 1), { dataIn: 512 });
  assert.equal(cut.senseLen, 8);
  assert.equal(cut.sense[2], 5);
  h.model.writeConfig(VIRTIO_SCSI_CONFIG_SENSE_SIZE, Uint8Array.of(0, 0, 0, 0));
  const none = await h.command(0, 0, read10(1 << 20, 1), { dataIn: 512 });
  assert.equal(none.status, CHECK_CONDITION);
  assert.equal(none.senseLen, 0);
  // The sense is still there for REQUEST SENSE.
  const rs = await h.command(0, 0, requestSense(18), { dataIn: 18 });
  assert.equal(rs.data[12], 0x21);
});

Deno.test("virtio-scsi: the CDB is cdb_size bytes; a command longer than that is invalid", async () => {
  const h = new ScsiHarness();
  await h.plug(0, 0);
  h.model.writeConfig(VIRTIO_SCSI_CONFIG_CDB_SIZE, Uint8Array.of(6));
  const r = await h.command(0, 0, read10(0, 1), { dataIn: 512 });
  assert.equal(r.status, CHECK_CONDITION);
  assert.deepEqual(senseKey(r), [5, 0x20, 0]);
  assert.equal((await h.command(0, 0, tur())).status, GOOD);
  h.model.writeConfig(VIRTIO_SCSI_CONFIG_CDB_SIZE, Uint8Array.of(16));
  assert.equal((await h.command(0, 0, read16(0, 1), { dataIn: 512 })).status, GOOD);
});

Deno.test("virtio-scsi: BAD_TARGET for malformed LUNs and targets without units", async () => {
  const h = new ScsiHarness();
  await h.plug(1, 0);
  const bad = [
    [2, 1, 0, 0, 0, 0, 0, 0], // not the single-level format
    [1, 0, 0, 0, 0, 0, 0, 0], // target 0 has no unit
    [1, 255, 0, 0, 0, 0, 0, 0],
    [1, 1, 0x80, 0, 0, 0, 0, 0], // byte 2 neither 0 nor 40h–7Fh
    [1, 1, 0x3f, 0, 0, 0, 0, 0],
  ];
  for (const lun of bad) {
    const r = await h.command(0, 0, inquiry(36), { dataIn: 36, lunBytes: lun });
    assert.equal(r.response, VIRTIO_SCSI_S_BAD_TARGET, JSON.stringify(lun));
    assert.equal(r.written, 12 + 96);
  }
  // Flat space addressing of LUN 0 is the same unit.
  const flat = await h.command(0, 0, tur(), { lunBytes: [1, 1, 0x40, 0, 0, 0, 0, 0] });
  assert.equal(flat.response, VIRTIO_SCSI_S_OK);
  assert.equal(flat.status, GOOD);
});

Deno.test("virtio-scsi: an unknown LUN on a known target", async () => {
  const h = new ScsiHarness();
  await h.plug(0, 0);
  const inq = await h.command(0, 7, inquiry(36), { dataIn: 36 });
  assert.equal(inq.response, VIRTIO_SCSI_S_OK);
  assert.equal(inq.status, GOOD);
  assert.equal(inq.data[0], 0x7f, "peripheral qualifier 3");
  const t = await h.command(0, 7, tur());
  assert.equal(t.status, CHECK_CONDITION);
  assert.deepEqual(senseKey(t), [5, 0x25, 0]);
  const rl = await h.command(0, 0, reportLuns(), { dataIn: 64 });
  assert.equal(rl.residual, 64 - 16);
});

Deno.test("virtio-scsi: a read-only unit answers writes with DATA PROTECT", async () => {
  const h = new ScsiHarness();
  const { node } = await h.plug(0, 0, await memoryNode(MiB, true));
  const r = await h.command(0, 0, write16(0, 1), { dataOut: new Uint8Array(512) });
  assert.equal(r.status, CHECK_CONDITION);
  assert.deepEqual(senseKey(r), [7, 0x27, 0]);
  assert.equal(node.readOnly, true);
  assert.equal((await h.command(0, 0, read16(0, 1), { dataIn: 512 })).status, GOOD);
});

Deno.test("virtio-scsi: several request queues and the packed ring", async () => {
  const h = new ScsiHarness({ numQueues: 3 });
  const { node } = await h.plug(0, 0);
  const data = pattern(1024, 3);
  assert.equal((await h.command(0, 0, write10(4, 2), { dataOut: data, queue: 4 })).status, GOOD);
  assert.deepEqual((await h.command(0, 0, read10(4, 2), { dataIn: 1024, queue: 3 })).data, data);
  assert.deepEqual(await nodeBytes(node, 2048, 1024), data);

  const p = new ScsiHarness({ packed: true });
  const pn = await p.plug(0, 0);
  assert.ok((p.features & featureBit(VIRTIO_F_RING_PACKED)) !== 0n);
  assert.equal(
    (await p.command(0, 0, write10(4, 2), { dataOut: data, indirect: true })).status,
    GOOD,
  );
  assert.deepEqual((await p.command(0, 0, read10(4, 2), { dataIn: 1024, segments: 3 })).data, data);
  assert.deepEqual(await nodeBytes(pn.node, 2048, 1024), data);
});

// ---- Framing errors --------------------------------------------------------------------------------

Deno.test("virtio-scsi: a request shorter than its header is a device error until reset", async () => {
  const h = new ScsiHarness();
  await h.plug(0, 0);
  const driver = h.drivers[VIRTIO_SCSI_VQ_REQUEST]!;
  // 19 + 32 bytes are needed; offer 50.
  driver.add([h.buffer(new Uint8Array(50))], [h.space(108)], 1);
  driver.kick();
  await assert.rejects(
    h.backend.processQueue(VIRTIO_SCSI_VQ_REQUEST, () => {}),
    (e: unknown) =>
      e instanceof VirtioScsiError && e.reason === "short-request" && e.fault === "bad-request",
  );
  assert.ok(h.backend.broken !== null);
  assert.equal(driver.getUsed(), null, "the element is not returned");
  // Further kicks are ignored until the driver resets the device.
  driver.add([h.buffer(new Uint8Array(51))], [h.space(108)], 2);
  driver.kick();
  await h.backend.processQueue(VIRTIO_SCSI_VQ_REQUEST, () => {});
  assert.equal(driver.getUsed(), null);
  h.reset();
  assert.equal(h.backend.broken, null);
  const r = await h.command(0, 0, tur());
  assert.equal(r.status, CHECK_CONDITION, "the reset's unit attention");
});

Deno.test("virtio-scsi: a response area shorter than its header is a device error", async () => {
  const h = new ScsiHarness();
  await h.plug(0, 0);
  h.model.writeConfig(VIRTIO_SCSI_CONFIG_SENSE_SIZE, Uint8Array.of(32, 0, 0, 0));
  const driver = h.drivers[VIRTIO_SCSI_VQ_REQUEST]!;
  driver.add([h.buffer(new Uint8Array(51))], [h.space(12 + 31)], 1);
  driver.kick();
  await assert.rejects(
    h.backend.processQueue(VIRTIO_SCSI_VQ_REQUEST, () => {}),
    (e: unknown) => e instanceof VirtioScsiError && e.reason === "short-response",
  );
});

Deno.test("virtio-scsi: control requests shorter than their type or header are device errors", async () => {
  for (const [req, resp] of [[3, 1], [20, 1], [24, 0], [12, 5], [16, 4]] as const) {
    const h = new ScsiHarness();
    await h.plug(0, 0);
    const driver = h.drivers[VIRTIO_SCSI_VQ_CONTROL]!;
    const bytes = new Uint8Array(req);
    if (req >= 16 && resp === 4) bytes[0] = 1; // AN_QUERY
    driver.add([h.buffer(bytes)], resp > 0 ? [h.space(resp)] : [], 1);
    driver.kick();
    await assert.rejects(
      h.backend.processQueue(VIRTIO_SCSI_VQ_CONTROL, () => {}),
      VirtioScsiError,
      `request ${req}, response ${resp}`,
    );
  }
});

// ---- Task management -----------------------------------------------------------------------------

Deno.test("virtio-scsi: task management functions", async () => {
  const h = new ScsiHarness();
  await h.plug(0, 0);
  await h.plug(0, 1);
  await h.command(0, 0, tur()); // the sibling's REPORTED LUNS DATA HAS CHANGED
  const lun0 = lunBytes(0, 0);
  for (
    const f of [
      VIRTIO_SCSI_T_TMF_ABORT_TASK,
      VIRTIO_SCSI_T_TMF_QUERY_TASK,
      VIRTIO_SCSI_T_TMF_ABORT_TASK_SET,
      VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET,
      VIRTIO_SCSI_T_TMF_QUERY_TASK_SET,
    ]
  ) {
    assert.equal(await h.tmf(f, lun0, 5n), VIRTIO_SCSI_S_OK, `subtype ${f}`);
  }
  assert.equal((await h.command(0, 0, tur())).status, GOOD, "aborts leave no unit attention");

  assert.equal(await h.tmf(VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, lun0), VIRTIO_SCSI_S_OK);
  const ua = await h.command(0, 0, tur());
  assert.deepEqual(senseKey(ua), [6, 0x29, 0]);
  assert.equal((await h.command(0, 1, tur())).status, GOOD, "only that unit was reset");

  assert.equal(await h.tmf(VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET, lun0), VIRTIO_SCSI_S_OK);
  assert.deepEqual(senseKey(await h.command(0, 0, tur())), [6, 0x29, 0]);
  assert.deepEqual(senseKey(await h.command(0, 1, tur())), [6, 0x29, 0]);

  assert.equal(await h.tmf(VIRTIO_SCSI_T_TMF_CLEAR_ACA, lun0), VIRTIO_SCSI_S_FUNCTION_REJECTED);
  assert.equal(await h.tmf(99, lun0), VIRTIO_SCSI_S_FUNCTION_REJECTED);
  assert.equal(await h.tmf(VIRTIO_SCSI_T_TMF_ABORT_TASK, lunBytes(3, 0)), VIRTIO_SCSI_S_BAD_TARGET);
  assert.equal(
    await h.tmf(VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, [0, 0, 0, 0, 0, 0, 0, 0]),
    VIRTIO_SCSI_S_BAD_TARGET,
  );
  assert.equal(
    await h.tmf(VIRTIO_SCSI_T_TMF_ABORT_TASK, lunBytes(0, 9)),
    VIRTIO_SCSI_S_INCORRECT_LUN,
  );
  assert.equal(await h.tmf(VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET, lunBytes(7, 0)), VIRTIO_SCSI_S_OK);
});

Deno.test("virtio-scsi: asynchronous notification queries report no supported events", async () => {
  const h = new ScsiHarness();
  await h.plug(0, 0);
  const q = await h.an(lunBytes(0, 0), 0x7e);
  assert.deepEqual(q, { eventActual: 0, response: VIRTIO_SCSI_S_OK, written: 5 });
  const s = await h.an(lunBytes(0, 0), 0x10, VIRTIO_SCSI_T_AN_SUBSCRIBE);
  assert.equal(s.eventActual, 0);
  // An unknown control type is completed without a response.
  const req = new Uint8Array(24);
  req[0] = 77;
  const written = await h.submit(VIRTIO_SCSI_VQ_CONTROL, [h.buffer(req)], [h.space(8)]);
  assert.equal(written, 0);
});

/** A node whose reads wait for `release()`. */
function gatedNode(
  inner: BlockNode,
): { node: BlockNode; release: () => void; started: Promise<void> } {
  let release!: () => void;
  let started!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  const startedP = new Promise<void>((r) => (started = r));
  const node: BlockNode = {
    format: inner.format,
    filename: inner.filename,
    get size() {
      return inner.size;
    },
    readOnly: inner.readOnly,
    requestAlignment: 1,
    read: async (o, d) => {
      started();
      await gate;
      return inner.read(o, d);
    },
    write: (o, s, opts) => inner.write(o, s, opts),
    writeZeroes: (o, l, opts) => inner.writeZeroes(o, l, opts),
    discard: (o, l) => inner.discard(o, l),
    flush: () => inner.flush(),
    blockStatus: (o, m) => inner.blockStatus(o, m),
    close: () => inner.close(),
  };
  return { node, release, started: startedP };
}

Deno.test("virtio-scsi: a TMF waits for the command in flight, which completes first", async () => {
  const h = new ScsiHarness();
  const gated = gatedNode(await memoryNode(MiB));
  await h.plug(0, 0, gated.node);
  const order: string[] = [];
  const cmd = h.command(0, 0, read10(0, 1), { dataIn: 512, tag: 42n }).then((r) => {
    order.push("read");
    return r;
  });
  await gated.started;
  const abort = h.tmf(VIRTIO_SCSI_T_TMF_ABORT_TASK, lunBytes(0, 0), 42n).then((r) => {
    order.push("abort");
    return r;
  });
  await new Promise((r) => setTimeout(r, 5));
  assert.deepEqual(order, [], "the abort waits for the read");
  gated.release();
  const [read, response] = await Promise.all([cmd, abort]);
  assert.deepEqual(order, ["read", "abort"]);
  assert.equal(read.status, GOOD);
  assert.equal(response, VIRTIO_SCSI_S_OK, "FUNCTION COMPLETE: nothing left to abort");
});

Deno.test("virtio-scsi: a request in flight across a device reset completes into nothing", async () => {
  const h = new ScsiHarness();
  const gated = gatedNode(await memoryNode(MiB));
  await h.plug(0, 0, gated.node);
  const driver = h.drivers[VIRTIO_SCSI_VQ_REQUEST]!;
  const req = new Uint8Array(51);
  req.set(lunBytes(0, 0));
  req.set(read10(0, 1), 19);
  driver.add([h.buffer(req)], [h.space(108), h.space(512)], 1);
  driver.kick();
  const device = h.devices[VIRTIO_SCSI_VQ_REQUEST]!;
  const running = h.backend.processQueue(VIRTIO_SCSI_VQ_REQUEST, () => {});
  await gated.started;
  h.backend.reset();
  device.reset();
  gated.release();
  await running;
  assert.equal(driver.getUsed(), null);
  assert.equal(device.inFlight, 0);
});

// ---- Events ----------------------------------------------------------------------------------------

Deno.test("virtio-scsi: hotplug and unplug send TRANSPORT_RESET events and interrupts", async () => {
  const h = new ScsiHarness();
  await h.plug(0, 0); // with no event buffer yet: dropped
  await h.postEvents(4);
  assert.deepEqual(h.events().map((e) => e.event), [
    (VIRTIO_SCSI_T_NO_EVENT | VIRTIO_SCSI_T_EVENTS_MISSED) >>> 0,
  ]);
  const before = h.interrupts[1]!;
  h.backend.hotplug(2, 5, await memoryNode(MiB));
  assert.equal(h.interrupts[1]! - before, 1, "through hooks.interrupt");
  assert.deepEqual(h.events(), [
    {
      event: VIRTIO_SCSI_T_TRANSPORT_RESET,
      lun: [1, 2, 0, 5, 0, 0, 0, 0],
      reason: VIRTIO_SCSI_EVT_RESET_RESCAN,
    },
  ]);
  h.backend.hotplug(2, 300, await memoryNode(MiB));
  assert.equal(h.interrupts[1]! - before, 2);
  assert.deepEqual(h.events(), [
    {
      event: VIRTIO_SCSI_T_TRANSPORT_RESET,
      lun: [1, 2, 0x41, 0x2c, 0, 0, 0, 0],
      reason: VIRTIO_SCSI_EVT_RESET_RESCAN,
    },
  ]);
  // The first unit of target 2 is new: its power-on reset outranks the LUN inventory change.
  assert.deepEqual(senseKey(await h.command(2, 5, tur())), [6, 0x29, 0]);
  assert.equal((await h.command(2, 5, tur())).status, GOOD);

  const node = await h.backend.unplug(2, 300);
  assert.equal(node.size, MiB);
  assert.deepEqual(h.events(), [
    {
      event: VIRTIO_SCSI_T_TRANSPORT_RESET,
      lun: [1, 2, 0x41, 0x2c, 0, 0, 0, 0],
      reason: VIRTIO_SCSI_EVT_RESET_REMOVED,
    },
  ]);
  // Target 2 has no LUN 0: the target answers REPORT LUNS there, without unit attention.
  const rl = await h.command(2, 0, reportLuns(), { dataIn: 64 });
  assert.equal(rl.status, GOOD);
  assert.equal(new DataView(rl.data.buffer).getUint32(0), 16);
  assert.equal(rl.data[8 + 8 + 1], 5);
  assert.deepEqual(senseKey(await h.command(2, 5, tur())), [6, 0x3f, 0x0e]);
  await h.backend.unplug(2, 5);
  assert.equal((await h.command(2, 5, tur())).response, VIRTIO_SCSI_S_BAD_TARGET);
  await assert.rejects(h.backend.unplug(2, 5), RangeError);
  assert.throws(() => h.backend.hotplug(0, 0, node), RangeError, "address in use");
  assert.throws(() => h.backend.hotplug(256, 0, node), RangeError);
});

Deno.test("virtio-scsi: REPORT LUNS clears REPORTED LUNS DATA HAS CHANGED on LUN 0", async () => {
  const h = new ScsiHarness();
  await h.plug(0, 0);
  h.backend.hotplug(0, 1, await memoryNode(MiB));
  const rl = await h.command(0, 0, reportLuns(), { dataIn: 64 });
  assert.equal(rl.status, GOOD);
  assert.equal(new DataView(rl.data.buffer).getUint32(0), 16);
  assert.equal((await h.command(0, 0, tur())).status, GOOD);
});

Deno.test("virtio-scsi: events without buffers set EVENTS_MISSED on the next one", async () => {
  const h = new ScsiHarness();
  await h.plug(0, 0);
  h.backend.hotplug(0, 1, await memoryNode(MiB));
  assert.equal(h.backend.stats.eventsDropped, 2, "LUN 0's and LUN 1's");
  // Buffers the device finds at the next event (no kick processed in between).
  await h.postEvents(2, 16, false);
  h.backend.hotplug(0, 2, await memoryNode(MiB));
  const [ev] = h.events();
  assert.equal(ev?.event, (VIRTIO_SCSI_T_TRANSPORT_RESET | VIRTIO_SCSI_T_EVENTS_MISSED) >>> 0);
  h.backend.hotplug(0, 3, await memoryNode(MiB));
  assert.equal(h.events()[0]?.event, VIRTIO_SCSI_T_TRANSPORT_RESET, "reported once");

  // Dropped again; this time the kick of the event queue reports it with a NO_EVENT.
  h.backend.hotplug(0, 4, await memoryNode(MiB));
  await h.postEvents(1);
  assert.deepEqual(h.events(), [
    {
      event: (VIRTIO_SCSI_T_NO_EVENT | VIRTIO_SCSI_T_EVENTS_MISSED) >>> 0,
      lun: [0, 0, 0, 0, 0, 0, 0, 0],
      reason: 0,
    },
  ]);
  await h.postEvents(1);
  assert.deepEqual(h.events(), [], "nothing more to report");
});

Deno.test("virtio-scsi: a capacity change sends PARAM_CHANGE with CHANGE negotiated", async () => {
  const h = new ScsiHarness();
  const { node, disk } = await h.plug(0, 0);
  await h.postEvents(3);
  h.events(); // the plug's dropped event
  await (node.truncate as (size: number) => Promise<void>)(2 * MiB);
  disk.capacityChanged();
  assert.deepEqual(h.events(), [
    {
      event: VIRTIO_SCSI_T_PARAM_CHANGE,
      lun: [1, 0, 0, 0, 0, 0, 0, 0],
      reason: 0x2a | (0x09 << 8),
    },
  ]);
  assert.deepEqual(senseKey(await h.command(0, 0, tur())), [6, 0x2a, 0x09]);
  // Noticed by a command: the UA and the event at once.
  await (node.truncate as (size: number) => Promise<void>)(3 * MiB);
  const rc = await h.command(0, 0, readCapacity16(), { dataIn: 32 });
  assert.deepEqual(senseKey(rc), [6, 0x2a, 0x09]);
  assert.equal(h.events().length, 1);
  const rc2 = await h.command(0, 0, readCapacity16(), { dataIn: 32 });
  assert.equal(new DataView(rc2.data.buffer).getBigUint64(0), BigInt(3 * MiB / 512 - 1));
});

Deno.test("virtio-scsi: without HOTPLUG and CHANGE negotiated there are no events, only unit attentions", async () => {
  const h = new ScsiHarness({ accept: featureBit(VIRTIO_RING_F_EVENT_IDX) });
  const { node, disk } = await h.plug(0, 0);
  await h.postEvents(2);
  h.backend.hotplug(0, 1, await memoryNode(MiB));
  await (node.truncate as (size: number) => Promise<void>)(2 * MiB);
  disk.capacityChanged();
  assert.deepEqual(h.events(), []);
  assert.equal(h.backend.stats.events, 0);
  assert.deepEqual(senseKey(await h.command(0, 0, tur())), [6, 0x2a, 0x09]);
});

Deno.test("virtio-scsi: a too-small event buffer found by a hotplug goes to hooks.needsReset", async () => {
  const h = new ScsiHarness();
  await h.plug(0, 0);
  await h.postEvents(1, 8, false);
  h.backend.hotplug(0, 1, await memoryNode(MiB));
  assert.equal(h.needsReset.length, 1);
  assert.ok(h.needsReset[0] instanceof VirtioScsiError);
  assert.equal((h.needsReset[0] as VirtioScsiError).reason, "short-event-buffer");
  // The device ignores its queues until reset.
  await h.backend.processQueue(VIRTIO_SCSI_VQ_REQUEST, () => {});
  h.reset();
  assert.equal((await h.command(0, 0, tur())).response, VIRTIO_SCSI_S_OK);
});

Deno.test("virtio-scsi: the event queue is not for polling, and each event delivery asks for a kick at the next buffer", async () => {
  const h = new ScsiHarness();
  assert.ok((h.features & featureBit(VIRTIO_RING_F_EVENT_IDX)) !== 0n, "EVENT_IDX negotiated");
  assert.equal(h.backend.pollable(VIRTIO_SCSI_VQ_EVENT), false);
  assert.equal(h.backend.pollable(VIRTIO_SCSI_VQ_CONTROL), true);
  assert.equal(h.backend.pollable(VIRTIO_SCSI_VQ_REQUEST), true);
  await h.plug(0, 0); // no buffer yet: dropped
  const driver = h.drivers[VIRTIO_SCSI_VQ_EVENT]!;
  const layout = driver.layout;
  const availEvent = () => h.mem.u16(layout.device + 4 + 8 * layout.size);

  await h.postEvents(2, 16, false);
  h.backend.hotplug(0, 1, await memoryNode(MiB));
  h.backend.hotplug(0, 2, await memoryNode(MiB));
  assert.equal(h.events().length, 2);
  // Nothing polls the event queue: avail_event follows the buffers taken, as QEMU's pop keeps it.
  assert.equal(availEvent(), 2);
  const kicks = driver.stats.kicks;
  h.backend.hotplug(0, 3, await memoryNode(MiB)); // no buffer: dropped
  await h.postEvents(1);
  assert.equal(driver.stats.kicks, kicks + 1, "the buffer after a drop is kicked");
  assert.equal(
    h.events()[0]?.event,
    (VIRTIO_SCSI_T_NO_EVENT | VIRTIO_SCSI_T_EVENTS_MISSED) >>> 0,
    "so the drop is reported at once",
  );
});

Deno.test("virtio-scsi: a device reset restores sizes and raises POWER ON, RESET", async () => {
  const h = new ScsiHarness();
  await h.plug(0, 0);
  h.model.writeConfig(VIRTIO_SCSI_CONFIG_SENSE_SIZE, Uint8Array.of(20, 0, 0, 0));
  h.reset();
  assert.equal(h.model.shared.senseSize, 96);
  const r = await h.command(0, 0, tur());
  assert.deepEqual(senseKey(r), [6, 0x29, 0]);
  assert.equal(r.senseLen, 18);
});

Deno.test("VirtioScsiBackend.close() closes the plugged nodes", async () => {
  const backend = new VirtioScsiBackend();
  const node = await memoryNode(4096);
  backend.hotplug(0, 0, node);
  await backend.close();
  await assert.rejects(node.read(0, new Uint8Array(1)));
  assert.equal(backend.find(0, 0), undefined);
});

// ---- The device type -------------------------------------------------------------------------------

function spec(
  drives: Array<{ readOnly?: boolean; cache?: "writeback" | "writethrough" | "unsafe" }>,
  options: Record<string, unknown> = {},
): DeviceSpec {
  return {
    type: "virtio-scsi",
    id: "scsi0",
    drives: drives.map((d, i) => ({
      file: `d${i}.img`,
      readOnly: d.readOnly ?? false,
      cache: d.cache ?? "writeback",
    })),
    numQueues: 2,
    queueSize: 128,
    eventIdx: true,
    indirect: false,
    packed: false,
    ioeventfd: false,
    options,
  };
}

Deno.test("virtio-scsi device type: createBackend plugs the drives, createModel shares the config", async () => {
  assert.equal(deviceType.name, "virtio-scsi");
  assert.ok(deviceType.optionsSchema?.safeParse({ luns: [{ target: 1, lun: 2 }] }).success);
  assert.equal(
    deviceType.optionsSchema?.safeParse({ luns: [{ target: 256, lun: 0 }] }).success,
    false,
  );
  assert.equal(deviceType.optionsSchema?.safeParse({ bogus: 1 }).success, false);

  const nodes = [await memoryNode(MiB), await memoryNode(2 * MiB)];
  const s = spec([{}, { readOnly: true, cache: "writethrough" }], {
    maxTarget: 7,
    change: false,
    luns: [{ target: 0, lun: 0, serial: "A" }, { target: 3, lun: 9, blockSize: 4096 }],
  });
  const ready = await createBackend({ spec: s, drives: nodes });
  const backend = ready.backend as VirtioScsiBackend;
  const first = backend.find(0, 0)!;
  const second = backend.find(3, 9)!;
  assert.equal(first.serial, "A");
  assert.equal(first.writeCache, true);
  assert.equal(second.readOnly, true);
  assert.equal(second.writeCache, false, "writethrough: WCE off, as QEMU");
  assert.equal(second.blockSize, 4096);

  const model = createModel(s, { drives: [], backend: ready.info });
  assert.equal(model.numQueues, 4);
  assert.equal(model.queueMaxSize(3), 128);
  assert.equal(model.deviceFeatures & featureBit(VIRTIO_SCSI_F_CHANGE), 0n);
  assert.equal(model.deviceFeatures & featureBit(VIRTIO_RING_F_INDIRECT_DESC), 0n);
  const cfg = new Uint8Array(36);
  model.readConfig(0, cfg);
  assert.equal(new DataView(cfg.buffer).getUint16(30, true), 7, "max_target from the back-end");
  model.writeConfig(VIRTIO_SCSI_CONFIG_CDB_SIZE, Uint8Array.of(16));
  assert.equal(backend.config.cdbSize, 16, "the back-end sees the driver's write");
  assert.throws(() => backend.hotplug(8, 0, nodes[0]!), RangeError, "beyond max_target");
  await backend.close();

  await assert.rejects(
    async () => await createBackend({ spec: spec([{}], { luns: [] }), drives: [nodes[0]!] }),
    RangeError,
  );
  assert.throws(() => createModel(s, { drives: [], backend: null }), RangeError);
});
