//! The virtio-fs device (type 26) as a vhost-user frontend: [`Fs`] owns
//! the connection to the backend, its watcher, the feature offer and
//! configuration space, and the life cycle of the rings the backend serves
//! (handed over at DRIVER_OK, taken back at reset).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::config::{
    config_space, offered_features, BackendLostCallback, FsConfig, CONFIG_SIZE, FS_DEVICE_TYPE,
};
use super::frontend::{
    breaks_connection, memory_regions, open_socket, Connection, RingSetup, REPLY_TIMEOUT,
};
use super::relay::Relay;
use super::watcher::{DeadlineGuard, Loss, Watcher};
use crate::virtio::{ActivateContext, ActivateError, GuestMemory, VirtioDevice, VirtioInterrupt};

/// A virtio-fs device could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag is empty, too long or holds a NUL or newline.
    #[error("virtio-fs tag '{tag}' must be 1 to 36 bytes without NUL or newline")]
    Tag {
        /// The tag given.
        tag: String,
    },
    /// No request queue, or more than the transport has room for.
    #[error("virtio-fs needs 1 to 254 request queues, not {count}")]
    RequestQueues {
        /// The number asked for.
        count: u16,
    },
    /// The queue size is not a power of two up to 32768.
    #[error("virtio-fs queue size {size} is not a power of two up to 32768")]
    QueueSize {
        /// The size asked for.
        size: u16,
    },
    /// Nothing at the socket path.
    #[error("virtio-fs socket {socket} does not exist (is virtiofsd running?)")]
    SocketMissing {
        /// The socket path.
        socket: String,
    },
    /// The path is something other than a socket.
    #[error("virtio-fs socket {socket} is not a Unix socket")]
    NotASocket {
        /// The socket path.
        socket: String,
    },
    /// connect(2) failed (nobody listening, permission, ...).
    #[error("cannot connect to virtio-fs backend {socket}")]
    Connect {
        /// The socket path.
        socket: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The peer broke off or garbled the vhost-user handshake.
    #[error("virtio-fs backend {socket} does not speak vhost-user ({step} failed)")]
    Handshake {
        /// The socket path.
        socket: String,
        /// The request that failed.
        step: &'static str,
        /// What the vhost crate said.
        #[source]
        source: vhost::Error,
    },
    /// The peer did not answer the handshake in time.
    #[error("virtio-fs backend {socket} did not answer within {seconds} s")]
    NoAnswer {
        /// The socket path.
        socket: String,
        /// The time limit.
        seconds: u64,
    },
    /// The backend lacks virtio 1.
    #[error("virtio-fs backend {socket} does not offer VIRTIO_F_VERSION_1")]
    NoVersion1 {
        /// The socket path.
        socket: String,
    },
    /// The backend lacks VHOST_USER_F_PROTOCOL_FEATURES.
    #[error("virtio-fs backend {socket} does not offer vhost-user protocol features")]
    NoProtocolFeatures {
        /// The socket path.
        socket: String,
    },
    /// More request queues asked for than the backend serves.
    #[error(
        "virtio-fs backend {socket} serves at most {supported} request queue(s), not {requested}"
    )]
    TooManyQueues {
        /// The socket path.
        socket: String,
        /// Request queues asked for.
        requested: u16,
        /// Request queues the backend serves.
        supported: u64,
    },
    /// The watcher or relay thread could not be started.
    #[error("cannot start a virtio-fs thread")]
    Thread(#[source] io::Error),
    /// Guest memory is anonymous: the backend cannot map it.
    #[error("virtio-fs needs shared guest memory (--memory shared=on)")]
    SharedMemory,
    /// A ring does not lie inside one guest memory region.
    #[error("virtio-fs queue {queue}: {what} at {addr:#x} is outside guest memory")]
    Ring {
        /// Queue index.
        queue: u16,
        /// Which ring.
        what: &'static str,
        /// Its guest address.
        addr: u64,
    },
    /// A request of an activation or reset failed.
    #[error("virtio-fs backend {socket}: {step} failed")]
    Request {
        /// The socket path.
        socket: String,
        /// The request that failed.
        step: &'static str,
        /// What the vhost crate said.
        #[source]
        source: vhost::Error,
    },
    /// The backend went away earlier.
    #[error("virtio-fs backend {socket} is gone")]
    Lost {
        /// The socket path.
        socket: String,
    },
}

impl FsError {
    fn into_activate_error(self) -> ActivateError {
        match self {
            FsError::Ring { .. } => ActivateError::BadQueue(self.to_string()),
            other => ActivateError::Backend(io::Error::other(other)),
        }
    }

    fn breaks_connection(&self) -> bool {
        match self {
            FsError::Request { source, .. } => breaks_connection(source),
            _ => false,
        }
    }
}

/// The connection is being set up; a loss is reported by `Fs::new`.
const CONNECTING: u8 = 0;
/// The device is live; a loss goes to the callback.
const ARMED: u8 = 1;
/// The backend is gone.
const LOST: u8 = 2;

