//! Tap tests against the real /dev/net/tun, each in a private network
//! namespace (the test body runs on a thread that unshares its own), so
//! nothing leaks into the host: the namespace and every tap in it vanish
//! when the thread ends. They need root and the tun module, and fail with
//! a clear message without them.

use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::*;
use crate::virtio::net::testing::in_netns;

fn kind(name: &str) -> InterfaceKind {
    interface_kind(name)
}

/// Waits up to a second for `name` to disappear.
fn gone(name: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(1);
    while kind(name) != InterfaceKind::Absent {
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
    true
}

/// Creates a persistent tun/tap `name` with `flags`, like `ip tuntap add`.
fn persistent(name: &str, flags: libc::c_int) {
    let fd = open_tun().unwrap();
    let mut ifr = ifreq(name);
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and updates an ifreq, which `ifr` is.
    let ret = unsafe { ioctl_with_mut_ref(&fd, libc::TUNSETIFF, &mut ifr) };
    assert!(ret >= 0, "TUNSETIFF: {}", io::Error::last_os_error());
    // SAFETY: TUNSETPERSIST takes its argument by value.
    let ret = unsafe { ioctl_with_val(&fd, libc::TUNSETPERSIST, 1) };
    assert!(ret >= 0, "TUNSETPERSIST: {}", io::Error::last_os_error());
}

/// An fd attached to `name` with `flags`, as a caller would hand over.
fn tun_fd(name: &str, flags: libc::c_int) -> OwnedFd {
    let fd = open_tun().unwrap();
    let mut ifr = ifreq(name);
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and updates an ifreq, which `ifr` is.
    let ret = unsafe { ioctl_with_mut_ref(&fd, libc::TUNSETIFF, &mut ifr) };
    assert!(ret >= 0, "TUNSETIFF: {}", io::Error::last_os_error());
    fd
}

/// TUNSETQUEUE without the bookkeeping of `set_attached`.
fn raw_set_queue(queue: &TapQueue, flag: libc::c_int) -> io::Result<()> {
    let mut ifr = ifreq("");
    ifr.ifr_ifru.ifru_flags = flag as libc::c_short;
    // SAFETY: TUNSETQUEUE reads an ifreq, which `ifr` is.
    if unsafe { ioctl_with_mut_ref(&queue.fd, libc::TUNSETQUEUE, &mut ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// Reads an IPv4 address-type ifreq field back with `request`.
fn read_addr(name: &str, request: libc::c_ulong) -> Ipv4Addr {
    let socket = inet_socket().unwrap();
    let mut ifr = ifreq(name);
    // SAFETY: SIOCGIFADDR/SIOCGIFNETMASK fill an ifreq, which `ifr` is.
    let ret = unsafe { ioctl_with_mut_ref(&socket, request, &mut ifr) };
    assert!(ret >= 0, "{}", io::Error::last_os_error());
    // SAFETY: the kernel filled the sockaddr with an AF_INET address.
    let addr: libc::sockaddr_in = unsafe { std::mem::transmute(ifr.ifr_ifru.ifru_addr) };
    Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr))
}

fn link_flags(name: &str) -> libc::c_int {
    let socket = inet_socket().unwrap();
    let mut ifr = ifreq(name);
    // SAFETY: SIOCGIFFLAGS fills an ifreq, which `ifr` is.
    let ret = unsafe { ioctl_with_mut_ref(&socket, libc::SIOCGIFFLAGS, &mut ifr) };
    assert!(ret >= 0, "{}", io::Error::last_os_error());
    // SAFETY: SIOCGIFFLAGS set the flags member.
    libc::c_int::from(unsafe { ifr.ifr_ifru.ifru_flags })
}

#[test]
fn names_are_checked_before_anything_is_opened() {
    for bad in ["", "a/b", "a:b", "a b", "sixteen-bytes-xx", ".", ".."] {
        let err = TapSet::open(bad, 1).unwrap_err();
        assert!(matches!(err, TapError::Name { .. }), "{bad:?}: {err:?}");
        assert!(err.to_string().contains(&format!("'{bad}'")), "{err}");
    }
    assert!(check_name("fifteen-bytes-x").is_ok());
    let err = TapSet::open("tap0", 0).unwrap_err();
    assert_eq!(err.to_string(), "a tap serves 1 to 256 queue pairs, not 0");
}

#[test]
fn a_created_tap_disappears_when_dropped() {
    in_netns(|| {
        assert_eq!(kind("zt0"), InterfaceKind::Absent);
        let taps = TapSet::open("zt0", 1).unwrap();
        assert_eq!(taps.name(), "zt0");
        assert_eq!(taps.origin(), TapOrigin::Created);
        assert_eq!(taps.queue_pairs(), 1);
        assert_eq!(kind("zt0"), InterfaceKind::Tap);
        drop(taps);
        assert!(gone("zt0"), "zt0 outlived its fds");
    });
}

#[test]
fn a_created_tap_disappears_when_its_holder_is_killed() {
    in_netns(|| {
        let taps = TapSet::open("zt%d", 1).unwrap();
        let name = taps.name().to_string();
        assert_eq!(name, "zt0", "the kernel numbers %d");
        let held = taps.queue(0).unwrap().fd.try_clone().unwrap();
        // The child inherits this thread's namespace and the tap fd.
        let mut child = Command::new("sleep")
            .arg("60")
            .stdin(Stdio::from(held))
            .spawn()
            .unwrap();
        drop(taps);
        thread::sleep(Duration::from_millis(20));
        assert_eq!(kind(&name), InterfaceKind::Tap, "the child still holds it");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(gone(&name), "{name} outlived a SIGKILLed holder");
    });
}

#[test]
fn an_existing_persistent_tap_is_attached_and_left_in_place() {
    in_netns(|| {
        persistent("ptap0", libc::IFF_TAP);
        let taps = TapSet::open("ptap0", 1).unwrap();
        assert_eq!(taps.origin(), TapOrigin::Existing);
        drop(taps);
        thread::sleep(Duration::from_millis(20));
        assert_eq!(kind("ptap0"), InterfaceKind::Tap);
        // A multi-queue persistent tap serves one pair or several.
        persistent("pmq0", libc::IFF_TAP | libc::IFF_MULTI_QUEUE);
        assert_eq!(TapSet::open("pmq0", 1).unwrap().queue_pairs(), 1);
        assert_eq!(TapSet::open("pmq0", 3).unwrap().queue_pairs(), 3);
        // A single-queue one cannot serve several.
        let err = TapSet::open("ptap0", 2).unwrap_err();
        assert!(
            matches!(err, TapError::SingleQueue { pairs: 2, .. }),
            "{err:?}"
        );
    });
}

#[test]
fn interfaces_that_are_not_taps_are_refused() {
    in_netns(|| {
        let err = TapSet::open("lo", 1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "interface lo exists but is not a tap device"
        );
        persistent("tun0", libc::IFF_TUN);
        let err = TapSet::open("tun0", 1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "interface tun0 exists but is not a tap device"
        );
    });
}

#[test]
fn a_tap_in_use_is_refused() {
    in_netns(|| {
        let _first = TapSet::open("busy0", 1).unwrap();
        let err = TapSet::open("busy0", 1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tap busy0 is already in use by another process"
        );
        // A non-persistent multi-queue tap would take another queue; it
        // is refused too.
        let _mq = TapSet::open("busy1", 2).unwrap();
        let err = TapSet::open("busy1", 2).unwrap_err();
        assert!(matches!(err, TapError::Busy { .. }), "{err:?}");
        let persistent_busy = {
            persistent("busy2", libc::IFF_TAP);
            TapSet::open("busy2", 1).unwrap()
        };
        let err = TapSet::open("busy2", 1).unwrap_err();
        assert!(matches!(err, TapError::Busy { .. }), "{err:?}");
        drop(persistent_busy);
    });
}

#[test]
fn inherited_fds_are_validated() {
    in_netns(|| {
        let mut pipe = [0; 2];
        // SAFETY: pipe(2) fills the two-element array.
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
        // SAFETY: both fds are fresh and owned by nobody else.
        let (read, _write) =
            unsafe { (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) };
        let err = TapSet::from_fds(vec![read]).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("fd {} is not a tap device fd", pipe[0])
        );
        // An unattached /dev/net/tun fd is no tap either.
        let loose = open_tun().unwrap();
        let raw = loose.as_raw_fd();
        let err = TapSet::from_fds(vec![loose]).unwrap_err();
        assert!(
            matches!(err, TapError::NotTapFd { fd } if fd == raw),
            "{err:?}"
        );
        let tun = tun_fd("l3tun", libc::IFF_TUN | libc::IFF_NO_PI);
        let err = TapSet::from_fds(vec![tun]).unwrap_err();
        assert!(
            err.to_string()
                .contains("(l3tun) is a tun device in TUN mode"),
            "{err}"
        );
        let plain = tun_fd("plain0", libc::IFF_TAP | libc::IFF_NO_PI);
        let err = TapSet::from_fds(vec![plain]).unwrap_err();
        assert!(err.to_string().contains("without IFF_VNET_HDR"), "{err}");
        let single = [tun_fd("one0", TAP_FLAGS), tun_fd("one1", TAP_FLAGS)];
        let err = TapSet::from_fds(single.into()).unwrap_err();
        assert!(err.to_string().contains("without IFF_MULTI_QUEUE"), "{err}");
        let mq = TAP_FLAGS | libc::IFF_MULTI_QUEUE;
        let mixed = [tun_fd("mq0", mq), tun_fd("mq1", mq)];
        let err = TapSet::from_fds(mixed.into()).unwrap_err();
        assert!(
            err.to_string()
                .contains("belongs to mq1, the first fd to mq0"),
            "{err}"
        );
        assert!(matches!(TapSet::from_fds(vec![]), Err(TapError::NoFds)));

        let taps = TapSet::from_fds(vec![tun_fd("kata0", mq), tun_fd("kata0", mq)]).unwrap();
        assert_eq!(taps.name(), "kata0");
        assert_eq!(taps.origin(), TapOrigin::Inherited);
        assert_eq!(taps.queue_pairs(), 2);
        // SAFETY: F_GETFL on an fd the set owns.
        let flags = unsafe { libc::fcntl(taps.queue(1).unwrap().as_raw_fd(), libc::F_GETFL) };
        assert_ne!(flags & libc::O_NONBLOCK, 0, "made non-blocking");
    });
}

#[test]
fn queues_of_a_multi_queue_tap_detach_and_reattach() {
    in_netns(|| {
        let taps = TapSet::open("mqtap", 3).unwrap();
        assert_eq!(taps.queue_pairs(), 3);
        let queue = taps.queue(2).unwrap();
        assert!(queue.attached());
        queue.set_attached(false).unwrap();
        assert!(!queue.attached());
        queue.set_attached(false).unwrap();
        // The kernel agrees: the queue cannot be detached twice...
        let err = raw_set_queue(queue, libc::IFF_DETACH_QUEUE).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
        queue.set_attached(true).unwrap();
        assert!(queue.attached());
        // ...nor attached twice.
        let err = raw_set_queue(queue, libc::IFF_ATTACH_QUEUE).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
        assert!(taps.queue(3).is_none());
        // A single-queue tap has nothing to detach.
        let single = TapSet::open("sqtap", 1).unwrap();
        single.queue(0).unwrap().set_attached(false).unwrap();
        assert!(single.queue(0).unwrap().attached());
    });
}

#[test]
fn header_size_and_offloads_reach_the_tap() {
    in_netns(|| {
        let mut taps = TapSet::open("offl0", 2).unwrap();
        taps.set_vnet_hdr_size(12).unwrap();
        let flags = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
        taps.set_offload(flags).unwrap();
        assert_eq!(
            (taps.vnet_hdr_size(), taps.offload()),
            (Some(12), Some(flags))
        );
        for pair in 0..2 {
            let mut size: libc::c_int = 0;
            let fd = &taps.queue(pair).unwrap().fd;
            // SAFETY: TUNGETVNETHDRSZ writes an int, which `size` is.
            let ret = unsafe { ioctl_with_mut_ref(fd, libc::TUNGETVNETHDRSZ, &mut size) };
            assert!(ret >= 0, "{}", io::Error::last_os_error());
            assert_eq!(size, 12, "queue {pair}");
        }
        let err = taps.set_vnet_hdr_size(3).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("cannot set the vnet header size on tap offl0"));
        let err = taps
            .set_offload(libc::TUN_F_TSO4 | 0x8000_0000)
            .unwrap_err();
        assert!(
            matches!(
                err,
                TapError::Ioctl {
                    what: "set offloads",
                    ..
                }
            ),
            "{err:?}"
        );
    });
}

