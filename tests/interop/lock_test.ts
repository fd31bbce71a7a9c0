import assert from "node:assert/strict";
import { join } from "node:path";
import { createImage, openImage } from "../../formats/open.ts";
import { isBlockError } from "../../src/errors.ts";
import { ignoreWithout, runTool } from "./qemu.ts";

const ignore = ignoreWithout("qemu-io");

/** Start qemu-io holding `path` open until the returned function is called. */
async function holdWithQemuIo(path: string, readOnly: boolean) {
  const child = new Deno.Command("qemu-io", {
    args: ["-f", "raw", ...(readOnly ? ["-r"] : []), path],
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  // qemu-io prints its prompt once the image is open (and locked).
  const reader = child.stdout.getReader();
  let seen = "";
  while (!seen.includes("qemu-io>")) {
    const { value, done } = await reader.read();
    if (done) throw new Error(`qemu-io exited before opening ${path}`);
    seen += new TextDecoder().decode(value);
  }
  return async () => {
    await child.stdin.close();
    reader.releaseLock();
    await child.stdout.cancel();
    await child.stderr.cancel();
    await child.status;
  };
}

async function scratch(name: string): Promise<string> {
  const dir = await Deno.makeTempDir({ prefix: "vstor_lock_" });
  const path = join(dir, name);
  await createImage(path, "raw", 1 << 20);
  return path;
}

Deno.test({
  name: "vstor cannot open an image for writing while qemu-io writes it",
  ignore,
  async fn() {
    const path = await scratch("held.img");
    const release = await holdWithQemuIo(path, false);
    try {
      await assert.rejects(() => openImage(path, { format: "raw" }), (e) => {
        assert.ok(isBlockError(e, "busy"));
        assert.match(
          e.message,
          /^Failed to get shared "write" lock\nIs another process using the image/,
        );
        return true;
      });
      // A plain read-only open also refuses (it will not have the image change under it) …
      await assert.rejects(
        () => openImage(path, { readOnly: true }),
        (e) => isBlockError(e, "busy"),
      );
      // … but -U shares the write permission, as qemu-img -U does.
      const shared = await openImage(path, { readOnly: true, forceShare: true });
      await shared.close();
    } finally {
      await release();
    }
    // Once qemu-io has gone, the image is free.
    const node = await openImage(path, { format: "raw" });
    await node.close();
  },
});

Deno.test({
  name: "qemu-io cannot open an image for writing while vstor writes it",
  ignore,
  async fn() {
    const path = await scratch("ours.img");
    const node = await openImage(path, { format: "raw" });
    try {
      const rw = await runTool("qemu-io", ["-f", "raw", "-c", "write -P 0x11 0 512", path]);
      assert.notEqual(rw.code, 0);
      assert.match(rw.stderr, /Failed to get "write" lock/);
      const ro = await runTool("qemu-io", ["-f", "raw", "-r", "-U", "-c", "read 0 512", path]);
      assert.equal(ro.code, 0, ro.stderr);
    } finally {
      await node.close();
    }
    // Nothing was written by the refused qemu-io.
    const check = await openImage(path, { readOnly: true });
    const head = new Uint8Array(512);
    await check.read(0, head);
    await check.close();
    assert.ok(head.every((b) => b === 0));
    const after = await runTool("qemu-io", ["-f", "raw", "-c", "write -P 0x11 0 512", path]);
    assert.equal(after.code, 0, after.stderr);
  },
});

Deno.test({
  name: "a read-only qemu-io and a read-only vstor share an image",
  ignore,
  async fn() {
    const path = await scratch("shared.img");
    const release = await holdWithQemuIo(path, true);
    try {
      const ro = await openImage(path, { readOnly: true });
      await ro.close();
    } finally {
      await release();
    }
  },
});

Deno.test("two vstor writers exclude each other, and a closed writer frees the image", async () => {
  const path = await scratch("twice.img");
  const first = await openImage(path, { format: "raw" });
  await assert.rejects(() => openImage(path, { format: "raw" }), (e) => isBlockError(e, "busy"));
  await first.close();
  const second = await openImage(path, { format: "raw" });
  await second.close();
});
