/**
 * vstor: QEMU's storage model as a Deno library and command-line tool. This module is the whole
 * public API, layer by layer from the host up; `deno run -A mod.ts` is the command line.
 *
 * - **Block layer and errors**: {@linkcode BlockNode}, the contract every format implements
 *   (read, write, writeZeroes, discard, flush, blockStatus), and {@linkcode BlockError} with a
 *   `kind` to match on.
 * - **Host adapters**: {@linkcode HostFile}; {@linkcode openHostFile} for files and block devices
 *   (with QEMU-compatible locks), {@linkcode MemoryFile} for tests.
 * - **Formats**: {@linkcode openImage} and {@linkcode createImage} (probing, backing chains),
 *   {@linkcode RawNode}, {@linkcode Qcow2Node}; what qemu-img's verbs do, as functions:
 *   {@linkcode checkImage}, {@linkcode mapImage}, {@linkcode convertImages},
 *   {@linkcode compareImages}, {@linkcode measureImage}, {@linkcode commitImage},
 *   {@linkcode rebaseImage}, {@linkcode createSnapshot}, {@linkcode runBench}, {@linkcode ddCopy}.
 * - **Virtio**: {@linkcode GuestMemory}; split and packed virtqueues, device side
 *   ({@linkcode SplitDeviceQueue}) and driver side ({@linkcode SplitDriverQueue}); the virtio-pci
 *   transport ({@linkcode VirtioPciFunction} on a {@linkcode PciBus}), {@linkcode Doorbells} and
 *   {@linkcode InterruptState}.
 * - **Devices**: the virtio-blk and virtio-scsi models (VMM side) and back-ends (iothread side),
 *   and the {@linkcode DeviceType} contract that plugs new types into the machine.
 * - **SCSI**: {@linkcode ScsiDisk}, a logical unit over any block node, on a {@linkcode ScsiBus}.
 * - **Machine**: {@linkcode Machine}, a VMM with one iothread Worker per device and a vCPU Worker;
 *   {@linkcode parseMachineConfig}, {@linkcode MachineStats}.
 * - **Guest**: the simulated guest ({@linkcode runGuest}, run in a vCPU Worker from
 *   {@linkcode GUEST_VCPU_MODULE}), its fio-like jobs ({@linkcode parseJobArgs}), the workload
 *   engine, the report and fio's JSON, and {@linkcode RunControl} to stop it.
 *
 * @example A qcow2 image in memory, served by virtio-blk through a split virtqueue
 * ```ts
 * import {
 *   createQcow2,
 *   GuestMemory,
 *   MemoryFile,
 *   Qcow2Node,
 *   queueFeaturesOf,
 *   SplitDeviceQueue,
 *   SplitDriverQueue,
 *   splitRingLayout,
 *   VIRTIO_BLK_S_OK,
 *   VIRTIO_BLK_T_OUT,
 *   VirtioBlkBackend,
 *   VirtioBlkModel,
 * } from "./mod.ts";
 *
 * // Host and format: a 1 MiB qcow2 image in memory, opened as a block node.
 * const file = new MemoryFile("disk.qcow2");
 * await createQcow2(file, 1 << 20);
 * const disk = await Qcow2Node.open(file);
 *
 * // Device: the model a driver negotiates with, and the back-end that does the I/O.
 * const model = new VirtioBlkModel({}, disk);
 * const backend = new VirtioBlkBackend(disk, model.options, model.shared);
 * const features = model.deviceFeatures; // the driver accepts every offered feature
 * if (!model.validateFeatures(features)) throw new Error("features refused");
 *
 * // Virtio: guest RAM, and one split ring seen from both sides.
 * const mem = new GuestMemory([{ gpa: 0, size: 1 << 20 }]);
 * const layout = splitRingLayout(16, 0x1000);
 * const driver = new SplitDriverQueue<string>(mem, layout, queueFeaturesOf(features));
 * const queue = new SplitDeviceQueue(mem, 0, layout, queueFeaturesOf(features));
 * backend.activate(mem, features, [queue]);
 *
 * // The guest writes sector 8: a 16-byte header, 512 bytes of data, a status byte.
 * const header = new DataView(new ArrayBuffer(16));
 * header.setUint32(0, VIRTIO_BLK_T_OUT, true);
 * header.setBigUint64(8, 8n, true);
 * mem.write(0x10000, new Uint8Array(header.buffer));
 * mem.fill(0x10010, 512, 0xab);
 * driver.add([{ addr: 0x10000, length: 16 }, { addr: 0x10010, length: 512 }], [
 *   { addr: 0x10210, length: 1 },
 * ], "write");
 * driver.kick();
 * await backend.processQueue(0, () => {}); // the iothread's drain; the callback interrupts
 * if (driver.getUsed()?.token !== "write" || mem.u8(0x10210) !== VIRTIO_BLK_S_OK) {
 *   throw new Error("request failed");
 * }
 *
 * // The data is in the image: read it back through the block layer.
 * const back = new Uint8Array(512);
 * await disk.read(8 * 512, back);
 * if (back.some((b) => b !== 0xab)) throw new Error("data");
 * await backend.close();
 * await disk.close();
 * ```
 *
 * @module
 */
