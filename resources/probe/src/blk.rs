//! virtio-blk over virtio-pci: for every modern virtio-blk function on bus 0,
//! reports its configuration and runs a fixed set of requests (GET_ID, a
//! read of sectors 0..8, an out-of-range read, and, named on the command
//! line, a pattern write read back, DISCARD, WRITE_ZEROES, FLUSH), then an
//! optional throughput benchmark on the first device.
//!
//! Command line (sectors are 512 bytes, numbers decimal):
//! - `probe.blk.write=SECTOR:COUNT` writes [`pattern_byte`] and reads it back
//! - `probe.blk.put=SECTOR:HEX` writes one sector starting with the bytes
//!   HEX (two digits each; the rest zero) and reads it back
//! - `probe.blk.discard=SECTOR:COUNT` discards the range
//! - `probe.blk.zero=SECTOR:COUNT` WRITE_ZEROES with the unmap flag
//! - `probe.blk.bench=MIB` sequential read/write of MIB MiB, random reads
//! - `probe.blk.mq=SECTOR` with VIRTIO_BLK_F_MQ and two queues or more:
//!   writes 8 pattern sectors at SECTOR through queue 1 and reads them back
//!   through queue 0, the next 8 the other way round, then 8 more through
//!   each queue with both in flight, each read back through the other

use crate::pci::{Config, Function, Pci, SlotLabel};
use crate::serial::Quoted;
use crate::virtio::{self, Buf, Device, Queue, QUEUE_MAX};
use crate::{fnv1a64_update, io, report, FNV_OFFSET_BASIS};

/// PCI device ID of a modern virtio-blk function.
pub const DEVICE_ID: u16 = 0x1042;
/// Bytes of a virtio-blk sector.
pub const SECTOR: u64 = 512;
/// Descriptors (ring or indirect) each request slot owns.
const DESC_PER_SLOT: u16 = 8;
/// Most requests in flight.
const MAX_SLOTS: usize = (QUEUE_MAX / DESC_PER_SLOT) as usize;

// virtio-blk feature bits.
const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_MQ: u64 = 1 << 12;
const F_WRITE_ZEROES: u64 = 1 << 14;
/// Device features the driver accepts when offered.
const WANTED: u64 =
    F_SIZE_MAX | F_SEG_MAX | F_RO | F_BLK_SIZE | F_FLUSH | F_MQ | F_DISCARD | F_WRITE_ZEROES;

// Device configuration offsets.
const CFG_CAPACITY: u64 = 0;
const CFG_SIZE_MAX: u64 = 8;
const CFG_SEG_MAX: u64 = 12;
const CFG_BLK_SIZE: u64 = 20;
const CFG_NUM_QUEUES: u64 = 34;
const CFG_MAX_DISCARD_SECTORS: u64 = 36;
const CFG_MAX_WRITE_ZEROES_SECTORS: u64 = 48;

// Request types, status values and flags.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// Status byte before the device answers.
const S_PENDING: u8 = 0xff;
const WRITE_ZEROES_UNMAP: u32 = 1;
const ID_LEN: usize = 20;

/// Data bytes of one request slot (the largest request).
const DATA_BYTES: usize = 64 * 1024;
/// How long one request may take before the device counts as dead.
const REQUEST_TIMEOUT_US: u64 = 5_000_000;
/// Upper bound on polls per request, whatever the TSC says.
const REQUEST_MAX_POLLS: u64 = 2_000_000_000;
/// Random 4 KiB reads of the benchmark.
const BENCH_RANDOM_READS: u64 = 2000;

/// Memory of one request slot: data, header and status.
#[repr(C, align(4096))]
struct SlotMem {
    data: [u8; DATA_BYTES],
    header: [u8; 16],
    status: u8,
}

const EMPTY_SLOT: SlotMem = SlotMem {
    data: [0; DATA_BYTES],
    header: [0; 16],
    status: 0,
};

static mut SLOTS: [SlotMem; MAX_SLOTS] = [EMPTY_SLOT; MAX_SLOTS];

/// Byte `i` (0..512) of sector `sector` in the pattern `probe.blk.write`
/// and the benchmark write: `(sector * 31 + i) & 0xff`.
pub fn pattern_byte(sector: u64, i: usize) -> u8 {
    (sector.wrapping_mul(31).wrapping_add(i as u64) & 0xff) as u8
}

