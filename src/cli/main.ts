/**
 * The command-line entry: `vstor VERB [OPTIONS]`, with qemu-img's and qemu-io's verbs, and the
 * drop-in mode `vstor qemu-img ARGS…` / `vstor qemu-io ARGS…` that answers as those programs do.
 *
 * @module
 */
import { setCorruptionSink } from "../../formats/qcow2/corruption.ts";
import type { VerbHelp } from "./help.ts";
import { QEMU_VERSION, versionText } from "./version.ts";

import {
  type CliIo,
  errorLine,
  EXIT_ERROR,
  EXIT_OK,
  EXIT_USAGE,
  programName,
  reportError,
  stdio,
  UsageError,
} from "./cli_io.ts";

export {
  type CliIo,
  errorLine,
  EXIT_ERROR,
  EXIT_OK,
  EXIT_USAGE,
  type Program,
  programName,
  reportError,
  stdio,
  UsageError,
} from "./cli_io.ts";

interface Verb {
  summary: string;
  usage: string;
  /** qemu-img's syntax line for the verb; verbs without one are vstor's own (not in drop-in mode). */
  qemuImg?: string;
  run(args: string[], io: CliIo): Promise<number>;
  /**
   * The verb's whole help (`vstor help VERB`; the verb prints the same for `--help`). Without it,
   * `vstor help VERB` runs `VERB --help`, for verbs that keep their help to themselves.
   */
  help?: () => Promise<VerbHelp>;
}

