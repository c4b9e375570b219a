//! Watching the guest console for kernel developers: `--expect` patterns
//! (in order; all matched ends the VM with status 0), `--fail-on`
//! patterns (a match ends it with status 5), and the boot timeline
//! (`--boot-timer`): process start, VM ready, first guest entry, first
//! serial byte, each expect match, exit.
//!
//! Guest output reaches [`ConsoleWatcher::observe`] byte by byte from the
//! UART on a vCPU thread; whole lines are matched as they complete, and
//! the event loop checks a pending partial line (a prompt without a
//! newline) on each tick.

use std::fmt::Write as _;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use regex::Regex;

use crate::lifecycle::{Lifecycle, StopReason};
use crate::writer::SharedWriter;

/// The moment this process started (first call wins: call it early).
pub fn process_start() -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// A pattern did not compile.
#[derive(Debug, thiserror::Error)]
#[error("--{option}: bad pattern '{pattern}'")]
pub struct WatchError {
    /// `expect` or `fail-on`.
    pub option: &'static str,
    /// The pattern given.
    pub pattern: String,
    /// What the regex compiler said.
    #[source]
    pub source: regex::Error,
}

impl WatchError {
    /// The error and the regex compiler's reason on one line.
    pub fn one_line(&self) -> String {
        let reason = self.source.to_string();
        let reason = reason.lines().last().unwrap_or_default().trim();
        format!(
            "{self}: {}",
            reason.strip_prefix("error: ").unwrap_or(reason)
        )
    }
}

/// Compiles `patterns` for `--option`.
pub fn compile(option: &'static str, patterns: &[String]) -> Result<Vec<Regex>, WatchError> {
    patterns
        .iter()
        .map(|pattern| {
            Regex::new(pattern).map_err(|source| WatchError {
                option,
                pattern: pattern.clone(),
                source,
            })
        })
        .collect()
}

/// Longest partial line kept for matching; longer lines are cut.
const MAX_LINE: usize = 4096;

/// One moment of the boot timeline, as `vm.info` reports it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TimelineEntry {
    /// What happened ("first serial byte", ...).
    pub event: String,
    /// Milliseconds since the process started.
    pub ms: f64,
}

/// Named moments of one zvmm run, relative to process start.
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    events: Vec<(String, Duration)>,
}

impl Timeline {
    /// Records `what` at `at` since `start`, once per name.
    pub fn mark_once(&mut self, what: &str, start: Instant) {
        if !self.events.iter().any(|(name, _)| name == what) {
            self.events.push((what.to_string(), start.elapsed()));
        }
    }

    /// The recorded moments in order.
    pub fn events(&self) -> &[(String, Duration)] {
        &self.events
    }

    /// The moments as `vm.info` reports them.
    pub fn entries(&self) -> Vec<TimelineEntry> {
        self.events
            .iter()
            .map(|(event, at)| TimelineEntry {
                event: event.clone(),
                ms: at.as_secs_f64() * 1000.0,
            })
            .collect()
    }

    /// The timeline as printed by `--boot-timer`.
    pub fn render(&self) -> String {
        let mut text = String::from("zvmm: boot timeline (ms since process start)\n");
        for (what, at) in &self.events {
            let _ = writeln!(text, "  {:>10.3}  {what}", at.as_secs_f64() * 1000.0);
        }
        text
    }
}

/// Matches guest console output and keeps the timeline.
pub struct ConsoleWatcher {
    start: Instant,
    expect: Vec<Regex>,
    matched: usize,
    fail_on: Vec<Regex>,
    line: Vec<u8>,
    lifecycle: Option<Arc<Lifecycle>>,
    timeline: Timeline,
    bytes_seen: u64,
}

impl ConsoleWatcher {
    /// A watcher for a process that started at `start`.
    pub fn new(start: Instant, expect: Vec<Regex>, fail_on: Vec<Regex>) -> Self {
        let mut timeline = Timeline::default();
        timeline.mark_once("process start", start);
        timeline.events[0].1 = Duration::ZERO;
        Self {
            start,
            expect,
            matched: 0,
            fail_on,
            line: Vec::new(),
            lifecycle: None,
            timeline,
            bytes_seen: 0,
        }
    }

    /// Directs stop requests (all expects matched, a fail-on match) to the
    /// lifecycle of the current VM boot.
    pub fn attach(&mut self, lifecycle: Arc<Lifecycle>) {
        self.lifecycle = Some(lifecycle);
    }

    /// Records a named moment.
    pub fn mark(&mut self, what: &str) {
        self.timeline.mark_once(what, self.start);
    }

    /// The timeline so far.
    pub fn timeline(&self) -> &Timeline {
        &self.timeline
    }

    /// Whether the guest has written anything to the console.
    pub fn saw_output(&self) -> bool {
        self.bytes_seen > 0
    }

    /// Takes guest output bytes.
    pub fn observe(&mut self, bytes: &[u8]) {
        if self.bytes_seen == 0 && !bytes.is_empty() {
            self.mark("first serial byte");
        }
        self.bytes_seen += bytes.len() as u64;
        for &byte in bytes {
            match byte {
                b'\n' => {
                    self.check_line();
                    self.line.clear();
                }
                b'\r' => {}
                _ if self.line.len() < MAX_LINE => self.line.push(byte),
                _ => {}
            }
        }
    }

