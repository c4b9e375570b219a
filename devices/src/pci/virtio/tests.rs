//! Tests of the virtio-pci transport: capabilities, the driver handshake
//! against a fake device, MSI-X delivery, notifications, the PCI
//! configuration access capability and odd accesses.

use std::sync::{Arc, Mutex};

use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::*;
use crate::pci::config::{CAPABILITY_POINTER, COMMAND, COMMAND_MEMORY};
use crate::pci::msix::tests::{RecordingRouter, RouterEvent};
use crate::pci::msix::{MsiMessage, MSIX_CONTROL_ENABLE};
use crate::pci::{BarAllocator, PciConfigMmio, PciMmioWindow, PciRoot};
use crate::virtio::{
    ActivateContext, ActivateError, InterruptKind, VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use crate::BusDevice;

const ACK: u8 = 1;
const DRIVER: u8 = 2;
const DRIVER_OK: u8 = 4;
const FEATURES_OK: u8 = 8;
const NEEDS_RESET: u8 = 0x40;
const FAILED: u8 = 0x80;
/// A device feature bit the fake offers (VIRTIO_BLK_F_SIZE_MAX).
const F_SIZE_MAX: u64 = 1 << 1;
const F_EVENT_IDX: u64 = 1 << 29;
const F_VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;

/// A queue as the fake saw it at activation.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SeenQueue {
    index: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    event_idx: bool,
}

#[derive(Default)]
struct Log {
    acked: Vec<u64>,
    activations: Vec<Vec<SeenQueue>>,
    resets: usize,
    config_writes: Vec<(u64, Vec<u8>)>,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    eventfds: Vec<EventFd>,
}

struct FakeDevice {
    log: Arc<Mutex<Log>>,
    max_sizes: Vec<u16>,
    fail_activation: bool,
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }
    fn device_features(&self) -> u64 {
        F_SIZE_MAX | F_EVENT_IDX
    }
    fn ack_features(&mut self, features: u64) {
        self.log.lock().unwrap().acked.push(features);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = (offset as u8).wrapping_add(i as u8);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.log
            .lock()
            .unwrap()
            .config_writes
            .push((offset, data.to_vec()));
    }
    fn activate(&mut self, context: ActivateContext) -> Result<(), ActivateError> {
        if self.fail_activation {
            return Err(ActivateError::BadQueue("fake refuses".into()));
        }
        let mut log = self.log.lock().unwrap();
        let mut seen = Vec::new();
        for (index, queue, event) in context.queues {
            seen.push(SeenQueue {
                index,
                size: queue.size(),
                desc: queue.desc_table(),
                avail: queue.avail_ring(),
                used: queue.used_ring(),
                event_idx: queue.event_idx_enabled(),
            });
            log.eventfds.push(event);
        }
        log.activations.push(seen);
        log.interrupt = Some(context.interrupt);
        Ok(())
    }
    fn reset(&mut self) -> Vec<EventFd> {
        let mut log = self.log.lock().unwrap();
        log.resets += 1;
        log.interrupt = None;
        std::mem::take(&mut log.eventfds)
    }
}

struct Fixture {
    dev: VirtioPciDevice,
    log: Arc<Mutex<Log>>,
    router: Arc<RecordingRouter>,
}

