//! The tiny guest: a PVH ELF of a few instructions, assembled here, for
//! measuring what a VMM costs around a guest that does almost nothing.
//!
//! Entered in 32-bit protected mode (PVH), it writes `zvmm-tiny\n` to COM1
//! (port 0x3f8, no UART set-up needed), then either powers off — the
//! hardware-reduced ACPI sleep control register zvmm's FADT names (port
//! 0x600, `SLP_TYP=5 | SLP_EN`), then QEMU's `isa-debug-exit` port 0xf4 for
//! QEMU, which has no register there — or, in the idle flavour, halts with
//! interrupts off, so the vCPU sleeps in KVM until the VM is killed.
//!
//! ```text
//! 66 ba f8 03      mov dx, 0x3f8
//! b0 XX / ee       mov al, XX ; out dx, al      (once per byte of the line)
//! 66 ba 00 06      mov dx, 0x600                (power-off flavour only)
//! b0 34 / ee       mov al, 0x34 ; out dx, al
//! 66 ba f4 00      mov dx, 0xf4
//! b0 00 / ee       mov al, 0 ; out dx, al
//! fa               cli
//! f4 / eb fd       1: hlt ; jmp 1b
//! ```

use std::path::{Path, PathBuf};

/// The line the tiny guest prints.
pub const TINY_LINE: &str = "zvmm-tiny";
/// Guest-physical load address of the image.
const LOAD_ADDR: u64 = 0x10_0000;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the PVH entry note's type.
const PVH_NOTE_TYPE: u32 = 18;
const EHDR_LEN: usize = 64;
const PHDR_LEN: usize = 56;
const NOTE_OFFSET: usize = EHDR_LEN + 2 * PHDR_LEN;
/// Note header (12) + "Xen\0" (4) + an 8-byte entry address.
const NOTE_LEN: usize = 24;
const CODE_OFFSET: usize = NOTE_OFFSET + NOTE_LEN;

/// What the tiny guest does after printing its line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TinyEnd {
    /// Power off (ACPI S5 on zvmm, isa-debug-exit on QEMU).
    PowerOff,
    /// Halt forever with interrupts off.
    Idle,
}

/// The guest's machine code (see the module doc).
fn code(end: TinyEnd) -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03];
    for byte in TINY_LINE.bytes().chain([b'\n']) {
        code.extend_from_slice(&[0xb0, byte, 0xee]);
    }
    if end == TinyEnd::PowerOff {
        code.extend_from_slice(&[0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee]);
        code.extend_from_slice(&[0x66, 0xba, 0xf4, 0x00, 0xb0, 0x00, 0xee]);
    }
    code.extend_from_slice(&[0xfa, 0xf4, 0xeb, 0xfd]);
    code
}

fn put(image: &mut [u8], at: usize, bytes: &[u8]) {
    image[at..at + bytes.len()].copy_from_slice(bytes);
}

