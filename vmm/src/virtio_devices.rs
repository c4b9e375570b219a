//! This boot's virtio devices, built from the configuration in PCI slot
//! order — disks (`--disk`), then NICs (`--net`) — and handed to the one
//! generic attach path in [`crate::pci`]. Device construction (opening and
//! locking images, sharing the NICs' taps) lives here; PCI knows nothing
//! of device kinds.

use devices::virtio::block::{Block, BlockConfig};

use crate::config::{DiskConfig, VmConfig};
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
            serial: disk.serial.clone(),
            id: disk.id.clone(),
        })?;
        devices.push(VirtioAttachment {
            label: format!("--disk {}", disk.path.display()),
            counters_name: disk.id.clone().unwrap_or_else(|| format!("_disk{index}")),
            device: Box::new(block),
        });
    }
    for ((id, net), config) in nets.devices()?.into_iter().zip(&config.net) {
        devices.push(VirtioAttachment {
            label: format!("--net {}", config.label()),
            counters_name: id,
            device: Box::new(net),
        });
    }
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
            serial: None,
            id: None,
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
