//! The serial console's host side: where guest output goes (stdout, a
//! file, a pty, nowhere), where guest input comes from (stdin or the pty),
//! raw terminal mode that is always restored, and the event-loop
//! subscriber that forwards input bytes into the UART's receive FIFO.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use devices::legacy::serial::{Serial, SerialError};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::timerfd::TimerFd;

use crate::config::{ConsoleConfig, ConsoleMode};
use crate::lifecycle::{Lifecycle, StopReason};

/// The console's host side could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The output file could not be created.
    #[error("--serial: cannot create {path}")]
    File {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// No pseudo-terminal could be allocated.
    #[error("--serial pty: cannot allocate a pseudo-terminal")]
    Pty(#[source] std::io::Error),
}

/// Host endpoints of the serial console.
pub struct ConsoleEndpoints {
    /// Where guest output bytes go.
    pub output: Box<dyn Write + Send>,
    /// Where guest input bytes come from, if anywhere.
    pub input: Option<File>,
    /// The pty's path, for `--serial pty`.
    pub pty_path: Option<PathBuf>,
}

/// Opens the host side for `config`; `None` when the serial port is off.
pub fn open_console(config: &ConsoleConfig) -> Result<Option<ConsoleEndpoints>, ConsoleError> {
    let endpoints = match config.mode {
        ConsoleMode::Off => return Ok(None),
        ConsoleMode::Null => ConsoleEndpoints {
            output: Box::new(std::io::sink()),
            input: None,
            pty_path: None,
        },
        ConsoleMode::Tty => ConsoleEndpoints {
            output: Box::new(StdoutWriter),
            input: duplicate_stdin(),
            pty_path: None,
        },
        ConsoleMode::File => {
            let file = create_output_file(config)?;
            ConsoleEndpoints {
                output: Box::new(file),
                input: None,
                pty_path: None,
            }
        }
        ConsoleMode::Tee => {
            let file = create_output_file(config)?;
            ConsoleEndpoints {
                output: Box::new(TeeWriter(file)),
                input: duplicate_stdin(),
                pty_path: None,
            }
        }
        ConsoleMode::Pty => open_pty()?,
    };
    Ok(Some(endpoints))
}

/// Creates (truncates) the console log. Opened non-blocking so a FIFO
/// without a reader is an error instead of a hang; writes block again
/// afterwards, so a slow reader slows the guest rather than losing output.
fn create_output_file(config: &ConsoleConfig) -> Result<File, ConsoleError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = config.file.clone().unwrap_or_default();
    let file_error = |source| ConsoleError::File {
        path: path.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENXIO) => file_error(std::io::Error::other("a FIFO with no reader")),
            _ => file_error(e),
        })?;
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no memory is passed.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
    }
    Ok(file)
}

/// Unbuffered standard output: every guest byte shows at once.
struct StdoutWriter;

impl Write for StdoutWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut stdout = std::io::stdout().lock();
        let written = stdout.write(buf)?;
        stdout.flush()?;
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

/// Standard output and a log file.
struct TeeWriter(File);

impl Write for TeeWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let written = StdoutWriter.write(buf)?;
        self.0.write_all(&buf[..written])?;
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        StdoutWriter.flush()?;
        self.0.flush()
    }
}

