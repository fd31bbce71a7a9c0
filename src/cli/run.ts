/**
 * `vstor run`: a simulated VM. Images attach QEMU-style (`--drive` + `--device`, or a JSON
 * machine file); the guest in the vCPU Worker enumerates PCI, brings the virtio devices up and
 * runs fio-like jobs on every disk a job names (`filename=`), all at once; the report is fio's —
 * as text, or fio's JSON (`--output-format=json`) — plus the virtio numbers (kicks, interrupts
 * and exits per request, batch sizes), and `--html FILE` draws it. Ctrl-C stops the jobs and
 * prints what they did. With no attachment it runs the main job (see `main_job.ts`).
 *
 * @module
 */
import type { GuestRequest, GuestRunResult } from "../guest/guest.ts";
import { fioJsonText } from "../guest/fio_json.ts";
import {
  catchSignals,
  EXIT_INTERRUPTED,
  guestFailure,
  type OutputFormat,
  reportRun,
  runFioJson,
} from "./run_report.ts";
import {
  JobError,
  jobFileJsonSchema,
  type JobSpec,
  parseJobArgs,
  parseJobFile,
} from "../guest/job.ts";
import { summarizeVirtio } from "../guest/report.ts";
import { RunControl } from "../guest/run_control.ts";
import {
  MachineConfigError,
  type MachineConfigInput,
  parseMachineConfig,
} from "../machine/config.ts";
import { type CliIo, EXIT_ERROR, EXIT_OK, UsageError } from "./cli_io.ts";
import { iniLineOf, iniLines, jsonLines, lineOf } from "./file_lines.ts";
import { runPage } from "./html/run_page.ts";
import { writePage } from "./html/page.ts";
import { type MachineRun, progressLine, runMachine, runSucceeded } from "./run_machine.ts";
import { machineFromArgs } from "./run_args.ts";
import { assignJobs, targetsOf } from "./run_targets.ts";
import { compareDeviceRuns, deviceFigures, deviceSummary, deviceTable } from "./run_compare.ts";

export const RUN_USAGE =
  "vstor run [--drive SPEC]... [--device SPEC]... [--machine FILE.json] [--memory MIB] " +
  "[--job FILE | --rw=… --bs=… --iodepth=… …] [--output-format=normal|json|json+] " +
  "[--html FILE] [--compare-notifications | --compare-devices] [--schema] [-q]";

