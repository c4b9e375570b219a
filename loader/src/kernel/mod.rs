//! Loading the guest kernel: recognises an ELF vmlinux (with or without a
//! PVH entry note), PVH firmware ([`Firmware`]) or a bzImage, checks that it
//! fits in guest RAM above the low boot area, and copies it in. Files that
//! are neither (compressed vmlinux, PE binaries, UEFI firmware volumes,
//! other architectures) are refused with an error that says what the file
//! is and what to pass instead.

mod bzimage;
mod elf;
mod firmware;
#[cfg(test)]
pub(crate) mod testimg;

use std::fmt::Write as _;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion};

use crate::extract::Compression;

pub(crate) use bzimage::{
    footprint_end, has_boot_header, header_problem, parse_setup_header, setup_size, HeaderProblem,
    ENTRY_64_OFFSET,
};
pub(crate) use elf::{
    check_elf64_x86_64, parse_notes, ElfProblem, ELF_MAGIC, XEN_ELFNOTE_PHYS32_ENTRY,
};
pub(crate) use firmware::identify as identify_firmware;
pub use firmware::Firmware;

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// PVH: 32-bit protected mode, paging off, EBX points at the
    /// `hvm_start_info`.
    Pvh,
    /// Linux 64-bit boot protocol: long mode on identity-mapped page tables,
    /// RSI points at the zero page.
    Linux64,
}

/// What the kernel file was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// ELF64 x86_64 image carrying a Xen `PHYS32_ENTRY` (PVH) note.
    ElfPvh,
    /// A PVH ELF recognised as firmware (entered like [`KernelFormat::ElfPvh`]).
    PvhFirmware(Firmware),
    /// ELF64 x86_64 image without a PVH note.
    Elf64,
    /// Linux bzImage (possibly with an EFI stub).
    BzImage,
}

/// A kernel image copied into guest memory.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// Protocol the vCPU must use to enter `entry`.
    pub protocol: BootProtocol,
    /// Format of the file the kernel came from.
    pub format: KernelFormat,
    /// PVH: the 32-bit entry from the note; Linux64: the 64-bit entry (ELF
    /// `e_entry`, or the bzImage load address + 0x200).
    pub entry: GuestAddress,
    /// First byte past the memory the kernel occupies (for a bzImage this
    /// includes the room it decompresses into); the initrd goes above it.
    pub end: GuestAddress,
    /// The bzImage setup header, used to fill the zero page.
    pub setup_header: Option<setup_header>,
}

