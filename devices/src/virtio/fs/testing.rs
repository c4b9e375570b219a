//! Test helpers for virtio-fs: memfd-backed guest memory, a real virtiofsd
//! in a temporary directory, and FUSE_INIT requests on mock queues.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempdir::TempDir;

use super::config::BackendLostCallback;
use crate::virtio::GuestMemory;

/// Guest memory backed by one memfd, `(guest address, length)` per region,
/// consecutive in the file.
pub fn shared_memory(ranges: &[(u64, usize)]) -> GuestMemory {
    let name = CString::new("zvmm-fs-test").unwrap();
    // SAFETY: `name` is a valid NUL-terminated string; the flags are valid.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = Arc::new(unsafe { File::from_raw_fd(fd) });
    let total: usize = ranges.iter().map(|(_, len)| len).sum();
    file.set_len(total as u64).unwrap();
    let mut offset = 0u64;
    let regions: Vec<_> = ranges
        .iter()
        .map(|&(start, len)| {
            let backing = FileOffset::from_arc(file.clone(), offset);
            offset += len as u64;
            (GuestAddress(start), len, Some(backing))
        })
        .collect();
    GuestMemoryMmap::from_ranges_with_files(regions).unwrap()
}

/// 4 MiB of shared guest memory at 0.
pub fn memory() -> GuestMemory {
    shared_memory(&[(0, 0x40_0000)])
}

/// The virtiofsd binary (PATH, then ~/.cargo/bin); fails the test with
/// how to install it when there is none.
pub fn virtiofsd_binary() -> PathBuf {
    let home_bin = std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo/bin"));
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(home_bin)
        .map(|dir| dir.join("virtiofsd"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "virtiofsd is not installed; install it with \
                 `apt-get install -y libseccomp-dev libcap-ng-dev && cargo install virtiofsd --locked`"
            )
        })
}

/// A virtiofsd serving a temporary directory (killed on drop).
pub struct Daemon {
    child: Child,
    /// Keeps the directory of the socket and the shared directory.
    _dir: TempDir,
    /// The vhost-user socket.
    pub socket: PathBuf,
}

