/**
 * Messages several verbs print the same way.
 *
 * @module
 */

/**
 * qemu-img's warning for a read-write open whose format was guessed as raw (sector 0 is guarded).
 */
export function probedRawWarning(path: string): string {
  return `WARNING: Image format was not specified for '${path}' and probing guessed raw.\n` +
    "         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n" +
    "         Specify the 'raw' format explicitly to remove the restrictions.\n";
}
