//! cloud-hypervisor's full `VmConfig` as host agents send it: generated
//! clients write every field with a default explicitly, so `vm.create`
//! and `vm.add-*` bodies carry fields zvmm does not model. This module
//! turns such a body into a [`VmConfig`]: it finds what zvmm's
//! configuration did not take (a field absent after a serde round trip)
//! and checks each against cloud-hypervisor's default from its OpenAPI
//! spec. A default is accepted; any other value is refused naming the
//! field, the value and what zvmm would need, never silently ignored; a
//! field neither zvmm nor cloud-hypervisor knows is refused too. `null`
//! means absent (the spec has no nullable field).
//!
//! The command line gets the same treatment ([`cli_option`]): in an option
//! string such as `--disk path=X,direct=off`, a key zvmm does not take is
//! dropped when its value is cloud-hypervisor's default and refused by
//! name otherwise, before zvmm's own parser sees the rest.

use serde_json::Value;

use crate::config::{ConfigError, VmConfig};

use super::routes::strip_nulls;

/// What of an unmodelled field zvmm accepts.
#[derive(Clone, Copy, Debug)]
enum Accept {
    /// Exactly this JSON value (cloud-hypervisor's default).
    Value(&'static str),
    /// One of these JSON values.
    OneOf(&'static [&'static str]),
    /// An empty array or object.
    Empty,
    /// Nothing: the field must be left out.
    Absent,
    /// Anything (names and other values that change nothing zvmm does).
    Any,
}

/// An unmodelled cloud-hypervisor field: its path (`*` for an array
/// index), what is accepted and what zvmm lacks for other values.
struct Rule {
    path: &'static str,
    accept: Accept,
    lacks: &'static str,
}

const fn rule(path: &'static str, accept: Accept, lacks: &'static str) -> Rule {
    Rule {
        path,
        accept,
        lacks,
    }
}

use Accept::{Absent, Any, Empty, OneOf};

/// Accepted only when equal to `json` (cloud-hypervisor's default).
const fn is(json: &'static str) -> Accept {
    Accept::Value(json)
}

