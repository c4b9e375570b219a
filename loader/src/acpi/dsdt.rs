//! The DSDT: the `\_S5_` soft-off package and, under `\_SB`, one device per
//! [`PlatformDevice`] with `_HID`, `_UID` and a `_CRS` of its I/O ports and
//! interrupt. The AML comes from the acpi_tables crate's `aml` module.
//!
//! Interrupts are Extended Interrupt descriptors (a GSI, edge triggered,
//! active high, exclusive): hardware-reduced Linux has no legacy PIC and no
//! ISA IRQ identity map, so devices must name their IOAPIC input.

use std::collections::BTreeMap;

use acpi_tables::aml::{Device, EISAName, Interrupt, Name, Package, ResourceTemplate, Scope, IO};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;

use super::{
    aml_bytes, oem_table_id, pci, AcpiError, PlatformDevice, HEADER_LEN, OEM_ID, OEM_REVISION,
};
use crate::layout::{self, ports};

/// DSDT revision 2: integers are 64 bits wide.
const DSDT_REVISION: u8 = 2;
/// Number of ports of an 8250 UART.
const SERIAL_PORTS: u16 = 8;
/// Number of ports of the CMOS RTC (index and data).
const RTC_PORTS: u16 = 2;

/// How devices of one kind are named and identified.
pub(super) struct DeviceKind {
    /// Name for errors.
    pub(super) label: &'static str,
    /// AML name prefix; hex digits fill the name up to 4 characters.
    pub(super) prefix: &'static str,
    /// Index of the first device's name, and its `_UID` if it is the first
    /// device with this `_HID`.
    pub(super) first: u32,
    /// EISA ID for `_HID`.
    pub(super) hid: &'static str,
}

const SERIAL: DeviceKind = DeviceKind {
    label: "serial port",
    prefix: "COM",
    first: 1,
    hid: "PNP0501",
};
const RTC: DeviceKind = DeviceKind {
    label: "rtc",
    prefix: "RTC",
    first: 0,
    hid: "PNP0B00",
};
const PM_BLOCK: DeviceKind = DeviceKind {
    label: "power management block",
    prefix: "PMB",
    first: 0,
    hid: "PNP0C02",
};

impl DeviceKind {
    /// Number of hex digits after the prefix.
    fn digits(&self) -> u32 {
        4 - self.prefix.len() as u32
    }

    /// Largest number of devices of this kind that can be named.
    fn max_count(&self) -> u32 {
        16u32.pow(self.digits()) - self.first
    }
}

/// Hands out AML names per name prefix and `_UID`s per `_HID`, so that
/// devices sharing a `_HID` (motherboard resources) get distinct `_UID`s.
#[derive(Default)]
pub(super) struct DeviceIds {
    names: BTreeMap<&'static str, u32>,
    uids: BTreeMap<&'static str, u32>,
}

impl DeviceIds {
    /// The next (name, `_UID`) of `kind`, e.g. `COM1`/1 then `COM2`/2.
    pub(super) fn next(&mut self, kind: &DeviceKind) -> Result<(String, u32), AcpiError> {
        let named = self.names.entry(kind.prefix).or_insert(0);
        if *named >= kind.max_count() {
            return Err(AcpiError::TooManyDevices {
                kind: kind.label,
                max: kind.max_count(),
            });
        }
        let index = kind.first + *named;
        *named += 1;
        let width = kind.digits() as usize;
        let uids = self.uids.entry(kind.hid).or_insert(0);
        let uid = kind.first + *uids;
        *uids += 1;
        Ok((format!("{}{index:0width$X}", kind.prefix), uid))
    }
}

/// Checks `[port, port + len)` lies in the 16-bit I/O space.
fn check_ports(kind: &DeviceKind, port: u16, len: u16) -> Result<(), AcpiError> {
    if u32::from(port) + u32::from(len) > 0x1_0000 {
        return Err(AcpiError::PortRange {
            kind: kind.label,
            port,
            len: u32::from(len),
        });
    }
    Ok(())
}

/// Checks `irq` is an input of the IOAPIC.
fn check_irq(kind: &DeviceKind, irq: u32) -> Result<(), AcpiError> {
    if irq >= layout::IOAPIC_NUM_PINS {
        return Err(AcpiError::Irq {
            kind: kind.label,
            irq,
            max: layout::IOAPIC_NUM_PINS - 1,
        });
    }
    Ok(())
}

