/**
 * QEMU-style `--drive` and `--device` options for `vstor run`, turned into a machine
 * configuration: `--drive file=disk.qcow2,format=qcow2,id=d0,readonly=off,cache=writeback`
 * (and QEMU's `werror=`/`rerror=` `report|ignore|stop|enospc`),
 * `--device virtio-blk,drive=d0,num-queues=2,event-idx=on,indirect=on,packed=off,ioeventfd=on`,
 * `--device virtio-scsi,id=s0` with `--device scsi-hd,bus=s0,drive=d1,lun=0`, and the fully
 * emulated disks `--device ide-hd,drive=d2,mode=pio|dma` and `--device ahci,drive=d3,ncq=on`.
 *
 * @module
 */
import type { MachineConfigInput } from "../machine/config.ts";
import { UsageError } from "./cli_io.ts";

/** `key=value,key=value` as QEMU writes it (`,,` is a literal comma); a bare first word is `driver`. */
export function parseKeyValues(text: string, what: string): Map<string, string> {
  const out = new Map<string, string>();
  const parts: string[] = [];
  let current = "";
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!;
    if (c === "," && text[i + 1] === ",") {
      current += ",";
      i++;
    } else if (c === ",") {
      parts.push(current);
      current = "";
    } else {
      current += c;
    }
  }
  parts.push(current);
  for (const [i, part] of parts.entries()) {
    if (part === "") throw new UsageError(`${what}: empty option in '${text}'`);
    const eq = part.indexOf("=");
    if (eq < 0) {
      if (i !== 0) throw new UsageError(`${what}: option '${part}' needs a value (key=value)`);
      out.set("driver", part);
      continue;
    }
    const key = part.slice(0, eq);
    if (out.has(key)) throw new UsageError(`${what}: option '${key}' given twice`);
    out.set(key, part.slice(eq + 1));
  }
  return out;
}

function onOff(value: string, what: string): boolean {
  if (["on", "true", "yes", "1"].includes(value)) return true;
  if (["off", "false", "no", "0"].includes(value)) return false;
  throw new UsageError(`${what}: '${value}' is not on or off`);
}

function integer(value: string, what: string): number {
  if (!/^\d+$/.test(value)) throw new UsageError(`${what}: '${value}' is not a whole number`);
  return Number(value);
}

/** Takes the known keys out of `props`, and refuses what is left. */
function take(props: Map<string, string>, what: string) {
  const seen = new Set<string>();
  return {
    get(key: string): string | undefined {
      seen.add(key);
      return props.get(key);
    },
    done(): void {
      for (const key of props.keys()) {
        if (!seen.has(key)) throw new UsageError(`${what}: unknown option '${key}'`);
      }
    },
  };
}

interface Drive {
  id: string;
  file: string;
  format?: string;
  readOnly: boolean;
  cache: "writeback" | "writethrough" | "unsafe" | "none" | "directsync";
  werror?: ErrorAction;
  rerror?: ErrorAction;
  aio?: "threads" | "io_uring" | "native";
  used: boolean;
}

type ErrorAction = "report" | "ignore" | "stop" | "enospc";

/** `werror=`/`rerror=` as QEMU takes them. */
function errorAction(value: string | undefined, what: string): ErrorAction | undefined {
  if (value === undefined) return undefined;
  if (value === "report" || value === "ignore" || value === "stop" || value === "enospc") {
    return value;
  }
  throw new UsageError(`${what}: '${value}' is not report, ignore, stop or enospc`);
}

/**
 * The machine configuration the options describe.
 *
 * @throws {UsageError} naming the option that is wrong
 */
