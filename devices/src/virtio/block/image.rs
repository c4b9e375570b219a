//! The image behind a virtio-blk device: which format it is served as, and
//! the one interface requests run against — a raw file or block device
//! ([`DiskFile`]: one `preadv`/`pwritev` straight into guest memory) or a
//! qcow2 image ([`Qcow2Disk`], through imago).
//!
//! Policy, from the detected [`ImageFormat`] and the `image_type` given:
//!
//! - detected raw → raw; detected qcow2 → qcow2;
//! - ISO 9660 → raw with `readonly=on`, refused writable;
//! - any other format (VMDK, VHD, VHDX, QED, VDI, qcow v1) → refused with
//!   the `qemu-img convert` command that makes it raw; compressed files →
//!   refused with the command that decompresses them. Never attached as raw;
//! - `image_type=qcow2` → qcow2, refused on anything else;
//! - `image_type=raw` → raw, but on a container format (qcow2, VMDK, ...)
//!   only with `readonly=on`: a guest writing it as raw data could rewrite
//!   the header and name any host file as its backing file;
//! - `backing_files=off` (cloud-hypervisor's option, for images from an
//!   untrusted source) → a qcow2 image that names a backing file is refused.
//!
//! When the format was detected rather than given, a guest write that
//! would make sector 0 read as another format is refused
//! ([`DiskImage::guards_sector0`]; QEMU and cloud-hypervisor guard probed
//! raw images the same way): otherwise a raw image could come back as
//! qcow2 on the next start, with a backing file of the guest's choosing.

use std::io;
use std::path::{Path, PathBuf};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use super::disk::{DiskError, DiskFile, LockedImage, SECTOR_SIZE};
use super::format::{self, ImageFormat, ImageInfo};
use super::qcow2::{Qcow2Disk, Qcow2Error};

/// How an image is served (cloud-hypervisor's `image_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageType {
    /// Sectors as they are in the file.
    Raw,
    /// A qcow2 image.
    Qcow2,
}

/// A disk image could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Opening, sizing or locking the file failed.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// Reading the header failed.
    #[error(transparent)]
    Detect(#[from] format::FormatError),
    /// The qcow2 image or its backing chain could not be opened.
    #[error(transparent)]
    Qcow2(#[from] Qcow2Error),
    /// A format zvmm does not serve.
    #[error("disk image {} is {format}, which zvmm cannot serve; convert it to raw with `{command}` and attach that", .path.display())]
    Unservable {
        /// The image path.
        path: PathBuf,
        /// What it is.
        format: ImageFormat,
        /// The qemu-img command that converts it.
        command: String,
    },
    /// A compressed file.
    #[error("disk image {} is {format}, not a disk image; decompress it first (`{command}`) and attach the result", .path.display())]
    Compressed {
        /// The image path.
        path: PathBuf,
        /// Which compression.
        format: ImageFormat,
        /// The command that decompresses it.
        command: String,
    },
    /// An ISO 9660 image attached writable.
    #[error("disk image {} is an ISO 9660 CD/DVD image, read-only media the guest must not alter; attach it with readonly=on (image_type=raw serves it writable)", .path.display())]
    IsoWritable {
        /// The image path.
        path: PathBuf,
    },
    /// `image_type=raw` on a container format, writable.
    #[error("disk image {} is {format} but image_type=raw was given: refused unless readonly=on, because a guest writing it as raw data could rewrite the header and name any host file as its backing file{hint}", .path.display())]
    RawOverContainer {
        /// The image path.
        path: PathBuf,
        /// What it is.
        format: ImageFormat,
        /// What else to do, or empty.
        hint: &'static str,
    },
    /// `image_type=raw` on another format whose file is not whole sectors.
    #[error("disk image {} is {format} of {size} bytes, not a multiple of 512, so it cannot be served as raw sectors", .path.display())]
    RawUnaligned {
        /// The image path.
        path: PathBuf,
        /// What it is.
        format: ImageFormat,
        /// Its size in bytes.
        size: u64,
    },
    /// A qcow2 image with a backing file, backing files turned off.
    #[error("disk image {} is a qcow2 image with the backing file '{backing}', and backing_files=off; set backing_files=on to follow it (read-only, shared)", .path.display())]
    BackingFilesOff {
        /// The image path.
        path: PathBuf,
        /// The backing file name in its header.
        backing: String,
    },
    /// `image_type=qcow2` on something else.
    #[error("disk image {} is {format}, not qcow2, but image_type=qcow2 was given{hint}", .path.display())]
    NotQcow2 {
        /// The image path.
        path: PathBuf,
        /// What it is.
        format: ImageFormat,
        /// What else to do, or empty.
        hint: &'static str,
    },
}

#[derive(Debug)]
enum Backend {
    Raw(DiskFile),
    Qcow2(Qcow2Disk),
}

/// An open, locked disk image served as raw or qcow2.
#[derive(Debug)]
pub struct DiskImage {
    backend: Backend,
    info: ImageInfo,
    given: Option<ImageType>,
}

/// How to open a [`DiskImage`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageOptions {
    /// Read-only for the guest and on the host.
    pub readonly: bool,
    /// Serve as this type; `None`: as detected.
    pub image_type: Option<ImageType>,
    /// Follow a qcow2 image's backing file (cloud-hypervisor's
    /// `backing_files`); when off, an image that names one is refused.
    pub backing_files: bool,
}

