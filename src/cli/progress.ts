/**
 * qemu-img's progress display: `    (12.34/100%)` redrawn in place, only on a terminal and only
 * when asked for (-p); quiet in pipes.
 *
 * @module
 */

/** A progress reporter for `done` of `total` units; call `end()` when the work is over. */
export interface ProgressBar {
  update(done: number, total: number): void;
  end(): void;
}

const quiet: ProgressBar = { update() {}, end() {} };

/** A progress bar writing to stdout when `enabled` and stdout is a terminal. */
export function progressBar(
  enabled: boolean,
  write = (s: string) => Deno.stdout.writeSync(new TextEncoder().encode(s)),
): ProgressBar {
  if (!enabled || !Deno.stdout.isTerminal()) return quiet;
  let last = -1;
  const draw = (pct: number) => write(`    (${pct.toFixed(2)}/100%)\r`);
  draw(0);
  return {
    update(done, total) {
      const pct = total === 0 ? 100 : Math.min(100, done * 100 / total);
      // Redraw at most every 0.01% step.
      if (Math.floor(pct * 100) === last) return;
      last = Math.floor(pct * 100);
      draw(pct);
    },
    end() {
      draw(100);
      write("\n");
    },
  };
}
