import assert from "node:assert/strict";
import {
  type AccessSize,
  type BarHit,
  IO_WINDOW,
  PciBus,
  type PciFunction,
} from "../../src/virtio/bus.ts";
import { PCI_COMMAND, PCI_COMMAND_IO, PCI_COMMAND_MEMORY } from "../../src/virtio/pci_regs.ts";

/**
 * A function with a 16-byte I/O BAR 4, a 4 KiB memory BAR 5 and the fixed ports 0x1f0..0x1f7
 * (decoded only with I/O decoding on), logging what reaches it.
 */
class FakeFunction implements PciFunction {
  readonly cfg = new DataView(new ArrayBuffer(256));
  readonly log: string[] = [];
  readonly #sizes = [0, 0, 0, 0, 16, 4096];

  constructor() {
    this.cfg.setUint32(0x20, 0x1, true); // BAR4: I/O
    this.cfg.setUint32(0x24, 0x0, true); // BAR5: 32-bit memory
  }

  configRead(offset: number, size: number): number {
    if (size === 4) return this.cfg.getUint32(offset, true);
    return size === 2 ? this.cfg.getUint16(offset, true) : this.cfg.getUint8(offset);
  }

  configWrite(offset: number, size: number, value: number): void {
    if (offset >= 0x10 && offset < 0x28 && size === 4) {
      const bar = (offset - 0x10) / 4;
      const io = (this.cfg.getUint32(offset, true) & 1) === 1;
      const mask = ~(this.#sizes[bar]! - 1) >>> 0;
      this.cfg.setUint32(offset, ((value & mask) | (io ? 1 : 0)) >>> 0, true);
      return;
    }
    if (size === 2) this.cfg.setUint16(offset, value, true);
    else if (size === 4) this.cfg.setUint32(offset, value, true);
    else this.cfg.setUint8(offset, value);
  }

  barSize(bar: number): number {
    return this.#sizes[bar] ?? 0;
  }

  findBar(gpa: number): BarHit | null {
    if ((this.configRead(PCI_COMMAND, 2) & PCI_COMMAND_MEMORY) === 0) return null;
    const base = (this.cfg.getUint32(0x24, true) & ~0xf) >>> 0;
    return base !== 0 && gpa >= base && gpa < base + 4096 ? { bar: 5, offset: gpa - base } : null;
  }

  mmioRead(bar: number, offset: number): number {
    this.log.push(`mmio read ${bar}+${offset}`);
    return 0x1234;
  }

  mmioWrite(bar: number, offset: number, _size: number, value: number): void {
    this.log.push(`mmio write ${bar}+${offset}=${value}`);
  }

  findPort(port: number): BarHit | null {
    if ((this.configRead(PCI_COMMAND, 2) & PCI_COMMAND_IO) === 0) return null;
    if (port >= 0x1f0 && port < 0x1f8) return { bar: -1, offset: port - 0x1f0 };
    const base = this.cfg.getUint32(0x20, true) & ~0x3;
    return base !== 0 && port >= base && port < base + 16 ? { bar: 4, offset: port - base } : null;
  }

  ioRead(bar: number, offset: number, size: AccessSize): number {
    this.log.push(`io read ${bar}+${offset}/${size}`);
    return 0x50;
  }

  ioWrite(bar: number, offset: number, size: AccessSize, value: number): void {
    this.log.push(`io write ${bar}+${offset}/${size}=${value}`);
  }
}

Deno.test("PciBus.assignBars() places I/O BARs in the I/O window, turns on I/O decoding, and routes ports", () => {
  const bus = new PciBus();
  const fn = new FakeFunction();
  bus.plug(fn, 1);
  // Before assignment nothing decodes: ports read all-ones and are counted as unclaimed.
  assert.equal(bus.ioRead(0x1f7, 1), 0xff);
  assert.equal(bus.unclaimed, 1);
  bus.assignBars({ base: 0xe000_0000, size: 0x1000_0000 });
  const ioBase = fn.configRead(0x20, 4) & ~0x3;
  assert.ok(ioBase >= IO_WINDOW.base && ioBase + 16 <= IO_WINDOW.base + IO_WINDOW.size);
  assert.equal(ioBase % 16, 0, "naturally aligned");
  assert.equal(fn.configRead(0x20, 4) & 1, 1, "still an I/O BAR");
  assert.equal(
    (fn.configRead(0x24, 4) & ~0xf) >>> 0,
    0xe000_0000,
    "the memory BAR in the MMIO window",
  );
  const command = fn.configRead(PCI_COMMAND, 2);
  assert.equal(
    command & (PCI_COMMAND_IO | PCI_COMMAND_MEMORY),
    PCI_COMMAND_IO | PCI_COMMAND_MEMORY,
  );

  assert.equal(bus.ioRead(0x1f7, 1), 0x50);
  bus.ioWrite(ioBase + 2, 1, 4);
  bus.ioWrite(0x170, 1, 9); // nobody decodes the secondary channel here
  assert.equal(bus.mmioRead(0xe000_0010, 4), 0x1234);
  assert.deepEqual(fn.log, ["io read -1+7/1", "io write 4+2/1=4", "mmio read 5+16"]);
  assert.equal(bus.unclaimed, 2);
});

Deno.test("PciBus.assignBars() refuses I/O BARs that do not fit the I/O window", () => {
  const bus = new PciBus();
  bus.plug(new FakeFunction(), 0);
  assert.throws(
    () => bus.assignBars({ base: 0xe000_0000, size: 0x1000_0000 }, { base: 0xfff8, size: 8 }),
    /do not fit in the I\/O window/,
  );
});
