//! cloud-init NoCloud seeds: `--cloud-init` ([`CloudInitConfig`]) names
//! the files, [`SeedFiles::gather`] reads and checks them (meta-data is
//! generated when absent), [`SeedImage::build`] lays them out in a small
//! FAT volume labelled `CIDATA` (the fatfs crate, no external tools), and
//! the result is either attached to the VM as its last, read-only disk
//! ([`attach_seed`], through an unlinked private temp file) or written
//! for host agents ([`write_seed_file`], `zvmm cloud-init build`).
//!
//! Image layout, chosen so a seed is small and its head tells all: FAT12
//! (FAT16 past ~16 MiB) with 4 KiB clusters, 2 MiB unless the files need
//! more, 16 root-directory entries (the label and at most four files), the
//! label in the boot sector and as the root directory's volume-label
//! entry (which blkid reads), files in the order user-data, meta-data,
//! network-config, vendor-data. Timestamps are the FAT epoch (1980-01-01)
//! and the volume ID a hash of the files, so the same files always give
//! the same image.

use std::fs::{File, OpenOptions};
use std::io::{self, Cursor, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};

use crate::config::{parse_disk, ConfigError, OptionParser, VmConfig};

/// Most bytes of files one seed holds (user-data, meta-data,
/// network-config and vendor-data together).
pub const MAX_SEED_DATA: u64 = 64 << 20;
/// Size of a seed whose files fit (what host agents make by hand).
pub const MIN_IMAGE_SIZE: u64 = 2 << 20;
/// The volume label cloud-init's NoCloud source looks for.
pub const VOLUME_LABEL: [u8; 11] = *b"CIDATA     ";
/// Serial of the attached seed disk (`/dev/disk/by-id/virtio-cidata`).
pub const SEED_SERIAL: &str = "cidata";
/// The optional files a seed directory may hold, besides user-data.
const OPTIONAL_FILES: [SeedName; 3] = [
    SeedName::MetaData,
    SeedName::NetworkConfig,
    SeedName::VendorData,
];
const CLUSTER_SIZE: u64 = 4096;
const SECTOR_SIZE: u64 = 512;
const ROOT_DIR_ENTRIES: u16 = 16;
/// Image size steps tried when an estimate was short.
const GROW_STEP: u64 = 1 << 20;
const GROW_ATTEMPTS: u32 = 8;
/// `--cloud-init` keys; the first is the key of a bare value.
const KEYS: [&str; 5] = [
    "user-data",
    "meta-data",
    "network-config",
    "vendor-data",
    "dir",
];

