//! The host side of a virtio-blk disk: a raw image file or a block device,
//! opened read-only or read-write and locked, with positional vectored I/O
//! straight into guest memory, flush, discard and write-zeroes.
//!
//! Locking: every image is locked with an open-file-description lock
//! (`fcntl(F_OFD_SETLK)`) covering the whole file — a write lock for a
//! read-write disk, a read lock for a read-only one. So two writers, or a
//! writer and a reader, are refused, while any number of read-only users
//! share an image. OFD locks rather than `flock(2)`: they belong to the
//! open file description (closing another descriptor of the same file does
//! not drop them, unlike classic POSIX locks), they conflict between two
//! opens inside one process too, they work on NFS as real byte-range locks,
//! and they are what QEMU and cloud-hypervisor take on images, so a
//! whole-file OFD lock conflicts with theirs. The kernel does not report an
//! OFD lock's owner (`F_OFD_GETLK` and `/proc/locks` say pid -1), so on a
//! conflict the holder is looked up best-effort through
//! `/proc/<pid>/fd` + `/proc/<pid>/fdinfo` (which lists the locks held
//! through each descriptor). A writable block device is additionally opened
//! with `O_EXCL`, which the kernel refuses while it is mounted or claimed.
//!
//! Sizes: the capacity is the file length (block devices: `BLKGETSIZE64`)
//! in 512-byte sectors. Empty images and images whose size is not a
//! multiple of 512 are refused, with the command that fixes them.
//!
//! Discard punches a hole (`fallocate(PUNCH_HOLE|KEEP_SIZE)`) in files, so
//! sparse images stay sparse; on block devices it is `BLKDISCARD`. Where the
//! file system or device can't, discard is a successful no-op (it is only a
//! hint). Write-zeroes uses `fallocate(PUNCH_HOLE)` when the driver allows
//! unmapping (a hole in a file; on a block device the kernel zeroes with
//! unmap), else `fallocate(ZERO_RANGE)`, and falls back to writing zeroes
//! when neither is supported. Both are checked by hand on a loop device;
//! the unit tests cover files only.

use std::fs::{self, File, Metadata, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;
use vmm_sys_util::fallocate::{fallocate, FallocateMode};
use vmm_sys_util::ioctl::{ioctl_expr, ioctl_with_mut_ref, ioctl_with_ref, _IOC_NONE, _IOC_READ};

/// Bytes in a virtio-blk sector.
pub const SECTOR_SIZE: u64 = 512;

/// Most iovecs one `preadv`/`pwritev` call takes (Linux `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Zeroes written per `pwritev` when write-zeroes has to write them.
const ZERO_CHUNK: usize = 64 * 1024;
static ZEROES: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];

/// `ioctl` type of the block layer (`0x12`).
const BLOCK_IOCTL: u32 = 0x12;

/// Opening or locking a disk image failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The path names nothing.
    #[error("disk image {} does not exist", .path.display())]
    Missing {
        /// The image path.
        path: PathBuf,
    },
    /// The path is a directory.
    #[error("disk image {} is a directory; give an image file or a block device", .path.display())]
    Directory {
        /// The image path.
        path: PathBuf,
    },
    /// The path is a socket, FIFO, character device...
    #[error("disk image {} is not a regular file or a block device", .path.display())]
    NotADisk {
        /// The image path.
        path: PathBuf,
    },
    /// The image has no sectors.
    #[error("disk image {} is empty; give it a size, e.g. `truncate -s 1G {}`", .path.display(), .path.display())]
    Empty {
        /// The image path.
        path: PathBuf,
    },
    /// The image size is not a whole number of sectors.
    #[error(
        "disk image {} is {size} bytes, not a multiple of 512; pad it with `truncate -s {} {}`",
        .path.display(), .size.div_ceil(SECTOR_SIZE) * SECTOR_SIZE, .path.display()
    )]
    Unaligned {
        /// The image path.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// `open(2)` failed.
    #[error("cannot open disk image {}{hint}", .path.display())]
    Open {
        /// The image path.
        path: PathBuf,
        /// What to try, or empty.
        hint: &'static str,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// A writable block device is mounted or claimed (`O_EXCL` refused).
    #[error("block device {} is in use (mounted or claimed by another program)", .path.display())]
    DeviceBusy {
        /// The device path.
        path: PathBuf,
    },
    /// Another user holds a conflicting lock and this disk is writable.
    #[error(
        "disk image {} is in use by {holder}; a writable disk can be used by one VM at a time",
        .path.display()
    )]
    Locked {
        /// The image path.
        path: PathBuf,
        /// Who holds it: "pid 123 (zvmm)" or "another process".
        holder: String,
    },
    /// A writer holds the lock and this disk is read-only.
    #[error(
        "disk image {} is open for writing by {holder}; readonly=on disks can be shared only with other read-only users",
        .path.display()
    )]
    LockedByWriter {
        /// The image path.
        path: PathBuf,
        /// Who holds it: "pid 123 (zvmm)" or "another process".
        holder: String,
    },
    /// `fcntl(F_OFD_SETLK)` failed for another reason.
    #[error("cannot lock disk image {}", .path.display())]
    Lock {
        /// The image path.
        path: PathBuf,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// `fstat` or `BLKGETSIZE64` failed.
    #[error("cannot get the size of disk image {}", .path.display())]
    Size {
        /// The image path.
        path: PathBuf,
        /// The system error.
        #[source]
        source: io::Error,
    },
}

