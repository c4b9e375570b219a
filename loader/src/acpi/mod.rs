//! ACPI tables for the guest: this module owns the RSDP, XSDT and their
//! placement in `[layout::ACPI_START, layout::ACPI_END)`; the submodules build
//! the FADT (`fadt`), MADT (`madt`), DSDT (`dsdt`) and, for PCI host
//! bridges, the MCFG and the bridges' DSDT devices (`pci`); the power
//! button's Generic Event Device (`ged`).
//!
//! The platform is hardware-reduced ACPI (no PM1 blocks, no SCI, no FACS):
//! power-off and reset go through the FADT sleep control/status and reset
//! registers in the PM block at [`layout::ports::ACPI_PM_BASE`].

mod dsdt;
mod fadt;
mod ged;
mod madt;
mod pci;

use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

use crate::layout;

/// The machine the ACPI tables describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiPlatform {
    /// Number of vCPUs; vCPU `i` has local APIC ID and ACPI processor UID `i`.
    pub cpus: u8,
    /// Highest vCPU count: the ones from `cpus` up to it are described as
    /// present but not enabled (online-capable, for hotplug); at most
    /// `cpus` means none.
    pub max_cpus: u8,
    /// The platform has dual 8259 PICs (MADT flag PCAT_COMPAT).
    pub legacy_pic: bool,
    /// Platform devices declared in the DSDT, in this order.
    pub devices: Vec<PlatformDevice>,
}

/// A device the DSDT declares under `\_SB`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlatformDevice {
    /// 8250/16550 UART (`PNP0501`, 8 ports); the n-th one is `COMn`, `_UID` n.
    Serial {
        /// First I/O port.
        port: u16,
        /// GSI (IOAPIC input) of its interrupt.
        irq: u32,
    },
    /// CMOS real-time clock (`PNP0B00`, 2 ports).
    Rtc {
        /// Index port (the data port follows it).
        port: u16,
        /// GSI (IOAPIC input) of its interrupt.
        irq: u32,
    },
    /// The hardware-reduced PM block (sleep control/status, reset), reserved
    /// as a motherboard resource (`PNP0C02`) so nothing else claims it.
    PowerManagement {
        /// First I/O port.
        base: u16,
        /// Number of ports (1-255).
        len: u16,
    },
    /// A PCI Express host bridge: an MCFG entry, a `PNP0A08` device (`_CID`
    /// `PNP0A03`) named `PCIn` and a `PNP0C02` device reserving its ECAM.
    PciHostBridge(PciHostBridge),
    /// A hardware-reduced ACPI power button: a Generic Event Device
    /// (`GED0`, `ACPI0013`) whose `_EVT` reads the event register and
    /// notifies the `PNP0C0C` device `PWRB` when bit 0 is set.
    PowerButton {
        /// I/O port of the one-byte event register (read-to-clear).
        event_port: u16,
        /// GSI (IOAPIC input) of the GED interrupt, edge-triggered.
        gsi: u32,
    },
}

/// A range of guest-physical addresses or I/O ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddressRange {
    /// First address.
    pub start: u64,
    /// Length; must not be 0.
    pub size: u64,
}

/// A PCI Express host bridge with memory-mapped (ECAM) configuration space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciHostBridge {
    /// PCI segment group (`_SEG`, MCFG segment).
    pub segment: u16,
    /// ECAM address of bus 0 of the segment, 1 MiB aligned (MCFG semantics:
    /// bus `b` is at `ecam_start + (b << 20)`), e.g. [`layout::PCI_ECAM_START`].
    pub ecam_start: u64,
    /// First bus number decoded (`_BBN`).
    pub bus_start: u8,
    /// Last bus number decoded.
    pub bus_end: u8,
    /// Window for 32-bit memory BARs; must end at or below 4 GiB.
    pub mmio32: AddressRange,
    /// Window for 64-bit memory BARs, if any.
    pub mmio64: Option<AddressRange>,
    /// Window for I/O BARs, if any; must end at or below port 0xffff.
    pub io: Option<AddressRange>,
}