const HELP = `usage: ${RUN_USAGE}

Runs a simulated guest against images attached through virtio devices: fio-style jobs on every
disk at once (a job's filename= names its disks), with fio's report plus what virtio did. With no
attachment, runs the main job: a base qcow2, a snapshot and a backing-file clone made in a
temporary directory, the clone on virtio-blk and the base (read-only) on virtio-scsi, a short
verified mixed workload.

Attaching images:
  --drive file=F[,format=raw|qcow2][,id=ID][,readonly=on|off][,cache=writeback|writethrough|unsafe|none|directsync]
                     [,werror=report|ignore|stop|enospc][,rerror=report|ignore|stop|enospc]
                     [,aio=threads|io_uring|native]
                      aio: requests through a pool of Workers, or many in flight through
                      io_uring (native = io_uring; needs cache=none or directsync);
                      default: synchronous calls on the device's iothread
                      what a failed write/read does (QEMU's; default werror=enospc, rerror=report):
                      stop ends the run with "the VM stopped: …", exit 1
  --device virtio-blk,drive=ID[,id=DEV][,num-queues=N][,queue-size=N][,event-idx=on|off]
                     [,indirect=on|off][,packed=on|off][,ioeventfd=on|off][,poll=on|off]
                     [,serial=S][,discard=on|off]
  --device virtio-scsi,id=DEV[,num_queues=N][,event-idx=…][,ioeventfd=…]
  --device scsi-hd,bus=DEV,drive=ID[,lun=N][,scsi-id=N]
  --device ide-hd,drive=ID[,id=DEV][,mode=pio|dma]
                      a fully emulated IDE disk on the PIIX3 controller (up to two); the guest
                      moves data through the 16-bit data port (pio) or bus-master DMA (default)
  --device ahci,drive=ID[,id=DEV][,ncq=on|off]
                      a SATA disk on an emulated AHCI controller (ICH9), NCQ on by default
  --machine FILE      the whole machine as JSON ({ memoryMiB, devices: [...] })
  --memory MIB        guest RAM (default 256)

Jobs (fio's names; see the README's job file reference, or --schema):
  --job FILE          a job file: JSON ({ "global": {…}, "jobs": [{…}] }) or fio's INI
  --name=N --rw=… --bs=… --iodepth=… --size=… --offset=… --runtime=… --io_size=…
  --numjobs=… --rwmixread=… --verify=… --verify_only --seed=… --filename=DISK[:DISK…]
                      the same on the command line; each --name starts a job
  Disks are named by drive id (--drive id=…), by virtio-blk device id, or as DEV/LUN for a
  virtio-scsi disk. A job without filename= runs on every disk.

Report:
  --output-format=normal|json|json+
                      fio's text report (default), fio's JSON (json+ adds latency bins);
                      vstor's virtio numbers are under "vstor" keys
  --output=human|json the same as normal|json
  --html FILE         also write the report as one self-contained HTML page (latency histograms,
                      IOPS over time, notifications per queue)
  --compare-notifications
                      the same job with event-idx on/off and ioeventfd on/off, side by side
  --compare-devices   the same job on the one attached image through IDE (PIO), IDE (DMA),
                      AHCI (NCQ), virtio-blk with trapped doorbells, virtio-blk with ioeventfd
                      and event-idx, and virtio-scsi: one table of IOPS, exits, interrupts and
                      CPU per request
  --schema            print the JSON Schema of job files and exit
  -q                  no live progress line

Ctrl-C stops the jobs: the report shows what they did, the images are closed clean, exit 130.

Example:
  vstor create -f qcow2 disk.qcow2 1G
  vstor run --drive file=disk.qcow2,id=d0 --device virtio-blk,drive=d0,num-queues=2 \\
      --name=r --rw=randread --bs=4k --iodepth=32 --runtime=5 --html report.html
`;

/** Our own options; everything else on the command line is a job option for the guest. */
interface RunArgs {
  drives: string[];
  devices: string[];
  machine?: string;
  memoryMiB?: number;
  jobFile?: string;
  output: OutputFormat;
  html?: string;
  schema: boolean;
  compare: boolean;
  compareDevices: boolean;
  quiet: boolean;
  help: boolean;
  jobArgs: string[];
}

function parseFormat(name: string, v: string): OutputFormat {
  if (v === "normal" || v === "human") return "normal";
  if (v === "json" || v === "json+") return v;
  throw new UsageError(`${name}: '${v}' is not one of normal, json, json+`);
}

function splitArgs(args: readonly string[]): RunArgs {
  const out: RunArgs = {
    drives: [],
    devices: [],
    output: "normal",
    schema: false,
    compare: false,
    compareDevices: false,
    quiet: false,
    help: false,
    jobArgs: [],
  };
  for (let i = 0; i < args.length; i++) {
    const arg = args[i]!;
    const eq = arg.indexOf("=");
    const name = eq < 0 ? arg : arg.slice(0, eq);
    const value = (): string => {
      if (eq >= 0) return arg.slice(eq + 1);
      const next = args[++i];
      if (next === undefined) throw new UsageError(`Option ${name} needs a value`);
      return next;
    };
    switch (name) {
      case "--drive":
      case "-drive":
        out.drives.push(value());
        break;
      case "--device":
      case "-device":
        out.devices.push(value());
        break;
      case "--machine":
        out.machine = value();
        break;
      case "--memory":
      case "-m": {
        const v = value();
        if (!/^\d+$/.test(v)) throw new UsageError(`--memory: '${v}' is not a whole number of MiB`);
        out.memoryMiB = Number(v);
        break;
      }
      case "--job":
        out.jobFile = value();
        break;
      case "--output": {
        const v = value();
        if (v !== "human" && v !== "json") throw new UsageError(`--output: '${v}' (human or json)`);
        out.output = parseFormat(name, v);
        break;
      }
      case "--output-format":
        out.output = parseFormat(name, value());
        break;
      case "--html": {
        const v = value();
        if (v === "") throw new UsageError("--html: needs a file name");
        out.html = v;
        break;
      }
      case "--schema":
        out.schema = true;
        break;
      case "--compare-notifications":
        out.compare = true;
        break;
      case "--compare-devices":
        out.compareDevices = true;
        break;
      case "-q":
      case "--quiet":
        out.quiet = true;
        break;
      case "-h":
      case "--help":
        out.help = true;
        break;
      default:
        if (!arg.startsWith("--")) throw new UsageError(`Unexpected argument '${arg}'`);
        out.jobArgs.push(arg);
    }
  }
  return out;
}

