//! The MADT ("APIC", revision 5 as in ACPI 6.4): the local APIC address,
//! one enabled Processor Local APIC per vCPU (APIC ID = processor UID =
//! index), then one present-but-not-enabled, online-capable entry per vCPU
//! that may be hotplugged later (up to `max_cpus`), the IOAPIC, the PIT's
//! interrupt source override when it is not identity-mapped
//! ([`layout::PIT_GSI`]) and the LINT1 NMI of all processors.
//!
//! The acpi_tables crate's MADT builder cannot set the PCAT_COMPAT flag nor
//! add overrides or NMI entries, so the entries are encoded here.

use acpi_tables::sdt::Sdt;

use super::{oem_table_id, AcpiError, HEADER_LEN, OEM_ID, OEM_REVISION};
use crate::layout;

/// MADT revision of ACPI 6.3/6.4.
const MADT_REVISION: u8 = 5;
/// Flags: the platform also has dual 8259 PICs (KVM's in-kernel PIC,
/// present only with the full in-kernel irqchip).
const PCAT_COMPAT: u32 = 1;
/// Local APIC address as the 32-bit MADT field.
const LOCAL_APIC_ADDRESS: u32 = layout::APIC_START as u32;
const _: () = assert!(layout::APIC_START <= u32::MAX as u64);
/// IOAPIC address as the 32-bit MADT field.
const IOAPIC_ADDRESS: u32 = layout::IOAPIC_START as u32;
const _: () = assert!(layout::IOAPIC_START <= u32::MAX as u64);
/// IOAPIC ID: 0, what KVM's in-kernel IOAPIC reports after reset (QEMU
/// uses 0 too; the IOAPIC and local APIC ID spaces are separate since xAPIC).
const IOAPIC_ID: u8 = 0;
/// Processor UID meaning "all processors" in NMI entries.
const ALL_PROCESSORS: u8 = 0xff;

/// Entry types.
const TYPE_LOCAL_APIC: u8 = 0;
const TYPE_IO_APIC: u8 = 1;
const TYPE_SOURCE_OVERRIDE: u8 = 2;
const TYPE_LOCAL_APIC_NMI: u8 = 4;

/// Processor Local APIC flag: enabled.
const LOCAL_APIC_ENABLED: u32 = 1;
/// Processor Local APIC flag (MADT revision 5+): not enabled now, but the
/// OS may bring it online later (hotplug).
const LOCAL_APIC_ONLINE_CAPABLE: u32 = 1 << 1;
/// MPS INTI flags: polarity and trigger mode conform to the bus.
const INTI_CONFORMING: u16 = 0;

/// Processor Local APIC entry for processor `uid` with local APIC
/// `apic_id` and `flags`.
fn local_apic(uid: u8, apic_id: u8, flags: u32) -> Vec<u8> {
    let mut entry = vec![TYPE_LOCAL_APIC, 8, uid, apic_id];
    entry.extend_from_slice(&flags.to_le_bytes());
    entry
}

/// I/O APIC entry for the one IOAPIC, GSIs starting at 0.
fn io_apic() -> Vec<u8> {
    let mut entry = vec![TYPE_IO_APIC, 12, IOAPIC_ID, 0];
    entry.extend_from_slice(&IOAPIC_ADDRESS.to_le_bytes());
    entry.extend_from_slice(&0u32.to_le_bytes());
    entry
}

/// Interrupt Source Override of ISA `irq` to `gsi`, bus-conforming flags.
fn source_override(irq: u8, gsi: u32) -> Vec<u8> {
    let mut entry = vec![TYPE_SOURCE_OVERRIDE, 10, 0, irq];
    entry.extend_from_slice(&gsi.to_le_bytes());
    entry.extend_from_slice(&INTI_CONFORMING.to_le_bytes());
    entry
}

/// Local APIC NMI entry: LINT1 of every processor is the NMI input.
fn local_apic_nmi() -> Vec<u8> {
    let mut entry = vec![TYPE_LOCAL_APIC_NMI, 6, ALL_PROCESSORS];
    entry.extend_from_slice(&INTI_CONFORMING.to_le_bytes());
    entry.push(1);
    entry
}

