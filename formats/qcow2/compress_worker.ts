/**
 * Worker entry of the compression pool: compresses the clusters of one chunk handed over by the
 * pool, in place — each cluster's compressed bytes overwrite the start of its own slot, since they
 * are shorter than it, so one buffer goes out and the same buffer comes back (no copies, one
 * transfer each way).
 *
 * @module
 */
import { compressCluster } from "./compress.ts";
import { isZeroBuffer } from "../../src/block/zero.ts";

/** A job: a chunk of whole clusters, of which the first `length` bytes are guest data. */
export interface CompressJob {
  id: number;
  type: number;
  clusterSize: number;
  /** The chunk; bytes from `length` to the end of the last cluster must be zero. */
  data: Uint8Array<ArrayBuffer>;
  length: number;
}

/** What became of one cluster. */
export const CLUSTER_ZERO = -1;
export const CLUSTER_INCOMPRESSIBLE = 0;

/**
 * The answer: the same chunk back, and per cluster {@linkcode CLUSTER_ZERO} (all zeroes, left as
 * it was), {@linkcode CLUSTER_INCOMPRESSIBLE} (left as it was) or the compressed length (the
 * compressed bytes now start the cluster's slot).
 */
export interface CompressResult {
  id: number;
  data: Uint8Array<ArrayBuffer>;
  lengths: Int32Array<ArrayBuffer>;
  error?: string;
}

const scope = globalThis as unknown as {
  onmessage: ((e: MessageEvent<CompressJob>) => void) | null;
  postMessage(message: CompressResult, transfer: Transferable[]): void;
};

scope.onmessage = (e) => {
  const { id, type, clusterSize, data, length } = e.data;
  const clusters = Math.ceil(length / clusterSize);
  const lengths = new Int32Array(clusters);
  let error: string | undefined;
  try {
    for (let c = 0; c < clusters; c++) {
      const slot = data.subarray(c * clusterSize, (c + 1) * clusterSize);
      if (isZeroBuffer(slot)) {
        lengths[c] = CLUSTER_ZERO;
        continue;
      }
      const out = compressCluster(type, slot);
      if (out === undefined) {
        lengths[c] = CLUSTER_INCOMPRESSIBLE;
      } else {
        slot.set(out);
        lengths[c] = out.length;
      }
    }
  } catch (err) {
    error = err instanceof Error ? err.message : String(err);
  }
  const result: CompressResult = error === undefined ? { id, data, lengths } : {
    id,
    data,
    lengths,
    error,
  };
  scope.postMessage(result, [data.buffer, lengths.buffer]);
};
