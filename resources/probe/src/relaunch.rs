//! Test aid: with `probe.relaunch=linux64` on its command line, a PVH-booted
//! probe builds a Linux `boot_params` from its `hvm_start_info` and re-enters
//! itself through the Linux 64-bit entry (`linux64_start`), so a VMM that
//! only does PVH (QEMU) still exercises that entry and `boot_params` parsing.

use crate::boot::{self, BootInfo, Protocol};

/// Command-line switch that asks for the relaunch.
const SWITCH: &[u8] = b"probe.relaunch=linux64";
/// `boot_params.hdr.boot_flag` and `hdr.header` ("HdrS") values.
const BOOT_FLAG: u16 = 0xaa55;
const HEADER_MAGIC: u32 = 0x5372_6448;
const BP_BOOT_FLAG: usize = 0x1fe;
const BP_HEADER: usize = 0x202;

#[repr(C, align(4096))]
struct ZeroPage([u8; boot::ZERO_PAGE_SIZE]);

static mut ZERO_PAGE: ZeroPage = ZeroPage([0; boot::ZERO_PAGE_SIZE]);

extern "C" {
    fn linux64_start() -> !;
}

/// Whether this PVH boot asked to be relaunched through the linux64 entry.
pub fn requested(boot: &BootInfo) -> bool {
    boot.protocol == Protocol::Pvh
        && boot
            .cmdline
            .is_some_and(|c| c.windows(SWITCH.len()).any(|w| w == SWITCH))
}

/// Fills the zero page from `boot` and jumps to `linux64_start` with RSI
/// pointing at it. Only call on the BSP before any AP is started.
pub fn relaunch(boot: &BootInfo) -> ! {
    // SAFETY: only the BSP runs (APs are not started yet) and nothing else
    // references ZERO_PAGE; the next run reads it by physical address only.
    let page = unsafe { &mut (*core::ptr::addr_of_mut!(ZERO_PAGE)).0 };
    fill(page, boot);
    let addr = page.as_ptr() as u64;
    // SAFETY: we are in long mode on an identity map, which is what
    // linux64_start expects along with RSI = boot_params; it never returns
    // and resets the stack, GDT and page tables itself.
    unsafe {
        core::arch::asm!(
            "jmp {entry}",
            entry = sym linux64_start,
            in("rsi") addr,
            options(noreturn)
        )
    }
}

fn fill(page: &mut [u8], boot: &BootInfo) {
    page.fill(0);
    put(page, BP_BOOT_FLAG, u64::from(BOOT_FLAG), 2);
    put(page, BP_HEADER, u64::from(HEADER_MAGIC), 4);
    if let Some(cmdline) = boot.cmdline {
        let addr = cmdline.as_ptr() as u64;
        put(page, boot::BP_CMD_LINE_PTR, addr & 0xffff_ffff, 4);
        put(page, boot::BP_EXT_CMD_LINE_PTR, addr >> 32, 4);
        put(page, boot::BP_CMDLINE_SIZE, cmdline.len() as u64, 4);
    }
    if let Some((addr, size)) = boot.initrd {
        put(page, boot::BP_RAMDISK_IMAGE, addr & 0xffff_ffff, 4);
        put(page, boot::BP_EXT_RAMDISK_IMAGE, addr >> 32, 4);
        put(page, boot::BP_RAMDISK_SIZE, size & 0xffff_ffff, 4);
        put(page, boot::BP_EXT_RAMDISK_SIZE, size >> 32, 4);
    }
    put(page, boot::BP_ACPI_RSDP, boot.rsdp.unwrap_or(0), 8);
    let entries = boot.memmap().iter().take(boot::MAX_E820);
    let mut count = 0;
    for (index, range) in entries.enumerate() {
        let at = boot::BP_E820_TABLE + index * boot::E820_ENTRY_SIZE;
        put(page, at, range.start, 8);
        put(page, at + 8, range.size, 8);
        put(page, at + 16, u64::from(range.kind), 4);
        count += 1;
    }
    put(page, boot::BP_E820_ENTRIES, count, 1);
}

/// Stores the low `width` bytes of `value` little-endian at `off`.
fn put(page: &mut [u8], off: usize, value: u64, width: usize) {
    if let Some(field) = page.get_mut(off..off + width) {
        field.copy_from_slice(&value.to_le_bytes()[..width]);
    }
}