export function machineFromArgs(
  drives: readonly string[],
  devices: readonly string[],
  memoryMiB?: number,
): MachineConfigInput {
  const byId = new Map<string, Drive>();
  for (const [i, text] of drives.entries()) {
    const what = `--drive ${i + 1}`;
    const p = take(parseKeyValues(text, what), what);
    const file = p.get("file");
    if (file === undefined || file === "") throw new UsageError(`${what}: file= is required`);
    const id = p.get("id") ?? `drive${i}`;
    if (byId.has(id)) throw new UsageError(`${what}: drive id '${id}' is used twice`);
    const cache = p.get("cache") ?? "writeback";
    if (
      cache !== "writeback" && cache !== "writethrough" && cache !== "unsafe" &&
      cache !== "none" && cache !== "directsync"
    ) {
      throw new UsageError(
        `${what}: cache must be writeback, writethrough, unsafe, none or directsync`,
      );
    }
    const format = p.get("format");
    const readonly = p.get("readonly");
    const werror = errorAction(p.get("werror"), `${what} werror`);
    const rerror = errorAction(p.get("rerror"), `${what} rerror`);
    const aio = p.get("aio");
    if (aio !== undefined && aio !== "threads" && aio !== "io_uring" && aio !== "native") {
      throw new UsageError(`${what}: aio must be threads, io_uring or native`);
    }
    if (aio === "native" && cache !== "none" && cache !== "directsync") {
      throw new UsageError(
        `${what}: aio=native was specified, but it requires cache=none or directsync`,
      );
    }
    const ifValue = p.get("if");
    if (ifValue !== undefined && ifValue !== "none") {
      throw new UsageError(`${what}: only if=none is supported (attach it with --device)`);
    }
    p.done();
    byId.set(id, {
      id,
      file,
      ...(format === undefined ? {} : { format }),
      readOnly: readonly === undefined ? false : onOff(readonly, `${what} readonly`),
      cache,
      ...(werror === undefined ? {} : { werror }),
      ...(rerror === undefined ? {} : { rerror }),
      ...(aio === undefined ? {} : { aio }),
      used: false,
    });
  }
  const useDrive = (id: string | undefined, what: string) => {
    if (id === undefined) throw new UsageError(`${what}: drive= is required`);
    const d = byId.get(id);
    if (d === undefined) throw new UsageError(`${what}: no --drive with id '${id}'`);
    if (d.used) throw new UsageError(`${what}: drive '${id}' is attached twice`);
    d.used = true;
    const { used: _used, ...spec } = d;
    return spec;
  };
  type Dev = NonNullable<MachineConfigInput["devices"]>[number];
  const out: Dev[] = [];
  const scsiBuses = new Map<string, Dev>();
  const ring = (p: ReturnType<typeof take>, what: string, dev: Dev) => {
    const flag = (
      key: string,
      field: "eventIdx" | "indirect" | "packed" | "ioeventfd" | "poll",
    ) => {
      const v = p.get(key);
      if (v !== undefined) dev[field] = onOff(v, `${what} ${key}`);
    };
    flag("event-idx", "eventIdx");
    flag("event_idx", "eventIdx");
    flag("indirect", "indirect");
    flag("indirect_desc", "indirect");
    flag("packed", "packed");
    flag("ioeventfd", "ioeventfd");
    flag("poll", "poll");
    const size = p.get("queue-size") ?? p.get("queue_size");
    if (size !== undefined) dev.queueSize = integer(size, `${what} queue-size`);
  };
  for (const [i, text] of devices.entries()) {
    const what = `--device ${i + 1}`;
    const props = parseKeyValues(text, what);
    const p = take(props, what);
    const driver = p.get("driver")?.replace(/-pci$/, "");
    if (driver === "virtio-blk") {
      const id = p.get("id") ?? `blk${i}`;
      const dev: Dev = { type: "virtio-blk", id, drive: useDrive(p.get("drive"), what) };
      const queues = p.get("num-queues") ?? p.get("num_queues");
      if (queues !== undefined) dev.numQueues = integer(queues, `${what} num-queues`);
      ring(p, what, dev);
      const options: Record<string, unknown> = {};
      const serial = p.get("serial");
      if (serial !== undefined) options.serial = serial;
      const discard = p.get("discard");
      if (discard !== undefined) options.discard = onOff(discard, `${what} discard`);
      const wz = p.get("write-zeroes");
      if (wz !== undefined) options.writeZeroes = onOff(wz, `${what} write-zeroes`);
      const wce = p.get("config-wce");
      if (wce !== undefined) options.configWce = onOff(wce, `${what} config-wce`);
      dev.options = options;
      p.done();
      out.push(dev);
    } else if (driver === "virtio-scsi") {
      const id = p.get("id") ?? `scsi${i}`;
      const dev: Dev = { type: "virtio-scsi", id, drives: [], options: { luns: [] } };
      const queues = p.get("num_queues") ?? p.get("num-queues");
      if (queues !== undefined) dev.numQueues = integer(queues, `${what} num_queues`);
      ring(p, what, dev);
      const hotplug = p.get("hotplug");
      if (hotplug !== undefined) {
        (dev.options as Record<string, unknown>).hotplug = onOff(hotplug, `${what} hotplug`);
      }
      p.done();
      if (scsiBuses.has(id)) throw new UsageError(`${what}: device id '${id}' is used twice`);
      scsiBuses.set(id, dev);
      out.push(dev);
    } else if (driver === "scsi-hd") {
      const busName = p.get("bus")?.replace(/\.0$/, "");
      if (busName === undefined) {
        throw new UsageError(`${what}: bus= is required (a virtio-scsi id)`);
      }
      const bus = scsiBuses.get(busName);
      if (bus === undefined) {
        throw new UsageError(`${what}: no virtio-scsi with id '${busName}' before it`);
      }
      const drive = useDrive(p.get("drive"), what);
      const lun = integer(p.get("lun") ?? "0", `${what} lun`);
      const target = integer(p.get("scsi-id") ?? p.get("target") ?? "0", `${what} scsi-id`);
      const entry: Record<string, unknown> = { target, lun };
      const serial = p.get("serial");
      if (serial !== undefined) entry.serial = serial;
      p.done();
      (bus.drives as unknown[]).push(drive);
      (bus.options as { luns: unknown[] }).luns.push(entry);
    } else if (driver === "ide-hd" || driver === "ahci") {
      const id = p.get("id") ?? `${driver === "ide-hd" ? "ide" : "ahci"}${i}`;
      const options: Record<string, unknown> = {};
      const serial = p.get("serial");
      if (serial !== undefined) options.serial = serial;
      if (driver === "ide-hd") {
        const mode = p.get("mode");
        if (mode !== undefined) {
          if (mode !== "pio" && mode !== "dma") {
            throw new UsageError(`${what} mode: '${mode}' is not pio or dma`);
          }
          options.mode = mode;
        }
      } else {
        const ncq = p.get("ncq");
        if (ncq !== undefined) options.ncq = onOff(ncq, `${what} ncq`);
      }
      const dev: Dev = { type: driver, id, drive: useDrive(p.get("drive"), what), options };
      p.done();
      out.push(dev);
    } else {
      throw new UsageError(
        `${what}: unknown device '${
          driver ?? ""
        }' (virtio-blk, virtio-scsi, scsi-hd, ide-hd, ahci)`,
      );
    }
  }
  for (const [id, d] of byId) {
    if (!d.used) throw new UsageError(`--drive ${id} is not attached to any --device`);
  }
  return { ...(memoryMiB === undefined ? {} : { memoryMiB }), devices: out };
}