fn duplicate_stdin() -> Option<File> {
    // SAFETY: dup of fd 0 has no memory-safety preconditions; a failure
    // (stdin closed) returns -1 and is handled.
    let fd = unsafe { libc::dup(libc::STDIN_FILENO) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    Some(unsafe { File::from_raw_fd(fd) })
}

fn open_pty() -> Result<ConsoleEndpoints, ConsoleError> {
    let mut main_fd: RawFd = -1;
    let mut sub_fd: RawFd = -1;
    // SAFETY: openpty writes two descriptors into the given pointers; the
    // name, termios and winsize arguments are optional and passed as null.
    let ret = unsafe {
        libc::openpty(
            &mut main_fd,
            &mut sub_fd,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if ret < 0 {
        return Err(ConsoleError::Pty(std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors were just returned by openpty and are ours.
    let (main, sub) = unsafe { (File::from_raw_fd(main_fd), OwnedFd::from_raw_fd(sub_fd)) };
    let path = std::fs::read_link(format!("/proc/self/fd/{}", sub.as_raw_fd()))
        .map_err(ConsoleError::Pty)?;
    set_raw(sub.as_raw_fd()).map_err(ConsoleError::Pty)?;
    // The subsidiary end stays open in a process-wide slot so that output
    // written before a client attaches is kept instead of failing with EIO.
    static PTY_SUBSIDIARIES: OnceLock<Mutex<Vec<OwnedFd>>> = OnceLock::new();
    PTY_SUBSIDIARIES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(sub);
    let output = main.try_clone().map_err(ConsoleError::Pty)?;
    Ok(ConsoleEndpoints {
        output: Box::new(output),
        input: Some(main),
        pty_path: Some(path),
    })
}

fn set_raw(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
    let mut termios: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `termios` is a valid, writable termios struct.
    if unsafe { libc::tcgetattr(fd, &mut termios) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: cfmakeraw only edits the struct it is given.
    unsafe { libc::cfmakeraw(&mut termios) };
    // SAFETY: `termios` is a valid termios struct for this fd.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &termios) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The terminal settings to put back at exit, also from a panic.
static SAVED_TERMIOS: Mutex<Option<libc::termios>> = Mutex::new(None);
/// The same settings, readable without a lock from a signal handler.
static SIGNAL_SAFE_TERMIOS: OnceLock<libc::termios> = OnceLock::new();

/// Puts back the original terminal settings from a signal handler
/// (tcsetattr is async-signal-safe; the settings are read lock-free).
pub fn restore_terminal_from_signal() {
    if let Some(termios) = SIGNAL_SAFE_TERMIOS.get() {
        // SAFETY: restores settings previously read from the same fd.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, termios) };
    }
}

/// Puts the controlling terminal on stdin in raw mode until dropped.
pub struct RawTerminal(());

impl RawTerminal {
    /// Switches stdin to raw mode if it is a terminal; `None` otherwise.
    pub fn enable() -> Option<Self> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data, filled by tcgetattr.
        let mut original: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `original` is a valid, writable termios struct.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut original) } < 0 {
            return None;
        }
        *SAVED_TERMIOS.lock().unwrap_or_else(|p| p.into_inner()) = Some(original);
        let _ = SIGNAL_SAFE_TERMIOS.set(original);
        let previous_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            previous_hook(info);
        }));
        set_raw(libc::STDIN_FILENO).ok()?;
        Some(Self(()))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Puts back the terminal settings saved by [`RawTerminal::enable`].
pub fn restore_terminal() {
    let saved = SAVED_TERMIOS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(termios) = saved {
        // SAFETY: restores settings previously read from the same fd.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &termios) };
    }
}

/// Ctrl-A: the escape key; Ctrl-A then `x` quits, as in QEMU.
const ESCAPE: u8 = 0x01;

/// Forwards console input to the UART, holding back what its FIFO can't
/// take yet.
pub struct InputForwarder {
    input: File,
    serial: Arc<Mutex<Serial>>,
    lifecycle: Arc<Lifecycle>,
    pending: Vec<u8>,
    after_escape: bool,
    watch_escape: bool,
    retry: Option<TimerFd>,
}

/// How soon to offer held-back input again while the guest's FIFO is full.
const RETRY_INTERVAL: Duration = Duration::from_millis(5);

impl InputForwarder {
    /// Forwards `input` to `serial`; `watch_escape` enables Ctrl-A x.
    pub fn new(
        input: File,
        serial: Arc<Mutex<Serial>>,
        lifecycle: Arc<Lifecycle>,
        watch_escape: bool,
    ) -> Self {
        Self {
            input,
            serial,
            lifecycle,
            pending: Vec::new(),
            after_escape: false,
            watch_escape,
            retry: TimerFd::new().ok(),
        }
    }

    /// Whether bytes are waiting for room in the FIFO.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Moves as many pending bytes into the FIFO as it takes.
    pub fn flush_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        // On an interrupt failure the bytes were still queued: count them.
        let taken = match serial.enqueue_input(&self.pending) {
            Ok(taken) => taken,
            Err(SerialError::Interrupt { queued, .. }) => queued,
        };
        self.pending.drain(..taken);
        drop(serial);
        if !self.pending.is_empty() {
            if let Some(timer) = self.retry.as_mut() {
                // Without the timer, the next input event retries instead.
                let _ = timer.reset(RETRY_INTERVAL, None);
            }
        }
    }

    fn accept(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            if self.watch_escape && self.after_escape {
                self.after_escape = false;
                match byte {
                    b'x' | b'X' => {
                        self.lifecycle.stop(StopReason::Signal(libc::SIGINT));
                        return;
                    }
                    ESCAPE => {}
                    _ => {
                        self.pending.push(ESCAPE);
                    }
                }
            } else if self.watch_escape && byte == ESCAPE {
                self.after_escape = true;
                continue;
            }
            self.pending.push(byte);
        }
    }
}

impl MutEventSubscriber for InputForwarder {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if let Some(timer) = self.retry.as_mut() {
            if events.fd() == timer.as_raw_fd() {
                let _ = timer.wait();
                self.flush_pending();
                return;
            }
        }
        let mut buffer = [0u8; 256];
        let closed = events
            .event_set()
            .intersects(EventSet::HANG_UP | EventSet::ERROR);
        match self.input.read(&mut buffer) {
            Ok(0) => stop_watching(ops, &self.input),
            Ok(count) => {
                self.accept(&buffer[..count]);
                self.flush_pending();
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => stop_watching(ops, &self.input),
        }
        if closed && self.pending.is_empty() {
            stop_watching(ops, &self.input);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // Regular files and /dev/null can't be polled; they have no input.
        if ops.add(Events::new(&self.input, EventSet::IN)).is_err() {
            self.pending.clear();
        }
        if let Some(timer) = &self.retry {
            let _ = ops.add(Events::new(timer, EventSet::IN));
        }
    }
}

fn stop_watching(ops: &mut EventOps, input: &File) {
    // Already removed is fine.
    let _ = ops.remove(Events::empty(input));
}

/// Writes the pty path where a user will look for it.
pub fn announce_pty(path: &Path) {
    eprintln!("zvmm: serial console on {}", path.display());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarder() -> InputForwarder {
        let input = File::open("/dev/null").unwrap();
        let serial = Arc::new(Mutex::new(Serial::new(
            vmm_sys_util::eventfd::EventFd::new(0).unwrap(),
            Box::new(std::io::sink()),
        )));
        InputForwarder::new(input, serial, Arc::new(Lifecycle::new().unwrap()), true)
    }

    #[test]
    fn escape_then_x_stops_the_vm() {
        let mut forwarder = forwarder();
        forwarder.accept(b"ab\x01x");
        assert_eq!(forwarder.pending, b"ab");
        assert_eq!(
            forwarder.lifecycle.reason(),
            Some(StopReason::Signal(libc::SIGINT))
        );
    }

    #[test]
    fn double_escape_sends_one_ctrl_a() {
        let mut forwarder = forwarder();
        forwarder.accept(b"\x01\x01\x01q");
        assert_eq!(forwarder.pending, b"\x01\x01q");
        assert_eq!(forwarder.lifecycle.reason(), None);
    }

    #[test]
    fn file_console_writes_the_file() {
        let dir = std::env::temp_dir().join(format!("zvmm-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("serial.log");
        let config = ConsoleConfig {
            mode: ConsoleMode::File,
            file: Some(path.clone()),
        };
        let mut endpoints = open_console(&config).unwrap().unwrap();
        endpoints.output.write_all(b"hello").unwrap();
        drop(endpoints);
        assert_eq!(std::fs::read(&path).unwrap(), b"hello");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn file_console_names_a_bad_path() {
        let config = ConsoleConfig {
            mode: ConsoleMode::File,
            file: Some("/nonexistent/dir/log".into()),
        };
        let err = open_console(&config).err().unwrap();
        assert!(err.to_string().contains("/nonexistent/dir/log"));
    }

    #[test]
    fn pty_console_reports_its_path() {
        let config = ConsoleConfig {
            mode: ConsoleMode::Pty,
            file: None,
        };
        let endpoints = open_console(&config).unwrap().unwrap();
        let path = endpoints.pty_path.unwrap();
        assert!(path.starts_with("/dev/pts"), "{path:?}");
    }
}
