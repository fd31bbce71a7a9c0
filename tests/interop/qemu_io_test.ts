/**
 * `vstor io` against real qemu-io: the same script on two copies of a raw image must print the same
 * lines (timing lines only checked for position), exit the same way and leave the same bytes.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { ioMain } from "../../src/cli/io.ts";
import { ignoreWithout, runTool } from "./qemu.ts";

const ignore = ignoreWithout("qemu-io");
const MiB = 1 << 20;

/** qemu-io's statistics lines: their numbers are timings, so only their place is compared. */
const TIMING =
  /^\d+(\.\d+)? (bytes|KiB|MiB|GiB|TiB|PiB|EiB), 1 ops; (\d\d\.\d\d sec|\d+:\d\d:\d\d\.\d\d) \(\d+(\.\d+)? (bytes|KiB|MiB|GiB|TiB|PiB|EiB)\/sec and \d+\.\d{4} ops\/sec\)$/;
const MACHINE = /^\d+,1,\d+:\d\d:\d\d\.\d\d,\d+\.\d{3},\d+\.\d{3}$/;

interface Script {
  commands: string[];
  /** Image size; a multiple of 512, since QEMU rounds a raw image's length up to one. */
  size?: number;
  readOnly?: boolean;
  /** Leave the format to probing (no `-f raw`). */
  probe?: boolean;
  /** Feed the commands on stdin instead of as `-c` arguments. */
  stdin?: boolean;
  /** Prepare each image (both get the same treatment). */
  setup?: (path: string) => Promise<void>;
}

interface Outcome {
  code: number;
  stdout: string[];
  stderr: string[];
}

function normalize(text: string, image: string, program: string): string[] {
  const lines = text.replaceAll(image, "IMAGE").replaceAll(`${program}> `, "").split("\n");
  if (lines.at(-1) === "") lines.pop();
  return lines.map((line) =>
    TIMING.test(line)
      ? "<timing>"
      : MACHINE.test(line)
      ? "<machine>"
      : line.replace(/^qemu-io: /, "vstor: ")
  );
}

async function createImage(path: string, size: number): Promise<void> {
  const file = await Deno.open(path, { create: true, write: true, truncate: true });
  await file.truncate(size);
  file.close();
}

