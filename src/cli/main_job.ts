/**
 * The main job (`vstor run` with no arguments, the README's first command): in a temporary
 * directory, a base qcow2 is filled by a guest through virtio-blk with verifiable blocks, gets an
 * internal snapshot, and a backing-file clone is made over it. A second boot attaches the clone
 * through virtio-blk and the base, read-only, through virtio-scsi: the guest runs a verified mixed
 * workload on the clone while it re-verifies the base's blocks through SCSI. Both images are then
 * checked; the report shows the fio figures and what virtio's batching and notification
 * suppression did. Last, the same short read job on the base through every kind of disk — IDE
 * (PIO, DMA), AHCI, virtio-blk trapped and with ioeventfd + EVENT_IDX, virtio-scsi — ends in the
 * table of what each costs per request (`vstor run --compare-devices`).
 *
 * @module
 */
import { join } from "node:path";
import { createImage } from "../../formats/open.ts";
import type { GuestRequest } from "../guest/guest.ts";
import { type CliIo, EXIT_ERROR, EXIT_OK, reportError } from "./cli_io.ts";
import { checkMain } from "./check.ts";
import { snapshotMain } from "./snapshot.ts";
import { RunControl } from "../guest/run_control.ts";
import { type MachineRun, progressLine, runMachine, runSucceeded } from "./run_machine.ts";
import { compareDeviceRuns, deviceFigures, deviceTable } from "./run_compare.ts";
import { parseJobArgs } from "../guest/job.ts";
import {
  catchSignals,
  EXIT_INTERRUPTED,
  guestFailure,
  type OutputFormat,
  reportRun,
} from "./run_report.ts";

const MiB = 1024 * 1024;
const IMAGE_SIZE = 64 * MiB;
const SEED = 20261125;

/** The job that fills the base: sequential verified writes the second boot reads back. */
const PREPARE = [
  "--name=install",
  "--rw=write",
  "--bs=64k",
  "--iodepth=8",
  "--size=16m",
  "--verify=crc32c",
  `--seed=${SEED}`,
];

/** The clone's job: verified random reads and writes, two queues. */
export const CLONE_JOB: readonly string[] = [
  "--name=clone",
  "--rw=randrw",
  "--rwmixread=60",
  "--bs=4k",
  "--iodepth=16",
  "--numjobs=2",
  "--size=8m",
  "--offset_increment=8m",
  "--verify=crc32c",
  `--seed=${SEED + 1}`,
];

/**
 * The device comparison's job: random 4 KiB reads of the base's filled blocks for a fixed short
 * time, submitted in batches as Linux's block layer plugs them, so that AHCI's doorbell and
 * virtio's kick can carry several requests.
 */
export const COMPARE_JOB: readonly string[] = [
  "--name=compare",
  "--rw=randread",
  "--bs=4k",
  "--iodepth=32",
  "--iodepth_batch_submit=8",
  "--size=16m",
  "--runtime=0.4",
  "--time_based",
  `--seed=${SEED + 2}`,
];

/** Options of {@linkcode mainJob}. */
export interface MainJobOptions {
  /** fio's text report (`human` is the same), or fio's JSON with the main job's figures under `vstor`. */
  output: OutputFormat | "human";
  quiet: boolean;
  /** Also write the clone run's report as an HTML page here. */
  html?: string | undefined;
  /** Where to work (default: a new temporary directory, removed afterwards). */
  dir?: string;
}

