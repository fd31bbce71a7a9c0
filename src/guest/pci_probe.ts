/**
 * PCI enumeration as a guest kernel does it, through configuration space only: which slots of bus 0
 * hold a function, its identity, its BARs (address and size), its capability list, and — for
 * virtio-pci modern functions — the virtio structures (COMMON/NOTIFY/ISR/DEVICE/PCI_CFG) and MSI-X.
 *
 * Everything read from "hardware" is treated as hostile. A buggy or malicious device must not make
 * the guest loop, index out of range or trust a structure outside its BAR: capability walks are
 * bounded and loop-checked, pointers and lengths are range-checked, BAR sizing masks must be
 * contiguous, and every failure is a {@linkcode PciProbeError} naming the slot and what is wrong.
 *
 * Linux's `drivers/pci/probe.c` (`pci_read_bases`, `__pci_bus_find_cap_start`, the 48-entry TTL)
 * and `drivers/virtio/virtio_pci_modern_dev.c` (`virtio_pci_find_capability`,
 * `vp_modern_map_capability`) are the models.
 *
 * @module
 */

import type { AccessSize, GuestBus } from "../virtio/bus.ts";
import { PCI_SLOTS } from "../virtio/bus.ts";
import {
  PCI_CAP_ID_MSIX,
  PCI_CAP_ID_VNDR,
  PCI_VENDOR_ID_REDHAT_QUMRANET,
  VIRTIO_PCI_CAP_COMMON_CFG,
  VIRTIO_PCI_CAP_DEVICE_CFG,
  VIRTIO_PCI_CAP_ISR_CFG,
  VIRTIO_PCI_CAP_NOTIFY_CFG,
  VIRTIO_PCI_CAP_PCI_CFG,
  VIRTIO_PCI_DEVICE_ID_BASE,
} from "../virtio/features.ts";
import {
  PCI_BASE_ADDRESS_0,
  PCI_CAPABILITY_LIST,
  PCI_CLASS_DEVICE,
  PCI_CLASS_PROG,
  PCI_COMMAND,
  PCI_COMMAND_INTX_DISABLE,
  PCI_COMMAND_IO,
  PCI_COMMAND_MASTER,
  PCI_COMMAND_MEMORY,
  PCI_DEVICE_ID,
  PCI_HEADER_TYPE,
  PCI_INTERRUPT_PIN,
  PCI_MSIX_FLAGS,
  PCI_MSIX_FLAGS_QSIZE,
  PCI_MSIX_PBA,
  PCI_MSIX_TABLE,
  PCI_REVISION_ID,
  PCI_STATUS,
  PCI_STATUS_CAP_LIST,
  PCI_SUBSYSTEM_ID,
  PCI_SUBSYSTEM_VENDOR_ID,
  PCI_VENDOR_ID,
  VIRTIO_PCI_CAP_BAR,
  VIRTIO_PCI_CAP_CFG_TYPE,
  VIRTIO_PCI_CAP_ID,
  VIRTIO_PCI_CAP_LEN,
  VIRTIO_PCI_CAP_LENGTH,
  VIRTIO_PCI_CAP_OFFSET,
  VIRTIO_PCI_NOTIFY_CAP_MULT,
} from "../virtio/pci.ts";

/** Conventional configuration space: capabilities live in 0x40..0xFF. */
const CONFIG_SPACE = 256;
/** First byte after the type-0 header: the lowest place a capability may start. */
const CAP_AREA_START = 0x40;
/** Linux's PCI_FIND_CAP_TTL: no list is longer (48 dwords fit in 0x40..0xFF). */
export const PCI_FIND_CAP_TTL = 48;
/** Bytes of `struct virtio_pci_cap` and of `struct virtio_pci_notify_cap`. */
const VIRTIO_CAP_LEN = 16;
const VIRTIO_NOTIFY_CAP_LEN = 20;
/** Bytes of the MSI-X capability (id, next, control, table, PBA). */
const MSIX_CAP_LEN = 12;
/** Bytes of the common config Linux needs (`struct virtio_pci_common_cfg` up to queue_device). */
export const VIRTIO_COMMON_CFG_MIN = 56;
/** Number of BAR registers in a type-0 header. */
export const PCI_NUM_BARS = 6;
const TWO_32 = 2 ** 32;

