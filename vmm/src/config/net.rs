//! Network devices in the configuration: cloud-hypervisor's `NetConfig`
//! subset (`net` in a `VmConfig`), the `--net` option string, its checks,
//! and MAC addresses (parsing, and random locally administered ones).

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError, OptionParser};

/// Queues of one NIC unless `num_queues` says otherwise (one rx/tx pair).
pub const DEFAULT_NET_QUEUES: usize = 2;
/// Entries per queue unless `queue_size` says otherwise.
pub const DEFAULT_NET_QUEUE_SIZE: u16 = devices::virtio::net::DEFAULT_QUEUE_SIZE;
/// Most queues one NIC may have (rx/tx pairs, the control queue aside).
pub const MAX_NET_QUEUES: usize = 2 * devices::virtio::net::MAX_QUEUE_PAIRS as usize;
/// Netmask applied with `ip` when `mask` is not given.
const DEFAULT_NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
/// Tap name zvmm asks the kernel to number when none is given.
const DEFAULT_TAP_NAME: &str = "zvmm%d";

/// One virtio-net NIC on a host tap (cloud-hypervisor's `NetConfig`
/// subset; other fields of theirs are accepted and ignored).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// Tap interface: attached if it exists (left in place at exit),
    /// created otherwise (removed at exit). With `fds`, filled in with the
    /// name the fds are attached to.
    #[serde(default)]
    pub tap: Option<String>,
    /// Host-side IPv4 address, set on a tap zvmm creates.
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    /// Host-side netmask (default 255.255.255.0 with `ip`).
    #[serde(default)]
    pub mask: Option<Ipv4Addr>,
    /// Guest MAC address; a random locally administered one when absent
    /// (filled in before boot, so `vm.info` shows it).
    #[serde(default)]
    pub mac: Option<String>,
    /// Virtqueues: 2 per rx/tx pair (even, at least 2).
    #[serde(default = "default_net_queues")]
    pub num_queues: usize,
    /// Entries per virtqueue (power of two, 64 to 4096).
    #[serde(default = "default_net_queue_size")]
    pub queue_size: u16,
    /// Device identifier, unique in the VM (default `_net<N>`).
    #[serde(default)]
    pub id: Option<String>,
    /// Tap fds the caller opened and zvmm inherited, one per queue pair.
    #[serde(default)]
    pub fds: Option<Vec<i32>>,
    /// PCI segment of the NIC (below `platform.num_pci_segments`).
    #[serde(default)]
    pub pci_segment: u16,
}

fn default_net_queues() -> usize {
    DEFAULT_NET_QUEUES
}

fn default_net_queue_size() -> u16 {
    DEFAULT_NET_QUEUE_SIZE
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            tap: None,
            ip: None,
            mask: None,
            mac: None,
            num_queues: DEFAULT_NET_QUEUES,
            queue_size: DEFAULT_NET_QUEUE_SIZE,
            id: None,
            fds: None,
            pci_segment: 0,
        }
    }
}

impl NetConfig {
    /// Rx/tx queue pairs.
    pub fn queue_pairs(&self) -> u16 {
        u16::try_from(self.num_queues / 2).unwrap_or(u16::MAX)
    }

    /// How messages name this NIC: its tap, its fds or its id.
    pub fn label(&self) -> String {
        match (&self.tap, &self.fds) {
            (Some(tap), _) => format!("tap={tap}"),
            (None, Some(fds)) => format!("fd={}", fd_list(fds)),
            (None, None) => format!("id={}", self.id.as_deref().unwrap_or("?")),
        }
    }

    /// The tap name to open: the one given, or one the kernel numbers.
    pub fn tap_name(&self) -> &str {
        self.tap.as_deref().unwrap_or(DEFAULT_TAP_NAME)
    }
}

