//! Host tap devices on `/dev/net/tun`: opening or creating a tap by name
//! (one fd per queue pair, `IFF_MULTI_QUEUE` for more than one), adopting
//! tap fds a caller opened, and the ioctls the virtio-net device needs
//! (virtio-net header size, offloads, attaching and detaching queues, the
//! host address of a tap zvmm created).
//!
//! A tap that does not exist yet is created non-persistent, so the kernel
//! removes it as soon as its last fd closes (a normal exit and SIGKILL
//! alike); an existing persistent tap is attached and left in place.
//! Interfaces are looked up with socket ioctls, which see the caller's
//! network namespace (`/sys/class/net` shows the namespace sysfs was
//! mounted in, which differs inside `unshare -n`).

use std::ffi::c_char;
use std::fs::OpenOptions;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

/// Most queue pairs one tap takes (the kernel's `MAX_TAP_QUEUES`).
pub const MAX_TAP_QUEUES: u16 = 256;
/// Longest interface name (`IFNAMSIZ` minus the NUL).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

const TUN_PATH: &str = "/dev/net/tun";
/// `ETHTOOL_GDRVINFO` (linux/ethtool.h).
const ETHTOOL_GDRVINFO: u32 = 0x3;

/// Where the tap came from, which decides what happens to it at exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TapOrigin {
    /// zvmm created it (non-persistent): it disappears with zvmm's fds.
    Created,
    /// It existed (e.g. `ip tuntap add NAME mode tap`) and stays.
    Existing,
    /// The caller opened it and handed the fds over.
    Inherited,
}

/// Opening or configuring a tap failed.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name cannot be an interface name.
    #[error("invalid tap name '{name}': 1 to 15 bytes without '/', ':' or whitespace")]
    Name {
        /// The name given.
        name: String,
    },
    /// Zero queue pairs, or more than a tap takes.
    #[error("a tap serves 1 to 256 queue pairs, not {pairs}")]
    QueuePairs {
        /// The number asked for.
        pairs: usize,
    },
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open /dev/net/tun (is the tun module loaded, and are you root?)")]
    OpenTun(#[source] io::Error),
    /// An interface of that name exists and is something else.
    #[error("interface {name} exists but is not a tap device")]
    NotTap {
        /// The interface.
        name: String,
    },
    /// The tap is attached by another process.
    #[error("tap {name} is already in use by another process")]
    Busy {
        /// The tap.
        name: String,
    },
    /// A single-queue tap cannot serve several queue pairs.
    #[error("tap {name} is single-queue (created without multi_queue); it cannot serve {pairs} queue pairs")]
    SingleQueue {
        /// The tap.
        name: String,
        /// The queue pairs asked for.
        pairs: u16,
    },
    /// Not allowed to attach the tap.
    #[error("not permitted to attach tap {name} (needs CAP_NET_ADMIN or the tap's owner)")]
    Permission {
        /// The tap.
        name: String,
    },
    /// TUNSETIFF failed otherwise.
    #[error("cannot attach tap {name}")]
    Attach {
        /// The tap.
        name: String,
        /// The ioctl's error.
        #[source]
        source: io::Error,
    },
    /// `from_fds` got no fds.
    #[error("no tap fds given")]
    NoFds,
    /// The fd is not an attached /dev/net/tun fd.
    #[error("fd {fd} is not a tap device fd")]
    NotTapFd {
        /// The fd number.
        fd: RawFd,
    },
    /// The fd is a layer-3 tun device.
    #[error("fd {fd} ({name}) is a tun device in TUN mode, not TAP")]
    TunMode {
        /// The fd number.
        fd: RawFd,
        /// Its interface.
        name: String,
    },
    /// The fd lacks flags the device needs.
    #[error("fd {fd} ({name}) was opened without {flag}; open the tap with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR")]
    MissingFlag {
        /// The fd number.
        fd: RawFd,
        /// Its interface.
        name: String,
        /// The missing flag.
        flag: &'static str,
    },
    /// The fds are not queues of one interface.
    #[error("fd {fd} belongs to {other}, the first fd to {name}")]
    MixedFds {
        /// The odd fd.
        fd: RawFd,
        /// The first fd's interface.
        name: String,
        /// The odd fd's interface.
        other: String,
    },
    /// A tap ioctl failed.
    #[error("cannot {what} on tap {name}")]
    Ioctl {
        /// What was attempted.
        what: &'static str,
        /// The tap.
        name: String,
        /// The ioctl's error.
        #[source]
        source: io::Error,
    },
}