/** A function's configuration or structures are unusable; `slot` says which function. */
export class PciProbeError extends Error {
  override readonly name = "PciProbeError";
  /** Slot on bus 0. */
  readonly slot: number;

  constructor(slot: number, detail: string) {
    super(`PCI slot ${slot}: ${detail}`);
    this.slot = slot;
  }
}

/** One BAR as sized and read at probe time. */
export interface PciBar {
  /** BAR register index 0..5 (a 64-bit BAR is named by its lower register). */
  readonly index: number;
  /** Memory (32- or 64-bit) or I/O space. */
  readonly kind: "memory32" | "memory64" | "io";
  /** Guest-physical (or I/O port) address; 0 when the firmware left it unassigned. */
  readonly address: number;
  /** Bytes the BAR decodes, from the sizing mask. */
  readonly size: number;
  /** Prefetchable memory. */
  readonly prefetchable: boolean;
}

/** A capability in the list: id and config-space offset. */
export interface PciCapability {
  readonly id: number;
  readonly offset: number;
}

/** A `struct virtio_pci_cap` (vendor capability of a virtio function). */
export interface VirtioPciCap {
  /** Config-space offset of the capability. */
  readonly capOffset: number;
  /** VIRTIO_PCI_CAP_* type. */
  readonly cfgType: number;
  /** BAR index holding the structure. */
  readonly bar: number;
  /** Structure id (for shared-memory caps; 0 otherwise). */
  readonly id: number;
  /** Offset of the structure in the BAR. */
  readonly offset: number;
  /** Bytes of the structure. */
  readonly length: number;
  /** NOTIFY only: bytes between two queue_notify_off steps. */
  readonly multiplier?: number;
}

/** The NOTIFY capability: a {@linkcode VirtioPciCap} with its multiplier. */
export interface VirtioNotifyCap extends VirtioPciCap {
  readonly multiplier: number;
}

/** The MSI-X capability, validated against the BARs. */
export interface MsixCapability {
  /** Config-space offset of the capability. */
  readonly capOffset: number;
  /** Table entries (message control's N-1 field plus 1). */
  readonly tableSize: number;
  readonly tableBar: number;
  readonly tableOffset: number;
  readonly pbaBar: number;
  readonly pbaOffset: number;
}

/** What enumeration learned about one function. */
export interface PciFunctionInfo {
  readonly slot: number;
  readonly vendorId: number;
  readonly deviceId: number;
  readonly revision: number;
  /** Base class << 8 | subclass (as `VirtioDeviceModel.pciClass`). */
  readonly classCode: number;
  readonly progIf: number;
  /** Header layout (bits 0..6 of the header type register); 0 for an endpoint. */
  readonly headerType: number;
  /** Bit 7 of the header type register. */
  readonly multiFunction: boolean;
  readonly subsystemVendorId: number;
  readonly subsystemId: number;
  /** INTx pin, 0 for none, 1..4 for INTA#..INTD#. */
  readonly interruptPin: number;
  /** BAR registers 0..5: a sized BAR, or null (not implemented, or the upper half of a 64-bit one). */
  readonly bars: readonly (PciBar | null)[];
  /** The capability list in walk order. */
  readonly capabilities: readonly PciCapability[];
  /** Vendor capabilities decoded as virtio caps (only for vendor 0x1AF4). */
  readonly virtioCaps: readonly VirtioPciCap[];
  /** The MSI-X capability, or null when absent or unusable (see {@linkcode problems}). */
  readonly msix: MsixCapability | null;
  /** Findings that do not stop the function from being used (e.g. an unusable MSI-X table). */
  readonly problems: readonly string[];
}

/** The virtio structures a modern driver uses, each validated against its BAR. */
export interface VirtioStructures {
  /** Virtio device id (2 = block, 8 = SCSI). */
  readonly virtioId: number;
  readonly common: VirtioPciCap;
  readonly notify: VirtioNotifyCap;
  readonly isr: VirtioPciCap;
  /** Device-specific config; absent on devices without one. */
  readonly device: VirtioPciCap | null;
  readonly pciCfg: VirtioPciCap | null;
  /** Guest-physical addresses of the structures (BAR address + offset). */
  readonly commonAddress: number;
  readonly notifyAddress: number;
  readonly isrAddress: number;
  readonly deviceAddress: number | null;
}

/** Result of {@linkcode scanBus}: the functions found and the slots that could not be probed. */
export interface PciScan {
  readonly functions: PciFunctionInfo[];
  readonly errors: PciProbeError[];
}