/// A sector range from the command line.
#[derive(Clone, Copy)]
struct Range {
    sector: u64,
    count: u64,
}

/// Most bytes `probe.blk.put` takes.
const PUT_MAX: usize = 64;

/// One sector's leading bytes to write (`probe.blk.put`).
#[derive(Clone, Copy)]
struct Put {
    sector: u64,
    bytes: [u8; PUT_MAX],
    len: usize,
}

/// What the command line asks of the block devices.
#[derive(Clone, Copy, Default)]
struct Options {
    write: Option<Range>,
    put: Option<Put>,
    discard: Option<Range>,
    zero: Option<Range>,
    bench_mib: Option<u64>,
    mq_sector: Option<u64>,
}

impl Options {
    fn parse(cmdline: &[u8]) -> Options {
        let mut options = Options::default();
        for word in cmdline.split(|&b| b == b' ') {
            let Some(rest) = word.strip_prefix(b"probe.blk.") else {
                continue;
            };
            if let Some(v) = rest.strip_prefix(b"write=") {
                options.write = parse_range(v);
            } else if let Some(v) = rest.strip_prefix(b"put=") {
                options.put = parse_put(v);
            } else if let Some(v) = rest.strip_prefix(b"discard=") {
                options.discard = parse_range(v);
            } else if let Some(v) = rest.strip_prefix(b"zero=") {
                options.zero = parse_range(v);
            } else if let Some(v) = rest.strip_prefix(b"bench=") {
                options.bench_mib = parse_u64(v);
            } else if let Some(v) = rest.strip_prefix(b"mq=") {
                options.mq_sector = parse_u64(v);
            } else {
                report!("blk option unknown={}", Quoted(word));
            }
        }
        options
    }
}

fn parse_range(text: &[u8]) -> Option<Range> {
    let at = text.iter().position(|&b| b == b':');
    let range = at.and_then(|at| {
        Some(Range {
            sector: parse_u64(&text[..at])?,
            count: parse_u64(&text[at + 1..])?,
        })
    });
    if range.is_none() {
        report!("blk option bad_range={}", Quoted(text));
    }
    range
}

/// `SECTOR:HEX` (at most [`PUT_MAX`] bytes of hex).
fn parse_put(text: &[u8]) -> Option<Put> {
    let put = text.iter().position(|&b| b == b':').and_then(|at| {
        let hex = &text[at + 1..];
        if hex.is_empty() || hex.len() % 2 != 0 || hex.len() / 2 > PUT_MAX {
            return None;
        }
        let mut put = Put {
            sector: parse_u64(&text[..at])?,
            bytes: [0; PUT_MAX],
            len: hex.len() / 2,
        };
        for (byte, pair) in put.bytes.iter_mut().zip(hex.chunks(2)) {
            *byte = (hex_digit(pair[0])? << 4) | hex_digit(pair[1])?;
        }
        Some(put)
    });
    if put.is_none() {
        report!("blk option bad_put={}", Quoted(text));
    }
    put
}

fn hex_digit(d: u8) -> Option<u8> {
    match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        b'A'..=b'F' => Some(d - b'A' + 10),
        _ => None,
    }
}

fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &d| {
        let digit = u64::from(d.checked_sub(b'0').filter(|&d| d <= 9)?);
        acc.checked_mul(10)?.checked_add(digit)
    })
}

/// Drives every virtio-blk function found on bus 0.
pub fn run(pci: &Pci, cmdline: &[u8]) {
    let options = Options::parse(cmdline);
    let mut bench = options.bench_mib;
    let mut found = 0;
    for function in pci.functions() {
        if function.vendor == virtio::VENDOR_ID && function.device == DEVICE_ID {
            found += 1;
            drive(&pci.config, function, &options, &mut bench);
        }
    }
    report!("blk devices={found}");
}

