//! What a virtio-fs device is made from ([`FsConfig`]), its checks, its
//! guest-visible configuration space (virtio 1.2 §5.11.4: `u8 tag[36]`,
//! `le32 num_request_queues`) and the feature offer.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::device::FsError;
use crate::virtio::VIRTIO_F_VERSION_1;

/// Virtio device ID of a file system device.
pub const FS_DEVICE_TYPE: u32 = 26;
/// Bytes of the tag field.
pub const TAG_LEN: usize = 36;
/// Bytes of the configuration space.
pub const CONFIG_SIZE: usize = TAG_LEN + 4;
/// Default size of each queue (what cloud-hypervisor uses).
pub const DEFAULT_QUEUE_SIZE: u16 = 1024;
/// Largest split virtqueue.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Most request queues (the virtio-pci transport has 255 queues, one of
/// them the high-priority queue).
pub const MAX_REQUEST_QUEUES: u16 = 254;

/// Called (once, from a watcher thread) with a one-line message when the
/// backend closes its socket or stops answering while the VM runs.
pub type BackendLostCallback = Arc<dyn Fn(String) + Send + Sync>;

/// How to attach one shared directory.
#[derive(Clone)]
pub struct FsConfig {
    /// Name for threads and messages (`fs-<id>`).
    pub id: String,
    /// What the guest mounts (`mount -t virtiofs TAG /mnt`): 1 to 36 bytes,
    /// no NUL or newline.
    pub tag: String,
    /// The vhost-user backend's socket (virtiofsd `--socket-path`).
    pub socket: PathBuf,
    /// Request queues besides the high-priority queue (the backend must
    /// support 1 + this many queues; virtiofsd supports 1).
    pub num_request_queues: u16,
    /// Size of every queue: a power of two up to 32768.
    pub queue_size: u16,
    /// Backend loss, e.g. to stop the VM with the message.
    pub on_backend_lost: BackendLostCallback,
}

impl FsConfig {
    /// One request queue of [`DEFAULT_QUEUE_SIZE`].
    pub fn new(
        id: impl Into<String>,
        tag: impl Into<String>,
        socket: impl Into<PathBuf>,
        on_backend_lost: BackendLostCallback,
    ) -> FsConfig {
        FsConfig {
            id: id.into(),
            tag: tag.into(),
            socket: socket.into(),
            num_request_queues: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
            on_backend_lost,
        }
    }

    /// Checks what needs no backend; returns the tag field.
    pub(crate) fn validate(&self) -> Result<[u8; TAG_LEN], FsError> {
        if !(1..=MAX_REQUEST_QUEUES).contains(&self.num_request_queues) {
            return Err(FsError::RequestQueues {
                count: self.num_request_queues,
            });
        }
        if !self.queue_size.is_power_of_two() || self.queue_size > MAX_QUEUE_SIZE {
            return Err(FsError::QueueSize {
                size: self.queue_size,
            });
        }
        tag_bytes(&self.tag)
    }
}

impl fmt::Debug for FsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FsConfig")
            .field("id", &self.id)
            .field("tag", &self.tag)
            .field("socket", &self.socket)
            .field("num_request_queues", &self.num_request_queues)
            .field("queue_size", &self.queue_size)
            .finish_non_exhaustive()
    }
}

/// The tag field: UTF-8, NUL-padded, not NUL-terminated when full. Linux
/// stops at the first NUL and refuses tags with a newline.
fn tag_bytes(tag: &str) -> Result<[u8; TAG_LEN], FsError> {
    let bytes = tag.as_bytes();
    if bytes.is_empty() || bytes.len() > TAG_LEN || bytes.iter().any(|b| matches!(b, 0 | b'\n')) {
        return Err(FsError::Tag {
            tag: tag.to_string(),
        });
    }
    let mut field = [0u8; TAG_LEN];
    field[..bytes.len()].copy_from_slice(bytes);
    Ok(field)
}

/// The configuration space.
pub(crate) fn config_space(tag: &[u8; TAG_LEN], num_request_queues: u16) -> [u8; CONFIG_SIZE] {
    let mut config = [0u8; CONFIG_SIZE];
    config[..TAG_LEN].copy_from_slice(tag);
    config[TAG_LEN..].copy_from_slice(&u32::from(num_request_queues).to_le_bytes());
    config
}

/// Device features zvmm can pass through from a vhost-user backend: the
/// backend implements them on the rings, the transport needs nothing.
pub(crate) const PASSTHROUGH_FEATURES: u64 =
    1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX | 1 << VIRTIO_RING_F_INDIRECT_DESC;

/// The offer to the driver: what the backend offers of
/// [`PASSTHROUGH_FEATURES`].
pub(crate) fn offered_features(backend_features: u64) -> u64 {
    backend_features & PASSTHROUGH_FEATURES
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(tag: &str) -> FsConfig {
        FsConfig::new("t", tag, "/nonexistent.sock", Arc::new(|_| {}))
    }

    #[test]
    fn tags_are_1_to_36_bytes_without_nul_or_newline() {
        let full = "x".repeat(36);
        assert_eq!(config(&full).validate().unwrap(), [b'x'; 36]);
        let field = config("myfs").validate().unwrap();
        assert_eq!(&field[..5], b"myfs\0");
        assert_eq!(&config("é").validate().unwrap()[..3], &[0xc3, 0xa9, 0]);
        for bad in [String::new(), "y".repeat(37), "a\0b".into(), "a\nb".into()] {
            let err = config(&bad).validate().unwrap_err();
            assert!(matches!(err, FsError::Tag { .. }), "{bad:?}: {err:?}");
            assert_eq!(
                err.to_string(),
                format!("virtio-fs tag '{bad}' must be 1 to 36 bytes without NUL or newline")
            );
        }
    }

    #[test]
    fn queue_counts_and_sizes_are_checked() {
        let mut cfg = config("t");
        for count in [0, 255] {
            cfg.num_request_queues = count;
            let err = cfg.validate().unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("virtio-fs needs 1 to 254 request queues, not {count}")
            );
        }
        cfg.num_request_queues = 254;
        for size in [0, 1000, 65535] {
            cfg.queue_size = size;
            let err = cfg.validate().unwrap_err();
            assert!(matches!(err, FsError::QueueSize { .. }), "{size}");
        }
        cfg.queue_size = 32768;
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn config_space_is_tag_then_le32_queue_count() {
        let tag = config("share").validate().unwrap();
        let bytes = config_space(&tag, 0x0102);
        assert_eq!(&bytes[..6], b"share\0");
        assert!(bytes[6..36].iter().all(|&b| b == 0));
        assert_eq!(&bytes[36..], &[0x02, 0x01, 0, 0]);
    }

    #[test]
    fn offer_is_the_backends_ring_features_only() {
        // virtiofsd 1.x: VERSION_1, INDIRECT_DESC, EVENT_IDX,
        // PROTOCOL_FEATURES (30) and LOG_ALL (26).
        let virtiofsd = 1 << 32 | 1 << 28 | 1 << 29 | 1 << 30 | 1 << 26;
        assert_eq!(offered_features(virtiofsd), 1 << 32 | 1 << 28 | 1 << 29);
        assert_eq!(offered_features(1 << 32 | 1 << 34), 1 << 32);
        assert_eq!(offered_features(u64::MAX), PASSTHROUGH_FEATURES);
    }

    #[test]
    fn debug_leaves_out_the_callback() {
        let text = format!("{:?}", config("t"));
        assert!(text.contains("tag: \"t\""), "{text}");
        assert!(text.ends_with(".. }"), "{text}");
    }
}
