/**
 * vstor: QEMU's storage model as a Deno library and command-line tool.
 *
 * @module
 */
export { BlockError, type BlockErrorKind, isBlockError } from "./src/errors.ts";
export type {
  BlockNode,
  Extent,
  ExtentKind,
  WriteOptions,
  WriteZeroesOptions,
} from "./src/block/node.ts";
export { checkRequest } from "./src/block/request.ts";
export type { HostExtent, HostFile } from "./src/host/host_file.ts";
export { type HostFileOptions, openHostFile } from "./src/host/file.ts";
export { MemoryFile } from "./src/host/memory.ts";
export { RawNode, type RawOptions } from "./formats/raw.ts";
export { setCorruptionSink } from "./formats/qcow2/corruption.ts";
export {
  createImage,
  type CreateOptions,
  formatNames,
  openImage,
  type OpenOptions,
} from "./formats/open.ts";

if (import.meta.main) {
  const { main } = await import("./src/cli/main.ts");
  Deno.exit(await main(Deno.args));
}
