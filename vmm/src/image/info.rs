//! `zvmm image info`: what an image is (format, virtual size, file size,
//! bytes allocated on disk, qcow2 header fields, backing file) and, for
//! raw and qcow2 images, what the guest would find in it (partition
//! table, partitions, file system kinds and labels). Nothing is locked or
//! written: the image may be in use by a VM.

use std::fmt;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use devices::virtio::block::format::{self, ImageFormat, ImageInfo};
use serde::Serialize;

use super::partitions::{self, Filesystem, PartitionTable};
use super::source::{open_file, Locking, Source};
use super::{human, sparse, ImageError};

/// What `info` found.
#[derive(Clone, Debug, Serialize)]
pub struct ImageReport {
    /// The path as given.
    pub path: String,
    /// qemu-img's name of the format ("raw", "qcow2", "vmdk", ...).
    pub format: String,
    /// "a qcow2 image", ...
    pub description: String,
    /// The size the guest sees, where known.
    pub virtual_size: Option<u64>,
    /// Bytes of the file (of a block device: its capacity).
    pub file_size: u64,
    /// Bytes the file occupies (`st_blocks` × 512; 0 for a device).
    pub allocated_size: u64,
    /// Whether the path is a block device.
    pub block_device: bool,
    /// qcow2 header fields.
    pub qcow2: Option<Qcow2Fields>,
    /// The backing file named in the header.
    pub backing_file: Option<String>,
    /// Its format named in the header.
    pub backing_format: Option<String>,
    /// The partition table inside, if any.
    pub partition_table: Option<PartitionTable>,
    /// A file system on the whole disk (no partition table).
    pub filesystem: Option<Filesystem>,
    /// Why the inside could not be read, if it could not.
    pub contents_note: Option<String>,
}

/// The qcow2 header fields worth showing.
#[derive(Clone, Debug, Serialize)]
pub struct Qcow2Fields {
    /// 2 or 3.
    pub version: u32,
    /// Bytes per cluster.
    pub cluster_size: u64,
    /// Whether the data is encrypted.
    pub encrypted: bool,
    /// Internal snapshots.
    pub snapshots: u32,
}

