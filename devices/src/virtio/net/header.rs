//! The virtio-net header (`struct virtio_net_hdr_v1`, virtio 1.2 §5.1.6)
//! in front of every frame, in both directions and on the tap: its layout,
//! the checks a transmitted one must pass, and the mapping of the guest's
//! receive offload features to the tap's `TUN_F_*` flags.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
};

/// Bytes of the header: virtio 1.x always carries `num_buffers`.
pub const VNET_HDR_LEN: usize = 12;
/// Offset of `flags`.
pub const FLAGS: usize = 0;
/// Offset of `gso_type`.
pub const GSO_TYPE: usize = 1;
/// Offset of `le16 gso_size`.
pub const GSO_SIZE: usize = 4;
/// Offset of `le16 csum_start`.
pub const CSUM_START: usize = 6;
/// Offset of `le16 csum_offset`.
pub const CSUM_OFFSET: usize = 8;
/// Offset of `le16 num_buffers`.
pub const NUM_BUFFERS: usize = 10;

/// Largest transmitted chain, header included (a 64 KiB GSO frame).
pub const MAX_TX_LEN: usize = 65550;
/// Largest received frame, header included: the per-worker buffer size.
pub const MAX_RX_LEN: usize = 65562;

/// The transmit offloads the driver accepted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxOffloads {
    /// VIRTIO_NET_F_CSUM: partial checksums.
    pub csum: bool,
    /// VIRTIO_NET_F_HOST_TSO4.
    pub tso4: bool,
    /// VIRTIO_NET_F_HOST_TSO6.
    pub tso6: bool,
    /// VIRTIO_NET_F_HOST_ECN.
    pub ecn: bool,
}

impl TxOffloads {
    /// The offloads in the accepted `features`.
    pub fn from_features(features: u64) -> Self {
        let has = |bit: u32| features & (1 << bit) != 0;
        TxOffloads {
            csum: has(VIRTIO_NET_F_CSUM),
            tso4: has(VIRTIO_NET_F_HOST_TSO4),
            tso6: has(VIRTIO_NET_F_HOST_TSO6),
            ecn: has(VIRTIO_NET_F_HOST_ECN),
        }
    }
}

fn le16(header: &[u8; VNET_HDR_LEN], at: usize) -> u16 {
    u16::from_le_bytes([header[at], header[at + 1]])
}

/// Checks a transmitted header against the offloads the driver accepted
/// and the frame length (header included).
pub fn check_tx(
    header: &[u8; VNET_HDR_LEN],
    len: usize,
    offloads: TxOffloads,
) -> Result<(), &'static str> {
    let gso = u32::from(header[GSO_TYPE]);
    if gso & VIRTIO_NET_HDR_GSO_ECN != 0 && !offloads.ecn {
        return Err("gso ecn without VIRTIO_NET_F_HOST_ECN");
    }
    match gso & !VIRTIO_NET_HDR_GSO_ECN {
        VIRTIO_NET_HDR_GSO_NONE if gso == VIRTIO_NET_HDR_GSO_NONE => {}
        VIRTIO_NET_HDR_GSO_TCPV4 if offloads.tso4 => {}
        VIRTIO_NET_HDR_GSO_TCPV6 if offloads.tso6 => {}
        _ => return Err("gso type not negotiated"),
    }
    if gso != VIRTIO_NET_HDR_GSO_NONE && le16(header, GSO_SIZE) == 0 {
        return Err("gso without a segment size");
    }
    if u32::from(header[FLAGS]) & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
        if !offloads.csum {
            return Err("partial checksum without VIRTIO_NET_F_CSUM");
        }
        let end = VNET_HDR_LEN
            + usize::from(le16(header, CSUM_START))
            + usize::from(le16(header, CSUM_OFFSET))
            + 2;
        if end > len {
            return Err("checksum field beyond the frame");
        }
    }
    Ok(())
}

