//! Attacks through the rings of a live device: descriptor loops (direct
//! and in indirect tables), chains longer than the queue, indexes out of
//! range, buffers outside RAM (beyond it, in the 32-bit hole, on ECAM,
//! the LAPIC, the device's own BAR, wrapping the address space),
//! overlapping, zero-length and 4 GiB buffers, wrong directions, bad
//! indirect tables and an avail index far ahead of the ring.

use super::live::{template, Live, Outcome, Template};
use super::ring::{Desc, F_INDIRECT, F_NEXT, F_WRITE, INDIRECT_MAX};
use super::target::Target;
use super::Ctx;

/// How long a deformed request may take to end.
const ATTACK_MS: u64 = 300;

/// An attack: its name and what it does.
pub type Attack = (&'static str, fn(&Target, &Ctx) -> Outcome);

/// The ring attacks, in the order they run.
pub const ATTACKS: &[Attack] = &[
    ("desc_loop", desc_loop),
    ("desc_self_loop", desc_self_loop),
    ("indirect_loop", indirect_loop),
    ("indirect_nested", indirect_nested),
    ("indirect_with_next", indirect_with_next),
    ("indirect_longer_than_queue", indirect_longer_than_queue),
    ("indirect_len_unaligned", indirect_len_unaligned),
    ("indirect_len_zero", indirect_len_zero),
    ("indirect_beyond_ram", indirect_beyond_ram),
    ("chain_longer_than_queue", chain_longer_than_queue),
    ("next_out_of_range", next_out_of_range),
    ("head_out_of_range", head_out_of_range),
    ("addr_beyond_ram", |t, c| relocated(t, c, 0x10_0000_0000)),
    ("addr_straddles_ram_end", |t, c| {
        relocated(t, c, c.ram_end - 8)
    }),
    ("addr_in_32bit_hole", |t, c| relocated(t, c, 0xd000_0000)),
    ("addr_in_ecam", |t, c| relocated(t, c, c.ecam)),
    ("addr_in_lapic", |t, c| relocated(t, c, 0xfee0_0000)),
    ("addr_in_ioapic", |t, c| relocated(t, c, 0xfec0_0000)),
    ("addr_in_own_bar", |t, c| relocated(t, c, t.bar)),
    ("addr_wraps", |t, c| relocated(t, c, u64::MAX - 7)),
    ("buffers_overlap", buffers_overlap),
    ("len_zero", |t, c| resized(t, c, 0)),
    ("len_4gib", |t, c| resized(t, c, u32::MAX)),
    ("wrong_direction", wrong_direction),
    ("avail_idx_far_ahead", avail_idx_far_ahead),
];

/// Starts `target` live, lets `deform` write and publish the chain on
/// the request queue, kicks and waits for the ending.
fn run(target: &Target, ctx: &Ctx, deform: impl FnOnce(&mut Live, &Template)) -> Outcome {
    let Some(mut live) = Live::start(target, target.plain_features(), true) else {
        return Outcome::Refused;
    };
    let request = template(target.kind, ctx.guest_cid);
    deform(&mut live, &request);
    live.kick();
    live.outcome(ATTACK_MS)
}

/// Writes `descs` at ring index 0.. and publishes head 0.
fn publish(live: &mut Live, descs: &[Desc]) {
    let ring = live.ring();
    for (i, &desc) in descs.iter().enumerate() {
        ring.set_desc(i as u16, desc);
    }
    ring.push(0);
    ring.publish(0);
}

/// The template's descriptors from index 0, the last linked to `next`.
fn chain(request: &Template, last_next: Option<u16>) -> ([Desc; 3], usize) {
    let mut descs = [Desc {
        addr: 0,
        len: 0,
        flags: 0,
        next: 0,
    }; 3];
    for (i, desc) in descs.iter_mut().enumerate().take(request.count) {
        *desc = request.desc(i, 0);
    }
    if let Some(next) = last_next {
        let last = &mut descs[request.count - 1];
        last.flags |= F_NEXT;
        last.next = next;
    }
    (descs, request.count)
}

fn desc_loop(target: &Target, ctx: &Ctx) -> Outcome {
    run(target, ctx, |live, request| {
        let (descs, count) = chain(request, Some(0));
        publish(live, &descs[..count]);
    })
}

fn desc_self_loop(target: &Target, ctx: &Ctx) -> Outcome {
    run(target, ctx, |live, request| {
        let mut desc = request.desc(0, 0);
        desc.flags |= F_NEXT;
        desc.next = 0;
        publish(live, &[desc]);
    })
}

/// Puts `entries` in the indirect table and publishes one ring
/// descriptor pointing at it (`len` bytes, extra `flags`).
fn indirect(live: &mut Live, entries: &[Desc], table: Option<u64>, len: u32, flags: u16) {
    let ring = live.ring();
    for (i, &desc) in entries.iter().enumerate() {
        ring.set_indirect(i as u16, desc);
    }
    let head = Desc {
        addr: table.unwrap_or(ring.indirect_addr()),
        len,
        flags: F_INDIRECT | flags,
        next: 1,
    };
    // Descriptor 1 ends the chain for INDIRECT|NEXT.
    ring.set_desc(
        1,
        Desc {
            flags: F_INDIRECT,
            next: 0,
            ..head
        },
    );
    ring.set_desc(0, head);
    ring.push(0);
    ring.publish(0);
}

fn table_len(count: usize) -> u32 {
    count as u32 * 16
}

fn indirect_loop(target: &Target, ctx: &Ctx) -> Outcome {
    run(target, ctx, |live, request| {
        let (descs, count) = chain(request, Some(0));
        indirect(live, &descs[..count], None, table_len(count), 0);
    })
}

fn indirect_nested(target: &Target, ctx: &Ctx) -> Outcome {
    run(target, ctx, |live, request| {
        let (mut descs, count) = chain(request, None);
        let table = live.ring().indirect_addr();
        descs[0] = Desc {
            addr: table,
            len: table_len(count),
            flags: F_INDIRECT | if count > 1 { F_NEXT } else { 0 },
            next: 1,
        };
        indirect(live, &descs[..count], None, table_len(count), 0);
    })
}

fn indirect_with_next(target: &Target, ctx: &Ctx) -> Outcome {
    run(target, ctx, |live, request| {
        let (descs, count) = chain(request, None);
        indirect(live, &descs[..count], None, table_len(count), F_NEXT);
    })
}

/// An indirect table of [`INDIRECT_MAX`] entries (four times the queue):
/// the template's first buffer, then its last one repeated.
fn indirect_longer_than_queue(target: &Target, ctx: &Ctx) -> Outcome {
    run(target, ctx, |live, request| {
        let ring = live.ring();
        let last = request.bufs()[request.count - 1];
        for i in 0..INDIRECT_MAX {
            let buf = if i == 0 { request.bufs[0] } else { last };
            let more = i + 1 < INDIRECT_MAX;
            ring.set_indirect(
                i,
                Desc {
                    addr: buf.addr,
                    len: buf.len.min(8),
                    flags: if buf.write { F_WRITE } else { 0 } | if more { F_NEXT } else { 0 },
                    next: i + 1,
                },
            );
        }
        let table = ring.indirect_addr();
        ring.set_desc(
            0,
            Desc {
                addr: table,
                len: table_len(usize::from(INDIRECT_MAX)),
                flags: F_INDIRECT,
                next: 0,
            },
        );
        ring.push(0);
        ring.publish(0);
    })
}

fn indirect_len_unaligned(target: &Target, ctx: &Ctx) -> Outcome {
    run(target, ctx, |live, request| {
        let (descs, count) = chain(request, None);
        indirect(live, &descs[..count], None, table_len(count) + 7, 0);
    })
}

fn indirect_len_zero(target: &Target, ctx: &Ctx) -> Outcome {
    run(target, ctx, |live, request| {
        let (descs, count) = chain(request, None);
        indirect(live, &descs[..count], None, 0, 0);
    })
}

fn indirect_beyond_ram(target: &Target, ctx: &Ctx) -> Outcome {
    run(target, ctx, |live, request| {
        let (descs, count) = chain(request, None);
        indirect(
            live,
            &descs[..count],
            Some(0x10_0000_0000),
            table_len(count),
            0,
        );
    })
}

/// Every ring descriptor linked to the next, the last back to the first:
/// a chain of more descriptors than the queue has, without end.
fn chain_longer_than_queue(target: &Target, ctx: &Ctx) -> Outcome {
    run(target, ctx, |live, request| {
        let ring = live.ring();
        let size = ring.size;
        for i in 0..size {
            let buf = request.bufs()[usize::from(i) % request.count];
            ring.set_desc(
                i,
                Desc {
                    addr: buf.addr,
                    len: buf.len,
                    flags: F_NEXT | if buf.write { F_WRITE } else { 0 },
                    next: (i + 1) % size,
                },
            );
        }
        ring.push(0);
        ring.publish(0);
    })
}

fn next_out_of_range(target: &Target, ctx: &Ctx) -> Outcome {
    run(target, ctx, |live, request| {
        let (mut descs, count) = chain(request, None);
        descs[0].flags |= F_NEXT;
        descs[0].next = 0x7fff;
        publish(live, &descs[..count]);
    })
}

fn head_out_of_range(target: &Target, ctx: &Ctx) -> Outcome {
    run(target, ctx, |live, request| {
        let (descs, count) = chain(request, None);
        let ring = live.ring();
        for (i, &desc) in descs[..count].iter().enumerate() {
            ring.set_desc(i as u16, desc);
        }
        ring.push(0x1234);
        ring.publish(0);
    })
}

/// The template with every buffer moved to `addr` (lengths kept).
fn relocated(target: &Target, ctx: &Ctx, addr: u64) -> Outcome {
    run(target, ctx, |live, request| {
        let (mut descs, count) = chain(request, None);
        for desc in &mut descs[..count] {
            desc.addr = addr;
        }
        publish(live, &descs[..count]);
    })
}

/// Every buffer at the address of the first, device-written ones too.
fn buffers_overlap(target: &Target, ctx: &Ctx) -> Outcome {
    run(target, ctx, |live, request| {
        let (mut descs, count) = chain(request, None);
        let first = descs[0].addr;
        for desc in &mut descs[..count] {
            desc.addr = first;
        }
        publish(live, &descs[..count]);
    })
}

/// The template with every length set to `len`.
fn resized(target: &Target, ctx: &Ctx, len: u32) -> Outcome {
    run(target, ctx, |live, request| {
        let (mut descs, count) = chain(request, None);
        for desc in &mut descs[..count] {
            desc.len = len;
        }
        publish(live, &descs[..count]);
    })
}

/// Device-readable buffers made device-writable and vice versa.
fn wrong_direction(target: &Target, ctx: &Ctx) -> Outcome {
    run(target, ctx, |live, request| {
        let (mut descs, count) = chain(request, None);
        for desc in &mut descs[..count] {
            desc.flags ^= F_WRITE;
        }
        publish(live, &descs[..count]);
    })
}

/// One good request, then an avail index 0x8000 entries past it.
fn avail_idx_far_ahead(target: &Target, ctx: &Ctx) -> Outcome {
    run(target, ctx, |live, request| {
        let (descs, count) = chain(request, None);
        let ring = live.ring();
        for (i, &desc) in descs[..count].iter().enumerate() {
            ring.set_desc(i as u16, desc);
        }
        ring.push(0);
        ring.publish(0x8000);
    })
}
