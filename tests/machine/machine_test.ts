import assert from "node:assert/strict";
import { Machine, MachineError } from "../../src/machine/machine.ts";
import { MachineConfigError } from "../../src/machine/config.ts";
import { registerDeviceType } from "../../src/machine/registry.ts";
import {
  PCI_CAP_ID_MSIX,
  PCI_CAP_ID_VNDR,
  VIRTIO_CONFIG_S_DRIVER_OK,
  VIRTIO_CONFIG_S_NEEDS_RESET,
} from "../../src/virtio/features.ts";
import { openImage } from "../../formats/open.ts";
import { eventually, within } from "../timeout.ts";
import { echoDeviceType } from "./echo_device.ts";
import type { EchoReport, GuestPayload, HostileReport } from "./vcpu_worker.ts";

registerDeviceType(echoDeviceType);

const VCPU = new URL("./vcpu_worker.ts", import.meta.url);
/** No single test may take longer than this, whatever hangs. */
const TEST_LIMIT_MS = 30_000;

function slotOf(machine: Machine, id: string): number {
  const d = machine.devices.find((x) => x.id === id);
  assert.ok(d !== undefined, `device ${id}`);
  return d.slot;
}

Deno.test("A guest on a vCPU Worker enumerates PCI and echoes 10000 requests through ioeventfd and through trapped doorbells, every byte checked", async () => {
  const machine = await Machine.create({
    memoryMiB: 64,
    devices: [
      { type: "echo", id: "fast", ioeventfd: true, numQueues: 2, queueSize: 64 },
      { type: "echo", id: "trap", ioeventfd: false, queueSize: 64 },
      { type: "echo", id: "packed", packed: true, queueSize: 64 },
    ],
  });
  try {
    const fast = slotOf(machine, "fast");
    const trap = slotOf(machine, "trap");
    const packed = slotOf(machine, "packed");
    const payload: GuestPayload = {
      kind: "echo",
      devices: [
        { slot: fast, queues: 2, queueSize: 64, packed: false },
        { slot: trap, queues: 1, queueSize: 64, packed: false },
        { slot: packed, queues: 1, queueSize: 64, packed: true },
      ],
      runs: [
        { slot: fast, queue: 0, requests: 10_000, depth: 16, bytes: 256 },
        { slot: fast, queue: 1, requests: 1_000, depth: 4, bytes: 100 },
        { slot: trap, queue: 0, requests: 10_000, depth: 16, bytes: 256 },
        { slot: packed, queue: 0, requests: 2_000, depth: 16, bytes: 512 },
      ],
      timeoutMs: 5000,
    };
    const vcpu = await machine.startVcpu(VCPU, payload, { timeoutMs: TEST_LIMIT_MS });
    const report = await within(vcpu.result, TEST_LIMIT_MS, "the guest") as EchoReport;

    // Enumeration through exits: ids, and the capability walk QEMU's layout gives.
    assert.deepEqual(report.functions.map((f) => f.slot), [fast, trap, packed]);
    for (const f of report.functions) {
      assert.equal(f.vendorId, 0x1af4);
      assert.equal(f.deviceId, 0x107f);
      assert.deepEqual(f.caps, [PCI_CAP_ID_MSIX, ...new Array(5).fill(PCI_CAP_ID_VNDR)]);
      assert.equal(f.notifyMultiplier, 4);
      assert.ok(f.common >= 0xc000_0000, "BARs in the PCI hole");
    }
    assert.deepEqual(report.results.map((r) => r.requests), [10_000, 1_000, 10_000, 2_000]);

    await machine.sync();
    const stats = machine.stats();
    const [sFast, sTrap, sPacked] = stats.devices;
    assert.ok(sFast && sTrap && sPacked);
    const [rFast0, rFast1, rTrap, rPacked] = report.results;
    assert.ok(rFast0 && rFast1 && rTrap && rPacked);

    // Device-side counters.
    assert.equal(sFast.queues[0]!.chains, 10_000);
    assert.equal(sFast.queues[1]!.chains, 1_000);
    assert.equal(sTrap.queues[0]!.chains, 10_000);
    assert.equal(sPacked.queues[0]!.chains, 2_000);
    for (const d of stats.devices) {
      assert.equal(d.status & VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_DRIVER_OK, d.id);
      assert.deepEqual(d.faults, [], d.id);
      assert.ok(d.queues[0]!.largestBatch >= 1, d.id);
      assert.ok(d.queues[0]!.interrupts >= 1, d.id);
      assert.equal(d.interrupts.dropped, 0, d.id);
    }

    // Kicks: what the driver sent is what the device saw.
    assert.equal(sFast.queues[0]!.kicks, rFast0.kicks);
    assert.equal(sFast.queues[1]!.kicks, rFast1.kicks);
    assert.equal(sTrap.queues[0]!.kicks, rTrap.kicks);
    assert.equal(sPacked.queues[0]!.kicks, rPacked.kicks);
    assert.equal(sTrap.queues[0]!.driver?.kicks, rTrap.kicks, "the guest's report");
    assert.equal(sTrap.queues[0]!.suppressedKicks, rTrap.suppressedKicks);

    // ioeventfd: no doorbell ever exits; trap: every kick is an exit.
    assert.equal(sFast.queues[0]!.exits, 0);
    assert.equal(sFast.queues[1]!.exits, 0);
    assert.equal(sPacked.queues[0]!.exits, 0);
    assert.equal(sTrap.queues[0]!.exits, sTrap.queues[0]!.kicks);
    assert.ok(sTrap.queues[0]!.kicks > 0);
    assert.equal(
      stats.exits.doorbell,
      sTrap.queues[0]!.kicks,
      "only the trap device's doorbells exit",
    );
    assert.ok(stats.exits.mmio >= stats.exits.doorbell);
    assert.equal(
      stats.exits.ioeventfd,
      rFast0.kicks + rFast1.kicks + rPacked.kicks,
      "every ioeventfd kick rang the doorbell word directly",
    );
    assert.ok(stats.exits.config > 0);
    assert.equal(stats.exits.unclaimed, 0);
  } finally {
    await machine.shutdown();
  }
});

