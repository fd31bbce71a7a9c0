/**
 * An emulated AHCI host bus adapter as QEMU's `ich9-ahci` presents it (Serial ATA AHCI 1.3.1):
 * a PCI function (8086:2922, class 01 06 01) whose BAR5 (ABAR, 4 KiB) holds the generic host
 * control registers and up to six ports, an MSI capability, and INTx when MSI is off. Each port
 * with a disk is an {@linkcode AhciPort}: command lists and tables in guest memory, NCQ, FIS
 * receive — see `ahci_port.ts`.
 *
 * This is the trap-and-emulate middle ground between the IDE controller and virtio: the driver
 * lays its commands out in guest memory (as with a ring), but every register access is a VM exit
 * — one PxCI write (and one PxSACT write for NCQ) per batch of commands, and a read-and-ack
 * sequence of PxIS, IS and PxSACT per interrupt.
 *
 * Interrupts (AHCI 1.3.1 §5.5.3, §10.6.2): an event sets PxIS bits; when `PxIS & PxIE` is
 * non-zero the port's bit in IS is set, and the HBA signals when GHC.IE is set — an MSI message
 * whenever an IS bit goes from 0 to 1 (and again when the guest clears an IS bit whose port still
 * has enabled causes pending, so nothing is lost between the acks), or the INTx line held high
 * while IS is non-zero.
 *
 * Not implemented (registers read 0): command completion coalescing, enclosure management, port
 * multipliers, FIS-based switching, link power management, staggered spin-up, ATAPI, the ICH9
 * index/data pair (BAR4) and the SATA capability that points at it.
 *
 * @module
 */

import type { BlockNode } from "../block/node.ts";
import type { BarHit, PciFunction } from "../virtio/bus.ts";
import type { GuestMemory } from "../virtio/memory.ts";
import {
  PCI_BASE_ADDRESS_0,
  PCI_CACHE_LINE_SIZE,
  PCI_CAPABILITY_LIST,
  PCI_CLASS_DEVICE,
  PCI_CLASS_PROG,
  PCI_COMMAND,
  PCI_COMMAND_INTX_DISABLE,
  PCI_COMMAND_MASTER,
  PCI_COMMAND_MEMORY,
  PCI_COMMAND_PARITY,
  PCI_COMMAND_SERR,
  PCI_CONFIG_SPACE_SIZE,
  PCI_DEVICE_ID,
  PCI_HEADER_TYPE,
  PCI_INTERRUPT_LINE,
  PCI_INTERRUPT_PIN,
  PCI_REVISION_ID,
  PCI_STATUS,
  PCI_STATUS_CAP_LIST,
  PCI_STATUS_INTERRUPT,
  PCI_SUBSYSTEM_ID,
  PCI_SUBSYSTEM_VENDOR_ID,
  PCI_VENDOR_ID,
} from "../virtio/pci_regs.ts";
import {
  AHCI_ABAR,
  AHCI_ABAR_SIZE,
  AHCI_MAX_CMDS,
  AHCI_MAX_PORTS,
  AHCI_MSI_CAP_OFFSET,
  AHCI_PCI_DEVICE_ID_ICH9,
  AHCI_PCI_REVISION,
  AHCI_PORT_BASE,
  AHCI_PORT_SIZE,
  AHCI_VERSION_1_0,
  HOST_AHCI_EN,
  HOST_CAP,
  HOST_CAP_64,
  HOST_CAP_ISS_SHIFT,
  HOST_CAP_NCQ,
  HOST_CAP_NCS_SHIFT,
  HOST_CAP_ONLY,
  HOST_CTL,
  HOST_IRQ_EN,
  HOST_IRQ_STAT,
  HOST_PORTS_IMPL,
  HOST_RESET,
  HOST_VERSION,
  ICH9_MAP,
  MSI_ADDRESS_X86_BASE,
  PCI_CAP_ID_MSI,
  PCI_CLASS_PROG_AHCI,
  PCI_CLASS_STORAGE_SATA,
  PCI_MSI_ADDRESS_HI,
  PCI_MSI_ADDRESS_LO,
  PCI_MSI_DATA_64,
  PCI_MSI_FLAGS,
  PCI_MSI_FLAGS_64BIT,
  PCI_MSI_FLAGS_ENABLE,
} from "../ata/ahci_constants.ts";
import { PCI_VENDOR_ID_INTEL } from "../ata/constants.ts";
import { AhciPort, type AhciPortHost, type AhciStats, emptyAhciStats } from "./ahci_port.ts";

