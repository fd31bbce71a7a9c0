/**
 * The `ahci` device type: a SATA disk on an AHCI host bus adapter of its own, as QEMU's
 * `ich9-ahci` with an `ide-hd` on its port 0. The guest reaches it through MMIO (the ABAR) and
 * its interrupts arrive as MSI.
 *
 * @module
 */

import { z } from "zod";
import { AhciController } from "./ahci.ts";
import type { EmulatedDeviceType } from "./emulated.ts";

/** Options of an `ahci` device. */
export const ahciOptionsSchema = z.strictObject({
  /** Native command queuing for the guest driver (default on, as Linux's ahci uses it). */
  ncq: z.boolean().default(true),
  /** IDENTIFY DEVICE's serial number (20 characters at most). */
  serial: z.string().max(20).optional(),
});

/** The `ahci` device type (registered by the machine's registry). */
export const deviceType: EmulatedDeviceType = {
  kind: "emulated",
  name: "ahci",
  drives: { min: 1, max: 1 },
  optionsSchema: ahciOptionsSchema,
  perController: 1,
  intxLines: 1,
  create({ members, memory, vcpu, intxSources }) {
    const member = members[0]!;
    const serial = member.spec.options.serial;
    const cache = member.spec.drives[0]?.cache;
    return new AhciController({
      drives: [member.drives[0] ?? null],
      memory,
      msi: (vector) => vcpu.deliver(vector),
      intx: (level) => vcpu.setIntx(intxSources[0]!, level),
      ...(typeof serial === "string" ? { serial } : {}),
      writeCache: cache !== "writethrough" && cache !== "directsync",
    });
  },
};

/** The same object as {@linkcode deviceType}, under a name the public API can re-export. */
export const ahciDeviceType: EmulatedDeviceType = deviceType;