/// Builds the MADT for `cpus` running vCPUs of at most `max_cpus`;
/// `legacy_pic` sets PCAT_COMPAT.
pub(super) fn build(cpus: u8, max_cpus: u8, legacy_pic: bool) -> Result<Vec<u8>, AcpiError> {
    if cpus == 0 {
        return Err(AcpiError::NoCpus);
    }
    let fixed_len = HEADER_LEN as u32 + 8;
    let mut madt = Sdt::new(
        *b"APIC",
        fixed_len,
        MADT_REVISION,
        OEM_ID,
        oem_table_id(b"APIC"),
        OEM_REVISION,
    );
    madt.write_u32(HEADER_LEN, LOCAL_APIC_ADDRESS);
    madt.write_u32(HEADER_LEN + 4, if legacy_pic { PCAT_COMPAT } else { 0 });
    for id in 0..cpus {
        madt.append_slice(&local_apic(id, id, LOCAL_APIC_ENABLED));
    }
    for id in cpus..max_cpus.max(cpus) {
        madt.append_slice(&local_apic(id, id, LOCAL_APIC_ONLINE_CAPABLE));
    }
    madt.append_slice(&io_apic());
    if layout::PIT_GSI != 0 {
        madt.append_slice(&source_override(0, layout::PIT_GSI));
    }
    madt.append_slice(&local_apic_nmi());
    Ok(madt.as_slice().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The (type, body) entries after the fixed part.
    fn entries(madt: &[u8]) -> Vec<(u8, &[u8])> {
        let mut rest = &madt[HEADER_LEN + 8..];
        let mut entries = Vec::new();
        while !rest.is_empty() {
            let len = rest[1] as usize;
            assert!(len >= 2 && len <= rest.len(), "bad entry length {len}");
            entries.push((rest[0], &rest[..len]));
            rest = &rest[len..];
        }
        entries
    }

    #[test]
    fn pcat_compat_only_with_the_legacy_pic() {
        let flags = |madt: &[u8]| u32::from_le_bytes(madt[40..44].try_into().unwrap());
        assert_eq!(flags(&build(1, 1, true).unwrap()), PCAT_COMPAT);
        assert_eq!(flags(&build(1, 1, false).unwrap()), 0);
    }

    #[test]
    fn header_and_checksum() {
        let madt = build(4, 4, true).unwrap();
        assert_eq!(&madt[..4], b"APIC");
        assert_eq!(madt[8], 5);
        assert_eq!(
            u32::from_le_bytes(madt[4..8].try_into().unwrap()) as usize,
            madt.len()
        );
        assert_eq!(madt.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let lapic = u32::from_le_bytes(madt[36..40].try_into().unwrap());
        assert_eq!(u64::from(lapic), layout::APIC_START);
        assert_eq!(
            u32::from_le_bytes(madt[40..44].try_into().unwrap()),
            1,
            "pcat_compat"
        );
    }

    #[test]
    fn one_enabled_local_apic_per_cpu() {
        for cpus in [1u8, 2, 255] {
            let madt = build(cpus, cpus, true).unwrap();
            let lapics: Vec<_> = entries(&madt)
                .into_iter()
                .filter(|(t, _)| *t == TYPE_LOCAL_APIC)
                .map(|(_, e)| e.to_vec())
                .collect();
            assert_eq!(lapics.len(), usize::from(cpus));
            for (i, entry) in lapics.iter().enumerate() {
                assert_eq!(entry, &[0, 8, i as u8, i as u8, 1, 0, 0, 0]);
            }
        }
    }

    #[test]
    fn cpus_above_the_boot_count_are_online_capable_not_enabled() {
        let madt = build(2, 5, false).unwrap();
        let lapics: Vec<Vec<u8>> = entries(&madt)
            .into_iter()
            .filter(|(t, _)| *t == TYPE_LOCAL_APIC)
            .map(|(_, e)| e.to_vec())
            .collect();
        assert_eq!(lapics.len(), 5);
        for (i, entry) in lapics.iter().enumerate() {
            let flags = if i < 2 { 1 } else { 2 };
            assert_eq!(entry, &[0, 8, i as u8, i as u8, flags, 0, 0, 0], "cpu {i}");
        }
        assert_eq!(build(3, 1, false).unwrap(), build(3, 3, false).unwrap());
    }

    #[test]
    fn has_the_ioapic_and_nmi() {
        let madt = build(2, 2, true).unwrap();
        let entries = entries(&madt);
        let ioapics: Vec<_> = entries.iter().filter(|(t, _)| *t == TYPE_IO_APIC).collect();
        assert_eq!(ioapics.len(), 1);
        let ioapic = ioapics[0].1;
        assert_eq!(ioapic[2], IOAPIC_ID);
        assert_eq!(
            u64::from(u32::from_le_bytes(ioapic[4..8].try_into().unwrap())),
            layout::IOAPIC_START
        );
        assert_eq!(&ioapic[8..12], &[0, 0, 0, 0], "gsi base");
        let nmi: Vec<_> = entries
            .iter()
            .filter(|(t, _)| *t == TYPE_LOCAL_APIC_NMI)
            .collect();
        assert_eq!(nmi.len(), 1);
        assert_eq!(nmi[0].1, &[4, 6, 0xff, 0, 0, 1]);
    }

    #[test]
    fn pit_override_matches_the_routing() {
        let madt = build(1, 1, true).unwrap();
        let overrides: Vec<_> = entries(&madt)
            .into_iter()
            .filter(|(t, _)| *t == TYPE_SOURCE_OVERRIDE)
            .map(|(_, e)| e.to_vec())
            .collect();
        if layout::PIT_GSI == 0 {
            assert!(overrides.is_empty(), "identity routing needs no override");
        } else {
            let gsi = layout::PIT_GSI.to_le_bytes();
            assert_eq!(
                overrides,
                vec![vec![2, 10, 0, 0, gsi[0], gsi[1], gsi[2], gsi[3], 0, 0]]
            );
        }
        assert_eq!(source_override(0, 2), vec![2, 10, 0, 0, 2, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn zero_cpus_is_an_error() {
        assert!(matches!(build(0, 0, true), Err(AcpiError::NoCpus)));
    }
}