export type { AhciStats } from "./ahci_port.ts";

/** Red Hat's subsystem vendor id, which QEMU gives every PCI device it emulates. */
const PCI_SUBVENDOR_ID_REDHAT_QUMRANET = 0x1af4;
/** QEMU's subsystem id. */
const PCI_SUBDEVICE_ID_QEMU = 0x1100;
const BAR5 = PCI_BASE_ADDRESS_0 + 4 * AHCI_ABAR;
const MSI_CAP = AHCI_MSI_CAP_OFFSET;

/** What an {@linkcode AhciController} is built from. */
export interface AhciControllerInit {
  /** One per port (up to 6, as ICH9); null = no disk on that port. PI has a bit for each. */
  readonly drives: readonly (BlockNode | null)[];
  /** Guest RAM: command lists, FIS areas, command tables, data. */
  readonly memory: GuestMemory;
  /** Delivers an MSI: the vector is the low byte of the data the guest programmed. */
  readonly msi: (vector: number) => void;
  /** Drives the INTx line (INTA#) when MSI is off. */
  readonly intx: (level: boolean) => void;
  /** IDENTIFY model number of every disk (default "QEMU HARDDISK"). */
  readonly model?: string;
  /** IDENTIFY serial number of every disk (default QEMU's "QM0000N", N the port number + 1). */
  readonly serial?: string;
  /** IDENTIFY firmware revision (default QEMU's "2.5+"). */
  readonly firmware?: string;
  /** The disks' volatile write cache at power-on (default true; SET FEATURES changes it). */
  readonly writeCache?: boolean;
  /** Offer DATA SET MANAGEMENT TRIM on writable disks (default true), as QEMU with discard=unmap. */
  readonly discard?: boolean;
}

/**
 * The AHCI HBA: configuration space, ABAR registers, ports, interrupts. Runs on the VMM thread;
 * register accesses are the guest's exits, and the disks' I/O runs asynchronously behind them.
 * Nothing the guest writes makes {@linkcode mmioRead}, {@linkcode mmioWrite},
 * {@linkcode configRead} or {@linkcode configWrite} throw.
 *
 * @example
 * ```ts
 * import { AhciController } from "./ahci.ts";
 * import { GuestMemory } from "../virtio/memory.ts";
 * const ahci = new AhciController({
 *   drives: [null],
 *   memory: new GuestMemory([{ gpa: 0, size: 1 << 20 }]),
 *   msi: () => {},
 *   intx: () => {},
 * });
 * if (ahci.configRead(0, 4) !== 0x2922_8086) throw new Error("not ich9-ahci");
 * ```
 */
export class AhciController implements PciFunction {
  /** The ports, one per drive slot. */
  readonly ports: readonly AhciPort[];
  readonly #init: AhciControllerInit;
  readonly #stats: AhciStats = emptyAhciStats();
  readonly #cfg = new Uint8Array(PCI_CONFIG_SPACE_SIZE);
  readonly #cfgView = new DataView(this.#cfg.buffer);
  readonly #wmask = new Uint8Array(PCI_CONFIG_SPACE_SIZE);
  readonly #cap: number;
  readonly #pi: number;
  #ghc = HOST_AHCI_EN;
  #is = 0;
  #intxHigh = false;
  #work = 0;
  #idleWaiters: (() => void)[] = [];
  #closed = false;

