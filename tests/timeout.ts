/**
 * Time limits for tests that wait on Workers, iothreads or messages: a hang fails the test with a
 * message naming what hung instead of stalling the run.
 *
 * @module
 */

/**
 * `promise`, or a rejection after `ms`; the timer never outlives the race.
 *
 * @param promise what to wait for
 * @param ms the limit in milliseconds
 * @param what names the awaited thing in the error
 * @returns what `promise` resolves to
 * @throws {Error} when `promise` has not settled within `ms`
 */
export async function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      promise,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`${what} did not finish within ${ms} ms`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Polls `check` every 5 ms until it holds or `ms` pass (for what travels by postMessage).
 *
 * @param check the condition
 * @param ms the limit in milliseconds
 * @param what names the awaited condition in the error
 * @throws {Error} when `check` still fails after `ms`
 */
export async function eventually(check: () => boolean, ms: number, what: string): Promise<void> {
  const deadline = performance.now() + ms;
  while (!check()) {
    if (performance.now() > deadline) throw new Error(`${what} did not happen within ${ms} ms`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}
