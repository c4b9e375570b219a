//! A device brought up the ordinary way for the hostile probe (reset,
//! VERSION_1 and indirect descriptors, every queue its kind needs on the
//! probe's ring pages, DRIVER_OK), the one well-formed request of each
//! kind that the attacks then deform, and how a request ended.

use super::ring::{self, Desc, Ring, F_NEXT, F_WRITE, RING_QUEUES};
use super::target::{Kind, Target, DRIVER_OK, NEEDS_RESET};
use crate::io;

/// Data-area offsets of a request's buffers.
pub const OUT_OFF: u64 = 0;
pub const STATUS_OFF: u64 = 0x800;
pub const IN_OFF: u64 = 0x1000;
/// Byte the probe puts in device-written buffers before a request.
pub const UNWRITTEN: u8 = 0xa5;

/// One buffer of a request.
#[derive(Clone, Copy)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// A well-formed request: at most [`MAX_BUFS`] buffers.
#[derive(Clone, Copy)]
pub struct Template {
    pub bufs: [Buf; MAX_BUFS],
    pub count: usize,
}

/// Most buffers of a template.
pub const MAX_BUFS: usize = 3;

impl Template {
    /// The buffers.
    pub fn bufs(&self) -> &[Buf] {
        &self.bufs[..self.count]
    }

    /// The descriptors of a chain through ring (or table) indexes
    /// `first..`.
    pub fn desc(&self, i: usize, first: u16) -> Desc {
        let buf = self.bufs[i];
        let last = i + 1 == self.count;
        Desc {
            addr: buf.addr,
            len: buf.len,
            flags: if buf.write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT },
            next: if last { 0 } else { first + i as u16 + 1 },
        }
    }
}

const FUSE_INIT: u32 = 26;
const BLK_SECTOR: u64 = 0;

/// Fills the data area with `kind`'s request and returns its buffers:
/// blk a read of sector 0, rng 64 bytes, net a 60-byte broadcast frame,
/// vsock a RST to the host, fs FUSE_INIT.
pub fn template(kind: Kind, guest_cid: u64) -> Template {
    ring::fill(0, ring::DATA_LEN, 0);
    ring::fill(IN_OFF, 4096, UNWRITTEN);
    ring::fill(STATUS_OFF, 16, UNWRITTEN);
    let out = |len| Buf {
        addr: ring::data(OUT_OFF),
        len,
        write: false,
    };
    let input = |off: u64, len| Buf {
        addr: ring::data(off),
        len,
        write: true,
    };
    let none = input(IN_OFF, 0);
    match kind {
        Kind::Blk => {
            ring::put(OUT_OFF + 8, &BLK_SECTOR.to_le_bytes()); // type 0 = IN
            Template {
                bufs: [out(16), input(IN_OFF, 512), input(STATUS_OFF, 1)],
                count: 3,
            }
        }
        Kind::Rng => Template {
            bufs: [input(IN_OFF, 64), none, none],
            count: 1,
        },
        Kind::Net => {
            // 12-byte virtio-net header (zero), broadcast frame, EtherType
            // 0x88b5 (local experimental).
            ring::fill(OUT_OFF + 12, 6, 0xff);
            ring::put(OUT_OFF + 18, &[0x02, 0, 0, 0, 0, 0x42, 0x88, 0xb5]);
            Template {
                bufs: [out(12 + 60), none, none],
                count: 1,
            }
        }
        Kind::Vsock => {
            let mut hdr = [0u8; 44];
            hdr[0..8].copy_from_slice(&guest_cid.to_le_bytes());
            hdr[8..16].copy_from_slice(&2u64.to_le_bytes()); // host
            hdr[16..20].copy_from_slice(&1234u32.to_le_bytes());
            hdr[20..24].copy_from_slice(&9u32.to_le_bytes());
            hdr[28..30].copy_from_slice(&1u16.to_le_bytes()); // STREAM
            hdr[30..32].copy_from_slice(&3u16.to_le_bytes()); // RST
            ring::put(OUT_OFF, &hdr);
            Template {
                bufs: [out(44), none, none],
                count: 1,
            }
        }
        Kind::Fs => {
            let mut msg = [0u8; 56];
            msg[0..4].copy_from_slice(&56u32.to_le_bytes());
            msg[4..8].copy_from_slice(&FUSE_INIT.to_le_bytes());
            msg[8..16].copy_from_slice(&1u64.to_le_bytes()); // unique
            msg[40..44].copy_from_slice(&7u32.to_le_bytes());
            msg[44..48].copy_from_slice(&31u32.to_le_bytes());
            ring::put(OUT_OFF, &msg);
            Template {
                bufs: [out(56), input(IN_OFF, 16), input(IN_OFF + 16, 64)],
                count: 3,
            }
        }
    }
}