/// Inspects the image at `path`.
pub fn inspect(path: &Path) -> Result<ImageReport, ImageError> {
    let (file, meta, size) = open_file(path, Locking::None)?;
    let info = format::detect_file(&file, size).map_err(|source| ImageError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    drop(file);
    let mut report = header_report(path, &info, &meta);
    match info.format {
        ImageFormat::Raw | ImageFormat::Iso9660 | ImageFormat::Qcow2 => {
            read_contents(path, &mut report)
        }
        other => {
            report.contents_note = Some(format!(
                "zvmm does not read inside {other}; `qemu-img convert -O raw` makes a raw copy"
            ))
        }
    }
    Ok(report)
}

fn header_report(path: &Path, info: &ImageInfo, meta: &std::fs::Metadata) -> ImageReport {
    let block_device = meta.file_type().is_block_device();
    ImageReport {
        path: path.display().to_string(),
        format: info
            .format
            .qemu_img_name()
            .unwrap_or("compressed")
            .to_string(),
        description: info.format.describe().to_string(),
        virtual_size: info.virtual_size,
        file_size: info.file_size,
        allocated_size: if block_device {
            0
        } else {
            sparse::allocated_bytes(meta)
        },
        block_device,
        qcow2: info.qcow2.as_ref().map(|h| Qcow2Fields {
            version: h.version,
            cluster_size: h.cluster_size,
            encrypted: h.crypt_method != 0,
            snapshots: h.snapshots,
        }),
        backing_file: info.backing_file.clone(),
        backing_format: info.backing_format.clone(),
        partition_table: None,
        filesystem: None,
        contents_note: None,
    }
}

/// Fills in the partition table or whole-disk file system; a guest view
/// that cannot be opened (a missing backing file) becomes a note.
fn read_contents(path: &Path, report: &mut ImageReport) {
    let source = match Source::open(path, Locking::None) {
        Ok(source) => source,
        Err(e) => {
            report.contents_note = Some(format!("contents unknown: {}", one_line(&e)));
            return;
        }
    };
    let read = |buf: &mut [u8], offset: u64| source.read_at(buf, offset);
    let result = partitions::read_table(&read, source.size()).and_then(|table| match table {
        Some(table) => {
            report.partition_table = Some(table);
            Ok(())
        }
        None => {
            report.filesystem = partitions::probe_filesystem(&read, 0)?;
            Ok(())
        }
    });
    if let Err(e) = result {
        report.contents_note = Some(format!("contents unknown: cannot read the image: {e}"));
    }
}

/// An error and its causes on one line.
pub fn one_line(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

impl fmt::Display for ImageReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "image:          {}", self.path)?;
        if self.description == format!("a {} image", self.format) {
            writeln!(f, "format:         {}", self.format)?;
        } else {
            writeln!(f, "format:         {} ({})", self.format, self.description)?;
        }
        if let Some(size) = self.virtual_size {
            writeln!(f, "virtual size:   {} ({size} bytes)", human(size))?;
        }
        let what = if self.block_device {
            "device size:"
        } else {
            "file size:"
        };
        writeln!(
            f,
            "{what:<15} {} ({} bytes)",
            human(self.file_size),
            self.file_size
        )?;
        if !self.block_device {
            let allocated = self.allocated_size;
            writeln!(
                f,
                "allocated:      {} ({allocated} bytes)",
                human(allocated)
            )?;
        }
        if let Some(q) = &self.qcow2 {
            writeln!(
                f,
                "qcow2:          version {}, {} clusters{}{}",
                q.version,
                human(q.cluster_size),
                if q.encrypted { ", encrypted" } else { "" },
                match q.snapshots {
                    0 => String::new(),
                    n => format!(", {n} internal snapshots"),
                }
            )?;
        }
        if let Some(backing) = &self.backing_file {
            let format = self
                .backing_format
                .as_deref()
                .unwrap_or("format not recorded");
            writeln!(f, "backing file:   {backing} ({format})")?;
        }
        if let Some(table) = &self.partition_table {
            write_table(f, table)?;
        } else if let Some(fs) = &self.filesystem {
            writeln!(f, "partitions:     none; whole disk: {}", describe_fs(fs))?;
        } else if self.contents_note.is_none() {
            writeln!(f, "partitions:     none found")?;
        }
        if let Some(note) = &self.contents_note {
            writeln!(f, "note:           {note}")?;
        }
        Ok(())
    }
}

fn write_table(f: &mut fmt::Formatter<'_>, table: &PartitionTable) -> fmt::Result {
    writeln!(
        f,
        "partitions:     {} ({} partitions, disk id {}, {}-byte sectors)",
        table.kind.to_uppercase(),
        table.partitions.len(),
        table.disk_id,
        table.sector_size
    )?;
    writeln!(
        f,
        "  {:>3}  {:>14}  {:>14}  {:<24}  {:<16}  file system",
        "#", "start", "size", "type", "name"
    )?;
    for p in &table.partitions {
        let kind = p.type_name.map_or(p.type_id.clone(), str::to_string);
        writeln!(
            f,
            "  {:>3}  {:>14}  {:>14}  {:<24}  {:<16}  {}",
            p.number,
            p.start,
            human(p.size),
            kind,
            p.name.as_deref().unwrap_or("-"),
            p.filesystem.as_ref().map_or("-".into(), describe_fs)
        )?;
    }
    for warning in &table.warnings {
        writeln!(f, "  warning: {warning}")?;
    }
    Ok(())
}

fn describe_fs(fs: &Filesystem) -> String {
    match &fs.label {
        Some(label) => format!("{} \"{label}\"", fs.kind),
        None => fs.kind.to_string(),
    }
}
