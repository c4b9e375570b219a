//! Boot-benchmark helpers (used by `benches/boot.rs`): running one VMM
//! process to completion while measuring its wall time (spawn → exit) and
//! peak RSS (`wait4` rusage of exactly that child), checking that a probe
//! run really succeeded, summarising repeated runs (median, min, max) and
//! printing Markdown tables.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::probe::ProbeReport;

/// Environment variable holding the number of measured runs per case.
pub const RUNS_VAR: &str = "ZVMM_BENCH_RUNS";

/// Measured runs per case when [`RUNS_VAR`] is unset.
pub const DEFAULT_RUNS: usize = 10;

/// Failures running or judging a measured process.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The program could not be started.
    #[error("cannot start {program}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `waitid`/`wait4` on the child failed.
    #[error("cannot wait for {program} (pid {pid})")]
    Wait {
        /// The program.
        program: String,
        /// Its process id.
        pid: u32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The run finished but did not do what it had to.
    #[error("{case}: run {run} failed: {why}\n--- stdout (tail) ---\n{stdout}\n--- stderr (tail) ---\n{stderr}")]
    Failed {
        /// Which case (VMM and configuration).
        case: String,
        /// Run number (0 = first warm-up run).
        run: usize,
        /// What was wrong.
        why: String,
        /// The end of what the process printed on stdout.
        stdout: String,
        /// The end of what it printed on stderr.
        stderr: String,
    },
    /// A scratch file could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The run-count variable is not a positive integer.
    #[error("{RUNS_VAR}={value:?} is not a positive integer; set e.g. {RUNS_VAR}=10")]
    BadRuns {
        /// The value found.
        value: String,
    },
}

/// How a measured process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// It exited with this status code.
    Exited(i32),
    /// A signal (not ours) ended it.
    Signalled(i32),
    /// It was still running at the time limit and we killed it.
    TimedOut,
}

/// One measured run.
#[derive(Debug)]
pub struct Measured {
    /// How it ended.
    pub ending: Ending,
    /// From just before spawn to the moment the child became a zombie.
    pub wall: Duration,
    /// `ru_maxrss` of the child from `wait4`, in KiB.
    pub max_rss_kib: u64,
    /// User plus system CPU time of the child (and its threads).
    pub cpu: Duration,
    /// Everything it wrote to stdout.
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

/// Runs `command` (stdin null, stdout/stderr piped) to completion, killing
/// it (by its pid, while it cannot have been reaped yet) after `limit`.
pub fn measure(mut command: Command, limit: Duration) -> Result<Measured, BenchError> {
    let program = command.get_program().to_string_lossy().into_owned();
    let start = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| BenchError::Spawn {
            program: program.clone(),
            source,
        })?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let waited = wait_with_rusage(&child, limit);
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    let (ending, usage, exited_at) = waited.map_err(|source| BenchError::Wait {
        program,
        pid: child.id(),
        source,
    })?;
    Ok(Measured {
        ending,
        wall: exited_at.duration_since(start),
        max_rss_kib: usage.max_rss_kib,
        cpu: usage.cpu,
        stdout,
        stderr,
    })
}

fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// What `wait4` says a child used.
struct Usage {
    max_rss_kib: u64,
    cpu: Duration,
}

fn timeval(tv: libc::timeval) -> Duration {
    let secs = u64::try_from(tv.tv_sec).unwrap_or(0);
    let micros = u64::try_from(tv.tv_usec).unwrap_or(0);
    Duration::from_secs(secs) + Duration::from_micros(micros)
}

/// Blocks until `child` exits (or is killed at `limit`), then reaps it with
/// `wait4` and returns how it ended, its peak RSS and CPU time and when it exited
/// (as soon as it became a zombie, before any reaping or pipe draining).
///
/// The child is first waited for with `WNOWAIT`, so it stays a zombie (its
/// pid cannot be reused) until the watchdog has been told it is done; the
/// watchdog only ever kills while holding the same lock.
fn wait_with_rusage(child: &Child, limit: Duration) -> std::io::Result<(Ending, Usage, Instant)> {
    let pid = libc::pid_t::try_from(child.id())
        .map_err(|_| std::io::Error::other("child pid out of range"))?;
    let done = Arc::new((Mutex::new(false), Condvar::new()));
    let watchdog = spawn_watchdog(pid, limit, Arc::clone(&done));
    let zombie = wait_exited_no_reap(pid);
    let exited_at = Instant::now();
    {
        let (flag, cond) = &*done;
        *flag.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cond.notify_all();
    }
    let killed = watchdog.join().unwrap_or(false);
    zombie?;
    let (status, rusage) = reap(pid)?;
    let ending = if killed {
        Ending::TimedOut
    } else if libc::WIFEXITED(status) {
        Ending::Exited(libc::WEXITSTATUS(status))
    } else {
        Ending::Signalled(libc::WTERMSIG(status))
    };
    let usage = Usage {
        max_rss_kib: u64::try_from(rusage.ru_maxrss).unwrap_or(0),
        cpu: timeval(rusage.ru_utime) + timeval(rusage.ru_stime),
    };
    Ok((ending, usage, exited_at))
}

