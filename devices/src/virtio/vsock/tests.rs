//! The vsock device end to end on mock queues: a fake guest driver on one
//! side, host clients and listeners on Unix sockets on the other.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use super::device::MIN_GUEST_CID;
use super::muxer::{CONNECT_TIMEOUT, MAX_RESETS};
use super::proto::*;
use super::testing::*;
use super::{Vsock, VsockConfig, VsockError};
use crate::virtio::{InterruptKind, VirtioDevice};

/// A host client connected through the device to guest port `port`:
/// the REQUEST the guest saw, answered with RESPONSE; returns the client
/// stream and the host port the device chose.
fn establish(dev: &TestDevice, guest: &mut Guest<'_>, port: u32) -> (UnixStream, u32) {
    let mut client = dev.host_connect(port);
    guest.post_rx(1);
    let (request, _) = guest.recv();
    assert_eq!(request.op, OP_REQUEST);
    assert_eq!((request.src_cid, request.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!(request.dst_port, port);
    assert!(request.src_port >= 1 << 30, "{request:?}");
    assert_eq!((request.type_, request.buf_alloc), (TYPE_STREAM, BUF_ALLOC));
    guest.send(guest_header(port, request.src_port, OP_RESPONSE), &[]);
    assert_eq!(read_line(&mut client), format!("OK {}\n", request.src_port));
    (client, request.src_port)
}

fn read_exactly(stream: &mut UnixStream, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn host_connect_becomes_a_request_and_the_response_an_ok_line() {
    let mem = memory();
    let mut dev = test_device();
    let mut guest = Guest::new(&mem);
    guest.activate(&mut dev.device);
    let (_client, local) = establish(&dev, &mut guest, 1024);
    assert!(local >= 1 << 30);
    dev.wait_counter("host_connections", 1);
    guest.interrupt.wait_for(InterruptKind::Queue(0), 1);
    guest.interrupt.wait_for(InterruptKind::Queue(1), 1);
}

#[test]
fn bytes_flow_both_ways_and_fwd_cnt_counts_what_reached_the_host() {
    let mem = memory();
    let mut dev = test_device();
    let mut guest = Guest::new(&mem);
    guest.activate(&mut dev.device);
    let (mut client, local) = establish(&dev, &mut guest, 1024);
    client.write_all(b"ping from the host").unwrap();
    guest.post_rx(1);
    let (data, payload) = guest.recv();
    assert_eq!(
        (data.op, data.src_port, data.dst_port),
        (OP_RW, local, 1024)
    );
    assert_eq!(payload, b"ping from the host");
    guest.send(guest_header(1024, local, OP_RW), b"pong from the guest");
    assert_eq!(read_exactly(&mut client, 19), b"pong from the guest");
    // The next packet carries fwd_cnt = the 19 bytes the host got.
    client.write_all(b"!").unwrap();
    guest.post_rx(1);
    let (next, payload) = guest.recv();
    assert_eq!((next.fwd_cnt, payload.as_slice()), (19, &b"!"[..]));
    assert_eq!(dev.counter("tx_bytes"), 19);
    assert_eq!(dev.counter("rx_bytes"), 19);
}

#[test]
fn host_data_stops_at_the_guest_credit_until_it_grows() {
    let mem = memory();
    let mut dev = test_device();
    let mut guest = Guest::new(&mem);
    guest.activate(&mut dev.device);
    let mut client = dev.host_connect(7);
    guest.post_rx(1);
    let (request, _) = guest.recv();
    let local = request.src_port;
    let small = Header {
        buf_alloc: 8,
        ..guest_header(7, local, OP_RESPONSE)
    };
    guest.send(small, &[]);
    assert_eq!(read_line(&mut client), format!("OK {local}\n"));
    client.write_all(b"0123456789abcdefghij").unwrap();
    guest.post_rx(3);
    let (first, payload) = guest.recv();
    assert_eq!((first.op, payload.as_slice()), (OP_RW, &b"01234567"[..]));
    let (ask, _) = guest.recv();
    assert_eq!(ask.op, OP_CREDIT_REQUEST, "{ask:?}");
    assert!(guest.try_recv(Duration::from_millis(100)).is_none());
    // The guest consumed the 8 bytes.
    let update = Header {
        buf_alloc: 8,
        fwd_cnt: 8,
        ..guest_header(7, local, OP_CREDIT_UPDATE)
    };
    guest.send(update, &[]);
    let (second, payload) = guest.recv();
    assert_eq!((second.op, payload.as_slice()), (OP_RW, &b"89abcdef"[..]));
}

#[test]
fn the_device_sends_credit_updates_as_the_host_consumes() {
    let mem = memory();
    let mut dev = test_device();
    let mut guest = Guest::new(&mem);
    guest.activate(&mut dev.device);
    let (mut client, local) = establish(&dev, &mut guest, 1024);
    let chunk = pattern(9, MAX_PAYLOAD as usize);
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; 4 * MAX_PAYLOAD as usize];
        client.read_exact(&mut got).unwrap();
        got
    });
    guest.post_rx(4);
    for _ in 0..4 {
        guest.send(guest_header(1024, local, OP_RW), &chunk);
    }
    let got = reader.join().unwrap();
    assert!(got.chunks(chunk.len()).all(|c| c == chunk));
    let (update, _) = guest.recv();
    assert_eq!(update.op, OP_CREDIT_UPDATE, "{update:?}");
    assert!(update.fwd_cnt >= 3 * MAX_PAYLOAD, "{update:?}");
}

