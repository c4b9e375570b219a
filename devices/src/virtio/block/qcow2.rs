//! qcow2 images (versions 2 and 3) as virtio-blk backends, through the
//! `imago` crate's synchronous API: reads and writes straight between guest
//! memory and the image (imago maps guest offsets to clusters, allocating
//! on write), flush (imago's metadata caches, then `fdatasync`), discard and
//! write-zeroes as zero clusters, and a backing chain.
//!
//! Every file of the chain is opened and locked by zvmm, never by imago
//! (its implicit opens are denied): the top image as the disk asks
//! (read-write: an exclusive lock), each backing file read-only with a
//! shared lock, so many VMs can share one base image while each writes its
//! own overlay, and nobody can write the base meanwhile. A backing file is
//! resolved against the directory of the image naming it, must be raw or
//! qcow2 (the header's backing format, else detected), and the chain may
//! neither loop nor be deeper than [`MAX_CHAIN`]. Encrypted images and
//! external data files are refused.
//!
//! I/O is serialised per disk by a `RwLock`: reads, writes and flushes take
//! it shared (imago's `FormatAccess` handles concurrent requests itself),
//! discards take it exclusive, since imago may free clusters that a
//! concurrent request still maps.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use imago::file::File as ImagoFile;
use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{FormatAccess, StorageOpenOptions};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use super::disk::{DiskError, LockedImage, SECTOR_SIZE};
use super::format::{self, ImageFormat, ImageInfo};

/// Most backing files below one image.
pub const MAX_CHAIN: usize = 16;

/// Zeroes written per request when the image cannot make zero clusters.
const ZERO_CHUNK: usize = 64 * 1024;
static ZEROES: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];

type ImagoImage = FormatAccess<ImagoFile>;

/// A qcow2 image or its backing chain could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// Opening or locking a file of the chain failed.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// Reading a backing file's header failed.
    #[error(transparent)]
    Format(#[from] format::FormatError),
    /// imago refused the image.
    #[error("cannot open qcow2 image {}", .path.display())]
    Open {
        /// The image path.
        path: PathBuf,
        /// imago's error.
        #[source]
        source: io::Error,
    },
    /// The header says the data is encrypted.
    #[error("disk image {} is an encrypted qcow2 image, which zvmm cannot open; decrypt it with `qemu-img convert` first", .path.display())]
    Encrypted {
        /// The image path.
        path: PathBuf,
    },
    /// The data lives in an external data file.
    #[error("disk image {} keeps its data in an external data file, which zvmm does not support; merge it with `qemu-img convert -O qcow2`", .path.display())]
    ExternalDataFile {
        /// The image path.
        path: PathBuf,
    },
    /// An incompatible feature imago cannot handle.
    #[error("qcow2 image {} {what}; {fix}", .path.display())]
    Feature {
        /// The image path.
        path: PathBuf,
        /// What the feature bit says about the image.
        what: &'static str,
        /// The command that makes it usable.
        fix: String,
    },
    /// The virtual size is not a whole number of sectors.
    #[error("qcow2 image {} has a virtual size of {size} bytes, not a multiple of 512; fix it with `qemu-img resize {} {}`", .path.display(), .path.display(), .size.div_ceil(SECTOR_SIZE) * SECTOR_SIZE)]
    Unaligned {
        /// The image path.
        path: PathBuf,
        /// The virtual size.
        size: u64,
    },
    /// The backing file name cannot be used as a path.
    #[error("backing file '{name}' of {} is not a file name zvmm can open", .image.display())]
    BackingName {
        /// The image naming it.
        image: PathBuf,
        /// The name in the header.
        name: String,
    },
    /// A backing file is missing.
    #[error("backing file {} of {} does not exist", .backing.display(), .image.display())]
    BackingMissing {
        /// The image naming it.
        image: PathBuf,
        /// The resolved backing path.
        backing: PathBuf,
    },
    /// A backing file is in a format zvmm does not follow.
    #[error("backing file {} of {} is {format}; zvmm follows raw and qcow2 backing files only (convert it with `qemu-img convert -O qcow2 {} NEW` and point the image at NEW with `qemu-img rebase -u -F qcow2 -b NEW {}`)", .backing.display(), .image.display(), .backing.display(), .image.display())]
    BackingFormat {
        /// The image naming it.
        image: PathBuf,
        /// The resolved backing path.
        backing: PathBuf,
        /// What it is (or claims to be).
        format: String,
    },
    /// The chain names one file twice.
    #[error("the backing chain of {} loops: {} appears twice", .image.display(), .backing.display())]
    Loop {
        /// The top image.
        image: PathBuf,
        /// The file seen twice.
        backing: PathBuf,
    },
    /// The chain is deeper than [`MAX_CHAIN`].
    #[error("the backing chain of {} is deeper than {MAX_CHAIN} images", .image.display())]
    TooDeep {
        /// The top image.
        image: PathBuf,
    },
}