/// Why a kernel could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The file could not be opened.
    #[error("cannot open kernel {} (check the --kernel path)", .path.display())]
    Open {
        /// Kernel path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The path is not a regular file (a directory, FIFO, socket, device).
    #[error("kernel {} is {kind}, not a file; pass the kernel image file", .path.display())]
    NotAFile {
        /// Kernel path.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// Reading the file failed.
    #[error("cannot read kernel {}", .path.display())]
    Read {
        /// Kernel path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The file is empty.
    #[error("kernel {} is empty; pass an ELF vmlinux or a bzImage", .path.display())]
    Empty {
        /// Kernel path.
        path: PathBuf,
    },
    /// The file ends before the structures it declares.
    #[error("kernel {} is truncated: {what}; copy the complete image again", .path.display())]
    Truncated {
        /// Kernel path.
        path: PathBuf,
        /// What runs past the end of the file.
        what: &'static str,
    },
    /// A 32-bit ELF file.
    #[error("kernel {} is a 32-bit ELF; zvmm boots 64-bit x86_64 kernels (vmlinux or bzImage)", .path.display())]
    Elf32 {
        /// Kernel path.
        path: PathBuf,
    },
    /// A big-endian ELF file.
    #[error("kernel {} is a big-endian ELF; zvmm boots x86_64 kernels", .path.display())]
    ElfBigEndian {
        /// Kernel path.
        path: PathBuf,
    },
    /// An ELF file for another architecture.
    #[error("kernel {} is an ELF for {arch}; zvmm boots x86_64 kernels", .path.display())]
    ElfArch {
        /// Kernel path.
        path: PathBuf,
        /// Name of the architecture the file is for.
        arch: String,
    },
    /// An ELF header field is invalid.
    #[error("kernel {} is a malformed ELF: {what}", .path.display())]
    ElfMalformed {
        /// Kernel path.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// An ELF file with nothing to load.
    #[error("ELF kernel {} has no loadable segment; pass a linked vmlinux, not an object file", .path.display())]
    ElfNoLoadable {
        /// Kernel path.
        path: PathBuf,
    },
    /// A segment would land in the low boot area.
    #[error(
        "ELF kernel {} loads [{start:#x}, {end:#x}) below 1 MiB, where zvmm keeps boot data; \
         link the kernel at 1 MiB (0x100000) or above", .path.display()
    )]
    SegmentInBootArea {
        /// Kernel path.
        path: PathBuf,
        /// First guest-physical address of the segment.
        start: u64,
        /// End (exclusive) of the segment.
        end: u64,
    },
    /// A segment would land outside guest RAM (beyond it or in the MMIO hole).
    #[error(
        "ELF kernel {} loads [{start:#x}, {end:#x}), outside guest RAM ({ram}); \
         give the VM more memory with --memory or check the kernel's link address", .path.display()
    )]
    SegmentOutsideRam {
        /// Kernel path.
        path: PathBuf,
        /// First guest-physical address of the segment.
        start: u64,
        /// End (exclusive) of the segment.
        end: u64,
        /// The guest RAM ranges.
        ram: String,
    },
    /// The entry point is not inside the loaded image.
    #[error("kernel {} has its entry point {entry:#x} outside its loaded segments", .path.display())]
    EntryOutsideImage {
        /// Kernel path.
        path: PathBuf,
        /// The entry point.
        entry: u64,
    },
    /// The Xen PVH note is malformed.
    #[error("ELF kernel {} has a malformed PVH entry note (Xen, type 18)", .path.display())]
    BadPvhNote {
        /// Kernel path.
        path: PathBuf,
    },
    /// A compressed file that is not a bzImage.
    #[error(
        "{} is a {method}-compressed file, not a kernel image; decompress it first \
         (e.g. `{} {} > vmlinux`) or pass the bzImage", .path.display(), .method.cat_tool(), .path.display()
    )]
    Compressed {
        /// Kernel path.
        path: PathBuf,
        /// The compression detected.
        method: Compression,
    },
    /// A UEFI firmware volume (OVMF.fd, CLOUDHV.fd): not PVH firmware.
    #[error(
        "kernel {} is a UEFI firmware volume (an OVMF/EDK2 flash image such as OVMF.fd or \
         CLOUDHV.fd), which zvmm cannot boot; zvmm boots PVH firmware: pass \
         rust-hypervisor-firmware's hypervisor-fw as --kernel", .path.display()
    )]
    UefiFirmwareVolume {
        /// Kernel path.
        path: PathBuf,
    },
    /// Firmware built without the PVH entry note zvmm enters it through.
    #[error(
        "kernel {} is {firmware} without a PVH entry note (a coreboot build?); zvmm enters \
         firmware through PVH: use the PVH build (the hypervisor-fw release asset)", .path.display()
    )]
    FirmwareWithoutPvh {
        /// Kernel path.
        path: PathBuf,
        /// The firmware recognised.
        firmware: Firmware,
    },
    /// A PE/EFI binary without a Linux boot header.
    #[error(
        "{} is a PE/EFI binary but not a Linux bzImage; zvmm needs an ELF vmlinux or a bzImage \
         (`zvmm kernel extract` turns a bzImage into a vmlinux)", .path.display()
    )]
    PeNotBzImage {
        /// Kernel path.
        path: PathBuf,
    },
    /// A bzImage older than boot protocol 2.06.
    #[error("bzImage {} uses boot protocol {version}; zvmm needs 2.06 or later (Linux 2.6.22+)", .path.display())]
    BzImageTooOld {
        /// Kernel path.
        path: PathBuf,
        /// Its boot protocol version, as "major.minor".
        version: String,
    },
    /// A zImage (loaded low) rather than a bzImage.
    #[error("{} is a zImage loaded below 1 MiB; zvmm needs a bzImage", .path.display())]
    BzImageNotHigh {
        /// Kernel path.
        path: PathBuf,
    },
    /// A bzImage without a 64-bit entry point.
    #[error(
        "bzImage {} (boot protocol {version}) has no 64-bit entry point (XLF_KERNEL_64 unset); \
         zvmm boots 64-bit x86_64 kernels", .path.display()
    )]
    BzImageNot64 {
        /// Kernel path.
        path: PathBuf,
        /// Its boot protocol version, as "major.minor".
        version: String,
    },
    /// The bzImage does not fit, or has no room to decompress, in guest RAM.
    #[error(
        "bzImage {} needs guest RAM up to {need:#x} to load and decompress, but RAM is {ram}; \
         give the VM more memory with --memory", .path.display()
    )]
    BzImageTooBig {
        /// Kernel path.
        path: PathBuf,
        /// End of the memory the kernel needs.
        need: u64,
        /// The guest RAM ranges.
        ram: String,
    },
    /// Not a format zvmm knows.
    #[error("kernel {} is not an ELF vmlinux or bzImage (starts with {head})", .path.display())]
    Unknown {
        /// Kernel path.
        path: PathBuf,
        /// Hex dump of the first bytes.
        head: String,
    },
    /// linux-loader failed to copy the bzImage.
    #[error("cannot load bzImage {} into guest memory", .path.display())]
    Load {
        /// Kernel path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// Copying a segment into guest memory failed.
    #[error("cannot copy kernel {} into guest memory at {addr:#x}", .path.display())]
    GuestMemory {
        /// Kernel path.
        path: PathBuf,
        /// Guest address of the failed copy.
        addr: u64,
        /// Underlying error.
        #[source]
        source: GuestMemoryError,
    },
}