Deno.test("A corrupted descriptor puts one device in NEEDS_RESET with a config interrupt; the other keeps working and a reset recovers", async () => {
  const machine = await Machine.create({
    memoryMiB: 32,
    devices: [
      { type: "echo", id: "victim", queueSize: 64 },
      { type: "echo", id: "bystander", queueSize: 64, ioeventfd: false },
    ],
  });
  try {
    const vcpu = await machine.startVcpu(
      VCPU,
      {
        kind: "hostile",
        victim: slotOf(machine, "victim"),
        bystander: slotOf(machine, "bystander"),
        timeoutMs: 5000,
      } satisfies GuestPayload,
      { timeoutMs: TEST_LIMIT_MS },
    );
    const report = await within(vcpu.result, TEST_LIMIT_MS, "the guest") as HostileReport;
    assert.equal(report.configInterrupt, true, "config interrupt");
    assert.equal(
      report.statusAfterFault & VIRTIO_CONFIG_S_NEEDS_RESET,
      VIRTIO_CONFIG_S_NEEDS_RESET,
    );
    assert.notEqual(report.generationAfter, report.generationBefore, "config_generation moved");
    assert.equal(report.bystanderAfterFault.requests, 200);
    assert.equal(report.victimAfterReset.requests, 100);
    assert.equal(report.statusAfterReset & VIRTIO_CONFIG_S_NEEDS_RESET, 0);

    await eventually(() => machine.stats().devices[0]!.faults.length > 0, 2000, "the fault report");
    await machine.sync();
    const [victim, bystander] = machine.stats().devices;
    assert.ok(victim && bystander);
    assert.equal(victim.faults.length, 1);
    assert.equal(victim.faults[0]!.fault, "next-out-of-range");
    assert.equal(victim.thread.faults, 1);
    assert.ok(victim.thread.resets >= 2, "the driver's resets reached the iothread");
    assert.equal(victim.thread.activations, 2);
    assert.equal(victim.queues[0]!.chains, 200, "counters survive the reset");
    assert.deepEqual(bystander.faults, []);
    assert.equal(bystander.queues[0]!.chains, 300);
  } finally {
    await machine.shutdown();
  }
});

