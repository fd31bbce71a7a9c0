/**
 * qemu-io's commands about the image: length, info, alloc, map, open, close, reopen.
 *
 * @module
 */
import type { BlockNode } from "../../block/node.ts";
import { imageInfo } from "../../../formats/image_info.ts";
import { probedRawWarning } from "../text/messages.ts";
import { allocationAt } from "./ranges.ts";
import { Qcow2Node } from "../../../formats/qcow2/qcow2.ts";
import { joinQcow2Options } from "../../../formats/qcow2/runtime_options.ts";
import {
  applyQcow2Options,
  defaultRequest,
  type OpenRequest,
  openRequest,
  parseAioMode,
  parseCacheMode,
  parseDiscardMode,
  parseOptionString,
  QCOW2_KEYS,
} from "./open.ts";
import type { Command, Session } from "./session.ts";
import { cvtstr, errnoText, getopt, messageOf } from "./text.ts";
import { type IoNodeExtras, SECTOR_SIZE } from "./io_commands.ts";

export const lengthCommand: Command = {
  name: "length",
  altname: "l",
  argmin: 0,
  argmax: 0,
  oneline: "gets the length of the current file",
  run(s) {
    s.out(cvtstr(s.node.size));
    return Promise.resolve(true);
  },
};

export const infoCommand: Command = {
  name: "info",
  altname: "i",
  argmin: 0,
  argmax: 0,
  oneline: "prints information about the current file",
  run(s) {
    const node = s.node as BlockNode & IoNodeExtras;
    s.out(`format name: ${node.format}`);
    s.out(`cluster size: ${cvtstr(node.clusterSize ?? 0)}`);
    s.out(`vm state offset: ${cvtstr(node.vmStateOffset ?? 0)}`);
    if (node.format === "qcow2") {
      const info = imageInfo(node, node.filename);
      const specific = info["format-specific"] as { data: Record<string, unknown> } | undefined;
      if (specific !== undefined) {
        s.out("Format specific information:");
        for (const [key, value] of Object.entries(specific.data)) {
          s.out(`    ${key.replaceAll("-", " ")}: ${value}`);
        }
      }
    }
    return Promise.resolve(true);
  },
};

export const allocCommand: Command = {
  name: "alloc",
  altname: "a",
  argmin: 1,
  argmax: 2,
  args: "offset [count]",
  oneline: "checks if offset is allocated in the file",
  async run(s, argv) {
    const start = s.cvtnum(argv[1] ?? "");
    if (start === undefined) return false;
    let count = BigInt(SECTOR_SIZE);
    if (argv.length === 3) {
      const n = s.cvtnum(argv[2] ?? "");
      if (n === undefined) return false;
      count = n;
    }
    // Past the end, nothing is allocated and the count shrinks to what the image holds.
    const size = BigInt(s.node.size);
    const inside = start >= size ? 0n : count < size - start ? count : size - start;
    let offset = Number(start);
    let remaining = Number(inside);
    let allocated = 0;
    try {
      while (remaining > 0) {
        const run = await allocationAt(s.node, offset, remaining);
        if (run.length === 0) break;
        if (run.allocated) allocated += run.length;
        offset += run.length;
        remaining -= run.length;
      }
    } catch (e) {
      s.out(`is_allocated failed: ${errnoText(e)}`);
      return false;
    }
    s.out(`${allocated}/${inside} bytes allocated at offset ${cvtstr(Number(start))}`);
    return true;
  },
};

export const mapCommand: Command = {
  name: "map",
  argmin: 0,
  argmax: 0,
  args: "",
  oneline: "prints the allocated areas of a file",
  async run(s) {
    let offset = 0;
    let bytes = s.node.size;
    while (bytes > 0) {
      let allocated: boolean;
      let length: number;
      try {
        const first = await allocationAt(s.node, offset, bytes);
        allocated = first.allocated;
        length = first.length;
        // Merge following runs of the same status into one line, as map_is_allocated() does.
        while (first.length > 0 && length < bytes) {
          const next = await allocationAt(s.node, offset + length, bytes - length);
          if (next.length === 0 || next.allocated !== allocated) break;
          length += next.length;
        }
      } catch (e) {
        s.report(`Failed to get allocation status: ${errnoText(e)}`);
        return false;
      }
      if (length === 0) {
        s.report("Unexpected end of image");
        return false;
      }
      const status = allocated ? "    allocated" : "not allocated";
      s.out(
        `${cvtstr(length)} (0x${length.toString(16)}) bytes ${status} at offset ${
          cvtstr(offset)
        } (0x${offset.toString(16)})`,
      );
      offset += length;
      bytes -= length;
    }
    return true;
  },
};

// ---------------------------------------------------------------------------------------------
// Opening, closing, reopening

