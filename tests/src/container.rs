//! Container mode's recipe (`resources/container/`) for the tests: runs
//! its scripts (initramfs, root directory), reads what they made (newc
//! cpio archives, ELF program headers and kernel modules' `.modinfo`), and
//! boots it under QEMU's TCG with the real virtiofsd.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::zvmm::{run_with_limit, workspace_root, Finished};

/// What can go wrong building or reading the recipe's output.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// A recipe script exited with an error.
    #[error("{script} failed: {stderr}")]
    Script {
        /// The script's file name.
        script: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a newc cpio archive.
    #[error("bad cpio archive at byte {offset}: {what}")]
    Cpio {
        /// Where parsing stopped.
        offset: usize,
        /// What was wrong there.
        what: &'static str,
    },
    /// The bytes are not a little-endian ELF64 file.
    #[error("bad ELF file: {0}")]
    Elf(&'static str),
    /// virtiofsd is not installed.
    #[error(
        "virtiofsd not found in PATH or ~/.cargo/bin; run `bash resources/install-host-deps.sh`"
    )]
    VirtiofsdMissing,
    /// virtiofsd could not be started or did not listen.
    #[error("virtiofsd did not start: {0}")]
    Virtiofsd(String),
}

/// `resources/container/` in the workspace.
pub fn recipe_dir() -> PathBuf {
    workspace_root().join("resources/container")
}

/// `resources/cache/container/` in the workspace.
pub fn cache_dir() -> PathBuf {
    workspace_root().join("resources/cache/container")
}

/// Runs `build-initramfs.sh` (which does nothing when its output is up to
/// date) and returns the initramfs path.
pub fn build_initramfs() -> Result<PathBuf, ContainerError> {
    let run = run_script("build-initramfs.sh", &[], Duration::from_secs(600));
    if run.status.is_none_or(|status| !status.success()) {
        return Err(ContainerError::Script {
            script: "build-initramfs.sh".into(),
            stderr: run.stderr,
        });
    }
    Ok(cache_dir().join("initramfs.cpio"))
}

/// Runs the recipe script `name` with `args`, killing it after `limit`.
pub fn run_script(name: &str, args: &[&Path], limit: Duration) -> Finished {
    let mut command = Command::new("bash");
    command.arg(recipe_dir().join(name)).args(args);
    run_with_limit(command, limit)
}

/// The value of `CONFIG_<option>` in a kernel configuration (`y`, `m`, a
/// string), `None` when it is not set.
pub fn config_value<'a>(config: &'a str, option: &str) -> Option<&'a str> {
    let key = format!("CONFIG_{option}=");
    config
        .lines()
        .find_map(|line| line.strip_prefix(key.as_str()))
}

/// Reads a whole file, naming it on failure.
pub fn read(path: &Path) -> Result<Vec<u8>, ContainerError> {
    std::fs::read(path).map_err(|source| ContainerError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// One member of a newc cpio archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpioEntry {
    /// Path without the leading `./`.
    pub name: String,
    /// File type and permission bits (`st_mode`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// File contents, or a symbolic link's target.
    pub data: Vec<u8>,
}

const S_IFMT: u32 = 0o170_000;
const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFLNK: u32 = 0o120_000;

impl CpioEntry {
    /// A regular file.
    pub fn is_file(&self) -> bool {
        self.mode & S_IFMT == S_IFREG
    }

    /// A directory.
    pub fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }

    /// A symbolic link.
    pub fn is_symlink(&self) -> bool {
        self.mode & S_IFMT == S_IFLNK
    }

    /// A regular file everyone may execute.
    pub fn is_executable(&self) -> bool {
        self.is_file() && self.mode & 0o111 == 0o111
    }
}

const NEWC_MAGIC: &[u8] = b"070701";
const NEWC_HEADER: usize = 110;
const TRAILER: &str = "TRAILER!!!";

