/**
 * An in-memory {@linkcode BlockTarget} for workload tests: a byte array as the disk, requests
 * completed in reverse submission order when the engine waits (so completions are out of order),
 * and hooks to corrupt reads or fail requests.
 *
 * @module
 */

import type { BlockTarget, IoOp, IoRequest, IoStatus } from "../../src/guest/block_target.ts";

class MemRequest implements IoRequest {
  op: IoOp = "read";
  offset = 0;
  length = 0;
  status: IoStatus = "ok";
  written = 0;
  detail = "";
  startedAt = 0;
  tag = 0;
  constructor(readonly index: number, readonly data: Uint8Array) {}
}

/** Options of a {@linkcode MemTarget}. */
export interface MemTargetOptions {
  readonly disk?: Uint8Array;
  readonly capacity?: number;
  readonly depth?: number;
  readonly maxTransfer?: number;
  readonly blockSize?: number;
  readonly readOnly?: boolean;
  readonly discard?: boolean;
}

/** A block target over a byte array. */
export class MemTarget implements BlockTarget {
  readonly disk: Uint8Array;
  readonly capacity: number;
  readonly blockSize: number;
  readonly readOnly: boolean;
  readonly depth: number;
  readonly maxTransfer: number;
  readonly maxDiscard: number;
  readonly maxWriteZeroes: number;
  /** Every submitted op, in order. */
  readonly log: { op: IoOp; offset: number; length: number }[] = [];
  /** Called on read data before completion (tamper here). */
  onRead: ((offset: number, data: Uint8Array) => void) | null = null;
  /** Requests at this offset fail with ioerr. */
  failAt: number | null = null;
  commits = 0;
  waits = 0;
  maxInFlight = 0;
  readonly #requests: MemRequest[] = [];
  readonly #free: number[] = [];
  #submitted: MemRequest[] = [];
  #device: MemRequest[] = [];
  readonly #done: MemRequest[] = [];
  #inFlight = 0;

  constructor(options: MemTargetOptions = {}) {
    this.capacity = options.capacity ?? options.disk?.length ?? 1024 * 1024;
    this.disk = options.disk ?? new Uint8Array(this.capacity);
    this.blockSize = options.blockSize ?? 512;
    this.readOnly = options.readOnly ?? false;
    this.depth = options.depth ?? 32;
    this.maxTransfer = options.maxTransfer ?? 128 * 1024;
    this.maxDiscard = options.discard === false ? 0 : 1024 * 1024;
    this.maxWriteZeroes = this.maxDiscard;
    for (let i = 0; i < this.depth; i++) {
      this.#requests.push(new MemRequest(i, new Uint8Array(this.maxTransfer)));
      this.#free.push(this.depth - 1 - i);
    }
  }

  get inFlight(): number {
    return this.#inFlight;
  }

  acquire(): IoRequest | null {
    const i = this.#free.pop();
    return i === undefined ? null : this.#requests[i]!;
  }

  submit(request: IoRequest): void {
    const r = this.#requests[request.index]!;
    r.status = "pending";
    this.#inFlight++;
    this.maxInFlight = Math.max(this.maxInFlight, this.#inFlight);
    this.log.push({ op: r.op, offset: r.offset, length: r.length });
    this.#submitted.push(r);
  }

  commit(): void {
    if (this.#submitted.length === 0) return;
    this.commits++;
    this.#device.push(...this.#submitted);
    this.#submitted = [];
  }

  reap(): IoRequest | null {
    const r = this.#done.shift();
    if (r === undefined) return null;
    this.#inFlight--;
    return r;
  }

  release(request: IoRequest): void {
    this.#free.push(request.index);
  }

  wait(): void {
    this.waits++;
    const batch = this.#device.reverse();
    this.#device = [];
    for (const r of batch) {
      this.#execute(r);
      this.#done.push(r);
    }
  }

  #execute(r: MemRequest): void {
    if (this.failAt === r.offset) {
      r.status = "ioerr";
      r.detail = "injected";
      return;
    }
    const end = r.offset + r.length;
    switch (r.op) {
      case "read":
        r.data.set(this.disk.subarray(r.offset, end));
        this.onRead?.(r.offset, r.data);
        break;
      case "write":
        this.disk.set(r.data.subarray(0, r.length), r.offset);
        break;
      case "discard":
      case "write-zeroes":
        this.disk.fill(0, r.offset, end);
        break;
      default:
        break;
    }
    r.status = "ok";
  }
}