/// `Device (name) { _HID, _UID, _CRS }` with `resources` in `_CRS`.
pub(super) fn device(name: &str, kind: &DeviceKind, uid: u32, resources: Vec<&dyn Aml>) -> Vec<u8> {
    device_with(name, kind, uid, Vec::new(), resources)
}

/// `Device (name) { _HID, _UID, others..., _CRS }`.
pub(super) fn device_with(
    name: &str,
    kind: &DeviceKind,
    uid: u32,
    others: Vec<&dyn Aml>,
    resources: Vec<&dyn Aml>,
) -> Vec<u8> {
    let hid = Name::new("_HID".into(), &EISAName::new(kind.hid));
    let uid = Name::new("_UID".into(), &uid);
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(resources));
    let mut children: Vec<&dyn Aml> = vec![&hid, &uid];
    children.extend(others);
    children.push(&crs);
    aml_bytes(&Device::new(name.into(), children))
}

/// A fixed range of `len` I/O ports at `port`.
fn io_ports(port: u16, len: u8) -> IO {
    IO::new(port, port, 1, len)
}

/// An edge-triggered, active-high, exclusive interrupt on `gsi`.
fn edge_interrupt(gsi: u32) -> Interrupt {
    Interrupt::new(true, true, false, false, gsi)
}

/// A device with `len` ports at `port` and interrupt `irq`.
fn isa_device(
    ids: &mut DeviceIds,
    kind: &DeviceKind,
    port: u16,
    len: u16,
    irq: u32,
) -> Result<Vec<u8>, AcpiError> {
    check_ports(kind, port, len)?;
    check_irq(kind, irq)?;
    let (name, uid) = ids.next(kind)?;
    let ports = io_ports(port, len as u8);
    let interrupt = edge_interrupt(irq);
    Ok(device(&name, kind, uid, vec![&ports, &interrupt]))
}

/// The PM block, reserved as a motherboard resource.
fn pm_block(ids: &mut DeviceIds, base: u16, len: u16) -> Result<Vec<u8>, AcpiError> {
    let len8 = u8::try_from(len)
        .ok()
        .filter(|l| *l > 0)
        .ok_or(AcpiError::PmBlockLength { base, len })?;
    check_ports(&PM_BLOCK, base, len)?;
    let (name, uid) = ids.next(&PM_BLOCK)?;
    Ok(device(&name, &PM_BLOCK, uid, vec![&io_ports(base, len8)]))
}

/// AML of one platform device.
fn device_aml(ids: &mut DeviceIds, device: &PlatformDevice) -> Result<Vec<u8>, AcpiError> {
    match *device {
        PlatformDevice::Serial { port, irq } => isa_device(ids, &SERIAL, port, SERIAL_PORTS, irq),
        PlatformDevice::Rtc { port, irq } => isa_device(ids, &RTC, port, RTC_PORTS, irq),
        PlatformDevice::PowerManagement { base, len } => pm_block(ids, base, len),
        PlatformDevice::PciHostBridge(ref bridge) => pci::host_bridge(ids, bridge),
        PlatformDevice::PowerButton { event_port, gsi } => {
            super::ged::power_button(event_port, gsi)
        }
    }
}

/// `Name (_S5_, Package () { SLP_TYP, 0, 0, 0 })`: only the first value
/// matters, the hardware-reduced sleep control register has no PM1b.
fn sleep_state_s5() -> Vec<u8> {
    let slp_typ = ports::ACPI_S5_SLP_TYP;
    let package = Package::new(vec![&slp_typ, &0u8, &0u8, &0u8]);
    aml_bytes(&Name::new("_S5_".into(), &package))
}

