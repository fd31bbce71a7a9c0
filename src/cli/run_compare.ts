/**
 * `vstor run --compare-devices` (and the main job's last step): one job on one image through every
 * kind of disk the machine has — IDE in PIO and DMA mode, AHCI with NCQ, virtio-blk with trapped
 * doorbells and with ioeventfd + EVENT_IDX, virtio-scsi — one machine each, in turn, and one table
 * of what each cost: IOPS, exits, interrupts and notifications per request, and CPU per request.
 *
 * @module
 */
import type { GuestRequest } from "../guest/guest.ts";
import type { JobSpec } from "../guest/job.ts";
import { summarizeVirtio } from "../guest/report.ts";
import type { RunControl } from "../guest/run_control.ts";
import type { MachineConfigInput } from "../machine/config.ts";
import { type MachineRun, runMachine } from "./run_machine.ts";
import { guestFailure } from "./run_report.ts";
import { assignJobs, targetsOf } from "./run_targets.ts";

/** One device of --compare-devices: how it attaches the image, and what the table calls it. */
interface DeviceRow {
  readonly label: string;
  readonly device: Record<string, unknown>;
}

/** The devices --compare-devices runs the job on, from trap-everything to virtio at its best. */
export function compareDeviceRows(drive: Record<string, unknown>): DeviceRow[] {
  return [
    { label: "IDE (PIO)", device: { type: "ide-hd", drive, options: { mode: "pio" } } },
    { label: "IDE (DMA)", device: { type: "ide-hd", drive, options: { mode: "dma" } } },
    { label: "AHCI (NCQ)", device: { type: "ahci", drive, options: { ncq: true } } },
    {
      label: "virtio-blk, trapped doorbells",
      device: { type: "virtio-blk", drive, eventIdx: false, ioeventfd: false },
    },
    {
      label: "virtio-blk, ioeventfd + event-idx",
      device: { type: "virtio-blk", drive, eventIdx: true, ioeventfd: true },
    },
    {
      label: "virtio-scsi",
      device: {
        type: "virtio-scsi",
        drives: [drive],
        eventIdx: true,
        ioeventfd: true,
        options: { luns: [{ target: 0, lun: 0 }] },
      },
    },
  ];
}

/** One row of the device comparison: its figures from one run. */
export interface DeviceFigures {
  readonly label: string;
  readonly iops: number;
  readonly requests: number;
  readonly exitsPerRequest: number | null;
  readonly interruptsPerRequest: number;
  /** Requests per notification (doorbell write or command issue). */
  readonly requestsPerNotification: number;
  /** Process CPU µs per request (every thread). */
  readonly cpuPerRequest: number | null;
}

/** A run's figures for the device table. */
export function deviceFigures(label: string, run: MachineRun): DeviceFigures {
  const device = run.run.devices[0];
  const summary = device === undefined ? summarizeVirtio(run.run.virtio) : device.summary;
  const t = run.run.result.total;
  const iops = t.read.iops + t.write.iops + t.trim.iops;
  const requests = summary.requests;
  // Exits over the whole run (the guest's own probe and setup excluded: they precede the jobs).
  const exits = run.run.virtio.exits;
  const exitsPerRequest = exits === undefined || requests === 0
    ? null
    : (exits.config + exits.mmio + (exits.pio ?? 0)) / requests;
  return {
    label,
    iops,
    requests,
    exitsPerRequest,
    interruptsPerRequest: summary.interruptsPerRequest,
    requestsPerNotification: summary.averageBatch,
    cpuPerRequest: requests > 0 ? run.cpuMicros / requests : null,
  };
}

/** The device comparison as a page's summary table: headers and rows. */
export function deviceSummary(
  rows: readonly DeviceFigures[],
): { headers: string[]; rows: Array<Array<string | number>> } {
  return {
    headers: [
      "device",
      "IOPS",
      "requests",
      "exits/req",
      "interrupts/req",
      "req/notify",
      "CPU µs/req",
    ],
    rows: rows.map((r) => [
      r.label,
      Math.round(r.iops),
      r.requests,
      r.exitsPerRequest === null ? "-" : Number(r.exitsPerRequest.toFixed(3)),
      Number(r.interruptsPerRequest.toFixed(3)),
      Number(r.requestsPerNotification.toFixed(1)),
      r.cpuPerRequest === null ? "-" : Math.round(r.cpuPerRequest),
    ]),
  };
}

/** The device comparison table. */
export function deviceTable(rows: readonly DeviceFigures[]): string {
  const header = [
    "device",
    "IOPS",
    "requests",
    "exits/req",
    "interrupts/req",
    "req/notify",
    "CPU µs/req",
  ];
  const table = [header];
  for (const r of rows) {
    table.push([
      r.label,
      Math.round(r.iops).toLocaleString("en-US"),
      String(r.requests),
      r.exitsPerRequest === null ? "-" : r.exitsPerRequest.toFixed(r.exitsPerRequest < 10 ? 3 : 0),
      r.interruptsPerRequest.toFixed(3),
      r.requestsPerNotification.toFixed(1),
      r.cpuPerRequest === null ? "-" : r.cpuPerRequest.toFixed(0),
    ]);
  }
  const widths = header.map((_, c) => Math.max(...table.map((r) => r[c]!.length)));
  return table.map((r) =>
    r.map((cell, c) => c === 0 ? cell.padEnd(widths[c]!) : cell.padStart(widths[c]!)).join("  ")
  ).join("\n") + "\n";
}

/** How {@linkcode compareDeviceRuns} runs the machines. */
export interface CompareRunOptions {
  /** Guest RAM of each machine, MiB. */
  readonly memoryMiB?: number;
  /** Shared with every guest: `stop()` ends the current run and skips the rest. */
  readonly control?: RunControl;
  /** The live progress line's update, and what ends it after each run. */
  readonly onProgress?: (ops: number, bytes: number, elapsedMs: number) => void;
  readonly onEnd?: () => void;
  /** True once the user asked to stop (Ctrl-C): no further machine starts. */
  readonly interrupted?: () => boolean;
}

/**
 * Runs `jobs` on `drive` through each device of {@linkcode compareDeviceRows}, one machine at a
 * time (every job on the one disk, whatever its filename= said).
 */
export async function compareDeviceRuns(
  drive: Record<string, unknown>,
  jobs: readonly JobSpec[],
  options: CompareRunOptions = {},
): Promise<Array<{ label: string; run: MachineRun }>> {
  const mine = jobs.map((j) => ({ ...j, filename: null }));
  const rows: Array<{ label: string; run: MachineRun }> = [];
  for (const row of compareDeviceRows(drive)) {
    if (options.interrupted?.() === true) break;
    const machine: MachineConfigInput = {
      ...(options.memoryMiB === undefined ? {} : { memoryMiB: options.memoryMiB }),
      devices: [
        { id: "disk", ...row.device } as NonNullable<MachineConfigInput["devices"]>[number],
      ],
    };
    const request: GuestRequest = {
      runs: assignJobs(mine, targetsOf(machine), () => "--filename"),
    };
    try {
      const run = await runMachine(machine, request, {
        ...(options.control === undefined ? {} : { control: options.control }),
        ...(options.onProgress === undefined ? {} : { onProgress: options.onProgress }),
      });
      rows.push({ label: row.label, run });
    } catch (e) {
      throw guestFailure(e);
    } finally {
      options.onEnd?.();
    }
  }
  return rows;
}
