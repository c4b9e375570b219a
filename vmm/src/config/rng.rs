//! The entropy device in the configuration: cloud-hypervisor's
//! `RngConfig` subset (`rng` in a `VmConfig`: `src`, `iommu`), the `--rng`
//! option string and its checks. Every VM has one, as in
//! cloud-hypervisor; `src` only chooses where its bytes come from.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError, OptionParser};

/// The entropy source unless `src` says otherwise.
pub const DEFAULT_RNG_SOURCE: &str = "/dev/urandom";

/// The virtio-rng device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngConfig {
    /// Where the entropy comes from: a character device, a FIFO or a
    /// regular file.
    #[serde(default = "default_source")]
    pub src: PathBuf,
    /// Behind a virtual IOMMU (zvmm has none: only `false`).
    #[serde(default)]
    pub iommu: bool,
}

fn default_source() -> PathBuf {
    PathBuf::from(DEFAULT_RNG_SOURCE)
}

impl Default for RngConfig {
    fn default() -> Self {
        Self {
            src: default_source(),
            iommu: false,
        }
    }
}

/// The name the device's counters go under (cloud-hypervisor's).
pub const RNG_ID: &str = "__rng";

/// Parses `--rng src=PATH[,iommu=off]` (a bare value is the source).
pub fn parse_rng(input: &str) -> Result<RngConfig, ConfigError> {
    let options = OptionParser::parse("rng", &["src", "iommu"], input)?;
    let src = match options.get("src") {
        Some("") => return Err(options.bad_value("src", "", "expected a path")),
        Some(src) => PathBuf::from(src),
        None => default_source(),
    };
    Ok(RngConfig {
        src,
        iommu: options.toggle("iommu")?.unwrap_or(false),
    })
}

/// Checks the entropy device: a source path, no IOMMU.
pub(super) fn validate_rng(rng: &RngConfig) -> Result<(), ConfigError> {
    if rng.src.as_os_str().is_empty() {
        return Err(invalid(
            "--rng: src is empty; give a path such as /dev/urandom".into(),
        ));
    }
    if rng.iommu {
        return Err(invalid(
            "--rng: iommu=on needs a virtual IOMMU, which zvmm does not have".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spellings_parse() {
        assert_eq!(
            parse_rng("src=/dev/random").unwrap().src,
            PathBuf::from("/dev/random")
        );
        assert_eq!(
            parse_rng("/tmp/seed").unwrap().src,
            PathBuf::from("/tmp/seed")
        );
        let default = parse_rng("iommu=off").unwrap();
        assert_eq!(default, RngConfig::default());
        assert_eq!(default.src, PathBuf::from("/dev/urandom"));
        assert!(parse_rng("iommu=on").unwrap().iommu);
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        let err = |input: &str| parse_rng(input).unwrap_err().to_string();
        assert_eq!(
            err("src="),
            "--rng: bad value '' for 'src': expected a path"
        );
        assert!(err("source=/dev/urandom").contains("unknown key 'source'"));
        assert!(err("iommu=maybe").contains("expected on or off"));
        let iommu = parse_rng("iommu=on").unwrap();
        assert!(validate_rng(&iommu)
            .unwrap_err()
            .to_string()
            .contains("IOMMU"));
        assert_eq!(validate_rng(&RngConfig::default()), Ok(()));
    }

    #[test]
    fn json_fills_the_defaults() {
        let rng: RngConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(rng, RngConfig::default());
        let rng: RngConfig = serde_json::from_str(r#"{"src":"/dev/hwrng"}"#).unwrap();
        assert_eq!(rng.src, PathBuf::from("/dev/hwrng"));
        let json = serde_json::to_value(RngConfig::default()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"src": "/dev/urandom", "iommu": false})
        );
    }
}
