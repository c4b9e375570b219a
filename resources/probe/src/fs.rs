//! virtio-fs over virtio-pci: for every modern virtio-fs function on bus 0
//! (1af4:105a), reads the tag and `num_request_queues` from the device
//! configuration, sets up the hiprio queue (0) and the first request
//! queue (1), and opens a FUSE session ([`Session`]) on it: FUSE_INIT,
//! then whatever [`crate::fstest`] runs (the `probe.fs.*` options: a root
//! listing always, file checks and the benchmark on the first device
//! only), then FORGET for every node looked up (hiprio queue), DESTROY,
//! and a device reset.
//!
//! A request is a device-readable `fuse_in_header` plus arguments (plus
//! WRITE data in a descriptor of its own), then a device-writable
//! `fuse_out_header` plus reply (READ data in a descriptor of its own).
//! Every reply header is checked (its `unique`, length and errno); a
//! request that gets no answer within `probe.fs.wait` milliseconds, a
//! bogus used element or a malformed reply leaves the device alone
//! (`broken`): later requests are skipped, so a stalled device never
//! hangs the probe.

use crate::fuse::{self, op, OutHeader, IN_HEADER_LEN, OUT_HEADER_LEN};
use crate::pci::{Config, Function, Pci, SlotLabel};
use crate::serial::Quoted;
use crate::virtio::{self, Buf, Device, Queue};
use crate::{fstest, io, report};

/// PCI device ID of a modern virtio-fs function (0x1040 + 26).
pub const DEVICE_ID: u16 = 0x105a;
/// Bytes of the tag in the device configuration.
const TAG_LEN: usize = 36;
const CFG_NUM_REQUEST_QUEUES: u64 = 36;
/// Configuration bytes the probe reads (tag and queue count).
const CFG_LEN: u32 = 40;
const HIPRIO_QUEUE: u16 = 0;
const REQUEST_QUEUE: u16 = 1;
/// Descriptors per request: in header + args, WRITE data, out header +
/// reply, READ data.
const DESC_PER_SLOT: u16 = 4;
/// Requests in flight at most (the request queue has 64 / 4 = 16 slots).
pub const MAX_SLOTS: usize = 8;
/// Bytes of a request's header and arguments (names included).
pub const IN_BYTES: usize = 1024;
/// Bytes of a reply held in the slot (READ data goes elsewhere).
pub const OUT_BYTES: usize = 4096 + OUT_HEADER_LEN;
/// Bytes of the shared data area for READ and WRITE payloads.
pub const DATA_BYTES: usize = 1 << 20;
/// Forgets in flight on the hiprio queue at most.
const HIPRIO_SLOTS: usize = 8;
/// Nodes whose lookups the session tracks (for FORGET).
const MAX_NODES: usize = 64;
/// Default request time limit (`probe.fs.wait`, milliseconds).
pub const DEFAULT_WAIT_MS: u64 = 5000;
/// `FUSE_INIT` flags asked for.
const INIT_FLAGS: u32 = fuse::init_flag::ASYNC_READ
    | fuse::init_flag::BIG_WRITES
    | fuse::init_flag::DO_READDIRPLUS
    | fuse::init_flag::MAX_PAGES;
/// Read-ahead offered in FUSE_INIT.
const MAX_READAHEAD: u32 = 128 * 1024;

/// Memory of one request slot.
#[repr(C, align(4096))]
struct SlotMem {
    output: [u8; OUT_BYTES],
    input: [u8; IN_BYTES],
}

const EMPTY_SLOT: SlotMem = SlotMem {
    output: [0; OUT_BYTES],
    input: [0; IN_BYTES],
};

#[repr(C, align(4096))]
struct DataMem([u8; DATA_BYTES]);

#[repr(C, align(64))]
struct ForgetMem([[u8; IN_HEADER_LEN + 8]; HIPRIO_SLOTS]);

static mut SLOTS: [SlotMem; MAX_SLOTS] = [EMPTY_SLOT; MAX_SLOTS];
static mut DATA: DataMem = DataMem([0; DATA_BYTES]);
static mut FORGETS: ForgetMem = ForgetMem([[0; IN_HEADER_LEN + 8]; HIPRIO_SLOTS]);