fn memory() -> GuestMemory {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

fn fake(max_sizes: &[u16], fail_activation: bool) -> (Box<FakeDevice>, Arc<Mutex<Log>>) {
    let log = Arc::new(Mutex::new(Log::default()));
    let device = FakeDevice {
        log: log.clone(),
        max_sizes: max_sizes.to_vec(),
        fail_activation,
    };
    (Box::new(device), log)
}

fn fixture_with(max_sizes: &[u16], fail_activation: bool) -> Fixture {
    let (device, log) = fake(max_sizes, fail_activation);
    let router = Arc::new(RecordingRouter::default());
    let dev = VirtioPciDevice::new(device, memory(), router.clone()).unwrap();
    Fixture { dev, log, router }
}

fn fixture() -> Fixture {
    fixture_with(&[16, 8], false)
}

impl Fixture {
    fn write(&mut self, offset: u64, value: u64, len: usize) {
        self.dev
            .write_bar(VIRTIO_BAR, offset, &value.to_le_bytes()[..len]);
    }

    fn read(&mut self, offset: u64, len: usize) -> u64 {
        let mut data = [0u8; 8];
        self.dev.read_bar(VIRTIO_BAR, offset, &mut data[..len]);
        u64::from_le_bytes(data)
    }

    fn status(&mut self) -> u8 {
        self.read(0x14, 1) as u8
    }

    fn set_status(&mut self, status: u8) {
        self.write(0x14, u64::from(status), 1);
    }

    fn features(&mut self) -> u64 {
        self.write(0x00, 0, 4);
        let low = self.read(0x04, 4);
        self.write(0x00, 1, 4);
        low | self.read(0x04, 4) << 32
    }

    fn set_features(&mut self, features: u64) {
        for select in 0..2 {
            self.write(0x08, select, 4);
            self.write(0x0c, features >> (32 * select) & 0xffff_ffff, 4);
        }
    }

    fn negotiate(&mut self, features: u64) {
        self.set_status(ACK);
        self.set_status(ACK | DRIVER);
        self.set_features(features);
        self.set_status(ACK | DRIVER | FEATURES_OK);
    }

    /// Sets up queue `index` at `base` (desc, avail at +0x1000, used at
    /// +0x2000) with `size` entries, and enables it.
    fn setup_queue(&mut self, index: u16, size: u16, base: u64) {
        self.write(0x16, u64::from(index), 2);
        self.write(0x18, u64::from(size), 2);
        self.write(0x20, base & 0xffff_ffff, 4);
        self.write(0x24, base >> 32, 4);
        self.write(0x28, base + 0x1000, 8);
        self.write(0x30, base + 0x2000, 8);
        self.write(0x1c, 1, 2);
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap()
    }
}

#[test]
fn identity_is_modern_virtio() {
    let f = fixture();
    let config = f.dev.config();
    assert_eq!(config.u16_at(0), 0x1af4);
    assert_eq!(config.u16_at(2), 0x1042, "0x1040 + block");
    assert_eq!(config.u8_at(8), 1, "revision 1");
    assert_eq!(config.u32_at(8) >> 8, 0x01_80_00);
    assert_eq!(config.u16_at(0x2c), 0x1af4);
    assert_eq!(config.u16_at(0x2e), 0x40);
    assert_eq!(config.u8_at(0x3d), 0, "no INTx pin");
    assert_eq!(f.dev.msix_vectors(), 3);
}

/// Walks the capability list through ECAM, as a driver does.
fn capabilities(ecam: &mut PciConfigMmio, slot: u64) -> Vec<(u8, Vec<u8>)> {
    let read = |ecam: &mut PciConfigMmio, register: u64, len: usize| {
        let mut data = [0u8; 4];
        ecam.read(slot << 15 | register, &mut data[..len]);
        u32::from_le_bytes(data)
    };
    let mut caps = Vec::new();
    let mut next = read(ecam, u64::from(CAPABILITY_POINTER), 1) as u64;
    while next != 0 && caps.len() < 32 {
        let id = read(ecam, next, 1) as u8;
        let body: Vec<u8> = (0..20).map(|i| read(ecam, next + i, 1) as u8).collect();
        caps.push((next as u8, body));
        assert_eq!(id, caps.last().unwrap().1[0]);
        next = read(ecam, next + 1, 1) as u64;
    }
    caps
}

fn le32(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes[..4].try_into().unwrap())
}

