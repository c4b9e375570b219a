//! This boot's virtio devices, built from the configuration in PCI slot
//! order — disks (`--disk`), then NICs (`--net`); after the virtio-fs
//! shares (`crate::fs`), the vsock device (`--vsock`) and the entropy
//! device every VM has (`--rng`), last — and handed to the one
//! generic attach path in [`crate::pci`]. Device construction (opening and
//! locking images, sharing the NICs' taps) lives here; PCI knows nothing
//! of device kinds.

use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::rng::{Rng, RngConfig as RngDeviceConfig, RngError};
use devices::virtio::vsock::{Vsock, VsockConfig as VsockDeviceConfig, VsockError};

use crate::config::{DiskConfig, VmConfig, RNG_ID};
use crate::net::{NetBackends, NetSetupError};
use crate::pci::VirtioAttachment;

/// A device could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DeviceSetupError {
    /// A disk image could not be opened (the message names it).
    #[error(transparent)]
    Disk(#[from] devices::virtio::block::BlockError),
    /// One image given twice, at least once writable.
    #[error("--disk {first} and --disk {second} are the same image; a writable disk can be attached once")]
    SameImageTwice {
        /// The first path given.
        first: String,
        /// The later path naming the same file.
        second: String,
    },
    /// A NIC could not be built.
    #[error(transparent)]
    Net(#[from] NetSetupError),
    /// The entropy source is unusable.
    #[error("--rng src={src}")]
    Rng {
        /// The source given.
        src: String,
        /// Why.
        #[source]
        source: RngError,
    },
    /// The vsock device could not be set up (its socket, mostly).
    #[error("--vsock {label}")]
    Vsock {
        /// The device's option string.
        label: String,
        /// Why.
        #[source]
        source: VsockError,
    },
}

/// Every virtio device of `config` for one boot, in slot order.
pub fn virtio_devices(
    config: &VmConfig,
    nets: &NetBackends,
) -> Result<Vec<VirtioAttachment>, DeviceSetupError> {
    check_distinct_images(&config.disks)?;
    let mut devices = Vec::new();
    for (index, disk) in config.disks.iter().enumerate() {
        let block = Block::new(BlockConfig {
            path: disk.path.clone(),
            readonly: disk.readonly,
            image_type: disk.image_type.forced(),
            backing_files: disk.backing_files,
            serial: disk.serial.clone(),
            id: disk.id.clone(),
            num_queues: Some(disk.num_queues),
            queue_size: Some(disk.queue_size),
            io_threads: None,
        })?;
        devices.push(VirtioAttachment {
            label: format!("--disk {}", disk.path.display()),
            counters_name: disk.id.clone().unwrap_or_else(|| format!("_disk{index}")),
            device: Box::new(block),
            ioeventfds: true,
            pci_segment: disk.pci_segment,
        });
    }
    for ((id, net), config) in nets.devices()?.into_iter().zip(&config.net) {
        devices.push(VirtioAttachment {
            label: format!("--net {}", config.label()),
            counters_name: id,
            device: Box::new(net),
            ioeventfds: true,
            pci_segment: config.pci_segment,
        });
    }
    Ok(devices)
}

/// The devices after the shares, in slot order: the vsock device, if
/// any, then the entropy device (last, as every VM has it, so adding it
/// moved no other device's slot).
pub fn trailing_devices(config: &VmConfig) -> Result<Vec<VirtioAttachment>, DeviceSetupError> {
    let mut devices = Vec::new();
    if let Some(vsock) = &config.vsock {
        let label = vsock.label();
        let id = vsock.device_id();
        let device = Vsock::new(VsockDeviceConfig {
            id: id.clone(),
            cid: vsock.cid,
            socket: vsock.socket.clone(),
        })
        .map_err(|source| DeviceSetupError::Vsock {
            label: label.clone(),
            source,
        })?;
        devices.push(VirtioAttachment {
            label: format!("--vsock {label}"),
            counters_name: id,
            device: Box::new(device),
            ioeventfds: true,
            pci_segment: vsock.pci_segment,
        });
    }
    let src = config.rng.src.display().to_string();
    let rng = Rng::new(RngDeviceConfig {
        id: RNG_ID.to_string(),
        source: config.rng.src.clone(),
    })
    .map_err(|source| DeviceSetupError::Rng {
        src: src.clone(),
        source,
    })?;
    devices.push(VirtioAttachment {
        label: format!("--rng src={src}"),
        counters_name: RNG_ID.to_string(),
        device: Box::new(rng),
        // Rare kicks: no ioeventfd, so a VM pays no teardown wait for it.
        ioeventfds: false,
        pci_segment: 0,
    });
    Ok(devices)
}

/// Refuses an image that appears twice when either use is writable (two
/// read-only views of one image are harmless).
fn check_distinct_images(disks: &[DiskConfig]) -> Result<(), DeviceSetupError> {
    use std::os::unix::fs::MetadataExt;
    let identity = |disk: &DiskConfig| {
        std::fs::metadata(&disk.path)
            .ok()
            .map(|m| (m.dev(), m.ino(), m.rdev()))
    };
    for (index, later) in disks.iter().enumerate() {
        let Some(later_id) = identity(later) else {
            continue;
        };
        for earlier in &disks[..index] {
            let conflict = !(earlier.readonly && later.readonly);
            if conflict && identity(earlier) == Some(later_id) {
                return Err(DeviceSetupError::SameImageTwice {
                    first: earlier.path.display().to_string(),
                    second: later.path.display().to_string(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(path: &str, readonly: bool) -> DiskConfig {
        DiskConfig {
            path: path.into(),
            readonly,
            image_type: Default::default(),
            backing_files: None,
            serial: None,
            id: None,
            pci_segment: 0,
            num_queues: 1,
            queue_size: 256,
        }
    }

    #[test]
    fn the_same_image_twice_is_refused_unless_both_read_only() {
        let err = check_distinct_images(&[disk("/dev/null", false), disk("/dev/./null", true)])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "--disk /dev/null and --disk /dev/./null are the same image; a writable disk can be attached once"
        );
        assert!(check_distinct_images(&[disk("/dev/null", true), disk("/dev/null", true)]).is_ok());
        assert!(
            check_distinct_images(&[disk("/dev/null", false), disk("/dev/zero", false)]).is_ok()
        );
    }
}