/// Drives every virtio-fs function on bus 0; the first one runs the
/// checks and the benchmark the command line asks for.
pub fn run(pci: &Pci, cmdline: &[u8]) {
    let options = fstest::Options::parse(cmdline);
    let mut first = true;
    let mut found = 0;
    for function in pci.functions() {
        if function.vendor == virtio::VENDOR_ID && function.device == DEVICE_ID {
            found += 1;
            drive(&pci.config, function, &options, core::mem::take(&mut first));
        }
    }
    if found == 0 && options.wants_session() {
        report!("fs checks skipped=no_device");
    }
    report!("fs devices={found}");
}

/// Sets one device up, runs the session, resets it.
fn drive(config: &Config, function: &Function, options: &fstest::Options, first: bool) {
    let slot = function.bdf.label();
    let device = match Device::init(config, function, 0) {
        Ok(device) => device,
        Err(err) => {
            report!("fs slot={slot} error {err}");
            return;
        }
    };
    let mut session = match Session::new(device, options.wait_ms) {
        Ok(session) => session,
        Err(err) => {
            report!("fs slot={slot} error {err}");
            return;
        }
    };
    if session.init() {
        fstest::run(&mut session, options, first);
    }
    session.finish();
}

/// How a request ended.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The server answered without error.
    Ok,
    /// The server answered with this errno.
    Errno(u32),
    /// No answer within the time limit.
    Timeout,
    /// Not sent: the device is broken.
    Skipped,
    /// The answer was malformed (the device is then broken).
    BadReply,
}

impl Status {
    /// Whether the request succeeded.
    pub fn ok(self) -> bool {
        self == Status::Ok
    }
}

impl core::fmt::Display for Status {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Status::Ok => f.write_str("0"),
            Status::Errno(n) => write!(f, "{n}"),
            Status::Timeout => f.write_str("timeout"),
            Status::Skipped => f.write_str("skipped"),
            Status::BadReply => f.write_str("bad_reply"),
        }
    }
}

/// One FUSE request: its opcode and node, argument pieces (concatenated
/// after the in header), and where bulk data goes.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    /// `FUSE_*` opcode.
    pub opcode: u32,
    /// The node it is about.
    pub nodeid: u64,
    /// Argument structures and NUL-terminated names, in order.
    pub args: &'a [&'a [u8]],
    /// WRITE data: offset and length in the data area.
    pub write: Option<(usize, usize)>,
    /// READ data: offset and length in the data area.
    pub read: Option<(usize, usize)>,
    /// Reply bytes expected after the out header (ignored with `read`).
    pub reply_len: usize,
}

impl<'a> Request<'a> {
    /// A request with arguments and a reply of `reply_len` bytes.
    pub fn new(opcode: u32, nodeid: u64, args: &'a [&'a [u8]], reply_len: usize) -> Self {
        Request {
            opcode,
            nodeid,
            args,
            write: None,
            read: None,
            reply_len,
        }
    }
}

/// Counters of a session.
#[derive(Clone, Copy, Default)]
pub struct SessionStats {
    /// Requests answered.
    pub replies: u64,
    /// Of those, with an errno.
    pub errors: u64,
    /// FORGETs sent on the hiprio queue.
    pub forgets: u64,
}

/// A FUSE session on one virtio-fs device.
pub struct Session {
    device: Device,
    hiprio: Queue,
    requests: Queue,
    /// This device's PCI slot.
    pub slot: SlotLabel,
    next_unique: u64,
    /// The `unique` each busy slot waits for.
    busy: [Option<u64>; MAX_SLOTS],
    /// Body bytes (after the out header) of each slot's last reply.
    reply_len: [usize; MAX_SLOTS],
    /// Writable body bytes each busy slot's request offered.
    capacity: [usize; MAX_SLOTS],
    hiprio_busy: [bool; HIPRIO_SLOTS],
    /// Node IDs and their lookup counts, for FORGET.
    nodes: [(u64, u64); MAX_NODES],
    /// Lookups beyond [`MAX_NODES`] nodes (never forgotten).
    untracked: u64,
    broken: bool,
    deadline_ticks: u64,
    /// What FUSE_INIT negotiated.
    pub init: fuse::InitOut,
    /// Counters.
    pub stats: SessionStats,
}

