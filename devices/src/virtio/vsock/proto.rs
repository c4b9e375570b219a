//! The virtio-vsock wire protocol (virtio 1.2 §5.10.6) as far as the
//! device needs it beyond rust-vmm's `virtio-vsock` packet layer: the
//! well-known CIDs, socket type, operations, shutdown flags, the sizes
//! zvmm chooses, and the header of one packet in either direction.

use virtio_vsock::packet::VsockPacket;
use vm_memory::bitmap::BitmapSlice;

/// The host's context ID.
pub const HOST_CID: u64 = 2;
/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type offered.
pub const TYPE_STREAM: u16 = 1;

/// Connection request.
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection refused or aborted.
pub const OP_RST: u16 = 3;
/// The sender will not receive and/or send any more.
pub const OP_SHUTDOWN: u16 = 4;
/// Data.
pub const OP_RW: u16 = 5;
/// The sender's receive credit, unasked.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Asks the peer for a credit update.
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flag: the sender will receive nothing more.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send nothing more.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both SHUTDOWN flags.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// Largest payload of one packet either way (Linux's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`); longer packets from the guest are
/// dropped.
pub const MAX_PAYLOAD: u32 = 64 << 10;
/// The receive buffer zvmm advertises per connection (`buf_alloc`): bytes
/// from the guest it holds while the host side does not read.
pub const BUF_ALLOC: u32 = 256 << 10;

/// The header fields of one packet, either way (the type is always
/// stream; the device fills in the CIDs of what it sends).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source context ID.
    pub src_cid: u64,
    /// Destination context ID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags (SHUTDOWN).
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed of what it received.
    pub fwd_cnt: u32,
}

impl Header {
    /// The header of a packet the guest sent, as the packet layer read it
    /// (once: later guest writes do not change it).
    pub fn of<B: BitmapSlice>(packet: &VsockPacket<'_, B>) -> Header {
        Header {
            src_cid: packet.src_cid(),
            dst_cid: packet.dst_cid(),
            src_port: packet.src_port(),
            dst_port: packet.dst_port(),
            len: packet.len(),
            type_: packet.type_(),
            op: packet.op(),
            flags: packet.flags(),
            buf_alloc: packet.buf_alloc(),
            fwd_cnt: packet.fwd_cnt(),
        }
    }

    /// Writes this header into a packet for the guest (the rest of its
    /// header zeroed first).
    pub fn write_to<B: BitmapSlice>(
        &self,
        packet: &mut VsockPacket<'_, B>,
    ) -> Result<(), virtio_vsock::packet::Error> {
        packet.set_header_from_raw(&[0; virtio_vsock::packet::PKT_HEADER_SIZE])?;
        packet
            .set_src_cid(self.src_cid)
            .set_dst_cid(self.dst_cid)
            .set_src_port(self.src_port)
            .set_dst_port(self.dst_port)
            .set_len(self.len)
            .set_type(self.type_)
            .set_op(self.op)
            .set_flags(self.flags)
            .set_buf_alloc(self.buf_alloc)
            .set_fwd_cnt(self.fwd_cnt);
        Ok(())
    }
}
