//! The vhost-user connection to a virtio-fs backend (virtiofsd), on the
//! `vhost` crate's [`Frontend`]: opening the socket with one clear error
//! per way it can fail, the feature and protocol negotiation, handing the
//! backend guest memory and the rings (kick and call eventfds included) at
//! activation, and stopping the rings at reset.
//!
//! The `vhost` crate waits for an answer without a time limit (it even
//! retries a receive timeout), so the device arms the watcher's deadline
//! around every exchange: a backend that stops answering gets its socket
//! shut down, which ends the wait with an error. After such a failure the
//! connection is out of step and is never used again
//! ([`breaks_connection`]).

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vhost::vhost_user::Error as VhostUserError;

use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::device::FsError;
use crate::virtio::{GuestMemory, VIRTIO_F_VERSION_1};

/// How long the handshake, an activation or a reset may take.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Queues a backend without MQ serves: the high-priority queue and one
/// request queue, the virtio-fs minimum.
const QUEUES_WITHOUT_MQ: u64 = 2;

/// Protocol features zvmm uses when the backend offers them: several
/// queues (MQ, needed for GET_QUEUE_NUM), acknowledged requests, and
/// RESET_DEVICE so a guest reset also clears the backend's FUSE state.
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::RESET_DEVICE
}

/// One ring to hand to the backend.
pub(crate) struct RingSetup<'a> {
    /// Queue index.
    pub index: u16,
    /// The driver's ring addresses and size.
    pub queue: &'a Queue,
    /// Written by KVM when the driver kicks the queue.
    pub kick: &'a EventFd,
    /// Written by the backend to interrupt the driver.
    pub call: &'a EventFd,
}

/// An established, negotiated vhost-user connection.
pub(crate) struct Connection {
    frontend: Frontend,
    socket: PathBuf,
    features: u64,
    protocol: VhostUserProtocolFeatures,
    queue_num: u64,
}

impl Connection {
    /// Negotiates for `queues` queues on `stream`, connected to `socket`.
    pub fn new(stream: UnixStream, socket: &Path, queues: u16) -> Result<Connection, FsError> {
        let mut connection = Connection {
            frontend: Frontend::from_stream(stream, QUEUES_WITHOUT_MQ),
            socket: socket.to_path_buf(),
            features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            queue_num: QUEUES_WITHOUT_MQ,
        };
        connection.negotiate(queues)?;
        Ok(connection)
    }

    /// Virtio features the backend offers.
    pub fn backend_features(&self) -> u64 {
        self.features
    }

    fn handshake_error(&self, step: &'static str) -> impl FnOnce(vhost::Error) -> FsError {
        let socket = self.socket.display().to_string();
        move |source| FsError::Handshake {
            socket,
            step,
            source,
        }
    }

