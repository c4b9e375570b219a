//! virtio-rng over virtio-pci (virtio 1.2 §5.4): for every modern entropy
//! function, one request queue of device-writable buffers; the probe makes
//! `probe.rng.reads=` reads (default 2) of `probe.rng.bytes=` bytes each
//! (default 64), in requests of at most [`REQUEST_MAX`] bytes that
//! alternate between one buffer and two chained halves, and reports each:
//!
//! `probe: rng slot=S read=K bytes=B requests=R fnv1a64=H all_zero=0|1
//! ended=0|1`
//!
//! `ended=1`: a request came back empty (a file source read through), the
//! read stops there. A request that does not come back within
//! [`DEVICE_TIMEOUT_US`] ends the device's reads (`timeout`).

use crate::pci::{Config, Function, Pci};
use crate::serial::Quoted;
use crate::virtio::{self, Buf, Device, Queue};
use crate::{fnv1a64_update, io, report, FNV_OFFSET_BASIS};

/// PCI device ID of a modern virtio-rng function (0x1040 + type 4).
pub const DEVICE_ID: u16 = 0x1044;
/// Most bytes one request asks for.
pub const REQUEST_MAX: usize = 4096;
/// How long one request may take.
pub const DEVICE_TIMEOUT_US: u64 = 2_000_000;
const DEFAULT_BYTES: u64 = 64;
const DEFAULT_READS: u32 = 2;
/// Most reads the probe makes.
const MAX_READS: u32 = 16;

#[repr(C, align(4096))]
struct RngMem([u8; REQUEST_MAX]);

static mut RNG_MEM: RngMem = RngMem([0; REQUEST_MAX]);

/// The `probe.rng.*` options.
struct Options {
    bytes: u64,
    reads: u32,
}

impl Options {
    fn parse(cmdline: &[u8]) -> Options {
        let mut o = Options {
            bytes: DEFAULT_BYTES,
            reads: DEFAULT_READS,
        };
        for word in cmdline.split(|&b| b == b' ') {
            let Some(rest) = word.strip_prefix(b"probe.rng.") else {
                continue;
            };
            let value = core::str::from_utf8(rest).ok();
            let number = |key: &str| {
                value
                    .and_then(|v| v.strip_prefix(key))
                    .and_then(|v| v.parse::<u64>().ok())
            };
            if let Some(n) = number("bytes=") {
                o.bytes = n;
            } else if let Some(n) = number("reads=") {
                o.reads = n.min(u64::from(MAX_READS)) as u32;
            } else {
                report!("rng option bad={}", Quoted(word));
            }
        }
        o
    }
}

/// Reads from every virtio-rng function.
pub fn run(pci: &Pci, cmdline: &[u8]) {
    let options = Options::parse(cmdline);
    let mut found = 0;
    for function in pci.functions() {
        if function.vendor == virtio::VENDOR_ID && function.device == DEVICE_ID {
            found += 1;
            if let Err(err) = drive(&pci.config, function, &options) {
                report!("rng slot={} error {err}", function.bdf.label());
            }
        }
    }
    report!("rng devices={found}");
}

/// What one read got.
struct Read {
    bytes: u64,
    requests: u64,
    hash: u64,
    any_set: bool,
    ended: bool,
}

fn drive(
    config: &Config,
    function: &Function,
    options: &Options,
) -> Result<(), virtio::VirtioError> {
    let mut device = Device::init(config, function, 0)?;
    let mut queue = device.setup_queue(0, 2)?;
    device.driver_ok();
    let slot = device.bdf.label();
    let tsc_mhz = io::tsc_mhz();
    let mut total = 0;
    for index in 0..options.reads {
        let Some(read) = read(&mut queue, options.bytes, tsc_mhz) else {
            report!("rng slot={slot} read={index} timeout");
            break;
        };
        total += read.bytes;
        report!(
            "rng slot={slot} read={index} bytes={} requests={} fnv1a64={:#018x} all_zero={} ended={}",
            read.bytes,
            read.requests,
            read.hash,
            u8::from(!read.any_set),
            u8::from(read.ended)
        );
    }
    let reset = if device.reset() { "ok" } else { "timeout" };
    report!(
        "rng slot={slot} total bytes={total} notifies={} reset={reset}",
        queue.stats.notifies
    );
    Ok(())
}

/// Reads up to `want` bytes; `None` if a request timed out.
fn read(queue: &mut Queue, want: u64, tsc_mhz: u64) -> Option<Read> {
    let mut got = Read {
        bytes: 0,
        requests: 0,
        hash: FNV_OFFSET_BASIS,
        any_set: false,
        ended: false,
    };
    let base = core::ptr::addr_of_mut!(RNG_MEM) as u64;
    while got.bytes < want {
        let len = (want - got.bytes).min(REQUEST_MAX as u64) as u32;
        let writable = |addr, len| Buf {
            addr,
            len,
            device_writes: true,
        };
        if got.requests % 2 == 1 && len >= 2 {
            let half = len / 2;
            let bufs = [
                writable(base, half),
                writable(base + u64::from(half), len - half),
            ];
            queue.add(0, &bufs, false);
        } else {
            queue.add(0, &[writable(base, len)], false);
        }
        queue.kick();
        got.requests += 1;
        let written = wait_used(queue, tsc_mhz)?.min(len) as usize;
        if written == 0 {
            got.ended = true;
            break;
        }
        // SAFETY: the device completed the request (used ring, after an
        // acquire fence) and the buffer is not handed out again before
        // this read of it.
        let bytes = unsafe { &(&(*core::ptr::addr_of!(RNG_MEM)).0)[..written] };
        got.hash = fnv1a64_update(got.hash, bytes);
        got.any_set |= bytes.iter().any(|&b| b != 0);
        got.bytes += written as u64;
    }
    Some(got)
}

/// The length the device wrote into the one request in flight.
fn wait_used(queue: &mut Queue, tsc_mhz: u64) -> Option<u32> {
    let start = io::rdtsc();
    let deadline = DEVICE_TIMEOUT_US.saturating_mul(tsc_mhz);
    loop {
        if let Some(used) = queue.take_used() {
            return Some(used.len);
        }
        if io::rdtsc().wrapping_sub(start) > deadline {
            return None;
        }
        core::hint::spin_loop();
    }
}