Deno.test("A back-end whose drain fails gives the guest NEEDS_RESET, not a dead iothread", async () => {
  const machine = await Machine.create({
    memoryMiB: 16,
    devices: [{ type: "echo", id: "flaky", queueSize: 16, options: { failDrain: true } }],
  });
  try {
    const vcpu = await machine.startVcpu(
      VCPU,
      {
        kind: "wait-needs-reset",
        slot: slotOf(machine, "flaky"),
        timeoutMs: 5000,
      } satisfies GuestPayload,
      { timeoutMs: TEST_LIMIT_MS },
    );
    const result = await within(vcpu.result, TEST_LIMIT_MS, "the guest") as {
      status: number;
      configInterrupt: boolean;
    };
    assert.equal(result.configInterrupt, true);
    assert.equal(result.status & VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_CONFIG_S_NEEDS_RESET);
    assert.equal(machine.stats().devices[0]!.thread.faults, 1);
    await eventually(() => machine.stats().devices[0]!.faults.length > 0, 2000, "the fault report");
    assert.equal(machine.stats().devices[0]!.faults[0]!.fault, "backend");
    assert.equal(machine.error, null);
  } finally {
    await machine.shutdown();
  }
});

Deno.test("An iothread that crashes rejects the vCPU's result with the device id instead of hanging", async () => {
  const machine = await Machine.create({
    memoryMiB: 16,
    devices: [
      { type: "echo", id: "fine", queueSize: 16 },
      { type: "echo", id: "crashy", queueSize: 16, options: { crashOnActivate: true } },
    ],
  });
  try {
    const vcpu = await machine.startVcpu(
      VCPU,
      {
        kind: "wait-needs-reset",
        slot: slotOf(machine, "crashy"),
        timeoutMs: 10_000,
      } satisfies GuestPayload,
    );
    const error = await within(vcpu.result.then(() => null, (e) => e), 10_000, "the failure");
    assert.ok(error instanceof MachineError, String(error));
    assert.equal(error.deviceId, "crashy");
    assert.match(error.message, /Device "crashy": iothread crashed: .*crashed on purpose/);
    assert.equal(machine.error, error);
    await assert.rejects(machine.pause(), MachineError);
  } finally {
    await machine.shutdown();
  }
});

Deno.test("Machine.create names the bad field or the device that could not start", async () => {
  await assert.rejects(
    Machine.create({ devices: [{ type: "no-such-device", id: "x" }] }),
    (e: unknown) => {
      assert.ok(e instanceof MachineConfigError);
      assert.match(e.message, /devices\[0\]\.type: unknown device type "no-such-device"/);
      return true;
    },
  );
  await assert.rejects(
    Machine.create({
      devices: [{ type: "echo", id: "e", options: { crashOnActivate: "yes", bogus: 1 } }],
    }),
    (e: unknown) => {
      assert.ok(e instanceof MachineConfigError);
      assert.deepEqual(e.issues.map((i) => i.path).sort(), [
        "devices[0].options",
        "devices[0].options.crashOnActivate",
      ]);
      return true;
    },
  );
  await assert.rejects(
    Machine.create({
      devices: [{ type: "echo", id: "e", drives: [{ file: "a" }, { file: "b" }] }],
    }),
    /devices\[0\]\.drives: echo takes 0 to 1 drive, got 2/,
  );
  const missing = `${await Deno.makeTempDir()}/missing.img`;
  await assert.rejects(
    Machine.create({
      devices: [
        { type: "echo", id: "ok" },
        { type: "echo", id: "broken", drive: { file: missing, format: "raw" } },
      ],
    }),
    (e: unknown) => {
      assert.ok(e instanceof MachineError, String(e));
      assert.equal(e.deviceId, "broken");
      assert.match(e.message, /Drive 0 \(.*missing\.img\)/);
      return true;
    },
  );
});

