//! End-to-end test helpers.
pub mod api;
pub mod assets;
pub mod bench;
pub mod ch;
pub mod container;
pub mod disk;
pub mod efi_disk;
pub mod fs;
pub mod image_tools;
pub mod images;
pub mod net;
pub mod probe;
pub mod qemu;
pub mod rng;
pub mod tiny;
pub mod vsock;
pub mod zvmm;
