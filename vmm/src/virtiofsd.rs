//! virtiofsd supervision: starts one virtiofsd (the vhost-user virtio-fs
//! backend, <https://gitlab.com/virtio-fs/virtiofsd>) per shared
//! directory, hands out its socket once it listens, reports when it died,
//! and stops it without leaving a process, socket or directory behind.
//!
//! [`Virtiofsd::start`] makes a private runtime directory (mode 0700,
//! `zvmm-<pid>-<n>` under `$XDG_RUNTIME_DIR`, else `/run/zvmm` when
//! writable, else `/tmp`), then runs
//! `virtiofsd --socket-path <dir>/<tag>.sock --shared-dir DIR --xattr
//! --cache auto --sandbox MODE` in its own process group (a Ctrl-C on the
//! terminal is zvmm's to handle, not the daemon's), stderr captured (the
//! last lines are kept for messages). It waits up to
//! [`VirtiofsdOptions::start_timeout`] for the socket to be listening,
//! read from `/proc/net/unix`: connecting to check would use up the one
//! connection virtiofsd serves.
//!
//! Sandbox: [`Sandbox::Auto`] tries `namespace` (mount, PID and network
//! namespaces; works as root here, and unprivileged where user namespaces
//! are allowed), then `chroot` (root only), then `none`, moving on only
//! when the daemon exits at start saying it cannot enter the sandbox.
//!
//! Stopping ([`Virtiofsd::stop`], also on drop): SIGTERM to the process
//! group (with `--sandbox namespace` the daemon is a waiting parent and a
//! child in the new PID namespace; both handle SIGTERM), up to
//! [`STOP_GRACE`] for them to exit, then SIGKILL; the parent is reaped and
//! so is the orphaned child (zvmm is a child subreaper: waiting for a lazy
//! init's reaping cost ~1.7 s per stop here when Landlock hid /proc), then
//! the socket and the directory are removed.
//!
//! If zvmm itself is killed, virtiofsd dies with it: the daemon is started
//! with `PR_SET_PDEATHSIG` = SIGKILL (tied to the forking thread — the
//! sandbox's launcher or the vmm thread, both outliving every boot's
//! daemons), and its sandboxed child dies with the daemon (virtiofsd sets
//! the same on it). The runtime
//! directory a killed zvmm cannot remove is removed by the next start of
//! a daemon under the same base (only `zvmm-<pid>-<n>` directories whose
//! zvmm is gone and that hold nothing but dead sockets and pid files),
//! said in one line on stderr.

mod stale;

use std::collections::VecDeque;
use std::fs::DirBuilder;
use std::io::{self, BufRead, BufReader};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a stopped daemon gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(3);
/// Lines of the daemon's stderr kept for messages.
const STDERR_LINES: usize = 32;

/// Sandboxes virtiofsd can isolate itself with (`--sandbox`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Sandbox {
    /// `namespace`, else `chroot`, else `none`: the first the host allows.
    #[default]
    Auto,
    /// Mount, PID and network namespaces.
    Namespace,
    /// chroot(2) into the shared directory (root only).
    Chroot,
    /// No isolation.
    None,
}

impl Sandbox {
    fn arg(self) -> &'static str {
        match self {
            Sandbox::Auto | Sandbox::Namespace => "namespace",
            Sandbox::Chroot => "chroot",
            Sandbox::None => "none",
        }
    }

    /// The modes to try, in order.
    fn attempts(self) -> &'static [Sandbox] {
        match self {
            Sandbox::Auto => &[Sandbox::Namespace, Sandbox::Chroot, Sandbox::None],
            Sandbox::Namespace => &[Sandbox::Namespace],
            Sandbox::Chroot => &[Sandbox::Chroot],
            Sandbox::None => &[Sandbox::None],
        }
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct VirtiofsdOptions {
    /// The binary (`--virtiofsd BIN`); `None`: `virtiofsd` from PATH, then
    /// `~/.cargo/bin`.
    pub binary: Option<PathBuf>,
    /// The virtio-fs tag; names the socket (`<tag>.sock`).
    pub tag: String,
    /// The directory to share.
    pub shared_dir: PathBuf,
    /// The sandbox.
    pub sandbox: Sandbox,
    /// More options for virtiofsd (e.g. `--readonly`).
    pub extra_args: Vec<String>,
    /// Where to make the runtime directory; `None`: see the module doc.
    pub runtime_base: Option<PathBuf>,
    /// How long to wait for the socket.
    pub start_timeout: Duration,
}