Deno.test("Shutdown flushes and closes the drives in the iothread and releases their locks", async () => {
  const dir = await Deno.makeTempDir();
  const file = `${dir}/log.raw`;
  await Deno.writeFile(file, new Uint8Array(64 * 1024));
  const machine = await Machine.create({
    memoryMiB: 16,
    devices: [{ type: "echo", id: "logger", queueSize: 16, drive: { file, format: "raw" } }],
  });
  let shut = false;
  try {
    assert.equal(machine.devices[0]?.spec.drives[0]?.file, file);
    const slot = slotOf(machine, "logger");
    const vcpu = await machine.startVcpu(
      VCPU,
      {
        kind: "echo",
        devices: [{ slot, queues: 1, queueSize: 16, packed: false }],
        runs: [{ slot, queue: 0, requests: 20, depth: 4, bytes: 512 }],
        timeoutMs: 5000,
      } satisfies GuestPayload,
    );
    await within(vcpu.result, TEST_LIMIT_MS, "the guest");
    await machine.shutdown();
    shut = true;
    assert.equal(machine.state, "shut down");
    const image = await Deno.readFile(file);
    for (let k = 0; k < 512; k++) assert.equal(image[k], (0 * 131 + k * 7 + 1) & 0xff);
    for (let k = 0; k < 512; k++) assert.equal(image[19 * 512 + k], (19 * 131 + k * 7 + 1) & 0xff);
    // The iothread's image lock is gone: the file opens read-write here.
    const node = await openImage(file, { format: "raw" });
    await node.close();
  } finally {
    if (!shut) await machine.shutdown();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("Pause holds the iothreads, resume drains what came meanwhile, reset starts the devices over", async () => {
  const machine = await Machine.create({
    memoryMiB: 16,
    devices: [{ type: "echo", id: "e0", queueSize: 16 }],
  });
  try {
    const slot = slotOf(machine, "e0");
    const vcpu = await machine.startVcpu(VCPU, { kind: "serve" } satisfies GuestPayload);
    await vcpu.request({ op: "init", slot, queueSize: 16, packed: false });
    await vcpu.request({ op: "pingpong", slot, rounds: 10, bytes: 64 });
    await machine.sync();
    assert.equal(machine.stats().devices[0]!.queues[0]!.chains, 10);

    // Kicks the iothread's polling made unnecessary are not counted: compare with before.
    const kicksBefore = machine.stats().devices[0]!.queues[0]!.kicks;
    await machine.pause();
    assert.equal(machine.state, "paused");
    const pending = vcpu.request({ op: "pingpong", slot, rounds: 1, bytes: 64 });
    await new Promise((resolve) => setTimeout(resolve, 100));
    const held = machine.stats().devices[0]!;
    assert.equal(held.queues[0]!.chains, 10, "nothing popped while paused");
    assert.equal(held.queues[0]!.kicks, kicksBefore + 1, "but the kick arrived");
    await machine.resume();
    await within(pending, 5000, "the request held by pause");
    await machine.sync();
    assert.equal(machine.stats().devices[0]!.queues[0]!.chains, 11);

    vcpu.terminate();
    const epoch = machine.stats().devices[0]!.epoch;
    await machine.reset();
    const after = machine.stats().devices[0]!;
    assert.equal(after.status, 0);
    assert.ok(after.epoch > epoch, "a new epoch");
    assert.equal(after.thread.resets >= 1, true);

    // A new vCPU brings the device up again from scratch.
    const again = await machine.startVcpu(VCPU, { kind: "serve" } satisfies GuestPayload);
    await again.request({ op: "init", slot, queueSize: 16, packed: false });
    await again.request({ op: "pingpong", slot, rounds: 5, bytes: 64 });
    await machine.sync();
    assert.equal(machine.stats().devices[0]!.queues[0]!.chains, 16);
  } finally {
    await machine.shutdown();
  }
  await assert.rejects(machine.startVcpu(VCPU), /shut down/);
  await machine.shutdown(); // idempotent
});
