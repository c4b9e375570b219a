//! Tests of the virtio-net device: offer and configuration space, and the
//! workers end to end on mock queues with socket pairs as tap queues.

use std::mem::offset_of;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use virtio_bindings::virtio_net::{
    virtio_net_config, VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_OK,
};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::net::header::NUM_BUFFERS;
use crate::virtio::net::testing::*;
use crate::virtio::{GuestMemory, InterruptKind, VirtioInterrupt};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const SIZE: u16 = 256;

fn bit(b: u32) -> u64 {
    1 << b
}

/// A device on `pairs` fake tap queues; returns the peers too.
fn net(pairs: usize) -> (Net, Vec<OwnedFd>) {
    named("net0", pairs)
}

/// [`net`] with threads of its own name.
fn named(id: &str, pairs: usize) -> (Net, Vec<OwnedFd>) {
    let (ends, peers): (Vec<_>, Vec<_>) = (0..pairs).map(|_| socket_pair()).unzip();
    let config = NetConfig {
        id: id.to_string(),
        mac: MAC,
        queue_size: SIZE,
        taps: TapSet::fake(ends),
    };
    (Net::new(config).unwrap(), peers)
}

#[test]
fn config_offsets_match_virtio_net_config() {
    use offsets::*;
    assert_eq!(MAC, offset_of!(virtio_net_config, mac));
    assert_eq!(STATUS, offset_of!(virtio_net_config, status));
    assert_eq!(
        MAX_VIRTQUEUE_PAIRS,
        offset_of!(virtio_net_config, max_virtqueue_pairs)
    );
    assert_eq!(MTU, offset_of!(virtio_net_config, mtu));
    assert_eq!(SIZE, offset_of!(virtio_net_config, speed));
}

#[test]
fn offer_and_config_space_follow_the_queue_pairs() {
    let common = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_ECN,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_ECN,
    ]
    .into_iter()
    .fold(0, |acc, b| acc | bit(b));
    let (mut one, _peers) = net(1);
    assert_eq!(one.device_type(), 1);
    assert_eq!(one.device_features(), common);
    assert_eq!(one.queue_max_sizes(), &[SIZE, SIZE]);
    let mut config = [0xaa; 16];
    one.read_config(0, &mut config);
    assert_eq!(
        config,
        [0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    );
    let mut status = [0u8; 2];
    one.read_config(offsets::STATUS as u64, &mut status);
    assert_eq!(u16::from_le_bytes(status), 1, "link up");
    one.write_config(0, &[0xff; 6]);
    let mut mac = [0u8; 6];
    one.read_config(0, &mut mac);
    assert_eq!(mac, MAC, "the mac is read-only");
    let mut beyond = [9u8; 4];
    one.read_config(u64::MAX, &mut beyond);
    assert_eq!(beyond, [0; 4]);
    one.ack_features(u64::MAX);
    assert_eq!(one.acked_features, common);
    assert_eq!(
        (one.id(), one.tap_name(), one.mac()),
        ("net0", "fake0", MAC)
    );

    let (four, _peers) = net(4);
    let mq = bit(VIRTIO_NET_F_CTRL_VQ) | bit(VIRTIO_NET_F_MQ);
    assert_eq!(four.device_features(), common | mq);
    assert_eq!(four.queue_max_sizes().len(), 9, "4 pairs and ctrl");
    let mut pairs = [0u8; 2];
    four.read_config(offsets::MAX_VIRTQUEUE_PAIRS as u64, &mut pairs);
    assert_eq!(u16::from_le_bytes(pairs), 4);
}

#[test]
fn bad_configurations_are_refused() {
    let config = |size: u16, mac: [u8; 6], id: &str| NetConfig {
        id: id.to_string(),
        mac,
        queue_size: size,
        taps: TapSet::fake(vec![socket_pair().0]),
    };
    for size in [0, 32, 100, 8192] {
        let err = Net::new(config(size, MAC, "n")).err().unwrap();
        assert_eq!(
            err.to_string(),
            format!("net queue size {size} must be a power of two from 64 to 4096")
        );
    }
    for size in [64, 4096] {
        assert!(Net::new(config(size, MAC, "n")).is_ok());
    }
    let err = Net::new(config(256, [1, 2, 3, 4, 5, 6], "n"))
        .err()
        .unwrap();
    assert_eq!(
        err.to_string(),
        "mac address 01:02:03:04:05:06 is not a unicast address"
    );
    assert!(Net::new(config(256, [0; 6], "n")).is_err());
    for id in ["", "a b", &"x".repeat(65)] {
        assert!(matches!(
            Net::new(config(256, MAC, id)),
            Err(NetError::Id { .. })
        ));
    }
}

