import assert from "node:assert/strict";
import {
  enableFunction,
  PciProbeError,
  probeSlot,
  scanBus,
  virtioStructures,
} from "../../src/guest/pci_probe.ts";
import type { AccessSize, GuestBus } from "../../src/virtio/bus.ts";
import {
  PCI_CAP_ID_MSIX,
  PCI_CAP_ID_VNDR,
  VIRTIO_PCI_CAP_COMMON_CFG,
  VIRTIO_PCI_CAP_DEVICE_CFG,
  VIRTIO_PCI_CAP_ISR_CFG,
  VIRTIO_PCI_CAP_NOTIFY_CFG,
  VIRTIO_PCI_CAP_PCI_CFG,
} from "../../src/virtio/features.ts";
import {
  PCI_BASE_ADDRESS_0,
  PCI_COMMAND,
  PCI_COMMAND_MASTER,
  PCI_COMMAND_MEMORY,
  VIRTIO_PCI_MODERN_BAR_SIZE,
} from "../../src/virtio/pci.ts";
import { FakeModel } from "../virtio/fake_model.ts";
import { FakeBlk, makeMachine, MMIO_WINDOW } from "./harness.ts";

Deno.test("probeSlot() reads identity, BARs, capabilities and virtio structures of a VirtioPciFunction", () => {
  const m = makeMachine(new FakeBlk({ numQueues: 2 }));
  const fn = probeSlot(m.bus, m.slot, { mmioWindow: MMIO_WINDOW });
  assert.ok(fn !== null);
  assert.equal(fn.vendorId, 0x1af4);
  assert.equal(fn.deviceId, 0x1042);
  assert.equal(fn.revision, 1);
  assert.equal(fn.classCode, 0x0100);
  assert.equal(fn.headerType, 0);
  assert.equal(fn.subsystemId, 0x1100);
  assert.equal(fn.interruptPin, 1);

  const bar1 = fn.bars[1]!;
  assert.equal(bar1.kind, "memory32");
  assert.equal(bar1.size, m.fn.msixBarSize);
  assert.equal(bar1.address, m.fn.barAddress(1));
  const bar4 = fn.bars[4]!;
  assert.equal(bar4.kind, "memory64");
  assert.equal(bar4.prefetchable, true);
  assert.equal(bar4.size, VIRTIO_PCI_MODERN_BAR_SIZE);
  assert.equal(bar4.address, m.fn.barAddress(4));
  assert.equal(fn.bars[0], null);
  assert.equal(fn.bars[5], null, "the upper half of a 64-bit BAR is not a BAR");

  // Sizing must leave the BARs where firmware put them, and decoding as it was.
  assert.equal(m.fn.barAddress(4), bar4.address);
  assert.ok(m.fn.memoryEnabled);

  assert.deepEqual(fn.capabilities.map((c) => c.id), [
    PCI_CAP_ID_MSIX,
    PCI_CAP_ID_VNDR,
    PCI_CAP_ID_VNDR,
    PCI_CAP_ID_VNDR,
    PCI_CAP_ID_VNDR,
    PCI_CAP_ID_VNDR,
  ]);
  assert.deepEqual(fn.virtioCaps.map((c) => c.cfgType), [
    VIRTIO_PCI_CAP_PCI_CFG,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_COMMON_CFG,
  ]);
  assert.deepEqual(fn.msix, {
    capOffset: 0x98,
    tableSize: 3,
    tableBar: 1,
    tableOffset: 0,
    pbaBar: 1,
    pbaOffset: m.fn.msixPbaOffset,
  });
  assert.deepEqual(fn.problems, []);

  const v = virtioStructures(fn);
  assert.equal(v.virtioId, 2);
  assert.equal(v.commonAddress, bar4.address);
  assert.equal(v.isrAddress, bar4.address + 0x1000);
  assert.equal(v.deviceAddress, bar4.address + 0x2000);
  assert.equal(v.notifyAddress, bar4.address + 0x3000);
  assert.equal(v.notify.multiplier, 4);
  assert.equal(v.notifyAddress, m.fn.notifyAddress(0));
});

Deno.test("scanBus() finds the plugged slots only", () => {
  const m = makeMachine(new FakeModel(), { slot: 7 });
  const scan = scanBus(m.bus);
  assert.deepEqual(scan.functions.map((f) => f.slot), [7]);
  assert.deepEqual(scan.errors, []);
});

Deno.test("enableFunction() turns on memory decoding and bus mastering", () => {
  const m = makeMachine(new FakeModel());
  m.fn.configWrite(PCI_COMMAND, 2, 0);
  enableFunction(m.bus, m.slot);
  const command = m.fn.configRead(PCI_COMMAND, 2);
  assert.equal(command & (PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER), 6);
});