/** Options of {@linkcode probeSlot} and {@linkcode scanBus}. */
export interface PciProbeOptions {
  /**
   * Where memory BARs may live (the firmware's MMIO window). A BAR outside it is an error; without
   * a window only address/size sanity is checked.
   */
  readonly mmioWindow?: { readonly base: number; readonly size: number };
}

/** Config-space accessors of one slot; every value is masked to its width (a bus may return junk). */
class ConfigSpace {
  readonly #bus: GuestBus;
  readonly slot: number;
  constructor(bus: GuestBus, slot: number) {
    this.#bus = bus;
    this.slot = slot;
  }
  #read(offset: number, size: AccessSize): number {
    const v = this.#bus.configRead(this.slot, offset, size);
    if (size === 4) return v >>> 0;
    return (v >>> 0) & (size === 2 ? 0xffff : 0xff);
  }
  u8(offset: number): number {
    return this.#read(offset, 1);
  }
  u16(offset: number): number {
    return this.#read(offset, 2);
  }
  u32(offset: number): number {
    return this.#read(offset, 4);
  }
  write(offset: number, size: AccessSize, value: number): void {
    this.#bus.configWrite(this.slot, offset, size, value);
  }
}

/** Vendor ids that mean "nothing here" (Linux's `pci_bus_generic_read_dev_vendor_id`). */
function absent(vendorDevice: number): boolean {
  return vendorDevice === 0xffffffff || vendorDevice === 0 || vendorDevice === 0x0000ffff ||
    vendorDevice === 0xffff0000;
}

/**
 * Probes slot `slot` of bus 0: identity, BARs (sized with memory and I/O decoding off, then the
 * command register restored), capabilities, MSI-X.
 *
 * @returns the function, or null when the slot is empty
 * @throws {PciProbeError} when the function's configuration is unusable
 * @throws {RangeError} when `slot` is not 0..31
 */
export function probeSlot(
  bus: GuestBus,
  slot: number,
  options: PciProbeOptions = {},
): PciFunctionInfo | null {
  if (!Number.isInteger(slot) || slot < 0 || slot >= PCI_SLOTS) {
    throw new RangeError(`PCI slot ${slot} is not 0..${PCI_SLOTS - 1}`);
  }
  const cfg = new ConfigSpace(bus, slot);
  if (absent(cfg.u32(PCI_VENDOR_ID))) return null;
  const problems: string[] = [];
  const headerRaw = cfg.u8(PCI_HEADER_TYPE);
  const headerType = headerRaw & 0x7f;
  if (headerType !== 0) {
    // Bridges (1) and CardBus (2) have another BAR and capability-pointer layout.
    throw new PciProbeError(slot, `header type ${headerType} is not an endpoint (type 0)`);
  }
  const bars = sizeBars(cfg, options);
  const { capabilities, virtioCaps, msix } = walkCapabilities(
    cfg,
    cfg.u16(PCI_VENDOR_ID) === PCI_VENDOR_ID_REDHAT_QUMRANET,
    bars,
    problems,
  );
  return {
    slot,
    vendorId: cfg.u16(PCI_VENDOR_ID),
    deviceId: cfg.u16(PCI_DEVICE_ID),
    revision: cfg.u8(PCI_REVISION_ID),
    classCode: cfg.u16(PCI_CLASS_DEVICE),
    progIf: cfg.u8(PCI_CLASS_PROG),
    headerType,
    multiFunction: (headerRaw & 0x80) !== 0,
    subsystemVendorId: cfg.u16(PCI_SUBSYSTEM_VENDOR_ID),
    subsystemId: cfg.u16(PCI_SUBSYSTEM_ID),
    interruptPin: cfg.u8(PCI_INTERRUPT_PIN),
    bars,
    capabilities,
    virtioCaps,
    msix,
    problems,
  };
}

/**
 * Probes every slot of bus 0. A slot that fails is reported in `errors` and skipped, as a kernel
 * skips a device it cannot drive; the scan goes on.
 */
export function scanBus(bus: GuestBus, options: PciProbeOptions = {}): PciScan {
  const functions: PciFunctionInfo[] = [];
  const errors: PciProbeError[] = [];
  for (let slot = 0; slot < PCI_SLOTS; slot++) {
    try {
      const fn = probeSlot(bus, slot, options);
      if (fn !== null) functions.push(fn);
    } catch (error) {
      if (!(error instanceof PciProbeError)) throw error;
      errors.push(error);
    }
  }
  return { functions, errors };
}

