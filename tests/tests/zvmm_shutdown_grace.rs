//! `--shutdown-grace`: SIGTERM presses the ACPI power button; a guest that
//! powers off within the grace period ends zvmm with 0, one that doesn't
//! is stopped hard when the grace ends (143), and a second signal stops it
//! at once.

use std::time::Duration;

use loader::layout::{GED_EVENT_PORT, GED_GSI};
use zvmm_tests::probe::{probe_elf, Flavour};
use zvmm_tests::zvmm::spawn_zvmm;

const LIMIT: Duration = Duration::from_secs(20);

fn args(action: &str, grace: &str) -> Vec<String> {
    let cmdline = format!(
        "console=ttyS0 probe.action={action} probe.pwrbtn.gsi={GED_GSI} probe.pwrbtn.reg={GED_EVENT_PORT:#x}"
    );
    vec![
        "--kernel".into(),
        probe_elf(Flavour::Pvh).display().to_string(),
        "--memory".into(),
        "64M".into(),
        "--cmdline".into(),
        cmdline,
        "--shutdown-grace".into(),
        grace.into(),
        "--timeout".into(),
        "15".into(),
    ]
}

#[test]
fn sigterm_presses_the_power_button_and_the_guest_powers_off() {
    press_and_power_off(args("power-button", "10"));
}

/// The same through KVM's full in-kernel irqchip (`--pit on`) instead of
/// zvmm's own I/O APIC: the button's GSI reaches the guest either way.
#[test]
fn the_button_works_with_the_in_kernel_irqchip_too() {
    let mut with_pit = args("power-button", "10");
    with_pit.extend(["--pit".into(), "on".into()]);
    press_and_power_off(with_pit);
}

fn press_and_power_off(args: Vec<String>) {
    let vm = spawn_zvmm(args);
    assert!(
        vm.stdout.wait_for("probe: power-button waiting", LIMIT),
        "{}",
        vm.stdout.text()
    );
    vm.signal(libc::SIGTERM);
    let run = vm.finish(LIMIT);
    assert!(
        run.stdout.contains("probe: power-button event=0x01"),
        "{run:#?}"
    );
    assert_eq!(run.code(), 0, "{run:#?}");
}

#[test]
fn a_guest_ignoring_the_button_is_stopped_when_the_grace_ends() {
    let vm = spawn_zvmm(args("hang", "1"));
    assert!(
        vm.stdout.wait_for("probe: done", LIMIT),
        "{}",
        vm.stdout.text()
    );
    let sent = std::time::Instant::now();
    vm.signal(libc::SIGTERM);
    let run = vm.finish(LIMIT);
    let waited = sent.elapsed();
    assert_eq!(run.code(), 143, "{run:#?}");
    assert!(
        waited >= Duration::from_millis(900),
        "stopped after {waited:?}, before the grace ended"
    );
    assert!(waited < Duration::from_secs(5), "{waited:?}");
}

#[test]
fn a_second_signal_stops_at_once() {
    let vm = spawn_zvmm(args("hang", "30"));
    assert!(
        vm.stdout.wait_for("probe: done", LIMIT),
        "{}",
        vm.stdout.text()
    );
    let sent = std::time::Instant::now();
    vm.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    vm.signal(libc::SIGTERM);
    let run = vm.finish(LIMIT);
    assert_eq!(run.code(), 143, "{run:#?}");
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "{:?}",
        sent.elapsed()
    );
}