impl Session {
    /// Reports the configuration, sets up both queues, sets DRIVER_OK.
    fn new(mut device: Device, wait_ms: u64) -> Result<Session, virtio::VirtioError> {
        let slot = device.bdf.label();
        if device.device_cfg_len < CFG_LEN {
            return Err(virtio::VirtioError::BadCapability("device"));
        }
        let (tag, queues) = read_config(&device);
        let tag_len = tag.iter().position(|&b| b == 0).unwrap_or(TAG_LEN);
        report!(
            "fs slot={slot} tag={} num_request_queues={queues} features={:#x} negotiated={:#x} event_idx={} indirect={}",
            Quoted(&tag[..tag_len]),
            device.offered,
            device.negotiated,
            u8::from(device.has(virtio::F_EVENT_IDX)),
            u8::from(device.has(virtio::F_INDIRECT_DESC)),
        );
        let queues = match queues {
            0 => Err(virtio::VirtioError::QueueIndex(REQUEST_QUEUE)),
            _ => device
                .setup_queue(HIPRIO_QUEUE, 1)
                .and_then(|hiprio| Ok((hiprio, device.setup_queue(REQUEST_QUEUE, DESC_PER_SLOT)?))),
        };
        let (hiprio, requests) = match queues {
            Ok(queues) => queues,
            Err(err) => {
                // Leave the device as found: nothing was made available.
                device.reset();
                return Err(err);
            }
        };
        device.driver_ok();
        Ok(Session {
            device,
            hiprio,
            requests,
            slot,
            next_unique: 1,
            busy: [None; MAX_SLOTS],
            reply_len: [0; MAX_SLOTS],
            capacity: [0; MAX_SLOTS],
            hiprio_busy: [false; HIPRIO_SLOTS],
            nodes: [(0, 0); MAX_NODES],
            untracked: 0,
            broken: false,
            deadline_ticks: wait_ms.saturating_mul(1000).saturating_mul(io::tsc_mhz()),
            init: fuse::InitOut::default(),
            stats: SessionStats::default(),
        })
    }

    /// Request slots usable at once.
    pub fn slots(&self) -> usize {
        self.requests.slots().min(MAX_SLOTS)
    }

    /// Whether the device misbehaved and is left alone.
    pub fn broken(&self) -> bool {
        self.broken
    }

    /// FUSE_INIT; reports what the server answered. False if the session
    /// cannot go on.
    fn init(&mut self) -> bool {
        let args = fuse::init_in(MAX_READAHEAD, INIT_FLAGS);
        let status = self.call(&Request::new(op::INIT, 0, &[&args], fuse::INIT_OUT_LEN));
        if !status.ok() {
            report!("fs init errno={status}");
            return false;
        }
        let init = fuse::InitOut::parse(self.reply(0));
        self.init = init;
        report!(
            "fs init errno=0 major={} minor={} max_write={} max_pages={} max_readahead={} max_background={} time_gran={} flags={:#x} flags2={:#x} asked={INIT_FLAGS:#x} reply_len={}",
            init.major,
            init.minor,
            init.max_write,
            init.max_pages,
            init.max_readahead,
            init.max_background,
            init.time_gran,
            init.flags,
            init.flags2,
            self.reply_len[0]
        );
        init.major == fuse::MAJOR
    }

    /// Sends `request` in slot 0 and waits for its answer.
    pub fn call(&mut self, request: &Request) -> Status {
        if !self.submit(0, request) {
            return Status::Skipped;
        }
        self.kick();
        match self.wait_any() {
            Some((0, status)) => status,
            Some(_) => {
                self.fail("completion for an idle slot");
                Status::BadReply
            }
            None if self.broken => Status::Timeout,
            None => Status::Skipped,
        }
    }

