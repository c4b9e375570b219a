//! The guest-physical memory map and fixed I/O ports: every address zvmm
//! places something at lives here, and nowhere else.
//!
//! ```text
//! 0x0000_0000  real-mode IVT / BIOS data area (RAM)
//! 0x0000_0500  boot GDT (64-bit Linux boot)
//! 0x0000_0520  boot IDT (empty)
//! 0x0000_6000  PVH start info, then its memory map and module list
//! 0x0000_7000  Linux zero page (boot_params)
//! 0x0000_8ff0  boot stack pointer
//! 0x0000_9000  PML4, PDPTE, PDE (identity map of the first 1 GiB)
//! 0x0002_0000  kernel command line (up to CMDLINE_MAX_SIZE)
//! 0x0009_fc00  EBDA start: [EBDA, 1 MiB) is reserved, not RAM
//! 0x000e_0000  ACPI: RSDP, then XSDT, FADT, DSDT, MADT, ...
//! 0x0010_0000  high RAM: kernel image, then free RAM; initrd at the top of
//!              low RAM, page-aligned
//! 0xc000_0000  32-bit MMIO hole up to 4 GiB:
//!   0xc000_0000  PCI 32-bit MMIO windows (512 MiB, split evenly among
//!                the PCI segments)
//!   0xe000_0000  PCI ECAM area (256 MiB reserved): 1 MiB (bus 0) per
//!                segment, segment S at 0xe000_0000 + S MiB
//!   0xfec0_0000  IOAPIC
//!   0xfee0_0000  local APICs
//!   0xfffb_d000  KVM TSS (3 pages)
//! 0x1_0000_0000 RAM above 4 GiB (whatever did not fit below the hole)
//! then         the memory-hotplug range (`memory.hotplug_size`), from the
//!              end of RAM (at least 4 GiB) rounded up to 128 MiB
//! then         the PCI 64-bit window, 256 GiB aligned (split evenly
//!              among the PCI segments)
//! ```
//!
//! Each PCI segment is its own host bridge: [`pci_segment_windows`] gives
//! its ECAM and its two memory windows. With one segment they are the
//! whole 32-bit and 64-bit windows; with N, each gets the largest power of
//! two that fits N times, so every window is naturally aligned and no two
//! overlap.
//!
//! The hotplug range is reserved by the layout only: it is not in the e820
//! or PVH memory map (RAM plugged there later becomes RAM, which an e820
//! "reserved" entry would forbid) and nothing is placed in it; the PCI
//! 64-bit window, the only thing above RAM, starts past it, so the guest
//! never assigns BARs there.

/// Size of a guest page.
pub const PAGE_SIZE: u64 = 0x1000;

/// Boot GDT for the 64-bit Linux boot protocol.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (left empty) for the 64-bit Linux boot protocol.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, followed by its memory map and module list.
pub const PVH_INFO_START: u64 = 0x6000;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the 64-bit Linux boot protocol.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table (follows the PML4).
pub const PDPTE_START: u64 = 0xa000;
/// Page directory of 2 MiB pages (follows the PDPTE).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Largest command line zvmm passes, terminating NUL included.
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;

