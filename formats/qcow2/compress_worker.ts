/**
 * Worker entry of the compression pool: compresses clusters handed over by the pool.
 *
 * @module
 */
import { compressCluster } from "./compress.ts";

/** A job: clusters to compress, concatenated, and how to compress them. */
export interface CompressJob {
  id: number;
  type: number;
  clusterSize: number;
  data: Uint8Array;
}

/** The answer: each cluster's compressed bytes, or null where compression does not shrink it. */
export interface CompressResult {
  id: number;
  packed: Array<Uint8Array | null>;
}

const scope = globalThis as unknown as {
  onmessage: ((e: MessageEvent<CompressJob>) => void) | null;
  postMessage(message: CompressResult, transfer: Transferable[]): void;
};

scope.onmessage = (e) => {
  const { id, type, clusterSize, data } = e.data;
  const packed: Array<Uint8Array | null> = [];
  const transfer: Transferable[] = [];
  for (let at = 0; at < data.length; at += clusterSize) {
    const out = compressCluster(type, data.subarray(at, at + clusterSize));
    if (out === undefined) {
      packed.push(null);
    } else {
      const copy = out.slice();
      packed.push(copy);
      transfer.push(copy.buffer);
    }
  }
  scope.postMessage({ id, packed }, transfer);
};