/// Parses a newc ("070701") cpio archive, the format the kernel unpacks,
/// up to its trailer.
pub fn read_cpio(bytes: &[u8]) -> Result<Vec<CpioEntry>, ContainerError> {
    let mut entries = Vec::new();
    let mut at = 0;
    loop {
        let bad = |what| ContainerError::Cpio { offset: at, what };
        let header = bytes
            .get(at..at + NEWC_HEADER)
            .ok_or(bad("truncated header"))?;
        if &header[..6] != NEWC_MAGIC {
            return Err(bad("no newc magic"));
        }
        let field = |index: usize| newc_field(header, index).ok_or(bad("bad header field"));
        let (mode, uid, gid) = (field(1)?, field(2)?, field(3)?);
        let (size, name_size) = (field(6)? as usize, field(11)? as usize);
        let name_end = at + NEWC_HEADER + name_size;
        let name = bytes
            .get(at + NEWC_HEADER..name_end.saturating_sub(1))
            .filter(|_| name_size > 0)
            .ok_or(bad("truncated name"))?;
        let name = String::from_utf8_lossy(name).into_owned();
        let data_start = align4(name_end);
        let data = bytes
            .get(data_start..data_start + size)
            .ok_or(bad("truncated data"))?;
        if name == TRAILER {
            return Ok(entries);
        }
        entries.push(CpioEntry {
            name: name.strip_prefix("./").unwrap_or(&name).to_string(),
            mode,
            uid,
            gid,
            data: data.to_vec(),
        });
        at = align4(data_start + size);
    }
}

/// Header field `index` (0 = inode): eight hex digits after the magic.
fn newc_field(header: &[u8], index: usize) -> Option<u32> {
    let start = NEWC_MAGIC.len() + 8 * index;
    let hex = std::str::from_utf8(header.get(start..start + 8)?).ok()?;
    u32::from_str_radix(hex, 16).ok()
}

fn align4(offset: usize) -> usize {
    offset.next_multiple_of(4)
}

fn elf_bytes<const N: usize>(elf: &[u8], at: usize) -> Result<[u8; N], ContainerError> {
    elf.get(at..at + N)
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or(ContainerError::Elf("truncated"))
}

fn elf_u16(elf: &[u8], at: usize) -> Result<usize, ContainerError> {
    Ok(u16::from_le_bytes(elf_bytes(elf, at)?).into())
}

fn elf_u32(elf: &[u8], at: usize) -> Result<u32, ContainerError> {
    Ok(u32::from_le_bytes(elf_bytes(elf, at)?))
}

fn elf_u64(elf: &[u8], at: usize) -> Result<usize, ContainerError> {
    usize::try_from(u64::from_le_bytes(elf_bytes(elf, at)?))
        .map_err(|_| ContainerError::Elf("offset too large"))
}

fn check_elf64(elf: &[u8]) -> Result<(), ContainerError> {
    if elf.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err(ContainerError::Elf("no ELF magic"));
    }
    if elf.get(4..6) != Some([2, 1].as_slice()) {
        return Err(ContainerError::Elf("not 64-bit little-endian"));
    }
    Ok(())
}

fn elf_slice(elf: &[u8], offset: usize, size: usize) -> Result<&[u8], ContainerError> {
    elf.get(offset..offset.saturating_add(size))
        .ok_or(ContainerError::Elf("range outside the file"))
}

