//! PCI Express host bridges: the MCFG table (one ECAM entry per bridge) and
//! the DSDT devices of each bridge: a `PNP0A08` host bridge (`_CID`
//! `PNP0A03`) with `_SEG`, `_BBN` and a `_CRS` of its bus range and windows,
//! and a `PNP0C02` motherboard resource reserving its ECAM. Linux ignores an
//! MCFG region that no motherboard resource reserves ("not reserved in ACPI
//! motherboard resources") and then has no config access without port 0xcf8.
//!
//! No `_OSC` (Linux then keeps PCIe hotplug/AER/PME under firmware control
//! and disables ASPM) and no `_PRT` (no INTx routing: devices use MSI/MSI-X).

use acpi_tables::aml::{AddressSpace, AddressSpaceCacheable, EISAName, Memory32Fixed, Name};
use acpi_tables::mcfg::MCFG;
use acpi_tables::Aml;

use super::dsdt::{device, device_with, DeviceIds, DeviceKind};
use super::{aml_bytes, oem_table_id, AcpiError, AddressRange, PciHostBridge, PlatformDevice};
use super::{OEM_ID, OEM_REVISION};
use crate::layout::FOUR_GIB;

/// Bytes of ECAM per bus.
const ECAM_BUS_SIZE: u64 = 1 << 20;

const HOST_BRIDGE: DeviceKind = DeviceKind {
    label: "pci host bridge",
    prefix: "PCI",
    first: 0,
    hid: "PNP0A08",
};
const ECAM_RESERVATION: DeviceKind = DeviceKind {
    label: "pci ecam reservation",
    prefix: "ECM",
    first: 0,
    hid: "PNP0C02",
};
/// `_CID` of a PCI Express host bridge: a PCI host bridge.
const PCI_HOST_BRIDGE_CID: &str = "PNP0A03";

/// The MCFG for the host bridges among `devices`, if there are any.
pub(super) fn mcfg(devices: &[PlatformDevice]) -> Option<Vec<u8>> {
    let mut mcfg = MCFG::new(OEM_ID, oem_table_id(b"MCFG"), OEM_REVISION);
    let mut any = false;
    for device in devices {
        if let PlatformDevice::PciHostBridge(bridge) = device {
            let (segment, start, end) = (bridge.segment, bridge.bus_start, bridge.bus_end);
            mcfg.add_ecam(bridge.ecam_start, segment, start, end);
            any = true;
        }
    }
    any.then(|| aml_bytes(&mcfg))
}

/// Checks the bus range and ECAM base; returns the ECAM range the bridge's
/// buses occupy.
fn ecam_range(bridge: &PciHostBridge) -> Result<AddressRange, AcpiError> {
    let (start, end) = (bridge.bus_start, bridge.bus_end);
    if start > end {
        return Err(AcpiError::PciBusRange { start, end });
    }
    let ecam_end = bridge
        .ecam_start
        .checked_add((u64::from(end) + 1) * ECAM_BUS_SIZE);
    if bridge.ecam_start & (ECAM_BUS_SIZE - 1) != 0 || ecam_end.is_none() {
        return Err(AcpiError::PciEcam {
            ecam_start: bridge.ecam_start,
            bus_end: end,
        });
    }
    Ok(AddressRange {
        start: bridge.ecam_start + u64::from(start) * ECAM_BUS_SIZE,
        size: (u64::from(end) - u64::from(start) + 1) * ECAM_BUS_SIZE,
    })
}

/// The (first, last) address of `range` if it is non-empty, its size fits
/// in `max_size` and its last address is at most `max_last`.
fn window_bounds(
    window: &'static str,
    range: AddressRange,
    max_size: u64,
    max_last: u64,
) -> Result<(u64, u64), AcpiError> {
    let last = range
        .size
        .checked_sub(1)
        .and_then(|len| range.start.checked_add(len))
        .filter(|last| *last <= max_last && range.size <= max_size);
    match last {
        Some(last) => Ok((range.start, last)),
        None => Err(AcpiError::PciWindow {
            window,
            start: range.start,
            size: range.size,
        }),
    }
}

/// `_CRS` descriptor of the 32-bit memory window.
fn mmio32_window(range: AddressRange) -> Result<AddressSpace<u32>, AcpiError> {
    let max = u64::from(u32::MAX);
    let (first, last) = window_bounds("32-bit memory", range, max, max)?;
    let (first, last) = (first as u32, last as u32);
    let cache = AddressSpaceCacheable::NotCacheable;
    Ok(AddressSpace::new_memory(cache, true, first, last, None))
}