/// Kills `pid` once `limit` passes unless `done` is set first; returns
/// whether it killed.
fn spawn_watchdog(
    pid: libc::pid_t,
    limit: Duration,
    done: Arc<(Mutex<bool>, Condvar)>,
) -> JoinHandle<bool> {
    std::thread::spawn(move || {
        let (flag, cond) = &*done;
        let guard = flag.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = cond
            .wait_timeout_while(guard, limit, |done| !*done)
            .unwrap_or_else(|e| e.into_inner());
        if *guard {
            return false;
        }
        // SAFETY: `pid` is our own child and has not been reaped: reaping
        // happens only after `done` is set, which needs the lock we hold.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        true
    })
}

/// `waitid(P_PID, pid, WEXITED | WNOWAIT)`, retried on `EINTR`.
fn wait_exited_no_reap(pid: libc::pid_t) -> std::io::Result<()> {
    let id = libc::id_t::try_from(pid).map_err(|_| std::io::Error::other("negative pid"))?;
    loop {
        // SAFETY: all-zero is a valid `siginfo_t` (plain C data).
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid, writable `siginfo_t`.
        let rc = unsafe { libc::waitid(libc::P_PID, id, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// `wait4(pid)`: the wait status and the child's resource usage.
fn reap(pid: libc::pid_t) -> std::io::Result<(i32, libc::rusage)> {
    let mut status = 0;
    // SAFETY: all-zero is a valid `rusage` (plain C data).
    let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `status` and `rusage` are valid, writable locals.
        let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut rusage) };
        if rc == pid {
            return Ok((status, rusage));
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Checks that a probe run exited with status 0 after printing
/// `probe: done` and that the probe saw `cpus` CPUs, all of them online.
pub fn check_probe_run(
    measured: &Measured,
    cpus: u64,
    case: &str,
    run: usize,
) -> Result<(), BenchError> {
    let report = ProbeReport::parse(&measured.stdout);
    let why = if measured.ending != Ending::Exited(0) {
        Some(format!(
            "ended with {:?}, expected exit status 0",
            measured.ending
        ))
    } else if !report.finished() {
        Some("no 'probe: done' line on the serial console".to_string())
    } else if report.cpus() != Some(cpus) {
        Some(format!(
            "probe saw {:?} CPUs, expected {cpus}",
            report.cpus()
        ))
    } else if report.smp().is_some_and(|(online, of)| online != of) {
        Some(format!("not every AP came online: {:?}", report.smp()))
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(why) => Err(BenchError::Failed {
            case: case.to_string(),
            run,
            why,
            stdout: tail(&measured.stdout, 20),
            stderr: tail(&measured.stderr, 20),
        }),
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs per case: [`RUNS_VAR`] if set, else [`DEFAULT_RUNS`].
pub fn runs_from_env() -> Result<usize, BenchError> {
    match std::env::var(RUNS_VAR) {
        Err(_) => Ok(DEFAULT_RUNS),
        Ok(value) => parse_runs(&value),
    }
}

fn parse_runs(value: &str) -> Result<usize, BenchError> {
    match value.trim().parse::<usize>() {
        Ok(runs) if runs > 0 => Ok(runs),
        _ => Err(BenchError::BadRuns {
            value: value.to_string(),
        }),
    }
}

/// Median, minimum and maximum of a set of samples.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    /// Number of samples.
    pub count: usize,
    /// Median (mean of the two middle samples for an even count).
    pub median: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
}

impl Summary {
    /// Summarises `samples`; `None` when empty.
    pub fn of(samples: &[f64]) -> Option<Self> {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let (&min, &max) = (sorted.first()?, sorted.last()?);
        let mid = sorted.len() / 2;
        let median = if sorted.len() % 2 == 1 {
            sorted[mid]
        } else {
            (sorted[mid - 1] + sorted[mid]) / 2.0
        };
        Some(Self {
            count: sorted.len(),
            median,
            min,
            max,
        })
    }
}

/// A Markdown table with `header` and `rows` (cells are not escaped).
pub fn markdown_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    let rule: Vec<String> = header.iter().map(|_| "---".to_string()).collect();
    let mut table = line(&header) + &line(&rule);
    for row in rows {
        table += &line(row);
    }
    table
}

/// The `main` of a benchmark harness: runs `run` only under `cargo bench`
/// (which passes `--bench`); on failure prints the error chain and exits 1.
pub fn bench_main<E: std::error::Error>(name: &str, run: impl FnOnce() -> Result<(), E>) {
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("{name} bench: not run here; use `cargo bench -p zvmm-tests --bench {name}`");
        return;
    }
    if let Err(err) = run() {
        eprintln!("{name} bench failed: {}", crate::probe::error_chain(&err));
        std::process::exit(1);
    }
}

/// `qemu-system-x86_64 --version`'s first line; a clear error without QEMU.
pub fn qemu_version() -> Result<String, BenchError> {
    let output = Command::new(crate::qemu::QEMU)
        .arg("--version")
        .output()
        .map_err(|source| BenchError::Spawn {
            program: format!(
                "{} (install it: apt-get install -y qemu-system-x86)",
                crate::qemu::QEMU
            ),
            source,
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text.lines().next().unwrap_or("unknown version").to_string())
}

/// Run time of `pid`'s vCPU threads (zvmm `vcpuN`, QEMU `CPU N/KVM`) from
/// `/proc/PID/task/TID/schedstat` (nanoseconds on the CPU).
pub fn vcpu_time(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    let nanos: u64 = tasks
        .flatten()
        .filter(|task| {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            let comm = comm.trim_end();
            comm.starts_with("vcpu") || comm.ends_with("/KVM")
        })
        .filter_map(|task| {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            stat.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum();
    Duration::from_nanos(nanos)
}

/// Host TSC ticks per second: `rdtsc` against `Instant` over 200 ms.
pub fn host_tsc_hz() -> f64 {
    // SAFETY: RDTSC only reads a counter every x86_64 CPU has.
    let rdtsc = || unsafe { core::arch::x86_64::_rdtsc() };
    let (start, first) = (Instant::now(), rdtsc());
    std::thread::sleep(Duration::from_millis(200));
    let last = rdtsc();
    last.wrapping_sub(first) as f64 / start.elapsed().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_takes_the_middle_and_the_extremes() {
        let odd = Summary::of(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!(
            (odd.count, odd.median, odd.min, odd.max),
            (3, 3.0, 1.0, 5.0)
        );
        let even = Summary::of(&[4.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((even.median, even.min, even.max), (3.0, 1.0, 10.0));
        assert_eq!(Summary::of(&[]), None);
    }

    #[test]
    fn runs_must_be_a_positive_integer() {
        assert_eq!(parse_runs(" 12 ").unwrap(), 12);
        assert!(matches!(parse_runs("0"), Err(BenchError::BadRuns { .. })));
        assert!(matches!(parse_runs("ten"), Err(BenchError::BadRuns { .. })));
    }

    #[test]
    fn markdown_table_has_header_rule_and_rows() {
        let table = markdown_table(&["a", "b"], &[vec!["1".into(), "2".into()]]);
        assert_eq!(table, "| a | b |\n| --- | --- |\n| 1 | 2 |\n");
    }

    fn sh(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        command
    }

    #[test]
    fn measure_reports_exit_status_output_and_rss() {
        let m = measure(
            sh("echo out; echo err >&2; exit 3"),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(m.ending, Ending::Exited(3));
        assert_eq!((m.stdout.as_str(), m.stderr.as_str()), ("out\n", "err\n"));
        assert!(m.max_rss_kib > 0, "{m:?}");
        assert!(m.wall < Duration::from_secs(10));
    }

    #[test]
    fn measure_kills_at_the_limit() {
        let m = measure(sh("exec sleep 30"), Duration::from_millis(200)).unwrap();
        assert_eq!(m.ending, Ending::TimedOut);
        assert!(m.wall < Duration::from_secs(10), "{m:?}");
    }

    #[test]
    fn peak_rss_is_the_childs_own() {
        // dd fills a 64 MiB buffer: its peak RSS must show it, while a
        // later small child must not inherit that peak.
        let big = "exec dd if=/dev/zero of=/dev/null bs=64M count=1 status=none";
        let m = measure(sh(big), Duration::from_secs(30)).unwrap();
        assert_eq!(m.ending, Ending::Exited(0), "{m:?}");
        assert!(m.max_rss_kib >= 64 * 1024, "{m:?}");
        let small = measure(sh("exit 0"), Duration::from_secs(10)).unwrap();
        assert!(small.max_rss_kib < 16 * 1024, "{small:?}");
        let busy = measure(
            sh("i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"),
            Duration::from_secs(60),
        )
        .unwrap();
        assert!(busy.cpu >= Duration::from_millis(20), "{busy:?}");
        assert!(
            busy.cpu <= busy.wall + Duration::from_millis(20),
            "{busy:?}"
        );
    }

    fn probe_output(lines: &[&str]) -> Measured {
        Measured {
            ending: Ending::Exited(0),
            wall: Duration::from_millis(1),
            max_rss_kib: 1,
            cpu: Duration::ZERO,
            stdout: lines.iter().map(|l| format!("probe: {l}\n")).collect(),
            stderr: String::new(),
        }
    }

    #[test]
    fn probe_run_needs_status_zero_done_and_all_cpus() {
        let good = ["start", "cpus count=2", "smp online=1 of=1", "done"];
        assert!(check_probe_run(&probe_output(&good), 2, "c", 0).is_ok());
        assert!(check_probe_run(&probe_output(&good), 1, "c", 0).is_err());
        let no_done = probe_output(&good[..3]);
        let err = check_probe_run(&no_done, 2, "case-x", 4).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("case-x: run 4 failed: no 'probe: done'"));
        let lost_ap = ["cpus count=2", "smp online=0 of=1", "done"];
        assert!(check_probe_run(&probe_output(&lost_ap), 2, "c", 0).is_err());
        let mut failed = probe_output(&good);
        failed.ending = Ending::Exited(4);
        assert!(check_probe_run(&failed, 2, "c", 0).is_err());
    }
}