/// Whether an ELF executable needs a program interpreter (a dynamic
/// loader): `false` for a static binary.
pub fn elf_has_interpreter(elf: &[u8]) -> Result<bool, ContainerError> {
    const PT_INTERP: u32 = 3;
    check_elf64(elf)?;
    let (table, entry_size, count) = (
        elf_u64(elf, 0x20)?,
        elf_u16(elf, 0x36)?,
        elf_u16(elf, 0x38)?,
    );
    for index in 0..count {
        if elf_u32(elf, table + index * entry_size)? == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The contents of the ELF section called `wanted`, if there is one.
pub fn elf_section<'a>(elf: &'a [u8], wanted: &str) -> Result<Option<&'a [u8]>, ContainerError> {
    check_elf64(elf)?;
    let (table, entry_size) = (elf_u64(elf, 0x28)?, elf_u16(elf, 0x3a)?);
    let (count, names_index) = (elf_u16(elf, 0x3c)?, elf_u16(elf, 0x3e)?);
    let header = |index: usize| table + index * entry_size;
    let names = elf_slice(
        elf,
        elf_u64(elf, header(names_index) + 0x18)?,
        elf_u64(elf, header(names_index) + 0x20)?,
    )?;
    for index in 0..count {
        let name_at = elf_u32(elf, header(index))? as usize;
        let name = names
            .get(name_at..)
            .and_then(|rest| rest.split(|&b| b == 0).next())
            .ok_or(ContainerError::Elf("section name outside its table"))?;
        if name == wanted.as_bytes() {
            let offset = elf_u64(elf, header(index) + 0x18)?;
            let size = elf_u64(elf, header(index) + 0x20)?;
            return elf_slice(elf, offset, size).map(Some);
        }
    }
    Ok(None)
}

/// The `key=value` pairs of a kernel module's `.modinfo` section.
pub fn modinfo(module: &[u8]) -> Result<Vec<(String, String)>, ContainerError> {
    let section = elf_section(module, ".modinfo")?.ok_or(ContainerError::Elf("no .modinfo"))?;
    Ok(section
        .split(|&b| b == 0)
        .filter_map(|pair| {
            let pair = String::from_utf8_lossy(pair);
            let (key, value) = pair.split_once('=')?;
            Some((key.to_string(), value.to_string()))
        })
        .collect())
}

/// One `.modinfo` field of a kernel module (`name`, `depends`, `vermagic`).
pub fn modinfo_field(module: &[u8], key: &str) -> Result<Option<String>, ContainerError> {
    Ok(modinfo(module)?
        .into_iter()
        .find_map(|(k, value)| (k == key).then_some(value)))
}

/// The real virtiofsd serving one directory on a vhost-user socket; killed
/// (if still running) when dropped.
pub struct Virtiofsd {
    child: Child,
}