/** Run `script` through qemu-io and `vstor io`; assert they agree and return qemu-io's outcome. */
async function compare(script: Script): Promise<Outcome> {
  const dir = await Deno.makeTempDir({ prefix: "vstor_qemu_io_" });
  try {
    const qemuImage = join(dir, "qemu.raw");
    const vstorImage = join(dir, "vstor.raw");
    for (const path of [qemuImage, vstorImage]) {
      await createImage(path, script.size ?? MiB);
      await script.setup?.(path);
    }
    const flags = [...(script.probe ? [] : ["-f", "raw"]), ...(script.readOnly ? ["-r"] : [])];
    const commandArgs = script.stdin ? [] : script.commands.flatMap((c) => ["-c", c]);
    const stdin = script.stdin ? `${script.commands.join("\n")}\n` : undefined;

    const qemu = await runTool("qemu-io", [...flags, ...commandArgs, qemuImage], stdin);
    let stdout = "";
    let stderr = "";
    const code = await ioMain([...flags, ...commandArgs, vstorImage], {
      stdout: (s) => stdout += s,
      stderr: (s) => stderr += s,
      ...(stdin === undefined
        ? {}
        : { stdin: ReadableStream.from([new TextEncoder().encode(stdin)]) }),
    });

    const expected: Outcome = {
      code: qemu.code,
      stdout: normalize(qemu.stdout, qemuImage, "qemu-io"),
      stderr: normalize(qemu.stderr, qemuImage, "qemu-io"),
    };
    const actual: Outcome = {
      code,
      stdout: normalize(stdout, vstorImage, "vstor"),
      stderr: normalize(stderr, vstorImage, "vstor"),
    };
    assert.deepEqual(actual, expected);
    const [qemuBytes, vstorBytes] = await Promise.all([
      Deno.readFile(qemuImage),
      Deno.readFile(vstorImage),
    ]);
    assert.equal(vstorBytes.length, qemuBytes.length, "image sizes differ");
    const differ = vstorBytes.findIndex((b, i) => b !== qemuBytes[i]);
    assert.equal(differ, -1, `images differ first at byte ${differ}`);
    return expected;
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test({
  name: "vstor io prints what qemu-io prints for pattern writes, reads and dumps",
  ignore,
  async fn() {
    const outcome = await compare({
      commands: [
        "write 0 64k",
        "write -P 0xab 64k 64k",
        "read 0 64k",
        "read -P 0xcd 0 64k",
        "read -P 0xcd 64k 512",
        "read -P 0xab -s 512 -l 1k 64k 4k",
        "read -v 65530 40",
        "read -v -q 0 16",
        "write -P 0x41 100 30",
        "read -v 96 40",
        "length",
        "info",
        "flush",
      ],
    });
    assert.equal(outcome.code, 1); // the pattern mismatch
    assert.ok(outcome.stdout.includes("Pattern verification failed at offset 65536, 512 bytes"));
  },
});

Deno.test({
  name: "vstor io zeroes, discards and writes byte ranges exactly as qemu-io does",
  ignore,
  async fn() {
    const outcome = await compare({
      commands: [
        "write -P 0x11 0 1M",
        "write -z 4k 4k",
        "write -z -u 64k 64k",
        "write -z -n 8k 4k",
        "discard 128k 64k",
        "discard 300000 5000",
        "write -P 0x22 3 5",
        "write -P 0x33 1000 3000",
        "write -z 2500 7",
        "read -v 0 16",
        "read -P 0 4k 4k",
        "read -P 0 64k 128k",
        "read -P 0x33 1000 1500",
        "read -P 0 2500 7",
        "read -P 0x33 2507 1493",
        "read -P 0 300000 5000",
        "read -P 0x11 299999 1",
        "write -f 0 512",
        "map",
      ],
    });
    assert.equal(outcome.code, 0);
  },
});

Deno.test({
  name: "vstor io fails out-of-range requests and bad numbers with qemu-io's messages",
  ignore,
  async fn() {
    const outcome = await compare({
      commands: [
        "read 1048320 512",
        "write 1048320 512",
        "write -z 1M 1",
        "discard 1M 1",
        "read 2M 0",
        "read 1M 0",
        "write 1M 0",
        "read 1E 1",
        "read 0x7fffffffffffffff 1",
        "read 0 x",
        "read x 1",
        "read 0 8E",
        "read 0 2G",
        "write 0 2G",
        "write -z -n 0 2G",
        "discard 0 2G",
        "read 1.5 1",
        "read 0 1KiB",
        "read 1.k 0",
        "alloc 0x10k",
        "alloc 1.5k",
        "alloc -1",
        "read -P 300 0 1",
        "read -P x 0 1",
        "write -P 0xcdx 0 1",
        "write -P 012 0 1",
        "read -P 10 0 1",
        "foo",
        "read\t0 1",
      ],
    });
    assert.equal(outcome.code, 1);
  },
});

Deno.test({
  name: "vstor io parses options and argument counts the way qemu-io's getopt does",
  ignore,
  async fn() {
    await compare({
      commands: [
        "read 0 512 -q",
        "read -qv 0 2",
        "read -P0 -q -- 0 1",
        "read -- 0 1",
        "read -q -- -1 1",
        "r -Q 0 1",
        "read 0 1 -P",
        "read 0 -1",
        "read 0 1 2",
        "read -a 0 1",
        "read -l 2 0 5",
        "read -s 600 -P 1 0 512",
        "discard -x 0 1",
        "read 0",
        "length 1",
        "map 1",
        "alloc",
        "alloc 1 2 3",
        "flush 1",
        "info x",
        "help a b",
        "truncate -m off 1M 2",
        "write -u 0 1",
        "write -n 0 1",
        "write -z -P 1 0 1",
        "write -b -z 0 1",
        "write -f -c 0 1",
        "write -c -z 1 1",
        "w -q 0 1",
        "r -q 0 1",
        "d -q 0 1",
      ],
    });
  },
});

Deno.test({
  name: "vstor io reports length, map, alloc and truncate like qemu-io on a raw image",
  ignore,
  async fn() {
    await compare({
      size: 4 * MiB,
      commands: [
        "length",
        "map",
        "alloc 0",
        "alloc 0 4M",
        "alloc 60k 8k",
        "alloc 4095k 8k",
        "alloc 5M",
        "alloc 1088 0",
        "alloc 1056 0",
        "alloc 1048575 0",
        "alloc 0 0",
        "write -q 64k 64k",
        "discard -q 1M 1M",
        "map",
        "truncate 6M",
        "length",
        "truncate 1536",
        "length",
        "map",
        "alloc 0 1M",
        "truncate 3072",
        "t 2M",
        "l",
        "truncate x",
        "truncate -m off x",
        "truncate -m bogus 1M",
        "truncate -m",
        "map",
      ],
    });
  },
});

Deno.test({
  name: "vstor io refuses writes on a read-only image as qemu-io does",
  ignore,
  async fn() {
    const outcome = await compare({
      readOnly: true,
      setup: async (path) => {
        const file = await Deno.open(path, { write: true });
        await file.write(new Uint8Array(512).fill(0x5a));
        file.close();
      },
      commands: [
        "write 0 512",
        "write -z 0 512",
        "discard 0 512",
        "truncate 2M",
        "write -c 0 512",
        "flush",
        "read -P 0x5a 0 512",
        "length",
      ],
    });
    assert.equal(outcome.code, 1);
  },
});

Deno.test({
  name: "vstor io prints qemu-io's help for the commands it implements",
  ignore,
  async fn() {
    await compare({
      commands: [
        "help read",
        "help write",
        "help discard",
        "help alloc",
        "help map",
        "help flush",
        "help truncate",
        "help length",
        "help info",
        "help help",
        "help quit",
        "help r",
        "? w",
        "help q",
        "help foo",
      ],
    });
  },
});

Deno.test({
  name: "vstor io takes commands from stdin like qemu-io and stops at quit",
  ignore,
  async fn() {
    const outcome = await compare({
      stdin: true,
      commands: [
        "write 0 512",
        "read -P 0xcd 0 512",
        "foo",
        "",
        "read 0 x",
        "quit",
        "write 0 1M",
      ],
    });
    assert.equal(outcome.code, 1);
  },
});

Deno.test({
  name: "vstor io exits like qemu-io when quit follows or precedes a failure",
  ignore,
  async fn() {
    assert.equal((await compare({ commands: ["read 2M 1", "quit", "read 0 1"] })).code, 1);
    assert.equal((await compare({ commands: ["quit", "read 2M 1"] })).code, 0);
    assert.equal((await compare({ commands: ["q 1 2", "read 2M 1"] })).code, 0);
  },
});

Deno.test({
  name: "vstor io matches qemu-io for -C statistics, VM state, compression and -s source files",
  ignore,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vstor_qemu_io_src_" });
    try {
      const source = join(dir, "source");
      await Deno.writeTextFile(source, "vstor!\n");
      await Deno.writeTextFile(join(dir, "empty"), "");
      await compare({
        commands: [
          "write -C 0 512",
          "read -C -v 0 1",
          "discard -C 0 512",
          "write -b 0 512",
          "read -b 0 512",
          "write -b 1 512",
          "read -b 0 1",
          "write -c 0 64k",
          "write -c 1 512",
          "write -c 0 511",
          `write -s ${source} 5 20`,
          `write -s ${source} -q 100 3`,
          "read -v 0 112",
          `write -s ${join(dir, "missing")} 0 1`,
          `write -s ${join(dir, "empty")} 0 1`,
          `write -s ${dir} 0 1`,
          `write -s ${source} -P 1 0 1`,
        ],
      });
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "vstor io warns about a probed raw image and guards its first sector like qemu-io",
  ignore,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vstor_qemu_io_src_" });
    try {
      // A qcow2 magic and version: writing it to sector 0 of a probed raw image is refused.
      const header = join(dir, "header");
      await Deno.writeFile(header, Uint8Array.from([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]));
      const outcome = await compare({
        probe: true,
        commands: [
          `write -s ${header} 0 512`,
          `write -s ${header} 512 512`,
          "write -z 0 512",
          "write -P 0x51 0 4",
        ],
      });
      assert.equal(outcome.code, 1);
      assert.ok(outcome.stdout.includes("write failed: Operation not permitted"));
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