/// An image file or block device opened and locked (see the module doc),
/// before anything interprets its contents.
#[derive(Debug)]
pub struct LockedImage {
    file: File,
    path: PathBuf,
    readonly: bool,
    meta: Metadata,
    size: u64,
}

impl LockedImage {
    /// Opens `path` read-only or read-write and locks it.
    pub fn open(path: &Path, readonly: bool) -> Result<LockedImage, DiskError> {
        let before = stat_path(path)?;
        let block_device = before.file_type().is_block_device();
        let file = open_file(path, readonly, block_device)?;
        let size_error = |source| DiskError::Size {
            path: path.to_path_buf(),
            source,
        };
        let meta = file.metadata().map_err(size_error)?;
        check_kind(path, &meta)?;
        lock_file(&file, path, &meta, readonly)?;
        let size = file_or_device_size(&file, &meta).map_err(size_error)?;
        Ok(LockedImage {
            file,
            path: path.to_path_buf(),
            readonly,
            meta,
            size,
        })
    }

    /// The open file; the lock lasts as long as it (or a clone) is open.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Gives up the wrapper; the file keeps the lock.
    pub fn into_file(self) -> File {
        self.file
    }

    /// The path the image was opened by.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the image was opened read-only.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Whether the image is a block device.
    pub fn is_block_device(&self) -> bool {
        self.meta.file_type().is_block_device()
    }

    /// Bytes of the file or device.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// (st_dev, st_ino) of a file, (st_rdev, 0) of a block device.
    pub fn identity(&self) -> (u64, u64) {
        if self.is_block_device() {
            (self.meta.rdev(), 0)
        } else {
            (self.meta.dev(), self.meta.ino())
        }
    }

    /// Discard granularity: the file system block size for files, 4 KiB
    /// for block devices; a power of two in 512..=1 MiB.
    pub fn granularity(&self) -> u32 {
        discard_granularity(&self.meta, self.is_block_device())
    }
}

/// An open, locked raw disk image.
#[derive(Debug)]
pub struct DiskFile {
    file: File,
    path: PathBuf,
    readonly: bool,
    block_device: bool,
    size: u64,
    identity: (u64, u64),
    granularity: u32,
    /// Cleared once the file system or device refused a punch-hole.
    can_punch: AtomicBool,
    /// Cleared once a block device refused BLKDISCARD.
    can_discard: AtomicBool,
    /// Cleared once `FALLOC_FL_ZERO_RANGE` was refused.
    can_zero_range: AtomicBool,
}

impl DiskFile {
    /// Opens `path` read-only or read-write and locks it (see module doc).
    pub fn open(path: &Path, readonly: bool) -> Result<DiskFile, DiskError> {
        DiskFile::from_locked(LockedImage::open(path, readonly)?)
    }

