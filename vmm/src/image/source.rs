//! The image a `zvmm image` command reads: a raw file or block device, or
//! a qcow2 image with its backing chain (imago), seen as the guest sees
//! it. [`Source::piece_at`] maps it into pieces — data stored at an offset
//! of some host file, zeroes, or bytes only imago can decode (compressed
//! clusters) — so a copy skips holes and copies data in the kernel.
//!
//! Every file of a qcow2 chain is opened by zvmm (through an imago open
//! gate): read-only, with the same shared lock `--disk readonly=on` takes
//! when [`Locking::Shared`], at most [`MAX_CHAIN`] deep, never twice
//! (a loop). Encrypted images and external data files are refused.

use std::cell::RefCell;
use std::fs::{File, Metadata};
use std::io::{self, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use devices::virtio::block::disk::LockedImage;
use devices::virtio::block::format::{self, ImageFormat, ImageInfo};
use imago::file::File as ImagoFile;
use imago::format::gate::ImplicitOpenGate;
use imago::qcow2::Qcow2;
use imago::{FormatAccess, FormatDriverBuilder, Mapping, Storage, StorageOpenOptions};

use super::sparse::{self, Region};
use super::ImageError;

/// Most images in a backing chain (the top one included).
pub const MAX_CHAIN: usize = 16;

/// Whether sources are locked against writers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Locking {
    /// A shared read lock on each file: refused while a VM writes it.
    Shared,
    /// No lock (`info`, which only looks).
    None,
}

/// What the bytes of one piece of the guest view are.
#[derive(Debug)]
pub enum PieceKind<'a> {
    /// Reads as zeroes.
    Zero,
    /// Stored in `file` at `offset`.
    Data {
        /// The host file (the raw image, or a file of the qcow2 chain).
        file: &'a File,
        /// Where in it.
        offset: u64,
    },
    /// Only [`Source::read_at`] can produce these bytes.
    Encoded,
}

/// A run of the guest view with one kind.
#[derive(Debug)]
pub struct Piece<'a> {
    /// Bytes in the run (> 0).
    pub len: u64,
    /// What they are.
    pub kind: PieceKind<'a>,
}

/// An image opened for reading.
#[derive(Debug)]
pub struct Source {
    path: PathBuf,
    meta: Metadata,
    size: u64,
    kind: SourceKind,
}

#[derive(Debug)]
enum SourceKind {
    Raw(File),
    Qcow2(Qcow2Chain),
}

#[derive(Debug)]
struct Qcow2Chain {
    image: FormatAccess<ImagoFile>,
    /// Every file of the chain, top first, by the name imago knows it.
    files: Vec<ChainFile>,
}

#[derive(Debug)]
struct ChainFile {
    path: PathBuf,
    identity: (u64, u64),
    file: File,
}

impl Source {
    /// Opens the raw or qcow2 image at `path` (other formats refused).
    pub fn open(path: &Path, locking: Locking) -> Result<Source, ImageError> {
        let (file, meta, size) = open_file(path, locking)?;
        let info = format::detect_file(&file, size).map_err(|source| read_error(path, source))?;
        let kind = match info.format {
            ImageFormat::Raw | ImageFormat::Iso9660 => SourceKind::Raw(file),
            ImageFormat::Qcow2 => {
                check_qcow2(path, &info)?;
                SourceKind::Qcow2(Qcow2Chain::open(path, file, &meta, locking)?)
            }
            format => {
                return Err(ImageError::Unsupported {
                    path: path.to_path_buf(),
                    format,
                })
            }
        };
        let size = match &kind {
            SourceKind::Raw(_) => size,
            SourceKind::Qcow2(chain) => chain.image.size(),
        };
        Ok(Source {
            path: path.to_path_buf(),
            meta,
            size,
            kind,
        })
    }

    /// The path it was opened by.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Raw or qcow2.
    pub fn format(&self) -> ImageFormat {
        match self.kind {
            SourceKind::Raw(_) => ImageFormat::Raw,
            SourceKind::Qcow2(_) => ImageFormat::Qcow2,
        }
    }

