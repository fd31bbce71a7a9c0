import assert from "node:assert/strict";
import {
  featureBit,
  PCI_CAP_ID_MSIX,
  PCI_CAP_ID_VNDR,
  VIRTIO_CONFIG_S_ACKNOWLEDGE,
  VIRTIO_CONFIG_S_DRIVER,
  VIRTIO_CONFIG_S_DRIVER_OK,
  VIRTIO_CONFIG_S_FAILED,
  VIRTIO_CONFIG_S_FEATURES_OK,
  VIRTIO_CONFIG_S_NEEDS_RESET,
  VIRTIO_F_ANY_LAYOUT,
  VIRTIO_F_NOTIFICATION_DATA,
  VIRTIO_F_RING_PACKED,
  VIRTIO_F_RING_RESET,
  VIRTIO_F_VERSION_1,
  VIRTIO_MSI_NO_VECTOR,
  VIRTIO_PCI_CAP_COMMON_CFG,
  VIRTIO_PCI_CAP_DEVICE_CFG,
  VIRTIO_PCI_CAP_ISR_CFG,
  VIRTIO_PCI_CAP_NOTIFY_CFG,
  VIRTIO_PCI_CAP_PCI_CFG,
  VIRTIO_PCI_ISR_CONFIG,
  VIRTIO_PCI_ISR_QUEUE,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from "../../src/virtio/features.ts";
import { VcpuInterrupts } from "../../src/virtio/interrupts.ts";
import {
  PCI_BASE_ADDRESS_0,
  PCI_CAPABILITY_LIST,
  PCI_CLASS_DEVICE,
  PCI_CLASS_PROG,
  PCI_COMMAND,
  PCI_COMMAND_INTX_DISABLE,
  PCI_COMMAND_MASTER,
  PCI_COMMAND_MEMORY,
  PCI_DEVICE_ID,
  PCI_HEADER_TYPE,
  PCI_INTERRUPT_LINE,
  PCI_INTERRUPT_PIN,
  PCI_MSIX_FLAGS,
  PCI_MSIX_FLAGS_ENABLE,
  PCI_MSIX_FLAGS_MASKALL,
  PCI_MSIX_PBA,
  PCI_MSIX_TABLE,
  PCI_REVISION_ID,
  PCI_ROM_ADDRESS,
  PCI_STATUS,
  PCI_STATUS_CAP_LIST,
  PCI_STATUS_INTERRUPT,
  PCI_SUBSYSTEM_ID,
  PCI_SUBSYSTEM_VENDOR_ID,
  PCI_VENDOR_ID,
  VIRTIO_PCI_CFG_CAP_DATA,
  VIRTIO_PCI_COMMON_CFGGENERATION,
  VIRTIO_PCI_COMMON_DF,
  VIRTIO_PCI_COMMON_DFSELECT,
  VIRTIO_PCI_COMMON_GF,
  VIRTIO_PCI_COMMON_GFSELECT,
  VIRTIO_PCI_COMMON_MSIX,
  VIRTIO_PCI_COMMON_NUMQ,
  VIRTIO_PCI_COMMON_Q_DESCHI,
  VIRTIO_PCI_COMMON_Q_DESCLO,
  VIRTIO_PCI_COMMON_Q_ENABLE,
  VIRTIO_PCI_COMMON_Q_MSIX,
  VIRTIO_PCI_COMMON_Q_NOFF,
  VIRTIO_PCI_COMMON_Q_RESET,
  VIRTIO_PCI_COMMON_Q_SELECT,
  VIRTIO_PCI_COMMON_Q_SIZE,
  VIRTIO_PCI_COMMON_STATUS,
  VIRTIO_PCI_DEVICE_CFG_OFFSET,
  VIRTIO_PCI_ISR_CFG_OFFSET,
  VIRTIO_PCI_MODERN_BAR,
  VIRTIO_PCI_MSIX_BAR,
  VIRTIO_PCI_NOTIFY_CFG_OFFSET,
  VirtioPciFunction,
} from "../../src/virtio/pci.ts";
import {
  BAR1_GPA,
  BAR4_GPA,
  commonRead,
  commonWrite,
  FakeModel,
  negotiate,
  programBars,
  readDeviceFeatures,
  RingResetModel,
  setupQueue,
  writeDriverFeatures,
} from "./fake_model.ts";

const V1 = featureBit(VIRTIO_F_VERSION_1);
const STATUS_FEATURES_OK = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER |
  VIRTIO_CONFIG_S_FEATURES_OK;

function make(model = new FakeModel(), msixVectors?: number) {
  const vcpu = new VcpuInterrupts();
  const fn = new VirtioPciFunction({
    model,
    vcpu,
    doorbellMode: "trap",
    ...(msixVectors === undefined ? {} : { msixVectors }),
  });
  return { fn, vcpu, model };
}

/** A programmed function with MSI-X enabled and entry v sending vector 0x40 + v, unmasked. */
function withMsix(model = new FakeModel()) {
  const made = make(model);
  programBars(made.fn);
  for (let v = 0; v < made.fn.msixVectors; v++) {
    made.fn.mmioWrite(VIRTIO_PCI_MSIX_BAR, v * 16, 4, 0xfee0_0000);
    made.fn.mmioWrite(VIRTIO_PCI_MSIX_BAR, v * 16 + 4, 4, 0);
    made.fn.mmioWrite(VIRTIO_PCI_MSIX_BAR, v * 16 + 8, 4, 0x40 + v);
    made.fn.mmioWrite(VIRTIO_PCI_MSIX_BAR, v * 16 + 12, 4, 0);
  }
  const msix = findCap(made.fn, PCI_CAP_ID_MSIX);
  made.fn.configWrite(msix + PCI_MSIX_FLAGS, 2, PCI_MSIX_FLAGS_ENABLE);
  return { ...made, msix };
}

interface Cap {
  at: number;
  id: number;
  type?: number;
}

function walkCaps(fn: VirtioPciFunction): Cap[] {
  const caps: Cap[] = [];
  let at = fn.configRead(PCI_CAPABILITY_LIST, 1) & ~3;
  for (let steps = 0; at !== 0; steps++) {
    assert.ok(steps < 48, "capability list loops");
    assert.ok(at >= 0x40 && at < 0x100, `capability pointer 0x${at.toString(16)}`);
    const id = fn.configRead(at, 1);
    caps.push(id === PCI_CAP_ID_VNDR ? { at, id, type: fn.configRead(at + 3, 1) } : { at, id });
    at = fn.configRead(at + 1, 1) & ~3;
  }
  return caps;
}

function findCap(fn: VirtioPciFunction, id: number, type?: number): number {
  const cap = walkCaps(fn).find((c) => c.id === id && (type === undefined || c.type === type));
  assert.ok(cap !== undefined, `capability ${id}/${type} missing`);
  return cap.at;
}

Deno.test("VirtioPciFunction config space carries the modern virtio identity", () => {
  const { fn } = make();
  assert.equal(fn.configRead(PCI_VENDOR_ID, 2), 0x1af4);
  assert.equal(fn.configRead(PCI_DEVICE_ID, 2), 0x1042);
  assert.equal(fn.configRead(PCI_VENDOR_ID, 4), 0x1042_1af4);
  assert.equal(fn.configRead(PCI_REVISION_ID, 1), 1);
  assert.equal(fn.configRead(PCI_CLASS_PROG, 1), 0);
  assert.equal(fn.configRead(PCI_CLASS_DEVICE, 2), 0x0100);
  assert.equal(fn.configRead(PCI_HEADER_TYPE, 1), 0);
  assert.equal(fn.configRead(PCI_SUBSYSTEM_VENDOR_ID, 2), 0x1af4);
  assert.equal(fn.configRead(PCI_SUBSYSTEM_ID, 2), 0x1100);
  assert.equal(fn.configRead(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST, PCI_STATUS_CAP_LIST);
  assert.equal(fn.configRead(PCI_INTERRUPT_PIN, 1), 1);
  assert.equal(fn.configRead(PCI_COMMAND, 2), 0);
  // Read-only identity ignores writes.
  fn.configWrite(PCI_VENDOR_ID, 4, 0);
  assert.equal(fn.configRead(PCI_VENDOR_ID, 4), 0x1042_1af4);
  // Interrupt line is the firmware's scratch register.
  fn.configWrite(PCI_INTERRUPT_LINE, 1, 11);
  assert.equal(fn.configRead(PCI_INTERRUPT_LINE, 1), 11);
});

Deno.test("the capability walk from 0x34 finds every virtio structure in BAR4 and MSI-X in BAR1", () => {
  const { fn } = make(new FakeModel({ numQueues: 3 }));
  const caps = walkCaps(fn);
  assert.deepEqual(caps.map((c) => c.at), [0x98, 0x84, 0x70, 0x60, 0x50, 0x40]);

  const expect: [number, number][] = [
    [VIRTIO_PCI_CAP_COMMON_CFG, 0x0000],
    [VIRTIO_PCI_CAP_ISR_CFG, 0x1000],
    [VIRTIO_PCI_CAP_DEVICE_CFG, 0x2000],
    [VIRTIO_PCI_CAP_NOTIFY_CFG, 0x3000],
  ];
  for (const [type, offset] of expect) {
    const at = findCap(fn, PCI_CAP_ID_VNDR, type);
    assert.equal(fn.configRead(at + 4, 1), VIRTIO_PCI_MODERN_BAR, `bar of cap ${type}`);
    assert.equal(fn.configRead(at + 8, 4), offset, `offset of cap ${type}`);
    assert.equal(fn.configRead(at + 12, 4), 0x1000, `length of cap ${type}`);
    assert.ok(fn.configRead(at + 2, 1) >= 16, "cap_len covers struct virtio_pci_cap");
  }
  const notify = findCap(fn, PCI_CAP_ID_VNDR, VIRTIO_PCI_CAP_NOTIFY_CFG);
  assert.equal(fn.configRead(notify + 2, 1), 20);
  assert.equal(fn.configRead(notify + 16, 4), 4, "notify_off_multiplier");
  const pciCfg = findCap(fn, PCI_CAP_ID_VNDR, VIRTIO_PCI_CAP_PCI_CFG);
  assert.equal(fn.configRead(pciCfg + 2, 1), 20);

  const msix = findCap(fn, PCI_CAP_ID_MSIX);
  assert.equal(fn.configRead(msix + PCI_MSIX_FLAGS, 2), 3, "table size N-1 for 4 vectors");
  assert.equal(fn.configRead(msix + PCI_MSIX_TABLE, 4), 0x0000 | VIRTIO_PCI_MSIX_BAR);
  assert.equal(fn.configRead(msix + PCI_MSIX_PBA, 4), 0x0800 | VIRTIO_PCI_MSIX_BAR);
});

Deno.test("BAR sizing reads back the size masks and a 64-bit BAR4 decodes above 4 GiB", () => {
  const { fn } = make();
  const bars = [0, 1, 2, 3, 4, 5].map((i) => PCI_BASE_ADDRESS_0 + 4 * i);
  assert.equal(fn.configRead(bars[4]!, 4), 0xc, "64-bit prefetchable memory");
  for (const bar of bars) fn.configWrite(bar, 4, 0xffffffff);
  assert.equal(fn.configRead(bars[0]!, 4), 0, "no legacy I/O BAR");
  assert.equal(fn.configRead(bars[1]!, 4), 0xfffff000, "BAR1: 4 KiB, 32-bit memory");
  assert.equal(fn.configRead(bars[2]!, 4), 0);
  assert.equal(fn.configRead(bars[3]!, 4), 0);
  assert.equal(fn.configRead(bars[4]!, 4), 0xffffc00c, "BAR4: 16 KiB, 64-bit prefetchable");
  assert.equal(fn.configRead(bars[5]!, 4), 0xffffffff, "BAR4's high half");
  fn.configWrite(PCI_ROM_ADDRESS, 4, 0xffffffff);
  assert.equal(fn.configRead(PCI_ROM_ADDRESS, 4), 0, "no expansion ROM");

  // A sizing pattern left in a BAR never decodes.
  fn.configWrite(PCI_COMMAND, 2, PCI_COMMAND_MEMORY);
  assert.equal(fn.barAddress(VIRTIO_PCI_MSIX_BAR), null);
  assert.equal(fn.barAddress(VIRTIO_PCI_MODERN_BAR), null);

  programBars(fn);
  assert.equal(fn.configRead(bars[4]!, 4), 0x0000000c);
  assert.equal(fn.configRead(bars[5]!, 4), 8);
  assert.deepEqual(fn.barRegions(), [
    { bar: 1, gpa: BAR1_GPA, size: 0x1000 },
    { bar: 4, gpa: BAR4_GPA, size: 0x4000 },
  ]);
  assert.deepEqual(fn.findBar(BAR4_GPA + 0x3004), { bar: 4, offset: 0x3004 });
  assert.deepEqual(fn.findBar(BAR1_GPA + 0x800), { bar: 1, offset: 0x800 });
  assert.equal(fn.findBar(BAR4_GPA + 0x4000), null);
  assert.equal(fn.notifyAddress(1), BAR4_GPA + 0x3004);
  assert.equal(fn.notifyAddress(2), null, "no queue 2");

  // Memory space disabled: nothing decodes and BAR accesses master-abort.
  fn.configWrite(PCI_COMMAND, 2, PCI_COMMAND_MASTER);
  assert.equal(fn.findBar(BAR4_GPA), null);
  assert.equal(fn.notifyAddress(0), null);
  assert.equal(fn.mmioRead(VIRTIO_PCI_MODERN_BAR, VIRTIO_PCI_COMMON_NUMQ, 2), 0xffff);
  fn.mmioWrite(VIRTIO_PCI_MODERN_BAR, VIRTIO_PCI_COMMON_STATUS, 1, 1);
  fn.configWrite(PCI_COMMAND, 2, PCI_COMMAND_MEMORY);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_STATUS, 1), 0, "the write was dropped");
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_NUMQ, 2), 2);
});