/**
 * Reads and sizes the six BAR registers (Linux's `pci_read_bases`): decoding off, write all-ones,
 * read the mask, restore the address, restore the command register.
 */
function sizeBars(cfg: ConfigSpace, options: PciProbeOptions): (PciBar | null)[] {
  const slot = cfg.slot;
  const command = cfg.u16(PCI_COMMAND);
  // Sizing with decoding on would make the BAR briefly claim the all-ones address.
  cfg.write(PCI_COMMAND, 2, command & ~(PCI_COMMAND_MEMORY | PCI_COMMAND_IO));
  const bars: (PciBar | null)[] = [];
  try {
    for (let index = 0; index < PCI_NUM_BARS; index++) {
      const reg = PCI_BASE_ADDRESS_0 + 4 * index;
      const lo = cfg.u32(reg);
      cfg.write(reg, 4, 0xffffffff);
      const loMask = cfg.u32(reg);
      cfg.write(reg, 4, lo);
      if ((lo & 1) !== 0) {
        // I/O BAR: address bits 2..31 (16 used on x86). Not used by virtio modern; recorded only.
        const mask = (loMask & ~3) & 0xffff;
        const size = mask === 0 ? 0 : (mask & -mask);
        bars.push(
          size === 0 ? null : {
            index,
            kind: "io",
            address: (lo & ~3) & 0xffff,
            size,
            prefetchable: false,
          },
        );
        continue;
      }
      const type = (lo >>> 1) & 3;
      if (type === 3 || type === 1) {
        throw new PciProbeError(slot, `BAR ${index} has reserved memory type ${type}`);
      }
      const is64 = type === 2;
      let hi = 0;
      let hiMask = 0;
      if (is64) {
        if (index === PCI_NUM_BARS - 1) {
          throw new PciProbeError(slot, `BAR ${index} is 64-bit but has no upper register`);
        }
        hi = cfg.u32(reg + 4);
        cfg.write(reg + 4, 4, 0xffffffff);
        hiMask = cfg.u32(reg + 4);
        cfg.write(reg + 4, 4, hi);
      }
      const bar = decodeMemoryBar(slot, index, lo, loMask, hi, hiMask, is64, options);
      bars.push(bar);
      if (is64) {
        bars.push(null); // the upper half is not a BAR of its own
        index++;
      }
    }
  } finally {
    cfg.write(PCI_COMMAND, 2, command);
  }
  return bars;
}

function decodeMemoryBar(
  slot: number,
  index: number,
  lo: number,
  loMask: number,
  hi: number,
  hiMask: number,
  is64: boolean,
  options: PciProbeOptions,
): PciBar | null {
  // BigInt: a 64-bit mask has more significant bits than a double keeps.
  const width = is64 ? 64n : 32n;
  const mask = ((BigInt(is64 ? hiMask : 0) << 32n) | BigInt(loMask >>> 0)) & ~0xfn;
  if (mask === 0n) return null; // not implemented: no writable address bit
  const sizeBig = mask & -mask;
  // A real BAR's writable bits are every bit from log2(size) up: anything else is garbage.
  if (mask + sizeBig !== 1n << width) {
    throw new PciProbeError(
      slot,
      `BAR ${index} sizing mask 0x${mask.toString(16)} is not contiguous`,
    );
  }
  if (sizeBig > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new PciProbeError(slot, `BAR ${index} size 0x${sizeBig.toString(16)} is too large`);
  }
  const size = Number(sizeBig);
  const address = (is64 ? hi * TWO_32 : 0) + ((lo & ~0xf) >>> 0);
  const kind = is64 ? "memory64" : "memory32";
  const prefetchable = (lo & 0x8) !== 0;
  if (address === 0) return { index, kind, address: 0, size, prefetchable };
  // Address bits below the size are read-only zero on real hardware.
  if (address % size !== 0) {
    throw new PciProbeError(
      slot,
      `BAR ${index} address 0x${address.toString(16)} is not aligned to its size 0x${
        size.toString(16)
      }`,
    );
  }
  const limit = is64 ? Number.MAX_SAFE_INTEGER : TWO_32;
  if (!Number.isSafeInteger(address) || address + size > limit) {
    throw new PciProbeError(
      slot,
      `BAR ${index} at 0x${address.toString(16)}+0x${size.toString(16)} exceeds the ${
        is64 ? "64" : "32"
      }-bit address space the guest can use`,
    );
  }
  const window = options.mmioWindow;
  if (
    window !== undefined &&
    (address < window.base || address + size > window.base + window.size)
  ) {
    throw new PciProbeError(
      slot,
      `BAR ${index} at 0x${address.toString(16)}+0x${size.toString(16)} is outside the MMIO window`,
    );
  }
  return { index, kind, address, size, prefetchable };
}