impl TapError {
    /// The same error with its fd numbers passed through `rename` — for a
    /// caller that checked duplicates of the fds it was handed and wants
    /// messages to name the numbers the user gave.
    pub fn renumbered(self, rename: impl Fn(RawFd) -> RawFd) -> TapError {
        match self {
            TapError::NotTapFd { fd } => TapError::NotTapFd { fd: rename(fd) },
            TapError::TunMode { fd, name } => TapError::TunMode {
                fd: rename(fd),
                name,
            },
            TapError::MissingFlag { fd, name, flag } => TapError::MissingFlag {
                fd: rename(fd),
                name,
                flag,
            },
            TapError::MixedFds { fd, name, other } => TapError::MixedFds {
                fd: rename(fd),
                name,
                other,
            },
            other => other,
        }
    }
}

/// One queue of a tap: an fd on `/dev/net/tun`, non-blocking.
#[derive(Debug)]
pub(crate) struct TapQueue {
    fd: OwnedFd,
    /// False for the sockets tests use in place of a tap.
    tun: bool,
    multi_queue: bool,
    attached: AtomicBool,
}

impl TapQueue {
    fn new(fd: OwnedFd, tun: bool, multi_queue: bool) -> Self {
        TapQueue {
            fd,
            tun,
            multi_queue,
            attached: AtomicBool::new(true),
        }
    }

    /// Reads one frame (virtio-net header first) into `buf`.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of its length; the fd is ours.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Writes one frame gathered from `iovecs`.
    ///
    /// # Safety
    ///
    /// Every iovec must point to memory readable for its length for the
    /// duration of the call.
    pub unsafe fn writev(&self, iovecs: &[libc::iovec]) -> io::Result<usize> {
        let count = libc::c_int::try_from(iovecs.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the caller guarantees the iovecs' memory; `iovecs` is an
        // array of `count` iovecs; the fd is ours.
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), iovecs.as_ptr(), count) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Whether the kernel steers received frames to this queue.
    pub fn attached(&self) -> bool {
        self.attached.load(Ordering::Acquire)
    }

    /// Attaches or detaches this queue of a multi-queue tap
    /// (`TUNSETQUEUE`), so that the kernel only steers frames to queues
    /// the driver uses. A no-op when already in that state or single-queue.
    pub fn set_attached(&self, attach: bool) -> io::Result<()> {
        if self.attached() == attach || !self.multi_queue {
            return Ok(());
        }
        if self.tun {
            let flag = if attach {
                libc::IFF_ATTACH_QUEUE
            } else {
                libc::IFF_DETACH_QUEUE
            };
            let mut ifr = ifreq("");
            ifr.ifr_ifru.ifru_flags = flag as libc::c_short;
            // SAFETY: TUNSETQUEUE reads an ifreq, which `ifr` is.
            let ret = unsafe { ioctl_with_mut_ref(&self.fd, libc::TUNSETQUEUE, &mut ifr) };
            if ret < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        self.attached.store(attach, Ordering::Release);
        Ok(())
    }
}

impl AsRawFd for TapQueue {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The queues of one tap interface, one per virtio-net queue pair.
#[derive(Debug)]
pub struct TapSet {
    name: String,
    origin: TapOrigin,
    queues: Vec<Arc<TapQueue>>,
    vnet_hdr_size: Option<i32>,
    offload: Option<u32>,
}

impl TapSet {
    /// Attaches tap `name` with `queue_pairs` queues, creating it
    /// (non-persistent) if no interface has that name. The name may hold
    /// `%d` for the kernel to number a new tap.
    pub fn open(name: &str, queue_pairs: u16) -> Result<TapSet, TapError> {
        check_name(name)?;
        if queue_pairs == 0 || queue_pairs > MAX_TAP_QUEUES {
            let pairs = usize::from(queue_pairs);
            return Err(TapError::QueuePairs { pairs });
        }
        let existing = match interface_kind(name) {
            InterfaceKind::Absent => false,
            InterfaceKind::Tap => true,
            InterfaceKind::Other => {
                let name = name.to_string();
                return Err(TapError::NotTap { name });
            }
        };
        let mut multi_queue = queue_pairs > 1;
        let mut queues = Vec::with_capacity(usize::from(queue_pairs));
        let mut actual = name.to_string();
        for _ in 0..queue_pairs {
            let fd = open_tun()?;
            match attach(&fd, &actual, multi_queue) {
                // An existing multi-queue tap also takes one queue.
                Err(AttachError::Mode) if existing && !multi_queue => {
                    multi_queue = true;
                    attach(&fd, &actual, true)
                }
                other => other,
            }
            .map_err(|e| e.into_tap_error(&actual, existing, queue_pairs))?;
            actual = tun_get_iff(&fd)
                .map(|(name, _)| name)
                .map_err(|source| ioctl_error("read the interface name", &actual, source))?;
            queues.push(Arc::new(TapQueue::new(fd, true, multi_queue)));
        }
        let (_, flags) = tun_get_iff(&queues[0].fd)
            .map_err(|source| ioctl_error("read the tap flags", &actual, source))?;
        let persistent = flags & libc::IFF_PERSIST != 0;
        if existing && !persistent {
            // A non-persistent tap lives only through another process's fd.
            return Err(TapError::Busy { name: actual });
        }
        let origin = if existing || persistent {
            TapOrigin::Existing
        } else {
            TapOrigin::Created
        };
        Ok(TapSet::new(actual, origin, queues))
    }