/// Mock queues of a device and the eventfds that kick them.
struct Guest<'m> {
    mem: &'m GuestMemory,
    queues: Vec<TestQueue<'m>>,
    kicks: Vec<EventFd>,
    next_desc: Vec<u16>,
}

impl<'m> Guest<'m> {
    fn new(mem: &'m GuestMemory, count: u16) -> Self {
        Guest {
            mem,
            queues: (0..count).map(|i| mock_queue(mem, i, SIZE)).collect(),
            kicks: (0..count).map(|_| eventfd()).collect(),
            next_desc: vec![0; usize::from(count)],
        }
    }

    /// Activates `net` with queues `enabled`.
    fn activate(&self, net: &mut Net, enabled: &[u16], irq: &Arc<RecordingInterrupt>) {
        let queues = enabled
            .iter()
            .map(|&i| {
                let vq = &self.queues[usize::from(i)];
                let kick = self.kicks[usize::from(i)].try_clone().unwrap();
                (i, vq.create_queue(), kick)
            })
            .collect();
        let interrupt: Arc<dyn VirtioInterrupt> = irq.clone();
        let context = ActivateContext {
            mem: self.mem.clone(),
            interrupt,
            queues,
        };
        net.activate(context).unwrap();
    }

    /// Posts one chain on queue `q` and kicks it.
    fn post(&mut self, q: u16, descs: &[Desc]) {
        let first = self.next_desc[usize::from(q)];
        self.queues[usize::from(q)].add_desc_chains(&raw(descs, first), first);
        self.next_desc[usize::from(q)] += descs.len() as u16;
        self.kicks[usize::from(q)].write(1).unwrap();
    }

    fn used(&self, q: u16) -> u16 {
        self.queues[usize::from(q)].used_idx()
    }

    fn wait_used(&self, q: u16, count: u16) {
        wait_until(&format!("{count} used on queue {q}"), || {
            self.used(q) >= count
        });
    }

    /// Writes `bytes` at `addr` and sends them on transmit queue `q`.
    fn transmit(&mut self, q: u16, addr: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        self.post(q, &[r(addr, bytes.len() as u32)]);
    }
}

fn counter(net: &Net, name: &str) -> u64 {
    let counters = net.counters();
    counters
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no counter {name} in {counters:?}"))
}

#[test]
fn frames_flow_both_ways_through_the_worker() {
    let (mut net, peers) = net(1);
    let features = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | bit(VIRTIO_NET_F_GUEST_CSUM)
        | bit(VIRTIO_NET_F_GUEST_TSO4);
    net.ack_features(features);
    let mem = memory();
    let mut guest = Guest::new(&mem, 2);
    let irq = Arc::new(RecordingInterrupt::default());
    guest.activate(&mut net, &[0, 1], &irq);
    assert_eq!(net.taps().vnet_hdr_size(), Some(12));
    assert_eq!(
        net.taps().offload(),
        Some(libc::TUN_F_CSUM | libc::TUN_F_TSO4)
    );

    // Transmit: the frame arrives byte-exact and the chain comes back.
    let out = frame(&pattern(1, 1000));
    guest.transmit(1, DATA, &out);
    assert_eq!(receive(&peers[0], Duration::from_secs(10)), Some(out));
    guest.wait_used(1, 1);
    irq.wait_for(InterruptKind::Queue(1), 1);

    // Receive with no buffers posted: the frame waits in the worker.
    let incoming = frame(&pattern(2, 3000));
    send(&peers[0], &incoming);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(guest.used(0), 0);
    // Two buffers of 2 KiB: the frame spans both once they are kicked.
    guest.post(0, &[w(DATA + 0x1_0000, 2048)]);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(guest.used(0), 0, "one buffer is too small: still pending");
    guest.post(0, &[w(DATA + 0x2_0000, 2048)]);
    guest.wait_used(0, 2);
    irq.wait_for(InterruptKind::Queue(0), 1);
    let header = bytes_at(&mem, DATA + 0x1_0000, 12);
    assert_eq!(&header[NUM_BUFFERS..], &[2, 0]);
    let mut received = bytes_at(&mem, DATA + 0x1_0000, 2048);
    received.extend(bytes_at(&mem, DATA + 0x2_0000, 3012 - 2048));
    received[NUM_BUFFERS] = 0;
    assert_eq!(received, incoming);

    // More frames go straight into posted buffers.
    guest.post(0, &[w(DATA + 0x3_0000, 4096)]);
    send(&peers[0], &frame(&[5; 60]));
    guest.wait_used(0, 3);
    assert_eq!(bytes_at(&mem, DATA + 0x3_0000 + 12, 60), vec![5; 60]);

    for (name, value) in [
        ("tx_frames", 1),
        ("tx_bytes", 1000),
        ("rx_frames", 2),
        ("rx_bytes", 3060),
        ("rx_dropped", 0),
        ("tx_dropped", 0),
    ] {
        assert_eq!(counter(&net, name), value, "{name}");
    }
    assert_eq!(net.reset().len(), 2, "both queue eventfds back");
    assert!(net.reset().is_empty());
    assert!(!irq.needs_reset());
}

