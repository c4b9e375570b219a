//! Landlock: the file-system paths a VM's threads may reach, taken from
//! its configuration ([`PathRules::for_config`]) — kernel, initrd and
//! firmware read-only; disk images read-write (read-only with
//! `readonly=on`) and their qcow2 backing files read-only; the vsock
//! socket's directory (bind, replace, remove); the virtiofsd runtime
//! directory; the serial output file; `/dev/kvm`, `/dev/net/tun`, the pty
//! devices and the entropy source. TCP is refused outright (zvmm uses
//! none), and so are abstract Unix sockets.
//!
//! The rules are fixed when the VM first boots ([`prepare`], from
//! `VmHandle::boot` with the configuration in force then). Landlock
//! applies to the calling thread and those it creates later, and zvmm's
//! threads are created by an unconfined launcher ([`super`]), so each VM
//! thread restricts itself as it starts (vCPUs, device workers,
//! virtiofsd's log reader), the VMM thread once its first boot's set-up is
//! done (before it starts the vCPUs: [`restrict_current`]) and the
//! command's main thread once the VM runs. The API threads, which exist
//! before any configuration, keep no domain; they only parse requests and
//! call the library.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreated, RulesetCreatedAttr, Scope, ABI,
};

use crate::config::{ConsoleMode, VmConfig};

/// `--landlock`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LandlockMode {
    /// `on`: required; zvmm refuses to start where the kernel lacks it.
    On,
    /// The default: on where the kernel supports Landlock.
    Auto,
    /// `off`.
    Off,
}

impl LandlockMode {
    /// Parses `on`, `off` (or cloud-hypervisor's bare `--landlock`: `on`).
    pub fn parse(value: &str) -> Result<LandlockMode, LandlockError> {
        match value {
            "on" | "true" => Ok(LandlockMode::On),
            "off" | "false" => Ok(LandlockMode::Off),
            other => Err(LandlockError::Mode(other.to_string())),
        }
    }
}

/// Landlock errors.
#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    /// Not `on` or `off`.
    #[error("--landlock {0}: expected on or off")]
    Mode(String),
    /// `--landlock on` on a kernel without Landlock.
    #[error("--landlock on: this kernel has no Landlock (enable CONFIG_SECURITY_LANDLOCK and lsm=landlock, or pass --landlock off)")]
    Unsupported,
    /// The ruleset could not be built or applied.
    #[error("cannot set up the Landlock ruleset")]
    Ruleset(#[source] landlock::RulesetError),
    /// The ruleset fd could not be duplicated for a thread.
    #[error("cannot share the Landlock ruleset")]
    Clone(#[source] std::io::Error),
}

const MODE_OFF: u8 = 0;
const MODE_AUTO: u8 = 1;
const MODE_ON: u8 = 2;
static MODE: AtomicU8 = AtomicU8::new(MODE_OFF);

/// The ruleset every VM thread restricts itself with, once prepared.
static RULESET: Mutex<Option<RulesetCreated>> = Mutex::new(None);

/// Paths the process needs besides the VM's configuration (the API
/// socket), registered before the first boot.
static EXTRA: Mutex<Vec<(PathBuf, Reach)>> = Mutex::new(Vec::new());

/// Lets the VM threads and the main thread remove the API socket `path`
/// at exit (its directory: bind and remove sockets only).
pub fn allow_api_socket(path: &Path) {
    if let Some(dir) = path.parent() {
        let mut extra = EXTRA.lock().unwrap_or_else(|p| p.into_inner());
        extra.push((non_empty(dir).to_path_buf(), Reach::SocketDir));
    }
}

thread_local! {
    static RESTRICTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The Landlock ABI this kernel offers (0: none).
pub fn kernel_abi() -> i32 {
    // SAFETY: landlock_create_ruleset(NULL, 0, VERSION) only returns the
    // ABI version (or an error); it reads no memory.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            0usize,
            0usize,
            1usize, // LANDLOCK_CREATE_RULESET_VERSION
        )
    };
    i32::try_from(abi).unwrap_or(0).max(0)
}

/// Records the mode; `On` fails where the kernel has no Landlock.
pub(super) fn set_mode(mode: LandlockMode) -> Result<(), LandlockError> {
    let value = match mode {
        LandlockMode::Off => MODE_OFF,
        _ if kernel_abi() == 0 => {
            return match mode {
                LandlockMode::On => Err(LandlockError::Unsupported),
                _ => Ok(()),
            }
        }
        LandlockMode::Auto => MODE_AUTO,
        LandlockMode::On => MODE_ON,
    };
    MODE.store(value, Ordering::SeqCst);
    Ok(())
}

