/**
 * The command-line entry: `vstor VERB [OPTIONS]`, with qemu-img's and qemu-io's verbs.
 *
 * @module
 */
import { BlockError } from "../errors.ts";

/** Where a command writes: swappable so tests can capture output. */
export interface CliIo {
  stdout: (text: string) => void;
  stderr: (text: string) => void;
}

/** Exit codes scripts can trust. */
export const EXIT_OK = 0;
export const EXIT_ERROR = 1;
export const EXIT_USAGE = 2;

/** A usage mistake: printed with the verb's help, exit 2. */
export class UsageError extends Error {
  override readonly name = "UsageError";
}

const encoder = new TextEncoder();
export const stdio: CliIo = {
  stdout: (text) => Deno.stdout.writeSync(encoder.encode(text)),
  stderr: (text) => Deno.stderr.writeSync(encoder.encode(text)),
};

interface Verb {
  summary: string;
  usage: string;
  run(args: string[], io: CliIo): Promise<number>;
}

const verbs: Record<string, Verb> = {
  create: {
    summary: "create a new image",
    usage:
      "vstor create [-f FMT] [-o OPTIONS] [-b BACKING -F FMT [-u]] [-q] FILE [SIZE]   (-o help lists the options)",
    run: async (args, io) => (await import("./create.ts")).createMain(args, io),
  },
  io: {
    summary: "run qemu-io commands on an image",
    usage: "vstor io [-f FMT] [-r] [-U] [-c CMD]... FILE   (commands from stdin without -c)",
    run: async (args, io) =>
      (await import("./io.ts")).ioMain(args, { stdout: io.stdout, stderr: io.stderr }),
  },
  bench: {
    summary: "run a simple image benchmark (qemu-img bench)",
    usage:
      "vstor bench [-c COUNT] [-d DEPTH] [-f FMT] [--flush-interval=N [--no-drain]] [-i AIO] [-n] " +
      "[-o OFFSET] [--pattern=N] [-q] [-s BUFFER_SIZE] [-S STEP_SIZE] [-t CACHE] [-w] [-U] FILE",
    run: async (args, io) => (await import("./bench.ts")).benchMain(args, io),
  },
  measure: {
    summary: "measure the size a new image needs (qemu-img measure)",
    usage:
      "vstor measure [--output=human|json] [-O FMT] [-o OPTIONS] [--size N | [-f FMT] [-l SNAPSHOT] [-U] FILE]",
    run: async (args, io) => (await import("./measure.ts")).measureMain(args, io),
  },
  convert: {
    summary: "convert images between formats, flatten chains, compress (qemu-img convert)",
    usage:
      "vstor convert [-f FMT] [-O FMT] [-o OPTIONS] [-c] [-B BACKING [-F FMT]] [-S SIZE] [-n] " +
      "[--target-is-zero] [-l SNAPSHOT] [-m N] [-W] [-p] [-q] [-U] SRC... DST",
    run: async (args, io) => (await import("./convert.ts")).convertMain(args, io),
  },
  info: {
    summary: "show an image's format, sizes, backing file and snapshots (qemu-img info)",
    usage: "vstor info [-f FMT] [--output=human|json] [--backing-chain] [-U] FILE",
    run: async (args, io) => (await import("./info.ts")).infoMain(args, io),
  },
  map: {
    summary: "show where each guest range lives in the backing chain (qemu-img map)",
    usage:
      "vstor map [-f FMT] [--output=human|json] [--start-offset=OFFSET] [--max-length=LENGTH] [-U] FILE",
    run: async (args, io) => (await import("./map.ts")).mapMain(args, io),
  },
  compare: {
    summary: "compare the contents of two images (qemu-img compare)",
    usage: "vstor compare [-f FMT] [-F FMT] [-p] [-q] [-s] [-U] FILE1 FILE2",
    run: async (args, io) => (await import("./compare.ts")).compareMain(args, io),
  },
  resize: {
    summary: "grow or shrink an image (qemu-img resize)",
    usage: "vstor resize [--shrink] [--preallocation=MODE] [-f FMT] [-q] FILE [+|-]SIZE",
    run: async (args, io) => (await import("./resize.ts")).resizeMain(args, io),
  },
  amend: {
    summary:
      "change a qcow2 image's compat level, lazy refcounts, refcount width or size (qemu-img amend)",
    usage: "vstor amend [-f FMT] -o OPTIONS [-p] [-q] [--force] FILE   (-o help lists the options)",
    run: async (args, io) => (await import("./amend.ts")).amendMain(args, io),
  },
  check: {
    summary: "check an image for consistency, and repair it (qemu-img check)",
    usage: "vstor check [-f FMT] [--output=human|json] [-r leaks|all] [-q] [-U] FILE",
    run: async (args, io) => (await import("./check.ts")).checkMain(args, io),
  },
  commit: {
    summary: "commit an overlay's data into its backing file (qemu-img commit)",
    usage: "vstor commit [-b BASE] [-d] [-p] [-q] FILE",
    run: async (args, io) => (await import("./chain_verbs.ts")).commitMain(args, io),
  },
  rebase: {
    summary: "change an overlay's backing file, keeping what the guest sees (qemu-img rebase)",
    usage: "vstor rebase [-u] -b BACKING [-F BACKING_FMT] [-p] [-q] FILE",
    run: async (args, io) => (await import("./chain_verbs.ts")).rebaseMain(args, io),
  },
  snapshot: {
    summary: "list, create, apply or delete internal snapshots (qcow2)",
    usage: "vstor snapshot [-l | -a SNAPSHOT | -c SNAPSHOT | -d SNAPSHOT] [-f FMT] [-q] [-U] FILE",
    run: async (args, io) => (await import("./snapshot.ts")).snapshotMain(args, io),
  },
  run: {
    summary: "run a simulated guest on images through virtio-blk/virtio-scsi (no args: main job)",
    usage: "vstor run [--drive SPEC]... [--device SPEC]... [--machine FILE] [job options] " +
      "[--output=json] [--compare-notifications]",
    run: async (args, io) => (await import("./run.ts")).runMain(args, io),
  },
  demo: {
    summary: "the main job (same as `vstor run` with no arguments)",
    usage: "vstor demo [--output=json] [-q]",
    run: async (args, io) => (await import("./run.ts")).runMain(args, io),
  },
};

