//! The probe guest: boots through PVH or the Linux 64-bit boot protocol and
//! reports, one `probe: key=value` fact per line on COM1, what the VMM gave
//! it (command line, memory map, initrd, ACPI tables, CPUs), starts every AP,
//! drives the virtio-blk, virtio-net and virtio-fs devices it finds on the
//! root bus of every PCI segment ([`pci`]; the network test talks to the
//! host: [`nettest`]; the file system
//! checks run over FUSE: [`fstest`]), then powers off through
//! ACPI like Linux does, or does the test action named by `probe.action=`
//! ([`action`]). With `probe.mode=firmware` it behaves like PVH firmware
//! instead ([`fw`]: GPT and FAT32 on virtio-blk, no ACPI, no interrupts).
//!
//! The two binaries (`probe-pvh`, `probe-linux64`) differ only in their ELF
//! entry point and whether they carry the PVH ELF note.

#![no_std]

pub mod acpi;
pub mod action;
pub mod blk;
pub mod boot;
pub mod fat;
pub mod fs;
pub mod fsbench;
pub mod fstest;
pub mod fuse;
pub mod fw;
pub mod fwblk;
pub mod gpt;
pub mod hostile;
pub mod inet;
pub mod io;
pub mod net;
pub mod nettest;
pub mod pci;
pub mod phys;
pub mod pit;
pub mod power;
pub mod pwrbtn;
pub mod relaunch;
pub mod rng;
pub mod serial;
pub mod smp;
pub mod virtio;
pub mod vsock;
pub mod vsocktest;

use action::Action;
use boot::BootInfo;
use serial::Quoted;

/// FNV-1a 64-bit offset basis: the hash of no bytes.
pub const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a 64-bit hash of `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    fnv1a64_update(FNV_OFFSET_BASIS, bytes)
}

/// Continues an FNV-1a 64-bit hash over `bytes`.
pub fn fnv1a64_update(hash: u64, bytes: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(hash, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(PRIME))
}

/// Rust entry of the boot CPU, called by the boot assembly in long mode.
#[no_mangle]
extern "C" fn probe_main(protocol: u32, info_addr: u64) -> ! {
    serial::init();
    report!("start");
    let boot = match boot::parse(protocol, info_addr) {
        Ok(boot) => boot,
        Err(err) => panic!("{err}"),
    };
    if relaunch::requested(&boot) {
        report!("boot relaunch=linux64");
        relaunch::relaunch(&boot);
    }
    report_boot(&boot);
    let mut busy = phys::BusyRanges::new();
    if let Some((addr, size)) = boot.initrd {
        busy.add(addr, size);
    }
    if fw::requested(&boot) {
        // Firmware work first (returns only on success), then what the OS
        // it would start does: ACPI and power-off (or the test action).
        fw::run(&boot);
        let acpi = acpi::discover(&boot, &mut busy);
        report!("done");
        action::run(Action::requested(&boot), &boot, &acpi)
    }
    let acpi = acpi::discover(&boot, &mut busy);
    smp::start_aps(&acpi.cpus, &boot, &busy);
    // `probe.pci=off` skips the bus scan (for boot benchmarks against
    // machines without PCI).
    let pci_off = boot
        .cmdline
        .is_some_and(|c| c.split(|&b| b == b' ').any(|w| w == b"probe.pci=off"));
    if pci_off {
        report!("pci skipped");
    } else {
        let cmdline = boot.cmdline.unwrap_or(&[]);
        let pci = pci::discover(&acpi, cmdline);
        if hostile::requested(cmdline) {
            hostile::run(&boot, &acpi, &pci);
        } else {
            blk::run(&pci, cmdline);
            net::run(&pci, cmdline);
            fs::run(&pci, cmdline);
        }
        vsock::run(&pci, cmdline);
        rng::run(&pci, cmdline);
    }
    report_unclaimed_port();
    pit::report();
    report!("done");
    action::run(Action::requested(&boot), &boot, &acpi)
}

/// COM2's base port: no device in a minimal VMM, so the read shows what
/// the VMM answers for ports nobody claims (all-ones on a PC).
const UNCLAIMED_PORT: u16 = 0x2f8;

fn report_unclaimed_port() {
    report!(
        "port {UNCLAIMED_PORT:#x} value={:#04x}",
        io::inb(UNCLAIMED_PORT)
    );
}

fn report_boot(boot: &BootInfo) {
    report!("boot protocol={}", boot.protocol.name());
    report!("boot {}={:#x}", boot.protocol.info_name(), boot.info_addr);
    if let Some(version) = boot.pvh_version {
        report!("boot start_info_version={version}");
    }
    match boot.cmdline {
        Some(cmdline) => report!("cmdline={}", Quoted(cmdline)),
        None => report!("cmdline none"),
    }
    let mut ram_bytes = 0u64;
    for range in boot.memmap() {
        let end = range.start.saturating_add(range.size);
        report!(
            "memmap start={:#x} end={:#x} type={}",
            range.start,
            end,
            range.kind_name()
        );
        if range.kind == 1 {
            ram_bytes = ram_bytes.saturating_add(range.size);
        }
    }
    report!("memory ram_bytes={ram_bytes}");
    report_initrd(boot.initrd);
}

fn report_initrd(initrd: Option<(u64, u64)>) {
    let Some((addr, size)) = initrd else {
        report!("initrd none");
        return;
    };
    match usize::try_from(size)
        .ok()
        .and_then(|len| phys::slice(addr, len))
    {
        Some(bytes) => report!(
            "initrd addr={addr:#x} size={size} fnv1a64={:#018x}",
            fnv1a64(bytes)
        ),
        None => report!("initrd addr={addr:#x} size={size} unmapped"),
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    match info.location() {
        Some(loc) => serial::report_unlocked(format_args!(
            "panic {} at {}:{}",
            info.message(),
            loc.file(),
            loc.line()
        )),
        None => serial::report_unlocked(format_args!("panic {}", info.message())),
    }
    io::halt_forever()
}