#[test]
fn data_beyond_the_advertised_buffer_resets_the_connection() {
    let mem = memory();
    let mut dev = test_device();
    let mut guest = Guest::new(&mem);
    guest.activate(&mut dev.device);
    let (mut client, local) = establish(&dev, &mut guest, 1024);
    // The host never reads: its socket buffer, then zvmm's 256 KiB fill.
    let chunk = vec![7u8; MAX_PAYLOAD as usize];
    let mut sent = 0;
    while dev.counter("tx_refused") == 0 {
        assert!(sent < 64, "never refused after {sent} chunks");
        guest.send(guest_header(1024, local, OP_RW), &chunk);
        sent += 1;
        wait_until("the chunk taken", || guest.tx_used() >= sent);
    }
    // Credit updates for what the host's socket buffer took, then the RST.
    let rst = loop {
        guest.post_rx(1);
        let (packet, _) = guest.recv();
        if packet.op != OP_CREDIT_UPDATE {
            break packet;
        }
    };
    assert_eq!((rst.op, rst.src_port, rst.dst_port), (OP_RST, local, 1024));
    // What the device held is gone with the connection; the host side sees
    // the bytes that reached it, then the end.
    client.set_nonblocking(false).unwrap();
    let mut all = Vec::new();
    client.read_to_end(&mut all).unwrap();
    assert!(all.len() < sent as usize * chunk.len());
}

#[test]
fn guest_connections_go_to_the_port_listener() {
    let mem = memory();
    let mut dev = test_device();
    let mut guest = Guest::new(&mem);
    guest.activate(&mut dev.device);
    let mut path = dev.socket.clone().into_os_string();
    path.push("_5000");
    let listener = UnixListener::bind(&path).unwrap();
    guest.post_rx(2);
    guest.send(guest_header(40000, 5000, OP_REQUEST), &[]);
    let (response, _) = guest.recv();
    assert_eq!(response.op, OP_RESPONSE);
    assert_eq!((response.src_port, response.dst_port), (5000, 40000));
    let (mut host, _) = listener.accept().unwrap();
    guest.send(guest_header(40000, 5000, OP_RW), b"hello host");
    assert_eq!(read_exactly(&mut host, 10), b"hello host");
    host.write_all(b"hello guest").unwrap();
    let (data, payload) = guest.recv();
    assert_eq!((data.op, payload.as_slice()), (OP_RW, &b"hello guest"[..]));
    assert_eq!(dev.counter("guest_connections"), 1);
}

