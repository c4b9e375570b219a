//! Playing cloud-hypervisor's host agents against zvmm: an HTTP/1.1
//! client that keeps its connection open between requests and can attach
//! file descriptors with SCM_RIGHTS (Kata's `vm.add-net`), a transcript of
//! every exchange, and the check of every JSON answer against
//! cloud-hypervisor's OpenAPI spec (`../shared/ch-api/cloud-hypervisor.yaml`,
//! read in place) with PyPI's `openapi-schema-validator`, which
//! `resources/install-host-deps.sh` installs into `target/ch-api-venv`.
//! Also `zvmm` as `cloud-hypervisor` (a symlink), a virtiofsd started the
//! way the agents start it, and a tap opened the way Kata opens it.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::net::NetNs;
use crate::zvmm::{workspace_root, zvmm_bin};

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// One request and its answer.
#[derive(Clone, Debug)]
pub struct Exchange {
    /// `GET` or `PUT`.
    pub method: String,
    /// The endpoint after `/api/v1/`.
    pub endpoint: String,
    /// The request body.
    pub request: String,
    /// Descriptors sent with the request.
    pub fds: usize,
    /// Status code.
    pub status: u16,
    /// The `Content-Type` header, if any.
    pub content_type: Option<String>,
    /// The answer's body.
    pub body: String,
}

impl Exchange {
    /// The body as JSON (panics unless it parses).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }

    /// One transcript line: request, then answer.
    pub fn line(&self) -> String {
        let fds = if self.fds > 0 {
            format!(" [+{} fd]", self.fds)
        } else {
            String::new()
        };
        format!(
            "{} /api/v1/{}{fds} {} -> {} {}",
            self.method, self.endpoint, self.request, self.status, self.body
        )
    }
}

/// A client connection kept open between requests, as Go's HTTP client
/// keeps it.
pub struct KeepAlive {
    stream: UnixStream,
    pending: Vec<u8>,
}

impl KeepAlive {
    /// Connects to the API socket.
    pub fn connect(socket: &Path) -> std::io::Result<Self> {
        let stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        Ok(Self {
            stream,
            pending: Vec::new(),
        })
    }

    /// Sends one request with `fds` attached to its bytes and reads the
    /// answer; the connection stays open.
    pub fn request(
        &mut self,
        method: &str,
        endpoint: &str,
        body: &str,
        fds: &[RawFd],
    ) -> std::io::Result<Exchange> {
        let head = format!(
            "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\n\
             Accept: application/json\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        );
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body.as_bytes());
        send_with_fds(&self.stream, &bytes, fds)?;
        let (status, content_type, answer) = self.read_answer()?;
        Ok(Exchange {
            method: method.into(),
            endpoint: endpoint.into(),
            request: body.into(),
            fds: fds.len(),
            status,
            content_type,
            body: answer,
        })
    }

    fn read_answer(&mut self) -> std::io::Result<(u16, Option<String>, String)> {
        let head_end = loop {
            if let Some(at) = find(&self.pending, b"\r\n\r\n") {
                break at + 4;
            }
            self.fill()?;
        };
        let head: Vec<u8> = self.pending.drain(..head_end).collect();
        let head = String::from_utf8_lossy(&head).into_owned();
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line: {head:?}")))?;
        let header = |name: &str| {
            head.lines().skip(1).find_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.eq_ignore_ascii_case(name)
                    .then(|| value.trim().to_string())
            })
        };
        let length: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while self.pending.len() < length {
            self.fill()?;
        }
        let body: Vec<u8> = self.pending.drain(..length).collect();
        Ok((
            status,
            header("content-type"),
            String::from_utf8_lossy(&body).into_owned(),
        ))
    }

    fn fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 8192];
        let n = self.stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        self.pending.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Writes `bytes` with `fds` as SCM_RIGHTS on the first `sendmsg`, as Go's
/// `WriteMsgUnix` does.
fn send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    if fds.is_empty() {
        return (&*stream).write_all(bytes);
    }
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of_val(fds) as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: all-zero is a valid msghdr; the fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points at `control`, which has room for one cmsghdr
    // with `fds.len()` descriptors (CMSG_SPACE above).
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
    }
    // SAFETY: `msg` and everything it points at are valid for the call.
    let sent = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    (&*stream).write_all(&bytes[sent as usize..])
}

