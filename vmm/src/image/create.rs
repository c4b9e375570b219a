//! `zvmm image create` (a sparse raw file, or a qcow2 image through imago,
//! optionally over a backing file) and `zvmm image grow` (a raw file or
//! qcow2 image made larger in place: never smaller, data untouched).
//!
//! A qcow2 backing file is recorded as given — like `qemu-img create -b`,
//! a relative name is relative to the new image's directory — together
//! with its format (raw or qcow2, detected), and must exist. Without a
//! SIZE the image takes the backing file's size.

use std::fs::File;
use std::path::{Path, PathBuf};

use devices::virtio::block::disk::LockedImage;
use devices::virtio::block::format::{self, ImageFormat, ImageInfo};
use imago::file::File as ImagoFile;
use imago::format::PreallocateMode;
use imago::qcow2::Qcow2;
use imago::{
    DenyImplicitOpenGate, FormatAccess, FormatCreateBuilder, FormatDriverBuilder,
    StorageOpenOptions,
};

use super::source::check_qcow2;
use super::sparse;
use super::target::NewFile;
use super::transfer::{create_qcow2, TargetFormat};
use super::{check_size, ImageError};

/// What `create` is asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateOptions {
    /// raw or qcow2.
    pub format: TargetFormat,
    /// The virtual size (default: the backing file's).
    pub size: Option<u64>,
    /// A qcow2 backing file, as it is to be recorded.
    pub backing: Option<PathBuf>,
    /// Replace an existing file.
    pub force: bool,
}

/// What `create` made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Created {
    /// raw or qcow2.
    pub format: TargetFormat,
    /// The virtual size.
    pub size: u64,
    /// Bytes the new file occupies.
    pub allocated: u64,
    /// The backing file recorded and its format.
    pub backing: Option<(String, &'static str)>,
}

/// `zvmm image create FILE [SIZE] [--format F] [--backing BASE]`.
pub fn create(path: &Path, options: &CreateOptions) -> Result<Created, ImageError> {
    let backing = match &options.backing {
        Some(_) if options.format == TargetFormat::Raw => {
            return Err(ImageError::Usage(
                "--backing needs --format qcow2: a raw image has no backing file".into(),
            ))
        }
        Some(name) => Some(Backing::check(path, name)?),
        None => None,
    };
    let size = match (options.size, &backing) {
        (Some(size), _) => size,
        (None, Some(backing)) => backing.size,
        (None, None) => return Err(ImageError::Usage("give the image's SIZE, e.g. 10G".into())),
    };
    let size = check_size(size)?;
    let new = NewFile::create(path, options.force)?;
    let write_error = |source| ImageError::Write {
        path: path.to_path_buf(),
        source,
    };
    match (&options.format, &backing) {
        (TargetFormat::Raw, _) => new.file().set_len(size).map_err(write_error)?,
        (TargetFormat::Qcow2, None) => {
            drop(qcow2_error(path, create_qcow2(new.file(), path, size))?)
        }
        (TargetFormat::Qcow2, Some(backing)) => {
            qcow2_error(path, create_qcow2_over(new.file(), path, size, backing))?
        }
    }
    let allocated = new
        .file()
        .sync_all()
        .and_then(|()| new.file().metadata())
        .map(|meta| sparse::allocated_bytes(&meta))
        .map_err(write_error)?;
    new.commit()?;
    Ok(Created {
        format: options.format,
        size,
        allocated,
        backing: backing.map(|b| (b.name, b.format)),
    })
}

fn qcow2_error<T>(path: &Path, result: std::io::Result<T>) -> Result<T, ImageError> {
    result.map_err(|source| ImageError::Qcow2 {
        path: path.to_path_buf(),
        action: "create",
        source,
    })
}

/// A backing file that exists and is raw or qcow2.
struct Backing {
    name: String,
    format: &'static str,
    size: u64,
}

impl Backing {
    fn check(image: &Path, name: &Path) -> Result<Backing, ImageError> {
        let resolved = match image.parent() {
            Some(dir) if name.is_relative() => dir.join(name),
            _ => name.to_path_buf(),
        };
        let backing_error = |what: String| ImageError::Backing {
            path: resolved.clone(),
            what,
        };
        let text = name
            .to_str()
            .filter(|text| !text.is_empty() && !text.contains(':'))
            .ok_or_else(|| {
                backing_error(
                    "has a name qcow2 cannot record (empty, not UTF-8, or with ':'); rename it"
                        .into(),
                )
            })?;
        if !resolved.exists() {
            return Err(backing_error(
                "does not exist (a relative name is taken relative to the new image's directory)"
                    .into(),
            ));
        }
        let info = format::detect(&resolved)?;
        let format = match info.format {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            other => {
                return Err(backing_error(format!(
                    "is {other}; a backing file must be raw or qcow2 (convert it with `qemu-img convert -O qcow2`)"
                )))
            }
        };
        Ok(Backing {
            name: text.to_string(),
            format,
            size: info.virtual_size.unwrap_or(info.file_size),
        })
    }
}