impl DiskImage {
    /// Opens and locks `path`, detects its format and serves it as
    /// `image_type` says, or as detected (see the module doc), following
    /// qcow2 backing files.
    pub fn open(
        path: &Path,
        readonly: bool,
        image_type: Option<ImageType>,
    ) -> Result<DiskImage, ImageError> {
        let options = ImageOptions {
            readonly,
            image_type,
            backing_files: true,
        };
        DiskImage::open_with(path, &options)
    }

    /// [`DiskImage::open`] with every option.
    pub fn open_with(path: &Path, options: &ImageOptions) -> Result<DiskImage, ImageError> {
        let ImageOptions {
            readonly,
            image_type,
            backing_files,
        } = *options;
        let locked = LockedImage::open(path, readonly)?;
        let info = format::detect_file(locked.file(), locked.size()).map_err(|source| {
            format::FormatError::Read {
                path: path.to_path_buf(),
                source,
            }
        })?;
        let backend = match serve_as(path, &info, readonly, image_type)? {
            ImageType::Raw if info.format != ImageFormat::Raw => {
                if !info.file_size.is_multiple_of(SECTOR_SIZE) {
                    return Err(ImageError::RawUnaligned {
                        path: path.to_path_buf(),
                        format: info.format,
                        size: info.file_size,
                    });
                }
                Backend::Raw(DiskFile::from_locked(locked)?)
            }
            ImageType::Raw => Backend::Raw(DiskFile::from_locked(locked)?),
            ImageType::Qcow2 => {
                if let Some(backing) = info.backing_file.as_ref().filter(|_| !backing_files) {
                    return Err(ImageError::BackingFilesOff {
                        path: path.to_path_buf(),
                        backing: backing.clone(),
                    });
                }
                Backend::Qcow2(Qcow2Disk::open(locked, &info)?)
            }
        };
        Ok(DiskImage {
            backend,
            info,
            given: image_type,
        })
    }

    /// What detection found.
    pub fn info(&self) -> &ImageInfo {
        &self.info
    }

    /// How the image is served.
    pub fn image_type(&self) -> ImageType {
        match self.backend {
            Backend::Raw(_) => ImageType::Raw,
            Backend::Qcow2(_) => ImageType::Qcow2,
        }
    }

    /// Whether guest writes that would make sector 0 read as another
    /// format are refused: a writable raw image whose type was detected.
    pub fn guards_sector0(&self) -> bool {
        self.given.is_none() && self.image_type() == ImageType::Raw && !self.readonly()
    }

    /// The backing files of a qcow2 image, nearest first.
    pub fn backing_chain(&self) -> &[PathBuf] {
        match &self.backend {
            Backend::Raw(_) => &[],
            Backend::Qcow2(qcow2) => qcow2.backing_chain(),
        }
    }

    /// The path the image was opened by.
    pub fn path(&self) -> &Path {
        match &self.backend {
            Backend::Raw(raw) => raw.path(),
            Backend::Qcow2(qcow2) => qcow2.path(),
        }
    }