/// Start of the extended BIOS data area; low RAM ends here.
pub const EBDA_START: u64 = 0x9_fc00;
/// ACPI tables: the RSDP comes first (Linux also scans 0xe0000-0xfffff).
pub const ACPI_START: u64 = 0xe_0000;
/// End (exclusive) of the ACPI table area.
pub const ACPI_END: u64 = 0x10_0000;
/// First byte of RAM above 1 MiB: where kernels are loaded.
pub const HIGH_RAM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole; RAM stops here and resumes at 4 GiB.
pub const MMIO32_START: u64 = 0xc000_0000;
/// Size of the 32-bit MMIO hole.
pub const MMIO32_SIZE: u64 = FOUR_GIB - MMIO32_START;
/// PCI 32-bit memory window for device BARs.
pub const PCI_MMIO32_START: u64 = MMIO32_START;
/// Size of the PCI 32-bit memory window.
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCI Express enhanced configuration (ECAM) window.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// Size of the ECAM area: 256 MiB, reserved in the memory map; each
/// segment decodes [`PCI_ECAM_SEGMENT_SIZE`] of it.
pub const PCI_ECAM_SIZE: u64 = 0x1000_0000;
/// ECAM bytes of one segment: bus 0 only (32 devices of 8 functions of
/// 4 KiB).
pub const PCI_ECAM_SEGMENT_SIZE: u64 = 1 << 20;
/// Most PCI segments (cloud-hypervisor's limit, `platform.num_pci_segments`).
pub const MAX_PCI_SEGMENTS: u16 = 16;
/// IOAPIC registers (the in-kernel IOAPIC answers here).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers (the in-kernel LAPICs answer here).
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's three-page TSS area (needed on Intel, harmless elsewhere), in the
/// hole below the firmware area.
pub const KVM_TSS_START: u64 = 0xfffb_d000;
/// 4 GiB: where RAM that did not fit below the hole continues.
pub const FOUR_GIB: u64 = 0x1_0000_0000;
/// Start of the 64-bit PCI memory window, placed right above the top of RAM
/// rounded up to this alignment.
pub const PCI_MMIO64_ALIGN: u64 = 0x40_0000_0000;
/// Size of the 64-bit PCI memory window.
pub const PCI_MMIO64_SIZE: u64 = 0x40_0000_0000;
/// Alignment of the memory-hotplug range and granule of its size: Linux's
/// memory block on x86_64.
pub const HOTPLUG_ALIGN: u64 = 128 << 20;
/// Largest memory-hotplug range.
pub const MAX_HOTPLUG_SIZE: u64 = 64 << 40;

// The fixed areas must not overlap; checked when the crate compiles.
const _: () = {
    assert!(PVH_INFO_START + PAGE_SIZE <= ZERO_PAGE_START);
    assert!(ZERO_PAGE_START + PAGE_SIZE <= BOOT_STACK_POINTER);
    assert!(PDE_START + PAGE_SIZE <= CMDLINE_START);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    assert!(ACPI_END <= HIGH_RAM_START);
    assert!(PCI_MMIO32_START + PCI_MMIO32_SIZE <= PCI_ECAM_START);
    assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= IOAPIC_START);
    assert!(MAX_PCI_SEGMENTS as u64 * PCI_ECAM_SEGMENT_SIZE <= PCI_ECAM_SIZE);
    assert!(APIC_START < KVM_TSS_START);
};

/// Fixed I/O ports of the platform devices.
pub mod ports {
    /// PCI configuration mechanism #1: address at 0xcf8, data at 0xcfc
    /// (8 ports).
    pub const PCI_CONFIG: u16 = 0xcf8;
    /// COM1 8250 UART (8 ports).
    pub const COM1: u16 = 0x3f8;
    /// COM1's ISA interrupt line.
    pub const COM1_IRQ: u32 = 4;
    /// CMOS/RTC index and data ports (2 ports).
    pub const CMOS: u16 = 0x70;
    /// CMOS/RTC interrupt line.
    pub const CMOS_IRQ: u32 = 8;
    /// i8042 data port.
    pub const I8042_DATA: u16 = 0x60;
    /// i8042 command/status port; writing 0xfe resets the machine.
    pub const I8042_COMMAND: u16 = 0x64;
    /// POST diagnostic port, ignored.
    pub const POST_CODE: u16 = 0x80;
    /// ACPI hardware-reduced power management block (3 ports):
    /// +0 sleep control, +1 sleep status, +2 reset register.
    pub const ACPI_PM_BASE: u16 = 0x600;
    /// Sleep control register (FADT SLEEP_CONTROL_REG).
    pub const ACPI_SLEEP_CONTROL: u16 = ACPI_PM_BASE;
    /// Sleep status register (FADT SLEEP_STATUS_REG).
    pub const ACPI_SLEEP_STATUS: u16 = ACPI_PM_BASE + 1;
    /// Reset register (FADT RESET_REG).
    pub const ACPI_RESET: u16 = ACPI_PM_BASE + 2;
    /// Value the guest writes to the reset register to reset.
    pub const ACPI_RESET_VALUE: u8 = 0x1;
    /// Number of ports in the ACPI PM block.
    pub const ACPI_PM_LEN: u16 = 3;
    /// SLP_TYP value that `_S5_` advertises: soft-off.
    pub const ACPI_S5_SLP_TYP: u8 = 5;
}