/// Sets up one device, runs the requests, resets it.
fn drive(config: &Config, function: &Function, options: &Options, bench: &mut Option<u64>) {
    let slot = function.bdf.label();
    let device = match Device::init(config, function, WANTED) {
        Ok(device) => device,
        Err(err) => {
            report!("blk slot={slot} error {err}");
            return;
        }
    };
    let mut disk = match Disk::new(device) {
        Ok(disk) => disk,
        Err(err) => {
            report!("blk slot={slot} error {err}");
            return;
        }
    };
    disk.exercise(options);
    if let Some(mib) = bench.take() {
        disk.bench(mib);
    }
    let stats = disk.queue.stats;
    report!(
        "blk slot={slot} requests={} indirect={} notifies={} suppressed={}",
        stats.requests,
        stats.indirect,
        stats.notifies,
        stats.suppressed
    );
    let reset = if disk.device.reset() { "ok" } else { "timeout" };
    report!("blk slot={slot} reset={reset}");
}

/// How a request ended.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Status {
    /// The status byte the device wrote.
    Device(u8),
    /// No completion within [`REQUEST_TIMEOUT_US`].
    Timeout,
    /// Not sent: an earlier request timed out or the device misbehaved.
    Skipped,
}

impl core::fmt::Display for Status {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Status::Device(S_OK) => f.write_str("ok"),
            Status::Device(S_IOERR) => f.write_str("ioerr"),
            Status::Device(S_UNSUPP) => f.write_str("unsupp"),
            Status::Device(n) => write!(f, "other({n})"),
            Status::Timeout => f.write_str("timeout"),
            Status::Skipped => f.write_str("skipped"),
        }
    }
}

const OK: Status = Status::Device(S_OK);

/// One request: type, first sector and data bytes in the slot's buffer.
#[derive(Clone, Copy)]
struct Request {
    kind: u32,
    sector: u64,
    len: usize,
}

/// A live virtio-blk device and its queue.
struct Disk {
    device: Device,
    queue: Queue,
    /// Queue 1, when the device has several (VIRTIO_BLK_F_MQ).
    queue1: Option<Queue>,
    slot: SlotLabel,
    capacity: u64,
    ro: bool,
    /// Largest data descriptor.
    seg_bytes: usize,
    /// Largest request (data bytes).
    request_bytes: usize,
    /// A request timed out or completed bogusly: send nothing more.
    broken: bool,
    /// Slots the device owns.
    busy: [bool; MAX_SLOTS],
    /// TSC ticks per microsecond (for timeouts).
    tsc_mhz: u64,
}

impl Disk {
    /// Reads the configuration, sets up the queue, sets DRIVER_OK.
    fn new(mut device: Device) -> Result<Disk, virtio::VirtioError> {
        let slot = device.bdf.label();
        let cfg = read_config(&device);
        let ro = device.has(F_RO);
        let seg_max = if device.has(F_SEG_MAX) {
            cfg.seg_max
        } else {
            0
        };
        let size_max = if device.has(F_SIZE_MAX) {
            cfg.size_max
        } else {
            0
        };
        report!(
            "blk slot={slot} capacity={} blk_size={} seg_max={seg_max} size_max={size_max} ro={} features={:#x} negotiated={:#x} indirect={} event_idx={}",
            cfg.capacity,
            if device.has(F_BLK_SIZE) { cfg.blk_size } else { 512 },
            u8::from(ro),
            device.offered,
            device.negotiated,
            u8::from(device.has(virtio::F_INDIRECT_DESC)),
            u8::from(device.has(virtio::F_EVENT_IDX)),
        );
        let queue = device.setup_queue(0, DESC_PER_SLOT)?;
        let queue1 = if device.has(F_MQ) {
            let queues = device.device_cfg.read16(CFG_NUM_QUEUES);
            report!("blk slot={slot} num_queues={queues}");
            match queues {
                0 | 1 => None,
                _ => Some(device.setup_queue(1, DESC_PER_SLOT)?),
            }
        } else {
            None
        };
        device.driver_ok();
        let seg_bytes = match size_max {
            0 => DATA_BYTES,
            n => (n as usize).min(DATA_BYTES) / SECTOR as usize * SECTOR as usize,
        }
        .max(SECTOR as usize);
        let max_segs = match seg_max {
            0 => usize::from(DESC_PER_SLOT - 2),
            n => (n as usize).min(usize::from(DESC_PER_SLOT - 2)),
        };
        Ok(Disk {
            device,
            queue,
            queue1,
            slot,
            capacity: cfg.capacity,
            ro,
            seg_bytes,
            request_bytes: (seg_bytes * max_segs).min(DATA_BYTES),
            broken: false,
            busy: [false; MAX_SLOTS],
            tsc_mhz: io::tsc_mhz(),
        })
    }

