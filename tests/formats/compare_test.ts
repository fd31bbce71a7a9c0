import assert from "node:assert/strict";
import { compareImages } from "../../formats/compare.ts";
import { RawNode } from "../../formats/raw.ts";
import type { BlockNode } from "../../src/block/node.ts";
import { MemoryFile } from "../../src/host/memory.ts";

const raw = (bytes: Uint8Array, name = "m"): Promise<BlockNode> =>
  RawNode.open(new MemoryFile(name, bytes));

Deno.test("compareImages() finds identical images identical and reports progress to the end", async () => {
  const data = new Uint8Array(8192).fill(3, 100, 5000);
  const progress: number[] = [];
  const r = await compareImages(await raw(data.slice()), await raw(data.slice()), {
    onProgress: (done, total) => {
      assert.equal(total, 8192);
      progress.push(done);
    },
  });
  assert.deepEqual(r, { kind: "identical" });
  assert.equal(progress.at(-1), 8192);
});

Deno.test("compareImages() reports the first differing sector", async () => {
  const b = new Uint8Array(8192);
  b[3000] = 1;
  const r = await compareImages(await raw(new Uint8Array(8192)), await raw(b));
  assert.deepEqual(r, { kind: "content-mismatch", offset: 2560 });
});

Deno.test("compareImages() accepts a longer image whose tail is zero, after the size notice", async () => {
  const events: string[] = [];
  const opts = { onSizeMismatch: () => events.push("size") };
  const r = await compareImages(
    await raw(new Uint8Array(4096)),
    await raw(new Uint8Array(8192)),
    opts,
  );
  assert.deepEqual(r, { kind: "identical" });
  assert.deepEqual(events, ["size"]);
  const tail = new Uint8Array(8192);
  tail[6000] = 9;
  const r2 = await compareImages(await raw(new Uint8Array(4096)), await raw(tail), opts);
  assert.deepEqual(r2, { kind: "content-mismatch", offset: 5632 });
});

Deno.test("compareImages() in strict mode refuses different sizes", async () => {
  const r = await compareImages(await raw(new Uint8Array(4096)), await raw(new Uint8Array(8192)), {
    strict: true,
  });
  assert.deepEqual(r, { kind: "size-mismatch" });
});

Deno.test("compareImages() returns a failed read as read-error with the node's name", async () => {
  const bad = await raw(new Uint8Array(4096).fill(1), "bad");
  bad.read = () => Promise.reject(new Error("injected"));
  const r = await compareImages(await raw(new Uint8Array(4096)), bad);
  assert.equal(r.kind, "read-error");
  assert.ok(r.kind === "read-error" && r.filename === "bad" && r.offset === 0);
});