Deno.test("a 32-bit BAR1 that would reach 4 GiB does not decode", () => {
  const { fn } = make();
  fn.configWrite(PCI_BASE_ADDRESS_0 + 4, 4, 0xfffff000);
  fn.configWrite(PCI_COMMAND, 2, PCI_COMMAND_MEMORY);
  assert.equal(fn.barAddress(VIRTIO_PCI_MSIX_BAR), null);
  fn.configWrite(PCI_BASE_ADDRESS_0 + 4, 4, 0xffffe000);
  assert.equal(fn.barAddress(VIRTIO_PCI_MSIX_BAR), 0xffffe000);
});

Deno.test("the driver init sequence negotiates features, sets up queues and activates at DRIVER_OK", () => {
  const deviceFeatures = featureBit(VIRTIO_RING_F_INDIRECT_DESC) |
    featureBit(VIRTIO_RING_F_EVENT_IDX) | featureBit(9) | featureBit(VIRTIO_F_ANY_LAYOUT) |
    featureBit(VIRTIO_F_NOTIFICATION_DATA) | featureBit(VIRTIO_F_RING_RESET);
  const model = new FakeModel({ numQueues: 2, features: deviceFeatures });
  const { fn } = make(model);
  programBars(fn);

  const offered = readDeviceFeatures(fn);
  assert.equal(
    offered,
    featureBit(VIRTIO_RING_F_INDIRECT_DESC) | featureBit(VIRTIO_RING_F_EVENT_IDX) |
      featureBit(9) | V1,
    "VERSION_1 added; ANY_LAYOUT, NOTIFICATION_DATA and RING_RESET (no hooks) removed",
  );
  commonWrite(fn, VIRTIO_PCI_COMMON_DFSELECT, 4, 2);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_DF, 4), 0, "no feature bits above 63");
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_NUMQ, 2), 2);

  const driverFeatures = featureBit(VIRTIO_RING_F_EVENT_IDX) | V1;
  assert.equal(negotiate(fn, driverFeatures), STATUS_FEATURES_OK);
  commonWrite(fn, VIRTIO_PCI_COMMON_GFSELECT, 4, 1);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_GF, 4), 1, "driver_feature reads back");

  commonWrite(fn, VIRTIO_PCI_COMMON_MSIX, 2, 2);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_MSIX, 2), 2);
  commonWrite(fn, VIRTIO_PCI_COMMON_Q_SELECT, 2, 0);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_Q_SIZE, 2), 256, "queue_size starts at the max");
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_Q_MSIX, 2), VIRTIO_MSI_NO_VECTOR);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_Q_ENABLE, 2), 0);
  setupQueue(fn, 0, {
    size: 128,
    desc: 0x1_0000_2000,
    driver: 0x1_0000_3000,
    device: 0x1_0000_4000,
    vector: 0,
  });
  setupQueue(fn, 1, { size: 64, desc: 0x10000, driver: 0x10400, device: 0x10500, vector: 1 });
  commonWrite(fn, VIRTIO_PCI_COMMON_Q_SELECT, 2, 1);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_Q_NOFF, 2), 1);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_Q_ENABLE, 2), 1);
  commonWrite(fn, VIRTIO_PCI_COMMON_Q_SELECT, 2, 0);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_Q_DESCLO, 4), 0x2000);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_Q_DESCHI, 4), 1);
  assert.equal(model.activations.length, 0, "nothing runs before DRIVER_OK");

  commonWrite(fn, VIRTIO_PCI_COMMON_STATUS, 1, STATUS_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
  assert.equal(
    commonRead(fn, VIRTIO_PCI_COMMON_STATUS, 1),
    STATUS_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK,
  );
  assert.equal(model.activations.length, 1);
  const activation = model.activations[0]!;
  assert.equal(activation.features, driverFeatures);
  assert.equal(activation.epoch, fn.interrupts.epoch);
  assert.deepEqual(activation.queues, [
    {
      index: 0,
      layout: { size: 128, desc: 0x1_0000_2000, driver: 0x1_0000_3000, device: 0x1_0000_4000 },
      msixVector: 0,
      notifyOff: 0,
    },
    {
      index: 1,
      layout: { size: 64, desc: 0x10000, driver: 0x10400, device: 0x10500 },
      msixVector: 1,
      notifyOff: 1,
    },
  ]);

  // A second DRIVER_OK write does not activate again, and features are frozen.
  commonWrite(fn, VIRTIO_PCI_COMMON_STATUS, 1, STATUS_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
  assert.equal(model.activations.length, 1);
  writeDriverFeatures(fn, V1);
  assert.equal(fn.driverFeatures, driverFeatures);
});