/// The ELF64 image: one PT_LOAD of the whole file at 1 MiB and a
/// PT_NOTE holding the PVH entry.
pub fn tiny_elf(end: TinyEnd) -> Vec<u8> {
    let code = code(end);
    let total = CODE_OFFSET + code.len();
    let entry = LOAD_ADDR + CODE_OFFSET as u64;
    let mut image = vec![0u8; total];
    // ELF header: 64-bit, little-endian, version 1, ET_EXEC, EM_X86_64.
    put(&mut image, 0, b"\x7fELF\x02\x01\x01");
    put(&mut image, 16, &2u16.to_le_bytes());
    put(&mut image, 18, &62u16.to_le_bytes());
    put(&mut image, 20, &1u32.to_le_bytes());
    put(&mut image, 24, &entry.to_le_bytes());
    put(&mut image, 32, &(EHDR_LEN as u64).to_le_bytes());
    put(&mut image, 52, &(EHDR_LEN as u16).to_le_bytes());
    put(&mut image, 54, &(PHDR_LEN as u16).to_le_bytes());
    put(&mut image, 56, &2u16.to_le_bytes());
    // PT_LOAD, read/write/execute, the whole file.
    let load = EHDR_LEN;
    put(&mut image, load, &1u32.to_le_bytes());
    put(&mut image, load + 4, &7u32.to_le_bytes());
    put(&mut image, load + 16, &LOAD_ADDR.to_le_bytes());
    put(&mut image, load + 24, &LOAD_ADDR.to_le_bytes());
    put(&mut image, load + 32, &(total as u64).to_le_bytes());
    put(&mut image, load + 40, &(total as u64).to_le_bytes());
    put(&mut image, load + 48, &0x1000u64.to_le_bytes());
    // PT_NOTE over the PVH note.
    let note = EHDR_LEN + PHDR_LEN;
    put(&mut image, note, &4u32.to_le_bytes());
    put(&mut image, note + 4, &4u32.to_le_bytes());
    put(&mut image, note + 8, &(NOTE_OFFSET as u64).to_le_bytes());
    put(
        &mut image,
        note + 16,
        &(LOAD_ADDR + NOTE_OFFSET as u64).to_le_bytes(),
    );
    put(
        &mut image,
        note + 24,
        &(LOAD_ADDR + NOTE_OFFSET as u64).to_le_bytes(),
    );
    put(&mut image, note + 32, &(NOTE_LEN as u64).to_le_bytes());
    put(&mut image, note + 40, &(NOTE_LEN as u64).to_le_bytes());
    put(&mut image, note + 48, &4u64.to_le_bytes());
    // The note: namesz 4, descsz 8, type 18, "Xen\0", entry.
    put(&mut image, NOTE_OFFSET, &4u32.to_le_bytes());
    put(&mut image, NOTE_OFFSET + 4, &8u32.to_le_bytes());
    put(&mut image, NOTE_OFFSET + 8, &PVH_NOTE_TYPE.to_le_bytes());
    put(&mut image, NOTE_OFFSET + 12, b"Xen\0");
    put(&mut image, NOTE_OFFSET + 16, &entry.to_le_bytes());
    put(&mut image, CODE_OFFSET, &code);
    image
}

/// Writes the tiny guest of flavour `end` into `dir`; returns its path.
pub fn write_tiny_elf(dir: &Path, end: TinyEnd) -> PathBuf {
    let name = match end {
        TinyEnd::PowerOff => "tiny-poweroff.elf",
        TinyEnd::Idle => "tiny-idle.elf",
    };
    let path = dir.join(name);
    std::fs::write(&path, tiny_elf(end)).expect("cannot write the tiny guest");
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_is_an_elf64_with_the_pvh_note_on_its_code() {
        let image = tiny_elf(TinyEnd::PowerOff);
        assert_eq!(&image[..4], b"\x7fELF");
        let entry = u64::from_le_bytes(image[24..32].try_into().unwrap());
        let note_entry = u64::from_le_bytes(
            image[NOTE_OFFSET + 16..NOTE_OFFSET + 24]
                .try_into()
                .unwrap(),
        );
        assert_eq!(entry, note_entry);
        assert_eq!(entry - LOAD_ADDR, CODE_OFFSET as u64);
        assert_eq!(
            &image[CODE_OFFSET..CODE_OFFSET + 4],
            &[0x66, 0xba, 0xf8, 0x03]
        );
        assert_eq!(&image[image.len() - 3..], &[0xf4, 0xeb, 0xfd]);
    }

    #[test]
    fn only_the_power_off_flavour_writes_the_sleep_register() {
        let has_poweroff = |end| {
            tiny_elf(end)
                .windows(4)
                .any(|w| w == [0x66, 0xba, 0x00, 0x06])
        };
        assert!(has_poweroff(TinyEnd::PowerOff));
        assert!(!has_poweroff(TinyEnd::Idle));
    }
}
