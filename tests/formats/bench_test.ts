import assert from "node:assert/strict";
import { benchMisfit, type BenchParams, runBench } from "../../formats/bench.ts";
import { RawNode } from "../../formats/raw.ts";
import { MemoryFile } from "../../src/host/memory.ts";

const params = (over: Partial<BenchParams>): BenchParams => ({
  count: 16,
  depth: 4,
  bufferSize: 4096,
  step: 0,
  offset: 0,
  pattern: 0,
  write: false,
  flushInterval: 0,
  drainOnFlush: true,
  cache: "writeback",
  ...over,
});

Deno.test("benchMisfit() names a buffer, offset or step that does not fit the image", () => {
  assert.equal(benchMisfit(65536, params({})), undefined);
  assert.match(benchMisfit(1024, params({}))!, /Buffer size 4096 is larger than the image/);
  assert.match(benchMisfit(65536, params({ offset: 63488 }))!, /is past the end of the image/);
  assert.match(benchMisfit(65536, params({ step: 131072 }))!, /Step size 131072 is larger/);
});

Deno.test("runBench() writes the pattern from the offset by step, wrapping at the end", async () => {
  const file = new MemoryFile("m", new Uint8Array(65536));
  const node = await RawNode.open(file);
  const r = await runBench(
    node,
    params({ count: 20, write: true, pattern: 0xab, offset: 4096, step: 8192, flushInterval: 4 }),
  );
  assert.ok(r.seconds >= 0);
  assert.equal(r.flushRequests, 5);
  const bytes = new Uint8Array(65536);
  await node.read(0, bytes);
  // Offsets 4096, 12288, …, 61440 get the pattern; the blocks between them stay zero.
  for (let block = 0; block < 16; block++) {
    const expected = block % 2 === 1 ? 0xab : 0;
    assert.ok(bytes.subarray(block * 4096, (block + 1) * 4096).every((b) => b === expected));
  }
  await node.close();
});

Deno.test("runBench() refuses requests that do not fit the node", async () => {
  const node = await RawNode.open(new MemoryFile("m", new Uint8Array(2048)));
  assert.throws(() => runBench(node, params({})), RangeError);
  await node.close();
});
