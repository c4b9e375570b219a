//! ACPI soft-off the way Linux does it: SLP_TYPa from the DSDT's `_S5_`
//! package, then either the hardware-reduced SLEEP_CONTROL_REG or the PM1
//! control blocks; i8042 reset as the last resort. Also the two resets
//! Linux uses: the FADT reset register (`reboot=acpi`) and the i8042.

use crate::acpi::{Acpi, Table};
use crate::io::{self, outb, outl, outw};
use crate::phys::{self, u32_at, u64_at, u8_at};
use crate::report;

// FADT field offsets (ACPI 6.x, table 5.9).
const FADT_PM1A_CNT_BLK: usize = 64;
const FADT_PM1B_CNT_BLK: usize = 68;
const FADT_FLAGS: usize = 112;
const FADT_RESET_REG: usize = 116;
const FADT_RESET_VALUE: usize = 128;
const FADT_X_PM1A_CNT_BLK: usize = 172;
const FADT_X_PM1B_CNT_BLK: usize = 184;
const FADT_SLEEP_CONTROL_REG: usize = 244;
const GAS_LEN: usize = 12;
const FLAG_RESET_REG_SUP: u32 = 1 << 10;
const FLAG_HW_REDUCED_ACPI: u32 = 1 << 20;
/// How long a reset or power-off gets before the probe calls it failed.
const GRACE_US: u64 = 100_000;

const SLP_EN_PM1: u16 = 1 << 13;
const SLP_EN_SLEEP_CONTROL: u8 = 1 << 5;

// GAS address space IDs.
const SPACE_MEMORY: u8 = 0;
const SPACE_IO: u8 = 1;
const SPACE_PCI_CONFIG: u8 = 2;

// AML opcodes.
const NAME_OP: u8 = 0x08;
const PACKAGE_OP: u8 = 0x12;
const ROOT_CHAR: u8 = b'\\';
const ZERO_OP: u8 = 0x00;
const ONE_OP: u8 = 0x01;
const BYTE_PREFIX: u8 = 0x0a;
const WORD_PREFIX: u8 = 0x0b;
const DWORD_PREFIX: u8 = 0x0c;
const QWORD_PREFIX: u8 = 0x0e;
const ONES_OP: u8 = 0xff;

const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// A generic address structure register.
#[derive(Clone, Copy)]
struct Gas {
    space: u8,
    address: u64,
}

impl Gas {
    fn at(fadt: Table, off: usize) -> Option<Gas> {
        let raw = fadt.bytes.get(off..off + GAS_LEN)?;
        let gas = Gas {
            space: u8_at(raw, 0),
            address: u64_at(raw, 4),
        };
        (gas.address != 0).then_some(gas)
    }

    fn io_port(port: u32) -> Option<Gas> {
        (port != 0).then_some(Gas {
            space: SPACE_IO,
            address: u64::from(port),
        })
    }

    fn space_name(self) -> &'static str {
        match self.space {
            SPACE_MEMORY => "memory",
            SPACE_IO => "io",
            SPACE_PCI_CONFIG => "pci_config",
            _ => "other",
        }
    }

    /// Writes `value` with `width` bytes; false if the space is unsupported.
    fn write(self, value: u32, width: u8) -> bool {
        match self.space {
            SPACE_IO => {
                let port = self.address as u16;
                match width {
                    1 => outb(port, value as u8),
                    2 => outw(port, value as u16),
                    _ => outl(port, value),
                }
                true
            }
            SPACE_MEMORY if self.address.saturating_add(4) <= phys::MAPPED_END => {
                let ptr = self.address as *mut u8;
                // SAFETY: the register is inside the identity map and the
                // FADT names it as the target of this write.
                unsafe {
                    match width {
                        1 => core::ptr::write_volatile(ptr, value as u8),
                        2 => core::ptr::write_volatile(ptr.cast::<u16>(), value as u16),
                        _ => core::ptr::write_volatile(ptr.cast::<u32>(), value),
                    }
                }
                true
            }
            _ => false,
        }
    }
}

/// Powers the machine off; reports and resets if that does not work.
pub fn power_off(acpi: &Acpi) -> ! {
    match (acpi.fadt, acpi.dsdt.and_then(|d| s5_slp_typ(d.body()))) {
        (None, _) => report!("poweroff no_fadt"),
        (Some(_), None) => report!("poweroff no_s5"),
        (Some(fadt), Some(slp_typ)) => write_sleep(fadt, slp_typ),
    }
    io::delay_us(GRACE_US);
    report!("poweroff failed");
    outb(I8042_COMMAND, I8042_RESET);
    io::delay_us(GRACE_US);
    io::halt_forever()
}