/// Whether Landlock is in force for this process.
pub fn enabled() -> bool {
    MODE.load(Ordering::SeqCst) != MODE_OFF
}

/// How a path may be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// Read a file (or a device file: read and its ioctls).
    Read,
    /// Read and write a file (devices: and ioctls).
    ReadWrite,
    /// A directory where zvmm binds, replaces and removes sockets (no
    /// file in it can be read or written).
    SocketDir,
    /// Where zvmm makes and removes virtiofsd's private runtime
    /// directories.
    RuntimeDir,
}

/// The paths a VM may reach, each with what it may do there.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PathRules {
    /// Every rule, in the order found.
    pub rules: Vec<(PathBuf, Reach)>,
}

impl PathRules {
    fn add(&mut self, path: impl Into<PathBuf>, reach: Reach) {
        let path = path.into();
        if !self.rules.iter().any(|(p, r)| *p == path && *r == reach) {
            self.rules.push((path, reach));
        }
    }

    /// What `config` names, and the devices every VM opens.
    pub fn for_config(config: &VmConfig, virtiofsd_runtime: &Path) -> PathRules {
        let mut rules = PathRules::default();
        rules.add("/dev/kvm", Reach::ReadWrite);
        let payload = &config.payload;
        for path in [&payload.kernel, &payload.initramfs].into_iter().flatten() {
            rules.add(path, Reach::Read);
        }
        for disk in &config.disks {
            let reach = if disk.readonly {
                Reach::Read
            } else {
                Reach::ReadWrite
            };
            rules.add(&disk.path, reach);
            for backing in qcow2_backing_chain(&disk.path) {
                rules.add(backing, Reach::Read);
            }
        }
        if !config.net.is_empty() {
            rules.add("/dev/net/tun", Reach::ReadWrite);
        }
        if config.fs.iter().any(|share| share.path.is_some()) {
            rules.add(virtiofsd_runtime, Reach::RuntimeDir);
            // How zvmm sees that a daemon it started listens.
            rules.add("/proc/net/unix", Reach::Read);
        }
        if let Some(vsock) = &config.vsock {
            if let Some(dir) = vsock.socket.parent() {
                rules.add(non_empty(dir), Reach::SocketDir);
            }
        }
        rules.add(&config.rng.src, Reach::Read);
        for console in [&config.serial, &config.console] {
            match (console.mode, &console.file) {
                (ConsoleMode::File | ConsoleMode::Tee, Some(file)) => {
                    rules.add(file, Reach::ReadWrite)
                }
                (ConsoleMode::Pty, _) => {
                    rules.add("/dev/ptmx", Reach::ReadWrite);
                    rules.add("/dev/pts", Reach::ReadWrite);
                }
                _ => {}
            }
        }
        rules
    }
}

fn non_empty(dir: &Path) -> &Path {
    if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    }
}

/// The files a qcow2 image's backing chain names (resolved next to the
/// image naming each), read from the headers; empty for other images.
fn qcow2_backing_chain(image: &Path) -> Vec<PathBuf> {
    let mut chain = Vec::new();
    let mut current = image.to_path_buf();
    while chain.len() < 16 {
        let Some(name) = qcow2_backing_name(&current) else {
            break;
        };
        let next = match current.parent() {
            Some(dir) if Path::new(&name).is_relative() => dir.join(&name),
            _ => PathBuf::from(&name),
        };
        chain.push(next.clone());
        current = next;
    }
    chain
}

fn qcow2_backing_name(image: &Path) -> Option<String> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking and regular files only: opening a FIFO given as a disk
    // would wait for a writer forever (the disk's own open refuses it).
    let mut file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(image)
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut header = [0u8; 20];
    file.read_exact(&mut header).ok()?;
    if header[..4] != *b"QFI\xfb" {
        return None;
    }
    let offset = u64::from_be_bytes(header[8..16].try_into().ok()?);
    let size = u32::from_be_bytes(header[16..20].try_into().ok()?);
    if offset == 0 || size == 0 || size > 1023 {
        return None;
    }
    file.seek(SeekFrom::Start(offset)).ok()?;
    let mut name = vec![0u8; size as usize];
    file.read_exact(&mut name).ok()?;
    String::from_utf8(name).ok()
}

