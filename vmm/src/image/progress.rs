//! A one-line progress display on stderr for commands that can take
//! seconds: shown only when stderr is a terminal, only once the work has
//! run for [`SHOW_AFTER`], redrawn in place with `\r` at most every
//! [`REDRAW_EVERY`], and erased at the end.

use std::io::Write;
use std::time::{Duration, Instant};

use super::human;

/// Work that ends sooner never shows a progress line.
const SHOW_AFTER: Duration = Duration::from_millis(500);
/// Fastest redraw.
const REDRAW_EVERY: Duration = Duration::from_millis(100);

/// The progress of one command over `total` bytes.
#[derive(Debug)]
pub struct Progress {
    label: String,
    total: u64,
    enabled: bool,
    started: Instant,
    drawn: Option<(Instant, usize)>,
}

impl Progress {
    /// Progress over `total` bytes, drawn when stderr is a terminal.
    pub fn new(label: String, total: u64) -> Progress {
        // SAFETY: isatty only inspects descriptor 2.
        let enabled = unsafe { libc::isatty(libc::STDERR_FILENO) } == 1;
        Progress {
            label,
            total,
            enabled,
            started: Instant::now(),
            drawn: None,
        }
    }

    /// `done` bytes of the total are done.
    pub fn update(&mut self, done: u64) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        let elapsed = now - self.started;
        let due = match self.drawn {
            None => elapsed >= SHOW_AFTER,
            Some((at, _)) => now - at >= REDRAW_EVERY,
        };
        if !due {
            return;
        }
        let line = render(&self.label, done, self.total, elapsed);
        let width = self.drawn.map_or(0, |(_, width)| width);
        eprint!("\r{line:<width$}");
        let _ = std::io::stderr().flush();
        self.drawn = Some((now, line.chars().count()));
    }

    /// Erases the line, if one was drawn.
    pub fn finish(&mut self) {
        if let Some((_, width)) = self.drawn.take() {
            eprint!("\r{:width$}\r", "");
            let _ = std::io::stderr().flush();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// `copying a.raw:  42% (430 MiB of 1 GiB, 215.0 MiB/s)`.
fn render(label: &str, done: u64, total: u64, elapsed: Duration) -> String {
    let percent = (done as u128 * 100)
        .checked_div(total as u128)
        .unwrap_or(100)
        .min(100);
    let seconds = elapsed.as_secs_f64();
    let rate = if seconds > 0.0 {
        human((done as f64 / seconds) as u64)
    } else {
        human(0)
    };
    format!(
        "{label}: {percent:>3}% ({} of {}, {rate}/s)",
        human(done),
        human(total)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_names_the_work_and_its_share() {
        let line = render("copying a.raw", 512 << 20, 1 << 30, Duration::from_secs(2));
        assert_eq!(line, "copying a.raw:  50% (512 MiB of 1 GiB, 256 MiB/s)");
    }

    #[test]
    fn empty_work_is_complete() {
        let line = render("x", 0, 0, Duration::ZERO);
        assert!(line.starts_with("x: 100% (0 bytes of 0 bytes"), "{line}");
    }
}
