//! zvmm's serial console end to end: where the probe's report goes with
//! each `--serial` mode (stdout, a file, a pty, nowhere), and console input
//! from stdin or the pty reaching the guest's UART (`probe.action=echo=N`),
//! including the Ctrl-A x escape.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::Duration;

use zvmm_tests::probe::{probe_elf, Flavour, ProbeReport};
use zvmm_tests::zvmm::{run_zvmm, scratch_dir, spawn_zvmm, Finished, Transcript};

/// Hard limit for one zvmm run.
const LIMIT: Duration = Duration::from_secs(20);
/// A run that ends by itself must be over within this.
const FAST: Duration = Duration::from_secs(3);
/// The line the probe prints before it polls the UART for input.
const ECHO_WAITING: &str = "probe: echo waiting";

fn probe_args(cmdline: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--kernel".to_string(),
        probe_elf(Flavour::Pvh).display().to_string(),
        "--cmdline".into(),
        cmdline.into(),
        "--cpus".into(),
        "2".into(),
        "--memory".into(),
        "128M".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// The report of a complete, cleanly powered-off probe run.
fn assert_complete_report(report: &ProbeReport, cmdline: &str, context: &str) {
    assert!(report.started(), "{context}");
    assert_eq!(report.cmdline().as_deref(), Some(cmdline), "{context}");
    assert_eq!(report.cpus(), Some(2), "{context}");
    assert_eq!(report.aps_online(), [1], "{context}");
    assert!(report.finished(), "{context}");
    assert!(report.poweroff().is_some(), "{context}");
    assert!(!report.poweroff_failed(), "{context}");
}

fn assert_clean_exit(run: &Finished) {
    assert_eq!(run.code(), 0, "{run:#?}");
    assert!(run.elapsed < FAST, "{run:#?}");
}

#[test]
fn serial_file_gets_the_report_and_stdout_nothing() {
    let log = scratch_dir("serial-file").join("serial.log");
    let cmdline = "console=ttyS0 to=file";
    let serial = format!("file={}", log.display());
    let run = run_zvmm(probe_args(cmdline, &["--serial", &serial]), LIMIT);
    assert_clean_exit(&run);
    assert_eq!((run.stdout.as_str(), run.stderr.as_str()), ("", ""));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_complete_report(&ProbeReport::parse(&text), cmdline, &text);
}

/// `off` (no UART at all) and `null` (output discarded): the guest still
/// runs to its power-off, and nothing shows anywhere.
fn check_silent(mode: &str) {
    let run = run_zvmm(probe_args("console=ttyS0", &["--serial", mode]), LIMIT);
    eprintln!("--serial {mode}: zvmm ran {:?}", run.elapsed);
    assert_clean_exit(&run);
    assert_eq!((run.stdout.as_str(), run.stderr.as_str()), ("", ""));
}

#[test]
fn serial_off_runs_silently_to_poweroff() {
    check_silent("off");
}

#[test]
fn serial_null_runs_silently_to_poweroff() {
    check_silent("null");
}

/// `--serial pty` announces the pty on stderr; the report can be read
/// from it, and bytes written to it reach the guest.
#[test]
fn serial_pty_carries_output_and_input() {
    let cmdline = "console=ttyS0 probe.action=echo=5";
    let mut running = spawn_zvmm(probe_args(cmdline, &["--serial", "pty"]));
    let announced = running.stderr.wait_for("\n", LIMIT);
    let stderr = running.stderr.text();
    assert!(announced, "no pty announced: {stderr:?}");
    let pty = stderr
        .trim_end()
        .strip_prefix("zvmm: serial console on ")
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("unexpected stderr {stderr:?}"));
    assert!(pty.starts_with("/dev/pts"), "{pty:?}");
    let mut terminal = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&pty)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", pty.display()));
    let (guest, _reader) = Transcript::collect(terminal.try_clone().unwrap());
    assert!(guest.wait_for(ECHO_WAITING, LIMIT), "{}", guest.text());
    terminal.write_all(b"hello").unwrap();
    let poweroff = guest.wait_for("probe: poweroff method=", LIMIT);
    running.close_stdin();
    let run = running.finish(LIMIT);
    let text = guest.text();
    assert!(poweroff, "{text}\n{run:#?}");
    assert_eq!(run.code(), 0, "{run:#?}");
    assert_eq!(run.stdout, "", "{run:#?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:#?}");
    let report = ProbeReport::parse(&text);
    assert_complete_report(&report, cmdline, &text);
    assert_eq!(report.echo().as_deref(), Some("hello"), "{text}");
}

/// With `--serial tty` (the default) stdin feeds the UART even when it is
/// a pipe, not a terminal.
#[test]
fn stdin_reaches_the_guest_uart() {
    let cmdline = "console=ttyS0 probe.action=echo=5";
    let mut running = spawn_zvmm(probe_args(cmdline, &[]));
    let waiting = running.stdout.wait_for(ECHO_WAITING, LIMIT);
    assert!(waiting, "{}", running.stdout.text());
    running.write_stdin(b"hello");
    let run = running.finish(LIMIT);
    assert_eq!(run.code(), 0, "{run:#?}");
    assert_eq!(run.stderr, "", "{run:#?}");
    let report = ProbeReport::parse(&run.stdout);
    assert_complete_report(&report, cmdline, &run.stdout);
    assert_eq!(report.echo().as_deref(), Some("hello"), "{run:#?}");
}

/// Ctrl-A then x on the console quits like SIGINT (status 130), and the
/// two bytes never reach the guest.
#[test]
fn ctrl_a_x_on_stdin_quits_with_130() {
    let mut running = spawn_zvmm(probe_args("console=ttyS0 probe.action=hang", &[]));
    let hung = running.stdout.wait_for("probe: action name=hang", LIMIT);
    assert!(hung, "{}", running.stdout.text());
    running.write_stdin(b"\x01x");
    let run = running.finish(LIMIT);
    assert_eq!(run.code(), 130, "{run:#?}");
}

/// More input than the UART's 64-byte receive FIFO holds: zvmm must hold
/// back what does not fit and deliver it, in order, as the guest reads.
#[test]
fn stdin_longer_than_the_uart_fifo_arrives_whole() {
    let text: String = (0..200u8).map(|i| char::from(b'!' + i % 90)).collect();
    let cmdline = format!("console=ttyS0 probe.action=echo={}", text.len());
    let mut running = spawn_zvmm(probe_args(&cmdline, &[]));
    let waiting = running.stdout.wait_for(ECHO_WAITING, LIMIT);
    assert!(waiting, "{}", running.stdout.text());
    running.write_stdin(text.as_bytes());
    let run = running.finish(LIMIT);
    assert_eq!(run.code(), 0, "{run:#?}");
    let report = ProbeReport::parse(&run.stdout);
    assert_eq!(report.echo().as_deref(), Some(text.as_str()), "{run:#?}");
}
