//! The `zvmm image` subcommands: their options (clap), the one-line
//! summary each prints on stderr (`info` prints its report on stdout), and
//! exit statuses — 0 done, 1 refused or failed (one line naming the file
//! and what to do), 2 bad usage.

use std::path::{Path, PathBuf};

use clap::{Subcommand, ValueEnum};

use super::create::{self, CreateOptions, NewSize};
use super::info::{self, one_line};
use super::transfer::{self, TargetFormat, Transferred};
use super::{human, ImageError};
use crate::lifecycle::{EXIT_ERROR, EXIT_USAGE};

/// `zvmm image ...`.
#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Tell what a disk image is and holds.
    #[command(after_help = "\
Prints the format (raw, qcow2, or the other formats zvmm recognises and
refuses), the virtual size, the file size and the bytes allocated on disk,
qcow2 header fields and backing file, and for raw and qcow2 images the
partition table (GPT or MBR: number, start, size, type, name) with the file
system kind and label found on each partition. Nothing is locked or written.")]
    Info {
        /// The image file or block device.
        file: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create a disk image: a sparse raw file, or qcow2 (optionally over a
    /// backing file).
    #[command(after_help = "\
SIZE takes K, M, G and T suffixes (powers of 1024) and must be a multiple of
512. A qcow2 backing file is recorded as given (relative to the new image's
directory, as qemu-img does) with its detected format; without SIZE the
image takes the backing file's size. The file appears only when complete.")]
    Create {
        /// The new image.
        file: PathBuf,
        /// Virtual size, e.g. 10G.
        #[arg(value_parser = parse_size)]
        size: Option<u64>,
        /// raw (a sparse file) or qcow2.
        #[arg(long, value_enum, default_value = "raw")]
        format: FormatArg,
        /// A qcow2 backing file (raw or qcow2) the new image starts as.
        #[arg(long, value_name = "BASE")]
        backing: Option<PathBuf>,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Copy a raw or qcow2 image onto a raw file or block device, holes
    /// kept as holes.
    #[command(after_help = "\
Holes in SRC (and unallocated qcow2 clusters) stay holes in a new DST file;
data is copied by the kernel (copy_file_range). On a block device (--force
required) holes are zeroed by the device where it can (discard or
write-zeroes that guarantees zeroes), otherwise only blocks that do not
already read as zeroes are written; its first megabyte is written last. A
new file appears only when complete: a copy that is interrupted leaves
nothing at DST. --size makes DST larger than SRC (the rest reads as
zeroes).")]
    Copy {
        /// The raw or qcow2 image to copy (a qcow2 backing chain is read
        /// through).
        src: PathBuf,
        /// The raw file or block device to write.
        dst: PathBuf,
        /// Make DST this large (never smaller than SRC).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Replace DST if it exists; needed to write over a block device.
        #[arg(long)]
        force: bool,
    },
    /// Grow a raw or qcow2 image in place (never shrinks, never touches
    /// data).
    Grow {
        /// The image file.
        file: PathBuf,
        /// The new size (e.g. 20G), or +SIZE to add.
        #[arg(value_parser = parse_new_size, allow_hyphen_values = true)]
        size: NewSize,
    },
    /// Convert between raw and qcow2, holes kept.
    Convert {
        /// The raw or qcow2 image.
        src: PathBuf,
        /// The new image.
        dst: PathBuf,
        /// The format to write [default: qcow2 for a raw SRC, raw for a
        /// qcow2 SRC].
        #[arg(long, value_enum)]
        format: Option<FormatArg>,
        /// Replace DST if it exists.
        #[arg(long)]
        force: bool,
    },
}

/// An image format the tools write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// Plain sectors (sparse).
    Raw,
    /// qcow2 version 3.
    Qcow2,
}

impl From<FormatArg> for TargetFormat {
    fn from(format: FormatArg) -> TargetFormat {
        match format {
            FormatArg::Raw => TargetFormat::Raw,
            FormatArg::Qcow2 => TargetFormat::Qcow2,
        }
    }
}

fn parse_size(text: &str) -> Result<u64, String> {
    crate::config::parse_size(text)
        .ok_or_else(|| format!("'{text}' is not a size (e.g. 4096, 512M, 10G)"))
}

fn parse_new_size(text: &str) -> Result<NewSize, String> {
    NewSize::parse(text).ok_or_else(|| format!("'{text}' is not a size (e.g. 20G, or +5G to add)"))
}

/// Runs one `zvmm image` command; returns the exit status.
pub fn run(command: ImageCommand) -> i32 {
    match execute(command) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("zvmm: {}", one_line(&e));
            match e {
                ImageError::Usage(_) => EXIT_USAGE,
                _ => EXIT_ERROR,
            }
        }
    }
}

