//! The few frames the probe's network test speaks, parsed and built in
//! place: Ethernet II, ARP for IPv4, IPv4 (no options sent, no fragments
//! accepted), ICMP echo and UDP. Internet checksums (RFC 1071) for the IPv4
//! header, ICMP replies (incremental, RFC 1624) and the UDP pseudo-header
//! sum that checksum offload starts from.
//!
//! All multi-byte fields are big-endian on the wire.

/// An Ethernet address.
pub type Mac = [u8; 6];
/// An IPv4 address.
pub type Ip = [u8; 4];

/// The broadcast Ethernet address.
pub const BROADCAST: Mac = [0xff; 6];
/// Ethernet II header bytes.
pub const ETH_LEN: usize = 14;
/// IPv4 header bytes without options (what the probe sends).
pub const IP_LEN: usize = 20;
/// UDP header bytes.
pub const UDP_LEN: usize = 8;
/// Ethernet + IPv4 + UDP header bytes of a frame the probe sends.
pub const UDP_HEADERS: usize = ETH_LEN + IP_LEN + UDP_LEN;
/// Offset of the UDP checksum from the start of the UDP header.
pub const UDP_CSUM_OFFSET: u16 = 6;
/// Largest UDP payload in one 1500-byte-MTU frame.
pub const MAX_UDP_PAYLOAD: usize = 1500 - IP_LEN - UDP_LEN;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ARP_LEN: usize = 28;
/// ARP operation: request.
pub const ARP_REQUEST: u16 = 1;
/// ARP operation: reply.
pub const ARP_REPLY: u16 = 2;
const PROTO_ICMP: u8 = 1;
const PROTO_UDP: u8 = 17;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const IP_DONT_FRAGMENT: u16 = 0x4000;
const IP_FRAGMENT_BITS: u16 = 0x3fff;
const TTL: u8 = 64;

/// An ARP packet for IPv4 over Ethernet.
#[derive(Clone, Copy)]
pub struct Arp {
    /// [`ARP_REQUEST`] or [`ARP_REPLY`] (others are passed on as is).
    pub op: u16,
    /// Sender hardware address.
    pub sha: Mac,
    /// Sender protocol address.
    pub spa: Ip,
    /// Target protocol address.
    pub tpa: Ip,
}

/// A UDP datagram in a received frame.
#[derive(Clone, Copy)]
pub struct Udp<'a> {
    /// Ethernet source.
    pub src_mac: Mac,
    /// IPv4 source.
    pub src: Ip,
    /// IPv4 destination.
    pub dst: Ip,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// The payload (bounded by the UDP and IPv4 lengths).
    pub payload: &'a [u8],
}

/// What a received frame holds.
#[derive(Clone, Copy)]
pub enum Packet<'a> {
    /// ARP for IPv4 over Ethernet.
    Arp(Arp),
    /// An ICMP echo request to `dst` (the whole frame is answered by
    /// [`echo_reply`]).
    EchoRequest {
        /// IPv4 destination.
        dst: Ip,
    },
    /// A UDP datagram.
    Udp(Udp<'a>),
    /// Well-formed but not for this test (IPv6, other protocols, ...).
    Other,
    /// Truncated or inconsistent lengths, a fragment, a bad IPv4 header.
    Malformed,
}

fn be16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn put16(bytes: &mut [u8], at: usize, value: u16) {
    bytes[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

fn mac_at(bytes: &[u8], at: usize) -> Mac {
    let mut mac = [0; 6];
    mac.copy_from_slice(&bytes[at..at + 6]);
    mac
}

fn ip_at(bytes: &[u8], at: usize) -> Ip {
    let mut ip = [0; 4];
    ip.copy_from_slice(&bytes[at..at + 4]);
    ip
}

/// Classifies an Ethernet frame (without the virtio header).
pub fn parse(frame: &[u8]) -> Packet<'_> {
    if frame.len() < ETH_LEN {
        return Packet::Malformed;
    }
    match be16(frame, 12) {
        ETHERTYPE_ARP => parse_arp(&frame[ETH_LEN..]),
        ETHERTYPE_IPV4 => parse_ipv4(frame),
        _ => Packet::Other,
    }
}

fn parse_arp(arp: &[u8]) -> Packet<'_> {
    if arp.len() < ARP_LEN {
        return Packet::Malformed;
    }
    let ethernet_ipv4 = be16(arp, 0) == 1 && be16(arp, 2) == ETHERTYPE_IPV4;
    if !ethernet_ipv4 || arp[4] != 6 || arp[5] != 4 {
        return Packet::Other;
    }
    Packet::Arp(Arp {
        op: be16(arp, 6),
        sha: mac_at(arp, 8),
        spa: ip_at(arp, 14),
        tpa: ip_at(arp, 24),
    })
}