/**
 * Walks the capability list: bounded by {@linkcode PCI_FIND_CAP_TTL}, every pointer inside
 * 0x40..0xFF and dword-aligned, no dword visited twice.
 */
function walkCapabilities(
  cfg: ConfigSpace,
  isVirtioVendor: boolean,
  bars: readonly (PciBar | null)[],
  problems: string[],
): { capabilities: PciCapability[]; virtioCaps: VirtioPciCap[]; msix: MsixCapability | null } {
  const slot = cfg.slot;
  const capabilities: PciCapability[] = [];
  const virtioCaps: VirtioPciCap[] = [];
  let msix: MsixCapability | null = null;
  if ((cfg.u16(PCI_STATUS) & PCI_STATUS_CAP_LIST) === 0) {
    return { capabilities, virtioCaps, msix };
  }
  const visited = new Uint8Array(CONFIG_SPACE / 4);
  // The low two bits of every pointer are reserved (the spec says mask them, as Linux does).
  let ptr = cfg.u8(PCI_CAPABILITY_LIST) & ~3;
  for (let ttl = PCI_FIND_CAP_TTL; ptr !== 0; ttl--) {
    if (ttl === 0) {
      throw new PciProbeError(slot, `capability list is longer than ${PCI_FIND_CAP_TTL} entries`);
    }
    if (ptr < CAP_AREA_START || ptr + 2 > CONFIG_SPACE) {
      throw new PciProbeError(
        slot,
        `capability pointer 0x${ptr.toString(16)} is outside 0x40..0xff`,
      );
    }
    if (visited[ptr >>> 2] !== 0) {
      throw new PciProbeError(slot, `capability list loops back to 0x${ptr.toString(16)}`);
    }
    visited[ptr >>> 2] = 1;
    const id = cfg.u8(ptr);
    if (id === 0xff) break; // Linux: an all-ones id ends the list (a removed device)
    capabilities.push({ id, offset: ptr });
    if (id === PCI_CAP_ID_VNDR && isVirtioVendor) {
      const cap = decodeVirtioCap(cfg, ptr);
      if (cap !== null) virtioCaps.push(cap);
    } else if (id === PCI_CAP_ID_MSIX) {
      if (msix !== null) {
        problems.push(`second MSI-X capability at 0x${ptr.toString(16)} ignored`);
      } else {
        const decoded = decodeMsix(cfg, ptr, bars);
        if (typeof decoded === "string") problems.push(decoded);
        else msix = decoded;
      }
    }
    ptr = cfg.u8(ptr + 1) & ~3;
  }
  return { capabilities, virtioCaps, msix };
}

function decodeVirtioCap(cfg: ConfigSpace, at: number): VirtioPciCap {
  const slot = cfg.slot;
  const capLen = cfg.u8(at + VIRTIO_PCI_CAP_LEN);
  const cfgType = cfg.u8(at + VIRTIO_PCI_CAP_CFG_TYPE);
  const need = cfgType === VIRTIO_PCI_CAP_NOTIFY_CFG ? VIRTIO_NOTIFY_CAP_LEN : VIRTIO_CAP_LEN;
  if (capLen < need || at + capLen > CONFIG_SPACE) {
    throw new PciProbeError(
      slot,
      `virtio capability at 0x${
        at.toString(16)
      } (type ${cfgType}) has length ${capLen}, needs ${need} inside config space`,
    );
  }
  const base = {
    capOffset: at,
    cfgType,
    bar: cfg.u8(at + VIRTIO_PCI_CAP_BAR),
    id: cfg.u8(at + VIRTIO_PCI_CAP_ID),
    offset: cfg.u32(at + VIRTIO_PCI_CAP_OFFSET),
    length: cfg.u32(at + VIRTIO_PCI_CAP_LENGTH),
  };
  if (cfgType === VIRTIO_PCI_CAP_NOTIFY_CFG) {
    return { ...base, multiplier: cfg.u32(at + VIRTIO_PCI_NOTIFY_CAP_MULT) };
  }
  return base;
}