Deno.test("only enabled queues are activated", () => {
  const model = new FakeModel({ numQueues: 3 });
  const { fn } = make(model);
  programBars(fn);
  negotiate(fn, V1);
  setupQueue(fn, 1, { size: 16, desc: 0x1000, driver: 0x2000, device: 0x3000, vector: 0 });
  commonWrite(fn, VIRTIO_PCI_COMMON_STATUS, 1, STATUS_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
  assert.deepEqual(model.activations[0]!.queues.map((q) => q.index), [1]);
});

Deno.test("FEATURES_OK is refused without VERSION_1, for a bit not offered, or when the model says no", () => {
  const model = new FakeModel({ features: featureBit(VIRTIO_RING_F_INDIRECT_DESC) });
  const { fn } = make(model);
  programBars(fn);
  const refused = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;

  assert.equal(negotiate(fn, featureBit(VIRTIO_RING_F_INDIRECT_DESC)), refused, "no VERSION_1");
  assert.equal(negotiate(fn, V1 | featureBit(VIRTIO_F_RING_PACKED)), refused, "packed not offered");
  model.accept = (f) => (f & featureBit(VIRTIO_RING_F_INDIRECT_DESC)) === 0n;
  assert.equal(negotiate(fn, V1 | featureBit(VIRTIO_RING_F_INDIRECT_DESC)), refused, "model");

  // Refused: DRIVER_OK cannot follow, and the driver may fix its features and try again.
  commonWrite(fn, VIRTIO_PCI_COMMON_STATUS, 1, refused | VIRTIO_CONFIG_S_DRIVER_OK);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_STATUS, 1), refused);
  assert.equal(model.activations.length, 0);
  writeDriverFeatures(fn, V1);
  commonWrite(fn, VIRTIO_PCI_COMMON_STATUS, 1, STATUS_FEATURES_OK);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_STATUS, 1), STATUS_FEATURES_OK);
});

