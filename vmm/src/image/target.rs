//! Where a `zvmm image` command writes, so that a killed or failed run
//! never leaves a destination that looks complete.
//!
//! A new file is made unnamed (`O_TMPFILE`) in the destination's directory
//! and linked in under its name only once written and synced: a killed
//! run leaves nothing behind, not even a temporary name. Without
//! `--force` the link itself refuses an existing name (no window in which
//! a file created meanwhile would be replaced); with `--force` it is
//! linked as `.NAME.zvmm-PID.tmp` and renamed over the old file. File
//! systems without `O_TMPFILE` get that temporary name from the start
//! (removed again on failure). The directory is synced after the rename.
//!
//! A block device is written in place (it needs `--force` too), opened
//! `O_EXCL` and write-locked; the copy writes its first
//! [`DEVICE_HEAD`] bytes (partition tables, file system superblocks,
//! image headers) last, after zeroing them first, so an interrupted copy
//! leaves a device that holds no recognisable image.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use devices::virtio::block::disk::LockedImage;

use super::ImageError;

/// Bytes at the start of a block device written last.
pub const DEVICE_HEAD: u64 = 1 << 20;

/// Where the output goes.
#[derive(Debug)]
pub enum Destination {
    /// A new file.
    File(NewFile),
    /// A block device, written in place.
    Device(LockedImage),
}

impl Destination {
    /// Opens `path` as a destination: a block device (with `--force`), or
    /// a new file (an existing one only with `--force`).
    pub fn open(path: &Path, force: bool) -> Result<Destination, ImageError> {
        match fs::metadata(path) {
            Ok(meta) if meta.file_type().is_block_device() => {
                if !force {
                    return Err(ImageError::BlockDevice {
                        path: path.to_path_buf(),
                        what: "pass --force to overwrite it".into(),
                    });
                }
                let device = LockedImage::open(path, false).map_err(ImageError::from_disk)?;
                Ok(Destination::Device(device))
            }
            Ok(meta) if meta.is_dir() => Err(ImageError::BadDestination {
                path: path.to_path_buf(),
                what: "a directory",
            }),
            Ok(meta) if !meta.is_file() => Err(ImageError::BadDestination {
                path: path.to_path_buf(),
                what: "neither a regular file nor a block device",
            }),
            _ => NewFile::create(path, force).map(Destination::File),
        }
    }
}

/// A file being written that takes its name only at [`NewFile::commit`].
#[derive(Debug)]
pub struct NewFile {
    file: File,
    path: PathBuf,
    force: bool,
    /// The named temporary file, where `O_TMPFILE` was not available.
    named_temp: Option<PathBuf>,
}

impl NewFile {
    /// Starts a new file for `path`; refuses an existing one unless
    /// `force`.
    pub fn create(path: &Path, force: bool) -> Result<NewFile, ImageError> {
        let exists = fs::symlink_metadata(path).is_ok();
        if exists && !force {
            return Err(ImageError::Exists(path.to_path_buf()));
        }
        let write_error = |source| ImageError::Write {
            path: path.to_path_buf(),
            source,
        };
        let (file, named_temp) = match open_unnamed(directory_of(path)) {
            Ok(file) => (file, None),
            Err(e) if unnamed_unsupported(&e) => {
                let temp = temp_name(path);
                (open_named(&temp).map_err(write_error)?, Some(temp))
            }
            Err(e) => return Err(write_error(e)),
        };
        Ok(NewFile {
            file,
            path: path.to_path_buf(),
            force,
            named_temp,
        })
    }