    /// Whether the image was opened read-only.
    pub fn readonly(&self) -> bool {
        match &self.backend {
            Backend::Raw(raw) => raw.readonly(),
            Backend::Qcow2(qcow2) => qcow2.readonly(),
        }
    }

    /// Guest-visible size in bytes (a multiple of [`SECTOR_SIZE`]).
    pub fn size(&self) -> u64 {
        match &self.backend {
            Backend::Raw(raw) => raw.size(),
            Backend::Qcow2(qcow2) => qcow2.size(),
        }
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.size() / SECTOR_SIZE
    }

    /// (st_dev, st_ino) of the image file, (st_rdev, 0) of a device.
    pub fn identity(&self) -> (u64, u64) {
        match &self.backend {
            Backend::Raw(raw) => raw.identity(),
            Backend::Qcow2(qcow2) => qcow2.identity(),
        }
    }

    /// Discard/write-zeroes granularity in bytes: the host's for raw
    /// images, the cluster size for qcow2.
    pub fn granularity(&self) -> u32 {
        match &self.backend {
            Backend::Raw(raw) => raw.granularity(),
            Backend::Qcow2(qcow2) => u32::try_from(qcow2.cluster_size()).unwrap_or(1 << 21),
        }
    }

    /// Reads guest bytes at `offset` into `slices`.
    pub fn read_at<B: BitmapSlice>(
        &self,
        slices: &[VolatileSlice<B>],
        offset: u64,
    ) -> io::Result<()> {
        match &self.backend {
            Backend::Raw(raw) => raw.read_at(slices, offset),
            Backend::Qcow2(qcow2) => qcow2.read_at(slices, offset),
        }
    }

    /// Whether [`Self::read_at_nowait`] can ever succeed (raw images).
    pub fn reads_nowait(&self) -> bool {
        matches!(self.backend, Backend::Raw(_))
    }

    /// Reads like [`Self::read_at`] without waiting for the device, when
    /// a raw image's bytes are all in the page cache; `false` otherwise
    /// (always for qcow2), and then nothing is read for sure.
    pub fn read_at_nowait<B: BitmapSlice>(&self, slices: &[VolatileSlice<B>], offset: u64) -> bool {
        match &self.backend {
            Backend::Raw(raw) => raw.read_at_nowait(slices, offset),
            Backend::Qcow2(_) => false,
        }
    }

    /// Writes the bytes of `slices` at `offset`.
    pub fn write_at<B: BitmapSlice>(
        &self,
        slices: &[VolatileSlice<B>],
        offset: u64,
    ) -> io::Result<()> {
        match &self.backend {
            Backend::Raw(raw) => raw.write_at(slices, offset),
            Backend::Qcow2(qcow2) => qcow2.write_at(slices, offset),
        }
    }

    /// Makes written data durable.
    pub fn flush(&self) -> io::Result<()> {
        match &self.backend {
            Backend::Raw(raw) => raw.flush(),
            Backend::Qcow2(qcow2) => qcow2.flush(),
        }
    }

    /// Tells the host `len` bytes at `offset` are unused.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match &self.backend {
            Backend::Raw(raw) => raw.discard(offset, len),
            Backend::Qcow2(qcow2) => qcow2.discard(offset, len),
        }
    }

    /// Makes `len` bytes at `offset` read back as zeroes, deallocating
    /// them when `unmap` allows.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        match &self.backend {
            Backend::Raw(raw) => raw.write_zeroes(offset, len, unmap),
            Backend::Qcow2(qcow2) => qcow2.write_zeroes(offset, len, unmap),
        }
    }
}