// ---- Hostile devices -------------------------------------------------------------------------------

/**
 * A bus with one function whose configuration space is plain bytes the test writes: BAR registers
 * answer a sizing write with the mask the test chose. MMIO reads all-ones.
 */
class RawConfigBus implements GuestBus {
  readonly cfg = new Uint8Array(256);
  readonly view = new DataView(this.cfg.buffer);
  /** Sizing mask each BAR register reads after all-ones is written (undefined: read-only 0). */
  readonly masks: (number | undefined)[] = new Array(6);
  readonly #sizing = new Set<number>();
  configReads = 0;
  readonly slot = 5;

  constructor() {
    const v = this.view;
    v.setUint16(0, 0x1af4, true);
    v.setUint16(2, 0x1042, true);
    v.setUint8(8, 1);
    v.setUint16(0x0a, 0x0100, true);
    v.setUint16(6, 0x10, true); // capability list present
  }

  configRead(slot: number, offset: number, size: AccessSize): number {
    this.configReads++;
    if (this.configReads > 100_000) throw new Error("the probe does not terminate");
    if (slot !== this.slot) return size === 4 ? 0xffffffff : size === 2 ? 0xffff : 0xff;
    const bar = (offset - PCI_BASE_ADDRESS_0) / 4;
    if (size === 4 && Number.isInteger(bar) && bar >= 0 && bar < 6 && this.#sizing.has(bar)) {
      return this.masks[bar] ?? 0;
    }
    if (size === 1) return this.view.getUint8(offset);
    if (size === 2) return this.view.getUint16(offset, true);
    return this.view.getUint32(offset, true);
  }

  configWrite(slot: number, offset: number, size: AccessSize, value: number): void {
    if (slot !== this.slot) return;
    const bar = (offset - PCI_BASE_ADDRESS_0) / 4;
    if (size === 4 && Number.isInteger(bar) && bar >= 0 && bar < 6) {
      if (value >>> 0 === 0xffffffff) this.#sizing.add(bar);
      else {
        this.#sizing.delete(bar);
        this.view.setUint32(offset, value >>> 0, true);
      }
      return;
    }
    if (size === 2) this.view.setUint16(offset, value, true);
    else if (size === 1) this.view.setUint8(offset, value);
    else this.view.setUint32(offset, value >>> 0, true);
  }

  mmioRead(_gpa: number, size: AccessSize): number {
    return size === 4 ? 0xffffffff : size === 2 ? 0xffff : 0xff;
  }
  mmioWrite(): void {}
  ioRead(): number {
    return 0xffffffff;
  }
  ioWrite(): void {}

  /** A 64-bit memory BAR at `index` of `size` bytes placed at `address`. */
  bar64(index: number, address: number, size: number): void {
    this.view.setUint32(PCI_BASE_ADDRESS_0 + 4 * index, (address >>> 0) | 0xc, true);
    this.view.setUint32(PCI_BASE_ADDRESS_0 + 4 * index + 4, Math.floor(address / 2 ** 32), true);
    this.masks[index] = (~(size - 1) & ~0xf) >>> 0 | 0xc;
    this.masks[index + 1] = 0xffffffff;
  }

  /** Writes a virtio vendor capability at `at` linking to `next`. */
  virtioCap(at: number, next: number, type: number, bar: number, offset: number, length: number) {
    const v = this.view;
    v.setUint8(at, PCI_CAP_ID_VNDR);
    v.setUint8(at + 1, next);
    v.setUint8(at + 2, type === VIRTIO_PCI_CAP_NOTIFY_CFG ? 20 : 16);
    v.setUint8(at + 3, type);
    v.setUint8(at + 4, bar);
    v.setUint32(at + 8, offset, true);
    v.setUint32(at + 12, length, true);
    if (type === VIRTIO_PCI_CAP_NOTIFY_CFG) v.setUint32(at + 16, 4, true);
  }

  /** A sane modern layout: BAR4 64-bit 16 KiB, COMMON → ISR → DEVICE → NOTIFY from 0x40. */
  sane(): this {
    this.bar64(4, 0xc000_0000, 0x4000);
    this.view.setUint8(0x34, 0x40);
    this.virtioCap(0x40, 0x50, VIRTIO_PCI_CAP_COMMON_CFG, 4, 0, 0x1000);
    this.virtioCap(0x50, 0x60, VIRTIO_PCI_CAP_ISR_CFG, 4, 0x1000, 0x1000);
    this.virtioCap(0x60, 0x70, VIRTIO_PCI_CAP_DEVICE_CFG, 4, 0x2000, 0x1000);
    this.virtioCap(0x70, 0x00, VIRTIO_PCI_CAP_NOTIFY_CFG, 4, 0x3000, 0x1000);
    return this;
  }
}

