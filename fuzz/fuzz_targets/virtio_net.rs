//! virtio-net as a guest drives it, on one or two queue pairs whose tap
//! queues are `SOCK_SEQPACKET` pairs: frames from the input wait on the
//! "tap" for the receive queues; transmit chains (virtio-net headers with
//! any flags, checksum and GSO fields), receive buffers and control-queue
//! commands come from the input; every transmit and control chain runs
//! until it is used, then the device is reset.
#![no_main]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use devices::virtio::net::{Net, NetConfig, TapSet};
use libfuzzer_sys::fuzz_target;
use zvmm_fuzz::{fill_buffers, guest_memory, negotiate, run, Input};

/// A connected, non-blocking `SOCK_SEQPACKET` pair: (device end, peer).
fn socket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    let kind = libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: socketpair fills the two-element array.
    let ret = unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, fds.as_mut_ptr()) };
    assert_eq!(ret, 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: both fds are fresh and owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mode = input.u8();
    let pairs = 1 + usize::from(mode & 1);
    let (ends, peers): (Vec<_>, Vec<_>) = (0..pairs).map(|_| socket_pair()).unzip();
    for _ in 0..(mode >> 1) % 8 {
        let len = input_len(&mut input);
        let frame = input.take(usize::from(len));
        let peer = &peers[usize::from(frame.first().copied().unwrap_or(0)) % pairs];
        // SAFETY: `frame` is valid for reads of its length; the fd is open.
        unsafe { libc::send(peer.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    }
    let config = NetConfig {
        id: "fuzz".into(),
        mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        queue_size: 64 << (mode >> 4 & 3),
        taps: TapSet::fake(ends),
    };
    let mut device = Net::new(config).expect("net device");
    let mem = guest_memory();
    let driver = negotiate(&mut device, &mem, &mut input);
    fill_buffers(&mem, &mut input);
    let wait_on: &[u16] = if pairs == 1 { &[1, 2] } else { &[1, 3] };
    run(&mut device, &mem, driver, wait_on);
    drop(peers);
});

/// A frame length: mostly short, sometimes up to 64 KiB.
fn input_len(input: &mut Input<'_>) -> u16 {
    match input.u8() {
        0 => input.u16(),
        short => u16::from(short) * 4,
    }
}
