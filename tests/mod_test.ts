/**
 * The public API is what `mod.ts` exports: these lists name it per layer, so that removing (or
 * adding) an export is a deliberate change made here too. Values are checked at run time; types
 * by the type checker (a missing type fails `deno check` and `deno test` on this file). The CLI's
 * `main` is not part of the library: `mod.ts` runs it only as the main module.
 */
import assert from "node:assert/strict";
import * as vstor from "../mod.ts";

/** The runtime exports of `mod.ts`, per layer. */
const VALUES: Record<string, readonly string[]> = {
  block: [
    "BlockError",
    "checkRequest",
    "checkSize",
    "isBlockError",
    "isZeroBuffer",
  ],
  host: [
    "MemoryFile",
    "openHostFile",
  ],
  formats: [
    "amendQcow2",
    "applySnapshot",
    "benchMisfit",
    "checkImage",
    "commitImage",
    "compareImages",
    "cacheFlags",
    "convertImages",
    "createImage",
    "createQcow2",
    "createSnapshot",
    "ddCopy",
    "deleteSnapshot",
    "DirtyBitmap",
    "formatNames",
    "HOST_CLASSES",
    "imageClusterMap",
    "imageInfo",
    "mapImage",
    "measureImage",
    "openImage",
    "parseCacheMode",
    "planDd",
    "probeFormat",
    "Qcow2Bitmaps",
    "Qcow2Node",
    "RawNode",
    "rebaseImage",
    "runBench",
    "setCorruptionSink",
  ],
  virtio: [
    "Doorbells",
    "featureBit",
    "GuestMemory",
    "GuestMemoryError",
    "hasFeature",
    "InterruptState",
    "IO_WINDOW",
    "isPackedRing",
    "PackedDeviceQueue",
    "PackedDriverQueue",
    "packedRingLayout",
    "PciBus",
    "queueFeaturesOf",
    "SplitDeviceQueue",
    "SplitDriverQueue",
    "splitRingLayout",
    "VcpuInterrupts",
    "VIRTIO_BLK_S_IOERR",
    "VIRTIO_BLK_S_OK",
    "VIRTIO_BLK_S_UNSUPP",
    "VIRTIO_BLK_T_DISCARD",
    "VIRTIO_BLK_T_FLUSH",
    "VIRTIO_BLK_T_GET_ID",
    "VIRTIO_BLK_T_IN",
    "VIRTIO_BLK_T_OUT",
    "VIRTIO_BLK_T_WRITE_ZEROES",
    "VIRTIO_CONFIG_S_ACKNOWLEDGE",
    "VIRTIO_CONFIG_S_DRIVER",
    "VIRTIO_CONFIG_S_DRIVER_OK",
    "VIRTIO_CONFIG_S_FAILED",
    "VIRTIO_CONFIG_S_FEATURES_OK",
    "VIRTIO_CONFIG_S_NEEDS_RESET",
    "VIRTIO_F_RING_PACKED",
    "VIRTIO_F_VERSION_1",
    "VIRTIO_ID_BLOCK",
    "VIRTIO_ID_SCSI",
    "VIRTIO_MSI_NO_VECTOR",
    "VIRTIO_RING_F_EVENT_IDX",
    "VIRTIO_RING_F_INDIRECT_DESC",
    "VirtioPciFunction",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "VirtqueueError",
  ],
  devices: [
    "ahciDeviceType",
    "ideHdDeviceType",
    "isEmulatedType",
    "openDrive",
    "resolveVirtioBlkOptions",
    "VirtioBlkBackend",
    "virtioBlkDeviceType",
    "VirtioBlkModel",
    "VirtioBlkShared",
    "VirtioScsiBackend",
    "virtioScsiDeviceType",
    "VirtioScsiModel",
    "VirtioScsiSharedConfig",
  ],
  scsi: [
    "DATA_IN",
    "DATA_NONE",
    "DATA_OUT",
    "decodeCdb",
    "ScsiBuffer",
    "ScsiBus",
    "ScsiDisk",
  ],
  machine: [
    "deviceTypeNames",
    "GuestProgramError",
    "loadDeviceType",
    "Machine",
    "MachineConfigError",
    "MachineError",
    "parseMachineConfig",
    "registerDeviceModule",
    "registerDeviceType",
    "VcpuHandle",
  ],
  guest: [
    "fioJson",
    "formatReport",
    "GUEST_VCPU_MODULE",
    "GuestSetupError",
    "JobError",
    "parseJobArgs",
    "parseJobFile",
    "parseJobObject",
    "reportJson",
    "RunControl",
    "runGuest",
    "runWorkload",
  ],
};

