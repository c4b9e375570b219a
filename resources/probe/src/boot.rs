//! Boot entry points and boot-information parsing.
//!
//! Two ways in, both ending in [`crate::probe_main`] in long mode on the
//! probe's own GDT, page tables (identity map of the first 4 GiB with 2 MiB
//! pages) and stack:
//! - `pvh_start32`: PVH (Xen `XEN_ELFNOTE_PHYS32_ENTRY`), 32-bit protected
//!   mode, paging off, EBX = physical address of `hvm_start_info`.
//! - `linux64_start`: Linux 64-bit boot protocol, long mode on the VMM's
//!   identity map, RSI = physical address of `boot_params` (zero page).
//!
//! [`parse`] turns either structure into a [`BootInfo`].

use crate::phys::{self, u32_at, u64_at, u8_at, BusyRanges};

/// `hvm_start_info.magic`.
const PVH_MAGIC: u32 = 0x336e_c578;
/// Largest memory map the probe keeps.
pub const MAX_MEMMAP: usize = 128;
/// Longest command line the probe reads.
const CMDLINE_LIMIT: usize = 0x1_0000;

// Protocol numbers stored by the entry stubs in `boot_protocol`.
const PROTOCOL_PVH: u32 = 1;
const PROTOCOL_LINUX64: u32 = 2;

core::arch::global_asm!(
    r#"
    .set CODE64_SEL, 0x08
    .set DATA_SEL,   0x10
    .set CODE32_SEL, 0x18
    .set CR0_PE,     0x1
    .set CR0_PG,     0x80000000
    .set CR4_PAE,    0x20
    .set MSR_EFER,   0xc0000080
    .set EFER_LME,   0x100

    .section .text.boot, "ax"

    /* PVH: 32-bit protected mode, paging off, EBX = hvm_start_info. */
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    movl %ebx, boot_info_addr
    movl $1, boot_protocol
    lgdt probe_gdtr
    jmp enter_long_mode32

    /* Shared by the BSP (PVH) and the APs: 32-bit flat mode to long mode. */
    .global enter_long_mode32
enter_long_mode32:
    movl %cr4, %eax
    orl $CR4_PAE, %eax
    movl %eax, %cr4
    movl $probe_pml4, %eax
    movl %eax, %cr3
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl %cr0, %eax
    orl $(CR0_PG | CR0_PE), %eax
    movl %eax, %cr0
    ljmp $CODE64_SEL, $long_mode64

    .code64
long_mode64:
    movw $DATA_SEL, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    cmpl $0, boot_protocol(%rip)
    je ap_long_mode64
    leaq probe_stack_top(%rip), %rsp
    xorl %ebp, %ebp
    movl boot_protocol(%rip), %edi
    movq boot_info_addr(%rip), %rsi
    /* The BSP is running: from now on long_mode64 is reached by APs only. */
    movl $0, boot_protocol(%rip)
    call probe_main
1:  cli
    hlt
    jmp 1b

ap_long_mode64:
    movq AP_STACK_TOP(%rip), %rsp
    xorl %ebp, %ebp
    call ap_main
2:  cli
    hlt
    jmp 2b

    /* Linux 64-bit boot protocol: long mode, RSI = boot_params. */
    .global linux64_start
linux64_start:
    cli
    cld
    movq %rsi, boot_info_addr(%rip)
    movl $2, boot_protocol(%rip)
    leaq probe_stack_top(%rip), %rsp
    lgdt probe_gdtr(%rip)
    leaq probe_pml4(%rip), %rax
    movq %rax, %cr3
    pushq $CODE64_SEL
    leaq long_mode64(%rip), %rax
    pushq %rax
    lretq

    .section .data.boot, "aw"
    .balign 16
    .global probe_gdt, probe_gdt_end
probe_gdt:
    .quad 0                       /* null */
    .quad 0x00af9a000000ffff      /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff      /* 0x10: flat data */
    .quad 0x00cf9a000000ffff      /* 0x18: flat 32-bit code (AP trampoline) */
probe_gdt_end:
    .balign 8
    .global probe_gdtr
probe_gdtr:
    .word probe_gdt_end - probe_gdt - 1
    .quad probe_gdt
boot_protocol:
    .long 0
    .balign 8
boot_info_addr:
    .quad 0

    /* Identity map of [0, 4 GiB) with 2 MiB pages: PML4 -> PDPT -> 4 PDs. */
    .section .data.pagetables, "aw"
    .balign 4096
    .global probe_pml4
probe_pml4:
    .quad probe_pdpt + 0x3
    .fill 511, 8, 0
probe_pdpt:
    .quad probe_pd + 0x0000 + 0x3
    .quad probe_pd + 0x1000 + 0x3
    .quad probe_pd + 0x2000 + 0x3
    .quad probe_pd + 0x3000 + 0x3
    .fill 508, 8, 0
probe_pd:
    .set page, 0
    .rept 2048
    .quad (page << 21) | 0x83     /* present, writable, 2 MiB */
    .set page, page + 1
    .endr

    .section .bss.stack, "aw", @nobits
    .balign 16
probe_stack:
    .skip 0x10000
probe_stack_top:

    .section .text
"#,
    options(att_syntax)
);