// ── Block layer and errors ─────────────────────────────────────────────────────────────────────
export {
  BlockError,
  type BlockErrorContext,
  type BlockErrorKind,
  type BlockErrorOptions,
  isBlockError,
} from "./src/errors.ts";
export type {
  BlockNode,
  Extent,
  ExtentKind,
  TruncateOptions,
  WriteOptions,
  WriteZeroesOptions,
} from "./src/block/node.ts";
export {
  checkRequest,
  checkSize,
  type RequestOp,
  type RequestTarget,
} from "./src/block/request.ts";
export { isZeroBuffer } from "./src/block/zero.ts";

// ── Host adapters: bytes on the host ───────────────────────────────────────────────────────────
export type { HostExtent, HostFile, HostSnapshots } from "./src/host/host_file.ts";
export { type HostFileOptions, openHostFile } from "./src/host/file.ts";
export { MemoryFile } from "./src/host/memory.ts";

// ── Formats: images as block nodes, and what qemu-img's verbs do to them ──────────────────────
export {
  type CacheFlags,
  cacheFlags,
  type CacheMode,
  createImage,
  type CreateOptions,
  formatNames,
  openImage,
  type OpenOptions,
  parseCacheMode,
} from "./formats/open.ts";
export { type ProbedFormat, probeFormat } from "./formats/probe.ts";
export { RawNode, type RawOptions } from "./formats/raw.ts";
export { Qcow2Node, type Qcow2OpenOptions, type Qcow2WriteOptions } from "./formats/qcow2/qcow2.ts";
export { createQcow2, type Qcow2CreateOptions } from "./formats/qcow2/create.ts";
export { type AmendProgress, amendQcow2, type Qcow2AmendOptions } from "./formats/qcow2/amend.ts";
export {
  type CheckFix,
  type CheckHost,
  checkImage,
  type CheckReport,
} from "./formats/qcow2/check.ts";
export { applySnapshot, createSnapshot, deleteSnapshot } from "./formats/qcow2/snapshot_ops.ts";
export type { SnapshotEntry, SnapshotTable } from "./formats/qcow2/snapshot.ts";
export { DirtyBitmap, Qcow2Bitmaps } from "./formats/qcow2/bitmap.ts";
export { setCorruptionSink } from "./formats/qcow2/corruption.ts";
export { imageInfo } from "./formats/image_info.ts";
export { type MapEntry, mapImage } from "./formats/map.ts";
export {
  type CellGrid,
  type ClusterMapOptions,
  type Fragmentation,
  type GuestClusterMap,
  type HostView,
  type ImageClusterMap,
  imageClusterMap,
  type LayerInfo,
} from "./formats/cluster_map.ts";
export { HOST_CLASSES, type HostClass } from "./formats/qcow2/host_map.ts";
export { convertImages, type ConvertOptions } from "./formats/convert.ts";
export { compareImages, type CompareOptions, type CompareResult } from "./formats/compare.ts";
export {
  measureImage,
  type MeasureInfo,
  type MeasureOptions,
  type MeasureSource,
} from "./formats/measure.ts";
export {
  benchMisfit,
  type BenchParams,
  type BenchResult,
  runBench,
  type SupportedCacheMode,
} from "./formats/bench.ts";
export { ddCopy, type DdCopyResult, type DdOptions, type DdPlan, planDd } from "./formats/dd.ts";
export {
  commitImage,
  type CommitOptions,
  type ImageOpener,
  type Progress,
  rebaseImage,
  type RebaseOptions,
} from "./formats/chain.ts";