function help(io: CliIo): void {
  const lines = ["usage: vstor VERB [OPTIONS]", "", "Verbs:"];
  for (const [name, verb] of Object.entries(verbs)) {
    lines.push(`  ${name.padEnd(8)} ${verb.summary}`);
  }
  lines.push("", "`vstor help VERB` or `vstor VERB --help` describes a verb.");
  io.stdout(lines.join("\n") + "\n");
}

/** Print one error line the way every verb does: `vstor: FILE: what is wrong`. */
export function reportError(e: unknown, io: CliIo): void {
  if (e instanceof BlockError) {
    const path = e.context.path;
    const prefix = path !== undefined && !e.message.includes(path) ? `${path}: ` : "";
    io.stderr(`vstor: ${prefix}${e.message}\n`);
  } else if (e instanceof Error) {
    io.stderr(`vstor: ${e.message}\n`);
  } else {
    io.stderr(`vstor: ${String(e)}\n`);
  }
}

/**
 * Run the CLI with `args` (the verb first) and return the exit code.
 *
 * @example
 * ```ts
 * import { main } from "./main.ts";
 * const code = await main(["help"], { stdout: () => {}, stderr: () => {} });
 * if (code !== 0) throw new Error("help failed");
 * ```
 */
export async function main(args: string[], io: CliIo = stdio): Promise<number> {
  const [name, ...rest] = args;
  if (name === undefined || name === "help" || name === "--help" || name === "-h") {
    const topic = name === "help" ? rest[0] : undefined;
    const verb = topic === undefined ? undefined : verbs[topic];
    if (topic !== undefined && verb === undefined) {
      io.stderr(`vstor: unknown verb '${topic}'\n`);
      return EXIT_USAGE;
    }
    if (verb) io.stdout(`usage: ${verb.usage}\n`);
    else help(io);
    return name === undefined ? EXIT_USAGE : EXIT_OK;
  }
  const verb = verbs[name];
  if (!verb) {
    io.stderr(`vstor: unknown verb '${name}' (try 'vstor help')\n`);
    return EXIT_USAGE;
  }
  try {
    return await verb.run(rest, io);
  } catch (e) {
    if (e instanceof UsageError) {
      io.stderr(`vstor ${name}: ${e.message}\nusage: ${verb.usage}\n`);
      return EXIT_USAGE;
    }
    reportError(e, io);
    return EXIT_ERROR;
  }
}
