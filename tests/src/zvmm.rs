//! Runs the `zvmm` binary as a child process with a hard time limit and
//! collects what it printed, for end-to-end tests: all at once
//! ([`run_zvmm`]) or while it runs ([`Running`]: wait for a line, send a
//! signal, type on its standard input).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Builds the `zvmm` binary (release profile, as users run it) once per
/// test process and returns its path.
pub fn zvmm_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--release", "-p", "vmm", "--bin", "zvmm"])
            .current_dir(workspace_root())
            .status()
            .expect("cannot run cargo to build zvmm");
        assert!(status.success(), "building zvmm failed");
        target_dir().join("release/zvmm")
    })
}

/// What a finished (or killed) process left behind.
#[derive(Debug)]
pub struct Finished {
    /// Exit status; `None` when it was killed at the time limit.
    pub status: Option<ExitStatus>,
    /// Everything written to stdout.
    pub stdout: String,
    /// Everything written to stderr.
    pub stderr: String,
    /// Wall time from spawn to exit.
    pub elapsed: Duration,
}

impl Finished {
    /// The exit code; panics with the output when killed or signalled.
    pub fn code(&self) -> i32 {
        match self.status.and_then(|s| s.code()) {
            Some(code) => code,
            None => panic!("process did not exit by itself: {self:#?}"),
        }
    }
}

/// Spawns `command` with piped output and waits at most `limit`, killing
/// it past that.
pub fn run_with_limit(mut command: Command, limit: Duration) -> Finished {
    let start = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {command:?}: {e}"));
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = wait_with_limit(&mut child, limit);
    let elapsed = start.elapsed();
    Finished {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
        elapsed,
    }
}

fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

fn wait_with_limit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// How fast zvmm must refuse bad input.
pub const QUICK_REJECTION: Duration = Duration::from_secs(2);

/// Checks a refusal: status `code`, within [`QUICK_REJECTION`], no guest
/// output, exactly one `zvmm: ` line on stderr containing every one of
/// `needles`, and no panic.
pub fn assert_rejected(run: &Finished, code: i32, needles: &[&str]) {
    assert_eq!(run.code(), code, "{run:#?}");
    assert!(run.elapsed < QUICK_REJECTION, "slow rejection: {run:#?}");
    assert_eq!(run.stdout, "", "{run:#?}");
    assert!(!run.stderr.contains("panicked"), "{run:#?}");
    assert_eq!(run.stderr.lines().count(), 1, "not one line: {run:#?}");
    assert!(run.stderr.starts_with("zvmm: "), "{run:#?}");
    for needle in needles {
        assert!(run.stderr.contains(needle), "no {needle:?} in {run:#?}");
    }
}

/// Runs `zvmm` with `args`, killing it after `limit`.
pub fn run_zvmm<I, S>(args: I, limit: Duration) -> Finished
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut command = Command::new(zvmm_bin());
    command.args(args);
    run_with_limit(command, limit)
}

/// A fresh, empty scratch directory for one test.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = target_dir()
        .join("e2e-scratch")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("cannot create scratch dir");
    dir
}

/// Text read from a pipe or terminal by a background thread, readable
/// while it grows.
#[derive(Clone, Default)]
pub struct Transcript {
    shared: Arc<(Mutex<TranscriptState>, Condvar)>,
}

#[derive(Default)]
struct TranscriptState {
    bytes: Vec<u8>,
    closed: bool,
}

impl Transcript {
    /// Starts a thread copying everything `reader` yields until end of
    /// file or a read error (a pty whose other side closed gives `EIO`).
    pub fn collect<R: Read + Send + 'static>(mut reader: R) -> (Self, JoinHandle<()>) {
        let transcript = Self::default();
        let writer = transcript.clone();
        let thread = std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            loop {
                match reader.read(&mut buffer) {
                    Ok(0) | Err(_) => break,
                    Ok(count) => writer.append(&buffer[..count]),
                }
            }
            writer.close();
        });
        (transcript, thread)
    }

    fn append(&self, bytes: &[u8]) {
        let (state, changed) = &*self.shared;
        state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .bytes
            .extend_from_slice(bytes);
        changed.notify_all();
    }

    fn close(&self) {
        let (state, changed) = &*self.shared;
        state.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        changed.notify_all();
    }

    /// Everything read so far (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        let state = self.shared.0.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&state.bytes).into_owned()
    }

    /// Waits until the text contains `needle`; false if the source closed
    /// or `limit` passed first.
    pub fn wait_for(&self, needle: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let (state, changed) = &*self.shared;
        let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if String::from_utf8_lossy(&state.bytes).contains(needle) {
                return true;
            }
            let now = Instant::now();
            if state.closed || now >= deadline {
                return false;
            }
            state = changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// A `zvmm` process being watched while it runs: stdout and stderr are
/// collected as they come, stdin is a pipe the test can write to.
pub struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
    /// What it has written to stdout so far.
    pub stdout: Transcript,
    /// What it has written to stderr so far.
    pub stderr: Transcript,
    readers: Vec<JoinHandle<()>>,
    start: Instant,
}

