//! The virtio-pci modern (1.x, non-transitional) transport: a PCI function
//! wrapping a [`VirtioDevice`]. This module owns its PCI identity, the
//! layout of its single BAR, the vendor-specific capabilities pointing into
//! it, the PCI configuration access capability, and dispatch of BAR
//! accesses to the common configuration (`common`), ISR, device
//! configuration, notification and MSI-X regions.
//!
//! BAR 0 (64-bit memory, not prefetchable, [`VIRTIO_BAR_SIZE`] bytes):
//!
//! ```text
//! 0x0000 common configuration    0x3000 notify: queue i at 0x3000 + 4 * i
//! 0x1000 ISR status (read clears) 0x4000 MSI-X table (queues + 1 vectors)
//! 0x2000 device configuration    0x5000 MSI-X pending-bit array
//! ```
//!
//! Each queue has its own notification address, so the VMM can register
//! one KVM ioeventfd per queue without data match
//! ([`VirtioPciDevice::notify_eventfds`]); a notification that reaches the
//! transport instead (no ioeventfd) is forwarded to the same eventfd.

mod common;
mod interrupt;

use std::io;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use self::common::CommonConfig;
use self::interrupt::InterruptState;
use super::config::{overlaps, BarSpec, ConfigSpace, PciConfigError, PciIds};
use super::msix::{Msix, MsixCapability, MsixError, MSIX_CONTROL_OFFSET};
use super::{MsiRouter, PciDevice};
use crate::virtio::{GuestMemory, VirtioDevice};

pub use self::interrupt::NO_VECTOR;

/// PCI vendor ID of virtio devices.
pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
/// PCI device ID of a modern virtio device of type 0.
pub const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;
/// PCI subsystem ID of modern virtio devices (0x40 or above).
pub const VIRTIO_PCI_SUBSYSTEM: u16 = 0x40;
/// The BAR holding every virtio structure and the MSI-X table.
pub const VIRTIO_BAR: u8 = 0;
/// Size of [`VIRTIO_BAR`].
pub const VIRTIO_BAR_SIZE: u64 = 0x8000;
/// Offset of the common configuration structure.
pub const COMMON_OFFSET: u64 = 0x0000;
/// Length of the common configuration structure.
pub const COMMON_LEN: u64 = 0x38;
/// Offset of the ISR status register.
pub const ISR_OFFSET: u64 = 0x1000;
/// Length of the ISR region.
pub const ISR_LEN: u64 = 4;
/// Offset of the device-specific configuration.
pub const DEVICE_CONFIG_OFFSET: u64 = 0x2000;
/// Length of the device-specific configuration region.
pub const DEVICE_CONFIG_LEN: u64 = 0x1000;
/// Offset of the notification region.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between the notification addresses of consecutive queues.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Offset of the MSI-X table.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// Offset of the MSI-X pending-bit array.
pub const MSIX_PBA_OFFSET: u64 = 0x5000;
/// Most queues a device may have (one vector each plus one for config
/// changes fill the 4 KiB table region).
pub const MAX_QUEUES: usize = 255;

/// Vendor-specific capability ID.
const VENDOR_CAPABILITY_ID: u8 = 0x09;
/// `cfg_type` of the common configuration capability.
pub const CAP_COMMON_CFG: u8 = 1;
/// `cfg_type` of the notification capability.
pub const CAP_NOTIFY_CFG: u8 = 2;
/// `cfg_type` of the ISR capability.
pub const CAP_ISR_CFG: u8 = 3;
/// `cfg_type` of the device configuration capability.
pub const CAP_DEVICE_CFG: u8 = 4;
/// `cfg_type` of the PCI configuration access capability.
pub const CAP_PCI_CFG: u8 = 5;
/// Length of `struct virtio_pci_cap`.
const CAP_LEN: usize = 16;
/// Offset of `pci_cfg_data` in the PCI configuration access capability.
const PCI_CFG_DATA: u16 = 16;