/// The policy of the module doc.
fn serve_as(
    path: &Path,
    info: &ImageInfo,
    readonly: bool,
    given: Option<ImageType>,
) -> Result<ImageType, ImageError> {
    let path_buf = || path.to_path_buf();
    let format = info.format;
    match (given, format) {
        (Some(ImageType::Qcow2), ImageFormat::Qcow2) => Ok(ImageType::Qcow2),
        (Some(ImageType::Qcow2), _) => Err(ImageError::NotQcow2 {
            path: path_buf(),
            format,
            hint: if format == ImageFormat::Raw {
                "; drop image_type=qcow2 to serve it as raw"
            } else {
                ""
            },
        }),
        (Some(ImageType::Raw), _) if format.is_container() && !readonly => {
            Err(ImageError::RawOverContainer {
                path: path_buf(),
                format,
                hint: if format == ImageFormat::Qcow2 {
                    "; drop image_type=raw to serve it as qcow2"
                } else {
                    ""
                },
            })
        }
        (Some(ImageType::Raw), _) | (None, ImageFormat::Raw) => Ok(ImageType::Raw),
        (None, ImageFormat::Qcow2) => Ok(ImageType::Qcow2),
        (None, ImageFormat::Iso9660) if readonly => Ok(ImageType::Raw),
        (None, ImageFormat::Iso9660) => Err(ImageError::IsoWritable { path: path_buf() }),
        (None, ImageFormat::Compressed(compression)) => Err(ImageError::Compressed {
            path: path_buf(),
            format,
            command: compression.decompress_command(&shell_quote(path)),
        }),
        (None, _) => Err(ImageError::Unservable {
            path: path_buf(),
            format,
            command: convert_command(path, format),
        }),
    }
}

/// `qemu-img convert -f FMT -O raw SRC DST`, with DST next to SRC. The
/// source format is explicit: qemu-img does not probe fixed VHDs.
pub fn convert_command(path: &Path, format: ImageFormat) -> String {
    let source = format.qemu_img_name().unwrap_or("raw");
    format!(
        "qemu-img convert -f {source} -O raw {} {}",
        shell_quote(path),
        shell_quote(&raw_destination(path))
    )
}

/// SRC with its extension replaced by `.raw` (`disk.vmdk` → `disk.raw`;
/// `disk.raw` → `disk.converted.raw`).
fn raw_destination(path: &Path) -> PathBuf {
    let mut name = path.file_stem().unwrap_or(path.as_os_str()).to_os_string();
    name.push(if path.extension().is_some_and(|e| e == "raw") {
        ".converted.raw"
    } else {
        ".raw"
    });
    path.with_file_name(name)
}