    /// The guest-visible size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The top file's metadata (as opened).
    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }

    /// (st_dev, st_ino) of a file, (st_rdev, 0) of a block device.
    pub fn identity(&self) -> (u64, u64) {
        identity(&self.meta)
    }

    /// The backing files below a qcow2 image, nearest first.
    pub fn backing_chain(&self) -> Vec<PathBuf> {
        match &self.kind {
            SourceKind::Raw(_) => Vec::new(),
            SourceKind::Qcow2(chain) => chain.files[1..].iter().map(|f| f.path.clone()).collect(),
        }
    }

    /// The piece of the guest view at `offset` (< size), at most `max_len`.
    pub fn piece_at(&self, offset: u64, max_len: u64) -> io::Result<Piece<'_>> {
        let end = (offset + max_len).min(self.size);
        match &self.kind {
            SourceKind::Raw(file) => Ok(file_piece(file, offset, end - offset)?),
            SourceKind::Qcow2(chain) => chain.piece_at(offset, end - offset),
        }
    }

    /// Reads the guest view at `offset` into `buf` (zeroes past the end).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match &self.kind {
            SourceKind::Raw(file) => sparse::read_full(file, buf, offset),
            SourceKind::Qcow2(chain) => {
                let inside = usize::try_from(self.size.saturating_sub(offset))
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                buf[inside..].fill(0);
                if inside == 0 {
                    return Ok(());
                }
                chain.image.read(&mut buf[..inside], offset)
            }
        }
    }
}

/// The data or hole run of `file` at `offset`, at most `len` long.
fn file_piece(file: &File, offset: u64, len: u64) -> io::Result<Piece<'_>> {
    let (region, end) = sparse::region_at(file, offset, offset + len)?;
    let kind = match region {
        Region::Hole => PieceKind::Zero,
        Region::Data => PieceKind::Data { file, offset },
    };
    Ok(Piece {
        len: end - offset,
        kind,
    })
}

impl Qcow2Chain {
    fn open(
        path: &Path,
        file: File,
        meta: &Metadata,
        locking: Locking,
    ) -> Result<Qcow2Chain, ImageError> {
        let qcow2_error = |source| ImageError::Qcow2 {
            path: path.to_path_buf(),
            action: "open",
            source,
        };
        let files = Rc::new(RefCell::new(vec![ChainFile {
            path: path.to_path_buf(),
            identity: identity(meta),
            file: file.try_clone().map_err(|e| read_error(path, e))?,
        }]));
        let options = StorageOpenOptions::new().write(false).filename(path);
        let storage = ImagoFile::from_open_file(file, options).map_err(qcow2_error)?;
        let gate = ChainGate {
            files: Rc::clone(&files),
            depth: 1,
            locking,
        };
        let qcow2 = Qcow2::<ImagoFile>::builder(storage)
            .write(false)
            .open(gate)
            .map_err(qcow2_error)?;
        let files = files.take();
        Ok(Qcow2Chain {
            image: FormatAccess::new(qcow2),
            files,
        })
    }

    fn piece_at(&self, offset: u64, len: u64) -> io::Result<Piece<'_>> {
        let (mapping, mapped) = self.image.get_mapping(offset, len)?;
        let mapped = mapped.min(len);
        let zero = Piece {
            len: if mapped == 0 { len } else { mapped },
            kind: PieceKind::Zero,
        };
        match mapping {
            Mapping::Raw {
                storage,
                offset: host,
                ..
            } if mapped > 0 => {
                let file = storage
                    .get_filename()
                    .and_then(|name| self.files.iter().find(|f| f.path == name));
                match file {
                    // A hole inside an allocated cluster still reads as zeroes.
                    Some(chain_file) => file_piece(&chain_file.file, host, mapped),
                    None => Ok(Piece {
                        len: mapped,
                        kind: PieceKind::Encoded,
                    }),
                }
            }
            Mapping::Zero { .. } | Mapping::Eof { .. } => Ok(zero),
            _ if mapped == 0 => Ok(zero),
            _ => Ok(Piece {
                len: mapped,
                kind: PieceKind::Encoded,
            }),
        }
    }
}

/// Opens the backing files imago finds in headers, the way zvmm opens
/// the top image (see the module doc).
struct ChainGate {
    files: Rc<RefCell<Vec<ChainFile>>>,
    depth: usize,
    locking: Locking,
}

