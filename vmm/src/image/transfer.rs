//! `zvmm image copy` (a raw or qcow2 image onto a raw file or block
//! device, optionally growing it) and `zvmm image convert` (between raw
//! and qcow2), both keeping holes as holes.
//!
//! The source is walked piece by piece (`Source::piece_at`): holes (and
//! unallocated or zero qcow2 clusters) are skipped in a new file, which
//! starts as one hole of the full size; data stored in a host file is
//! copied by the kernel (`copy_file_range`) into a raw file, else read and
//! written with all-zero blocks left out. On a block device a hole must
//! read as zeroes: the device zeroes it itself where it can, otherwise
//! only blocks that do not already read as zeroes are written. The
//! device's first megabyte is zeroed first and written last (see
//! `target`). A qcow2 destination is created by imago with the source's
//! size and gets only the data clusters.
//!
//! `ZVMM_IMAGE_THROTTLE_MS` (for tests only) sleeps that long after each
//! megabyte of data, so a test can interrupt a copy midway.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use devices::virtio::block::format::ImageFormat;
use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::{
    DenyImplicitOpenGate, FormatAccess, FormatCreateBuilder, FormatDriverBuilder,
    StorageOpenOptions,
};

use super::progress::Progress;
use super::source::{Locking, PieceKind, Source};
use super::sparse::{self, Zeroed};
use super::target::{Destination, NewFile, DEVICE_HEAD};
use super::{check_size, ImageError, SECTOR};

/// Largest data piece copied or written at once.
const CHUNK: u64 = 1 << 20;
/// Zero detection granule for raw files (a file system block).
const FILE_GRANULE: usize = 4096;
/// Zero detection granule for qcow2 (imago's default cluster size).
const QCOW2_GRANULE: usize = 64 * 1024;
/// The test-only throttle (milliseconds per megabyte of data).
const THROTTLE_VAR: &str = "ZVMM_IMAGE_THROTTLE_MS";

/// The format a destination is written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetFormat {
    /// Plain sectors.
    Raw,
    /// qcow2 (version 3, 64 KiB clusters).
    Qcow2,
}

impl TargetFormat {
    /// "raw" or "qcow2".
    pub fn name(self) -> &'static str {
        match self {
            TargetFormat::Raw => "raw",
            TargetFormat::Qcow2 => "qcow2",
        }
    }
}

/// What a copy or conversion did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transferred {
    /// The source's format (raw or qcow2).
    pub source_format: ImageFormat,
    /// The source's guest-visible size.
    pub source_size: u64,
    /// Bytes the source file occupies (the top file of a qcow2 chain;
    /// `None` for a block device).
    pub source_allocated: Option<u64>,
    /// The backing files read below a qcow2 source.
    pub backing_chain: Vec<PathBuf>,
    /// The destination's format.
    pub target_format: TargetFormat,
    /// The destination's guest-visible size.
    pub size: u64,
    /// Whether the destination is a block device.
    pub block_device: bool,
    /// Bytes the destination file occupies (`None` for a device).
    pub target_allocated: Option<u64>,
    /// What was written and left out.
    pub counts: Counts,
}

/// Bytes of the guest view by what happened to them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Data written.
    pub data: u64,
    /// Data that was zeroes and so left out (zeroed on a device).
    pub zero_data: u64,
    /// Holes skipped (zeroed on a device).
    pub holes: u64,
    /// How device ranges were made to read as zeroes.
    pub zeroed: Zeroed,
}

impl Counts {
    fn add_zeroed(&mut self, zeroed: Zeroed) {
        self.zeroed.by_device += zeroed.by_device;
        self.zeroed.already_zero += zeroed.already_zero;
        self.zeroed.written += zeroed.written;
    }
}

/// `zvmm image copy SRC DST [--size SIZE]`: onto a raw file (new, or
/// replaced with `force`) or a block device (with `force`).
pub fn copy(
    src: &Path,
    dst: &Path,
    size: Option<u64>,
    force: bool,
) -> Result<Transferred, ImageError> {
    run(src, dst, TargetFormat::Raw, size, force)
}