/// The file-system rights Landlock handles for zvmm (ABI 5's set).
fn handled_fs() -> BitFlags<AccessFs> {
    AccessFs::from_all(ABI::V5)
}

fn access_for(path: &Path, reach: Reach) -> BitFlags<AccessFs> {
    let is_dir = path.is_dir();
    let is_device = std::fs::metadata(path)
        .map(|m| m.file_type().is_char_device() || m.file_type().is_block_device())
        .unwrap_or(false);
    let read = AccessFs::from_read(ABI::V1);
    let mut access = match reach {
        Reach::Read => read,
        Reach::ReadWrite => read | AccessFs::WriteFile,
        Reach::SocketDir => AccessFs::MakeSock | AccessFs::RemoveFile,
        Reach::RuntimeDir => {
            AccessFs::MakeSock
                | AccessFs::MakeDir
                | AccessFs::RemoveDir
                | AccessFs::RemoveFile
                | AccessFs::ReadDir
        }
    };
    if is_device || path.starts_with("/dev/pts") {
        access |= AccessFs::IoctlDev;
    }
    if !is_dir {
        // Rules on a file take only the rights that apply to files.
        access &= AccessFs::from_file(ABI::V5);
    }
    access
}

/// Builds the ruleset for `config` (once: the first boot's configuration
/// stays in force for the process). Paths that do not exist are left out:
/// opening them fails anyway.
pub fn prepare(config: &VmConfig, virtiofsd_runtime: &Path) -> Result<(), LandlockError> {
    if !enabled() {
        return Ok(());
    }
    let mut ruleset = RULESET.lock().unwrap_or_else(|p| p.into_inner());
    if ruleset.is_some() {
        return Ok(());
    }
    let mut rules = PathRules::for_config(config, virtiofsd_runtime);
    for (path, reach) in EXTRA.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        rules.add(path.clone(), *reach);
    }
    *ruleset = Some(create(&rules).map_err(LandlockError::Ruleset)?);
    Ok(())
}

fn create(rules: &PathRules) -> Result<RulesetCreated, landlock::RulesetError> {
    let mut created = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(handled_fs())?
        .handle_access(AccessNet::from_all(ABI::V4))?
        .scope(Scope::AbstractUnixSocket)?
        .create()?;
    for (path, reach) in &rules.rules {
        let Ok(fd) = PathFd::new(path) else {
            continue;
        };
        created = created.add_rule(PathBeneath::new(fd, access_for(path, *reach)))?;
    }
    Ok(created)
}

/// Restricts the calling thread with the prepared ruleset (once per
/// thread; nothing before [`prepare`] or with Landlock off).
pub fn restrict_current() -> Result<(), LandlockError> {
    if !enabled() || RESTRICTED.with(std::cell::Cell::get) {
        return Ok(());
    }
    let clone = {
        let ruleset = RULESET.lock().unwrap_or_else(|p| p.into_inner());
        match ruleset.as_ref() {
            Some(ruleset) => ruleset.try_clone().map_err(LandlockError::Clone)?,
            None => return Ok(()),
        }
    };
    clone.restrict_self().map_err(LandlockError::Ruleset)?;
    RESTRICTED.with(|cell| cell.set(true));
    Ok(())
}

