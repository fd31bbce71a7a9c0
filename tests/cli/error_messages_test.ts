import assert from "node:assert/strict";
import { join } from "node:path";
import { main } from "../../src/cli/main.ts";

const dir = Deno.makeTempDirSync({ prefix: "vstor_errors_" });
globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));
const missing = join(dir, "missing.img");
const folder = join(dir, "folder");
const garbage = join(dir, "garbage.img");
const image = join(dir, "ok.qcow2");
const out = join(dir, "out.raw");
Deno.mkdirSync(folder);
Deno.writeFileSync(garbage, new Uint8Array(65536).map((_, i) => (i * 7919) & 0xff));

async function vstor(...args: string[]) {
  let stdout = "", stderr = "";
  const code = await main(args, { stdout: (s) => stdout += s, stderr: (s) => stderr += s });
  return { code, stdout, stderr };
}

/** Verbs that open an image operand, with where the operand goes. */
const OPENERS: Array<[string, (file: string) => string[]]> = [
  ["info", (f) => ["info", f]],
  ["check", (f) => ["check", f]],
  ["snapshot", (f) => ["snapshot", "-l", f]],
  ["map", (f) => ["map", f]],
  ["commit", (f) => ["commit", f]],
  ["convert", (f) => ["convert", f, out]],
  ["compare", (f) => ["compare", f, image]],
  ["resize", (f) => ["resize", f, "2M"]],
  ["measure", (f) => ["measure", f]],
  ["amend", (f) => ["amend", "-o", "compat=v3", f]],
  ["bitmap", (f) => ["bitmap", "--add", f, "b0"]],
  ["dd", (f) => ["dd", `if=${f}`, `of=${out}`]],
  ["bench", (f) => ["bench", "-c", "1", f]],
  ["io", (f) => ["io", "-c", "length", f]],
];

type Case = [string[], number, string];

/** The exit code for an image that does not open: 1, but compare's own 2 ("open error"). */
const openFailure = (verb: string) => verb === "compare" ? 2 : 1;

const CASES: Case[] = [
  ...OPENERS.map(([verb, args]): Case => [
    args(missing),
    openFailure(verb),
    `Could not open '${missing}': No such file or directory`,
  ]),
  ...OPENERS.filter(([verb]) => verb !== "io").map(([verb, args]): Case => [
    args(folder),
    openFailure(verb),
    // 'file' driver requires … to be a regular file (opened for reading), or: Is a directory
    `Could not open '${folder}': `,
  ]),
  [["check", garbage], 63, "This image format does not support checks"],
  [["snapshot", "-l", garbage], 1, `${garbage}: Format 'raw' does not support internal snapshots`],
  [["commit", garbage], 1, `${garbage}: Image does not have a backing file`],
  [
    ["create", "-f", "qcow2", "-o", "cluster_size=3k", join(dir, "c.qcow2"), "1M"],
    1,
    "Cluster size must be a power of two",
  ],
  [["create", "-f", "vmdk", join(dir, "c.vmdk"), "1M"], 2, "Unknown file format 'vmdk'"],
  [["create", join(dir, "c.raw"), "1Q"], 2, "Invalid image size '1Q'"],
  [["create", "-q", folder, "1M"], 1, `Could not create '${folder}': Is a directory`],
  [["info", "--output=xml", image], 2, "--output must be human or json, not 'xml'"],
  [["info", "-f", "vmdk", image], 1, "Unknown driver 'vmdk'"],
  [["check", "-r", "some", image], 2, "Unknown option value for -r"],
  [["convert", "-O", "vmdk", image, out], 2, "Unknown file format 'vmdk'"],
  [["resize", "--preallocation=bad", image, "2M"], 2, "Invalid preallocation mode 'bad'"],
  [["snapshot", "-a", "nosuch", image], 1, "Could not apply snapshot 'nosuch'"],
  [["bench", "-c", "0", image], 2, "Invalid request count specified"],
  [["dd", "bs=0", `if=${image}`, `of=${out}`], 2, "Invalid bs specified"],
  [["amend", "-o", "compat=v9", image], 1, "Unknown compatibility level v9"],
  [["info", "--bogus", image], 2, "unrecognized option '--bogus'"],
];

Deno.test("vstor's error messages say what was wrong and where, without runtime class names", async () => {
  const created = await vstor("create", "-q", "-f", "qcow2", image, "1M");
  assert.equal(created.code, 0, created.stderr);
  for (const [args, code, fragment] of CASES) {
    const r = await vstor(...args);
    const what = `vstor ${args.join(" ")}: ${r.stderr}`;
    assert.equal(r.code, code, what);
    assert.ok(r.stderr.includes(fragment), what);
    assert.match(r.stderr, /^vstor[ :]/, what);
    assert.doesNotMatch(r.stderr, /\b[A-Z]\w*Error:|\(os error|^\s+at /m, what);
  }
});