    /// Puts `request` in idle `slot` (through an indirect table every
    /// other time, when negotiated); the device sees it at [`Session::kick`].
    /// False if the device is broken or the request does not fit.
    pub fn submit(&mut self, slot: usize, request: &Request) -> bool {
        if self.broken || slot >= MAX_SLOTS || self.busy[slot].is_some() {
            return false;
        }
        let unique = self.next_unique;
        let mem = slot_mem(slot);
        let Some(in_len) = write_input(mem, request, unique) else {
            report!("fs request too_large opcode={}", request.opcode);
            return false;
        };
        let data = data_addr();
        let (out_addr, in_addr) = (
            // SAFETY: only addresses are taken.
            unsafe { core::ptr::addr_of!((*mem).output) } as u64,
            // SAFETY: as above.
            unsafe { core::ptr::addr_of!((*mem).input) } as u64,
        );
        let buf = |addr, len: usize, device_writes| Buf {
            addr,
            len: len as u32,
            device_writes,
        };
        let mut bufs = [buf(0, 0, false); DESC_PER_SLOT as usize];
        let mut count = 0;
        let mut push = |b: Buf| {
            bufs[count] = b;
            count += 1;
        };
        push(buf(in_addr, in_len, false));
        if let Some((off, len)) = request.write.filter(|&(o, l)| fits(o, l)) {
            push(buf(data + off as u64, len, false));
        }
        let capacity = match request.read.filter(|&(o, l)| fits(o, l)) {
            Some((off, len)) => {
                push(buf(out_addr, OUT_HEADER_LEN, true));
                push(buf(data + off as u64, len, true));
                len
            }
            None => {
                let len = request.reply_len.min(OUT_BYTES - OUT_HEADER_LEN);
                push(buf(out_addr, OUT_HEADER_LEN + len, true));
                len
            }
        };
        let no_reply = matches!(request.opcode, op::DESTROY);
        // The out header is preset so a reply the device never wrote shows.
        // SAFETY: the slot is idle: nothing but the probe touches it now.
        unsafe { (&mut (*mem).output)[..OUT_HEADER_LEN].fill(0xff) };
        let indirect = self.requests.stats.requests.is_multiple_of(2);
        self.requests.add(slot, &bufs[..count], indirect);
        self.next_unique += 1;
        self.busy[slot] = Some(if no_reply { 0 } else { unique });
        self.capacity[slot] = capacity;
        true
    }

    /// Notifies the device of submitted requests.
    pub fn kick(&mut self) {
        self.requests.kick();
    }

    /// Waits (bounded) for the next answer: its slot and status. `None`
    /// when nothing is in flight or the device broke (timeout, bogus used
    /// element).
    pub fn wait_any(&mut self) -> Option<(usize, Status)> {
        if self.broken || self.busy.iter().all(Option::is_none) {
            return None;
        }
        let start = io::rdtsc();
        loop {
            if let Some(used) = self.requests.take_used() {
                return self.complete(used);
            }
            if io::rdtsc().wrapping_sub(start) > self.deadline_ticks {
                self.fail("request timeout");
                return None;
            }
            core::hint::spin_loop();
        }
    }

    /// Checks one used element against its slot's request.
    fn complete(&mut self, used: virtio::Used) -> Option<(usize, Status)> {
        let Some(slot) = used.slot.filter(|&s| s < MAX_SLOTS) else {
            self.fail("bogus used element");
            return None;
        };
        let Some(unique) = self.busy[slot].take() else {
            self.fail("completion for an idle slot");
            return None;
        };
        self.reply_len[slot] = 0;
        if unique == 0 {
            // DESTROY: the server sends no reply.
            return Some((slot, Status::Ok));
        }
        // SAFETY: the device completed the slot; volatile because it wrote it.
        let header: [u8; OUT_HEADER_LEN] = unsafe {
            core::ptr::read_volatile(core::ptr::addr_of!((*slot_mem(slot)).output).cast())
        };
        let out = OutHeader::parse(&header);
        let body = (out.len as usize).wrapping_sub(OUT_HEADER_LEN);
        let problem = if out.unique != unique {
            Some("unique")
        } else if (out.len as usize) < OUT_HEADER_LEN || body > self.capacity[slot] {
            Some("len")
        } else if used.len < out.len {
            Some("used_len")
        } else if out.error > 0 || out.error < -4095 || (out.error != 0 && body != 0) {
            Some("error")
        } else {
            None
        };
        if let Some(what) = problem {
            report!(
                "fs bad_reply field={what} len={} error={} unique={} expected_unique={unique} used_len={}",
                out.len,
                out.error,
                out.unique,
                used.len
            );
            self.fail("malformed reply");
            return Some((slot, Status::BadReply));
        }
        self.stats.replies += 1;
        self.reply_len[slot] = body;
        if out.error != 0 {
            self.stats.errors += 1;
            return Some((slot, Status::Errno(out.error.unsigned_abs())));
        }
        Some((slot, Status::Ok))
    }

    /// Whether `slot` has a request in flight.
    pub fn slot_busy(&self, slot: usize) -> bool {
        self.busy.get(slot).is_none_or(Option::is_some)
    }

    /// Body bytes (after the out header) of `slot`'s last reply: for a
    /// READ, the bytes read.
    pub fn reply_len(&self, slot: usize) -> usize {
        self.reply_len.get(slot).copied().unwrap_or(0)
    }