    /// The fixed request set plus whatever the command line names.
    fn exercise(&mut self, options: &Options) {
        self.get_id();
        self.read_first_page();
        let status = self.single(T_IN, self.capacity, SECTOR as usize);
        report!(
            "blk slot={} read_out_of_range sector={} status={status}",
            self.slot,
            self.capacity
        );
        if let Some(range) = options.write {
            self.write_pattern(range);
        }
        if let Some(put) = options.put {
            self.put_sector(&put);
        }
        if let Some(range) = options.discard {
            self.discard_or_zero(T_DISCARD, range);
        }
        if let Some(range) = options.zero {
            self.discard_or_zero(T_WRITE_ZEROES, range);
        }
        if let Some(sector) = options.mq_sector {
            self.mq_check(sector);
        }
        if self.device.has(F_FLUSH) {
            let status = self.single(T_FLUSH, 0, 0);
            report!("blk slot={} flush status={status}", self.slot);
        } else {
            report!("blk slot={} flush skipped=no_feature", self.slot);
        }
    }

    fn get_id(&mut self) {
        let status = self.single(T_GET_ID, 0, ID_LEN);
        if status == OK {
            let id = with_data(0, ID_LEN, |data| {
                let mut id = [0u8; ID_LEN];
                id.copy_from_slice(data);
                id
            });
            let len = id.iter().position(|&b| b == 0).unwrap_or(ID_LEN);
            report!("blk slot={} id={}", self.slot, Quoted(&id[..len]));
        } else {
            report!("blk slot={} id status={status}", self.slot);
        }
    }

    fn read_first_page(&mut self) {
        const LEN: usize = 4096;
        let status = self.single(T_IN, 0, LEN);
        if status == OK {
            let hash = with_data(0, LEN, crate::fnv1a64);
            report!(
                "blk slot={} read sector=0 len={LEN} status=ok fnv1a64={hash:#018x}",
                self.slot
            );
        } else {
            report!(
                "blk slot={} read sector=0 len={LEN} status={status}",
                self.slot
            );
        }
    }

    /// Writes [`pattern_byte`] over `range` in chunks, reads it back and
    /// compares; on a read-only device the first write must fail.
    fn write_pattern(&mut self, range: Range) {
        let len = range.count.saturating_mul(SECTOR);
        let chunk = self.request_bytes as u64 / SECTOR;
        let mut hash = FNV_OFFSET_BASIS;
        let mut status = OK;
        let mut sector = range.sector;
        let end = range.sector.saturating_add(range.count);
        while sector < end && status == OK {
            let count = chunk.min(end - sector);
            let bytes = (count * SECTOR) as usize;
            with_data_mut(0, bytes, |data| fill_pattern(data, sector));
            hash = with_data(0, bytes, |data| fnv1a64_update(hash, data));
            status = self.single(T_OUT, sector, bytes);
            sector += count;
        }
        let head = RangeHead(self.slot, "write", range);
        let ro = u8::from(self.ro);
        if status != OK {
            report!("{head} len={len} ro={ro} status={status}");
            return;
        }
        let readback = if self.verify_pattern(range) {
            "ok"
        } else {
            "bad"
        };
        report!("{head} len={len} ro={ro} status=ok fnv1a64={hash:#018x} readback={readback}");
    }

    /// Writes one sector starting with `put.bytes` (then zeroes) and reads
    /// it back.
    fn put_sector(&mut self, put: &Put) {
        let len = SECTOR as usize;
        with_data_mut(0, len, |data| {
            data.fill(0);
            data[..put.len].copy_from_slice(&put.bytes[..put.len]);
        });
        let (slot, sector, bytes) = (self.slot, put.sector, put.len);
        let status = self.single(T_OUT, sector, len);
        if status != OK {
            report!("blk slot={slot} put sector={sector} bytes={bytes} status={status}");
            return;
        }
        let back = self.single(T_IN, sector, len);
        let same = back == OK
            && with_data(0, len, |data| {
                data[..bytes] == put.bytes[..bytes] && data[bytes..].iter().all(|&b| b == 0)
            });
        let readback = if same { "ok" } else { "bad" };
        report!("blk slot={slot} put sector={sector} bytes={bytes} status=ok readback={readback}");
    }

