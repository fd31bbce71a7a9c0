/**
 * Argument parsing every verb shares: node:util parseArgs with usage errors, one file operand.
 *
 * @module
 */
import { parseArgs, type ParseArgsOptionsConfig } from "node:util";
import { UsageError } from "./main.ts";

/** Parse a verb's arguments; a parse failure is a usage error (exit 2 with the verb's usage). */
export function parseVerbArgs<T extends ParseArgsOptionsConfig>(args: string[], options: T) {
  try {
    return parseArgs({ args, allowPositionals: true, options });
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
}

/** The single image file operand a verb takes. */
export function oneFile(positionals: string[]): string {
  const [file, ...extra] = positionals;
  if (file === undefined) throw new UsageError("Expecting one image file name");
  if (extra.length > 0) throw new UsageError(`Unexpected argument '${extra[0]}'`);
  return file;
}
