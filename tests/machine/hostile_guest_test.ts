/**
 * Issue #13 §6, "a guest that kills the iothread": a driver that breaks a ring — on the poll path
 * (no kick), on the kick path, after a reset, on virtio-scsi's control and event queues, on split
 * and packed rings — must get DEVICE_NEEDS_RESET and a config interrupt on that device only. The
 * iothread lives on (a reset, a re-initialisation and I/O with the bytes read back work), the
 * machine records no error, and another device keeps serving I/O meanwhile.
 *
 * The guest is `hostile_vcpu.ts`, driven one request at a time; `scsi_hotplug_device.ts` makes a
 * virtio-scsi whose event-queue kicks bring a hotplug, to reach the event ring from the iothread.
 */
import assert from "node:assert/strict";
import { Machine, type VcpuHandle } from "../../src/machine/machine.ts";
import { registerDeviceModule } from "../../src/machine/registry.ts";
import {
  VIRTIO_CONFIG_S_DRIVER_OK,
  VIRTIO_CONFIG_S_NEEDS_RESET,
} from "../../src/virtio/features.ts";
import { eventually, within } from "../timeout.ts";
import type { Breakage, HostileRequest, IoResult } from "./hostile_vcpu.ts";

registerDeviceModule(
  "virtio-scsi-hotplug",
  new URL("./scsi_hotplug_device.ts", import.meta.url),
);

const VCPU = new URL("./hostile_vcpu.ts", import.meta.url);
/** VIRTIO_SCSI_F_HOTPLUG. */
const SCSI_HOTPLUG = 1n << 1n;
/** VIRTIO_SCSI_T_TRANSPORT_RESET. */
const TRANSPORT_RESET = 1;
/** VIRTIO_SCSI_T_EVENTS_MISSED. */
const EVENTS_MISSED = 0x8000_0000;
/** No single step may take longer than this, whatever hangs. */
const STEP_MS = 20_000;
/** How long the guest waits for a config interrupt (the idle iothread polls at least every 1 s). */
const CONFIG_WAIT_MS = 10_000;
const QUEUE_SIZE = 16;

/** The events without the EVENTS_MISSED flag (the plug at DRIVER_OK found no buffer yet). */
function eventCodes(codes: number[]): number[] {
  return codes.map((c) => (c & ~EVENTS_MISSED) >>> 0);
}

/**
 * Posts event buffers until the hotplug's TRANSPORT_RESET comes back. A plug at DRIVER_OK that
 * found no buffer is reported first as NO_EVENT with EVENTS_MISSED (code 0), and whether it
 * comes before or with the next event depends on timing: those are the only other events allowed.
 */
async function hotplugEvent(r: Rig, slot: number): Promise<void> {
  const seen: number[] = [];
  for (let round = 0; round < 4 && !seen.includes(TRANSPORT_RESET); round++) {
    await r.ask({ op: "post-events", slot, count: 1 });
    seen.push(
      ...eventCodes(
        await r.ask<number[]>({ op: "reap-events", slot, min: 1, timeoutMs: 10_000 }),
      ),
    );
  }
  assert.ok(seen.includes(TRANSPORT_RESET), `events ${seen.join(", ")}`);
  assert.ok(seen.every((c) => c === TRANSPORT_RESET || c === 0), `events ${seen.join(", ")}`);
}

interface Rig {
  readonly machine: Machine;
  readonly vcpu: VcpuHandle;
  readonly dir: string;
  slot(id: string): number;
  index(id: string): number;
  ask<T>(r: HostileRequest): Promise<T>;
  close(): Promise<void>;
}

type DeviceEntry = Record<string, unknown> & { id: string; type: string };