    /// Reads `range` back and checks it holds the pattern.
    fn verify_pattern(&mut self, range: Range) -> bool {
        let chunk = self.request_bytes as u64 / SECTOR;
        let end = range.sector.saturating_add(range.count);
        let mut sector = range.sector;
        while sector < end {
            let count = chunk.min(end - sector);
            let bytes = (count * SECTOR) as usize;
            if self.single(T_IN, sector, bytes) != OK {
                return false;
            }
            let good = with_data(0, bytes, |data| {
                data.chunks(SECTOR as usize)
                    .zip(sector..)
                    .all(|(s, n)| s.iter().enumerate().all(|(i, &b)| b == pattern_byte(n, i)))
            });
            if !good {
                return false;
            }
            sector += count;
        }
        true
    }

    /// DISCARD or WRITE_ZEROES (with unmap) of `range`; a zeroed range is
    /// read back and must be all zero.
    fn discard_or_zero(&mut self, kind: u32, range: Range) {
        let (name, feature, max_cfg) = if kind == T_DISCARD {
            ("discard", F_DISCARD, CFG_MAX_DISCARD_SECTORS)
        } else {
            ("write_zeroes", F_WRITE_ZEROES, CFG_MAX_WRITE_ZEROES_SECTORS)
        };
        let head = RangeHead(self.slot, name, range);
        if !self.device.has(feature) {
            report!("{head} skipped=no_feature");
            return;
        }
        let max = self.device.device_cfg.read32(max_cfg);
        let flags = if kind == T_WRITE_ZEROES {
            WRITE_ZEROES_UNMAP
        } else {
            0
        };
        with_data_mut(0, 16, |data| {
            data[..8].copy_from_slice(&range.sector.to_le_bytes());
            data[8..12]
                .copy_from_slice(&(range.count.min(u64::from(u32::MAX)) as u32).to_le_bytes());
            data[12..16].copy_from_slice(&flags.to_le_bytes());
        });
        let status = self.single(kind, 0, 16);
        if kind == T_DISCARD || status != OK {
            report!("{head} max_sectors={max} status={status}");
            return;
        }
        let zero = self.range_is_zero(range);
        report!(
            "{head} max_sectors={max} unmap=1 status=ok readback={}",
            if zero { "zero" } else { "nonzero" }
        );
    }

    fn range_is_zero(&mut self, range: Range) -> bool {
        let chunk = self.request_bytes as u64 / SECTOR;
        let end = range.sector.saturating_add(range.count);
        let mut sector = range.sector;
        while sector < end {
            let count = chunk.min(end - sector);
            let bytes = (count * SECTOR) as usize;
            if self.single(T_IN, sector, bytes) != OK
                || !with_data(0, bytes, |d| d.iter().all(|&b| b == 0))
            {
                return false;
            }
            sector += count;
        }
        true
    }
}

// Multiqueue.
impl Disk {
    /// Sectors each multiqueue step moves.
    const MQ_SECTORS: u64 = 8;

    /// `probe.blk.mq`: data written through one queue reads back through
    /// the other, one at a time and with both queues in flight.
    fn mq_check(&mut self, sector: u64) {
        let slot = self.slot;
        if self.queue1.is_none() {
            report!("blk slot={slot} mq skipped=single_queue");
            return;
        }
        let len = (Self::MQ_SECTORS * SECTOR) as usize;
        let next = sector + Self::MQ_SECTORS;
        let (w1, r0, m0) = self.mq_round_trip(sector, 1, 0);
        let (w0, r1, m1) = self.mq_round_trip(next, 0, 1);
        report!(
            "blk slot={slot} mq sector={sector} q1_write={w1} q0_read={r0} q0_match={m0} q0_write={w0} q1_read={r1} q1_match={m1}"
        );
        // Both queues in flight: slot 0 on queue 0, slot 1 on queue 1.
        let (a, b) = (next + Self::MQ_SECTORS, next + 2 * Self::MQ_SECTORS);
        with_data_mut(0, len, |data| fill_pattern(data, a));
        with_data_mut(1, len, |data| fill_pattern(data, b));
        let both = self.both_queues(T_OUT, (a, b), len);
        let (_, r1, m1) = self.mq_read_back(a, 1);
        let (_, r0, m0) = self.mq_read_back(b, 0);
        report!(
            "blk slot={slot} mq both_in_flight writes={both} q1_read={r1} q1_match={m1} q0_read={r0} q0_match={m0}"
        );
    }