/// `_CRS` descriptor of the 64-bit memory window.
fn mmio64_window(range: AddressRange) -> Result<AddressSpace<u64>, AcpiError> {
    let (first, last) = window_bounds("64-bit memory", range, u64::MAX, u64::MAX)?;
    let cache = AddressSpaceCacheable::NotCacheable;
    Ok(AddressSpace::new_memory(cache, true, first, last, None))
}

/// `_CRS` descriptor of the I/O window.
fn io_window(range: AddressRange) -> Result<AddressSpace<u16>, AcpiError> {
    let max = u64::from(u16::MAX);
    let (first, last) = window_bounds("i/o", range, max, max)?;
    Ok(AddressSpace::new_io(first as u16, last as u16, None))
}

/// The `PNP0C02` device reserving `ecam`.
fn ecam_reservation(ids: &mut DeviceIds, ecam: AddressRange) -> Result<Vec<u8>, AcpiError> {
    let (name, uid) = ids.next(&ECAM_RESERVATION)?;
    if ecam.start + ecam.size <= FOUR_GIB {
        let fixed = Memory32Fixed::new(false, ecam.start as u32, ecam.size as u32);
        return Ok(device(&name, &ECAM_RESERVATION, uid, vec![&fixed]));
    }
    let last = ecam.start + (ecam.size - 1);
    let cache = AddressSpaceCacheable::NotCacheable;
    let memory = AddressSpace::<u64>::new_memory(cache, false, ecam.start, last, None);
    Ok(device(&name, &ECAM_RESERVATION, uid, vec![&memory]))
}