    /// Matches the unfinished line too (prompts end without a newline).
    pub fn check_partial_line(&mut self) {
        if !self.line.is_empty() {
            self.check_line();
        }
    }

    fn check_line(&mut self) {
        let line = String::from_utf8_lossy(&self.line).into_owned();
        if let Some(pattern) = self.fail_on.iter().find(|p| p.is_match(&line)) {
            let pattern = pattern.as_str().to_string();
            self.stop(StopReason::FailPattern { pattern, line });
            return;
        }
        while let Some(pattern) = self.expect.get(self.matched) {
            if !pattern.is_match(&line) {
                break;
            }
            let name = format!("expect '{}' matched", pattern.as_str());
            self.matched += 1;
            self.mark(&name);
            if self.matched == self.expect.len() {
                self.stop(StopReason::Expected);
            }
        }
    }

    fn stop(&self, reason: StopReason) {
        if let Some(lifecycle) = &self.lifecycle {
            lifecycle.stop(reason);
        }
    }

    /// The `--expect` patterns not matched yet.
    pub fn unmatched(&self) -> Vec<&str> {
        self.expect[self.matched..]
            .iter()
            .map(Regex::as_str)
            .collect()
    }
}

/// The console output stream as the UART sees it: writes go to the host
/// side and through the watcher.
pub struct WatchedOutput {
    inner: SharedWriter,
    watcher: Arc<Mutex<ConsoleWatcher>>,
}

impl WatchedOutput {
    /// Sends output to `inner`, showing it to `watcher` first.
    pub fn new(inner: SharedWriter, watcher: Arc<Mutex<ConsoleWatcher>>) -> Self {
        Self { inner, watcher }
    }
}

impl Write for WatchedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.watcher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(buf);
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watcher(expect: &[&str], fail_on: &[&str]) -> (ConsoleWatcher, Arc<Lifecycle>) {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut watcher = ConsoleWatcher::new(
            Instant::now(),
            compile("expect", &strings(expect)).unwrap(),
            compile("fail-on", &strings(fail_on)).unwrap(),
        );
        let lifecycle = Arc::new(Lifecycle::new().unwrap());
        watcher.attach(lifecycle.clone());
        (watcher, lifecycle)
    }

    #[test]
    fn expects_match_in_order() {
        let (mut watcher, lifecycle) = watcher(&["second", "first"], &[]);
        watcher.observe(b"first\r\nsecond\n");
        assert_eq!(watcher.unmatched(), vec!["first"]);
        assert_eq!(lifecycle.reason(), None);
        watcher.observe(b"first again\n");
        assert_eq!(lifecycle.reason(), Some(StopReason::Expected));
    }

    #[test]
    fn one_line_can_satisfy_consecutive_expects() {
        let (mut watcher, lifecycle) = watcher(&["Linux", "version"], &[]);
        watcher.observe(b"Linux version 6.1\n");
        assert_eq!(lifecycle.reason(), Some(StopReason::Expected));
    }

    #[test]
    fn fail_on_wins_and_reports_the_line() {
        let (mut watcher, lifecycle) = watcher(&["never"], &["Kernel panic"]);
        watcher.observe(b"[ 1.0] Kernel panic - not syncing: VFS\n");
        assert_eq!(
            lifecycle.reason(),
            Some(StopReason::FailPattern {
                pattern: "Kernel panic".into(),
                line: "[ 1.0] Kernel panic - not syncing: VFS".into(),
            })
        );
    }

    #[test]
    fn partial_lines_match_on_demand() {
        let (mut watcher, lifecycle) = watcher(&["login: $"], &[]);
        watcher.observe(b"host login: ");
        assert_eq!(lifecycle.reason(), None);
        watcher.check_partial_line();
        assert_eq!(lifecycle.reason(), Some(StopReason::Expected));
    }

    #[test]
    fn timeline_records_first_byte_once() {
        let (mut watcher, _) = watcher(&[], &[]);
        assert!(!watcher.saw_output());
        watcher.observe(b"a");
        watcher.observe(b"b");
        let names: Vec<_> = watcher
            .timeline()
            .events()
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(names, vec!["process start", "first serial byte"]);
        assert!(watcher.saw_output());
        assert!(watcher.timeline().render().contains("first serial byte"));
        let entries = watcher.timeline().entries();
        assert_eq!(entries[1].event, "first serial byte");
        assert!(entries[1].ms >= entries[0].ms);
    }

    #[test]
    fn bad_patterns_name_the_option() {
        let err = compile("expect", &["(".to_string()]).unwrap_err();
        assert!(err.to_string().starts_with("--expect: bad pattern '('"));
        assert_eq!(err.one_line(), "--expect: bad pattern '(': unclosed group");
    }

    #[test]
    fn overlong_lines_are_cut_not_grown() {
        let (mut watcher, _) = watcher(&[], &[]);
        watcher.observe(&vec![b'x'; MAX_LINE * 3]);
        assert_eq!(watcher.line.len(), MAX_LINE);
    }
}