/// One range of the guest's physical memory map, as reported to the guest
/// (e820 / PVH memory map).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRange {
    /// First guest-physical address.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
    /// What the range is.
    pub kind: MemoryKind,
}

/// Type of a memory-map range, with e820 numbering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MemoryKind {
    /// Usable RAM.
    Ram = 1,
    /// Reserved: not RAM and not to be touched.
    Reserved = 2,
    /// ACPI tables, reclaimable after they are parsed.
    Acpi = 3,
}

/// The RAM regions backing `ram_size` bytes of guest memory: below the
/// 32-bit hole first, the remainder from 4 GiB.
pub fn ram_regions(ram_size: u64) -> Vec<(u64, u64)> {
    let low = ram_size.min(MMIO32_START);
    let mut regions = vec![(0, low)];
    if ram_size > low {
        regions.push((FOUR_GIB, ram_size - low));
    }
    regions
}

/// Top (exclusive) of the RAM below the 32-bit MMIO hole.
pub fn low_ram_end(ram_size: u64) -> u64 {
    ram_size.min(MMIO32_START)
}

/// First address past all RAM.
pub fn ram_end(ram_size: u64) -> u64 {
    match ram_regions(ram_size).last() {
        Some(&(start, size)) => start + size,
        None => 0,
    }
}

/// Start of the 64-bit PCI MMIO window: the first aligned address above RAM.
pub fn pci_mmio64_start(ram_size: u64) -> u64 {
    pci_mmio64_start_above(ram_size, 0)
}

/// The memory-hotplug range `(start, size)` kept free for `hotplug_size`
/// bytes: from the end of RAM, or 4 GiB when RAM ends below the hole,
/// aligned to [`HOTPLUG_ALIGN`]. `None` without hotplug.
pub fn hotplug_range(ram_size: u64, hotplug_size: u64) -> Option<(u64, u64)> {
    let start = ram_end(ram_size)
        .max(FOUR_GIB)
        .next_multiple_of(HOTPLUG_ALIGN);
    (hotplug_size > 0).then_some((start, hotplug_size))
}

/// Start of the 64-bit PCI MMIO window: the first aligned address above
/// RAM and the memory-hotplug range.
pub fn pci_mmio64_start_above(ram_size: u64, hotplug_size: u64) -> u64 {
    let end = match hotplug_range(ram_size, hotplug_size) {
        Some((start, size)) => start + size,
        None => ram_end(ram_size).max(FOUR_GIB),
    };
    end.next_multiple_of(PCI_MMIO64_ALIGN)
}

/// One PCI segment's address windows: `(start, size)` each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciSegmentWindows {
    /// ECAM of its bus 0 ([`PCI_ECAM_SEGMENT_SIZE`] bytes).
    pub ecam: (u64, u64),
    /// Its share of the 32-bit window, below 4 GiB.
    pub mmio32: (u64, u64),
    /// Its share of the 64-bit window.
    pub mmio64: (u64, u64),
}

/// The windows of `segment` of `segments` (1..=[`MAX_PCI_SEGMENTS`]) for a
/// guest with `ram_size` bytes of RAM and `hotplug_size` bytes of hotplug
/// range; `None` for a segment that does not exist.
pub fn pci_segment_windows(
    segment: u16,
    segments: u16,
    ram_size: u64,
    hotplug_size: u64,
) -> Option<PciSegmentWindows> {
    if segment >= segments || segments > MAX_PCI_SEGMENTS {
        return None;
    }
    let share = |size: u64| prev_power_of_two(size / u64::from(segments));
    let (mmio32_size, mmio64_size) = (share(PCI_MMIO32_SIZE), share(PCI_MMIO64_SIZE));
    let index = u64::from(segment);
    let mmio64_start = pci_mmio64_start_above(ram_size, hotplug_size);
    Some(PciSegmentWindows {
        ecam: (
            PCI_ECAM_START + index * PCI_ECAM_SEGMENT_SIZE,
            PCI_ECAM_SEGMENT_SIZE,
        ),
        mmio32: (PCI_MMIO32_START + index * mmio32_size, mmio32_size),
        mmio64: (mmio64_start + index * mmio64_size, mmio64_size),
    })
}