function probeError(bus: RawConfigBus): PciProbeError {
  try {
    const fn = probeSlot(bus, bus.slot);
    assert.ok(fn !== null);
    virtioStructures(fn);
  } catch (error) {
    assert.ok(error instanceof PciProbeError, String(error));
    assert.equal(error.slot, bus.slot);
    return error;
  }
  assert.fail("expected a PciProbeError");
}

Deno.test("probe of a sane raw layout succeeds (the baseline of the hostile cases)", () => {
  const bus = new RawConfigBus().sane();
  const fn = probeSlot(bus, bus.slot)!;
  const v = virtioStructures(fn);
  assert.equal(v.commonAddress, 0xc000_0000);
  assert.equal(v.notify.multiplier, 4);
  assert.equal(fn.msix, null);
});

Deno.test("a capability list that loops is an error, not a hang", () => {
  const bus = new RawConfigBus().sane();
  bus.view.setUint8(0x71, 0x50); // NOTIFY → ISR again
  assert.match(probeError(bus).message, /slot 5: capability list loops back to 0x50/);
});

Deno.test("a capability pointing at itself is an error", () => {
  const bus = new RawConfigBus().sane();
  bus.view.setUint8(0x41, 0x40);
  assert.match(probeError(bus).message, /loops back to 0x40/);
});

Deno.test("a capability pointer into the header is out of range", () => {
  const bus = new RawConfigBus().sane();
  bus.view.setUint8(0x61, 0x20);
  assert.match(probeError(bus).message, /capability pointer 0x20 is outside 0x40\.\.0xff/);
});

Deno.test("a 48-entry capability chain is walked; a 49th entry is refused", () => {
  const bus = new RawConfigBus();
  bus.view.setUint8(0x34, 0x40);
  for (let at = 0x40; at <= 0xfc; at += 4) {
    bus.view.setUint8(at, 0x05); // MSI, not decoded
    bus.view.setUint8(at + 1, at === 0xfc ? 0x40 : at + 4);
  }
  assert.match(probeError(bus).message, /capability list is longer than 48 entries/);
  bus.view.setUint8(0xfd, 0);
  const fn = probeSlot(bus, bus.slot)!;
  assert.equal(fn.capabilities.length, 48);
});

Deno.test("a virtio capability too short for its type is an error", () => {
  const bus = new RawConfigBus().sane();
  bus.view.setUint8(0x72, 16); // NOTIFY needs 20 bytes
  assert.match(
    probeError(bus).message,
    /virtio capability at 0x70 \(type 2\) has length 16, needs 20/,
  );
});

Deno.test("a virtio capability running past config space is an error", () => {
  const bus = new RawConfigBus().sane();
  bus.cfg.set([PCI_CAP_ID_VNDR, 0, 16, VIRTIO_PCI_CAP_DEVICE_CFG], 0xf8);
  bus.view.setUint8(0x71, 0xf8);
  assert.match(probeError(bus).message, /at 0xf8 .* has length 16/);
});

Deno.test("BAR garbage: a non-contiguous sizing mask", () => {
  const bus = new RawConfigBus().sane();
  bus.masks[4] = 0xfff0_3f0c; // holes in the writable bits
  assert.match(probeError(bus).message, /BAR 4 sizing mask 0x[0-9a-f]+ is not contiguous/);
});

Deno.test("BAR garbage: an address not aligned to the BAR size", () => {
  const bus = new RawConfigBus().sane();
  bus.view.setUint32(PCI_BASE_ADDRESS_0 + 16, 0xc000_1000 | 0xc, true);
  assert.match(
    probeError(bus).message,
    /BAR 4 address 0xc0001000 is not aligned to its size 0x4000/,
  );
});

Deno.test("BAR garbage: a 64-bit BAR in the last register", () => {
  const bus = new RawConfigBus().sane();
  bus.view.setUint32(PCI_BASE_ADDRESS_0 + 16, 0xc000_0000, true); // BAR4 now 32-bit
  bus.masks[4] = 0xffff_c000;
  bus.view.setUint32(PCI_BASE_ADDRESS_0 + 20, 0x4, true);
  bus.masks[5] = 0xffff_c004;
  assert.match(probeError(bus).message, /BAR 5 is 64-bit but has no upper register/);
});

Deno.test("BAR garbage: a reserved memory type", () => {
  const bus = new RawConfigBus().sane();
  bus.view.setUint32(PCI_BASE_ADDRESS_0, 0x6, true);
  bus.masks[0] = 0xffff_f006;
  assert.match(probeError(bus).message, /BAR 0 has reserved memory type 3/);
});

