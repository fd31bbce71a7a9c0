/**
 * A pool of Workers that compress clusters in parallel (qemu-img convert -c spreads compression
 * over threads the same way). Results come back in submission order.
 *
 * @module
 */
import type { CompressJob, CompressResult } from "./compress_worker.ts";

/** Compress clusters on background Workers. */
export class CompressPool {
  readonly #workers: Worker[] = [];
  readonly #waiting = new Map<number, (packed: Array<Uint8Array | null>) => void>();
  readonly #failures = new Map<number, (e: Error) => void>();
  #next = 0;
  #turn = 0;

  constructor(size = Math.max(1, navigator.hardwareConcurrency || 1)) {
    for (let i = 0; i < size; i++) {
      const worker = new Worker(new URL("./compress_worker.ts", import.meta.url).href, {
        type: "module",
      });
      worker.onmessage = (e: MessageEvent<CompressResult>) => {
        this.#failures.delete(e.data.id);
        const done = this.#waiting.get(e.data.id);
        this.#waiting.delete(e.data.id);
        done?.(e.data.packed);
      };
      worker.onerror = (e) => {
        e.preventDefault();
        for (const [id, fail] of this.#failures) {
          this.#waiting.delete(id);
          fail(new Error(`Compression worker failed: ${e.message}`));
        }
        this.#failures.clear();
      };
      this.#workers.push(worker);
    }
  }

  /** Workers in the pool. */
  get size(): number {
    return this.#workers.length;
  }

  /**
   * Compress `data` (whole clusters of `clusterSize`) with compression `type`. The buffer is
   * transferred to the worker: do not use it afterwards.
   */
  compress(
    type: number,
    clusterSize: number,
    data: Uint8Array<ArrayBuffer>,
  ): Promise<Array<Uint8Array | null>> {
    const id = this.#next++;
    const worker = this.#workers[this.#turn++ % this.#workers.length]!;
    return new Promise((resolve, reject) => {
      this.#waiting.set(id, resolve);
      this.#failures.set(id, reject);
      const job: CompressJob = { id, type, clusterSize, data };
      worker.postMessage(job, [data.buffer]);
    });
  }

  /** Stop the workers. */
  close(): void {
    for (const w of this.#workers) w.terminate();
    this.#workers.length = 0;
  }
}