/// Errors building or writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The MADT needs at least one processor.
    #[error("the vm needs at least one vcpu to describe in the madt")]
    NoCpus,
    /// More devices of one kind than AML names are available for.
    #[error("too many {kind} devices: at most {max} are supported")]
    TooManyDevices {
        /// Kind of device.
        kind: &'static str,
        /// Largest supported count.
        max: u32,
    },
    /// A device's I/O ports run past port 0xffff.
    #[error("{kind} at port {port:#x} with {len} ports runs past the 16-bit i/o space")]
    PortRange {
        /// Kind of device.
        kind: &'static str,
        /// First port.
        port: u16,
        /// Number of ports.
        len: u32,
    },
    /// A device's interrupt is not an input of the IOAPIC.
    #[error("{kind} irq {irq} is not an ioapic input (0-{max})")]
    Irq {
        /// Kind of device.
        kind: &'static str,
        /// The requested GSI.
        irq: u32,
        /// Highest valid GSI.
        max: u32,
    },
    /// A PCI host bridge's bus range is reversed.
    #[error("pci bus range {start}-{end} is empty")]
    PciBusRange {
        /// First bus.
        start: u8,
        /// Last bus.
        end: u8,
    },
    /// A PCI host bridge's ECAM base is misaligned or its window overflows.
    #[error("pci ecam base {ecam_start:#x} must be 1 MiB aligned with room for bus {bus_end}")]
    PciEcam {
        /// The ECAM base.
        ecam_start: u64,
        /// Last bus.
        bus_end: u8,
    },
    /// A PCI host bridge window is empty or leaves its address space.
    #[error("pci {window} window at {start:#x} with size {size:#x} is empty or too large")]
    PciWindow {
        /// Which window ("32-bit memory", "64-bit memory", "i/o").
        window: &'static str,
        /// Start of the window.
        start: u64,
        /// Size of the window.
        size: u64,
    },
    /// The PM block length cannot be described by an I/O descriptor.
    #[error("power management block at port {base:#x} must be 1 to 255 ports long, not {len}")]
    PmBlockLength {
        /// First port.
        base: u16,
        /// Requested length.
        len: u16,
    },
    /// The tables do not fit in the ACPI area.
    #[error("acpi tables need {needed} bytes but the acpi area at {start:#x} holds {available}")]
    TooLarge {
        /// Bytes needed, alignment padding included.
        needed: u64,
        /// Size of the area.
        available: u64,
        /// Start of the area.
        start: u64,
    },
    /// Writing a table into guest memory failed.
    #[error("cannot write the {table} table to guest memory at {addr:#x}")]
    Write {
        /// Signature of the table.
        table: String,
        /// Guest-physical address it was written at.
        addr: u64,
        /// The guest memory error.
        #[source]
        source: GuestMemoryError,
    },
}

/// OEM ID of every table.
const OEM_ID: [u8; 6] = *b"ZVMM  ";
/// OEM revision of every table.
const OEM_REVISION: u32 = 1;
/// Alignment of every table in guest memory.
const TABLE_ALIGN: u64 = 16;
/// Length of an ACPI table header.
const HEADER_LEN: usize = 36;

/// OEM table ID of the table with `signature`: "ZVMM" then the signature.
fn oem_table_id(signature: &[u8; 4]) -> [u8; 8] {
    let mut id = *b"ZVMM____";
    id[4..].copy_from_slice(signature);
    id
}

/// Serializes an AML object or table into bytes.
fn aml_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

/// A table with its final address.
#[derive(Debug)]
struct PlacedTable {
    /// Guest-physical address.
    addr: u64,
    /// The whole table, checksummed.
    bytes: Vec<u8>,
}

impl PlacedTable {
    /// Printable signature, for errors.
    fn signature(&self) -> String {
        let len = if self.bytes.starts_with(b"RSD PTR ") {
            8
        } else {
            4
        };
        String::from_utf8_lossy(&self.bytes[..len.min(self.bytes.len())]).into_owned()
    }
}

/// Hands out aligned addresses, one table after the other.
struct Placement {
    next: u64,
}