/** Read a file the user named, with one clear error. */
async function readUserFile(path: string, what: string): Promise<string> {
  try {
    return await Deno.readTextFile(path);
  } catch (e) {
    const reason = e instanceof Deno.errors.NotFound
      ? "No such file or directory"
      : e instanceof Deno.errors.PermissionDenied
      ? "Permission denied"
      : e instanceof Deno.errors.IsADirectory
      ? "Is a directory"
      : e instanceof Error
      ? e.message.replace(/ \(os error \d+\).*$/s, "")
      : String(e);
    throw new Error(`Could not read ${what} '${path}': ${reason}`);
  }
}

/** A job or machine file error, each issue as `FILE:LINE: path: message`. */
export class RunFileError extends Error {
  override readonly name = "RunFileError";
}

function located(
  file: string,
  issues: ReadonlyArray<{ path: string; message: string }>,
  lineFor: (path: string) => number | undefined,
): RunFileError {
  return new RunFileError(
    issues.map((i) => {
      const line = lineFor(i.path);
      const where = line === undefined ? file : `${file}:${line}`;
      const path = i.path === "" || i.path === "(file)" ? "" : `${i.path}: `;
      return `${where}: ${path}${i.message}`;
    }).join("\n"),
  );
}

/** The jobs of a job file, errors located by file and line. */
function jobsFromFile(
  path: string,
  text: string,
): { jobs: JobSpec[]; where: (j: number) => string } {
  const json = text.trimStart().startsWith("{");
  try {
    const jobs = parseJobFile(text);
    return {
      jobs,
      where: (j) => json ? `${path}: jobs[${j}].filename` : `${path}: [${jobs[j]?.name}].filename`,
    };
  } catch (e) {
    if (!(e instanceof JobError)) throw e;
    if (json) {
      const lines = jsonLines(text);
      throw located(path, e.issues, (p) => lineOf(lines, p));
    }
    const lines = iniLines(text);
    throw located(path, e.issues, (p) => {
      const m = /^line (\d+)$/.exec(p);
      return m !== null ? Number(m[1]) : iniLineOf(lines, p);
    });
  }
}

/** The machine of a machine file, validated, errors located by file and line. */
async function machineFromFile(path: string, memoryMiB?: number): Promise<MachineConfigInput> {
  const text = await readUserFile(path, "the machine file");
  let config: MachineConfigInput;
  try {
    config = JSON.parse(text) as MachineConfigInput;
  } catch (e) {
    throw new RunFileError(`${path}: not JSON: ${(e as Error).message}`);
  }
  if (memoryMiB !== undefined && typeof config === "object" && config !== null) {
    config = { ...config, memoryMiB };
  }
  checkMachine(config, path, text);
  return config;
}

function checkMachine(config: MachineConfigInput, path: string, text: string): void {
  try {
    parseMachineConfig(config);
  } catch (e) {
    if (!(e instanceof MachineConfigError)) throw e;
    const lines = jsonLines(text);
    throw located(path, e.issues, (p) => lineOf(lines, p));
  }
}

/** The four notification modes of --compare-notifications. */
const MODES = [
  { eventIdx: true, ioeventfd: true },
  { eventIdx: false, ioeventfd: true },
  { eventIdx: true, ioeventfd: false },
  { eventIdx: false, ioeventfd: false },
] as const;

function withModes(
  config: MachineConfigInput,
  mode: { eventIdx: boolean; ioeventfd: boolean },
): MachineConfigInput {
  return {
    ...config,
    devices: (config.devices ?? []).map((d) => ({ ...d, ...mode })),
  };
}