    /// Writes the pattern at `sector` through queue `write_q` and reads it
    /// back through `read_q`: (write status, read status, match).
    fn mq_round_trip(&mut self, sector: u64, write_q: u16, read_q: u16) -> (Status, Status, u8) {
        let len = (Self::MQ_SECTORS * SECTOR) as usize;
        with_data_mut(0, len, |data| fill_pattern(data, sector));
        let written = self.on_queue(write_q, |disk| disk.single(T_OUT, sector, len));
        let (_, read, matched) = self.mq_read_back(sector, read_q);
        (written, read, matched)
    }

    /// Reads the pattern sectors at `sector` through queue `q` into slot 0
    /// and compares.
    fn mq_read_back(&mut self, sector: u64, q: u16) -> ((), Status, u8) {
        let len = (Self::MQ_SECTORS * SECTOR) as usize;
        with_data_mut(0, len, |data| data.fill(0));
        let read = self.on_queue(q, |disk| disk.single(T_IN, sector, len));
        let matched = with_data(0, len, |data| {
            data.chunks(SECTOR as usize)
                .zip(sector..)
                .all(|(chunk, n)| {
                    chunk
                        .iter()
                        .enumerate()
                        .all(|(i, &b)| b == pattern_byte(n, i))
                })
        });
        ((), read, u8::from(read == OK && matched))
    }

    /// Puts a request in slot 0 on queue 0 and one in slot 1 on queue 1,
    /// kicks both, then waits for both: "ok" when both completed fine.
    fn both_queues(&mut self, kind: u32, (a, b): (u64, u64), len: usize) -> &'static str {
        let first = self.submit(
            0,
            Request {
                kind,
                sector: a,
                len,
            },
        );
        let second = self.on_queue(1, |disk| {
            let sent = disk.submit(
                1,
                Request {
                    kind,
                    sector: b,
                    len,
                },
            );
            disk.queue.kick();
            sent
        });
        self.queue.kick();
        if !(first && second) {
            return "skipped";
        }
        let done0 = self.wait_any() == Some(0) && status_of(0) == OK;
        let done1 = self.on_queue(1, |disk| disk.wait_any()) == Some(1) && status_of(1) == OK;
        if done0 && done1 {
            "ok"
        } else {
            "failed"
        }
    }

    /// Runs `f` with queue `q` (0 or 1) as the disk's queue.
    fn on_queue<T>(&mut self, q: u16, f: impl FnOnce(&mut Disk) -> T) -> T {
        if q == 0 {
            return f(self);
        }
        let mut other = self.queue1.take().expect("queue 1 set up");
        core::mem::swap(&mut self.queue, &mut other);
        let result = f(self);
        core::mem::swap(&mut self.queue, &mut other);
        self.queue1 = Some(other);
        result
    }
}

// The request machinery.
impl Disk {
    /// Sends one request in slot 0 and waits for it.
    fn single(&mut self, kind: u32, sector: u64, len: usize) -> Status {
        if !self.submit(0, Request { kind, sector, len }) {
            return Status::Skipped;
        }
        self.queue.kick();
        match self.wait_any() {
            Some(0) => status_of(0),
            Some(_) => {
                self.fail("completion for an idle slot");
                Status::Skipped
            }
            None => Status::Timeout,
        }
    }

