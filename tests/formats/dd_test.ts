import assert from "node:assert/strict";
import { ddCopy, planDd } from "../../formats/dd.ts";
import { RawNode } from "../../formats/raw.ts";
import { MemoryFile } from "../../src/host/memory.ts";

Deno.test("planDd() caps the input at count·bs, starts at skip·bs and rounds the output to sectors", () => {
  assert.deepEqual(planDd(10000, { blockSize: 512n }), {
    blockSize: 512,
    start: 0,
    end: 10000,
    outputSize: 10240,
    skipPastEnd: false,
  });
  assert.deepEqual(planDd(10000, { blockSize: 1000n, count: 3n, skip: 1n }), {
    blockSize: 1000,
    start: 1000,
    end: 3000,
    outputSize: 2048,
    skipPastEnd: false,
  });
});

Deno.test("planDd() makes an empty output when skip is past the end", () => {
  const plan = planDd(4096, { blockSize: 4096n, skip: 2n });
  assert.equal(plan.skipPastEnd, true);
  assert.equal(plan.outputSize, 0);
  assert.equal(plan.start, plan.end);
  // An overflowing skip is past the end too.
  assert.equal(planDd(4096, { blockSize: 1n << 31n, skip: 1n << 40n }).skipPastEnd, true);
});

Deno.test("ddCopy() copies block by block, the short last block included", async () => {
  const input = new Uint8Array(10240).map((_, i) => i & 0xff);
  const src = await RawNode.open(new MemoryFile("in", input));
  const plan = planDd(src.size, { blockSize: 4096n, skip: 1n });
  const dst = await RawNode.open(new MemoryFile("out", new Uint8Array(plan.outputSize)));
  const r = await ddCopy(src, dst, plan);
  assert.deepEqual(r, { kind: "done", bytes: plan.end - plan.start });
  const out = new Uint8Array(plan.end - plan.start);
  await dst.read(0, out);
  assert.deepEqual(out, input.subarray(4096, plan.end));
});

Deno.test("ddCopy() stops at a failed write and says where", async () => {
  const src = await RawNode.open(new MemoryFile("in", new Uint8Array(4096)));
  const dst = await RawNode.open(new MemoryFile("out", new Uint8Array(1024)));
  const r = await ddCopy(src, dst, planDd(4096, { blockSize: 1024n }));
  assert.equal(r.kind, "write-error");
  assert.ok(r.kind === "write-error" && r.offset === 1024);
});
