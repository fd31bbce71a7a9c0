/**
 * How `vstor run` and the main job report a finished run: fio's text or fio's JSON on stdout, the
 * HTML page, guest failures in a user's words, and Ctrl-C/SIGTERM turned into a stop request.
 *
 * @module
 */
import { fioJson, fioJsonText } from "../guest/fio_json.ts";
import type { RunControl } from "../guest/run_control.ts";
import { GuestProgramError } from "../machine/vcpu_host.ts";
import type { CliIo } from "./cli_io.ts";
import { writePage } from "./html/page.ts";
import { runPage } from "./html/run_page.ts";
import type { MachineRun } from "./run_machine.ts";

/** The exit code after Ctrl-C (SIGINT) or SIGTERM, as a shell reports 128 + SIGINT. */
export const EXIT_INTERRUPTED = 130;

/** The report formats. */
export type OutputFormat = "normal" | "json" | "json+";

/** How a finished run is reported. */
export interface RunReportOptions {
  readonly output: OutputFormat;
  /** Also write the HTML page here. */
  readonly html?: string | undefined;
  /** The page's subtitle: what ran. */
  readonly subtitle?: string;
  /** More top-level `vstor` fields of the JSON report. */
  readonly extra?: Record<string, unknown>;
}

/** A machine run as fio's JSON (`plus`: json+ with latency bins), vstor's figures under `vstor`. */
export function runFioJson(
  run: MachineRun,
  plus: boolean,
  extra?: Record<string, unknown>,
): Record<string, unknown> {
  return fioJson({
    result: run.run.result,
    runs: run.run.runs,
    virtio: run.run.json.virtio,
    devices: run.run.json.devices ?? [],
    startedAt: run.startedAt,
    plus,
    ...(extra === undefined ? {} : { extra }),
  });
}

/** Print a run's report as asked (text or fio JSON) and write its HTML page. */
export function reportRun(io: CliIo, run: MachineRun, opts: RunReportOptions): void {
  if (opts.output === "normal") {
    io.stdout(run.run.report);
    if (run.run.result.stopped) io.stdout("(stopped early: the figures cover what ran)\n");
  } else {
    const json = runFioJson(run, opts.output === "json+", opts.extra);
    io.stdout(fioJsonText(json));
  }
  if (opts.html !== undefined) {
    writePage(
      opts.html,
      runPage({
        title: "vstor run",
        subtitle: opts.subtitle ?? "",
        sections: [{ label: "", run }],
      }),
    );
  }
}

/** A guest failure in a user's words (no internal class names). */
export function guestFailure(e: unknown): unknown {
  if (!(e instanceof GuestProgramError)) return e;
  const what: Record<string, string> = {
    JobError: "job",
    GuestSetupError: "guest",
    VirtioDriverError: "virtio driver",
    GuestAllocError: "guest memory",
    VirtqueueError: "virtqueue",
  };
  const prefix = what[e.guestError] ?? "guest";
  return new Error(`${prefix}: ${e.message}`);
}

/** Ctrl-C and SIGTERM ask `control` to stop; `interrupted` says whether one came. */
export function catchSignals(
  control: RunControl,
): { readonly interrupted: boolean; release(): void } {
  const state = { interrupted: false };
  const listeners: Array<[Deno.Signal, () => void]> = [];
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    const listener = () => {
      state.interrupted = true;
      control.stop();
    };
    try {
      Deno.addSignalListener(signal, listener);
      listeners.push([signal, listener]);
    } catch {
      // Not available (no signal permission, or another platform): Ctrl-C ends the process.
    }
  }
  return {
    get interrupted() {
      return state.interrupted;
    },
    release() {
      for (const [signal, listener] of listeners) Deno.removeSignalListener(signal, listener);
    },
  };
}