    /// The body of `slot`'s last reply (after the out header; READ data is
    /// in the data area instead).
    pub fn reply(&self, slot: usize) -> &[u8] {
        let len = self.reply_len[slot % MAX_SLOTS].min(OUT_BYTES - OUT_HEADER_LEN);
        // SAFETY: the slot is idle (its answer was taken); the device
        // finished writing it before the used element (acquire fence).
        let output = unsafe { &(*slot_mem(slot % MAX_SLOTS)).output };
        &output[OUT_HEADER_LEN..OUT_HEADER_LEN + len]
    }

    /// Records one more lookup of `nodeid` (a LOOKUP, CREATE, MKDIR or
    /// READDIRPLUS entry), to be forgotten at the end.
    pub fn note_lookup(&mut self, nodeid: u64) {
        if nodeid == 0 || nodeid == fuse::ROOT_ID {
            return;
        }
        let found = self.nodes.iter().position(|&(id, _)| id == nodeid);
        let free = self.nodes.iter().position(|&(id, _)| id == 0);
        match found.or(free) {
            Some(i) => self.nodes[i] = (nodeid, self.nodes[i].1 + 1),
            None => self.untracked += 1,
        }
    }

    /// Sends FORGET for every tracked node on the hiprio queue (no reply;
    /// the device only returns the buffers) and reports the count.
    fn forget_all(&mut self) {
        let (mut nodes, mut lookups) = (0, 0);
        for i in 0..MAX_NODES {
            let (nodeid, count) = self.nodes[i];
            if nodeid == 0 || self.broken {
                continue;
            }
            let Some(slot) = self.hiprio_slot() else {
                break;
            };
            self.send_forget(slot, nodeid, count);
            self.nodes[i] = (0, 0);
            nodes += 1;
            lookups += count;
        }
        if nodes > 0 {
            self.hiprio.kick();
        }
        let returned = self.drain_hiprio();
        report!(
            "fs forget nodes={nodes} lookups={lookups} returned={returned} untracked={} notifies={} suppressed={}",
            self.untracked,
            self.hiprio.stats.notifies,
            self.hiprio.stats.suppressed
        );
    }

    /// An idle hiprio slot, reclaiming returned ones (bounded wait).
    fn hiprio_slot(&mut self) -> Option<usize> {
        let start = io::rdtsc();
        loop {
            self.reclaim_hiprio();
            if let Some(slot) = self.hiprio_busy.iter().position(|&b| !b) {
                return Some(slot);
            }
            self.hiprio.kick();
            if io::rdtsc().wrapping_sub(start) > self.deadline_ticks {
                self.fail("hiprio timeout");
                return None;
            }
            core::hint::spin_loop();
        }
    }

    fn send_forget(&mut self, slot: usize, nodeid: u64, nlookup: u64) {
        let unique = self.next_unique;
        self.next_unique += 1;
        // SAFETY: the hiprio slot is idle (returned or never used) and
        // only the probe writes it.
        let bytes = unsafe { &mut (*core::ptr::addr_of_mut!(FORGETS)).0[slot] };
        let len = bytes.len();
        fuse::write_in_header(bytes, len as u32, op::FORGET, unique, nodeid);
        bytes[IN_HEADER_LEN..].copy_from_slice(&fuse::forget_in(nlookup));
        let buf = Buf {
            addr: bytes.as_ptr() as u64,
            len: len as u32,
            device_writes: false,
        };
        self.hiprio.add(slot, &[buf], false);
        self.hiprio_busy[slot] = true;
        self.stats.forgets += 1;
    }

    fn reclaim_hiprio(&mut self) -> u64 {
        let mut returned = 0;
        while let Some(used) = self.hiprio.take_used() {
            match used
                .slot
                .filter(|&s| s < HIPRIO_SLOTS && self.hiprio_busy[s])
            {
                Some(slot) => {
                    self.hiprio_busy[slot] = false;
                    returned += 1;
                }
                None => {
                    self.fail("bogus hiprio used element");
                    break;
                }
            }
        }
        returned
    }

