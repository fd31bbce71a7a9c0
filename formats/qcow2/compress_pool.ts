/**
 * A pool of Workers that compress clusters in parallel (qemu-img convert -c spreads compression
 * over threads the same way). A job is one chunk of whole clusters; the chunk's buffer is
 * transferred to a Worker, compressed in place and transferred back.
 *
 * @module
 */
import type { CompressJob, CompressResult } from "./compress_worker.ts";

export { CLUSTER_INCOMPRESSIBLE, CLUSTER_ZERO } from "./compress_worker.ts";

/** A compressed chunk: see {@linkcode CompressResult}. */
export interface CompressedChunk {
  data: Uint8Array<ArrayBuffer>;
  lengths: Int32Array<ArrayBuffer>;
}

/** Compress clusters on background Workers. */
export class CompressPool {
  readonly #workers: Worker[] = [];
  readonly #pending = new Map<
    number,
    { worker: number; resolve: (r: CompressedChunk) => void; reject: (e: Error) => void }
  >();
  #next = 0;
  #turn = 0;

  constructor(size = Math.max(1, navigator.hardwareConcurrency || 1)) {
    for (let i = 0; i < size; i++) {
      const worker = new Worker(new URL("./compress_worker.ts", import.meta.url).href, {
        type: "module",
      });
      worker.onmessage = (e: MessageEvent<CompressResult>) => {
        const job = this.#pending.get(e.data.id);
        this.#pending.delete(e.data.id);
        if (e.data.error !== undefined) {
          job?.reject(new Error(`Compression failed: ${e.data.error}`));
        } else job?.resolve({ data: e.data.data, lengths: e.data.lengths });
      };
      worker.onerror = (e) => {
        e.preventDefault();
        for (const [id, job] of this.#pending) {
          if (job.worker !== i) continue;
          this.#pending.delete(id);
          job.reject(new Error(`Compression worker failed: ${e.message}`));
        }
      };
      this.#workers.push(worker);
    }
  }

  /** Workers in the pool. */
  get size(): number {
    return this.#workers.length;
  }

  /**
   * Compress the clusters of `data[0, length)` with compression `type`. `data` must hold whole
   * clusters with zeroes after `length`; its buffer is transferred to a Worker: use the buffer
   * that comes back in the result instead.
   */
  compressChunk(
    type: number,
    clusterSize: number,
    data: Uint8Array<ArrayBuffer>,
    length: number,
  ): Promise<CompressedChunk> {
    const id = this.#next++;
    const index = this.#turn++ % this.#workers.length;
    const worker = this.#workers[index]!;
    return new Promise((resolve, reject) => {
      this.#pending.set(id, { worker: index, resolve, reject });
      const job: CompressJob = { id, type, clusterSize, data, length };
      worker.postMessage(job, [data.buffer]);
    });
  }

  /** Stop the workers. */
  close(): void {
    for (const w of this.#workers) w.terminate();
    this.#workers.length = 0;
  }
}
