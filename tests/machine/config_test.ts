import assert from "node:assert/strict";
import {
  HIGH_RAM_START,
  MachineConfigError,
  parseMachineConfig,
  PCI_HOLE_START,
  ramRegions,
} from "../../src/machine/config.ts";

/** The issues `input` earns, as "path: message" lines. */
function problems(input: unknown): string[] {
  try {
    parseMachineConfig(input);
  } catch (e) {
    assert.ok(e instanceof MachineConfigError, String(e));
    return e.issues.map((i) => i.path === "" ? i.message : `${i.path}: ${i.message}`);
  }
  return [];
}

Deno.test("parseMachineConfig applies defaults and folds drive into drives", () => {
  const config = parseMachineConfig({
    devices: [{ type: "virtio-blk", id: "disk0", drive: { file: "a.qcow2" } }],
  });
  assert.deepEqual(config, {
    memoryMiB: 256,
    vcpus: 1,
    exitTimeoutMs: 10_000,
    controlTimeoutMs: 5_000,
    devices: [{
      type: "virtio-blk",
      id: "disk0",
      drives: [{
        id: undefined,
        file: "a.qcow2",
        format: undefined,
        readOnly: false,
        cache: "writeback",
        werror: "enospc",
        rerror: "report",
      }],
      numQueues: 1,
      queueSize: 256,
      eventIdx: true,
      indirect: true,
      packed: false,
      ioeventfd: true,
      poll: true,
      msixVectors: undefined,
      slot: undefined,
      options: {},
    }],
  });
  assert.deepEqual(parseMachineConfig(config), config, "a parsed configuration parses again");
});

Deno.test("parseMachineConfig names the bad field of every issue", () => {
  assert.deepEqual(
    problems({
      devices: [{ type: "virtio-blk", id: "d0" }, { type: "virtio-blk", id: "d1", numQueues: 17 }],
    }),
    ["devices[1].numQueues: must be ≤ 16"],
  );
  assert.deepEqual(
    problems({
      memoryMiB: "64",
      vcpus: 2,
      devices: [{
        type: "virtio-scsi",
        id: "9lives",
        queueSize: 100,
        drives: [{ file: "a" }, { file: "", cache: "nocache", readonly: true }],
        bogus: 1,
      }],
    }),
    [
      "memoryMiB: expected number, got string",
      "vcpus: must be 1 (one vCPU for now)",
      "devices[0].id: must start with a letter and hold only letters, digits, '_', '.', '-' (≤ 64)",
      "devices[0].drives[1].file: must not be empty",
      'devices[0].drives[1].cache: must be one of "writeback", "writethrough", "unsafe", "none", "directsync"',
      'devices[0].drives[1]: unknown field "readonly"',
      "devices[0].queueSize: must be a power of 2",
      'devices[0]: unknown field "bogus"',
    ],
  );
  assert.deepEqual(
    problems({
      memoryMiB: 20_000,
      devices: [
        { type: "virtio-blk", id: "a", slot: 3, queueSize: 2048, numQueues: 0 },
        { type: "virtio-blk", id: "a", slot: 3, drive: { file: "x" }, drives: [] },
      ],
      exitTimeoutMs: 1.5,
    }),
    [
      "memoryMiB: must be ≤ 16384",
      "devices[0].numQueues: must be ≥ 1",
      "devices[0].queueSize: must be ≤ 1024",
      "devices[1].drives: give either drive or drives, not both",
      "exitTimeoutMs: must be an integer",
    ],
  );
  assert.deepEqual(
    problems({
      devices: [{ type: "virtio-blk", id: "a", slot: 3 }, { type: "x", id: "a", slot: 3 }],
    }),
    [
      'devices[1].id: duplicate id "a" (also devices[0])',
      "devices[1].slot: slot 3 is taken by devices[0]",
    ],
  );
  assert.deepEqual(problems(null), ["expected object, got null"]);
  assert.deepEqual(problems({ devices: {} }), ["devices: expected array, got object"]);
  assert.deepEqual(problems({ devices: [{ id: "a" }] }), ["devices[0].type: is required"]);
});

Deno.test("MachineConfigError's message lists every issue", () => {
  assert.throws(
    () => parseMachineConfig({ devices: [{ type: "virtio-blk", id: "d", numQueues: 17 }] }),
    { message: "Invalid machine configuration: devices[0].numQueues: must be ≤ 16" },
  );
  assert.throws(
    () => parseMachineConfig({ vcpus: 2, memoryMiB: 0 }),
    {
      message:
        "Invalid machine configuration:\n  memoryMiB: must be ≥ 1\n  vcpus: must be 1 (one vCPU for now)",
    },
  );
});

Deno.test("ramRegions puts RAM above 3 GiB past the PCI hole, as on a PC", () => {
  assert.deepEqual(ramRegions(64), [{ gpa: 0, size: 64 << 20 }]);
  assert.deepEqual(ramRegions(3072), [{ gpa: 0, size: PCI_HOLE_START }]);
  assert.deepEqual(ramRegions(4096), [
    { gpa: 0, size: PCI_HOLE_START },
    { gpa: HIGH_RAM_START, size: 1024 << 20 },
  ]);
});
