/**
 * `vstor compare [-f FMT] [-F FMT] [-p] [-q] [-s] [-U] FILE1 FILE2`, as qemu-img compare: exit 0
 * identical, 1 different, 2 open error, 3 block status error, 4 read error.
 *
 * @module
 */
import type { BlockNode } from "../block/node.ts";
import { compareImages, type CompareResult } from "../../formats/compare.ts";
import { type CliIo, errorLine, reportError, UsageError } from "./cli_io.ts";
import { progressBar } from "./progress.ts";
import { hostPath, openVerbImage, parseVerbArgs } from "./args.ts";
import type { ParseArgsOptionsConfig } from "node:util";
import { optionFlags, type VerbHelp } from "./help.ts";

export const COMPARE_USAGE = "vstor compare [-f FMT] [-F FMT] [-p] [-q] [-s] [-U] FILE1 FILE2";

const SAME = 0, DIFFERENT = 1, OPEN_ERROR = 2, STATUS_ERROR = 3, READ_ERROR = 4;

const COMPARE_OPTIONS = {
  "format-a": { type: "string", short: "f" },
  "format-b": { type: "string", short: "F" },
  progress: { type: "boolean", short: "p", default: false },
  quiet: { type: "boolean", short: "q", default: false },
  strict: { type: "boolean", short: "s", default: false },
  "force-share": { type: "boolean", short: "U", default: false },
  help: { type: "boolean", short: "h", default: false },
} satisfies ParseArgsOptionsConfig;

/** `vstor help compare`. */
export const compareHelp: VerbHelp = {
  text: `usage: ${COMPARE_USAGE}

Compare what two images show the guest; sizes may differ when the longer one is zero past the
other's end.

  -f FMT        FILE1's format (probed when absent)
  -F FMT        FILE2's format (probed when absent)
  -s            strict: sizes and allocation must match too
  -p            show progress
  -q            quiet: print nothing, only the exit code tells
  -U            force share: open the images even while another process writes them
  -h, --help    print this help

Exit codes: 0 identical, 1 different, 2 open error, 3 block status error, 4 read error.

Example: vstor compare base.qcow2 copy.raw
`,
  options: optionFlags(COMPARE_OPTIONS),
};

/** The compare verb; returns qemu-img compare's exit code. */
export async function compareMain(args: string[], io: CliIo): Promise<number> {
  const { values, positionals } = parseVerbArgs(args, COMPARE_OPTIONS);
  if (values.help) {
    io.stdout(compareHelp.text);
    return SAME;
  }
  if (positionals.length !== 2) throw new UsageError("Expecting two image file names");
  const [file1, file2] = positionals.map((name) => hostPath(io, name)) as [string, string];
  const share = values["force-share"];
  const nodes: BlockNode[] = [];
  try {
    for (
      const [file, format] of [[file1, values["format-a"]], [file2, values["format-b"]]] as const
    ) {
      try {
        nodes.push(
          await openVerbImage(io, file, {
            ...(format === undefined ? {} : { format }),
            readOnly: true,
            forceShare: share,
          }),
        );
      } catch (e) {
        reportError(e, io);
        return OPEN_ERROR;
      }
    }
    const bar = progressBar(values.progress && !values.quiet, io, 2);
    const say = (s: string) => {
      if (!values.quiet) io.stdout(s);
    };
    let result: CompareResult;
    try {
      result = await compareImages(nodes[0]!, nodes[1]!, {
        strict: values.strict,
        onProgress: (d, t) => bar.update(d, t),
        onSizeMismatch: () => say("Warning: Image size mismatch!\n"),
      });
    } catch (e) {
      bar.end();
      throw e;
    }
    switch (result.kind) {
      case "identical":
        say("Images are identical.\n");
        bar.end();
        return SAME;
      case "size-mismatch":
        say("Strict mode: Image size mismatch!\n");
        bar.end();
        return DIFFERENT;
      case "status-mismatch":
        say(`Strict mode: Offset ${result.offset} block status mismatch!\n`);
        bar.end();
        return DIFFERENT;
      case "content-mismatch":
        say(`Content mismatch at offset ${result.offset}!\n`);
        bar.end();
        return DIFFERENT;
      case "status-error":
        bar.end();
        errorLine(
          io,
          `Block status error at offset ${result.offset} of ${result.filename}: ${
            (result.cause as Error).message
          }`,
        );
        return STATUS_ERROR;
      default:
        // "read-error"
        bar.end();
        errorLine(
          io,
          `Error while reading offset ${result.offset} of ${result.filename}: ${
            (result.cause as Error).message
          }`,
        );
        return READ_ERROR;
    }
  } finally {
    for (const n of nodes) await n.close();
  }
}