/// What the device and its watcher share.
struct Shared {
    id: String,
    socket: String,
    state: AtomicU8,
    loss: Mutex<Option<Loss>>,
    backend_errors: AtomicU64,
    on_lost: BackendLostCallback,
}

impl Shared {
    /// Records the loss; the first one after arming reaches the callback.
    fn lose(&self, loss: Loss, message: String) {
        let previous = self.state.swap(LOST, Ordering::AcqRel);
        if previous == LOST {
            return;
        }
        self.backend_errors.fetch_add(1, Ordering::Relaxed);
        *self.loss.lock().unwrap_or_else(|p| p.into_inner()) = Some(loss);
        if previous == ARMED {
            (self.on_lost)(message);
        }
    }

    fn watcher_lost(&self, loss: Loss) {
        let message = match &loss {
            Loss::Closed => format!(
                "virtio-fs {}: backend {} closed the connection",
                self.id, self.socket
            ),
            Loss::Timeout(limit) => format!(
                "virtio-fs {}: backend {} did not answer within {} s",
                self.id,
                self.socket,
                limit.as_secs()
            ),
        };
        self.lose(loss, message);
    }

    fn is_lost(&self) -> bool {
        self.state.load(Ordering::Acquire) == LOST
    }

    fn timed_out(&self) -> bool {
        let loss = self.loss.lock().unwrap_or_else(|p| p.into_inner());
        matches!(*loss, Some(Loss::Timeout(_)))
    }
}

/// What the backend holds while the device is active.
struct Active {
    queues: Vec<u16>,
    kicks: Vec<EventFd>,
    relay: Option<Relay>,
}

/// Device counters (the data path is the backend's).
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    activations: u64,
    activation_failures: u64,
    resets: u64,
}

/// A virtio-fs device served by a vhost-user backend.
pub struct Fs {
    id: String,
    socket: PathBuf,
    queue_sizes: Vec<u16>,
    avail_features: u64,
    acked_features: u64,
    config: [u8; CONFIG_SIZE],
    connection: Connection,
    shared: Arc<Shared>,
    watcher: Option<Watcher>,
    active: Option<Active>,
    counters: Counters,
    relayed: Arc<AtomicU64>,
}

