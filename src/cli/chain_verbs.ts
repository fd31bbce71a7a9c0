/**
 * `vstor commit` and `vstor rebase`, as qemu-img's.
 *
 * @module
 */
import { commitImage, rebaseImage } from "../../formats/chain.ts";
import { type CliIo, EXIT_OK, UsageError } from "./cli_io.ts";
import { progressBar } from "./progress.ts";
import { oneFile, parseVerbArgs } from "./args.ts";
import type { ParseArgsOptionsConfig } from "node:util";
import { optionFlags, type VerbHelp } from "./help.ts";

export const COMMIT_USAGE = "vstor commit [-b BASE] [-d] [-p] [-q] FILE";
export const REBASE_USAGE = "vstor rebase [-u] -b BACKING [-F BACKING_FMT] [-p] [-q] FILE";

const COMMIT_OPTIONS = {
  base: { type: "string", short: "b" },
  drop: { type: "boolean", short: "d", default: false },
  progress: { type: "boolean", short: "p", default: false },
  quiet: { type: "boolean", short: "q", default: false },
  format: { type: "string", short: "f" },
  help: { type: "boolean", short: "h", default: false },
} satisfies ParseArgsOptionsConfig;

/** `vstor help commit`. */
export const commitHelp: VerbHelp = {
  text: `usage: ${COMMIT_USAGE}

Write an overlay's data into its backing file, then empty the overlay.

  -b BASE       commit into this image of the backing chain (implies -d)
  -d            keep the data in FILE (do not empty it)
  -f FMT        accepted for qemu-img compatibility (FILE's format is probed)
  -p            show progress
  -q            quiet: print nothing but errors
  -h, --help    print this help

Example: vstor commit overlay.qcow2
`,
  options: optionFlags(COMMIT_OPTIONS),
};

/** qemu-img commit: copy the overlay's data into its backing file (or BASE), then empty it. */
export async function commitMain(args: string[], io: CliIo): Promise<number> {
  const { values, positionals } = parseVerbArgs(args, COMMIT_OPTIONS);
  if (values.help) {
    io.stdout(commitHelp.text);
    return EXIT_OK;
  }
  const file = oneFile(positionals, io);
  const bar = progressBar(values.progress && !values.quiet, io, 1);
  await commitImage(file, {
    ...(values.base === undefined ? {} : { base: values.base }),
    keepOverlay: values.drop,
    onProgress: (d, t) => bar.update(d, t),
  });
  bar.finish();
  bar.end();
  if (!values.quiet) io.stdout("Image committed.\n");
  return EXIT_OK;
}

const REBASE_OPTIONS = {
  backing: { type: "string", short: "b" },
  "backing-format": { type: "string", short: "F" },
  unsafe: { type: "boolean", short: "u", default: false },
  progress: { type: "boolean", short: "p", default: false },
  quiet: { type: "boolean", short: "q", default: false },
  format: { type: "string", short: "f" },
  help: { type: "boolean", short: "h", default: false },
} satisfies ParseArgsOptionsConfig;

/** `vstor help rebase`. */
export const rebaseHelp: VerbHelp = {
  text: `usage: ${REBASE_USAGE}

Give an overlay a new backing file, keeping what the guest sees: what differs between the old
and new backing is copied into the overlay.

  -b BACKING      the new backing file, stored as given ("" removes it, flattening the image)
  -F BACKING_FMT  format of the new backing file (required with a non-empty -b)
  -u              unsafe: only change the name; the data is not compared or copied
  -f FMT          accepted for qemu-img compatibility (FILE's format is probed)
  -p              show progress
  -q              quiet: print nothing but errors
  -h, --help      print this help

Example: vstor rebase -b new-base.qcow2 -F qcow2 overlay.qcow2
`,
  options: optionFlags(REBASE_OPTIONS),
};

/** qemu-img rebase: change the backing file, copying what would otherwise change (unless -u). */
export async function rebaseMain(args: string[], io: CliIo): Promise<number> {
  const { values, positionals } = parseVerbArgs(args, REBASE_OPTIONS);
  if (values.help) {
    io.stdout(rebaseHelp.text);
    return EXIT_OK;
  }
  const file = oneFile(positionals, io);
  if (values.backing === undefined && !values.unsafe) {
    throw new UsageError("Must specify backing file (-b) or use unsafe mode (-u)");
  }
  const bar = progressBar(values.progress && !values.quiet, io, 2);
  await rebaseImage(file, {
    backing: values.backing ?? "",
    ...(values["backing-format"] === undefined ? {} : { backingFormat: values["backing-format"] }),
    unsafe: values.unsafe,
    onProgress: (d, t) => bar.update(d, t),
  });
  bar.finish();
  bar.end();
  return EXIT_OK;
}
