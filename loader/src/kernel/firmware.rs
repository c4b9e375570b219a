//! Firmware passed as `--kernel`: recognising rust-hypervisor-firmware (an
//! EFI firmware entered through PVH, which zvmm boots like any PVH ELF) by
//! the boot paths it carries, and UEFI firmware volumes (OVMF.fd,
//! cloud-hypervisor's CLOUDHV.fd), which zvmm cannot boot, by their volume
//! header.

/// Largest ELF without a PVH note that is searched for firmware markers
/// (rust-hypervisor-firmware is ~150 KiB; a vmlinux is tens of MiB).
pub(crate) const SCAN_LIMIT: u64 = 8 << 20;

/// Where a UEFI firmware volume header keeps its signature.
const FV_SIGNATURE_OFFSET: usize = 0x28;
/// `EFI_FVH_SIGNATURE`.
const FV_SIGNATURE: &[u8] = b"_FVH";

/// Strings every rust-hypervisor-firmware build for x86_64 carries: the
/// boot loader spec configuration it reads and its EFI fallback path
/// (`src/loader.rs`, `src/efi/mod.rs` of its source).
const RHF_MARKERS: [&[u8]; 2] = [b"/loader/loader.conf", b"\\EFI\\BOOT\\BOOTX64.EFI"];

/// A firmware zvmm recognises in a kernel file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// rust-hypervisor-firmware (github.com/cloud-hypervisor/
    /// rust-hypervisor-firmware): boots the EFI system partition of the
    /// first virtio-blk disk that has one.
    RustHypervisorFirmware,
}

impl Firmware {
    /// The firmware's name.
    pub fn name(self) -> &'static str {
        match self {
            Firmware::RustHypervisorFirmware => "rust-hypervisor-firmware",
        }
    }
}

impl std::fmt::Display for Firmware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The firmware whose markers `bytes` (a whole file) holds, if any.
pub(crate) fn identify(bytes: &[u8]) -> Option<Firmware> {
    RHF_MARKERS
        .iter()
        .all(|marker| contains(bytes, marker))
        .then_some(Firmware::RustHypervisorFirmware)
}

/// Whether a file starting with `head` is a UEFI firmware volume (the
/// flash images OVMF.fd, OVMF_CODE.fd and CLOUDHV.fd start with one).
pub(crate) fn is_uefi_volume(head: &[u8]) -> bool {
    head.get(FV_SIGNATURE_OFFSET..FV_SIGNATURE_OFFSET + FV_SIGNATURE.len()) == Some(FV_SIGNATURE)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    let Some(&first) = needle.first() else {
        return true;
    };
    let mut rest = haystack;
    while let Some(at) = rest.iter().position(|&b| b == first) {
        if rest[at..].starts_with(needle) {
            return true;
        }
        rest = &rest[at + 1..];
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_hypervisor_firmware_needs_every_marker() {
        let both = b"..\x00/loader/loader.conf\x00..\\EFI\\BOOT\\BOOTX64.EFI\x00";
        assert_eq!(identify(both), Some(Firmware::RustHypervisorFirmware));
        assert_eq!(identify(b"/loader/loader.conf only"), None);
        assert_eq!(identify(b"/EFI/BOOT/BOOTX64.EFI /loader/loader.conf"), None);
        assert_eq!(identify(b""), None);
    }

    #[test]
    fn uefi_volumes_are_told_by_their_signature() {
        let mut head = vec![0u8; 0x40];
        assert!(!is_uefi_volume(&head));
        head[0x28..0x2c].copy_from_slice(b"_FVH");
        assert!(is_uefi_volume(&head));
        assert!(!is_uefi_volume(&head[..0x2b]), "cut short");
    }

    #[test]
    fn contains_finds_needles_anywhere() {
        assert!(contains(b"aab", b"ab"));
        assert!(contains(b"ab", b"ab"));
        assert!(!contains(b"a", b"ab"));
        assert!(contains(b"x", b""));
    }
}