impl Virtiofsd {
    /// Starts virtiofsd for `shared` on `socket` (log in `log`) and waits
    /// until it listens.
    pub fn start(shared: &Path, socket: &Path, log: &Path) -> Result<Self, ContainerError> {
        let log = std::fs::File::create(log)
            .map_err(|e| ContainerError::Virtiofsd(format!("cannot create its log: {e}")))?;
        let child = Command::new(virtiofsd_bin()?)
            .arg("--shared-dir")
            .arg(shared)
            .arg("--socket-path")
            .arg(socket)
            .args(["--sandbox", "none"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| ContainerError::Virtiofsd(e.to_string()))?;
        let mut daemon = Virtiofsd { child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                return Err(ContainerError::Virtiofsd(format!(
                    "it exited with {status}"
                )));
            }
            if Instant::now() > deadline {
                return Err(ContainerError::Virtiofsd("no socket after 10 s".into()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(daemon)
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `virtiofsd` from PATH, else from ~/.cargo/bin.
fn virtiofsd_bin() -> Result<PathBuf, ContainerError> {
    let in_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>());
    let in_cargo = std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo/bin"));
    in_path
        .chain(in_cargo)
        .map(|dir| dir.join("virtiofsd"))
        .find(|bin| bin.is_file())
        .ok_or(ContainerError::VirtiofsdMissing)
}

/// QEMU arguments booting `kernel` and `initrd` on q35 with the TCG
/// (software) accelerator, which boots stock kernels on any host, 512 MiB
/// of shared memfd RAM, COM1 on stdio, no reboot, and a virtio-fs device
/// with tag `vroot` on `fs_socket` when given.
pub fn qemu_tcg_args(
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    fs_socket: Option<&Path>,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = [
        "-M",
        "q35,accel=tcg,memory-backend=ram",
        "-object",
        "memory-backend-memfd,id=ram,size=512M,share=on",
        "-cpu",
        "max",
        "-smp",
        "1",
        "-m",
        "512M",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-append",
        cmdline,
    ]
    .iter()
    .map(OsString::from)
    .collect();
    if let Some(socket) = fs_socket {
        let mut chardev = OsString::from("socket,id=vroot,path=");
        chardev.push(socket);
        args.extend(["-chardev".into(), chardev]);
        args.extend(["-device", "vhost-user-fs-pci,chardev=vroot,tag=vroot"].map(OsString::from));
    }
    args.extend([
        "-kernel".into(),
        kernel.into(),
        "-initrd".into(),
        initrd.into(),
    ]);
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A newc member as GNU cpio writes it.
    fn newc(name: &str, mode: u32, data: &[u8]) -> Vec<u8> {
        let fields = [1, mode, 0, 0, 1, 0, data.len() as u32, 0, 0, 0, 0];
        let mut out = NEWC_MAGIC.to_vec();
        for value in fields.into_iter().chain([name.len() as u32 + 1, 0]) {
            out.extend(format!("{value:08x}").bytes());
        }
        out.extend(name.bytes().chain([0]));
        out.resize(align4(out.len()), 0);
        out.extend(data);
        out.resize(align4(out.len()), 0);
        out
    }

    #[test]
    fn cpio_members_come_back_with_mode_and_data() {
        let mut archive = newc(".", 0o040_755, b"");
        archive.extend(newc("./init", 0o100_755, b"#!/bin/sh\n"));
        archive.extend(newc("./bin/sh", 0o120_777, b"busybox"));
        archive.extend(newc(TRAILER, 0, b""));
        let entries = read_cpio(&archive).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, [".", "init", "bin/sh"]);
        assert!(entries[0].is_dir());
        assert!(entries[1].is_executable());
        assert_eq!(entries[1].data, b"#!/bin/sh\n");
        assert!(entries[2].is_symlink() && !entries[2].is_executable());
        assert_eq!(entries[2].data, b"busybox");
    }

    #[test]
    fn cpio_without_trailer_or_magic_is_an_error() {
        let member = newc("./init", 0o100_755, b"12345");
        let err = read_cpio(&member).unwrap_err();
        assert!(
            matches!(err, ContainerError::Cpio { offset, what: "truncated header" } if offset == member.len()),
            "{err}"
        );
        let err = read_cpio(&member[..member.len() - 4]).unwrap_err();
        assert!(
            matches!(
                err,
                ContainerError::Cpio {
                    what: "truncated data",
                    ..
                }
            ),
            "{err}"
        );
        let mut odc = member.clone();
        odc[5] = b'7';
        assert!(matches!(
            read_cpio(&odc),
            Err(ContainerError::Cpio {
                offset: 0,
                what: "no newc magic"
            })
        ));
    }

    #[test]
    fn config_values_are_found_by_exact_option() {
        let config = "CONFIG_FUSE_FS=m\n# CONFIG_VIRTIO_FS is not set\nCONFIG_VIRTIO=y\nCONFIG_VIRTIO_PCI=m\n";
        assert_eq!(config_value(config, "FUSE_FS"), Some("m"));
        assert_eq!(config_value(config, "VIRTIO"), Some("y"));
        assert_eq!(config_value(config, "VIRTIO_FS"), None);
        assert_eq!(config_value(config, "FUSE"), None);
    }

    #[test]
    fn elf_readers_refuse_what_is_not_elf64() {
        assert!(matches!(
            elf_has_interpreter(b"#!/bin/sh\n"),
            Err(ContainerError::Elf("no ELF magic"))
        ));
        let elf32 = b"\x7fELF\x01\x01\x01\0";
        assert!(matches!(
            elf_section(elf32, ".modinfo"),
            Err(ContainerError::Elf(_))
        ));
        let header_only = b"\x7fELF\x02\x01\x01\0";
        assert!(matches!(
            modinfo(header_only),
            Err(ContainerError::Elf("truncated"))
        ));
    }
}
