/**
 * `vstor convert`, as qemu-img convert.
 *
 * @module
 */
import { BlockError } from "../errors.ts";
import { convertImages } from "../../formats/convert.ts";
import { createImage, formatNames } from "../../formats/open.ts";
import { type CliIo, EXIT_OK, UsageError } from "./cli_io.ts";
import { createOptionsHelp, parseCreateOptions } from "./create.ts";
import { progressBar } from "./progress.ts";
import { parseSize } from "./text/size.ts";
import { hostPath, parseVerbArgs, refuseDirectory } from "./args.ts";
import type { ParseArgsOptionsConfig } from "node:util";
import { optionFlags, type VerbHelp } from "./help.ts";
import { convertBitmapsBefore, convertBitmapsCopy } from "./bitmap.ts";

export const CONVERT_USAGE =
  "vstor convert [-f FMT] [-O FMT] [-o OPTIONS] [-c] [-B BACKING [-F BACKING_FMT]] " +
  "[-S SPARSE_SIZE] [-n] [--target-is-zero] [-l SNAPSHOT] [-m N] [-W] [-p] [-q] [-U] SRC... DST";

const CONVERT_OPTIONS = {
  format: { type: "string", short: "f" },
  "output-format": { type: "string", short: "O", default: "raw" },
  options: { type: "string", short: "o", multiple: true, default: [] },
  compress: { type: "boolean", short: "c", default: false },
  backing: { type: "string", short: "B" },
  "backing-format": { type: "string", short: "F" },
  sparse: { type: "string", short: "S" },
  "no-create": { type: "boolean", short: "n", default: false },
  "target-is-zero": { type: "boolean", default: false },
  bitmaps: { type: "boolean", default: false },
  "skip-broken-bitmaps": { type: "boolean", default: false },
  snapshot: { type: "string", short: "l" },
  coroutines: { type: "string", short: "m" },
  "out-of-order": { type: "boolean", short: "W", default: false },
  progress: { type: "boolean", short: "p", default: false },
  quiet: { type: "boolean", short: "q", default: false },
  "force-share": { type: "boolean", short: "U", default: false },
  "target-cache": { type: "string", short: "t" },
  "source-cache": { type: "string", short: "T" },
  help: { type: "boolean", short: "h", default: false },
} satisfies ParseArgsOptionsConfig;

/** `vstor help convert`. */
export const convertHelp: VerbHelp = {
  text: `usage: ${CONVERT_USAGE}

Copy one or more images (concatenated) into a new image DST: change the format, flatten a backing
chain, compress.

  -f FMT                  source format (probed when absent)
  -O FMT                  target format (default raw)
  -o OPTIONS              target creation options, as for create (-o help lists them)
  -c                      compress the target (qcow2), on one Worker per core
  -B BACKING              give the target this backing file; copy only what the source's own
                          layer holds
  -F BACKING_FMT          format of the -B backing file
  -S SIZE                 zero runs at least this long are not written (default 4k; 0 writes
                          everything)
  -n                      write into an existing target instead of creating it
  --target-is-zero        with -n: the target already reads as zeroes, zero runs are skipped
  --bitmaps               copy the source's persistent bitmaps (qcow2 to qcow2)
  --skip-broken-bitmaps   with --bitmaps: leave out inconsistent bitmaps instead of failing
  -l SNAPSHOT             convert an internal snapshot (ID or name; also
                          snapshot.id=ID/snapshot.name=NAME)
  -t CACHE                target cache mode: unsafe (default), writeback, writethrough
  -T SRC_CACHE            source cache mode (accepted for qemu-img compatibility)
  -m N                    accepted for qemu-img compatibility (vstor orders writes itself)
  -W                      accepted for qemu-img compatibility (out-of-order writes)
  -p                      show progress
  -q                      quiet: print nothing but errors
  -U                      force share: read sources even while another process writes them
  -h, --help              print this help

Example: vstor convert -f raw -O qcow2 -c disk.raw disk.qcow2
`,
  options: optionFlags(CONVERT_OPTIONS),
};