    /// Waits (bounded) until the device has returned every FORGET; how
    /// many it returned.
    fn drain_hiprio(&mut self) -> u64 {
        let start = io::rdtsc();
        let mut returned = 0;
        while !self.broken && self.hiprio_busy.iter().any(|&b| b) {
            returned += self.reclaim_hiprio();
            if io::rdtsc().wrapping_sub(start) > self.deadline_ticks {
                self.fail("hiprio timeout");
            }
            core::hint::spin_loop();
        }
        returned
    }

    fn fail(&mut self, why: &str) {
        if !self.broken {
            report!("fs slot={} broken reason=\"{why}\"", self.slot);
        }
        self.broken = true;
    }

    /// FORGETs, DESTROY, counters, reset.
    fn finish(mut self) {
        self.forget_all();
        let status = self.call(&Request::new(op::DESTROY, 0, &[], 0));
        report!("fs op=destroy errno={status}");
        let (q, s) = (self.requests.stats, self.stats);
        report!(
            "fs slot={} requests={} replies={} errors={} forgets={} indirect={} notifies={} suppressed={}",
            self.slot,
            q.requests,
            s.replies,
            s.errors,
            s.forgets,
            q.indirect,
            q.notifies,
            q.suppressed
        );
        let reset = if self.device.reset() { "ok" } else { "timeout" };
        report!("fs slot={} reset={reset}", self.slot);
    }
}

/// Whether `(offset, len)` lies inside the data area.
fn fits(offset: usize, len: usize) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= DATA_BYTES)
}

/// Writes the in header and the arguments into `mem`'s input buffer;
/// returns the device-readable length there (`None` if it does not fit).
fn write_input(mem: *mut SlotMem, request: &Request, unique: u64) -> Option<usize> {
    let args_len: usize = request.args.iter().map(|a| a.len()).sum();
    let in_len = IN_HEADER_LEN + args_len;
    if in_len > IN_BYTES {
        return None;
    }
    let write_len = request.write.map_or(0, |(_, len)| len);
    // SAFETY: the slot is idle (checked by the caller): no other reference
    // to its input exists and the device does not read it until kicked.
    let input = unsafe { &mut (*mem).input };
    fuse::write_in_header(
        input,
        (in_len + write_len) as u32,
        request.opcode,
        unique,
        request.nodeid,
    );
    let mut at = IN_HEADER_LEN;
    for arg in request.args {
        input[at..at + arg.len()].copy_from_slice(arg);
        at += arg.len();
    }
    Some(in_len)
}

/// Raw pointer to `slot`'s memory.
fn slot_mem(slot: usize) -> *mut SlotMem {
    // SAFETY: only the address is taken; `slot % MAX_SLOTS` is in range.
    unsafe { core::ptr::addr_of_mut!(SLOTS[slot % MAX_SLOTS]) }
}

/// Physical address of the data area.
fn data_addr() -> u64 {
    core::ptr::addr_of!(DATA) as u64
}

/// Runs `f` on `len` bytes of the data area from `offset` (clamped), for
/// reading what READs brought in.
pub fn with_data<T>(offset: usize, len: usize, f: impl FnOnce(&[u8]) -> T) -> T {
    let start = offset.min(DATA_BYTES);
    let end = start.saturating_add(len).min(DATA_BYTES);
    // SAFETY: callers use this only between requests (nothing in flight
    // targets the data area), so the device does not write it meanwhile.
    let data = unsafe { &(*core::ptr::addr_of!(DATA)).0 };
    f(&data[start..end])
}

/// Runs `f` on `len` bytes of the data area from `offset` (clamped), for
/// filling what WRITEs send.
pub fn with_data_mut<T>(offset: usize, len: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
    let start = offset.min(DATA_BYTES);
    let end = start.saturating_add(len).min(DATA_BYTES);
    // SAFETY: as for `with_data`; no other reference to the area exists.
    let data = unsafe { &mut (*core::ptr::addr_of_mut!(DATA)).0 };
    f(&mut data[start..end])
}

/// Tag and `num_request_queues`, read consistently.
fn read_config(device: &Device) -> ([u8; TAG_LEN], u32) {
    let cfg = device.device_cfg;
    let read = || {
        let mut tag = [0u8; TAG_LEN];
        for (i, byte) in tag.iter_mut().enumerate() {
            *byte = cfg.read8(i as u64);
        }
        (tag, cfg.read32(CFG_NUM_REQUEST_QUEUES))
    };
    let mut value = read();
    for _ in 0..8 {
        let before = device.config_generation();
        value = read();
        if device.config_generation() == before {
            break;
        }
    }
    value
}
