//! Disk image formats, recognised by their magic numbers: what a file or
//! block device holds (raw data — partitioned or not —, qcow2, another
//! hypervisor's format, a CD image, a compressed file), its virtual size
//! and backing file where the header says so cheaply.
//!
//! Detection reads at most the first 34 KiB and the last 512 bytes (plus a
//! qcow2 backing file name); it never interprets anything beyond headers.
//! Where each format is recognised:
//!
//! | format | where | what |
//! |---|---|---|
//! | qcow (v1), qcow2 (v2, v3) | 0 | `QFI\xfb`, then the version |
//! | QED | 0 | `QED\0` |
//! | VMDK sparse extent | 0 | `KDMV` |
//! | VMDK descriptor | 0 | `# Disk DescriptorFile` |
//! | VHDX | 0 | `vhdxfile` |
//! | VHD dynamic / differencing | 0 | `conectix` (the footer's copy) |
//! | VDI | 0x40 | `0xbeda107f` |
//! | gzip, xz, zstd, bzip2 | 0 | their stream magics |
//! | ISO 9660 | 0x8001 | `CD001` |
//! | VHD fixed | end − 512 (or − 511) | `conectix` |
//! | GPT / MBR (raw) | 512 (4096) / 510 | `EFI PART` / `55 aa` |
//!
//! [`sector0_format`] answers the same question for a first sector alone;
//! the virtio-blk request path uses it to refuse guest writes that would
//! make a detected raw disk read as another format on its next start.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Bytes read from the start of an image: enough for the ISO 9660
/// primary volume descriptor's identifier at 0x8001.
const HEAD_BYTES: usize = 0x8800;
/// Offset of the ISO 9660 standard identifier (`CD001`) in sector 16.
const ISO_ID_OFFSET: usize = 0x8001;
/// Longest qcow2 backing file name (QEMU's limit).
const MAX_BACKING_NAME: u32 = 1023;
/// qcow2 header extension: backing file format name.
const QCOW2_EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// qcow2 incompatible feature bit: external data file.
const QCOW2_INCOMPAT_DATA_FILE: u64 = 1 << 2;

/// What a disk image file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// Plain sectors (possibly with a partition table).
    Raw,
    /// qcow2, version 2 or 3.
    Qcow2,
    /// qcow of another version (1, or newer than 3).
    Qcow(u32),
    /// QEMU Enhanced Disk.
    Qed,
    /// A VMDK sparse extent (monolithic sparse, stream-optimized).
    Vmdk,
    /// A VMDK text descriptor naming extent files.
    VmdkDescriptor,
    /// Virtual PC / Hyper-V VHD.
    Vhd(VhdKind),
    /// Hyper-V VHDX.
    Vhdx,
    /// VirtualBox VDI.
    Vdi,
    /// An ISO 9660 CD/DVD image (raw data, read-only media).
    Iso9660,
    /// A compressed file, not an image.
    Compressed(Compression),
}

/// The VHD disk type (footer field at offset 60).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VhdKind {
    /// Raw data followed by a 512-byte footer.
    Fixed,
    /// Block allocation table, blocks allocated on write.
    Dynamic,
    /// Dynamic with a parent image.
    Differencing,
}

/// A compressed file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// gzip (`.gz`).
    Gzip,
    /// xz (`.xz`).
    Xz,
    /// Zstandard (`.zst`).
    Zstd,
    /// bzip2 (`.bz2`).
    Bzip2,
}

/// The partition table of a raw image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartitionTable {
    /// GUID partition table (`EFI PART` at LBA 1).
    Gpt,
    /// A DOS/MBR partition table (boot signature and a partition entry).
    Mbr,
}

/// What the qcow2 header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Qcow2Header {
    /// 2 or 3.
    pub version: u32,
    /// Bytes per cluster.
    pub cluster_size: u64,
    /// Guest-visible size in bytes.
    pub size: u64,
    /// 0: none, 1: AES, 2: LUKS.
    pub crypt_method: u32,
    /// The image keeps its data in an external file.
    pub external_data_file: bool,
    /// The incompatible feature bits (v3; 0 on v2).
    pub incompatible_features: u64,
    /// Internal snapshots.
    pub snapshots: u32,
}