/** The convert verb; returns the exit code. */
export async function convertMain(args: string[], io: CliIo): Promise<number> {
  const { values, positionals } = parseVerbArgs(args, CONVERT_OPTIONS);
  if (values.help) {
    io.stdout(convertHelp.text);
    return EXIT_OK;
  }
  if (values["skip-broken-bitmaps"] && !values.bitmaps) {
    throw new UsageError("Use of --skip-broken-bitmaps requires --bitmaps", { tryHelp: false });
  }
  if (values["no-create"] && values.options.length > 0) {
    throw new UsageError("-o has no effect when skipping image creation", { tryHelp: false });
  }
  if (values.options.some((o) => o.split(",").some((i) => i === "help" || i === "?"))) {
    const format = values["output-format"];
    if (!formatNames().includes(format)) {
      throw new UsageError(`Unknown file format '${format}'`, { tryHelp: false });
    }
    io.stdout(createOptionsHelp(format, positionals.length >= 2));
    return EXIT_OK;
  }
  if (positionals.length < 2) {
    throw new UsageError("Expecting at least one source and a target file name");
  }
  const names = positionals.map((name) => hostPath(io, name));
  const target = names[names.length - 1]!;
  const sources = names.slice(0, -1);
  const format = values["output-format"];
  if (!formatNames().includes(format)) {
    throw new UsageError(`Unknown file format '${format}'`, { tryHelp: false });
  }
  let sparse: number | undefined;
  if (values.sparse !== undefined) {
    const p = parseSize(values.sparse);
    if (!p.ok || p.value > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw new UsageError("Invalid buffer size for sparse output specified");
    }
    if (p.value % 512n !== 0n || p.value > 16n * 1024n * 1024n) {
      throw new UsageError(
        "Invalid buffer size for sparse output specified. " +
          "Valid sizes are multiples of 512 up to 16777216.",
      );
    }
    sparse = Number(p.value);
  }
  if (values.coroutines !== undefined) {
    const m = Number(values.coroutines);
    if (!Number.isInteger(m) || m < 1 || m > 16) {
      throw new UsageError(
        "Invalid number of coroutines. Allowed number of coroutines is between 1 and 16",
      );
    }
  }

  const cache = values["target-cache"] ?? "unsafe";
  if (!["none", "writeback", "writethrough", "directsync", "unsafe"].includes(cache)) {
    throw new UsageError(`Invalid cache option: ${cache}`);
  }
  const snapshot = values.snapshot === undefined ? undefined : snapshotKey(values.snapshot);
  // -o backing_file=/backing_fmt= are -B/-F by another name, as in qemu-img.
  const {
    size: _size,
    backingFile: optionBacking,
    backingFormat: optionBackingFormat,
    ...createOptions
  } = parseCreateOptions(values.options, format);
  const backingFile = values.backing ?? optionBacking;
  const backingFormat = values["backing-format"] ?? optionBackingFormat;
  if (values["backing-format"] !== undefined && backingFile === undefined) {
    throw new UsageError("The -F option requires -B");
  }
  if (values["target-is-zero"] && backingFile !== undefined) {
    throw new BlockError(
      "invalid-argument",
      "Cannot use --target-is-zero when the destination image has a backing file",
    );
  }
  if (sources.length > 1 && backingFile !== undefined) {
    throw new BlockError(
      "invalid-argument",
      "Having a backing file for the target makes no sense when concatenating multiple input images",
    );
  }
  const bitmaps = values.bitmaps
    ? await convertBitmapsBefore(io, sources, target, {
      ...(values.format === undefined ? {} : { format: values.format }),
      targetFormat: format,
      compat: createOptions.compat,
      noCreate: values["no-create"],
      forceShare: values["force-share"],
      skipBroken: values["skip-broken-bitmaps"],
      create: (size) => createImage(target, format, size, createOptions),
    })
    : undefined;
  const bar = progressBar(values.progress && !values.quiet, io, 1);
  for (const source of sources) refuseDirectory(io, source);
  await convertImages(sources, target, {
    targetFormat: format,
    createOptions,
    ...(values.format === undefined ? {} : { sourceFormat: values.format }),
    forceShare: values["force-share"],
    compress: values.compress,
    ...(backingFile === undefined ? {} : { backingFile }),
    ...(backingFormat === undefined ? {} : { backingFormat }),
    ...(sparse === undefined ? {} : { sparseSize: sparse }),
    noCreate: values["no-create"],
    cache: cache === "unsafe" ? "unsafe" : "writeback",
    targetIsZero: values["target-is-zero"],
    ...(snapshot === undefined ? {} : { snapshot }),
    onProgress: (d, t) => bar.update(d, t),
    ...(bitmaps === undefined
      ? {}
      : { afterCopy: (out) => convertBitmapsCopy(io, sources[0]!, out, bitmaps) }),
  });
  bar.finish();
  bar.end();
  return EXIT_OK;
}

/**
 * -l's argument: `snapshot.id=ID`, `snapshot.name=NAME` or both comma-separated (each matches only
 * what it names), or a bare ID-or-name.
 */
function snapshotKey(arg: string): string | { id?: string; name?: string } {
  if (!arg.startsWith("snapshot.")) return arg;
  const key: { id?: string; name?: string } = {};
  for (const part of arg.split(",")) {
    const m = /^snapshot\.(id|name)=(.*)$/.exec(part);
    if (m === null) throw new UsageError(`Invalid -l option '${part}'`);
    key[m[1] as "id" | "name"] = m[2]!;
  }
  return key;
}