    /// The file being written.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The name it will take.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Syncs the file and gives it its name.
    pub fn commit(mut self) -> Result<(), ImageError> {
        let write_error = |source| ImageError::Write {
            path: self.path.clone(),
            source,
        };
        self.file.sync_all().map_err(write_error)?;
        let result = match self.named_temp.take() {
            Some(temp) => rename(&temp, &self.path, self.force).inspect_err(|_| {
                let _ = fs::remove_file(&temp);
            }),
            None => self.link_unnamed(),
        };
        result.map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => ImageError::Exists(self.path.clone()),
            _ => write_error(e),
        })?;
        sync_directory(directory_of(&self.path)).map_err(write_error)
    }

    fn link_unnamed(&self) -> io::Result<()> {
        if !self.force {
            return link_fd(&self.file, &self.path);
        }
        let temp = temp_name(&self.path);
        link_fd(&self.file, &temp)?;
        rename(&temp, &self.path, true).inspect_err(|_| {
            let _ = fs::remove_file(&temp);
        })
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if let Some(temp) = self.named_temp.take() {
            let _ = fs::remove_file(temp);
        }
    }
}

/// The directory a new `path` goes in.
fn directory_of(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// `.NAME.zvmm-PID.tmp` next to `path`.
fn temp_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    path.with_file_name(format!(".{name}.zvmm-{}.tmp", std::process::id()))
}

fn open_unnamed(dir: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o666)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
}

/// Errors meaning "this file system has no O_TMPFILE".
fn unnamed_unsupported(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
    )
}

fn open_named(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o666)
        .open(path)
}

/// Gives the unnamed file `file` the name `path` (failing if it exists).
fn link_fd(file: &File, path: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let proc_path = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    let target = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: both arguments are NUL-terminated strings that outlive the
    // call; linkat reads them and changes nothing in our memory.
    let ret = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            proc_path.as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Moves `from` to `to`; without `replace`, fails if `to` exists.
fn rename(from: &Path, to: &Path, replace: bool) -> io::Result<()> {
    if replace {
        return fs::rename(from, to);
    }
    // A hard link fails on an existing name; then the temporary goes.
    fs::hard_link(from, to)?;
    fs::remove_file(from)
}

fn sync_directory(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("zvmm-target-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_new_file_has_no_name_until_committed() {
        let dir = scratch("unnamed");
        let path = dir.join("out.raw");
        let mut new = NewFile::create(&path, false).unwrap();
        new.file.write_all(b"image").unwrap();
        assert!(names(&dir).is_empty());
        new.commit().unwrap();
        assert_eq!(names(&dir), ["out.raw"]);
        assert_eq!(fs::read(&path).unwrap(), b"image");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_abandoned_file_leaves_nothing() {
        let dir = scratch("abandoned");
        let new = NewFile::create(&dir.join("out.raw"), false).unwrap();
        new.file().set_len(1 << 20).unwrap();
        drop(new);
        assert!(names(&dir).is_empty());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_existing_file_needs_force() {
        let dir = scratch("force");
        let path = dir.join("out.raw");
        fs::write(&path, b"old").unwrap();
        let refused = NewFile::create(&path, false).unwrap_err();
        assert_eq!(
            refused.to_string(),
            format!("{} exists; pass --force to replace it", path.display())
        );
        let mut new = NewFile::create(&path, true).unwrap();
        new.file.write_all(b"new").unwrap();
        new.commit().unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(names(&dir), ["out.raw"]);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_file_created_meanwhile_is_not_replaced() {
        let dir = scratch("race");
        let path = dir.join("out.raw");
        let new = NewFile::create(&path, false).unwrap();
        fs::write(&path, b"someone else's").unwrap();
        assert!(matches!(new.commit(), Err(ImageError::Exists(_))));
        assert_eq!(fs::read(&path).unwrap(), b"someone else's");
        assert_eq!(names(&dir), ["out.raw"]);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_named_fallback_renames_or_refuses() {
        let dir = scratch("named");
        let path = dir.join("out.raw");
        let temp = temp_name(&path);
        fs::write(&temp, b"data").unwrap();
        rename(&temp, &path, false).unwrap();
        assert_eq!(names(&dir), ["out.raw"]);
        fs::write(&temp, b"again").unwrap();
        assert_eq!(
            rename(&temp, &path, false).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        rename(&temp, &path, true).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"again");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn directories_are_not_destinations() {
        let dir = scratch("dir");
        let refused = Destination::open(&dir, true).unwrap_err();
        assert!(matches!(refused, ImageError::BadDestination { .. }));
        fs::remove_dir_all(dir).unwrap();
    }
}