    /// Puts `request` (data in `slot`'s buffer) on the queue, through an
    /// indirect table for every other request when negotiated. False if the
    /// device is broken.
    fn submit(&mut self, slot: usize, request: Request) -> bool {
        if self.broken {
            return false;
        }
        let mem = slot_mem(slot);
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&request.kind.to_le_bytes());
        header[8..].copy_from_slice(&request.sector.to_le_bytes());
        // SAFETY: the slot is idle (the device does not own it): header and
        // status are plain RAM only the probe touches now.
        let (header_addr, status_addr) = unsafe {
            core::ptr::addr_of_mut!((*mem).header).write(header);
            core::ptr::addr_of_mut!((*mem).status).write_volatile(S_PENDING);
            (
                core::ptr::addr_of!((*mem).header) as u64,
                core::ptr::addr_of!((*mem).status) as u64,
            )
        };
        let none = Buf {
            addr: 0,
            len: 0,
            device_writes: false,
        };
        let mut bufs = [none; DESC_PER_SLOT as usize];
        bufs[0] = Buf {
            addr: header_addr,
            len: 16,
            device_writes: false,
        };
        // Data: `mem` starts with the data buffer, cut into segments.
        let device_writes = matches!(request.kind, T_IN | T_GET_ID);
        let len = request.len.min(self.request_bytes);
        let mut count = 1;
        let mut offset = 0;
        while offset < len && count < bufs.len() - 1 {
            let piece = self.seg_bytes.min(len - offset);
            bufs[count] = Buf {
                addr: mem as u64 + offset as u64,
                len: piece as u32,
                device_writes,
            };
            count += 1;
            offset += piece;
        }
        bufs[count] = Buf {
            addr: status_addr,
            len: 1,
            device_writes: true,
        };
        let indirect = self.queue.stats.requests.is_multiple_of(2);
        self.queue.add(slot, &bufs[..=count], indirect);
        self.busy[slot] = true;
        true
    }

    /// Waits (bounded) for the next completion and returns its slot;
    /// `None` on timeout or a bogus completion (the device is then broken).
    fn wait_any(&mut self) -> Option<usize> {
        let start = io::rdtsc();
        let deadline = REQUEST_TIMEOUT_US.saturating_mul(self.tsc_mhz);
        for _ in 0..REQUEST_MAX_POLLS {
            if let Some(used) = self.queue.take_used() {
                return match used.slot {
                    Some(slot) if self.busy[slot] => {
                        self.busy[slot] = false;
                        Some(slot)
                    }
                    _ => {
                        self.fail("bogus used element");
                        None
                    }
                };
            }
            if io::rdtsc().wrapping_sub(start) > deadline {
                break;
            }
            core::hint::spin_loop();
        }
        self.fail("request timeout");
        None
    }

    fn fail(&mut self, why: &str) {
        if !self.broken {
            report!("blk slot={} broken reason=\"{why}\"", self.slot);
        }
        self.broken = true;
    }
}

/// Raw pointer to `slot`'s memory.
fn slot_mem(slot: usize) -> *mut SlotMem {
    // SAFETY: only the address is taken (no reference); `slot` is below
    // MAX_SLOTS because slots come from `Queue::slots`.
    unsafe { core::ptr::addr_of_mut!(SLOTS[slot % MAX_SLOTS]) }
}

/// The status byte the device wrote into `slot`.
fn status_of(slot: usize) -> Status {
    // SAFETY: the device has completed the slot's request; volatile because
    // the device wrote it.
    let byte = unsafe { core::ptr::addr_of!((*slot_mem(slot)).status).read_volatile() };
    Status::Device(byte)
}

/// Runs `f` on the first `len` data bytes of idle `slot`.
fn with_data<T>(slot: usize, len: usize, f: impl FnOnce(&[u8]) -> T) -> T {
    // SAFETY: the slot is idle: the device finished with it (completion
    // seen after an acquire fence) and holds no reference to it.
    let data = unsafe { &(*slot_mem(slot)).data };
    f(&data[..len.min(DATA_BYTES)])
}

/// Runs `f` on the first `len` data bytes of idle `slot`, for writing.
fn with_data_mut<T>(slot: usize, len: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
    // SAFETY: as for `with_data`; no other reference to the slot exists.
    let data = unsafe { &mut (*slot_mem(slot)).data };
    f(&mut data[..len.min(DATA_BYTES)])
}

/// Fills `data` with the pattern of the sectors starting at `sector`.
fn fill_pattern(data: &mut [u8], sector: u64) {
    for (chunk, n) in data.chunks_mut(SECTOR as usize).zip(sector..) {
        for (i, byte) in chunk.iter_mut().enumerate() {
            *byte = pattern_byte(n, i);
        }
    }
}

/// `blk slot=N NAME sector=S count=C`.
struct RangeHead(SlotLabel, &'static str, Range);

impl core::fmt::Display for RangeHead {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let RangeHead(slot, name, range) = self;
        write!(
            f,
            "blk slot={slot} {name} sector={} count={}",
            range.sector, range.count
        )
    }
}

