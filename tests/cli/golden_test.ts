/**
 * Human output pinned by golden files (tests/fixtures/golden/*.txt) for images vstor makes the
 * same way every run. `VSTOR_UPDATE_GOLDEN=1 deno test -A tests/cli/golden_test.ts` rewrites them.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { main } from "../../src/cli/main.ts";

const GOLDEN = new URL("../fixtures/golden/", import.meta.url);
const update = Deno.env.get("VSTOR_UPDATE_GOLDEN") === "1";

async function run(args: string[]): Promise<string> {
  let out = "";
  const code = await main(args, { stdout: (s) => out += s, stderr: (s) => out += s });
  return `$ vstor ${
    args.map((a) => a.includes(" ") ? `'${a}'` : a).join(" ")
  }\n${out}[exit ${code}]\n`;
}

async function golden(name: string, text: string): Promise<void> {
  const file = new URL(`${name}.txt`, GOLDEN);
  if (update) {
    await Deno.writeTextFile(file, text);
    return;
  }
  assert.equal(text, await Deno.readTextFile(file), `golden file ${name}.txt`);
}

Deno.test("create, io, map, check, compare and resize print their golden output", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vstor_golden_" });
  const cwd = Deno.cwd();
  Deno.chdir(dir);
  try {
    let text = "";
    text += await run(["create", "-f", "qcow2", "-o", "cluster_size=4k", "g.qcow2", "1M"]);
    text += (await run([
      "io",
      "-f",
      "qcow2",
      "-c",
      "write -P 0x11 0 12k",
      "-c",
      "write -z 64k 8k",
      "-c",
      "write -c -P 0x22 128k 4k",
      "-c",
      "length",
      "g.qcow2",
    ]))
      .replace(/ops; \S+ sec \([^)]*\)/g, "ops; (timing)");
    text += await run(["map", "g.qcow2"]);
    text += await run(["map", "--output=json", "g.qcow2"]);
    text += await run(["check", "g.qcow2"]);
    text += await run(["create", "-f", "raw", "r.raw", "1M"]);
    text += await run(["compare", "-f", "qcow2", "-F", "raw", "g.qcow2", "r.raw"]);
    text += await run(["resize", "r.raw", "2M"]);
    text += await run(["resize", "r.raw", "-1M"]);
    text += await run(["snapshot", "-c", "s1", "g.qcow2"]);
    text += await run(["snapshot", "-d", "nope", "g.qcow2"]);
    text += await run(["check", "-r", "bogus", "g.qcow2"]);
    await golden("qcow2_session", text.replaceAll(join(dir, ""), ""));
  } finally {
    Deno.chdir(cwd);
    await Deno.remove(dir, { recursive: true });
  }
});
