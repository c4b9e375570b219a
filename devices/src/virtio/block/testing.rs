//! Test helpers for virtio-blk: guest memory, sparse images in a temporary
//! directory, descriptor chains built with `MockSplitQueue`, requests run
//! through `request::process`, and qemu-img.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempdir::TempDir;

use super::disk::DiskError;
use super::image::{DiskImage, ImageError, ImageType};
use super::request::{self, Backend, BlockCounters};
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

/// A request backend on `disk` with a fixed serial and fresh counters.
pub fn backend_on(disk: DiskImage) -> Backend {
    Backend {
        disk: Arc::new(disk),
        id: *b"test-serial-0123456\0",
        counters: Arc::new(BlockCounters::default()),
    }
}

/// Runs the chain `descs` through `request::process`; returns the used
/// length and the status byte.
pub fn run(mem: &GuestMemory, backend: &Backend, descs: &[Desc]) -> (u32, u8) {
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let used = request::process(chain(mem, descs), mem, backend);
    (used, byte_at(mem, STATUS))
}

/// Writes `data` at `sector` (one data descriptor); returns the status.
pub fn write_sectors(mem: &GuestMemory, backend: &Backend, sector: u64, data: &[u8]) -> u8 {
    header(mem, HEADER, VIRTIO_BLK_T_OUT, sector);
    mem.write_slice(data, GuestAddress(DATA)).unwrap();
    let descs = [r(HEADER, 16), r(DATA, data.len() as u32), w(STATUS, 1)];
    run(mem, backend, &descs).1
}

/// Reads `len` bytes at `sector`; returns the status and the data.
pub fn read_sectors(mem: &GuestMemory, backend: &Backend, sector: u64, len: u32) -> (u8, Vec<u8>) {
    header(mem, HEADER, VIRTIO_BLK_T_IN, sector);
    let (_, status) = run(mem, backend, &[r(HEADER, 16), w(DATA, len), w(STATUS, 1)]);
    (status, bytes_at(mem, DATA, len as usize))
}

/// A DISCARD or WRITE_ZEROES request of one segment; returns the status.
pub fn discard_or_zero(
    mem: &GuestMemory,
    backend: &Backend,
    request_type: u32,
    (sector, sectors): (u64, u32),
    flags: u32,
) -> u8 {
    header(mem, HEADER, request_type, 0);
    segment(mem, HEADER + 16, sector, sectors, flags);
    run(mem, backend, &[r(HEADER, 32), w(STATUS, 1)]).1
}

/// A FLUSH request; returns the status.
pub fn flush(mem: &GuestMemory, backend: &Backend) -> u8 {
    header(mem, HEADER, VIRTIO_BLK_T_FLUSH, 0);
    run(mem, backend, &[r(HEADER, 16), w(STATUS, 1)]).1
}

/// The value of counter `name`.
pub fn counter(backend: &Backend, name: &str) -> u64 {
    let all = backend.counters.snapshot();
    all.iter().find(|(n, _)| *n == name).unwrap().1
}

/// Opens an image, retrying for a while on a lock conflict: a process
/// another test thread is spawning (qemu-img) holds a copy of every open
/// file description between its fork and its exec, so a lock dropped here
/// can linger for a moment. For tests that expect no conflict.
pub fn open_retrying(
    path: &std::path::Path,
    readonly: bool,
    image_type: Option<ImageType>,
) -> Result<DiskImage, ImageError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match DiskImage::open(path, readonly, image_type) {
            Err(ImageError::Disk(DiskError::Locked { .. } | DiskError::LockedByWriter { .. }))
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// [`open_retrying`] for an image that must open.
pub fn open_image(
    path: &std::path::Path,
    readonly: bool,
    image_type: Option<ImageType>,
) -> DiskImage {
    open_retrying(path, readonly, image_type)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()))
}
