/**
 * The simulated guest's interrupt controller: hands out x86 vectors to drivers (MSI-X messages carry
 * them), maps each vector to its handler, and shares the one INTx line among the drivers that fell
 * back to it. It sits on a {@linkcode VcpuInterrupts}, which devices raise from any thread.
 *
 * Delivery is explicit: {@linkcode GuestInterrupts.dispatchPending} runs the handlers of everything
 * pending — what a CPU does whenever interrupts are enabled. Drivers call it before they decide to
 * halt and after every halt; halting itself is the guest's injectable `idle` step (see
 * `virtio_driver.ts`), never done here.
 *
 * @module
 */

import { VcpuInterrupts, X86_VECTORS } from "../virtio/interrupts.ts";

/** A handler; INTx handlers return whether their device was the one interrupting (ISR non-zero). */
export type InterruptHandler = () => boolean | void;

/** Options of a {@linkcode GuestInterrupts}. */
export interface GuestInterruptsOptions {
  /** First vector handed out (default 0x30: below are exceptions and legacy IRQs). */
  readonly firstVector?: number;
  /** Last vector handed out (default 0xEF: above are the local APIC's own). */
  readonly lastVector?: number;
}

/** Counters of a {@linkcode GuestInterrupts}. */
export interface GuestInterruptStats {
  /** Vectors taken with a handler. */
  handled: number;
  /** Vectors taken without a handler. */
  spurious: number;
  /** INTx dispatches (the line was asserted). */
  intx: number;
  /** INTx dispatches no handler claimed. */
  intxUnclaimed: number;
}

/** Consecutive unclaimed INTx dispatches before the guest stops listening (Linux: "nobody cared"). */
const INTX_NOBODY_CARED = 100_000;

/**
 * x86 vectors, their handlers, and the shared INTx line.
 *
 * @example
 * ```ts
 * import { VcpuInterrupts } from "../virtio/interrupts.ts";
 * import { GuestInterrupts } from "./irq.ts";
 * const vcpu = new VcpuInterrupts();
 * const irqs = new GuestInterrupts(vcpu);
 * let hits = 0;
 * const vector = irqs.allocateVector(() => { hits++; });
 * vcpu.deliver(vector); // what a device's MSI-X message does
 * irqs.dispatchPending();
 * if (hits !== 1) throw new Error("not dispatched");
 * ```
 */
export class GuestInterrupts {
  /** The vCPU's interrupt inputs. */
  readonly vcpu: VcpuInterrupts;
  /** Counters. */
  readonly stats: GuestInterruptStats = { handled: 0, spurious: 0, intx: 0, intxUnclaimed: 0 };
  /** Interrupts taken per vector. */
  readonly perVector: Uint32Array = new Uint32Array(X86_VECTORS);
  readonly #handlers: (InterruptHandler | undefined)[] = new Array(X86_VECTORS);
  readonly #intx: InterruptHandler[] = [];
  readonly #first: number;
  readonly #last: number;
  #unclaimedRun = 0;
  #intxDead = false;

  /**
   * @throws {RangeError} when the vector range is not inside 0x20..0xFF
   */
  constructor(vcpu: VcpuInterrupts, options: GuestInterruptsOptions = {}) {
    const first = options.firstVector ?? 0x30;
    const last = options.lastVector ?? 0xef;
    if (
      !Number.isInteger(first) || !Number.isInteger(last) || first < 0x20 || last > 0xff ||
      first > last
    ) {
      throw new RangeError(`Vector range 0x${first.toString(16)}..0x${last.toString(16)} is bad`);
    }
    this.vcpu = vcpu;
    this.#first = first;
    this.#last = last;
  }

  /**
   * Takes a free vector and routes it to `handler`.
   *
   * @throws {RangeError} when every vector in the range is taken
   */
  allocateVector(handler: InterruptHandler): number {
    for (let v = this.#first; v <= this.#last; v++) {
      if (this.#handlers[v] === undefined) {
        this.#handlers[v] = handler;
        return v;
      }
    }
    throw new RangeError(
      `No free interrupt vector in 0x${this.#first.toString(16)}..0x${this.#last.toString(16)}`,
    );
  }

  /** Releases `vector` (an interrupt arriving later counts as spurious). */
  freeVector(vector: number): void {
    if (Number.isInteger(vector) && vector >= 0 && vector < X86_VECTORS) {
      this.#handlers[vector] = undefined;
    }
  }

  /** Adds a handler of the shared INTx line; returns a function that removes it. */
  addIntxHandler(handler: InterruptHandler): () => void {
    this.#intx.push(handler);
    return () => {
      const i = this.#intx.indexOf(handler);
      if (i >= 0) this.#intx.splice(i, 1);
    };
  }

  /**
   * Runs the handler of every pending vector (highest first, as the local APIC orders them) and,
   * when the INTx line is asserted, every INTx handler once. Never waits.
   *
   * @returns interrupts taken (vectors plus one for an INTx dispatch)
   */
  dispatchPending(): number {
    let taken = 0;
    // Bounded: a device re-raising from another thread cannot keep us here for ever.
    for (let guard = 0; guard < X86_VECTORS; guard++) {
      const vector = this.vcpu.takeNext();
      if (vector === null) break;
      taken++;
      this.perVector[vector]!++;
      const handler = this.#handlers[vector];
      if (handler === undefined) {
        this.stats.spurious++;
        continue;
      }
      this.stats.handled++;
      handler();
    }
    if (!this.#intxDead && this.vcpu.intxAsserted) {
      taken++;
      this.stats.intx++;
      let claimed = false;
      for (const handler of this.#intx) {
        if (handler() === true) claimed = true;
      }
      if (claimed) {
        this.#unclaimedRun = 0;
      } else {
        this.stats.intxUnclaimed++;
        // A line stuck high with nobody claiming it would keep the vCPU from ever halting.
        if (++this.#unclaimedRun >= INTX_NOBODY_CARED) this.#intxDead = true;
      }
    }
    return taken;
  }

  /** True after the guest gave up on a stuck INTx line. */
  get intxDisabled(): boolean {
    return this.#intxDead;
  }
}
