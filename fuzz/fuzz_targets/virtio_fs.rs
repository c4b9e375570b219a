//! virtio-fs as a vhost-user frontend facing a backend that answers as
//! the input says: the backend's replies to the handshake (features,
//! protocol features, queue count) and to activation and reset (ring
//! bases, acks), mostly well-formed, sometimes with the wrong request
//! code, size or flags, garbage or a closed socket. With the handshake
//! done, the guest negotiates, sets up queues and sets DRIVER_OK on
//! memfd-backed memory, then resets the device.
#![no_main]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use devices::virtio::fs::{Fs, FsConfig};
use devices::virtio::GuestMemory;
use libfuzzer_sys::fuzz_target;
use vm_memory::{FileOffset, GuestAddress};
use zvmm_fuzz::{negotiate, run, Input, MEM_SIZE};

/// vhost-user requests that always get a reply.
const GET_FEATURES: u32 = 1;
const GET_VRING_BASE: u32 = 11;
const GET_PROTOCOL_FEATURES: u32 = 15;
const GET_QUEUE_NUM: u32 = 17;
/// Header flags: version 1, reply, reply wanted.
const VERSION: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
/// VIRTIO_F_VERSION_1 and VHOST_USER_F_PROTOCOL_FEATURES.
const REQUIRED_FEATURES: u64 = 1 << 32 | 1 << 30;

/// Guest RAM on a memfd, as `--memory shared=on` gives virtio-fs.
fn shared_memory() -> GuestMemory {
    // SAFETY: memfd_create takes a NUL-terminated name and flags.
    let fd = unsafe { libc::memfd_create(c"zvmm-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: the fd is fresh and owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(MEM_SIZE).expect("memfd size");
    GuestMemory::from_ranges_with_files([(
        GuestAddress(0),
        MEM_SIZE as usize,
        Some(FileOffset::new(file, 0)),
    )])
    .expect("guest memory")
}

/// Serves one frontend connection: reads each request and answers those
/// that want an answer with what `script` says.
fn backend(mut stream: UnixStream, script: Vec<u8>) {
    let mut input = Input::new(&script);
    let mut header = [0u8; 12];
    while stream.read_exact(&mut header).is_ok() {
        let request = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
        let flags = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        let size = u32::from_le_bytes(header[8..].try_into().expect("4 bytes"));
        let mut body = vec![0u8; size.min(1 << 16) as usize];
        if stream.read_exact(&mut body).is_err() {
            return;
        }
        let wants = matches!(
            request,
            GET_FEATURES | GET_VRING_BASE | GET_PROTOCOL_FEATURES | GET_QUEUE_NUM
        );
        if !wants && flags & NEED_REPLY == 0 {
            continue;
        }
        if !answer(&mut stream, &mut input, request, &body) {
            return;
        }
    }
}

/// Writes one reply; `false` when the backend hangs up instead.
fn answer(stream: &mut UnixStream, input: &mut Input<'_>, request: u32, body: &[u8]) -> bool {
    let how = input.u8();
    let mut payload = match request {
        GET_FEATURES | GET_PROTOCOL_FEATURES if how < 0x80 => {
            (input.u64() | REQUIRED_FEATURES).to_le_bytes().to_vec()
        }
        GET_QUEUE_NUM if how < 0x80 => 2u64.to_le_bytes().to_vec(),
        GET_VRING_BASE => {
            let mut state = body.get(..4).unwrap_or(&[0; 4]).to_vec();
            state.extend_from_slice(&input.u32().to_le_bytes());
            state
        }
        GET_FEATURES | GET_PROTOCOL_FEATURES | GET_QUEUE_NUM => input.u64().to_le_bytes().to_vec(),
        _ => 0u64.to_le_bytes().to_vec(),
    };
    let (mut code, mut flags) = (request, VERSION | REPLY);
    match how & 0xf {
        0xa => code = u32::from(input.u8()),
        0xb => flags = input.u32(),
        0xc => payload = input.short_slice().to_vec(),
        0xd => return false,
        0xe => {
            // Garbage, then hang up (a silent backend costs REPLY_TIMEOUT).
            let _ = stream.write_all(input.short_slice());
            return false;
        }
        _ => {}
    }
    let mut reply = Vec::with_capacity(12 + payload.len());
    reply.extend_from_slice(&code.to_le_bytes());
    reply.extend_from_slice(&flags.to_le_bytes());
    reply.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    reply.extend_from_slice(&payload);
    // A body shorter than the frontend expects is waited for until
    // REPLY_TIMEOUT: hang up after it instead, to keep runs fast.
    stream.write_all(&reply).is_ok() && payload.len() >= 8
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let script_len = usize::from(input.u8());
    let script = input.take(script_len).to_vec();
    let socket = zvmm_fuzz::scratch_dir().join("fs.sock");
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).expect("backend socket");
    let server = std::thread::spawn(move || {
        if let Ok((stream, _)) = listener.accept() {
            backend(stream, script);
        }
    });
    let mut config = FsConfig::new("fuzz", "vroot", &socket, Arc::new(|_| {}));
    config.queue_size = 64 << (input.u8() % 5);
    match Fs::new(config) {
        Ok(mut device) => {
            let mem = shared_memory();
            let driver = negotiate(&mut device, &mem, &mut input);
            run(&mut device, &mem, driver, &[]);
        }
        Err(_) => {
            // The backend may still wait for a connection that never came.
            let _ = UnixStream::connect(&socket);
        }
    }
    server.join().expect("backend thread");
});
