//! Test helpers for virtio-net: the shared ones (`crate::virtio::testing`:
//! memory, mock queues, chains, an interrupt recorder), frames, and a
//! `SOCK_SEQPACKET` socket pair standing in for a tap (one frame per
//! message, like a tap fd).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use super::header::VNET_HDR_LEN;
pub use crate::virtio::testing::*;

/// `len` bytes of a pattern that differs per `seed` and per position.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i % 251) as u8) | 1)
        .collect()
}

/// A frame: a zero virtio-net header, then `payload`.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0u8; VNET_HDR_LEN];
    bytes.extend_from_slice(payload);
    bytes
}

/// A connected, non-blocking `SOCK_SEQPACKET` pair: (device end, peer).
pub fn socket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    let kind = libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: socketpair fills the two-element array.
    let ret = unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, fds.as_mut_ptr()) };
    assert_eq!(ret, 0, "{}", std::io::Error::last_os_error());
    // SAFETY: both fds are fresh and owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Sends one frame from the peer end.
pub fn send(peer: &OwnedFd, bytes: &[u8]) {
    // SAFETY: `bytes` is valid for reads of its length; the fd is open.
    let n = unsafe { libc::send(peer.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
    assert_eq!(
        n,
        bytes.len() as isize,
        "{}",
        std::io::Error::last_os_error()
    );
}

/// The next frame at the peer end, if one arrives within `wait`.
pub fn receive(peer: &OwnedFd, wait: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + wait;
    let mut buf = vec![0u8; 70_000];
    loop {
        // SAFETY: `buf` is valid for writes of its length; the fd is open.
        let n = unsafe { libc::recv(peer.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 0 {
            buf.truncate(n as usize);
            return Some(buf);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Runs `body` on a thread in a fresh network namespace (needs root and
/// /dev/net/tun; fails with a clear message without them). The namespace
/// and every interface in it vanish when the thread ends.
pub fn in_netns<T: Send + 'static>(body: impl FnOnce() -> T + Send + 'static) -> T {
    assert!(
        std::path::Path::new("/dev/net/tun").exists(),
        "/dev/net/tun is missing: these tests need the tun module"
    );
    let thread = std::thread::spawn(move || {
        // SAFETY: unshare(CLONE_NEWNET) moves only this thread into a new
        // network namespace; no memory is involved.
        let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            ret,
            0,
            "unshare(CLONE_NEWNET) failed: {} (these tests need root)",
            std::io::Error::last_os_error()
        );
        body()
    });
    thread
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// CPU time (user + system, in clock ticks) of this process's thread
/// named `name` (waiting up to 10 s for a new thread to take its name).
pub fn thread_cpu_ticks(name: &str) -> u64 {
    let mut ticks = None;
    wait_until(&format!("a thread named {name}"), || {
        ticks = find_thread_ticks(name);
        ticks.is_some()
    });
    ticks.unwrap_or_default()
}

fn find_thread_ticks(name: &str) -> Option<u64> {
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let path = task.ok()?.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(path.join("stat")).ok()?;
        // Fields after the parenthesised name: state is field 3, utime 14.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split(' ').collect();
        let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        return Some(field(11)? + field(12)?);
    }
    None
}