function decodeMsix(
  cfg: ConfigSpace,
  at: number,
  bars: readonly (PciBar | null)[],
): MsixCapability | string {
  const where = `MSI-X capability at 0x${at.toString(16)}`;
  if (at + MSIX_CAP_LEN > CONFIG_SPACE) return `${where} runs past config space`;
  const control = cfg.u16(at + PCI_MSIX_FLAGS);
  const table = cfg.u32(at + PCI_MSIX_TABLE);
  const pba = cfg.u32(at + PCI_MSIX_PBA);
  const tableSize = (control & PCI_MSIX_FLAGS_QSIZE) + 1;
  const tableBar = table & 7;
  const tableOffset = (table & ~7) >>> 0;
  const pbaBar = pba & 7;
  const pbaOffset = (pba & ~7) >>> 0;
  const fits = (bar: number, offset: number, bytes: number, what: string): string | null => {
    const b = bar < PCI_NUM_BARS ? bars[bar] : null;
    if (b === null || b === undefined || b.kind === "io") {
      return `${where}: ${what} BAR ${bar} is not a memory BAR`;
    }
    if (b.address === 0) return `${where}: ${what} BAR ${bar} is unassigned`;
    if (offset + bytes > b.size) {
      return `${where}: ${what} at 0x${
        offset.toString(16)
      }+${bytes} exceeds BAR ${bar} of ${b.size} bytes`;
    }
    return null;
  };
  const problem = fits(tableBar, tableOffset, tableSize * 16, "table") ??
    fits(pbaBar, pbaOffset, Math.ceil(tableSize / 64) * 8, "PBA");
  if (problem !== null) return problem;
  return { capOffset: at, tableSize, tableBar, tableOffset, pbaBar, pbaOffset };
}

/** The virtio device id of a virtio-pci function, or null when it is not one. */
export function virtioDeviceId(fn: PciFunctionInfo): number | null {
  if (fn.vendorId !== PCI_VENDOR_ID_REDHAT_QUMRANET) return null;
  if (fn.deviceId >= VIRTIO_PCI_DEVICE_ID_BASE && fn.deviceId <= 0x107f) {
    return fn.deviceId - VIRTIO_PCI_DEVICE_ID_BASE;
  }
  // Transitional ids: the subsystem id is the virtio id (virtio_pci_modern_probe does the same).
  if (fn.deviceId >= 0x1000 && fn.deviceId <= 0x103f) return fn.subsystemId;
  return null;
}

/**
 * Selects and validates the virtio structures of a modern virtio-pci function: for each type the
 * first capability whose BAR is an assigned memory BAR (as `virtio_pci_find_capability`), then
 * offset alignment, minimum length and `offset + length` inside the BAR, and a notify multiplier
 * that is 0 or a power of 2.
 *
 * @throws {PciProbeError} when the function is not virtio, or a required structure is missing or
 *   does not fit
 */
