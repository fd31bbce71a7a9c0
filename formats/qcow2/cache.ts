/**
 * A write-back cache of cluster-sized metadata tables (L2 tables, refcount blocks) with a byte
 * budget. Entries are keyed by host offset; eviction prefers the least recently used clean entry
 * and writes a dirty one back through `writeBack` (which keeps the update ordering).
 *
 * @module
 */

/** One cached table. */
export interface CacheEntry {
  readonly offset: number;
  readonly data: Uint8Array;
  readonly view: DataView;
  dirty: boolean;
  lastUse: number;
}

/** What the cache needs from its owner. */
export interface CacheBackend {
  /** Read the table at `offset` into `dst` (validated by the owner). */
  load(offset: number, dst: Uint8Array): void;
  /** Write dirty entries back, in an order the owner chooses (it may write others first). */
  writeBack(entries: CacheEntry[]): void;
}

/** A metadata table cache with a byte budget. */
export class TableCache {
  readonly tableSize: number;
  readonly #backend: CacheBackend;
  readonly #entries = new Map<number, CacheEntry>();
  readonly #capacity: number;
  #clock = 0;
  /** The most recent hit, checked first: sequential I/O stays in one table. */
  #last: CacheEntry | undefined;
  /**
   * Buffers of evicted tables, reused for the next load: allocating a fresh table per miss lets
   * freed buffers pile up faster than the collector returns them (RSS far over the budget).
   */
  #spare: Uint8Array[] = [];

  constructor(tableSize: number, budgetBytes: number, backend: CacheBackend) {
    this.tableSize = tableSize;
    this.#backend = backend;
    // At least two tables, as QEMU requires (a COW of one table reads another).
    this.#capacity = Math.max(2, Math.floor(budgetBytes / tableSize));
  }

  /** Tables the budget allows. */
  get capacity(): number {
    return this.#capacity;
  }

  /** Bytes the cached tables hold now. */
  get bytes(): number {
    return this.#entries.size * this.tableSize;
  }

  /** The table at `offset`, loaded when absent. */
  get(offset: number): CacheEntry {
    const last = this.#last;
    if (last !== undefined && last.offset === offset) {
      last.lastUse = ++this.#clock;
      return last;
    }
    let entry = this.#entries.get(offset);
    if (entry === undefined) {
      this.#makeRoom();
      const data = this.#buffer();
      try {
        this.#backend.load(offset, data);
      } catch (e) {
        this.#spare.push(data);
        throw e;
      }
      entry = { offset, data, view: new DataView(data.buffer), dirty: false, lastUse: 0 };
      this.#entries.set(offset, entry);
    }
    entry.lastUse = ++this.#clock;
    this.#last = entry;
    return entry;
  }

  /** A fresh table at `offset` (newly allocated, contents given or zero), marked dirty. */
  create(offset: number, contents?: Uint8Array): CacheEntry {
    this.discard(offset);
    this.#makeRoom();
    const data = this.#buffer();
    if (contents) data.set(contents);
    else data.fill(0);
    const entry: CacheEntry = {
      offset,
      data,
      view: new DataView(data.buffer),
      dirty: true,
      lastUse: ++this.#clock,
    };
    this.#entries.set(offset, entry);
    this.#last = entry;
    return entry;
  }

  /** The table at `offset` if cached, without loading it. */
  peek(offset: number): CacheEntry | undefined {
    return this.#entries.get(offset);
  }

  /** Drop the table at `offset` (its cluster was freed); dirty contents are lost on purpose. */
  discard(offset: number): void {
    const entry = this.#entries.get(offset);
    if (entry === undefined) return;
    this.#entries.delete(offset);
    if (this.#last === entry) this.#last = undefined;
    if (this.#spare.length < 4) this.#spare.push(entry.data);
  }

  #buffer(): Uint8Array {
    return this.#spare.pop() ?? new Uint8Array(this.tableSize);
  }

  /** Dirty entries, oldest first. */
  dirtyEntries(): CacheEntry[] {
    return [...this.#entries.values()].filter((e) => e.dirty).sort((a, b) => a.offset - b.offset);
  }

  /** Every cached table offset (for overlap checks). */
  offsets(): IterableIterator<number> {
    return this.#entries.keys();
  }

  /** Write every dirty entry back. */
  flush(): void {
    const dirty = this.dirtyEntries();
    if (dirty.length > 0) this.#backend.writeBack(dirty);
  }

  /** Drop clean entries not used since `sinceClock` (cache-clean-interval). */
  dropIdle(sinceClock: number): void {
    for (const [offset, e] of this.#entries) {
      if (!e.dirty && e.lastUse <= sinceClock) this.discard(offset);
    }
  }

  /** The current use clock (for dropIdle). */
  get clock(): number {
    return this.#clock;
  }

  /** Drop everything (after writing dirty entries back). */
  clear(): void {
    this.flush();
    this.#entries.clear();
    this.#last = undefined;
    this.#spare = [];
  }

  #makeRoom(): void {
    if (this.#entries.size < this.#capacity) return;
    let victim: CacheEntry | undefined;
    let victimDirty: CacheEntry | undefined;
    for (const e of this.#entries.values()) {
      if (!e.dirty) {
        if (victim === undefined || e.lastUse < victim.lastUse) victim = e;
      } else if (victimDirty === undefined || e.lastUse < victimDirty.lastUse) {
        victimDirty = e;
      }
    }
    if (victim === undefined && victimDirty !== undefined) {
      this.#backend.writeBack([victimDirty]);
      victim = victimDirty;
    }
    if (victim !== undefined) this.discard(victim.offset);
  }
}
