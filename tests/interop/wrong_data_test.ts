/**
 * Regressions for wrong-data bugs found by running QEMU's own tests against vstor: each case
 * makes the same images in two directories, runs the same steps through qemu-img/qemu-io in one
 * and through vstor in the other, and requires the same exit codes, the same guest view of every
 * image (`qemu-img compare`) and a vstor image that `qemu-img check` finds as clean as QEMU's.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { ignoreWithout, type ToolResult } from "./qemu.ts";
import { vstor, withTempDir } from "./qcow2_matrix.ts";

const ignore = ignoreWithout("qemu-img") || ignoreWithout("qemu-io");

/** A command line; `@name` stands for the file `name` in the case's directory. */
type Line = readonly ["qemu-img" | "qemu-io", ...string[]];

interface Case {
  name: string;
  /** Run with QEMU's tools in both directories. */
  setup: Line[];
  /** Run with QEMU's tools in one directory and with vstor in the other. */
  steps: Line[];
  /** Images whose guest view must match (all are checked when qcow2). */
  images: string[];
}

function resolve(dir: string, args: readonly string[]): string[] {
  return args.map((a) => a.startsWith("@") ? join(dir, a.slice(1)) : a);
}

async function runQemu(dir: string, line: Line): Promise<ToolResult> {
  const [tool, ...args] = line;
  const out = await new Deno.Command(tool, { args: resolve(dir, args), cwd: dir }).output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

async function runVstor(dir: string, line: Line): Promise<{ code: number; output: string }> {
  const [tool, ...args] = line;
  return await vstor(
    tool === "qemu-img" ? args[0]! : "io",
    ...resolve(dir, tool === "qemu-img" ? args.slice(1) : args),
  );
}

async function checkResult(path: string): Promise<{ code: number; text: string }> {
  const r = await runQemu("/", ["qemu-img", "check", "-f", "qcow2", path]);
  return { code: r.code, text: r.stdout + r.stderr };
}

async function runCase(c: Case): Promise<void> {
  await withTempDir("vstor-wrong-data-", async (root) => {
    const q = join(root, "qemu"), v = join(root, "vstor");
    await Deno.mkdir(q);
    await Deno.mkdir(v);
    for (const line of c.setup) {
      for (const dir of [q, v]) {
        const r = await runQemu(dir, line);
        assert.equal(r.code, 0, `setup ${line.join(" ")}: ${r.stdout}${r.stderr}`);
      }
    }
    for (const line of c.steps) {
      const expected = await runQemu(q, line);
      const actual = await runVstor(v, line);
      assert.equal(
        actual.code,
        expected.code,
        `${line.join(" ")}: vstor exited ${actual.code}, QEMU ${expected.code}\n` +
          `vstor: ${actual.output}\nQEMU: ${expected.stdout}${expected.stderr}`,
      );
    }
    for (const image of c.images) {
      const cmp = await runQemu(root, ["qemu-img", "compare", join(q, image), join(v, image)]);
      assert.equal(cmp.code, 0, `${image}: guest views differ: ${cmp.stdout}${cmp.stderr}`);
      const head = new Uint8Array(4);
      using f = await Deno.open(join(v, image));
      await f.read(head);
      if (new TextDecoder().decode(head.subarray(0, 3)) !== "QFI") continue;
      const [qc, vc] = [await checkResult(join(q, image)), await checkResult(join(v, image))];
      assert.equal(
        vc.code,
        qc.code,
        `${image}: qemu-img check: vstor's ${vc.text}\nQEMU's ${qc.text}`,
      );
      assert.match(vc.text, /No errors were found/, `${image}: ${vc.text}`);
    }
  });
}

const CASES: Case[] = [
  {
    name: "growing an overlay shorter than its backing file reads zeroes, not the backing file",
    setup: [
      ["qemu-img", "create", "-f", "qcow2", "@b.qcow2", "2M"],
      ["qemu-io", "-c", "write -P 0xff 0 2M", "@b.qcow2"],
      ["qemu-img", "create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "@o.qcow2", "1000K"],
      ["qemu-img", "create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "@a.qcow2", "1M"],
      [
        "qemu-img",
        "create",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        "@x.qcow2",
        "1001K",
      ],
    ],
    steps: [
      ["qemu-img", "resize", "@o.qcow2", "1500K"],
      ["qemu-img", "resize", "@a.qcow2", "3M"],
      ["qemu-img", "resize", "@x.qcow2", "2M"],
      ["qemu-io", "-c", "write -P 1 1M 64k", "@a.qcow2"],
    ],
    images: ["o.qcow2", "a.qcow2", "x.qcow2"],
  },
  {
    name: "a v2 overlay cannot grow over a longer backing file (Failed to zero out new clusters)",
    setup: [
      ["qemu-img", "create", "-f", "qcow2", "-o", "compat=0.10", "@b.qcow2", "2M"],
      ["qemu-io", "-c", "write -P 0xff 0 2M", "@b.qcow2"],
      [
        "qemu-img",
        "create",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        "@o.qcow2",
        "1M",
      ],
    ],
    steps: [
      ["qemu-img", "resize", "@o.qcow2", "2M"],
      ["qemu-io", "-c", "read -P 0xff 0 1M", "@o.qcow2"],
    ],
    images: ["o.qcow2"],
  },
  {
    name: "discard on a compat=0.10 overlay keeps the overlay's data (no backing data reappears)",
    setup: [
      ["qemu-img", "create", "-f", "qcow2", "-o", "compat=0.10", "@b.qcow2", "1M"],
      ["qemu-io", "-c", "write -P 0xff 0 1M", "@b.qcow2"],
      [
        "qemu-img",
        "create",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        "@o.qcow2",
      ],
    ],
    steps: [
      ["qemu-io", "-c", "write -P 1 0 128k", "-c", "discard 0 128k", "@o.qcow2"],
      ["qemu-io", "-c", "read -P 1 0 128k", "@o.qcow2"],
      ["qemu-io", "-c", "write -z -u 0 64k", "@o.qcow2"],
    ],
    images: ["o.qcow2"],
  },
  {
    name: "extended_l2 + preallocation=metadata over a backing file reads the backing file",
    setup: [
      ["qemu-img", "create", "-f", "qcow2", "@b.qcow2", "1M"],
      ["qemu-io", "-c", "write -P 0xa5 0 1M", "@b.qcow2"],
    ],
    steps: [
      [
        "qemu-img",
        "create",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,preallocation=metadata",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        "@x.qcow2",
      ],
      ["qemu-io", "-c", "write -P 1 4k 8k", "-c", "read -P 0xa5 0 4k", "@x.qcow2"],
      // Without extended L2 the combination is refused.
      [
        "qemu-img",
        "create",
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        "@y.qcow2",
      ],
      ["qemu-img", "resize", "--preallocation=metadata", "@x.qcow2", "2M"],
    ],
    images: ["x.qcow2"],
  },
  {
    name: "a compressed write that fails part-way still writes the clusters QEMU writes",
    setup: [
      ["qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4k", "@a.qcow2", "1M"],
      ["qemu-io", "-c", "write -P 1 0 4k", "-c", "write -P 1 16k 4k", "@a.qcow2"],
      ["qemu-img", "create", "-f", "qcow2", "@b.qcow2", "1M"],
      ["qemu-io", "-c", "write -P 1 0 64k", "@b.qcow2"],
    ],
    steps: [
      // Clusters 0 and 4 fail; the other six of these eight are written: QEMU starts eight
      // compression tasks at once, so all of them run whatever fails. (With more clusters than
      // tasks, whether QEMU starts a ninth depends on which task its thread pool finishes first:
      // under load it sometimes writes cluster 8 or 9 too, so that is not a fact to test.)
      ["qemu-io", "-c", "write -c -P 2 0 32k", "@a.qcow2"],
      ["qemu-io", "-c", "write -c -P 2 0 128k", "@b.qcow2"],
    ],
    images: ["a.qcow2", "b.qcow2"],
  },
  {
    name: "resize of an image with internal snapshots: v3 shrinks, v2 refuses",
    setup: [
      ["qemu-img", "create", "-f", "qcow2", "@v3.qcow2", "2M"],
      ["qemu-img", "create", "-f", "qcow2", "-o", "compat=0.10", "@v2.qcow2", "2M"],
      ["qemu-io", "-c", "write -P 7 0 2M", "@v3.qcow2"],
      ["qemu-io", "-c", "write -P 7 0 2M", "@v2.qcow2"],
      ["qemu-img", "snapshot", "-c", "s1", "@v3.qcow2"],
      ["qemu-img", "snapshot", "-c", "s1", "@v2.qcow2"],
    ],
    steps: [
      ["qemu-img", "resize", "--shrink", "@v3.qcow2", "1M"],
      ["qemu-img", "resize", "--shrink", "@v2.qcow2", "1M"],
      ["qemu-img", "resize", "@v2.qcow2", "3M"],
      ["qemu-img", "resize", "@v3.qcow2", "3M"],
      ["qemu-io", "-c", "read -P 0 1M 2M", "@v3.qcow2"],
    ],
    images: ["v3.qcow2", "v2.qcow2"],
  },
];

for (const c of CASES) {
  Deno.test({ name: `wrong data: ${c.name}`, ignore, fn: () => runCase(c) });
}
