/**
 * The one error type of the storage stack. Every layer may import it; it imports nothing.
 *
 * @module
 */

/** What went wrong, for callers to match on. */
export type BlockErrorKind =
  | "io"
  | "invalid-format"
  | "unsupported"
  | "corrupt"
  | "out-of-range"
  | "read-only"
  | "busy"
  | "invalid-argument"
  | "not-found";

/** Where it went wrong. */
export interface BlockErrorContext {
  path?: string;
  offset?: number;
  length?: number;
  errno?: number;
}

/** Options of {@linkcode BlockError}. */
export interface BlockErrorOptions extends BlockErrorContext {
  cause?: unknown;
}

/**
 * An error from the block layer: a kind callers match on, a message in sentence case naming what
 * is wrong, and context (path, offset) where known.
 *
 * @example
 * ```ts
 * import { BlockError } from "./errors.ts";
 * const e = new BlockError("read-only", "Image is read-only", { path: "disk.img" });
 * if (e.kind !== "read-only") throw new Error("unreachable");
 * ```
 */
export class BlockError extends Error {
  override readonly name = "BlockError";
  readonly kind: BlockErrorKind;
  readonly context: BlockErrorContext;

  constructor(kind: BlockErrorKind, message: string, options: BlockErrorOptions = {}) {
    const { cause, ...context } = options;
    super(message, cause === undefined ? undefined : { cause });
    this.kind = kind;
    this.context = context;
  }
}

/** True when `e` is a {@linkcode BlockError}, optionally of the given kind. */
export function isBlockError(e: unknown, kind?: BlockErrorKind): e is BlockError {
  return e instanceof BlockError && (kind === undefined || e.kind === kind);
}
