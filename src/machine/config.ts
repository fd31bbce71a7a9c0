/**
 * The machine configuration: guest RAM, vCPUs and devices, as zod schemas, and the guest-physical
 * layout they give (RAM below and above a PC-style PCI hole at 3 GiB, BARs in the hole).
 *
 * Errors name the field: `devices[1].numQueues: must be ≤ 16`. Device-specific `options` are
 * checked later, by the device type's own schema, when the machine is created.
 *
 * @module
 */

import { z } from "zod";
import type { DeviceSpec, DriveSpec } from "../devices/device_type.ts";
import type { GuestRegion } from "../virtio/memory.ts";
import type { MmioWindow } from "../virtio/bus.ts";

/** Most request queues a device may have. */
export const MAX_DEVICE_QUEUES = 16;
/** Largest queue size (QEMU's VIRTQUEUE_MAX_SIZE). */
export const MAX_QUEUE_SIZE = 1024;
/** Most guest RAM, in MiB (GuestMemory's limit). */
export const MAX_MEMORY_MIB = 16 * 1024;
/** Most devices: PCI bus 0 has 32 slots, slot 0 stays empty as a PC's host bridge would hold it. */
export const MAX_DEVICES = 31;

const MiB = 1024 * 1024;
/** Where RAM stops below 4 GiB and the PCI hole begins, as on a PC. */
export const PCI_HOLE_START = 0xc000_0000;
/** First address above the hole: the rest of RAM goes here. */
export const HIGH_RAM_START = 0x1_0000_0000;
/** The hole's MMIO window for BARs: up to the IOAPIC/LAPIC area at 0xFEC0_0000. */
export const MMIO_WINDOW: MmioWindow = { base: PCI_HOLE_START, size: 0xfec0_0000 - PCI_HOLE_START };

const ID_PATTERN = /^[A-Za-z][A-Za-z0-9_.-]{0,63}$/;

const driveSchema = z.strictObject({
  /** The disk's name: jobs name it in `filename=`, and reports show it. Unique in the machine. */
  id: z.string().regex(ID_PATTERN, {
    error: "must start with a letter and hold only letters, digits, '_', '.', '-' (≤ 64)",
  }).optional(),
  file: z.string().min(1),
  format: z.string().min(1).optional(),
  readOnly: z.boolean().default(false),
  cache: z.enum(["writeback", "writethrough", "unsafe", "none", "directsync"]).default("writeback"),
  /** A failed write: tell the guest, ignore it, stop the VM, or stop on ENOSPC only (QEMU's). */
  werror: z.enum(["report", "ignore", "stop", "enospc"]).default("enospc"),
  /** A failed read, as `werror` (QEMU's default: report). */
  rerror: z.enum(["report", "ignore", "stop", "enospc"]).default("report"),
  /**
   * How requests reach the host file (QEMU's `aio`): absent, synchronously on the iothread;
   * `io_uring` (or `native`, which needs cache none/directsync) with many in flight at once;
   * `threads` through a pool of Workers.
   */
  aio: z.enum(["threads", "io_uring", "native"]).optional(),
});

const deviceSchema = z.strictObject({
  type: z.string().min(1),
  id: z.string().regex(ID_PATTERN, {
    error: "must start with a letter and hold only letters, digits, '_', '.', '-' (≤ 64)",
  }),
  drive: driveSchema.optional(),
  drives: z.array(driveSchema).max(256).optional(),
  numQueues: z.int().min(1).max(MAX_DEVICE_QUEUES).default(1),
  queueSize: z.int().min(2).max(MAX_QUEUE_SIZE).refine((n) => (n & (n - 1)) === 0, {
    error: "must be a power of 2",
  }).default(256),
  eventIdx: z.boolean().default(true),
  indirect: z.boolean().default(true),
  packed: z.boolean().default(false),
  ioeventfd: z.boolean().default(true),
  /** The iothread polls its rings before it sleeps (QEMU's iothread polling). */
  poll: z.boolean().default(true),
  /** MSI-X table size; default one per queue plus one for config changes. */
  msixVectors: z.int().min(1).max(2048).optional(),
  /** PCI slot on bus 0; the first free one from 1 when absent. */
  slot: z.int().min(1).max(31).optional(),
  options: z.record(z.string(), z.unknown()).default({}),
}).refine((d) => d.drive === undefined || d.drives === undefined, {
  error: "give either drive or drives, not both",
  path: ["drives"],
});