#[test]
fn configure_host_sets_the_address_and_frames_flow() {
    in_netns(|| {
        let mut taps = TapSet::open("host0", 1).unwrap();
        taps.set_vnet_hdr_size(12).unwrap();
        let (ip, mask) = (Ipv4Addr::new(10, 9, 8, 1), Ipv4Addr::new(255, 255, 255, 0));
        taps.configure_host(ip, mask).unwrap();
        assert_eq!(read_addr("host0", libc::SIOCGIFADDR), ip);
        assert_eq!(read_addr("host0", libc::SIOCGIFNETMASK), mask);
        assert_ne!(link_flags("host0") & libc::IFF_UP, 0, "link up");
        // A datagram to a neighbour makes the kernel ask who has it: an
        // ARP request comes out of the tap behind a 12-byte vnet header.
        let socket = UdpSocket::bind("10.9.8.1:0").unwrap();
        socket.send_to(b"hello", "10.9.8.2:9").unwrap();
        let queue = taps.queue(0).unwrap();
        let mut frame = [0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(5);
        let len = loop {
            match queue.read(&mut frame) {
                Ok(len) => break len,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "no frame from the tap");
                    thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("tap read: {e}"),
            }
        };
        let ethernet = &frame[12..len];
        assert_eq!(&ethernet[0..6], &[0xff; 6], "broadcast");
        assert_eq!(&ethernet[12..14], &[0x08, 0x06], "ARP");
        assert_eq!(&ethernet[38..42], &[10, 9, 8, 2], "target address");
        // Writing an ARP request for 10.9.8.1 (zero vnet header) gets one
        // answered.
        let mut request = [0u8; 12 + 42];
        let arp = &mut request[12..];
        arp[..6].fill(0xff);
        arp[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 2]);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        arp[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        arp[22..28].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 2]);
        arp[28..32].copy_from_slice(&[10, 9, 8, 2]);
        arp[38..42].copy_from_slice(&[10, 9, 8, 1]);
        let iov = [libc::iovec {
            iov_base: request.as_mut_ptr().cast(),
            iov_len: request.len(),
        }];
        // SAFETY: the iovec covers `request`, alive across the call.
        assert_eq!(unsafe { queue.writev(&iov) }.unwrap(), request.len());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match queue.read(&mut frame) {
                Ok(len) if len >= 12 + 42 && frame[12 + 20..12 + 22] == [0, 2] => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "no ARP reply");
                    thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("tap read: {e}"),
            }
        }
        assert_eq!(&frame[12..18], &[0x52, 0x54, 0, 0, 0, 2], "reply to us");
    });
}