/// An open qcow2 image with its backing chain.
#[derive(Debug)]
pub struct Qcow2Disk {
    image: RwLock<ImagoImage>,
    path: PathBuf,
    readonly: bool,
    size: u64,
    identity: (u64, u64),
    cluster_size: u64,
    version: u32,
    chain: Vec<PathBuf>,
}

impl Qcow2Disk {
    /// Opens the qcow2 image `locked` (whose header `info` describes) and
    /// its backing chain.
    pub fn open(locked: LockedImage, info: &ImageInfo) -> Result<Qcow2Disk, Qcow2Error> {
        let path = locked.path().to_path_buf();
        let header = check_header(&path, info)?;
        let identity = locked.identity();
        let readonly = locked.readonly();
        let mut chain = ChainBuilder {
            top: path.clone(),
            seen: vec![identity],
            paths: Vec::new(),
        };
        let backing = chain.backing_of(&path, info)?;
        let image = open_qcow2(locked, backing)?;
        Ok(Qcow2Disk {
            size: image.size(),
            image: RwLock::new(image),
            path,
            readonly,
            identity,
            cluster_size: header.cluster_size,
            version: header.version,
            chain: chain.paths,
        })
    }

    /// The path the image was opened by.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the image was opened read-only.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Virtual size in bytes (a multiple of [`SECTOR_SIZE`]).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// (st_dev, st_ino) of the image file (st_rdev, 0 of a device).
    pub fn identity(&self) -> (u64, u64) {
        self.identity
    }

    /// Bytes per cluster: the unit discards free.
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// qcow2 version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The backing files, nearest first.
    pub fn backing_chain(&self) -> &[PathBuf] {
        &self.chain
    }

    /// Reads guest bytes at `offset` into `slices`.
    pub fn read_at<B: BitmapSlice>(
        &self,
        slices: &[VolatileSlice<B>],
        offset: u64,
    ) -> io::Result<()> {
        let (vector, _guard) = IoVectorMut::from_volatile_slice(slices);
        self.shared().readv(vector, offset)
    }

    /// Writes the bytes of `slices` at `offset`.
    pub fn write_at<B: BitmapSlice>(
        &self,
        slices: &[VolatileSlice<B>],
        offset: u64,
    ) -> io::Result<()> {
        let (vector, _guard) = IoVector::from_volatile_slice(slices);
        self.shared().writev(vector, offset)
    }

    /// Writes imago's cached metadata out and makes everything durable.
    pub fn flush(&self) -> io::Result<()> {
        let image = self.shared();
        image.flush()?;
        image.sync()
    }

    /// Frees the clusters wholly inside the range (they read as zeroes
    /// after it). qcow2 v2 has no zero clusters: there discard does nothing
    /// (it is only a hint).
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut image = self.image.write().unwrap_or_else(|e| e.into_inner());
        match image.discard_to_zero(offset, len) {
            Err(e) if e.kind() == io::ErrorKind::Unsupported => Ok(()),
            other => other,
        }
    }

    /// Makes the range read as zeroes: zero clusters (freed when `unmap`
    /// allows), zeroes written around them; on qcow2 v2, zeroes written.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let result = if unmap {
            let mut image = self.image.write().unwrap_or_else(|e| e.into_inner());
            image.discard_to_zero(offset, len)
        } else {
            self.shared().write_zeroes(offset, len)
        };
        match result {
            Err(e) if e.kind() == io::ErrorKind::Unsupported => self.write_zero_bytes(offset, len),
            other => other,
        }
    }

    fn write_zero_bytes(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let image = self.shared();
        let end = offset + len;
        while offset < end {
            let chunk = (end - offset).min(ZERO_CHUNK as u64) as usize;
            image.write(&ZEROES[..chunk], offset)?;
            offset += chunk as u64;
        }
        Ok(())
    }

    fn shared(&self) -> std::sync::RwLockReadGuard<'_, ImagoImage> {
        self.image.read().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Qcow2Disk {
    /// imago flushes its caches on drop too, but only logs a failure
    /// (through `tracing`, which zvmm does not collect); say it here.
    fn drop(&mut self) {
        if self.readonly {
            return;
        }
        if let Err(e) = self.flush() {
            eprintln!(
                "zvmm: qcow2 image {}: writing its metadata out failed: {e}; check it with `qemu-img check`",
                self.path.display()
            );
        }
    }
}

