/**
 * Request validation for every node, in one place.
 *
 * @module
 */
import { BlockError } from "../errors.ts";

/** Largest offset or length a request may use: beyond it, doubles lose integer precision. */
export const MAX_REQUEST_BYTE = Number.MAX_SAFE_INTEGER;

/** What a request does, for the read-only check and error messages. */
export type RequestOp = "read" | "write" | "write-zeroes" | "discard" | "block-status";

/** What `checkRequest` needs to know of a node. */
export interface RequestTarget {
  /** Virtual size in bytes. */
  readonly size: number;
  /** True when modifications are refused. */
  readonly readOnly: boolean;
  /** Named in error messages. */
  readonly filename: string;
}

/**
 * Validate a request against a node: integer offset and length, no overflow past 2^53, inside the
 * node, and no modification of a read-only node.
 *
 * @throws {BlockError} `out-of-range`, `invalid-argument` or `read-only`
 */
export function checkRequest(
  node: RequestTarget,
  op: RequestOp,
  offset: number,
  length: number,
): void {
  if (!Number.isSafeInteger(offset) || offset < 0) {
    throw new BlockError("invalid-argument", `Invalid ${op} offset ${offset}`, {
      path: node.filename,
    });
  }
  if (!Number.isSafeInteger(length) || length < 0) {
    throw new BlockError("invalid-argument", `Invalid ${op} length ${length}`, {
      path: node.filename,
      offset,
    });
  }
  if (offset > MAX_REQUEST_BYTE - length) {
    throw new BlockError("out-of-range", `The ${op} request overflows at offset ${offset}`, {
      path: node.filename,
      offset,
      length,
    });
  }
  if (op !== "read" && op !== "block-status" && node.readOnly) {
    throw new BlockError("read-only", `Image is read-only`, {
      path: node.filename,
      offset,
      length,
    });
  }
  // blockStatus may ask past the end; it answers eof there.
  if (op !== "block-status" && offset + length > node.size) {
    throw new BlockError(
      "out-of-range",
      `The ${op} request [${offset}, ${
        offset + length
      }) is past the end of the image (${node.size} bytes)`,
      { path: node.filename, offset, length },
    );
  }
}

/** Validate a size for create/truncate: a non-negative safe integer. */
export function checkSize(size: number, what = "size"): void {
  if (!Number.isSafeInteger(size) || size < 0) {
    throw new BlockError("invalid-argument", `Invalid ${what} ${size}`);
  }
}
