//! x86_64 vCPU state at reset and at the kernel entry point: the boot GDT
//! and page tables zvmm writes into guest memory, the segment, control and
//! general registers for the PVH (32-bit protected mode) and 64-bit Linux
//! boot protocols, boot MSRs, FPU defaults and LAPIC LINT0/LINT1.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use loader::layout;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Setting up a vCPU's registers failed.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM register ioctl failed.
    #[error("cannot {what} on vCPU")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted only some of the boot MSRs.
    #[error("KVM accepted only {set} of {total} boot MSRs (first refused: {refused:#x})")]
    Msrs {
        /// Accepted count.
        set: usize,
        /// Requested count.
        total: usize,
        /// The first MSR index refused.
        refused: u32,
    },
    /// Writing the GDT or page tables into guest memory failed.
    #[error("cannot write boot tables at {addr:#x} into guest memory")]
    GuestMemory {
        /// Where.
        addr: u64,
        /// What vm-memory said.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

fn kvm_error(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit protected mode, paging off, EBX = start info.
    Pvh,
    /// 64-bit Linux boot protocol: long mode, identity-mapped first GiB,
    /// RSI = zero page.
    Linux64,
}

// Segment descriptor flags: access byte in bits 0-7, G/DB/L/AVL in 12-15.
const CODE64: u16 = 0xa09b;
const CODE32: u16 = 0xc09b;
const DATA: u16 = 0xc093;
const TSS: u16 = 0x808b;

/// GDT layout per boot protocol: (selector index, flags) for code, data, TSS.
fn gdt_for(mode: EntryMode) -> [u64; 5] {
    match mode {
        // Linux expects __BOOT_CS = 0x10, __BOOT_DS = 0x18.
        EntryMode::Linux64 => [
            0,
            0,
            gdt_entry(CODE64, 0, 0xfffff),
            gdt_entry(DATA, 0, 0xfffff),
            gdt_entry(TSS, 0, 0xfffff),
        ],
        EntryMode::Pvh => [
            0,
            gdt_entry(CODE32, 0, 0xfffff),
            gdt_entry(DATA, 0, 0xfffff),
            gdt_entry(TSS, 0, 0xfffff),
            0,
        ],
    }
}

fn selectors_for(mode: EntryMode) -> (u16, u16, u16) {
    match mode {
        EntryMode::Linux64 => (2, 3, 4),
        EntryMode::Pvh => (1, 2, 3),
    }
}

/// Encodes a segment descriptor.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
        | ((limit & 0xf_0000) << 32)
        | ((flags & 0xf0ff) << 40)
}

/// Decodes a descriptor into KVM's segment register form.
fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let access = ((entry >> 40) & 0xff) as u8;
    let flags = ((entry >> 52) & 0xf) as u8;
    let raw_limit = (((entry >> 32) & 0xf_0000) | (entry & 0xffff)) as u32;
    let granular = flags & 0x8 != 0;
    let present = access >> 7;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: access & 0xf,
        present,
        dpl: (access >> 5) & 0x3,
        db: (flags >> 2) & 1,
        s: (access >> 4) & 1,
        l: (flags >> 1) & 1,
        g: u8::from(granular),
        avl: flags & 1,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

fn write_guest<M: GuestMemory, T: vm_memory::ByteValued>(
    mem: &M,
    value: T,
    addr: u64,
) -> Result<(), RegsError> {
    mem.write_obj(value, GuestAddress(addr))
        .map_err(|source| RegsError::GuestMemory { addr, source })
}

/// Writes the boot GDT and empty IDT, and for the 64-bit protocol the
/// identity page tables, into guest memory.
pub fn write_boot_tables<M: GuestMemory>(mem: &M, mode: EntryMode) -> Result<(), RegsError> {
    for (index, entry) in gdt_for(mode).iter().enumerate() {
        write_guest(mem, *entry, layout::BOOT_GDT_START + index as u64 * 8)?;
    }
    write_guest(mem, 0u64, layout::BOOT_IDT_START)?;
    if mode == EntryMode::Linux64 {
        write_guest(mem, layout::PDPTE_START | 0x3, layout::PML4_START)?;
        write_guest(mem, layout::PDE_START | 0x3, layout::PDPTE_START)?;
        for index in 0..512u64 {
            // 2 MiB pages, present | writable | page size.
            write_guest(mem, (index << 21) | 0x83, layout::PDE_START + index * 8)?;
        }
    }
    Ok(())
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Sets segment and control registers for the boot vCPU.
pub fn setup_sregs(vcpu: &VcpuFd, mode: EntryMode) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm_error("get sregs"))?;
    let gdt = gdt_for(mode);
    let (code, data, tss) = selectors_for(mode);
    sregs.gdt.base = layout::BOOT_GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = layout::BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = segment_from_gdt(gdt[code as usize], code);
    let data_segment = segment_from_gdt(gdt[data as usize], data);
    sregs.ds = data_segment;
    sregs.es = data_segment;
    sregs.fs = data_segment;
    sregs.gs = data_segment;
    sregs.ss = data_segment;
    sregs.tr = segment_from_gdt(gdt[tss as usize], tss);
    match mode {
        EntryMode::Pvh => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryMode::Linux64 => {
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr3 = layout::PML4_START;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm_error("set sregs"))
}