/** The type-only exports of the block layer (a missing one does not compile). */
export type TypesBlock = [
  vstor.BlockErrorContext,
  vstor.BlockErrorKind,
  vstor.BlockErrorOptions,
  vstor.BlockNode,
  vstor.Extent,
  vstor.ExtentKind,
  vstor.RequestOp,
  vstor.RequestTarget,
  vstor.TruncateOptions,
  vstor.WriteOptions,
  vstor.WriteZeroesOptions,
];

/** The type-only exports of the host layer (a missing one does not compile). */
export type TypesHost = [
  vstor.HostExtent,
  vstor.HostFile,
  vstor.HostFileOptions,
];

/** The type-only exports of the formats layer (a missing one does not compile). */
export type TypesFormats = [
  vstor.AmendProgress,
  vstor.BenchParams,
  vstor.BenchResult,
  vstor.CellGrid,
  vstor.CheckFix,
  vstor.CheckHost,
  vstor.CheckReport,
  vstor.ClusterMapOptions,
  vstor.CommitOptions,
  vstor.CompareOptions,
  vstor.CompareResult,
  vstor.ConvertOptions,
  vstor.CreateOptions,
  vstor.DdCopyResult,
  vstor.DdOptions,
  vstor.DdPlan,
  vstor.Fragmentation,
  vstor.GuestClusterMap,
  vstor.HostClass,
  vstor.HostView,
  vstor.ImageClusterMap,
  vstor.ImageOpener,
  vstor.LayerInfo,
  vstor.MapEntry,
  vstor.MeasureInfo,
  vstor.MeasureOptions,
  vstor.MeasureSource,
  vstor.OpenOptions,
  vstor.CacheMode,
  vstor.CacheFlags,
  vstor.ProbedFormat,
  vstor.Progress,
  vstor.Qcow2AmendOptions,
  vstor.Qcow2CreateOptions,
  vstor.Qcow2OpenOptions,
  vstor.Qcow2WriteOptions,
  vstor.RawOptions,
  vstor.RebaseOptions,
  vstor.SnapshotEntry,
  vstor.SnapshotTable,
  vstor.SupportedCacheMode,
];

/** The type-only exports of the virtio layer (a missing one does not compile). */
export type TypesVirtio = [
  vstor.AccessSize,
  vstor.ActivatedQueue,
  vstor.BarHit,
  vstor.BarRegion,
  vstor.DescriptorChain,
  vstor.DeviceQueue,
  vstor.DoorbellMode,
  vstor.DoorbellStats,
  vstor.DriverBuffer,
  vstor.DriverQueue<unknown>,
  vstor.DriverQueueReport,
  vstor.ExitCounters,
  vstor.ExitHandler,
  vstor.GuestBus,
  vstor.GuestRegion,
  vstor.InterruptStateOptions,
  vstor.InterruptStats,
  vstor.MmioWindow,
  vstor.QueueFeatures,
  vstor.QueueLayout,
  vstor.QueueRegisters,
  vstor.QueueStats,
  vstor.UsedElement<unknown>,
  vstor.VirtioDeviceModel,
  vstor.VirtioPciOptions,
  vstor.VirtqueueFault,
];

/** The type-only exports of the devices layer (a missing one does not compile). */
export type TypesDevices = [
  vstor.BackendHooks,
  vstor.BackendInit,
  vstor.BackendReady,
  vstor.CreateBackend,
  vstor.DeviceBackend,
  vstor.DeviceInfo,
  vstor.DeviceQueueCounters,
  vstor.DeviceSpec,
  vstor.DeviceThreadCounters,
  vstor.DeviceType,
  vstor.DriveCache,
  vstor.DriveInfo,
  vstor.DriveSpec,
  vstor.OptionsSchema,
  vstor.ResolvedVirtioBlkOptions,
  vstor.VirtioBlkModelHooks,
  vstor.VirtioBlkOptions,
  vstor.VirtioBlkStats,
  vstor.VirtioScsiBackendOptions,
  vstor.VirtioScsiHooks,
  vstor.VirtioScsiOptions,
  vstor.VirtioScsiStats,
];

