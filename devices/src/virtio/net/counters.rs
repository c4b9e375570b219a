//! Per-queue-pair statistics of a virtio-net device, summed for
//! `vm.counters` under cloud-hypervisor's names. Byte counts exclude the
//! virtio-net header.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one queue pair, updated by its worker only (one cache line
/// each, so pairs never contend).
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct PairCounters {
    /// Frame bytes delivered to the guest.
    pub rx_bytes: AtomicU64,
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Frames dropped: larger than the buffers the guest posted.
    pub rx_dropped: AtomicU64,
    /// Tap read errors.
    pub rx_errors: AtomicU64,
    /// Receive buffers returned unused: no device-writable room.
    pub rx_invalid_buffers: AtomicU64,
    /// Frame bytes sent to the tap.
    pub tx_bytes: AtomicU64,
    /// Frames sent to the tap.
    pub tx_frames: AtomicU64,
    /// Frames dropped: malformed chain or header.
    pub tx_dropped: AtomicU64,
    /// Tap write errors.
    pub tx_errors: AtomicU64,
}

/// Adds `by` to `counter`.
pub(crate) fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// The counters of every pair, summed, as (name, value) pairs.
pub fn snapshot(pairs: &[PairCounters]) -> Vec<(&'static str, u64)> {
    let sum = |field: fn(&PairCounters) -> &AtomicU64| {
        pairs
            .iter()
            .map(|p| field(p).load(Ordering::Relaxed))
            .sum::<u64>()
    };
    vec![
        ("rx_bytes", sum(|p| &p.rx_bytes)),
        ("rx_frames", sum(|p| &p.rx_frames)),
        ("rx_dropped", sum(|p| &p.rx_dropped)),
        ("rx_errors", sum(|p| &p.rx_errors)),
        ("rx_invalid_buffers", sum(|p| &p.rx_invalid_buffers)),
        ("tx_bytes", sum(|p| &p.tx_bytes)),
        ("tx_frames", sum(|p| &p.tx_frames)),
        ("tx_dropped", sum(|p| &p.tx_dropped)),
        ("tx_errors", sum(|p| &p.tx_errors)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_sums_the_pairs() {
        let pairs = [PairCounters::default(), PairCounters::default()];
        bump(&pairs[0].rx_bytes, 100);
        bump(&pairs[1].rx_bytes, 23);
        bump(&pairs[1].tx_errors, 1);
        let snapshot = snapshot(&pairs);
        assert_eq!(snapshot[0], ("rx_bytes", 123));
        assert!(snapshot.contains(&("tx_errors", 1)));
        assert!(snapshot.contains(&("tx_frames", 0)));
        assert_eq!(snapshot.len(), 9);
    }
}