/** Runs the main job; returns the exit code. */
export async function mainJob(io: CliIo, opts: MainJobOptions): Promise<number> {
  const dir = opts.dir ?? await Deno.makeTempDir({ prefix: "vstor_run_" });
  const output: OutputFormat = opts.output === "human" ? "normal" : opts.output;
  const human = output === "normal";
  const control = new RunControl();
  const signals = catchSignals(control);
  const say = (text: string) => {
    if (human) io.stdout(text);
  };
  const live = progressLine(io, !opts.quiet && human && Deno.stderr.isTerminal());
  try {
    const base = join(dir, "base.qcow2"), clone = join(dir, "clone.qcow2");
    say(`vstor main job in ${dir} (seed ${SEED})\n`);
    await createImage(base, "qcow2", IMAGE_SIZE);
    say(`1. base.qcow2 (64 MiB) on virtio-blk: the guest writes 16 MiB of verifiable blocks\n`);
    const prep = await runMachine(
      {
        memoryMiB: 128,
        devices: [{ type: "virtio-blk", id: "base", drive: { file: base, format: "qcow2" } }],
      },
      { args: PREPARE },
      { control, onProgress: live.update },
    ).catch((e) => {
      throw guestFailure(e);
    });
    live.end();
    if (signals.interrupted) {
      reportRun(io, prep, { output, html: opts.html, subtitle: "vstor main job (stopped)" });
      return EXIT_INTERRUPTED;
    }
    if (!runSucceeded(prep.run)) {
      io.stderr(prep.run.report);
      return EXIT_ERROR;
    }
    const quietIo: CliIo = { stdout: () => {}, stderr: (t) => io.stderr(t) };
    if (await verb(snapshotMain, ["-c", "installed", base], quietIo) !== EXIT_OK) return EXIT_ERROR;
    await createImage(clone, "qcow2", IMAGE_SIZE, {
      backingFile: "base.qcow2",
      backingFormat: "qcow2",
    });
    say(
      "2. snapshot 'installed' of base.qcow2; clone.qcow2 over it (backing file)\n" +
        "3. clone on virtio-blk (2 queues), base read-only on virtio-scsi: a verified mixed\n" +
        "   workload on the clone while the base's blocks are verified again through SCSI\n\n",
    );
    const request: GuestRequest = {
      runs: [
        { device: "clone", name: "clone.qcow2", args: CLONE_JOB },
        { device: "base", name: "base.qcow2", args: [...PREPARE, "--verify_only"] },
      ],
    };
    const run: MachineRun = await runMachine(
      {
        memoryMiB: 256,
        devices: [
          {
            type: "virtio-blk",
            id: "clone",
            numQueues: 2,
            drive: { file: clone, format: "qcow2" },
          },
          {
            type: "virtio-scsi",
            id: "base",
            drives: [{ file: base, format: "qcow2", readOnly: true }],
          },
        ],
      },
      request,
      { control, onProgress: live.update },
    ).catch((e) => {
      throw guestFailure(e);
    });
    live.end();
    const ok = runSucceeded(run.run);
    const checks: string[] = [];
    let clean = true;
    for (const image of [clone, base]) {
      let text = "";
      const code = await verb(checkMain, [image], {
        stdout: (t) => text += t,
        stderr: (t) => text += t,
      });
      clean &&= code === EXIT_OK;
      checks.push(`${image.slice(dir.length + 1)}: ${code === EXIT_OK ? "clean" : text.trim()}`);
    }
    const subtitle = "vstor main job: the clone on virtio-blk (2 queues), the base on virtio-scsi";
    if (human) reportRun(io, run, { output, html: opts.html, subtitle });
    // 4. The same read job on the base through every kind of disk, read-only, one after another.
    say("\n4. the base, read-only, through every kind of disk in turn: the same random-read job\n");
    const compared = signals.interrupted ? [] : await compareDeviceRuns(
      { file: base, format: "qcow2", readOnly: true },
      parseJobArgs([...COMPARE_JOB]),
      {
        memoryMiB: 128,
        control,
        onProgress: live.update,
        onEnd: live.end,
        interrupted: () => signals.interrupted,
      },
    );
    const figures = compared.map((r) => deviceFigures(r.label, r.run));
    const comparedOk = compared.every((r) => runSucceeded(r.run.run));
    if (human) {
      if (figures.length > 0) io.stdout(`\n${deviceTable(figures)}`);
      io.stdout(`\nimages after shutdown (vstor check): ${checks.join("; ")}\n`);
      io.stdout(
        signals.interrupted
          ? "main job stopped early (Ctrl-C)\n"
          : ok && comparedOk && clean
          ? "main job passed: every block verified, both images clean\n"
          : "main job FAILED\n",
      );
    } else {
      reportRun(io, run, {
        output,
        html: opts.html,
        subtitle,
        extra: {
          dir,
          seed: SEED,
          prepare: prep.run.json.total,
          checks,
          devices: figures,
          ok: ok && comparedOk && clean && !signals.interrupted,
        },
      });
    }
    if (signals.interrupted) return EXIT_INTERRUPTED;
    return ok && comparedOk && clean ? EXIT_OK : EXIT_ERROR;
  } finally {
    live.end();
    signals.release();
    if (opts.dir === undefined) await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

/** Run a verb as the CLI does: what it throws becomes its error line and exit 1. */
async function verb(
  run: (args: string[], io: CliIo) => Promise<number>,
  args: string[],
  io: CliIo,
): Promise<number> {
  try {
    return await run(args, io);
  } catch (e) {
    reportError(e, io);
    return EXIT_ERROR;
  }
}
