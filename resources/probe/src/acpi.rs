//! ACPI discovery and report: RSDP, every table of the XSDT/RSDT plus the
//! DSDT and FACS named by the FADT (with checksums), and the MADT's CPUs and
//! IOAPICs.

use crate::boot::BootInfo;
use crate::phys::{self, u32_at, u64_at, u8_at, BusyRanges};
use crate::report;
use crate::serial::Quoted;

/// Size of the common system description table header.
const HEADER_LEN: usize = 36;
/// Largest table length the probe believes.
const MAX_TABLE_LEN: u32 = 16 << 20;
/// Most CPUs the probe tracks from the MADT.
pub const MAX_CPUS: usize = 64;
/// Default local APIC base.
const DEFAULT_LAPIC: u64 = 0xfee0_0000;

/// A validated system description table in memory.
#[derive(Clone, Copy)]
pub struct Table {
    /// Physical address.
    pub addr: u64,
    /// The whole table (header included).
    pub bytes: &'static [u8],
}

impl Table {
    /// Four-character signature.
    pub fn signature(&self) -> &'static [u8] {
        self.bytes.get(..4).unwrap_or(&[])
    }

    /// Table body after the common header.
    pub fn body(&self) -> &'static [u8] {
        self.bytes.get(HEADER_LEN..).unwrap_or(&[])
    }
}

/// Enabled processors and the local APIC base from the MADT.
pub struct Cpus {
    /// APIC IDs of enabled processors, in MADT order.
    pub apic_ids: [u32; MAX_CPUS],
    /// Number of valid entries in `apic_ids`.
    pub count: usize,
    /// Physical base of the local APIC registers.
    pub lapic_addr: u64,
}

impl Cpus {
    /// The enabled processors' APIC IDs.
    pub fn ids(&self) -> &[u32] {
        &self.apic_ids[..self.count]
    }
}

/// What the rest of the probe needs from ACPI.
pub struct Acpi {
    /// Fixed ACPI description table.
    pub fadt: Option<Table>,
    /// Differentiated system description table (AML).
    pub dsdt: Option<Table>,
    /// CPUs from the MADT.
    pub cpus: Cpus,
    /// PCI Express memory-mapped configuration table (ECAM windows).
    pub mcfg: Option<Table>,
}

/// Finds, checks and reports all ACPI tables; marks them busy.
pub fn discover(boot: &BootInfo, busy: &mut BusyRanges) -> Acpi {
    let mut acpi = Acpi {
        fadt: None,
        dsdt: None,
        cpus: Cpus {
            apic_ids: [0; MAX_CPUS],
            count: 0,
            lapic_addr: DEFAULT_LAPIC,
        },
        mcfg: None,
    };
    let (rsdp, source) = match boot.rsdp {
        Some(addr) => (Some(addr), boot.protocol.info_name()),
        None => (scan_rsdp(), "scan"),
    };
    let Some(rsdp) = rsdp.and_then(|addr| phys::slice(addr, 36).map(|b| (addr, b))) else {
        report!("acpi rsdp none");
        return acpi;
    };
    let root = report_rsdp(rsdp.0, rsdp.1, source, busy);
    let Some((root_addr, entry_size)) = root else {
        return acpi;
    };
    let Some(root) = load_table(root_addr, busy) else {
        return acpi;
    };
    let mut madt = None;
    for entry in root.body().chunks_exact(entry_size) {
        let addr = if entry_size == 8 {
            u64_at(entry, 0)
        } else {
            u64::from(u32_at(entry, 0))
        };
        let Some(table) = load_table(addr, busy) else {
            continue;
        };
        match table.signature() {
            b"FACP" => acpi.fadt = Some(table),
            b"APIC" => madt = Some(table),
            b"MCFG" => acpi.mcfg = Some(table),
            _ => {}
        }
    }
    if let Some(fadt) = acpi.fadt {
        acpi.dsdt = fadt_pointer(fadt, 40, 140).and_then(|addr| load_table(addr, busy));
        if let Some(facs) = fadt_pointer(fadt, 36, 132) {
            report_facs(facs, busy);
        }
    }
    match madt {
        Some(madt) => parse_madt(madt, &mut acpi.cpus),
        None => report!("cpus count=0"),
    }
    acpi
}

/// Scans the BIOS area 0xe0000..0x100000 on 16-byte boundaries.
fn scan_rsdp() -> Option<u64> {
    let area = phys::slice(0xe_0000, 0x2_0000)?;
    (0..area.len().saturating_sub(20))
        .step_by(16)
        .find(|&off| area.get(off..off + 8) == Some(b"RSD PTR ") && sum(&area[off..off + 20]) == 0)
        .map(|off| 0xe_0000 + off as u64)
}