impl Placement {
    /// Reserves `len` bytes at the next aligned address and returns it.
    fn reserve(&mut self, len: usize) -> u64 {
        let addr = self.next.next_multiple_of(TABLE_ALIGN);
        self.next = addr + len as u64;
        addr
    }
}

/// Builds every table and assigns addresses in `[start, end)`: the RSDP at
/// `start`, then XSDT, FADT, DSDT, MADT and MCFG (if there is PCI).
fn build_tables(
    platform: &AcpiPlatform,
    start: u64,
    end: u64,
) -> Result<Vec<PlacedTable>, AcpiError> {
    let dsdt = dsdt::build(&platform.devices)?;
    let madt = madt::build(platform.cpus, platform.max_cpus, platform.legacy_pic)?;
    let extra: Vec<Vec<u8>> = pci::mcfg(&platform.devices).into_iter().collect();
    let xsdt_entries = 2 + extra.len();

    let mut placement = Placement { next: start };
    let rsdp_addr = placement.reserve(Rsdp::len());
    let xsdt_addr = placement.reserve(HEADER_LEN + 8 * xsdt_entries);
    let fadt_addr = placement.reserve(fadt::len());
    let dsdt_addr = placement.reserve(dsdt.len());
    let madt_addr = placement.reserve(madt.len());
    let extra_addrs: Vec<u64> = extra.iter().map(|t| placement.reserve(t.len())).collect();
    if placement.next > end {
        return Err(AcpiError::TooLarge {
            needed: placement.next - start,
            available: end - start,
            start,
        });
    }

    let mut xsdt = XSDT::new(OEM_ID, oem_table_id(b"XSDT"), OEM_REVISION);
    for addr in [fadt_addr, madt_addr].iter().chain(&extra_addrs) {
        xsdt.add_entry(*addr);
    }
    let placed = |addr, bytes| PlacedTable { addr, bytes };
    let mut tables = vec![
        placed(rsdp_addr, aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr))),
        placed(xsdt_addr, aml_bytes(&xsdt)),
        placed(fadt_addr, fadt::build(dsdt_addr)),
        placed(dsdt_addr, dsdt),
        placed(madt_addr, madt),
    ];
    tables.extend(
        extra_addrs
            .into_iter()
            .zip(extra)
            .map(|(a, t)| placed(a, t)),
    );
    Ok(tables)
}