/// A seed could not be built, attached or written.
#[derive(Debug, thiserror::Error)]
pub enum CloudInitError {
    /// A named file does not exist.
    #[error("cloud-init {name} {}: no such file", .path.display())]
    Missing {
        /// Which seed file.
        name: SeedName,
        /// The path given.
        path: PathBuf,
    },
    /// A named file is a directory.
    #[error("cloud-init {name} {} is a directory; give a file{hint}", .path.display())]
    Directory {
        /// Which seed file.
        name: SeedName,
        /// The path given.
        path: PathBuf,
        /// What else may have been meant.
        hint: String,
    },
    /// A named file is a FIFO, socket or device.
    #[error("cloud-init {name} {} is not a regular file", .path.display())]
    NotRegular {
        /// Which seed file.
        name: SeedName,
        /// The path given.
        path: PathBuf,
    },
    /// A named file could not be read.
    #[error("cannot read cloud-init {name} {}", .path.display())]
    Read {
        /// Which seed file.
        name: SeedName,
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file alone is larger than a seed holds.
    #[error("cloud-init {name} {} is {size} bytes; a seed holds at most {} MiB", .path.display(), MAX_SEED_DATA >> 20)]
    TooLarge {
        /// Which seed file.
        name: SeedName,
        /// The path given.
        path: PathBuf,
        /// Its size (or what was read before giving up).
        size: u64,
    },
    /// The files together are larger than a seed holds.
    #[error("cloud-init files total {total} bytes; a seed holds at most {} MiB", MAX_SEED_DATA >> 20)]
    TotalTooLarge {
        /// Bytes of all files.
        total: u64,
    },
    /// `dir=` names something that is not a directory.
    #[error("cloud-init dir {} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// `dir=` names nothing.
    #[error("cloud-init dir {}: no such directory", .0.display())]
    NoDirectory(PathBuf),
    /// The seed directory has no user-data.
    #[error("cloud-init dir {} has no user-data file; cloud-init needs one (an empty file will do)", .0.display())]
    NoUserData(PathBuf),
    /// The FAT volume could not be laid out.
    #[error("cannot lay out the cloud-init FAT image")]
    Image(#[source] io::Error),
    /// The private temp file for an attached seed.
    #[error("cannot write the cloud-init seed to a temp file in {}", .dir.display())]
    TempFile {
        /// The temp directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The seed's disk entry could not be made.
    #[error("cannot describe the cloud-init seed disk")]
    Disk(#[source] ConfigError),
    /// `-o` names an existing file and `--force` was not given.
    #[error("{} exists; pass --force to replace it", .0.display())]
    OutputExists(PathBuf),
    /// The output file could not be written.
    #[error("cannot write {}", .path.display())]
    Write {
        /// The output path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// The files of a NoCloud seed, named as cloud-init wants them, in seed
/// order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SeedName {
    /// `user-data` (cloud-config, a script, ...): required.
    UserData,
    /// `meta-data` (instance-id, local-hostname): generated when absent.
    MetaData,
    /// `network-config` (netplan-style v1/v2).
    NetworkConfig,
    /// `vendor-data`.
    VendorData,
}

impl SeedName {
    /// The file name in the seed (and in a seed directory).
    pub fn file_name(self) -> &'static str {
        match self {
            SeedName::UserData => "user-data",
            SeedName::MetaData => "meta-data",
            SeedName::NetworkConfig => "network-config",
            SeedName::VendorData => "vendor-data",
        }
    }
}

impl std::fmt::Display for SeedName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.file_name())
    }
}

/// `--cloud-init`: a seed directory or the files one by one (serde: the
/// `cloud_init` object of a `VmConfig`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudInitConfig {
    /// A directory holding `user-data` and optionally `meta-data`,
    /// `network-config`, `vendor-data`.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// The user-data file.
    #[serde(default)]
    pub user_data: Option<PathBuf>,
    /// The meta-data file (generated when absent).
    #[serde(default)]
    pub meta_data: Option<PathBuf>,
    /// The network-config file.
    #[serde(default)]
    pub network_config: Option<PathBuf>,
    /// The vendor-data file.
    #[serde(default)]
    pub vendor_data: Option<PathBuf>,
}

impl CloudInitConfig {
    /// Checks the form (not the files): `dir` alone, or `user_data` with
    /// optional others.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let files_given = self.user_data.is_some()
            || self.meta_data.is_some()
            || self.network_config.is_some()
            || self.vendor_data.is_some();
        if self.dir.is_some() && files_given {
            return Err(ConfigError::Invalid(
                "--cloud-init: give dir=DIR or user-data=FILE[,meta-data=FILE][,network-config=FILE], not both".into(),
            ));
        }
        if self.dir.is_none() && self.user_data.is_none() {
            return Err(ConfigError::Invalid(
                "--cloud-init: user-data=FILE (or dir=DIR) is required; cloud-init needs user-data"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The files named one by one, user-data first.
    fn named_files(&self) -> Vec<(SeedName, &Path)> {
        [
            (SeedName::UserData, &self.user_data),
            (SeedName::MetaData, &self.meta_data),
            (SeedName::NetworkConfig, &self.network_config),
            (SeedName::VendorData, &self.vendor_data),
        ]
        .into_iter()
        .filter_map(|(name, path)| Some((name, path.as_deref()?)))
        .collect()
    }
}

/// Parses `--cloud-init user-data=F[,meta-data=F][,network-config=F]
/// [,vendor-data=F]` or `--cloud-init dir=D` (a bare value is the
/// user-data file) and checks its form.
pub fn parse_cloud_init(input: &str) -> Result<CloudInitConfig, ConfigError> {
    let options = OptionParser::parse("cloud-init", &KEYS, input)?;
    let path = |key: &str| match options.get(key) {
        Some("") => Err(options.bad_value(key, "", "expected a path")),
        value => Ok(value.map(PathBuf::from)),
    };
    let config = CloudInitConfig {
        dir: path("dir")?,
        user_data: path("user-data")?,
        meta_data: path("meta-data")?,
        network_config: path("network-config")?,
        vendor_data: path("vendor-data")?,
    };
    config.validate()?;
    Ok(config)
}

/// One file of the seed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeedFile {
    /// Its name in the seed.
    pub name: SeedName,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Whether zvmm wrote it (meta-data when none was given).
    pub generated: bool,
}

/// The files of one seed, user-data first, meta-data always present.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeedFiles {
    files: Vec<SeedFile>,
}

impl SeedFiles {
    /// Reads the files `config` names (it must have passed
    /// [`CloudInitConfig::validate`]) and generates meta-data if absent.
    pub fn gather(config: &CloudInitConfig) -> Result<Self, CloudInitError> {
        let named = match &config.dir {
            Some(dir) => files_in_dir(dir)?,
            None => config
                .named_files()
                .into_iter()
                .map(|(name, path)| (name, path.to_path_buf()))
                .collect(),
        };
        let mut files = Vec::with_capacity(named.len() + 1);
        let mut total = 0u64;
        for (name, path) in &named {
            let bytes = read_seed_file(*name, path, config.dir.is_none())?;
            total += bytes.len() as u64;
            files.push(SeedFile {
                name: *name,
                bytes,
                generated: false,
            });
        }
        if total > MAX_SEED_DATA {
            return Err(CloudInitError::TotalTooLarge { total });
        }
        Ok(Self::complete(files))
    }

