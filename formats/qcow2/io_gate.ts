/**
 * Data requests in flight against metadata changes that could move their clusters: the
 * {@linkcode IoGate} of a qcow2 node.
 *
 * A read or an in-place write maps its guest range, then transfers data to or from the host
 * clusters it found — asynchronously, many at once (io_uring, a thread pool). While such a
 * transfer is in flight, its clusters must stay where they are: a discard, a zero write that
 * unmaps, a shrink, a snapshot operation or a compressed overwrite could free them, and an
 * allocating write could hand them to another guest range that the late transfer would then
 * overwrite or leak. Such operations close the gate: new transfers wait, the operation waits
 * until those in flight are done, runs, and opens the gate again. Allocating writes, which only
 * take clusters nobody maps yet, do not close it.
 *
 * @module
 */

/** A shared/exclusive gate: many data transfers at once, or one metadata change. */
export class IoGate {
  #inFlight = 0;
  /** Exclusive holders waiting or running: while any, no transfer starts. */
  #closers = 0;
  #opened: (() => void)[] = [];
  #drained: (() => void)[] = [];

  /** Transfers in flight. */
  get inFlight(): number {
    return this.#inFlight;
  }

  /**
   * Enters as a transfer: synchronously (true) when the gate is open, else false and the caller
   * waits with {@linkcode enter}. Every entry is matched by one {@linkcode leave}.
   */
  tryEnter(): boolean {
    if (this.#closers > 0) return false;
    this.#inFlight++;
    return true;
  }

  /** Enters as a transfer, waiting while the gate is closed. */
  async enter(): Promise<void> {
    while (this.#closers > 0) {
      await new Promise<void>((resolve) => this.#opened.push(resolve));
    }
    this.#inFlight++;
  }

  /** A transfer is over. */
  leave(): void {
    if (--this.#inFlight === 0 && this.#drained.length > 0) {
      const waiting = this.#drained;
      this.#drained = [];
      for (const resolve of waiting) resolve();
    }
  }

  /**
   * Runs `fn` with the gate closed: no transfer in flight while it runs. The caller holds the
   * node's metadata lock, so exclusive runs do not overlap each other.
   */
  async exclusive<T>(fn: () => Promise<T>): Promise<T> {
    this.#closers++;
    try {
      while (this.#inFlight > 0) {
        await new Promise<void>((resolve) => this.#drained.push(resolve));
      }
      return await fn();
    } finally {
      if (--this.#closers === 0 && this.#opened.length > 0) {
        const waiting = this.#opened;
        this.#opened = [];
        for (const resolve of waiting) resolve();
      }
    }
  }
}