/// The header checks imago would fail with a less helpful message.
fn check_header<'i>(
    path: &Path,
    info: &'i ImageInfo,
) -> Result<&'i format::Qcow2Header, Qcow2Error> {
    let Some(header) = info.qcow2.as_ref() else {
        let defect = info.defect.unwrap_or("not a qcow2 image");
        return Err(Qcow2Error::Open {
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidData, defect),
        });
    };
    if header.crypt_method != 0 {
        return Err(Qcow2Error::Encrypted {
            path: path.to_path_buf(),
        });
    }
    if header.external_data_file {
        return Err(Qcow2Error::ExternalDataFile {
            path: path.to_path_buf(),
        });
    }
    if let Some((what, fix)) = unsupported_feature(path, header.incompatible_features) {
        return Err(Qcow2Error::Feature {
            path: path.to_path_buf(),
            what,
            fix,
        });
    }
    if !header.size.is_multiple_of(SECTOR_SIZE) {
        return Err(Qcow2Error::Unaligned {
            path: path.to_path_buf(),
            size: header.size,
        });
    }
    Ok(header)
}

/// The first incompatible feature bit imago refuses, as (what it means,
/// the command that fixes the image).
fn unsupported_feature(path: &Path, bits: u64) -> Option<(&'static str, String)> {
    let shown = path.display();
    let repair = || format!("repair it with `qemu-img check -r all {shown}`");
    let convert = || {
        format!(
            "convert it with `qemu-img convert -O qcow2 -o compression_type=zlib,extended_l2=off \
             {shown} NEW` and attach NEW"
        )
    };
    let features: [(u32, &'static str, &dyn Fn() -> String); 4] = [
        (0, "was not closed cleanly (dirty, lazy refcounts)", &repair),
        (1, "is marked corrupt", &repair),
        (
            3,
            "uses zstd-compressed clusters, which zvmm's qcow2 driver (imago) cannot read",
            &convert,
        ),
        (
            4,
            "uses extended L2 entries (subclusters), which zvmm's qcow2 driver (imago) cannot read",
            &convert,
        ),
    ];
    features
        .iter()
        .find(|(bit, _, _)| bits & (1 << bit) != 0)
        .map(|(_, what, fix)| (*what, fix()))
}

/// Opens the qcow2 image in `locked` through imago with `backing` below it.
fn open_qcow2(locked: LockedImage, backing: Option<ImagoImage>) -> Result<ImagoImage, Qcow2Error> {
    let path = locked.path().to_path_buf();
    let writable = !locked.readonly();
    let open_error = |source| Qcow2Error::Open {
        path: path.clone(),
        source,
    };
    let options = StorageOpenOptions::new().write(writable).filename(&path);
    let storage = ImagoFile::from_open_file(locked.into_file(), options).map_err(open_error)?;
    let mut qcow2 = Qcow2::<ImagoFile>::open_image(storage, writable).map_err(open_error)?;
    qcow2.set_data_file(None);
    qcow2.set_backing(backing);
    Ok(FormatAccess::new(qcow2))
}

/// Opens a raw backing file through imago.
fn open_raw(locked: LockedImage) -> Result<ImagoImage, Qcow2Error> {
    let path = locked.path().to_path_buf();
    let open_error = |source| Qcow2Error::Open {
        path: path.clone(),
        source,
    };
    let options = StorageOpenOptions::new().write(false).filename(&path);
    let storage = ImagoFile::from_open_file(locked.into_file(), options).map_err(open_error)?;
    let raw = Raw::open_image(storage, false).map_err(open_error)?;
    Ok(FormatAccess::new(raw))
}

/// Walks a backing chain, opening each file read-only.
struct ChainBuilder {
    top: PathBuf,
    seen: Vec<(u64, u64)>,
    paths: Vec<PathBuf>,
}

impl ChainBuilder {
    /// The backing image of `image` (described by `info`), opened with its
    /// own backing chain, or `None`.
    fn backing_of(
        &mut self,
        image: &Path,
        info: &ImageInfo,
    ) -> Result<Option<ImagoImage>, Qcow2Error> {
        let Some(name) = info.backing_file.as_deref() else {
            return Ok(None);
        };
        if self.paths.len() >= MAX_CHAIN {
            return Err(Qcow2Error::TooDeep {
                image: self.top.clone(),
            });
        }
        let backing = resolve_backing(image, name)?;
        let locked = self.lock(image, &backing)?;
        self.paths.push(backing.clone());
        let backing_info = format::detect_file(locked.file(), locked.size()).map_err(|source| {
            format::FormatError::Read {
                path: backing.clone(),
                source,
            }
        })?;
        match backing_format(info, &backing_info) {
            Some(ImageFormat::Raw) => open_raw(locked).map(Some),
            Some(ImageFormat::Qcow2) => {
                check_header(&backing, &backing_info)?;
                let below = self.backing_of(&backing, &backing_info)?;
                open_qcow2(locked, below).map(Some)
            }
            _ => Err(Qcow2Error::BackingFormat {
                image: image.to_path_buf(),
                backing,
                format: describe_backing(info, &backing_info),
            }),
        }
    }

    /// Opens `backing` read-only (shared lock), refusing a loop first (a
    /// writable top image would otherwise show up as a lock conflict).
    fn lock(&mut self, image: &Path, backing: &Path) -> Result<LockedImage, Qcow2Error> {
        if let Ok(meta) = std::fs::metadata(backing) {
            let identity = if meta.file_type().is_block_device() {
                (meta.rdev(), 0)
            } else {
                (meta.dev(), meta.ino())
            };
            if self.seen.contains(&identity) {
                return Err(Qcow2Error::Loop {
                    image: self.top.clone(),
                    backing: backing.to_path_buf(),
                });
            }
        }
        let locked = LockedImage::open(backing, true).map_err(|e| match e {
            DiskError::Missing { .. } => Qcow2Error::BackingMissing {
                image: image.to_path_buf(),
                backing: backing.to_path_buf(),
            },
            other => Qcow2Error::Disk(other),
        })?;
        self.seen.push(locked.identity());
        Ok(locked)
    }
}

/// How to open a backing file: the format its overlay names, else the
/// detected one (only raw and qcow2 are followed).
fn backing_format(overlay: &ImageInfo, backing: &ImageInfo) -> Option<ImageFormat> {
    match overlay.backing_format.as_deref() {
        Some("raw" | "file") => Some(ImageFormat::Raw),
        Some("qcow2") if backing.format == ImageFormat::Qcow2 => Some(ImageFormat::Qcow2),
        Some(_) => None,
        None => match backing.format {
            ImageFormat::Raw | ImageFormat::Qcow2 => Some(backing.format),
            _ => None,
        },
    }
}

fn describe_backing(overlay: &ImageInfo, backing: &ImageInfo) -> String {
    match overlay.backing_format.as_deref() {
        Some("qcow2") => format!("{} although the header says qcow2", backing.format),
        Some(named) => format!("named as backing format '{named}'"),
        None => backing.format.to_string(),
    }
}

/// Name prefixes QEMU reads as a protocol rather than a file.
const PROTOCOLS: [&str; 12] = [
    "json", "nbd", "nbd+unix", "http", "https", "ftp", "ftps", "iscsi", "rbd", "ssh", "gluster",
    "nfs",
];

/// `name` relative to the directory of `image` (QEMU's rule); `file:` is
/// dropped, protocol and `json:` names are refused.
fn resolve_backing(image: &Path, name: &str) -> Result<PathBuf, Qcow2Error> {
    let name = name.strip_prefix("file:").unwrap_or(name);
    let protocol = name
        .split_once(':')
        .is_some_and(|(head, _)| PROTOCOLS.contains(&head));
    if name.is_empty() || name.contains('\0') || protocol {
        return Err(Qcow2Error::BackingName {
            image: image.to_path_buf(),
            name: name.to_string(),
        });
    }
    let name = Path::new(name);
    if name.is_absolute() {
        return Ok(name.to_path_buf());
    }
    let dir = image.parent().unwrap_or(Path::new(""));
    Ok(dir.join(name))
}

#[cfg(test)]
mod tests;
