//! The vsock device in the configuration: cloud-hypervisor's
//! `VsockConfig` (`vsock` in a `VmConfig`: `cid`, `socket`, `iommu`, `id`,
//! `pci_segment`), the `--vsock` option string and its checks. Whether the
//! socket path is usable (its directory exists, no other file is in the
//! way) is checked when the device binds it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError, OptionParser};

/// Smallest guest CID (0-2 are the hypervisor, loopback and the host).
pub const MIN_VSOCK_CID: u64 = devices::virtio::vsock::MIN_GUEST_CID;
/// Largest guest CID (`u32::MAX` means "any" to Linux).
pub const MAX_VSOCK_CID: u64 = devices::virtio::vsock::MAX_GUEST_CID;

/// The virtio-vsock device (hybrid: guest sockets reach the host through
/// Unix sockets).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    /// The guest's context ID.
    pub cid: u64,
    /// The Unix socket zvmm listens on for host-initiated connections;
    /// guest connections to host port P go to `<socket>_P`.
    pub socket: PathBuf,
    /// Behind a virtual IOMMU (zvmm has none: only `false`).
    #[serde(default)]
    pub iommu: bool,
    /// Device identifier (default `_vsock0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// PCI segment of the device (below `platform.num_pci_segments`).
    #[serde(default)]
    pub pci_segment: u16,
}

impl VsockConfig {
    /// How messages name this device.
    pub fn label(&self) -> String {
        format!("cid={},socket={}", self.cid, self.socket.display())
    }

    /// Its id: the one given or `_vsock0`.
    pub fn device_id(&self) -> String {
        self.id.clone().unwrap_or_else(|| "_vsock0".to_string())
    }
}

/// Parses `--vsock cid=N,socket=PATH[,iommu=off][,id=ID][,pci_segment=0]`.
pub fn parse_vsock(input: &str) -> Result<VsockConfig, ConfigError> {
    let keys = ["cid", "socket", "iommu", "id", "pci_segment"];
    let options = OptionParser::parse("vsock", &keys, input)?;
    let Some(cid) = options.number::<u64>("cid")? else {
        return Err(options.bad_value("cid", "", "expected cid=N (3 or more)"));
    };
    let socket = match options.get("socket") {
        Some(socket) if !socket.is_empty() => PathBuf::from(socket),
        _ => return Err(options.bad_value("socket", "", "expected socket=PATH")),
    };
    Ok(VsockConfig {
        cid,
        socket,
        iommu: options.toggle("iommu")?.unwrap_or(false),
        id: options.get("id").map(String::from),
        pci_segment: options.number("pci_segment")?.unwrap_or(0),
    })
}

/// Checks the vsock device: CID range, a socket path, no IOMMU, segment
/// 0, a usable id.
pub(super) fn validate_vsock(vsock: &VsockConfig) -> Result<(), ConfigError> {
    let label = vsock.label();
    if !(MIN_VSOCK_CID..=MAX_VSOCK_CID).contains(&vsock.cid) {
        return Err(invalid(format!(
            "--vsock {label}: cid {} is reserved; give {MIN_VSOCK_CID} to {MAX_VSOCK_CID}",
            vsock.cid
        )));
    }
    if vsock.socket.as_os_str().is_empty() {
        return Err(invalid("--vsock: socket is empty; give socket=PATH".into()));
    }
    if vsock.iommu {
        return Err(invalid(format!(
            "--vsock {label}: iommu=on needs a virtual IOMMU, which zvmm does not have"
        )));
    }
    let id = vsock.device_id();
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_graphic()) {
        return Err(invalid(format!(
            "--vsock {label}: id must be 1 to 64 printable characters, not '{id}'"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_hypervisor_spelling_parses() {
        let vsock = parse_vsock("cid=3,socket=/run/vm1.vsock").unwrap();
        assert_eq!(
            (vsock.cid, vsock.socket.clone()),
            (3, "/run/vm1.vsock".into())
        );
        assert_eq!((vsock.iommu, vsock.pci_segment), (false, 0));
        assert_eq!(vsock.device_id(), "_vsock0");
        let full = parse_vsock("cid=42,socket=v.sock,iommu=off,id=agent,pci_segment=0").unwrap();
        assert_eq!((full.cid, full.device_id()), (42, "agent".to_string()));
        assert_eq!(validate_vsock(&full), Ok(()));
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        let err = |input: &str| parse_vsock(input).unwrap_err().to_string();
        assert!(err("socket=/run/v").contains("expected cid=N"));
        assert!(err("cid=3").contains("expected socket=PATH"));
        assert!(err("cid=3,socket=").contains("expected socket=PATH"));
        assert!(err("cid=x,socket=/v").contains("'cid'"));
        assert!(err("cid=3,socket=/v,port=5").contains("unknown key 'port'"));
        let check = |input: &str| {
            validate_vsock(&parse_vsock(input).unwrap())
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            check("cid=2,socket=/v"),
            "--vsock cid=2,socket=/v: cid 2 is reserved; give 3 to 4294967294"
        );
        assert!(check("cid=4294967295,socket=/v").contains("reserved"));
        assert!(check("cid=3,socket=/v,iommu=on").contains("IOMMU"));
        let on_segment_1 = parse_vsock("cid=3,socket=/v,pci_segment=1").unwrap();
        assert_eq!(on_segment_1.pci_segment, 1);
        assert!(
            validate_vsock(&on_segment_1).is_ok(),
            "checked against the VM's segments"
        );
        assert!(check("cid=3,socket=/v,id=a b").contains("printable"));
    }

    #[test]
    fn json_is_cloud_hypervisors() {
        let json = r#"{"cid":3,"socket":"/run/v.sock","iommu":false,"pci_segment":0}"#;
        let vsock: VsockConfig = serde_json::from_str(json).unwrap();
        assert_eq!(vsock, parse_vsock("cid=3,socket=/run/v.sock").unwrap());
        let back = serde_json::to_value(&vsock).unwrap();
        assert_eq!(
            back,
            serde_json::from_str::<serde_json::Value>(json).unwrap()
        );
        assert!(serde_json::from_str::<VsockConfig>(r#"{"cid":3}"#).is_err());
    }
}