Deno.test("status bits are only added in order and never cleared except by reset", () => {
  const model = new FakeModel();
  const { fn } = make(model);
  programBars(fn);
  const status = () => commonRead(fn, VIRTIO_PCI_COMMON_STATUS, 1);
  writeDriverFeatures(fn, V1);
  commonWrite(fn, VIRTIO_PCI_COMMON_STATUS, 1, VIRTIO_CONFIG_S_DRIVER);
  assert.equal(status(), 0, "DRIVER before ACKNOWLEDGE");
  commonWrite(fn, VIRTIO_PCI_COMMON_STATUS, 1, VIRTIO_CONFIG_S_ACKNOWLEDGE);
  commonWrite(
    fn,
    VIRTIO_PCI_COMMON_STATUS,
    1,
    VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK,
  );
  assert.equal(status(), VIRTIO_CONFIG_S_ACKNOWLEDGE, "FEATURES_OK and DRIVER_OK before DRIVER");
  commonWrite(fn, VIRTIO_PCI_COMMON_STATUS, 1, VIRTIO_CONFIG_S_DRIVER);
  assert.equal(status(), VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER, "kept ACKNOWLEDGE");
  commonWrite(fn, VIRTIO_PCI_COMMON_STATUS, 1, STATUS_FEATURES_OK | VIRTIO_CONFIG_S_NEEDS_RESET);
  assert.equal(status(), STATUS_FEATURES_OK, "the driver cannot set DEVICE_NEEDS_RESET");
  commonWrite(fn, VIRTIO_PCI_COMMON_STATUS, 1, STATUS_FEATURES_OK | VIRTIO_CONFIG_S_FAILED);
  commonWrite(fn, VIRTIO_PCI_COMMON_STATUS, 1, STATUS_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
  assert.equal(status(), STATUS_FEATURES_OK | VIRTIO_CONFIG_S_FAILED, "no DRIVER_OK after FAILED");
  assert.equal(model.activations.length, 0);
});

Deno.test("writing 0 to device_status resets features, queues, vectors, ISR and the model", () => {
  const { fn, model, msix } = withMsix(new FakeModel());
  negotiate(fn, V1);
  const resetsAfterNegotiate = model.resets;
  commonWrite(fn, VIRTIO_PCI_COMMON_MSIX, 2, 2);
  setupQueue(fn, 0, { size: 32, desc: 0x1000, driver: 0x2000, device: 0x3000, vector: 0 });
  commonWrite(fn, VIRTIO_PCI_COMMON_STATUS, 1, STATUS_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
  fn.interrupts.notifyConfig(); // leaves ISR bit 1 set
  fn.mmioWrite(VIRTIO_PCI_MSIX_BAR, 12, 4, 1); // mask entry 0 ...
  fn.interrupts.notifyQueue(0); // ... so this one is pending in the PBA
  assert.equal(fn.mmioRead(VIRTIO_PCI_MSIX_BAR, 0x800, 4), 1);
  const epoch = fn.interrupts.epoch;
  const wakes = fn.doorbells.wakes;

  commonWrite(fn, VIRTIO_PCI_COMMON_STATUS, 1, 0);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_STATUS, 1), 0);
  assert.equal(model.resets, resetsAfterNegotiate + 1);
  assert.equal(fn.interrupts.epoch, epoch + 1);
  assert.equal(fn.doorbells.wakes, wakes + 1, "the iothread is woken to see the new epoch");
  assert.equal(fn.driverFeatures, 0n);
  commonWrite(fn, VIRTIO_PCI_COMMON_GFSELECT, 4, 1);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_GF, 4), 0);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_GFSELECT, 4), 1);
  commonWrite(fn, VIRTIO_PCI_COMMON_STATUS, 1, 0);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_GFSELECT, 4), 0, "selects reset too");
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_MSIX, 2), VIRTIO_MSI_NO_VECTOR);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_Q_SELECT, 2), 0);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_Q_SIZE, 2), 256);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_Q_ENABLE, 2), 0);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_Q_MSIX, 2), VIRTIO_MSI_NO_VECTOR);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_Q_DESCLO, 4), 0);
  assert.equal(fn.interrupts.isr, 0);
  assert.equal(fn.mmioRead(VIRTIO_PCI_MSIX_BAR, 0x800, 4), 0, "PBA cleared");
  // MSI-X itself is PCI state and survives a virtio reset.
  assert.equal(
    fn.configRead(msix + PCI_MSIX_FLAGS, 2) & PCI_MSIX_FLAGS_ENABLE,
    PCI_MSIX_FLAGS_ENABLE,
  );
  assert.equal(fn.mmioRead(VIRTIO_PCI_MSIX_BAR, 8, 4), 0x40);
});

