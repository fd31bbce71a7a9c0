/** createImage: what a failed creation leaves behind. */
import assert from "node:assert/strict";
import { join } from "node:path";
import { createImage } from "../../formats/open.ts";
import { isBlockError } from "../../src/errors.ts";

Deno.test("a create that fails on its options removes the file it was making, as QEMU does", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vstor-create-" });
  try {
    const path = join(dir, "o.qcow2");
    await assert.rejects(
      () =>
        createImage(path, "qcow2", 1 << 20, {
          backingFile: "base.qcow2",
          backingFormat: "qcow2",
          preallocation: "metadata",
        }),
      (e) => isBlockError(e, "invalid-argument") && /extended_l2/.test(e.message),
    );
    assert.deepEqual([...Deno.readDirSync(dir)], []);
    // A good create still leaves its image.
    await createImage(path, "qcow2", 1 << 20);
    assert.ok(Deno.statSync(path).size > 0);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