/// Polls `vmm.ping` on fresh connections every 10 ms (as Kata does) until
/// it answers 200; the successful exchange.
pub fn wait_for_ping(socket: &Path, limit: Duration) -> Exchange {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(mut client) = KeepAlive::connect(socket) {
            if let Ok(answer) = client.request("GET", "vmm.ping", "", &[]) {
                if answer.status == 200 {
                    return answer;
                }
            }
        }
        assert!(Instant::now() < deadline, "vmm.ping never answered 200");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The schema an endpoint's 200 answer has in the spec.
fn schema_of(endpoint: &str) -> Option<&'static str> {
    match endpoint {
        "vmm.ping" => Some("VmmPingResponse"),
        "vm.info" => Some("VmInfo"),
        "vm.counters" => Some("VmCounters"),
        _ => None,
    }
}

/// cloud-hypervisor's OpenAPI spec, beside the repository.
pub fn spec_path() -> PathBuf {
    workspace_root().join("../shared/ch-api/cloud-hypervisor.yaml")
}

/// The Python with `openapi-schema-validator` and PyYAML.
fn python() -> PathBuf {
    let venv = workspace_root().join("target/ch-api-venv/bin/python3");
    if venv.is_file() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// Reads `{"label", "schema", "instance"}` lines; prints one line per
/// violation; exits 1 if there was any.
const VALIDATOR: &str = r##"
import json, sys, yaml
from openapi_schema_validator import OAS30Validator
spec = yaml.safe_load(open(sys.argv[1]))
failures = 0
for line in sys.stdin:
    item = json.loads(line)
    schema = {"$ref": "#/components/schemas/" + item["schema"], "components": spec["components"]}
    for error in sorted(OAS30Validator(schema).iter_errors(item["instance"]), key=str):
        failures += 1
        path = "/".join(map(str, error.absolute_path))
        print(f"{item['label']}: {item['schema']} at /{path}: {error.message}")
sys.exit(1 if failures else 0)
"##;

/// Checks every answer: a body comes with `Content-Type:
/// application/json` and parses as JSON; a 200 answer of an endpoint with
/// a schema validates against it (the request bodies of `schemas` too:
/// `(index, schema)` pairs). Returns the problems, one per line.
pub fn check_answers(exchanges: &[Exchange], requests: &[(usize, &str)]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut items = Vec::new();
    for (index, exchange) in exchanges.iter().enumerate() {
        let label = format!("#{index} {} {}", exchange.method, exchange.endpoint);
        if exchange.body.is_empty() {
            continue;
        }
        if exchange.content_type.as_deref() != Some("application/json") {
            problems.push(format!("{label}: Content-Type {:?}", exchange.content_type));
        }
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&exchange.body) else {
            problems.push(format!("{label}: body is not JSON: {}", exchange.body));
            continue;
        };
        if let (200, Some(schema)) = (exchange.status, schema_of(&exchange.endpoint)) {
            items.push(serde_json::json!({"label": label, "schema": schema, "instance": value}));
        }
    }
    for (index, schema) in requests {
        let exchange = &exchanges[*index];
        let label = format!("#{index} request {}", exchange.endpoint);
        let value: serde_json::Value = serde_json::from_str(&exchange.request).unwrap_or_default();
        items.push(serde_json::json!({"label": label, "schema": schema, "instance": value}));
    }
    problems.extend(validate(&items));
    problems
}