/// What [`detect`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    /// The format.
    pub format: ImageFormat,
    /// Bytes of the file (block devices: of the device).
    pub file_size: u64,
    /// The size a guest would see, where the header says it cheaply
    /// (raw and ISO: the file size).
    pub virtual_size: Option<u64>,
    /// The backing file named in the header (qcow2), as written there.
    pub backing_file: Option<String>,
    /// The backing file's format named in the header (qcow2).
    pub backing_format: Option<String>,
    /// A raw image's partition table.
    pub partition_table: Option<PartitionTable>,
    /// The qcow2 header fields (`None`, with a [`defect`](Self::defect),
    /// when the header is broken).
    pub qcow2: Option<Qcow2Header>,
    /// What is wrong with a header that has the right magic.
    pub defect: Option<&'static str>,
}

/// Detecting a format failed.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Opening or reading the image failed.
    #[error("cannot read disk image {} to detect its format", .path.display())]
    Read {
        /// The image path.
        path: PathBuf,
        /// The system error.
        #[source]
        source: io::Error,
    },
}

impl ImageFormat {
    /// "a qcow2 image", "a VHD image (fixed)", ... for messages.
    pub fn describe(self) -> &'static str {
        match self {
            ImageFormat::Raw => "a raw image",
            ImageFormat::Qcow2 => "a qcow2 image",
            ImageFormat::Qcow(1) => "a qcow (version 1) image",
            ImageFormat::Qcow(_) => "a qcow image of an unknown version",
            ImageFormat::Qed => "a QED image",
            ImageFormat::Vmdk => "a VMDK image (sparse extent)",
            ImageFormat::VmdkDescriptor => "a VMDK descriptor file",
            ImageFormat::Vhd(VhdKind::Fixed) => "a VHD image (fixed)",
            ImageFormat::Vhd(VhdKind::Dynamic) => "a VHD image (dynamic)",
            ImageFormat::Vhd(VhdKind::Differencing) => "a VHD image (differencing)",
            ImageFormat::Vhdx => "a VHDX image",
            ImageFormat::Vdi => "a VDI image",
            ImageFormat::Iso9660 => "an ISO 9660 CD/DVD image",
            ImageFormat::Compressed(Compression::Gzip) => "a gzip-compressed file",
            ImageFormat::Compressed(Compression::Xz) => "an xz-compressed file",
            ImageFormat::Compressed(Compression::Zstd) => "a zstd-compressed file",
            ImageFormat::Compressed(Compression::Bzip2) => "a bzip2-compressed file",
        }
    }

    /// qemu-img's name of the format (`-f`), for images qemu-img reads.
    pub fn qemu_img_name(self) -> Option<&'static str> {
        Some(match self {
            ImageFormat::Raw | ImageFormat::Iso9660 => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Qcow(_) => "qcow",
            ImageFormat::Qed => "qed",
            ImageFormat::Vmdk | ImageFormat::VmdkDescriptor => "vmdk",
            ImageFormat::Vhd(_) => "vpc",
            ImageFormat::Vhdx => "vhdx",
            ImageFormat::Vdi => "vdi",
            ImageFormat::Compressed(_) => return None,
        })
    }

    /// Whether the file has metadata of its own (a container format), as
    /// opposed to raw data (raw, ISO 9660) or a compressed stream.
    pub fn is_container(self) -> bool {
        !matches!(
            self,
            ImageFormat::Raw | ImageFormat::Iso9660 | ImageFormat::Compressed(_)
        )
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

impl Compression {
    /// The command that decompresses `path` next to itself.
    pub fn decompress_command(self, path: &str) -> String {
        match self {
            Compression::Gzip => format!("gunzip -k {path}"),
            Compression::Xz => format!("xz -dk {path}"),
            Compression::Zstd => format!("zstd -d {path}"),
            Compression::Bzip2 => format!("bunzip2 -k {path}"),
        }
    }
}

/// Detects the format of the image at `path` (opened read-only).
pub fn detect(path: &Path) -> Result<ImageInfo, FormatError> {
    let read_error = |source| FormatError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(read_error)?;
    let meta = file.metadata().map_err(read_error)?;
    let size = super::disk::file_or_device_size(&file, &meta).map_err(read_error)?;
    detect_file(&file, size).map_err(read_error)
}

/// Detects the format of an open image of `size` bytes.
pub fn detect_file(file: &File, size: u64) -> io::Result<ImageInfo> {
    let head = read_up_to(
        file,
        0,
        HEAD_BYTES.min(usize::try_from(size).unwrap_or(HEAD_BYTES)),
    )?;
    let mut info = ImageInfo {
        format: ImageFormat::Raw,
        file_size: size,
        virtual_size: Some(size),
        backing_file: None,
        backing_format: None,
        partition_table: None,
        qcow2: None,
        defect: None,
    };
    if let Some(format) = sector0_format(&head) {
        info.format = format;
        info.virtual_size = header_virtual_size(format, &head);
        if format == ImageFormat::Qcow2 {
            read_qcow2(file, &head, &mut info)?;
        }
        return Ok(info);
    }
    if head.get(ISO_ID_OFFSET..ISO_ID_OFFSET + 5) == Some(b"CD001") {
        info.format = ImageFormat::Iso9660;
        return Ok(info);
    }
    if let Some(footer) = vhd_fixed_footer(file, size)? {
        info.format = ImageFormat::Vhd(VhdKind::Fixed);
        info.virtual_size = Some(be_u64(&footer, 48));
        return Ok(info);
    }
    info.partition_table = partition_table(&head);
    Ok(info)
}

/// The non-raw format `sector` (the first bytes of an image, at least 512
/// of them for every check to apply) would be detected as, if any. ISO
/// 9660 and fixed VHD are recognised elsewhere in the file, not here.
pub fn sector0_format(sector: &[u8]) -> Option<ImageFormat> {
    let starts = |magic: &[u8]| sector.starts_with(magic);
    if starts(b"QFI\xfb") {
        return Some(match be_u32(sector, 4) {
            2 | 3 => ImageFormat::Qcow2,
            other => ImageFormat::Qcow(other),
        });
    }
    let magics: [(&[u8], ImageFormat); 8] = [
        (b"QED\0", ImageFormat::Qed),
        (b"KDMV", ImageFormat::Vmdk),
        (b"# Disk DescriptorFile", ImageFormat::VmdkDescriptor),
        (b"vhdxfile", ImageFormat::Vhdx),
        (b"conectix", ImageFormat::Vhd(vhd_kind(sector))),
        (b"\x1f\x8b\x08", ImageFormat::Compressed(Compression::Gzip)),
        (b"\xfd7zXZ\0", ImageFormat::Compressed(Compression::Xz)),
        (
            b"\x28\xb5\x2f\xfd",
            ImageFormat::Compressed(Compression::Zstd),
        ),
    ];
    if let Some((_, format)) = magics.iter().find(|(magic, _)| starts(magic)) {
        return Some(*format);
    }
    if is_bzip2(sector) {
        return Some(ImageFormat::Compressed(Compression::Bzip2));
    }
    if sector.len() >= 0x44 && sector[0x40..0x44] == 0xbeda_107fu32.to_le_bytes() {
        return Some(ImageFormat::Vdi);
    }
    None
}

/// `BZh` + block size digit + the block magic (π's digits in BCD).
fn is_bzip2(sector: &[u8]) -> bool {
    sector.starts_with(b"BZh")
        && sector.len() >= 10
        && (b'1'..=b'9').contains(&sector[3])
        && sector[4..10] == [0x31, 0x41, 0x59, 0x26, 0x53, 0x59]
}

/// The disk type of a VHD footer (or its copy at offset 0).
fn vhd_kind(footer: &[u8]) -> VhdKind {
    match be_u32(footer, 60) {
        2 => VhdKind::Fixed,
        4 => VhdKind::Differencing,
        _ => VhdKind::Dynamic,
    }
}

/// The virtual size a sector-0 format's header gives.
fn header_virtual_size(format: ImageFormat, head: &[u8]) -> Option<u64> {
    match format {
        ImageFormat::Qcow2 | ImageFormat::Qcow(1) => field(head, 24).map(u64::from_be_bytes),
        ImageFormat::Qed => field(head, 48).map(u64::from_le_bytes),
        ImageFormat::Vmdk => field(head, 12).map(|b| u64::from_le_bytes(b).saturating_mul(512)),
        ImageFormat::VmdkDescriptor => vmdk_descriptor_size(head),
        ImageFormat::Vhd(_) => field(head, 48).map(u64::from_be_bytes),
        ImageFormat::Vdi => field(head, 0x170).map(u64::from_le_bytes),
        _ => None,
    }
}

/// The sum of a VMDK descriptor's extent sizes (`RW 2048 FLAT "x" 0`).
fn vmdk_descriptor_size(head: &[u8]) -> Option<u64> {
    let text = String::from_utf8_lossy(head);
    let mut sectors = 0u64;
    let mut any = false;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if !matches!(words.next(), Some("RW" | "RDONLY" | "NOACCESS")) {
            continue;
        }
        sectors = sectors.checked_add(words.next()?.parse().ok()?)?;
        any = true;
    }
    any.then(|| sectors.saturating_mul(512))
}

