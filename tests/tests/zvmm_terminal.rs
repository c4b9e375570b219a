//! The console's terminal handling: with `--serial tty` and a terminal on
//! stdin, zvmm puts the terminal in raw mode while the VM runs and puts
//! the original settings back on every way out (guest poweroff, signal).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::Duration;

use zvmm_tests::probe::{probe_elf, Flavour};
use zvmm_tests::zvmm::{zvmm_bin, Transcript};

const LIMIT: Duration = Duration::from_secs(20);

/// A pseudo-terminal pair: (main side, subsidiary side).
fn open_pty() -> (OwnedFd, OwnedFd) {
    let (mut main, mut sub) = (-1, -1);
    // SAFETY: openpty writes two new descriptors; the optional name,
    // termios and winsize arguments are null.
    let ret = unsafe {
        libc::openpty(
            &mut main,
            &mut sub,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(ret, 0, "openpty failed");
    // SAFETY: both descriptors were just created and are owned here.
    unsafe { (OwnedFd::from_raw_fd(main), OwnedFd::from_raw_fd(sub)) }
}

fn termios_of(fd: &OwnedFd) -> libc::termios {
    // SAFETY: termios is plain data that tcgetattr fills in.
    let mut termios: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `termios` is writable and `fd` is an open terminal.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut termios) }, 0);
    termios
}

fn modes(t: &libc::termios) -> (u32, u32, u32) {
    (t.c_iflag, t.c_oflag, t.c_lflag)
}

/// Runs the probe with the pty as zvmm's stdin; `during` runs once the
/// probe's report is complete, with the zvmm child.
fn run_on_terminal(
    cmdline: &str,
    during: impl FnOnce(&OwnedFd, &mut std::process::Child),
) -> (i32, libc::termios, libc::termios) {
    let (_main, sub) = open_pty();
    let before = termios_of(&sub);
    let stdin = File::from(sub.try_clone().unwrap());
    let mut child = Command::new(zvmm_bin())
        .args(["--kernel", &probe_elf(Flavour::Pvh).display().to_string()])
        .args(["--cmdline", cmdline])
        .args(["--memory", "64M", "--timeout", "15"])
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start zvmm");
    let (stdout, reader) = Transcript::collect(child.stdout.take().unwrap());
    assert!(stdout.wait_for("probe: done", LIMIT), "{}", stdout.text());
    during(&sub, &mut child);
    let status = child.wait().unwrap();
    let _ = reader.join();
    let after = termios_of(&sub);
    (status.code().unwrap_or(-1), before, after)
}

#[test]
fn terminal_is_raw_while_running_and_restored_after_sigterm() {
    let (code, before, after) = run_on_terminal("console=ttyS0 probe.action=hang", |sub, child| {
        let raw = termios_of(sub);
        assert_eq!(
            raw.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG),
            0,
            "not raw"
        );
        // SAFETY: kill(2) on our own unreaped child.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    });
    assert_eq!(code, 143);
    assert_eq!(
        modes(&after),
        modes(&before),
        "terminal settings not restored"
    );
    assert_ne!(
        before.c_lflag & libc::ICANON,
        0,
        "a fresh pty starts canonical"
    );
}

#[test]
fn terminal_is_restored_after_guest_poweroff() {
    let (code, before, after) = run_on_terminal("console=ttyS0", |_, _| {});
    assert_eq!(code, 0);
    assert_eq!(
        modes(&after),
        modes(&before),
        "terminal settings not restored"
    );
}