impl Fs {
    /// Checks `config`, connects to the backend and negotiates with it.
    pub fn new(config: FsConfig) -> Result<Fs, FsError> {
        let tag = config.validate()?;
        let id = config.id.replace('\0', "");
        let socket = config.socket.display().to_string();
        let queues = config.num_request_queues + 1;
        let stream = open_socket(&config.socket)?;
        let watched = stream.try_clone().map_err(|source| FsError::Connect {
            socket: socket.clone(),
            source,
        })?;
        let shared = Arc::new(Shared {
            id: id.clone(),
            socket: socket.clone(),
            state: AtomicU8::new(CONNECTING),
            loss: Mutex::new(None),
            backend_errors: AtomicU64::new(0),
            on_lost: config.on_backend_lost.clone(),
        });
        let on_lost = shared.clone();
        let watcher = Watcher::spawn(format!("fs-{id}-watch"), watched, move |loss| {
            on_lost.watcher_lost(loss)
        })
        .map_err(FsError::Thread)?;
        let negotiated = {
            let _deadline = watcher.deadline(REPLY_TIMEOUT);
            Connection::new(stream, &config.socket, queues)
        };
        let connection = negotiated.map_err(|e| match e {
            FsError::Handshake { .. } if shared.timed_out() => FsError::NoAnswer {
                socket: socket.clone(),
                seconds: REPLY_TIMEOUT.as_secs(),
            },
            other => other,
        })?;
        let armed =
            shared
                .state
                .compare_exchange(CONNECTING, ARMED, Ordering::AcqRel, Ordering::Acquire);
        if armed.is_err() {
            return Err(FsError::Lost { socket });
        }
        Ok(Fs {
            id,
            socket: config.socket.clone(),
            queue_sizes: vec![config.queue_size; usize::from(queues)],
            avail_features: offered_features(connection.backend_features()),
            acked_features: 0,
            config: config_space(&tag, config.num_request_queues),
            connection,
            shared,
            watcher: Some(watcher),
            active: None,
            counters: Counters::default(),
            relayed: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The device's name.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The backend's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether the backend is gone (the device can no longer activate).
    pub fn backend_lost(&self) -> bool {
        self.shared.is_lost()
    }

    /// Refuses guest memory a vhost-user backend cannot map (anonymous
    /// memory): the VMM can check this before booting.
    pub fn check_memory(mem: &GuestMemory) -> Result<(), FsError> {
        memory_regions(mem).map(drop)
    }

    /// Counts a failed request; one that leaves the connection out of step
    /// ends it and reports the backend lost.
    fn request_failed(&mut self, error: &FsError) {
        self.shared.backend_errors.fetch_add(1, Ordering::Relaxed);
        if !error.breaks_connection() {
            return;
        }
        if let Some(watcher) = &self.watcher {
            watcher.sever();
        }
        let message = format!("virtio-fs {}: {}", self.id, error_chain(error));
        self.shared.lose(Loss::Closed, message);
    }

    /// Gives the backend the rings; on failure takes back what it got.
    fn start(&mut self, context: ActivateContext) -> Result<Active, FsError> {
        if self.shared.is_lost() {
            let socket = self.shared.socket.clone();
            return Err(FsError::Lost { socket });
        }
        let ActivateContext {
            mem,
            interrupt,
            queues,
        } = context;
        memory_regions(&mem)?;
        let mut calls = Vec::with_capacity(queues.len());
        let mut relayed = Vec::new();
        for (index, _, _) in &queues {
            let (call, relay_end) = call_eventfd(interrupt.as_ref(), *index)?;
            relayed.extend(relay_end.map(|event| (*index, event)));
            calls.push(call);
        }
        let relay = self.spawn_relay(relayed, interrupt)?;
        let rings: Vec<RingSetup<'_>> = queues
            .iter()
            .zip(&calls)
            .map(|((index, queue, kick), call)| RingSetup {
                index: *index,
                queue,
                kick,
                call,
            })
            .collect();
        let indices: Vec<u16> = queues.iter().map(|(index, _, _)| *index).collect();
        let started = {
            let _deadline = deadline(&self.watcher);
            self.connection.start(self.acked_features, &mem, &rings)
        };
        if let Err(e) = started {
            if !matches!(e, FsError::Request { .. }) {
                // Refused before anything was sent.
                return Err(e);
            }
            self.request_failed(&e);
            if !self.shared.is_lost() {
                // Take back whatever was enabled; the error is the first one.
                let _deadline = deadline(&self.watcher);
                let _ = self.connection.stop(&indices);
            }
            return Err(e);
        }
        Ok(Active {
            queues: indices,
            kicks: queues.into_iter().map(|(_, _, kick)| kick).collect(),
            relay,
        })
    }

    fn spawn_relay(
        &self,
        queues: Vec<(u16, EventFd)>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<Option<Relay>, FsError> {
        if queues.is_empty() {
            return Ok(None);
        }
        let name = format!("fs-{}-irq", self.id);
        Relay::spawn(name, queues, interrupt, self.relayed.clone())
            .map(Some)
            .map_err(FsError::Thread)
    }

    /// Takes the rings back from the backend; returns the kick eventfds.
    fn stop(&mut self) -> Vec<EventFd> {
        let Some(active) = self.active.take() else {
            return Vec::new();
        };
        if !self.shared.is_lost() {
            let stopped = {
                let _deadline = deadline(&self.watcher);
                self.connection.stop(&active.queues)
            };
            if let Err(e) = stopped {
                self.request_failed(&e);
            }
        }
        // The backend no longer writes the call eventfds.
        if let Some(relay) = active.relay {
            relay.stop();
        }
        active.kicks
    }
}

/// Bounds the exchange that follows (until the guard drops).
fn deadline(watcher: &Option<Watcher>) -> Option<DeadlineGuard<'_>> {
    watcher
        .as_ref()
        .map(|watcher| watcher.deadline(REPLY_TIMEOUT))
}

/// The eventfd the backend writes to interrupt the driver for `queue`:
/// the transport's irqfd, else one of ours that the relay forwards (the
/// second value, the relay's end).
fn call_eventfd(
    interrupt: &dyn VirtioInterrupt,
    queue: u16,
) -> Result<(EventFd, Option<EventFd>), FsError> {
    if let Some(irqfd) = interrupt.queue_eventfd(queue) {
        return Ok((irqfd, None));
    }
    let event = EventFd::new(EFD_NONBLOCK).map_err(FsError::Thread)?;
    let relay_end = event.try_clone().map_err(FsError::Thread)?;
    Ok((event, Some(relay_end)))
}

/// `error` and its sources on one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl Drop for Fs {
    fn drop(&mut self) {
        drop(self.active.take());
        // Stop watching before the connection closes: that close is ours.
        drop(self.watcher.take());
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        FS_DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        self.avail_features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_space(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The tag and queue count are read-only.
    }

    fn activate(&mut self, context: ActivateContext) -> Result<(), ActivateError> {
        drop(self.stop());
        if let Err(e) = crate::virtio::check_queues("virtio-fs", &context.queues, &context.mem) {
            self.counters.activation_failures += 1;
            return Err(e);
        }
        match self.start(context) {
            Ok(active) => {
                self.active = Some(active);
                self.counters.activations += 1;
                Ok(())
            }
            Err(e) => {
                self.counters.activation_failures += 1;
                Err(e.into_activate_error())
            }
        }
    }

    fn reset(&mut self) -> Vec<EventFd> {
        self.acked_features = 0;
        self.counters.resets += 1;
        self.stop()
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = self.counters;
        vec![
            ("fs_activations", c.activations),
            ("fs_activation_failures", c.activation_failures),
            ("fs_resets", c.resets),
            (
                "fs_backend_errors",
                self.shared.backend_errors.load(Ordering::Relaxed),
            ),
            (
                "fs_relayed_interrupts",
                self.relayed.load(Ordering::Relaxed),
            ),
        ]
    }
}
