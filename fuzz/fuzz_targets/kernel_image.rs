//! Kernel and firmware images as `zvmm kernel inspect` and `extract` see
//! them (ELF, bzImage, PE, compressed payloads), and as `--kernel` loads
//! them into guest memory.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Guest RAM the loader writes into: 64 MiB, mapped once.
fn memory() -> &'static GuestMemoryMmap {
    static MEM: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEM.get_or_init(|| {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).expect("guest memory")
    })
}

fuzz_target!(|data: &[u8]| {
    let report = loader::inspect::inspect_kernel(data);
    let _ = report.to_string();
    let _ = report.verdict.bootable();
    let _ = loader::extract::payload_compression(data);
    let _ = loader::extract::extract_vmlinux(data);
    let path = zvmm_fuzz::scratch_dir().join("kernel");
    std::fs::write(&path, data).expect("scratch file");
    let _ = loader::kernel::load_kernel(memory(), &path);
});