/// `zvmm image convert SRC DST [--format F]`: to `format`, by default the
/// other one of raw and qcow2.
pub fn convert(
    src: &Path,
    dst: &Path,
    format: Option<TargetFormat>,
    force: bool,
) -> Result<Transferred, ImageError> {
    let source = Source::open(src, Locking::Shared)?;
    let format = format.unwrap_or(match source.format() {
        ImageFormat::Qcow2 => TargetFormat::Raw,
        _ => TargetFormat::Qcow2,
    });
    drop(source);
    run(src, dst, format, None, force)
}

fn run(
    src: &Path,
    dst: &Path,
    format: TargetFormat,
    size: Option<u64>,
    force: bool,
) -> Result<Transferred, ImageError> {
    let source = Source::open(src, Locking::Shared)?;
    let size = target_size(&source, size, format)?;
    let destination = Destination::open(dst, force)?;
    if let Destination::Device(device) = &destination {
        if device.identity() == source.identity() {
            return Err(ImageError::SameImage {
                src: src.to_path_buf(),
                dst: dst.to_path_buf(),
            });
        }
    }
    let mut report = Transferred {
        source_format: source.format(),
        source_size: source.size(),
        source_allocated: (!source.metadata().file_type().is_block_device())
            .then(|| sparse::allocated_bytes(source.metadata())),
        backing_chain: source.backing_chain(),
        target_format: format,
        size,
        block_device: matches!(destination, Destination::Device(_)),
        target_allocated: None,
        counts: Counts::default(),
    };
    match (destination, format) {
        (Destination::Device(device), TargetFormat::Raw) => to_device(
            &source,
            device.file(),
            device.size(),
            dst,
            size,
            &mut report,
        )?,
        (Destination::Device(_), TargetFormat::Qcow2) => {
            return Err(ImageError::BlockDevice {
                path: dst.to_path_buf(),
                what: "a qcow2 image goes into a file; give a file name, or convert to raw".into(),
            })
        }
        (Destination::File(new), TargetFormat::Raw) => {
            report.target_allocated = Some(to_raw_file(&source, new, size, &mut report)?)
        }
        (Destination::File(new), TargetFormat::Qcow2) => {
            report.target_allocated = Some(to_qcow2_file(&source, new, size, &mut report)?)
        }
    }
    Ok(report)
}

/// The destination size: `requested` (never below the source), else the
/// source's size (rounded up to whole sectors for qcow2).
fn target_size(
    source: &Source,
    requested: Option<u64>,
    format: TargetFormat,
) -> Result<u64, ImageError> {
    let Some(size) = requested else {
        return Ok(match format {
            TargetFormat::Raw => source.size(),
            TargetFormat::Qcow2 => source.size().div_ceil(SECTOR) * SECTOR,
        });
    };
    let size = check_size(size)?;
    if size < source.size() {
        return Err(ImageError::Shrink {
            path: source.path().to_path_buf(),
            current: source.size(),
            what: "copy --size",
        });
    }
    Ok(size)
}

fn to_raw_file(
    source: &Source,
    new: NewFile,
    size: u64,
    report: &mut Transferred,
) -> Result<u64, ImageError> {
    let write_error = |source| write_error(new.path(), source);
    new.file().set_len(size).map_err(write_error)?;
    let mut copier = Copier::new(source, Sink::File(new.file()), new.path(), "copying");
    copier.run(0..source.size())?;
    copier.finish(report);
    let allocated = new_file_allocated(&new)?;
    new.commit()?;
    Ok(allocated)
}

fn to_qcow2_file(
    source: &Source,
    new: NewFile,
    size: u64,
    report: &mut Transferred,
) -> Result<u64, ImageError> {
    let qcow2_error = |action, source| ImageError::Qcow2 {
        path: new.path().to_path_buf(),
        action,
        source,
    };
    let image = create_qcow2(new.file(), new.path(), size).map_err(|e| qcow2_error("create", e))?;
    let mut copier = Copier::new(source, Sink::Qcow2(&image), new.path(), "converting");
    copier.run(0..source.size())?;
    copier.finish(report);
    image
        .flush()
        .and_then(|()| image.sync())
        .map_err(|e| qcow2_error("write", e))?;
    drop(image);
    let allocated = new_file_allocated(&new)?;
    new.commit()?;
    Ok(allocated)
}

