//! Attacks on the set-up of a device: bogus queue sizes (0, not a power
//! of two, above the maximum), ring addresses that are unaligned, outside
//! RAM, on each other, in a BAR or in the ROM/ACPI area, kicks before
//! DRIVER_OK and on queues that do not exist, and feature renegotiation
//! (features written after FEATURES_OK and after DRIVER_OK, FEATURES_OK
//! cleared, features never offered, DRIVER_OK without FEATURES_OK).

use super::chains::Attack;
use super::live::{template, Live, Outcome};
use super::ring::{Ring, QUEUE_SIZE};
use super::target::{
    Target, ACKNOWLEDGE, CC_QUEUE_SELECT, CC_QUEUE_SIZE, DRIVER, DRIVER_OK, FEATURES_OK,
    NEEDS_RESET,
};
use super::Ctx;

/// How long a request may take when the device should serve it.
const SERVE_MS: u64 = 2000;
/// How long the probe waits to see that nothing happens.
const QUIET_MS: u64 = 300;

/// The set-up attacks, in the order they run.
pub const ATTACKS: &[Attack] = &[
    ("queue_size_zero", |t, c| queue_size(t, c, |_| 0)),
    ("queue_size_not_power_of_two", |t, c| {
        queue_size(t, c, |_| QUEUE_SIZE - 3)
    }),
    ("queue_size_above_max", |t, c| {
        queue_size(t, c, |max| max.saturating_mul(2).max(max + 1))
    }),
    ("queue_size_ffff", |t, c| queue_size(t, c, |_| 0xffff)),
    ("rings_unaligned", |t, c| {
        rings(t, c, |r| {
            [r.desc_addr() + 1, r.avail_addr() + 1, r.used_addr() + 2]
        })
    }),
    ("rings_beyond_ram", |t, c| {
        rings(t, c, |r| [0x10_0000_0000, r.avail_addr(), r.used_addr()])
    }),
    ("rings_overlap", |t, c| rings(t, c, |r| [r.desc_addr(); 3])),
    ("used_ring_in_bar", |t, c| {
        rings(t, c, |r| [r.desc_addr(), r.avail_addr(), t.bar])
    }),
    ("used_ring_in_rom", |t, c| {
        rings(t, c, |r| [r.desc_addr(), r.avail_addr(), c.rom])
    }),
    ("used_ring_in_lapic", |t, c| {
        rings(t, c, |r| [r.desc_addr(), r.avail_addr(), 0xfee0_0000])
    }),
    ("used_ring_straddles_ram_end", |t, c| {
        rings(t, c, |r| [r.desc_addr(), r.avail_addr(), c.ram_end - 64])
    }),
    ("kick_before_driver_ok", kick_before_driver_ok),
    ("kick_missing_queue", kick_missing_queue),
    ("features_after_driver_ok", features_after_driver_ok),
    ("features_ok_cleared", features_ok_cleared),
    ("features_after_features_ok", features_after_features_ok),
    ("features_not_offered", features_not_offered),
    ("features_without_version_1", |t, _| {
        refused_features(t, t.plain_features() & !super::target::F_VERSION_1)
    }),
    (
        "driver_ok_without_features_ok",
        driver_ok_without_features_ok,
    ),
];

/// Queue 0 programmed with size `size(max)`, then DRIVER_OK.
fn queue_size(target: &Target, _ctx: &Ctx, size: fn(u16) -> u16) -> Outcome {
    if !target.negotiate(target.plain_features()) {
        return Outcome::Refused;
    }
    let Some(ring) = Ring::new(0, target.ring_size(0)) else {
        return Outcome::Refused;
    };
    let bogus = size(target.queue_max(0));
    target.setup_queue(
        0,
        bogus,
        ring.desc_addr(),
        ring.avail_addr(),
        ring.used_addr(),
    );
    let common = target.common.mmio();
    common.write16(CC_QUEUE_SELECT, 0);
    if common.read16(CC_QUEUE_SIZE) != bogus {
        return Outcome::Refused;
    }
    after_driver_ok(target)
}

/// DRIVER_OK, then what the status says.
fn after_driver_ok(target: &Target) -> Outcome {
    target.add_status(DRIVER_OK);
    let status = target.status();
    if status & NEEDS_RESET != 0 {
        Outcome::NeedsReset
    } else if status & DRIVER_OK == 0 {
        Outcome::Refused
    } else {
        Outcome::Served
    }
}

/// Every queue of the kind set up with the request queue's rings at the
/// addresses `addrs(ring)` (desc, avail, used), then DRIVER_OK and one
/// request.
fn rings(target: &Target, ctx: &Ctx, addrs: impl Fn(&Ring) -> [u64; 3]) -> Outcome {
    if !target.negotiate(target.plain_features()) {
        return Outcome::Refused;
    }
    let kind = target.kind;
    let mut request_ring = None;
    let mut used_at = 0;
    for index in 0..kind.queues() {
        let size = target.ring_size(index);
        let Some(ring) = Ring::new(index, size) else {
            return Outcome::Refused;
        };
        let [desc, avail, used] = if index == kind.request_queue() {
            addrs(&ring)
        } else {
            [ring.desc_addr(), ring.avail_addr(), ring.used_addr()]
        };
        target.setup_queue(index, size, desc, avail, used);
        if index == kind.request_queue() {
            request_ring = Some(ring);
            used_at = used;
        }
    }
    let outcome = after_driver_ok(target);
    if outcome != Outcome::Served {
        return outcome;
    }
    // The device took the rings: send a request through the probe's copy
    // (where the rings are the probe's own memory the device answers).
    let mut live = Live {
        target: *target,
        rings: [None, None, None],
    };
    live.rings[usize::from(kind.request_queue())] = request_ring;
    let request = template(kind, ctx.guest_cid);
    live.send(&request);
    match live.outcome(QUIET_MS) {
        Outcome::Ignored if used_written(used_at, ctx) => Outcome::Served,
        other => other,
    }
}

