/**
 * What a device type (virtio-blk, virtio-scsi, a test device) provides so that the machine can plug
 * it in without knowing it: a VMM-side model factory, and a module its iothread imports to build
 * the back-end. The machine opens nothing itself; the iothread opens the drives and hands the
 * nodes to the back-end factory.
 *
 * A device type module exports `deviceType` ({@linkcode DeviceType}); the module named by
 * {@linkcode DeviceType.backendModule} exports `createBackend` ({@linkcode CreateBackend}). They
 * may be the same module, as long as importing it in a Worker has no side effects.
 *
 * @module
 */

import type { BlockNode } from "../block/node.ts";
import type { VirtioDeviceModel } from "../virtio/device.ts";
import {
  featureBit,
  VIRTIO_F_RING_PACKED,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from "../virtio/features.ts";
import type { DeviceBackend } from "./backend.ts";
import type { BlockErrorAction } from "./error_policy.ts";

/** How writes reach the image, as QEMU's `cache=`. */
export type DriveCache = "writeback" | "writethrough" | "unsafe" | "none" | "directsync";

/** One image a device uses, as the machine configuration gives it (after defaults). */
export interface DriveSpec {
  /** The drive's name in the configuration, for messages (the device id when absent). */
  readonly id?: string | undefined;
  /** Path of the image. */
  readonly file: string;
  /** Image format; probed when absent. */
  readonly format?: string | undefined;
  /** Open the image read-only; the device then refuses writes. */
  readonly readOnly: boolean;
  /**
   * `unsafe` skips the format's metadata flushes and `none`/`directsync` open the image with
   * O_DIRECT (applied when opening); the write cache — on for `writeback`, `none` and `unsafe`,
   * off for `writethrough` and `directsync` — is the device's initial write-cache mode (it
   * implements it, since the guest may switch it).
   */
  readonly cache: DriveCache;
  /** What a failed write does (QEMU `werror`); `enospc` when absent. */
  readonly werror?: BlockErrorAction | undefined;
  /** What a failed read does (QEMU `rerror`); `report` when absent. */
  readonly rerror?: BlockErrorAction | undefined;
  /**
   * QEMU's `aio`: absent, synchronous host calls on the iothread; `io_uring` (`native` maps to
   * it) keeps many requests in flight; `threads` runs them on a pool of Workers.
   */
  readonly aio?: DriveAio | undefined;
}

/** How a drive's requests reach the host, as QEMU's `aio=`. */
export type DriveAio = "threads" | "io_uring" | "native";

/** One device of the machine configuration (after defaults), as the device type sees it. */
export interface DeviceSpec {
  /** Registered device type name. */
  readonly type: string;
  /** Unique id, used in errors and statistics. */
  readonly id: string;
  /** Images, in order (virtio-blk: one; virtio-scsi: one per LUN). */
  readonly drives: readonly DriveSpec[];
  /** Request queues (virtio-scsi adds its control and event queues to these). */
  readonly numQueues: number;
  /** Largest size of each queue (a power of 2). */
  readonly queueSize: number;
  /** Offer VIRTIO_RING_F_EVENT_IDX. */
  readonly eventIdx: boolean;
  /** Offer VIRTIO_RING_F_INDIRECT_DESC. */
  readonly indirect: boolean;
  /** Offer VIRTIO_F_RING_PACKED. */
  readonly packed: boolean;
  /** Doorbells as ioeventfds (the vCPU rings them) rather than trapped exits. */
  readonly ioeventfd: boolean;
  /**
   * The iothread polls its rings for a while after a drain before it sleeps (QEMU's iothread
   * polling; default on). Off: every submission after a drain needs a kick.
   */
  readonly poll?: boolean;
  /** Device-specific options, validated by {@linkcode DeviceType.optionsSchema}. */
  readonly options: Readonly<Record<string, unknown>>;
}

/** What the iothread learned opening a drive. */
export interface DriveInfo {
  /** Path of the image. */
  readonly file: string;
  /** Format as opened (probed or given). */
  readonly format: string;
  /** Virtual size in bytes. */
  readonly size: number;
  /** True when opened read-only. */
  readonly readOnly: boolean;
  /** Alignment below which requests need read-modify-write. */
  readonly requestAlignment: number;
  /** The cache mode it was opened with. */
  readonly cache: DriveCache;
}

/** What the iothread reports once the back-end is up; the model is built from it. */
export interface DeviceInfo {
  /** One per {@linkcode DeviceSpec.drives} entry. */
  readonly drives: readonly DriveInfo[];
  /** Whatever {@linkcode BackendReady.info} returned (structured-cloned). */
  readonly backend: unknown;
}

/** What a back-end factory receives, in the iothread. */
export interface BackendInit {
  /** The device as configured. */
  readonly spec: DeviceSpec;
  /**
   * The opened drives, one per {@linkcode DeviceSpec.drives} entry. The iothread flushes and
   * closes them after {@linkcode DeviceBackend.close} (closing them there too is harmless).
   */
  readonly drives: readonly BlockNode[];
}

/** What a back-end factory returns. */
export interface BackendReady {
  /** The back-end the iothread drives. */
  readonly backend: DeviceBackend;
  /** Structured-cloneable facts for the model (e.g. a geometry); becomes {@linkcode DeviceInfo.backend}. */
  readonly info?: unknown;
}

/** The `createBackend` export of a {@linkcode DeviceType.backendModule}. */
export type CreateBackend = (init: BackendInit) => BackendReady | Promise<BackendReady>;

/** Something with zod's `safeParse` (kept structural so this layer needs no zod types). */
export interface OptionsSchema {
  /** Validates `value`: the parsed options, or the issues with their paths. */
  safeParse(value: unknown):
    | { success: true; data: unknown }
    | {
      success: false;
      error: { issues: readonly { path: readonly PropertyKey[]; message: string }[] };
    };
}

/**
 * A device type. Everything here runs on the VMM thread, except the back-end module, which runs in
 * the device's iothread Worker.
 */
export interface DeviceType {
  /** The `type` of a device in the machine configuration. */
  readonly name: string;
  /** Module the iothread imports (absolute URL); it exports `createBackend`. */
  readonly backendModule: string | URL;
  /** Drives the device takes (checked before anything starts); default 0..256. */
  readonly drives?: { readonly min: number; readonly max: number };
  /** Validates {@linkcode DeviceSpec.options}; its output replaces them. */
  readonly optionsSchema?: OptionsSchema;
  /**
   * Builds the VMM-side model once the iothread is up. The machine wraps it: `activate` and
   * `reset` are forwarded to the iothread after the model's own. Queue resets
   * (VIRTIO_F_RING_RESET) are not forwarded, so the transport does not offer them.
   */
  createModel(spec: DeviceSpec, info: DeviceInfo): VirtioDeviceModel;
}

/** The transport feature bits a spec asks to offer: INDIRECT_DESC, EVENT_IDX, RING_PACKED. */
export function transportFeatures(spec: DeviceSpec): bigint {
  let features = 0n;
  if (spec.indirect) features |= featureBit(VIRTIO_RING_F_INDIRECT_DESC);
  if (spec.eventIdx) features |= featureBit(VIRTIO_RING_F_EVENT_IDX);
  if (spec.packed) features |= featureBit(VIRTIO_F_RING_PACKED);
  return features;
}