/// Formats `file` (named `path`) as a qcow2 image of `size` bytes
/// without a backing file and opens it for writing.
pub(super) fn create_qcow2(
    file: &File,
    path: &Path,
    size: u64,
) -> io::Result<FormatAccess<ImagoFile>> {
    let options = StorageOpenOptions::new().write(true).filename(path);
    let storage = ImagoFile::from_open_file(file.try_clone()?, options)?;
    let qcow2 = Qcow2::<ImagoFile>::create_builder(storage)
        .size(size)
        .create_open(DenyImplicitOpenGate::default(), |image| {
            Ok(Qcow2::<ImagoFile>::builder(image).backing(None).write(true))
        })?;
    Ok(FormatAccess::new(qcow2))
}

fn new_file_allocated(new: &NewFile) -> Result<u64, ImageError> {
    let file = new.file();
    file.sync_all()
        .and_then(|()| file.metadata())
        .map(|meta| sparse::allocated_bytes(&meta))
        .map_err(|e| write_error(new.path(), e))
}

/// Onto a block device of `device_size` bytes: the head zeroed first and
/// written last; with `--size`, the range past the source zeroed too.
fn to_device(
    source: &Source,
    device: &File,
    device_size: u64,
    path: &Path,
    size: u64,
    report: &mut Transferred,
) -> Result<(), ImageError> {
    if device_size < size {
        return Err(ImageError::BlockDevice {
            path: path.to_path_buf(),
            what: format!(
                "it holds {} ({device_size} bytes), less than the {size} bytes to write; use a larger device",
                super::human(device_size)
            ),
        });
    }
    let head = DEVICE_HEAD.min(source.size());
    let sync = |device: &File| device.sync_all().map_err(|e| write_error(path, e));
    let mut scratch = vec![0; CHUNK as usize];
    sparse::zero_device_range(device, 0, head, &mut scratch).map_err(|e| write_error(path, e))?;
    sync(device)?;
    let mut copier = Copier::new(source, Sink::Device(device), path, "copying");
    copier.run(head..source.size())?;
    copier.zero(source.size(), size - source.size())?;
    sync(device)?;
    copier.run(0..head)?;
    sync(device)?;
    copier.finish(report);
    Ok(())
}

