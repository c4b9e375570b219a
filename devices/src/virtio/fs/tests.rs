//! Tests of the virtio-fs device: socket errors against fake peers, and
//! negotiation, activation (a FUSE_INIT served end to end), reset,
//! re-activation and backend loss against a real virtiofsd.

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempdir::TempDir;

use super::testing::*;
use super::*;
use crate::virtio::{
    ActivateContext, ActivateError, GuestMemory, InterruptKind, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};

/// How long a loss may take to be reported.
const LOSS_BOUND: Duration = Duration::from_secs(5);
/// Size of the test queues.
const SIZE: u16 = 16;
/// Where the hiprio and request rings live.
const RINGS: [u64; 2] = [0x1_0000, 0x2_0000];
/// FUSE request and reply buffers.
const BUFFERS: (u64, u64) = (0x10_0000, 0x11_0000);

fn config(socket: &Path, callback: BackendLostCallback) -> FsConfig {
    let mut config = FsConfig::new("fs0", "shared", socket, callback);
    config.queue_size = 128;
    config
}

fn new_fs(socket: &Path) -> Result<Fs, FsError> {
    Fs::new(config(
        socket,
        Arc::new(|message| panic!("lost: {message}")),
    ))
}

/// Interrupt delivery that either hands out one irqfd per queue (like
/// the PCI transport with routed vectors) or has none (relay path).
struct TestInterrupt {
    irqfds: Option<Vec<EventFd>>,
    raised: Mutex<Vec<InterruptKind>>,
    changed: Condvar,
}

impl TestInterrupt {
    fn new(direct: bool) -> Arc<TestInterrupt> {
        let irqfds = direct.then(|| {
            (0..2)
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect()
        });
        Arc::new(TestInterrupt {
            irqfds,
            raised: Mutex::new(Vec::new()),
            changed: Condvar::new(),
        })
    }

    /// Waits for the irqfd of `queue` to be written.
    fn wait_irqfd(&self, queue: usize) {
        let irqfd = &self.irqfds.as_ref().unwrap()[queue];
        let deadline = Instant::now() + Duration::from_secs(10);
        while irqfd.read().is_err() {
            assert!(Instant::now() < deadline, "no interrupt on queue {queue}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn wait_triggers(&self, count: usize) -> Vec<InterruptKind> {
        let raised = self.raised.lock().unwrap();
        let (raised, wait) = self
            .changed
            .wait_timeout_while(raised, Duration::from_secs(10), |r| r.len() < count)
            .unwrap();
        assert!(!wait.timed_out(), "only {} triggers", raised.len());
        raised.clone()
    }
}

impl VirtioInterrupt for TestInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        self.raised.lock().unwrap().push(kind);
        self.changed.notify_all();
        Ok(())
    }

    fn queue_eventfd(&self, queue: u16) -> Option<EventFd> {
        let irqfd = self.irqfds.as_ref()?.get(usize::from(queue))?;
        Some(irqfd.try_clone().unwrap())
    }
}

/// Both queues of `fs` set up on fresh mock rings; returns the rings and
/// the kick eventfds.
fn activate<'m>(
    fs: &mut Fs,
    mem: &'m GuestMemory,
    interrupt: Arc<TestInterrupt>,
) -> (Vec<MockSplitQueue<'m, GuestMemory>>, Vec<EventFd>) {
    let rings: Vec<_> = RINGS
        .iter()
        .map(|&base| MockSplitQueue::create(mem, GuestAddress(base), SIZE))
        .collect();
    let kicks: Vec<_> = (0..2)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let queues = rings
        .iter()
        .zip(&kicks)
        .enumerate()
        .map(|(index, (vq, kick))| {
            let queue = vq.create_queue::<Queue>().unwrap();
            (index as u16, queue, kick.try_clone().unwrap())
        })
        .collect();
    fs.ack_features(fs.device_features());
    let context = ActivateContext {
        mem: mem.clone(),
        interrupt,
        queues,
    };
    fs.activate(context).unwrap();
    (rings, kicks)
}