/// Whether the L1 table (`l1_size` entries of 8 bytes at `l1_table_offset`)
/// and the refcount table (`refcount_table_clusters` clusters at
/// `refcount_table_offset`) lie inside a file of `file_size` bytes: a
/// truncated image must not be served (writes would allocate over the
/// missing metadata).
fn qcow2_tables_inside(head: &[u8], cluster_bits: u32, file_size: u64) -> bool {
    let inside = |offset: u64, len: u64| {
        len == 0 || offset.checked_add(len).is_some_and(|end| end <= file_size)
    };
    let l1 = u64::from(be_u32(head, 36)) * 8;
    let refcounts = u64::from(be_u32(head, 56)) << cluster_bits;
    inside(be_u64(head, 40), l1) && inside(be_u64(head, 48), refcounts)
}

/// Fills the qcow2 fields of `info` from the header in `head`; a broken
/// header is recorded in `info.defect`, only read errors fail.
fn read_qcow2(file: &File, head: &[u8], info: &mut ImageInfo) -> io::Result<()> {
    if head.len() < 72 {
        info.defect = Some("qcow2 header truncated");
        return Ok(());
    }
    let version = be_u32(head, 4);
    let cluster_bits = be_u32(head, 20);
    if !(9..=21).contains(&cluster_bits) {
        info.defect = Some("qcow2 cluster size out of range");
        return Ok(());
    }
    if !qcow2_tables_inside(head, cluster_bits, info.file_size) {
        info.defect = Some(
            "qcow2 L1 or refcount table beyond the end of the file (a truncated or damaged image)",
        );
        return Ok(());
    }
    let incompatible = if version >= 3 { be_u64(head, 72) } else { 0 };
    let header = Qcow2Header {
        version,
        cluster_size: 1 << cluster_bits,
        size: be_u64(head, 24),
        crypt_method: be_u32(head, 32),
        external_data_file: incompatible & QCOW2_INCOMPAT_DATA_FILE != 0,
        incompatible_features: incompatible,
        snapshots: be_u32(head, 60),
    };
    let (name_offset, name_len) = (be_u64(head, 8), be_u32(head, 16));
    if name_offset != 0 && name_len != 0 {
        if name_len > MAX_BACKING_NAME {
            info.defect = Some("qcow2 backing file name longer than 1023 bytes");
            return Ok(());
        }
        let name = read_up_to(file, name_offset, name_len as usize)?;
        if name.len() != name_len as usize {
            info.defect = Some("qcow2 backing file name beyond the end of the file");
            return Ok(());
        }
        info.backing_file = Some(String::from_utf8_lossy(&name).into_owned());
    }
    info.backing_format = qcow2_backing_format(head, version);
    info.qcow2 = Some(header);
    Ok(())
}