    /// Serves a locked image as raw sectors; its size must be a non-zero
    /// multiple of [`SECTOR_SIZE`].
    pub fn from_locked(image: LockedImage) -> Result<DiskFile, DiskError> {
        check_raw_size(&image.path, image.size)?;
        Ok(DiskFile {
            block_device: image.is_block_device(),
            identity: image.identity(),
            granularity: image.granularity(),
            size: image.size,
            readonly: image.readonly,
            path: image.path,
            file: image.file,
            can_punch: AtomicBool::new(true),
            can_discard: AtomicBool::new(true),
            can_zero_range: AtomicBool::new(true),
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

    /// Whether the image is a block device.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// Size in bytes (a multiple of [`SECTOR_SIZE`]).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    /// A stable identity: (st_dev, st_ino) of a file, (st_rdev, 0) of a
    /// block device.
    pub fn identity(&self) -> (u64, u64) {
        self.identity
    }

    /// Discard/write-zeroes granularity in bytes (a power of two ≥ 512).
    pub fn granularity(&self) -> u32 {
        self.granularity
    }

    /// Reads `slices.iter().map(len).sum()` bytes at `offset` into `slices`.
    pub fn read_at<B: BitmapSlice>(
        &self,
        slices: &[VolatileSlice<B>],
        offset: u64,
    ) -> io::Result<()> {
        let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard_mut()).collect();
        let mut iovecs: Vec<libc::iovec> = guards
            .iter()
            .map(|g| libc::iovec {
                iov_base: g.as_ptr().cast(),
                iov_len: g.len(),
            })
            .collect();
        // SAFETY: each iovec covers exactly one live VolatileSlice of guest
        // memory (kept mapped by `guards`), writable for its whole length.
        unsafe { self.transfer(&mut iovecs, offset, Direction::Read) }?;
        for slice in slices {
            slice.bitmap().mark_dirty(0, slice.len());
        }
        Ok(())
    }

    /// Reads like [`Self::read_at`] if every byte is in the page cache
    /// already: one `preadv2(RWF_NOWAIT)`, which never waits for the
    /// device. `false` when it would have to wait (or read short, or fail):
    /// then `slices` hold anything and the caller reads with
    /// [`Self::read_at`] on a thread that may block.
    pub fn read_at_nowait<B: BitmapSlice>(&self, slices: &[VolatileSlice<B>], offset: u64) -> bool {
        let (Ok(pos), true) = (i64::try_from(offset), slices.len() <= IOV_MAX) else {
            return false;
        };
        let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard_mut()).collect();
        let iovecs: Vec<libc::iovec> = guards
            .iter()
            .map(|g| libc::iovec {
                iov_base: g.as_ptr().cast(),
                iov_len: g.len(),
            })
            .collect();
        let want: usize = iovecs.iter().map(|iov| iov.iov_len).sum();
        // At most IOV_MAX iovecs, so the cast is lossless.
        let count = iovecs.len() as libc::c_int;
        // SAFETY: each iovec covers exactly one live VolatileSlice of guest
        // memory (kept mapped by `guards`), writable for its whole length;
        // fd is our open file.
        let done = unsafe {
            libc::preadv2(
                self.file.as_raw_fd(),
                iovecs.as_ptr(),
                count,
                pos,
                libc::RWF_NOWAIT,
            )
        };
        if usize::try_from(done).ok() != Some(want) {
            return false;
        }
        for slice in slices {
            slice.bitmap().mark_dirty(0, slice.len());
        }
        true
    }

    /// Writes the bytes of `slices` at `offset`.
    pub fn write_at<B: BitmapSlice>(
        &self,
        slices: &[VolatileSlice<B>],
        offset: u64,
    ) -> io::Result<()> {
        let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard()).collect();
        let mut iovecs: Vec<libc::iovec> = guards
            .iter()
            .map(|g| libc::iovec {
                iov_base: g.as_ptr().cast_mut().cast(),
                iov_len: g.len(),
            })
            .collect();
        // SAFETY: each iovec covers exactly one live VolatileSlice of guest
        // memory (kept mapped by `guards`), readable for its whole length.
        unsafe { self.transfer(&mut iovecs, offset, Direction::Write) }
    }