/// Where pieces go.
enum Sink<'a> {
    /// A new raw file, all hole to begin with.
    File(&'a File),
    /// A block device: holes must be zeroed.
    Device(&'a File),
    /// A new qcow2 image without a backing file.
    Qcow2(&'a FormatAccess<ImagoFile>),
}

/// Copies ranges of a source into a sink, counting and showing progress.
struct Copier<'a> {
    source: &'a Source,
    sink: Sink<'a>,
    dst: &'a Path,
    buf: Vec<u8>,
    kernel_copy: bool,
    throttle: Option<Duration>,
    progress: Progress,
    done: u64,
    counts: Counts,
}

impl<'a> Copier<'a> {
    fn new(source: &'a Source, sink: Sink<'a>, dst: &'a Path, verb: &str) -> Copier<'a> {
        let throttle = std::env::var(THROTTLE_VAR)
            .ok()
            .and_then(|ms| ms.parse().ok())
            .map(Duration::from_millis);
        let label = format!("{verb} {}", source.path().display());
        Copier {
            progress: Progress::new(label, source.size()),
            source,
            sink,
            dst,
            buf: vec![0; CHUNK as usize],
            kernel_copy: true,
            throttle,
            done: 0,
            counts: Counts::default(),
        }
    }

    /// Copies the guest view's `range`.
    fn run(&mut self, range: Range<u64>) -> Result<(), ImageError> {
        let mut offset = range.start;
        while offset < range.end {
            let piece = self
                .source
                .piece_at(offset, range.end - offset)
                .map_err(|e| self.read_error(e))?;
            let len = match piece.kind {
                PieceKind::Zero => piece.len,
                _ => piece.len.min(CHUNK),
            };
            match piece.kind {
                PieceKind::Zero => {
                    self.counts.holes += len;
                    self.zero(offset, len)?;
                }
                PieceKind::Data { file, offset: at } => self.copy_data(file, at, offset, len)?,
                PieceKind::Encoded => self.copy_decoded(offset, len)?,
            }
            offset += len;
            self.done += len;
            self.progress.update(self.done);
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeroes (only devices need it).
    fn zero(&mut self, offset: u64, len: u64) -> Result<(), ImageError> {
        let Sink::Device(device) = self.sink else {
            return Ok(());
        };
        let zeroed = sparse::zero_device_range(device, offset, len, &mut self.buf)
            .map_err(|e| write_error(self.dst, e))?;
        self.counts.add_zeroed(zeroed);
        Ok(())
    }

    fn copy_data(&mut self, file: &File, at: u64, offset: u64, len: u64) -> Result<(), ImageError> {
        if let (Sink::File(dst), true) = (&self.sink, self.kernel_copy) {
            match sparse::copy_in_kernel(file, at, dst, offset, len) {
                Ok(()) => {
                    self.counts.data += len;
                    self.throttle();
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Unsupported => self.kernel_copy = false,
                Err(e) => {
                    return Err(ImageError::Copy {
                        src: self.source.path().to_path_buf(),
                        dst: self.dst.to_path_buf(),
                        source: e,
                    })
                }
            }
        }
        let buf = &mut self.buf[..len as usize];
        sparse::read_full(file, buf, at).map_err(|e| read_error(self.source.path(), e))?;
        self.write_buffer(offset, len)
    }

    fn copy_decoded(&mut self, offset: u64, len: u64) -> Result<(), ImageError> {
        let buf = &mut self.buf[..len as usize];
        self.source
            .read_at(buf, offset)
            .map_err(|e| read_error(self.source.path(), e))?;
        self.write_buffer(offset, len)
    }

    /// Writes the first `len` bytes of the buffer at `offset`, leaving out
    /// all-zero blocks (zeroing them on a device).
    fn write_buffer(&mut self, offset: u64, len: u64) -> Result<(), ImageError> {
        let granule = match self.sink {
            Sink::Qcow2(_) => QCOW2_GRANULE,
            _ => FILE_GRANULE,
        };
        let mut at = 0;
        while at < len as usize {
            let end = (at + granule).min(len as usize);
            let zero = sparse::is_zero(&self.buf[at..end]);
            let run_end = next_run_end(&self.buf[..len as usize], at, granule, zero);
            let run_offset = offset + at as u64;
            let run_len = (run_end - at) as u64;
            if zero {
                self.counts.zero_data += run_len;
                self.zero(run_offset, run_len)?;
            } else {
                self.write_run(run_offset, at..run_end)?;
                self.counts.data += run_len;
            }
            at = run_end;
        }
        self.throttle();
        Ok(())
    }

    fn write_run(&mut self, offset: u64, run: Range<usize>) -> Result<(), ImageError> {
        use std::os::unix::fs::FileExt;
        let bytes = &self.buf[run];
        let result = match self.sink {
            Sink::File(file) | Sink::Device(file) => file.write_all_at(bytes, offset),
            Sink::Qcow2(image) => image.write(bytes, offset),
        };
        result.map_err(|e| write_error(self.dst, e))
    }

    fn throttle(&self) {
        if let Some(pause) = self.throttle {
            std::thread::sleep(pause);
        }
    }

    fn read_error(&self, source: io::Error) -> ImageError {
        read_error(self.source.path(), source)
    }

    /// Hands the counts to `report` and erases the progress line.
    fn finish(mut self, report: &mut Transferred) {
        self.progress.finish();
        report.counts = self.counts;
    }
}

/// Where the run of granules starting at `at` that are all zero (or all
/// not) ends in `buf`.
fn next_run_end(buf: &[u8], at: usize, granule: usize, zero: bool) -> usize {
    let mut end = (at + granule).min(buf.len());
    while end < buf.len() {
        let next = (end + granule).min(buf.len());
        if sparse::is_zero(&buf[end..next]) != zero {
            break;
        }
        end = next;
    }
    end
}

fn read_error(path: &Path, source: io::Error) -> ImageError {
    ImageError::Read {
        path: path.to_path_buf(),
        source,
    }
}

fn write_error(path: &Path, source: io::Error) -> ImageError {
    ImageError::Write {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests;