/// A FUSE_INIT on the request queue, kicked; waits for its completion.
fn serve_init(vq: &MockSplitQueue<'_, GuestMemory>, mem: &GuestMemory, kick: &EventFd, n: u16) {
    queue_init(vq, mem, BUFFERS, 2 * (n - 1), u64::from(n));
    kick.write(1).unwrap();
    wait_used(vq, n);
    let used = vq.used().ring().ref_at(usize::from(n - 1)).unwrap().load();
    let reply = init_reply(mem, BUFFERS.1);
    assert_eq!(used.id(), u32::from(2 * (n - 1)));
    assert_eq!(used.len(), reply.len, "used length is the reply");
    assert_eq!(
        (reply.error, reply.unique, reply.major),
        (0, u64::from(n), 7)
    );
}

fn counter(fs: &Fs, name: &str) -> u64 {
    let counters = fs.counters();
    counters
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no {name} in {counters:?}"))
}

fn error_text(socket: &Path) -> String {
    let text = new_fs(socket).err().unwrap().to_string();
    assert!(text.contains(&socket.display().to_string()), "{text}");
    assert!(!text.contains('\n'), "{text}");
    text
}

#[test]
fn socket_errors_name_the_socket() {
    let dir = TempDir::new_with_prefix("/tmp/zvmm-fs-").unwrap();
    let missing = dir.as_path().join("none.sock");
    assert_eq!(
        error_text(&missing),
        format!(
            "virtio-fs socket {} does not exist (is virtiofsd running?)",
            missing.display()
        )
    );
    let file = dir.as_path().join("file.sock");
    std::fs::write(&file, b"").unwrap();
    assert_eq!(
        error_text(&file),
        format!("virtio-fs socket {} is not a Unix socket", file.display())
    );
    let stale = dir.as_path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert_eq!(
        error_text(&stale),
        format!("cannot connect to virtio-fs backend {}", stale.display())
    );
}

#[test]
fn a_peer_that_closes_at_once_does_not_speak_vhost_user() {
    let dir = TempDir::new_with_prefix("/tmp/zvmm-fs-").unwrap();
    let path = dir.as_path().join("other.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let peer = std::thread::spawn(move || drop(listener.accept().unwrap()));
    let text = error_text(&path);
    peer.join().unwrap();
    let expected = format!(
        "virtio-fs backend {} does not speak vhost-user (",
        path.display()
    );
    assert!(text.starts_with(&expected), "{text}");
}

#[test]
fn a_peer_that_never_answers_is_cut_off() {
    let dir = TempDir::new_with_prefix("/tmp/zvmm-fs-").unwrap();
    let path = dir.as_path().join("mute.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let peer = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        // Hold the connection open without a word until zvmm gives up.
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut &stream, &mut buf);
    });
    let start = Instant::now();
    let text = error_text(&path);
    let waited = start.elapsed();
    assert!(
        waited >= REPLY_TIMEOUT && waited < REPLY_TIMEOUT * 2,
        "{waited:?}"
    );
    assert_eq!(
        text,
        format!(
            "virtio-fs backend {} did not answer within 5 s",
            path.display()
        )
    );
    peer.join().unwrap();
}

#[test]
fn backends_without_version_1_or_protocol_features_are_refused() {
    const VERSION_1: u64 = 1 << 32;
    const PROTOCOL_FEATURES: u64 = 1 << 30;
    let fake = FakeBackend::start(PROTOCOL_FEATURES | 1 << 29, 0, 0);
    assert_eq!(
        error_text(&fake.socket),
        format!(
            "virtio-fs backend {} does not offer VIRTIO_F_VERSION_1",
            fake.socket.display()
        )
    );
    let fake = FakeBackend::start(VERSION_1, 0, 0);
    assert_eq!(
        error_text(&fake.socket),
        format!(
            "virtio-fs backend {} does not offer vhost-user protocol features",
            fake.socket.display()
        )
    );
}