impl VirtiofsdOptions {
    /// What [`Virtiofsd::start`] checks before it starts anything: the
    /// binary is there and the shared directory is one (so a bad `--fs`
    /// is refused before the VM is set up).
    pub fn check(&self) -> Result<(), VirtiofsdError> {
        find_binary(self.binary.as_deref())?;
        check_shared_dir(&self.shared_dir)
    }

    /// Defaults for sharing `shared_dir` as `tag`.
    pub fn new(tag: impl Into<String>, shared_dir: impl Into<PathBuf>) -> Self {
        VirtiofsdOptions {
            binary: None,
            tag: tag.into(),
            shared_dir: shared_dir.into(),
            sandbox: Sandbox::Auto,
            extra_args: Vec::new(),
            runtime_base: None,
            start_timeout: Duration::from_secs(5),
        }
    }
}

/// virtiofsd could not be started or waited for.
#[derive(Debug, thiserror::Error)]
pub enum VirtiofsdError {
    /// No virtiofsd in PATH or ~/.cargo/bin.
    #[error("virtiofsd not found; install it with `cargo install virtiofsd --locked`, or pass --virtiofsd BIN")]
    NotFound,
    /// The binary given does not exist or is not executable.
    #[error("virtiofsd binary {binary} not found or not executable; install it with `cargo install virtiofsd --locked`, or pass --virtiofsd BIN")]
    BinaryMissing {
        /// The path given.
        binary: String,
    },
    /// The shared directory does not exist.
    #[error("shared directory {dir} does not exist")]
    SharedDirMissing {
        /// The path given.
        dir: String,
    },
    /// The shared directory is something else.
    #[error("shared directory {dir} is not a directory")]
    NotADirectory {
        /// The path given.
        dir: String,
    },
    /// The runtime directory could not be made.
    #[error("cannot create a runtime directory under {base}")]
    RuntimeDir {
        /// Where it was tried.
        base: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// fork/exec failed.
    #[error("cannot run {binary}")]
    Spawn {
        /// The binary.
        binary: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The daemon exited before its socket listened.
    #[error("virtiofsd exited at start ({status}): {message}")]
    Exited {
        /// How it exited.
        status: String,
        /// Its last error line on stderr.
        message: String,
    },
    /// The socket did not listen in time.
    #[error("virtiofsd made no socket at {socket} within {limit:?}")]
    NoSocket {
        /// The socket path.
        socket: String,
        /// The time limit.
        limit: Duration,
    },
    /// waitpid failed.
    #[error("cannot wait for virtiofsd")]
    Wait(#[source] io::Error),
}

/// The daemon's stderr as far as it was read.
#[derive(Default)]
struct StderrTail {
    lines: Mutex<(VecDeque<String>, bool)>,
    closed: Condvar,
}

impl StderrTail {
    fn spawn_reader(stderr: ChildStderr) -> Arc<StderrTail> {
        let tail = Arc::new(StderrTail::default());
        let reader_tail = tail.clone();
        let reader = move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut guard = reader_tail.lock();
                if guard.0.len() == STDERR_LINES {
                    guard.0.pop_front();
                }
                guard.0.push_back(line);
            }
            reader_tail.lock().1 = true;
            reader_tail.closed.notify_all();
        };
        if let Err(e) = devices::virtio::thread::spawn("virtiofsd-log".into(), reader) {
            // Without the reader the messages say less; the daemon runs.
            eprintln!("zvmm: cannot read virtiofsd's stderr: {e}");
        }
        tail
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (VecDeque<String>, bool)> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most telling line: the last one mentioning an error, else the
    /// last non-empty one, without virtiofsd's log prefix. Waits up to
    /// `wait` for the pipe to close (the daemon exited).
    fn message(&self, wait: Duration) -> String {
        let guard = self.lock();
        let (guard, _) = self
            .closed
            .wait_timeout_while(guard, wait, |(_, closed)| !*closed)
            .unwrap_or_else(|p| p.into_inner());
        let lines: Vec<&str> = guard
            .0
            .iter()
            .map(|l| strip_log_prefix(l.trim()))
            .filter(|l| !l.is_empty())
            .collect();
        let pick = lines
            .iter()
            .rev()
            .find(|l| l.to_ascii_lowercase().contains("error"))
            .or(lines.last());
        pick.map_or_else(|| "no message".to_string(), |l| l.to_string())
    }
}

/// `[2026-01-01T00:00:00Z ERROR virtiofsd] text` → `text`.
fn strip_log_prefix(line: &str) -> &str {
    match line
        .strip_prefix('[')
        .and_then(|rest| rest.split_once("] "))
    {
        Some((_, text)) => text,
        None => line,
    }
}

/// A running virtiofsd.
pub struct Virtiofsd {
    child: Child,
    exit: Option<ExitStatus>,
    stopped: bool,
    runtime_dir: PathBuf,
    socket: PathBuf,
    sandbox: Sandbox,
    stderr: Arc<StderrTail>,
}

impl Virtiofsd {
    /// Starts virtiofsd for `opts` and waits until its socket listens.
    pub fn start(opts: VirtiofsdOptions) -> Result<Virtiofsd, VirtiofsdError> {
        let binary = find_binary(opts.binary.as_deref())?;
        check_shared_dir(&opts.shared_dir)?;
        let base = opts.runtime_base.clone().unwrap_or_else(runtime_base);
        for (dir, pid) in stale::remove_stale_runtime_dirs(&base) {
            eprintln!(
                "zvmm: removed stale virtiofsd runtime directory {} (zvmm {pid} is gone)",
                dir.display()
            );
        }
        let runtime_dir = make_runtime_dir(&base)?;
        let socket = runtime_dir.join(format!("{}.sock", socket_name(&opts.tag)));
        let mut last_error = None;
        for &sandbox in opts.sandbox.attempts() {
            match Self::spawn(&binary, &opts, sandbox, &runtime_dir, &socket) {
                Ok(daemon) => return Ok(daemon),
                Err(e) if opts.sandbox == Sandbox::Auto && sandbox_refused(&e) => {
                    last_error = Some(e);
                }
                Err(e) => {
                    last_error = Some(e);
                    break;
                }
            }
        }
        let _ = std::fs::remove_dir_all(&runtime_dir);
        Err(last_error.unwrap_or(VirtiofsdError::NotFound))
    }

    fn spawn(
        binary: &Path,
        opts: &VirtiofsdOptions,
        sandbox: Sandbox,
        runtime_dir: &Path,
        socket: &Path,
    ) -> Result<Virtiofsd, VirtiofsdError> {
        become_subreaper();
        let mut command = Command::new(binary);
        let parent = std::process::id();
        // SAFETY: the closure runs in the forked child before exec and
        // calls only prctl(2) and getppid(2), both async-signal-safe; it
        // touches no memory shared with the parent.
        unsafe {
            command.pre_exec(move || die_with_parent(parent));
        }
        command
            .arg("--socket-path")
            .arg(socket)
            .arg("--shared-dir")
            .arg(&opts.shared_dir)
            .args(["--xattr", "--cache", "auto", "--sandbox", sandbox.arg()])
            .args(&opts.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        // From the unconfined launcher: a confined thread's seccomp filter
        // and Landlock domain would be virtiofsd's too.
        let mut child =
            crate::sandbox::run_unconfined(move || command.spawn()).map_err(|source| {
                VirtiofsdError::Spawn {
                    binary: binary.display().to_string(),
                    source,
                }
            })?;
        let stderr = match child.stderr.take() {
            Some(pipe) => StderrTail::spawn_reader(pipe),
            None => Arc::new(StderrTail::default()),
        };
        let mut daemon = Virtiofsd {
            child,
            exit: None,
            stopped: false,
            runtime_dir: runtime_dir.to_path_buf(),
            socket: socket.to_path_buf(),
            sandbox,
            stderr,
        };
        match daemon.wait_listening(opts.start_timeout) {
            Ok(()) => Ok(daemon),
            Err(e) => {
                daemon.terminate();
                Err(e)
            }
        }
    }

    fn wait_listening(&mut self, timeout: Duration) -> Result<(), VirtiofsdError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Err(VirtiofsdError::Exited {
                    status: describe(status),
                    message: self.stderr.message(Duration::from_secs(1)),
                });
            }
            if listening(&self.socket) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(VirtiofsdError::NoSocket {
                    socket: self.socket.display().to_string(),
                    limit: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The vhost-user socket to connect the virtio-fs device to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The private runtime directory holding the socket.
    pub fn runtime_dir(&self) -> &Path {
        &self.runtime_dir
    }

    /// The daemon's process ID (also its process group).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The sandbox the daemon runs in.
    pub fn sandbox(&self) -> Sandbox {
        self.sandbox
    }

    /// How the daemon exited, if it did (reaps it).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, VirtiofsdError> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().map_err(VirtiofsdError::Wait)?;
        }
        Ok(self.exit)
    }

    /// One line saying that and how the daemon died, with its last error
    /// line; `None` while it runs.
    pub fn exit_message(&mut self) -> Option<String> {
        let status = self.try_wait().ok().flatten()?;
        let message = self.stderr.message(Duration::from_millis(200));
        Some(format!(
            "virtiofsd for {} {}: {message}",
            self.socket.display(),
            describe(status)
        ))
    }

    /// Stops the daemon (SIGTERM, then SIGKILL after [`STOP_GRACE`]),
    /// reaps it and removes the socket and the runtime directory; returns
    /// how it exited. Idempotent.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        if !self.stopped {
            self.terminate();
            self.stopped = true;
        }
        self.exit
    }

