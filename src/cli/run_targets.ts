/**
 * The disks of a `vstor run` machine and which jobs run on which: every virtio-blk device's disk
 * and every LUN of every virtio-scsi device is a target, named by its drive id (`--drive id=…`,
 * or `id` in a machine file's drive), by its device id (virtio-blk), and as `DEVICE/LUN` or
 * `DEVICE/TARGET/LUN` (virtio-scsi); an emulated disk (`ide-hd`, `ahci`) by its drive or device
 * id. A job's `filename=` names its targets, `:`-separated as in
 * fio; a job without one runs on every target. All of them run at once, one guest run per target.
 *
 * @module
 */
import type { GuestRun } from "../guest/guest.ts";
import { JobError, type JobSpec } from "../guest/job.ts";
import type { MachineConfigInput } from "../machine/config.ts";

/** One disk the guest can run jobs on. */
export interface RunTarget {
  /** The name reports use: the drive id, else the device id (virtio-blk) or `DEVICE/LUN`. */
  readonly name: string;
  /** Every name `filename=` may use for it. */
  readonly names: readonly string[];
  /** The device id. */
  readonly device: string;
  readonly kind: "virtio-blk" | "virtio-scsi" | "ide-hd" | "ahci";
  /** virtio-scsi: where the disk sits. */
  readonly lun?: { readonly target: number; readonly lun: number };
}

type DeviceInput = NonNullable<MachineConfigInput["devices"]>[number];

function lunPlaces(device: DeviceInput, count: number): Array<{ target: number; lun: number }> {
  const luns = (device.options as { luns?: unknown } | undefined)?.luns;
  return Array.from({ length: count }, (_, i) => {
    const place = Array.isArray(luns) ? luns[i] as { target?: unknown; lun?: unknown } : undefined;
    const target = typeof place?.target === "number" ? place.target : 0;
    const lun = typeof place?.lun === "number" ? place.lun : i;
    return { target, lun };
  });
}

/**
 * The targets of a machine configuration, in device order (a configuration the machine will
 * validate: malformed devices are skipped here and refused there).
 */
export function targetsOf(config: MachineConfigInput): RunTarget[] {
  const out: RunTarget[] = [];
  for (const device of config.devices ?? []) {
    if (typeof device !== "object" || device === null || typeof device.id !== "string") continue;
    if (
      device.type === "virtio-blk" || device.type === "ide-hd" || device.type === "ahci"
    ) {
      const driveId = device.drive?.id;
      const names = [...new Set([driveId, device.id].filter((n) => n !== undefined))];
      out.push({ name: names[0]!, names, device: device.id, kind: device.type });
    } else if (device.type === "virtio-scsi") {
      const drives = device.drives ?? (device.drive === undefined ? [] : [device.drive]);
      const places = lunPlaces(device, drives.length);
      drives.forEach((drive, i) => {
        const place = places[i]!;
        const byAddress = [`${device.id}/${place.target}/${place.lun}`];
        if (place.target === 0) byAddress.unshift(`${device.id}/${place.lun}`);
        const names = drive.id === undefined ? byAddress : [drive.id, ...byAddress];
        out.push({ name: names[0]!, names, device: device.id, kind: "virtio-scsi", lun: place });
      });
    }
  }
  return out;
}

/**
 * The guest runs for `jobs` on `targets`: one run per target that has jobs, holding them in job
 * order. `where(jobIndex)` names a job's `filename` in errors (`jobs[1].filename`).
 *
 * @throws {JobError} for a `filename` that names no target, or a machine without disks
 */
export function assignJobs(
  jobs: readonly JobSpec[],
  targets: readonly RunTarget[],
  where: (jobIndex: number) => string,
): GuestRun[] {
  if (targets.length === 0) {
    throw new JobError([{ path: "(machine)", message: "has no disk to run jobs on" }]);
  }
  const byName = new Map<string, number>();
  targets.forEach((t, i) => {
    for (const name of t.names) if (!byName.has(name)) byName.set(name, i);
  });
  const perTarget: JobSpec[][] = targets.map(() => []);
  const issues: Array<{ path: string; message: string }> = [];
  jobs.forEach((job, j) => {
    if (job.filename === null) {
      for (const list of perTarget) list.push(job);
      return;
    }
    const chosen = new Set<number>();
    for (const name of job.filename.split(":")) {
      const index = byName.get(name);
      if (index === undefined) {
        const known = targets.map((t) => t.names.join(" = ")).join(", ");
        issues.push({
          path: where(j),
          message: `no disk named "${name}" (the disks: ${known})`,
        });
      } else if (!chosen.has(index)) {
        chosen.add(index);
        perTarget[index]!.push(job);
      }
    }
  });
  if (issues.length > 0) throw new JobError(issues);
  const runs: GuestRun[] = [];
  targets.forEach((t, i) => {
    const mine = perTarget[i]!;
    if (mine.length === 0) return;
    runs.push({
      device: t.device,
      name: t.name,
      jobs: mine,
      ...(t.lun === undefined ? {} : { lun: { target: t.lun.target, lun: t.lun.lun } }),
    });
  });
  return runs;
}
