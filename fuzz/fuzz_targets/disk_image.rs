//! Disk images as `--disk` opens them: format detection by magic numbers,
//! then (read-only, as detected or forced to qcow2) the image opened and
//! a few sectors read through it; and `zvmm image info` on the same file.
//! The input is written to a file on tmpfs first; its first byte picks
//! how the image is opened and where it is read.
#![no_main]

use std::sync::OnceLock;

use devices::virtio::block::{DiskImage, ImageOptions, ImageType};
use devices::virtio::GuestMemory;
use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryBackend};

/// Where the reads land: 64 KiB of guest memory, mapped once.
fn memory() -> &'static GuestMemory {
    static MEM: OnceLock<GuestMemory> = OnceLock::new();
    MEM.get_or_init(|| {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x1_0000)]).expect("guest memory")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, image)) = data.split_first() else {
        return;
    };
    let path = zvmm_fuzz::scratch_dir().join("disk.img");
    std::fs::write(&path, image).expect("scratch file");
    let _ = devices::virtio::block::format::detect(&path);
    let options = ImageOptions {
        readonly: true,
        image_type: (mode & 1 == 1).then_some(ImageType::Qcow2),
        backing_files: mode & 2 == 2,
    };
    if let Ok(disk) = DiskImage::open_with(&path, &options) {
        read_some(&disk, mode);
    }
    if let Ok(report) = vmm::image::info::inspect(&path) {
        let _ = report.to_string();
    }
});

/// Reads at the start, the end and a spot `mode` picks.
fn read_some(disk: &DiskImage, mode: u8) {
    let mem = memory();
    let Ok(slice) = mem.get_slice(GuestAddress(0), 0x1_0000) else {
        return;
    };
    let size = disk.size();
    let spot = size / 256 * u64::from(mode) & !511;
    for offset in [0, size.saturating_sub(0x1_0000) & !511, spot] {
        let len = 0x1_0000.min(size.saturating_sub(offset)) as usize;
        if len == 0 {
            continue;
        }
        let _ = disk.read_at(&[slice.subslice(0, len).expect("in range")], offset);
    }
}