impl ImplicitOpenGate<ImagoFile> for ChainGate {
    fn open_format<F: FormatDriverBuilder<ImagoFile>>(
        &mut self,
        builder: F,
    ) -> io::Result<FormatAccess<ImagoFile>> {
        let below = ChainGate {
            files: Rc::clone(&self.files),
            depth: self.depth + 1,
            locking: self.locking,
        };
        Ok(FormatAccess::new(builder.write(false).open(below)?))
    }

    fn open_storage(&mut self, options: StorageOpenOptions) -> io::Result<ImagoFile> {
        let path = options
            .get_filename()
            .map(Path::to_path_buf)
            .ok_or_else(|| io::Error::other("a backing file without a name"))?;
        if options.get_writable() {
            return Err(io::Error::other(
                "external data files are not supported; merge it with `qemu-img convert`",
            ));
        }
        if self.depth >= MAX_CHAIN {
            return Err(io::Error::other(format!(
                "the backing chain is deeper than {MAX_CHAIN} images"
            )));
        }
        let (file, meta, _) =
            open_file(&path, self.locking).map_err(|e| io::Error::other(e.to_string()))?;
        let mut files = self.files.borrow_mut();
        if files.iter().any(|f| f.identity == identity(&meta)) {
            return Err(io::Error::other(format!(
                "the backing chain loops: {} appears twice",
                path.display()
            )));
        }
        files.push(ChainFile {
            path: path.clone(),
            identity: identity(&meta),
            file: file.try_clone()?,
        });
        ImagoFile::from_open_file(file, options.filename(&path))
    }
}

/// Refuses qcow2 features zvmm does not read.
pub fn check_qcow2(path: &Path, info: &ImageInfo) -> Result<(), ImageError> {
    let Some(header) = &info.qcow2 else {
        return Ok(());
    };
    let what = if header.crypt_method != 0 {
        "is an encrypted qcow2 image, which zvmm cannot read"
    } else if header.external_data_file {
        "keeps its data in an external data file, which zvmm does not follow"
    } else {
        return Ok(());
    };
    Err(ImageError::Qcow2Feature {
        path: path.to_path_buf(),
        what,
    })
}

/// Opens `path` read-only (locked as asked): the file, its metadata and
/// its size (a block device's capacity).
pub fn open_file(path: &Path, locking: Locking) -> Result<(File, Metadata, u64), ImageError> {
    let file = match locking {
        Locking::Shared => LockedImage::open(path, true)
            .map_err(ImageError::from_disk)?
            .into_file(),
        Locking::None => open_unlocked(path)?,
    };
    let meta = file.metadata().map_err(|e| read_error(path, e))?;
    check_kind(path, &meta)?;
    let size = (&file)
        .seek(SeekFrom::End(0))
        .map_err(|e| read_error(path, e))?;
    Ok((file, meta, size))
}

/// Opens `path` read-only without blocking (a FIFO must not hang the
/// command; it is refused once opened).
fn open_unlocked(path: &Path) -> Result<File, ImageError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => ImageError::Missing(path.to_path_buf()),
            _ => read_error(path, source),
        })
}

/// Only regular files and block devices hold images.
fn check_kind(path: &Path, meta: &Metadata) -> Result<(), ImageError> {
    use std::os::unix::fs::FileTypeExt;
    let kind = meta.file_type();
    let what = if kind.is_dir() {
        "a directory"
    } else if !kind.is_file() && !kind.is_block_device() {
        "neither a regular file nor a block device"
    } else {
        return Ok(());
    };
    Err(ImageError::NotAnImage {
        path: path.to_path_buf(),
        what,
    })
}

/// (st_dev, st_ino) of a file, (st_rdev, 0) of a block device.
pub fn identity(meta: &Metadata) -> (u64, u64) {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    if meta.file_type().is_block_device() {
        (meta.rdev(), 0)
    } else {
        (meta.dev(), meta.ino())
    }
}

fn read_error(path: &Path, source: io::Error) -> ImageError {
    ImageError::Read {
        path: path.to_path_buf(),
        source,
    }
}
