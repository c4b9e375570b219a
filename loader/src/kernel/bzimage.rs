//! bzImage kernels: setup-header checks (boot protocol version, 64-bit
//! entry), the room the kernel needs to decompress itself, and the copy of
//! the protected-mode code to 1 MiB through linux-loader.

use std::mem::size_of;

use linux_loader::loader::bootparam::{setup_header, LOADED_HIGH, XLF_KERNEL_64};
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{ByteValued, GuestAddress, GuestMemoryBackend};

use super::{
    describe_ram, in_ram, protocol_version, BootProtocol, KernelError, KernelFile, KernelFormat,
    LoadedKernel,
};
use crate::layout::HIGH_RAM_START;

/// Offset of the setup header in a bzImage (and in the zero page).
pub(crate) const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// Offset of the "HdrS" signature.
const HDRS_OFFSET: usize = 0x202;
/// The "HdrS" signature.
const HDRS: &[u8] = b"HdrS";
/// Oldest boot protocol zvmm accepts (cmdline_size appeared in 2.06).
const MIN_PROTOCOL: u16 = 0x0206;
/// Boot protocol that introduced `xloadflags`.
const XLOADFLAGS_PROTOCOL: u16 = 0x020c;
/// Setup sectors assumed when the header says 0.
const DEFAULT_SETUP_SECTS: u64 = 4;
/// Sector size of the real-mode setup code.
const SECTOR_SIZE: u64 = 512;
/// Offset of the 64-bit entry point from the protected-mode code start.
pub(crate) const ENTRY_64_OFFSET: u64 = 0x200;

/// Whether `head` carries the Linux boot header signature.
pub(crate) fn has_boot_header(head: &[u8]) -> bool {
    head.get(HDRS_OFFSET..HDRS_OFFSET + HDRS.len()) == Some(HDRS)
}

/// The setup header of a bzImage whose first bytes are `head`, if `head`
/// is long enough to hold it.
pub(crate) fn parse_setup_header(head: &[u8]) -> Option<setup_header> {
    let bytes = head.get(SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + size_of::<setup_header>())?;
    let mut hdr = setup_header::default();
    hdr.as_mut_slice().copy_from_slice(bytes);
    Some(hdr)
}

/// Size of the boot sector plus real-mode setup code: where the
/// protected-mode code starts in the file.
pub(crate) fn setup_size(hdr: &setup_header) -> u64 {
    let sects = match hdr.setup_sects {
        0 => DEFAULT_SETUP_SECTS,
        n => u64::from(n),
    };
    (sects + 1) * SECTOR_SIZE
}

/// Loads a bzImage whose first bytes are `head` at 1 MiB.
pub(super) fn load<M: GuestMemoryBackend>(
    mem: &M,
    kernel: &mut KernelFile,
    head: &[u8],
) -> Result<LoadedKernel, KernelError> {
    let hdr = parse_setup_header(head)
        .ok_or_else(|| kernel.truncated("the bzImage setup header is cut short"))?;
    check_header(kernel, &hdr)?;
    let setup = setup_size(&hdr);
    if setup >= kernel.size {
        return Err(kernel.truncated("the bzImage has no protected-mode code"));
    }
    let load_addr = HIGH_RAM_START;
    let end = footprint_end(&hdr, load_addr, kernel.size - setup);
    if !in_ram(mem, load_addr, end - load_addr) {
        return Err(KernelError::BzImageTooBig {
            path: kernel.path.clone(),
            need: end,
            ram: describe_ram(mem),
        });
    }
    let loaded = BzImage::load(mem, Some(GuestAddress(load_addr)), &mut kernel.file, None)
        .map_err(|source| KernelError::Load {
            path: kernel.path.clone(),
            source,
        })?;
    Ok(LoadedKernel {
        protocol: BootProtocol::Linux64,
        format: KernelFormat::BzImage,
        entry: GuestAddress(load_addr + ENTRY_64_OFFSET),
        end: GuestAddress(end),
        setup_header: loaded.setup_header,
    })
}

/// Why zvmm cannot boot a bzImage, judged from its setup header alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HeaderProblem {
    /// Boot protocol older than 2.06.
    TooOld,
    /// A zImage, loaded below 1 MiB.
    NotHigh,
    /// No 64-bit entry point (`XLF_KERNEL_64` unset or protocol < 2.12).
    Not64,
}

/// The first reason the setup header rules the kernel out, if any.
pub(crate) fn header_problem(hdr: &setup_header) -> Option<HeaderProblem> {
    let version = hdr.version;
    if version < MIN_PROTOCOL {
        Some(HeaderProblem::TooOld)
    } else if hdr.loadflags & LOADED_HIGH == 0 {
        Some(HeaderProblem::NotHigh)
    } else if version < XLOADFLAGS_PROTOCOL || hdr.xloadflags & XLF_KERNEL_64 == 0 {
        Some(HeaderProblem::Not64)
    } else {
        None
    }
}

fn check_header(kernel: &KernelFile, hdr: &setup_header) -> Result<(), KernelError> {
    let path = kernel.path.clone();
    let version = protocol_version(hdr.version);
    match header_problem(hdr) {
        None => Ok(()),
        Some(HeaderProblem::TooOld) => Err(KernelError::BzImageTooOld { path, version }),
        Some(HeaderProblem::NotHigh) => Err(KernelError::BzImageNotHigh { path }),
        Some(HeaderProblem::Not64) => Err(KernelError::BzImageNot64 { path, version }),
    }
}