    fn terminate(&mut self) {
        let group = self.child.id() as libc::pid_t;
        if self.try_wait().ok().flatten().is_none() {
            signal_group(group, libc::SIGTERM);
            if !self.wait_for_exit(STOP_GRACE) {
                signal_group(group, libc::SIGKILL);
                self.exit = self.child.wait().ok();
            }
        }
        // Children of the daemon (the sandboxed server) share its group.
        if !group_gone(group, STOP_GRACE) {
            signal_group(group, libc::SIGKILL);
            group_gone(group, STOP_GRACE);
        }
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_dir_all(&self.runtime_dir);
    }

    fn wait_for_exit(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            match self.try_wait() {
                Ok(Some(_)) => return true,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => return false,
            }
        }
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// In the forked child: asks for SIGKILL when the thread that forked it
/// (the launcher or vmm thread, which outlive every daemon) ends — also
/// when zvmm is killed before the daemon is connected — and gives up if
/// zvmm is already gone.
fn die_with_parent(parent: u32) -> io::Result<()> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number; no memory involved.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: getppid(2) cannot fail and has no memory effects.
    if u32::try_from(unsafe { libc::getppid() }).ok() != Some(parent) {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok(())
}

/// Whether the daemon refused the sandbox (so another may work).
fn sandbox_refused(error: &VirtiofsdError) -> bool {
    match error {
        VirtiofsdError::Exited { message, .. } => message.to_ascii_lowercase().contains("sandbox"),
        _ => false,
    }
}

/// "exit status 1" / "signal 9".
fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        _ => status.to_string(),
    }
}

