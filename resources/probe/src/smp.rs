//! Application processor start-up: INIT/SIPI/SIPI through the local APIC, a
//! real-mode trampoline copied below 1 MiB that enters long mode on the
//! BSP's GDT and page tables, and [`ap_main`] reporting each AP online.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::acpi::Cpus;
use crate::boot::BootInfo;
use crate::io::{self, delay_us};
use crate::phys::{self, BusyRanges};
use crate::report;

/// Stack size of each AP.
const AP_STACK_SIZE: usize = 0x2000;
/// Most APs the probe can give a stack to.
const MAX_APS: usize = 32;
/// Preferred trampoline page; any free RAM page below 1 MiB will do.
const PREFERRED_TRAMPOLINE: u64 = 0x1_0000;
const PAGE: u64 = 0x1000;
/// How long the BSP waits for one AP to check in.
const AP_TIMEOUT_US: u64 = 1_000_000;
/// Upper bound on wait-loop iterations, whatever the TSC says.
const AP_MAX_POLLS: u64 = 200_000_000;
/// Value of [`AP_CHECKIN`] while no AP has answered.
const NOBODY: u32 = u32::MAX;

// Local APIC registers (xAPIC MMIO offsets) and ICR commands.
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_ICR_LOW: u64 = 0x300;
const LAPIC_ICR_HIGH: u64 = 0x310;
const SVR_ENABLE: u32 = 0x100 | 0xff;
const ICR_PENDING: u32 = 1 << 12;
const ICR_INIT_ASSERT: u32 = 0x0000_c500;
const ICR_INIT_DEASSERT: u32 = 0x0000_8500;
const ICR_STARTUP: u32 = 0x0000_0600;

/// Stack pointer the next AP loads (read by the boot assembly).
#[no_mangle]
static AP_STACK_TOP: AtomicU64 = AtomicU64::new(0);
/// APIC ID of the last AP that came online, [`NOBODY`] before.
static AP_CHECKIN: AtomicU32 = AtomicU32::new(NOBODY);

#[repr(C, align(16))]
struct ApStacks([[u8; AP_STACK_SIZE]; MAX_APS]);

static mut AP_STACKS: ApStacks = ApStacks([[0; AP_STACK_SIZE]; MAX_APS]);

core::arch::global_asm!(
    r#"
    .section .rodata.ap_trampoline, "a"
    .code16
    .global ap_trampoline_start, ap_trampoline_end
    /* Entered by SIPI in real mode at CS:IP = page:0. */
ap_trampoline_start:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl ap_trampoline_gdtr - ap_trampoline_start
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl *(ap_trampoline_target - ap_trampoline_start)
    .balign 8
ap_trampoline_gdtr:
    .word probe_gdt_end - probe_gdt - 1
    .long probe_gdt
ap_trampoline_target:
    .long enter_long_mode32
    .word 0x18
ap_trampoline_end:
    .code64
    .section .text
"#,
    options(att_syntax)
);

extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
}

/// The trampoline's bytes, as linked into the image.
fn trampoline_code() -> &'static [u8] {
    // SAFETY: both symbols delimit one contiguous read-only blob in .rodata.
    unsafe {
        let start = core::ptr::addr_of!(ap_trampoline_start);
        let end = core::ptr::addr_of!(ap_trampoline_end);
        core::slice::from_raw_parts(start, end as usize - start as usize)
    }
}

/// Entry of every AP once in long mode on its own stack.
#[no_mangle]
extern "C" fn ap_main() -> ! {
    let id = io::apic_id();
    report!("ap apic_id={id} online");
    AP_CHECKIN.store(id, Ordering::Release);
    io::halt_forever()
}

/// Starts every enabled CPU but the BSP and reports which came online.
pub fn start_aps(cpus: &Cpus, boot: &BootInfo, busy: &BusyRanges) {
    let bsp = io::apic_id();
    report!("bsp apic_id={bsp}");
    let targets = cpus.ids().iter().filter(|&&id| id != bsp).count();
    let mut online = 0;
    if targets > 0 {
        match place_trampoline(boot, busy) {
            Some(page) => online = start_all(cpus, bsp, page),
            None => report!("smp trampoline none"),
        }
    }
    report!("smp online={online} of={targets}");
}