#[test]
fn a_port_nobody_listens_on_is_refused_with_a_reset() {
    let mem = memory();
    let mut dev = test_device();
    let mut guest = Guest::new(&mem);
    guest.activate(&mut dev.device);
    guest.post_rx(1);
    guest.send(guest_header(40001, 6000, OP_REQUEST), &[]);
    let (rst, _) = guest.recv();
    assert_eq!((rst.op, rst.src_port, rst.dst_port), (OP_RST, 6000, 40001));
    assert_eq!(dev.counter("guest_connect_refused"), 1);
}

#[test]
fn a_guest_refusal_closes_the_host_client() {
    let mem = memory();
    let mut dev = test_device();
    let mut guest = Guest::new(&mem);
    guest.activate(&mut dev.device);
    let mut client = dev.host_connect(99);
    guest.post_rx(1);
    let (request, _) = guest.recv();
    guest.send(guest_header(99, request.src_port, OP_RST), &[]);
    assert_eq!(read_line(&mut client), "", "a refused client reads the end");
    assert_eq!(dev.counter("host_connect_failures"), 1);
}

#[test]
fn a_guest_that_never_answers_gets_its_client_closed_in_time() {
    // No driver at all: the device is never activated.
    let dev = test_device();
    let mut client = dev.host_connect(1024);
    let start = Instant::now();
    assert_eq!(read_line(&mut client), "");
    let waited = start.elapsed();
    assert!(
        waited >= CONNECT_TIMEOUT - Duration::from_millis(100),
        "{waited:?}"
    );
    assert!(
        waited < CONNECT_TIMEOUT + Duration::from_secs(1),
        "{waited:?}"
    );
    assert_eq!(dev.counter("host_connect_failures"), 1);
}

#[test]
fn a_bad_connect_line_closes_the_client() {
    let dev = test_device();
    let mut client = UnixStream::connect(&dev.socket).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    client.write_all(b"HELLO 1024\n").unwrap();
    let start = Instant::now();
    assert_eq!(read_line(&mut client), "");
    assert!(start.elapsed() < Duration::from_secs(1));
    dev.wait_counter("host_connect_failures", 1);
}

#[test]
fn shutdowns_both_ways_end_the_connection_cleanly() {
    let mem = memory();
    let mut dev = test_device();
    let mut guest = Guest::new(&mem);
    guest.activate(&mut dev.device);
    // The host side closes: the guest hears SHUTDOWN, then its RST ends it.
    let (client, local) = establish(&dev, &mut guest, 1024);
    drop(client);
    guest.post_rx(1);
    let (shutdown, _) = guest.recv();
    assert_eq!((shutdown.op, shutdown.flags), (OP_SHUTDOWN, SHUTDOWN_BOTH));
    guest.send(guest_header(1024, local, OP_RST), &[]);
    // The guest side closes: what it sent reaches the host, then the end,
    // and the device answers with RST.
    let (mut client, local) = establish(&dev, &mut guest, 1025);
    guest.send(guest_header(1025, local, OP_RW), b"last words");
    let shut = Header {
        flags: SHUTDOWN_BOTH,
        ..guest_header(1025, local, OP_SHUTDOWN)
    };
    guest.send(shut, &[]);
    let mut all = Vec::new();
    client.read_to_end(&mut all).unwrap();
    assert_eq!(all, b"last words");
    guest.post_rx(1);
    let (rst, _) = guest.recv();
    assert_eq!((rst.op, rst.src_port), (OP_RST, local));
    assert_eq!(dev.counter("tx_refused"), 0);
}

