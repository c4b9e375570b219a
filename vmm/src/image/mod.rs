//! `zvmm image`: disk image tools that keep sparse images sparse — `info`,
//! `create`, `copy`, `grow`, `convert` — for raw images (files and block
//! devices) and qcow2 images (through `imago`, backing chains included).
//!
//! - [`info`]: what an image is and holds (format, sizes, backing file,
//!   partitions, file system labels), as text or JSON.
//! - [`create`]: new raw (sparse) and qcow2 images, and growing one in
//!   place (never shrinking, never touching data).
//! - [`transfer`]: `copy` (onto a raw file or block device) and `convert`
//!   (raw ⇄ qcow2): holes found with `SEEK_DATA`/`SEEK_HOLE` or qcow2's
//!   mapping are skipped, data is copied with `copy_file_range`.
//! - [`partitions`]: GPT and MBR tables and file system signatures.
//! - [`cli`]: the `zvmm image` subcommands and their messages.
//! - `source`, `target`, `sparse`, `progress`: the image being read, the
//!   file being written (appearing under its name only when complete), the
//!   sparse-file system calls, the terminal progress line.
//!
//! Images are opened by zvmm and locked as `--disk` locks them (OFD locks:
//! a source shares a read lock, so a VM writing it is refused; `grow` and
//! a block device destination take the write lock).

pub mod cli;
pub mod create;
pub mod info;
pub mod partitions;
mod progress;
mod source;
mod sparse;
mod target;
pub mod transfer;

use std::io;
use std::path::PathBuf;

use devices::virtio::block::disk::DiskError;
use devices::virtio::block::format::{FormatError, ImageFormat};

pub use cli::ImageCommand;
pub use sparse::Zeroed;

/// Bytes per sector: image sizes must be whole sectors for `--disk`.
pub const SECTOR: u64 = 512;

