/**
 * Cluster compression: both codecs round-trip through the decoder, data that does not shrink is
 * refused (QEMU then writes the cluster uncompressed), and the libzstd path agrees with node:zlib.
 */
import assert from "node:assert/strict";
import * as zlib from "node:zlib";
import { compressCluster, decompressCluster } from "../../../formats/qcow2/compress.ts";
import { zstdCompressNative } from "../../../formats/qcow2/compress_native.ts";
import {
  COMPRESSION_DEFLATE as COMPRESSION_ZLIB,
  COMPRESSION_ZSTD,
} from "../../../formats/qcow2/header.ts";

import { mulberry32 } from "../../prng.ts";

const SEED = 0xc0ffee;
const CLUSTER = 65536;

function cluster(kind: "text" | "random"): Uint8Array {
  const next = mulberry32(SEED);
  const out = new Uint8Array(CLUSTER);
  for (let i = 0; i < out.length; i++) {
    out[i] = kind === "random" ? Math.floor(next() * 256) : 97 + (Math.floor(next() * 8) % 26);
  }
  return out;
}

Deno.test(`compressed clusters round-trip through the decoder, both codecs (seed ${SEED})`, () => {
  const data = cluster("text");
  for (const type of [COMPRESSION_ZLIB, COMPRESSION_ZSTD]) {
    const packed = compressCluster(type, data);
    assert.ok(packed !== undefined && packed.length < CLUSTER / 2, `type ${type} shrinks text`);
    // What the image holds is padded to whole sectors: the decoder stops at the stream's end.
    const stored = new Uint8Array(Math.ceil(packed.length / 512) * 512);
    stored.set(packed);
    const back = new Uint8Array(CLUSTER);
    decompressCluster(type, stored, back, { path: "test", offset: 0 });
    assert.ok(back.every((b, i) => b === data[i]), `type ${type} round-trips`);
  }
});

Deno.test("data that does not shrink is refused by both codecs", () => {
  const data = cluster("random");
  assert.equal(compressCluster(COMPRESSION_ZLIB, data), undefined);
  assert.equal(compressCluster(COMPRESSION_ZSTD, data), undefined);
});

Deno.test("libzstd's frames decode with node:zlib, and incompressible data gives null", () => {
  const native = zstdCompressNative(cluster("text"));
  if (native === undefined) return; // no libzstd on this host: node:zlib serves alone
  assert.ok(native !== null);
  const back = zlib.zstdDecompressSync(native);
  assert.deepEqual(new Uint8Array(back), cluster("text"));
  assert.equal(zstdCompressNative(cluster("random")), null);
});