Deno.test("BAR garbage: a BAR outside the firmware's MMIO window", () => {
  const bus = new RawConfigBus().sane();
  bus.bar64(4, 0x8_0000_0000, 0x4000);
  const error = (() => {
    try {
      probeSlot(bus, bus.slot, { mmioWindow: MMIO_WINDOW });
    } catch (e) {
      return e;
    }
  })();
  assert.ok(error instanceof PciProbeError);
  assert.match(error.message, /BAR 4 at 0x800000000\+0x4000 is outside the MMIO window/);
});

Deno.test("a virtio structure past the end of its BAR is an error", () => {
  const bus = new RawConfigBus().sane();
  bus.virtioCap(0x60, 0x70, VIRTIO_PCI_CAP_DEVICE_CFG, 4, 0x3f00, 0x1000);
  assert.match(
    probeError(bus).message,
    /virtio device structure at 0x3f00\+4096 exceeds BAR 4 of 16384 bytes/,
  );
});

Deno.test("a virtio structure in an unimplemented BAR is an error", () => {
  const bus = new RawConfigBus().sane();
  bus.virtioCap(0x40, 0x50, VIRTIO_PCI_CAP_COMMON_CFG, 2, 0, 0x1000);
  assert.match(
    probeError(bus).message,
    /virtio common capability points at no assigned memory BAR/,
  );
  bus.virtioCap(0x40, 0x50, VIRTIO_PCI_CAP_COMMON_CFG, 9, 0, 0x1000);
  assert.match(
    probeError(bus).message,
    /virtio common capability points at no assigned memory BAR/,
  );
});

Deno.test("missing virtio structures are named", () => {
  const bus = new RawConfigBus().sane();
  bus.view.setUint8(0x34, 0x50); // skip COMMON
  assert.match(probeError(bus).message, /virtio common capability is missing/);
});

Deno.test("a bad notify multiplier and a short common structure are errors", () => {
  const bus = new RawConfigBus().sane();
  bus.view.setUint32(0x70 + 16, 3, true);
  assert.match(probeError(bus).message, /notify multiplier 3 is not 0 or a power of 2/);
  const short = new RawConfigBus().sane();
  short.virtioCap(0x40, 0x50, VIRTIO_PCI_CAP_COMMON_CFG, 4, 0, 40);
  assert.match(probeError(short).message, /virtio common structure is 40 bytes, needs at least 56/);
});

Deno.test("an MSI-X table outside its BAR is reported and MSI-X left unused", () => {
  const bus = new RawConfigBus().sane();
  const v = bus.view;
  v.setUint8(0x71, 0x90);
  v.setUint8(0x90, PCI_CAP_ID_MSIX);
  v.setUint8(0x91, 0);
  v.setUint16(0x92, 7, true); // 8 entries
  v.setUint32(0x94, 0x3f80 | 4, true); // table in BAR4 at 0x3f80: 128 bytes fit exactly…
  v.setUint32(0x98, 0x3ff8 | 4, true);
  let fn = probeSlot(bus, bus.slot)!;
  assert.equal(fn.msix?.tableSize, 8);
  v.setUint16(0x92, 8, true); // …9 entries do not
  fn = probeSlot(bus, bus.slot)!;
  assert.equal(fn.msix, null);
  assert.match(fn.problems[0]!, /table at 0x3f80\+144 exceeds BAR 4 of 16384 bytes/);
});

Deno.test("values a bus returns out of width are masked, and an all-ones id is an empty slot", () => {
  const junk: GuestBus = {
    configRead: (_slot, offset) => offset === 0 ? 0xffffffff : 1e15 + 0.5,
    configWrite: () => {},
    mmioRead: () => NaN,
    mmioWrite: () => {},
    ioRead: () => NaN,
    ioWrite: () => {},
  };
  assert.equal(probeSlot(junk, 1), null);
  const scan = scanBus(junk);
  assert.deepEqual(scan.functions, []);
});

Deno.test("scanBus() reports a broken slot and keeps going", () => {
  const bus = new RawConfigBus().sane();
  bus.view.setUint8(0x71, 0x40);
  const scan = scanBus(bus);
  assert.equal(scan.functions.length, 0);
  assert.equal(scan.errors.length, 1);
  assert.match(scan.errors[0]!.message, /PCI slot 5: capability list loops back to 0x40/);
});

Deno.test("a bridge header is refused", () => {
  const bus = new RawConfigBus().sane();
  bus.view.setUint8(0x0e, 0x01);
  assert.match(probeError(bus).message, /header type 1 is not an endpoint/);
});