/** The machine configuration schema (input: what a JSON file holds; output: with defaults). */
export const machineConfigSchema = z.strictObject({
  /** Guest RAM in MiB; above 3 GiB the rest is mapped from 4 GiB, as on a PC. */
  memoryMiB: z.int().min(1).max(MAX_MEMORY_MIB).default(256),
  vcpus: z.literal(1, { error: "must be 1 (one vCPU for now)" }).default(1),
  devices: z.array(deviceSchema).max(MAX_DEVICES).default([]),
  /** How long a vCPU waits for the VMM to answer one exit. */
  exitTimeoutMs: z.int().min(10).max(600_000).default(10_000),
  /** How long the VMM waits for an iothread to start, quiesce, pause or shut down. */
  controlTimeoutMs: z.int().min(10).max(600_000).default(5_000),
}).superRefine((config, ctx) => {
  const ids = new Map<string, number>();
  const slots = new Map<number, number>();
  const driveIds = new Map<string, string>();
  for (const [i, d] of config.devices.entries()) {
    const drives = d.drive !== undefined ? [["drive", d.drive] as const] : (d.drives ?? []).map(
      (drive, j) => [j, drive] as const,
    );
    for (const [where, drive] of drives) {
      if (drive.id === undefined) continue;
      const path = where === "drive" ? ["devices", i, "drive", "id"] : [
        "devices",
        i,
        "drives",
        where,
        "id",
      ];
      const other = driveIds.get(drive.id);
      if (other !== undefined) {
        ctx.addIssue({
          code: "custom",
          path,
          message: `duplicate drive id "${drive.id}" (also ${other})`,
        });
      } else {
        driveIds.set(drive.id, formatPath(path.slice(0, -1)));
      }
    }
    const other = ids.get(d.id);
    if (other !== undefined) {
      ctx.addIssue({
        code: "custom",
        path: ["devices", i, "id"],
        message: `duplicate id "${d.id}" (also devices[${other}])`,
      });
    } else {
      ids.set(d.id, i);
    }
    if (d.slot !== undefined) {
      const taken = slots.get(d.slot);
      if (taken !== undefined) {
        ctx.addIssue({
          code: "custom",
          path: ["devices", i, "slot"],
          message: `slot ${d.slot} is taken by devices[${taken}]`,
        });
      } else {
        slots.set(d.slot, i);
      }
    }
  }
});

/** A machine configuration as written (optional fields may be missing). */
export type MachineConfigInput = z.input<typeof machineConfigSchema>;

/** A device as configured, defaults applied and `drive` folded into `drives`. */
export interface DeviceConfig extends DeviceSpec {
  /** The images, in order (`drive` becomes the only entry). */
  readonly drives: readonly DriveSpec[];
  /** MSI-X table size, when configured. */
  readonly msixVectors?: number | undefined;
  /** PCI slot, when configured. */
  readonly slot?: number | undefined;
}

/** A validated machine configuration with defaults applied. */
export interface MachineConfig {
  /** Guest RAM in MiB; above 3 GiB the rest is mapped from 4 GiB, as on a PC. */
  readonly memoryMiB: number;
  /** vCPUs: one for now. */
  readonly vcpus: 1;
  /** The devices, in order. */
  readonly devices: readonly DeviceConfig[];
  /** How long a vCPU waits for the VMM to answer one exit. */
  readonly exitTimeoutMs: number;
  /** How long the VMM waits for an iothread to start, quiesce, pause or shut down. */
  readonly controlTimeoutMs: number;
}

/** One problem with a configuration: where (`devices[1].numQueues`) and what. */
export interface ConfigIssue {
  /** Where: `devices[1].numQueues`; empty for the whole configuration. */
  readonly path: string;
  /** What is wrong. */
  readonly message: string;
}

/** A configuration that does not validate; the message lists every issue, one per line. */
export class MachineConfigError extends Error {
  /** Always `MachineConfigError`. */
  override readonly name = "MachineConfigError";
  /** Every issue found. */
  readonly issues: readonly ConfigIssue[];

  /** Makes the error listing `issues`. */
  constructor(issues: readonly ConfigIssue[]) {
    super(
      issues.length === 1
        ? `Invalid machine configuration: ${formatIssue(issues[0]!)}`
        : `Invalid machine configuration:\n${issues.map((i) => `  ${formatIssue(i)}`).join("\n")}`,
    );
    this.issues = issues;
  }
}

function formatIssue(issue: ConfigIssue): string {
  return issue.path === "" ? issue.message : `${issue.path}: ${issue.message}`;
}

/** `["devices", 1, "numQueues"]` → `devices[1].numQueues`. */
export function formatPath(path: readonly PropertyKey[]): string {
  let out = "";
  for (const key of path) {
    if (typeof key === "number") out += `[${key}]`;
    else out += out === "" ? String(key) : `.${String(key)}`;
  }
  return out;
}