    /// `files` in seed order with meta-data generated when missing.
    pub fn from_files(files: Vec<SeedFile>) -> Self {
        Self::complete(files)
    }

    fn complete(mut files: Vec<SeedFile>) -> Self {
        if !files.iter().any(|f| f.name == SeedName::MetaData) {
            let bytes = generated_meta_data(&files);
            files.push(SeedFile {
                name: SeedName::MetaData,
                bytes,
                generated: true,
            });
        }
        files.sort_by_key(|f| f.name);
        Self { files }
    }

    /// The files in seed order.
    pub fn files(&self) -> &[SeedFile] {
        &self.files
    }

    /// A hash of every name and byte (the volume ID, the instance-id).
    fn fingerprint(files: &[SeedFile]) -> u64 {
        let mut hash = Fnv::new();
        for file in files {
            hash.update(file.name.file_name().as_bytes());
            hash.update(&(file.bytes.len() as u64).to_le_bytes());
            hash.update(&file.bytes);
        }
        hash.0
    }
}

/// meta-data for seeds without one: an instance-id that changes exactly
/// when the other files do (so cloud-init runs its per-instance steps
/// again only then) and a host name.
fn generated_meta_data(files: &[SeedFile]) -> Vec<u8> {
    let id = SeedFiles::fingerprint(files);
    format!("instance-id: iid-zvmm-{id:016x}\nlocal-hostname: zvmm\n").into_bytes()
}

/// The seed files present in `dir`.
fn files_in_dir(dir: &Path) -> Result<Vec<(SeedName, PathBuf)>, CloudInitError> {
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(CloudInitError::NoDirectory(dir.to_path_buf()))
        }
        Ok(meta) if !meta.is_dir() => return Err(CloudInitError::NotADirectory(dir.to_path_buf())),
        _ => {}
    }
    let user_data = dir.join(SeedName::UserData.file_name());
    // Other errors than absence are read_seed_file's to report.
    if let Err(e) = std::fs::symlink_metadata(&user_data) {
        if e.kind() == io::ErrorKind::NotFound {
            return Err(CloudInitError::NoUserData(dir.to_path_buf()));
        }
    }
    let mut files = vec![(SeedName::UserData, user_data)];
    for name in OPTIONAL_FILES {
        let path = dir.join(name.file_name());
        if std::fs::symlink_metadata(&path).is_ok() {
            files.push((name, path));
        }
    }
    Ok(files)
}