fn parse_ipv4(frame: &[u8]) -> Packet<'_> {
    let ip = &frame[ETH_LEN..];
    if ip.len() < IP_LEN || ip[0] >> 4 != 4 {
        return Packet::Malformed;
    }
    let header_len = usize::from(ip[0] & 0xf) * 4;
    let total = usize::from(be16(ip, 2));
    // Frames may carry Ethernet padding after the datagram.
    if header_len < IP_LEN || total < header_len || total > ip.len() {
        return Packet::Malformed;
    }
    if be16(ip, 6) & IP_FRAGMENT_BITS != 0 {
        return Packet::Malformed;
    }
    let body = &ip[header_len..total];
    let (src, dst) = (ip_at(ip, 12), ip_at(ip, 16));
    match ip[9] {
        PROTO_ICMP if body.len() >= 8 && body[0] == ICMP_ECHO_REQUEST && body[1] == 0 => {
            Packet::EchoRequest { dst }
        }
        PROTO_UDP => parse_udp(mac_at(frame, 6), src, dst, body),
        _ => Packet::Other,
    }
}

fn parse_udp(src_mac: Mac, src: Ip, dst: Ip, body: &[u8]) -> Packet<'_> {
    if body.len() < UDP_LEN {
        return Packet::Malformed;
    }
    let len = usize::from(be16(body, 4));
    if len < UDP_LEN || len > body.len() {
        return Packet::Malformed;
    }
    Packet::Udp(Udp {
        src_mac,
        src,
        dst,
        sport: be16(body, 0),
        dport: be16(body, 2),
        payload: &body[UDP_LEN..len],
    })
}

/// Writes an Ethernet II header.
fn ethernet(out: &mut [u8], dst: Mac, src: Mac, ethertype: u16) {
    out[0..6].copy_from_slice(&dst);
    out[6..12].copy_from_slice(&src);
    put16(out, 12, ethertype);
}

/// Writes an ARP frame (`dst` is the Ethernet destination; the target
/// hardware address is `dst` too, zero for a broadcast request); returns
/// its length.
pub fn arp(out: &mut [u8], op: u16, src: (Mac, Ip), dst: Mac, tpa: Ip) -> usize {
    let (sha, spa) = src;
    ethernet(out, dst, sha, ETHERTYPE_ARP);
    let arp = &mut out[ETH_LEN..ETH_LEN + ARP_LEN];
    put16(arp, 0, 1);
    put16(arp, 2, ETHERTYPE_IPV4);
    arp[4] = 6;
    arp[5] = 4;
    put16(arp, 6, op);
    arp[8..14].copy_from_slice(&sha);
    arp[14..18].copy_from_slice(&spa);
    let tha = if dst == BROADCAST { [0; 6] } else { dst };
    arp[18..24].copy_from_slice(&tha);
    arp[24..28].copy_from_slice(&tpa);
    ETH_LEN + ARP_LEN
}

/// Turns the ICMP echo request `request` into its reply in `out` (from
/// `my_mac`, back to the sender): addresses swapped, type 0, checksum
/// updated incrementally. Returns the reply's length, `None` if `out` is
/// too small or the request is not an IPv4 echo request.
pub fn echo_reply(request: &[u8], out: &mut [u8], my_mac: Mac) -> Option<usize> {
    let Packet::EchoRequest { .. } = parse(request) else {
        return None;
    };
    let ip = &request[ETH_LEN..];
    let header_len = usize::from(ip[0] & 0xf) * 4;
    let len = ETH_LEN + usize::from(be16(ip, 2));
    let reply = out.get_mut(..len)?;
    reply.copy_from_slice(&request[..len]);
    reply[0..6].copy_from_slice(&request[6..12]);
    reply[6..12].copy_from_slice(&my_mac);
    let ip = &mut reply[ETH_LEN..];
    ip[12..16].copy_from_slice(&request[ETH_LEN + 16..ETH_LEN + 20]);
    ip[16..20].copy_from_slice(&request[ETH_LEN + 12..ETH_LEN + 16]);
    // Swapping the addresses leaves the IPv4 checksum unchanged.
    let icmp = &mut ip[header_len..];
    icmp[0] = ICMP_ECHO_REPLY;
    // RFC 1624: HC' = ~(~HC + ~m + m') for the word m (type, code) -> m'.
    let (old_word, new_word) = (
        u16::from(ICMP_ECHO_REQUEST) << 8,
        u16::from(ICMP_ECHO_REPLY) << 8,
    );
    let sum = u32::from(!be16(icmp, 2)) + u32::from(!old_word) + u32::from(new_word);
    put16(icmp, 2, !fold(sum));
    Some(len)
}