fn fd_list(fds: &[i32]) -> String {
    match fds {
        [one] => one.to_string(),
        many => format!(
            "[{}]",
            many.iter()
                .map(i32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
    }
}

/// Parses one `--net tap=NAME[,mac=MAC][,ip=A,mask=M][,num_queues=N]
/// [,queue_size=Q][,id=ID]` or `--net fd=N|fd=[N,M][,mac=MAC]...`.
pub fn parse_net(input: &str) -> Result<NetConfig, ConfigError> {
    let keys = [
        "tap",
        "mac",
        "ip",
        "mask",
        "num_queues",
        "queue_size",
        "id",
        "fd",
        "pci_segment",
    ];
    let options = OptionParser::parse("net", &keys, input)?;
    let address = |key: &str| -> Result<Option<Ipv4Addr>, ConfigError> {
        options.convert(key, |v| v.parse().ok(), "an IPv4 address like 192.168.1.1")
    };
    let config = NetConfig {
        tap: options.get("tap").map(String::from),
        ip: address("ip")?,
        mask: address("mask")?,
        mac: match options.get("mac") {
            Some(mac) => {
                parse_mac(mac).map_err(|why| options.bad_value("mac", mac, &why))?;
                Some(mac.to_ascii_lowercase())
            }
            None => None,
        },
        num_queues: options.number("num_queues")?.unwrap_or(DEFAULT_NET_QUEUES),
        queue_size: options
            .number("queue_size")?
            .unwrap_or(DEFAULT_NET_QUEUE_SIZE),
        id: options.get("id").map(String::from),
        fds: options
            .get("fd")
            .map(|value| parse_fds(value).map_err(|why| options.bad_value("fd", value, &why)))
            .transpose()?,
        pci_segment: options.number("pci_segment")?.unwrap_or(0),
    };
    if config.tap.as_deref() == Some("") {
        return Err(options.bad_value("tap", "", "expected an interface name"));
    }
    Ok(config)
}

/// `3` or `[3,4]` (or `3:4`): fd numbers of at least 3.
fn parse_fds(value: &str) -> Result<Vec<i32>, String> {
    let inner = value
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .unwrap_or(value);
    let fds: Vec<i32> = inner
        .split([',', ':'])
        .map(|fd| fd.trim().parse::<i32>())
        .collect::<Result<_, _>>()
        .map_err(|_| "expected an fd number, or a list like [3,4]".to_string())?;
    if fds.iter().any(|&fd| fd < 3) {
        return Err("fds 0-2 are zvmm's standard streams, not taps".into());
    }
    Ok(fds)
}

/// Parses `aa:bb:cc:dd:ee:ff` into a unicast MAC (not multicast, not
/// all-zero); the error says what is wrong.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.split(':').collect();
    let well_formed = parts.len() == 6
        && parts.iter().zip(mac.iter_mut()).all(|(part, byte)| {
            part.len() == 2
                && u8::from_str_radix(part, 16)
                    .map(|value| *byte = value)
                    .is_ok()
        });
    if !well_formed {
        return Err("expected a MAC address like 02:00:00:00:00:01".into());
    }
    if mac[0] & 1 != 0 {
        return Err("a multicast MAC (lowest bit of the first byte set) cannot be a NIC's address; use e.g. 02:00:00:00:00:01".into());
    }
    if mac == [0; 6] {
        return Err("the all-zero MAC cannot be a NIC's address".into());
    }
    Ok(mac)
}

/// A random locally administered unicast MAC (first byte `x2`, `x6`,
/// `xa` or `xe`), as text.
pub fn random_mac() -> String {
    let mut bytes = [0u8; 6];
    // SAFETY: `bytes` is a valid, writable buffer of the length passed.
    let filled = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if filled != bytes.len() as isize {
        // getrandom cannot fail for 6 bytes once the pool is up; fall back
        // to the clock and pid rather than give every VM the same MAC.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let seed = nanos ^ (u128::from(std::process::id()) << 64);
        bytes.copy_from_slice(&seed.to_le_bytes()[..6]);
    }
    bytes[0] = (bytes[0] & 0xfc) | 0x02;
    devices::virtio::net::format_mac(&bytes)
}

/// Checks the NICs: queue counts and sizes, one of tap/fds, distinct taps
/// and ids; fills in `mask` next to `ip`.
pub(super) fn validate_nets(nets: &[NetConfig]) -> Result<(), ConfigError> {
    let mut ids = std::collections::BTreeSet::new();
    let mut taps = std::collections::BTreeSet::new();
    for (index, net) in nets.iter().enumerate() {
        let label = net.label();
        let id = net.id.clone().unwrap_or_else(|| format!("_net{index}"));
        if !ids.insert(id.clone()) {
            return Err(invalid(format!("--net: id '{id}' used twice")));
        }
        check_queues(net, &label)?;
        if net.tap.is_some() && net.fds.is_some() {
            return Err(invalid(format!(
                "--net {label}: give tap= or fd=, not both"
            )));
        }
        if let Some(fds) = &net.fds {
            if fds.len() != usize::from(net.queue_pairs()) {
                return Err(invalid(format!(
                    "--net {label}: {} fds for {} queue pairs (num_queues={}); give one tap fd per pair",
                    fds.len(),
                    net.queue_pairs(),
                    net.num_queues
                )));
            }
        }
        if let Some(tap) = &net.tap {
            if !taps.insert(tap.clone()) {
                return Err(invalid(format!("--net: tap {tap} given twice")));
            }
        }
        if net.mask.is_some() && net.ip.is_none() {
            return Err(invalid(format!("--net {label}: mask= needs ip=")));
        }
        if let Some(mac) = &net.mac {
            parse_mac(mac).map_err(|why| invalid(format!("--net {label}: mac {mac}: {why}")))?;
        }
    }
    Ok(())
}

fn check_queues(net: &NetConfig, label: &str) -> Result<(), ConfigError> {
    let queues = net.num_queues;
    if queues < 2 || !queues.is_multiple_of(2) || queues > MAX_NET_QUEUES {
        return Err(invalid(format!(
            "--net {label}: num_queues={queues}; give an even number from 2 to {MAX_NET_QUEUES} (one rx and one tx queue per pair)"
        )));
    }
    let size = net.queue_size;
    let (min, max) = (
        devices::virtio::net::MIN_QUEUE_SIZE,
        devices::virtio::net::MAX_QUEUE_SIZE,
    );
    if !size.is_power_of_two() || size < min || size > max {
        return Err(invalid(format!(
            "--net {label}: queue_size={size}; give a power of two from {min} to {max}"
        )));
    }
    Ok(())
}

/// Fills in what the configuration leaves to zvmm: a random MAC and the
/// netmask next to an address.
pub(super) fn complete_nets(nets: &mut [NetConfig]) {
    for net in nets {
        if net.mac.is_none() {
            net.mac = Some(random_mac());
        }
        if net.ip.is_some() && net.mask.is_none() {
            net.mask = Some(DEFAULT_NETMASK);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_agents_spellings_parse() {
        let net = parse_net("tap=t-vm1,mac=02:00:00:AA:bb:01").unwrap();
        assert_eq!(net.tap.as_deref(), Some("t-vm1"));
        assert_eq!(net.mac.as_deref(), Some("02:00:00:aa:bb:01"));
        assert_eq!((net.num_queues, net.queue_size), (2, 256));
        let net =
            parse_net("tap=t0,ip=10.0.0.1,mask=255.255.0.0,num_queues=4,queue_size=1024,id=eth0")
                .unwrap();
        assert_eq!(net.ip, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(net.mask, Some(Ipv4Addr::new(255, 255, 0, 0)));
        assert_eq!(
            (net.num_queues, net.queue_pairs(), net.queue_size),
            (4, 2, 1024)
        );
        assert_eq!(net.id.as_deref(), Some("eth0"));
        assert_eq!(parse_net("fd=3").unwrap().fds, Some(vec![3]));
        assert_eq!(
            parse_net("fd=[3,4],num_queues=4").unwrap().fds,
            Some(vec![3, 4])
        );
    }

    #[test]
    fn bad_values_name_the_key_and_the_value() {
        let message = |input: &str| parse_net(input).unwrap_err().to_string();
        assert_eq!(
            message("tap=t0,mac=01:00:5e:00:00:01"),
            "--net: bad value '01:00:5e:00:00:01' for 'mac': a multicast MAC (lowest bit of the first byte set) cannot be a NIC's address; use e.g. 02:00:00:00:00:01"
        );
        assert!(message("tap=t0,mac=02:00:00:00:00").contains("expected a MAC address"));
        assert!(message("tap=t0,mac=00:00:00:00:00:00").contains("all-zero"));
        assert!(message("tap=t0,ip=10.0.0").contains("'ip'"));
        assert!(message("fd=1").contains("standard streams"));
        assert!(message("fd=x").contains("expected an fd number"));
        assert!(message("tap=").contains("expected an interface name"));
        assert!(message("tap=t0,bogus=1").contains("unknown key 'bogus'"));
    }

    #[test]
    fn checks_catch_odd_queues_and_repeated_taps() {
        let nets = |inputs: &[&str]| -> Vec<NetConfig> {
            inputs.iter().map(|i| parse_net(i).unwrap()).collect()
        };
        let check = |inputs: &[&str]| validate_nets(&nets(inputs)).map_err(|e| e.to_string());
        assert!(check(&["tap=t0", "tap=t1"]).is_ok());
        assert_eq!(
            check(&["tap=t0", "tap=t0"]).unwrap_err(),
            "--net: tap t0 given twice"
        );
        assert!(check(&["tap=t0,num_queues=3"])
            .unwrap_err()
            .contains("num_queues=3; give an even number from 2 to 254"));
        assert!(check(&["tap=t0,num_queues=256"]).is_err());
        assert!(check(&["tap=t0,queue_size=100"])
            .unwrap_err()
            .contains("power of two from 64 to 4096"));
        assert!(check(&["fd=3,num_queues=4"])
            .unwrap_err()
            .contains("1 fds for 2 queue pairs"));
        assert!(check(&["tap=t0,mask=255.0.0.0"])
            .unwrap_err()
            .contains("mask= needs ip="));
        assert!(check(&["tap=a,id=x", "tap=b,id=x"])
            .unwrap_err()
            .contains("id 'x' used twice"));
    }

    #[test]
    fn random_macs_are_locally_administered_unicast_and_differ() {
        let first = parse_mac(&random_mac()).unwrap();
        assert_eq!(first[0] & 0x03, 0x02);
        let others: Vec<[u8; 6]> = (0..8).map(|_| parse_mac(&random_mac()).unwrap()).collect();
        assert!(others.iter().any(|mac| *mac != first));
    }

    #[test]
    fn completing_fills_mac_and_mask() {
        let mut nets = vec![parse_net("tap=t0,ip=10.1.2.3").unwrap()];
        complete_nets(&mut nets);
        assert!(nets[0].mac.is_some());
        assert_eq!(nets[0].mask, Some(DEFAULT_NETMASK));
    }
}