/// Reads one seed file, refusing what is not a regular file or is larger
/// than [`MAX_SEED_DATA`] (even if it grows while read).
fn read_seed_file(name: SeedName, path: &Path, dir_hint: bool) -> Result<Vec<u8>, CloudInitError> {
    let path_buf = || path.to_path_buf();
    let meta = std::fs::metadata(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => CloudInitError::Missing {
            name,
            path: path_buf(),
        },
        _ => CloudInitError::Read {
            name,
            path: path_buf(),
            source,
        },
    })?;
    if meta.is_dir() {
        let hint = if dir_hint && name == SeedName::UserData {
            format!(", or dir={} for a seed directory", path.display())
        } else {
            String::new()
        };
        return Err(CloudInitError::Directory {
            name,
            path: path_buf(),
            hint,
        });
    }
    if !meta.is_file() {
        return Err(CloudInitError::NotRegular {
            name,
            path: path_buf(),
        });
    }
    let too_large = |size| CloudInitError::TooLarge {
        name,
        path: path_buf(),
        size,
    };
    if meta.size() > MAX_SEED_DATA {
        return Err(too_large(meta.size()));
    }
    let read_error = |source| CloudInitError::Read {
        name,
        path: path_buf(),
        source,
    };
    let file = File::open(path).map_err(read_error)?;
    let mut bytes = Vec::with_capacity(meta.size() as usize);
    file.take(MAX_SEED_DATA + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_SEED_DATA {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// A seed laid out as a FAT volume.
#[derive(Clone, Debug)]
pub struct SeedImage {
    /// The whole image.
    pub bytes: Vec<u8>,
    /// `FAT12` or `FAT16`.
    pub fat_type: &'static str,
    /// The files it holds.
    pub files: SeedFiles,
}

impl SeedImage {
    /// Lays `files` out (see the module documentation), at
    /// [`MIN_IMAGE_SIZE`] or as much more as they need.
    pub fn build(files: SeedFiles) -> Result<Self, CloudInitError> {
        let volume_id = SeedFiles::fingerprint(files.files());
        let volume_id = (volume_id ^ (volume_id >> 32)) as u32;
        let mut size = estimated_size(files.files());
        let mut attempt = 0;
        loop {
            match format_seed(files.files(), size, volume_id) {
                Ok((bytes, fat_type)) => {
                    return Ok(Self {
                        bytes,
                        fat_type,
                        files,
                    })
                }
                // Short estimate, or a size no FAT type fits: grow.
                Err(_) if attempt + 1 < GROW_ATTEMPTS => {
                    attempt += 1;
                    size += GROW_STEP;
                }
                Err(e) => return Err(CloudInitError::Image(e)),
            }
        }
    }

    /// A one-line description: size, FAT type, label, files.
    pub fn summary(&self) -> String {
        let names: Vec<String> = self
            .files
            .files()
            .iter()
            .map(|f| match f.generated {
                true => format!("{} (generated)", f.name),
                false => f.name.to_string(),
            })
            .collect();
        format!(
            "{} bytes, {} labelled CIDATA: {}",
            self.bytes.len(),
            self.fat_type,
            names.join(", ")
        )
    }
}

/// Bytes the image needs for `files`: their clusters, two FATs (at
/// FAT16's two bytes an entry, more than FAT12 needs), boot sector and
/// root directory; at least [`MIN_IMAGE_SIZE`], in whole MiB.
fn estimated_size(files: &[SeedFile]) -> u64 {
    let clusters: u64 = files
        .iter()
        .map(|f| (f.bytes.len() as u64).div_ceil(CLUSTER_SIZE))
        .sum::<u64>()
        + 2;
    let fats = 2 * (clusters * 2).div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
    let metadata = SECTOR_SIZE + u64::from(ROOT_DIR_ENTRIES) * 32;
    let needed = clusters * CLUSTER_SIZE + fats + metadata;
    needed.next_multiple_of(GROW_STEP).max(MIN_IMAGE_SIZE)
}

/// Formats a `size`-byte volume and writes `files` into it.
fn format_seed(
    files: &[SeedFile],
    size: u64,
    volume_id: u32,
) -> io::Result<(Vec<u8>, &'static str)> {
    let mut disk = Cursor::new(vec![0u8; size as usize]);
    let options = fatfs::FormatVolumeOptions::new()
        .volume_label(VOLUME_LABEL)
        .volume_id(volume_id)
        .bytes_per_cluster(CLUSTER_SIZE as u32)
        .max_root_dir_entries(ROOT_DIR_ENTRIES);
    fatfs::format_volume(&mut disk, options)?;
    let fs_options = fatfs::FsOptions::new().time_provider(&FAT_EPOCH);
    let fs = fatfs::FileSystem::new(&mut disk, fs_options)?;
    let fat_type = match fs.fat_type() {
        fatfs::FatType::Fat12 => "FAT12",
        fatfs::FatType::Fat16 => "FAT16",
        fatfs::FatType::Fat32 => "FAT32",
    };
    {
        let root = fs.root_dir();
        for file in files {
            let mut out = root.create_file(file.name.file_name())?;
            out.write_all(&file.bytes)?;
            out.flush()?;
        }
    }
    fs.unmount()?;
    Ok((disk.into_inner(), fat_type))
}

/// Stamps every file with the FAT epoch, 1980-01-01 00:00: a valid date
/// (fatfs without a clock would write an all-zero, invalid one), and the
/// same in every build.
#[derive(Debug)]
struct FatEpoch;

static FAT_EPOCH: FatEpoch = FatEpoch;

impl fatfs::TimeProvider for FatEpoch {
    fn get_current_date(&self) -> fatfs::Date {
        fatfs::Date {
            year: 1980,
            month: 1,
            day: 1,
        }
    }

    fn get_current_date_time(&self) -> fatfs::DateTime {
        let time = fatfs::Time {
            hour: 0,
            min: 0,
            sec: 0,
            millis: 0,
        };
        fatfs::DateTime {
            date: self.get_current_date(),
            time,
        }
    }
}

/// An attached seed: a private temp file (mode 0600) unlinked as soon as
/// it was written, so nothing is left behind however zvmm ends; the disk
/// opens it through `/proc/<pid>/fd/<fd>` for as long as this lives.
#[derive(Debug)]
pub struct SeedDisk {
    file: File,
    summary: String,
}

impl SeedDisk {
    /// Writes `image` to a private, already unlinked temp file.
    pub fn create(image: &SeedImage) -> Result<Self, CloudInitError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir();
        let name = format!(
            "zvmm-{}-cidata-{}.img",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = dir.join(name);
        let temp_error = |source| CloudInitError::TempFile {
            dir: dir.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(temp_error)?;
        let written = file.write_all(&image.bytes);
        std::fs::remove_file(&path).map_err(temp_error)?;
        written.map_err(temp_error)?;
        Ok(Self {
            file,
            summary: image.summary(),
        })
    }

    /// Where the seed can be opened while this lives.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.file.as_raw_fd()
        ))
    }

    /// What the seed holds, in one line.
    pub fn summary(&self) -> &str {
        &self.summary
    }
}

