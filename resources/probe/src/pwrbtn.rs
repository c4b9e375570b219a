//! `probe.action=power-button`: waits (at most [`WAIT_US`]) for the ACPI
//! power button the way a minimal OS without an AML interpreter can. The
//! GED's interrupt line and event register come from the command line
//! (`probe.pwrbtn.gsi=N`, `probe.pwrbtn.reg=0xPORT`, as the VMM's layout
//! has them) instead of from the DSDT's `_CRS` and `_EVT`. The probe
//! programs that IOAPIC input (edge, active high, fixed delivery to the
//! BSP) to [`VECTOR`], software-enables its local APIC and, with
//! interrupts masked (no IDT is installed), polls the local APIC's IRR
//! until the vector is pending: the interrupt really travelled IOAPIC →
//! LAPIC. Then it reads the event register (read-to-clear), reports it and
//! powers off through ACPI S5.

use crate::acpi::Acpi;
use crate::boot::BootInfo;
use crate::io;
use crate::phys;
use crate::power;
use crate::report;

/// Longest wait for the interrupt.
pub const WAIT_US: u64 = 10_000_000;
/// Vector the GSI is routed to.
pub const VECTOR: u8 = 0x50;
/// The PC IOAPIC's base (what the MADT reports as `ioapic addr=`).
const IOAPIC_BASE: u64 = 0xfec0_0000;
const IOAPIC_INDEX: u64 = 0x00;
const IOAPIC_DATA: u64 = 0x10;
const IOAPIC_REDIRECTION: u32 = 0x10;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_IRR: u64 = 0x200;
const SVR_ENABLE: u32 = 0x100 | 0xff;
const POLL_US: u64 = 1_000;

fn mmio_write(addr: u64, value: u32) {
    // SAFETY: `addr` is an IOAPIC/LAPIC register inside the probe's
    // identity map (first 4 GiB, uncached for the APIC pages).
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

fn mmio_read(addr: u64) -> u32 {
    // SAFETY: as in `mmio_write`.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// The value of `key` (e.g. `b"probe.pwrbtn.gsi="`) on the command line:
/// decimal, or hex with `0x`.
fn option(boot: &BootInfo, key: &[u8]) -> Option<u64> {
    let word = boot
        .cmdline
        .unwrap_or(&[])
        .split(|&b| b == b' ')
        .find_map(|word| word.strip_prefix(key))?;
    let (digits, radix) = match word.strip_prefix(b"0x") {
        Some(hex) => (hex, 16),
        None => (word, 10),
    };
    let text = core::str::from_utf8(digits).ok()?;
    u64::from_str_radix(text, radix).ok()
}

/// Routes `gsi` to [`VECTOR`] on the BSP, waits for it, reads the event
/// register at `port`, reports, and powers off.
pub fn run(boot: &BootInfo, acpi: &Acpi) -> ! {
    let gsi = option(boot, b"probe.pwrbtn.gsi=").filter(|g| *g < 24);
    let port = option(boot, b"probe.pwrbtn.reg=").and_then(|p| u16::try_from(p).ok());
    let (Some(gsi), Some(port)) = (gsi, port) else {
        report!("power-button missing=probe.pwrbtn.gsi|probe.pwrbtn.reg");
        power::power_off(acpi)
    };
    let lapic = acpi.cpus.lapic_addr;
    if lapic == 0 || lapic.saturating_add(0x1000) > phys::MAPPED_END {
        report!("power-button lapic unmapped");
        power::power_off(acpi)
    }
    mmio_write(lapic + LAPIC_SVR, SVR_ENABLE);
    let entry = IOAPIC_REDIRECTION + 2 * gsi as u32;
    mmio_write(IOAPIC_BASE + IOAPIC_INDEX, entry + 1);
    mmio_write(IOAPIC_BASE + IOAPIC_DATA, io::apic_id() << 24);
    mmio_write(IOAPIC_BASE + IOAPIC_INDEX, entry);
    // Fixed delivery, physical destination, active high, edge, unmasked.
    mmio_write(IOAPIC_BASE + IOAPIC_DATA, u32::from(VECTOR));
    report!("power-button waiting gsi={gsi} reg={port:#x} vector={VECTOR:#x}");
    let irr = lapic + LAPIC_IRR + 0x10 * u64::from(VECTOR / 32);
    let bit = 1u32 << (VECTOR % 32);
    let mut waited = 0;
    while mmio_read(irr) & bit == 0 {
        if waited >= WAIT_US {
            report!("power-button timeout");
            power::power_off(acpi)
        }
        io::delay_us(POLL_US);
        waited += POLL_US;
    }
    report!("power-button event={:#04x}", io::inb(port));
    power::power_off(acpi)
}
