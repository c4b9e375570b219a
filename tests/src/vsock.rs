//! The host side of the probe's virtio-vsock test (`probe.vsock.*`,
//! `resources/probe/src/vsocktest.rs`): the hybrid handshake on zvmm's
//! Unix socket, the probe's reply pattern, and its per-connection report
//! lines (`probe: vsock conn=...`).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::probe::{fnv1a64, Fields, ProbeReport};

/// Byte `i` of a probe stream seeded `seed` (`vsocktest::pattern`).
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
}

/// The seed of the probe's answer on a connection the host opened: the
/// low byte of the hash of what the host sent.
pub fn listen_seed(sent: &[u8]) -> u8 {
    fnv1a64(sent) as u8
}

/// Waits until `socket` is a socket file (zvmm binds it before the guest
/// runs).
pub fn wait_for_socket(socket: &Path, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if std::fs::symlink_metadata(socket).is_ok_and(|m| m.file_type().is_socket()) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// A connection the host opened through zvmm's socket.
pub struct HostConn {
    /// The stream, blocking, with a read timeout.
    pub stream: UnixStream,
    /// The host port zvmm gave it (`OK <port>`).
    pub host_port: u32,
}

/// Connects to `socket`, sends `CONNECT <port>\n` and reads the answer
/// line, which must be `OK <host port>\n`; `Err` says what came instead.
pub fn handshake(socket: &Path, port: u32, limit: Duration) -> Result<HostConn, String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(limit))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    // Byte by byte: nothing after the line may be consumed here.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') && line.len() < 64 {
        match stream.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => line.push(byte[0]),
            Err(e) => return Err(format!("read after {line:?}: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&line).into_owned();
    let host_port = text
        .strip_prefix("OK ")
        .and_then(|rest| rest.trim_end().parse().ok())
        .ok_or_else(|| format!("answer {text:?}"))?;
    Ok(HostConn { stream, host_port })
}

/// Sends `data` on `conn`, shuts the sending side and reads the answer
/// to its end (the probe answers once it saw the end of the data).
pub fn send_then_read(conn: &mut HostConn, data: &[u8]) -> std::io::Result<Vec<u8>> {
    conn.stream.write_all(data)?;
    conn.stream.shutdown(std::net::Shutdown::Write)?;
    let mut answer = Vec::new();
    conn.stream.read_to_end(&mut answer)?;
    Ok(answer)
}

/// Reads a guest-initiated stream to its end, then answers `reply` and
/// closes it; returns what the guest sent.
pub fn serve_guest(stream: UnixStream, reply: &[u8], limit: Duration) -> std::io::Result<Vec<u8>> {
    stream.set_read_timeout(Some(limit))?;
    let mut reader = BufReader::new(stream);
    let mut got = Vec::new();
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            break;
        }
        got.extend_from_slice(chunk);
        let n = chunk.len();
        reader.consume(n);
    }
    let mut stream = reader.into_inner();
    stream.write_all(reply)?;
    Ok(got)
}

/// One `probe: vsock conn=` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnReport {
    /// `listen` or `connect`.
    pub kind: String,
    /// The guest's port.
    pub local: u32,
    /// The host's port.
    pub peer: u32,
    /// Bytes the probe received, and their hash.
    pub rx_bytes: u64,
    /// FNV-1a of them.
    pub rx_fnv1a64: u64,
    /// Bytes the probe sent.
    pub tx_bytes: u64,
    /// FNV-1a of them.
    pub tx_fnv1a64: u64,
    /// The pattern's seed.
    pub seed: u8,
    /// How it ended (`closed`, `peer_shutdown`, `reset`, `refused`, ...).
    pub end: String,
    /// Data beyond the credit the probe gave.
    pub credit_violations: u64,
}

/// Every `vsock conn=` line with `kind=` (the end-of-connection lines).
pub fn conn_reports(report: &ProbeReport) -> Vec<ConnReport> {
    report
        .values("vsock conn=")
        .into_iter()
        .map(|rest| Fields::parse(&format!("conn={rest}")))
        .filter(|f| f.get("kind").is_some())
        .map(|f| {
            let num = |key: &str| f.num(key).unwrap_or(u64::MAX);
            let text = |key: &str| f.get(key).unwrap_or_default().to_string();
            ConnReport {
                kind: text("kind"),
                local: num("local") as u32,
                peer: num("peer") as u32,
                rx_bytes: num("rx_bytes"),
                rx_fnv1a64: num("rx_fnv1a64"),
                tx_bytes: num("tx_bytes"),
                tx_fnv1a64: num("tx_fnv1a64"),
                seed: num("seed") as u8,
                end: text("end"),
                credit_violations: num("credit_violations"),
            }
        })
        .collect()
}

/// The report of the connection on host port `peer`.
pub fn conn_by_peer(report: &ProbeReport, peer: u32) -> Option<ConnReport> {
    conn_reports(report).into_iter().find(|c| c.peer == peer)
}
