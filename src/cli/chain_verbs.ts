/**
 * `vstor commit` and `vstor rebase`, as qemu-img's.
 *
 * @module
 */
import { commitImage, rebaseImage } from "../../formats/chain.ts";
import { type CliIo, EXIT_OK, UsageError } from "./cli_io.ts";
import { progressBar } from "./progress.ts";
import { oneFile, parseVerbArgs } from "./args.ts";

export const COMMIT_USAGE = "vstor commit [-b BASE] [-d] [-p] [-q] FILE";
export const REBASE_USAGE = "vstor rebase [-u] -b BACKING [-F BACKING_FMT] [-p] [-q] FILE";

/** qemu-img commit: copy the overlay's data into its backing file (or BASE), then empty it. */
export async function commitMain(args: string[], io: CliIo): Promise<number> {
  const { values, positionals } = parseVerbArgs(args, {
    base: { type: "string", short: "b" },
    drop: { type: "boolean", short: "d", default: false },
    progress: { type: "boolean", short: "p", default: false },
    quiet: { type: "boolean", short: "q", default: false },
    format: { type: "string", short: "f" },
    help: { type: "boolean", short: "h", default: false },
  });
  if (values.help) {
    io.stdout(
      `usage: ${COMMIT_USAGE}\n` +
        "  -b BASE  commit into this image of the backing chain (implies -d)\n" +
        "  -d       keep the data in FILE (do not empty it)\n" +
        "  -p       show progress\n",
    );
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

/** qemu-img rebase: change the backing file, copying what would otherwise change (unless -u). */
export async function rebaseMain(args: string[], io: CliIo): Promise<number> {
  const { values, positionals } = parseVerbArgs(args, {
    backing: { type: "string", short: "b" },
    "backing-format": { type: "string", short: "F" },
    unsafe: { type: "boolean", short: "u", default: false },
    progress: { type: "boolean", short: "p", default: false },
    quiet: { type: "boolean", short: "q", default: false },
    format: { type: "string", short: "f" },
    help: { type: "boolean", short: "h", default: false },
  });
  if (values.help) {
    io.stdout(
      `usage: ${REBASE_USAGE}\n` +
        '  -b BACKING  the new backing file, stored as given ("" removes it, flattening the image)\n' +
        "  -F FMT      format of the new backing file (required with a non-empty -b)\n" +
        "  -u          unsafe: only change the name; the data is not compared or copied\n",
    );
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
