//! The virtio-pci common configuration structure and what it drives:
//! feature negotiation, the device status state machine
//! (ACKNOWLEDGE → DRIVER → FEATURES_OK → DRIVER_OK, 0 resets), queue
//! setup, activation of the device with its queues at DRIVER_OK, and
//! reset.
//!
//! Queue registers hold exactly what the driver wrote; they are checked
//! (size a power of two up to the maximum, ring alignment, rings inside
//! guest memory) when the driver sets DRIVER_OK. A bad setup, or a device
//! that fails to activate, sets DEVICE_NEEDS_RESET and raises the
//! configuration interrupt; so does a running device that reports it
//! needs a reset (`VirtioInterrupt::set_needs_reset`).

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::{VirtioPciDevice, COMMON_LEN};
use crate::virtio::VIRTIO_F_VERSION_1;
use crate::virtio::{ActivateContext, ActivateError, GuestMemory, InterruptKind, VirtioInterrupt};

const ACKNOWLEDGE: u8 = VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
const DRIVER: u8 = VIRTIO_CONFIG_S_DRIVER as u8;
const DRIVER_OK: u8 = VIRTIO_CONFIG_S_DRIVER_OK as u8;
const FEATURES_OK: u8 = VIRTIO_CONFIG_S_FEATURES_OK as u8;
const NEEDS_RESET: u8 = VIRTIO_CONFIG_S_NEEDS_RESET as u8;
const FAILED: u8 = VIRTIO_CONFIG_S_FAILED as u8;

// Register offsets in the common configuration structure.
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

/// What the driver programmed for one queue.
#[derive(Clone, Copy, Debug)]
struct QueueRegs {
    max_size: u16,
    size: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        QueueRegs {
            max_size,
            size: max_size,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }

    /// The queue as `virtio_queue` checks it, ready to hand to the device.
    fn build(&self, index: u16, features: u64, mem: &GuestMemory) -> Result<Queue, ActivateError> {
        let bad = |what: String| ActivateError::BadQueue(format!("queue {index}: {what}"));
        let mut queue = Queue::new(self.max_size).map_err(|e| bad(e.to_string()))?;
        queue
            .try_set_size(self.size)
            .map_err(|e| bad(e.to_string()))?;
        queue
            .try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(|e| bad(e.to_string()))?;
        queue
            .try_set_avail_ring_address(GuestAddress(self.driver))
            .map_err(|e| bad(e.to_string()))?;
        queue
            .try_set_used_ring_address(GuestAddress(self.device))
            .map_err(|e| bad(e.to_string()))?;
        queue.set_event_idx(features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        queue.set_ready(true);
        if !queue.is_valid(mem) {
            return Err(bad("rings are outside guest memory".to_string()));
        }
        Ok(queue)
    }
}

/// The common configuration registers.
pub(super) struct CommonConfig {
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    queues: Vec<QueueRegs>,
}

impl CommonConfig {
    /// Registers after reset for queues of `max_sizes`.
    pub(super) fn new(max_sizes: &[u16]) -> Self {
        CommonConfig {
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            queues: max_sizes.iter().map(|&max| QueueRegs::new(max)).collect(),
        }
    }

    fn selected(&self) -> Option<&QueueRegs> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// The selected queue, if the driver may still change its setup.
    fn selected_for_setup(&mut self) -> Option<&mut QueueRegs> {
        let live = self.status & DRIVER_OK != 0;
        let queue = self.queues.get_mut(usize::from(self.queue_select))?;
        (!live && !queue.enabled).then_some(queue)
    }
}

/// Replaces `bytes` of the 64-bit `value` with `data` at byte `at`.
fn merge_u64(value: u64, at: u64, data: &[u8]) -> u64 {
    let mut bytes = value.to_le_bytes();
    bytes[at as usize..at as usize + data.len()].copy_from_slice(data);
    u64::from_le_bytes(bytes)
}

impl VirtioPciDevice {
    /// Features offered: the device's and VERSION_1.
    fn offered_features(&self) -> u64 {
        self.device.device_features() | 1 << VIRTIO_F_VERSION_1
    }

