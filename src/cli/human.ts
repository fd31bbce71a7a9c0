/**
 * Moved to `text/human.ts` (below both `src/cli/` and `src/cli/qemu_io/`); re-exported for the verbs.
 *
 * @module
 */
export * from "./text/human.ts";
