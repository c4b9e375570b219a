//! Raw CPU access: port I/O, MSRs, CPUID, the time-stamp counter (and its
//! rate, for benchmarks) and halting.

use core::arch::asm;

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: port reads have no memory effects; the probe owns the machine.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack)) };
    value
}

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port writes have no memory effects visible to Rust.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack)) };
}

/// Reads a 32-bit word from an I/O port.
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: port reads have no memory effects; the probe owns the machine.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack)) };
    value
}

/// Writes a 16-bit word to an I/O port.
pub fn outw(port: u16, value: u16) {
    // SAFETY: port writes have no memory effects visible to Rust.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack)) };
}

/// Writes a 32-bit word to an I/O port.
pub fn outl(port: u16, value: u32) {
    // SAFETY: port writes have no memory effects visible to Rust.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack)) };
}

/// Reads a model-specific register.
pub fn rdmsr(msr: u32) -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: only called for architectural MSRs that exist on every x86-64 CPU.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") low, out("edx") high, options(nomem, nostack))
    };
    (u64::from(high) << 32) | u64::from(low)
}

/// Result of one CPUID query.
#[derive(Clone, Copy)]
pub struct Cpuid {
    /// EAX output.
    pub eax: u32,
    /// EBX output.
    pub ebx: u32,
    /// ECX output.
    pub ecx: u32,
    /// EDX output.
    pub edx: u32,
}

/// Executes CPUID for `leaf`/`subleaf`.
pub fn cpuid(leaf: u32, subleaf: u32) -> Cpuid {
    let (eax, ebx, ecx, edx): (u32, u32, u32, u32);
    // SAFETY: CPUID only writes the named registers; RBX is saved and restored
    // by hand because LLVM may reserve it.
    unsafe {
        asm!(
            "mov {tmp:r}, rbx",
            "cpuid",
            "xchg {tmp:r}, rbx",
            tmp = out(reg) ebx,
            inout("eax") leaf => eax,
            inout("ecx") subleaf => ecx,
            out("edx") edx,
            options(nomem, nostack, preserves_flags),
        )
    };
    Cpuid { eax, ebx, ecx, edx }
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: RDTSC only reads the counter into EDX:EAX.
    unsafe { asm!("rdtsc", out("eax") low, out("edx") high, options(nomem, nostack)) };
    (u64::from(high) << 32) | u64::from(low)
}

/// Initial APIC ID of the executing CPU (CPUID leaf 1).
pub fn apic_id() -> u32 {
    cpuid(1, 0).ebx >> 24
}

/// Disables interrupts and halts this CPU for good.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: stopping the CPU is the intent; nothing runs afterwards.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Busy-waits for about `us` microseconds, timed with the TSC.
pub fn delay_us(us: u64) {
    let start = rdtsc();
    let ticks = us.saturating_mul(tsc_mhz());
    while rdtsc().wrapping_sub(start) < ticks {
        core::hint::spin_loop();
    }
}

/// TSC frequency in MHz: from the hypervisor timing leaf, else CPUID 0x16,
/// else a generous guess so delays err on the long side.
pub fn tsc_mhz() -> u64 {
    const GUESS_MHZ: u64 = 4000;
    if cpuid(0x4000_0000, 0).eax >= 0x4000_0010 {
        let khz = u64::from(cpuid(0x4000_0010, 0).eax);
        if khz >= 1000 {
            return khz / 1000;
        }
    }
    if cpuid(0, 0).eax >= 0x16 {
        let mhz = u64::from(cpuid(0x16, 0).eax & 0xffff);
        if mhz != 0 {
            return mhz;
        }
    }
    GUESS_MHZ
}

/// Reports the TSC frequency if the CPU or hypervisor states it:
/// `tsc_khz=N source=...` or `tsc_khz unknown`.
pub fn report_tsc_khz() {
    let hypervisor = cpuid(1, 0).ecx & (1 << 31) != 0;
    if hypervisor && cpuid(0x4000_0000, 0).eax >= 0x4000_0010 {
        let khz = cpuid(0x4000_0010, 0).eax;
        if khz != 0 {
            crate::report!("tsc_khz={khz} source=hypervisor");
            return;
        }
    }
    let max_leaf = cpuid(0, 0).eax;
    if max_leaf >= 0x15 {
        let leaf = cpuid(0x15, 0);
        if leaf.eax != 0 && leaf.ebx != 0 && leaf.ecx != 0 {
            let khz = u64::from(leaf.ecx) * u64::from(leaf.ebx) / u64::from(leaf.eax) / 1000;
            crate::report!("tsc_khz={khz} source=cpuid15");
            return;
        }
    }
    if max_leaf >= 0x16 {
        let mhz = cpuid(0x16, 0).eax & 0xffff;
        if mhz != 0 {
            crate::report!("tsc_khz={} source=cpuid16", mhz * 1000);
            return;
        }
    }
    crate::report!("tsc_khz unknown");
}