/// The test hook: with `ZVMM_LANDLOCK_SELFTEST=<path>`, tries to open
/// `path` for reading from this (restricted) thread and says what happened.
pub fn selftest() {
    let Some(path) = std::env::var_os("ZVMM_LANDLOCK_SELFTEST") else {
        return;
    };
    let path = PathBuf::from(path);
    match File::open(&path) {
        Ok(_) => eprintln!("zvmm: landlock self-test: opened {}", path.display()),
        Err(e) => eprintln!(
            "zvmm: landlock self-test: cannot open {}: {e}",
            path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A FIFO named as a disk is not opened for reading (that would block
    /// until a writer came); a directory is no qcow2 either.
    #[test]
    fn a_fifo_or_directory_disk_has_no_backing_chain_and_does_not_block() {
        let dir = std::env::temp_dir().join(format!("zvmm-landlock-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("disk.fifo");
        let c_path = std::ffi::CString::new(fifo.display().to_string()).unwrap();
        // SAFETY: `c_path` is a valid NUL-terminated string for the call.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        assert_eq!(qcow2_backing_chain(&fifo), Vec::<PathBuf>::new());
        assert_eq!(qcow2_backing_chain(&dir), Vec::<PathBuf>::new());
        std::fs::remove_dir_all(&dir).unwrap();
    }
    use crate::config::{ConsoleConfig, DiskConfig};

    fn disk(path: &Path, readonly: bool) -> DiskConfig {
        let mut disk: DiskConfig = serde_json::from_value(serde_json::json!({
            "path": path,
        }))
        .unwrap();
        disk.readonly = readonly;
        disk
    }

    #[test]
    fn the_rules_name_what_the_configuration_names() {
        let mut config = VmConfig::default();
        config.payload.kernel = Some("/k/vmlinux".into());
        config.payload.initramfs = Some("/k/initrd".into());
        config.disks = vec![
            disk(Path::new("/img/rw.raw"), false),
            disk(Path::new("/img/ro.raw"), true),
        ];
        config.serial = ConsoleConfig {
            mode: ConsoleMode::File,
            file: Some("/log/serial".into()),
        };
        let rules = PathRules::for_config(&config, Path::new("/run/zvmm"));
        let has = |path: &str, reach| rules.rules.contains(&(PathBuf::from(path), reach));
        assert!(has("/dev/kvm", Reach::ReadWrite));
        assert!(has("/k/vmlinux", Reach::Read));
        assert!(has("/k/initrd", Reach::Read));
        assert!(has("/img/rw.raw", Reach::ReadWrite));
        assert!(has("/img/ro.raw", Reach::Read));
        assert!(has("/log/serial", Reach::ReadWrite));
        assert!(has("/dev/urandom", Reach::Read));
        assert!(!rules.rules.iter().any(|(p, _)| p == Path::new("/run/zvmm")));
        assert!(!rules
            .rules
            .iter()
            .any(|(p, _)| p == Path::new("/dev/net/tun")));
    }

    #[test]
    fn a_qcow2_backing_chain_is_followed_next_to_each_image() {
        let dir = std::env::temp_dir().join(format!("zvmm-landlock-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("base")).unwrap();
        let qcow2 = |backing: &str| {
            let mut header = vec![0u8; 512];
            header[..4].copy_from_slice(b"QFI\xfb");
            header[8..16].copy_from_slice(&100u64.to_be_bytes());
            header[16..20].copy_from_slice(&(backing.len() as u32).to_be_bytes());
            header[100..100 + backing.len()].copy_from_slice(backing.as_bytes());
            header
        };
        std::fs::write(dir.join("vm.qcow2"), qcow2("base/mid.qcow2")).unwrap();
        std::fs::write(dir.join("base/mid.qcow2"), qcow2("root.raw")).unwrap();
        std::fs::write(dir.join("base/root.raw"), [0u8; 512]).unwrap();
        let chain = qcow2_backing_chain(&dir.join("vm.qcow2"));
        assert_eq!(
            chain,
            vec![dir.join("base/mid.qcow2"), dir.join("base/root.raw")]
        );
        assert!(qcow2_backing_chain(&dir.join("base/root.raw")).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn modes_parse() {
        assert_eq!(LandlockMode::parse("on").unwrap(), LandlockMode::On);
        assert_eq!(LandlockMode::parse("off").unwrap(), LandlockMode::Off);
        assert_eq!(
            LandlockMode::parse("maybe").unwrap_err().to_string(),
            "--landlock maybe: expected on or off"
        );
    }

    /// A restricted thread cannot open a file outside its rules but can
    /// open one inside (in a thread of its own: the domain stays there).
    #[test]
    fn a_restricted_thread_reaches_only_its_paths() {
        if kernel_abi() == 0 {
            panic!("this kernel has no Landlock: the test needs it");
        }
        let dir = std::env::temp_dir().join(format!("zvmm-landlock-t-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let inside = dir.join("inside");
        let outside = dir.join("outside");
        std::fs::write(&inside, b"in").unwrap();
        std::fs::write(&outside, b"out").unwrap();
        let (i, o) = (inside.clone(), outside.clone());
        let result = std::thread::spawn(move || {
            let mut rules = PathRules::default();
            rules.add(&i, Reach::Read);
            create(&rules).unwrap().restrict_self().unwrap();
            (
                File::open(&i).is_ok(),
                File::open(&o).map(|_| ()).map_err(|e| e.kind()),
            )
        })
        .join()
        .unwrap();
        assert_eq!(result, (true, Err(std::io::ErrorKind::PermissionDenied)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