/** Close the session's image: outstanding aio completes first (blk_unref drains). */
export async function closeImage(s: Session): Promise<boolean> {
  s.drain();
  const image = s.image;
  if (image === undefined) return true;
  s.image = undefined;
  try {
    await image.node.close();
    return true;
  } catch (e) {
    s.report(`${image.name}: ${messageOf(e)}`);
    return false;
  }
}

/**
 * qemu-io's openfile(): open `request` as the session's image, with its messages. `name` is what
 * `can't open device NAME` says (undefined: `can't open`).
 */
export async function openImageInto(
  s: Session,
  request: OpenRequest,
  name: string | undefined,
): Promise<boolean> {
  if (s.image !== undefined) {
    s.report("file open already, try 'help close'");
    return false;
  }
  try {
    const opened = await openRequest(request);
    if (opened.probedRaw) {
      for (const line of probedRawWarning(opened.name).trimEnd().split("\n")) s.err(line);
    }
    s.image = {
      node: opened.node,
      request: opened.request,
      name: opened.name,
      readOnly: opened.request.readOnly || opened.node.readOnly,
    };
    return true;
  } catch (e) {
    s.report(`can't open${name === undefined ? "" : ` device ${name}`}: ${messageOf(e)}`);
    return false;
  }
}

/** Parse `-o` option strings, printing QEMU's warnings; undefined never (errors are values). */
function parseOptions(s: Session, text: string): Array<[string, string]> {
  return parseOptionString(text, (message) => {
    const [first = "", ...rest] = message.split("\n");
    s.report(`warning: ${first}`);
    for (const line of rest) s.err(line);
  });
}

export const openCommand: Command = {
  name: "open",
  altname: "o",
  argmin: 1,
  argmax: -1,
  noFile: true,
  args: "[-rsCnkU] [-t cache] [-d discard] [-o options] [path]",
  oneline: "open the file specified by path",
  help: [
    "",
    " opens a new file in the requested mode",
    "",
    " Example:",
    " 'open -n -o driver=raw /tmp/data' - opens raw data file read-write, uncached",
    "",
    " Opens a file for subsequent use by all of the other qemu-io commands.",
    " -r, -- open file read-only",
    " -s, -- use snapshot file",
    " -C, -- use copy-on-read",
    " -n, -- disable host cache, short for -t none",
    " -U, -- force shared permissions",
    " -k, -- use kernel AIO implementation (Linux only, prefer use of -i)",
    " -i, -- use AIO mode (threads, native or io_uring)",
    " -t, -- use the given cache mode for the image",
    " -d, -- use the given discard mode for the image",
    " -o, -- options to be given to the block driver",
  ],
  async run(s, argv) {
    const request = defaultRequest();
    const parsed = getopt(argv, "snCro:ki:t:d:U");
    for (const { c, arg } of parsed.opts) {
      if (c === "s") request.snapshot = true;
      else if (c === "n") request.cache = { ...request.cache, direct: true, writethrough: false };
      else if (c === "C") request.copyOnRead = true;
      else if (c === "r") request.readOnly = true;
      else if (c === "k") request.aio = "native";
      else if (c === "U") request.forceShare = true;
      else if (c === "t") {
        const mode = parseCacheMode(arg);
        if (mode === undefined) {
          s.report(`Invalid cache option: ${arg}`);
          return false;
        }
        request.cache = mode;
      } else if (c === "d") {
        const mode = parseDiscardMode(arg);
        if (mode === undefined) {
          s.report(`Invalid discard option: ${arg}`);
          return false;
        }
        request.discard = mode;
      } else if (c === "i") {
        const mode = parseAioMode(arg);
        if (mode === undefined) {
          s.report(`Invalid aio option: ${arg}`);
          return false;
        }
        request.aio = mode;
      } else if (c === "o") {
        if (s.imageOpts) {
          s.out("--image-opts and 'open -o' are mutually exclusive");
          return false;
        }
        request.options.push(...parseOptions(s, arg));
      }
    }
    if (parsed.error !== undefined) {
      s.err(parsed.error);
      s.usage(this);
      return false;
    }
    const operands = [...parsed.operands];
    if (s.imageOpts && operands.length === 1) {
      request.options.push(...parseOptions(s, operands.shift() ?? ""));
    }
    if (operands.length > 1) {
      s.usage(this);
      return false;
    }
    const path = operands[0];
    if (request.forceShare) {
      const given = request.options.findLast(([key]) => key === "force-share");
      if (given !== undefined && given[1] !== "on") {
        s.report("-U conflicts with image options");
        return false;
      }
    }
    request.path = path;
    return await openImageInto(s, request, path);
  },
};

export const closeCommand: Command = {
  name: "close",
  altname: "c",
  argmin: 0,
  argmax: 0,
  oneline: "close the current open file",
  run(s) {
    return closeImage(s);
  },
};

const REOPEN_KEYS = new Set(["read-only", "cache.direct", "cache.no-flush"]);