fn signal_group(group: libc::pid_t, signal: libc::c_int) {
    // SAFETY: kill(2) with a negative pid signals that process group; no
    // memory is involved. The group is our child's, created by us.
    unsafe { libc::kill(-group, signal) };
}

/// Waits up to `limit` until no live process is left in `group`.
fn group_gone(group: libc::pid_t, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if !group_alive(group) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether a process other than a zombie is in `group`. The sandboxed
/// server, orphaned when its parent exits, stays a zombie until init
/// reaps it, which some inits do only now and then.
fn group_alive(group: libc::pid_t) -> bool {
    reap_group(group);
    let Ok(entries) = std::fs::read_dir("/proc") else {
        // Under Landlock /proc is out of reach; the group's orphans are
        // zvmm's own children (see `become_subreaper`), reaped above, so
        // what still answers is alive.
        // SAFETY: signal 0 only checks for existence; no memory involved.
        return unsafe { libc::kill(-group, 0) } == 0;
    };
    entries.flatten().any(|entry| {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            return false;
        };
        // "pid (comm) state ppid pgrp ...": comm may hold anything.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return false;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let pgrp = fields.nth(1).and_then(|f| f.parse::<libc::pid_t>().ok());
        pgrp == Some(group) && state != Some("Z")
    })
}

