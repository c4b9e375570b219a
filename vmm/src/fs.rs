//! The VM's shared directories on the host side, per boot: for a `path`
//! share zvmm starts virtiofsd (`crate::virtiofsd`) and stops it when the
//! boot ends, whatever ended it (power-off, reset, timeout, a signal, an
//! API request: all tear the machine down); a `socket` share connects to a
//! daemon someone else runs. Each share becomes a virtio-fs device
//! (a vhost-user frontend: the daemon serves the queues, zvmm is not on
//! the data path). A daemon that dies or disconnects while the VM runs
//! stops the VM with [`StopReason::BackendLost`] — with the daemon's exit
//! status when zvmm started it — instead of leaving the guest hanging.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::virtio::fs::{Fs, FsConfig as DeviceConfig, FsError};

use crate::config::{FsConfig, VmConfig};
use crate::lifecycle::{Lifecycle, StopReason};
use crate::memory::GuestRam;
use crate::pci::VirtioAttachment;
use crate::virtiofsd::{Virtiofsd, VirtiofsdError, VirtiofsdOptions};

/// How long a lost backend's daemon gets to finish exiting, so its exit
/// status can be reported.
const EXIT_WAIT: Duration = Duration::from_millis(200);

/// A share could not be set up; every message names the `--fs` it is about.
#[derive(Debug, thiserror::Error)]
pub enum FsSetupError {
    /// virtiofsd could not be started for a `path` share.
    #[error("--fs {label}")]
    Daemon {
        /// The share.
        label: String,
        /// Why.
        #[source]
        source: VirtiofsdError,
    },
    /// A `socket` share names no socket.
    #[error("--fs {label}: virtio-fs socket {socket} does not exist (is virtiofsd running?)")]
    NoSocket {
        /// The share.
        label: String,
        /// The socket path given.
        socket: String,
    },
    /// The device could not connect to or negotiate with its backend.
    #[error("--fs {label}")]
    Device {
        /// The share.
        label: String,
        /// Why.
        #[source]
        source: FsError,
    },
}

/// The daemons zvmm started for one boot; stopped (and reaped, their
/// sockets and runtime directories removed) when dropped.
#[derive(Default)]
pub struct FsDaemons {
    daemons: Vec<Arc<Mutex<Virtiofsd>>>,
}

impl FsDaemons {
    /// Process ids of the running daemons.
    pub fn pids(&self) -> Vec<u32> {
        self.daemons.iter().map(|d| lock(d).pid()).collect()
    }
}

impl Drop for FsDaemons {
    fn drop(&mut self) {
        for daemon in &self.daemons {
            lock(daemon).stop();
        }
    }
}

fn lock(daemon: &Mutex<Virtiofsd>) -> std::sync::MutexGuard<'_, Virtiofsd> {
    daemon.lock().unwrap_or_else(|p| p.into_inner())
}

/// Checks every share before the VM is set up (so nothing is printed or
/// built for a VM that cannot start): a `path` share's directory and the
/// virtiofsd binary, a `socket` share's socket file.
pub fn check_shares(config: &VmConfig) -> Result<(), FsSetupError> {
    for share in &config.fs {
        let label = share.label();
        if let Some(dir) = &share.path {
            let mut options = VirtiofsdOptions::new(share.tag.clone(), dir.clone());
            options.binary = config.virtiofsd.clone();
            options
                .check()
                .map_err(|source| FsSetupError::Daemon { label, source })?;
        } else if let Some(socket) = share.socket.as_ref().filter(|s| !s.exists()) {
            return Err(FsSetupError::NoSocket {
                label,
                socket: socket.display().to_string(),
            });
        }
    }
    Ok(())
}

/// Starts this boot's shares: the daemons for `path` shares and one
/// virtio-fs device per share, in configuration order.
pub fn start_shares(
    config: &VmConfig,
    ram: &GuestRam,
    lifecycle: &Arc<Lifecycle>,
) -> Result<(Vec<VirtioAttachment>, FsDaemons), FsSetupError> {
    let mut attachments = Vec::with_capacity(config.fs.len());
    let mut daemons = FsDaemons::default();
    for (index, share) in config.fs.iter().enumerate() {
        let label = share.label();
        Fs::check_memory(ram).map_err(|source| FsSetupError::Device {
            label: label.clone(),
            source,
        })?;
        let daemon = match &share.path {
            Some(_) => Some(start_daemon(config, share, &label)?),
            None => None,
        };
        let socket = match (&daemon, &share.socket) {
            (Some(daemon), _) => lock(daemon).socket().to_path_buf(),
            (None, Some(socket)) => socket.clone(),
            (None, None) => Default::default(),
        };
        let id = share.id.clone().unwrap_or_else(|| format!("_fs{index}"));
        let device = Fs::new(DeviceConfig {
            id: id.clone(),
            tag: share.tag.clone(),
            socket,
            num_request_queues: u16::try_from(share.num_queues).unwrap_or(u16::MAX),
            queue_size: share.queue_size,
            on_backend_lost: on_lost(label.clone(), daemon.clone(), lifecycle.clone()),
        })
        .map_err(|source| FsSetupError::Device {
            label: label.clone(),
            source,
        })?;
        daemons.daemons.extend(daemon);
        attachments.push(VirtioAttachment {
            label: format!("--fs {label}"),
            counters_name: id,
            device: Box::new(device),
            ioeventfds: true,
            pci_segment: share.pci_segment,
        });
    }
    Ok((attachments, daemons))
}

fn start_daemon(
    config: &VmConfig,
    share: &FsConfig,
    label: &str,
) -> Result<Arc<Mutex<Virtiofsd>>, FsSetupError> {
    let dir = share.path.clone().unwrap_or_default();
    let mut options = VirtiofsdOptions::new(share.tag.clone(), dir);
    options.binary = config.virtiofsd.clone();
    let daemon = Virtiofsd::start(options).map_err(|source| FsSetupError::Daemon {
        label: label.to_string(),
        source,
    })?;
    Ok(Arc::new(Mutex::new(daemon)))
}

/// The device's backend-loss callback: stops the VM with what happened,
/// adding how the daemon ended when zvmm started it.
fn on_lost(
    label: String,
    daemon: Option<Arc<Mutex<Virtiofsd>>>,
    lifecycle: Arc<Lifecycle>,
) -> devices::virtio::fs::BackendLostCallback {
    Arc::new(move |message: String| {
        let mut detail = format!("--fs {label}: {message}");
        if let Some(daemon) = &daemon {
            if let Some(ended) = wait_for_exit(daemon) {
                detail.push_str(&format!("; virtiofsd {ended}"));
            }
        }
        lifecycle.stop(StopReason::BackendLost { detail });
    })
}

/// The daemon's exit message, once it has exited (waiting at most
/// [`EXIT_WAIT`]: it closed its socket, so it is on its way out).
fn wait_for_exit(daemon: &Mutex<Virtiofsd>) -> Option<String> {
    let deadline = Instant::now() + EXIT_WAIT;
    loop {
        let mut daemon = lock(daemon);
        if let Ok(Some(_)) = daemon.try_wait() {
            return daemon.exit_message();
        }
        drop(daemon);
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