    /// The device status as the driver reads it: its own bits plus
    /// DEVICE_NEEDS_RESET if the running device reported it.
    pub(super) fn status_register(&self) -> u8 {
        let reported = if self.interrupt.needs_reset() {
            NEEDS_RESET
        } else {
            0
        };
        self.common.status | reported
    }

    /// The structure as bytes, for reads of any width.
    fn common_bytes(&self) -> [u8; COMMON_LEN as usize] {
        let c = &self.common;
        let mut bytes = [0u8; COMMON_LEN as usize];
        let mut put = |offset: u64, value: &[u8]| {
            bytes[offset as usize..offset as usize + value.len()].copy_from_slice(value);
        };
        let word = |features: u64, select: u32| match select {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        };
        let device_word = word(self.offered_features(), c.device_feature_select);
        let driver_word = word(c.driver_features, c.driver_feature_select);
        put(
            DEVICE_FEATURE_SELECT,
            &c.device_feature_select.to_le_bytes(),
        );
        put(DEVICE_FEATURE, &device_word.to_le_bytes());
        put(
            DRIVER_FEATURE_SELECT,
            &c.driver_feature_select.to_le_bytes(),
        );
        put(DRIVER_FEATURE, &driver_word.to_le_bytes());
        put(
            CONFIG_MSIX_VECTOR,
            &self.interrupt.config_vector().to_le_bytes(),
        );
        put(NUM_QUEUES, &(c.queues.len() as u16).to_le_bytes());
        put(DEVICE_STATUS, &[self.status_register()]);
        put(CONFIG_GENERATION, &[self.interrupt.config_generation()]);
        put(QUEUE_SELECT, &c.queue_select.to_le_bytes());
        if let Some(queue) = c.selected() {
            let vector = self.interrupt.queue_vector(c.queue_select);
            put(QUEUE_SIZE, &queue.size.to_le_bytes());
            put(QUEUE_MSIX_VECTOR, &vector.to_le_bytes());
            put(QUEUE_ENABLE, &u16::from(queue.enabled).to_le_bytes());
            put(QUEUE_NOTIFY_OFF, &c.queue_select.to_le_bytes());
            put(QUEUE_DESC, &queue.desc.to_le_bytes());
            put(QUEUE_DRIVER, &queue.driver.to_le_bytes());
            put(QUEUE_DEVICE, &queue.device.to_le_bytes());
        }
        bytes
    }

    /// A driver read of the common configuration at `offset`.
    pub(super) fn read_common(&mut self, offset: u64, data: &mut [u8]) {
        let bytes = self.common_bytes();
        let start = offset as usize;
        data.copy_from_slice(&bytes[start..start + data.len()]);
    }

    /// A driver write of the common configuration at `offset`; only
    /// accesses of a register's width (or 32-bit halves of the 64-bit
    /// queue addresses) count.
    pub(super) fn write_common(&mut self, offset: u64, data: &[u8]) {
        let value = data
            .iter()
            .rev()
            .fold(0u64, |acc, &byte| acc << 8 | u64::from(byte));
        match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => self.common.device_feature_select = value as u32,
            (DRIVER_FEATURE_SELECT, 4) => self.common.driver_feature_select = value as u32,
            (DRIVER_FEATURE, 4) => self.write_driver_features(value as u32),
            (CONFIG_MSIX_VECTOR, 2) => self.interrupt.set_config_vector(value as u16),
            (DEVICE_STATUS, 1) => self.write_status(value as u8),
            (QUEUE_SELECT, 2) => self.common.queue_select = value as u16,
            (QUEUE_SIZE, 2) => match self.common.selected_for_setup() {
                Some(queue) => queue.size = value as u16,
                None => self.counters.ignored_accesses += 1,
            },
            (QUEUE_MSIX_VECTOR, 2) => {
                let queue = self.common.queue_select;
                self.interrupt.set_queue_vector(queue, value as u16);
            }
            (QUEUE_ENABLE, 2) => match self.common.selected_for_setup() {
                Some(queue) if value == 1 => queue.enabled = true,
                _ => self.counters.ignored_accesses += 1,
            },
            (QUEUE_DESC..=0x37, 4 | 8) if offset.is_multiple_of(4) => {
                self.write_queue_address(offset, data)
            }
            _ => self.counters.ignored_accesses += 1,
        }
    }

