//! Shared directories in the configuration: cloud-hypervisor's `FsConfig`
//! subset (`fs` in a `VmConfig`: a tag and the socket of a virtiofsd
//! someone started) plus zvmm's own `path` (zvmm starts virtiofsd on that
//! directory itself), the `--fs` option string and its checks.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError, OptionParser};

/// The tag of the root share (`--fs DIR`), as host agents name it.
pub const ROOT_TAG: &str = "vroot";
/// Longest tag virtio-fs carries.
pub const MAX_TAG_LEN: usize = devices::virtio::fs::TAG_LEN;
/// Request queues unless `num_queues` says otherwise.
pub const DEFAULT_FS_QUEUES: usize = 1;
/// Entries per queue unless `queue_size` says otherwise.
pub const DEFAULT_FS_QUEUE_SIZE: u16 = devices::virtio::fs::DEFAULT_QUEUE_SIZE;

/// One virtio-fs share.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsConfig {
    /// The tag the guest mounts (`mount -t virtiofs TAG /mnt`).
    pub tag: String,
    /// The vhost-user socket of a running virtiofsd (host agents start
    /// their own). For a `path` share, filled in with the socket of the
    /// virtiofsd zvmm started.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// A host directory: zvmm starts, supervises and stops virtiofsd on it.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Request queues (the hiprio queue comes on top).
    #[serde(default = "default_fs_queues")]
    pub num_queues: usize,
    /// Entries per queue (power of two up to 32768).
    #[serde(default = "default_fs_queue_size")]
    pub queue_size: u16,
    /// Device identifier, unique in the VM (default `_fs<N>`).
    #[serde(default)]
    pub id: Option<String>,
    /// PCI segment of the device (below `platform.num_pci_segments`).
    #[serde(default)]
    pub pci_segment: u16,
}

fn default_fs_queues() -> usize {
    DEFAULT_FS_QUEUES
}

fn default_fs_queue_size() -> u16 {
    DEFAULT_FS_QUEUE_SIZE
}

impl FsConfig {
    /// How messages name this share.
    pub fn label(&self) -> String {
        match (&self.path, &self.socket) {
            (Some(path), _) => format!("tag={},path={}", self.tag, path.display()),
            (None, Some(socket)) => format!("tag={},socket={}", self.tag, socket.display()),
            (None, None) => format!("tag={}", self.tag),
        }
    }

    /// Whether this is the container root share zvmm serves itself.
    pub fn is_root_share(&self) -> bool {
        self.tag == ROOT_TAG && self.path.is_some()
    }
}

/// Parses one `--fs DIR`, `--fs tag=T,path=DIR` or `--fs tag=T,socket=S
/// [,num_queues=N][,queue_size=Q][,id=ID]`.
pub fn parse_fs(input: &str) -> Result<FsConfig, ConfigError> {
    let keys = [
        "path",
        "tag",
        "socket",
        "num_queues",
        "queue_size",
        "id",
        "pci_segment",
    ];
    let options = OptionParser::parse("fs", &keys, input)?;
    let path = options.get("path").map(PathBuf::from);
    let socket = options.get("socket").map(PathBuf::from);
    if path.as_deref().is_some_and(|p| p.as_os_str().is_empty()) {
        return Err(options.bad_value("path", "", "expected a directory"));
    }
    if socket.as_deref().is_some_and(|s| s.as_os_str().is_empty()) {
        return Err(options.bad_value("socket", "", "expected a socket path"));
    }
    let tag = match (options.get("tag"), &path) {
        (Some(tag), _) => tag.to_string(),
        (None, Some(_)) => ROOT_TAG.to_string(),
        (None, None) => return Err(options.bad_value("tag", "", "expected tag=TAG with socket=")),
    };
    Ok(FsConfig {
        tag,
        socket,
        path,
        num_queues: options.number("num_queues")?.unwrap_or(DEFAULT_FS_QUEUES),
        queue_size: options
            .number("queue_size")?
            .unwrap_or(DEFAULT_FS_QUEUE_SIZE),
        id: options.get("id").map(String::from),
        pci_segment: options.number("pci_segment")?.unwrap_or(0),
    })
}