  /**
   * Builds the HBA in its power-on state.
   *
   * @throws {RangeError} for no drives or more than {@linkcode AHCI_MAX_PORTS}
   */
  constructor(init: AhciControllerInit) {
    const n = init.drives.length;
    if (n < 1 || n > AHCI_MAX_PORTS) {
      throw new RangeError(`An ICH9 AHCI controller has 1..${AHCI_MAX_PORTS} ports, not ${n}`);
    }
    this.#init = init;
    this.#cap = (HOST_CAP_64 | HOST_CAP_NCQ | HOST_CAP_ONLY | (1 << HOST_CAP_ISS_SHIFT) |
      ((AHCI_MAX_CMDS - 1) << HOST_CAP_NCS_SHIFT) | (n - 1)) >>> 0;
    this.#pi = (1 << n) - 1;
    const host: AhciPortHost = {
      memory: init.memory,
      stats: this.#stats,
      busMaster: () => (this.#command() & PCI_COMMAND_MASTER) !== 0,
      portInterrupt: (port) => this.#portInterrupt(port),
      workStarted: () => {
        this.#work++;
      },
      workEnded: () => this.#workEnded(),
    };
    this.ports = init.drives.map((drive, index) =>
      new AhciPort(host, {
        index,
        drive,
        model: init.model ?? "QEMU HARDDISK",
        serial: init.serial ?? `QM${String(index + 1).padStart(5, "0")}`,
        firmware: init.firmware ?? "2.5+",
        writeCache: init.writeCache ?? true,
        trim: init.discard ?? true,
      })
    );
    this.#resetConfig();
  }

  /** Counters (live). */
  get stats(): Readonly<AhciStats> {
    return this.#stats;
  }