// ── Virtio: guest memory, virtqueues, the virtio-pci transport ────────────────────────────────
export { GuestMemory, GuestMemoryError, type GuestRegion } from "./src/virtio/memory.ts";
export {
  type DescriptorChain,
  type DeviceQueue,
  type DriverBuffer,
  type DriverQueue,
  type QueueFeatures,
  type QueueLayout,
  type QueueStats,
  type UsedElement,
  VirtqueueError,
  type VirtqueueFault,
} from "./src/virtio/queue.ts";
export {
  type InflightLog,
  SplitDeviceQueue,
  SplitDriverQueue,
  splitRingLayout,
} from "./src/virtio/split_queue.ts";
export {
  type PackedDescriptor,
  PackedDeviceQueue,
  PackedDriverQueue,
  type PackedInflightLog,
  packedRingLayout,
} from "./src/virtio/packed_queue.ts";
export {
  featureBit,
  hasFeature,
  VIRTIO_CONFIG_S_ACKNOWLEDGE,
  VIRTIO_CONFIG_S_DRIVER,
  VIRTIO_CONFIG_S_DRIVER_OK,
  VIRTIO_CONFIG_S_FAILED,
  VIRTIO_CONFIG_S_FEATURES_OK,
  VIRTIO_CONFIG_S_NEEDS_RESET,
  VIRTIO_F_RING_PACKED,
  VIRTIO_F_VERSION_1,
  VIRTIO_ID_BLOCK,
  VIRTIO_ID_SCSI,
  VIRTIO_MSI_NO_VECTOR,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
} from "./src/virtio/features.ts";
export {
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_S_UNSUPP,
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_WRITE_ZEROES,
} from "./src/virtio/virtio_blk_constants.ts";
export {
  type ActivatedQueue,
  isPackedRing,
  queueFeaturesOf,
  type VirtioDeviceModel,
} from "./src/virtio/device.ts";
export {
  type BarHit,
  type BarRegion,
  type QueueRegisters,
  VirtioPciFunction,
  type VirtioPciOptions,
} from "./src/virtio/pci.ts";
export {
  type AccessSize,
  type GuestBus,
  IO_WINDOW,
  type MmioWindow,
  PciBus,
  type PciFunction,
} from "./src/virtio/bus.ts";
export type { DriverQueueReport, ExitCounters, ExitHandler } from "./src/virtio/exits.ts";
export { type DoorbellMode, Doorbells, type DoorbellStats } from "./src/virtio/doorbell.ts";
export {
  InterruptState,
  type InterruptStateOptions,
  type InterruptStats,
  VcpuInterrupts,
} from "./src/virtio/interrupts.ts";

// ── Devices: virtio-blk and virtio-scsi back-ends, the device type contract ──────────────────
export {
  type BackendInit,
  type BackendReady,
  type CreateBackend,
  type DeviceInfo,
  type DeviceSpec,
  type DeviceType,
  type DriveAio,
  type DriveCache,
  type DriveInfo,
  type DriveSpec,
  type OptionsSchema,
} from "./src/devices/device_type.ts";
export type { BackendHooks, DeviceBackend } from "./src/devices/backend.ts";
export type { DeviceQueueCounters, DeviceThreadCounters } from "./src/devices/iothread_protocol.ts";
export { openDrive } from "./src/devices/drive.ts";
export type { BlockErrorAction, ErrorDecision } from "./src/devices/error_policy.ts";
export {
  deviceType as virtioBlkDeviceType,
  type ResolvedVirtioBlkOptions,
  resolveVirtioBlkOptions,
  VirtioBlkBackend,
  VirtioBlkModel,
  type VirtioBlkModelHooks,
  type VirtioBlkOptions,
  VirtioBlkShared,
  type VirtioBlkStats,
} from "./src/devices/virtio_blk.ts";
export {
  type EmulatedController,
  type EmulatedDeviceType,
  type EmulatedInit,
  type EmulatedMember,
  isEmulatedType,
} from "./src/devices/emulated.ts";
export { deviceType as ideHdDeviceType } from "./src/devices/ide_type.ts";
export { ahciDeviceType } from "./src/devices/ahci_type.ts";
export {
  deviceType as virtioScsiDeviceType,
  VirtioScsiBackend,
  type VirtioScsiBackendOptions,
  type VirtioScsiHooks,
  VirtioScsiModel,
  type VirtioScsiOptions,
  VirtioScsiSharedConfig,
  type VirtioScsiStats,
} from "./src/devices/virtio_scsi.ts";

