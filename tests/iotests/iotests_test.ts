/**
 * A quick subset of QEMU 7.2's qemu-iotests run against the drop-in mode through
 * tests/iotests/run.sh. Skipped when the iotests are not already cached (fetching them is
 * run.sh's job, not the unit suite's) or when python3 is missing; the full run is
 * `tests/iotests/run.sh`.
 *
 * @module
 */
import assert from "node:assert/strict";
import { join } from "node:path";

/** Tests that pass today and finish in a few seconds each (raw and qcow2). */
const SUBSET = ["002", "005", "043", "047", "111"];

function cachedIotests(): string | undefined {
  const fromEnv = Deno.env.get("QEMU_IOTESTS_DIR");
  const home = Deno.env.get("XDG_CACHE_HOME") ?? join(Deno.env.get("HOME") ?? "/", ".cache");
  const dir = fromEnv ?? join(home, "qemu-iotests-7.2", "src", "tests", "qemu-iotests");
  try {
    Deno.statSync(join(dir, "check"));
    new Deno.Command("python3", { args: ["--version"], stdout: "null" }).outputSync();
    return dir;
  } catch {
    return undefined;
  }
}

const iotests = cachedIotests();

Deno.test({
  name: "a quick subset of QEMU's qemu-iotests passes on vstor qemu-img and qemu-io",
  ignore: iotests === undefined,
  async fn() {
    const script = new URL("./run.sh", import.meta.url).pathname;
    const out = await new Deno.Command("bash", {
      args: [script, "-j", "2", ...SUBSET],
      env: { QEMU_IOTESTS_DIR: iotests! },
      stdout: "piped",
      stderr: "piped",
    }).output();
    const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
    assert.equal(out.code, 0, text);
    assert.match(text, /summary: \d+ passed, 0 failed/);
  },
});
