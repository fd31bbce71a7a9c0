/**
 * `vstor resize [--shrink] [--preallocation=MODE] [-f FMT] [-q] FILE [+|-]SIZE`, as qemu-img resize.
 *
 * @module
 */
import { BlockError } from "../errors.ts";
import { type CliIo, errorLine, EXIT_ERROR, EXIT_OK, reportError, UsageError } from "./cli_io.ts";
import { parseSize } from "./text/size.ts";
import { openVerbImage, parseVerbArgs } from "./args.ts";
import type { ParseArgsOptionsConfig } from "node:util";
import { optionFlags, type VerbHelp } from "./help.ts";

export const RESIZE_USAGE =
  "vstor resize [--shrink] [--preallocation=MODE] [-f FMT] [-q] FILE [+|-]SIZE";
const MODES = ["off", "metadata", "falloc", "full"] as const;

const RESIZE_OPTIONS = {
  shrink: { type: "boolean", default: false },
  preallocation: { type: "string" },
  format: { type: "string", short: "f" },
  quiet: { type: "boolean", short: "q", default: false },
  help: { type: "boolean", short: "h", default: false },
} satisfies ParseArgsOptionsConfig;

/** `vstor help resize`. */
export const resizeHelp: VerbHelp = {
  text: `usage: ${RESIZE_USAGE}

Grow or shrink an image's virtual size.

  SIZE                  the new size; +SIZE or -SIZE change it relative to the current one
                        (k, M, G, T, P, E suffixes)
  --shrink              allow making the image smaller (data past the new end is lost)
  --preallocation=MODE  how to allocate the added space: off (default), metadata (qcow2),
                        falloc or full
  -f FMT                image format (probed when absent)
  -q                    quiet: do not print 'Image resized.'
  -h, --help            print this help

Example: vstor resize disk.qcow2 +1G
`,
  options: optionFlags(RESIZE_OPTIONS),
};

/** The resize verb; returns the exit code. */
export async function resizeMain(args: string[], io: CliIo): Promise<number> {
  // The size comes last and may start with "-" ("-1M"): take it out before option parsing.
  const last = args[args.length - 1];
  const sizeLast = last !== undefined && /^[+-]?[0-9]/.test(last);
  const { values, positionals: rest } = parseVerbArgs(
    sizeLast ? args.slice(0, -1) : args,
    RESIZE_OPTIONS,
  );
  const positionals = sizeLast ? [...rest, last!] : rest;
  if (values.help) {
    io.stdout(resizeHelp.text);
    return EXIT_OK;
  }
  const mode = values.preallocation === undefined
    ? undefined
    : MODES.find((m) => m === values.preallocation);
  if (values.preallocation !== undefined && mode === undefined) {
    throw new UsageError(`Invalid preallocation mode '${values.preallocation}'`);
  }
  if (positionals.length !== 2) throw new UsageError("Expecting image file name and size");
  const [file, sizeText] = positionals as [string, string];
  const sign = sizeText.startsWith("+") ? 1 : sizeText.startsWith("-") ? -1 : 0;
  const parsedSize = parseSize(sign === 0 ? sizeText : sizeText.slice(1));
  if (!parsedSize.ok || parsedSize.value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new UsageError(
      "Parameter 'size' expects a non-negative number below 2^64\n" +
        "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.",
    );
  }
  const node = await openVerbImage(
    io,
    file,
    values.format === undefined ? {} : { format: values.format },
  );
  try {
    const amount = Number(parsedSize.value);
    const size = sign === 0 ? amount : node.size + sign * amount;
    if (size <= 0) {
      throw new BlockError("invalid-argument", "New image size must be positive", { path: file });
    }
    if (!Number.isSafeInteger(size)) {
      throw new BlockError("invalid-argument", "Image size too large", { path: file });
    }
    if (!node.truncate) {
      throw new BlockError("unsupported", `Format '${node.format}' cannot be resized`, {
        path: file,
      });
    }
    if (size < node.size) {
      if (mode !== undefined && mode !== "off") {
        errorLine(io, "Preallocation can only be used for growing images");
        return EXIT_ERROR;
      }
      if (!values.shrink) {
        reportError(
          new BlockError(
            "invalid-argument",
            "Use the --shrink option to perform a shrink operation.",
            { path: file },
          ),
          io,
        );
        errorLine(
          io,
          "warning: Shrinking an image will delete all data beyond the shrunken image's end. " +
            "Before performing such an operation, make sure there is no important data there.",
        );
        return EXIT_ERROR;
      }
    }
    await node.truncate(size, mode === undefined ? {} : { preallocation: mode });
  } finally {
    await node.close();
  }
  if (!values.quiet) io.stdout("Image resized.\n");
  return EXIT_OK;
}