  /** GHC.IE and IS non-zero: the HBA is asking for an interrupt. */
  get interruptPending(): boolean {
    return (this.#ghc & HOST_IRQ_EN) !== 0 && this.#is !== 0;
  }

  /** The MSI capability is enabled. */
  get msiEnabled(): boolean {
    return (this.#cfgView.getUint16(MSI_CAP + PCI_MSI_FLAGS, true) & PCI_MSI_FLAGS_ENABLE) !== 0;
  }

  /**
   * Power-on reset (PCI RST#): configuration space, HBA and ports back to their initial state.
   * I/O in flight finishes on the disks but is no longer reported.
   */
  reset(): void {
    this.#resetConfig();
    this.#ghc = HOST_AHCI_EN;
    this.#is = 0;
    for (const port of this.ports) port.powerOn();
    this.#updateLine(false);
  }

  /** Resolves once no command's I/O is running and no completion is waiting to be posted. */
  idle(): Promise<void> {
    if (this.#work === 0) return Promise.resolve();
    return new Promise((resolve) => this.#idleWaiters.push(resolve));
  }

  /**
   * Stops taking register writes and waits for I/O in flight. The drives stay open: they belong
   * to whoever opened them.
   */
  async close(): Promise<void> {
    this.#closed = true;
    await this.idle();
  }

  #workEnded(): void {
    if (--this.#work > 0) return;
    const waiters = this.#idleWaiters;
    this.#idleWaiters = [];
    for (const resolve of waiters) resolve();
  }

  // ---- PCI configuration space ----------------------------------------------------------------

  #resetConfig(): void {
    const cfg = this.#cfgView;
    this.#cfg.fill(0);
    this.#wmask.fill(0);
    cfg.setUint16(PCI_VENDOR_ID, PCI_VENDOR_ID_INTEL, true);
    cfg.setUint16(PCI_DEVICE_ID, AHCI_PCI_DEVICE_ID_ICH9, true);
    cfg.setUint16(PCI_STATUS, PCI_STATUS_CAP_LIST, true);
    cfg.setUint8(PCI_REVISION_ID, AHCI_PCI_REVISION);
    cfg.setUint8(PCI_CLASS_PROG, PCI_CLASS_PROG_AHCI);
    cfg.setUint16(PCI_CLASS_DEVICE, PCI_CLASS_STORAGE_SATA, true);
    cfg.setUint8(PCI_CACHE_LINE_SIZE, 0x08);
    cfg.setUint8(PCI_HEADER_TYPE, 0);
    cfg.setUint16(PCI_SUBSYSTEM_VENDOR_ID, PCI_SUBVENDOR_ID_REDHAT_QUMRANET, true);
    cfg.setUint16(PCI_SUBSYSTEM_ID, PCI_SUBDEVICE_ID_QEMU, true);
    cfg.setUint8(PCI_CAPABILITY_LIST, MSI_CAP);
    cfg.setUint8(PCI_INTERRUPT_PIN, 1); // INTA#
    cfg.setUint8(ICH9_MAP, 1 << 6); // SATA mode select: AHCI
    // No I/O BAR: I/O space enable is hardwired 0.
    this.#setWmask(
      PCI_COMMAND,
      2,
      PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_PARITY | PCI_COMMAND_SERR |
        PCI_COMMAND_INTX_DISABLE,
    );
    this.#setWmask(PCI_CACHE_LINE_SIZE, 1, 0xff);
    this.#setWmask(PCI_INTERRUPT_LINE, 1, 0xff);
    // BAR5: 32-bit non-prefetchable memory; address bits below the size read 0.
    this.#setWmask(BAR5, 4, ~(AHCI_ABAR_SIZE - 1) >>> 0);
    // MSI: 64-bit address, one message, no per-vector masking (QEMU's msi_init(dev, 0x80, 1,
    // true, false)).
    cfg.setUint8(MSI_CAP, PCI_CAP_ID_MSI);
    cfg.setUint8(MSI_CAP + 1, 0);
    cfg.setUint16(MSI_CAP + PCI_MSI_FLAGS, PCI_MSI_FLAGS_64BIT, true);
    this.#setWmask(MSI_CAP + PCI_MSI_FLAGS, 2, PCI_MSI_FLAGS_ENABLE);
    this.#setWmask(MSI_CAP + PCI_MSI_ADDRESS_LO, 4, 0xfffffffc);
    this.#setWmask(MSI_CAP + PCI_MSI_ADDRESS_HI, 4, 0xffffffff);
    this.#setWmask(MSI_CAP + PCI_MSI_DATA_64, 2, 0xffff);
  }

  #setWmask(offset: number, size: number, mask: number): void {
    for (let i = 0; i < size; i++) this.#wmask[offset + i] = (mask >>> (8 * i)) & 0xff;
  }

  #command(): number {
    return this.#cfgView.getUint16(PCI_COMMAND, true);
  }

  /** Reads config space; a bad width, misaligned or out-of-range access reads all-ones. */
  configRead(offset: number, size: number): number {
    if (!validAccess(offset, size, PCI_CONFIG_SPACE_SIZE)) return allOnes(size);
    // Interrupt Status follows the HBA's request, as PCI 2.3 defines it (whatever INTx Disable).
    const status = PCI_STATUS_CAP_LIST | (this.interruptPending ? PCI_STATUS_INTERRUPT : 0);
    this.#cfgView.setUint16(PCI_STATUS, status, true);
    const cfg = this.#cfgView;
    if (size === 1) return cfg.getUint8(offset);
    if (size === 2) return cfg.getUint16(offset, true);
    return cfg.getUint32(offset, true);
  }

  /** Writes config space: only the writable bits change; a bad access is dropped. */
  configWrite(offset: number, size: number, value: number): void {
    if (!validAccess(offset, size, PCI_CONFIG_SPACE_SIZE)) return;
    const v = value >>> 0;
    for (let i = 0; i < size; i++) {
      const at = offset + i;
      const mask = this.#wmask[at]!;
      this.#cfg[at] = (this.#cfg[at]! & ~mask) | ((v >>> (8 * i)) & mask);
    }
    // INTx Disable or MSI Enable may have changed which line carries the interrupt.
    this.#updateLine(false);
  }