const verbs: Record<string, Verb> = {
  create: {
    qemuImg:
      "create [--object objectdef] [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]",
    summary: "create a new image",
    usage:
      "vstor create [-f FMT] [-o OPTIONS] [-b BACKING -F FMT [-u]] [-q] FILE [SIZE]   (-o help lists the options)",
    run: async (args, io) => (await import("./create.ts")).createMain(args, io),
    help: async () => (await import("./create.ts")).createHelp,
  },
  io: {
    summary: "run qemu-io commands on an image",
    usage: "vstor io [-f FMT] [-r] [-U] [-c CMD]... FILE   (commands from stdin without -c)",
    run: async (args, io) =>
      (await import("./io.ts")).ioMain(args, { stdout: io.stdout, stderr: io.stderr }),
    help: async () => (await import("./io.ts")).ioHelp,
  },
  bench: {
    qemuImg:
      "bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] [-i aio] [-n] [--no-drain] [-o offset] [--pattern=pattern] [-q] [-s buffer_size] [-S step_size] [-t cache] [-w] [-U] filename",
    summary: "run a simple image benchmark (qemu-img bench)",
    usage:
      "vstor bench [-c COUNT] [-d DEPTH] [-f FMT] [--flush-interval=N [--no-drain]] [-i AIO] [-n] " +
      "[-o OFFSET] [--pattern=N] [-q] [-s BUFFER_SIZE] [-S STEP_SIZE] [-t CACHE] [-w] [-U] FILE",
    run: async (args, io) => (await import("./bench.ts")).benchMain(args, io),
    help: async () => (await import("./bench.ts")).benchHelp,
  },
  measure: {
    qemuImg:
      "measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | [--object objectdef] [--image-opts] [-f fmt] [-l snapshot_param] filename]",
    summary: "measure the size a new image needs (qemu-img measure)",
    usage:
      "vstor measure [--output=human|json] [-O FMT] [-o OPTIONS] [--size N | [-f FMT] [-l SNAPSHOT] [-U] FILE]",
    run: async (args, io) => (await import("./measure.ts")).measureMain(args, io),
    help: async () => (await import("./measure.ts")).measureHelp,
  },
  convert: {
    qemuImg:
      "convert [--object objectdef] [--image-opts] [--target-image-opts] [--target-is-zero] [--bitmaps] [-U] [-C] [-c] [-p] [-q] [-n] [-f fmt] [-t cache] [-T src_cache] [-O output_fmt] [-B backing_file [-F backing_fmt]] [-o options] [-l snapshot_param] [-S sparse_size] [-r rate_limit] [-m num_coroutines] [-W] [--salvage] filename [filename2 [...]] output_filename",
    summary: "convert images between formats, flatten chains, compress (qemu-img convert)",
    usage:
      "vstor convert [-f FMT] [-O FMT] [-o OPTIONS] [-c] [-B BACKING [-F FMT]] [-S SIZE] [-n] " +
      "[--target-is-zero] [-l SNAPSHOT] [-m N] [-W] [-p] [-q] [-U] SRC... DST",
    run: async (args, io) => (await import("./convert.ts")).convertMain(args, io),
    help: async () => (await import("./convert.ts")).convertHelp,
  },
  info: {
    qemuImg:
      "info [--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename",
    summary: "show an image's format, sizes, backing file and snapshots (qemu-img info)",
    usage: "vstor info [-f FMT] [--output=human|json] [--backing-chain] [-U] FILE",
    run: async (args, io) => (await import("./info.ts")).infoMain(args, io),
    help: async () => (await import("./info.ts")).infoHelp,
  },
  map: {
    qemuImg:
      "map [--object objectdef] [--image-opts] [-f fmt] [--start-offset=offset] [--max-length=len] [--output=ofmt] [-U] filename",
    summary: "show where each guest range lives in the backing chain (qemu-img map)",
    usage:
      "vstor map [-f FMT] [--output=human|json] [--start-offset=OFFSET] [--max-length=LENGTH] [-U] FILE | " +
      "vstor map --html PAGE [-f FMT] [-U] FILE",
    run: async (args, io) => (await import("./map.ts")).mapMain(args, io),
  },
  compare: {
    qemuImg:
      "compare [--object objectdef] [--image-opts] [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2",
    summary: "compare the contents of two images (qemu-img compare)",
    usage: "vstor compare [-f FMT] [-F FMT] [-p] [-q] [-s] [-U] FILE1 FILE2",
    run: async (args, io) => (await import("./compare.ts")).compareMain(args, io),
    help: async () => (await import("./compare.ts")).compareHelp,
  },
  resize: {
    qemuImg:
      "resize [--object objectdef] [--image-opts] [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size",
    summary: "grow or shrink an image (qemu-img resize)",
    usage: "vstor resize [--shrink] [--preallocation=MODE] [-f FMT] [-q] FILE [+|-]SIZE",
    run: async (args, io) => (await import("./resize.ts")).resizeMain(args, io),
    help: async () => (await import("./resize.ts")).resizeHelp,
  },
  amend: {
    qemuImg:
      "amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename",
    summary:
      "change a qcow2 image's compat level, lazy refcounts, refcount width or size (qemu-img amend)",
    usage: "vstor amend [-f FMT] -o OPTIONS [-p] [-q] [--force] FILE   (-o help lists the options)",
    run: async (args, io) => (await import("./amend.ts")).amendMain(args, io),
    help: async () => (await import("./amend.ts")).amendVerbHelp,
  },
  check: {
    qemuImg:
      "check [--object objectdef] [--image-opts] [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-T src_cache] [-U] filename",
    summary: "check an image for consistency, and repair it (qemu-img check)",
    usage: "vstor check [-f FMT] [--output=human|json] [-r leaks|all] [-q] [-U] FILE",
    run: async (args, io) => (await import("./check.ts")).checkMain(args, io),
    help: async () => (await import("./check.ts")).checkHelp,
  },
  commit: {
    qemuImg:
      "commit [--object objectdef] [--image-opts] [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] [-d] [-p] filename",
    summary: "commit an overlay's data into its backing file (qemu-img commit)",
    usage: "vstor commit [-b BASE] [-d] [-p] [-q] FILE",
    run: async (args, io) => (await import("./chain_verbs.ts")).commitMain(args, io),
    help: async () => (await import("./chain_verbs.ts")).commitHelp,
  },
  rebase: {
    qemuImg:
      "rebase [--object objectdef] [--image-opts] [-U] [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] -b backing_file [-F backing_fmt] filename",
    summary: "change an overlay's backing file, keeping what the guest sees (qemu-img rebase)",
    usage: "vstor rebase [-u] -b BACKING [-F BACKING_FMT] [-p] [-q] FILE",
    run: async (args, io) => (await import("./chain_verbs.ts")).rebaseMain(args, io),
    help: async () => (await import("./chain_verbs.ts")).rebaseHelp,
  },
  bitmap: {
    qemuImg:
      "bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b source_file [-F source_fmt]] [-g granularity] [--object objectdef] [--image-opts | -f fmt] filename bitmap",
    summary: "add, remove, clear, enable, disable or merge persistent dirty bitmaps (qcow2)",
    usage: "vstor bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... " +
      "[-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [-f FMT] FILE BITMAP",
    run: async (args, io) => (await import("./bitmap.ts")).bitmapMain(args, io),
    help: async () => (await import("./bitmap.ts")).bitmapHelp,
  },
  dd: {
    qemuImg:
      "dd [--image-opts] [-U] [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] [skip=blocks] if=input of=output",
    summary: "copy an image into a new one block by block, as dd(1) (qemu-img dd)",
    usage:
      "vstor dd [-f FMT] [-O OUTPUT_FMT] [-U] [bs=BLOCK_SIZE] [count=BLOCKS] [skip=BLOCKS] if=INPUT of=OUTPUT",
    run: async (args, io) => (await import("./dd.ts")).ddMain(args, io),
    help: async () => (await import("./dd.ts")).ddHelp,
  },
  snapshot: {
    qemuImg:
      "snapshot [--object objectdef] [--image-opts] [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename",
    summary: "list, create, apply or delete internal snapshots (qcow2)",
    usage: "vstor snapshot [-l | -a SNAPSHOT | -c SNAPSHOT | -d SNAPSHOT] [-f FMT] [-q] [-U] FILE",
    run: async (args, io) => (await import("./snapshot.ts")).snapshotMain(args, io),
    help: async () => (await import("./snapshot.ts")).snapshotHelp,
  },
  run: {
    summary: "run a simulated guest on images through virtio-blk/virtio-scsi (no args: main job)",
    usage:
      "vstor run [--drive SPEC]... [--device SPEC]... [--machine FILE] [--job FILE | job options] " +
      "[--output-format=normal|json|json+] [--html FILE] [--compare-notifications] [--schema] [-q]",
    run: async (args, io) => (await import("./run.ts")).runMain(args, io),
  },
  serve: {
    summary: "serve images over vhost-user-blk/-scsi and NBD, as qemu-storage-daemon",
    usage: "vstor serve [--blockdev SPEC]... --export SPEC... [--nbd-server SPEC] " +
      "[--pidfile PATH] | vstor serve IMAGE --vhost-user-blk SOCK|--nbd ADDR [--writable]",
    run: async (args, io) => (await import("./serve.ts")).serveMain(args, io),
    help: async () => (await import("./serve.ts")).serveHelp,
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
  lines.push(
    "  qemu-img ARGS…  drop-in mode: answer exactly as qemu-img 7.2 does (messages, exit codes)",
    "  qemu-io ARGS…   drop-in mode: answer as qemu-io 7.2 does",
    "",
    "`vstor help VERB` or `vstor VERB --help` describes a verb; `vstor --version` prints versions.",
  );
  io.stdout(lines.join("\n") + "\n");
}

/** Run one verb, turning what it throws into the program's message and exit code. */
async function runVerb(name: string, verb: Verb, args: string[], io: CliIo): Promise<number> {
  try {
    return await verb.run(args, io);
  } catch (e) {
    if (e instanceof UsageError) {
      if (programName(io) === "vstor") {
        io.stderr(`vstor ${name}: ${e.message}\nusage: ${verb.usage}\n`);
        return EXIT_USAGE;
      }
      errorLine(io, e.qemuMessage ?? e.message);
      if (e.tryHelp) io.stderr(`Try '${programName(io)} --help' for more information\n`);
      return EXIT_ERROR;
    }
    reportError(e, io);
    return EXIT_ERROR;
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
  // Corruption notices of the images a command opens go to its stderr, as QEMU prints them.
  const previous = setCorruptionSink((line) => io.stderr(line + "\n"));
  try {
    return await dispatch(args, io);
  } finally {
    setCorruptionSink(previous);
  }
}

async function dispatch(args: string[], io: CliIo): Promise<number> {
  const [name, ...rest] = args;
  if (name === "qemu-img") return await qemuImgMain(rest, io);
  if (name === "qemu-io") return await qemuIoDropIn(rest, io);
  if (name === "--version" || name === "-V" || name === "version") {
    io.stdout(versionText());
    return EXIT_OK;
  }
  if (name === undefined || name === "help" || name === "--help" || name === "-h") {
    const topic = name === "help" ? rest[0] : undefined;
    const verb = topic === undefined ? undefined : verbs[topic];
    if (topic !== undefined && verb === undefined) {
      io.stderr(`vstor: unknown verb '${topic}'\n`);
      return EXIT_USAGE;
    }
    if (topic !== undefined && verb) return await verbHelpText(topic, verb, io);
    help(io);
    return name === undefined ? EXIT_USAGE : EXIT_OK;
  }
  const verb = verbs[name];
  if (!verb) {
    io.stderr(`vstor: unknown verb '${name}' (try 'vstor help')\n`);
    return EXIT_USAGE;
  }
  return await runVerb(name, verb, rest, { ...io, program: "vstor" });
}

/** `vstor help VERB`: the verb's help, or what the verb itself prints for `--help`. */
async function verbHelpText(name: string, verb: Verb, io: CliIo): Promise<number> {
  if (verb.help === undefined) {
    return await runVerb(name, verb, ["--help"], { ...io, program: "vstor" });
  }
  io.stdout((await verb.help()).text);
  return EXIT_OK;
}

/** The verbs of `vstor VERB`, in the order `vstor help` lists them. */
export function verbNames(): string[] {
  return Object.keys(verbs);
}

/**
 * A verb's help and the options its parser accepts; undefined for a verb that keeps its help to
 * itself (`vstor help VERB` then prints what `VERB --help` does).
 */
export async function verbHelp(name: string): Promise<VerbHelp | undefined> {
  return await verbs[name]?.help?.();
}

// ---- Drop-in mode: qemu-img ----

export { QEMU_VERSION } from "./version.ts";

const QEMU_IMG_TRY_HELP = "Try 'qemu-img --help' for more information\n";

/** qemu-img's verbs vstor does not have yet: they fail with a clear message, exit 1. */
const QEMU_IMG_UNSUPPORTED: string[] = [];

/** `qemu-img --version`: qemu-img's shape (`qemu-img version X.Y.Z (…)`), saying it is vstor. */
export function qemuImgVersion(program: "qemu-img" | "qemu-io"): string {
  return `${program} version ${QEMU_VERSION} (vstor, Deno ${Deno.version.deno})\n` +
    "vstor: QEMU's storage model rebuilt for Deno; answers as QEMU 7.2's tools do\n";
}

/** `qemu-img --help`: qemu-img 7.2's text, with the commands and formats vstor has. */
async function qemuImgHelp(): Promise<string> {
  const { formatNames } = await import("../../formats/open.ts");
  const syntax = Object.values(verbs).flatMap((v) => v.qemuImg === undefined ? [] : [v.qemuImg]);
  // qemu-img lists its commands in its own table order (alphabetical, but snapshot before rebase).
  const order = (line: string) => QEMU_IMG_ORDER.indexOf(line.slice(0, line.indexOf(" ")));
  syntax.sort((a, b) => order(a) - order(b));
  return qemuImgVersion("qemu-img") +
    "usage: qemu-img [standard options] command [command options]\n" +
    "QEMU disk image utility\n\n" +
    "    '-h', '--help'       display this help and exit\n" +
    "    '-V', '--version'    output version information and exit\n" +
    "    '-T', '--trace'      [[enable=]<pattern>][,events=<file>][,file=<file>]\n" +
    "                         specify tracing options (accepted and ignored by vstor)\n\n" +
    "Command syntax:\n" + syntax.map((l) => `  ${l}\n`).join("") + "\n" + QEMU_IMG_PARAMETERS +
    `\nSupported formats: ${[...formatNames()].sort().join(" ")}\n` +
    (QEMU_IMG_UNSUPPORTED.length === 0
      ? ""
      : `\nNot supported yet: ${QEMU_IMG_UNSUPPORTED.join(" ")}\n`);
}

const QEMU_IMG_ORDER = [
  "amend",
  "bench",
  "bitmap",
  "check",
  "commit",
  "compare",
  "convert",
  "create",
  "dd",
  "info",
  "map",
  "measure",
  "snapshot",
  "rebase",
  "resize",
];

const QEMU_IMG_PARAMETERS = `Command parameters:
  'filename' is a disk image filename
  'objectdef' is a QEMU user creatable object definition. See the qemu(1)
    manual page for a description of the object properties. The most common
    object type is a 'secret', which is used to supply passwords and/or
    encryption keys.
  'fmt' is the disk image format. It is guessed automatically in most cases
  'cache' is the cache mode used to write the output disk image, the valid
    options are: 'none', 'writeback' (default, except for convert), 'writethrough',
    'directsync' and 'unsafe' (default for convert)
  'src_cache' is the cache mode used to read input disk images, the valid
    options are the same as for the 'cache' option
  'size' is the disk image size in bytes. Optional suffixes
    'k' or 'K' (kilobyte, 1024), 'M' (megabyte, 1024k), 'G' (gigabyte, 1024M),
    'T' (terabyte, 1024G), 'P' (petabyte, 1024T) and 'E' (exabyte, 1024P)  are
    supported. 'b' is ignored.
  'output_filename' is the destination disk image filename
  'output_fmt' is the destination format
  'options' is a comma separated list of format specific options in a
    name=value format. Use -o help for an overview of the options supported by
    the used format
  'snapshot_param' is param used for internal snapshot, format
    is 'snapshot.id=[ID],snapshot.name=[NAME]', or
    '[ID_OR_NAME]'
  '-c' indicates that target image must be compressed (qcow format only)
  '-u' allows unsafe backing chains. For rebasing, it is assumed that old and
       new backing file match exactly. The image doesn't need a working
       backing file before rebasing in this case (useful for renaming the
       backing file). For image creation, allow creating without attempting
       to open the backing file.
  '-h' with or without a command shows this help and lists the supported formats
  '-p' show progress of command (only certain commands)
  '-q' use Quiet mode - do not print any output (except errors)
  '-S' indicates the consecutive number of bytes (defaults to 4k) that must
       contain only zeros for qemu-img to create a sparse image during
       conversion. If the number of bytes is 0, the source will not be scanned for
       unallocated or zero sectors, and the destination image will always be
       fully allocated
  '--output' takes the format in which the output must be done (human or json)
  '-n' skips the target volume creation (useful if the volume is created
       prior to running qemu-img)

Parameters to bitmap subcommand:
  'bitmap' is the name of the bitmap to manipulate, through one or more
       actions from '--add', '--remove', '--clear', '--enable', '--disable',
       or '--merge source'
  '-g granularity' sets the granularity for '--add' actions
  '-b source' and '-F src_fmt' tell '--merge' actions to find the source
       bitmaps from an alternative file

Parameters to check subcommand:
  '-r' tries to repair any inconsistencies that are found during the check.
       '-r leaks' repairs only cluster leaks, whereas '-r all' fixes all
       kinds of errors, with a higher risk of choosing the wrong fix or
       hiding corruption that has already occurred.

Parameters to convert subcommand:
  '--bitmaps' copies all top-level persistent bitmaps to destination
  '-m' specifies how many coroutines work in parallel during the convert
       process (defaults to 8)
  '-W' allow to write to the target out of order rather than sequential

Parameters to snapshot subcommand:
  'snapshot' is the name of the snapshot to create, apply or delete
  '-a' applies a snapshot (revert disk to saved state)
  '-c' creates a snapshot
  '-d' deletes a snapshot
  '-l' lists all snapshots in the given image

Parameters to compare subcommand:
  '-f' first image format
  '-F' second image format
  '-s' run in Strict mode - fail on different image size or sector allocation

Parameters to dd subcommand:
  'bs=BYTES' read and write up to BYTES bytes at a time (default: 512)
  'count=N' copy only N input blocks
  'if=FILE' read from FILE
  'of=FILE' write to FILE
  'skip=N' skip N bs-sized blocks at the start of input
`;

/** A usage mistake before the command, as qemu-img's error_exit prints it: exit 1. */
function qemuImgUsage(io: CliIo, message: string): number {
  io.stderr(`qemu-img: ${message}\n${QEMU_IMG_TRY_HELP}`);
  return EXIT_ERROR;
}

/**
 * `vstor qemu-img ARGS…`: qemu-img 7.2's command line — its standard options (-h, -V, -T), its
 * verbs, its messages (`qemu-img: …`) and exit codes (1 for usage mistakes, `Try 'qemu-img
 * --help'`), `VERB -h` printing the whole help.
 *
 * @example
 * ```ts
 * import { qemuImgMain } from "./main.ts";
 * let err = "";
 * const code = await qemuImgMain(["frobnicate"], { stdout: () => {}, stderr: (s) => err += s });
 * if (code !== 1 || !err.startsWith("qemu-img: Command not found: frobnicate")) throw new Error();
 * ```
 */
export async function qemuImgMain(args: string[], io: CliIo = stdio): Promise<number> {
  const qio: CliIo = { ...io, program: "qemu-img" };
  // Standard options come before the command (getopt "+hVT:"): the first non-option is the command.
  let i = 0;
  for (; i < args.length; i++) {
    const arg = args[i]!;
    if (arg === "--") {
      i++;
      break;
    }
    if (!arg.startsWith("-") || arg === "-") break;
    if (arg === "-h" || arg === "--help") {
      qio.stdout(await qemuImgHelp());
      return EXIT_OK;
    }
    if (arg === "-V" || arg === "--version") {
      qio.stdout(qemuImgVersion("qemu-img"));
      return EXIT_OK;
    }
    if (arg === "-T" || arg === "--trace") {
      if (i + 1 >= args.length) return qemuImgUsage(qio, `missing argument for option '${arg}'`);
      i++;
      continue;
    }
    if (arg.startsWith("--trace=") || (arg.startsWith("-T") && arg.length > 2)) continue;
    return qemuImgUsage(qio, `unrecognized option '${arg}'`);
  }
  const name = args[i];
  const rest = args.slice(i + 1);
  if (name === undefined) return qemuImgUsage(qio, "Not enough arguments");
  const verb = verbs[name];
  if (verb === undefined || verb.qemuImg === undefined) {
    if (QEMU_IMG_UNSUPPORTED.includes(name)) {
      errorLine(qio, `Command not supported yet: ${name}`);
      return EXIT_ERROR;
    }
    return qemuImgUsage(qio, `Command not found: ${name}`);
  }
  // Every qemu-img command answers -h/--help with the whole help text (before "--").
  const end = rest.indexOf("--");
  if ((end < 0 ? rest : rest.slice(0, end)).some((a) => a === "-h" || a === "--help")) {
    qio.stdout(await qemuImgHelp());
    return EXIT_OK;
  }
  return await runVerb(name, verb, rest, qio);
}

// ---- Drop-in mode: qemu-io ----

/** `vstor qemu-io ARGS…`: qemu-io 7.2's command line and commands (src/cli/io.ts). */
async function qemuIoDropIn(args: string[], io: CliIo): Promise<number> {
  return await (await import("./io.ts")).qemuIoMain(args, { ...io, program: "qemu-io" });
}
