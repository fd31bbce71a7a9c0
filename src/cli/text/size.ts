/**
 * Size arguments as QEMU 7.2 parses them (`qemu_strtosz`, behind qemu-io's `cvtnum` and qemu-img's
 * sizes): a decimal integer, an optional `.fraction` (which needs a suffix), or `0x` hex; then an
 * optional suffix `B K M G T P E` (either case) scaling by powers of 1024.
 *
 * @module
 */

/** A size suffix letter, upper case (`B` is bytes). */
export type SizeSuffix = "B" | "K" | "M" | "G" | "T" | "P" | "E";

/** Options of {@linkcode parseSize}. */
export interface ParseSizeOptions {
  /** Suffix assumed when the text has none (QEMU's `default_suffix`; default `B`). */
  defaultSuffix?: SizeSuffix;
  /** Multiplier step between suffixes: 1024 (default) or 1000 (`qemu_strtosz_metric`). */
  unit?: 1000 | 1024;
}

/** What {@linkcode parseSize} answers. */
export type SizeParseResult =
  | {
    readonly ok: true;
    /** The size in bytes, 0 ≤ value < 2^64. */
    readonly value: bigint;
    /** A hex number carried a suffix: accepted, but QEMU 7.2 warns that it is deprecated. */
    readonly deprecatedHexSuffix: boolean;
  }
  | {
    readonly ok: false;
    /** `invalid`: not a size (QEMU's EINVAL); `too-large`: 2^64 bytes or more (ERANGE). */
    readonly reason: "invalid" | "too-large";
  };

const U64_LIMIT = 1n << 64n;
const SUFFIX_POWER: Readonly<Record<string, number>> = {
  B: 0,
  K: 1,
  M: 2,
  G: 3,
  T: 4,
  P: 5,
  E: 6,
};
/** Characters C's isspace() accepts in the C locale; strtoull skips them first. */
const C_SPACE = /^[ \t\n\v\f\r]*/;
/** Smallest normal double: strtod reports ERANGE for nonzero input that lands below it. */
const MIN_NORMAL = 2.2250738585072014e-308;

function suffixMultiplier(c: string | undefined, unit: bigint): bigint | undefined {
  const power = c === undefined ? undefined : SUFFIX_POWER[c.toUpperCase()];
  return power === undefined ? undefined : unit ** BigInt(power);
}

/** C's strtoull over `text` from `start`: where the number ends, its value, and whether it overflowed. */
function strtoull(
  text: string,
  start: number,
  base: 10 | 16,
): { end: number; value: bigint; negative: boolean; overflow: boolean } | undefined {
  let i = start + (C_SPACE.exec(text.slice(start))?.[0].length ?? 0);
  let negative = false;
  if (text[i] === "+" || text[i] === "-") {
    negative = text[i] === "-";
    i++;
  }
  if (base === 16 && text[i] === "0" && (text[i + 1] === "x" || text[i + 1] === "X")) {
    // "0x" counts as a prefix only when a hex digit follows; else the number is just "0".
    if (/^[0-9a-fA-F]$/.test(text[i + 2] ?? "")) i += 2;
  }
  const digits = (base === 10 ? /^[0-9]+/ : /^[0-9a-fA-F]+/).exec(text.slice(i))?.[0];
  if (digits === undefined) return undefined;
  const value = base === 10 ? BigInt(digits) : BigInt(`0x${digits}`);
  return { end: i + digits.length, value, negative, overflow: value >= U64_LIMIT };
}

/**
 * Parse a size the way QEMU 7.2's `qemu_strtosz` does, quirks included: `1.5k` is 1536 (fractions
 * round half up to a byte), `1.` is 1, `0x10k` is 16384 (deprecated), `1e3` and `1.5` are invalid,
 * `1e` is one exbibyte, and a fraction that rounds to 1.0 as a double counts as 0.
 *
 * @param text The argument as typed.
 * @returns The value, or why it is not one.
 * @example
 * ```ts
 * import { parseSize } from "./size.ts";
 * const r = parseSize("1.5k");
 * if (!r.ok || r.value !== 1536n) throw new Error("1.5k is 1536 bytes");
 * ```
 */
export function parseSize(text: string, opts: ParseSizeOptions = {}): SizeParseResult {
  const unit = BigInt(opts.unit ?? 1024);
  const invalid: SizeParseResult = { ok: false, reason: "invalid" };
  const integral = strtoull(text, 0, 10);
  if (integral === undefined) return invalid;
  if (integral.overflow) return { ok: false, reason: "too-large" };
  if (integral.negative) return invalid;
  let value = integral.value;
  let end = integral.end;
  let fraction = 0n; // 0.64 fixed point
  let hex = false;
  if (value === 0n && (text[end] === "x" || text[end] === "X")) {
    const reparsed = strtoull(text, 0, 16);
    if (reparsed === undefined) return invalid;
    if (reparsed.overflow) return { ok: false, reason: "too-large" };
    if (text[reparsed.end] === ".") return invalid;
    value = reparsed.value;
    end = reparsed.end;
    hex = true;
  } else if (text[end] === ".") {
    // strtod on ".digits[e±digits]"; without digits it fails and only the "." is skipped.
    const match = /^\.([0-9]*)([eE][+-]?[0-9]+)?/.exec(text.slice(end));
    const digits = match?.[1] ?? "";
    if (digits === "") {
      end += 1;
    } else if (match?.[2] !== undefined) {
      return invalid;
    } else {
      const double = Number(`0.${digits}`);
      if (double < MIN_NORMAL && /[1-9]/.test(digits)) {
        // strtod underflow (ERANGE): QEMU skips one character past the digits and drops the fraction.
        end += 1 + digits.length + 1;
        if (end > text.length) return invalid;
      } else {
        end += 1 + digits.length;
        const scaled = double * 2 ** 64;
        // (uint64_t)(fraction * 2^64): a fraction that rounded up to 1.0 overflows to 0 on x86.
        fraction = scaled >= 2 ** 64 ? 0n : BigInt(Math.trunc(scaled));
      }
    }
  }
  let multiplier = suffixMultiplier(text[end], unit);
  let deprecatedHexSuffix = false;
  if (multiplier !== undefined) {
    end += 1;
    deprecatedHexSuffix = hex;
  } else {
    multiplier = suffixMultiplier(opts.defaultSuffix ?? "B", unit) ?? 1n;
  }
  if (end !== text.length) return invalid;
  if (multiplier === 1n) {
    if (fraction !== 0n) return invalid; // a fraction needs a scale
  } else {
    const fractionPart = fraction * multiplier;
    // Exact 64.64 product, rounding half a byte up.
    value = value * multiplier + (fractionPart >> 64n) + ((fractionPart >> 63n) & 1n);
    if (value >= U64_LIMIT) return { ok: false, reason: "too-large" };
  }
  return { ok: true, value, deprecatedHexSuffix };
}