#[test]
fn a_guest_that_never_reads_does_not_stall_transmit() {
    let (mut net, peers) = net(1);
    net.ack_features(bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF));
    let mem = memory();
    let mut guest = Guest::new(&mem, 2);
    let irq = Arc::new(RecordingInterrupt::default());
    guest.activate(&mut net, &[0, 1], &irq);
    for _ in 0..20 {
        send(&peers[0], &frame(&[1; 100]));
    }
    for i in 0..50 {
        guest.transmit(1, DATA + i * 0x1000, &frame(&[i as u8; 60]));
        assert!(
            receive(&peers[0], Duration::from_secs(10)).is_some(),
            "frame {i}"
        );
    }
    guest.wait_used(1, 50);
    assert_eq!(guest.used(0), 0);
    // Once the guest posts buffers, the waiting frames arrive in order.
    for i in 0..20 {
        guest.post(0, &[w(DATA + 0x10_0000 + i * 0x1000, 2048)]);
    }
    guest.wait_used(0, 20);
    assert_eq!(counter(&net, "rx_frames"), 20);
    assert_eq!(counter(&net, "rx_dropped"), 0);
}

#[test]
fn a_broken_ring_stops_the_worker_and_asks_for_a_reset() {
    let (mut net, _peers) = net(1);
    net.ack_features(bit(VIRTIO_F_VERSION_1));
    let mem = memory();
    let guest = Guest::new(&mem, 2);
    let irq = Arc::new(RecordingInterrupt::default());
    guest.activate(&mut net, &[0, 1], &irq);
    // The transmit queue's available index runs far ahead of its size.
    guest.queues[1].set_avail_idx(1000);
    guest.kicks[1].write(1).unwrap();
    wait_until("needs reset", || irq.needs_reset());
    assert_eq!(
        net.reset().len(),
        2,
        "eventfds come back from a dead worker"
    );
    // A reset and a fresh activation work again.
    let fresh = Guest::new(&mem, 2);
    let irq = Arc::new(RecordingInterrupt::default());
    net.ack_features(bit(VIRTIO_F_VERSION_1));
    fresh.activate(&mut net, &[0, 1], &irq);
    assert_eq!(net.reset().len(), 2);
    assert!(!irq.needs_reset());
}

#[test]
fn activation_needs_the_first_pair() {
    let (mut net, _peers) = net(1);
    let mem = memory();
    let guest = Guest::new(&mem, 2);
    let irq: Arc<dyn VirtioInterrupt> = Arc::new(RecordingInterrupt::default());
    for enabled in [vec![], vec![0], vec![1]] {
        let queues = enabled
            .iter()
            .map(|&i: &u16| (i, guest.queues[usize::from(i)].create_queue(), eventfd()))
            .collect();
        let context = ActivateContext {
            mem: mem.clone(),
            interrupt: irq.clone(),
            queues,
        };
        let err = net.activate(context).unwrap_err();
        assert!(matches!(err, ActivateError::BadQueue(_)), "{err:?}");
    }
    let mut bad = guest.queues[0].create_queue();
    bad.set_desc_table_address(Some(0xffff_f000), Some(0));
    let context = ActivateContext {
        mem: mem.clone(),
        interrupt: irq,
        queues: vec![
            (0, bad, eventfd()),
            (1, guest.queues[1].create_queue(), eventfd()),
        ],
    };
    assert!(matches!(
        net.activate(context),
        Err(ActivateError::BadQueue(_))
    ));
    assert!(net.reset().is_empty());
}

