//! Test helpers for virtio-blk: guest memory, sparse images in a temporary
//! directory, and descriptor chains built with `MockSplitQueue`.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempdir::TempDir;

pub use crate::virtio::testing::{descriptors, r, raw, w, Desc};
use crate::virtio::GuestMemory;

/// Guest memory size of the tests.
pub const MEM_SIZE: usize = 0x40_0000;
/// Where tests put request headers.
pub const HEADER: u64 = 0x10_0000;
/// Where tests put data buffers.
pub const DATA: u64 = 0x20_0000;
/// Where tests put status bytes.
pub const STATUS: u64 = 0x3f_f000;

/// 4 MiB of guest memory at 0.
pub fn memory() -> GuestMemory {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// A sparse image in its own temporary directory (removed on drop).
pub struct Image {
    /// Keeps the directory alive.
    pub _dir: TempDir,
    /// The image file.
    pub path: PathBuf,
}

impl Image {
    /// A sparse image of `size` bytes under /tmp.
    pub fn new(size: u64) -> Image {
        let dir = TempDir::new_with_prefix("/tmp/zvmm-blk-").unwrap();
        let path = dir.as_path().join("disk.raw");
        File::create(&path).unwrap().set_len(size).unwrap();
        Image { _dir: dir, path }
    }

    /// Allocated 512-byte blocks (st_blocks).
    pub fn blocks(&self) -> u64 {
        std::fs::metadata(&self.path).unwrap().blocks()
    }

    /// The image's bytes.
    pub fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

/// A descriptor chain of `descs` on a fresh mock queue at address 0.
pub fn chain<'m>(mem: &'m GuestMemory, descs: &[Desc]) -> DescriptorChain<&'m GuestMemory> {
    let vq = MockSplitQueue::new(mem, 16);
    vq.add_desc_chains(&raw(descs, 0), 0).unwrap();
    let mut queue: Queue = vq.create_queue().unwrap();
    queue.iter(mem).unwrap().next().unwrap()
}

/// Writes a request header at `addr`.
pub fn header(mem: &GuestMemory, addr: u64, request_type: u32, sector: u64) {
    let mut bytes = [0u8; 16];
    bytes[..4].copy_from_slice(&request_type.to_le_bytes());
    bytes[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
}

/// Writes a discard/write-zeroes segment at `addr`.
pub fn segment(mem: &GuestMemory, addr: u64, sector: u64, sectors: u32, flags: u32) {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&sector.to_le_bytes());
    bytes[8..12].copy_from_slice(&sectors.to_le_bytes());
    bytes[12..].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
}

/// Reads one byte of guest memory.
pub fn byte_at(mem: &GuestMemory, addr: u64) -> u8 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

/// Reads `len` bytes of guest memory.
pub fn bytes_at(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

/// `len` bytes of a pattern that differs per `seed` and per position.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i % 251) as u8) | 1)
        .collect()
}

/// Runs `qemu-img ARGS`, which must succeed; returns its stdout.
pub fn qemu_img(args: &[&str]) -> String {
    let output = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run qemu-img ({e}); install qemu-utils (resources/install-host-deps.sh)")
        });
    assert!(
        output.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}