/** A zod issue in our words: bounds as `must be ≤ 16`, types as `expected a number, got string`. */
export function describeIssue(issue: z.core.$ZodIssue): string {
  switch (issue.code) {
    case "too_big": {
      const what = issue.origin === "array"
        ? "have at most"
        : issue.origin === "string"
        ? "be at most"
        : "be";
      const unit = issue.origin === "array"
        ? " entries"
        : issue.origin === "string"
        ? " characters"
        : "";
      const op = issue.origin === "number" || issue.origin === "int" || issue.origin === "bigint"
        ? (issue.inclusive === false ? "< " : "≤ ")
        : "";
      return `must ${what} ${op}${String(issue.maximum)}${unit}`;
    }
    case "too_small": {
      if (issue.origin === "string" && Number(issue.minimum) === 1) return "must not be empty";
      const what = issue.origin === "array" ? "have at least" : "be";
      const unit = issue.origin === "array" ? " entries" : "";
      const op = issue.origin === "number" || issue.origin === "int" || issue.origin === "bigint"
        ? (issue.inclusive === false ? "> " : "≥ ")
        : "";
      return `must ${what} ${op}${String(issue.minimum)}${unit}`;
    }
    case "invalid_type": {
      if (issue.expected === "int") return "must be an integer";
      // zod keeps no input in issues; its message says what it received.
      const got = /received (\w+)/.exec(issue.message)?.[1];
      if (got === "undefined") return "is required";
      return `expected ${issue.expected}${got === undefined ? "" : `, got ${got}`}`;
    }
    case "invalid_value":
      return issue.values.length === 1 && issue.message.startsWith("must")
        ? issue.message
        : `must be one of ${issue.values.map((v) => JSON.stringify(v)).join(", ")}`;
    case "unrecognized_keys":
      return `unknown field${issue.keys.length > 1 ? "s" : ""} ${
        issue.keys.map((k) => `"${k}"`).join(", ")
      }`;
    default:
      return issue.message;
  }
}

/** Zod issues as {@linkcode ConfigIssue}s, paths prefixed with `prefix`. */
export function configIssues(
  issues: readonly z.core.$ZodIssue[],
  prefix: readonly PropertyKey[] = [],
): ConfigIssue[] {
  return issues.map((issue) => ({
    path: formatPath([...prefix, ...issue.path]),
    message: describeIssue(issue),
  }));
}

/**
 * Validates a machine configuration (e.g. parsed JSON) and applies defaults.
 *
 * Only the structure is checked here; that each device `type` is registered, its drive count and
 * its `options` are checked by `Machine.create`, with the same error format.
 *
 * @throws {MachineConfigError} naming every bad field
 *
 * @example
 * ```ts
 * import { parseMachineConfig } from "./config.ts";
 * const config = parseMachineConfig({ devices: [{ type: "virtio-blk", id: "disk0", drive: { file: "a.img" } }] });
 * if (config.devices[0]?.queueSize !== 256 || config.devices[0].drives.length !== 1) throw new Error();
 * try {
 *   parseMachineConfig({ devices: [{ type: "virtio-blk", id: "d", numQueues: 17 }] });
 * } catch (e) {
 *   if (!(e as Error).message.includes("devices[0].numQueues: must be ≤ 16")) throw e;
 * }
 * ```
 */
export function parseMachineConfig(input: unknown): MachineConfig {
  const parsed = machineConfigSchema.safeParse(input);
  if (!parsed.success) throw new MachineConfigError(configIssues(parsed.error.issues));
  const c = parsed.data;
  return {
    memoryMiB: c.memoryMiB,
    vcpus: c.vcpus,
    exitTimeoutMs: c.exitTimeoutMs,
    controlTimeoutMs: c.controlTimeoutMs,
    devices: c.devices.map((d): DeviceConfig => ({
      type: d.type,
      id: d.id,
      drives: (d.drives ?? (d.drive === undefined ? [] : [d.drive])).map((drive) => ({
        id: drive.id,
        file: drive.file,
        format: drive.format,
        readOnly: drive.readOnly,
        cache: drive.cache,
        werror: drive.werror,
        rerror: drive.rerror,
        ...(drive.aio === undefined ? {} : { aio: drive.aio }),
      })),
      numQueues: d.numQueues,
      queueSize: d.queueSize,
      eventIdx: d.eventIdx,
      indirect: d.indirect,
      packed: d.packed,
      ioeventfd: d.ioeventfd,
      poll: d.poll,
      msixVectors: d.msixVectors,
      slot: d.slot,
      options: d.options,
    })),
  };
}

/**
 * Guest RAM regions for `memoryMiB`: one region from 0 up to 3 GiB; beyond that, 3 GiB below the
 * PCI hole and the rest from 4 GiB.
 */
export function ramRegions(memoryMiB: number): GuestRegion[] {
  const bytes = memoryMiB * MiB;
  if (bytes <= PCI_HOLE_START) return [{ gpa: 0, size: bytes }];
  return [
    { gpa: 0, size: PCI_HOLE_START },
    { gpa: HIGH_RAM_START, size: bytes - PCI_HOLE_START },
  ];
}