    /// Makes written data durable (`fdatasync`).
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Tells the host `len` bytes at `offset` are unused; files get a hole.
    /// A file system or device that can't discard makes this a no-op.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.block_device {
            let request = ioctl_expr(_IOC_NONE, BLOCK_IOCTL, 119, 0); // BLKDISCARD
            self.try_blk_range_ioctl(&self.can_discard, request, offset, len)?;
        } else {
            self.try_fallocate(&self.can_punch, FallocateMode::PunchHole, offset, len)?;
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read back as zeroes, deallocating them
    /// when `unmap` allows and the host can.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if unmap && self.try_fallocate(&self.can_punch, FallocateMode::PunchHole, offset, len)? {
            return Ok(());
        }
        if self.try_fallocate(&self.can_zero_range, FallocateMode::ZeroRange, offset, len)? {
            return Ok(());
        }
        self.write_zeroes_by_writing(offset, len)
    }

    /// `fallocate(mode|KEEP_SIZE)`: `Ok(true)` when done, `Ok(false)` when
    /// the host can't (remembered in `supported` if it never will).
    fn try_fallocate(
        &self,
        supported: &AtomicBool,
        mode: FallocateMode,
        offset: u64,
        len: u64,
    ) -> io::Result<bool> {
        if !supported.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let result = fallocate(&self.file, mode, true, offset, len).map_err(io::Error::from);
        settle(supported, result)
    }

    /// BLKDISCARD-style ioctl on `[offset, offset + len)`, like
    /// [`Self::try_fallocate`].
    fn try_blk_range_ioctl(
        &self,
        supported: &AtomicBool,
        request: libc::c_ulong,
        offset: u64,
        len: u64,
    ) -> io::Result<bool> {
        if !supported.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let range = [offset, len];
        // SAFETY: BLKDISCARD reads a `u64[2]` range through the pointer,
        // which `range` provides; the fd is our open block device.
        let ret = unsafe { ioctl_with_ref(&self.file, request, &range) };
        let result = if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        };
        settle(supported, result)
    }

    fn write_zeroes_by_writing(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut done = 0u64;
        while done < len {
            let chunk = (len - done).min((ZERO_CHUNK * 16) as u64);
            let mut iovecs = Vec::with_capacity(16);
            let mut left = chunk as usize;
            while left > 0 {
                let n = left.min(ZERO_CHUNK);
                iovecs.push(libc::iovec {
                    iov_base: ZEROES.as_ptr().cast_mut().cast(),
                    iov_len: n,
                });
                left -= n;
            }
            // SAFETY: the iovecs point into the static ZEROES buffer, which
            // pwritev only reads.
            unsafe { self.transfer(&mut iovecs, offset + done, Direction::Write) }?;
            done += chunk;
        }
        Ok(())
    }

    /// Runs `preadv`/`pwritev` until every byte of `iovecs` is transferred,
    /// at most [`IOV_MAX`] iovecs per call, resuming after short transfers.
    ///
    /// # Safety
    ///
    /// Every iovec must point to memory valid for its length for the whole
    /// call: writable for [`Direction::Read`], readable for a write.
    unsafe fn transfer(
        &self,
        iovecs: &mut [libc::iovec],
        mut offset: u64,
        dir: Direction,
    ) -> io::Result<()> {
        let mut first = 0;
        while first < iovecs.len() {
            if iovecs[first].iov_len == 0 {
                first += 1;
                continue;
            }
            let batch = &iovecs[first..iovecs.len().min(first + IOV_MAX)];
            let pos =
                i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            let fd = self.file.as_raw_fd();
            // The batch length is at most IOV_MAX, so the cast is lossless.
            let count = batch.len() as libc::c_int;
            // SAFETY: the caller guarantees the iovecs' memory; `batch` is a
            // valid array of `count` iovecs and fd is our open file.
            let done = unsafe {
                match dir {
                    Direction::Read => libc::preadv64(fd, batch.as_ptr(), count, pos),
                    Direction::Write => libc::pwritev64(fd, batch.as_ptr(), count, pos),
                }
            };
            if done < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if done == 0 {
                return Err(match dir {
                    Direction::Read => io::Error::from(io::ErrorKind::UnexpectedEof),
                    Direction::Write => io::Error::from(io::ErrorKind::WriteZero),
                });
            }
            offset += done as u64;
            first = advance(iovecs, first, done as usize);
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Read,
    Write,
}

/// Drops `done` transferred bytes from `iovecs[first..]`; returns the index
/// of the first iovec with bytes left.
fn advance(iovecs: &mut [libc::iovec], mut first: usize, mut done: usize) -> usize {
    while done > 0 && first < iovecs.len() {
        let iov = &mut iovecs[first];
        if done < iov.iov_len {
            // SAFETY: `done < iov_len`, so the pointer stays inside the buffer.
            iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(done) }.cast();
            iov.iov_len -= done;
            return first;
        }
        done -= iov.iov_len;
        first += 1;
    }
    first
}

