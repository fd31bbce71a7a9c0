/**
 * `vstor map [-f FMT] [--output=human|json] [--start-offset=OFF] [--max-length=LEN] [-U] FILE`,
 * as qemu-img map; `vstor map --html=PAGE FILE` draws the whole image as one self-contained HTML
 * page instead (vstor's own: not in qemu-img drop-in mode).
 *
 * @module
 */
import { BlockError } from "../errors.ts";
import { type MapEntry, mapImage } from "../../formats/map.ts";
import { imageClusterMap } from "../../formats/cluster_map.ts";
import { type CliIo, EXIT_OK, programName, UsageError } from "./cli_io.ts";
import { renderMapPage } from "./html/map_page.ts";
import { writePage } from "./html/page.ts";
import { parseSize } from "./text/size.ts";
import { oneFile, openVerbImage, parseVerbArgs } from "./args.ts";

export const MAP_USAGE =
  "vstor map [-f FMT] [--output=human|json] [--start-offset=OFFSET] [--max-length=LENGTH] [-U] FILE\n" +
  "       vstor map --html=PAGE [-f FMT] [-U] FILE   (writes the whole image's cluster map to " +
  "PAGE, a self-contained HTML page; prints nothing)";

/** qemu-img's JSON map: one object per line. */
export function mapJson(entries: MapEntry[]): string {
  const lines = entries.map((e) =>
    `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, ` +
    `"zero": ${e.zero}, "data": ${e.data}${
      e.offset === undefined ? "" : `, "offset": ${e.offset}`
    }}`
  );
  return `[${lines.join(",\n")}]\n`;
}

/**
 * qemu-img's human map: the data runs that do not read as zeroes, with their host offset and file,
 * line by line; a run with no host offset (compressed) stops it with an error, as in qemu-img.
 */
export function mapHuman(entries: MapEntry[], out: (line: string) => void): void {
  const hex = (n: number) => n === 0 ? "0" : `0x${n.toString(16)}`;
  out(`${"Offset".padEnd(16)}${"Length".padEnd(16)}${"Mapped to".padEnd(16)}File\n`);
  for (const e of entries) {
    if (!e.data) continue;
    if (e.offset === undefined) {
      throw new BlockError(
        "unsupported",
        "File contains external, encrypted or compressed clusters.",
      );
    }
    if (e.zero) continue;
    out(
      `${hex(e.start).padEnd(16)}${hex(e.length).padEnd(16)}${
        hex(e.offset).padEnd(16)
      }${e.filename}\n`,
    );
  }
}

function size(text: string | undefined, what: string): number | undefined {
  if (text === undefined) return undefined;
  const parsed = parseSize(text);
  if (!parsed.ok || parsed.value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new UsageError(`Invalid ${what} specified`);
  }
  return Number(parsed.value);
}

/** The map verb; returns the exit code. */
export async function mapMain(args: string[], io: CliIo): Promise<number> {
  const { values, positionals } = parseVerbArgs(args, {
    format: { type: "string", short: "f" },
    output: { type: "string", default: "human" },
    "start-offset": { type: "string", short: "s" },
    "max-length": { type: "string", short: "l" },
    "force-share": { type: "boolean", short: "U", default: false },
    html: { type: "string" },
    help: { type: "boolean", short: "h", default: false },
  });
  // qemu-img has no --html: in drop-in mode it is the unknown option qemu-img calls it.
  if (values.html !== undefined && programName(io) !== "vstor") {
    throw new UsageError("unrecognized option '--html'");
  }
  if (values.help) {
    io.stdout(`usage: ${MAP_USAGE}\n`);
    return EXIT_OK;
  }
  if (values.output !== "human" && values.output !== "json") {
    throw new UsageError(`--output must be human or json, not '${values.output}'`);
  }
  if (values.html !== undefined) {
    // The page maps the whole image, and is the output: range and output options do not apply.
    const clash = values["start-offset"] !== undefined
      ? "--start-offset"
      : values["max-length"] !== undefined
      ? "--max-length"
      : args.some((a) => a.startsWith("--output"))
      ? "--output"
      : undefined;
    if (clash !== undefined) throw new UsageError(`--html cannot be combined with ${clash}`);
    if (values.html === "") throw new UsageError("--html needs a file name");
  }
  const start = size(values["start-offset"], "start offset") ?? 0;
  const maxLength = size(values["max-length"], "max length");
  const file = oneFile(positionals, io);
  const node = await openVerbImage(io, file, {
    ...(values.format === undefined ? {} : { format: values.format }),
    readOnly: true,
    forceShare: values["force-share"],
  });
  try {
    if (values.html !== undefined) {
      writePage(values.html, renderMapPage(await imageClusterMap(node)));
      return EXIT_OK;
    }
    const entries = await mapImage(node, start, maxLength ?? node.size - start);
    if (values.output === "json") io.stdout(mapJson(entries));
    else mapHuman(entries, io.stdout);
  } finally {
    await node.close();
  }
  return EXIT_OK;
}