fn start_all(cpus: &Cpus, bsp: u32, page: u64) -> usize {
    report!("smp trampoline={page:#x}");
    if cpus.lapic_addr.saturating_add(PAGE) > phys::MAPPED_END {
        report!("smp lapic unmapped");
        return 0;
    }
    let lapic = Lapic(cpus.lapic_addr);
    lapic.write(LAPIC_SVR, SVR_ENABLE);
    let mut online = 0;
    for (index, &id) in cpus.ids().iter().filter(|&&id| id != bsp).enumerate() {
        if index >= MAX_APS || id > 0xff {
            report!("ap apic_id={id} skipped");
        } else if start_one(&lapic, id, index, page) {
            online += 1;
        } else {
            report!("ap apic_id={id} timeout");
        }
    }
    online
}

/// Picks a free RAM page below 1 MiB and copies the trampoline there.
fn place_trampoline(boot: &BootInfo, busy: &BusyRanges) -> Option<u64> {
    let code = trampoline_code();
    let fits = |page: u64| {
        busy.is_free(page, PAGE)
            && boot.busy.is_free(page, PAGE)
            && boot.memmap().iter().any(|r| {
                r.kind == 1 && r.start <= page && page + PAGE <= r.start.saturating_add(r.size)
            })
    };
    let page = core::iter::once(PREFERRED_TRAMPOLINE)
        .chain((1..0x100).map(|n| n * PAGE))
        .find(|&page| fits(page))?;
    phys::copy_to(page, code).then_some(page)
}

/// INIT, SIPI, SIPI one AP and wait for it to check in.
fn start_one(lapic: &Lapic, apic_id: u32, index: usize, page: u64) -> bool {
    let stack_base = core::ptr::addr_of!(AP_STACKS) as u64;
    AP_STACK_TOP.store(
        stack_base + ((index + 1) * AP_STACK_SIZE) as u64,
        Ordering::Release,
    );
    AP_CHECKIN.store(NOBODY, Ordering::Release);
    let vector = (page >> 12) as u32;
    lapic.send_ipi(apic_id, ICR_INIT_ASSERT);
    delay_us(10_000);
    lapic.send_ipi(apic_id, ICR_INIT_DEASSERT);
    for _ in 0..2 {
        lapic.send_ipi(apic_id, ICR_STARTUP | vector);
        delay_us(200);
    }
    wait_checkin(apic_id)
}

fn wait_checkin(apic_id: u32) -> bool {
    let start = io::rdtsc();
    let deadline_ticks = AP_TIMEOUT_US.saturating_mul(io::tsc_mhz());
    for _ in 0..AP_MAX_POLLS {
        if AP_CHECKIN.load(Ordering::Acquire) == apic_id {
            return true;
        }
        if io::rdtsc().wrapping_sub(start) > deadline_ticks {
            break;
        }
        core::hint::spin_loop();
    }
    AP_CHECKIN.load(Ordering::Acquire) == apic_id
}

/// The BSP's local APIC in xAPIC (MMIO) mode.
struct Lapic(u64);

impl Lapic {
    fn write(&self, reg: u64, value: u32) {
        // SAFETY: the LAPIC page is identity-mapped (checked by the caller)
        // and the register offsets are architectural.
        unsafe { core::ptr::write_volatile((self.0 + reg) as *mut u32, value) };
    }

    fn read(&self, reg: u64) -> u32 {
        // SAFETY: as for `write`.
        unsafe { core::ptr::read_volatile((self.0 + reg) as *const u32) }
    }

    /// Sends an IPI and waits (bounded) for the ICR to go idle.
    fn send_ipi(&self, apic_id: u32, command: u32) {
        self.write(LAPIC_ICR_HIGH, apic_id << 24);
        self.write(LAPIC_ICR_LOW, command);
        for _ in 0..100_000 {
            if self.read(LAPIC_ICR_LOW) & ICR_PENDING == 0 {
                break;
            }
            core::hint::spin_loop();
        }
    }
}