Deno.test("queue_msix_vector and config_msix_vector read back NO_VECTOR for a vector outside the table", () => {
  const { fn } = make(new FakeModel({ numQueues: 2 }), 3);
  programBars(fn);
  commonWrite(fn, VIRTIO_PCI_COMMON_Q_SELECT, 2, 1);
  commonWrite(fn, VIRTIO_PCI_COMMON_Q_MSIX, 2, 2);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_Q_MSIX, 2), 2);
  commonWrite(fn, VIRTIO_PCI_COMMON_Q_MSIX, 2, 3);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_Q_MSIX, 2), VIRTIO_MSI_NO_VECTOR);
  commonWrite(fn, VIRTIO_PCI_COMMON_Q_MSIX, 2, 0x7ff);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_Q_MSIX, 2), VIRTIO_MSI_NO_VECTOR);
  commonWrite(fn, VIRTIO_PCI_COMMON_MSIX, 2, 9);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_MSIX, 2), VIRTIO_MSI_NO_VECTOR);
  commonWrite(fn, VIRTIO_PCI_COMMON_MSIX, 2, 0);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_MSIX, 2), 0);
  commonWrite(fn, VIRTIO_PCI_COMMON_MSIX, 2, VIRTIO_MSI_NO_VECTOR);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_MSIX, 2), VIRTIO_MSI_NO_VECTOR, "unmapping");
});

Deno.test("queue_size takes smaller powers of 2, packed sizes with RING_PACKED, and nothing after queue_enable", () => {
  const model = new FakeModel({ features: featureBit(VIRTIO_F_RING_PACKED) });
  const { fn } = make(model);
  programBars(fn);
  negotiate(fn, V1);
  const size = () => commonRead(fn, VIRTIO_PCI_COMMON_Q_SIZE, 2);
  commonWrite(fn, VIRTIO_PCI_COMMON_Q_SIZE, 2, 100);
  assert.equal(size(), 256, "split rings need a power of 2");
  commonWrite(fn, VIRTIO_PCI_COMMON_Q_SIZE, 2, 512);
  assert.equal(size(), 256, "larger than the maximum");
  commonWrite(fn, VIRTIO_PCI_COMMON_Q_SIZE, 2, 0);
  assert.equal(size(), 256, "0 would make the queue vanish");
  commonWrite(fn, VIRTIO_PCI_COMMON_Q_SIZE, 2, 64);
  assert.equal(size(), 64);
  commonWrite(fn, VIRTIO_PCI_COMMON_Q_ENABLE, 2, 0);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_Q_ENABLE, 2), 0, "writing 0 does nothing");
  commonWrite(fn, VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1);
  commonWrite(fn, VIRTIO_PCI_COMMON_Q_SIZE, 2, 32);
  commonWrite(fn, VIRTIO_PCI_COMMON_Q_DESCLO, 4, 0x5000);
  assert.equal(size(), 64, "ignored after queue_enable");
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_Q_DESCLO, 4), 0);

  negotiate(fn, V1 | featureBit(VIRTIO_F_RING_PACKED));
  commonWrite(fn, VIRTIO_PCI_COMMON_Q_SIZE, 2, 100);
  assert.equal(size(), 100, "packed rings take any size");

  commonWrite(fn, VIRTIO_PCI_COMMON_Q_SELECT, 2, 7);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_Q_SELECT, 2), 7);
  assert.equal(size(), 0, "a queue that does not exist");
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_Q_MSIX, 2), VIRTIO_MSI_NO_VECTOR);
  commonWrite(fn, VIRTIO_PCI_COMMON_Q_SIZE, 2, 16);
  commonWrite(fn, VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1);
  assert.equal(size(), 0);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_Q_ENABLE, 2), 0);
});

Deno.test("the device config window forwards to the model and reads past configSize return 0", () => {
  const model = new FakeModel();
  model.config.set([0x00, 0x10, 0, 0, 0, 0, 0, 0, 0x12, 0x34, 0x56, 0x78, 0xaa, 0xbb, 0xcc, 0xdd]);
  const { fn } = make(model);
  programBars(fn);
  const base = VIRTIO_PCI_DEVICE_CFG_OFFSET;
  assert.equal(fn.mmioRead(4, base, 4), 0x1000);
  assert.equal(fn.mmioRead(4, base + 8, 4), 0x78563412);
  assert.equal(fn.mmioRead(4, base + 12, 2), 0xbbaa);
  assert.equal(fn.mmioRead(4, base + 15, 1), 0xdd);
  assert.equal(fn.mmioRead(4, base + 16, 4), 0, "past configSize");
  assert.equal(fn.mmioRead(4, base + 0xffc, 4), 0);
  fn.mmioWrite(4, base + 4, 2, 0xbeef);
  assert.deepEqual(model.configWrites, [{ offset: 4, bytes: [0xef, 0xbe] }]);
  fn.mmioWrite(4, base + 16, 4, 1);
  assert.equal(model.configWrites.length, 1, "writes past configSize never reach the model");
});