/// Errors building a virtio-pci function.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    /// The device has no queues or more than [`MAX_QUEUES`].
    #[error("virtio device has {count} queues; 1 to 255 are supported")]
    QueueCount {
        /// Number of queues the device declared.
        count: usize,
    },
    /// A queue's maximum size is not a power of two up to 32768.
    #[error("virtio queue {index} maximum size {size} is not a power of two up to 32768")]
    QueueMaxSize {
        /// Queue index.
        index: usize,
        /// Declared maximum size.
        size: u16,
    },
    /// The device type does not fit a PCI device ID.
    #[error("virtio device type {device_type} has no pci device id")]
    DeviceType {
        /// The device type.
        device_type: u32,
    },
    /// The configuration space could not be laid out.
    #[error("cannot lay out the virtio-pci configuration space")]
    Config(#[source] PciConfigError),
    /// The MSI-X table could not be created.
    #[error("cannot create the msi-x table")]
    Msix(#[source] MsixError),
    /// A queue notification eventfd could not be created.
    #[error("cannot create a queue notification eventfd")]
    EventFd(#[source] io::Error),
}

/// Transport counters.
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    activations: u64,
    activation_failures: u64,
    resets: u64,
    notify_failures: u64,
    ignored_accesses: u64,
}

/// A virtio device on PCI.
pub struct VirtioPciDevice {
    device: Box<dyn VirtioDevice>,
    config: ConfigSpace,
    mem: GuestMemory,
    interrupt: Arc<InterruptState>,
    notify: Vec<EventFd>,
    common: CommonConfig,
    msix_cap: u16,
    pci_cfg_cap: u16,
    counters: Counters,
}

impl VirtioPciDevice {
    /// Wraps `device`, whose queues live in `mem` and whose MSI-X vectors
    /// (one per queue plus one for configuration changes) are routed and
    /// raised by `router`. Creates one notification eventfd per queue.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        router: Arc<dyn MsiRouter>,
    ) -> Result<Self, VirtioPciError> {
        let max_sizes = device.queue_max_sizes().to_vec();
        check_queues(&max_sizes)?;
        let queues = max_sizes.len() as u16;
        let msix = Msix::new(queues + 1, router).map_err(VirtioPciError::Msix)?;
        let msix_capability = MsixCapability {
            vectors: msix.vectors(),
            table_bar: VIRTIO_BAR,
            table_offset: MSIX_TABLE_OFFSET as u32,
            pba_bar: VIRTIO_BAR,
            pba_offset: MSIX_PBA_OFFSET as u32,
        };
        let mut config = ConfigSpace::new(&pci_ids(device.device_type())?);
        let (msix_cap, pci_cfg_cap) = add_capabilities(&mut config, &msix_capability, queues)
            .map_err(VirtioPciError::Config)?;
        let notify = (0..queues)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(VirtioPciError::EventFd)?;
        Ok(VirtioPciDevice {
            device,
            config,
            mem,
            interrupt: Arc::new(InterruptState::new(msix, queues)),
            notify,
            common: CommonConfig::new(&max_sizes),
            msix_cap,
            pci_cfg_cap,
            counters: Counters::default(),
        })
    }

    /// The notification address of each queue as (offset in
    /// [`VIRTIO_BAR`], queue, eventfd): register each as a KVM ioeventfd at
    /// BAR address + offset (2-byte writes; no data match needed).
    pub fn notify_eventfds(&self) -> Vec<(u64, u16, &EventFd)> {
        self.notify
            .iter()
            .enumerate()
            .map(|(queue, event)| (notify_offset(queue as u16), queue as u16, event))
            .collect()
    }

    /// Number of MSI-X vectors (queues + 1).
    pub fn msix_vectors(&self) -> u16 {
        self.interrupt.msix().vectors()
    }

    /// The wrapped device.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device status register as the driver reads it.
    pub fn device_status(&self) -> u8 {
        self.status_register()
    }

    fn read_region(&mut self, offset: u64, data: &mut [u8]) {
        let len = data.len() as u64;
        let msix_table_len = self.interrupt.msix().table_len();
        let msix_pba_len = self.interrupt.msix().pba_len();
        if let Some(at) = inside(offset, len, COMMON_OFFSET, COMMON_LEN) {
            self.read_common(at, data);
        } else if let Some(at) = inside(offset, len, ISR_OFFSET, ISR_LEN) {
            data.fill(0);
            match data.first_mut() {
                Some(isr) if at == 0 => *isr = self.interrupt.take_isr(),
                _ => {}
            }
        } else if let Some(at) = inside(offset, len, DEVICE_CONFIG_OFFSET, DEVICE_CONFIG_LEN) {
            self.device.read_config(at, data);
        } else if let Some(at) = inside(offset, len, MSIX_TABLE_OFFSET, msix_table_len) {
            self.interrupt.msix().read_table(at, data);
        } else if let Some(at) = inside(offset, len, MSIX_PBA_OFFSET, msix_pba_len) {
            self.interrupt.msix().read_pba(at, data);
        } else {
            // Notification registers are write-only; gaps read zero.
            data.fill(0);
        }
    }

    fn write_region(&mut self, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        let notify_len = u64::from(NOTIFY_OFF_MULTIPLIER) * self.notify.len() as u64;
        let msix_table_len = self.interrupt.msix().table_len();
        if let Some(at) = inside(offset, len, COMMON_OFFSET, COMMON_LEN) {
            self.write_common(at, data);
        } else if let Some(at) = inside(offset, len, DEVICE_CONFIG_OFFSET, DEVICE_CONFIG_LEN) {
            self.device.write_config(at, data);
        } else if let Some(at) = inside(offset, len, NOTIFY_OFFSET, notify_len) {
            self.notify_queue(at);
        } else if let Some(at) = inside(offset, len, MSIX_TABLE_OFFSET, msix_table_len) {
            self.interrupt.msix().write_table(at, data);
        } else {
            self.counters.ignored_accesses += 1;
        }
    }

    /// A notification written to the transport rather than caught by an
    /// ioeventfd: forwarded to the queue's eventfd.
    fn notify_queue(&mut self, at: u64) {
        let multiplier = u64::from(NOTIFY_OFF_MULTIPLIER);
        if !at.is_multiple_of(multiplier) {
            self.counters.ignored_accesses += 1;
            return;
        }
        match self.notify.get((at / multiplier) as usize) {
            Some(event) if event.write(1).is_ok() => {}
            _ => self.counters.notify_failures += 1,
        }
    }

    /// Serves the PCI configuration access capability: the BAR access the
    /// driver set up in `bar`, `offset` and `length`, if it is a valid one.
    fn pci_cfg_access(&mut self) -> Option<(u64, usize)> {
        let cap = self.pci_cfg_cap;
        let bar = self.config.u8_at(cap + 4);
        let offset = u64::from(self.config.u32_at(cap + 8));
        let len = self.config.u32_at(cap + 12) as usize;
        let valid = bar == VIRTIO_BAR
            && matches!(len, 1 | 2 | 4)
            && offset.is_multiple_of(len as u64)
            && offset + len as u64 <= VIRTIO_BAR_SIZE;
        valid.then_some((offset, len))
    }

    fn pci_cfg_read(&mut self) {
        let Some((offset, len)) = self.pci_cfg_access() else {
            return;
        };
        let mut value = [0u8; 4];
        self.read_region(offset, &mut value[..len]);
        self.config
            .set_bytes(self.pci_cfg_cap + PCI_CFG_DATA, &value);
    }

    fn pci_cfg_write(&mut self) {
        let Some((offset, len)) = self.pci_cfg_access() else {
            return;
        };
        let value = self
            .config
            .u32_at(self.pci_cfg_cap + PCI_CFG_DATA)
            .to_le_bytes();
        self.write_region(offset, &value[..len]);
    }
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        if overlaps(offset, data.len(), self.pci_cfg_cap + PCI_CFG_DATA, 4) {
            self.pci_cfg_read();
        }
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
        let control = self.msix_cap + MSIX_CONTROL_OFFSET;
        if overlaps(offset, data.len(), control, 2) {
            let value = self.config.u16_at(control);
            self.interrupt.msix().set_control(value);
        }
        if overlaps(offset, data.len(), self.pci_cfg_cap + PCI_CFG_DATA, 4) {
            self.pci_cfg_write();
        }
    }

    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        if bar == VIRTIO_BAR {
            self.read_region(offset, data);
        } else {
            data.fill(0xff);
        }
    }

    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar == VIRTIO_BAR {
            self.write_region(offset, data);
        }
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let msix = self.interrupt.msix().counters();
        let c = self.counters;
        let mut counters = vec![
            ("activations", c.activations),
            ("activation_failures", c.activation_failures),
            ("resets", c.resets),
            ("notify_failures", c.notify_failures),
            ("ignored_accesses", c.ignored_accesses),
            ("msi_route_failures", msix.route_failures),
            ("msi_signal_failures", msix.signal_failures),
            ("msi_dropped", msix.dropped),
        ];
        counters.extend(self.device.counters());
        counters
    }
}

