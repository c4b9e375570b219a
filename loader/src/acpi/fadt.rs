//! The FADT ("FACP"): a hardware-reduced ACPI 6.4 FADT whose sleep
//! control/status and reset registers live in the PM block at
//! [`ports::ACPI_PM_BASE`], pointing at the DSDT through `X_DSDT`.
//!
//! Linux powers off by writing `(SLP_TYP << 2) | SLP_EN` (SLP_EN = 0x20) to
//! the sleep control register, with `SLP_TYP` from `\_S5_`, and only offers
//! S5 when both sleep registers are present. It resets through the reset
//! register when `RESET_REG_SUP` is set (`reboot=acpi`, the x86 default).

use acpi_tables::fadt::{FADTBuilder, Flags, PmProfile, FADT};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};

use super::{aml_bytes, oem_table_id, OEM_ID, OEM_REVISION};
use crate::layout::ports;

/// FADT minor version: with major version (table revision) 6, ACPI 6.4.
const FADT_MINOR_VERSION: u8 = 4;
/// IAPC_BOOT_ARCH: VGA not present. No i8042 is advertised (so Linux does
/// not probe one), the CMOS RTC is present and MSI is supported.
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
/// Hypervisor vendor identity, NUL padded.
const HYPERVISOR_VENDOR: [u8; 8] = *b"ZVMM\0\0\0\0";

/// Length of the FADT in bytes.
pub(super) fn len() -> usize {
    FADT::len()
}

/// An 8-bit register at I/O `port`, accessed with byte accesses.
fn io_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// Builds the FADT for a DSDT at `dsdt_addr`.
pub(super) fn build(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, oem_table_id(b"FACP"), OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .preferred_pm_profile(PmProfile::Unspecified);
    fadt.fadt_minor_version = FADT_MINOR_VERSION;
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH_VGA_NOT_PRESENT.into();
    fadt.reset_reg = io_register(ports::ACPI_RESET);
    fadt.reset_value = ports::ACPI_RESET_VALUE;
    fadt.sleep_control_reg = io_register(ports::ACPI_SLEEP_CONTROL);
    fadt.sleep_status_reg = io_register(ports::ACPI_SLEEP_STATUS);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR).into();
    aml_bytes(&fadt.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Field offsets from the ACPI 6.4 FADT layout.
    const FLAGS: usize = 112;
    const IAPC_BOOT_ARCH: usize = 109;
    const RESET_REG: usize = 116;
    const RESET_VALUE: usize = 128;
    const MINOR_VERSION: usize = 131;
    const DSDT: usize = 40;
    const X_FIRMWARE_CTRL: usize = 132;
    const X_DSDT: usize = 140;
    const SLEEP_CONTROL_REG: usize = 244;
    const SLEEP_STATUS_REG: usize = 256;
    const HYPERVISOR_ID: usize = 268;

    const HW_REDUCED_ACPI: u32 = 1 << 20;
    const RESET_REG_SUP: u32 = 1 << 10;

    fn u16_at(bytes: &[u8], offset: usize) -> u16 {
        u16::from_le_bytes(bytes[offset..offset + 2].try_into().unwrap())
    }

    fn u32_at(bytes: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], offset: usize) -> u64 {
        u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
    }

    /// Checks the GAS at `offset` describes the 8-bit I/O register `port`.
    fn assert_io_register(fadt: &[u8], offset: usize, port: u16) {
        assert_eq!(&fadt[offset..offset + 4], &[1, 8, 0, 1], "gas at {offset}");
        assert_eq!(u64_at(fadt, offset + 4), u64::from(port));
    }

    #[test]
    fn header_is_fadt_6_4_with_valid_checksum() {
        let fadt = build(0xe_1000);
        assert_eq!(fadt.len(), 276);
        assert_eq!(fadt.len(), len());
        assert_eq!(&fadt[..4], b"FACP");
        assert_eq!(u32_at(&fadt, 4), 276);
        assert_eq!(fadt[8], 6, "major version");
        assert_eq!(fadt[MINOR_VERSION], 4);
        assert_eq!(fadt.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    }

    #[test]
    fn is_hardware_reduced_with_reset_register() {
        let fadt = build(0xe_1000);
        let flags = u32_at(&fadt, FLAGS);
        assert_eq!(flags, HW_REDUCED_ACPI | RESET_REG_SUP);
        assert_io_register(&fadt, RESET_REG, ports::ACPI_RESET);
        assert_eq!(fadt[RESET_VALUE], ports::ACPI_RESET_VALUE);
    }

    #[test]
    fn sleep_registers_are_in_the_pm_block() {
        let fadt = build(0xe_1000);
        assert_io_register(&fadt, SLEEP_CONTROL_REG, ports::ACPI_SLEEP_CONTROL);
        assert_io_register(&fadt, SLEEP_STATUS_REG, ports::ACPI_SLEEP_STATUS);
    }

    #[test]
    fn points_at_the_dsdt_through_x_dsdt_only() {
        let fadt = build(0x1234_5678_9abc);
        assert_eq!(u64_at(&fadt, X_DSDT), 0x1234_5678_9abc);
        assert_eq!(u32_at(&fadt, DSDT), 0);
        assert_eq!(u64_at(&fadt, X_FIRMWARE_CTRL), 0, "no facs");
    }

    #[test]
    fn boot_arch_has_no_8042_and_keeps_the_rtc() {
        let fadt = build(0xe_1000);
        let boot_arch = u16_at(&fadt, IAPC_BOOT_ARCH);
        assert_eq!(boot_arch & (1 << 1), 0, "8042 must not be advertised");
        assert_ne!(boot_arch & (1 << 2), 0, "vga not present");
        assert_eq!(boot_arch & (1 << 3), 0, "msi must stay supported");
        assert_eq!(boot_arch & (1 << 5), 0, "cmos rtc is present");
        assert_eq!(&fadt[HYPERVISOR_ID..HYPERVISOR_ID + 4], b"ZVMM");
    }
}