/// The `TUN_F_*` offloads the tap may use in frames for the guest, from
/// the receive features the driver accepted. Segmentation offloads need
/// the checksum one (virtio 1.2 §5.1.3.1), ECN needs a segmentation one.
pub fn tap_offloads(features: u64) -> u32 {
    let has = |bit: u32| features & (1 << bit) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    if has(VIRTIO_NET_F_GUEST_ECN) && flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
        flags |= libc::TUN_F_TSO_ECN;
    }
    flags
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use virtio_bindings::virtio_net::virtio_net_hdr_v1;

    use super::*;

    #[test]
    fn layout_matches_virtio_net_hdr_v1() {
        assert_eq!(size_of::<virtio_net_hdr_v1>(), VNET_HDR_LEN);
        assert_eq!(offset_of!(virtio_net_hdr_v1, flags), FLAGS);
        assert_eq!(offset_of!(virtio_net_hdr_v1, gso_type), GSO_TYPE);
        assert_eq!(offset_of!(virtio_net_hdr_v1, gso_size), GSO_SIZE);
        assert_eq!(offset_of!(virtio_net_hdr_v1, num_buffers), NUM_BUFFERS);
        assert_eq!(offset_of!(virtio_net_hdr_v1, __bindgen_anon_1), CSUM_START);
        assert_eq!(CSUM_OFFSET, CSUM_START + 2);
    }

    fn header(flags: u8, gso: u8, gso_size: u16, start: u16, offset: u16) -> [u8; VNET_HDR_LEN] {
        let mut h = [0u8; VNET_HDR_LEN];
        h[FLAGS] = flags;
        h[GSO_TYPE] = gso;
        h[GSO_SIZE..GSO_SIZE + 2].copy_from_slice(&gso_size.to_le_bytes());
        h[CSUM_START..CSUM_START + 2].copy_from_slice(&start.to_le_bytes());
        h[CSUM_OFFSET..CSUM_OFFSET + 2].copy_from_slice(&offset.to_le_bytes());
        h
    }

    #[test]
    fn transmitted_headers_need_the_negotiated_offloads() {
        let none = TxOffloads::default();
        let all = TxOffloads {
            csum: true,
            tso4: true,
            tso6: true,
            ecn: true,
        };
        let plain = header(0, 0, 0, 0, 0);
        assert_eq!(check_tx(&plain, 60, none), Ok(()));
        let csum = header(1, 0, 0, 34, 16);
        assert!(check_tx(&csum, 100, none).is_err());
        assert_eq!(check_tx(&csum, 12 + 34 + 16 + 2, all), Ok(()));
        assert_eq!(
            check_tx(&csum, 12 + 34 + 16 + 1, all),
            Err("checksum field beyond the frame")
        );
        let tso4 = header(1, 1, 1448, 34, 16);
        assert_eq!(check_tx(&tso4, 9000, all), Ok(()));
        let only_csum = TxOffloads { csum: true, ..none };
        assert_eq!(
            check_tx(&tso4, 9000, only_csum),
            Err("gso type not negotiated")
        );
        assert_eq!(
            check_tx(&header(1, 4 | 0x80, 1448, 54, 16), 9000, all),
            Ok(()),
            "tcpv6 with ecn"
        );
        let no_ecn = TxOffloads { ecn: false, ..all };
        assert!(check_tx(&header(1, 1 | 0x80, 1448, 34, 16), 9000, no_ecn).is_err());
        assert!(
            check_tx(&header(0, 0x80, 0, 0, 0), 60, all).is_err(),
            "ecn alone"
        );
        assert!(
            check_tx(&header(1, 3, 1448, 34, 6), 9000, all).is_err(),
            "udp"
        );
        assert!(
            check_tx(&header(1, 1, 0, 34, 16), 9000, all).is_err(),
            "gso size 0"
        );
    }

    #[test]
    fn receive_features_map_to_tun_offloads() {
        let bit = |b: u32| 1u64 << b;
        assert_eq!(tap_offloads(0), 0);
        assert_eq!(
            tap_offloads(bit(VIRTIO_NET_F_GUEST_TSO4)),
            0,
            "tso needs csum"
        );
        let csum = bit(VIRTIO_NET_F_GUEST_CSUM);
        assert_eq!(tap_offloads(csum), libc::TUN_F_CSUM);
        assert_eq!(
            tap_offloads(csum | bit(VIRTIO_NET_F_GUEST_ECN)),
            libc::TUN_F_CSUM,
            "ecn needs tso"
        );
        let all = csum
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_TSO6)
            | bit(VIRTIO_NET_F_GUEST_ECN)
            | bit(VIRTIO_NET_F_HOST_TSO4);
        assert_eq!(
            tap_offloads(all),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN
        );
        assert_eq!(
            TxOffloads::from_features(bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO6)),
            TxOffloads {
                csum: true,
                tso6: true,
                ..TxOffloads::default()
            }
        );
    }
}