export function virtioStructures(fn: PciFunctionInfo): VirtioStructures {
  const slot = fn.slot;
  const virtioId = virtioDeviceId(fn);
  if (virtioId === null) {
    throw new PciProbeError(
      slot,
      `0x${fn.vendorId.toString(16)}:0x${fn.deviceId.toString(16)} is not a virtio-pci function`,
    );
  }
  const usable = (cap: VirtioPciCap): boolean => {
    const bar = cap.bar < PCI_NUM_BARS ? fn.bars[cap.bar] : null;
    return bar !== null && bar !== undefined && bar.kind !== "io" && bar.address !== 0;
  };
  const find = (type: number): VirtioPciCap | null =>
    fn.virtioCaps.find((c) => c.cfgType === type && usable(c)) ?? null;
  const check = (
    cap: VirtioPciCap | null,
    name: string,
    minLength: number,
    align: number,
  ): VirtioPciCap => {
    if (cap === null) {
      const listed = fn.virtioCaps.some((c) => c.cfgType === capTypeOf(name));
      throw new PciProbeError(
        slot,
        listed
          ? `virtio ${name} capability points at no assigned memory BAR`
          : `virtio ${name} capability is missing`,
      );
    }
    const bar = fn.bars[cap.bar]!;
    if (cap.offset % align !== 0) {
      throw new PciProbeError(
        slot,
        `virtio ${name} structure offset 0x${cap.offset.toString(16)} is not ${align}-byte aligned`,
      );
    }
    if (cap.length < minLength) {
      throw new PciProbeError(
        slot,
        `virtio ${name} structure is ${cap.length} bytes, needs at least ${minLength}`,
      );
    }
    // Both are u32 from config space; their sum is exact in a double.
    if (cap.offset + cap.length > bar.size) {
      throw new PciProbeError(
        slot,
        `virtio ${name} structure at 0x${
          cap.offset.toString(16)
        }+${cap.length} exceeds BAR ${cap.bar} of ${bar.size} bytes`,
      );
    }
    return cap;
  };
  const common = check(find(VIRTIO_PCI_CAP_COMMON_CFG), "common", VIRTIO_COMMON_CFG_MIN, 4);
  const notifyCap = check(find(VIRTIO_PCI_CAP_NOTIFY_CFG), "notify", 2, 2);
  const isr = check(find(VIRTIO_PCI_CAP_ISR_CFG), "ISR", 1, 1);
  const deviceFound = find(VIRTIO_PCI_CAP_DEVICE_CFG);
  const device = deviceFound === null ? null : check(deviceFound, "device", 0, 4);
  const pciCfg = fn.virtioCaps.find((c) => c.cfgType === VIRTIO_PCI_CAP_PCI_CFG) ?? null;
  const multiplier = notifyCap.multiplier ?? 0;
  // The spec: 0 (one doorbell for all queues) or an even power of 2; doorbells are 2-byte writes.
  if (multiplier !== 0 && (multiplier < 2 || (multiplier & (multiplier - 1)) !== 0)) {
    throw new PciProbeError(
      slot,
      `virtio notify multiplier ${multiplier} is not 0 or a power of 2`,
    );
  }
  const at = (cap: VirtioPciCap) => fn.bars[cap.bar]!.address + cap.offset;
  return {
    virtioId,
    common,
    notify: { ...notifyCap, multiplier },
    isr,
    device,
    pciCfg,
    commonAddress: at(common),
    notifyAddress: at(notifyCap),
    isrAddress: at(isr),
    deviceAddress: device === null ? null : at(device),
  };
}

function capTypeOf(name: string): number {
  switch (name) {
    case "common":
      return VIRTIO_PCI_CAP_COMMON_CFG;
    case "notify":
      return VIRTIO_PCI_CAP_NOTIFY_CFG;
    case "ISR":
      return VIRTIO_PCI_CAP_ISR_CFG;
    default:
      return VIRTIO_PCI_CAP_DEVICE_CFG;
  }
}

/** Options of {@linkcode enableFunction}. */
export interface EnableOptions {
  /** Allow the function to assert INTx (clear INTx Disable). Default false (MSI-X drivers). */
  readonly intx?: boolean;
}

/**
 * Turns on memory decoding and bus mastering (DMA to guest RAM), and sets INTx Disable as asked;
 * reads the command register back.
 *
 * @throws {PciProbeError} when memory decoding or bus mastering does not stick
 */
export function enableFunction(bus: GuestBus, slot: number, options: EnableOptions = {}): void {
  const cfg = new ConfigSpace(bus, slot);
  const old = cfg.u16(PCI_COMMAND);
  let command = old | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
  command = options.intx === true
    ? command & ~PCI_COMMAND_INTX_DISABLE
    : command | PCI_COMMAND_INTX_DISABLE;
  cfg.write(PCI_COMMAND, 2, command);
  const now = cfg.u16(PCI_COMMAND);
  const want = PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
  if ((now & want) !== want) {
    throw new PciProbeError(
      slot,
      `command register reads 0x${now.toString(16)} after enabling memory and bus mastering`,
    );
  }
}

/** Sets or clears INTx Disable in the command register (MSI-X drivers set it, INTx ones clear it). */
export function setIntxDisabled(bus: GuestBus, slot: number, disabled: boolean): void {
  const cfg = new ConfigSpace(bus, slot);
  const old = cfg.u16(PCI_COMMAND);
  cfg.write(
    PCI_COMMAND,
    2,
    disabled ? old | PCI_COMMAND_INTX_DISABLE : old & ~PCI_COMMAND_INTX_DISABLE,
  );
}