/// The backing format header extension, if within `head`.
fn qcow2_backing_format(head: &[u8], version: u32) -> Option<String> {
    let mut at = if version >= 3 && head.len() >= 104 {
        be_u32(head, 100) as usize
    } else {
        72
    };
    while at + 8 <= head.len() {
        let (kind, len) = (be_u32(head, at), be_u32(head, at + 4) as usize);
        let data = head.get(at + 8..at + 8 + len)?;
        match kind {
            0 => return None,
            QCOW2_EXT_BACKING_FORMAT => return Some(String::from_utf8_lossy(data).into_owned()),
            _ => at += 8 + len.div_ceil(8) * 8,
        }
    }
    None
}

/// The VHD footer at the end of `file`, if there is one (512 bytes, or 511
/// as some old Virtual PC versions wrote).
fn vhd_fixed_footer(file: &File, size: u64) -> io::Result<Option<Vec<u8>>> {
    for footer_len in [512u64, 511] {
        if size < footer_len + 512 {
            continue;
        }
        let footer = read_up_to(file, size - footer_len, footer_len as usize)?;
        if footer.starts_with(b"conectix") && vhd_kind(&footer) == VhdKind::Fixed {
            return Ok(Some(footer));
        }
    }
    Ok(None)
}

/// GPT (512- or 4096-byte sectors) or an MBR with at least one partition.
fn partition_table(head: &[u8]) -> Option<PartitionTable> {
    let gpt_at = |at: usize| head.get(at..at + 8) == Some(b"EFI PART");
    if gpt_at(512) || gpt_at(4096) {
        return Some(PartitionTable::Gpt);
    }
    if head.get(510..512) != Some(&[0x55, 0xaa]) {
        return None;
    }
    let entries = &head[446..510];
    let plausible = entries
        .chunks(16)
        .any(|e| e[4] != 0 && matches!(e[0], 0x00 | 0x80));
    plausible.then_some(PartitionTable::Mbr)
}