/** A machine with `devices` (each with one 1 MiB raw image per drive) and the hostile vCPU. */
async function rig(devices: DeviceEntry[]): Promise<Rig> {
  const dir = await Deno.makeTempDir({ prefix: "vstor-hostile-" });
  const config = [];
  for (const d of devices) {
    const file = `${dir}/${d.id}.raw`;
    await Deno.writeFile(file, new Uint8Array(1 << 20));
    config.push({ queueSize: 64, drive: { file, format: "raw" }, ...d });
  }
  const machine = await Machine.create({ memoryMiB: 32, devices: config });
  let vcpu: VcpuHandle;
  try {
    vcpu = await machine.startVcpu(VCPU);
  } catch (error) {
    await machine.shutdown();
    throw error;
  }
  const find = (id: string) => {
    const i = machine.devices.findIndex((x) => x.id === id);
    assert.ok(i >= 0, `device ${id}`);
    return i;
  };
  return {
    machine,
    vcpu,
    dir,
    slot: (id) => machine.devices[find(id)]!.slot,
    index: find,
    ask: <T>(r: HostileRequest) => within(vcpu.request(r, STEP_MS), STEP_MS, r.op) as Promise<T>,
    close: async () => {
      try {
        await machine.shutdown();
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    },
  };
}

/** Writes `seed`'s pattern at `sector` through virtio-blk and reads it back. */
async function blkRoundTrip(r: Rig, id: string, sector: number, seed: number): Promise<void> {
  const slot = r.slot(id);
  const w = await r.ask<IoResult>({ op: "blk", slot, write: true, sector, bytes: 4096, seed });
  assert.equal(w.status, 0, `${id}: write status`);
  const rd = await r.ask<IoResult>({ op: "blk", slot, write: false, sector, bytes: 4096, seed });
  assert.equal(rd.status, 0, `${id}: read status`);
  assert.ok(rd.match, `${id}: the bytes read back are the ones written`);
}

/** Reads `seed`'s pattern at `sector` through virtio-blk. */
async function blkReadBack(r: Rig, id: string, sector: number, seed: number): Promise<void> {
  const slot = r.slot(id);
  const rd = await r.ask<IoResult>({ op: "blk", slot, write: false, sector, bytes: 4096, seed });
  assert.equal(rd.status, 0, `${id}: read status`);
  assert.ok(rd.match, `${id}: sector ${sector} holds what was written before`);
}

/** Writes `seed`'s pattern at `lba` through virtio-scsi and reads it back. */
async function scsiRoundTrip(r: Rig, id: string, lba: number, seed: number): Promise<void> {
  const slot = r.slot(id);
  const w = await r.ask<IoResult>({ op: "scsi", slot, write: true, lba, blocks: 8, seed });
  assert.deepEqual([w.status, w.scsiStatus], [0, 0], `${id}: WRITE(10)`);
  const rd = await r.ask<IoResult>({ op: "scsi", slot, write: false, lba, blocks: 8, seed });
  assert.deepEqual([rd.status, rd.scsiStatus], [0, 0], `${id}: READ(10)`);
  assert.ok(rd.match, `${id}: the bytes read back are the ones written`);
}

/**
 * After the break: the config interrupt came, the status shows NEEDS_RESET, the iothread reported
 * the `fault` (and nothing else), and the machine is fine.
 */
async function expectNeedsReset(r: Rig, id: string, fault: string, faults = 1): Promise<void> {
  const slot = r.slot(id);
  const config = await r.ask<boolean>({ op: "wait-config", slot, timeoutMs: CONFIG_WAIT_MS });
  assert.equal(r.machine.error, null, "the machine recorded no error");
  assert.equal(config, true, `${id}: a config interrupt`);
  const status = await r.ask<number>({ op: "status", slot });
  assert.equal(status & VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_CONFIG_S_NEEDS_RESET, `${id}: status`);
  await eventually(
    () => r.machine.stats().devices[r.index(id)]!.faults.length >= faults,
    STEP_MS,
    `${id}: the fault report`,
  );
  const stats = r.machine.stats().devices[r.index(id)]!;
  assert.equal(stats.faults.length, faults);
  assert.equal(stats.faults[faults - 1]!.fault, fault);
  assert.equal(stats.thread.faults, faults);
  assert.equal(stats.status & VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_CONFIG_S_NEEDS_RESET);
  assert.equal(r.vcpu.running, true, "the vCPU runs on");
}

/** A reset and re-initialisation of `id`: DRIVER_OK again, NEEDS_RESET gone. */
async function reinit(r: Rig, id: string, queues: number, packed: boolean): Promise<void> {
  const { status } = await r.ask<{ status: number }>({
    op: "init",
    slot: r.slot(id),
    queues,
    queueSize: QUEUE_SIZE,
    packed,
  });
  assert.equal(status & VIRTIO_CONFIG_S_NEEDS_RESET, 0, `${id}: NEEDS_RESET cleared by the reset`);
  assert.equal(status & VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_DRIVER_OK, `${id}: DRIVER_OK`);
}

/** The poll-path break of a ring kind: an index jump (split), a zero-length buffer (packed). */
function pollBreak(packed: boolean): { how: Breakage; fault: string } {
  return packed
    ? { how: "zero-length", fault: "zero-length" }
    : { how: "avail-jump", fault: "avail-idx-jump" };
}

for (const packed of [false, true]) {
  const ring = packed ? "packed" : "split";
  const { how, fault } = pollBreak(packed);

  Deno.test(`A virtio-blk ${ring} ring broken while the iothread polls (no kick) needs a reset; the iothread lives on and another device keeps serving`, async () => {
    const r = await rig([
      { type: "virtio-blk", id: "victim", packed },
      { type: "virtio-blk", id: "bystander", ioeventfd: false },
    ]);
    try {
      await reinit(r, "victim", 1, packed);
      await reinit(r, "bystander", 1, false);
      await blkRoundTrip(r, "victim", 0, 1);
      await blkRoundTrip(r, "bystander", 0, 2);

      // Right after used.idx moved: the iothread is polling (or wakes to poll within a second).
      await r.ask({ op: "break", slot: r.slot("victim"), queue: 0, how, kick: false });
      await expectNeedsReset(r, "victim", fault);
      await blkRoundTrip(r, "bystander", 8, 3);

      await reinit(r, "victim", 1, packed);
      await blkRoundTrip(r, "victim", 16, 4);
      await blkReadBack(r, "victim", 0, 1);
      await r.machine.sync();
      const [victim, bystander] = r.machine.stats().devices;
      assert.equal(victim!.thread.activations, 2);
      assert.equal(victim!.thread.faults, 1);
      assert.deepEqual(bystander!.faults, []);
      assert.equal(r.machine.error, null);
    } finally {
      await r.close();
    }
  });

  Deno.test(`A virtio-blk ${ring} ring broken and kicked needs a reset, also with a buffer outside guest RAM`, async () => {
    const r = await rig([
      // Without polling the iothread looks at the ring only when kicked.
      { type: "virtio-blk", id: "victim", packed, poll: false },
      { type: "virtio-blk", id: "bystander" },
    ]);
    try {
      const slot = r.slot("victim");
      await reinit(r, "victim", 1, packed);
      await reinit(r, "bystander", 1, false);
      await blkRoundTrip(r, "victim", 0, 1);

      await r.ask({ op: "break", slot, queue: 0, how, kick: true });
      await expectNeedsReset(r, "victim", fault);
      await blkRoundTrip(r, "bystander", 0, 2);
      await reinit(r, "victim", 1, packed);
      await blkRoundTrip(r, "victim", 8, 3);

      // A GuestMemoryError in the chain walk is a ring fault like any other.
      await r.ask({ op: "break", slot, queue: 0, how: "outside-ram", kick: true });
      await expectNeedsReset(r, "victim", "outside-ram", 2);
      await blkRoundTrip(r, "bystander", 8, 4);
      await reinit(r, "victim", 1, packed);
      await blkRoundTrip(r, "victim", 16, 5);
      await blkReadBack(r, "victim", 0, 1);
      assert.equal(r.machine.error, null);
    } finally {
      await r.close();
    }
  });
}

Deno.test("After a reset, a ring broken again on the poll path needs a reset again, and the device recovers again", async () => {
  const r = await rig([
    { type: "virtio-blk", id: "victim" },
    { type: "virtio-blk", id: "bystander" },
  ]);
  try {
    const slot = r.slot("victim");
    await reinit(r, "victim", 1, false);
    await reinit(r, "bystander", 1, false);
    await r.ask({ op: "break", slot, queue: 0, how: "avail-jump", kick: false });
    await expectNeedsReset(r, "victim", "avail-idx-jump");

    // Straight after the new DRIVER_OK, before any request: the fresh queue is watched too.
    await reinit(r, "victim", 1, false);
    await r.ask({ op: "break", slot, queue: 0, how: "avail-jump", kick: false });
    await expectNeedsReset(r, "victim", "avail-idx-jump", 2);
    await blkRoundTrip(r, "bystander", 0, 1);

    await reinit(r, "victim", 1, false);
    await blkRoundTrip(r, "victim", 0, 2);
    const victim = r.machine.stats().devices[r.index("victim")]!;
    assert.equal(victim.thread.activations, 3);
    assert.ok(victim.thread.resets >= 3, "every reset reached the iothread");
    assert.equal(r.machine.error, null);
  } finally {
    await r.close();
  }
});

for (const packed of [false, true]) {
  const ring = packed ? "packed" : "split";

  Deno.test(`A virtio-blk ${ring} ring the driver places outside guest RAM at DRIVER_OK needs a reset; a reset with a proper ring recovers`, async () => {
    const r = await rig([
      { type: "virtio-blk", id: "victim", packed },
      { type: "virtio-blk", id: "bystander" },
    ]);
    try {
      const slot = r.slot("victim");
      await reinit(r, "bystander", 1, false);
      // 2 GiB: far past the 32 MiB of RAM; the iothread builds its queue from it at DRIVER_OK.
      await r.ask({
        op: "init",
        slot,
        queues: 1,
        queueSize: QUEUE_SIZE,
        packed,
        descOverride: 0x8000_0000,
      });
      await expectNeedsReset(r, "victim", "bad-ring-layout");
      await blkRoundTrip(r, "bystander", 0, 1);
      await reinit(r, "victim", 1, packed);
      await blkRoundTrip(r, "victim", 0, 2);
      assert.equal(r.machine.error, null);
    } finally {
      await r.close();
    }
  });
}

for (const packed of [false, true]) {
  const ring = packed ? "packed" : "split";
  const { how, fault } = pollBreak(packed);

  Deno.test(`A virtio-scsi control queue (${ring}) broken without a kick needs a reset of that device only`, async () => {
    const r = await rig([
      { type: "virtio-scsi", id: "victim", packed },
      { type: "virtio-blk", id: "bystander" },
    ]);
    try {
      const slot = r.slot("victim");
      await reinit(r, "victim", 3, packed);
      await reinit(r, "bystander", 1, false);
      await r.ask({ op: "post-events", slot, count: 4 });
      await scsiRoundTrip(r, "victim", 0, 1);
      assert.equal(await r.ask<number>({ op: "tmf", slot }), 0, "ABORT TASK answers OK");

      await r.ask({ op: "break", slot, queue: 0, how, kick: false });
      await expectNeedsReset(r, "victim", fault);
      await blkRoundTrip(r, "bystander", 0, 2);

      await reinit(r, "victim", 3, packed);
      await r.ask({ op: "post-events", slot, count: 4 });
      assert.equal(await r.ask<number>({ op: "tmf", slot }), 0, "the control queue works again");
      await scsiRoundTrip(r, "victim", 16, 3);
      const rd = await r.ask<IoResult>({
        op: "scsi",
        slot,
        write: false,
        lba: 0,
        blocks: 8,
        seed: 1,
      });
      assert.ok(rd.match, "what was written before the fault is still there");
      assert.equal(r.machine.error, null);
    } finally {
      await r.close();
    }
  });

  Deno.test(`A virtio-scsi control queue (${ring}) broken and kicked needs a reset of that device only`, async () => {
    const r = await rig([
      { type: "virtio-scsi", id: "victim", packed, poll: false },
      { type: "virtio-blk", id: "bystander" },
    ]);
    try {
      const slot = r.slot("victim");
      await reinit(r, "victim", 3, packed);
      await reinit(r, "bystander", 1, false);
      await r.ask({ op: "break", slot, queue: 0, how, kick: true });
      await expectNeedsReset(r, "victim", fault);
      await blkRoundTrip(r, "bystander", 0, 1);
      await reinit(r, "victim", 3, packed);
      assert.equal(await r.ask<number>({ op: "tmf", slot }), 0);
      await scsiRoundTrip(r, "victim", 0, 2);
      assert.equal(r.machine.error, null);
    } finally {
      await r.close();
    }
  });
}

for (const packed of [false, true]) {
  const ring = packed ? "packed" : "split";
  const { how, fault } = pollBreak(packed);

  Deno.test(`A virtio-scsi event ring (${ring}) is not polled; broken, it is found when a kick brings a hotplug event, and only that device needs a reset`, async () => {
    const r = await rig([
      // Each event-queue kick brings a hotplug (see scsi_hotplug_device.ts).
      { type: "virtio-scsi-hotplug", id: "victim", packed },
      { type: "virtio-blk", id: "bystander" },
    ]);
    try {
      const slot = r.slot("victim");
      const victim = () => r.machine.stats().devices[r.index("victim")]!;
      const init = { op: "init", slot, queues: 3, queueSize: QUEUE_SIZE, packed } as const;
      await r.ask({ ...init, features: SCSI_HOTPLUG });
      await reinit(r, "bystander", 1, false);
      // A healthy event ring first: the hotplug's event comes back, its interrupt raised through
      // the back-end's hooks (the plug at DRIVER_OK found no buffer: EVENTS_MISSED may be set).
      await hotplugEvent(r, slot);

      // Buffers waiting in the event queue are no work to poll for: it is drained on kicks only.
      await r.ask({ op: "post-events", slot, count: 1 });
      for (let i = 0; i < 20; i++) await scsiRoundTrip(r, "victim", 8 * i, 1 + i);
      await r.machine.sync();
      const eventQueue = victim().queues[1]!;
      assert.ok(
        eventQueue.drains <= eventQueue.kicks + 1,
        `${eventQueue.drains} drains of the event queue for ${eventQueue.kicks} kicks`,
      );

      // A broken event ring nobody needs yet is left alone: the device keeps serving.
      await r.ask({ op: "break", slot, queue: 1, how, kick: false });
      await scsiRoundTrip(r, "victim", 200, 30);
      assert.equal((await r.ask<number>({ op: "status", slot })) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
      assert.deepEqual(victim().faults, []);

      // The kick brings a hotplug, whose event delivery (outside any request) finds the break.
      await r.ask({ op: "kick", slot, queue: 1 });
      await expectNeedsReset(r, "victim", fault);
      assert.equal(victim().faults[0]!.queue, 1, "the fault names the event queue");
      await blkRoundTrip(r, "bystander", 0, 2);

      await r.ask({ ...init, features: SCSI_HOTPLUG });
      await hotplugEvent(r, slot);
      await scsiRoundTrip(r, "victim", 16, 3);
      const rd = await r.ask<IoResult>({
        op: "scsi",
        slot,
        write: false,
        lba: 0,
        blocks: 8,
        seed: 1,
      });
      assert.ok(rd.match, "what was written before the fault is still there");
      assert.equal(r.machine.error, null);
    } finally {
      await r.close();
    }
  });
}
