//! PCI: configuration space of type-0 functions and the host bridge, the
//! root bus reached through ports 0xCF8/0xCFC and an ECAM window, BARs,
//! MSI-X, and the virtio-pci (1.x modern) transport. This module owns the
//! [`PciDevice`] interface between a function and the root bus.

pub mod bus;
pub mod config;
pub mod msix;
pub mod virtio;

pub use bus::{
    BarAllocator, BarMove, PciConfigIo, PciConfigMmio, PciError, PciMmioWindow, PciRoot,
    CONFIG_IO_LEN,
};
pub use config::{BarSpec, ConfigSpace, PciConfigError, PciIds};
pub use msix::{MsiMessage, MsiRouter, Msix, MsixError};
pub use virtio::{VirtioPciDevice, VirtioPciError};

/// A PCI function on the root bus.
///
/// The bus handles BAR placement and decoding: it reads BAR addresses and
/// the memory-enable bit from [`PciDevice::config`] and hands each access
/// inside a BAR to [`PciDevice::read_bar`] / [`PciDevice::write_bar`] with
/// the offset inside that BAR.
pub trait PciDevice: Send {
    /// The function's configuration space.
    fn config(&self) -> &ConfigSpace;
    /// The function's configuration space, for the bus to program BARs.
    fn config_mut(&mut self) -> &mut ConfigSpace;
    /// A guest configuration read at `offset` (0..4096).
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.config().read(offset, data);
    }
    /// A guest configuration write at `offset` (0..4096).
    fn write_config(&mut self, offset: u16, data: &[u8]) {
        self.config_mut().write(offset, data);
    }
    /// A guest read at `offset` inside BAR `bar`.
    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]);
    /// A guest write at `offset` inside BAR `bar`.
    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]);
    /// Named counters (failures, requests) for diagnostics.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// Host bridge vendor ID (Intel), as Cloud Hypervisor presents.
pub const HOST_BRIDGE_VENDOR: u16 = 0x8086;
/// Host bridge device ID.
pub const HOST_BRIDGE_DEVICE: u16 = 0x0d57;
/// Class code of a host bridge (bridge device, host bridge subclass).
pub const HOST_BRIDGE_CLASS: u32 = 0x06_00_00;

/// The host bridge at 00:00.0: a header and nothing else.
pub struct HostBridge {
    config: ConfigSpace,
}

impl HostBridge {
    /// A host bridge with zvmm's IDs.
    pub fn new() -> Self {
        let ids = PciIds {
            vendor: HOST_BRIDGE_VENDOR,
            device: HOST_BRIDGE_DEVICE,
            revision: 0,
            class: HOST_BRIDGE_CLASS,
            subsystem_vendor: 0,
            subsystem: 0,
        };
        HostBridge {
            config: ConfigSpace::new(&ids),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }
    fn read_bar(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}
}