impl Running {
    /// Spawns `command` with all three standard streams piped.
    pub fn spawn(mut command: Command) -> Self {
        let start = Instant::now();
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {command:?}: {e}"));
        let stdin = child.stdin.take();
        let (stdout, out_thread) = Transcript::collect(child.stdout.take().expect("piped stdout"));
        let (stderr, err_thread) = Transcript::collect(child.stderr.take().expect("piped stderr"));
        Self {
            child,
            stdin,
            stdout,
            stderr,
            readers: vec![out_thread, err_thread],
            start,
        }
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the child has already exited, without waiting.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the child.
    pub fn signal(&self, signal: i32) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) has no memory effects; `pid` is our own child,
        // not yet reaped (we hold its `Child`), so it cannot be reused.
        let ret = unsafe { libc::kill(pid, signal) };
        assert_eq!(ret, 0, "kill({pid}, {signal}) failed");
    }

    /// Writes `bytes` to the child's stdin.
    pub fn write_stdin(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin already closed");
        stdin
            .write_all(bytes)
            .expect("cannot write to zvmm's stdin");
        stdin.flush().expect("cannot flush zvmm's stdin");
    }

    /// Closes the child's stdin (it sees end of file).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits at most `limit` for the child to exit (killing it past that)
    /// and returns everything it printed.
    pub fn finish(mut self, limit: Duration) -> Finished {
        self.stdin = None;
        let status = wait_with_limit(&mut self.child, limit);
        let elapsed = self.start.elapsed();
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        Finished {
            status,
            stdout: self.stdout.text(),
            stderr: self.stderr.text(),
            elapsed,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A test that panicked midway must not leave its VM running.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `zvmm` with `args`, to be watched while it runs.
pub fn spawn_zvmm<I, S>(args: I) -> Running
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut command = Command::new(zvmm_bin());
    command.args(args);
    Running::spawn(command)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn shell(script: &str) -> Running {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        Running::spawn(command)
    }

    #[test]
    fn running_sees_lines_as_they_come_and_feeds_stdin() {
        let mut run = shell("echo ready; read x; echo got $x; echo oops >&2; exit 3");
        assert!(run.stdout.wait_for("ready", Duration::from_secs(5)));
        assert!(!run.stdout.text().contains("got"));
        run.write_stdin(b"hi\n");
        let done = run.finish(Duration::from_secs(5));
        assert_eq!(done.code(), 3);
        assert_eq!(done.stdout, "ready\ngot hi\n");
        assert_eq!(done.stderr, "oops\n");
    }

    #[test]
    fn running_delivers_signals_and_wait_for_gives_up() {
        let run = shell("echo up; exec sleep 30");
        assert!(run.stdout.wait_for("up", Duration::from_secs(5)));
        assert!(!run.stdout.wait_for("never", Duration::from_millis(50)));
        run.signal(libc::SIGTERM);
        let done = run.finish(Duration::from_secs(5));
        assert_eq!(done.status.and_then(|s| s.signal()), Some(libc::SIGTERM));
        assert!(done.elapsed < Duration::from_secs(5), "{done:?}");
    }

    #[test]
    fn transcript_stops_waiting_at_end_of_file() {
        let (transcript, thread) = Transcript::collect(&b"abc"[..]);
        thread.join().unwrap();
        assert!(transcript.wait_for("bc", Duration::from_secs(1)));
        let start = Instant::now();
        assert!(!transcript.wait_for("zzz", Duration::from_secs(5)));
        assert!(start.elapsed() < Duration::from_secs(1));
    }
}