    fn write_queue_address(&mut self, offset: u64, data: &[u8]) {
        let Some(queue) = self.common.selected_for_setup() else {
            self.counters.ignored_accesses += 1;
            return;
        };
        let field = match offset & !7 {
            QUEUE_DESC => &mut queue.desc,
            QUEUE_DRIVER => &mut queue.driver,
            _ => &mut queue.device,
        };
        let at = offset & 7;
        if at + data.len() as u64 <= 8 {
            *field = merge_u64(*field, at, data);
        }
    }

    /// Stores one 32-bit word of the driver's features while the driver
    /// negotiates (DRIVER set, FEATURES_OK not yet).
    fn write_driver_features(&mut self, value: u32) {
        let c = &mut self.common;
        let negotiating = c.status & DRIVER != 0 && c.status & FEATURES_OK == 0;
        let shift = match c.driver_feature_select {
            0 => 0,
            1 => 32,
            _ => u32::MAX,
        };
        if !negotiating || shift == u32::MAX {
            self.counters.ignored_accesses += 1;
            return;
        }
        let kept = c.driver_features & !(u64::from(u32::MAX) << shift);
        c.driver_features = kept | u64::from(value) << shift;
    }

    /// The device status state machine. Bits only go on (0 resets); each
    /// step needs the previous one, FEATURES_OK needs an acceptable
    /// feature set and DRIVER_OK activates the device.
    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.common.status;
        let requested = value & !old;
        let mut status = old | (requested & (ACKNOWLEDGE | FAILED));
        if requested & DRIVER != 0 && status & ACKNOWLEDGE != 0 {
            status |= DRIVER;
        }
        if requested & FEATURES_OK != 0 && status & DRIVER != 0 && self.features_acceptable() {
            self.device.ack_features(self.common.driver_features);
            status |= FEATURES_OK;
        }
        let activate = requested & DRIVER_OK != 0
            && status & FEATURES_OK != 0
            && status & (NEEDS_RESET | FAILED) == 0;
        if activate {
            status |= DRIVER_OK;
        }
        self.common.status = status;
        if activate {
            self.activate();
        }
    }

    /// Whether the driver's features are a subset of the offer and include
    /// VERSION_1.
    fn features_acceptable(&self) -> bool {
        let features = self.common.driver_features;
        features & !self.offered_features() == 0 && features & 1 << VIRTIO_F_VERSION_1 != 0
    }

    /// Hands the enabled queues to the device; on failure marks the device
    /// as needing a reset.
    fn activate(&mut self) {
        let result = self.enabled_queues().and_then(|queues| {
            let context = ActivateContext {
                mem: self.mem.clone(),
                interrupt: self.interrupt.clone(),
                queues,
            };
            self.device.activate(context)
        });
        match result {
            Ok(()) => self.counters.activations += 1,
            Err(_) => {
                self.counters.activation_failures += 1;
                self.common.status |= NEEDS_RESET;
                let _ = self.interrupt.trigger(InterruptKind::Config);
            }
        }
    }

    fn enabled_queues(&self) -> Result<Vec<(u16, Queue, EventFd)>, ActivateError> {
        let features = self.common.driver_features;
        let mut queues = Vec::new();
        for (index, regs) in self.common.queues.iter().enumerate() {
            if !regs.enabled {
                continue;
            }
            let index = index as u16;
            let queue = regs.build(index, features, &self.mem)?;
            let event = self.notify[usize::from(index)]
                .try_clone()
                .map_err(ActivateError::Backend)?;
            queues.push((index, queue, event));
        }
        Ok(queues)
    }

    /// Device reset: the device stops and forgets its state, registers and
    /// vectors return to their initial values, pending kicks are dropped.
    pub(super) fn reset(&mut self) {
        // The eventfds handed back are clones of ours: dropping them is fine.
        drop(self.device.reset());
        let max_sizes: Vec<u16> = self.common.queues.iter().map(|q| q.max_size).collect();
        self.common = CommonConfig::new(&max_sizes);
        self.interrupt.reset();
        for event in &self.notify {
            // Nothing to read is fine: the counter was already zero.
            let _ = event.read();
        }
        self.counters.resets += 1;
    }
}
