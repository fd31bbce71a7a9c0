import assert from "node:assert/strict";
import { main, QEMU_VERSION, verbHelp, verbNames } from "../../src/cli/main.ts";
import { VSTOR_VERSION } from "../../src/cli/version.ts";

async function vstor(...args: string[]) {
  let stdout = "", stderr = "";
  const code = await main(args, { stdout: (s) => stdout += s, stderr: (s) => stderr += s });
  return { code, stdout, stderr };
}

/** Verbs whose help their owners keep to themselves (`vstor help VERB` runs `VERB --help`). */
const HELP_KEPT_BY_THE_VERB = new Set(["run", "demo", "map"]);

/** Whether `flag` appears in `text` as a word of its own (`-f` but not inside `-fo` or `--f`). */
function mentions(text: string, flag: string): boolean {
  const escaped = flag.replace(/[-]/g, "\\-");
  return new RegExp(`(?<![\\w-])${escaped}(?![\\w-])`).test(text);
}

for (const name of verbNames()) {
  Deno.test(`vstor help ${name} and vstor ${name} --help print the same text`, async () => {
    const viaHelp = await vstor("help", name);
    const viaFlag = await vstor(name, "--help");
    assert.equal(viaHelp.code, 0, viaHelp.stderr);
    assert.equal(viaFlag.code, 0, viaFlag.stderr);
    assert.equal(viaHelp.stdout, viaFlag.stdout);
    assert.equal(viaHelp.stderr, "");
    assert.match(viaHelp.stdout, /^usage: vstor /);
  });
}

for (const name of verbNames().filter((n) => !HELP_KEPT_BY_THE_VERB.has(n))) {
  Deno.test(`vstor help ${name} has a synopsis, every option its parser accepts and an example`, async () => {
    const help = await verbHelp(name);
    assert.ok(help !== undefined, `${name} has no help in the verb table`);
    assert.match(help.text, /^usage: vstor /);
    assert.match(help.text, /^Example: vstor /m);
    assert.ok(help.options.length > 0);
    const missing = help.options.filter((flag) => !mentions(help.text, flag));
    assert.deepEqual(missing, [], `options of ${name} without help`);
    assert.equal((await vstor("help", name)).stdout, help.text);
  });
}

Deno.test("every verb without a help entry is one whose owner keeps its help", async () => {
  for (const name of verbNames()) {
    if ((await verbHelp(name)) === undefined) assert.ok(HELP_KEPT_BY_THE_VERB.has(name), name);
  }
});

Deno.test("vstor help for an unknown verb exits 2", async () => {
  const r = await vstor("help", "frobnicate");
  assert.equal(r.code, 2);
  assert.equal(r.stderr, "vstor: unknown verb 'frobnicate'\n");
});

Deno.test("vstor --version prints vstor's version, Deno's and the QEMU release it matches", async () => {
  for (const flag of ["--version", "-V", "version"]) {
    const r = await vstor(flag);
    assert.equal(r.code, 0);
    const lines = r.stdout.split("\n");
    assert.equal(lines[0], `vstor ${VSTOR_VERSION}`);
    assert.ok(lines[1]!.startsWith(`Deno ${Deno.version.deno} `), lines[1]);
    assert.match(lines[2]!, new RegExp(`^matches QEMU ${QEMU_VERSION.replaceAll(".", "\\.")} `));
    assert.equal(QEMU_VERSION, "7.2.0");
  }
});
