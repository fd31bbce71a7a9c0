/**
 * `vstor create [-f FMT] [-o OPTIONS] [-q] FILE SIZE`, as qemu-img create.
 *
 * @module
 */
import { parseArgs } from "node:util";
import { createImage, type CreateOptions, formatNames } from "../../formats/open.ts";
import { type CliIo, EXIT_OK, UsageError } from "./main.ts";
import { parseSize } from "./size.ts";

const PREALLOCATION = ["off", "falloc", "full"] as const;

/** Parse a qemu-img size argument into a safe integer of bytes. */
export function parseImageSize(text: string): number {
  const parsed = parseSize(text);
  if (!parsed.ok || parsed.value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new UsageError(
      `Invalid image size '${text}'. You may use k, M, G, T, P or E suffixes for kilobytes, ` +
        `megabytes, gigabytes, terabytes, petabytes and exabytes (at most ${Number.MAX_SAFE_INTEGER} bytes)`,
    );
  }
  return Number(parsed.value);
}

/** Parse `-o key=value,key=value` lists into format options. */
export function parseCreateOptions(lists: string[], format: string): CreateOptions {
  const opts: CreateOptions = {};
  for (const list of lists) {
    for (const item of list.split(",")) {
      if (item === "") continue;
      const eq = item.indexOf("=");
      const key = eq < 0 ? item : item.slice(0, eq);
      const value = eq < 0 ? "" : item.slice(eq + 1);
      if (key === "preallocation") {
        const mode = PREALLOCATION.find((m) => m === value);
        if (mode === undefined) {
          throw new UsageError(
            `Invalid preallocation mode '${value}' for ${format} (use ${PREALLOCATION.join(", ")})`,
          );
        }
        opts.preallocation = mode;
      } else {
        throw new UsageError(`Invalid parameter '${key}' for format ${format}`);
      }
    }
  }
  return opts;
}

/** The create verb; returns the exit code. */
export async function createMain(args: string[], io: CliIo): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      allowPositionals: true,
      options: {
        format: { type: "string", short: "f", default: "raw" },
        options: { type: "string", short: "o", multiple: true, default: [] },
        quiet: { type: "boolean", short: "q", default: false },
        help: { type: "boolean", short: "h", default: false },
      },
    });
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
  const { values, positionals } = parsed;
  if (values.help) {
    io.stdout(
      "usage: vstor create [-f FMT] [-o preallocation=off|falloc|full] [-q] FILE SIZE\n" +
        `  -f FMT   image format (${formatNames().join(", ")}; default raw)\n` +
        "  -o OPTS  comma-separated format options\n" +
        "  -q       quiet: do not print the 'Formatting' line\n" +
        "  SIZE     bytes, or with a k, M, G, T, P or E suffix\n",
    );
    return EXIT_OK;
  }
  const [file, sizeText, ...extra] = positionals;
  if (file === undefined) throw new UsageError("Expecting image file name");
  if (sizeText === undefined) throw new UsageError(`${file}: Image creation needs a size parameter`);
  if (extra.length > 0) throw new UsageError(`Unexpected argument '${extra[0]}'`);
  const format = values.format;
  if (!formatNames().includes(format)) {
    throw new UsageError(`Unknown file format '${format}' (known: ${formatNames().join(", ")})`);
  }
  const size = parseImageSize(sizeText);
  const opts = parseCreateOptions(values.options, format);
  if (!values.quiet) {
    const pre = opts.preallocation === undefined ? "" : ` preallocation=${opts.preallocation}`;
    io.stdout(`Formatting '${file}', fmt=${format} size=${size}${pre}\n`);
  }
  await createImage(file, format, size, opts);
  return EXIT_OK;
}