/// Reads up to `len` bytes at `offset` (fewer at the end of the file).
fn read_up_to(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(done);
    Ok(buf)
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    field(bytes, at).map_or(0, u32::from_be_bytes)
}

fn be_u64(bytes: &[u8], at: usize) -> u64 {
    field(bytes, at).map_or(0, u64::from_be_bytes)
}

/// `N` bytes at `at`, if `bytes` has them.
fn field<const N: usize>(bytes: &[u8], at: usize) -> Option<[u8; N]> {
    bytes.get(at..at.checked_add(N)?)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::testing::{qemu_img, Image};

    const MIB: u64 = 1 << 20;

    /// `bytes` at the start of a sparse image of `size` bytes.
    fn image_with(size: u64, at: u64, bytes: &[u8]) -> Image {
        let image = Image::new(size);
        File::options()
            .write(true)
            .open(&image.path)
            .unwrap()
            .write_all_at(bytes, at)
            .unwrap();
        image
    }

    fn detect_bytes(size: u64, at: u64, bytes: &[u8]) -> ImageInfo {
        detect(&image_with(size, at, bytes).path).unwrap()
    }

    /// A qcow2 v3 header: 64 KiB clusters, `size` bytes, optional backing
    /// name at 0x200 and backing format extension.
    fn qcow2_header(size: u64, backing: Option<(&str, &str)>) -> Vec<u8> {
        let mut h = vec![0u8; 0x400];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&size.to_be_bytes());
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        if let Some((name, format)) = backing {
            h[8..16].copy_from_slice(&0x200u64.to_be_bytes());
            h[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            h[0x200..0x200 + name.len()].copy_from_slice(name.as_bytes());
            h[104..108].copy_from_slice(&QCOW2_EXT_BACKING_FORMAT.to_be_bytes());
            h[108..112].copy_from_slice(&(format.len() as u32).to_be_bytes());
            h[112..112 + format.len()].copy_from_slice(format.as_bytes());
        }
        h
    }

    #[test]
    fn an_empty_or_zero_image_is_raw_without_a_partition_table() {
        for size in [0, 512, MIB] {
            let info = detect(&Image::new(size).path).unwrap();
            assert_eq!(info.format, ImageFormat::Raw);
            assert_eq!((info.file_size, info.virtual_size), (size, Some(size)));
            assert_eq!(info.partition_table, None);
            assert_eq!((info.backing_file, info.qcow2), (None, None));
        }
    }

    #[test]
    fn partition_tables_are_reported_on_raw_images() {
        assert_eq!(
            detect_bytes(MIB, 512, b"EFI PART").partition_table,
            Some(PartitionTable::Gpt)
        );
        assert_eq!(
            detect_bytes(MIB, 4096, b"EFI PART").partition_table,
            Some(PartitionTable::Gpt)
        );
        let mut mbr = vec![0u8; 512];
        mbr[446 + 4] = 0x83;
        mbr[510..].copy_from_slice(&[0x55, 0xaa]);
        let info = detect_bytes(MIB, 0, &mbr);
        assert_eq!(
            (info.format, info.partition_table),
            (ImageFormat::Raw, Some(PartitionTable::Mbr))
        );
        // A boot signature without a partition entry (a bare boot sector).
        mbr[446 + 4] = 0;
        assert_eq!(detect_bytes(MIB, 0, &mbr).partition_table, None);
    }

    #[test]
    fn sector0_magics_name_their_format() {
        let vdi = {
            let mut v = vec![0u8; 512];
            v[0x40..0x44].copy_from_slice(&0xbeda_107fu32.to_le_bytes());
            v
        };
        let bzip2 = b"BZh91AY&SY".to_vec();
        let cases: [(&[u8], ImageFormat); 12] = [
            (b"QFI\xfb\0\0\0\x02", ImageFormat::Qcow2),
            (b"QFI\xfb\0\0\0\x03", ImageFormat::Qcow2),
            (b"QFI\xfb\0\0\0\x01", ImageFormat::Qcow(1)),
            (b"QED\0", ImageFormat::Qed),
            (b"KDMV\x01\0\0\0", ImageFormat::Vmdk),
            (b"# Disk DescriptorFile\n", ImageFormat::VmdkDescriptor),
            (b"vhdxfile", ImageFormat::Vhdx),
            (
                b"\x1f\x8b\x08\0",
                ImageFormat::Compressed(Compression::Gzip),
            ),
            (b"\xfd7zXZ\0\0", ImageFormat::Compressed(Compression::Xz)),
            (
                b"\x28\xb5\x2f\xfd",
                ImageFormat::Compressed(Compression::Zstd),
            ),
            (&bzip2, ImageFormat::Compressed(Compression::Bzip2)),
            (&vdi, ImageFormat::Vdi),
        ];
        for (bytes, format) in cases {
            assert_eq!(sector0_format(bytes), Some(format), "{bytes:?}");
            assert_eq!(detect_bytes(MIB, 0, bytes).format, format);
        }
        // Text that merely starts like bzip2, and ordinary boot code.
        assert_eq!(sector0_format(b"BZh is not bzip2"), None);
        assert_eq!(sector0_format(&[0xeb, 0x63, 0x90, 0x10]), None);
        assert_eq!(sector0_format(&[]), None);
    }

    #[test]
    fn vhd_footers_tell_fixed_dynamic_and_differencing_apart() {
        let footer = |disk_type: u32, size: u64| {
            let mut f = vec![0u8; 512];
            f[..8].copy_from_slice(b"conectix");
            f[48..56].copy_from_slice(&size.to_be_bytes());
            f[60..64].copy_from_slice(&disk_type.to_be_bytes());
            f
        };
        let info = detect_bytes(MIB + 512, MIB, &footer(2, MIB));
        assert_eq!(info.format, ImageFormat::Vhd(VhdKind::Fixed));
        assert_eq!(info.virtual_size, Some(MIB));
        // Old Virtual PC: a 511-byte footer.
        let info = detect_bytes(MIB + 511, MIB, &footer(2, MIB)[..511]);
        assert_eq!(info.format, ImageFormat::Vhd(VhdKind::Fixed));
        let info = detect_bytes(MIB, 0, &footer(3, 8 * MIB));
        assert_eq!(info.format, ImageFormat::Vhd(VhdKind::Dynamic));
        assert_eq!(info.virtual_size, Some(8 * MIB));
        let info = detect_bytes(MIB, 0, &footer(4, MIB));
        assert_eq!(info.format, ImageFormat::Vhd(VhdKind::Differencing));
        // A footer-like tail of another type is raw data.
        let info = detect_bytes(MIB + 512, MIB, &footer(3, MIB));
        assert_eq!(info.format, ImageFormat::Raw);
    }

    #[test]
    fn iso9660_is_found_at_sector_16() {
        let info = detect_bytes(MIB, 0x8001, b"CD001");
        assert_eq!(info.format, ImageFormat::Iso9660);
        assert_eq!(info.virtual_size, Some(MIB));
        assert_eq!(detect_bytes(MIB, 0x8002, b"CD001").format, ImageFormat::Raw);
    }

    #[test]
    fn qcow2_headers_give_size_cluster_and_backing_file() {
        let header = qcow2_header(5 * MIB, Some(("../base.raw", "raw")));
        let info = detect_bytes(MIB, 0, &header);
        assert_eq!(info.format, ImageFormat::Qcow2);
        assert_eq!(info.virtual_size, Some(5 * MIB));
        assert_eq!(info.backing_file.as_deref(), Some("../base.raw"));
        assert_eq!(info.backing_format.as_deref(), Some("raw"));
        let qcow2 = info.qcow2.unwrap();
        assert_eq!((qcow2.version, qcow2.cluster_size), (3, 65536));
        assert!(!qcow2.external_data_file && qcow2.crypt_method == 0);

        let info = detect_bytes(MIB, 0, &qcow2_header(MIB, None));
        assert_eq!((info.backing_file, info.backing_format), (None, None));
    }

    #[test]
    fn broken_qcow2_headers_are_defects_not_errors_or_panics() {
        let defect = |header: &[u8]| {
            let info = detect(&image_with(MIB, 0, header).path).unwrap();
            assert_eq!((info.format, &info.qcow2), (ImageFormat::Qcow2, &None));
            info.defect.unwrap()
        };
        let mut header = qcow2_header(MIB, None);
        header[20..24].copy_from_slice(&40u32.to_be_bytes());
        assert_eq!(defect(&header), "qcow2 cluster size out of range");
        // A backing name beyond the end of the file, or absurdly long.
        let mut header = qcow2_header(MIB, None);
        header[8..16].copy_from_slice(&(2 * MIB).to_be_bytes());
        header[16..20].copy_from_slice(&8u32.to_be_bytes());
        assert!(defect(&header).contains("beyond the end"));
        header[16..20].copy_from_slice(&5000u32.to_be_bytes());
        assert!(defect(&header).contains("longer than 1023"));
        // L1 or refcount table past the end of the file (a qcow2 image
        // cut short after its header).
        for (count_at, offset_at) in [(36, 40), (56, 48)] {
            let mut header = qcow2_header(MIB, None);
            header[count_at..count_at + 4].copy_from_slice(&1u32.to_be_bytes());
            header[offset_at..offset_at + 8].copy_from_slice(&0x10000u64.to_be_bytes());
            let cut = detect(&image_with(0x10000, 0, &header).path).unwrap();
            assert!(cut.defect.unwrap().contains("beyond the end of the file"));
            let whole = detect(&image_with(0x20000, 0, &header).path).unwrap();
            assert_eq!(whole.defect, None);
        }
        // A header cut short.
        let image = Image::new(0);
        std::fs::write(&image.path, b"QFI\xfb\0\0\0\x03").unwrap();
        let info = detect(&image.path).unwrap();
        assert_eq!(info.defect, Some("qcow2 header truncated"));
        // Extension lengths running off the buffer end the scan.
        let mut header = qcow2_header(MIB, None);
        header[104..108].copy_from_slice(&0x1234u32.to_be_bytes());
        header[108..112].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(detect_bytes(MIB, 0, &header).backing_format, None);
    }

    #[test]
    fn vmdk_descriptors_sum_their_extents() {
        let text = b"# Disk DescriptorFile\nversion=1\nRW 2048 FLAT \"a.vmdk\" 0\nRDONLY 1024 SPARSE \"b.vmdk\"\n";
        let info = detect_bytes(MIB, 0, text);
        assert_eq!(info.format, ImageFormat::VmdkDescriptor);
        assert_eq!(info.virtual_size, Some(3072 * 512));
    }

    /// Every format qemu-img makes, as qemu-img makes it.
    #[test]
    fn images_made_by_qemu_img_are_recognised() {
        let dir = Image::new(0);
        let path = |name: &str| dir.path.with_file_name(name);
        let cases: [(&str, &[&str], ImageFormat, Option<u64>); 8] = [
            (
                "a.qcow2",
                &["-f", "qcow2"],
                ImageFormat::Qcow2,
                Some(16 * MIB),
            ),
            (
                "v2.qcow2",
                &["-f", "qcow2", "-o", "compat=0.10"],
                ImageFormat::Qcow2,
                Some(16 * MIB),
            ),
            ("s.vmdk", &["-f", "vmdk"], ImageFormat::Vmdk, Some(16 * MIB)),
            (
                "d.vmdk",
                &["-f", "vmdk", "-o", "subformat=monolithicFlat"],
                ImageFormat::VmdkDescriptor,
                Some(16 * MIB),
            ),
            (
                "f.vhd",
                &["-f", "vpc", "-o", "subformat=fixed"],
                ImageFormat::Vhd(VhdKind::Fixed),
                None,
            ),
            (
                "y.vhd",
                &["-f", "vpc", "-o", "subformat=dynamic"],
                ImageFormat::Vhd(VhdKind::Dynamic),
                None,
            ),
            ("x.vhdx", &["-f", "vhdx"], ImageFormat::Vhdx, None),
            ("q.qed", &["-f", "qed"], ImageFormat::Qed, Some(16 * MIB)),
        ];
        for (name, args, format, size) in cases {
            let file = path(name);
            let mut command = vec!["create", "-q"];
            command.extend_from_slice(args);
            command.extend([file.to_str().unwrap(), "16M"]);
            qemu_img(&command);
            let info = detect(&file).unwrap();
            assert_eq!(info.format, format, "{name}");
            if let Some(size) = size {
                assert_eq!(info.virtual_size, Some(size), "{name}");
            }
        }
        // VHD rounds the size up to its CHS geometry: ≥ 16 MiB, < 17.
        let vhd = detect(&path("f.vhd")).unwrap().virtual_size.unwrap();
        assert!((16 * MIB..17 * MIB).contains(&vhd), "{vhd}");
        assert_eq!(detect(&path("y.vhd")).unwrap().virtual_size, Some(vhd));

        let overlay = path("o.qcow2");
        let base = path("a.qcow2");
        let overlay_arg = overlay.to_str().unwrap();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "a.qcow2",
            "-F",
            "qcow2",
            overlay_arg,
        ]);
        let info = detect(&overlay).unwrap();
        assert_eq!(info.backing_file.as_deref(), Some("a.qcow2"));
        assert_eq!(info.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(info.virtual_size, Some(16 * MIB));
        assert!(base.exists());
        assert_eq!(
            detect(&path("d-flat.vmdk")).unwrap().format,
            ImageFormat::Raw
        );
    }
}
