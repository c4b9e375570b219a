//! Loading the initial ramdisk: placed page-aligned at the top of the RAM
//! below the 32-bit MMIO hole (or below the kernel's `initrd_addr_max`),
//! above the kernel image.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use crate::layout::{self, HIGH_RAM_START, PAGE_SIZE};

/// An initrd copied into guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedInitrd {
    /// Guest-physical address of its first byte (page-aligned).
    pub addr: GuestAddress,
    /// Size in bytes.
    pub size: u64,
}

/// Why an initrd could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum InitrdError {
    /// The file could not be opened.
    #[error("cannot open initrd {} (check the --initrd path)", .path.display())]
    Open {
        /// Initrd path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The path is not a regular file (a directory, FIFO, socket, device).
    #[error("initrd {} is {kind}, not a file; pass a cpio archive file", .path.display())]
    NotAFile {
        /// Initrd path.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// The file is empty.
    #[error("initrd {} is empty; pass a cpio archive or leave out --initrd", .path.display())]
    Empty {
        /// Initrd path.
        path: PathBuf,
    },
    /// The initrd does not fit between the kernel and the top of low RAM.
    #[error(
        "initrd {} ({} MiB) does not fit in guest RAM below {limit:#x} above the kernel (which ends at {kernel_end:#x}); \
         give the VM more memory with --memory", .path.display(), .size.div_ceil(1 << 20)
    )]
    TooBig {
        /// Initrd path.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
        /// End (exclusive) of the memory it may occupy.
        limit: u64,
        /// End of the kernel image.
        kernel_end: u64,
    },
    /// Copying the file into guest memory failed (a read error, or the file
    /// changed size while being read).
    #[error("cannot read initrd {} into guest memory", .path.display())]
    Read {
        /// Initrd path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: GuestMemoryError,
    },
}

/// Copies the initrd at `path` to the top of low RAM (`layout::low_ram_end`),
/// page-aligned, above `kernel_end`, and below `max_addr` (the bzImage's
/// `initrd_addr_max`, the highest address the initrd may occupy) if given.
pub fn load_initrd<M: GuestMemoryBackend>(
    mem: &M,
    path: &Path,
    ram_size: u64,
    kernel_end: GuestAddress,
    max_addr: Option<u64>,
) -> Result<LoadedInitrd, InitrdError> {
    let open_err = |source| InitrdError::Open {
        path: path.to_path_buf(),
        source,
    };
    // Look before opening: opening a FIFO would block until a writer came.
    let metadata = std::fs::metadata(path).map_err(open_err)?;
    if let Some(kind) = crate::file_kind_if_not_regular(&metadata) {
        return Err(InitrdError::NotAFile {
            path: path.to_path_buf(),
            kind,
        });
    }
    let mut file = File::open(path).map_err(open_err)?;
    let size = file.metadata().map_err(open_err)?.len();
    if size == 0 {
        return Err(InitrdError::Empty {
            path: path.to_path_buf(),
        });
    }
    let addr =
        place(size, ram_size, kernel_end.0, max_addr).ok_or_else(|| InitrdError::TooBig {
            path: path.to_path_buf(),
            size,
            limit: limit(ram_size, max_addr),
            kernel_end: kernel_end.0,
        })?;
    // `place` checked the initrd lies below low_ram_end, so size fits usize.
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|source| InitrdError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(LoadedInitrd {
        addr: GuestAddress(addr),
        size,
    })
}

/// End (exclusive) of the memory the initrd may occupy.
fn limit(ram_size: u64, max_addr: Option<u64>) -> u64 {
    let top = layout::low_ram_end(ram_size);
    match max_addr {
        Some(max) => top.min(max.saturating_add(1)),
        None => top,
    }
}