export const reopenCommand: Command = {
  name: "reopen",
  argmin: 0,
  argmax: -1,
  args: "[(-r|-w)] [-c cache] [-o options]",
  oneline: "reopens an image with new options",
  help: [
    "",
    " Changes the open options of an already opened image",
    "",
    " Example:",
    " 'reopen -o lazy-refcounts=on' - activates lazy refcount writeback on a qcow2 image",
    "",
    " -r, -- Reopen the image read-only",
    " -w, -- Reopen the image read-write",
    " -c, -- Change the cache mode to the given value",
    " -o, -- Changes block driver options (cf. 'open' command)",
    "",
  ],
  async run(s, argv) {
    const image = s.image!;
    let readOnly = image.readOnly;
    let cache = image.request.cache;
    let hasRw = false, hasCache = false;
    const options: Array<[string, string]> = [];
    const parsed = getopt(argv, "c:o:rw");
    for (const { c, arg } of parsed.opts) {
      if (c === "c") {
        const mode = parseCacheMode(arg);
        if (mode === undefined) {
          s.report(`Invalid cache option: ${arg}`);
          return false;
        }
        cache = mode;
        hasCache = true;
      } else if (c === "o") {
        options.push(...parseOptions(s, arg));
      } else if (c === "r" || c === "w") {
        if (hasRw) {
          s.report("Only one -r/-w option may be given");
          return false;
        }
        readOnly = c === "r";
        hasRw = true;
      }
    }
    if (parsed.error !== undefined || parsed.operands.length > 0) {
      if (parsed.error !== undefined) s.err(parsed.error);
      s.usage(this);
      return false;
    }
    const keys = new Set(options.map(([key]) => key));
    const qcow2 = image.node instanceof Qcow2Node ? image.node : undefined;
    if (keys.has("read-only") && hasRw) {
      s.report("Cannot set both -r/-w and 'read-only'");
      return false;
    }
    if ((keys.has("cache.direct") || keys.has("cache.no-flush")) && hasCache) {
      s.report("Cannot set both -c and the cache options");
      return false;
    }
    for (const key of keys) {
      if (!REOPEN_KEYS.has(key) && !(qcow2 !== undefined && QCOW2_KEYS.has(key))) {
        s.report(`Cannot change the option '${key}'`);
        return false;
      }
    }
    for (const [key, value] of options) {
      if (!REOPEN_KEYS.has(key)) continue;
      const on = value === "on" || value === "true" || value === "yes";
      if (key === "read-only" && on && !image.readOnly) {
        // QEMU keeps the BlockBackend's write permission (only -r drops it), so the node refuses;
        // its name is QEMU's automatic one, whose number vstor cannot know.
        s.report("Read-only block node '#block000' cannot support read-write users");
        return false;
      }
      if (!on && value !== "off" && value !== "false" && value !== "no") {
        s.report(`Parameter '${key}' expects 'on' or 'off'`);
        return false;
      }
      if (key === "read-only") readOnly = on;
      else if (key === "cache.direct") cache = { ...cache, direct: on };
      else cache = { ...cache, noFlush: on };
    }
    // qcow2's options join those of earlier opens and reopens (QEMU's qcow2_join_options) and
    // are all checked before any takes effect.
    const retained = image.request.options.filter(([key]) => QCOW2_KEYS.has(key));
    const formatOptions = qcow2 === undefined ? retained : joinQcow2Options(
      options.filter(([key]) => QCOW2_KEYS.has(key)),
      retained,
    );
    if (qcow2 !== undefined) {
      try {
        await applyQcow2Options(qcow2, formatOptions, image.request.discard === "unmap");
      } catch (e) {
        s.report(messageOf(e));
        return false;
      }
    }
    s.drain();
    const request: OpenRequest = { ...image.request, cache, readOnly, options: formatOptions };
    const sameFile = readOnly === image.readOnly && cache.direct === image.request.cache.direct;
    if (sameFile || image.request.snapshot) {
      // Same node: the temporary overlay of -s stays (it is writable underneath).
      if (!readOnly && image.node.readOnly) {
        s.report(`Cannot make '${image.name}' writable: it was opened read-only`);
        return false;
      }
      if (readOnly && !image.readOnly) await image.node.flush();
      s.image = { ...image, readOnly, request };
      return true;
    }
    // The read-only flag and O_DIRECT change by opening the file again (QEMU reopens its fd).
    await image.node.close();
    s.image = undefined;
    try {
      const opened = await openRequest({ ...request, path: image.name, format: image.node.format });
      s.image = {
        node: opened.node,
        request,
        name: image.name,
        readOnly: readOnly || opened.node.readOnly,
      };
      return true;
    } catch (e) {
      s.report(messageOf(e));
      try {
        const back = await openRequest({ ...image.request, path: image.name });
        s.image = { ...image, node: back.node };
      } catch {
        // The image stays closed; later commands say "no file open".
      }
      return false;
    }
  },
};