/** The type-only exports of the scsi layer (a missing one does not compile). */
export type TypesScsi = [
  vstor.BlockTransfer,
  vstor.Cdb,
  vstor.CdbCommon,
  vstor.CdbContext,
  vstor.CdbKind,
  vstor.DataDirection,
  vstor.DiskProfile,
  vstor.IoDisk,
  vstor.ScsiBusOptions,
  vstor.ScsiDiskOptions,
  vstor.ScsiIo,
  vstor.ScsiOutcome,
  vstor.SenseCode,
  vstor.SenseData,
];

/** The type-only exports of the machine layer (a missing one does not compile). */
export type TypesMachine = [
  vstor.ConfigIssue,
  vstor.DeviceConfig,
  vstor.DeviceFault,
  vstor.DeviceStats,
  vstor.MachineConfig,
  vstor.MachineOptions,
  vstor.MachineState,
  vstor.MachineStats,
  vstor.QueueCounters,
  vstor.VcpuOptions,
];

/** The type-only exports of the guest layer (a missing one does not compile). */
export type TypesGuest = [
  vstor.BlkDriverOptions,
  vstor.BlockTarget,
  vstor.DeviceReportJson,
  vstor.DirectionResult,
  vstor.ExitNumbers,
  vstor.FioJsonInput,
  vstor.GuestDevice,
  vstor.GuestDeviceInfo,
  vstor.GuestDeviceSection,
  vstor.GuestDriverOptions,
  vstor.GuestEnv,
  vstor.GuestLunInfo,
  vstor.GuestRequest,
  vstor.GuestRun,
  vstor.GuestRunResult,
  vstor.GuestRunSection,
  vstor.IdleFn,
  vstor.InterruptPreference,
  vstor.IoFailure,
  vstor.IoOp,
  vstor.IoRequest,
  vstor.IoStatus,
  vstor.JobIssue,
  vstor.JobResult,
  vstor.JobSpec,
  vstor.Json,
  vstor.LatencySummary,
  vstor.QueueNumbers,
  vstor.ReportJson,
  vstor.RunReport,
  vstor.RunReportJson,
  vstor.RwMode,
  vstor.ScsiAddress,
  vstor.ScsiDriverOptions,
  vstor.ScsiEventStats,
  vstor.VerifyFailure,
  vstor.VerifyMode,
  vstor.VerifyReason,
  vstor.VerifyResult,
  vstor.VirtioJson,
  vstor.VirtioNumbers,
  vstor.VirtioSummary,
  vstor.WorkloadGroup,
  vstor.WorkloadOptions,
  vstor.WorkloadResult,
  vstor.WorkloadTimeline,
  vstor.WorkloadTotal,
];

Deno.test("mod.ts exports every public value of every layer, and nothing else", () => {
  const listed = Object.values(VALUES).flat();
  assert.equal(new Set(listed).size, listed.length, "a name is listed twice");
  const exported = Object.keys(vstor).sort();
  assert.deepEqual(exported, [...listed].sort());
  for (const name of listed) {
    assert.notEqual(vstor[name as keyof typeof vstor], undefined, `${name} is undefined`);
  }
});

Deno.test("mod.ts does not export the CLI's main", () => {
  assert.equal("main" in vstor, false);
});

Deno.test("mod.ts still runs the CLI as the main module", async () => {
  const mod = new URL("../mod.ts", import.meta.url);
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", mod.href, "--version"],
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
  assert.match(new TextDecoder().decode(out.stdout), /^vstor \d+\.\d+\.\d+\n/);
});

Deno.test("GUEST_VCPU_MODULE names the guest's vCPU Worker entry", async () => {
  assert.equal(vstor.GUEST_VCPU_MODULE.protocol, "file:");
  assert.ok((await Deno.stat(vstor.GUEST_VCPU_MODULE)).isFile);
});
