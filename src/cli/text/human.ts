/**
 * Human-readable numbers as qemu-img prints them.
 *
 * @module
 */

/** `x = mantissa * 2^exponent`, exactly, for a finite non-negative double. */
function decompose(x: number): [bigint, number] {
  const view = new DataView(new ArrayBuffer(8));
  view.setFloat64(0, x);
  const bits = view.getBigUint64(0);
  const biased = Number((bits >> 52n) & 0x7ffn);
  const fraction = bits & ((1n << 52n) - 1n);
  return biased === 0 ? [fraction, -1074] : [fraction | (1n << 52n), biased - 1075];
}

/** C's `%.<digits>f` for a non-negative double: exact value, ties to even, as glibc rounds. */
export function formatFixed(x: number, digits: number): string {
  if (Number.isNaN(x)) return "nan";
  if (x === Infinity) return "inf";
  const [mantissa, exponent] = decompose(x);
  const scale = 10n ** BigInt(digits);
  let q: bigint;
  if (exponent >= 0) {
    q = (mantissa << BigInt(exponent)) * scale;
  } else {
    const num = mantissa * scale;
    const den = 1n << BigInt(-exponent);
    q = num / den;
    const twice = 2n * (num % den);
    if (twice > den || (twice === den && (q & 1n) === 1n)) q += 1n;
  }
  const s = q.toString().padStart(digits + 1, "0");
  return digits === 0 ? s : `${s.slice(0, -digits)}.${s.slice(-digits)}`;
}

/** C's `%0.3g` for non-negative values below 1e21. */
function g3(value: number): string {
  if (value === 0) return "0";
  const exp = Math.floor(Math.log10(value));
  if (exp < -4 || exp >= 3) {
    const [mant, e] = value.toExponential(2).split("e");
    const m = mant!.includes(".") ? mant!.replace(/\.?0+$/, "") : mant!;
    const n = Number(e);
    return `${m}e${n < 0 ? "-" : "+"}${String(Math.abs(n)).padStart(2, "0")}`;
  }
  const fixed = value.toPrecision(3);
  return fixed.includes(".") ? fixed.replace(/\.?0+$/, "") : fixed;
}

/**
 * QEMU's `size_to_str`: three significant digits and a binary unit, switching units at 1000.
 *
 * @example
 * ```ts
 * import { sizeToStr } from "./human.ts";
 * if (sizeToStr(196608) !== "192 KiB") throw new Error("size_to_str");
 * ```
 */
export function sizeToStr(bytes: number): string {
  const suffixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
  // frexp(val / (1000/1024)) exponent minus one, in tens.
  const scaled = bytes / (1000 / 1024);
  const exp = scaled === 0 ? 0 : Math.floor(Math.log2(scaled)) + 1;
  const i = Math.max(0, Math.min(6, Math.floor((exp - 1) / 10)));
  return `${g3(bytes / 2 ** (i * 10))} ${suffixes[i]}B`;
}

/** `YYYY-MM-DD HH:MM:SS` in local time, as strftime("%Y-%m-%d %H:%M:%S"). */
export function localDate(seconds: number): string {
  const d = new Date(seconds * 1000);
  const p = (n: number) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${
    p(d.getMinutes())
  }:${p(d.getSeconds())}`;
}

/** A VM clock in nanoseconds as `HH:MM:SS.mmm`. */
export function vmClock(nsec: bigint): string {
  const ms = Number(nsec / 1_000_000n);
  const p = (n: number, w = 2) => String(n).padStart(w, "0");
  const secs = Math.floor(ms / 1000);
  return `${p(Math.floor(secs / 3600))}:${p(Math.floor(secs / 60) % 60)}:${p(secs % 60)}.${
    p(ms % 1000, 3)
  }`;
}
