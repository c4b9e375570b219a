//! The virtio-fs benchmark (`probe.fs.bench=MIB`, first device only):
//! GETATTR round trips one after the other, then a sequential WRITE pass
//! and a sequential READ pass over one file with several requests in
//! flight. Each phase is announced (`fs bench phase=NAME start`) before it
//! starts, so a host watching the console can read its clocks, and
//! reported with its TSC cycles afterwards.

use crate::fs::{self, Request, Session, Status, DATA_BYTES};
use crate::fstest::{create, fill_pattern, getattr, release};
use crate::fuse::{self, op, ROOT_ID};
use crate::serial::Quoted;
use crate::{io, report};

/// The benchmark's file, in the root directory.
pub const BENCH_FILE: &[u8] = b"probe-bench.bin";
const O_TRUNC: u32 = 0o1000;

/// What the command line sets (`probe.fs.getattrs`, `.chunk`, `.depth`).
pub struct BenchOptions {
    /// GETATTR round trips.
    pub getattrs: u64,
    /// Request size asked for, KiB.
    pub chunk_kib: usize,
    /// Requests in flight.
    pub depth: usize,
}

/// Benchmark request size: the option, clamped to what the server takes
/// and the probe's buffers hold, whole pages.
fn bench_chunk(session: &Session, options: &BenchOptions) -> usize {
    let init = session.init;
    let mut chunk = options.chunk_kib.saturating_mul(1024);
    if init.max_write != 0 {
        chunk = chunk.min(init.max_write as usize);
    }
    if init.flags & fuse::init_flag::MAX_PAGES != 0 && init.max_pages != 0 {
        chunk = chunk.min(usize::from(init.max_pages) * 4096);
    }
    (chunk.min(DATA_BYTES / options.depth) / 4096 * 4096).max(4096)
}

/// GETATTR round trips, then sequential WRITE and READ of `mib` MiB of
/// [`BENCH_FILE`]; each phase is announced (`phase=... start`) so the host
/// can read its clocks, and reported with its TSC cycles.
pub fn run(session: &mut Session, options: &BenchOptions, mib: u64) {
    io::report_tsc_khz();
    let depth = options.depth.min(session.slots()).max(1);
    let chunk = bench_chunk(session, options);
    let bytes = mib.saturating_mul(1 << 20) / chunk as u64 * chunk as u64;
    let requests = bytes / chunk as u64;
    report!(
        "fs bench file={} mib={mib} bytes={bytes} chunk={chunk} depth={depth} getattrs={}",
        Quoted(BENCH_FILE),
        options.getattrs
    );
    let flags = fuse::O_RDWR | fuse::O_CREAT | O_TRUNC;
    let (status, entry, fh) = create(session, BENCH_FILE, flags);
    if !status.ok() {
        report!("fs bench create errno={status}");
        return;
    }
    let node = entry.nodeid;
    report!("fs bench phase=getattr start");
    let (status, ops, cycles) = getattr_loop(session, node, options.getattrs);
    report!("fs bench getattr ops={ops} tsc_cycles={cycles} errno={status}");
    for slot in 0..depth {
        fs::with_data_mut(slot * chunk, chunk, |data| fill_pattern(data, 0));
    }
    let stream = Stream {
        node,
        fh,
        chunk,
        depth,
        requests,
    };
    for (name, opcode) in [("write", op::WRITE), ("read", op::READ)] {
        report!("fs bench phase={name} start");
        let (status, moved, cycles) = stream.run(session, opcode);
        report!(
            "fs bench {name} bytes={moved} requests={requests} tsc_cycles={cycles} errno={status}"
        );
        if opcode == op::WRITE {
            let args = fuse::fsync_in(fh);
            let start = io::rdtsc();
            let status = session.call(&Request::new(op::FSYNC, node, &[&args], 0));
            let cycles = io::rdtsc().wrapping_sub(start);
            report!("fs bench fsync tsc_cycles={cycles} errno={status}");
        }
    }
    release(session, op::RELEASE, node, fh, fuse::O_RDWR);
    let status = session.call(&Request::new(op::UNLINK, ROOT_ID, &[BENCH_FILE, b"\0"], 0));
    report!("fs bench unlink errno={status}");
}

/// `count` GETATTRs one after the other: the first error, the GETATTRs
/// answered without error, the cycles.
fn getattr_loop(session: &mut Session, node: u64, count: u64) -> (Status, u64, u64) {
    let start = io::rdtsc();
    for done in 0..count {
        let (status, _) = getattr(session, node);
        if !status.ok() {
            return (status, done, io::rdtsc().wrapping_sub(start));
        }
    }
    (Status::Ok, count, io::rdtsc().wrapping_sub(start))
}

/// A sequential WRITE or READ pass over the benchmark file.
struct Stream {
    node: u64,
    fh: u64,
    chunk: usize,
    depth: usize,
    requests: u64,
}

impl Stream {
    /// `requests` requests of `chunk` bytes with `depth` in flight (slot
    /// `k` uses the data area at `k * chunk`): first error, bytes moved,
    /// TSC cycles from the first submission to the last answer.
    fn run(&self, session: &mut Session, opcode: u32) -> (Status, u64, u64) {
        let start = io::rdtsc();
        let (mut issued, mut done, mut moved) = (0u64, 0u64, 0u64);
        let mut status = Status::Ok;
        while done < issued || (issued < self.requests && status.ok()) {
            let mut added = false;
            for slot in 0..self.depth {
                if issued < self.requests && status.ok() && !session.slot_busy(slot) {
                    if !self.submit(session, opcode, slot, issued * self.chunk as u64) {
                        status = Status::Skipped;
                        break;
                    }
                    issued += 1;
                    added = true;
                }
            }
            if added {
                session.kick();
            }
            let Some((slot, answer)) = session.wait_any() else {
                status = if status.ok() { Status::Timeout } else { status };
                break;
            };
            done += 1;
            let count = if opcode == op::READ {
                session.reply_len(slot) as u64
            } else {
                u64::from(fuse::write_out(session.reply(slot)))
            };
            if answer.ok() {
                moved += count.min(self.chunk as u64);
            } else if status.ok() {
                status = answer;
            }
        }
        (status, moved, io::rdtsc().wrapping_sub(start))
    }

    /// Submits one READ or WRITE of the chunk at `offset` in `slot`.
    fn submit(&self, session: &mut Session, opcode: u32, slot: usize, offset: u64) -> bool {
        let size = self.chunk as u32;
        let args = if opcode == op::READ {
            fuse::read_in(self.fh, offset, size)
        } else {
            fuse::write_in(self.fh, offset, size)
        };
        let area = Some((slot * self.chunk, self.chunk));
        let parts = [&args[..]];
        let request = Request {
            write: area.filter(|_| opcode == op::WRITE),
            read: area.filter(|_| opcode == op::READ),
            ..Request::new(opcode, self.node, &parts, fuse::WRITE_OUT_LEN)
        };
        session.submit(slot, &request)
    }
}