/// Every cloud-hypervisor `VmConfig` field zvmm may not model, from the
/// OpenAPI spec (`components.schemas`). Fields zvmm models never reach
/// this table.
const RULES: &[Rule] = &[
    rule("cpus.kvm_hyperv", is("false"), "Hyper-V enlightenments"),
    rule(
        "cpus.max_phys_bits",
        is("46"),
        "a guest physical-address width limit",
    ),
    rule("cpus.nested", is("true"), "hiding nested virtualization"),
    rule("cpus.affinity", Empty, "vCPU pinning"),
    rule("cpus.features.amx", is("false"), "AMX state"),
    rule(
        "cpus.core_scheduling",
        OneOf(&["\"Vm\"", "\"Off\""]),
        "per-vCPU core scheduling",
    ),
    rule(
        "memory.hotplugged_size",
        is("0"),
        "memory hotplugged at boot",
    ),
    rule(
        "memory.mergeable",
        is("false"),
        "KSM-mergeable guest memory",
    ),
    rule("memory.hotplug_method", is("\"Acpi\""), "virtio-mem"),
    rule(
        "memory.hugepages",
        is("false"),
        "hugepage-backed guest memory",
    ),
    rule(
        "memory.hugepage_size",
        Absent,
        "hugepage-backed guest memory",
    ),
    rule("memory.prefault", is("false"), "prefaulted guest memory"),
    rule(
        "memory.reserve",
        is("false"),
        "reserved (MAP_NORESERVE off) guest memory",
    ),
    rule(
        "memory.thp",
        is("true"),
        "turning transparent hugepages off",
    ),
    rule("memory.zones", Empty, "memory zones"),
    rule("payload.firmware", Absent, "firmware payloads"),
    rule("payload.igvm", Absent, "IGVM payloads"),
    rule("payload.host_data", Absent, "confidential-guest host data"),
    rule("rate_limit_groups", Empty, "rate-limit groups"),
    rule("disks.*.direct", is("false"), "O_DIRECT disk I/O"),
    rule("disks.*.iommu", is("false"), "a virtual IOMMU"),
    rule("disks.*.vhost_user", is("false"), "vhost-user-blk"),
    rule("disks.*.vhost_socket", Absent, "vhost-user-blk"),
    rule("disks.*.rate_limiter_config", Absent, "I/O rate limiting"),
    rule("disks.*.pci_device_id", Absent, "choosing PCI slots"),
    rule("disks.*.rate_limit_group", Absent, "rate-limit groups"),
    rule("disks.*.queue_affinity", Empty, "queue affinity"),
    rule("disks.*.sparse", is("true"), "fully allocated disks"),
    rule(
        "disks.*.lock_granularity",
        OneOf(&["\"ByteRange\"", "\"Full\""]),
        "other locks",
    ),
    rule("net.*.host_mac", Absent, "setting the tap's MAC"),
    rule("net.*.mtu", Absent, "setting the MTU"),
    rule("net.*.iommu", is("false"), "a virtual IOMMU"),
    rule("net.*.vhost_user", is("false"), "vhost-user-net"),
    rule("net.*.vhost_socket", Absent, "vhost-user-net"),
    rule("net.*.vhost_mode", is("\"Client\""), "vhost-user-net"),
    rule("net.*.pci_device_id", Absent, "choosing PCI slots"),
    rule("net.*.rate_limiter_config", Absent, "network rate limiting"),
    rule("net.*.offload_tso", is("true"), "turning TSO off"),
    rule("net.*.offload_ufo", is("true"), "turning UFO off"),
    rule(
        "net.*.offload_csum",
        is("true"),
        "turning checksum offload off",
    ),
    rule("rng.id", Any, ""),
    rule("rng.pci_segment", is("0"), "PCI segments other than 0"),
    rule("rng.pci_device_id", Absent, "choosing PCI slots"),
    rule("balloon", Absent, "virtio-balloon"),
    rule("fs.*.pci_device_id", Absent, "choosing PCI slots"),
    rule("generic_vhost_user", Empty, "generic vhost-user devices"),
    rule("pmem", Empty, "virtio-pmem"),
    rule("serial.socket", Absent, "a serial console on a socket"),
    rule("serial.iommu", is("false"), "a virtual IOMMU"),
    rule("console.socket", Absent, "virtio-console"),
    rule("console.iommu", is("false"), "a virtual IOMMU"),
    rule("console.id", Any, ""),
    rule("console.pci_segment", is("0"), "PCI segments other than 0"),
    rule("console.pci_device_id", Absent, "choosing PCI slots"),
    rule(
        "debug_console.mode",
        is("\"Off\""),
        "the debug console port",
    ),
    rule("debug_console.file", Absent, "the debug console port"),
    rule("debug_console.iobase", Any, ""),
    rule("devices", Empty, "VFIO passthrough"),
    rule("user_devices", Empty, "vfio-user devices"),
    rule("vdpa", Empty, "vDPA devices"),
    rule("vsock.pci_device_id", Absent, "choosing PCI slots"),
    rule("numa", Empty, "guest NUMA nodes"),
    rule("iommu", is("false"), "a virtual IOMMU"),
    rule("watchdog", is("false"), "a watchdog device"),
    rule("rtc", Absent, "a virtio RTC"),
    rule("pvpanic", is("false"), "a pvpanic device"),
    rule("pci_segments.*.pci_segment", Any, ""),
    rule(
        "pci_segments.*.mmio32_aperture_weight",
        is("1"),
        "weighted PCI apertures",
    ),
    rule(
        "pci_segments.*.mmio64_aperture_weight",
        is("1"),
        "weighted PCI apertures",
    ),
    rule("platform.iommu_segments", Empty, "a virtual IOMMU"),
    rule(
        "platform.iommu_address_width_bits",
        Absent,
        "a virtual IOMMU",
    ),
    rule("platform.system_serial_number", Absent, "SMBIOS tables"),
    rule("platform.serial_number", Absent, "SMBIOS tables"),
    rule("platform.system_uuid", Absent, "SMBIOS tables"),
    rule("platform.uuid", Absent, "SMBIOS tables"),
    rule("platform.oem_strings", Empty, "SMBIOS tables"),
    rule("platform.system_manufacturer", Absent, "SMBIOS tables"),
    rule("platform.system_product_name", Absent, "SMBIOS tables"),
    rule("platform.system_version", Absent, "SMBIOS tables"),
    rule("platform.system_family", Absent, "SMBIOS tables"),
    rule("platform.system_sku_number", Absent, "SMBIOS tables"),
    rule("platform.chassis_asset_tag", Absent, "SMBIOS tables"),
    rule("platform.tdx", is("false"), "TDX confidential guests"),
    rule(
        "platform.sev_snp",
        is("false"),
        "SEV-SNP confidential guests",
    ),
    rule("platform.iommufd", is("false"), "VFIO over iommufd"),
    rule("platform.vfio_p2p_dma", is("true"), "VFIO"),
    rule("tpm", Absent, "a TPM"),
    rule("landlock_enable", is("false"), "Landlock"),
    rule("landlock_rules", Empty, "Landlock"),
];

