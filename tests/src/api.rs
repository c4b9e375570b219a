//! A minimal HTTP/1.1 client for zvmm's REST API on a Unix socket, as a
//! host agent speaks it (one request per connection, `Connection: close`),
//! plus starting `zvmm --api-socket` and waiting until it answers, and the
//! probe guest's VM configuration in cloud-hypervisor's JSON shape. Also
//! the `/proc` readings the soak test and the API benchmark use.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::probe::{probe_elf, Flavour};
use crate::zvmm::{spawn_zvmm, Running};

/// How long one request may take before the client gives up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One HTTP answer.
#[derive(Debug)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Body (de-chunked).
    pub body: String,
}

impl Answer {
    /// The body as JSON; panics unless the status is 200 and it parses.
    pub fn json(&self) -> serde_json::Value {
        assert_eq!(self.status, 200, "{self:?}");
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }
}

/// Sends one request on a new connection and reads the whole answer.
pub fn try_request(
    socket: &Path,
    method: &str,
    endpoint: &str,
    body: &str,
) -> std::io::Result<Answer> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let head = format!(
        "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_answer(&String::from_utf8_lossy(&raw))
        .ok_or_else(|| std::io::Error::other(format!("malformed HTTP answer {raw:?}")))
}

/// [`try_request`], panicking on a transport error (test helper).
pub fn request(socket: &Path, method: &str, endpoint: &str, body: &str) -> Answer {
    try_request(socket, method, endpoint, body)
        .unwrap_or_else(|e| panic!("{method} {endpoint} on {}: {e}", socket.display()))
}

/// `GET /api/v1/ENDPOINT`.
pub fn get(socket: &Path, endpoint: &str) -> Answer {
    request(socket, "GET", endpoint, "")
}

/// `PUT /api/v1/ENDPOINT` with `body`.
pub fn put(socket: &Path, endpoint: &str, body: &str) -> Answer {
    request(socket, "PUT", endpoint, body)
}

fn parse_answer(raw: &str) -> Option<Answer> {
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Some(Answer { status, body })
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// zvmm serving the API on `socket` (plus `extra` options), once it
/// answers a connection.
pub fn start_api(socket: &Path, extra: &[&str]) -> Running {
    let mut args = vec![
        "--api-socket".to_string(),
        format!("path={}", socket.display()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut zvmm = spawn_zvmm(args);
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(socket).is_err() {
        if let Some(status) = zvmm.try_status() {
            panic!("zvmm exited with {status}: {}", zvmm.stderr.text());
        }
        assert!(Instant::now() < deadline, "the API socket never answered");
        std::thread::sleep(Duration::from_millis(5));
    }
    zvmm
}

/// A probe VM for `vm.create`.
#[derive(Clone, Debug)]
pub struct ProbeVm {
    /// vCPUs.
    pub cpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Back RAM with a memfd (`shared=on`).
    pub shared: bool,
    /// Extra kernel command-line words (e.g. `probe.action=hang`).
    pub cmdline: String,
    /// Serial output file (`None`: a pty).
    pub serial_file: Option<PathBuf>,
    /// Writable disk images.
    pub disks: Vec<PathBuf>,
}

impl ProbeVm {
    /// A 1-vCPU, 64 MiB probe with `cmdline` appended to `console=ttyS0`.
    pub fn new(cmdline: &str) -> Self {
        Self {
            cpus: 1,
            memory_mib: 64,
            shared: false,
            cmdline: cmdline.to_string(),
            serial_file: None,
            disks: Vec::new(),
        }
    }

    /// The configuration as `vm.create` takes it.
    pub fn json(&self) -> String {
        let serial = match &self.serial_file {
            Some(path) => serde_json::json!({"mode": "File", "file": path}),
            None => serde_json::json!({"mode": "Pty"}),
        };
        let disks: Vec<_> = self
            .disks
            .iter()
            .map(|path| serde_json::json!({"path": path}))
            .collect();
        serde_json::json!({
            "cpus": {"boot_vcpus": self.cpus, "max_vcpus": self.cpus},
            "memory": {"size": self.memory_mib << 20, "shared": self.shared},
            "payload": {
                "kernel": probe_elf(Flavour::Pvh),
                "cmdline": format!("console=ttyS0 {}", self.cmdline),
            },
            "serial": serial,
            "console": {"mode": "Off"},
            "disks": disks,
        })
        .to_string()
    }
}

/// Number of open file descriptors of process `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("cannot list /proc/{pid}/fd: {e}"))
        .count()
}

/// What each open file descriptor of `pid` points at, sorted.
pub fn fd_targets(pid: u32) -> Vec<String> {
    let mut targets: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .map(|entry| {
                    std::fs::read_link(entry.path())
                        .map(|t| t.display().to_string())
                        .unwrap_or_else(|_| "?".into())
                })
                .collect()
        })
        .unwrap_or_default();
    targets.sort();
    targets
}

/// Resident set size of process `pid` in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// CPU time (user + system, all threads, exited ones included) process
/// `pid` has used so far, in nanoseconds: the kernel's per-process CPU
/// clock (`clock_getcpuclockid`), unlike `/proc/PID/stat`'s 10 ms ticks.
/// `None` once the process is gone.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    let mut clock: libc::clockid_t = 0;
    // SAFETY: writes one clockid_t into `clock`, which lives on our stack.
    if unsafe { libc::clock_getcpuclockid(pid, &mut clock) } != 0 {
        return None;
    }
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec into `now`, which lives on our stack.
    if unsafe { libc::clock_gettime(clock, &mut now) } != 0 {
        return None;
    }
    let secs = u64::try_from(now.tv_sec).ok()?;
    let nanos = u32::try_from(now.tv_nsec).ok()?;
    Some(Duration::new(secs, nanos))
}

/// Processes whose command line mentions `needle` (e.g. a test's unique
/// scratch directory), zombies excluded.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            !cmdline.is_empty() && String::from_utf8_lossy(&cmdline).contains(needle)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_parsed_plain_and_chunked() {
        let plain = parse_answer("HTTP/1.1 204 No Content\r\nServer: x\r\n\r\n").unwrap();
        assert_eq!((plain.status, plain.body.as_str()), (204, ""));
        let chunked = parse_answer(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((chunked.status, chunked.body.as_str()), (200, "abcde"));
        assert!(parse_answer("garbage").is_none());
    }

    #[test]
    fn proc_readings_of_this_process() {
        let me = std::process::id();
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let target = format!("/proc/{me}/status");
        assert!(fd_targets(me).contains(&target), "{:?}", fd_targets(me));
        assert!(fd_count(me) >= 4);
        drop(file);
        assert!(rss_kib(me) > 0);
        let spent = cpu_time(me).unwrap();
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(5) {
            std::hint::black_box(0u64);
        }
        assert!(cpu_time(me).unwrap() > spent);
        assert!(processes_mentioning("no-such-process-name-zvmm-xyzzy").is_empty());
    }
}