/// The device configuration fields the probe uses.
struct BlkConfig {
    capacity: u64,
    size_max: u32,
    seg_max: u32,
    blk_size: u32,
}

/// Reads the configuration consistently (generation unchanged across).
fn read_config(device: &Device) -> BlkConfig {
    let cfg = device.device_cfg;
    let read = || BlkConfig {
        capacity: u64::from(cfg.read32(CFG_CAPACITY))
            | u64::from(cfg.read32(CFG_CAPACITY + 4)) << 32,
        size_max: cfg.read32(CFG_SIZE_MAX),
        seg_max: cfg.read32(CFG_SEG_MAX),
        blk_size: cfg.read32(CFG_BLK_SIZE),
    };
    let mut config = read();
    for _ in 0..8 {
        let before = device.config_generation();
        config = read();
        if device.config_generation() == before {
            break;
        }
    }
    config
}

// The benchmark.
impl Disk {
    /// Sequential read and (if writable) write of `mib` MiB from sector 0
    /// with the largest requests, all slots in flight, then
    /// [`BENCH_RANDOM_READS`] random 4 KiB reads in that range.
    fn bench(&mut self, mib: u64) {
        io::report_tsc_khz();
        let chunk = self.request_bytes as u64 / SECTOR;
        let sectors = mib.saturating_mul(2048).min(self.capacity) / chunk * chunk;
        let requests = sectors / chunk;
        report!(
            "blk bench slot={} mib={mib} sectors={sectors} request_bytes={} depth={}",
            self.slot,
            self.request_bytes,
            self.queue.slots()
        );
        let (kind_len, bytes) = ((chunk * SECTOR) as usize, sectors * SECTOR);
        let sequential = |i: u64| (i * chunk, kind_len);
        match self.stream(T_IN, requests, sequential) {
            Ok(cycles) => report!("blk bench seq_read_bytes={bytes} tsc_cycles={cycles}"),
            Err(status) => report!("blk bench seq_read status={status}"),
        }
        if self.ro {
            report!("blk bench seq_write skipped=ro");
        } else {
            for slot in 0..self.queue.slots() {
                with_data_mut(slot, kind_len, |data| fill_pattern(data, 0));
            }
            match self.stream(T_OUT, requests, sequential) {
                Ok(cycles) => report!("blk bench seq_write_bytes={bytes} tsc_cycles={cycles}"),
                Err(status) => report!("blk bench seq_write status={status}"),
            }
        }
        let pages = (sectors / 8).max(1);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let random = move |_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state % pages) * 8, 4096)
        };
        match self.stream(T_IN, BENCH_RANDOM_READS, random) {
            Ok(cycles) => {
                report!("blk bench randread_ops={BENCH_RANDOM_READS} tsc_cycles={cycles}")
            }
            Err(status) => report!("blk bench randread status={status}"),
        }
    }

    /// Runs `count` requests of `kind` (`next(i)` gives sector and length)
    /// with every slot in flight; returns the TSC cycles taken. On a failed
    /// request the others still in flight are waited for.
    fn stream(
        &mut self,
        kind: u32,
        count: u64,
        next: impl FnMut(u64) -> (u64, usize),
    ) -> Result<u64, Status> {
        let start = io::rdtsc();
        let result = self.pipeline(kind, count, next);
        while self.busy.iter().any(|&b| b) && self.wait_any().is_some() {}
        result.map(|()| io::rdtsc().wrapping_sub(start))
    }

    fn pipeline(
        &mut self,
        kind: u32,
        count: u64,
        mut next: impl FnMut(u64) -> (u64, usize),
    ) -> Result<(), Status> {
        let (mut issued, mut done) = (0, 0);
        while done < count {
            let mut added = false;
            for slot in 0..self.queue.slots() {
                if issued < count && !self.busy[slot] {
                    let (sector, len) = next(issued);
                    if !self.submit(slot, Request { kind, sector, len }) {
                        return Err(Status::Skipped);
                    }
                    issued += 1;
                    added = true;
                }
            }
            if added {
                self.queue.kick();
            }
            let slot = self.wait_any().ok_or(Status::Timeout)?;
            let status = status_of(slot);
            if status != OK {
                return Err(status);
            }
            done += 1;
        }
        Ok(())
    }
}