impl Daemon {
    /// Starts virtiofsd and waits until its socket is listening.
    pub fn start() -> Daemon {
        let dir = TempDir::new_with_prefix("/tmp/zvmm-fs-").unwrap();
        let shared = dir.as_path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::write(shared.join("hello.txt"), b"hello\n").unwrap();
        let socket = dir.as_path().join("fs.sock");
        let child = Command::new(virtiofsd_binary())
            .arg("--socket-path")
            .arg(&socket)
            .arg("--shared-dir")
            .arg(&shared)
            .args(["--sandbox", "none", "--log-level", "error"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut daemon = Daemon {
            child,
            _dir: dir,
            socket,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !listening(&daemon.socket) {
            if let Some(status) = daemon.child.try_wait().unwrap() {
                panic!("virtiofsd exited at start: {status}");
            }
            assert!(Instant::now() < deadline, "virtiofsd made no socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        daemon
    }

    /// Kills the daemon (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the daemon is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits up to `limit` for the daemon to exit by itself.
    pub fn exited_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if !self.running() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a Unix socket bound at `path` is listening (`/proc/net/unix`:
/// flag `__SO_ACCEPTCON`), found without connecting: virtiofsd serves
/// the first connection only.
pub fn listening(path: &Path) -> bool {
    const ACCEPTCON: u32 = 1 << 16;
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let path = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let flags = fields
            .get(3)
            .and_then(|f| u32::from_str_radix(f, 16).ok())
            .unwrap_or(0);
        fields.get(7) == Some(&path.as_ref()) && flags & ACCEPTCON != 0
    })
}

/// A loss callback and the channel its messages arrive on.
pub fn loss_channel() -> (BackendLostCallback, mpsc::Receiver<String>) {
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let callback: BackendLostCallback = Arc::new(move |message| {
        let _ = tx.lock().unwrap().send(message);
    });
    (callback, rx)
}

/// FUSE opcode of INIT.
pub const FUSE_INIT: u32 = 26;
/// Bytes of `fuse_in_header`.
const IN_HEADER: u32 = 40;
/// Bytes of `fuse_init_in` without the INIT_EXT extension.
const INIT_IN: u32 = 16;
/// Room for `fuse_out_header` and `fuse_init_out`.
pub const REPLY_LEN: u32 = 256;

/// What virtiofsd answered to a FUSE_INIT.
#[derive(Debug, PartialEq, Eq)]
pub struct InitReply {
    /// `fuse_out_header.len`.
    pub len: u32,
    /// `fuse_out_header.error` (0 or -errno).
    pub error: i32,
    /// `fuse_out_header.unique`.
    pub unique: u64,
    /// `fuse_init_out.major`.
    pub major: u32,
}

/// Puts a FUSE_INIT (protocol 7.31) at `request` with room for the reply
/// at `reply`, as the chain at descriptor `first` of `vq`.
pub fn queue_init(
    vq: &MockSplitQueue<'_, GuestMemory>,
    mem: &GuestMemory,
    (request, reply): (u64, u64),
    first: u16,
    unique: u64,
) {
    let mut bytes = Vec::new();
    bytes.extend((IN_HEADER + INIT_IN).to_le_bytes());
    bytes.extend(FUSE_INIT.to_le_bytes());
    bytes.extend(unique.to_le_bytes());
    bytes.extend(0u64.to_le_bytes()); // nodeid
    bytes.extend([0u8; 16]); // uid, gid, pid, total_extlen, padding
    bytes.extend(7u32.to_le_bytes()); // major
    bytes.extend(31u32.to_le_bytes()); // minor
    bytes.extend(0x2_0000u32.to_le_bytes()); // max_readahead
    bytes.extend(0u32.to_le_bytes()); // flags
    mem.write_slice(&bytes, GuestAddress(request)).unwrap();
    let next = VRING_DESC_F_NEXT as u16;
    let write = VRING_DESC_F_WRITE as u16;
    let descs = [
        SplitDescriptor::new(request, IN_HEADER + INIT_IN, next, first + 1),
        SplitDescriptor::new(reply, REPLY_LEN, write, 0),
    ];
    let raw: Vec<RawDescriptor> = descs.into_iter().map(RawDescriptor::from).collect();
    vq.add_desc_chains(&raw, first).unwrap();
}

/// Reads the FUSE_INIT reply at `reply`.
pub fn init_reply(mem: &GuestMemory, reply: u64) -> InitReply {
    let mut bytes = [0u8; 20];
    mem.read_slice(&mut bytes, GuestAddress(reply)).unwrap();
    let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    InitReply {
        len: word(0),
        error: word(4) as i32,
        unique: u64::from_le_bytes(bytes[8..16].try_into().unwrap()),
        major: word(16),
    }
}

/// Waits up to 10 s for the used index of `vq` to reach `used`.
pub fn wait_used(vq: &MockSplitQueue<'_, GuestMemory>, used: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while vq.used().idx().load() != used {
        assert!(
            Instant::now() < deadline,
            "used index stuck at {}",
            vq.used().idx().load()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A scripted vhost-user peer answering the handshake with the given
/// virtio features, protocol features and queue count, then holding the
/// connection until the frontend closes it.
pub struct FakeBackend {
    _dir: TempDir,
    /// Its socket.
    pub socket: PathBuf,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeBackend {
    /// Listens and serves one connection.
    pub fn start(features: u64, protocol_features: u64, queue_num: u64) -> FakeBackend {
        let dir = TempDir::new_with_prefix("/tmp/zvmm-fs-").unwrap();
        let socket = dir.as_path().join("fake.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let thread = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            serve_handshake(&stream, [features, protocol_features, queue_num]);
        });
        FakeBackend {
            _dir: dir,
            socket,
            thread: Some(thread),
        }
    }
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

/// Answers GET_FEATURES, GET_PROTOCOL_FEATURES and GET_QUEUE_NUM with
/// `answers` (other requests get no reply) until the peer hangs up.
fn serve_handshake(mut stream: &std::os::unix::net::UnixStream, answers: [u64; 3]) {
    use std::io::{Read, Write};
    const VERSION_AND_REPLY: u32 = 0x1 | 0x4;
    loop {
        let mut header = [0u8; 12];
        if stream.read_exact(&mut header).is_err() {
            return;
        }
        let word = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().unwrap());
        let (request, size) = (word(0), word(8));
        let mut body = vec![0u8; size as usize];
        if stream.read_exact(&mut body).is_err() {
            return;
        }
        let answer = match request {
            1 => answers[0],  // GET_FEATURES
            15 => answers[1], // GET_PROTOCOL_FEATURES
            17 => answers[2], // GET_QUEUE_NUM
            _ => continue,
        };
        let mut reply = Vec::new();
        reply.extend(request.to_le_bytes());
        reply.extend(VERSION_AND_REPLY.to_le_bytes());
        reply.extend(8u32.to_le_bytes());
        reply.extend(answer.to_le_bytes());
        if stream.write_all(&reply).is_err() {
            return;
        }
    }
}
