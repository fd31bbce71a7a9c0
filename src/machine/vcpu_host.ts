/**
 * The VMM's handle on a vCPU Worker: boot it, talk to it, learn how its program ended.
 *
 * @module
 */

import type { VcpuBoot, VcpuMessage, VcpuRequest } from "../virtio/exits.ts";

interface PendingRequest {
  readonly resolve: (body: unknown) => void;
  readonly reject: (error: Error) => void;
  readonly timer: ReturnType<typeof setTimeout>;
}

/** Options of a vCPU Worker. */
export interface VcpuOptions {
  /** Longest run of the guest program; it is terminated and `result` rejects after that. */
  readonly timeoutMs?: number;
}

/**
 * A running vCPU Worker.
 *
 * `result` settles when the guest program's `main` returns (resolves with its value) or throws,
 * the Worker crashes, the machine fails or shuts down, or the time limit passes (rejects). It
 * never stays pending once the vCPU is gone.
 */
export class VcpuHandle {
  /** How the guest program ended. */
  readonly result: Promise<unknown>;
  readonly #worker: Worker;
  readonly #requests = new Map<number, PendingRequest>();
  readonly #onEnd: () => void;
  #resolve!: (value: unknown) => void;
  #reject!: (error: Error) => void;
  #nextId = 1;
  #ended = false;
  #timer: ReturnType<typeof setTimeout> | undefined;

  /** Starts the Worker at `entry` and boots it with `boot`. */
  constructor(entry: string | URL, boot: VcpuBoot, options: VcpuOptions, onEnd: () => void) {
    this.#onEnd = onEnd;
    this.result = new Promise((resolve, reject) => {
      this.#resolve = resolve;
      this.#reject = reject;
    });
    // Awaited by callers who care; a vCPU ended by shutdown must not be an unhandled rejection.
    this.result.catch(() => {});
    this.#worker = new Worker(entry, { type: "module", name: "vcpu0" });
    this.#worker.onmessage = (event: MessageEvent<VcpuMessage>) => this.#onMessage(event.data);
    this.#worker.onerror = (event: ErrorEvent) => {
      event.preventDefault();
      this.#end(new Error(`vCPU crashed: ${event.message}`));
    };
    if (options.timeoutMs !== undefined) {
      const ms = options.timeoutMs;
      this.#timer = setTimeout(() => this.#end(new Error(`vCPU still running after ${ms} ms`)), ms);
    }
    this.#worker.postMessage(boot);
  }

  /** True until the program ended or the Worker was terminated. */
  get running(): boolean {
    return !this.#ended;
  }

  /**
   * Sends `body` to the program's `onRequest` and resolves with its answer.
   *
   * @throws {Error} when the program fails the request, the vCPU ends, or `timeoutMs` passes
   */
  request(body: unknown, timeoutMs = 30_000): Promise<unknown> {
    if (this.#ended) return Promise.reject(new Error("The vCPU is not running"));
    const id = this.#nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#requests.delete(id);
        reject(new Error(`vCPU did not answer request ${id} within ${timeoutMs} ms`));
      }, timeoutMs);
      this.#requests.set(id, { resolve, reject, timer });
      this.#worker.postMessage({ kind: "request", id, body } satisfies VcpuRequest);
    });
  }

  /** Terminates the Worker; `result` rejects with `reason` if the program had not ended. */
  terminate(reason: Error = new Error("vCPU terminated")): void {
    this.#end(reason);
  }

  #onMessage(msg: VcpuMessage): void {
    switch (msg.kind) {
      case "done":
        this.#end(null, msg.result);
        return;
      case "error": {
        const error = new GuestProgramError(msg.message, msg.name ?? "Error");
        if (msg.stack !== undefined) error.stack = msg.stack;
        this.#end(error);
        return;
      }
      case "reply":
      case "reply-error": {
        const p = this.#requests.get(msg.id);
        if (p === undefined) return;
        this.#requests.delete(msg.id);
        clearTimeout(p.timer);
        if (msg.kind === "reply") p.resolve(msg.body);
        else p.reject(new Error(msg.message));
        return;
      }
    }
  }

  #end(error: Error | null, value?: unknown): void {
    if (this.#ended) return;
    this.#ended = true;
    clearTimeout(this.#timer);
    this.#worker.terminate();
    for (const p of this.#requests.values()) {
      clearTimeout(p.timer);
      p.reject(error ?? new Error("The vCPU program ended"));
    }
    this.#requests.clear();
    if (error === null) this.#resolve(value);
    else this.#reject(error);
    this.#onEnd();
  }
}

/**
 * The guest program failed: `message` is its own error's message, `guestError` that error's class
 * name (`JobError`, `GuestSetupError`, `VirtioDriverError`…), for callers that word it for users.
 */
export class GuestProgramError extends Error {
  /** Always `GuestProgramError`. */
  override readonly name = "GuestProgramError";
  /** The class name of the guest's error (`JobError`, `GuestSetupError`, …). */
  readonly guestError: string;

  /** Makes the error from the guest's message and error class name. */
  constructor(message: string, guestError: string) {
    super(message);
    this.guestError = guestError;
  }
}