#[test]
fn capability_list_describes_every_region() {
    let f = fixture();
    let mut root = PciRoot::new();
    let mut allocator = BarAllocator::new(0xc000_0000, 0x2000_0000, 0x40_0000_0000, 1 << 38);
    let slot = root.add_device(Box::new(f.dev), &mut allocator).unwrap();
    let root = Arc::new(Mutex::new(root));
    let mut ecam = PciConfigMmio::new(root.clone());
    let caps = capabilities(&mut ecam, u64::from(slot));
    let msix: Vec<_> = caps.iter().filter(|(_, c)| c[0] == 0x11).collect();
    assert_eq!(msix.len(), 1);
    let body = &msix[0].1;
    assert_eq!(
        u16::from_le_bytes([body[2], body[3]]) & 0x7ff,
        2,
        "3 vectors"
    );
    assert_eq!(le32(&body[4..]), 0x4000, "table in bar 0 at 0x4000");
    assert_eq!(le32(&body[8..]), 0x5000, "pba in bar 0 at 0x5000");
    let virtio: Vec<_> = caps
        .iter()
        .filter(|(_, c)| c[0] == 0x09)
        .map(|(_, c)| (c[3], c[2], c[4], le32(&c[8..]), le32(&c[12..])))
        .collect();
    assert_eq!(
        virtio,
        vec![
            (CAP_COMMON_CFG, 16, 0, 0x0000, 0x38),
            (CAP_ISR_CFG, 16, 0, 0x1000, 4),
            (CAP_DEVICE_CFG, 16, 0, 0x2000, 0x1000),
            (CAP_NOTIFY_CFG, 20, 0, 0x3000, 8),
            (CAP_PCI_CFG, 20, 0, 0, 0),
        ]
    );
    let notify = caps
        .iter()
        .find(|(_, c)| c[0] == 0x09 && c[3] == CAP_NOTIFY_CFG)
        .unwrap();
    assert_eq!(le32(&notify.1[16..]), NOTIFY_OFF_MULTIPLIER);
    for (offset, _) in &caps {
        assert_eq!(offset % 4, 0, "capabilities are dword aligned");
    }
    assert_eq!(
        root.lock().unwrap().bar(slot, 0),
        Some((0xc000_0000, VIRTIO_BAR_SIZE)),
        "the 64-bit bar is placed below 4 GiB"
    );
}