    fn negotiate(&mut self, queues: u16) -> Result<(), FsError> {
        let socket = self.socket.display().to_string();
        self.frontend
            .set_owner()
            .map_err(self.handshake_error("SET_OWNER"))?;
        self.features = self
            .frontend
            .get_features()
            .map_err(self.handshake_error("GET_FEATURES"))?;
        if self.features & 1 << VIRTIO_F_VERSION_1 == 0 {
            return Err(FsError::NoVersion1 { socket });
        }
        if self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(FsError::NoProtocolFeatures { socket });
        }
        let offered = self
            .frontend
            .get_protocol_features()
            .map_err(self.handshake_error("GET_PROTOCOL_FEATURES"))?;
        self.protocol = offered & wanted_protocol_features();
        self.frontend
            .set_protocol_features(self.protocol)
            .map_err(self.handshake_error("SET_PROTOCOL_FEATURES"))?;
        if self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if self.protocol.contains(VhostUserProtocolFeatures::MQ) {
            self.queue_num = self
                .frontend
                .get_queue_num()
                .map_err(self.handshake_error("GET_QUEUE_NUM"))?;
        }
        if self.queue_num < u64::from(queues) {
            return Err(FsError::TooManyQueues {
                socket,
                requested: queues - 1,
                supported: self.queue_num.saturating_sub(1),
            });
        }
        Ok(())
    }

    fn request_error(&self, step: &'static str) -> impl FnOnce(vhost::Error) -> FsError {
        let socket = self.socket.display().to_string();
        move |source| FsError::Request {
            socket,
            step,
            source,
        }
    }

    /// Hands the backend the acked `features`, guest memory and `rings`,
    /// and enables the rings.
    pub fn start(
        &mut self,
        features: u64,
        mem: &GuestMemory,
        rings: &[RingSetup<'_>],
    ) -> Result<(), FsError> {
        let regions = memory_regions(mem)?;
        let addresses = rings
            .iter()
            .map(|ring| ring_addresses(mem, ring.index, ring.queue))
            .collect::<Result<Vec<_>, _>>()?;
        let features = features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.frontend
            .set_features(features)
            .map_err(self.request_error("SET_FEATURES"))?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(self.request_error("SET_MEM_TABLE"))?;
        for (ring, config) in rings.iter().zip(&addresses) {
            self.start_ring(ring, config)?;
        }
        Ok(())
    }

    fn start_ring(
        &mut self,
        ring: &RingSetup<'_>,
        config: &VringConfigData,
    ) -> Result<(), FsError> {
        let index = usize::from(ring.index);
        self.frontend
            .set_vring_num(index, ring.queue.size())
            .map_err(self.request_error("SET_VRING_NUM"))?;
        self.frontend
            .set_vring_addr(index, config)
            .map_err(self.request_error("SET_VRING_ADDR"))?;
        self.frontend
            .set_vring_base(index, ring.queue.next_avail())
            .map_err(self.request_error("SET_VRING_BASE"))?;
        self.frontend
            .set_vring_kick(index, ring.kick)
            .map_err(self.request_error("SET_VRING_KICK"))?;
        self.frontend
            .set_vring_call(index, ring.call)
            .map_err(self.request_error("SET_VRING_CALL"))?;
        self.frontend
            .set_vring_enable(index, true)
            .map_err(self.request_error("SET_VRING_ENABLE"))
    }

    /// Disables and stops `queues` (GET_VRING_BASE), then resets the
    /// backend's device state if it supports RESET_DEVICE. Tries every
    /// step; returns the first failure.
    pub fn stop(&mut self, queues: &[u16]) -> Result<(), FsError> {
        let mut first_error = None;
        let mut note = |result: Result<(), FsError>| {
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        };
        for &queue in queues {
            let index = usize::from(queue);
            let disable = self.frontend.set_vring_enable(index, false);
            note(disable.map_err(self.request_error("SET_VRING_ENABLE")));
            let base = self.frontend.get_vring_base(index).map(drop);
            note(base.map_err(self.request_error("GET_VRING_BASE")));
        }
        if self
            .protocol
            .contains(VhostUserProtocolFeatures::RESET_DEVICE)
        {
            let reset = self.frontend.reset_device();
            note(reset.map_err(self.request_error("RESET_DEVICE")));
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Connects to `socket`, telling a missing path and a file that is no
/// socket apart from a refused connection.
pub(crate) fn open_socket(socket: &Path) -> Result<UnixStream, FsError> {
    let shown = socket.display().to_string();
    let metadata = match std::fs::metadata(socket) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(FsError::SocketMissing { socket: shown })
        }
        Err(source) => {
            return Err(FsError::Connect {
                socket: shown,
                source,
            })
        }
    };
    if !metadata.file_type().is_socket() {
        return Err(FsError::NotASocket { socket: shown });
    }
    UnixStream::connect(socket).map_err(|source| FsError::Connect {
        socket: shown,
        source,
    })
}

/// Whether a failed request leaves the connection unusable: everything but
/// a refusal by the backend (a NACK) or a check done before sending.
pub(crate) fn breaks_connection(error: &vhost::Error) -> bool {
    !matches!(
        error,
        vhost::Error::VhostUserProtocol(
            VhostUserError::BackendInternalError
                | VhostUserError::InvalidParam
                | VhostUserError::InactiveFeature(_)
                | VhostUserError::InactiveOperation(_)
                | VhostUserError::InvalidOperation(_)
        )
    )
}

/// Every guest memory region as the backend maps it: its file, offset
/// and our mapping's address (to translate ring addresses).
pub(crate) fn memory_regions(mem: &GuestMemory) -> Result<Vec<VhostUserMemoryRegionInfo>, FsError> {
    mem.iter()
        .map(|region| {
            VhostUserMemoryRegionInfo::from_guest_region(region).map_err(|_| FsError::SharedMemory)
        })
        .collect()
}

/// The host virtual address of `len` bytes of guest memory at `addr`, if
/// they lie inside one region (the backend translates per region).
fn host_address(mem: &GuestMemory, addr: u64, len: u64) -> Option<u64> {
    let (region, offset) = mem.to_region_addr(GuestAddress(addr))?;
    if offset.0.checked_add(len)? > region.len() {
        return None;
    }
    region.get_host_address(offset).ok().map(|ptr| ptr as u64)
}

/// The ring addresses of `queue` in zvmm's address space.
fn ring_addresses(
    mem: &GuestMemory,
    index: u16,
    queue: &Queue,
) -> Result<VringConfigData, FsError> {
    let size = u64::from(queue.size());
    let translate = |what: &'static str, addr: u64, len: u64| {
        host_address(mem, addr, len).ok_or(FsError::Ring {
            queue: index,
            what,
            addr,
        })
    };
    Ok(VringConfigData {
        queue_max_size: queue.max_size(),
        queue_size: queue.size(),
        flags: 0,
        desc_table_addr: translate("descriptor table", queue.desc_table(), 16 * size)?,
        avail_ring_addr: translate("available ring", queue.avail_ring(), 6 + 2 * size)?,
        used_ring_addr: translate("used ring", queue.used_ring(), 6 + 8 * size)?,
        log_addr: None,
    })
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::virtio::fs::testing::shared_memory;

    #[test]
    fn regions_need_files_and_rings_one_region() {
        let private: GuestMemory =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let err = memory_regions(&private).err().unwrap();
        assert_eq!(
            err.to_string(),
            "virtio-fs needs shared guest memory (--memory shared=on)"
        );
        let mem = shared_memory(&[(0, 0x10000), (0x10000, 0x10000)]);
        let regions = memory_regions(&mem).unwrap();
        assert_eq!(regions.len(), 2);
        assert_eq!(
            (regions[1].guest_phys_addr, regions[1].mmap_offset),
            (0x10000, 0x10000)
        );
        let base = mem.get_host_address(GuestAddress(0x10000)).unwrap() as u64;
        assert_eq!(host_address(&mem, 0x10010, 0x100), Some(base + 0x10));
        assert_eq!(host_address(&mem, 0xff00, 0x200), None, "spans two regions");
        assert_eq!(host_address(&mem, 0x20000, 1), None, "outside memory");
    }
}