/// Resets through the i8042 controller (0xfe to port 0x64).
pub fn reset_i8042() -> ! {
    report!("reset method=i8042");
    outb(I8042_COMMAND, I8042_RESET);
    reset_failed()
}

/// Resets the way Linux `reboot=acpi` does: FADT `RESET_VALUE` written to
/// `RESET_REG` (one byte to an I/O port, else the register's width), if the
/// FADT has the register and flags it with RESET_REG_SUP.
pub fn reset_acpi(acpi: &Acpi) -> ! {
    let Some(fadt) = acpi.fadt else {
        report!("reset no_fadt");
        reset_failed()
    };
    let supported = u32_at(fadt.bytes, FADT_FLAGS) & FLAG_RESET_REG_SUP != 0;
    let reg = Gas::at(fadt, FADT_RESET_REG);
    let value = fadt.bytes.get(FADT_RESET_VALUE).copied();
    match (supported, reg, value) {
        (true, Some(reg), Some(value)) => {
            report!(
                "reset method=acpi space={} addr={:#x} value={value:#x}",
                reg.space_name(),
                reg.address
            );
            if !reg.write(u32::from(value), 1) {
                report!("reset reset_reg unusable");
            }
        }
        _ => report!("reset no_reset_reg"),
    }
    reset_failed()
}

fn reset_failed() -> ! {
    io::delay_us(GRACE_US);
    report!("reset failed");
    io::halt_forever()
}

fn write_sleep(fadt: Table, slp_typ: u64) {
    let slp_typ = (slp_typ & 7) as u8;
    if u32_at(fadt.bytes, FADT_FLAGS) & FLAG_HW_REDUCED_ACPI != 0 {
        report!("poweroff method=sleep_control slp_typ={slp_typ}");
        let value = (slp_typ << 2) | SLP_EN_SLEEP_CONTROL;
        match Gas::at(fadt, FADT_SLEEP_CONTROL_REG) {
            Some(reg) if reg.write(u32::from(value), 1) => {}
            _ => report!("poweroff sleep_control unusable"),
        }
        return;
    }
    report!("poweroff method=pm1 slp_typ={slp_typ}");
    let value = (u16::from(slp_typ) << 10) | SLP_EN_PM1;
    let pm1a = Gas::at(fadt, FADT_X_PM1A_CNT_BLK)
        .or_else(|| Gas::io_port(u32_at(fadt.bytes, FADT_PM1A_CNT_BLK)));
    let pm1b = Gas::at(fadt, FADT_X_PM1B_CNT_BLK)
        .or_else(|| Gas::io_port(u32_at(fadt.bytes, FADT_PM1B_CNT_BLK)));
    if !pm1a.is_some_and(|reg| reg.write(u32::from(value), 2)) {
        report!("poweroff pm1a unusable");
    }
    if let Some(reg) = pm1b {
        reg.write(u32::from(value), 2);
    }
}

/// SLP_TYPa: the first element of the `_S5_` package in the AML `aml`.
pub fn s5_slp_typ(aml: &[u8]) -> Option<u64> {
    let at = aml.windows(4).enumerate().find_map(|(i, w)| {
        let name_op = match i.checked_sub(1).map(|p| aml[p]) {
            Some(ROOT_CHAR) => i.checked_sub(2).map(|p| aml[p]),
            other => other,
        };
        (w == b"_S5_" && name_op == Some(NAME_OP) && aml.get(i + 4) == Some(&PACKAGE_OP))
            .then_some(i + 5)
    })?;
    let pkg_len_bytes = usize::from(aml.get(at)? >> 6);
    let first = at + 1 + pkg_len_bytes + 1; // PkgLength, NumElements
    decode_integer(aml.get(first..)?)
}

fn decode_integer(aml: &[u8]) -> Option<u64> {
    let le = |n: usize| {
        aml.get(1..1 + n)
            .map(|b| b.iter().rev().fold(0u64, |a, &x| (a << 8) | u64::from(x)))
    };
    match *aml.first()? {
        ZERO_OP => Some(0),
        ONE_OP => Some(1),
        ONES_OP => Some(u64::MAX),
        BYTE_PREFIX => le(1),
        WORD_PREFIX => le(2),
        DWORD_PREFIX => le(4),
        QWORD_PREFIX => le(8),
        _ => None,
    }
}