/// How the probe was entered.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// PVH direct boot (`hvm_start_info`).
    Pvh,
    /// Linux 64-bit boot protocol (`boot_params`).
    Linux64,
}

impl Protocol {
    /// Name used in the report.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Pvh => "pvh",
            Protocol::Linux64 => "linux64",
        }
    }

    /// Name of the boot structure this protocol hands over.
    pub fn info_name(self) -> &'static str {
        match self {
            Protocol::Pvh => "start_info",
            Protocol::Linux64 => "boot_params",
        }
    }
}

/// One memory-map entry (e820 numbering of `kind`).
#[derive(Clone, Copy, Default)]
pub struct MemRange {
    /// First physical address.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// e820 type: 1 RAM, 2 reserved, 3 ACPI, 4 NVS, 5 unusable.
    pub kind: u32,
}

impl MemRange {
    /// Report name of the range type.
    pub fn kind_name(&self) -> KindName {
        KindName(self.kind)
    }
}

/// Display of an e820 type: `ram`, `reserved`, ..., `other(N)`.
pub struct KindName(u32);

impl core::fmt::Display for KindName {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            1 => f.write_str("ram"),
            2 => f.write_str("reserved"),
            3 => f.write_str("acpi"),
            4 => f.write_str("nvs"),
            5 => f.write_str("unusable"),
            n => write!(f, "other({n})"),
        }
    }
}

/// Everything the probe learned from the boot structure.
pub struct BootInfo {
    /// Boot protocol used.
    pub protocol: Protocol,
    /// Physical address of `hvm_start_info` / `boot_params`.
    pub info_addr: u64,
    /// `hvm_start_info.version` (PVH only).
    pub pvh_version: Option<u32>,
    /// Command line bytes (without the NUL), if any.
    pub cmdline: Option<&'static [u8]>,
    /// Memory map as handed over.
    pub memmap: [MemRange; MAX_MEMMAP],
    /// Number of valid entries in `memmap`.
    pub memmap_len: usize,
    /// Initrd (first PVH module / Linux ramdisk): address and size.
    pub initrd: Option<(u64, u64)>,
    /// RSDP address given by the boot structure.
    pub rsdp: Option<u64>,
    /// Boot data the probe must not overwrite.
    pub busy: BusyRanges,
}

impl BootInfo {
    fn empty(protocol: Protocol, info_addr: u64) -> Self {
        Self {
            protocol,
            info_addr,
            pvh_version: None,
            cmdline: None,
            memmap: [MemRange::default(); MAX_MEMMAP],
            memmap_len: 0,
            initrd: None,
            rsdp: None,
            busy: BusyRanges::new(),
        }
    }