  /** BAR5 decodes 4 KiB; every other BAR is unimplemented. */
  barSize(bar: number): number {
    return bar === AHCI_ABAR ? AHCI_ABAR_SIZE : 0;
  }

  /** BAR5 when memory decoding is on and `gpa` falls inside it. */
  findBar(gpa: number): BarHit | null {
    if ((this.#command() & PCI_COMMAND_MEMORY) === 0) return null;
    const base = (this.#cfgView.getUint32(BAR5, true) & ~0xf) >>> 0;
    if (base === 0 || gpa < base || gpa >= base + AHCI_ABAR_SIZE) return null;
    return { bar: AHCI_ABAR, offset: gpa - base };
  }

  // ---- ABAR -----------------------------------------------------------------------------------

  /**
   * Reads `size` bytes of the ABAR at `offset`. Byte and word reads of a dword register return
   * its bytes; a read across two registers combines them (no register has read side effects).
   */
  mmioRead(bar: number, offset: number, size: number): number {
    if (bar !== AHCI_ABAR || !validMmio(offset, size) || this.#closed) return allOnes(size);
    this.#stats.registerReads++;
    if ((offset & 3) === 0 && size === 4) return this.#readReg(offset);
    let value = 0;
    for (let i = 0; i < size; i++) {
      const at = offset + i;
      const byte = (this.#readReg(at & ~3) >>> ((at & 3) * 8)) & 0xff;
      value |= byte << (8 * i);
    }
    return value >>> 0;
  }

  /**
   * Writes `size` bytes of the ABAR at `offset`. A narrower write changes only the bytes it
   * covers (write-1-to-clear and write-1-to-set bits only where written); one that straddles two
   * registers is two writes.
   */
  mmioWrite(bar: number, offset: number, size: number, value: number): void {
    if (bar !== AHCI_ABAR || !validMmio(offset, size) || this.#closed) return;
    this.#stats.registerWrites++;
    if ((offset & 3) === 0 && size === 4) return this.#writeReg(offset, value >>> 0, 0xffffffff);
    const end = offset + size;
    for (let reg = offset & ~3; reg < end; reg += 4) {
      let mask = 0;
      let bits = 0;
      for (let at = Math.max(reg, offset); at < Math.min(reg + 4, end); at++) {
        const byte = (value >>> (8 * (at - offset))) & 0xff;
        mask |= 0xff << (8 * (at - reg));
        bits |= byte << (8 * (at - reg));
      }
      this.#writeReg(reg, bits >>> 0, mask >>> 0);
    }
  }

  #readReg(reg: number): number {
    if (reg >= AHCI_PORT_BASE) {
      const port = this.ports[(reg - AHCI_PORT_BASE) >>> 7];
      return port === undefined ? 0 : port.read((reg - AHCI_PORT_BASE) & (AHCI_PORT_SIZE - 1));
    }
    switch (reg) {
      case HOST_CAP:
        return this.#cap;
      case HOST_CTL:
        return this.#ghc >>> 0;
      case HOST_IRQ_STAT:
        return this.#is >>> 0;
      case HOST_PORTS_IMPL:
        return this.#pi;
      case HOST_VERSION:
        return AHCI_VERSION_1_0;
      default:
        return 0; // CCC, enclosure management, CAP2, BOHC, reserved, vendor
    }
  }

  #writeReg(reg: number, value: number, mask: number): void {
    if (reg >= AHCI_PORT_BASE) {
      const port = this.ports[(reg - AHCI_PORT_BASE) >>> 7];
      port?.write((reg - AHCI_PORT_BASE) & (AHCI_PORT_SIZE - 1), value, mask);
      return;
    }
    const bits = value & mask;
    switch (reg) {
      case HOST_CTL: {
        if ((bits & HOST_RESET) !== 0) {
          // HR: the whole HBA resets; HR reads 0 again at once (the reset is instantaneous).
          this.#ghc = HOST_AHCI_EN;
          this.#is = 0;
          for (const port of this.ports) port.hbaReset();
          this.#updateLine(false);
          return;
        }
        const wasEnabled = (this.#ghc & HOST_IRQ_EN) !== 0;
        const ie = ((this.#ghc & ~mask) | bits) & HOST_IRQ_EN;
        // AE is read-only 1 (CAP.SAM); MRSM reads 0.
        this.#ghc = (HOST_AHCI_EN | ie) >>> 0;
        this.#updateLine(!wasEnabled && ie !== 0 && this.#is !== 0);
        return;
      }
      case HOST_IRQ_STAT: {
        this.#is = (this.#is & ~bits) >>> 0;
        // A port whose enabled causes are still pending asks again: nothing is lost between the
        // driver's PxIS and IS writes.
        let again = false;
        for (const port of this.ports) {
          const bit = 1 << port.index;
          if ((bits & bit) !== 0 && port.pending !== 0) {
            this.#is |= bit;
            again = true;
          }
        }
        this.#updateLine(again);
        return;
      }
      default:
        return; // CAP, PI, VS are read-only; the rest is not implemented
    }
  }

  // ---- interrupts -----------------------------------------------------------------------------

  #portInterrupt(index: number): void {
    const port = this.ports[index]!;
    const bit = 1 << index;
    let edge = false;
    if (port.pending !== 0 && (this.#is & bit) === 0) {
      this.#is = (this.#is | bit) >>> 0;
      edge = true;
    }
    this.#updateLine(edge);
  }

  /** Drives INTx from the level, or sends an MSI on a new request (`edge`). */
  #updateLine(edge: boolean): void {
    const level = this.interruptPending;
    if (this.msiEnabled) {
      if (this.#intxHigh) {
        this.#intxHigh = false;
        this.#init.intx(false);
      }
      if (edge && level) this.#sendMsi();
      return;
    }
    const want = level && (this.#command() & PCI_COMMAND_INTX_DISABLE) === 0;
    if (want === this.#intxHigh) return;
    this.#intxHigh = want;
    if (want) this.#stats.interrupts++;
    this.#init.intx(want);
  }

  #sendMsi(): void {
    const cfg = this.#cfgView;
    const lo = cfg.getUint32(MSI_CAP + PCI_MSI_ADDRESS_LO, true);
    const hi = cfg.getUint32(MSI_CAP + PCI_MSI_ADDRESS_HI, true);
    // An MSI is a memory write: it needs bus mastering, and lands in the local APIC's window.
    const master = (this.#command() & PCI_COMMAND_MASTER) !== 0;
    if (!master || hi !== 0 || (lo & 0xfff0_0000) >>> 0 !== MSI_ADDRESS_X86_BASE) {
      this.#stats.msiDropped++;
      return;
    }
    this.#stats.interrupts++;
    this.#init.msi(cfg.getUint16(MSI_CAP + PCI_MSI_DATA_64, true) & 0xff);
  }
}

function validAccess(offset: number, size: number, limit: number): boolean {
  return (size === 1 || size === 2 || size === 4) && Number.isInteger(offset) && offset >= 0 &&
    offset % size === 0 && offset + size <= limit;
}

/** ABAR accesses: any width of 1, 2 or 4 bytes inside the BAR; misaligned ones are split. */
function validMmio(offset: number, size: number): boolean {
  return (size === 1 || size === 2 || size === 4) && Number.isInteger(offset) && offset >= 0 &&
    offset + size <= AHCI_ABAR_SIZE;
}

function allOnes(size: number): number {
  return size === 1 ? 0xff : size === 2 ? 0xffff : 0xffffffff;
}
