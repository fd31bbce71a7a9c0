/**
 * Byte streams for the NBD server: exact reads over a buffered connection, and writes that go out
 * whole and in order whoever calls them. Deno's TCP and unix connections fit {@linkcode NbdStream}.
 *
 * @module
 */

/** A connection as the server uses it (Deno.Conn has this shape). */
export interface NbdStream {
  /** Reads some bytes into `p`; null at the end of the stream. */
  read(p: Uint8Array): Promise<number | null>;
  /** Writes some of `p`; how many. */
  write(p: Uint8Array): Promise<number>;
  close(): void;
}

/** The peer went away in the middle of what was being read. */
export class StreamEnded extends Error {}

const BUFFER_BYTES = 64 * 1024;

/** Reads exact byte counts from a stream through one reusable buffer. */
export class StreamReader {
  readonly #stream: NbdStream;
  readonly #buf = new Uint8Array(BUFFER_BYTES);
  #start = 0;
  #end = 0;

  constructor(stream: NbdStream) {
    this.#stream = stream;
  }

  /** Bytes read from the stream and not yet consumed. */
  get buffered(): number {
    return this.#end - this.#start;
  }

  /**
   * Fills `dst` from the stream.
   *
   * @returns false when the stream ended before the first byte (a clean end), true when filled
   * @throws {StreamEnded} when it ended part-way
   */
  async readInto(dst: Uint8Array): Promise<boolean> {
    let at = 0;
    const have = Math.min(this.buffered, dst.length);
    if (have > 0) {
      dst.set(this.#buf.subarray(this.#start, this.#start + have));
      this.#start += have;
      at = have;
    }
    while (at < dst.length) {
      const want = dst.length - at;
      if (want >= BUFFER_BYTES) {
        // Large payloads go straight into the caller's buffer.
        const n = await this.#stream.read(dst.subarray(at));
        if (n === null) return this.#ended(at);
        at += n;
        continue;
      }
      this.#start = this.#end = 0;
      const n = await this.#stream.read(this.#buf);
      if (n === null) return this.#ended(at);
      this.#end = n;
      const take = Math.min(n, want);
      dst.set(this.#buf.subarray(0, take), at);
      this.#start = take;
      at += take;
    }
    return true;
  }

  /** `n` bytes in a new array, or null at a clean end of the stream (see readInto). */
  async read(n: number): Promise<Uint8Array | null> {
    const out = new Uint8Array(n);
    return await this.readInto(out) ? out : null;
  }

  /** Reads and drops `n` bytes. @throws {StreamEnded} when the stream ends first */
  async skip(n: number): Promise<void> {
    const scratch = new Uint8Array(Math.min(n, BUFFER_BYTES));
    while (n > 0) {
      const take = Math.min(n, scratch.length);
      if (!await this.readInto(scratch.subarray(0, take))) {
        throw new StreamEnded("the stream ended inside data being skipped");
      }
      n -= take;
    }
  }

  #ended(at: number): boolean {
    if (at === 0) return false;
    throw new StreamEnded(`the stream ended after ${at} bytes of a message`);
  }
}

/** Writes whole messages in the order they are queued; a failed write fails every later one. */
export class StreamWriter {
  readonly #stream: NbdStream;
  #tail: Promise<void> = Promise.resolve();
  #failed: unknown = undefined;

  constructor(stream: NbdStream) {
    this.#stream = stream;
  }

  /** Queues `parts` to go out back to back; resolves once they are written. */
  send(parts: readonly Uint8Array[]): Promise<void> {
    const next = this.#tail.then(async () => {
      if (this.#failed !== undefined) throw this.#failed;
      try {
        for (const p of coalesce(parts)) await this.#writeAll(p);
      } catch (e) {
        this.#failed = e;
        throw e;
      }
    });
    this.#tail = next.catch(() => {});
    return next;
  }

  /** Resolves when everything queued so far is written (or failed). */
  flushed(): Promise<void> {
    return this.#tail;
  }

  async #writeAll(p: Uint8Array): Promise<void> {
    for (let at = 0; at < p.length;) at += await this.#stream.write(p.subarray(at));
  }
}

/** Small parts joined (one write for a header and a short payload), large ones kept apart. */
function coalesce(parts: readonly Uint8Array[]): Uint8Array[] {
  const out: Uint8Array[] = [];
  let small: Uint8Array[] = [];
  let smallBytes = 0;
  const flush = () => {
    if (small.length === 1) out.push(small[0]!);
    else if (small.length > 1) {
      const joined = new Uint8Array(smallBytes);
      let at = 0;
      for (const s of small) {
        joined.set(s, at);
        at += s.length;
      }
      out.push(joined);
    }
    small = [];
    smallBytes = 0;
  };
  for (const p of parts) {
    if (p.length === 0) continue;
    if (p.length > 4096) {
      flush();
      out.push(p);
    } else {
      small.push(p);
      smallBytes += p.length;
    }
  }
  flush();
  return out;
}