/// Whether the device advanced a used ring at `used` (in RAM).
fn used_written(used: u64, ctx: &Ctx) -> bool {
    if used.saturating_add(4) > ctx.ram_end || !used.is_multiple_of(2) {
        return false;
    }
    // SAFETY: inside RAM below 4 GiB (identity-mapped), aligned.
    unsafe { core::ptr::read_volatile((used + 2) as *const u16) != 0 }
}

/// A request made available and kicked before DRIVER_OK: the device must
/// not run it then (`ignored`; `served` if it did).
fn kick_before_driver_ok(target: &Target, ctx: &Ctx) -> Outcome {
    let Some(mut live) = Live::start(target, target.plain_features(), false) else {
        return Outcome::Refused;
    };
    let request = template(target.kind, ctx.guest_cid);
    live.send(&request);
    live.outcome(QUIET_MS)
}

/// Kicks naming queues that do not exist, at the notify address of queue
/// 0, at the end of the notify window and past the last queue; then a
/// good request must still be served (`ignored`).
fn kick_missing_queue(target: &Target, ctx: &Ctx) -> Outcome {
    let Some(mut live) = Live::start(target, target.plain_features(), true) else {
        return Outcome::Refused;
    };
    let notify = target.notify.mmio();
    let queues = target.common.mmio().read16(super::target::CC_NUM_QUEUES);
    for value in [queues, queues + 1, 0x7fff, 0xffff] {
        notify.write16(0, value);
        let last = u64::from(target.notify.len.saturating_sub(2));
        notify.write16(last, value);
        let past = u64::from(queues) * u64::from(target.notify_multiplier);
        if past + 2 <= u64::from(target.notify.len) {
            notify.write16(past, value);
        }
    }
    serve_after(&mut live, ctx)
}

/// A good request on a live device after an attack that should change
/// nothing: `ignored` when served, else how it ended.
fn serve_after(live: &mut Live, ctx: &Ctx) -> Outcome {
    if live.target.status() & NEEDS_RESET != 0 {
        return Outcome::NeedsReset;
    }
    let request = template(live.target.kind, ctx.guest_cid);
    live.send(&request);
    match live.outcome(SERVE_MS) {
        Outcome::Served | Outcome::Consumed => Outcome::Ignored,
        Outcome::Ignored => Outcome::NoAnswer,
        other => other,
    }
}

/// Every feature bit written after DRIVER_OK.
fn features_after_driver_ok(target: &Target, ctx: &Ctx) -> Outcome {
    let Some(mut live) = Live::start(target, target.plain_features(), true) else {
        return Outcome::Refused;
    };
    target.write_features(u64::MAX);
    target.write_features(0);
    serve_after(&mut live, ctx)
}

/// The status rewritten without FEATURES_OK (and then with it again)
/// while the device runs.
fn features_ok_cleared(target: &Target, ctx: &Ctx) -> Outcome {
    let Some(mut live) = Live::start(target, target.plain_features(), true) else {
        return Outcome::Refused;
    };
    target.write_status(ACKNOWLEDGE | DRIVER | DRIVER_OK);
    if target.status() & FEATURES_OK == 0 {
        return Outcome::Refused;
    }
    target.write_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    serve_after(&mut live, ctx)
}

/// Features changed between FEATURES_OK and DRIVER_OK.
fn features_after_features_ok(target: &Target, ctx: &Ctx) -> Outcome {
    let Some(mut live) = Live::start(target, target.plain_features(), false) else {
        return Outcome::Refused;
    };
    target.write_features(u64::MAX);
    target.add_status(DRIVER_OK);
    serve_after(&mut live, ctx)
}

/// Every bit, offered or not: FEATURES_OK must not stick.
fn features_not_offered(target: &Target, _ctx: &Ctx) -> Outcome {
    refused_features(target, u64::MAX)
}

fn refused_features(target: &Target, features: u64) -> Outcome {
    if target.negotiate(features) {
        Outcome::Served
    } else if target.status() & NEEDS_RESET != 0 {
        Outcome::NeedsReset
    } else {
        Outcome::Refused
    }
}

/// DRIVER_OK straight after DRIVER (queues set up, no FEATURES_OK).
fn driver_ok_without_features_ok(target: &Target, _ctx: &Ctx) -> Outcome {
    if !target.reset() {
        return Outcome::Dead;
    }
    target.add_status(ACKNOWLEDGE);
    target.add_status(DRIVER);
    target.write_features(target.plain_features());
    let size = target.ring_size(0);
    if let Some(ring) = Ring::new(0, size) {
        target.setup_queue(
            0,
            size,
            ring.desc_addr(),
            ring.avail_addr(),
            ring.used_addr(),
        );
    }
    after_driver_ok(target)
}