#[test]
fn without_mq_the_backend_serves_one_request_queue() {
    const VERSION_1: u64 = 1 << 32;
    const PROTOCOL_FEATURES: u64 = 1 << 30;
    let offer = VERSION_1 | PROTOCOL_FEATURES | 1 << 28 | 1 << 24;
    let fake = FakeBackend::start(offer, 0, 0);
    let mut cfg = config(&fake.socket, Arc::new(|_| {}));
    cfg.num_request_queues = 2;
    let err = Fs::new(cfg).err().unwrap();
    assert!(
        matches!(err, FsError::TooManyQueues { supported: 1, .. }),
        "{err:?}"
    );
    let fake = FakeBackend::start(offer, 0, 0);
    let fs = Fs::new(config(&fake.socket, Arc::new(|_| {}))).unwrap();
    assert_eq!(
        fs.device_features(),
        VERSION_1 | 1 << 28,
        "bit 24 is not ours to pass"
    );
}

#[test]
fn negotiation_offers_the_backends_ring_features() {
    let daemon = Daemon::start();
    let fs = new_fs(&daemon.socket).unwrap();
    assert_eq!(fs.device_type(), 26);
    assert_eq!(
        fs.queue_max_sizes(),
        &[128, 128],
        "hiprio + 1 request queue"
    );
    let bit = |b: u32| 1u64 << b;
    assert_eq!(
        fs.device_features(),
        bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX) | bit(VIRTIO_RING_F_INDIRECT_DESC)
    );
    let mut config = [0xffu8; CONFIG_SIZE + 4];
    fs.read_config(0, &mut config);
    assert_eq!(&config[..7], b"shared\0");
    assert_eq!(
        &config[36..],
        &[1, 0, 0, 0, 0, 0, 0, 0],
        "le32 1, then zeros"
    );
    let mut beyond = [0xffu8; 2];
    fs.read_config(u64::MAX, &mut beyond);
    assert_eq!(beyond, [0, 0]);
    assert_eq!(fs.id(), "fs0");
    assert_eq!(fs.socket(), daemon.socket);
    assert!(!fs.backend_lost());
}

#[test]
fn more_request_queues_than_the_backend_serves_are_refused() {
    let daemon = Daemon::start();
    let mut cfg = config(&daemon.socket, Arc::new(|_| {}));
    cfg.num_request_queues = 2;
    let err = Fs::new(cfg).err().unwrap();
    assert_eq!(
        err.to_string(),
        format!(
            "virtio-fs backend {} serves at most 1 request queue(s), not 2",
            daemon.socket.display()
        )
    );
}

#[test]
fn the_backend_serves_the_rings_across_reset_and_reactivation() {
    let mut daemon = Daemon::start();
    let (callback, lost) = loss_channel();
    let mut fs = Fs::new(config(&daemon.socket, callback)).unwrap();
    let mem = memory();
    let irq = TestInterrupt::new(true);

    let (rings, kicks) = activate(&mut fs, &mem, irq.clone());
    serve_init(&rings[1], &mem, &kicks[1], 1);
    irq.wait_irqfd(1);
    assert!(irq.raised.lock().unwrap().is_empty(), "zvmm stayed out");
    assert_eq!(fs.reset().len(), 2, "both kick eventfds handed back");
    assert!(fs.reset().is_empty(), "nothing left after the first reset");

    // Re-activation on the same connection, rings rebuilt by the driver.
    let (rings, kicks) = activate(&mut fs, &mem, irq.clone());
    serve_init(&rings[1], &mem, &kicks[1], 1);
    irq.wait_irqfd(1);
    assert_eq!(fs.reset().len(), 2);

    assert_eq!(counter(&fs, "fs_activations"), 2);
    assert_eq!(counter(&fs, "fs_resets"), 3);
    assert_eq!(counter(&fs, "fs_backend_errors"), 0);
    assert_eq!(counter(&fs, "fs_relayed_interrupts"), 0);
    drop(fs);
    assert!(
        daemon.exited_within(Duration::from_secs(5)),
        "virtiofsd ends with its connection"
    );
    assert!(lost.try_recv().is_err(), "our own close is no loss");
}

#[test]
fn queues_without_an_irqfd_take_the_relay() {
    let daemon = Daemon::start();
    let mut fs = new_fs(&daemon.socket).unwrap();
    let mem = memory();
    let irq = TestInterrupt::new(false);
    let (rings, kicks) = activate(&mut fs, &mem, irq.clone());
    serve_init(&rings[1], &mem, &kicks[1], 1);
    assert_eq!(irq.wait_triggers(1), vec![InterruptKind::Queue(1)]);
    assert_eq!(counter(&fs, "fs_relayed_interrupts"), 1);
    assert_eq!(fs.reset().len(), 2);
}