/// Maps an optional host operation's result: errors meaning "never
/// supported here" clear `supported`; those and EINVAL (e.g. a range the
/// device's sector size does not divide) become `Ok(false)`.
fn settle(supported: &AtomicBool, result: io::Result<()>) -> io::Result<bool> {
    match result {
        Ok(()) => Ok(true),
        Err(e) => match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::ENOSYS) => {
                supported.store(false, Ordering::Relaxed);
                Ok(false)
            }
            Some(libc::EINVAL) => Ok(false),
            _ => Err(e),
        },
    }
}

fn stat_path(path: &Path) -> Result<Metadata, DiskError> {
    let meta = fs::metadata(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => DiskError::Missing {
            path: path.to_path_buf(),
        },
        _ => DiskError::Open {
            path: path.to_path_buf(),
            hint: "",
            source,
        },
    })?;
    check_kind(path, &meta)?;
    Ok(meta)
}

fn check_kind(path: &Path, meta: &Metadata) -> Result<(), DiskError> {
    let kind = meta.file_type();
    if kind.is_dir() {
        return Err(DiskError::Directory {
            path: path.to_path_buf(),
        });
    }
    if !kind.is_file() && !kind.is_block_device() {
        return Err(DiskError::NotADisk {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

fn open_file(path: &Path, readonly: bool, block_device: bool) -> Result<File, DiskError> {
    let mut options = OpenOptions::new();
    options.read(true).write(!readonly);
    if block_device && !readonly {
        options.custom_flags(libc::O_EXCL);
    }
    options.open(path).map_err(|source| {
        let path = path.to_path_buf();
        match source.raw_os_error() {
            Some(libc::EBUSY) if block_device => DiskError::DeviceBusy { path },
            Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) if !readonly => {
                DiskError::Open {
                    path,
                    hint: " for writing (pass readonly=on to attach it read-only)",
                    source,
                }
            }
            _ => DiskError::Open {
                path,
                hint: "",
                source,
            },
        }
    })
}

/// Takes the whole-file OFD lock: shared when `readonly`, else exclusive.
fn lock_file(file: &File, path: &Path, meta: &Metadata, readonly: bool) -> Result<(), DiskError> {
    // SAFETY: `flock` is plain old data; all-zero is a valid value.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = if readonly {
        libc::F_RDLCK
    } else {
        libc::F_WRLCK
    } as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = 0;
    lock.l_len = 0; // to the end of the file, however it grows
                    // SAFETY: F_OFD_SETLK reads the `flock` we pass and nothing else; the
                    // fd is open.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    if ret == 0 {
        return Ok(());
    }
    let source = io::Error::last_os_error();
    let path = path.to_path_buf();
    if !matches!(
        source.raw_os_error(),
        Some(libc::EAGAIN) | Some(libc::EACCES)
    ) {
        return Err(DiskError::Lock { path, source });
    }
    let holder = lock_holder(meta).unwrap_or_else(|| "another process".to_string());
    Err(if readonly {
        DiskError::LockedByWriter { path, holder }
    } else {
        DiskError::Locked { path, holder }
    })
}

/// Best effort: "pid N (comm)" of a process holding a lock on the file
/// `meta` describes, found through `/proc/*/fd` and `/proc/*/fdinfo`.
fn lock_holder(meta: &Metadata) -> Option<String> {
    let same_file = |other: &Metadata| {
        if meta.file_type().is_block_device() {
            other.file_type().is_block_device() && other.rdev() == meta.rdev()
        } else {
            other.dev() == meta.dev() && other.ino() == meta.ino()
        }
    };
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if !fs::metadata(fd.path()).is_ok_and(|m| same_file(&m)) {
                continue;
            }
            let fdinfo = format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy());
            let locked =
                fs::read_to_string(fdinfo).is_ok_and(|s| s.lines().any(|l| l.starts_with("lock:")));
            if locked {
                if pid == std::process::id() {
                    return Some(format!(
                        "this zvmm (pid {pid}: another disk of this VM, or a backing file of one)"
                    ));
                }
                let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                return Some(format!("pid {pid} ({})", comm.trim()));
            }
        }
    }
    None
}

