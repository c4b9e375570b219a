//! Kernel developers' console options end to end: `--expect`,
//! `--fail-on`, `--boot-timer` and `--serial tee=PATH`.

use std::time::Duration;

use zvmm_tests::probe::{probe_elf, Flavour};
use zvmm_tests::zvmm::{run_zvmm, scratch_dir};

const LIMIT: Duration = Duration::from_secs(20);

fn probe_args(extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--kernel".to_string(),
        probe_elf(Flavour::Pvh).display().to_string(),
        "--cpus".into(),
        "2".into(),
        "--memory".into(),
        "128M".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn expect_patterns_matched_in_order_exit_zero() {
    let run = run_zvmm(
        probe_args(&[
            "--expect",
            "cpus count=2",
            "--expect",
            r"ap apic_id=\d+ online",
        ]),
        LIMIT,
    );
    assert_eq!(run.code(), 0, "{run:#?}");
    assert!(
        run.stdout.contains("probe: ap apic_id=1 online"),
        "{run:#?}"
    );
    assert!(!run.stderr.contains("never matched"), "{run:#?}");
}

#[test]
fn expect_stops_the_vm_as_soon_as_all_matched() {
    // `hang` keeps the probe running after its report; only --expect ends it.
    let run = run_zvmm(
        probe_args(&[
            "--cmdline",
            "console=ttyS0 probe.action=hang",
            "--expect",
            "probe: done",
            "--timeout",
            "10",
        ]),
        LIMIT,
    );
    assert_eq!(run.code(), 0, "{run:#?}");
    assert!(run.elapsed < Duration::from_secs(5), "{run:#?}");
}

#[test]
fn fail_on_exits_5_and_prints_the_line() {
    let run = run_zvmm(probe_args(&["--fail-on", "cpus count=\\d"]), LIMIT);
    assert_eq!(run.code(), 5, "{run:#?}");
    assert!(
        run.stderr
            .contains("--fail-on 'cpus count=\\d' matched: probe: cpus count=2"),
        "{run:#?}"
    );
    assert!(
        !run.stdout.contains("probe: done"),
        "stopped at the match: {run:#?}"
    );
}

#[test]
fn poweroff_before_all_expects_exits_6() {
    let run = run_zvmm(probe_args(&["--expect", "no such line"]), LIMIT);
    assert_eq!(run.code(), 6, "{run:#?}");
    assert!(
        run.stderr.contains("--expect never matched: no such line"),
        "{run:#?}"
    );
}

#[test]
fn timeout_lists_unmatched_expects() {
    let run = run_zvmm(
        probe_args(&[
            "--cmdline",
            "console=ttyS0 probe.action=hang",
            "--expect",
            "probe: done",
            "--expect",
            "never",
            "--timeout",
            "1",
        ]),
        LIMIT,
    );
    assert_eq!(run.code(), 124, "{run:#?}");
    assert!(
        run.stderr.contains("--expect never matched: never"),
        "{run:#?}"
    );
    assert!(
        run.stderr.contains("timeout: vcpu0 was at rip="),
        "{run:#?}"
    );
}

#[test]
fn boot_timer_prints_the_timeline_in_order() {
    let run = run_zvmm(
        probe_args(&["--boot-timer", "--expect", "cpus count"]),
        LIMIT,
    );
    assert_eq!(run.code(), 0, "{run:#?}");
    let events = [
        "process start",
        "VM ready",
        "first guest entry",
        "first serial byte",
        "expect 'cpus count' matched",
        "exit",
    ];
    let mut last_ms = -1.0f64;
    for event in events {
        let line = run
            .stderr
            .lines()
            .filter(|l| l.starts_with("  "))
            .find(|l| l.contains(event))
            .unwrap_or_else(|| panic!("no '{event}' in {run:#?}"));
        let ms: f64 = line.split_whitespace().next().unwrap().parse().unwrap();
        assert!(
            ms >= last_ms,
            "{event} at {ms} ms before the previous event: {run:#?}"
        );
        last_ms = ms;
    }
}

#[test]
fn serial_tee_writes_stdout_and_the_file() {
    let log = scratch_dir("tee").join("console.log");
    let run = run_zvmm(
        probe_args(&["--serial", &format!("tee={}", log.display())]),
        LIMIT,
    );
    assert_eq!(run.code(), 0, "{run:#?}");
    let file = std::fs::read_to_string(&log).unwrap();
    assert!(run.stdout.contains("probe: done"), "{run:#?}");
    assert_eq!(file.replace('\r', ""), run.stdout.replace('\r', ""));
}

#[test]
fn bad_patterns_are_usage_errors() {
    let run = run_zvmm(probe_args(&["--expect", "("]), LIMIT);
    assert_eq!(run.code(), 2, "{run:#?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:#?}");
    assert!(run.stderr.contains("--expect: bad pattern '('"), "{run:#?}");
}
