//! The virtio-rng device (type 4, virtio 1.2 §5.4): one request queue, no
//! configuration space and no device-specific features; its entropy
//! source, counters and the life cycle of its worker.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::worker::Worker;
use crate::virtio::{ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1};

/// Virtio device ID of an entropy device.
pub const RNG_DEVICE_TYPE: u32 = VIRTIO_ID_RNG;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes written into one request (Linux asks for 64 at a time).
pub const MAX_REQUEST_BYTES: u32 = 64 << 10;

/// How to build an entropy device.
#[derive(Clone, Debug)]
pub struct RngConfig {
    /// The device's name (thread `rng-<id>`).
    pub id: String,
    /// Where the entropy comes from: a character device such as
    /// `/dev/urandom`, a FIFO or a regular file.
    pub source: PathBuf,
}

/// The entropy source cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// Nothing at the path.
    #[error("no such file")]
    Missing,
    /// The path names something that cannot be read as a byte stream.
    #[error("is a {kind}; give a character device (e.g. /dev/urandom), a FIFO or a regular file")]
    WrongType {
        /// What it is.
        kind: &'static str,
    },
    /// Opening or inspecting it failed.
    #[error("cannot open it")]
    Open(#[source] io::Error),
}

/// What the device did, for `vm.counters`.
#[derive(Debug, Default)]
pub struct RngCounters {
    /// Requests answered with entropy.
    pub requests: AtomicU64,
    /// Bytes written into guest buffers.
    pub bytes: AtomicU64,
    /// Chains returned empty: out of spec (device-readable or no buffer,
    /// a loop, a buffer outside guest memory).
    pub invalid_requests: AtomicU64,
    /// Reads of the source that failed.
    pub source_errors: AtomicU64,
    /// Reads that found the source at its end.
    pub source_ends: AtomicU64,
}

impl RngCounters {
    /// The counters as (name, value) pairs.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("requests", get(&self.requests)),
            ("bytes", get(&self.bytes)),
            ("invalid_requests", get(&self.invalid_requests)),
            ("source_errors", get(&self.source_errors)),
            ("source_ends", get(&self.source_ends)),
        ]
    }
}

/// Adds `by` to `counter`.
pub(super) fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

struct Running {
    stop: EventFd,
    thread: JoinHandle<EventFd>,
}

/// A virtio-rng device.
pub struct Rng {
    id: String,
    source: File,
    acked_features: u64,
    counters: Arc<RngCounters>,
    running: Option<Running>,
}

impl Rng {
    /// Opens and checks the source.
    pub fn new(config: RngConfig) -> Result<Rng, RngError> {
        Ok(Rng {
            id: config.id,
            source: open_source(&config.source)?,
            acked_features: 0,
            counters: Arc::default(),
            running: None,
        })
    }

    /// The device's name.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn stop_worker(&mut self) -> Vec<EventFd> {
        let Some(running) = self.running.take() else {
            return Vec::new();
        };
        // If the write fails the thread is gone already; join reports it.
        let _ = running.stop.write(1);
        match running.thread.join() {
            Ok(queue_evt) => vec![queue_evt],
            Err(_) => Vec::new(),
        }
    }
}

/// Opens `path` for non-blocking reads and checks what it is.
fn open_source(path: &std::path::Path) -> Result<File, RngError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => RngError::Missing,
            _ => RngError::Open(e),
        })?;
    let kind = file.metadata().map_err(RngError::Open)?.file_type();
    let wrong = |kind| Err(RngError::WrongType { kind });
    if kind.is_dir() {
        wrong("directory")
    } else if kind.is_block_device() {
        wrong("block device")
    } else if kind.is_socket() {
        wrong("socket")
    } else if kind.is_char_device() || kind.is_fifo() || kind.is_file() {
        Ok(file)
    } else {
        wrong("special file")
    }
}

impl Drop for Rng {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        RNG_DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.device_features();
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, context: ActivateContext) -> Result<(), ActivateError> {
        self.stop_worker();
        let ActivateContext {
            mem,
            interrupt,
            queues,
        } = context;
        crate::virtio::check_queues("virtio-rng", &queues, &mem)?;
        let count = queues.len();
        let Some((index, queue, queue_evt)) = queues.into_iter().next().filter(|_| count == 1)
        else {
            return Err(ActivateError::BadQueue(format!(
                "virtio-rng has 1 queue, the driver enabled {count}"
            )));
        };
        let stop = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::Backend)?;
        let worker = Worker {
            queue,
            index,
            queue_evt,
            stop_evt: stop.try_clone().map_err(ActivateError::Backend)?,
            mem,
            interrupt,
            source: self.source.try_clone().map_err(ActivateError::Backend)?,
            counters: self.counters.clone(),
        };
        let thread = worker
            .spawn(format!("rng-{}", self.id))
            .map_err(ActivateError::Backend)?;
        self.running = Some(Running { stop, thread });
        Ok(())
    }

    fn reset(&mut self) -> Vec<EventFd> {
        self.acked_features = 0;
        self.stop_worker()
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.counters.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(source: &str) -> RngConfig {
        RngConfig {
            id: "_rng".into(),
            source: source.into(),
        }
    }

    #[test]
    fn urandom_fifos_and_files_are_accepted() {
        assert!(Rng::new(config("/dev/urandom")).is_ok());
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/zvmm-rng-").unwrap();
        let file = dir.as_path().join("seed");
        std::fs::write(&file, b"0123").unwrap();
        assert!(Rng::new(config(file.to_str().unwrap())).is_ok());
        let fifo = dir.as_path().join("fifo");
        let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path and touches no memory of ours.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        assert!(Rng::new(config(fifo.to_str().unwrap())).is_ok());
    }

    #[test]
    fn unusable_sources_are_refused_by_what_they_are() {
        let err = |path: &str| Rng::new(config(path)).err().unwrap().to_string();
        assert_eq!(err("/nonexistent/zvmm-rng"), "no such file");
        assert!(err("/tmp").starts_with("is a directory; give a character device"));
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/zvmm-rng-").unwrap();
        let socket = dir.as_path().join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        // Opening a socket fails (ENXIO) before its type is seen.
        assert_eq!(err(socket.to_str().unwrap()), "cannot open it");
    }

    #[test]
    fn the_device_offers_version_1_and_one_queue() {
        let rng = Rng::new(config("/dev/urandom")).unwrap();
        assert_eq!(rng.device_type(), 4);
        assert_eq!(rng.queue_max_sizes(), &[QUEUE_SIZE]);
        assert_eq!(rng.device_features(), 1 << VIRTIO_F_VERSION_1);
        let mut data = [0xffu8; 8];
        rng.read_config(0, &mut data);
        assert_eq!(data, [0; 8]);
    }
}