/// Bytes read from the start of the file to recognise its format; enough
/// for the ELF header and the whole bzImage setup header.
const HEAD_LEN: u64 = 0x400;
/// Number of leading bytes shown for a file of unknown format.
const HEAD_SHOWN: usize = 8;

/// The formats `load_kernel` tells apart by their first bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FileKind {
    Elf,
    BzImage,
    Pe,
    UefiVolume,
    Compressed(Compression),
    Unknown,
}

/// An open kernel file with its path and size, for reads that name the file
/// in their errors.
pub(crate) struct KernelFile {
    file: File,
    path: PathBuf,
    size: u64,
}

impl KernelFile {
    fn open(path: &Path) -> Result<Self, KernelError> {
        let open_err = |source| KernelError::Open {
            path: path.to_path_buf(),
            source,
        };
        // Look before opening: opening a FIFO would block until a writer came.
        let metadata = std::fs::metadata(path).map_err(open_err)?;
        if let Some(kind) = crate::file_kind_if_not_regular(&metadata) {
            return Err(KernelError::NotAFile {
                path: path.to_path_buf(),
                kind,
            });
        }
        let file = File::open(path).map_err(open_err)?;
        let size = file.metadata().map_err(open_err)?.len();
        Ok(Self {
            file,
            path: path.to_path_buf(),
            size,
        })
    }

    /// Reads exactly `len` bytes at `offset`; `what` names the structure in
    /// the truncation error.
    fn read_at(&self, offset: u64, len: usize, what: &'static str) -> Result<Vec<u8>, KernelError> {
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|end| end > self.size) {
            return Err(self.truncated(what));
        }
        let mut buf = vec![0; len];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(|source| KernelError::Read {
                path: self.path.clone(),
                source,
            })?;
        Ok(buf)
    }

    fn truncated(&self, what: &'static str) -> KernelError {
        KernelError::Truncated {
            path: self.path.clone(),
            what,
        }
    }
}

/// Loads the kernel at `path` into `mem`: an ELF vmlinux at its physical
/// load addresses, or a bzImage's protected-mode code at 1 MiB.
pub fn load_kernel<M: GuestMemoryBackend>(
    mem: &M,
    path: &Path,
) -> Result<LoadedKernel, KernelError> {
    let mut kernel = KernelFile::open(path)?;
    if kernel.size == 0 {
        return Err(KernelError::Empty {
            path: path.to_path_buf(),
        });
    }
    let head = kernel.read_at(0, kernel.size.min(HEAD_LEN) as usize, "file header")?;
    match identify(&head) {
        FileKind::Elf => elf::load(mem, &mut kernel, &head),
        FileKind::BzImage => bzimage::load(mem, &mut kernel, &head),
        FileKind::Pe => Err(KernelError::PeNotBzImage {
            path: path.to_path_buf(),
        }),
        FileKind::UefiVolume => Err(KernelError::UefiFirmwareVolume {
            path: path.to_path_buf(),
        }),
        FileKind::Compressed(method) => Err(KernelError::Compressed {
            path: path.to_path_buf(),
            method,
        }),
        FileKind::Unknown => Err(KernelError::Unknown {
            path: path.to_path_buf(),
            head: hex_head(&head),
        }),
    }
}

/// Recognises a file by its first bytes.
pub(crate) fn identify(head: &[u8]) -> FileKind {
    if head.starts_with(elf::ELF_MAGIC) {
        FileKind::Elf
    } else if bzimage::has_boot_header(head) {
        FileKind::BzImage
    } else if head.starts_with(b"MZ") {
        FileKind::Pe
    } else if firmware::is_uefi_volume(head) {
        FileKind::UefiVolume
    } else if let Some(method) = Compression::from_magic(head) {
        FileKind::Compressed(method)
    } else {
        FileKind::Unknown
    }
}

