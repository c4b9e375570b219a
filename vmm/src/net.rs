//! The VM's NICs on the host side: one tap ([`TapSet`], a queue per rx/tx
//! pair) per `net` entry, opened when the VMM is created and kept for the
//! life of the process — a guest reboot keeps its taps, and a tap zvmm
//! created lives exactly as long as zvmm (it is non-persistent: the kernel
//! removes it when zvmm's fds close, after a normal exit, a signal or
//! SIGKILL alike) — and the virtio-net device built on them for each boot.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use devices::virtio::net::{Net, NetConfig as DeviceConfig, NetError, TapError, TapOrigin, TapSet};

use crate::config::{parse_mac, NetConfig};

/// A NIC could not be set up; every message names the `--net` it is about.
#[derive(Debug, thiserror::Error)]
pub enum NetSetupError {
    /// The tap could not be opened, created or adopted.
    #[error("--net {label}")]
    Tap {
        /// The NIC (`tap=NAME` or `fd=N`).
        label: String,
        /// Why.
        #[source]
        source: TapError,
    },
    /// An inherited fd is not usable.
    #[error(
        "--net {label}: fd {fd} is not open in zvmm; pass an open tap fd (without FD_CLOEXEC)"
    )]
    FdNotOpen {
        /// The NIC.
        label: String,
        /// The fd number.
        fd: RawFd,
    },
    /// The host side of a created tap could not be configured.
    #[error("--net {label}: cannot set the host address of tap {tap}")]
    HostAddress {
        /// The NIC.
        label: String,
        /// The tap.
        tap: String,
        /// Why.
        #[source]
        source: TapError,
    },
    /// The device refused its configuration.
    #[error("--net {label}")]
    Device {
        /// The NIC.
        label: String,
        /// Why.
        #[source]
        source: NetError,
    },
}

/// One NIC: its configuration (tap name and MAC filled in) and its taps.
struct Nic {
    config: NetConfig,
    id: String,
    mac: [u8; 6],
    taps: TapSet,
}

/// Every NIC of the VM.
#[derive(Default)]
pub struct NetBackends {
    nics: Vec<Nic>,
}

impl NetBackends {
    /// Opens (or creates, or adopts) the tap of every NIC in `nets`, sets
    /// the host address of taps zvmm created when `ip` is given, and fills
    /// each configuration's `tap` with the interface name. `nets` must
    /// have been validated and completed (MACs present).
    pub fn open(nets: &mut [NetConfig]) -> Result<Self, NetSetupError> {
        let mut nics = Vec::with_capacity(nets.len());
        for (index, net) in nets.iter_mut().enumerate() {
            let label = net.label();
            let taps = open_taps(net, &label)?;
            configure_host_side(net, &taps, &label)?;
            net.tap = Some(taps.name().to_string());
            let mac = net
                .mac
                .as_deref()
                .map(parse_mac)
                .and_then(Result::ok)
                .unwrap_or([0x02, 0, 0, 0, 0, 1]);
            let id = net.id.clone().unwrap_or_else(|| format!("_net{index}"));
            nics.push(Nic {
                config: net.clone(),
                id,
                mac,
                taps,
            });
        }
        Ok(Self { nics })
    }

    /// Whether the VM has no NIC.
    pub fn is_empty(&self) -> bool {
        self.nics.is_empty()
    }

    /// Number of NICs.
    pub fn len(&self) -> usize {
        self.nics.len()
    }

    /// Adds `other`'s NICs after these (a NIC added before boot).
    pub fn append(&mut self, mut other: NetBackends) {
        self.nics.append(&mut other.nics);
    }

    /// This boot's virtio-net devices, with their ids, in configuration
    /// order; they share the NICs' taps.
    pub fn devices(&self) -> Result<Vec<(String, Net)>, NetSetupError> {
        self.nics
            .iter()
            .map(|nic| {
                let device = Net::new(DeviceConfig {
                    id: nic.id.clone(),
                    mac: nic.mac,
                    queue_size: nic.config.queue_size,
                    taps: nic.taps.share(),
                })
                .map_err(|source| NetSetupError::Device {
                    label: nic.config.label(),
                    source,
                })?;
                Ok((nic.id.clone(), device))
            })
            .collect()
    }
}

fn open_taps(net: &NetConfig, label: &str) -> Result<TapSet, NetSetupError> {
    let tap_error = |source| NetSetupError::Tap {
        label: label.to_string(),
        source,
    };
    match &net.fds {
        Some(fds) => {
            let owned = fds
                .iter()
                .map(|&fd| adopt_fd(fd, label))
                .collect::<Result<Vec<_>, _>>()?;
            // Messages name the fds the user gave, not zvmm's duplicates.
            let given: Vec<(RawFd, RawFd)> = owned
                .iter()
                .map(AsRawFd::as_raw_fd)
                .zip(fds.iter().copied())
                .collect();
            let rename = |copy: RawFd| {
                given
                    .iter()
                    .find(|(dup, _)| *dup == copy)
                    .map_or(copy, |(_, original)| *original)
            };
            let taps = TapSet::from_fds(owned).map_err(|e| tap_error(e.renumbered(rename)))?;
            // zvmm holds duplicates now; the inherited numbers would
            // otherwise leak into every child process (no FD_CLOEXEC).
            for &fd in fds {
                // SAFETY: `fd` was handed to zvmm to own (checked open in
                // `adopt_fd`), and nothing else refers to this number.
                unsafe { libc::close(fd) };
            }
            Ok(taps)
        }
        None => TapSet::open(net.tap_name(), net.queue_pairs()).map_err(tap_error),
    }
}

/// A close-on-exec duplicate of inherited fd `fd`, so that a check that
/// fails closes only the duplicate, never a descriptor zvmm uses.
fn adopt_fd(fd: RawFd, label: &str) -> Result<OwnedFd, NetSetupError> {
    // SAFETY: F_DUPFD_CLOEXEC only reads the descriptor table; an unused
    // number yields EBADF.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if copy < 0 {
        return Err(NetSetupError::FdNotOpen {
            label: label.to_string(),
            fd,
        });
    }
    // SAFETY: `copy` is a new descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

/// Sets `ip`/`mask` on a tap zvmm created; an existing or inherited tap is
/// used as it is (its owner configured it), which is said once.
fn configure_host_side(net: &NetConfig, taps: &TapSet, label: &str) -> Result<(), NetSetupError> {
    let Some(ip) = net.ip else {
        return Ok(());
    };
    if taps.origin() != TapOrigin::Created {
        eprintln!(
            "zvmm: --net {label}: tap {} already existed; ip/mask are not applied (zvmm configures only taps it creates)",
            taps.name()
        );
        return Ok(());
    }
    let mask = net
        .mask
        .unwrap_or(std::net::Ipv4Addr::new(255, 255, 255, 0));
    taps.configure_host(ip, mask)
        .map_err(|source| NetSetupError::HostAddress {
            label: label.to_string(),
            tap: taps.name().to_string(),
            source,
        })
}