/// Builds the ACPI tables for `platform` and writes them into `mem` at
/// [`layout::ACPI_START`]; returns the address of the RSDP (for the Linux
/// zero page's `acpi_rsdp_addr` or PVH's `rsdp_paddr`).
pub fn create_acpi_tables<M: GuestMemory>(
    mem: &M,
    platform: &AcpiPlatform,
) -> Result<GuestAddress, AcpiError> {
    let tables = build_tables(platform, layout::ACPI_START, layout::ACPI_END)?;
    for table in &tables {
        mem.write_slice(&table.bytes, GuestAddress(table.addr))
            .map_err(|source| AcpiError::Write {
                table: table.signature(),
                addr: table.addr,
                source,
            })?;
    }
    Ok(GuestAddress(layout::ACPI_START))
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::layout::ports;

    /// zvmm's legacy devices (COM1, RTC, PM block), shared by the table
    /// tests.
    pub(super) fn legacy_devices() -> Vec<PlatformDevice> {
        vec![
            PlatformDevice::Serial {
                port: ports::COM1,
                irq: ports::COM1_IRQ,
            },
            PlatformDevice::Rtc {
                port: ports::CMOS,
                irq: ports::CMOS_IRQ,
            },
            PlatformDevice::PowerManagement {
                base: ports::ACPI_PM_BASE,
                len: ports::ACPI_PM_LEN,
            },
        ]
    }

    pub(super) fn platform(cpus: u8) -> AcpiPlatform {
        AcpiPlatform {
            cpus,
            max_cpus: cpus,
            legacy_pic: true,
            devices: legacy_devices(),
        }
    }

    /// `platform(cpus)` plus a PCI host bridge over the whole ECAM window.
    fn platform_with_pci(cpus: u8) -> AcpiPlatform {
        let mut platform = platform(cpus);
        let window = |start, size| AddressRange { start, size };
        platform
            .devices
            .push(PlatformDevice::PciHostBridge(PciHostBridge {
                segment: 0,
                ecam_start: layout::PCI_ECAM_START,
                bus_start: 0,
                bus_end: 255,
                mmio32: window(layout::PCI_MMIO32_START, layout::PCI_MMIO32_SIZE),
                mmio64: Some(window(layout::PCI_MMIO64_ALIGN, layout::PCI_MMIO64_SIZE)),
                io: Some(window(0x1000, 0xf000)),
            }));
        platform
    }

    /// Guest memory covering the first MiB, where the ACPI area is.
    fn low_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), layout::HIGH_RAM_START as usize)]).unwrap()
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
        bytes
    }

    fn u32_at(bytes: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], offset: usize) -> u64 {
        u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    /// Reads the SDT at `addr`, checking its length field and checksum.
    fn read_sdt(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let len = u32_at(&read(mem, addr, HEADER_LEN), 4) as usize;
        assert!(len >= HEADER_LEN, "table at {addr:#x} has length {len}");
        let table = read(mem, addr, len);
        assert_eq!(sum(&table), 0, "checksum of table at {addr:#x}");
        table
    }

    /// Follows RSDP -> XSDT -> tables (and FADT -> DSDT) and returns every
    /// table with its address, RSDP first, after checking checksums.
    fn walk_tables(mem: &GuestMemoryMmap, rsdp_addr: GuestAddress) -> Vec<(u64, Vec<u8>)> {
        let rsdp = read(mem, rsdp_addr.0, 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp[15], 2, "rsdp revision");
        assert_eq!(sum(&rsdp[..20]), 0, "rsdp checksum");
        assert_eq!(u32_at(&rsdp, 20), 36, "rsdp length");
        assert_eq!(sum(&rsdp), 0, "rsdp extended checksum");
        let xsdt_addr = u64_at(&rsdp, 24);
        let xsdt = read_sdt(mem, xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        let mut tables = vec![(rsdp_addr.0, rsdp), (xsdt_addr, xsdt.clone())];
        for entry in xsdt[HEADER_LEN..].chunks(8) {
            let addr = u64_at(entry, 0);
            let table = read_sdt(mem, addr);
            if &table[..4] == b"FACP" {
                let dsdt_addr = u64_at(&table, 140);
                tables.push((dsdt_addr, read_sdt(mem, dsdt_addr)));
            }
            tables.push((addr, table));
        }
        tables
    }

    fn signatures(tables: &[(u64, Vec<u8>)]) -> Vec<String> {
        let sig = |t: &[u8]| String::from_utf8_lossy(&t[..4]).into_owned();
        tables.iter().skip(1).map(|(_, t)| sig(t)).collect()
    }

    #[test]
    fn rsdp_leads_to_every_table() {
        let mem = low_memory();
        let rsdp = create_acpi_tables(&mem, &platform(2)).unwrap();
        assert_eq!(rsdp, GuestAddress(layout::ACPI_START));
        let tables = walk_tables(&mem, rsdp);
        assert_eq!(signatures(&tables), ["XSDT", "DSDT", "FACP", "APIC"]);
    }

    #[test]
    fn pci_adds_the_mcfg() {
        let mem = low_memory();
        let rsdp = create_acpi_tables(&mem, &platform_with_pci(2)).unwrap();
        let tables = walk_tables(&mem, rsdp);
        assert_eq!(
            signatures(&tables),
            ["XSDT", "DSDT", "FACP", "APIC", "MCFG"]
        );
    }

    #[test]
    fn tables_are_aligned_disjoint_and_inside_the_acpi_area() {
        let mem = low_memory();
        let rsdp = create_acpi_tables(&mem, &platform_with_pci(255)).unwrap();
        let mut ranges: Vec<_> = walk_tables(&mem, rsdp)
            .iter()
            .map(|(addr, t)| (*addr, *addr + t.len() as u64))
            .collect();
        ranges.sort();
        for (start, end) in &ranges {
            assert_eq!(start % TABLE_ALIGN, 0, "{start:#x}");
            assert!(
                *start >= layout::ACPI_START && *end <= layout::ACPI_END,
                "{start:#x}"
            );
        }
        for pair in ranges.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "{pair:x?}");
        }
    }

    #[test]
    fn max_cpus_fit() {
        let tables =
            build_tables(&platform(u8::MAX), layout::ACPI_START, layout::ACPI_END).unwrap();
        let madt = tables
            .iter()
            .find(|t| t.bytes.starts_with(b"APIC"))
            .unwrap();
        let lapics = madt.bytes[HEADER_LEN + 8..]
            .chunks(8)
            .take_while(|e| e[0] == 0)
            .count();
        assert_eq!(lapics, 255);
    }

    #[test]
    fn tables_that_do_not_fit_are_an_error() {
        let start = layout::ACPI_START;
        let small = build_tables(&platform(1), start, start + 512).unwrap_err();
        match small {
            AcpiError::TooLarge {
                needed, available, ..
            } => assert!(needed > 512 && available == 512, "{needed} {available}"),
            other => panic!("unexpected {other}"),
        }
        assert!(build_tables(&platform(1), start, start + 4096).is_ok());
    }

    #[test]
    fn missing_guest_memory_names_the_table() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let err = create_acpi_tables(&mem, &platform(1)).unwrap_err();
        assert!(err.to_string().contains("RSD PTR"), "{err}");
    }

    #[test]
    fn zero_cpus_is_an_error() {
        let err = create_acpi_tables(&low_memory(), &platform(0)).unwrap_err();
        assert!(matches!(err, AcpiError::NoCpus));
    }

    /// Runs the ACPICA `tool` (iasl, acpiexec) with `args` in `dir`,
    /// panicking with its output if it fails and with install instructions
    /// if it is missing.
    fn acpica(tool: &str, dir: &Path, args: &[&str]) -> String {
        let output = Command::new(tool)
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {tool} ({e}): install acpica-tools"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "{tool} {args:?} failed:\n{text}");
        text
    }

    pub(super) fn iasl(dir: &Path, args: &[&str]) -> String {
        acpica("iasl", dir, args)
    }

    /// Writes every table but the RSDP to `dir` as `<signature>.dat`
    /// (lowercase) and returns the (name, table) pairs.
    pub(super) fn dump_tables(dir: &Path, platform: &AcpiPlatform) -> Vec<(String, Vec<u8>)> {
        let mem = low_memory();
        let rsdp = create_acpi_tables(&mem, platform).unwrap();
        let mut dumped = Vec::new();
        for (_, table) in walk_tables(&mem, rsdp).into_iter().skip(1) {
            let name = String::from_utf8_lossy(&table[..4]).to_lowercase();
            std::fs::write(dir.join(format!("{name}.dat")), &table).unwrap();
            dumped.push((name, table));
        }
        dumped
    }

    /// A fresh scratch directory for this test process.
    pub(super) fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("zvmm-acpi-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn iasl_disassembles_every_table() {
        let dir = scratch_dir("iasl");
        let mut disassembly = std::collections::BTreeMap::new();
        for (name, _) in dump_tables(&dir, &platform_with_pci(4)) {
            let log = iasl(&dir, &["-d", &format!("{name}.dat")]);
            assert!(!log.contains("Error"), "iasl -d {name}:\n{log}");
            let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap();
            disassembly.insert(name, dsl);
        }
        let dsdt = &disassembly["dsdt"];
        let expected_dsdt = [
            "_S5_",
            "0x05",
            "PNP0501",
            "PNP0B00",
            "PNP0C02",
            "0x03F8",
            "PNP0A08",
            "PNP0A03",
            "WordBusNumber",
            "WordIO",
            "DWordMemory",
            "QWordMemory",
            "Memory32Fixed",
        ];
        for expected in expected_dsdt {
            assert!(dsdt.contains(expected), "{expected} missing from:\n{dsdt}");
        }
        let facp = &disassembly["facp"];
        assert!(facp.contains("Hardware Reduced (V5) : 1"), "{facp}");
        assert!(facp.contains("0000000000000602"), "reset register:\n{facp}");
        let apic = &disassembly["apic"];
        assert_eq!(apic.matches("Processor Local APIC").count(), 4, "{apic}");
        assert!(apic.contains("I/O APIC"), "{apic}");
        let mcfg = &disassembly["mcfg"];
        assert!(mcfg.contains("Base Address : 00000000E0000000"), "{mcfg}");
        // The disassembled DSDT must compile back without errors.
        let log = iasl(&dir, &["-p", "recompiled", "dsdt.dsl"]);
        assert!(log.contains("0 Errors"), "{log}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The power button's GED disassembles as intended, compiles back, and
    /// ACPICA runs its `_EVT` (reading the event register).
    #[test]
    fn power_button_ged_disassembles_and_its_evt_runs() {
        let dir = scratch_dir("ged");
        let mut platform = platform_with_pci(1);
        platform.devices.push(PlatformDevice::PowerButton {
            event_port: layout::GED_EVENT_PORT,
            gsi: layout::GED_GSI,
        });
        let names: Vec<String> = dump_tables(&dir, &platform)
            .into_iter()
            .filter(|(name, _)| name != "xsdt")
            .map(|(name, _)| format!("{name}.dat"))
            .collect();
        let log = iasl(&dir, &["-d", "dsdt.dat"]);
        assert!(!log.contains("Error"), "{log}");
        let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap();
        let expected = [
            "Device (GED0)".to_string(),
            "Name (_HID, \"ACPI0013\"".to_string(),
            format!("Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )\n                {{\n                    0x{:08X},", layout::GED_GSI),
            format!("OperationRegion (GDST, SystemIO, 0x{:04X}, One)", layout::GED_EVENT_PORT),
            "Method (_EVT, 1, Serialized)".to_string(),
            "Notify (\\_SB.PWRB, 0x80)".to_string(),
            "Device (PWRB)".to_string(),
            "EisaId (\"PNP0C0C\")".to_string(),
        ];
        for expected in &expected {
            assert!(
                dsl.contains(expected.as_str()),
                "{expected} missing from:\n{dsl}"
            );
        }
        let log = iasl(&dir, &["-p", "recompiled", "dsdt.dsl"]);
        assert!(log.contains("0 Errors"), "{log}");
        let mut args = vec!["-b", "execute \\_SB.GED0._EVT 5"];
        args.extend(names.iter().map(String::as_str));
        let log = acpica("acpiexec", &dir, &args);
        assert!(
            log.contains("No object was returned from evaluation of \\_SB.GED0._EVT"),
            "{log}"
        );
        assert!(!log.contains("AE_"), "{log}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// ACPICA's own sleep code (what Linux runs for poweroff) must accept the
    /// hardware-reduced FADT and write `(SLP_TYP << 2) | SLP_EN` to the sleep
    /// control register.
    #[test]
    fn acpiexec_enters_s5_through_the_sleep_control_register() {
        let dir = scratch_dir("acpiexec");
        let names: Vec<String> = dump_tables(&dir, &platform_with_pci(2))
            .into_iter()
            .filter(|(name, _)| name != "xsdt")
            .map(|(name, _)| format!("{name}.dat"))
            .collect();
        let mut args = vec!["-x", "0xffffffff", "-b", "sleep 5"];
        args.extend(names.iter().map(String::as_str));
        let log = acpica("acpiexec", &dir, &args);
        let slp_typ = ports::ACPI_S5_SLP_TYP;
        assert!(log.contains(&format!("Sleep-A: {slp_typ:02X}")), "{log}");
        let value = format!("Wrote: {:016X}", (u64::from(slp_typ) << 2) | 0x20);
        let register = format!("to {:016X} (SystemIO)", ports::ACPI_SLEEP_CONTROL);
        let wrote = log
            .lines()
            .any(|line| line.contains(&value) && line.contains(&register));
        assert!(wrote, "no {value} {register} in acpiexec output");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
