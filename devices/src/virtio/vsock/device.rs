//! The virtio-vsock device (type 19, virtio 1.2 §5.10): receive, transmit
//! and event queues, the guest's CID in configuration space, no
//! device-specific features (stream sockets only), and the worker thread
//! that lives as long as the device — so host clients are served (and
//! turned away in time) even before a driver comes.

use std::io;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::counters::VsockCounters;
use super::host::{HostSocket, SocketError};
use super::muxer::Muxer;
use super::worker::{Active, Command, QueueParts, Worker};
use crate::virtio::{ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1};

/// Virtio device ID of a socket device.
pub const VSOCK_DEVICE_TYPE: u32 = VIRTIO_ID_VSOCK;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Smallest CID a guest may have (0-2 are the hypervisor, local, host).
pub const MIN_GUEST_CID: u64 = 3;
/// Largest CID a guest may have (`u32::MAX` is `VMADDR_CID_ANY`).
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

/// How to build a vsock device.
#[derive(Clone, Debug)]
pub struct VsockConfig {
    /// The device's name (thread `vsock-<id>`).
    pub id: String,
    /// The guest's context ID.
    pub cid: u64,
    /// The Unix socket host clients connect to; guest connections to host
    /// port P go to `<socket>_P`.
    pub socket: PathBuf,
}

/// A vsock device cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The CID is reserved or too large.
    #[error("cid {0} is reserved; give 3 to 4294967294")]
    Cid(u64),
    /// The host socket cannot be created.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The worker could not be started.
    #[error("cannot start the vsock thread")]
    Thread(#[source] io::Error),
}

/// A virtio-vsock device in the hybrid (Unix socket) scheme.
pub struct Vsock {
    id: String,
    cid: u64,
    acked_features: u64,
    counters: Arc<VsockCounters>,
    commands: mpsc::Sender<Command>,
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Vsock {
    /// Binds the host socket and starts the worker.
    pub fn new(config: VsockConfig) -> Result<Vsock, VsockError> {
        let VsockConfig { id, cid, socket } = config;
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&cid) {
            return Err(VsockError::Cid(cid));
        }
        let socket = HostSocket::bind(&socket)?;
        let counters = Arc::new(VsockCounters::default());
        let muxer = Muxer::new(cid, socket, counters.clone()).map_err(VsockError::Thread)?;
        let wake = EventFd::new(EFD_NONBLOCK).map_err(VsockError::Thread)?;
        let (commands, receiver) = mpsc::channel();
        let worker_wake = wake.try_clone().map_err(VsockError::Thread)?;
        let worker = Worker::new(muxer, receiver, worker_wake, counters.clone())
            .map_err(VsockError::Thread)?;
        let thread = worker
            .spawn(format!("vsock-{id}"))
            .map_err(VsockError::Thread)?;
        Ok(Vsock {
            id,
            cid,
            acked_features: 0,
            counters,
            commands,
            wake,
            thread: Some(thread),
        })
    }

    /// The device's name.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The guest's CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// Sends `command` to the worker; false if it is gone.
    fn send(&self, command: Command) -> bool {
        self.commands.send(command).is_ok() && self.wake.write(1).is_ok()
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        // The worker closes every stream and removes the socket as it ends.
        self.send(Command::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Picks queue `index` out of the enabled ones.
fn take_queue(queues: &mut Vec<(u16, Queue, EventFd)>, index: u16) -> Option<QueueParts> {
    let at = queues.iter().position(|(i, _, _)| *i == index)?;
    let (index, queue, evt) = queues.swap_remove(at);
    Some(QueueParts {
        index,
        queue,
        evt,
        used: false,
    })
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VSOCK_DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn device_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.device_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // `le64 guest_cid` is the whole configuration space.
        crate::virtio::read_config_space(&self.cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The guest CID is read-only.
    }

    fn activate(&mut self, context: ActivateContext) -> Result<(), ActivateError> {
        let ActivateContext {
            mem,
            interrupt,
            mut queues,
        } = context;
        crate::virtio::check_queues("virtio-vsock", &queues, &mem)?;
        let (Some(rx), Some(tx)) = (take_queue(&mut queues, 0), take_queue(&mut queues, 1)) else {
            return Err(ActivateError::BadQueue(
                "virtio-vsock needs its rx and tx queues".to_string(),
            ));
        };
        let active = Active {
            mem,
            interrupt,
            rx,
            tx,
            event: take_queue(&mut queues, 2),
        };
        if !self.send(Command::Activate(Box::new(active))) {
            return Err(ActivateError::Backend(io::Error::other(
                "the vsock thread has stopped",
            )));
        }
        Ok(())
    }

    fn reset(&mut self) -> Vec<EventFd> {
        self.acked_features = 0;
        let (reply, answer) = mpsc::channel();
        if !self.send(Command::Deactivate(reply)) {
            return Vec::new();
        }
        answer.recv().unwrap_or_default()
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.counters.snapshot()
    }
}