/// `path` as a shell word: as it is when plain, else single-quoted.
fn shell_quote(path: &Path) -> String {
    let text = path.display().to_string();
    let plain = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+,:@%=".contains(&b));
    if plain {
        text
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::testing::{open_image, open_retrying, qemu_img, Image};
    use std::os::unix::fs::FileExt;

    const MIB: u64 = 1 << 20;

    /// A scratch directory (kept alive by the returned image) and a path
    /// in it.
    fn scratch(name: &str) -> (Image, PathBuf) {
        let dir = Image::new(0);
        let path = dir.path.with_file_name(name);
        (dir, path)
    }

    fn create(path: &Path, args: &[&str], size: &str) {
        let mut command = vec!["create", "-q"];
        command.extend_from_slice(args);
        command.extend([path.to_str().unwrap(), size]);
        qemu_img(&command);
    }

    fn open_err(path: &Path, readonly: bool, image_type: Option<ImageType>) -> String {
        open_retrying(path, readonly, image_type)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn foreign_formats_are_refused_with_the_command_that_converts_them() {
        let cases: [(&str, &[&str], &str, &str); 8] = [
            (
                "s.vmdk",
                &["-f", "vmdk"],
                "a VMDK image (sparse extent)",
                "vmdk",
            ),
            (
                "d.vmdk",
                &["-f", "vmdk", "-o", "subformat=monolithicFlat"],
                "a VMDK descriptor file",
                "vmdk",
            ),
            (
                "f.vhd",
                &["-f", "vpc", "-o", "subformat=fixed"],
                "a VHD image (fixed)",
                "vpc",
            ),
            (
                "y.vhd",
                &["-f", "vpc", "-o", "subformat=dynamic"],
                "a VHD image (dynamic)",
                "vpc",
            ),
            ("x.vhdx", &["-f", "vhdx"], "a VHDX image", "vhdx"),
            ("q.qed", &["-f", "qed"], "a QED image", "qed"),
            ("v.vdi", &["-f", "vdi"], "a VDI image", "vdi"),
            (
                "o.qcow",
                &["-f", "qcow"],
                "a qcow (version 1) image",
                "qcow",
            ),
        ];
        for (name, args, what, qemu_format) in cases {
            let (_dir, path) = scratch(name);
            create(&path, args, "16M");
            let before = std::fs::read(&path).unwrap();
            let shown = path.display();
            let stem = path.with_extension("raw");
            let expected = format!(
                "disk image {shown} is {what}, which zvmm cannot serve; convert it to raw with \
                 `qemu-img convert -f {qemu_format} -O raw {shown} {}` and attach that",
                stem.display()
            );
            for readonly in [false, true] {
                assert_eq!(open_err(&path, readonly, None), expected);
            }
            assert_eq!(std::fs::read(&path).unwrap(), before, "{name} changed");
        }
    }

    #[test]
    fn the_suggested_conversion_works() {
        let (_dir, path) = scratch("f.vhd");
        create(&path, &["-f", "vpc", "-o", "subformat=fixed"], "4M");
        let message = open_err(&path, false, None);
        let command = message.split('`').nth(1).unwrap();
        let words: Vec<&str> = command.split(' ').collect();
        assert_eq!(words[0], "qemu-img");
        qemu_img(&words[1..]);
        let raw = open_image(&path.with_extension("raw"), false, None);
        // The fixed VHD's data without its footer.
        assert_eq!(raw.size(), std::fs::metadata(&path).unwrap().len() - 512);
        assert_eq!(raw.image_type(), ImageType::Raw);
    }

    #[test]
    fn iso_images_are_served_read_only_only() {
        let image = Image::new(MIB);
        let file = std::fs::File::options()
            .write(true)
            .open(&image.path)
            .unwrap();
        file.write_all_at(b"\x01CD001\x01", 0x8000).unwrap();
        let shown = image.path.display();
        assert_eq!(
            open_err(&image.path, false, None),
            format!(
                "disk image {shown} is an ISO 9660 CD/DVD image, read-only media the guest must \
                 not alter; attach it with readonly=on (image_type=raw serves it writable)"
            )
        );
        let ro = open_image(&image.path, true, None);
        assert_eq!((ro.image_type(), ro.size()), (ImageType::Raw, MIB));
        assert_eq!(ro.info().format, ImageFormat::Iso9660);
        drop(ro);
        let forced = open_image(&image.path, false, Some(ImageType::Raw));
        assert!(!forced.readonly() && !forced.guards_sector0());
    }

    #[test]
    fn compressed_files_are_refused_with_the_command_that_decompresses_them() {
        let (_dir, path) = scratch("disk image.img.xz");
        std::fs::write(&path, b"\xfd7zXZ\0\0\x04").unwrap();
        let shown = path.display();
        assert_eq!(
            open_err(&path, true, None),
            format!(
                "disk image {shown} is an xz-compressed file, not a disk image; decompress it \
                 first (`xz -dk '{shown}'`) and attach the result"
            )
        );
    }

    #[test]
    fn image_type_raw_on_a_container_needs_readonly() {
        let (_dir, path) = scratch("a.qcow2");
        create(&path, &["-f", "qcow2"], "1M");
        let shown = path.display();
        assert_eq!(
            open_err(&path, false, Some(ImageType::Raw)),
            format!(
                "disk image {shown} is a qcow2 image but image_type=raw was given: refused \
                 unless readonly=on, because a guest writing it as raw data could rewrite the \
                 header and name any host file as its backing file; drop image_type=raw to \
                 serve it as qcow2"
            )
        );
        // As raw data it must be whole sectors (no truncate advice here).
        let size = std::fs::metadata(&path).unwrap().len();
        assert_eq!(
            open_err(&path, true, Some(ImageType::Raw)),
            format!(
                "disk image {shown} is a qcow2 image of {size} bytes, not a multiple of 512, \
                 so it cannot be served as raw sectors"
            )
        );
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(size.next_multiple_of(512))
            .unwrap();
        let raw = open_image(&path, true, Some(ImageType::Raw));
        assert_eq!(raw.image_type(), ImageType::Raw);
        // Served as the file's bytes: the qcow2 file, not the 1 MiB disk.
        assert_eq!(raw.size(), size.next_multiple_of(512));
        drop(raw);
        let (_dir, vmdk) = scratch("s.vmdk");
        create(&vmdk, &["-f", "vmdk"], "1M");
        let message = open_err(&vmdk, false, Some(ImageType::Raw));
        assert!(
            message.ends_with("name any host file as its backing file"),
            "{message}"
        );
        open_image(&vmdk, true, Some(ImageType::Raw));
    }

    #[test]
    fn image_type_qcow2_must_match() {
        let image = Image::new(MIB);
        let shown = image.path.display();
        assert_eq!(
            open_err(&image.path, false, Some(ImageType::Qcow2)),
            format!(
                "disk image {shown} is a raw image, not qcow2, but image_type=qcow2 was given; \
                 drop image_type=qcow2 to serve it as raw"
            )
        );
        let (_dir, path) = scratch("a.qcow2");
        create(&path, &["-f", "qcow2"], "3M");
        let qcow2 = open_image(&path, false, Some(ImageType::Qcow2));
        assert_eq!(
            (qcow2.image_type(), qcow2.size()),
            (ImageType::Qcow2, 3 * MIB)
        );
        assert!(!qcow2.guards_sector0());
    }

    #[test]
    fn sector0_is_guarded_only_on_detected_writable_raw_images() {
        let image = Image::new(MIB);
        assert!(open_image(&image.path, false, None).guards_sector0());
        assert!(!open_image(&image.path, true, None).guards_sector0());
        let forced = open_image(&image.path, false, Some(ImageType::Raw));
        assert!(!forced.guards_sector0());
        drop(forced);
        let (_dir, path) = scratch("a.qcow2");
        create(&path, &["-f", "qcow2"], "1M");
        let detected = open_image(&path, false, None);
        assert_eq!(detected.image_type(), ImageType::Qcow2);
        assert!(!detected.guards_sector0());
    }

    #[test]
    fn the_truncate_advice_is_for_raw_images_only() {
        let image = Image::new(1000);
        let message = open_err(&image.path, false, None);
        assert!(
            message.contains("pad it with `truncate -s 1024 "),
            "{message}"
        );
        // A qcow2 file is never a multiple of 512 by design; no advice.
        let (_dir, path) = scratch("a.qcow2");
        create(&path, &["-f", "qcow2"], "1M");
        std::fs::File::options()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all_at(b"x", 0)
            .unwrap();
        open_image(&path, false, None);
    }

    #[test]
    fn backing_files_can_be_turned_off() {
        let (dir, base) = scratch("base.qcow2");
        create(&base, &["-f", "qcow2"], "1M");
        let top = dir.path.with_file_name("top.qcow2");
        create(
            &top,
            &["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2"],
            "1M",
        );
        let mut options = ImageOptions {
            readonly: false,
            image_type: None,
            backing_files: false,
        };
        let err = DiskImage::open_with(&top, &options)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "disk image {} is a qcow2 image with the backing file 'base.qcow2', and \
                 backing_files=off; set backing_files=on to follow it (read-only, shared)",
                top.display()
            )
        );
        // An image without a backing file is served either way.
        assert!(DiskImage::open_with(&base, &options).is_ok());
        options.backing_files = true;
        let served = DiskImage::open_with(&top, &options).unwrap();
        assert_eq!(served.backing_chain(), std::slice::from_ref(&base));
    }

    #[test]
    fn destinations_and_quoting() {
        let raw_of = |p: &str| raw_destination(Path::new(p)).display().to_string();
        assert_eq!(raw_of("/i/disk.vmdk"), "/i/disk.raw");
        assert_eq!(raw_of("/i/disk.raw"), "/i/disk.converted.raw");
        assert_eq!(raw_of("/i/disk"), "/i/disk.raw");
        assert_eq!(shell_quote(Path::new("/i/a b")), "'/i/a b'");
        assert_eq!(shell_quote(Path::new("/i/it's")), r"'/i/it'\''s'");
        assert_eq!(shell_quote(Path::new("/i/x-1.img")), "/i/x-1.img");
    }
}
