//! Guest RAM: allocates it (anonymous, or a memfd when it must be shared
//! with other processes such as vhost-user backends) split around the
//! 32-bit MMIO hole per [`loader::layout`], and registers it with KVM.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// The guest's RAM.
pub type GuestRam = GuestMemoryMmap<()>;

/// Guest RAM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create or ftruncate failed.
    #[error("cannot create shared guest memory ({size} bytes)")]
    Memfd {
        /// Requested size.
        size: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The mapping failed (usually: not enough address space or memory).
    #[error("cannot map {size} bytes of guest memory; give --memory a size the host can back")]
    Map {
        /// Requested size.
        size: u64,
        /// The OS error under what vm-memory said (whose message
        /// already repeats it, so the chain would say it twice).
        #[source]
        source: std::io::Error,
    },
    /// KVM refused a memory slot.
    #[error("KVM refused guest memory slot {slot}")]
    Register {
        /// The slot number.
        slot: u32,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Allocates `size` bytes of guest RAM, backed by one memfd when `shared`.
pub fn create_guest_ram(size: u64, shared: bool) -> Result<GuestRam, MemoryError> {
    let regions = loader::layout::ram_regions(size);
    let memfd = if shared {
        Some(create_memfd(size)?)
    } else {
        None
    };
    let mut file_offset = 0u64;
    let ranges: Vec<_> = regions
        .iter()
        .map(|&(start, len)| {
            let backing = memfd
                .as_ref()
                .map(|file| FileOffset::from_arc(file.clone(), file_offset));
            file_offset += len;
            (GuestAddress(start), len as usize, backing)
        })
        .collect();
    crate::kernel_time::timed("mmap guest RAM", || {
        GuestMemoryMmap::from_ranges_with_files(ranges)
    })
    .map_err(|e| MemoryError::Map {
        size,
        source: innermost_io_error(&e),
    })
}

/// The last error in `error`'s source chain, as an `io::Error`.
fn innermost_io_error(error: &(dyn std::error::Error + 'static)) -> std::io::Error {
    let mut last = error;
    while let Some(source) = last.source() {
        last = source;
    }
    match last.downcast_ref::<std::io::Error>() {
        Some(io) => io.raw_os_error().map_or_else(
            || std::io::Error::new(io.kind(), io.to_string()),
            std::io::Error::from_raw_os_error,
        ),
        None => std::io::Error::other(last.to_string()),
    }
}

fn create_memfd(size: u64) -> Result<std::sync::Arc<File>, MemoryError> {
    let memfd_error = |source| MemoryError::Memfd { size, source };
    let name = CString::new("zvmm-guest-ram").unwrap_or_default();
    // SAFETY: `name` is a valid NUL-terminated string; the flags are valid.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(memfd_error(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(memfd_error)?;
    Ok(std::sync::Arc::new(file))
}

/// Registers every RAM region with KVM, one slot per region.
pub fn register_guest_ram(vm: &VmFd, ram: &GuestRam) -> Result<(), MemoryError> {
    for (slot, region) in ram.iter().enumerate() {
        let slot = slot as u32;
        let host_address =
            ram.get_host_address(region.start_addr())
                .map_err(|_| MemoryError::Register {
                    slot,
                    source: kvm_ioctls::Error::new(libc::EFAULT),
                })?;
        let kvm_region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host_address as u64,
        };
        // SAFETY: the host range is a live mapping owned by `ram`, which the
        // caller keeps alive for as long as the VM exists.
        crate::kernel_time::timed("KVM_SET_USER_MEMORY_REGION", || unsafe {
            vm.set_user_memory_region(kvm_region)
        })
        .map_err(|source| MemoryError::Register { slot, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn private_ram_is_split_around_the_hole() {
        // MAP_NORESERVE: reserving 4 GiB of address space costs no memory.
        let ram = create_guest_ram(4 << 30, false).unwrap();
        assert_eq!(ram.num_regions(), 2);
        assert_eq!(
            ram.last_addr(),
            GuestAddress(loader::layout::FOUR_GIB + (1 << 30) - 1)
        );
    }

    /// More RAM than any x86-64 address space (256 PiB): one message, the
    /// OS error once.
    #[test]
    fn too_much_ram_says_the_os_error_once() {
        let err = create_guest_ram(1 << 58, false).expect_err("256 PiB mapped");
        let mut chain = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(cause) = source {
            chain.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        assert!(chain.contains("--memory"), "{chain}");
        assert_eq!(chain.matches("os error").count(), 1, "{chain}");
    }

    #[test]
    fn shared_ram_is_one_memfd() {
        let ram = create_guest_ram(64 << 20, true).unwrap();
        ram.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        let region = ram.find_region(GuestAddress(0)).unwrap();
        assert!(region.file_offset().is_some());
        assert_eq!(
            ram.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
    }
}
