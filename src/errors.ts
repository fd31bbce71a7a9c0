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
  /** The image or file the error is about. */
  path?: string;
  /** Byte offset of the failed access (guest or host, as the message says). */
  offset?: number;
  /** Length in bytes of the failed access. */
  length?: number;
  /** The host errno, when a system call failed. */
  errno?: number;
}

/** Options of {@linkcode BlockError}. */
export interface BlockErrorOptions extends BlockErrorContext {
  /** The underlying error, kept as the standard `cause`. */
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
  /** Always `BlockError`. */
  override readonly name = "BlockError";
  /** What went wrong, for callers to match on. */
  readonly kind: BlockErrorKind;
  /** Where it went wrong (path, offset, length, errno), as far as known. */
  readonly context: BlockErrorContext;

  /**
   * Makes an error of `kind` with `message` and the context in `options`.
   *
   * @param kind what went wrong
   * @param message what is wrong, in sentence case without a final period
   * @param options context and cause
   */
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
