//! What a virtio-vsock device did, for `vm.counters`: connections both
//! ways, packets and payload bytes both ways, and every kind of packet
//! dropped or refused.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one vsock device, updated by its worker.
#[derive(Debug, Default)]
pub struct VsockCounters {
    /// Host-initiated connections the guest accepted (`OK` sent).
    pub host_connections: AtomicU64,
    /// Host-initiated connections that failed: bad `CONNECT` line, guest
    /// refusal, no answer in time, connection limit.
    pub host_connect_failures: AtomicU64,
    /// Guest-initiated connections to a host `PATH_<port>` listener.
    pub guest_connections: AtomicU64,
    /// Guest-initiated connections refused (nobody listens on the port).
    pub guest_connect_refused: AtomicU64,
    /// Packets delivered to the guest.
    pub rx_packets: AtomicU64,
    /// Payload bytes delivered to the guest.
    pub rx_bytes: AtomicU64,
    /// Receive buffers returned unused: out of spec.
    pub rx_bad_buffers: AtomicU64,
    /// Packets taken from the guest.
    pub tx_packets: AtomicU64,
    /// Payload bytes taken from the guest for the host.
    pub tx_bytes: AtomicU64,
    /// Guest packets dropped: unusable header or buffers, payload longer
    /// than 64 KiB.
    pub tx_malformed: AtomicU64,
    /// Guest packets dropped: source CID not the guest's, destination
    /// not the host.
    pub tx_bad_address: AtomicU64,
    /// Guest packets answered with a reset: unknown operation or socket
    /// type, no such connection, out-of-order or over-credit data.
    pub tx_refused: AtomicU64,
    /// Resets sent to the guest.
    pub rst_sent: AtomicU64,
}

/// Adds `by` to `counter`.
pub(crate) fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

impl VsockCounters {
    /// The counters as (name, value) pairs.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("host_connections", get(&self.host_connections)),
            ("host_connect_failures", get(&self.host_connect_failures)),
            ("guest_connections", get(&self.guest_connections)),
            ("guest_connect_refused", get(&self.guest_connect_refused)),
            ("rx_packets", get(&self.rx_packets)),
            ("rx_bytes", get(&self.rx_bytes)),
            ("rx_bad_buffers", get(&self.rx_bad_buffers)),
            ("tx_packets", get(&self.tx_packets)),
            ("tx_bytes", get(&self.tx_bytes)),
            ("tx_malformed", get(&self.tx_malformed)),
            ("tx_bad_address", get(&self.tx_bad_address)),
            ("tx_refused", get(&self.tx_refused)),
            ("rst_sent", get(&self.rst_sent)),
        ]
    }
}