Deno.test("needsReset sets DEVICE_NEEDS_RESET, bumps config_generation and raises the config vector", () => {
  const { fn, vcpu } = withMsix(new FakeModel());
  negotiate(fn, V1);
  commonWrite(fn, VIRTIO_PCI_COMMON_MSIX, 2, 2);
  commonWrite(fn, VIRTIO_PCI_COMMON_STATUS, 1, STATUS_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
  const generation = commonRead(fn, VIRTIO_PCI_COMMON_CFGGENERATION, 1);

  fn.needsReset();
  assert.equal(
    commonRead(fn, VIRTIO_PCI_COMMON_STATUS, 1),
    STATUS_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_NEEDS_RESET,
  );
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_CFGGENERATION, 1), (generation + 1) & 0xff);
  assert.equal(vcpu.takeNext(), 0x42, "config vector 2 sends 0x42");
  assert.equal(fn.interrupts.isr & VIRTIO_PCI_ISR_CONFIG, VIRTIO_PCI_ISR_CONFIG);

  fn.configChanged();
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_CFGGENERATION, 1), (generation + 2) & 0xff);
  assert.equal(vcpu.takeNext(), 0x42);

  commonWrite(fn, VIRTIO_PCI_COMMON_STATUS, 1, 0);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_STATUS, 1), 0, "reset clears DEVICE_NEEDS_RESET");
});

