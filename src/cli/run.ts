/**
 * `vstor run`: a simulated VM. Images attach QEMU-style (`--drive` + `--device`, or a JSON
 * machine file); the guest in the vCPU Worker enumerates PCI, brings the virtio devices up and
 * runs fio-like jobs; the report is fio's plus the virtio numbers (kicks, interrupts and exits per
 * request, batch sizes). With no arguments it runs the main job (see `main_job.ts`).
 *
 * @module
 */
import type { GuestRequest, GuestRunResult } from "../guest/guest.ts";
import { summarizeVirtio } from "../guest/report.ts";
import type { MachineConfigInput } from "../machine/config.ts";
import { progressLine, runMachine, runSucceeded } from "./run_machine.ts";
import { type CliIo, EXIT_ERROR, EXIT_OK, UsageError } from "./cli_io.ts";
import { machineFromArgs } from "./run_args.ts";

export const RUN_USAGE =
  "vstor run [--drive SPEC]... [--device SPEC]... [--machine FILE.json] [--memory MIB] " +
  "[--job FILE | --rw=… --bs=… --iodepth=… …] [--output=human|json] [--compare-notifications] [-q]";

const HELP = `usage: ${RUN_USAGE}

Runs a simulated guest against images attached through virtio devices. With no arguments, runs
the main job: a base qcow2, a snapshot and a backing-file clone made in a temporary directory, the
clone on virtio-blk and the base (read-only) on virtio-scsi, a short verified mixed workload.

  --drive file=F[,format=raw|qcow2][,id=ID][,readonly=on|off][,cache=writeback|writethrough|unsafe]
  --device virtio-blk,drive=ID[,num-queues=N][,queue-size=N][,event-idx=on|off][,indirect=on|off]
                     [,packed=on|off][,ioeventfd=on|off][,poll=on|off][,serial=S][,discard=on|off]
  --device virtio-scsi,id=ID[,num_queues=N][,event-idx=…][,ioeventfd=…]
  --device scsi-hd,bus=ID,drive=ID[,lun=N][,scsi-id=N]
  --machine FILE      the whole machine as JSON ({ memoryMiB, devices: [...] })
  --memory MIB        guest RAM (default 256)
  --job FILE          fio-style job file (JSON or INI); or fio options on the command line:
                      --name --rw --bs --iodepth --size --offset --runtime --io_size --numjobs
                      --rwmixread --verify --verify_only --seed …
  --output=json       the report as JSON
  --compare-notifications
                      the same job with event-idx on/off and ioeventfd on/off, side by side
  -q                  no progress line
`;

/** Our own options; everything else on the command line is a job option for the guest. */
interface RunArgs {
  drives: string[];
  devices: string[];
  machine?: string;
  memoryMiB?: number;
  jobFile?: string;
  output: "human" | "json";
  compare: boolean;
  quiet: boolean;
  help: boolean;
  jobArgs: string[];
}

function splitArgs(args: readonly string[]): RunArgs {
  const out: RunArgs = {
    drives: [],
    devices: [],
    output: "human",
    compare: false,
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
        out.output = v;
        break;
      }
      case "--compare-notifications":
        out.compare = true;
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
  const attached = opts.drives.length > 0 || opts.devices.length > 0 || opts.machine !== undefined;
  if (!attached) {
    if (opts.jobArgs.length > 0 || opts.jobFile !== undefined || opts.compare) {
      throw new UsageError("Attach an image (--drive and --device, or --machine) to run a job");
    }
    const { mainJob } = await import("./main_job.ts");
    return await mainJob(io, { output: opts.output, quiet: opts.quiet });
  }
  let config: MachineConfigInput;
  if (opts.machine !== undefined) {
    if (opts.drives.length > 0 || opts.devices.length > 0) {
      throw new UsageError("Give either --machine or --drive/--device, not both");
    }
    let text: string;
    try {
      text = await Deno.readTextFile(opts.machine);
    } catch (e) {
      throw new Error(`${opts.machine}: ${(e as Error).message}`);
    }
    try {
      config = JSON.parse(text) as MachineConfigInput;
    } catch (e) {
      throw new Error(`${opts.machine}: not JSON: ${(e as Error).message}`);
    }
    if (opts.memoryMiB !== undefined) config = { ...config, memoryMiB: opts.memoryMiB };
  } else {
    config = machineFromArgs(opts.drives, opts.devices, opts.memoryMiB);
  }
  let request: GuestRequest;
  if (opts.jobFile !== undefined) {
    if (opts.jobArgs.length > 0) throw new UsageError("Give either --job or job options, not both");
    request = { jobFile: await Deno.readTextFile(opts.jobFile) };
  } else {
    request = {
      args: opts.jobArgs.length > 0
        ? opts.jobArgs
        : ["--name=randread", "--rw=randread", "--bs=4k", "--iodepth=32", "--runtime=2"],
    };
  }
  const live = progressLine(io, !opts.quiet && opts.output === "human" && Deno.stderr.isTerminal());
  if (opts.compare) {
    const rows: Array<{ label: string; run: GuestRunResult }> = [];
    for (const mode of MODES) {
      const { run } = await runMachine(withModes(config, mode), request, live.update);
      live.end();
      rows.push({
        label: `${mode.eventIdx ? "on" : "off"}/${mode.ioeventfd ? "on" : "off"}`,
        run,
      });
    }
    if (opts.output === "json") {
      io.stdout(
        JSON.stringify(
          rows.map((r) => ({ mode: r.label, ...r.run.json })),
          null,
          2,
        ) + "\n",
      );
    } else {
      io.stdout(compareTable(rows));
    }
    return rows.every((r) => runSucceeded(r.run)) ? EXIT_OK : EXIT_ERROR;
  }
  const { run } = await runMachine(config, request, live.update);
  live.end();
  io.stdout(opts.output === "json" ? JSON.stringify(run.json, null, 2) + "\n" : run.report);
  return runSucceeded(run) ? EXIT_OK : EXIT_ERROR;
}
