/**
 * Argument parsing every verb shares: node:util parseArgs with usage errors, one file operand.
 *
 * @module
 */
import { parseArgs, type ParseArgsOptionsConfig } from "node:util";
import type { BlockNode } from "../block/node.ts";
import { BlockError } from "../errors.ts";
import { openImage, type OpenOptions } from "../../formats/open.ts";
import { type CliIo, programName, UsageError } from "./cli_io.ts";

/**
 * Parse a verb's arguments; a parse failure is a usage error, phrased as qemu-img's getopt
 * phrases it (`unrecognized option '--bogus'`, `missing argument for option '-f'`).
 */
export function parseVerbArgs<T extends ParseArgsOptionsConfig>(args: string[], options: T) {
  try {
    return parseArgs({ args, allowPositionals: true, options });
  } catch (e) {
    throw new UsageError(getoptMessage(e as Error & { code?: string }, args));
  }
}

/** node:util's parse error in qemu-img's words, naming the option as it was typed. */
function getoptMessage(e: Error & { code?: string }, args: string[]): string {
  const named = /'(-[^' ,]*)(?:, (--[^' ]+))?/.exec(e.message);
  if (e.code === "ERR_PARSE_ARGS_UNKNOWN_OPTION" && named) {
    return `unrecognized option '${named[1]}'`;
  }
  if (e.code === "ERR_PARSE_ARGS_INVALID_OPTION_VALUE" && /argument missing/.test(e.message)) {
    const typed = [named?.[1], named?.[2]].find((o) => o !== undefined && args.includes(o));
    return `missing argument for option '${typed ?? named?.[1] ?? "?"}'`;
  }
  // The first sentence names the problem; node:util runs on with advice.
  return e.message.split(". ")[0]!.replace(/\.$/, "");
}

/**
 * An image name as qemu's file protocol reads it, in drop-in mode: `file:NAME` names the host file
 * NAME, shown with a leading `./` where its first colon would otherwise read as a protocol prefix
 * (`file:image:top.qcow2` is `./image:top.qcow2`). Plain vstor takes names as they are.
 */
export function hostPath(io: CliIo | undefined, name: string): string {
  if (io === undefined || programName(io) === "vstor" || !name.startsWith("file:")) return name;
  const rest = name.slice("file:".length);
  const colon = rest.indexOf(":"), slash = rest.indexOf("/");
  return colon >= 0 && (slash < 0 || colon < slash) ? `./${rest}` : rest;
}

/** The single image file operand a verb takes (as {@linkcode hostPath} reads it, given `io`). */
export function oneFile(positionals: string[], io?: CliIo): string {
  const [name, ...extra] = positionals;
  const file = name === undefined ? undefined : hostPath(io, name);
  if (file === undefined) throw new UsageError("Expecting one image file name");
  if (extra.length > 0) {
    throw new UsageError(`Unexpected argument '${extra[0]}'`, {
      qemu: "Expecting one image file name",
    });
  }
  return file;
}

/**
 * Plain vstor refuses a directory where an image file is expected, in qemu-img's words, instead
 * of failing on the first read of it.
 *
 * @throws {BlockError} `invalid-argument` when `path` is a directory
 */
export function refuseDirectory(io: CliIo, path: string): void {
  if (programName(io) !== "vstor") return;
  let isDirectory = false;
  try {
    isDirectory = Deno.statSync(path).isDirectory;
  } catch {
    // Missing or unreadable: opening it says why.
  }
  if (isDirectory) {
    throw new BlockError(
      "invalid-argument",
      `Could not open '${path}': 'file' driver requires '${path}' to be a regular file`,
      { path },
    );
  }
}

/**
 * Open the image a verb works on. As qemu-img (its img_open), drop-in mode says which image failed
 * to open before why: `Could not open 'FILE': …`.
 */
export async function openVerbImage(
  io: CliIo,
  path: string,
  opts: OpenOptions = {},
): Promise<BlockNode> {
  const warn = (message: string, trailer?: string) =>
    io.stderr(`${programName(io)}: warning: ${message}\n${trailer ?? ""}`);
  refuseDirectory(io, path);
  try {
    return await openImage(path, { onWarning: warn, ...opts });
  } catch (e) {
    if (programName(io) === "vstor" || !(e instanceof Error)) throw e;
    throw new BlockError(
      e instanceof BlockError ? e.kind : "io",
      `Could not open '${path}': ${e.message}`,
      { cause: e },
    );
  }
}
