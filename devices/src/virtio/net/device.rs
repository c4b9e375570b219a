//! The virtio-net device (type 1): feature offer, configuration space
//! (virtio 1.2 §5.1.4), the queue layout (rx0, tx0, rx1, tx1, ..., ctrl
//! last) and the life cycle of its per-pair workers.

use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::counters::{self, PairCounters};
use super::ctrl::{Ctrl, Pairs};
use super::header::{tap_offloads, TxOffloads, VNET_HDR_LEN};
use super::rx::Rx;
use super::tap::{TapError, TapOrigin, TapSet};
use super::tx::Tx;
use super::worker::{PairSetup, Shared, Worker};
use crate::virtio::{ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1};

/// Virtio device ID of a network device.
pub const NET_DEVICE_TYPE: u32 = 1;
/// Default size of each queue.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Smallest queue size accepted.
pub const MIN_QUEUE_SIZE: u16 = 64;
/// Largest queue size accepted.
pub const MAX_QUEUE_SIZE: u16 = 4096;
/// Most queue pairs (2 per pair plus the control queue fit the
/// transport's 255 queues).
pub const MAX_QUEUE_PAIRS: u16 = 127;

/// Configuration space field offsets (`struct virtio_net_config`).
pub mod offsets {
    /// `u8 mac[6]` (VIRTIO_NET_F_MAC).
    pub const MAC: usize = 0;
    /// `le16 status` (VIRTIO_NET_F_STATUS).
    pub const STATUS: usize = 6;
    /// `le16 max_virtqueue_pairs` (VIRTIO_NET_F_MQ).
    pub const MAX_VIRTQUEUE_PAIRS: usize = 8;
    /// `le16 mtu` (VIRTIO_NET_F_MTU, not offered).
    pub const MTU: usize = 10;
    /// Bytes up to and including `mtu`; the speed, duplex and RSS fields
    /// after it belong to features not offered and read as zero.
    pub const SIZE: usize = 12;
}

/// How to attach one network device.
#[derive(Debug)]
pub struct NetConfig {
    /// The device's name (threads `net-<id>-<pair>`, vm.info).
    pub id: String,
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// Size of every queue: a power of two from 64 to 4096.
    pub queue_size: u16,
    /// The host tap, one queue per queue pair.
    pub taps: TapSet,
}

/// A network device cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The queue size is out of range.
    #[error("net queue size {size} must be a power of two from 64 to 4096")]
    QueueSize {
        /// The size given.
        size: u16,
    },
    /// The tap has more queues than the device can have pairs.
    #[error("tap {name} has {pairs} queues; a net device has at most 127 queue pairs")]
    QueuePairs {
        /// The tap.
        name: String,
        /// Its queues.
        pairs: u16,
    },
    /// The MAC address is not one a NIC may have.
    #[error("mac address {mac} is not a unicast address")]
    Mac {
        /// The address, formatted.
        mac: String,
    },
    /// The id is unusable.
    #[error("net device id must be 1 to 64 printable characters, not '{id}'")]
    Id {
        /// The id given.
        id: String,
    },
}

struct Running {
    stop: EventFd,
    threads: Vec<JoinHandle<Vec<EventFd>>>,
    /// Eventfds of enabled queues no worker serves.
    idle: Vec<EventFd>,
}

/// A virtio-net device on a host tap.
pub struct Net {
    id: String,
    mac: [u8; 6],
    taps: TapSet,
    queue_sizes: Vec<u16>,
    avail_features: u64,
    acked_features: u64,
    config: [u8; offsets::SIZE],
    counters: Arc<[PairCounters]>,
    running: Option<Running>,
}