/** The notification comparison table. */
export function compareTable(rows: Array<{ label: string; run: GuestRunResult }>): string {
  const header = [
    "event-idx",
    "ioeventfd",
    "IOPS",
    "kicks/req",
    "interrupts/req",
    "exits/req",
    "req/kick",
    "suppressed kicks",
  ];
  const table = [header];
  for (const { label, run } of rows) {
    const v = summarizeVirtio(run.virtio);
    const t = run.result.total;
    const iops = t.read.iops + t.write.iops + t.trim.iops;
    const [eventIdx, ioeventfd] = label.split("/");
    table.push([
      eventIdx!,
      ioeventfd!,
      Math.round(iops).toLocaleString("en-US"),
      v.kicksPerRequest.toFixed(3),
      v.interruptsPerRequest.toFixed(3),
      v.exitsPerRequest === null ? "-" : v.exitsPerRequest.toFixed(3),
      v.averageBatch.toFixed(1),
      String(v.suppressedKicks),
    ]);
  }
  const widths = header.map((_, c) => Math.max(...table.map((r) => r[c]!.length)));
  return table.map((r) =>
    r.map((cell, c) => c < 2 ? cell.padEnd(widths[c]!) : cell.padStart(widths[c]!)).join("  ")
  ).join("\n") + "\n";
}

/** The run verb; returns the exit code. */
export async function runMain(args: string[], io: CliIo): Promise<number> {
  const opts = splitArgs(args);
  if (opts.help) {
    io.stdout(HELP);
    return EXIT_OK;
  }
  if (opts.schema) {
    io.stdout(JSON.stringify(jobFileJsonSchema(), null, 2) + "\n");
    return EXIT_OK;
  }
  const attached = opts.drives.length > 0 || opts.devices.length > 0 || opts.machine !== undefined;
  if (!attached) {
    // A misspelt option is named as such before the missing attachment is.
    if (opts.jobArgs.length > 0) parseJobArgs(opts.jobArgs);
    if (
      opts.jobArgs.length > 0 || opts.jobFile !== undefined || opts.compare || opts.compareDevices
    ) {
      throw new UsageError("Attach an image (--drive and --device, or --machine) to run a job");
    }
    const { mainJob } = await import("./main_job.ts");
    return await mainJob(io, { output: opts.output, quiet: opts.quiet, html: opts.html });
  }
  if (opts.compare && opts.compareDevices) {
    throw new UsageError("Give either --compare-notifications or --compare-devices, not both");
  }
  let config: MachineConfigInput;
  if (opts.machine !== undefined) {
    if (opts.drives.length > 0 || opts.devices.length > 0) {
      throw new UsageError("Give either --machine or --drive/--device, not both");
    }
    config = await machineFromFile(opts.machine, opts.memoryMiB);
  } else {
    config = machineFromArgs(opts.drives, opts.devices, opts.memoryMiB);
  }
  let jobs: JobSpec[];
  let where: (j: number) => string;
  if (opts.jobFile !== undefined) {
    if (opts.jobArgs.length > 0) throw new UsageError("Give either --job or job options, not both");
    const text = await readUserFile(opts.jobFile, "the job file");
    ({ jobs, where } = jobsFromFile(opts.jobFile, text));
  } else {
    const argv = opts.jobArgs.length > 0
      ? opts.jobArgs
      : ["--name=randread", "--rw=randread", "--bs=4k", "--iodepth=32", "--runtime=2"];
    jobs = parseJobArgs(argv);
    where = () => "--filename";
  }
  const request: GuestRequest = { runs: assignJobs(jobs, targetsOf(config), where) };
  if (opts.compareDevices) {
    const live = progressLine(
      io,
      !opts.quiet && opts.output === "normal" && Deno.stderr.isTerminal(),
    );
    const control = new RunControl();
    const signals = catchSignals(control);
    try {
      return await compareDevices(io, opts, config, jobs, control, live, signals);
    } finally {
      signals.release();
    }
  }
  const live = progressLine(
    io,
    !opts.quiet && opts.output === "normal" && Deno.stderr.isTerminal(),
  );
  const control = new RunControl();
  const signals = catchSignals(control);
  try {
    if (opts.compare) return await compareModes(io, opts, config, request, control, live, signals);
    let run: MachineRun;
    try {
      run = await runMachine(config, request, { control, onProgress: live.update });
    } catch (e) {
      throw guestFailure(e);
    } finally {
      live.end();
    }
    reportRun(io, run, {
      output: opts.output,
      html: opts.html,
      subtitle: `vstor run ${args.join(" ")}`,
    });
    if (signals.interrupted) return EXIT_INTERRUPTED;
    return runSucceeded(run.run) ? EXIT_OK : EXIT_ERROR;
  } finally {
    signals.release();
  }
}