/// Makes zvmm the reaper of its daemons' orphans (virtiofsd's sandboxed
/// server outlives its parent for a moment): they become zvmm's zombies,
/// which [`reap_group`] collects, instead of waiting for an init that may
/// reap only now and then. Idempotent; failure only leaves init's way.
fn become_subreaper() {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag; no memory.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
}

/// Reaps every exited process of `group` that is zvmm's child. Called
/// only once the daemon itself has been reaped (or never was spawned), so
/// it cannot take the exit status [`Virtiofsd::try_wait`] wants.
fn reap_group(group: libc::pid_t) {
    let mut status = 0;
    // SAFETY: waitpid writes only the status integer it is given.
    while unsafe { libc::waitpid(-group, &mut status, libc::WNOHANG) } > 0 {}
}

/// The binary to run: `given`, else `virtiofsd` in PATH or ~/.cargo/bin.
fn find_binary(given: Option<&Path>) -> Result<PathBuf, VirtiofsdError> {
    if let Some(path) = given {
        return if is_executable(path) {
            Ok(path.to_path_buf())
        } else {
            Err(VirtiofsdError::BinaryMissing {
                binary: path.display().to_string(),
            })
        };
    }
    let path_dirs = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    let cargo_bin = std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo/bin"));
    search(path_dirs.into_iter().chain(cargo_bin))
}

/// The first executable `virtiofsd` in `dirs`.
fn search(dirs: impl Iterator<Item = PathBuf>) -> Result<PathBuf, VirtiofsdError> {
    dirs.map(|dir| dir.join("virtiofsd"))
        .find(|candidate| is_executable(candidate))
        .ok_or(VirtiofsdError::NotFound)
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn check_shared_dir(dir: &Path) -> Result<(), VirtiofsdError> {
    let shown = dir.display().to_string();
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(VirtiofsdError::NotADirectory { dir: shown }),
        Err(_) => Err(VirtiofsdError::SharedDirMissing { dir: shown }),
    }
}

/// `$XDG_RUNTIME_DIR`, else `/run/zvmm` if it can be made, else `/tmp`.
pub fn runtime_base() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        if dir.is_dir() {
            return dir;
        }
    }
    let run = PathBuf::from("/run/zvmm");
    if DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&run)
        .is_ok()
    {
        return run;
    }
    std::env::temp_dir()
}

/// Makes `base/zvmm-<pid>-<n>` (mode 0700), a name no other process uses.
fn make_runtime_dir(base: &Path) -> Result<PathBuf, VirtiofsdError> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let error = |source| VirtiofsdError::RuntimeDir {
        base: base.display().to_string(),
        source,
    };
    for _ in 0..1000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("zvmm-{}-{n}", std::process::id()));
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            // Left over by an earlier zvmm with our pid: take the next.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(error(e)),
        }
    }
    Err(error(io::Error::from(io::ErrorKind::AlreadyExists)))
}

/// The tag as a file name: anything but `[A-Za-z0-9._-]` becomes `_`.
fn socket_name(tag: &str) -> String {
    let name: String = tag
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    match name.as_str() {
        "" | "." | ".." => "fs".to_string(),
        _ => name,
    }
}