#[test]
fn driver_handshake_activates_enabled_queues() {
    let mut f = fixture();
    f.set_status(0);
    assert_eq!(f.status(), 0);
    assert_eq!(f.read(0x12, 2), 2, "num_queues");
    assert_eq!(f.features(), F_VERSION_1 | F_SIZE_MAX | F_EVENT_IDX);
    f.negotiate(F_VERSION_1 | F_EVENT_IDX);
    assert_eq!(f.status(), ACK | DRIVER | FEATURES_OK);
    assert_eq!(f.log().acked, vec![F_VERSION_1 | F_EVENT_IDX]);
    f.write(0x08, 0, 4);
    assert_eq!(f.read(0x0c, 4), F_EVENT_IDX);
    // Queue 0 is set up and enabled; queue 1 reports its size and stays off.
    f.write(0x16, 1, 2);
    assert_eq!(f.read(0x18, 2), 8, "queue 1 max size");
    assert_eq!(f.read(0x1e, 2), 1, "queue 1 notify_off");
    f.setup_queue(0, 8, 0x1_0000);
    assert_eq!(f.read(0x18, 2), 8);
    assert_eq!(f.read(0x1c, 2), 1);
    assert_eq!(f.read(0x20, 8), 0x1_0000);
    assert_eq!(f.read(0x28, 4), 0x1_1000);
    assert!(f.log().activations.is_empty());
    f.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(f.status(), ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    let expected = SeenQueue {
        index: 0,
        size: 8,
        desc: 0x1_0000,
        avail: 0x1_1000,
        used: 0x1_2000,
        event_idx: true,
    };
    assert_eq!(f.log().activations, vec![vec![expected]]);
    // Queue setup is frozen once live.
    f.write(0x16, 0, 2);
    f.write(0x18, 4, 2);
    f.write(0x20, 0x5000, 8);
    assert_eq!((f.read(0x18, 2), f.read(0x20, 8)), (8, 0x1_0000));
    // Features can no longer change.
    f.set_features(F_VERSION_1);
    f.write(0x08, 0, 4);
    assert_eq!(f.read(0x0c, 4), F_EVENT_IDX);
}

#[test]
fn feature_sets_without_version_1_or_beyond_the_offer_are_refused() {
    for bad in [F_SIZE_MAX, F_VERSION_1 | 1 << 5, F_VERSION_1 | 1 << 40] {
        let mut f = fixture();
        f.negotiate(bad);
        assert_eq!(f.status(), ACK | DRIVER, "features {bad:#x}");
        assert!(f.log().acked.is_empty());
        f.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(f.status(), ACK | DRIVER, "no DRIVER_OK without FEATURES_OK");
        assert!(f.log().activations.is_empty());
        f.set_status(ACK | DRIVER | FAILED);
        assert_eq!(f.status(), ACK | DRIVER | FAILED);
    }
}

#[test]
fn status_steps_need_their_predecessors() {
    let mut f = fixture();
    f.set_status(DRIVER);
    assert_eq!(f.status(), 0);
    f.set_status(ACK | FEATURES_OK);
    assert_eq!(f.status(), ACK);
    f.set_status(DRIVER | 0x40);
    assert_eq!(
        f.status(),
        ACK | DRIVER,
        "bits only accumulate; NEEDS_RESET is the device's"
    );
    f.set_features(F_VERSION_1);
    f.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(f.status(), ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(f.log().activations, vec![vec![]], "no queue enabled");
    f.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(f.log().activations.len(), 1, "activated once");
}

#[test]
fn reset_stops_the_device_and_clears_the_registers() {
    let mut f = fixture();
    f.negotiate(F_VERSION_1);
    f.write(0x10, 0, 2);
    f.write(0x16, 0, 2);
    f.write(0x1a, 1, 2);
    f.setup_queue(0, 4, 0x2_0000);
    f.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(f.log().activations.len(), 1);
    f.dev.notify[0].write(3).unwrap();
    f.set_status(0);
    assert_eq!(f.log().resets, 1);
    assert_eq!(f.status(), 0);
    assert_eq!(f.read(0x10, 2), u64::from(NO_VECTOR));
    f.write(0x16, 0, 2);
    assert_eq!(f.read(0x18, 2), 16, "size back to the maximum");
    assert_eq!(f.read(0x1a, 2), u64::from(NO_VECTOR));
    assert_eq!((f.read(0x1c, 2), f.read(0x20, 8)), (0, 0));
    f.write(0x08, 0, 4);
    assert_eq!(f.read(0x0c, 4), 0, "driver features forgotten");
    assert!(f.dev.notify[0].read().is_err(), "stale kicks dropped");
    // A second life works.
    f.negotiate(F_VERSION_1);
    f.setup_queue(1, 8, 0x3_0000);
    f.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(f.log().activations.len(), 2);
    assert_eq!(f.log().activations[1][0].index, 1);
}

/// Enables MSI-X through config space and unmasks every vector with
/// message data = vector.
fn enable_msix(f: &mut Fixture) {
    let control = f.dev.msix_cap + 2;
    f.dev
        .write_config(control, &MSIX_CONTROL_ENABLE.to_le_bytes());
    for vector in 0..u64::from(f.dev.msix_vectors()) {
        let entry = MSIX_TABLE_OFFSET + 16 * vector;
        f.write(entry, 0xfee0_0000, 8);
        f.write(entry + 8, vector, 4);
        f.write(entry + 12, 0, 4);
    }
}

fn message(vector: u16) -> MsiMessage {
    MsiMessage {
        address: 0xfee0_0000,
        data: u32::from(vector),
    }
}

#[test]
fn bad_queue_setup_needs_reset_and_raises_the_config_vector() {
    for (size, desc) in [
        (12, 0x1_0000),
        (32, 0x1_0000),
        (8, 0x1_0008),
        (8, 0x20_0000),
    ] {
        let mut f = fixture();
        enable_msix(&mut f);
        f.negotiate(F_VERSION_1);
        f.write(0x10, 2, 2);
        f.setup_queue(0, size, desc);
        f.router.take();
        f.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
        let status = f.status();
        assert_eq!(
            status & NEEDS_RESET,
            NEEDS_RESET,
            "size {size} desc {desc:#x}"
        );
        assert!(f.log().activations.is_empty());
        assert_eq!(f.router.take(), vec![RouterEvent::Signal(2)]);
        assert_eq!(f.read(ISR_OFFSET, 1), 2, "config change in the ISR");
        assert_eq!(f.read(0x15, 1), 1, "config generation moved");
    }
    let mut f = fixture_with(&[16], true);
    f.negotiate(F_VERSION_1);
    f.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(f.status() & NEEDS_RESET, NEEDS_RESET, "device refused");
    let counters = f.dev.counters();
    assert!(
        counters.contains(&("activation_failures", 1)),
        "{counters:?}"
    );
}

#[test]
fn a_running_device_can_report_that_it_needs_a_reset() {
    let mut f = fixture();
    enable_msix(&mut f);
    f.negotiate(F_VERSION_1);
    f.write(0x10, 2, 2);
    f.setup_queue(0, 8, 0x1_0000);
    f.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    let live = ACK | DRIVER | FEATURES_OK | DRIVER_OK;
    assert_eq!(f.status(), live);
    f.router.take();
    let interrupt = f.log().interrupt.clone().unwrap();
    interrupt.set_needs_reset();
    interrupt.set_needs_reset();
    assert_eq!(f.status(), live | NEEDS_RESET);
    assert_eq!(f.dev.device_status(), live | NEEDS_RESET);
    assert_eq!(
        f.router.take(),
        vec![RouterEvent::Signal(2)],
        "one config interrupt"
    );
    assert_eq!(f.read(ISR_OFFSET, 1), 2, "config change in the ISR");
    assert_eq!(f.read(0x15, 1), 1, "config generation moved");
    // The driver's reset clears it; a second life starts clean.
    f.set_status(0);
    assert_eq!(f.status(), 0);
    f.negotiate(F_VERSION_1);
    f.setup_queue(0, 8, 0x1_0000);
    f.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(f.status(), live);
    assert_eq!(f.log().activations.len(), 2);
}

#[test]
fn device_interrupts_use_the_programmed_vectors_and_respect_masks() {
    let mut f = fixture();
    enable_msix(&mut f);
    assert_eq!(
        f.router.take(),
        vec![
            RouterEvent::Route(0, Some(message(0))),
            RouterEvent::Route(1, Some(message(1))),
            RouterEvent::Route(2, Some(message(2))),
        ]
    );
    f.negotiate(F_VERSION_1);
    f.write(0x10, 0, 2);
    f.write(0x16, 1, 2);
    f.write(0x1a, 2, 2);
    assert_eq!(f.read(0x1a, 2), 2);
    f.write(0x1a, 9, 2);
    assert_eq!(
        f.read(0x1a, 2),
        u64::from(NO_VECTOR),
        "vector outside the table"
    );
    f.write(0x1a, 2, 2);
    f.setup_queue(1, 8, 0x1_0000);
    f.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    let interrupt = f.log().interrupt.clone().unwrap();
    interrupt.trigger(InterruptKind::Queue(1)).unwrap();
    interrupt.trigger(InterruptKind::Config).unwrap();
    interrupt.trigger(InterruptKind::Queue(0)).unwrap();
    assert_eq!(
        f.router.take(),
        vec![RouterEvent::Signal(2), RouterEvent::Signal(0)]
    );
    // Mask vector 2 in the table: the interrupt waits in the PBA.
    f.write(MSIX_TABLE_OFFSET + 16 * 2 + 12, 1, 4);
    interrupt.trigger(InterruptKind::Queue(1)).unwrap();
    assert_eq!(f.router.take(), vec![RouterEvent::Route(2, None)]);
    assert_eq!(f.read(MSIX_PBA_OFFSET, 8), 0b100);
    f.write(MSIX_TABLE_OFFSET + 16 * 2 + 12, 0, 4);
    assert_eq!(
        f.router.take(),
        vec![
            RouterEvent::Route(2, Some(message(2))),
            RouterEvent::Signal(2)
        ]
    );
    assert_eq!(f.read(MSIX_PBA_OFFSET, 8), 0);
    // Disabling MSI-X: nothing is signalled.
    f.dev.write_config(f.dev.msix_cap + 2, &[0, 0]);
    f.router.take();
    interrupt.trigger(InterruptKind::Queue(1)).unwrap();
    assert_eq!(f.router.take(), vec![]);
    assert_eq!(f.read(ISR_OFFSET, 1), 1 | 2, "queue and config bits");
    assert_eq!(f.read(ISR_OFFSET, 1), 0, "read clears");
}

#[test]
fn queue_irqfds_reach_the_device_and_replay_after_a_mask() {
    let mut f = fixture();
    let irqfd = f.router.add_irqfd(2);
    enable_msix(&mut f);
    f.negotiate(F_VERSION_1);
    f.write(0x16, 1, 2);
    f.write(0x1a, 2, 2);
    f.setup_queue(1, 8, 0x1_0000);
    f.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    let interrupt = f.log().interrupt.clone().unwrap();
    assert!(
        interrupt.queue_eventfd(0).is_none(),
        "queue 0 has no vector"
    );
    let direct = interrupt.queue_eventfd(1).unwrap();
    direct.write(1).unwrap();
    assert_eq!(irqfd.read().unwrap(), 1, "the backend raises vector 2");
    f.router.take();
    // A backend write while masked is lost in KVM: unmasking replays it.
    f.write(MSIX_TABLE_OFFSET + 16 * 2 + 12, 1, 4);
    f.write(MSIX_TABLE_OFFSET + 16 * 2 + 12, 0, 4);
    assert_eq!(
        f.router.take(),
        vec![
            RouterEvent::Route(2, None),
            RouterEvent::Route(2, Some(message(2))),
            RouterEvent::Signal(2)
        ]
    );
    // After a device reset the vector is an ordinary one again.
    f.set_status(0);
    f.write(MSIX_TABLE_OFFSET + 16 * 2 + 12, 1, 4);
    f.write(MSIX_TABLE_OFFSET + 16 * 2 + 12, 0, 4);
    assert_eq!(
        f.router.take(),
        vec![
            RouterEvent::Route(2, None),
            RouterEvent::Route(2, Some(message(2)))
        ]
    );
}

#[test]
fn notifications_reach_the_queue_eventfds() {
    let mut f = fixture();
    let offsets: Vec<(u64, u16)> = f
        .dev
        .notify_eventfds()
        .iter()
        .map(|(offset, queue, _)| (*offset, *queue))
        .collect();
    assert_eq!(offsets, vec![(0x3000, 0), (0x3004, 1)]);
    f.write(0x3004, 1, 2);
    f.write(0x3004, 1, 2);
    f.write(0x3000, 0, 4);
    let events = f.dev.notify_eventfds();
    assert_eq!(events[1].2.read().unwrap(), 2);
    assert_eq!(events[0].2.read().unwrap(), 1);
    drop(events);
    f.write(0x3008, 2, 2);
    f.write(0x3003, 0, 2);
    let counters = f.dev.counters();
    assert!(counters.contains(&("ignored_accesses", 2)), "{counters:?}");
}

#[test]
fn device_config_is_forwarded() {
    let mut f = fixture();
    assert_eq!(f.read(0x2010, 4), 0x1312_1110);
    f.write(0x2004, 0xab, 1);
    assert_eq!(f.log().config_writes, vec![(4, vec![0xab])]);
}

#[test]
fn pci_cfg_capability_reaches_the_bar() {
    let mut f = fixture();
    let cap = f.dev.pci_cfg_cap;
    // Read num_queues (2 bytes at 0x12) through the window.
    f.dev.write_config(cap + 4, &[VIRTIO_BAR]);
    f.dev.write_config(cap + 8, &0x12u32.to_le_bytes());
    f.dev.write_config(cap + 12, &2u32.to_le_bytes());
    let mut data = [0u8; 4];
    f.dev.read_config(cap + 16, &mut data);
    assert_eq!(u32::from_le_bytes(data), 2);
    // Write device_status = ACK through it.
    f.dev.write_config(cap + 8, &0x14u32.to_le_bytes());
    f.dev.write_config(cap + 12, &1u32.to_le_bytes());
    f.dev.write_config(cap + 16, &[ACK, 0, 0, 0]);
    assert_eq!(f.status(), ACK);
    // An unaligned or oversized request does nothing.
    f.dev.write_config(cap + 8, &0x13u32.to_le_bytes());
    f.dev.write_config(cap + 12, &2u32.to_le_bytes());
    f.dev.write_config(cap + 16, &[0, 0, 0, 0]);
    f.dev.write_config(cap + 12, &3u32.to_le_bytes());
    f.dev.read_config(cap + 16, &mut data);
    assert_eq!(f.status(), ACK);
}

#[test]
fn driver_reaches_the_device_through_the_root() {
    let f = fixture();
    let log = f.log.clone();
    let mut root = PciRoot::new();
    let base = 0xc000_0000;
    let mut allocator = BarAllocator::new(base, 0x2000_0000, 0, 0);
    let slot = u64::from(root.add_device(Box::new(f.dev), &mut allocator).unwrap());
    let root = Arc::new(Mutex::new(root));
    let mut ecam = PciConfigMmio::new(root.clone());
    let mut window = PciMmioWindow::new(root, base);
    ecam.write(
        slot << 15 | u64::from(COMMAND),
        &COMMAND_MEMORY.to_le_bytes(),
    );
    let mut data = [0u8; 2];
    window.read(0x12, &mut data);
    assert_eq!(
        u16::from_le_bytes(data),
        2,
        "num_queues via bar 0 at {base:#x}"
    );
    window.write(0x14, &[ACK]);
    window.read(0x14, &mut data[..1]);
    assert_eq!(data[0], ACK);
    window.write(0x2001, &[7]);
    assert_eq!(log.lock().unwrap().config_writes, vec![(1, vec![7])]);
}

#[test]
fn construction_checks_the_device() {
    let router = || Arc::new(RecordingRouter::default()) as Arc<dyn MsiRouter>;
    let (device, _) = fake(&[], false);
    assert!(matches!(
        VirtioPciDevice::new(device, memory(), router()),
        Err(VirtioPciError::QueueCount { count: 0 })
    ));
    let (device, _) = fake(&[16, 12], false);
    assert!(matches!(
        VirtioPciDevice::new(device, memory(), router()),
        Err(VirtioPciError::QueueMaxSize { index: 1, size: 12 })
    ));
    let (device, _) = fake(&[16; 256], false);
    assert!(VirtioPciDevice::new(device, memory(), router()).is_err());
    let (device, _) = fake(&[16; 255], false);
    let dev = VirtioPciDevice::new(device, memory(), router()).unwrap();
    assert_eq!(dev.msix_vectors(), 256);
    assert_eq!(dev.notify_eventfds().last().unwrap().0, 0x3000 + 4 * 254);
}

#[test]
fn odd_accesses_never_panic() {
    let mut f = fixture();
    enable_msix(&mut f);
    let mut data = [0u8; 16];
    let offsets = [
        0,
        1,
        3,
        0x13,
        0x14,
        0x36,
        0x37,
        0x38,
        0xfff,
        0x1000,
        0x1003,
        0x1fff,
        0x2ffe,
        0x2fff,
        0x3000,
        0x3002,
        0x3fff,
        0x402c,
        0x4030,
        0x5000,
        0x5007,
        0x7ff8,
        0x7fff,
        0x8000,
        u64::MAX - 2,
    ];
    for offset in offsets {
        for len in [0, 1, 2, 3, 4, 8, 16] {
            f.dev.read_bar(VIRTIO_BAR, offset, &mut data[..len]);
            f.dev.write_bar(VIRTIO_BAR, offset, &data[..len]);
            f.dev.read_bar(3, offset, &mut data[..len]);
            f.dev.write_bar(3, offset, &data[..len]);
        }
    }
    for offset in (0..0x1010u16).step_by(3).chain([u16::MAX - 1]) {
        f.dev.read_config(offset, &mut data[..5]);
        f.dev.write_config(offset, &[0xff; 5]);
    }
    assert_eq!(f.dev.config().u16_at(0), 0x1af4);
}