/// The length of a file, or a block device's size (`BLKGETSIZE64`).
pub(crate) fn file_or_device_size(file: &File, meta: &Metadata) -> io::Result<u64> {
    if !meta.file_type().is_block_device() {
        return Ok(meta.len());
    }
    let mut size = 0u64;
    let request = ioctl_expr(
        _IOC_READ,
        BLOCK_IOCTL,
        114,
        std::mem::size_of::<u64>() as u32,
    );
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which
    // `size` provides; the fd is an open block device.
    let ret = unsafe { ioctl_with_mut_ref(file, request, &mut size) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// A raw image must have sectors, and whole ones.
fn check_raw_size(path: &Path, size: u64) -> Result<(), DiskError> {
    if size == 0 {
        return Err(DiskError::Empty {
            path: path.to_path_buf(),
        });
    }
    if !size.is_multiple_of(SECTOR_SIZE) {
        return Err(DiskError::Unaligned {
            path: path.to_path_buf(),
            size,
        });
    }
    Ok(())
}

/// The file system block size for files (where holes can be punched),
/// 4 KiB for block devices; a power of two in 512..=1 MiB.
fn discard_granularity(meta: &Metadata, block_device: bool) -> u32 {
    let size = if block_device { 4096 } else { meta.blksize() };
    let size = u32::try_from(size).unwrap_or(4096).clamp(512, 1 << 20);
    if size.is_power_of_two() {
        size
    } else {
        4096
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::testing::{bytes_at, memory, pattern, Image, DATA};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    const MIB: u64 = 1 << 20;

    fn open_err(path: &Path, readonly: bool) -> DiskError {
        DiskFile::open(path, readonly).unwrap_err()
    }

    #[test]
    fn opens_a_file_with_its_capacity() {
        let image = Image::new(3 * MIB);
        let disk = DiskFile::open(&image.path, false).unwrap();
        assert_eq!((disk.size(), disk.sectors()), (3 * MIB, 3 * MIB / 512));
        assert!(!disk.readonly() && !disk.is_block_device());
        assert_eq!(disk.path(), image.path);
        let granularity = disk.granularity();
        assert!(granularity.is_power_of_two() && granularity >= 512);
    }

    #[test]
    fn two_writers_conflict_and_the_error_names_file_and_holder() {
        let image = Image::new(MIB);
        let _first = DiskFile::open(&image.path, false).unwrap();
        let err = open_err(&image.path, false);
        assert!(matches!(err, DiskError::Locked { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains(&image.path.display().to_string()), "{text}");
        // The holder is this very process: said as such, with its pid.
        let me = format!(
            "in use by this zvmm (pid {}: another disk",
            std::process::id()
        );
        assert!(text.contains(&me), "{text}");
    }

    #[test]
    fn readers_share_but_exclude_a_writer() {
        let image = Image::new(MIB);
        let reader = DiskFile::open(&image.path, true).unwrap();
        let _second_reader = DiskFile::open(&image.path, true).unwrap();
        assert!(matches!(
            open_err(&image.path, false),
            DiskError::Locked { .. }
        ));
        drop((reader, _second_reader));
        let _writer = DiskFile::open(&image.path, false).unwrap();
        let err = open_err(&image.path, true);
        assert!(matches!(err, DiskError::LockedByWriter { .. }), "{err:?}");
        assert!(
            err.to_string()
                .contains("open for writing by this zvmm (pid"),
            "{err}"
        );
    }

    #[test]
    fn the_lock_goes_with_the_disk() {
        let image = Image::new(MIB);
        drop(DiskFile::open(&image.path, false).unwrap());
        DiskFile::open(&image.path, false).unwrap();
    }

    #[test]
    fn bad_images_are_refused_by_name() {
        let image = Image::new(0);
        let err = open_err(&image.path, false);
        assert!(matches!(err, DiskError::Empty { .. }), "{err:?}");
        assert!(err.to_string().contains("disk.raw is empty"), "{err}");

        File::create(&image.path).unwrap().set_len(1000).unwrap();
        let err = open_err(&image.path, true);
        assert!(
            matches!(err, DiskError::Unaligned { size: 1000, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("truncate -s 1024 "), "{err}");

        let dir = image.path.parent().unwrap();
        assert!(matches!(open_err(dir, false), DiskError::Directory { .. }));
        assert!(matches!(open_err(dir, true), DiskError::Directory { .. }));

        let missing = dir.join("missing.raw");
        let err = open_err(&missing, false);
        assert!(matches!(err, DiskError::Missing { .. }), "{err:?}");
        assert!(
            err.to_string().contains("missing.raw does not exist"),
            "{err}"
        );

        assert!(matches!(
            open_err(Path::new("/dev/null"), true),
            DiskError::NotADisk { .. }
        ));
    }

    #[test]
    fn vectored_io_spans_many_slices() {
        let image = Image::new(MIB);
        let disk = DiskFile::open(&image.path, false).unwrap();
        let mem = memory();
        // More slices than one preadv/pwritev takes.
        let count = IOV_MAX + 100;
        let data = pattern(6, count * 64);
        mem.write_slice(&data, GuestAddress(DATA)).unwrap();
        let slices: Vec<_> = (0..count)
            .map(|i| {
                mem.get_slice(GuestAddress(DATA + i as u64 * 64), 64)
                    .unwrap()
            })
            .collect();
        disk.write_at(&slices, 4096).unwrap();
        assert_eq!(&image.contents()[4096..4096 + data.len()], &data[..]);
        mem.write_slice(&vec![0; data.len()], GuestAddress(DATA))
            .unwrap();
        disk.read_at(&slices, 4096).unwrap();
        assert_eq!(bytes_at(&mem, DATA, data.len()), data);
    }

    #[test]
    fn reading_past_the_end_fails() {
        let image = Image::new(MIB);
        let disk = DiskFile::open(&image.path, false).unwrap();
        let mem = memory();
        let slice = mem.get_slice(GuestAddress(DATA), 1024).unwrap();
        let err = disk.read_at(&[slice], MIB - 512).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn advance_skips_whole_and_partial_iovecs() {
        let buf = [0u8; 30];
        let base = buf.as_ptr().cast_mut();
        let mut iovecs: Vec<libc::iovec> = [0usize, 10, 20]
            .iter()
            .map(|&at| libc::iovec {
                // SAFETY: offsets within `buf`.
                iov_base: unsafe { base.add(at) }.cast(),
                iov_len: 10,
            })
            .collect();
        assert_eq!(advance(&mut iovecs, 0, 13), 1);
        assert_eq!(iovecs[1].iov_len, 7);
        // SAFETY: offset within `buf`.
        assert_eq!(iovecs[1].iov_base, unsafe { base.add(13) }.cast());
        assert_eq!(advance(&mut iovecs, 1, 7), 2);
        assert_eq!(advance(&mut iovecs, 2, 10), 3);
    }

    #[test]
    fn writing_zeroes_by_hand_clears_the_range() {
        let image = Image::new(4 * MIB);
        std::fs::write(&image.path, vec![0xa5u8; 4 * MIB as usize]).unwrap();
        let disk = DiskFile::open(&image.path, false).unwrap();
        // More than one 1 MiB pwritev batch, at an odd offset.
        disk.write_zeroes_by_writing(512, 2 * MIB + 1024).unwrap();
        let contents = image.contents();
        assert_eq!(contents[511], 0xa5);
        assert!(contents[512..512 + 2 * MIB as usize + 1024]
            .iter()
            .all(|&b| b == 0));
        assert_eq!(contents[512 + 2 * MIB as usize + 1024], 0xa5);
    }

    #[test]
    fn unsupported_operations_are_remembered() {
        let supported = AtomicBool::new(true);
        let refused = Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        assert!(!settle(&supported, refused).unwrap());
        assert!(!supported.load(Ordering::Relaxed));
        let supported = AtomicBool::new(true);
        let unaligned = Err(io::Error::from_raw_os_error(libc::EINVAL));
        assert!(!settle(&supported, unaligned).unwrap());
        assert!(supported.load(Ordering::Relaxed));
        let failed = Err(io::Error::from_raw_os_error(libc::EIO));
        assert!(settle(&supported, failed).is_err());
        assert!(settle(&supported, Ok(())).unwrap());
    }
}