/// How a request (or an attack) ended.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The device set DEVICE_NEEDS_RESET.
    NeedsReset,
    /// The device answered with an error (blk status, FUSE error, nothing
    /// written where it had to write).
    Error,
    /// Returned on the used ring by a device that only reads (transmit
    /// queues): a drop is all it can answer.
    Consumed,
    /// Completed normally.
    Served,
    /// The device did not take the bogus setting (FEATURES_OK or DRIVER_OK
    /// refused, a queue register unchanged).
    Refused,
    /// Nothing happened and the device still works.
    Ignored,
    /// A good request after the attack got no answer.
    NoAnswer,
    /// The device did not finish a reset.
    Dead,
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::NeedsReset,
        Outcome::Error,
        Outcome::Consumed,
        Outcome::Served,
        Outcome::Refused,
        Outcome::Ignored,
        Outcome::NoAnswer,
        Outcome::Dead,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Outcome::NeedsReset => "needs_reset",
            Outcome::Error => "error",
            Outcome::Consumed => "consumed",
            Outcome::Served => "served",
            Outcome::Refused => "refused",
            Outcome::Ignored => "ignored",
            Outcome::NoAnswer => "no_answer",
            Outcome::Dead => "dead",
        }
    }
}

/// A device with its queues live.
pub struct Live {
    pub target: Target,
    pub rings: [Option<Ring>; RING_QUEUES],
}

impl Live {
    /// Negotiates `features`, sets up every queue of the kind on the
    /// probe's ring pages, sets DRIVER_OK (unless `driver_ok` is false).
    /// `None` if the device refused any step.
    pub fn start(target: &Target, features: u64, driver_ok: bool) -> Option<Live> {
        if !target.negotiate(features) {
            return None;
        }
        let mut rings: [Option<Ring>; RING_QUEUES] = [None, None, None];
        for index in 0..target.kind.queues() {
            let size = target.ring_size(index);
            let ring = Ring::new(index, size)?;
            target.setup_queue(
                index,
                size,
                ring.desc_addr(),
                ring.avail_addr(),
                ring.used_addr(),
            );
            rings[usize::from(index)] = Some(ring);
        }
        if driver_ok {
            target.add_status(DRIVER_OK);
            if target.status() & DRIVER_OK == 0 {
                return None;
            }
        }
        Some(Live {
            target: *target,
            rings,
        })
    }

    /// The ring of the request queue.
    pub fn ring(&mut self) -> &mut Ring {
        let index = usize::from(self.target.kind.request_queue());
        self.rings[index].as_mut().expect("request queue set up")
    }

    /// Puts `template` as a direct chain at descriptor 0, publishes it and
    /// kicks the request queue.
    pub fn send(&mut self, template: &Template) {
        let ring = self.ring();
        for i in 0..template.count {
            ring.set_desc(i as u16, template.desc(i, 0));
        }
        ring.push(0);
        ring.publish(0);
        self.kick();
    }

    /// Notifies the request queue.
    pub fn kick(&self) {
        let index = self.target.kind.request_queue();
        self.target.kick(index, index);
    }

    /// Waits up to `ms` for the request queue's next used element or
    /// DEVICE_NEEDS_RESET and classifies the ending.
    pub fn outcome(&mut self, ms: u64) -> Outcome {
        let kind = self.target.kind;
        let deadline = io::rdtsc().saturating_add(ms.saturating_mul(1000 * io::tsc_mhz()));
        loop {
            if self.target.status() & NEEDS_RESET != 0 {
                return Outcome::NeedsReset;
            }
            if let Some((_, len)) = self.ring().take_used() {
                return classify(kind, len);
            }
            if io::rdtsc() > deadline {
                return Outcome::Ignored;
            }
            core::hint::spin_loop();
        }
    }
}

/// What a used element of `kind` with `len` written bytes says, from the
/// template's buffers.
fn classify(kind: Kind, len: u32) -> Outcome {
    match kind {
        Kind::Net | Kind::Vsock => Outcome::Consumed,
        Kind::Blk => match ring::data_byte(STATUS_OFF) {
            0 if len > 0 => Outcome::Served,
            _ => Outcome::Error,
        },
        Kind::Rng if len > 0 => Outcome::Served,
        Kind::Fs if len >= 16 => {
            let error = (0..4).fold(0u32, |acc, i| {
                acc | u32::from(ring::data_byte(IN_OFF + 4 + i)) << (8 * i)
            });
            if error == 0 {
                Outcome::Served
            } else {
                Outcome::Error
            }
        }
        _ => Outcome::Error,
    }
}