/// Sends VQ_PAIRS_SET `pairs` on the control queue (index 4 of 2 pairs).
fn set_pairs(guest: &mut Guest, pairs: u16, at: u64) {
    let command = [
        VIRTIO_NET_CTRL_MQ as u8,
        VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
        pairs as u8,
        (pairs >> 8) as u8,
    ];
    guest.mem.write_slice(&command, GuestAddress(at)).unwrap();
    guest.post(4, &[r(at, 4), w(at + 0x100, 1)]);
}

#[test]
fn multiqueue_pairs_follow_the_control_queue() {
    let (mut net, peers) = net(2);
    let features = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | bit(VIRTIO_NET_F_CTRL_VQ)
        | bit(VIRTIO_NET_F_MQ);
    net.ack_features(features);
    let mem = memory();
    let mut guest = Guest::new(&mem, 5);
    let irq = Arc::new(RecordingInterrupt::default());
    guest.activate(&mut net, &[0, 1, 2, 3, 4], &irq);
    let second = net.taps().queue(1).unwrap().clone();
    wait_until("pair 1 detached", || !second.attached());
    // Pair 1 receives nothing while inactive.
    guest.post(2, &[w(DATA + 0x8_0000, 2048)]);
    send(&peers[1], &frame(&[1; 80]));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(guest.used(2), 0);

    set_pairs(&mut guest, 2, DATA);
    guest.wait_used(4, 1);
    assert_eq!(byte_at(&mem, DATA + 0x100), VIRTIO_NET_OK as u8);
    irq.wait_for(InterruptKind::Queue(4), 1);
    wait_until("pair 1 attached", || second.attached());
    guest.post(2, &[w(DATA + 0x9_0000, 2048)]);
    guest.wait_used(2, 1);
    assert_eq!(bytes_at(&mem, DATA + 0x8_0000 + 12, 80), vec![1; 80]);
    // Both pairs transmit on their own tap queue.
    guest.transmit(3, DATA + 0xa_0000, &frame(&[3; 70]));
    assert_eq!(
        receive(&peers[1], Duration::from_secs(10)),
        Some(frame(&[3; 70]))
    );
    guest.transmit(1, DATA + 0xb_0000, &frame(&[4; 70]));
    assert_eq!(
        receive(&peers[0], Duration::from_secs(10)),
        Some(frame(&[4; 70]))
    );
    // Back to one pair: pair 1 detaches.
    set_pairs(&mut guest, 1, DATA + 0x200);
    guest.wait_used(4, 2);
    wait_until("pair 1 detached again", || !second.attached());
    assert_eq!(net.reset().len(), 5);
}

#[test]
fn without_mq_only_the_first_pair_runs_and_other_taps_detach() {
    let (mut net, _peers) = net(3);
    net.ack_features(bit(VIRTIO_F_VERSION_1));
    let mem = memory();
    let guest = Guest::new(&mem, 7);
    let irq = Arc::new(RecordingInterrupt::default());
    guest.activate(&mut net, &[0, 1, 2, 3], &irq);
    assert!(net.taps().queue(0).unwrap().attached());
    assert!(!net.taps().queue(1).unwrap().attached());
    assert!(!net.taps().queue(2).unwrap().attached());
    assert_eq!(net.reset().len(), 4, "the unused pair's eventfds too");
}

#[test]
fn a_worker_waiting_for_buffers_does_not_spin() {
    let (mut net, peers) = named("idle", 1);
    net.ack_features(bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF));
    let mem = memory();
    let mut guest = Guest::new(&mem, 2);
    let irq = Arc::new(RecordingInterrupt::default());
    guest.activate(&mut net, &[0, 1], &irq);
    // One buffer too small for the first frame, which stays pending,
    // and more frames behind it keep the tap readable. The worker sees
    // the buffer first and starts watching the (empty) tap.
    guest.post(0, &[w(DATA, 1024)]);
    std::thread::sleep(Duration::from_millis(50));
    let big = frame(&pattern(7, 3000));
    send(&peers[0], &big);
    for _ in 0..5 {
        send(&peers[0], &frame(&[2; 100]));
    }
    std::thread::sleep(Duration::from_millis(50));
    let before = thread_cpu_ticks("net-idle-0");
    std::thread::sleep(Duration::from_millis(500));
    let spent = thread_cpu_ticks("net-idle-0") - before;
    assert!(spent <= 2, "the worker spun: {spent} ticks in 500 ms");
    assert_eq!(guest.used(0), 0);
    guest.post(0, &[w(DATA + 0x1000, 4096)]);
    guest.wait_used(0, 2);
    assert_eq!(bytes_at(&mem, DATA + 12, 1012), big[12..1024]);
}

