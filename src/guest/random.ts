/**
 * Deterministic randomness for workloads: a small fast PRNG, a 32-bit hash to derive seeds, and a
 * seeded permutation of block numbers so a random workload touches every block once per pass
 * (fio's random map, without a bitmap).
 *
 * Same seed, same numbers, on every run and host: verify_only depends on it.
 *
 * @module
 */

/** fio's FIO_RANDSEED: the default seed when a job names none. */
export const DEFAULT_SEED = 0xb1899bed;

/** murmur3's 32-bit finaliser: a bijective mix of one word. */
export function fmix32(h: number): number {
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

/** A 32-bit hash of two numbers (each taken as up to 53 bits). */
export function mix32(a: number, b: number): number {
  const bLo = b >>> 0;
  const bHi = Math.floor(b / 0x1_0000_0000) >>> 0;
  let h = fmix32((a >>> 0) ^ 0x9e3779b9);
  h = fmix32(h ^ bLo);
  return fmix32(h ^ Math.imul(bHi, 0x27d4eb2f) ^ 0x165667b1);
}

/**
 * sfc32 (Chris Doty-Humphrey's Small Fast Counter): 128 bits of state, passes PractRand to 2^40+,
 * a few integer operations per number.
 *
 * @example
 * ```ts
 * import { Prng } from "./random.ts";
 * const a = new Prng(42), b = new Prng(42);
 * if (a.nextU32() !== b.nextU32()) throw new Error("not deterministic");
 * ```
 */
export class Prng {
  #a: number;
  #b: number;
  #c: number;
  #d: number;

  /** @param seed any number; `stream` picks an independent sequence for the same seed */
  constructor(seed: number, stream = 0) {
    this.#a = mix32(seed, stream);
    this.#b = mix32(seed, stream + 0x1000);
    this.#c = mix32(seed, stream + 0x2000);
    this.#d = 1;
    // Warm up: the first outputs of a freshly seeded sfc32 are correlated with the seed.
    for (let i = 0; i < 12; i++) this.nextU32();
  }

  /** The next 32-bit unsigned integer. */
  nextU32(): number {
    const a = this.#a, b = this.#b, c = this.#c, d = this.#d;
    const t = (((a + b) | 0) + d) | 0;
    this.#d = (d + 1) | 0;
    this.#a = b ^ (b >>> 9);
    this.#b = (c + (c << 3)) | 0;
    this.#c = ((c << 21) | (c >>> 11)) + t | 0;
    return t >>> 0;
  }

  /** A float in [0, 1) with 32 bits of randomness. */
  nextFloat(): number {
    return this.nextU32() / 0x1_0000_0000;
  }

  /** A uniform integer in [0, n), n ≥ 1 up to 2^53 (rejection sampling: no modulo bias). */
  below(n: number): number {
    if (n <= 0x1_0000_0000) {
      const limit = 0x1_0000_0000 - (0x1_0000_0000 % n);
      for (;;) {
        const x = this.nextU32();
        if (x < limit) return x % n;
      }
    }
    for (;;) {
      const x = (this.nextU32() & 0x1fffff) * 0x1_0000_0000 + this.nextU32();
      const limit = 2 ** 53 - (2 ** 53 % n);
      if (x < limit) return x % n;
    }
  }
}

/** Most blocks a {@linkcode BlockPermutation} covers (the bijection works on 32-bit words). */
export const MAX_PERMUTATION = 0x1_0000_0000;

/**
 * A seeded permutation of `0..n-1`: `at(i)` for i in `0..n-1` visits every block exactly once.
 * A keyed bijection on the smallest power-of-2 range holding n, with cycle walking to skip the
 * values ≥ n (fewer than 2 steps on average, since n is more than half the range).
 *
 * @example
 * ```ts
 * import { BlockPermutation } from "./random.ts";
 * const p = new BlockPermutation(10, 7);
 * const seen = new Set(Array.from({ length: 10 }, (_, i) => p.at(i)));
 * if (seen.size !== 10) throw new Error("not a permutation");
 * ```
 */
export class BlockPermutation {
  readonly size: number;
  readonly #mask: number;
  readonly #shift: number;
  readonly #k0: number;
  readonly #k1: number;
  readonly #k2: number;

  /**
   * @throws {RangeError} when n is not 1..2^32
   */
  constructor(n: number, seed: number) {
    if (!Number.isInteger(n) || n < 1 || n > MAX_PERMUTATION) {
      throw new RangeError(`Permutation size ${n} is not 1..2^32`);
    }
    this.size = n;
    let bits = 0;
    while (bits < 32 && 2 ** bits < n) bits++;
    this.#mask = bits === 32 ? 0xffffffff : 2 ** bits - 1;
    this.#shift = Math.max(1, bits >>> 1);
    this.#k0 = mix32(seed, 1);
    this.#k1 = mix32(seed, 2) | 1; // odd: multiplication by it is a bijection mod 2^bits
    this.#k2 = mix32(seed, 3);
  }

  #f(x: number): number {
    const mask = this.#mask;
    const s = this.#shift;
    x = ((x + this.#k0) & mask) >>> 0;
    x = (x ^ (x >>> s)) >>> 0;
    x = (Math.imul(x, this.#k1) & mask) >>> 0;
    x = (x ^ (x >>> s)) >>> 0;
    x = (Math.imul(x, 0x2c1b3c6d) & mask) >>> 0;
    x = (x ^ (x >>> s)) >>> 0;
    return ((x ^ this.#k2) & mask) >>> 0;
  }

  /** The i-th element, i in `0..size-1`. */
  at(i: number): number {
    let x = this.#f(i);
    // Cycle walking: f permutes 0..mask, so iterating it from i reaches a value below n.
    while (x >= this.size) x = this.#f(x);
    return x;
  }
}