/// The host bridge device followed by its ECAM reservation.
pub(super) fn host_bridge(
    ids: &mut DeviceIds,
    bridge: &PciHostBridge,
) -> Result<Vec<u8>, AcpiError> {
    let ecam = ecam_range(bridge)?;
    let buses = AddressSpace::<u16>::new_bus_number(bridge.bus_start.into(), bridge.bus_end.into());
    let mmio32 = mmio32_window(bridge.mmio32)?;
    let mmio64 = bridge.mmio64.map(mmio64_window).transpose()?;
    let io = bridge.io.map(io_window).transpose()?;
    let mut resources: Vec<&dyn Aml> = vec![&buses];
    if let Some(io) = &io {
        resources.push(io);
    }
    resources.push(&mmio32);
    if let Some(mmio64) = &mmio64 {
        resources.push(mmio64);
    }

    let (name, uid) = ids.next(&HOST_BRIDGE)?;
    let cid = Name::new("_CID".into(), &EISAName::new(PCI_HOST_BRIDGE_CID));
    let segment = Name::new("_SEG".into(), &bridge.segment);
    let bus = Name::new("_BBN".into(), &bridge.bus_start);
    let others: Vec<&dyn Aml> = vec![&cid, &segment, &bus];
    let mut aml = device_with(&name, &HOST_BRIDGE, uid, others, resources);
    aml.extend(ecam_reservation(ids, ecam)?);
    Ok(aml)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout;

    fn bridge() -> PciHostBridge {
        PciHostBridge {
            segment: 0,
            ecam_start: layout::PCI_ECAM_START,
            bus_start: 0,
            bus_end: 255,
            mmio32: AddressRange {
                start: layout::PCI_MMIO32_START,
                size: layout::PCI_MMIO32_SIZE,
            },
            mmio64: Some(AddressRange {
                start: layout::PCI_MMIO64_ALIGN,
                size: layout::PCI_MMIO64_SIZE,
            }),
            io: Some(AddressRange {
                start: 0x1000,
                size: 0xf000,
            }),
        }
    }

    fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
        haystack.windows(needle.len()).position(|w| w == needle)
    }

    fn aml(bridge: &PciHostBridge) -> Result<Vec<u8>, AcpiError> {
        host_bridge(&mut DeviceIds::default(), bridge)
    }

    #[test]
    fn mcfg_has_one_entry_per_bridge() {
        assert!(mcfg(&[]).is_none());
        let devices = [PlatformDevice::PciHostBridge(bridge())];
        let mcfg = mcfg(&devices).unwrap();
        assert_eq!(&mcfg[..4], b"MCFG");
        assert_eq!(mcfg.len(), 36 + 8 + 16);
        assert_eq!(mcfg.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let entry = &mcfg[44..];
        assert_eq!(
            u64::from_le_bytes(entry[..8].try_into().unwrap()),
            layout::PCI_ECAM_START
        );
        assert_eq!(&entry[8..12], &[0, 0, 0, 255], "segment 0, buses 0-255");
    }

    #[test]
    fn host_bridge_is_pnp0a08_compatible_with_pnp0a03() {
        let aml = aml(&bridge()).unwrap();
        assert!(find(&aml, b"PCI0").is_some());
        let hid = [b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x0a, 0x08];
        let cid = [b'_', b'C', b'I', b'D', 0x0c, 0x41, 0xd0, 0x0a, 0x03];
        assert!(find(&aml, &hid).is_some() && find(&aml, &cid).is_some());
        assert!(find(&aml, b"_SEG").is_some() && find(&aml, b"_BBN").is_some());
    }

    #[test]
    fn crs_lists_buses_and_windows() {
        let aml = aml(&bridge()).unwrap();
        // WordBusNumber 0-255: min 0, max 0xff, length 0x100.
        let buses = [0x88, 0x0d, 0, 2, 0x0c, 0, 0, 0, 0, 0, 0xff, 0, 0, 0, 0, 1];
        assert!(find(&aml, &buses).is_some());
        let mut mmio32 = (layout::PCI_MMIO32_START as u32).to_le_bytes().to_vec();
        mmio32.extend_from_slice(
            &((layout::PCI_MMIO32_START + layout::PCI_MMIO32_SIZE - 1) as u32).to_le_bytes(),
        );
        assert!(find(&aml, &mmio32).is_some(), "dword memory window");
        let mut mmio64 = layout::PCI_MMIO64_ALIGN.to_le_bytes().to_vec();
        mmio64.extend_from_slice(
            &(layout::PCI_MMIO64_ALIGN + layout::PCI_MMIO64_SIZE - 1).to_le_bytes(),
        );
        assert!(find(&aml, &mmio64).is_some(), "qword memory window");
        assert!(
            find(&aml, &[0x00, 0x10, 0xff, 0xff]).is_some(),
            "i/o window 0x1000-0xffff"
        );
    }

    #[test]
    fn ecam_is_reserved_as_a_motherboard_resource() {
        let aml = aml(&bridge()).unwrap();
        let ecam = find(&aml, b"ECM0").unwrap();
        assert!(
            find(&aml[ecam..], &[0x41, 0xd0, 0x0c, 0x02]).is_some(),
            "PNP0C02"
        );
        let mut fixed = vec![0x86, 9, 0, 0];
        fixed.extend_from_slice(&(layout::PCI_ECAM_START as u32).to_le_bytes());
        fixed.extend_from_slice(&(layout::PCI_ECAM_SIZE as u32).to_le_bytes());
        assert!(
            find(&aml[ecam..], &fixed).is_some(),
            "Memory32Fixed of the ecam"
        );
    }

    #[test]
    fn motherboard_resources_get_distinct_uids() {
        let pm_block = PlatformDevice::PowerManagement {
            base: 0x600,
            len: 3,
        };
        let devices = [pm_block, PlatformDevice::PciHostBridge(bridge())];
        let dsdt = super::super::dsdt::build(&devices).unwrap();
        let uid_after = |name: &[u8]| {
            let at = find(&dsdt, name).unwrap();
            let uid = at + find(&dsdt[at..], b"_UID").unwrap() + 4;
            dsdt[uid]
        };
        assert_eq!(uid_after(b"PMB0"), 0x00, "Zero");
        assert_eq!(uid_after(b"ECM0"), 0x01, "One");
    }

    #[test]
    fn partial_bus_range_reserves_only_its_buses() {
        let ecam = ecam_range(&PciHostBridge {
            bus_start: 2,
            bus_end: 3,
            ..bridge()
        })
        .unwrap();
        assert_eq!(ecam.start, layout::PCI_ECAM_START + (2 << 20));
        assert_eq!(ecam.size, 2 << 20);
    }

    /// Segment `segment` of `segments` as zvmm lays it out.
    fn segment_bridge(segment: u16, segments: u16) -> PciHostBridge {
        let windows = layout::pci_segment_windows(segment, segments, 1 << 30, 0).unwrap();
        let range = |(start, size): (u64, u64)| AddressRange { start, size };
        PciHostBridge {
            segment,
            ecam_start: windows.ecam.0,
            bus_start: 0,
            bus_end: 0,
            mmio32: range(windows.mmio32),
            mmio64: Some(range(windows.mmio64)),
            io: None,
        }
    }

    #[test]
    fn two_segments_get_two_mcfg_entries_and_two_bridges() {
        let devices: Vec<_> = (0..2)
            .map(|s| PlatformDevice::PciHostBridge(segment_bridge(s, 2)))
            .collect();
        let mcfg = mcfg(&devices).unwrap();
        assert_eq!(mcfg.len(), 36 + 8 + 2 * 16);
        for (segment, entry) in mcfg[44..].chunks(16).enumerate() {
            let base = u64::from_le_bytes(entry[..8].try_into().unwrap());
            assert_eq!(base, layout::PCI_ECAM_START + ((segment as u64) << 20));
            assert_eq!(
                &entry[8..12],
                &[segment as u8, 0, 0, 0],
                "segment, buses 0-0"
            );
        }
        let dsdt = super::super::dsdt::build(&devices).unwrap();
        let pci1 = find(&dsdt, b"PCI1").expect("second bridge");
        assert!(find(&dsdt, b"PCI0").unwrap() < pci1);
        let seg = pci1 + find(&dsdt[pci1..], b"_SEG").unwrap() + 4;
        assert_eq!(dsdt[seg], 0x01, "_SEG One");
        assert!(find(&dsdt, b"ECM1").is_some(), "second ecam reserved");
    }

    #[test]
    fn iasl_reads_one_host_bridge_per_segment() {
        use crate::acpi::tests::{dump_tables, iasl, platform, scratch_dir};
        let dir = scratch_dir("segments");
        let segments = 3;
        let mut machine = platform(1);
        for segment in 0..segments {
            let bridge = segment_bridge(segment, segments);
            machine.devices.push(PlatformDevice::PciHostBridge(bridge));
        }
        dump_tables(&dir, &machine);
        for table in ["mcfg", "dsdt"] {
            let log = iasl(&dir, &["-d", &format!("{table}.dat")]);
            assert!(!log.contains("Error"), "iasl -d {table}:\n{log}");
        }
        // Whitespace squashed: iasl aligns its comments.
        let read = |name: &str| {
            let text = std::fs::read_to_string(dir.join(name)).unwrap();
            text.split_whitespace().collect::<Vec<_>>().join(" ")
        };
        let (mcfg, dsdt) = (read("mcfg.dsl"), read("dsdt.dsl"));
        for segment in 0..segments {
            let windows = layout::pci_segment_windows(segment, segments, 1 << 30, 0).unwrap();
            let base = format!("Base Address : {:016X}", windows.ecam.0);
            assert!(mcfg.contains(&base), "{base} missing from:\n{mcfg}");
            assert!(
                mcfg.contains(&format!("Segment Group Number : {segment:04X}")),
                "{mcfg}"
            );
            let device = format!("Device (PCI{segment})");
            let at = dsdt
                .find(&device)
                .unwrap_or_else(|| panic!("{device}:\n{dsdt}"));
            let body = &dsdt[at..];
            let body = &body[..body[1..].find("Device (").map_or(body.len(), |end| end + 1)];
            let uid = if segment == 0 {
                "Zero".to_string()
            } else if segment == 1 {
                "One".to_string()
            } else {
                format!("0x{segment:02X}")
            };
            for expected in [
                "EisaId (\"PNP0A08\")".to_string(),
                format!("Name (_SEG, {uid})"),
                format!("Name (_UID, {uid})"),
                "Name (_BBN, Zero)".to_string(),
                format!("0x{:08X}, // Range Minimum", windows.mmio32.0),
                format!("0x{:016X}, // Range Minimum", windows.mmio64.0),
            ] {
                assert!(body.contains(&expected), "{expected} missing from:\n{body}");
            }
            let ecam = format!("Memory32Fixed (ReadOnly, 0x{:08X},", windows.ecam.0);
            assert!(dsdt.contains(&ecam), "{ecam} missing from:\n{dsdt}");
        }
        let log = iasl(&dir, &["-p", "recompiled", "dsdt.dsl"]);
        assert!(log.contains("0 Errors"), "{log}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_bridges_are_rejected() {
        let window = |start, size| AddressRange { start, size };
        let cases = [
            PciHostBridge {
                bus_start: 3,
                bus_end: 2,
                ..bridge()
            },
            PciHostBridge {
                ecam_start: 0x1000,
                ..bridge()
            },
            PciHostBridge {
                ecam_start: u64::MAX - (1 << 20) + 1,
                ..bridge()
            },
            PciHostBridge {
                mmio32: window(0xf000_0000, 0x2000_0000),
                ..bridge()
            },
            PciHostBridge {
                mmio32: window(0, 1 << 32),
                ..bridge()
            },
            PciHostBridge {
                mmio32: window(0xc000_0000, 0),
                ..bridge()
            },
            PciHostBridge {
                mmio64: Some(window(u64::MAX, 2)),
                ..bridge()
            },
            PciHostBridge {
                io: Some(window(0, 0x1_0000)),
                ..bridge()
            },
            PciHostBridge {
                io: Some(window(0xff00, 0x200)),
                ..bridge()
            },
        ];
        for case in cases {
            let err = aml(&case).unwrap_err();
            assert!(
                matches!(
                    err,
                    AcpiError::PciBusRange { .. }
                        | AcpiError::PciEcam { .. }
                        | AcpiError::PciWindow { .. }
                ),
                "{case:?}: {err}"
            );
        }
    }
}
