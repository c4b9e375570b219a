//! QEMU, the reference VMM: runs `qemu-system-x86_64` (KVM only) with a hard
//! time limit and collects its serial output (stdout).

use std::ffi::OsString;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The QEMU binary the tests run.
pub const QEMU: &str = "qemu-system-x86_64";

/// Failures starting QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// QEMU is not installed.
    #[error("{QEMU} not found; install qemu-system-x86 (apt-get install -y qemu-system-x86)")]
    Missing,
    /// QEMU could not be started or waited for.
    #[error("cannot run {QEMU}")]
    Spawn(#[source] std::io::Error),
}

/// What a QEMU run left behind.
#[derive(Debug)]
pub struct QemuRun {
    /// Exit status; `None` when QEMU was killed at the time limit.
    pub status: Option<ExitStatus>,
    /// Everything QEMU wrote to stdout (the guest's serial port).
    pub stdout: String,
    /// QEMU's own diagnostics.
    pub stderr: String,
    /// Wall time from start to exit.
    pub elapsed: Duration,
}

impl QemuRun {
    /// Whether QEMU exited by itself with status 0.
    pub fn exited_cleanly(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
}

/// Arguments for booting `kernel` on `machine` (e.g. `microvm,acpi=on`)
/// with KVM, 2 vCPUs, 256 MiB, COM1 on stdio and no reboot.
pub fn boot_args(
    machine: &str,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = [
        "-M",
        &format!("{machine},accel=kvm"),
        "-cpu",
        "host,-arch-capabilities",
        "-smp",
        "2",
        "-m",
        "256M",
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
    args.push("-kernel".into());
    args.push(kernel.into());
    if let Some(initrd) = initrd {
        args.push("-initrd".into());
        args.push(initrd.into());
    }
    args
}

/// Runs QEMU with `args`, killing it once `limit` has passed.
pub fn run(args: &[OsString], limit: Duration) -> Result<QemuRun, QemuError> {
    let start = Instant::now();
    let mut child = Command::new(QEMU)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => QemuError::Missing,
            _ => QemuError::Spawn(e),
        })?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = wait_with_limit(&mut child, limit).map_err(QemuError::Spawn)?;
    Ok(QemuRun {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    })
}

fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Waits for `child`; kills it (our own child, by handle) past `limit`.
fn wait_with_limit(child: &mut Child, limit: Duration) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            child.kill()?;
            child.wait()?;
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_args_use_kvm_and_pass_kernel_initrd_cmdline() {
        let args = boot_args(
            "microvm,acpi=on",
            Path::new("/k"),
            Some(Path::new("/i")),
            "a b",
        );
        let text: Vec<_> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let after = |flag: &str| {
            text.iter()
                .position(|a| a == flag)
                .map(|i| text[i + 1].as_str())
        };
        assert_eq!(after("-M"), Some("microvm,acpi=on,accel=kvm"));
        assert_eq!(after("-kernel"), Some("/k"));
        assert_eq!(after("-initrd"), Some("/i"));
        assert_eq!(after("-append"), Some("a b"));
        assert!(boot_args("q35", Path::new("/k"), None, "")
            .iter()
            .all(|a| a != "-initrd"));
    }
}
