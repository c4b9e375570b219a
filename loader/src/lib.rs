//! Everything zvmm writes into guest memory before the first instruction:
//! kernel and initrd images, boot parameters (Linux zero page or PVH start
//! info), the command line and ACPI tables, at addresses from [`layout`].

pub mod acpi;
pub mod boot;
pub mod extract;
pub mod initrd;
pub mod inspect;
pub mod kernel;
pub mod layout;

/// What a path is when it is not a regular file ("a directory", "a FIFO",
/// ...), for errors about files zvmm must read whole.
pub(crate) fn file_kind_if_not_regular(metadata: &std::fs::Metadata) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    let kind = metadata.file_type();
    if kind.is_file() {
        None
    } else if kind.is_dir() {
        Some("a directory")
    } else if kind.is_fifo() {
        Some("a FIFO")
    } else if kind.is_socket() {
        Some("a socket")
    } else if kind.is_block_device() {
        Some("a block device")
    } else if kind.is_char_device() {
        Some("a character device")
    } else {
        Some("not a regular file")
    }
}