/// The largest power of two at most `value` (`value` > 0).
fn prev_power_of_two(value: u64) -> u64 {
    1 << (63 - value.leading_zeros())
}

/// The memory map the guest is told about (e820 on the Linux boot protocol,
/// the PVH memory map otherwise), sorted by address.
pub fn memory_map(ram_size: u64) -> Vec<MemoryRange> {
    let low_end = low_ram_end(ram_size);
    let mut map = vec![
        MemoryRange {
            start: 0,
            size: EBDA_START,
            kind: MemoryKind::Ram,
        },
        MemoryRange {
            start: EBDA_START,
            size: ACPI_START - EBDA_START,
            kind: MemoryKind::Reserved,
        },
        MemoryRange {
            start: ACPI_START,
            size: ACPI_END - ACPI_START,
            kind: MemoryKind::Acpi,
        },
    ];
    if low_end > HIGH_RAM_START {
        map.push(MemoryRange {
            start: HIGH_RAM_START,
            size: low_end - HIGH_RAM_START,
            kind: MemoryKind::Ram,
        });
    }
    map.push(MemoryRange {
        start: PCI_ECAM_START,
        size: PCI_ECAM_SIZE,
        kind: MemoryKind::Reserved,
    });
    if let Some(&(start, size)) = ram_regions(ram_size).get(1) {
        map.push(MemoryRange {
            start,
            size,
            kind: MemoryKind::Ram,
        });
    }
    map
}

/// Number of inputs of the in-kernel IOAPIC (GSIs 0-23).
pub const IOAPIC_NUM_PINS: u32 = 24;
/// IOAPIC input (GSI) the i8254 PIT, ISA IRQ 0, is delivered on. KVM's
/// default GSI routing (in effect unless the VMM calls `KVM_SET_GSI_ROUTING`)
/// wires GSI n to IOAPIC pin n, so the PIT is on pin 0. QEMU instead routes
/// GSI 0 to pin 2; a VMM doing that sets 2 here and the MADT then carries an
/// IRQ0 -> GSI 2 interrupt source override.
pub const PIT_GSI: u32 = 0;