/// Whether a Unix socket bound at `path` is listening: its line in
/// `/proc/net/unix` has `__SO_ACCEPTCON` among its flags.
pub(crate) fn listening(path: &Path) -> bool {
    const ACCEPTCON: u32 = 1 << 16;
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let path = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let flags = fields
            .get(3)
            .and_then(|f| u32::from_str_radix(f, 16).ok())
            .unwrap_or(0);
        fields.get(7) == Some(&path.as_ref()) && flags & ACCEPTCON != 0
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::sync::mpsc;

    use devices::virtio::fs::{Fs, FsConfig};
    use vmm_sys_util::tempdir::TempDir;

    use super::*;

    /// A shared directory and a runtime base in one temporary directory.
    struct Scratch {
        dir: TempDir,
    }

    impl Scratch {
        fn new() -> Scratch {
            let dir = TempDir::new_with_prefix("/tmp/zvmm-virtiofsd-").unwrap();
            std::fs::create_dir(dir.as_path().join("share")).unwrap();
            std::fs::create_dir(dir.as_path().join("run")).unwrap();
            Scratch { dir }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.as_path().join(name)
        }

        fn options(&self) -> VirtiofsdOptions {
            let mut opts = VirtiofsdOptions::new("my tag", self.path("share"));
            opts.runtime_base = Some(self.path("run"));
            opts
        }

        /// What is left in the runtime base.
        fn leftovers(&self) -> Vec<PathBuf> {
            std::fs::read_dir(self.path("run"))
                .unwrap()
                .map(|entry| entry.unwrap().path())
                .collect()
        }
    }

    /// Fails the test with how to install virtiofsd when it is missing.
    fn installed() {
        if search(
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .chain(std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo/bin"))),
        )
        .is_err()
        {
            panic!("virtiofsd is not installed; install it with `apt-get install -y libseccomp-dev libcap-ng-dev && cargo install virtiofsd --locked`");
        }
    }

    /// Processes whose command line mentions `needle`.
    fn processes_mentioning(needle: &str) -> Vec<String> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if text.contains(needle) {
                found.push(format!("{}: {text}", entry.file_name().to_string_lossy()));
            }
        }
        found
    }

    #[test]
    fn start_and_stop_leave_no_process_socket_or_directory() {
        installed();
        let scratch = Scratch::new();
        let mut daemon = Virtiofsd::start(scratch.options()).unwrap();
        let socket = daemon.socket().to_path_buf();
        assert_eq!(socket.file_name().unwrap(), "my_tag.sock");
        assert!(listening(&socket));
        assert_eq!(daemon.sandbox(), Sandbox::Namespace, "root here");
        let mode = std::fs::metadata(daemon.runtime_dir()).unwrap().mode();
        assert_eq!(mode & 0o777, 0o700);
        let needle = socket.display().to_string();
        assert!(!processes_mentioning(&needle).is_empty());
        assert!(daemon.try_wait().unwrap().is_none());
        assert!(daemon.exit_message().is_none(), "still running");

        let started = Instant::now();
        let status = daemon.stop().expect("reaped");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "SIGTERM was enough"
        );
        assert!(!status.success(), "virtiofsd exits 1 on SIGTERM");
        assert!(!group_alive(daemon.pid() as libc::pid_t));
        assert_eq!(processes_mentioning(&needle), Vec::<String>::new());
        assert!(!socket.exists());
        assert_eq!(scratch.leftovers(), Vec::<PathBuf>::new());
        assert_eq!(daemon.stop(), Some(status), "idempotent");
    }

    /// A daemon whose starter disappears without stopping it (as when
    /// zvmm is killed) dies too: PR_SET_PDEATHSIG fires when the thread
    /// that forked it ends.
    #[test]
    fn a_daemon_dies_with_the_thread_that_started_it() {
        installed();
        let scratch = Scratch::new();
        let options = scratch.options();
        let group = std::thread::spawn(move || {
            let daemon = Virtiofsd::start(options).unwrap();
            let group = daemon.pid() as libc::pid_t;
            std::mem::forget(daemon);
            group
        })
        .join()
        .unwrap();
        assert!(
            group_gone(group, Duration::from_secs(10)),
            "virtiofsd outlived its starter: {:?}",
            processes_mentioning(&scratch.path("run").display().to_string())
        );
    }

    #[test]
    fn a_daemon_that_dies_is_noticed_by_the_device_and_reported() {
        installed();
        let scratch = Scratch::new();
        let mut daemon = Virtiofsd::start(scratch.options()).unwrap();
        let (tx, lost) = mpsc::channel();
        let tx = Mutex::new(tx);
        let callback = Arc::new(move |message: String| {
            let _ = tx.lock().unwrap().send(message);
        });
        let fs = Fs::new(FsConfig::new("fs0", "my tag", daemon.socket(), callback)).unwrap();
        signal_group(daemon.pid() as libc::pid_t, libc::SIGKILL);
        let message = lost.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(message.ends_with("closed the connection"), "{message}");
        assert!(fs.backend_lost());
        let deadline = Instant::now() + Duration::from_secs(5);
        while daemon.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "not reaped");
            std::thread::sleep(Duration::from_millis(5));
        }
        let report = daemon.exit_message().unwrap();
        assert!(report.contains("was killed by signal 9"), "{report}");
        assert!(!report.contains('\n'), "{report}");
        drop(daemon);
        assert_eq!(scratch.leftovers(), Vec::<PathBuf>::new());
    }

    #[test]
    fn a_missing_binary_says_how_to_install_it() {
        let scratch = Scratch::new();
        let mut opts = scratch.options();
        opts.binary = Some(scratch.path("no-such-virtiofsd"));
        let err = Virtiofsd::start(opts).err().unwrap();
        assert_eq!(
            err.to_string(),
            format!(
                "virtiofsd binary {} not found or not executable; install it with `cargo install virtiofsd --locked`, or pass --virtiofsd BIN",
                scratch.path("no-such-virtiofsd").display()
            )
        );
        let err = search([scratch.path("share")].into_iter()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "virtiofsd not found; install it with `cargo install virtiofsd --locked`, or pass --virtiofsd BIN"
        );
        assert_eq!(scratch.leftovers(), Vec::<PathBuf>::new());
    }

    #[test]
    fn a_bad_shared_directory_is_refused() {
        let scratch = Scratch::new();
        let mut opts = scratch.options();
        opts.binary = Some("/bin/true".into());
        opts.shared_dir = scratch.path("absent");
        let err = Virtiofsd::start(opts.clone()).err().unwrap();
        let absent = scratch.path("absent").display().to_string();
        assert_eq!(
            err.to_string(),
            format!("shared directory {absent} does not exist")
        );
        std::fs::write(scratch.path("file"), b"").unwrap();
        opts.shared_dir = scratch.path("file");
        let err = Virtiofsd::start(opts).err().unwrap();
        let file = scratch.path("file").display().to_string();
        assert_eq!(
            err.to_string(),
            format!("shared directory {file} is not a directory")
        );
        assert_eq!(scratch.leftovers(), Vec::<PathBuf>::new());
    }

    #[test]
    fn a_daemon_that_exits_at_start_shows_its_error() {
        installed();
        let scratch = Scratch::new();
        let opts = VirtiofsdOptions {
            extra_args: vec!["--bogus-option".into()],
            ..scratch.options()
        };
        let err = Virtiofsd::start(opts).err().unwrap();
        let text = err.to_string();
        assert!(
            text.starts_with("virtiofsd exited at start (exited with status 2): error: unexpected argument '--bogus-option'"),
            "{text}"
        );
        assert!(!text.contains('\n'), "{text}");
        assert_eq!(scratch.leftovers(), Vec::<PathBuf>::new());
    }

    #[test]
    fn a_daemon_without_a_socket_is_stopped_after_the_timeout() {
        let scratch = Scratch::new();
        let script = scratch.path("fake-virtiofsd");
        std::fs::write(&script, "#!/bin/sh\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut opts = scratch.options();
        opts.binary = Some(script.clone());
        opts.start_timeout = Duration::from_millis(300);
        let err = Virtiofsd::start(opts).err().unwrap();
        let text = err.to_string();
        assert!(text.starts_with("virtiofsd made no socket at "), "{text}");
        assert!(text.ends_with("my_tag.sock within 300ms"), "{text}");
        assert_eq!(
            processes_mentioning(&script.display().to_string()),
            Vec::<String>::new()
        );
        assert_eq!(scratch.leftovers(), Vec::<PathBuf>::new());
    }

    #[test]
    fn names_and_messages_are_tidied() {
        assert_eq!(socket_name("my tag/../x"), "my_tag_.._x");
        assert_eq!(socket_name(".."), "fs");
        assert_eq!(socket_name(""), "fs");
        assert_eq!(
            strip_log_prefix("[2026-12-01T08:15:58Z ERROR virtiofsd] Error entering sandbox: x"),
            "Error entering sandbox: x"
        );
        assert_eq!(strip_log_prefix("error: bad"), "error: bad");
        assert!(sandbox_refused(&VirtiofsdError::Exited {
            status: "exited with status 1".into(),
            message: "Error entering sandbox: EPERM".into(),
        }));
        assert!(!sandbox_refused(&VirtiofsdError::NotFound));
    }
}