/// Formats `file` as a qcow2 image of `size` bytes over `backing`.
fn create_qcow2_over(
    file: &File,
    path: &Path,
    size: u64,
    backing: &Backing,
) -> std::io::Result<()> {
    let options = StorageOpenOptions::new().write(true).filename(path);
    let storage = ImagoFile::from_open_file(file.try_clone()?, options)?;
    Qcow2::<ImagoFile>::create_builder(storage)
        .size(size)
        .backing(backing.name.clone(), backing.format.into())
        .create()
}

/// The size `grow` is asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewSize {
    /// `SIZE`: this many bytes.
    To(u64),
    /// `+SIZE`: this many bytes more.
    By(u64),
}

impl NewSize {
    /// Parses `10G` or `+1G`.
    pub fn parse(text: &str) -> Option<NewSize> {
        match text.strip_prefix('+') {
            Some(more) => crate::config::parse_size(more).map(NewSize::By),
            None => crate::config::parse_size(text).map(NewSize::To),
        }
    }
}

/// What `grow` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grown {
    /// raw or qcow2.
    pub format: ImageFormat,
    /// The virtual size before.
    pub old: u64,
    /// The virtual size now (`old` when there was nothing to do).
    pub new: u64,
    /// Bytes the file occupied before.
    pub allocated_before: u64,
    /// Bytes it occupies now.
    pub allocated_after: u64,
}

/// `zvmm image grow FILE [+]SIZE`.
pub fn grow(path: &Path, size: NewSize) -> Result<Grown, ImageError> {
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_block_device() {
            return Err(ImageError::BlockDevice {
                path: path.to_path_buf(),
                what: "grow the volume itself (zvmm image grow changes image files)".into(),
            });
        }
    }
    let locked = LockedImage::open(path, false).map_err(ImageError::from_disk)?;
    let info =
        format::detect_file(locked.file(), locked.size()).map_err(|source| ImageError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    let old = match info.format {
        ImageFormat::Raw => locked.size(),
        ImageFormat::Qcow2 => {
            check_qcow2(path, &info)?;
            info.virtual_size.unwrap_or(0)
        }
        format => {
            return Err(ImageError::Unsupported {
                path: path.to_path_buf(),
                format,
            })
        }
    };
    let new = match size {
        NewSize::To(size) => size,
        NewSize::By(more) => old.saturating_add(more),
    };
    if new < old {
        return Err(ImageError::Shrink {
            path: path.to_path_buf(),
            current: old,
            what: "grow",
        });
    }
    let new = check_size(new)?;
    let allocated_before = allocated(path, locked.file())?;
    if new > old {
        resize(path, locked.file(), &info, new)?;
    }
    Ok(Grown {
        format: info.format,
        old,
        new,
        allocated_before,
        allocated_after: allocated(path, locked.file())?,
    })
}

/// Makes the image `new` bytes large (raw: the file length; qcow2: imago).
fn resize(path: &Path, file: &File, info: &ImageInfo, new: u64) -> Result<(), ImageError> {
    let write_error = |source| ImageError::Write {
        path: path.to_path_buf(),
        source,
    };
    if info.format == ImageFormat::Raw {
        return file
            .set_len(new)
            .and_then(|()| file.sync_all())
            .map_err(write_error);
    }
    let resize_error = |source| ImageError::Qcow2 {
        path: path.to_path_buf(),
        action: "resize",
        source,
    };
    let options = StorageOpenOptions::new().write(true).filename(path);
    let storage = ImagoFile::from_open_file(file.try_clone().map_err(write_error)?, options)
        .map_err(resize_error)?;
    let qcow2 = Qcow2::<ImagoFile>::builder(storage)
        .backing(None)
        .write(true)
        .open(DenyImplicitOpenGate::default())
        .map_err(resize_error)?;
    let image = FormatAccess::new(qcow2);
    image
        .resize_grow(new, PreallocateMode::None)
        .and_then(|()| image.flush())
        .and_then(|()| image.sync())
        .map_err(resize_error)
}

fn allocated(path: &Path, file: &File) -> Result<u64, ImageError> {
    file.metadata()
        .map(|meta| sparse::allocated_bytes(&meta))
        .map_err(|source| ImageError::Read {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_grow_to_or_by() {
        assert_eq!(NewSize::parse("10G"), Some(NewSize::To(10 << 30)));
        assert_eq!(NewSize::parse("+512M"), Some(NewSize::By(512 << 20)));
        assert_eq!(NewSize::parse("4096"), Some(NewSize::To(4096)));
        assert_eq!(NewSize::parse("-1G"), None);
        assert_eq!(NewSize::parse("+"), None);
        assert_eq!(NewSize::parse("ten"), None);
    }
}