#[test]
fn activation_needs_shared_memory_and_rings_inside_one_region() {
    let daemon = Daemon::start();
    let mut fs = new_fs(&daemon.socket).unwrap();
    let irq: Arc<dyn VirtioInterrupt> = TestInterrupt::new(true);
    let private: GuestMemory =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    assert!(Fs::check_memory(&private).is_err());
    let vq = MockSplitQueue::create(&private, GuestAddress(0x1000), SIZE);
    let queues = vec![(
        0,
        vq.create_queue::<Queue>().unwrap(),
        EventFd::new(0).unwrap(),
    )];
    let context = ActivateContext {
        mem: private.clone(),
        interrupt: irq.clone(),
        queues,
    };
    let err = fs.activate(context).unwrap_err();
    let ActivateError::Backend(source) = &err else {
        panic!("{err:?}");
    };
    assert_eq!(
        source.to_string(),
        "virtio-fs needs shared guest memory (--memory shared=on)"
    );

    // Two adjacent regions: a descriptor table across the seam is valid
    // guest memory but no single mapping of the backend's.
    let split = shared_memory(&[(0, 0x10000), (0x10000, 0x10000)]);
    assert!(Fs::check_memory(&split).is_ok());
    let vq = MockSplitQueue::create(&split, GuestAddress(0xff80), SIZE);
    let queues = vec![(
        0,
        vq.create_queue::<Queue>().unwrap(),
        EventFd::new(0).unwrap(),
    )];
    let context = ActivateContext {
        mem: split.clone(),
        interrupt: irq,
        queues,
    };
    let err = fs.activate(context).unwrap_err();
    assert!(
        matches!(&err, ActivateError::BadQueue(m) if m.contains("descriptor table at 0xff80")),
        "{err:?}"
    );
    assert_eq!(counter(&fs, "fs_activation_failures"), 2);
    assert_eq!(counter(&fs, "fs_backend_errors"), 0);
    assert!(fs.reset().is_empty());
    // The connection is still good.
    let mem = memory();
    let (rings, kicks) = activate(&mut fs, &mem, TestInterrupt::new(false));
    serve_init(&rings[1], &mem, &kicks[1], 1);
}

#[test]
fn a_backend_that_dies_is_reported_once_and_never_used_again() {
    let mut daemon = Daemon::start();
    let (callback, lost) = loss_channel();
    let mut fs = Fs::new(config(&daemon.socket, callback)).unwrap();
    let mem = memory();
    let (_rings, _kicks) = activate(&mut fs, &mem, TestInterrupt::new(true));
    let killed = Instant::now();
    daemon.kill();
    let message = lost.recv_timeout(LOSS_BOUND).unwrap();
    assert!(killed.elapsed() < LOSS_BOUND);
    assert_eq!(
        message,
        format!(
            "virtio-fs fs0: backend {} closed the connection",
            daemon.socket.display()
        )
    );
    assert!(fs.backend_lost());
    let reset_started = Instant::now();
    assert_eq!(
        fs.reset().len(),
        2,
        "eventfds come back without the backend"
    );
    assert!(reset_started.elapsed() < Duration::from_secs(1));
    let mem2 = memory();
    let vq = MockSplitQueue::create(&mem2, GuestAddress(RINGS[0]), SIZE);
    let context = ActivateContext {
        mem: mem2.clone(),
        interrupt: TestInterrupt::new(true),
        queues: vec![(
            0,
            vq.create_queue::<Queue>().unwrap(),
            EventFd::new(0).unwrap(),
        )],
    };
    let err = fs.activate(context).unwrap_err();
    let ActivateError::Backend(source) = &err else {
        panic!("{err:?}");
    };
    assert!(source.to_string().ends_with("is gone"), "{source}");
    assert_eq!(counter(&fs, "fs_backend_errors"), 1);
    drop(fs);
    assert!(lost.try_recv().is_err(), "reported once");
}
