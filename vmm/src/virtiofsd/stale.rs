//! Runtime directories a killed zvmm left behind: a zvmm stopped by
//! SIGKILL cannot remove its `zvmm-<pid>-<n>` directory (its daemon died
//! with it, see the parent module), so the next daemon start under the
//! same base removes the ones that are provably stale — the pid is not
//! running and the directory holds nothing but sockets nobody listens on
//! and virtiofsd's `*.pid` files. Anything else is left alone.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use super::listening;

/// Removes the runtime directories under `base` that a zvmm killed with
/// SIGKILL left behind, returning each with its pid: named
/// `zvmm-<pid>-<n>`, `<pid>` no longer running, holding nothing but
/// sockets nobody listens on and virtiofsd's `*.pid` files. Anything else
/// is left alone.
pub(super) fn remove_stale_runtime_dirs(base: &Path) -> Vec<(PathBuf, u32)> {
    let Ok(entries) = std::fs::read_dir(base) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = runtime_dir_pid(&entry.file_name().to_string_lossy()) else {
            continue;
        };
        let dir = entry.path();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if is_dir && !process_exists(pid) && only_leftovers(&dir) && remove_leftovers(&dir) {
            removed.push((dir, pid));
        }
    }
    removed
}

/// `<pid>` of a `zvmm-<pid>-<n>` name.
fn runtime_dir_pid(name: &str) -> Option<u32> {
    let (pid, n) = name.strip_prefix("zvmm-")?.split_once('-')?;
    n.parse::<u32>().ok()?;
    pid.parse().ok()
}

fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks for existence; no memory involved.
    let ret = unsafe { libc::kill(pid, 0) };
    ret == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Whether `dir` holds only sockets nobody listens on and `*.pid` files.
fn only_leftovers(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.into_iter().all(|entry| {
        let Ok(entry) = entry else { return false };
        let Ok(kind) = entry.file_type() else {
            return false;
        };
        let pid_file = kind.is_file() && entry.file_name().to_string_lossy().ends_with(".pid");
        pid_file || (kind.is_socket() && !listening(&entry.path()))
    })
}

fn remove_leftovers(dir: &Path) -> bool {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    std::fs::remove_dir(dir).is_ok()
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use vmm_sys_util::tempdir::TempDir;

    use super::*;

    /// A pid that has just exited (and been reaped), so is not running.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    fn leftover_dir(base: &Path, pid: u32, n: u32) -> PathBuf {
        let dir = base.join(format!("zvmm-{pid}-{n}"));
        std::fs::create_dir(&dir).unwrap();
        drop(UnixListener::bind(dir.join("vroot.sock")).unwrap());
        std::fs::write(dir.join("vroot.sock.pid"), b"123\n").unwrap();
        dir
    }

    #[test]
    fn only_dead_zvmms_directories_of_dead_sockets_are_removed() {
        let base = TempDir::new_with_prefix("/tmp/zvmm-stale-").unwrap();
        let base = base.as_path();
        let dead = dead_pid();
        let stale = leftover_dir(base, dead, 0);
        let empty = base.join(format!("zvmm-{dead}-1"));
        std::fs::create_dir(&empty).unwrap();
        let alive = leftover_dir(base, std::process::id(), 0);
        let foreign = leftover_dir(base, dead, 2);
        std::fs::write(foreign.join("notes.txt"), b"keep").unwrap();
        let serving = base.join(format!("zvmm-{dead}-3"));
        std::fs::create_dir(&serving).unwrap();
        let _listener = UnixListener::bind(serving.join("vroot.sock")).unwrap();
        let other_name = base.join(format!("other-{dead}-0"));
        std::fs::create_dir(&other_name).unwrap();
        let not_a_dir = base.join(format!("zvmm-{dead}-4"));
        std::fs::write(&not_a_dir, b"a file").unwrap();

        let mut removed = remove_stale_runtime_dirs(base);
        removed.sort();
        assert_eq!(removed, vec![(stale.clone(), dead), (empty.clone(), dead)]);
        assert!(!stale.exists() && !empty.exists());
        for kept in [&alive, &foreign, &serving, &other_name, &not_a_dir] {
            assert!(kept.exists(), "{} removed", kept.display());
        }
        assert_eq!(std::fs::read(foreign.join("notes.txt")).unwrap(), b"keep");
        assert!(remove_stale_runtime_dirs(base).is_empty());
    }

    #[test]
    fn names_are_read_strictly() {
        assert_eq!(runtime_dir_pid("zvmm-123-0"), Some(123));
        assert_eq!(runtime_dir_pid("zvmm-123-x"), None);
        assert_eq!(runtime_dir_pid("zvmm-123"), None);
        assert_eq!(runtime_dir_pid("zvmm--0"), None);
        assert_eq!(runtime_dir_pid("vmm-1-0"), None);
        assert!(process_exists(std::process::id()));
        assert!(!process_exists(dead_pid()));
    }
}