Deno.test("a model that refuses the rings at DRIVER_OK leaves the device in DEVICE_NEEDS_RESET", () => {
  const model = new FakeModel();
  model.failActivate = true;
  const { fn } = make(model);
  programBars(fn);
  negotiate(fn, V1);
  commonWrite(fn, VIRTIO_PCI_COMMON_STATUS, 1, STATUS_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
  assert.equal(
    commonRead(fn, VIRTIO_PCI_COMMON_STATUS, 1) & VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_CONFIG_S_NEEDS_RESET,
  );
  assert.ok(fn.modelError instanceof Error);
});

Deno.test("a trap-mode notify write counts an exit and bumps the queue's doorbell word", () => {
  const { fn } = make(new FakeModel({ numQueues: 2 }));
  programBars(fn);
  const hit = fn.findBar(fn.notifyAddress(1)!);
  assert.deepEqual(hit, { bar: 4, offset: VIRTIO_PCI_NOTIFY_CFG_OFFSET + 4 });
  const summary = fn.doorbells.summary;
  fn.mmioWrite(hit!.bar, hit!.offset, 2, 1);
  assert.equal(fn.doorbells.value(1), 1);
  assert.equal(fn.doorbells.exits(1), 1);
  assert.equal(fn.doorbells.kicks(0), 0);
  assert.equal(fn.doorbells.summary, summary + 1);
  assert.equal(fn.doorbells.waitAny(summary, 0), summary + 1);

  // Past the last queue, between doorbells, or reading: nothing rings.
  fn.mmioWrite(4, VIRTIO_PCI_NOTIFY_CFG_OFFSET + 8, 2, 2);
  fn.mmioWrite(4, VIRTIO_PCI_NOTIFY_CFG_OFFSET + 0xffc, 4, 1023);
  fn.mmioWrite(4, VIRTIO_PCI_NOTIFY_CFG_OFFSET + 2, 2, 0);
  assert.equal(fn.mmioRead(4, VIRTIO_PCI_NOTIFY_CFG_OFFSET, 2), 0);
  assert.deepEqual(fn.doorbells.stats, { kicks: [0, 1], exits: [0, 1] });
});

Deno.test("the PCI_CFG window reads and writes BAR4 even with memory space disabled", () => {
  const { fn } = make();
  const cap = findCap(fn, PCI_CAP_ID_VNDR, VIRTIO_PCI_CAP_PCI_CFG);
  const window = (bar: number, offset: number, length: number) => {
    fn.configWrite(cap + 4, 1, bar);
    fn.configWrite(cap + 8, 4, offset);
    fn.configWrite(cap + 12, 4, length);
  };
  assert.equal(fn.memoryEnabled, false);
  window(4, VIRTIO_PCI_COMMON_NUMQ, 2);
  assert.equal(fn.configRead(cap + VIRTIO_PCI_CFG_CAP_DATA, 4), 2);
  window(4, VIRTIO_PCI_COMMON_STATUS, 1);
  fn.configWrite(cap + VIRTIO_PCI_CFG_CAP_DATA, 4, VIRTIO_CONFIG_S_ACKNOWLEDGE);
  assert.equal(fn.deviceStatus, VIRTIO_CONFIG_S_ACKNOWLEDGE);
  assert.equal(fn.configRead(cap + VIRTIO_PCI_CFG_CAP_DATA, 1), VIRTIO_CONFIG_S_ACKNOWLEDGE);

  // A window that is misaligned, of a bad length, on a BAR that does not exist, or past the BAR
  // does nothing: the data register keeps what was last written.
  fn.configWrite(cap + VIRTIO_PCI_CFG_CAP_DATA, 4, 0x1234);
  for (const [bar, offset, length] of [[4, 1, 2], [4, 0, 3], [0, 0, 4], [4, 0x4000, 4]]) {
    window(bar!, offset!, length!);
    fn.configWrite(cap + VIRTIO_PCI_CFG_CAP_DATA, 4, 0x1234);
    assert.equal(fn.configRead(cap + VIRTIO_PCI_CFG_CAP_DATA, 4), 0x1234);
  }
  assert.equal(fn.deviceStatus, VIRTIO_CONFIG_S_ACKNOWLEDGE);
});

Deno.test("MSI-X through BAR1: a masked entry or function sets the PBA bit and unmasking delivers", () => {
  const { fn, vcpu, msix } = withMsix(new FakeModel());
  negotiate(fn, V1);
  setupQueue(fn, 0, { size: 16, desc: 0x1000, driver: 0x2000, device: 0x3000, vector: 1 });
  commonWrite(fn, VIRTIO_PCI_COMMON_STATUS, 1, STATUS_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
  const pba = () => fn.mmioRead(VIRTIO_PCI_MSIX_BAR, fn.msixPbaOffset, 4);

  assert.equal(fn.interrupts.notifyQueue(0), true);
  assert.equal(vcpu.takeNext(), 0x41);

  fn.mmioWrite(VIRTIO_PCI_MSIX_BAR, 16 + 12, 4, 1); // mask entry 1
  assert.equal(fn.mmioRead(VIRTIO_PCI_MSIX_BAR, 16 + 12, 4), 1);
  assert.equal(fn.interrupts.notifyQueue(0), false);
  assert.equal(vcpu.pending, false);
  assert.equal(pba(), 0b10);
  fn.mmioWrite(VIRTIO_PCI_MSIX_BAR, 16 + 12, 4, 0);
  assert.equal(vcpu.takeNext(), 0x41, "delivered on unmask");
  assert.equal(pba(), 0);

  fn.configWrite(msix + PCI_MSIX_FLAGS, 2, PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL);
  fn.interrupts.notifyQueue(0);
  assert.equal(vcpu.pending, false);
  assert.equal(pba(), 0b10);
  fn.configWrite(msix + PCI_MSIX_FLAGS, 2, PCI_MSIX_FLAGS_ENABLE);
  assert.equal(vcpu.takeNext(), 0x41, "delivered on function unmask");
  assert.equal(pba(), 0);
  assert.deepEqual(fn.interrupts.stats, { delivered: 3, suppressed: 2, intx: 0, dropped: 0 });
  assert.equal(fn.mmioRead(VIRTIO_PCI_MSIX_BAR, 0x800 + 8, 4), 0, "hole past the PBA");
  assert.equal(fn.mmioRead(VIRTIO_PCI_MSIX_BAR, 0x400, 4), 0, "hole between table and PBA");
});

Deno.test("INTx and ISR read-to-clear when MSI-X is disabled", () => {
  const { fn, vcpu } = make();
  programBars(fn);
  negotiate(fn, V1);
  setupQueue(fn, 0, { size: 16, desc: 0x1000, driver: 0x2000, device: 0x3000, vector: 0 });
  commonWrite(fn, VIRTIO_PCI_COMMON_STATUS, 1, STATUS_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
  const isr = () => fn.mmioRead(VIRTIO_PCI_MODERN_BAR, VIRTIO_PCI_ISR_CFG_OFFSET, 1);
  const interruptStatus = () => fn.configRead(PCI_STATUS, 2) & PCI_STATUS_INTERRUPT;

  assert.equal(fn.interrupts.notifyQueue(0), true);
  assert.equal(vcpu.intxAsserted, true);
  assert.equal(vcpu.waitForInterrupt(0), true);
  assert.equal(vcpu.takeNext(), null, "INTx is not a vector");
  assert.equal(interruptStatus(), PCI_STATUS_INTERRUPT);
  assert.equal(isr(), VIRTIO_PCI_ISR_QUEUE);
  assert.equal(vcpu.intxAsserted, false, "reading the ISR deasserts");
  assert.equal(interruptStatus(), 0);
  assert.equal(isr(), 0, "read-to-clear");

  fn.configChanged();
  assert.equal(vcpu.intxAsserted, true);
  assert.equal(isr(), VIRTIO_PCI_ISR_CONFIG);

  // Interrupt Disable keeps the line low but the status bit still shows the pending interrupt.
  fn.configWrite(PCI_COMMAND, 2, PCI_COMMAND_MEMORY | PCI_COMMAND_INTX_DISABLE);
  fn.interrupts.notifyQueue(0);
  assert.equal(vcpu.intxAsserted, false);
  assert.equal(interruptStatus(), PCI_STATUS_INTERRUPT);
  fn.configWrite(PCI_COMMAND, 2, PCI_COMMAND_MEMORY);
  assert.equal(vcpu.intxAsserted, true, "re-enabling INTx asserts the pending line");

  // Enabling MSI-X takes the function off INTx.
  const msix = findCap(fn, PCI_CAP_ID_MSIX);
  fn.configWrite(msix + PCI_MSIX_FLAGS, 2, PCI_MSIX_FLAGS_ENABLE);
  assert.equal(vcpu.intxAsserted, false);
  assert.equal(fn.interrupts.stats.intx, 3);
});

Deno.test("VIRTIO_F_RING_RESET resets one queue and re-enables it while DRIVER_OK", () => {
  const model = new RingResetModel({ numQueues: 2, features: featureBit(VIRTIO_F_RING_RESET) });
  const { fn } = withMsix(model);
  assert.equal(readDeviceFeatures(fn), featureBit(VIRTIO_F_RING_RESET) | V1);
  negotiate(fn, V1 | featureBit(VIRTIO_F_RING_RESET));
  setupQueue(fn, 0, { size: 16, desc: 0x1000, driver: 0x2000, device: 0x3000, vector: 0 });
  setupQueue(fn, 1, { size: 16, desc: 0x4000, driver: 0x5000, device: 0x6000, vector: 1 });
  commonWrite(fn, VIRTIO_PCI_COMMON_STATUS, 1, STATUS_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);

  commonWrite(fn, VIRTIO_PCI_COMMON_Q_SELECT, 2, 1);
  commonWrite(fn, VIRTIO_PCI_COMMON_Q_RESET, 2, 1);
  assert.deepEqual(model.queueResets, [1]);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_Q_RESET, 2), 0, "reset completed");
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_Q_ENABLE, 2), 0);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_Q_SIZE, 2), 256);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_Q_MSIX, 2), VIRTIO_MSI_NO_VECTOR);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_Q_DESCLO, 4), 0);

  setupQueue(fn, 1, { size: 32, desc: 0x8000, driver: 0x9000, device: 0xa000, vector: 2 });
  assert.deepEqual(model.queueEnables, [{
    index: 1,
    layout: { size: 32, desc: 0x8000, driver: 0x9000, device: 0xa000 },
    msixVector: 2,
    notifyOff: 1,
  }]);
  assert.equal(fn.queueRegisters(0)?.enabled, true, "queue 0 kept running");
});