/// Reports the RSDP; returns the root table address and its entry size.
fn report_rsdp(addr: u64, v1: &[u8], source: &str, busy: &mut BusyRanges) -> Option<(u64, usize)> {
    let revision = u8_at(v1, 15);
    let bytes = if revision >= 2 {
        phys::slice(addr, 36).unwrap_or(v1)
    } else {
        v1.get(..20).unwrap_or(v1)
    };
    let ok = v1.get(..8) == Some(b"RSD PTR ")
        && sum(v1.get(..20).unwrap_or(&[1])) == 0
        && (revision < 2 || sum(bytes) == 0);
    busy.add(addr, bytes.len() as u64);
    report!("acpi rsdp_source={source}");
    report!(
        "acpi rsdp={addr:#x} revision={revision} oem={} checksum={}",
        Quoted(v1.get(9..15).unwrap_or(&[])),
        ok_bad(ok)
    );
    let xsdt = u64_at(bytes, 24);
    if revision >= 2 && xsdt != 0 {
        Some((xsdt, 8))
    } else {
        let rsdt = u32_at(v1, 16);
        (rsdt != 0).then_some((u64::from(rsdt), 4))
    }
}

/// Reads, validates and reports the table at `addr`.
fn load_table(addr: u64, busy: &mut BusyRanges) -> Option<Table> {
    let header = phys::slice(addr, HEADER_LEN);
    let len = header.map_or(0, |h| u32_at(h, 4));
    let bytes = if (HEADER_LEN as u32..=MAX_TABLE_LEN).contains(&len) {
        phys::slice(addr, len as usize)
    } else {
        None
    };
    let Some(bytes) = bytes else {
        report!("acpi bad_table addr={addr:#x} len={len}");
        return None;
    };
    let table = Table { addr, bytes };
    busy.add(addr, u64::from(len));
    report!(
        "acpi table={} addr={addr:#x} len={len} checksum={}",
        Signature(table.signature()),
        ok_bad(sum(bytes) == 0)
    );
    Some(table)
}

/// FACS has no checksum: reported with `checksum=none`.
fn report_facs(addr: u64, busy: &mut BusyRanges) {
    let header = phys::slice(addr, 8);
    let len = header.map_or(0, |h| u32_at(h, 4));
    match header {
        Some(h) => {
            busy.add(addr, u64::from(len));
            report!(
                "acpi table={} addr={addr:#x} len={len} checksum=none",
                Signature(&h[..4])
            );
        }
        None => report!("acpi bad_table addr={addr:#x} len=0"),
    }
}

/// A pointer field of the FADT: the 64-bit X_ field when the table is long
/// enough and it is non-zero, else the 32-bit field.
fn fadt_pointer(fadt: Table, off32: usize, off64: usize) -> Option<u64> {
    let wide = if fadt.bytes.len() >= off64 + 8 {
        u64_at(fadt.bytes, off64)
    } else {
        0
    };
    let addr = if wide != 0 {
        wide
    } else {
        u64::from(u32_at(fadt.bytes, off32))
    };
    (addr != 0).then_some(addr)
}

// MADT structure types.
const MADT_LAPIC: u8 = 0;
const MADT_IOAPIC: u8 = 1;
const MADT_LAPIC_OVERRIDE: u8 = 5;
const MADT_X2APIC: u8 = 9;
const MADT_ENABLED: u32 = 1;

fn parse_madt(madt: Table, cpus: &mut Cpus) {
    cpus.lapic_addr = u64::from(u32_at(madt.body(), 0));
    let mut entries = madt.body().get(8..).unwrap_or(&[]);
    while let [kind, len, ..] = *entries {
        let len = usize::from(len);
        let Some(entry) = entries.get(..len).filter(|_| len >= 2) else {
            report!("acpi madt bad_entry type={kind} len={len}");
            break;
        };
        match kind {
            MADT_LAPIC if u32_at(entry, 4) & MADT_ENABLED != 0 => {
                add_cpu(cpus, u32::from(u8_at(entry, 3)))
            }
            MADT_X2APIC if u32_at(entry, 8) & MADT_ENABLED != 0 => add_cpu(cpus, u32_at(entry, 4)),
            MADT_IOAPIC => report!(
                "ioapic id={} addr={:#x} gsi_base={}",
                u8_at(entry, 2),
                u32_at(entry, 4),
                u32_at(entry, 8)
            ),
            MADT_LAPIC_OVERRIDE => cpus.lapic_addr = u64_at(entry, 4),
            _ => {}
        }
        entries = &entries[len..];
    }
    report!("lapic addr={:#x}", cpus.lapic_addr);
    for id in cpus.ids() {
        report!("cpu apic_id={id}");
    }
    report!("cpus count={}", cpus.count);
}

fn add_cpu(cpus: &mut Cpus, apic_id: u32) {
    if let Some(slot) = cpus.apic_ids.get_mut(cpus.count) {
        *slot = apic_id;
        cpus.count += 1;
    } else {
        report!("cpu apic_id={apic_id} ignored reason=too_many");
    }
}

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, &b| acc.wrapping_add(b))
}

fn ok_bad(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "bad"
    }
}

/// A table signature: printable ASCII as is, other bytes as `?`.
struct Signature<'a>(&'a [u8]);

impl core::fmt::Display for Signature<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for &b in self.0 {
            let c = if b.is_ascii_graphic() { b as char } else { '?' };
            core::fmt::Write::write_char(f, c)?;
        }
        Ok(())
    }
}
