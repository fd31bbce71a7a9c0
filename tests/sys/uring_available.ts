/**
 * Whether io_uring tests can run here: a ring of one entry is set up and closed. Only ENOSYS or
 * EPERM from io_uring_setup (no io_uring in this kernel or container) skip the tests, with the
 * reason printed; any other failure is a failure.
 */
import { isBlockError } from "../../src/errors.ts";
import { ENOSYS, EPERM, Uring } from "../../src/sys/uring.ts";

function unavailable(): string | undefined {
  try {
    new Uring(1).close();
    return undefined;
  } catch (e) {
    const code = isBlockError(e) ? e.context.errno : undefined;
    if (code === ENOSYS || code === EPERM) return (e as Error).message;
    throw e;
  }
}

const reason = unavailable();
if (reason !== undefined) console.log(`io_uring tests skipped: ${reason}`);

/** True when the io_uring tests must be skipped (the reason was printed). */
export const ignoreWithoutUring: boolean = reason !== undefined;