/// The first bytes of a file as space-separated hex.
pub(crate) fn hex_head(head: &[u8]) -> String {
    let mut out = String::new();
    for (i, byte) in head.iter().take(HEAD_SHOWN).enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// Whether `[start, start + len)` lies entirely in guest RAM.
fn in_ram<M: GuestMemoryBackend>(mem: &M, start: u64, len: u64) -> bool {
    match usize::try_from(len) {
        Ok(0) => mem.address_in_range(GuestAddress(start)),
        Ok(len) => GuestMemoryBackend::check_range(mem, GuestAddress(start), len),
        Err(_) => false,
    }
}

/// The guest RAM ranges, for error messages: "0x0-0x4000000, ...".
fn describe_ram<M: GuestMemoryBackend>(mem: &M) -> String {
    let ranges: Vec<String> = mem
        .iter()
        .map(|region| {
            let start = region.start_addr().0;
            format!("{start:#x}-{:#x}", start.saturating_add(region.len()))
        })
        .collect();
    ranges.join(", ")
}

/// A boot protocol version as "major.minor" (0x020c is "2.12").
pub(crate) fn protocol_version(version: u16) -> String {
    format!("{}.{:02}", version >> 8, version & 0xff)
}

#[cfg(test)]
mod tests {
    use super::*;
    use testimg::*;

    #[test]
    fn missing_file_names_the_path() {
        let mem = guest_memory(TEST_RAM);
        let err = load_kernel(&mem, Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(matches!(err, KernelError::Open { .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
    }

    #[test]
    fn directory_is_not_a_file() {
        let mem = guest_memory(TEST_RAM);
        let err = load_kernel(&mem, Path::new("/")).unwrap_err();
        assert!(
            matches!(
                err,
                KernelError::NotAFile {
                    kind: "a directory",
                    ..
                }
            ),
            "{err:?}"
        );
        let err = load_kernel(&mem, Path::new("/dev/null")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel /dev/null is a character device, not a file; pass the kernel image file"
        );
    }

    #[test]
    fn empty_file_is_refused() {
        let mem = guest_memory(TEST_RAM);
        let file = TempFile::new("empty", &[]);
        let err = load_kernel(&mem, file.path()).unwrap_err();
        assert!(matches!(err, KernelError::Empty { .. }), "{err:?}");
    }

    #[test]
    fn compressed_files_are_named() {
        let mem = guest_memory(TEST_RAM);
        let cases: [(&[u8], Compression, &str); 4] = [
            (&[0x1f, 0x8b, 8, 0, 0, 0], Compression::Gzip, "zcat"),
            (b"\xfd7zXZ\0\0", Compression::Xz, "xzcat"),
            (&[0x28, 0xb5, 0x2f, 0xfd, 0], Compression::Zstd, "zstdcat"),
            (b"BZh91AY&SY", Compression::Bzip2, "bzcat"),
        ];
        for (bytes, method, tool) in cases {
            let file = TempFile::new("vmlinuz.gz", bytes);
            let err = load_kernel(&mem, file.path()).unwrap_err();
            match &err {
                KernelError::Compressed { method: got, .. } => assert_eq!(*got, method),
                other => panic!("{other:?}"),
            }
            let msg = err.to_string();
            assert!(msg.contains(&format!("{method}-compressed")), "{msg}");
            assert!(msg.contains(tool), "{msg}");
        }
    }

    #[test]
    fn pe_without_boot_header_is_refused() {
        let mem = guest_memory(TEST_RAM);
        let mut image = vec![0u8; 0x400];
        image[..2].copy_from_slice(b"MZ");
        let file = TempFile::new("efi", &image);
        let err = load_kernel(&mem, file.path()).unwrap_err();
        assert!(matches!(err, KernelError::PeNotBzImage { .. }), "{err:?}");
        assert!(err.to_string().contains("zvmm kernel extract"), "{err}");
    }

    #[test]
    fn uefi_firmware_volume_is_refused_by_name() {
        let mem = guest_memory(TEST_RAM);
        let mut image = vec![0u8; 0x1000];
        image[0x28..0x2c].copy_from_slice(b"_FVH");
        let file = TempFile::new("CLOUDHV.fd", &image);
        let err = load_kernel(&mem, file.path()).unwrap_err();
        assert!(
            matches!(err, KernelError::UefiFirmwareVolume { .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("UEFI firmware volume"), "{msg}");
        assert!(msg.contains("hypervisor-fw"), "{msg}");
    }

    #[test]
    fn unknown_format_shows_first_bytes() {
        let mem = guest_memory(TEST_RAM);
        let file = TempFile::new("junk", b"#!/bin/sh\necho hi\n");
        let err = load_kernel(&mem, file.path()).unwrap_err();
        assert!(matches!(err, KernelError::Unknown { .. }), "{err:?}");
        assert!(err.to_string().contains("23 21 2f 62 69 6e 2f 73"), "{err}");
    }

    #[test]
    fn protocol_versions_print_as_major_minor() {
        assert_eq!(protocol_version(0x020c), "2.12");
        assert_eq!(protocol_version(0x0205), "2.05");
    }
}
