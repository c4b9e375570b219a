//! virtio-vsock (hybrid, over Unix sockets) as a guest and a host program
//! drive it: the guest's transmit packets (any operation, ports, flags,
//! credit fields and lengths; a host listener waits on port 1024), receive
//! buffers and event queue come from the input, and so does the line a
//! host client writes on the device's socket (`CONNECT <port>` or junk).
//! Every transmit chain runs until it is used, then the device is reset.
#![no_main]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::OnceLock;

use devices::virtio::vsock::{Vsock, VsockConfig};
use libfuzzer_sys::fuzz_target;
use zvmm_fuzz::{fill_buffers, guest_memory, negotiate, run, Input};

/// The device's socket path; a listener for guest connections to host
/// port 1024 waits next to it for the whole run.
fn socket() -> &'static (PathBuf, UnixListener) {
    static SOCKET: OnceLock<(PathBuf, UnixListener)> = OnceLock::new();
    SOCKET.get_or_init(|| {
        let path = zvmm_fuzz::scratch_dir().join("v.sock");
        let listener = UnixListener::bind(zvmm_fuzz::scratch_dir().join("v.sock_1024"))
            .expect("port 1024 listener");
        listener.set_nonblocking(true).expect("non-blocking");
        (path, listener)
    })
}

fuzz_target!(|data: &[u8]| {
    let (path, listener) = socket();
    let mut input = Input::new(data);
    let mode = input.u8();
    let config = VsockConfig {
        id: "fuzz".into(),
        cid: 3,
        socket: path.clone(),
    };
    let mut device = Vsock::new(config).expect("vsock device");
    let host_line = input.short_slice();
    let _client = (mode & 1 == 1).then(|| {
        let mut client = UnixStream::connect(path).expect("connect to the device socket");
        let _ = client.write_all(host_line);
        client
    });
    let mem = guest_memory();
    let driver = negotiate(&mut device, &mem, &mut input);
    fill_buffers(&mem, &mut input);
    run(&mut device, &mem, driver, &[1]);
    drop(device);
    while listener.accept().is_ok() {}
});