/// Checks the shares: tags (1 to 36 bytes, unique), one of path/socket,
/// queue counts and sizes, unique ids.
pub(super) fn validate_fs(shares: &[FsConfig]) -> Result<(), ConfigError> {
    let mut tags = std::collections::BTreeSet::new();
    let mut ids = std::collections::BTreeSet::new();
    for (index, share) in shares.iter().enumerate() {
        let label = share.label();
        let tag = &share.tag;
        if tag.is_empty() || tag.len() > MAX_TAG_LEN || tag.contains(['\0', '\n']) {
            return Err(invalid(format!(
                "--fs {label}: the tag must be 1 to {MAX_TAG_LEN} bytes (this one is {}) without NUL or newline",
                tag.len()
            )));
        }
        if !tags.insert(tag.clone()) {
            return Err(invalid(format!("--fs: tag {tag} used twice")));
        }
        let id = share.id.clone().unwrap_or_else(|| format!("_fs{index}"));
        if !ids.insert(id.clone()) {
            return Err(invalid(format!("--fs: id '{id}' used twice")));
        }
        match (&share.path, &share.socket) {
            (Some(_), Some(_)) => {
                return Err(invalid(format!(
                    "--fs {label}: give path= (zvmm starts virtiofsd) or socket= (a running virtiofsd), not both"
                )))
            }
            (None, None) => {
                return Err(invalid(format!(
                    "--fs {label}: give path=DIR or socket=SOCKET"
                )))
            }
            _ => {}
        }
        let max_queues = usize::from(devices::virtio::fs::MAX_REQUEST_QUEUES);
        if share.num_queues == 0 || share.num_queues > max_queues {
            return Err(invalid(format!(
                "--fs {label}: num_queues={}; give 1 to {max_queues} request queues",
                share.num_queues
            )));
        }
        let size = share.queue_size;
        if !size.is_power_of_two() || size > devices::virtio::fs::MAX_QUEUE_SIZE {
            return Err(invalid(format!(
                "--fs {label}: queue_size={size}; give a power of two up to 32768"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spellings_parse() {
        let root = parse_fs("/srv/rootfs").unwrap();
        assert_eq!(root.tag, "vroot");
        assert_eq!(root.path, Some(PathBuf::from("/srv/rootfs")));
        assert!(root.is_root_share());
        let share = parse_fs("tag=data,path=/srv/data").unwrap();
        assert_eq!(share.tag, "data");
        assert!(!share.is_root_share());
        let external =
            parse_fs("tag=vol1,socket=/run/a.sock,num_queues=2,queue_size=512,id=v1").unwrap();
        assert_eq!(external.socket, Some(PathBuf::from("/run/a.sock")));
        assert_eq!((external.num_queues, external.queue_size), (2, 512));
        assert_eq!(external.id.as_deref(), Some("v1"));
    }

    #[test]
    fn bad_shares_are_refused_with_the_reason() {
        let parse_err = |input: &str| parse_fs(input).unwrap_err().to_string();
        assert!(parse_err("socket=/run/a.sock").contains("expected tag=TAG"));
        assert!(parse_err("tag=a,path=").contains("expected a directory"));
        assert!(parse_err("tag=a,flavour=x").contains("unknown key 'flavour'"));
        let check = |inputs: &[&str]| {
            let shares: Vec<FsConfig> = inputs.iter().map(|i| parse_fs(i).unwrap()).collect();
            validate_fs(&shares).map_err(|e| e.to_string())
        };
        assert!(check(&["/a", "tag=b,socket=/s"]).is_ok());
        assert_eq!(
            check(&["/a", "/b"]).unwrap_err(),
            "--fs: tag vroot used twice"
        );
        let long = format!("tag={},path=/a", "t".repeat(37));
        assert!(check(&[&long])
            .unwrap_err()
            .contains("1 to 36 bytes (this one is 37)"));
        assert!(check(&["tag=,path=/a"])
            .unwrap_err()
            .contains("this one is 0"));
        assert!(check(&["tag=a,path=/a,socket=/s"])
            .unwrap_err()
            .contains("not both"));
        assert!(check(&["tag=a,socket=/s,num_queues=0"])
            .unwrap_err()
            .contains("num_queues=0"));
        assert!(check(&["tag=a,socket=/s,queue_size=1000"])
            .unwrap_err()
            .contains("power of two"));
    }
}
