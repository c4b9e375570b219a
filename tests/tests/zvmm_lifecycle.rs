//! How a zvmm run ends, end to end: the probe resets the machine (i8042,
//! ACPI reset register, triple fault), hangs, or jumps where no memory is,
//! and zvmm must end with the exit status its `--help` documents (3 for a
//! reset with `--no-reboot`, 124 for `--timeout`, 128 + signal, 4 for a
//! vCPU KVM cannot run), reboot in-process without `--no-reboot`, and say
//! why on stderr.

use std::time::{Duration, Instant};

use loader::layout::ports;
use zvmm_tests::probe::{probe_elf, Flavour, ProbeReport};
use zvmm_tests::zvmm::{run_zvmm, spawn_zvmm, Finished};

/// Hard limit for one zvmm run.
const LIMIT: Duration = Duration::from_secs(20);
/// A run that ends by itself must be over within this.
const FAST: Duration = Duration::from_secs(3);

/// zvmm arguments booting the PVH probe with `probe.action=action`.
fn action_args(action: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--kernel".to_string(),
        probe_elf(Flavour::Pvh).display().to_string(),
        "--cmdline".into(),
        format!("console=ttyS0 probe.action={action}"),
        "--cpus".into(),
        "2".into(),
        "--memory".into(),
        "128M".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn run_action(action: &str, extra: &[&str]) -> (Finished, ProbeReport) {
    let run = run_zvmm(action_args(action, extra), LIMIT);
    eprintln!("{action} {extra:?}: zvmm ran {:?}", run.elapsed);
    let report = ProbeReport::parse(&run.stdout);
    (run, report)
}

/// The probe ran its report and then `action`, once.
fn assert_action_ran_once(report: &ProbeReport, action: &str, run: &Finished) {
    assert_eq!(report.starts(), 1, "{run:#?}");
    assert!(report.finished(), "{run:#?}");
    assert_eq!(report.action().as_deref(), Some(action), "{run:#?}");
    assert_eq!(report.panic_message(), None, "{run:#?}");
}

/// With `--no-reboot`, a guest reset ends zvmm with status 3 at once.
fn check_reset_exits_3(action: &str, stderr_says: &str) -> ProbeReport {
    let (run, report) = run_action(action, &["--no-reboot"]);
    assert_eq!(run.code(), 3, "{run:#?}");
    assert!(run.elapsed < FAST, "{run:#?}");
    assert_action_ran_once(&report, action, &run);
    assert!(!report.has("reset failed"), "{run:#?}");
    assert!(run.stderr.contains(stderr_says), "{run:#?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:#?}");
    report
}

#[test]
fn i8042_reset_with_no_reboot_exits_3() {
    let report = check_reset_exits_3("reset-i8042", "guest reset");
    assert_eq!(report.reset_method().as_deref(), Some("i8042"));
}

#[test]
fn acpi_reset_register_with_no_reboot_exits_3() {
    let report = check_reset_exits_3("reset-acpi", "guest reset");
    let expected = format!(
        "reset method=acpi space=io addr={:#x} value={:#x}",
        ports::ACPI_RESET,
        ports::ACPI_RESET_VALUE
    );
    assert!(report.has(&expected), "{report:#?}");
}

#[test]
fn triple_fault_with_no_reboot_exits_3() {
    check_reset_exits_3("triple-fault", "vCPU 0 triple-faulted");
}

/// Without `--no-reboot` a reset boots the guest again in the same
/// process, over and over, until `--timeout` ends it with status 124.
fn check_reset_reboots_until_timeout(action: &str) {
    let (run, report) = run_action(action, &["--timeout", "2"]);
    assert_eq!(run.code(), 124, "{run:#?}");
    assert!(
        (Duration::from_secs(2)..FAST + Duration::from_secs(2)).contains(&run.elapsed),
        "{run:#?}"
    );
    let starts = report.starts();
    eprintln!("{action}: {starts} boots in {:?}", run.elapsed);
    assert!(starts >= 2, "probe started {starts} time(s): {run:#?}");
    let actions = report
        .lines()
        .iter()
        .filter(|l| l.starts_with(&format!("action name={action}")))
        .count();
    assert!(actions + 1 >= starts, "{run:#?}");
    assert!(report.panic_message().is_none(), "{run:#?}");
    assert!(run.stderr.contains("timeout"), "{run:#?}");
    assert!(!run.stderr.contains("--no-reboot"), "{run:#?}");
}

#[test]
fn i8042_reset_reboots_in_process() {
    check_reset_reboots_until_timeout("reset-i8042");
}

#[test]
fn acpi_reset_reboots_in_process() {
    check_reset_reboots_until_timeout("reset-acpi");
}

#[test]
fn triple_fault_reboots_in_process() {
    check_reset_reboots_until_timeout("triple-fault");
}

/// A guest halted with interrupts off never exits to zvmm by itself (the
/// in-kernel LAPIC keeps the vCPU inside KVM): `--timeout` must still stop
/// it, and tell where the vCPU was.
#[test]
fn hung_guest_is_stopped_by_the_timeout() {
    let (run, report) = run_action("hang", &["--timeout", "1"]);
    assert_eq!(run.code(), 124, "{run:#?}");
    assert!(
        (Duration::from_secs(1)..FAST).contains(&run.elapsed),
        "{run:#?}"
    );
    assert_action_ran_once(&report, "hang", &run);
    assert!(run.stderr.contains("timeout"), "{run:#?}");
    assert!(run.stderr.contains("rip="), "{run:#?}");
}

/// Boots the hanging probe, waits for its last line, sends `signal` and
/// expects exit status `128 + signal` promptly.
fn check_signal_stops_hung_guest(signal: i32) {
    let running = spawn_zvmm(action_args("hang", &[]));
    let marker = "probe: action name=hang";
    let seen = running.stdout.wait_for(marker, LIMIT);
    assert!(seen, "no {marker:?}: {}", running.stdout.text());
    let sent = Instant::now();
    running.signal(signal);
    let run = running.finish(LIMIT);
    let stop_time = sent.elapsed();
    eprintln!("signal {signal}: zvmm stopped {stop_time:?} after it");
    assert_eq!(run.code(), 128 + signal, "{run:#?}");
    assert!(
        stop_time < Duration::from_secs(2),
        "{stop_time:?}: {run:#?}"
    );
    let report = ProbeReport::parse(&run.stdout);
    assert_action_ran_once(&report, "hang", &run);
    assert!(run.stderr.contains(&format!("signal {signal}")), "{run:#?}");
}

#[test]
fn sigterm_stops_a_hung_guest_with_143() {
    check_signal_stops_hung_guest(libc::SIGTERM);
}

#[test]
fn sigint_stops_a_hung_guest_with_130() {
    check_signal_stops_hung_guest(libc::SIGINT);
}

/// Executing from the 32-bit MMIO hole, where there is neither RAM nor a
/// device, is something KVM cannot do: status 4, and stderr explains and
/// shows the vCPU registers, with RIP at the address jumped to.
#[test]
fn executing_from_the_mmio_hole_exits_4_with_registers() {
    let (run, report) = run_action("bad-exec", &[]);
    assert_eq!(run.code(), 4, "{run:#?}");
    assert!(run.elapsed < FAST, "{run:#?}");
    assert_action_ran_once(&report, "bad-exec", &run);
    let addr = report
        .bad_exec_addr()
        .unwrap_or_else(|| panic!("no bad-exec address: {run:#?}"));
    assert!(run.stderr.contains("vCPU 0 stopped"), "{run:#?}");
    assert!(
        run.stderr.contains(&format!("rip={addr:#018x}")),
        "{run:#?}"
    );
    for register in ["rsp=", "rflags=", "cr0=", "cr3=", "efer="] {
        assert!(run.stderr.contains(register), "no {register}: {run:#?}");
    }
}

/// Opening `--serial file=FIFO` waits for a reader, as FIFOs do; zvmm must
/// still end at once on SIGTERM (status 143, or killed by the signal if it
/// came before zvmm's handler existed). Refusing the FIFO outright with
/// status 1 and a one-line error naming it is fine too.
#[test]
fn sigterm_ends_zvmm_while_it_waits_for_a_serial_fifo_reader() {
    use std::os::unix::process::ExitStatusExt;
    let fifo = zvmm_tests::zvmm::scratch_dir("serial-fifo").join("console");
    let path = std::ffi::CString::new(fifo.display().to_string()).unwrap();
    // SAFETY: `path` is a valid NUL-terminated string for the call.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    let serial = format!("file={}", fifo.display());
    let mut running = spawn_zvmm(action_args("hang", &["--serial", &serial]));
    std::thread::sleep(Duration::from_millis(500));
    if running.try_status().is_some() {
        let run = running.finish(LIMIT);
        assert_eq!(run.code(), 1, "{run:#?}");
        assert_eq!(run.stderr.lines().count(), 1, "{run:#?}");
        assert!(run.stderr.contains(&fifo.display().to_string()), "{run:#?}");
        return;
    }
    let sent = Instant::now();
    running.signal(libc::SIGTERM);
    let run = running.finish(Duration::from_secs(5));
    let stop_time = sent.elapsed();
    let ended_by_sigterm = run.status.is_some_and(|s| {
        s.code() == Some(128 + libc::SIGTERM) || s.signal() == Some(libc::SIGTERM)
    });
    assert!(
        ended_by_sigterm && stop_time < Duration::from_secs(2),
        "zvmm ignored SIGTERM while opening the FIFO (still running after \
         {stop_time:?}, then killed): {run:#?}"
    );
}