/// A `zvmm image` command failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Opening or locking an image failed.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// Reading an image's header failed.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// Options that do not go together (exit status 2).
    #[error("{0}")]
    Usage(String),
    /// The path names nothing.
    #[error("{} does not exist", .0.display())]
    Missing(PathBuf),
    /// The path is not something that holds an image.
    #[error("{} is {what}; give an image file or a block device", .path.display())]
    NotAnImage {
        /// The path.
        path: PathBuf,
        /// "a directory", ...
        what: &'static str,
    },
    /// Another program holds a conflicting lock on the image.
    #[error("{} is {} by {holder}; stop it first", .path.display(), if *.writer { "open for writing" } else { "in use" })]
    InUse {
        /// The image.
        path: PathBuf,
        /// Who holds it.
        holder: String,
        /// Whether the holder writes it (so it cannot be read consistently).
        writer: bool,
    },
    /// A format `zvmm image` does not read.
    #[error("{} is {format}; zvmm image reads raw and qcow2 images only: convert it first with `qemu-img convert -O raw {} {}.raw`", .path.display(), .path.display(), .path.display())]
    Unsupported {
        /// The image.
        path: PathBuf,
        /// What it is.
        format: ImageFormat,
    },
    /// The qcow2 header asks for something zvmm does not do.
    #[error("{} {what}; convert it with `qemu-img convert -O qcow2 {} NEW` first", .path.display(), .path.display())]
    Qcow2Feature {
        /// The image.
        path: PathBuf,
        /// "is encrypted", ...
        what: &'static str,
    },
    /// imago failed on a qcow2 image.
    #[error("cannot {action} qcow2 image {}", .path.display())]
    Qcow2 {
        /// The image.
        path: PathBuf,
        /// "open", "create", "write", "resize".
        action: &'static str,
        /// imago's error.
        #[source]
        source: io::Error,
    },
    /// The destination exists and `--force` was not given.
    #[error("{} exists; pass --force to replace it", .0.display())]
    Exists(PathBuf),
    /// The destination is a directory or another non-image file.
    #[error("{} is {what}; give a file name or a block device", .path.display())]
    BadDestination {
        /// The destination.
        path: PathBuf,
        /// "a directory", ...
        what: &'static str,
    },
    /// A block device cannot take what was asked.
    #[error("{} is a block device; {what}", .path.display())]
    BlockDevice {
        /// The device.
        path: PathBuf,
        /// What to do instead.
        what: String,
    },
    /// A size that is not whole sectors.
    #[error("size {size} is not a multiple of 512 bytes; use {}", .size.div_ceil(SECTOR) * SECTOR)]
    Unaligned {
        /// The size asked for.
        size: u64,
    },
    /// A size of zero.
    #[error("a disk image of 0 bytes is useless; give a size such as 10G")]
    ZeroSize,
    /// A size below what the image already holds.
    #[error("{} is {} ({current} bytes); {what} never shrinks an image: give a size of at least {current}", .path.display(), human(*.current))]
    Shrink {
        /// The image.
        path: PathBuf,
        /// Its size now.
        current: u64,
        /// "grow", "copy --size".
        what: &'static str,
    },
    /// A qcow2 backing file that cannot be used.
    #[error("backing file {} {what}", .path.display())]
    Backing {
        /// The backing file as resolved.
        path: PathBuf,
        /// What is wrong, with what to do.
        what: String,
    },
    /// The source and destination are the same file or device.
    #[error("{} and {} are the same image; copy to another file", .src.display(), .dst.display())]
    SameImage {
        /// The source.
        src: PathBuf,
        /// The destination.
        dst: PathBuf,
    },
    /// Reading an image failed.
    #[error("cannot read {}", .path.display())]
    Read {
        /// The image.
        path: PathBuf,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// Copying between two files in the kernel failed.
    #[error("cannot copy {} to {}", .src.display(), .dst.display())]
    Copy {
        /// The source.
        src: PathBuf,
        /// The destination.
        dst: PathBuf,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// Writing the destination failed.
    #[error("cannot write {}", .path.display())]
    Write {
        /// The destination.
        path: PathBuf,
        /// The system error.
        #[source]
        source: io::Error,
    },
}

impl ImageError {
    /// Turns a lock conflict into a message about image tools rather than
    /// VMs; other open errors pass through.
    fn from_disk(error: DiskError) -> ImageError {
        match error {
            DiskError::Locked { path, holder } => ImageError::InUse {
                path,
                holder,
                writer: false,
            },
            DiskError::LockedByWriter { path, holder } => ImageError::InUse {
                path,
                holder,
                writer: true,
            },
            DiskError::Missing { path } => ImageError::Missing(path),
            other => ImageError::Disk(other),
        }
    }
}

/// A size for an image: whole sectors, not zero.
pub fn check_size(size: u64) -> Result<u64, ImageError> {
    match size {
        0 => Err(ImageError::ZeroSize),
        size if !size.is_multiple_of(SECTOR) => Err(ImageError::Unaligned { size }),
        size => Ok(size),
    }
}

/// "1 GiB", "3.1 MiB", "512 bytes".
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    let mut value = bytes as f64;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else if value.fract() == 0.0 {
        format!("{value} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(human(0), "0 bytes");
        assert_eq!(human(512), "512 bytes");
        assert_eq!(human(1 << 30), "1 GiB");
        assert_eq!(human(3 * (1 << 20) + (1 << 19)), "3.5 MiB");
        assert_eq!(human(10 << 40), "10 TiB");
    }

    #[test]
    fn image_sizes_are_whole_nonzero_sectors() {
        assert_eq!(check_size(1 << 30).unwrap(), 1 << 30);
        assert!(matches!(check_size(0), Err(ImageError::ZeroSize)));
        let unaligned = check_size(1000).unwrap_err();
        assert_eq!(
            unaligned.to_string(),
            "size 1000 is not a multiple of 512 bytes; use 1024"
        );
    }
}