fn execute(command: ImageCommand) -> Result<(), ImageError> {
    match command {
        ImageCommand::Info { file, json } => {
            let report = info::inspect(&file)?;
            if json {
                let text = serde_json::to_string_pretty(&report).unwrap_or_default();
                println!("{text}");
            } else {
                print!("{report}");
            }
        }
        ImageCommand::Create {
            file,
            size,
            format,
            backing,
            force,
        } => {
            let options = CreateOptions {
                format: format.into(),
                size,
                backing,
                force,
            };
            let created = create::create(&file, &options)?;
            let backing = created
                .backing
                .map(|(name, format)| format!(" over {name} ({format})"))
                .unwrap_or_default();
            eprintln!(
                "zvmm: created {} ({}, {}{backing}; {} allocated)",
                file.display(),
                created.format.name(),
                human(created.size),
                human(created.allocated)
            );
        }
        ImageCommand::Copy {
            src,
            dst,
            size,
            force,
        } => {
            let done = transfer::copy(&src, &dst, size, force)?;
            eprintln!("zvmm: copied {}", describe_transfer(&src, &dst, &done));
        }
        ImageCommand::Grow { file, size } => grow(&file, size)?,
        ImageCommand::Convert {
            src,
            dst,
            format,
            force,
        } => {
            let done = transfer::convert(&src, &dst, format.map(Into::into), force)?;
            eprintln!("zvmm: converted {}", describe_transfer(&src, &dst, &done));
        }
    }
    Ok(())
}

fn grow(file: &Path, size: NewSize) -> Result<(), ImageError> {
    let grown = create::grow(file, size)?;
    let format = grown.format.qemu_img_name().unwrap_or("raw");
    if grown.new == grown.old {
        eprintln!(
            "zvmm: {} ({format}) is already {}; nothing to do",
            file.display(),
            human(grown.old)
        );
    } else {
        eprintln!(
            "zvmm: grew {} ({format}) from {} to {}; allocated {} before, {} after",
            file.display(),
            human(grown.old),
            human(grown.new),
            human(grown.allocated_before),
            human(grown.allocated_after)
        );
    }
    Ok(())
}

/// `a.qcow2 (qcow2, 1 GiB, 3 MiB allocated) to b.raw (raw, 1 GiB, 3 MiB
/// allocated): 3 MiB of data written, 1021 MiB of holes kept`.
fn describe_transfer(src: &Path, dst: &Path, done: &Transferred) -> String {
    let source_format = done.source_format.qemu_img_name().unwrap_or("raw");
    let chain = match done.backing_chain.len() {
        0 => String::new(),
        n => format!(
            ", read through {n} backing file{}",
            if n == 1 { "" } else { "s" }
        ),
    };
    let counts = &done.counts;
    let target = match done.target_allocated {
        Some(allocated) => format!(
            "{} ({}, {}, {} allocated)",
            dst.display(),
            done.target_format.name(),
            human(done.size),
            human(allocated)
        ),
        None => format!(
            "block device {} ({} written)",
            dst.display(),
            human(done.size)
        ),
    };
    let left_out = counts.holes + counts.zero_data;
    let holes = if done.block_device {
        let z = &counts.zeroed;
        format!(
            "{} of holes: {} zeroed by the device, {} already zero, {} written as zeroes",
            human(left_out),
            human(z.by_device),
            human(z.already_zero),
            human(z.written)
        )
    } else {
        format!("{} of holes kept", human(left_out))
    };
    let allocated = done
        .source_allocated
        .map(|bytes| format!(", {} allocated", human(bytes)))
        .unwrap_or_default();
    format!(
        "{} ({source_format}, {}{allocated}{chain}) to {target}: {} of data written, {holes}",
        src.display(),
        human(done.source_size),
        human(counts.data)
    )
}