#[test]
fn a_host_half_close_sends_shutdown_send_and_the_guest_may_still_write() {
    let mem = memory();
    let mut dev = test_device();
    let mut guest = Guest::new(&mem);
    guest.activate(&mut dev.device);
    let (mut client, local) = establish(&dev, &mut guest, 1024);
    client.shutdown(std::net::Shutdown::Write).unwrap();
    guest.post_rx(1);
    let (shutdown, _) = guest.recv();
    assert_eq!((shutdown.op, shutdown.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    guest.send(guest_header(1024, local, OP_RW), b"reply");
    assert_eq!(read_exactly(&mut client, 5), b"reply");
}

#[test]
fn malformed_guest_packets_are_dropped_or_refused_and_counted() {
    let mem = memory();
    let mut dev = test_device();
    let mut guest = Guest::new(&mem);
    guest.activate(&mut dev.device);
    let (mut client, local) = establish(&dev, &mut guest, 1024);
    let foreign = Header {
        src_cid: 7,
        ..guest_header(1024, local, OP_RW)
    };
    guest.send(foreign, b"spoofed");
    let elsewhere = Header {
        dst_cid: 9,
        ..guest_header(1024, local, OP_RW)
    };
    guest.send(elsewhere, b"lost");
    // Header shorter than 44 bytes, payload longer than 64 KiB, a
    // device-writable header, a header outside guest memory.
    guest.send_raw(&encode(&guest_header(1024, local, OP_RW))[..40], &[]);
    let huge = Header {
        len: MAX_PAYLOAD + 1,
        ..guest_header(1024, local, OP_RW)
    };
    guest.send_raw(&encode(&huge), &[1, 2, 3]);
    guest.send_chain(&[w(DATA, HDR as u32)]);
    guest.send_chain(&[r(MEM_SIZE as u64 - 8, HDR as u32)]);
    wait_until("the bad packets taken", || guest.tx_used() >= 7);
    assert_eq!(dev.counter("tx_bad_address"), 2);
    assert_eq!(dev.counter("tx_malformed"), 4);
    // The connection survived: data still flows.
    guest.send(guest_header(1024, local, OP_RW), b"fine");
    assert_eq!(read_exactly(&mut client, 4), b"fine");
    // No connection, another socket type, an unknown operation: RST each.
    guest.send(guest_header(5555, 6666, OP_RW), b"stray");
    let seqpacket = Header {
        type_: 2,
        ..guest_header(5556, 6667, OP_REQUEST)
    };
    guest.send(seqpacket, &[]);
    guest.send(guest_header(1024, local, 99), &[]);
    guest.post_rx(3);
    let mut resets = Vec::new();
    for _ in 0..3 {
        let (rst, _) = guest.recv();
        assert_eq!(rst.op, OP_RST, "{rst:?}");
        resets.push((rst.src_port, rst.dst_port));
    }
    resets.sort();
    assert_eq!(resets, [(6666, 5555), (6667, 5556), (local, 1024)]);
    assert_eq!(dev.counter("tx_refused"), 3);
    // The unknown operation ended that connection.
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn a_head_index_beyond_the_queue_stops_the_queues_and_needs_a_reset() {
    let mem = memory();
    let mut dev = test_device();
    let mut guest = Guest::new(&mem);
    guest.activate(&mut dev.device);
    guest.send_head(0, 4000);
    wait_until("needs reset", || guest.interrupt.needs_reset());
    assert_eq!(guest.tx_used(), 0);
    assert_eq!(dev.counter("tx_malformed"), 1);
}

#[test]
fn unusable_receive_buffers_are_returned_empty_and_counted() {
    let mem = memory();
    let mut dev = test_device();
    let mut guest = Guest::new(&mem);
    guest.activate(&mut dev.device);
    let _client = dev.host_connect(1);
    // Device-readable, too short for a header, outside guest memory.
    guest.post_rx_chain(&[r(DATA + 0x10_0000, 4096)]);
    guest.post_rx_chain(&[w(DATA + 0x11_0000, 20)]);
    guest.post_rx_chain(&[w(MEM_SIZE as u64 - 16, 4096)]);
    // Then a good one, as two descriptors: header, then payload room.
    guest.post_rx_chain(&[w(DATA + 0x12_0000, HDR as u32), w(DATA + 0x13_0000, 512)]);
    wait_until("four buffers used", || guest.rx_used() >= 4);
    assert_eq!(dev.counter("rx_bad_buffers"), 3);
    assert_eq!(dev.counter("rx_packets"), 1);
    let header = decode(&bytes_at(&mem, DATA + 0x12_0000, HDR));
    assert_eq!((header.op, header.dst_port), (OP_REQUEST, 1));
}

#[test]
fn pending_resets_pause_the_transmit_queue_instead_of_growing() {
    let mem = memory();
    let mut dev = test_device();
    let mut guest = Guest::new(&mem);
    guest.activate(&mut dev.device);
    let total = MAX_RESETS as u16 + 50;
    for port in 0..total {
        guest.send(guest_header(30000 + u32::from(port), 9, OP_RW), &[]);
    }
    wait_until("the queue to stall", || {
        guest.tx_used() >= MAX_RESETS as u16
    });
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        guest.tx_used(),
        MAX_RESETS as u16,
        "took packets past the cap"
    );
    guest.post_rx(total as usize);
    wait_until("every packet taken", || guest.tx_used() == total);
    for _ in 0..total {
        assert_eq!(guest.recv().0.op, OP_RST);
    }
}

#[test]
fn reset_drops_connections_and_hands_back_the_eventfds() {
    let mem = memory();
    let mut dev = test_device();
    let mut guest = Guest::new(&mem);
    guest.activate(&mut dev.device);
    let (mut client, _) = establish(&dev, &mut guest, 1024);
    let evts = dev.device.reset();
    assert_eq!(evts.len(), 3);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    // A new driver gets a working device.
    let mem2 = memory();
    let mut guest2 = Guest::new(&mem2);
    guest2.activate(&mut dev.device);
    let (_client, _) = establish(&dev, &mut guest2, 1024);
}

#[test]
fn dropping_the_device_closes_clients_and_removes_the_socket() {
    let dev = test_device();
    let mut client = dev.host_connect(1024);
    let socket = dev.socket.clone();
    let TestDevice { device, dir, .. } = dev;
    drop(device);
    assert!(!socket.exists());
    assert_eq!(read_line(&mut client), "");
    drop(dir);
}

#[test]
fn configuration_space_holds_the_guest_cid() {
    let dev = test_device();
    let mut cid = [0u8; 8];
    dev.device.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
    let mut high = [0xffu8; 4];
    dev.device.read_config(4, &mut high);
    assert_eq!(high, [0; 4]);
    let mut beyond = [0xffu8; 4];
    dev.device.read_config(8, &mut beyond);
    assert_eq!(beyond, [0; 4]);
    assert_eq!(dev.device.device_type(), 19);
    assert_eq!(dev.device.queue_max_sizes().len(), 3);
}

#[test]
fn reserved_cids_are_refused() {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/zvmm-vsock-").unwrap();
    for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 40] {
        let result = Vsock::new(VsockConfig {
            id: "v".into(),
            cid,
            socket: dir.as_path().join("v.sock"),
        });
        assert!(matches!(result, Err(VsockError::Cid(c)) if c == cid));
    }
    assert_eq!(MIN_GUEST_CID, 3);
    assert!(!dir.as_path().join("v.sock").exists());
}

#[test]
fn header_and_payload_in_one_transmit_descriptor_are_taken_whole() {
    // Linux 6.2 and later (and the probe) may put both in one buffer.
    use vm_memory::{Bytes, GuestAddress};
    let mem = memory();
    let mut dev = test_device();
    let mut guest = Guest::new(&mem);
    guest.activate(&mut dev.device);
    let (mut client, local) = establish(&dev, &mut guest, 1024);
    let payload = pattern(9, 3000);
    let header = Header {
        len: payload.len() as u32,
        ..guest_header(1024, local, OP_RW)
    };
    let at = DATA + 0x80_0000;
    mem.write_slice(&encode(&header), GuestAddress(at)).unwrap();
    mem.write_slice(&payload, GuestAddress(at + HDR as u64))
        .unwrap();
    guest.send_chain(&[r(at, (HDR + payload.len()) as u32)]);
    assert_eq!(read_exactly(&mut client, payload.len()), payload);
    assert_eq!(dev.counter("tx_bytes"), 3000);
    assert_eq!(dev.counter("tx_malformed"), 0);
}