impl Net {
    /// Checks the configuration and prepares the device.
    pub fn new(config: NetConfig) -> Result<Net, NetError> {
        let NetConfig {
            id,
            mac,
            queue_size,
            taps,
        } = config;
        if !(MIN_QUEUE_SIZE..=MAX_QUEUE_SIZE).contains(&queue_size) || !queue_size.is_power_of_two()
        {
            return Err(NetError::QueueSize { size: queue_size });
        }
        let pairs = taps.queue_pairs();
        if pairs > MAX_QUEUE_PAIRS {
            let name = taps.name().to_string();
            return Err(NetError::QueuePairs { name, pairs });
        }
        if mac[0] & 1 != 0 || mac == [0; 6] {
            return Err(NetError::Mac {
                mac: format_mac(&mac),
            });
        }
        if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_graphic()) {
            return Err(NetError::Id { id });
        }
        let queues = 2 * usize::from(pairs) + usize::from(pairs > 1);
        Ok(Net {
            id,
            mac,
            queue_sizes: vec![queue_size; queues],
            avail_features: features(pairs),
            acked_features: 0,
            config: config_space(&mac, pairs),
            counters: (0..pairs).map(|_| PairCounters::default()).collect(),
            taps,
            running: None,
        })
    }

    /// The device's name.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The host tap's name.
    pub fn tap_name(&self) -> &str {
        self.taps.name()
    }

    /// Where the tap came from.
    pub fn tap_origin(&self) -> TapOrigin {
        self.taps.origin()
    }

    /// The host tap.
    pub fn taps(&self) -> &TapSet {
        &self.taps
    }

    /// Queue pairs offered.
    pub fn queue_pairs(&self) -> u16 {
        self.taps.queue_pairs()
    }

    fn acked(&self, bit: u32) -> bool {
        self.acked_features & (1 << bit) != 0
    }

    fn stop_workers(&mut self) -> Vec<EventFd> {
        let Some(running) = self.running.take() else {
            return Vec::new();
        };
        // Workers never read the stop eventfd, so it wakes them all; if
        // the write fails they are gone already and join says so.
        let _ = running.stop.write(1);
        let mut evts = running.idle;
        for thread in running.threads {
            if let Ok(returned) = thread.join() {
                evts.extend(returned);
            }
        }
        evts
    }

    /// Mirrors the accepted receive offloads onto the tap.
    fn configure_tap(&mut self) -> Result<(), TapError> {
        // VNET_HDR_LEN is 12.
        self.taps.set_vnet_hdr_size(VNET_HDR_LEN as i32)?;
        self.taps.set_offload(tap_offloads(self.acked_features))
    }

    fn start(&mut self, context: ActivateContext) -> Result<(), ActivateError> {
        let ActivateContext {
            mem,
            interrupt,
            queues,
        } = context;
        let layout = QueueLayout::sort(queues, self.queue_sizes.len(), self.pair_layout())?;
        self.configure_tap()
            .map_err(|e| ActivateError::Backend(std::io::Error::other(e)))?;
        // At most MAX_QUEUE_PAIRS pairs.
        let usable = layout.pairs.len() as u16;
        // Tap queues of pairs nobody serves get no frames steered to them.
        for pair in usable..self.taps.queue_pairs() {
            if let Some(queue) = self.taps.queue(pair) {
                queue.set_attached(false).map_err(ActivateError::Backend)?;
            }
        }
        let wakes = (0..usable)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(ActivateError::Backend)?;
        let mq = self.acked(VIRTIO_NET_F_MQ);
        let pairs = Arc::new(Pairs::new(usable, mq, clone_all(&wakes)?));
        let mut running = Running {
            stop: EventFd::new(EFD_NONBLOCK).map_err(ActivateError::Backend)?,
            threads: Vec::new(),
            idle: layout.idle,
        };
        let mut ctrl = layout.ctrl;
        for (pair, (queues, wake)) in (0u16..).zip(layout.pairs.into_iter().zip(wakes)) {
            let shared = Shared {
                mem: mem.clone(),
                interrupt: interrupt.clone(),
                counters: self.counters.clone(),
                pairs: pairs.clone(),
            };
            let started =
                self.spawn_worker(pair, queues, ctrl.take(), (&running.stop, wake), shared);
            match started {
                Ok(thread) => running.threads.push(thread),
                Err(e) => {
                    self.running = Some(running);
                    self.stop_workers();
                    return Err(e);
                }
            }
        }
        self.running = Some(running);
        Ok(())
    }

    /// Starts the worker of `pair`; pair 0 also serves the control queue.
    fn spawn_worker(
        &self,
        pair: u16,
        ((rx, rx_evt), (tx, tx_evt)): (QueueParts, QueueParts),
        ctrl: Option<(u16, Queue, EventFd)>,
        (stop, wake): (&EventFd, EventFd),
        shared: Shared,
    ) -> Result<JoinHandle<Vec<EventFd>>, ActivateError> {
        let event_idx = self.acked(VIRTIO_RING_F_EVENT_IDX);
        let tap = self.taps.queue(pair).cloned().ok_or_else(|| {
            ActivateError::BadQueue(format!("no tap queue for queue pair {pair}"))
        })?;
        let setup = PairSetup {
            pair,
            rx: (self.rx(rx, 2 * pair, event_idx), rx_evt),
            tx: (self.tx(tx, 2 * pair + 1, event_idx), tx_evt),
            ctrl: ctrl.map(|(index, mut queue, evt)| {
                queue.set_event_idx(event_idx);
                (Ctrl::new(queue, index), evt)
            }),
            tap,
            stop: stop.try_clone().map_err(ActivateError::Backend)?,
            wake,
        };
        let worker = Worker::new(setup, shared).map_err(ActivateError::Backend)?;
        worker
            .spawn(format!("net-{}-{pair}", self.id))
            .map_err(ActivateError::Backend)
    }

    fn rx(&self, mut queue: Queue, index: u16, event_idx: bool) -> Rx {
        queue.set_event_idx(event_idx);
        let mrg = self.acked(VIRTIO_NET_F_MRG_RXBUF);
        Rx::new(queue, index, mrg, self.acked(VIRTIO_NET_F_GUEST_CSUM))
    }

    fn tx(&self, mut queue: Queue, index: u16, event_idx: bool) -> Tx {
        queue.set_event_idx(event_idx);
        Tx::new(queue, index, TxOffloads::from_features(self.acked_features))
    }

    /// Which pairs the driver may use and where its control queue is:
    /// `2 * max_virtqueue_pairs` with MQ, else 2 (virtio 1.2 §5.1.2).
    fn pair_layout(&self) -> (u16, Option<u16>) {
        let mq = self.acked(VIRTIO_NET_F_MQ);
        let pairs = if mq { self.taps.queue_pairs() } else { 1 };
        let ctrl = self.acked(VIRTIO_NET_F_CTRL_VQ).then_some(2 * pairs);
        (pairs, ctrl)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop_workers();
    }
}