// ── SCSI: a disk target over a block node ─────────────────────────────────────────────────────
export { ScsiDisk, type ScsiDiskOptions } from "./src/scsi/disk.ts";
export { ScsiBus, type ScsiBusOptions } from "./src/scsi/bus.ts";
export type { IoErrorDecision, IoErrorPolicy, ScsiIo, ScsiOutcome } from "./src/scsi/request.ts";
export type { DiskProfile } from "./src/scsi/profile.ts";
export type { IoDisk } from "./src/scsi/medium_access.ts";
export {
  type BlockTransfer,
  type Cdb,
  type CdbCommon,
  type CdbContext,
  type CdbKind,
  DATA_IN,
  DATA_NONE,
  DATA_OUT,
  type DataDirection,
  decodeCdb,
} from "./src/scsi/cdb.ts";
export type { SenseCode, SenseData } from "./src/scsi/sense.ts";
export { ScsiBuffer } from "./src/scsi/buffer.ts";

// ── Machine: the VMM ──────────────────────────────────────────────────────────────────────────
export {
  type DeviceFault,
  type DeviceStats,
  type EmulatedStats,
  GuestProgramError,
  Machine,
  MachineError,
  type MachineOptions,
  type MachineState,
  type MachineStats,
  type QueueCounters,
  VcpuHandle,
  type VcpuOptions,
} from "./src/machine/machine.ts";
export {
  type ConfigIssue,
  type DeviceConfig,
  type MachineConfig,
  MachineConfigError,
  parseMachineConfig,
} from "./src/machine/config.ts";
export {
  deviceTypeNames,
  loadDeviceType,
  registerDeviceModule,
  registerDeviceType,
} from "./src/machine/registry.ts";

// ── Guest: the simulated guest, its jobs and reports ──────────────────────────────────────────
export {
  type GuestDevice,
  type GuestDeviceInfo,
  type GuestDeviceKind,
  type GuestDeviceSection,
  type GuestDriverOptions,
  type GuestEnv,
  type GuestLunInfo,
  type GuestRequest,
  type GuestRun,
  type GuestRunResult,
  type GuestRunSection,
  GuestSetupError,
  runGuest,
} from "./src/guest/guest.ts";
export {
  JobError,
  type JobIssue,
  type JobSpec,
  parseJobArgs,
  parseJobFile,
  parseJobObject,
  type RwMode,
} from "./src/guest/job.ts";
export {
  type DirectionResult,
  type IoFailure,
  type JobResult,
  runWorkload,
  type VerifyResult,
  type WorkloadGroup,
  type WorkloadOptions,
  type WorkloadResult,
  type WorkloadTimeline,
  type WorkloadTotal,
} from "./src/guest/workload.ts";
export type { BlockTarget, IoOp, IoRequest, IoStatus } from "./src/guest/block_target.ts";
export type { BlkDriverOptions } from "./src/guest/blk_driver.ts";
export type { LatencySummary } from "./src/guest/latency.ts";
export type { VerifyFailure, VerifyMode, VerifyReason } from "./src/guest/verify.ts";
export type { IdleFn, InterruptPreference } from "./src/guest/virtio_driver.ts";
export type { ScsiAddress, ScsiDriverOptions, ScsiEventStats } from "./src/guest/scsi_driver.ts";
export {
  type DeviceReportJson,
  type ExitNumbers,
  formatReport,
  type QueueNumbers,
  type ReportJson,
  reportJson,
  type RunReport,
  type RunReportJson,
  type VirtioJson,
  type VirtioNumbers,
  type VirtioSummary,
} from "./src/guest/report.ts";
export { fioJson, type FioJsonInput, type Json } from "./src/guest/fio_json.ts";
export { RunControl } from "./src/guest/run_control.ts";

/**
 * The simulated guest's vCPU Worker entry: hand it to {@linkcode Machine.startVcpu} with a
 * {@linkcode GuestRequest} (or `{ serve: true }` to send requests one by one with
 * {@linkcode VcpuHandle.request}); the result is a {@linkcode GuestRunResult}.
 */
export const GUEST_VCPU_MODULE: URL = new URL("./src/guest/vcpu.ts", import.meta.url);

if (import.meta.main) {
  const { main } = await import("./src/cli/main.ts");
  Deno.exit(await main(Deno.args));
}