/// An Ethernet frame from `MAC` to `dst` carrying an IPv4/UDP datagram
/// (UDP checksum 0, which IPv4 allows).
fn udp_frame(dst: [u8; 6], from: [u8; 4], to: [u8; 4], port: u16, payload: &[u8]) -> Vec<u8> {
    let mut eth = dst.to_vec();
    eth.extend_from_slice(&MAC);
    eth.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&from);
    ip.extend_from_slice(&to);
    let sum = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum::<u32>();
    let folded = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&folded.to_be_bytes());
    let mut udp = 4000u16.to_be_bytes().to_vec();
    udp.extend_from_slice(&port.to_be_bytes());
    udp.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    [eth, ip, udp].concat()
}

/// An ARP request from `MAC`/`from` for `to`.
fn arp_request(from: [u8; 4], to: [u8; 4]) -> Vec<u8> {
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&MAC);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&MAC);
    arp.extend_from_slice(&from);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&to);
    arp
}

#[test]
fn a_guest_talks_to_the_host_over_a_real_tap() {
    in_netns(|| {
        let taps = TapSet::open("zvnet0", 1).unwrap();
        let host = [10, 7, 0, 1];
        taps.configure_host(host.into(), [255, 255, 255, 0].into())
            .unwrap();
        let config = NetConfig {
            id: "real".to_string(),
            mac: MAC,
            queue_size: SIZE,
            taps,
        };
        let mut net = Net::new(config).unwrap();
        let features = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_NET_F_MRG_RXBUF)
            | bit(VIRTIO_NET_F_CSUM)
            | bit(VIRTIO_NET_F_GUEST_CSUM);
        net.ack_features(features);
        let mem = memory();
        let mut guest = Guest::new(&mem, 2);
        let irq = Arc::new(RecordingInterrupt::default());
        guest.activate(&mut net, &[0, 1], &irq);
        for i in 0..32 {
            guest.post(0, &[w(DATA + i * 0x1000, 4096)]);
        }
        let socket = std::net::UdpSocket::bind("10.7.0.1:5000").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let me = [10, 7, 0, 2];
        // Guest → host: ARP (the host learns our address), then UDP.
        guest.transmit(1, DATA + 0x10_0000, &frame(&arp_request(me, host)));
        let mut host_mac = None;
        let mut seen = 0;
        while host_mac.is_none() {
            seen += 1;
            guest.wait_used(0, seen);
            let (head, len) = guest.queues[0].used_elem(seen - 1);
            let received = bytes_at(&mem, DATA + u64::from(head) * 0x1000, len as usize);
            let eth = &received[12..];
            if eth[12..14] == [0x08, 0x06] && eth[20..22] == [0, 2] {
                assert_eq!(&eth[0..6], &MAC, "reply to us");
                host_mac = Some(<[u8; 6]>::try_from(&eth[22..28]).unwrap());
            }
        }
        let out = udp_frame(host_mac.unwrap(), me, host, 5000, b"ping from the guest");
        guest.transmit(1, DATA + 0x11_0000, &frame(&out));
        let mut buf = [0u8; 64];
        let (n, from) = socket.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"ping from the guest");
        assert_eq!(from.to_string(), "10.7.0.2:4000");
        // Host → guest: a datagram back.
        socket.send_to(b"pong from the host", from).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            assert!(
                std::time::Instant::now() < deadline,
                "no datagram for the guest"
            );
            seen += 1;
            guest.wait_used(0, seen);
            let (head, len) = guest.queues[0].used_elem(seen - 1);
            let received = bytes_at(&mem, DATA + u64::from(head) * 0x1000, len as usize);
            if received.ends_with(b"pong from the host") {
                assert_eq!(&received[12..18], &MAC);
                break;
            }
        }
        assert_eq!(counter(&net, "tx_frames"), 2);
        assert_eq!(counter(&net, "tx_errors"), 0);
        assert!(counter(&net, "rx_frames") >= 2);
    });
}