    /// Adopts tap fds the caller opened (e.g. handed over by Kata), one
    /// per queue pair: each must be a /dev/net/tun fd attached to the same
    /// tap, opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`
    /// (and `IFF_MULTI_QUEUE` when there are several).
    pub fn from_fds(fds: Vec<OwnedFd>) -> Result<TapSet, TapError> {
        if fds.is_empty() {
            return Err(TapError::NoFds);
        }
        if fds.len() > usize::from(MAX_TAP_QUEUES) {
            let pairs = fds.len();
            return Err(TapError::QueuePairs { pairs });
        }
        let several = fds.len() > 1;
        let mut name = String::new();
        let mut queues = Vec::with_capacity(fds.len());
        for fd in fds {
            let (fd_name, flags) = check_tap_fd(&fd, several)?;
            if queues.is_empty() {
                name = fd_name;
            } else if fd_name != name {
                let fd = fd.as_raw_fd();
                let other = fd_name;
                return Err(TapError::MixedFds { fd, name, other });
            }
            set_nonblocking(&fd).map_err(|source| ioctl_error("set O_NONBLOCK", &name, source))?;
            let multi_queue = flags & libc::IFF_MULTI_QUEUE != 0;
            queues.push(Arc::new(TapQueue::new(fd, true, multi_queue)));
        }
        Ok(TapSet::new(name, TapOrigin::Inherited, queues))
    }

    fn new(name: String, origin: TapOrigin, queues: Vec<Arc<TapQueue>>) -> Self {
        TapSet {
            name,
            origin,
            queues,
            vnet_hdr_size: None,
            offload: None,
        }
    }

    /// Sockets standing in for tap queues (unit tests, the fuzz targets):
    /// ioctls are recorded, not issued; each fd should carry one frame per
    /// message, as a `SOCK_SEQPACKET` pair does.
    pub fn fake(fds: Vec<OwnedFd>) -> TapSet {
        let multi_queue = fds.len() > 1;
        let queues = fds
            .into_iter()
            .map(|fd| Arc::new(TapQueue::new(fd, false, multi_queue)))
            .collect();
        TapSet::new("fake0".to_string(), TapOrigin::Inherited, queues)
    }

