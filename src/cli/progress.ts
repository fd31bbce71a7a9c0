/**
 * qemu-img's progress display (util/qemu-progress.c): `    (12.50/100%)` then a carriage return,
 * printed when the value moved more than the command's minimum step, and always at 0 and 100; the
 * end prints a newline. qemu-img prints it whatever stdout is; plain vstor only on a terminal.
 *
 * @module
 */
import { type CliIo, programName } from "./cli_io.ts";
import { formatFixed } from "./text/human.ts";

/** A progress reporter for `done` of `total` units; call `end()` when the work is over. */
export interface ProgressBar {
  update(done: number, total: number): void;
  /** Print 100% (as qemu-img does when the work is done), without ending the line. */
  finish(): void;
  /** End the line. */
  end(): void;
}

const quiet: ProgressBar = { update() {}, finish() {}, end() {} };

/**
 * A progress bar writing to `io.stdout` when `enabled`: always in drop-in mode, as qemu-img
 * does; in plain vstor mode only when stdout is a terminal.
 *
 * @param minStep the smallest change in percent worth printing (qemu-img's per-command min_skip:
 *   convert 1, compare 2, commit/rebase/amend 0.01)
 */
export function progressBar(enabled: boolean, io: CliIo, minStep = 1): ProgressBar {
  if (!enabled) return quiet;
  if (programName(io) === "vstor" && !Deno.stdout.isTerminal()) return quiet;
  let current = 0;
  let lastPrinted = 0;
  // qemu-img keeps the value in a C float and prints it with "%3.2f".
  const print = (pct: number) => {
    current = Math.fround(Math.min(100, pct));
    if (
      current > lastPrinted + minStep || current < lastPrinted - minStep || current === 0 ||
      current === 100
    ) {
      lastPrinted = current;
      io.stdout(`    (${formatFixed(current, 2)}/100%)\r`);
    }
  };
  print(0);
  return {
    update(done, total) {
      print(total === 0 ? 100 : done * 100 / total);
    },
    finish() {
      print(100);
    },
    end() {
      io.stdout("\n");
    },
  };
}