/// Checks the number of queues and their maximum sizes.
fn check_queues(max_sizes: &[u16]) -> Result<(), VirtioPciError> {
    if max_sizes.is_empty() || max_sizes.len() > MAX_QUEUES {
        let count = max_sizes.len();
        return Err(VirtioPciError::QueueCount { count });
    }
    for (index, &size) in max_sizes.iter().enumerate() {
        if !size.is_power_of_two() || size > 32768 {
            return Err(VirtioPciError::QueueMaxSize { index, size });
        }
    }
    Ok(())
}

/// PCI identity of a virtio device of `device_type`.
fn pci_ids(device_type: u32) -> Result<PciIds, VirtioPciError> {
    let device = u16::try_from(device_type)
        .ok()
        .and_then(|t| VIRTIO_PCI_DEVICE_BASE.checked_add(t))
        .ok_or(VirtioPciError::DeviceType { device_type })?;
    let class = match device_type {
        1 => 0x02_00_00, // network controller, ethernet
        2 => 0x01_80_00, // mass storage, other
        3 => 0x07_80_00, // communication controller, other
        _ => 0xff_00_00, // unassigned class
    };
    Ok(PciIds {
        vendor: VIRTIO_PCI_VENDOR,
        device,
        revision: 1,
        class,
        subsystem_vendor: VIRTIO_PCI_VENDOR,
        subsystem: VIRTIO_PCI_SUBSYSTEM,
    })
}