    /// Another handle on the same tap queues (the same fds): the VMM keeps
    /// one for the life of the process and gives each boot's device a
    /// share, so a guest reboot keeps the tap (and a tap zvmm created is
    /// not removed in between).
    pub fn share(&self) -> TapSet {
        TapSet {
            name: self.name.clone(),
            origin: self.origin,
            queues: self.queues.clone(),
            vnet_hdr_size: self.vnet_hdr_size,
            offload: self.offload,
        }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the tap came from.
    pub fn origin(&self) -> TapOrigin {
        self.origin
    }

    /// Number of queues (virtio-net queue pairs).
    pub fn queue_pairs(&self) -> u16 {
        // At most MAX_TAP_QUEUES queues.
        self.queues.len() as u16
    }

    /// The queue of pair `pair`.
    pub(crate) fn queue(&self, pair: u16) -> Option<&Arc<TapQueue>> {
        self.queues.get(usize::from(pair))
    }

    /// The virtio-net header size last set.
    pub fn vnet_hdr_size(&self) -> Option<i32> {
        self.vnet_hdr_size
    }

    /// The `TUN_F_*` offloads last set.
    pub fn offload(&self) -> Option<u32> {
        self.offload
    }

    /// Sets the virtio-net header length the tap reads and writes in
    /// front of each frame (`TUNSETVNETHDRSZ`; shared by all queues).
    pub fn set_vnet_hdr_size(&mut self, size: i32) -> Result<(), TapError> {
        for queue in self.queues.iter().filter(|q| q.tun) {
            // SAFETY: TUNSETVNETHDRSZ reads an int, which `size` is.
            let ret = unsafe { ioctl_with_ref(&queue.fd, libc::TUNSETVNETHDRSZ, &size) };
            if ret < 0 {
                let source = io::Error::last_os_error();
                return Err(ioctl_error("set the vnet header size", &self.name, source));
            }
        }
        self.vnet_hdr_size = Some(size);
        Ok(())
    }

    /// Sets which offloads (`TUN_F_CSUM`, `TUN_F_TSO4`, ...) the tap may
    /// hand us in received frames (`TUNSETOFFLOAD`).
    pub fn set_offload(&mut self, flags: u32) -> Result<(), TapError> {
        for queue in self.queues.iter().filter(|q| q.tun) {
            // SAFETY: TUNSETOFFLOAD takes its argument by value.
            let ret = unsafe {
                ioctl_with_val(&queue.fd, libc::TUNSETOFFLOAD, libc::c_ulong::from(flags))
            };
            if ret < 0 {
                let source = io::Error::last_os_error();
                return Err(ioctl_error("set offloads", &self.name, source));
            }
        }
        self.offload = Some(flags);
        Ok(())
    }

    /// Gives the host side of the tap an IPv4 address and brings it up.
    /// Meant for taps zvmm created; the caller enforces that.
    pub fn configure_host(&self, ip: Ipv4Addr, netmask: Ipv4Addr) -> Result<(), TapError> {
        let name = &self.name;
        let socket = inet_socket().map_err(|source| ioctl_error("open a socket", name, source))?;
        let mut ifr = ifreq(name);
        ifr.ifr_ifru.ifru_addr = sockaddr(ip);
        // SAFETY: SIOCSIFADDR reads an ifreq, which `ifr` is.
        if unsafe { ioctl_with_ref(&socket, libc::SIOCSIFADDR, &ifr) } < 0 {
            let source = io::Error::last_os_error();
            return Err(ioctl_error("set the address", name, source));
        }
        ifr.ifr_ifru.ifru_netmask = sockaddr(netmask);
        // SAFETY: SIOCSIFNETMASK reads an ifreq, which `ifr` is.
        if unsafe { ioctl_with_ref(&socket, libc::SIOCSIFNETMASK, &ifr) } < 0 {
            let source = io::Error::last_os_error();
            return Err(ioctl_error("set the netmask", name, source));
        }
        // SAFETY: SIOCGIFFLAGS fills the flags of an ifreq, which `ifr` is.
        if unsafe { ioctl_with_mut_ref(&socket, libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
            let source = io::Error::last_os_error();
            return Err(ioctl_error("read the link flags", name, source));
        }
        // SAFETY: SIOCGIFFLAGS just set the flags member of the union.
        let flags = unsafe { ifr.ifr_ifru.ifru_flags };
        ifr.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        // SAFETY: SIOCSIFFLAGS reads an ifreq, which `ifr` is.
        if unsafe { ioctl_with_ref(&socket, libc::SIOCSIFFLAGS, &ifr) } < 0 {
            let source = io::Error::last_os_error();
            return Err(ioctl_error("bring the link up", name, source));
        }
        Ok(())
    }
}

fn ioctl_error(what: &'static str, name: &str, source: io::Error) -> TapError {
    let name = name.to_string();
    TapError::Ioctl { what, name, source }
}

/// Checks `name` the way the kernel's `dev_valid_name` does.
fn check_name(name: &str) -> Result<(), TapError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if valid {
        Ok(())
    } else {
        let name = name.to_string();
        Err(TapError::Name { name })
    }
}

/// An ifreq naming `name` (truncated to [`MAX_NAME_LEN`]), all else zero.
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data, for which all-zero bytes are valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name[..MAX_NAME_LEN].iter_mut().zip(name.bytes()) {
        *dst = src as c_char;
    }
    ifr
}

fn ifreq_name(ifr: &libc::ifreq) -> String {
    let bytes: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and
    // the kernel reads an AF_INET sockaddr as a sockaddr_in.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(addr) }
}

/// A datagram socket for interface ioctls, in the caller's namespace.
fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What an interface name refers to.
#[derive(Debug, PartialEq, Eq)]
enum InterfaceKind {
    Absent,
    Tap,
    Other,
}

/// `struct ethtool_drvinfo` (linux/ethtool.h).
#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// Looks `name` up in the caller's network namespace; a tap is a device
/// of the tun driver in TAP mode (ethtool's driver "tun", bus "tap").
fn interface_kind(name: &str) -> InterfaceKind {
    let Ok(socket) = inet_socket() else {
        return InterfaceKind::Absent;
    };
    let mut ifr = ifreq(name);
    // SAFETY: SIOCGIFINDEX fills the index of an ifreq, which `ifr` is.
    if unsafe { ioctl_with_mut_ref(&socket, libc::SIOCGIFINDEX, &mut ifr) } < 0 {
        return InterfaceKind::Absent;
    }
    // SAFETY: EthtoolDrvinfo is plain old data; all-zero bytes are valid.
    let mut info: EthtoolDrvinfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    ifr.ifr_ifru.ifru_data = (&mut info as *mut EthtoolDrvinfo).cast();
    // SAFETY: SIOCETHTOOL with ETHTOOL_GDRVINFO fills the ethtool_drvinfo
    // that `ifr.ifru_data` points to, which lives across the call.
    if unsafe { ioctl_with_ref(&socket, libc::SIOCETHTOOL, &ifr) } < 0 {
        // Devices without ethtool support (e.g. lo) are not taps.
        return InterfaceKind::Other;
    }
    let text = |bytes: &[u8]| bytes.split(|&b| b == 0).next().unwrap_or(&[]).to_vec();
    if text(&info.driver) == b"tun" && text(&info.bus_info) == b"tap" {
        InterfaceKind::Tap
    } else {
        InterfaceKind::Other
    }
}

fn open_tun() -> Result<OwnedFd, TapError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(TUN_PATH)
        .map_err(TapError::OpenTun)?;
    Ok(OwnedFd::from(file))
}

/// Why TUNSETIFF refused.
#[derive(Debug)]
enum AttachError {
    /// EINVAL: the interface is not a tap or its queue mode differs.
    Mode,
    /// EBUSY: attached elsewhere.
    Busy,
    /// EPERM.
    Permission,
    Other(io::Error),
}

impl AttachError {
    fn into_tap_error(self, name: &str, existing: bool, pairs: u16) -> TapError {
        let name = name.to_string();
        match self {
            AttachError::Mode if existing && pairs > 1 => TapError::SingleQueue { name, pairs },
            AttachError::Mode => TapError::NotTap { name },
            AttachError::Busy => TapError::Busy { name },
            AttachError::Permission => TapError::Permission { name },
            AttachError::Other(source) => TapError::Attach { name, source },
        }
    }
}

/// TUNSETIFF: binds `fd` to tap `name` (creating it if absent).
fn attach(fd: &OwnedFd, name: &str, multi_queue: bool) -> Result<(), AttachError> {
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    if multi_queue {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    let mut ifr = ifreq(name);
    // The flags fit 16 bits (the highest is IFF_VNET_HDR, 0x4000).
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and updates an ifreq, which `ifr` is.
    if unsafe { ioctl_with_mut_ref(fd, libc::TUNSETIFF, &mut ifr) } >= 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    Err(match err.raw_os_error() {
        Some(libc::EINVAL) => AttachError::Mode,
        Some(libc::EBUSY) => AttachError::Busy,
        Some(libc::EPERM) => AttachError::Permission,
        _ => AttachError::Other(err),
    })
}

/// TUNGETIFF: the interface name and `IFF_*` flags of an attached fd.
fn tun_get_iff(fd: &OwnedFd) -> io::Result<(String, libc::c_int)> {
    let mut ifr = ifreq("");
    // SAFETY: TUNGETIFF fills an ifreq, which `ifr` is.
    if unsafe { ioctl_with_mut_ref(fd, libc::TUNGETIFF, &mut ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNGETIFF set the flags member of the union.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    // The kernel's flags are 16 bits; keep them unsigned.
    Ok((ifreq_name(&ifr), libc::c_int::from(flags as u16)))
}

/// Checks an inherited fd; returns its interface name and flags.
fn check_tap_fd(fd: &OwnedFd, several: bool) -> Result<(String, libc::c_int), TapError> {
    let raw = fd.as_raw_fd();
    let (name, flags) = tun_get_iff(fd).map_err(|_| TapError::NotTapFd { fd: raw })?;
    if flags & libc::IFF_TAP == 0 {
        return Err(TapError::TunMode { fd: raw, name });
    }
    let required = [
        (libc::IFF_NO_PI, "IFF_NO_PI", true),
        (libc::IFF_VNET_HDR, "IFF_VNET_HDR", true),
        (libc::IFF_MULTI_QUEUE, "IFF_MULTI_QUEUE", several),
    ];
    for (bit, flag, needed) in required {
        if needed && flags & bit == 0 {
            return Err(TapError::MissingFlag {
                fd: raw,
                name,
                flag,
            });
        }
    }
    Ok((name, flags))
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: F_GETFL on our fd; the result is checked.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on our fd with the old flags plus O_NONBLOCK.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