/// Sets the general registers for entering the kernel at `entry` with the
/// boot structure (start info or zero page) at `boot_info`.
pub fn setup_regs(
    vcpu: &VcpuFd,
    mode: EntryMode,
    entry: u64,
    boot_info: u64,
) -> Result<(), RegsError> {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match mode {
        EntryMode::Pvh => regs.rbx = boot_info,
        EntryMode::Linux64 => {
            regs.rsi = boot_info;
            regs.rsp = layout::BOOT_STACK_POINTER;
            regs.rbp = layout::BOOT_STACK_POINTER;
        }
    }
    vcpu.set_regs(&regs).map_err(kvm_error("set regs"))
}

/// x87 and SSE control words as after FNINIT / reset.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_error("set fpu"))
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

/// The MSR values every vCPU starts with.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let msr = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        msr(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
}

/// Loads [`boot_msrs`] into the vCPU.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Msrs {
        set: 0,
        total: entries.len(),
        refused: 0,
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm_error("set MSRs"))?;
    if set != entries.len() {
        return Err(RegsError::Msrs {
            set,
            total: entries.len(),
            refused: entries[set].index,
        });
    }
    Ok(())
}

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// LINT0 delivers ExtINT (the legacy PIC), LINT1 delivers NMI, as firmware
/// leaves them on a PC.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm_error("get LAPIC"))?;
    for (offset, mode) in [
        (APIC_LVT_LINT0, APIC_MODE_EXTINT),
        (APIC_LVT_LINT1, APIC_MODE_NMI),
    ] {
        let value = read_lapic_reg(&lapic.regs, offset);
        let value = (value & !0x700) | (mode << 8);
        write_lapic_reg(&mut lapic.regs, offset, value);
    }
    vcpu.set_lapic(&lapic).map_err(kvm_error("set LAPIC"))
}

fn read_lapic_reg(regs: &[std::os::raw::c_char], offset: usize) -> u32 {
    let bytes = [0, 1, 2, 3].map(|i| regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn write_lapic_reg(regs: &mut [std::os::raw::c_char], offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *byte as std::os::raw::c_char;
    }
}

/// A one-paragraph dump of a vCPU's registers for fatal-error reports.
pub fn dump_registers(vcpu: &VcpuFd) -> String {
    let regs = match vcpu.get_regs() {
        Ok(regs) => regs,
        Err(e) => return format!("(registers unavailable: {e})"),
    };
    let mut text = format!(
        "rip={:#018x} rsp={:#018x} rflags={:#x}\n\
         rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n\
         rsi={:#018x} rdi={:#018x} rbp={:#018x}",
        regs.rip,
        regs.rsp,
        regs.rflags,
        regs.rax,
        regs.rbx,
        regs.rcx,
        regs.rdx,
        regs.rsi,
        regs.rdi,
        regs.rbp
    );
    if let Ok(sregs) = vcpu.get_sregs() {
        text.push_str(&format!(
            "\ncr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}(base {:#x}, l={}, db={})",
            sregs.cr0,
            sregs.cr2,
            sregs.cr3,
            sregs.cr4,
            sregs.efer,
            sregs.cs.selector,
            sregs.cs.base,
            sregs.cs.l,
            sregs.cs.db
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn descriptors_round_trip() {
        let code = segment_from_gdt(gdt_entry(CODE64, 0, 0xfffff), 2);
        assert_eq!(
            (code.selector, code.type_, code.l, code.db, code.g),
            (0x10, 0xb, 1, 0, 1)
        );
        assert_eq!(
            (code.present, code.s, code.dpl, code.unusable),
            (1, 1, 0, 0)
        );
        assert_eq!(code.limit, 0xffff_ffff);
        let data = segment_from_gdt(gdt_entry(DATA, 0x1234_5678, 0xfff), 3);
        assert_eq!(
            (data.base, data.limit, data.db, data.l),
            (0x1234_5678, 0xff_ffff, 1, 0)
        );
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn known_descriptor_encodings() {
        assert_eq!(gdt_entry(CODE64, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(DATA, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(CODE32, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
    }

    #[test]
    fn linux64_tables_identity_map_the_first_gib() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem, EntryMode::Linux64).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, layout::PDPTE_START);
        let last_pde: u64 = mem
            .read_obj(GuestAddress(layout::PDE_START + 511 * 8))
            .unwrap();
        assert_eq!(last_pde, (511 << 21) | 0x83);
        let gdt_code: u64 = mem
            .read_obj(GuestAddress(layout::BOOT_GDT_START + 0x10))
            .unwrap();
        assert_eq!(gdt_code, gdt_entry(CODE64, 0, 0xfffff));
    }

    #[test]
    fn pvh_gdt_has_flat_32bit_code() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem, EntryMode::Pvh).unwrap();
        let code: u64 = mem
            .read_obj(GuestAddress(layout::BOOT_GDT_START + 8))
            .unwrap();
        let segment = segment_from_gdt(code, 1);
        assert_eq!((segment.db, segment.l, segment.limit), (1, 0, 0xffff_ffff));
    }

    #[test]
    fn lapic_register_helpers_round_trip() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        write_lapic_reg(&mut regs, APIC_LVT_LINT1, 0x0001_0400);
        assert_eq!(read_lapic_reg(&regs, APIC_LVT_LINT1), 0x0001_0400);
    }
}
