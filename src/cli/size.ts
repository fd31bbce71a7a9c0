/**
 * Moved to `text/size.ts` (below both `src/cli/` and `src/cli/qemu_io/`); re-exported for the verbs.
 *
 * @module
 */
export * from "./text/size.ts";