/// The page-aligned address of a `size`-byte initrd as high as it fits, or
/// `None` if it would reach down into the kernel or the low boot area.
fn place(size: u64, ram_size: u64, kernel_end: u64, max_addr: Option<u64>) -> Option<u64> {
    let addr = limit(ram_size, max_addr).checked_sub(size)? & !(PAGE_SIZE - 1);
    let floor = kernel_end
        .max(HIGH_RAM_START)
        .checked_next_multiple_of(PAGE_SIZE)?;
    (addr >= floor).then_some(addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::testimg::{guest_memory, read_guest, TempFile, TEST_RAM};

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = std::env::temp_dir().join(format!("zvmm-initrd-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        let mem = guest_memory(TEST_RAM);
        let err = load_initrd(&mem, &fifo, TEST_RAM, GuestAddress(0x20_0000), None).unwrap_err();
        assert!(err.to_string().contains("is a FIFO, not a file"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_directory_is_refused_by_name() {
        let mem = guest_memory(TEST_RAM);
        let err = load_initrd(
            &mem,
            Path::new("/"),
            TEST_RAM,
            GuestAddress(0x20_0000),
            None,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "initrd / is a directory, not a file; pass a cpio archive file"
        );
    }

    fn content(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn initrd_goes_page_aligned_to_the_top_of_low_ram() {
        let mem = guest_memory(TEST_RAM);
        let data = content(0x2345);
        let file = TempFile::new("initrd", &data);
        let initrd =
            load_initrd(&mem, file.path(), TEST_RAM, GuestAddress(0x20_0000), None).unwrap();
        assert_eq!(initrd.size, data.len() as u64);
        assert_eq!(initrd.addr.0 % PAGE_SIZE, 0);
        assert!(initrd.addr.0 + initrd.size <= TEST_RAM);
        assert!(TEST_RAM - (initrd.addr.0 + initrd.size) < PAGE_SIZE);
        assert_eq!(read_guest(&mem, initrd.addr.0, data.len()), data);
    }

    #[test]
    fn initrd_stays_below_the_mmio_hole_in_big_guests() {
        let ram = 4 << 30;
        assert_eq!(
            place(0x1000, ram, 0x20_0000, None),
            Some(layout::MMIO32_START - 0x1000)
        );
    }

    #[test]
    fn max_addr_is_respected() {
        let max = 0x1ff_ffff; // initrd_addr_max is inclusive
        let mem = guest_memory(TEST_RAM);
        let file = TempFile::new("initrd", &content(0x1800));
        let initrd = load_initrd(
            &mem,
            file.path(),
            TEST_RAM,
            GuestAddress(0x20_0000),
            Some(max),
        )
        .unwrap();
        assert_eq!(initrd.addr, GuestAddress(0x200_0000 - 0x2000));
    }

    #[test]
    fn initrd_that_does_not_fit_is_refused() {
        let mem = guest_memory(TEST_RAM);
        let file = TempFile::new("initrd", &content(0x10_0000));
        let kernel_end = GuestAddress(TEST_RAM - 0x8_0000);
        let err = load_initrd(&mem, file.path(), TEST_RAM, kernel_end, None).unwrap_err();
        assert!(matches!(err, InitrdError::TooBig { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("(1 MiB)") && msg.contains("--memory"), "{msg}");
    }

    #[test]
    fn initrd_exactly_filling_the_gap_fits() {
        assert_eq!(
            place(0x1000, TEST_RAM, TEST_RAM - 0x1000, None),
            Some(TEST_RAM - 0x1000)
        );
        assert_eq!(place(0x1001, TEST_RAM, TEST_RAM - 0x1000, None), None);
        assert_eq!(place(TEST_RAM, TEST_RAM, 0, None), None);
    }

    #[test]
    fn missing_and_empty_initrds_are_errors() {
        let mem = guest_memory(TEST_RAM);
        let missing = Path::new("/nonexistent/initrd.img");
        let err = load_initrd(&mem, missing, TEST_RAM, GuestAddress(0), None).unwrap_err();
        assert!(matches!(err, InitrdError::Open { .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent/initrd.img"), "{err}");
        let empty = TempFile::new("initrd", &[]);
        let err = load_initrd(&mem, empty.path(), TEST_RAM, GuestAddress(0), None).unwrap_err();
        assert!(matches!(err, InitrdError::Empty { .. }), "{err:?}");
    }
}
