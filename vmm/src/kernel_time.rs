//! Wall time spent in the host kernel's VM set-up and teardown calls
//! (creating the VM and its irqchip, registering guest RAM, creating
//! vCPUs, closing the VM), so `--boot-timer` can split zvmm's start-up and
//! exit into the kernel's work and zvmm's own. Calls are summed by name
//! in the order first seen; the accounting is process-wide (one VM per
//! process) and costs one `Instant::now` pair and a short lock per call,
//! on set-up paths only — never per guest exit or I/O request.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One kind of kernel call and the time spent in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelCall {
    /// What was called (`KVM_CREATE_VM`, `VM teardown`, ...).
    pub name: &'static str,
    /// How many times.
    pub count: u32,
    /// Summed wall time.
    pub total: Duration,
}

static CALLS: Mutex<Vec<KernelCall>> = Mutex::new(Vec::new());

/// Runs `call`, adding its wall time to `name`'s account.
pub fn timed<T>(name: &'static str, call: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let result = call();
    record(name, start.elapsed());
    result
}

/// Adds `spent` to `name`'s account.
pub fn record(name: &'static str, spent: Duration) {
    let mut calls = CALLS.lock().unwrap_or_else(|p| p.into_inner());
    match calls.iter_mut().find(|c| c.name == name) {
        Some(entry) => {
            entry.count += 1;
            entry.total += spent;
        }
        None => calls.push(KernelCall {
            name,
            count: 1,
            total: spent,
        }),
    }
}

/// Every account so far, in the order first seen.
pub fn snapshot() -> Vec<KernelCall> {
    CALLS.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// The accounts as `--boot-timer` prints them, with their sum.
pub fn render(calls: &[KernelCall]) -> String {
    let mut text = String::from("zvmm: kernel calls on the start and exit paths (ms)\n");
    for call in calls {
        let _ = writeln!(
            text,
            "  {:>10.3}  {} (x{})",
            call.total.as_secs_f64() * 1000.0,
            call.name,
            call.count
        );
    }
    let sum: Duration = calls.iter().map(|c| c.total).sum();
    let _ = writeln!(text, "  {:>10.3}  total", sum.as_secs_f64() * 1000.0);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_summed_by_name_in_first_seen_order() {
        record("test-a", Duration::from_millis(2));
        record("test-b", Duration::from_millis(1));
        record("test-a", Duration::from_millis(3));
        let value = timed("test-c", || 7);
        assert_eq!(value, 7);
        let calls: Vec<KernelCall> = snapshot()
            .into_iter()
            .filter(|c| c.name.starts_with("test-"))
            .collect();
        assert_eq!(calls[0].name, "test-a");
        assert_eq!(
            (calls[0].count, calls[0].total),
            (2, Duration::from_millis(5))
        );
        assert_eq!(calls[1].name, "test-b");
        assert_eq!(calls[2].name, "test-c");
        let text = render(&calls[..2]);
        assert!(text.contains("       5.000  test-a (x2)"), "{text}");
        assert!(text.contains("       6.000  total"), "{text}");
    }
}