Deno.test("queue_reset and late queue_enable are ignored without VIRTIO_F_RING_RESET", () => {
  const model = new RingResetModel({ numQueues: 2, features: featureBit(VIRTIO_F_RING_RESET) });
  const { fn } = withMsix(model);
  negotiate(fn, V1);
  setupQueue(fn, 0, { size: 16, desc: 0x1000, driver: 0x2000, device: 0x3000, vector: 0 });
  commonWrite(fn, VIRTIO_PCI_COMMON_STATUS, 1, STATUS_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
  commonWrite(fn, VIRTIO_PCI_COMMON_Q_SELECT, 2, 0);
  commonWrite(fn, VIRTIO_PCI_COMMON_Q_RESET, 2, 1);
  assert.deepEqual(model.queueResets, []);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_Q_ENABLE, 2), 1);
  setupQueue(fn, 1, { size: 16, desc: 0x4000, driver: 0x5000, device: 0x6000, vector: 1 });
  assert.deepEqual(model.queueEnables, []);
  assert.equal(commonRead(fn, VIRTIO_PCI_COMMON_Q_ENABLE, 2), 0);
});

Deno.test("a PCI function reset restores config space, BARs and MSI-X, and resets the device", () => {
  const { fn, model, msix } = withMsix(new FakeModel());
  negotiate(fn, V1);
  const resets = model.resets;
  fn.reset();
  assert.equal(fn.configRead(PCI_COMMAND, 2), 0);
  assert.equal(fn.configRead(PCI_BASE_ADDRESS_0 + 4, 4), 0);
  assert.equal(fn.configRead(PCI_BASE_ADDRESS_0 + 16, 4), 0xc);
  assert.equal(fn.configRead(msix + PCI_MSIX_FLAGS, 2), fn.msixVectors - 1);
  assert.equal(fn.interrupts.message(0)?.masked, true);
  assert.equal(fn.deviceStatus, 0);
  assert.equal(model.resets, resets + 1);
});

/** xorshift32: a repeatable stream of guest garbage. */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}

Deno.test("unaligned, oddly sized and out-of-range accesses never throw and read as hardware would", () => {
  const { fn } = withMsix(new RingResetModel({ numQueues: 3, features: ~0n & 0xffffffffffn }));
  // Fixed expectations first.
  assert.equal(fn.configRead(1, 2), 0xffff, "misaligned config read");
  assert.equal(fn.configRead(2, 4), 0xffffffff);
  assert.equal(fn.configRead(0x100, 4), 0xffffffff, "past conventional config space");
  assert.equal(fn.configRead(0, 3), 0xffffffff, "3-byte access");
  assert.equal(fn.configRead(-4, 4), 0xffffffff);
  assert.equal(fn.configRead(0.5, 1), 0xff);
  fn.configWrite(PCI_COMMAND + 1, 2, 0);
  assert.equal(fn.memoryEnabled, true, "a misaligned write is dropped");
  assert.equal(fn.mmioRead(4, 1, 2), 0xffff, "misaligned MMIO");
  assert.equal(fn.mmioRead(4, 0x4000, 1), 0xff, "past the BAR");
  assert.equal(fn.mmioRead(0, 0, 4), 0xffffffff, "BAR0 does not exist");
  assert.equal(fn.mmioRead(4, VIRTIO_PCI_COMMON_STATUS, 4), 0, "wrong width for a register");
  assert.equal(fn.mmioRead(4, VIRTIO_PCI_COMMON_NUMQ + 40, 2), 0, "past the registers");
  assert.equal(fn.mmioRead(1, 2, 2), 0xffff, "MSI-X table takes DWORDs only");

  const extended = new VirtioPciFunction({
    model: new FakeModel(),
    vcpu: new VcpuInterrupts(),
    configSpaceSize: 4096,
  });
  assert.equal(extended.configRead(0x100, 4), 0, "no extended capabilities");
  assert.equal(extended.configRead(0xffc, 4), 0);
  assert.equal(extended.configRead(0x1000, 4), 0xffffffff);

  const next = rng(0x5eed);
  const sizes = [0, 1, 2, 3, 4, 8, -1, NaN, 1.5];
  const odd = [NaN, -1, 1.5, 2 ** 40, -(2 ** 31), Infinity, 0xffffffff];
  const pick = <T>(list: readonly T[]) => list[next() % list.length]!;
  const offset = (range: number) => {
    const r = next() % 10;
    if (r === 0) return pick(odd);
    return (next() % range) - (r === 1 ? 8 : 0);
  };
  for (let i = 0; i < 50_000; i++) {
    const size = next() % 4 === 0 ? pick(sizes) : pick([1, 2, 4]);
    const value = next() % 8 === 0 ? pick(odd) : next();
    let result: number | undefined;
    switch (next() % 4) {
      case 0:
        result = fn.configRead(offset(0x110), size);
        break;
      case 1:
        // Keep memory space on most of the time so the BAR paths are exercised.
        fn.configWrite(offset(0x110), size, value);
        if (next() % 16 === 0) programBars(fn);
        break;
      case 2:
        result = fn.mmioRead(next() % 8 === 0 ? pick(odd) : next() % 6, offset(0x4100), size);
        break;
      default:
        fn.mmioWrite(next() % 8 === 0 ? pick(odd) : next() % 6, offset(0x4100), size, value);
    }
    if (result !== undefined) {
      assert.ok(Number.isInteger(result) && result >= 0 && result <= 0xffffffff, `read ${result}`);
    }
  }
});
