import assert from "node:assert/strict";
import { bucketOf, bucketValue, LatencyHistogram, PLAT_NR } from "../../src/guest/latency.ts";
import { BlockPermutation, Prng } from "../../src/guest/random.ts";
import {
  checkBlock,
  crc32c,
  describeFailure,
  fillBlock,
  VERIFY_HEADER_BYTES,
  type VerifyStamp,
} from "../../src/guest/verify.ts";

Deno.test("crc32c() matches the Castagnoli check value and continues across calls", () => {
  const bytes = new TextEncoder().encode("123456789");
  assert.equal(crc32c(bytes), 0xe3069283);
  assert.equal(crc32c(bytes, 4, 9, crc32c(bytes, 0, 4)), 0xe3069283);
  // The slicing-by-8 loop agrees with the bitwise definition at every length and alignment.
  const bitwise = (data: Uint8Array) => {
    let c = ~0;
    for (const b of data) {
      c ^= b;
      for (let k = 0; k < 8; k++) c = (c & 1) !== 0 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    }
    return ~c >>> 0;
  };
  const big = new Uint8Array(1000).map((_, i) => i * 7 + (i >> 3));
  for (const [start, end] of [[0, 0], [0, 7], [1, 9], [3, 20], [5, 1000]] as const) {
    assert.equal(crc32c(big, start, end), bitwise(big.subarray(start, end)), `${start}..${end}`);
  }
});

Deno.test("Prng is deterministic per seed and stream, and below() is unbiased in range", () => {
  const a = new Prng(1), b = new Prng(1), c = new Prng(1, 1);
  const xs = Array.from({ length: 8 }, () => a.nextU32());
  assert.deepEqual(xs, Array.from({ length: 8 }, () => b.nextU32()));
  assert.notDeepEqual(xs, Array.from({ length: 8 }, () => c.nextU32()));
  const counts = new Array(10).fill(0);
  const p = new Prng(3);
  for (let i = 0; i < 100_000; i++) counts[p.below(10)]++;
  for (const n of counts) assert.ok(Math.abs(n - 10_000) < 500, String(counts));
  assert.ok(p.below(2 ** 40) < 2 ** 40);
});

Deno.test("BlockPermutation visits every block exactly once for awkward sizes", () => {
  for (const n of [1, 2, 3, 7, 64, 100, 1000, 4097]) {
    const p = new BlockPermutation(n, n * 31);
    const seen = new Uint8Array(n);
    for (let i = 0; i < n; i++) seen[p.at(i)]!++;
    assert.ok(seen.every((x) => x === 1), `n=${n}`);
  }
  const a = new BlockPermutation(1000, 1);
  const b = new BlockPermutation(1000, 2);
  assert.notDeepEqual(
    Array.from({ length: 20 }, (_, i) => a.at(i)),
    Array.from({ length: 20 }, (_, i) => b.at(i)),
  );
  assert.throws(() => new BlockPermutation(0, 1), RangeError);
});

Deno.test("latency buckets follow fio's layout and percentiles stay within 1/64", () => {
  assert.equal(bucketOf(0), 0);
  assert.equal(bucketOf(127), 127);
  assert.equal(bucketOf(128), 128);
  assert.equal(bucketOf(255), 191);
  assert.equal(bucketOf(1e15), PLAT_NR - 1);
  for (const v of [200, 5_000, 123_456, 9_999_999]) {
    assert.ok(Math.abs(bucketValue(bucketOf(v)) - v) / v < 1 / 64, String(v));
  }
  const h = new LatencyHistogram();
  for (let i = 1; i <= 10_000; i++) h.add(i * 100);
  const s = h.summary();
  assert.equal(s.count, 10_000);
  assert.equal(s.min, 100);
  assert.equal(s.max, 1_000_000);
  assert.equal(s.avg, 500_050);
  for (const [p, want] of [[s.p50, 500_000], [s.p99, 990_000], [s.p999, 999_000]] as const) {
    assert.ok(Math.abs(p - want) / want < 1 / 64, `${p} vs ${want}`);
  }
  const other = new LatencyHistogram();
  other.add(5);
  h.merge(other);
  assert.equal(h.summary().min, 5);
  assert.equal(new LatencyHistogram().summary().p99, 0);
});

Deno.test("verify blocks round-trip, and every header field is checked", () => {
  const stamp: VerifyStamp = { mode: "crc32c", seed: 11, pattern: new Uint8Array([1]) };
  const buf = new Uint8Array(4096);
  const view = new DataView(buf.buffer);
  const scratch = new Uint8Array(4096);
  fillBlock(buf, view, 4096, 8192, stamp);
  assert.equal(checkBlock(buf, view, 4096, 8192, stamp, scratch), null);
  const cases: [number, string][] = [[0, "magic"], [2, "type"], [4, "length"], [36, "header-crc"]];
  for (const [at, reason] of cases) {
    const copy = buf.slice();
    copy[at]! ^= 0x10;
    const f = checkBlock(copy, new DataView(copy.buffer), 4096, 8192, stamp, scratch);
    assert.equal(f?.reason, reason);
    assert.equal(f?.offset, 8192 + at);
  }
  // Read at the wrong place: the block says where it belongs.
  const misplaced = checkBlock(buf, view, 4096, 12288, stamp, scratch)!;
  assert.equal(misplaced.reason, "offset");
  assert.match(describeFailure(misplaced), /offset: expected 0x3000, found 0x2000/);
  // The stored data CRC itself flipped: no data byte differs from the rebuilt block but the CRC.
  const crcFlip = buf.slice();
  crcFlip[VERIFY_HEADER_BYTES]! ^= 1;
  const f = checkBlock(crcFlip, new DataView(crcFlip.buffer), 4096, 8192, stamp, scratch)!;
  assert.equal(f.reason, "data", "located to the CRC byte that differs");
  assert.equal(f.offset, 8192 + VERIFY_HEADER_BYTES);
});
