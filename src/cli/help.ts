/**
 * What `vstor help VERB` and `vstor VERB --help` print, kept beside each verb's code.
 *
 * @module
 */
import type { ParseArgsOptionsConfig } from "node:util";

/** A verb's whole help text, and the options its parser accepts (so a test can find gaps). */
export interface VerbHelp {
  /** Synopsis, what the verb does, every option on a line of its own, an example. */
  readonly text: string;
  /** Each accepted option as typed: `-f` where it has a short form, else `--name`. */
  readonly options: readonly string[];
}

/**
 * The options a node:util parseArgs configuration accepts, as a user types them.
 *
 * @example
 * ```ts
 * import { optionFlags } from "./help.ts";
 * const flags = optionFlags({ format: { type: "string", short: "f" }, shrink: { type: "boolean" } });
 * if (flags.join(" ") !== "-f --shrink") throw new Error(flags.join(" "));
 * ```
 */
export function optionFlags(config: ParseArgsOptionsConfig): string[] {
  return Object.entries(config).map(([name, o]) =>
    o.short === undefined ? `--${name}` : `-${o.short}`
  );
}