/// How the UDP checksum field is filled.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum UdpChecksum {
    /// 0: no checksum (allowed for UDP over IPv4).
    None,
    /// The pseudo-header sum, for the device to complete
    /// (`VIRTIO_NET_HDR_F_NEEDS_CSUM`).
    Partial,
}

/// The addresses and ports of a datagram the probe sends.
#[derive(Clone, Copy)]
pub struct UdpFlow {
    /// Ethernet source.
    pub src_mac: Mac,
    /// Ethernet destination.
    pub dst_mac: Mac,
    /// IPv4 source.
    pub src: Ip,
    /// IPv4 destination.
    pub dst: Ip,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
}

/// Writes the Ethernet, IPv4 and UDP headers of a datagram of
/// `payload_len` bytes (the payload goes at `out[UDP_HEADERS..]`); returns
/// the frame's length.
pub fn udp_headers(out: &mut [u8], flow: &UdpFlow, payload_len: usize, csum: UdpChecksum) -> usize {
    let udp_len = (UDP_LEN + payload_len) as u16;
    ethernet(out, flow.dst_mac, flow.src_mac, ETHERTYPE_IPV4);
    let ip = &mut out[ETH_LEN..ETH_LEN + IP_LEN];
    ip[0] = 0x45;
    ip[1] = 0;
    put16(ip, 2, IP_LEN as u16 + udp_len);
    put16(ip, 4, 0);
    put16(ip, 6, IP_DONT_FRAGMENT);
    ip[8] = TTL;
    ip[9] = PROTO_UDP;
    put16(ip, 10, 0);
    ip[12..16].copy_from_slice(&flow.src);
    ip[16..20].copy_from_slice(&flow.dst);
    let ip_sum = !fold(ones_sum(ip, 0));
    put16(ip, 10, ip_sum);
    let udp = &mut out[ETH_LEN + IP_LEN..UDP_HEADERS];
    put16(udp, 0, flow.sport);
    put16(udp, 2, flow.dport);
    put16(udp, 4, udp_len);
    let check = match csum {
        UdpChecksum::None => 0,
        UdpChecksum::Partial => fold(pseudo_header_sum(flow.src, flow.dst, udp_len)),
    };
    put16(udp, 6, check);
    UDP_HEADERS + payload_len
}

/// Ones'-complement sum of the IPv4 pseudo-header of a UDP datagram.
fn pseudo_header_sum(src: Ip, dst: Ip, udp_len: u16) -> u32 {
    let sum = ones_sum(&src, 0);
    let sum = ones_sum(&dst, sum);
    sum + u32::from(PROTO_UDP) + u32::from(udp_len)
}

/// Adds `bytes` (big-endian 16-bit words, odd byte padded) to `sum`.
pub fn ones_sum(bytes: &[u8], mut sum: u32) -> u32 {
    let mut words = bytes.chunks_exact(2);
    for word in &mut words {
        sum += u32::from(u16::from_be_bytes([word[0], word[1]]));
    }
    if let [last] = words.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

/// Folds a 32-bit ones'-complement sum to 16 bits.
pub fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub struct MacText(pub Mac);

impl core::fmt::Display for MacText {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Formats an IPv4 address as `a.b.c.d`.
pub struct IpText(pub Ip);

impl core::fmt::Display for IpText {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let [a, b, c, d] = self.0;
        write!(f, "{a}.{b}.{c}.{d}")
    }
}

/// Parses `a.b.c.d`.
pub fn parse_ip(text: &[u8]) -> Option<Ip> {
    let mut ip = [0u8; 4];
    let mut parts = text.split(|&b| b == b'.');
    for byte in &mut ip {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 {
            return None;
        }
        let value = part.iter().try_fold(0u16, |acc, &d| {
            let digit = u16::from(d.checked_sub(b'0').filter(|&d| d <= 9)?);
            Some(acc * 10 + digit)
        })?;
        *byte = u8::try_from(value).ok()?;
    }
    parts.next().is_none().then_some(ip)
}
