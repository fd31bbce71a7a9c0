/**
 * How long an export looks at its rings before it sleeps, adapted to the front-end as QEMU's
 * iothreads adapt theirs (`poll-max-ns`, `poll-grow`, `poll-shrink`): the window grows while the
 * waits for new work are short (polling would have caught them without a kick), and collapses
 * when a wait runs past the limit (polling only burns CPU the guest could use).
 *
 * @module
 */

/** An iothread's polling parameters, as qemu-storage-daemon's `--object iothread,…` sets them. */
export interface PollParams {
  /** The longest window, in ns; 0 turns polling off. */
  readonly maxNs: number;
  /** The factor a window grows by (0: QEMU's default, 2). */
  readonly grow: number;
  /** The divisor a window shrinks by (0: QEMU's default, straight to 0). */
  readonly shrink: number;
}

/** QEMU's iothread defaults on Linux (IOTHREAD_POLL_MAX_NS_DEFAULT). */
export const DEFAULT_POLL: PollParams = { maxNs: 32_768, grow: 0, shrink: 0 };

/** The first window after none (QEMU starts at 4 µs). */
const START_NS = 4_000;

/** The current polling window and how it moves. */
export class AdaptivePoll {
  readonly #params: PollParams;
  #windowNs = 0;

  constructor(params: PollParams) {
    this.#params = params;
  }

  /** How long to poll before the next sleep, in ns (0: sleep at once). */
  get windowNs(): number {
    return this.#windowNs;
  }

  /**
   * Called once work came: `waitedNs` is the time since polling began (polling and sleep both).
   * Work within the window leaves it; a wait past the limit shrinks it; a shorter wait than the
   * limit but longer than the window grows it.
   */
  record(waitedNs: number): void {
    const { maxNs, grow, shrink } = this.#params;
    if (maxNs === 0 || waitedNs <= this.#windowNs) return;
    if (waitedNs > maxNs) {
      this.#windowNs = shrink === 0 ? 0 : Math.floor(this.#windowNs / shrink);
      return;
    }
    if (this.#windowNs < maxNs) {
      const next = this.#windowNs === 0 ? START_NS : this.#windowNs * (grow === 0 ? 2 : grow);
      this.#windowNs = Math.min(next, maxNs);
    }
  }
}