fn clone_all(evts: &[EventFd]) -> Result<Vec<EventFd>, ActivateError> {
    evts.iter()
        .map(|e| e.try_clone().map_err(ActivateError::Backend))
        .collect()
}

type QueueParts = (Queue, EventFd);

/// The enabled queues sorted into pairs, the control queue and the rest.
struct QueueLayout {
    /// Pairs 0.. with both queues enabled (receive, transmit).
    pairs: Vec<(QueueParts, QueueParts)>,
    ctrl: Option<(u16, Queue, EventFd)>,
    idle: Vec<EventFd>,
}

impl QueueLayout {
    fn sort(
        queues: Vec<(u16, Queue, EventFd)>,
        count: usize,
        (max_pairs, ctrl_index): (u16, Option<u16>),
    ) -> Result<QueueLayout, ActivateError> {
        let mut slots: Vec<Option<QueueParts>> = (0..count).map(|_| None).collect();
        let mut ctrl = None;
        let mut idle = Vec::new();
        for (index, queue, evt) in queues {
            if Some(index) == ctrl_index {
                ctrl = Some((index, queue, evt));
            } else if let Some(slot) = slots.get_mut(usize::from(index)) {
                *slot = Some((queue, evt));
            } else {
                idle.push(evt);
            }
        }
        let mut pairs = Vec::new();
        let mut slots = slots.into_iter();
        for pair in 0..max_pairs {
            match (slots.next().flatten(), slots.next().flatten()) {
                (Some(rx), Some(tx)) if pairs.len() == usize::from(pair) => pairs.push((rx, tx)),
                (None, None) if pair > 0 => {}
                (rx, tx) => {
                    idle.extend(rx.map(|(_, evt)| evt));
                    idle.extend(tx.map(|(_, evt)| evt));
                    if pair == 0 {
                        return Err(ActivateError::BadQueue(
                            "virtio-net needs receiveq1 and transmitq1".to_string(),
                        ));
                    }
                }
            }
        }
        idle.extend(slots.flatten().map(|(_, evt)| evt));
        Ok(QueueLayout { pairs, ctrl, idle })
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        NET_DEVICE_TYPE
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
        // Virtio 1.x drivers must not write the MAC; nothing else is writable.
    }

    fn activate(&mut self, context: ActivateContext) -> Result<(), ActivateError> {
        self.stop_workers();
        crate::virtio::check_queues("virtio-net", &context.queues, &context.mem)?;
        self.start(context)
    }

    fn reset(&mut self) -> Vec<EventFd> {
        self.acked_features = 0;
        self.stop_workers()
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        counters::snapshot(&self.counters)
    }
}

/// The feature offer for a tap of `pairs` queues.
fn features(pairs: u16) -> u64 {
    let mut bits = vec![
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_ECN,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_ECN,
    ];
    if pairs > 1 {
        bits.extend([VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ]);
    }
    bits.into_iter().fold(0, |acc, bit| acc | 1u64 << bit)
}

fn config_space(mac: &[u8; 6], pairs: u16) -> [u8; offsets::SIZE] {
    let mut config = [0u8; offsets::SIZE];
    config[offsets::MAC..offsets::MAC + 6].copy_from_slice(mac);
    // VIRTIO_NET_S_LINK_UP is 1.
    let status = VIRTIO_NET_S_LINK_UP as u16;
    config[offsets::STATUS..offsets::STATUS + 2].copy_from_slice(&status.to_le_bytes());
    let pairs_at = offsets::MAX_VIRTQUEUE_PAIRS;
    config[pairs_at..pairs_at + 2].copy_from_slice(&pairs.to_le_bytes());
    config
}

/// `52:54:00:12:34:56`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let parts: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    parts.join(":")
}

#[cfg(test)]
mod tests;
