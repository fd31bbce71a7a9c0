/**
 * `vstor info [-f FMT] [--output=human|json] [--backing-chain] [-U] FILE`, as qemu-img info.
 *
 * @module
 */
import type { BlockNode } from "../block/node.ts";
import { BlockError } from "../errors.ts";
import { MAX_CHAIN_DEPTH, resolveBacking } from "../../formats/open.ts";
import { Qcow2Node } from "../../formats/qcow2/qcow2.ts";
import { type CliIo, EXIT_OK, UsageError } from "./cli_io.ts";
import { sizeToStr } from "./text/human.ts";
import { hostSnapshotTable, snapshotTable } from "./snapshot.ts";
import { RawNode } from "../../formats/raw.ts";
import { oneFile, openVerbImage, parseVerbArgs } from "./args.ts";
import type { ParseArgsOptionsConfig } from "node:util";
import { optionFlags, type VerbHelp } from "./help.ts";
import { bitmapInfoHuman, qemuJsonEmptyLists } from "./bitmap.ts";
import { imageInfo } from "../../formats/image_info.ts";

export const INFO_USAGE = "vstor info [-f FMT] [--output=human|json] [--backing-chain] [-U] FILE";

/** qemu-img's human info for one image. */
export function infoHuman(info: Record<string, unknown>, node: BlockNode): string {
  const lines = [
    `image: ${info["filename"]}`,
    `file format: ${info["format"]}`,
    `virtual size: ${sizeToStr(node.size)} (${node.size} bytes)`,
    `disk size: ${
      info["actual-size"] === undefined ? "unavailable" : sizeToStr(info["actual-size"] as number)
    }`,
  ];
  if (info["cluster-size"] !== undefined) lines.push(`cluster_size: ${info["cluster-size"]}`);
  if (info["backing-filename"] !== undefined) {
    const name = info["backing-filename"], full = info["full-backing-filename"];
    lines.push(`backing file: ${name}${full !== name ? ` (actual path: ${full})` : ""}`);
    if (info["backing-filename-format"] !== undefined) {
      lines.push(`backing file format: ${info["backing-filename-format"]}`);
    }
  }
  if (node instanceof Qcow2Node && node.snapshots.entries.length > 0) {
    // Only the final newline: a last snapshot without icount keeps its blank column.
    lines.push("Snapshot list:", snapshotTable(node.snapshots.entries).replace(/\n$/, ""));
  } else if (node instanceof RawNode && node.hostSnapshots !== undefined) {
    const table = hostSnapshotTable(node.hostSnapshots.list());
    if (table !== "") lines.push("Snapshot list:", table.replace(/\n$/, ""));
  }
  if (info["dirty-flag"] === true) lines.push("cleanly shut down: no");
  const specific = info["format-specific"] as { data: Record<string, unknown> } | undefined;
  if (specific) {
    lines.push("Format specific information:");
    for (const [key, value] of Object.entries(specific.data)) {
      if (key === "bitmaps") {
        lines.push(...bitmapInfoHuman(value as Array<Record<string, unknown>>));
        continue;
      }
      lines.push(`    ${key.replaceAll("-", " ")}: ${value}`);
    }
  }
  return lines.join("\n") + "\n";
}

const INFO_OPTIONS = {
  format: { type: "string", short: "f" },
  output: { type: "string", default: "human" },
  "backing-chain": { type: "boolean", default: false },
  "force-share": { type: "boolean", short: "U", default: false },
  help: { type: "boolean", short: "h", default: false },
} satisfies ParseArgsOptionsConfig;

/** `vstor help info`. */
export const infoHelp: VerbHelp = {
  text: `usage: ${INFO_USAGE}

Show an image's format, virtual and disk sizes, cluster size, backing file, snapshots and
format-specific details (qemu-img info).

  -f FMT                image format (probed when absent)
  --output=human|json   output format (default human; json has qemu-img's field names)
  --backing-chain       show every image of the backing chain, top first
  -U                    force share: open the image even while another process writes it
  -h, --help            print this help

Example: vstor info --backing-chain --output=json overlay.qcow2
`,
  options: optionFlags(INFO_OPTIONS),
};

/** The info verb; returns the exit code. */
export async function infoMain(args: string[], io: CliIo): Promise<number> {
  const { values, positionals } = parseVerbArgs(args, INFO_OPTIONS);
  if (values.help) {
    io.stdout(infoHelp.text);
    return EXIT_OK;
  }
  if (values.output !== "human" && values.output !== "json") {
    throw new UsageError(`--output must be human or json, not '${values.output}'`);
  }
  const file = oneFile(positionals, io);

  const infos: Array<{ info: Record<string, unknown>; text: string }> = [];
  let path: string | undefined = file;
  let format = values.format;
  const seen = new Set<string>();
  while (path !== undefined) {
    if (seen.has(path) || seen.size >= MAX_CHAIN_DEPTH) {
      // qemu-img's words (it notices a loop by the file names it has seen).
      throw new BlockError("invalid-format", `Backing file '${path}' creates an infinite loop.`, {
        path: file,
      });
    }
    seen.add(path);
    const node: BlockNode = await openVerbImage(io, path, {
      ...(format === undefined ? {} : { format }),
      readOnly: true,
      forceShare: values["force-share"],
      noBacking: true,
    });
    try {
      const info = imageInfo(node, path);
      infos.push({ info, text: infoHuman(info, node) });
      const next = node.backingName;
      path = values["backing-chain"] && next ? resolveBacking(path, next.file) : undefined;
      format = next?.format;
    } finally {
      await node.close();
    }
  }
  if (values.output === "json") {
    const body = values["backing-chain"] ? infos.map((i) => i.info) : infos[0]!.info;
    io.stdout(qemuJsonEmptyLists(JSON.stringify(body, null, 4)) + "\n");
  } else {
    io.stdout(infos.map((i) => i.text).join("\n"));
  }
  return EXIT_OK;
}
