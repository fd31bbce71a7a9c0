/**
 * The device-type registry: how the machine finds a device type by the `type` of a configured
 * device, so that new types plug in without editing the machine.
 *
 * Two ways in:
 * - {@linkcode registerDeviceType} with a {@linkcode DeviceType} object (tests, embedders);
 * - {@linkcode registerDeviceModule} with a module URL exporting `deviceType`, imported on first
 *   use. virtio-blk and virtio-scsi are registered this way, so the machine does not import them
 *   until a configuration names them.
 *
 * @module
 */

import type { DeviceType } from "../devices/device_type.ts";
import { type EmulatedDeviceType, isEmulatedType } from "../devices/emulated.ts";

const types = new Map<string, DeviceType | EmulatedDeviceType>();
const modules = new Map<string, string>([
  ["virtio-blk", new URL("../devices/virtio_blk.ts", import.meta.url).href],
  ["virtio-scsi", new URL("../devices/virtio_scsi.ts", import.meta.url).href],
  ["ide-hd", new URL("../devices/ide_type.ts", import.meta.url).href],
  ["ahci", new URL("../devices/ahci_type.ts", import.meta.url).href],
]);

/**
 * Registers a device type under `type.name`. Registering the same object again is a no-op.
 *
 * @throws {RangeError} when another type already has the name
 *
 * @example
 * ```ts ignore
 * import { registerDeviceType } from "./registry.ts";
 * import { deviceType } from "../devices/virtio_blk.ts";
 * registerDeviceType(deviceType);
 * ```
 */
export function registerDeviceType(type: DeviceType | EmulatedDeviceType): void {
  const existing = types.get(type.name);
  if (existing === type) return;
  if (existing !== undefined) {
    throw new RangeError(`Device type "${type.name}" is already registered`);
  }
  types.set(type.name, type);
  modules.delete(type.name);
}

/**
 * Registers a device type that lives in `module` (which exports `deviceType`), imported the first
 * time a configuration uses `name`. A type registered as an object takes precedence.
 */
export function registerDeviceModule(name: string, module: string | URL): void {
  if (!types.has(name)) modules.set(name, String(module));
}

/** Names of every registered device type, loaded or not. */
export function deviceTypeNames(): string[] {
  return [...new Set([...types.keys(), ...modules.keys()])].sort();
}

/**
 * The device type called `name`, importing its module when needed.
 *
 * @throws {Error} for an unknown name, a module that does not load, or one without a matching
 *   `deviceType` export
 */
export async function loadDeviceType(name: string): Promise<DeviceType | EmulatedDeviceType> {
  const loaded = types.get(name);
  if (loaded !== undefined) return loaded;
  const module = modules.get(name);
  if (module === undefined) {
    throw new Error(`unknown device type "${name}" (known: ${deviceTypeNames().join(", ")})`);
  }
  let exports: { deviceType?: unknown };
  try {
    exports = await import(module) as { deviceType?: unknown };
  } catch (error) {
    throw new Error(
      `device type "${name}" is not available: ${
        error instanceof Error ? error.message : String(error)
      }`,
      { cause: error },
    );
  }
  const type = exports.deviceType as DeviceType | EmulatedDeviceType | undefined;
  if (
    type === undefined || typeof type !== "object" || type.name !== name ||
    !(isEmulatedType(type) || typeof (type as DeviceType).createModel === "function")
  ) {
    throw new Error(`${module} does not export deviceType, a DeviceType named "${name}"`);
  }
  types.set(name, type);
  return type;
}