    /// The valid memory-map entries.
    pub fn memmap(&self) -> &[MemRange] {
        &self.memmap[..self.memmap_len]
    }

    fn push_range(&mut self, range: MemRange) {
        if let Some(slot) = self.memmap.get_mut(self.memmap_len) {
            *slot = range;
            self.memmap_len += 1;
        }
    }
}

/// Why the boot structure could not be used.
#[derive(Debug)]
pub enum BootError {
    /// The entry stub stored an unknown protocol number.
    UnknownProtocol(u32),
    /// The boot structure address is null or unmapped.
    Unreadable(u64),
    /// `hvm_start_info.magic` is wrong.
    BadPvhMagic(u32),
}

impl core::fmt::Display for BootError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BootError::UnknownProtocol(n) => write!(f, "unknown boot protocol {n}"),
            BootError::Unreadable(a) => write!(f, "boot structure at {a:#x} is unreadable"),
            BootError::BadPvhMagic(m) => write!(f, "bad hvm_start_info magic {m:#x}"),
        }
    }
}

/// Parses the boot structure the entry stub recorded.
pub fn parse(protocol: u32, info_addr: u64) -> Result<BootInfo, BootError> {
    match protocol {
        PROTOCOL_PVH => parse_pvh(info_addr),
        PROTOCOL_LINUX64 => parse_linux64(info_addr),
        n => Err(BootError::UnknownProtocol(n)),
    }
}

// hvm_start_info field offsets (Xen public/arch-x86/hvm/start_info.h).
const SI_MAGIC: usize = 0;
const SI_VERSION: usize = 4;
const SI_NR_MODULES: usize = 12;
const SI_MODLIST: usize = 16;
const SI_CMDLINE: usize = 24;
const SI_RSDP: usize = 32;
const SI_MEMMAP: usize = 40;
const SI_MEMMAP_ENTRIES: usize = 48;
const SI_SIZE: usize = 56;
const MODLIST_ENTRY_SIZE: usize = 32;
const MEMMAP_ENTRY_SIZE: usize = 24;

fn parse_pvh(addr: u64) -> Result<BootInfo, BootError> {
    let si = phys::slice(addr, SI_SIZE).ok_or(BootError::Unreadable(addr))?;
    let magic = u32_at(si, SI_MAGIC);
    if magic != PVH_MAGIC {
        return Err(BootError::BadPvhMagic(magic));
    }
    let mut info = BootInfo::empty(Protocol::Pvh, addr);
    let version = u32_at(si, SI_VERSION);
    info.pvh_version = Some(version);
    info.busy.add(addr, SI_SIZE as u64);
    info.cmdline = read_cstr(u64_at(si, SI_CMDLINE), CMDLINE_LIMIT, &mut info.busy);
    info.rsdp = nonzero(u64_at(si, SI_RSDP));

    let nr_modules = u32_at(si, SI_NR_MODULES) as usize;
    let modlist = u64_at(si, SI_MODLIST);
    if nr_modules > 0 {
        info.busy
            .add(modlist, (nr_modules * MODLIST_ENTRY_SIZE) as u64);
        if let Some(first) = phys::slice(modlist, MODLIST_ENTRY_SIZE) {
            info.initrd = Some((u64_at(first, 0), u64_at(first, 8)));
        }
    }

    if version >= 1 {
        let entries = (u32_at(si, SI_MEMMAP_ENTRIES) as usize).min(MAX_MEMMAP);
        let table = u64_at(si, SI_MEMMAP);
        info.busy.add(table, (entries * MEMMAP_ENTRY_SIZE) as u64);
        if let Some(bytes) = phys::slice(table, entries * MEMMAP_ENTRY_SIZE) {
            for entry in bytes.chunks_exact(MEMMAP_ENTRY_SIZE) {
                info.push_range(MemRange {
                    start: u64_at(entry, 0),
                    size: u64_at(entry, 8),
                    kind: u32_at(entry, 16),
                });
            }
        }
    }
    Ok(info)
}