/// Runs the validator over `items`.
fn validate(items: &[serde_json::Value]) -> Vec<String> {
    let spawned = Command::new(python())
        .arg("-c")
        .arg(VALIDATOR)
        .arg(spec_path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => return vec![format!("cannot run {}: {e}", python().display())],
    };
    let input: String = items.iter().map(|item| format!("{item}\n")).collect();
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input.as_bytes());
    }
    let output = child.wait_with_output().expect("the validator runs");
    let mut problems: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    if !output.status.success() && problems.is_empty() {
        problems.push(format!(
            "the schema validator failed (run resources/install-host-deps.sh): {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    problems
}

/// `dir/cloud-hypervisor`, a symlink to the zvmm binary; returns `dir`.
pub fn cloud_hypervisor_link(dir: &Path) -> PathBuf {
    let link = dir.join("cloud-hypervisor");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(zvmm_bin(), &link).expect("symlink cloud-hypervisor");
    dir.to_path_buf()
}

/// A virtiofsd started as the agents start it, killed (with its process
/// group) on drop.
pub struct AgentVirtiofsd {
    child: Child,
}

impl AgentVirtiofsd {
    /// `virtiofsd ARGS --socket-path SOCKET --shared-dir DIR`, once the
    /// socket listens.
    pub fn start(args: &[&str], socket: &Path, shared: &Path) -> Self {
        use std::os::unix::process::CommandExt;
        let bin = crate::fs::virtiofsd_bin().expect("virtiofsd (resources/install-host-deps.sh)");
        let child = Command::new(bin)
            .args(args)
            .arg("--socket-path")
            .arg(socket)
            .arg("--shared-dir")
            .arg(shared)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start virtiofsd");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !crate::fs::socket_listening(socket) {
            assert!(Instant::now() < deadline, "virtiofsd never listened");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child }
    }
}

impl Drop for AgentVirtiofsd {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let group = -(self.child.id() as libc::pid_t);
            // SAFETY: kill(2) on our child's own process group.
            unsafe { libc::kill(group, libc::SIGKILL) };
        }
        let _ = self.child.wait();
    }
}

/// Opens tap `name` of `ns` as Kata does (IFF_TAP | IFF_NO_PI |
/// IFF_VNET_HDR), from a thread inside the namespace.
pub fn open_tap_in(ns: &NetNs, name: &str) -> OwnedFd {
    let path = format!("/run/netns/{}", ns.name());
    let name = name.to_string();
    std::thread::spawn(move || {
        let netns = std::fs::File::open(&path).expect("the namespace file");
        // SAFETY: setns on a namespace file we hold; affects this thread only.
        let entered = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(entered, 0, "setns {path}");
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .expect("/dev/net/tun");
        // SAFETY: all-zero is a valid ifreq.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in request.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: TUNSETIFF reads and writes the ifreq we pass.
        let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut request) };
        assert_eq!(
            rc,
            0,
            "TUNSETIFF {name}: {}",
            std::io::Error::last_os_error()
        );
        OwnedFd::from(tun)
    })
    .join()
    .expect("opening the tap")
}

/// The names of `pid`'s threads (`/proc/PID/task/*/comm`), sorted.
pub fn thread_names(pid: u32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
                .map(|comm| comm.trim().to_string())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// `/proc/PID/cmdline` as arguments.
pub fn process_argv(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    raw.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transcript_lines_show_request_and_answer() {
        let exchange = Exchange {
            method: "PUT".into(),
            endpoint: "vm.add-net".into(),
            request: "{}".into(),
            fds: 1,
            status: 204,
            content_type: None,
            body: String::new(),
        };
        assert_eq!(exchange.line(), "PUT /api/v1/vm.add-net [+1 fd] {} -> 204 ");
    }

    #[test]
    fn the_validator_catches_nulls_and_missing_types() {
        let bad = |body: &str| Exchange {
            method: "GET".into(),
            endpoint: "vm.info".into(),
            request: String::new(),
            fds: 0,
            status: 200,
            content_type: Some("application/json".into()),
            body: body.into(),
        };
        let null_file = bad(
            r#"{"state":"Created","config":{"payload":{},"console":{"mode":"Off","file":null}}}"#,
        );
        let problems = check_answers(&[null_file], &[]);
        assert!(
            problems.iter().any(|p| p.contains("console/file")),
            "{problems:?}"
        );
        let good = bad(r#"{"state":"Created","config":{"payload":{"kernel":"/k"}}}"#);
        assert_eq!(check_answers(&[good], &[]), Vec::<String>::new());
        let mut untyped = bad(r#"{"error":"x"}"#);
        untyped.status = 500;
        untyped.content_type = None;
        let problems = check_answers(&[untyped], &[]);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("Content-Type"), "{problems:?}");
    }
}