/// ACPI Generic Event Device (`ACPI0013`) event register: one byte at this
/// port, bit 0 = power button pressed; reading returns and clears the
/// pending bits.
pub const GED_EVENT_PORT: u16 = 0x610;
/// Number of ports of the GED event register.
pub const GED_EVENT_LEN: u16 = 1;
/// IOAPIC input (GSI) of the GED interrupt, edge-triggered, active high:
/// ISA line 5, which no other device here uses.
pub const GED_GSI: u32 = 5;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_no_high_ram() {
        assert_eq!(ram_regions(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(ram_end(512 << 20), 512 << 20);
    }

    #[test]
    fn large_guest_is_split_around_the_hole() {
        let regions = ram_regions(4 << 30);
        assert_eq!(
            regions,
            vec![(0, MMIO32_START), (FOUR_GIB, (4 << 30) - MMIO32_START)]
        );
        assert_eq!(ram_end(4 << 30), FOUR_GIB + (1 << 30));
    }

    #[test]
    fn memory_map_is_sorted_and_disjoint() {
        for size in [64u64 << 20, 3 << 30, 8 << 30] {
            let map = memory_map(size);
            for pair in map.windows(2) {
                assert!(pair[0].start + pair[0].size <= pair[1].start, "{pair:?}");
            }
            let ram: u64 = map
                .iter()
                .filter(|r| r.kind == MemoryKind::Ram)
                .map(|r| r.size)
                .sum();
            assert_eq!(ram, size - (HIGH_RAM_START - EBDA_START));
        }
    }

    #[test]
    fn hotplug_range_starts_above_ram_and_the_hole() {
        assert_eq!(hotplug_range(1 << 30, 0), None);
        assert_eq!(hotplug_range(1 << 30, 2 << 30), Some((FOUR_GIB, 2 << 30)));
        let (start, size) = hotplug_range((3 << 30) + (1 << 20), 1 << 30).unwrap();
        assert_eq!(
            start,
            FOUR_GIB + (128 << 20),
            "rounded up from 4 GiB + 1 MiB"
        );
        assert_eq!(size, 1 << 30);
        assert!(start >= ram_end((3 << 30) + (1 << 20)));
        for ram in [64u64 << 20, 3 << 30, 8 << 30] {
            for hotplug in [128u64 << 20, 16 << 30, 300 << 30] {
                let (start, size) = hotplug_range(ram, hotplug).unwrap();
                let window = pci_mmio64_start_above(ram, hotplug);
                assert!(window >= start + size, "{ram} {hotplug}");
                assert_eq!(window % PCI_MMIO64_ALIGN, 0);
                for range in memory_map(ram) {
                    assert!(
                        range.start + range.size <= start,
                        "{range:?} in the hotplug range"
                    );
                }
            }
            assert_eq!(pci_mmio64_start_above(ram, 0), pci_mmio64_start(ram));
        }
    }

    fn overlap(a: (u64, u64), b: (u64, u64)) -> bool {
        a.0 < b.0 + b.1 && b.0 < a.0 + a.1
    }

    #[test]
    fn one_segment_has_the_whole_windows() {
        let one = pci_segment_windows(0, 1, 1 << 30, 0).unwrap();
        assert_eq!(one.mmio32, (PCI_MMIO32_START, PCI_MMIO32_SIZE));
        assert_eq!(one.mmio64, (pci_mmio64_start(1 << 30), PCI_MMIO64_SIZE));
        assert_eq!(one.ecam, (PCI_ECAM_START, 1 << 20));
        assert_eq!(pci_segment_windows(1, 1, 1 << 30, 0), None);
        assert_eq!(
            pci_segment_windows(0, MAX_PCI_SEGMENTS + 1, 1 << 30, 0),
            None
        );
    }

    #[test]
    fn segment_windows_are_aligned_disjoint_and_clear_of_everything_else() {
        let fixed = [
            (IOAPIC_START, 0x1000),
            (APIC_START, 0x1000),
            (KVM_TSS_START, 3 * PAGE_SIZE),
        ];
        for (ram, hotplug) in [(64u64 << 20, 0), (3 << 30, 1 << 30), (8 << 30, 300 << 30)] {
            for segments in 1..=MAX_PCI_SEGMENTS {
                let all: Vec<_> = (0..segments)
                    .map(|s| pci_segment_windows(s, segments, ram, hotplug).unwrap())
                    .collect();
                let mut ranges = Vec::new();
                for w in &all {
                    assert!(w.mmio32.0 + w.mmio32.1 <= PCI_MMIO32_START + PCI_MMIO32_SIZE);
                    assert!(w.mmio32.0 >= PCI_MMIO32_START && w.mmio32.1 >= 32 << 20);
                    assert!(w.ecam.0 + w.ecam.1 <= PCI_ECAM_START + PCI_ECAM_SIZE);
                    assert!(w.mmio64.0 >= pci_mmio64_start_above(ram, hotplug));
                    let top = pci_mmio64_start_above(ram, hotplug) + PCI_MMIO64_SIZE;
                    assert!(w.mmio64.0 + w.mmio64.1 <= top);
                    for (start, size) in [w.ecam, w.mmio32, w.mmio64] {
                        assert_eq!(start % size, 0, "{segments} segments: {w:?}");
                        ranges.push((start, size));
                    }
                }
                for (i, a) in ranges.iter().enumerate() {
                    for b in &ranges[i + 1..] {
                        assert!(!overlap(*a, *b), "{segments}: {a:x?} {b:x?}");
                    }
                    for b in fixed {
                        assert!(!overlap(*a, b), "{a:x?} {b:x?}");
                    }
                    for region in ram_regions(ram) {
                        assert!(!overlap(*a, region), "{a:x?} in RAM");
                    }
                    if let Some(range) = hotplug_range(ram, hotplug) {
                        assert!(!overlap(*a, range), "{a:x?} in the hotplug range");
                    }
                }
            }
        }
    }

    #[test]
    fn mmio64_window_lies_above_ram() {
        for size in [64u64 << 20, 3 << 30, 8 << 30, 300 << 30] {
            assert!(pci_mmio64_start(size) >= ram_end(size));
            assert_eq!(pci_mmio64_start(size) % PCI_MMIO64_ALIGN, 0);
        }
    }
}