/// A body with a field zvmm cannot honour, or not a configuration at all.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompatError {
    /// A known cloud-hypervisor field with a value zvmm cannot honour.
    #[error("{path}={value}: zvmm has no {lacks}; accepted: {accepted}")]
    Unsupported {
        /// Where (`disks[0].direct`).
        path: String,
        /// The value given (JSON).
        value: String,
        /// What zvmm would need.
        lacks: &'static str,
        /// What is accepted instead.
        accepted: String,
    },
    /// A field neither zvmm nor cloud-hypervisor knows.
    #[error("unknown field {0}")]
    Unknown(String),
    /// The body does not deserialize.
    #[error("{0}")]
    Json(String),
}

/// Turns a `vm.create` body into zvmm's configuration, refusing by name
/// what zvmm would otherwise silently drop.
pub fn vm_config(mut body: Value) -> Result<VmConfig, CompatError> {
    strip_nulls(&mut body);
    let config: VmConfig =
        serde_json::from_value(body.clone()).map_err(|e| CompatError::Json(e.to_string()))?;
    let kept = serde_json::to_value(&config).map_err(|e| CompatError::Json(e.to_string()))?;
    let mut dropped = Vec::new();
    unmodelled(&body, &kept, &mut Vec::new(), &mut dropped);
    for (path, value) in dropped {
        check(&path, value)?;
    }
    Ok(config)
}