/// A `struct virtio_pci_cap` of `cap_len` bytes for a region of BAR 0.
fn virtio_cap(cap_len: usize, cfg_type: u8, offset: u64, length: u64) -> Vec<u8> {
    let mut cap = vec![0u8; cap_len];
    cap[0] = VENDOR_CAPABILITY_ID;
    cap[2] = cap_len as u8;
    cap[3] = cfg_type;
    cap[4] = VIRTIO_BAR;
    cap[8..12].copy_from_slice(&(offset as u32).to_le_bytes());
    cap[12..16].copy_from_slice(&(length as u32).to_le_bytes());
    cap
}

/// Lays out BAR 0 and the capability list; returns the offsets of the
/// MSI-X and PCI configuration access capabilities.
fn add_capabilities(
    config: &mut ConfigSpace,
    msix: &MsixCapability,
    queues: u16,
) -> Result<(u16, u16), PciConfigError> {
    let bar = BarSpec {
        size: VIRTIO_BAR_SIZE,
        is_64bit: true,
        prefetchable: false,
    };
    config.add_bar(VIRTIO_BAR, bar)?;
    let (body, mask) = msix.bytes();
    let msix_cap = config.add_capability(&body, &mask)?;
    let read_only = [0u8; CAP_LEN];
    let regions = [
        (CAP_COMMON_CFG, COMMON_OFFSET, COMMON_LEN),
        (CAP_ISR_CFG, ISR_OFFSET, ISR_LEN),
        (CAP_DEVICE_CFG, DEVICE_CONFIG_OFFSET, DEVICE_CONFIG_LEN),
    ];
    for (cfg_type, offset, length) in regions {
        config.add_capability(&virtio_cap(CAP_LEN, cfg_type, offset, length), &read_only)?;
    }
    let notify_len = u64::from(NOTIFY_OFF_MULTIPLIER) * u64::from(queues);
    let mut notify = virtio_cap(CAP_LEN + 4, CAP_NOTIFY_CFG, NOTIFY_OFFSET, notify_len);
    notify[16..20].copy_from_slice(&NOTIFY_OFF_MULTIPLIER.to_le_bytes());
    config.add_capability(&notify, &[0u8; CAP_LEN + 4])?;
    // The driver chooses bar, offset, length and data of this one.
    let pci_cfg = virtio_cap(CAP_LEN + 4, CAP_PCI_CFG, 0, 0);
    let mut pci_cfg_mask = [0u8; CAP_LEN + 4];
    pci_cfg_mask[4] = 0xff;
    pci_cfg_mask[8..].fill(0xff);
    let pci_cfg_cap = config.add_capability(&pci_cfg, &pci_cfg_mask)?;
    Ok((msix_cap, pci_cfg_cap))
}

/// Offset in the BAR of the notification address of `queue`.
fn notify_offset(queue: u16) -> u64 {
    NOTIFY_OFFSET + u64::from(NOTIFY_OFF_MULTIPLIER) * u64::from(queue)
}

/// The offset inside `[start, start + len)` of an access of `size` bytes at
/// `offset`, if it lies entirely inside.
fn inside(offset: u64, size: u64, start: u64, len: u64) -> Option<u64> {
    let at = offset.checked_sub(start)?;
    (at.checked_add(size)? <= len).then_some(at)
}

#[cfg(test)]
mod tests;