/// End of the memory the kernel uses until it has decompressed itself: its
/// protected-mode code at `load_addr`, and the decompression buffer of
/// `init_size` bytes at the load address aligned to `kernel_alignment`, but
/// not below `pref_address` (what arch/x86/boot/compressed/head_64.S does).
pub(crate) fn footprint_end(hdr: &setup_header, load_addr: u64, code_size: u64) -> u64 {
    let alignment = u64::from(hdr.kernel_alignment);
    let aligned = if alignment.is_power_of_two() {
        load_addr.next_multiple_of(alignment)
    } else {
        load_addr
    };
    let buffer_start = aligned.max(hdr.pref_address);
    let buffer_end = buffer_start.saturating_add(u64::from(hdr.init_size));
    buffer_end.max(load_addr + code_size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::load_kernel;
    use crate::kernel::testimg::*;
    use vm_memory::Bytes;

    #[test]
    fn bzimage_loads_at_1mib_with_64bit_entry() {
        let mem = guest_memory(TEST_RAM);
        let payload = vec![0x5a; 0x1800];
        let image = BzImageBuilder::new(&payload).build();
        let file = TempFile::new("bzImage", &image);
        let kernel = load_kernel(&mem, file.path()).unwrap();
        assert_eq!(kernel.protocol, BootProtocol::Linux64);
        assert_eq!(kernel.format, KernelFormat::BzImage);
        assert_eq!(kernel.entry, GuestAddress(HIGH_RAM_START + 0x200));
        let hdr = kernel.setup_header.unwrap();
        assert_eq!({ hdr.code32_start }, HIGH_RAM_START as u32);
        assert_eq!({ hdr.version }, 0x020f);
        // The protected-mode code (everything after the setup sectors) is at 1 MiB.
        let setup = setup_size(&hdr) as usize;
        let mut loaded = vec![0; image.len() - setup];
        mem.read_slice(&mut loaded, GuestAddress(HIGH_RAM_START))
            .unwrap();
        assert_eq!(loaded, image[setup..]);
        // The decompression buffer at pref_address is counted in the end.
        assert_eq!(kernel.end, GuestAddress(BZ_PREF_ADDRESS + BZ_INIT_SIZE));
    }

    #[test]
    fn efi_stub_bzimage_is_a_bzimage() {
        let mem = guest_memory(TEST_RAM);
        let mut image = BzImageBuilder::new(&[1; 0x200]).build();
        image[..2].copy_from_slice(b"MZ");
        let file = TempFile::new("bzImage.efi", &image);
        let kernel = load_kernel(&mem, file.path()).unwrap();
        assert_eq!(kernel.format, KernelFormat::BzImage);
    }

    #[test]
    fn old_protocol_is_refused() {
        let mem = guest_memory(TEST_RAM);
        let image = BzImageBuilder::new(&[1; 0x200]).version(0x0205).build();
        let file = TempFile::new("bzImage", &image);
        let err = load_kernel(&mem, file.path()).unwrap_err();
        assert!(matches!(err, KernelError::BzImageTooOld { .. }), "{err:?}");
        assert!(err.to_string().contains("2.05"), "{err}");
    }

    #[test]
    fn kernel_without_64bit_entry_is_refused() {
        let mem = guest_memory(TEST_RAM);
        for builder in [
            BzImageBuilder::new(&[1; 0x200]).xloadflags(0),
            BzImageBuilder::new(&[1; 0x200]).version(0x020a),
        ] {
            let file = TempFile::new("bzImage", &builder.build());
            let err = load_kernel(&mem, file.path()).unwrap_err();
            assert!(matches!(err, KernelError::BzImageNot64 { .. }), "{err:?}");
        }
    }

    #[test]
    fn zimage_is_refused() {
        let mem = guest_memory(TEST_RAM);
        let image = BzImageBuilder::new(&[1; 0x200]).loadflags(0).build();
        let file = TempFile::new("zImage", &image);
        let err = load_kernel(&mem, file.path()).unwrap_err();
        assert!(matches!(err, KernelError::BzImageNotHigh { .. }), "{err:?}");
    }

    #[test]
    fn truncated_bzimage_is_refused() {
        let mem = guest_memory(TEST_RAM);
        let image = BzImageBuilder::new(&[1; 0x200]).build();
        for len in [0x210, 0x400] {
            let file = TempFile::new("bzImage", &image[..len]);
            let err = load_kernel(&mem, file.path()).unwrap_err();
            assert!(
                matches!(err, KernelError::Truncated { .. }),
                "{len}: {err:?}"
            );
        }
    }

    #[test]
    fn bzimage_needing_more_ram_is_refused() {
        let mem = guest_memory(TEST_RAM);
        let image = BzImageBuilder::new(&[1; 0x200])
            .init_size(TEST_RAM as u32)
            .build();
        let file = TempFile::new("bzImage", &image);
        let err = load_kernel(&mem, file.path()).unwrap_err();
        assert!(matches!(err, KernelError::BzImageTooBig { .. }), "{err:?}");
        assert!(err.to_string().contains("--memory"), "{err}");
    }
}