/// Builds the seed `config.cloud_init` asks for (if any) and appends it to
/// `config.disks` as the last, read-only disk; the returned guard must
/// outlive every boot of the VM.
pub fn attach_seed(config: &mut VmConfig) -> Result<Option<SeedDisk>, CloudInitError> {
    let Some(cloud_init) = &config.cloud_init else {
        return Ok(None);
    };
    let image = SeedImage::build(SeedFiles::gather(cloud_init)?)?;
    let seed = SeedDisk::create(&image)?;
    // Parsed like the option, so the seed gets every default a --disk gets.
    let disk = format!(
        "path={},readonly=on,serial={SEED_SERIAL}",
        seed.path().display()
    );
    config
        .disks
        .push(parse_disk(&disk).map_err(CloudInitError::Disk)?);
    Ok(Some(seed))
}

/// `zvmm cloud-init build`: writes the seed `config` names to `output`
/// (mode 0600: user-data often holds secrets) through a temp file in the
/// same directory renamed at the end; an existing `output` is replaced
/// only with `force`.
pub fn write_seed_file(
    config: &CloudInitConfig,
    output: &Path,
    force: bool,
) -> Result<SeedImage, CloudInitError> {
    if !force && std::fs::symlink_metadata(output).is_ok() {
        return Err(CloudInitError::OutputExists(output.to_path_buf()));
    }
    let image = SeedImage::build(SeedFiles::gather(config)?)?;
    let temp = temp_output_path(output);
    let write_error = |source| CloudInitError::Write {
        path: output.to_path_buf(),
        source,
    };
    let result = write_new_file(&temp, &image.bytes).and_then(|()| rename(&temp, output, force));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&temp);
        return Err(match e.kind() {
            io::ErrorKind::AlreadyExists => CloudInitError::OutputExists(output.to_path_buf()),
            _ => write_error(e),
        });
    }
    Ok(image)
}

/// `.NAME.zvmm-PID.tmp` next to `output`.
fn temp_output_path(output: &Path) -> PathBuf {
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "seed".into());
    output.with_file_name(format!(".{name}.zvmm-{}.tmp", std::process::id()))
}

fn write_new_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Renames `from` to `to`; without `replace`, atomically refuses an
/// existing `to` (`RENAME_NOREPLACE`: `AlreadyExists`).
fn rename(from: &Path, to: &Path, replace: bool) -> io::Result<()> {
    if replace {
        return std::fs::rename(from, to);
    }
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c_path =
        |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput);
    let (from, to) = (c_path(from)?, c_path(to)?);
    // SAFETY: both paths are valid NUL-terminated strings that outlive the
    // call; renameat2 reads them and touches no other memory.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    match rc {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// 64-bit FNV-1a.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn update(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests;