// boot_params offsets (Linux Documentation/arch/x86/zero-page.rst, boot.rst).
pub(crate) const BP_ACPI_RSDP: usize = 0x070;
pub(crate) const BP_EXT_RAMDISK_IMAGE: usize = 0x0c0;
pub(crate) const BP_EXT_RAMDISK_SIZE: usize = 0x0c4;
pub(crate) const BP_EXT_CMD_LINE_PTR: usize = 0x0c8;
pub(crate) const BP_E820_ENTRIES: usize = 0x1e8;
pub(crate) const BP_RAMDISK_IMAGE: usize = 0x218;
pub(crate) const BP_RAMDISK_SIZE: usize = 0x21c;
pub(crate) const BP_CMD_LINE_PTR: usize = 0x228;
pub(crate) const BP_CMDLINE_SIZE: usize = 0x238;
pub(crate) const BP_E820_TABLE: usize = 0x2d0;
pub(crate) const E820_ENTRY_SIZE: usize = 20;
/// Capacity of `boot_params.e820_table`.
pub(crate) const MAX_E820: usize = 128;
pub(crate) const ZERO_PAGE_SIZE: usize = 0x1000;

fn parse_linux64(addr: u64) -> Result<BootInfo, BootError> {
    let bp = phys::slice(addr, ZERO_PAGE_SIZE).ok_or(BootError::Unreadable(addr))?;
    let mut info = BootInfo::empty(Protocol::Linux64, addr);
    info.busy.add(addr, ZERO_PAGE_SIZE as u64);

    let cmdline = wide(u32_at(bp, BP_CMD_LINE_PTR), u32_at(bp, BP_EXT_CMD_LINE_PTR));
    let size_hint = u32_at(bp, BP_CMDLINE_SIZE) as usize;
    let limit = if size_hint == 0 {
        CMDLINE_LIMIT
    } else {
        (size_hint + 1).min(CMDLINE_LIMIT)
    };
    info.cmdline = read_cstr(cmdline, limit, &mut info.busy);
    info.rsdp = nonzero(u64_at(bp, BP_ACPI_RSDP));

    let ramdisk = wide(
        u32_at(bp, BP_RAMDISK_IMAGE),
        u32_at(bp, BP_EXT_RAMDISK_IMAGE),
    );
    let ramdisk_size = wide(u32_at(bp, BP_RAMDISK_SIZE), u32_at(bp, BP_EXT_RAMDISK_SIZE));
    if ramdisk_size != 0 {
        info.initrd = Some((ramdisk, ramdisk_size));
    }

    let entries = usize::from(u8_at(bp, BP_E820_ENTRIES)).min(MAX_E820);
    let table = bp
        .get(BP_E820_TABLE..BP_E820_TABLE + entries * E820_ENTRY_SIZE)
        .unwrap_or(&[]);
    for entry in table.chunks_exact(E820_ENTRY_SIZE) {
        info.push_range(MemRange {
            start: u64_at(entry, 0),
            size: u64_at(entry, 8),
            kind: u32_at(entry, 16),
        });
    }
    Ok(info)
}

fn wide(low: u32, high: u32) -> u64 {
    (u64::from(high) << 32) | u64::from(low)
}

fn nonzero(value: u64) -> Option<u64> {
    (value != 0).then_some(value)
}

/// The NUL-terminated string at `addr` (at most `limit` bytes scanned),
/// marked busy.
fn read_cstr(addr: u64, limit: usize, busy: &mut BusyRanges) -> Option<&'static [u8]> {
    if addr == 0 {
        return None;
    }
    let avail = (phys::MAPPED_END.saturating_sub(addr)).min(limit as u64) as usize;
    let bytes = phys::slice(addr, avail)?;
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    busy.add(addr, len as u64 + 1);
    bytes.get(..len)
}