/// Collects the paths of `input` that `kept` (its round trip through
/// zvmm's configuration) lacks.
fn unmodelled<'a>(
    input: &'a Value,
    kept: &Value,
    path: &mut Vec<String>,
    out: &mut Vec<(Vec<String>, &'a Value)>,
) {
    match (input, kept) {
        (Value::Object(given), Value::Object(known)) => {
            for (key, value) in given {
                path.push(key.clone());
                match known.get(key) {
                    Some(known) => unmodelled(value, known, path, out),
                    None => out.push((path.clone(), value)),
                }
                path.pop();
            }
        }
        (Value::Array(given), Value::Array(known)) => {
            for (index, (value, known)) in given.iter().zip(known).enumerate() {
                path.push(index.to_string());
                unmodelled(value, known, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

/// Checks one unmodelled field (and, without a rule of its own, its
/// members) against [`RULES`].
fn check(path: &[String], value: &Value) -> Result<(), CompatError> {
    if let Some(rule) = RULES.iter().find(|rule| matches(rule.path, path)) {
        return if accepts(rule.accept, value) {
            Ok(())
        } else {
            Err(CompatError::Unsupported {
                path: display(path),
                value: short(value),
                lacks: rule.lacks,
                accepted: describe(rule.accept),
            })
        };
    }
    let has_member_rules = RULES
        .iter()
        .any(|rule| rule.path.split('.').count() > path.len() && prefix_matches(rule.path, path));
    match value {
        Value::Object(members) if has_member_rules => {
            for (key, member) in members {
                let mut inner = path.to_vec();
                inner.push(key.clone());
                check(&inner, member)?;
            }
            Ok(())
        }
        Value::Array(elements) if has_member_rules => {
            for (index, element) in elements.iter().enumerate() {
                let mut inner = path.to_vec();
                inner.push(index.to_string());
                check(&inner, element)?;
            }
            Ok(())
        }
        _ => Err(CompatError::Unknown(display(path))),
    }
}

fn segment_matches(pattern: &str, segment: &str) -> bool {
    pattern == segment || (pattern == "*" && segment.parse::<usize>().is_ok())
}

fn matches(pattern: &str, path: &[String]) -> bool {
    let parts: Vec<&str> = pattern.split('.').collect();
    parts.len() == path.len() && parts.iter().zip(path).all(|(p, s)| segment_matches(p, s))
}

fn prefix_matches(pattern: &str, path: &[String]) -> bool {
    pattern
        .split('.')
        .zip(path)
        .all(|(p, s)| segment_matches(p, s))
}

fn accepts(accept: Accept, value: &Value) -> bool {
    let equals = |json: &str| serde_json::from_str::<Value>(json).is_ok_and(|d| same(&d, value));
    match accept {
        Accept::Value(json) => equals(json),
        OneOf(choices) => choices.iter().any(|json| equals(json)),
        Empty => match value {
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            _ => false,
        },
        Absent => false,
        Any => true,
    }
}

/// JSON equality where `1` and `1.0` are the same number.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

fn describe(accept: Accept) -> String {
    match accept {
        Accept::Value(json) => format!("{json} (cloud-hypervisor's default)"),
        OneOf(choices) => choices.join(" or "),
        Empty => "an empty list (leave it out)".into(),
        Absent => "leave it out".into(),
        Any => "anything".into(),
    }
}

/// `disks[0].direct` for `["disks", "0", "direct"]`.
fn display(path: &[String]) -> String {
    let mut text = String::new();
    for segment in path {
        if segment.parse::<usize>().is_ok() {
            text.push_str(&format!("[{segment}]"));
        } else {
            if !text.is_empty() {
                text.push('.');
            }
            text.push_str(segment);
        }
    }
    text
}

/// The value as compact JSON, cut to a readable length.
fn short(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(60) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text,
    }
}

/// Option-string keys of cloud-hypervisor's command line that zvmm's
/// parsers do not take: `(option, key, accepted values, what zvmm lacks)`.
const CLI_DEFAULTS: &[(&str, &str, &[&str], &str)] = &[
    (
        "cpus",
        "kvm_hyperv",
        &["off", "false"],
        "Hyper-V enlightenments",
    ),
    (
        "cpus",
        "nested",
        &["on", "true"],
        "hiding nested virtualization",
    ),
    (
        "cpus",
        "max_phys_bits",
        &["46"],
        "a guest physical-address width limit",
    ),
    (
        "cpus",
        "core_scheduling",
        &["vm", "off"],
        "per-vCPU core scheduling",
    ),
    (
        "memory",
        "mergeable",
        &["off", "false"],
        "KSM-mergeable guest memory",
    ),
    (
        "memory",
        "hugepages",
        &["off", "false"],
        "hugepage-backed guest memory",
    ),
    (
        "memory",
        "prefault",
        &["off", "false"],
        "prefaulted guest memory",
    ),
    (
        "memory",
        "thp",
        &["on", "true"],
        "turning transparent hugepages off",
    ),
    ("memory", "hotplug_method", &["acpi"], "virtio-mem"),
    (
        "memory",
        "hotplugged_size",
        &["0"],
        "memory hotplugged at boot",
    ),
    ("disk", "direct", &["off", "false"], "O_DIRECT disk I/O"),
    ("disk", "iommu", &["off", "false"], "a virtual IOMMU"),
    ("disk", "vhost_user", &["off", "false"], "vhost-user-blk"),
    ("disk", "sparse", &["on", "true"], "fully allocated disks"),
    (
        "disk",
        "lock_granularity",
        &["byte-range", "full"],
        "other locks",
    ),
    ("net", "iommu", &["off", "false"], "a virtual IOMMU"),
    ("net", "vhost_user", &["off", "false"], "vhost-user-net"),
    ("net", "vhost_mode", &["client"], "vhost-user-net"),
    ("net", "offload_tso", &["on", "true"], "turning TSO off"),
    ("net", "offload_ufo", &["on", "true"], "turning UFO off"),
    (
        "net",
        "offload_csum",
        &["on", "true"],
        "turning checksum offload off",
    ),
];

/// `--OPTION INPUT` with cloud-hypervisor's default-valued keys that zvmm
/// does not take removed; a non-default value of such a key is refused.
pub fn cli_option(option: &'static str, input: &str) -> Result<String, ConfigError> {
    let mut kept = Vec::new();
    for item in crate::config::split_items(input) {
        let Some((key, value)) = item.split_once('=') else {
            kept.push(item);
            continue;
        };
        let key = key.trim();
        match CLI_DEFAULTS
            .iter()
            .find(|(o, k, _, _)| *o == option && *k == key)
        {
            Some((_, _, accepted, _))
                if accepted.contains(&value.trim().to_ascii_lowercase().as_str()) => {}
            Some((_, _, accepted, lacks)) => {
                return Err(ConfigError::BadValue {
                    option: option.into(),
                    key: key.into(),
                    value: value.into(),
                    why: format!("zvmm has no {lacks}; accepted: {}", accepted.join(" or ")),
                })
            }
            None => kept.push(item),
        }
    }
    Ok(kept.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cli_defaults_are_dropped_and_other_values_refused_by_name() {
        assert_eq!(
            cli_option("disk", "path=/a,direct=off,readonly=on,num_queues=2").unwrap(),
            "path=/a,readonly=on,num_queues=2"
        );
        assert_eq!(
            cli_option("net", "fd=[3,4],num_queues=4,vhost_user=false").unwrap(),
            "fd=[3,4],num_queues=4"
        );
        assert_eq!(cli_option("memory", "2G").unwrap(), "2G");
        let err = cli_option("disk", "path=/a,direct=on")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "--disk: bad value 'on' for 'direct': zvmm has no O_DIRECT disk I/O; accepted: off or false"
        );
        assert_eq!(
            cli_option("fs", "tag=a,socket=/s,pci_segment=1").unwrap(),
            "tag=a,socket=/s,pci_segment=1",
            "modelled: checked against the VM's segments"
        );
        assert_eq!(
            cli_option("disk", "path=/a,bogus=1").unwrap(),
            "path=/a,bogus=1"
        );
    }

    fn base() -> Value {
        json!({"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
               "memory": {"size": 268435456}})
    }

    fn with(path: &[&str], value: Value) -> Value {
        let mut body = base();
        let mut at = &mut body;
        for key in &path[..path.len() - 1] {
            at = at
                .as_object_mut()
                .unwrap()
                .entry(key.to_string())
                .or_insert(json!({}));
        }
        at[path[path.len() - 1]] = value;
        body
    }

    #[test]
    fn defaults_written_out_are_accepted() {
        let body = json!({
            "payload": {"kernel": "/k", "cmdline": "console=ttyS0"},
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1, "kvm_hyperv": false, "nested": true,
                     "core_scheduling": "Vm", "affinity": []},
            "memory": {"size": 268435456, "mergeable": false, "hotplug_method": "Acpi",
                       "shared": false, "hugepages": false, "prefault": false, "thp": true,
                       "zones": []},
            "serial": {"mode": "Off", "iommu": false}, "console": {"mode": "Off", "iommu": false},
            "rng": {"src": "/dev/urandom", "iommu": false},
            "iommu": false, "watchdog": false, "pvpanic": false, "landlock_enable": false,
            "pmem": [], "devices": [], "numa": null,
            "platform": {"tdx": false, "sev_snp": false, "vfio_p2p_dma": true},
        });
        let config = vm_config(body).unwrap();
        assert_eq!(config.payload.cmdline.as_deref(), Some("console=ttyS0"));
    }

    #[test]
    fn non_defaults_are_refused_by_name() {
        for (path, value, named) in [
            (
                &["memory", "hugepages"][..],
                json!(true),
                "memory.hugepages=true",
            ),
            (&["cpus", "kvm_hyperv"], json!(true), "Hyper-V"),
            (&["balloon"], json!({"size": 1}), "virtio-balloon"),
            (&["pmem"], json!([{"file": "/img"}]), "virtio-pmem"),
            (
                &["rng"],
                json!({"src": "/dev/random", "pci_segment": 1}),
                "rng.pci_segment=1",
            ),
            (&["platform", "tdx"], json!(true), "TDX"),
            (&["iommu"], json!(true), "virtual IOMMU"),
        ] {
            let err = vm_config(with(path, value)).unwrap_err().to_string();
            assert!(err.contains(named), "{path:?}: {err}");
            assert!(err.contains("accepted"), "{err}");
        }
    }

    #[test]
    fn device_fields_are_checked_per_element() {
        let body = with(
            &["disks"],
            json!([{"path": "/a", "direct": false, "num_queues": 1},
                   {"path": "/b", "direct": true}]),
        );
        let err = vm_config(body).unwrap_err().to_string();
        assert!(err.starts_with("disks[1].direct=true"), "{err}");
        // Multiqueue disks as cloud-hypervisor's clients write them.
        let mq = with(
            &["disks"],
            json!([{"path": "/a", "num_queues": 4, "queue_size": 128}]),
        );
        let disk = &vm_config(mq).unwrap().disks[0];
        assert_eq!((disk.num_queues, disk.queue_size), (4, 128));
        let plain = &vm_config(with(&["disks"], json!([{"path": "/a"}])))
            .unwrap()
            .disks[0];
        assert_eq!((plain.num_queues, plain.queue_size), (1, 256));
        let on_segment = with(&["net"], json!([{"tap": "t0", "pci_segment": 1}]));
        assert_eq!(vm_config(on_segment).unwrap().net[0].pci_segment, 1);
        let mut kata = with(&["platform"], json!({"num_pci_segments": 2}));
        kata["fs"] = json!([{"tag": "kataShared", "socket": "/s", "pci_segment": 1}]);
        kata["disks"] = json!([{"path": "/a", "pci_segment": 1}]);
        kata["vsock"] = json!({"cid": 3, "socket": "/v", "pci_segment": 1});
        let config = vm_config(kata).unwrap();
        assert_eq!(config.platform.num_pci_segments, 2);
        assert_eq!(config.fs[0].pci_segment, 1);
        assert_eq!(config.disks[0].pci_segment, 1);
        let defaults = with(
            &["net"],
            json!([{"tap": "t0", "vhost_user": false, "vhost_mode": "Client",
                    "offload_tso": true, "pci_segment": 0}]),
        );
        assert_eq!(
            vm_config(defaults).unwrap().net[0].tap.as_deref(),
            Some("t0")
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = vm_config(with(&["frobnicate"], json!(1))).unwrap_err();
        assert_eq!(err, CompatError::Unknown("frobnicate".into()));
        let err = vm_config(with(&["memory", "colour"], json!("red"))).unwrap_err();
        assert_eq!(err, CompatError::Unknown("memory.colour".into()));
    }

    #[test]
    fn values_are_compared_as_json() {
        assert!(accepts(is("1"), &json!(1.0)));
        assert!(!accepts(is("1"), &json!("1")));
        assert!(accepts(Empty, &json!({})));
        assert!(!accepts(Absent, &json!(false)));
        assert_eq!(short(&json!("x".repeat(100))).len(), 63);
    }
}