/// Builds the DSDT declaring `devices`.
pub(super) fn build(devices: &[PlatformDevice]) -> Result<Vec<u8>, AcpiError> {
    let mut ids = DeviceIds::default();
    let mut system_bus = Vec::new();
    for device in devices {
        system_bus.extend(device_aml(&mut ids, device)?);
    }
    let mut dsdt = Sdt::new(
        *b"DSDT",
        HEADER_LEN as u32,
        DSDT_REVISION,
        OEM_ID,
        oem_table_id(b"DSDT"),
        OEM_REVISION,
    );
    dsdt.append_slice(&sleep_state_s5());
    dsdt.append_slice(&Scope::raw("\\_SB_".into(), system_bus));
    Ok(dsdt.as_slice().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acpi::tests::legacy_devices;

    /// `_HID` of PNP0501 as AML: NameOp "_HID" DWordPrefix, EISA ID bytes.
    const PNP0501_HID: [u8; 10] = [0x08, b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x05, 0x01];
    /// `_HID` of PNP0B00.
    const PNP0B00_HID: [u8; 4] = [0x41, 0xd0, 0x0b, 0x00];
    /// `_HID` of PNP0C02.
    const PNP0C02_HID: [u8; 4] = [0x41, 0xd0, 0x0c, 0x02];

    fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
        haystack.windows(needle.len()).position(|w| w == needle)
    }

    #[test]
    fn header_and_checksum() {
        let dsdt = build(&legacy_devices()).unwrap();
        assert_eq!(&dsdt[..4], b"DSDT");
        assert_eq!(dsdt[8], 2);
        assert_eq!(
            u32::from_le_bytes(dsdt[4..8].try_into().unwrap()) as usize,
            dsdt.len()
        );
        assert_eq!(dsdt.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    }

    #[test]
    fn s5_package_carries_the_slp_typ() {
        let dsdt = build(&[]).unwrap();
        let at = find(&dsdt, b"_S5_").expect("_S5_ missing");
        assert_eq!(dsdt[at - 1], 0x08, "NameOp");
        let package = &dsdt[at + 4..];
        // PackageOp, PkgLength, NumElements, BytePrefix SLP_TYP, Zero x3.
        assert_eq!(package[0], 0x12);
        assert_eq!(&package[2..8], &[4, 0x0a, ports::ACPI_S5_SLP_TYP, 0, 0, 0]);
    }

    #[test]
    fn declares_com1_with_its_ports_and_irq() {
        let dsdt = build(&legacy_devices()).unwrap();
        let com1 = find(&dsdt, b"COM1").expect("COM1 missing");
        assert!(find(&dsdt[com1..], &PNP0501_HID).is_some());
        let [lo, hi] = ports::COM1.to_le_bytes();
        // IO (Decode16, COM1, COM1, 1, 8)
        assert!(find(&dsdt, &[0x47, 0x01, lo, hi, lo, hi, 1, 8]).is_some());
        // Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { COM1_IRQ }
        let mut irq = vec![0x89, 6, 0, 0x03, 1];
        irq.extend_from_slice(&ports::COM1_IRQ.to_le_bytes());
        assert!(find(&dsdt, &irq).is_some());
        assert_eq!(
            find(&dsdt, b"_UID").map(|at| &dsdt[at + 4..at + 5]),
            Some(&[1u8][..])
        );
    }

    #[test]
    fn declares_rtc_and_pm_block() {
        let dsdt = build(&legacy_devices()).unwrap();
        assert!(find(&dsdt, b"RTC0").is_some());
        assert!(find(&dsdt, &PNP0B00_HID).is_some());
        assert!(find(&dsdt, b"PMB0").is_some());
        assert!(find(&dsdt, &PNP0C02_HID).is_some());
        let [lo, hi] = ports::ACPI_PM_BASE.to_le_bytes();
        let pm_io = [0x47, 0x01, lo, hi, lo, hi, 1, ports::ACPI_PM_LEN as u8];
        assert!(find(&dsdt, &pm_io).is_some());
    }

    #[test]
    fn serial_ports_are_numbered() {
        let serial = |port| PlatformDevice::Serial { port, irq: 4 };
        let dsdt = build(&[serial(0x3f8), serial(0x2f8)]).unwrap();
        assert!(find(&dsdt, b"COM1").unwrap() < find(&dsdt, b"COM2").unwrap());
        let too_many: Vec<_> = (0..16).map(|i| serial(0x1000 + i * 8)).collect();
        let err = build(&too_many).unwrap_err();
        assert!(
            matches!(err, AcpiError::TooManyDevices { max: 15, .. }),
            "{err}"
        );
    }

    #[test]
    fn bad_devices_are_rejected() {
        let bad = [
            PlatformDevice::Serial {
                port: 0xfffc,
                irq: 4,
            },
            PlatformDevice::Serial {
                port: 0x3f8,
                irq: 24,
            },
            PlatformDevice::PowerManagement {
                base: 0x600,
                len: 0,
            },
            PlatformDevice::PowerManagement {
                base: 0x600,
                len: 256,
            },
        ];
        for device in bad {
            let err = build(std::slice::from_ref(&device)).unwrap_err();
            assert!(!err.to_string().is_empty());
            assert!(
                !matches!(err, AcpiError::TooManyDevices { .. }),
                "{device:?}: {err}"
            );
        }
    }
}