/** The one drive of a machine configuration, or a usage error saying what --compare-devices needs. */
function onlyDrive(config: MachineConfigInput): Record<string, unknown> {
  const drives = (config.devices ?? []).flatMap((d) =>
    d.drive !== undefined ? [d.drive] : (d.drives ?? [])
  );
  if (drives.length !== 1) {
    throw new UsageError(
      `--compare-devices runs the job on one image: attach exactly one drive (got ${drives.length})`,
    );
  }
  const { id: _id, ...drive } = drives[0] as Record<string, unknown>;
  return drive;
}

async function compareDevices(
  io: CliIo,
  opts: RunArgs,
  config: MachineConfigInput,
  jobs: readonly JobSpec[],
  control: RunControl,
  live: ReturnType<typeof progressLine>,
  signals: { readonly interrupted: boolean },
): Promise<number> {
  const drive = onlyDrive(config);
  const rows = await compareDeviceRuns(drive, jobs, {
    ...(config.memoryMiB === undefined ? {} : { memoryMiB: config.memoryMiB }),
    control,
    onProgress: live.update,
    onEnd: live.end,
    interrupted: () => signals.interrupted,
  });
  const figures = rows.map((r) => deviceFigures(r.label, r.run));
  if (opts.output === "normal") {
    io.stdout(deviceTable(figures));
  } else {
    io.stdout(fioJsonText(rows.map((r, i) => ({
      device: r.label,
      vstor_compare: figures[i],
      ...runFioJson(r.run, opts.output === "json+"),
    }))));
  }
  if (opts.html !== undefined) {
    writePage(
      opts.html,
      runPage({
        title: "vstor run --compare-devices",
        subtitle: "IDE, AHCI, virtio-blk and virtio-scsi on one image",
        summary: deviceSummary(figures),
        sections: rows.map((r) => ({ label: r.label, run: r.run })),
      }),
    );
  }
  if (signals.interrupted) return EXIT_INTERRUPTED;
  return rows.every((r) => runSucceeded(r.run.run)) ? EXIT_OK : EXIT_ERROR;
}

async function compareModes(
  io: CliIo,
  opts: RunArgs,
  config: MachineConfigInput,
  request: GuestRequest,
  control: RunControl,
  live: ReturnType<typeof progressLine>,
  signals: { readonly interrupted: boolean },
): Promise<number> {
  const rows: Array<{ label: string; run: MachineRun }> = [];
  for (const mode of MODES) {
    if (signals.interrupted) break;
    try {
      const run = await runMachine(withModes(config, mode), request, {
        control,
        onProgress: live.update,
      });
      rows.push({
        label: `${mode.eventIdx ? "on" : "off"}/${mode.ioeventfd ? "on" : "off"}`,
        run,
      });
    } catch (e) {
      throw guestFailure(e);
    } finally {
      live.end();
    }
  }
  if (opts.output === "normal") {
    io.stdout(compareTable(rows.map((r) => ({ label: r.label, run: r.run.run }))));
  } else {
    io.stdout(fioJsonText(rows.map((r) => ({
      mode: r.label,
      ...runFioJson(r.run, opts.output === "json+"),
    }))));
  }
  if (opts.html !== undefined) {
    writePage(
      opts.html,
      runPage({
        title: "vstor run --compare-notifications",
        subtitle: "event-idx on/off × ioeventfd on/off",
        sections: rows.map((r) => {
          const [eventIdx, ioeventfd] = r.label.split("/");
          return { label: `event-idx ${eventIdx}, ioeventfd ${ioeventfd}`, run: r.run };
        }),
      }),
    );
  }
  if (signals.interrupted) return EXIT_INTERRUPTED;
  return rows.every((r) => runSucceeded(r.run.run)) ? EXIT_OK : EXIT_ERROR;
}
