//! What the probe does over a FUSE session ([`crate::fs::Session`]), as the
//! `probe.fs.*` options ask: a listing of the root directory (always), a
//! lookup that must fail with ENOENT (always), then on the first device
//! the file checks in a fixed order — read a host file, create one with
//! [`pattern_byte`] and fsync it, make a directory, rename, unlink, remove
//! a directory — a second listing, and the benchmark: GETATTR round trips,
//! then sequential WRITE and READ of one file, TSC-timed.
//!
//! Options (names are single path components; `TO` may be `DIR/NAME`, DIR
//! in the root directory; numbers decimal):
//!
//! | option | default | what |
//! |---|---|---|
//! | `probe.fs.read=NAME` | none | LOOKUP, GETATTR, OPEN, READ to the end (8 KiB requests), RELEASE; FNV-1a of the bytes |
//! | `probe.fs.create=NAME:BYTES` | none | CREATE (O_EXCL), WRITE the pattern (8 KiB requests), FSYNC, GETATTR, READ back and compare, RELEASE |
//! | `probe.fs.mkdir=NAME` | none | MKDIR (mode 0755); listed afterwards |
//! | `probe.fs.rename=FROM:TO` | none | RENAME, then LOOKUP of both names |
//! | `probe.fs.unlink=NAME` | none | UNLINK, then LOOKUP |
//! | `probe.fs.rmdir=NAME` | none | RMDIR, then LOOKUP |
//! | `probe.fs.bench=MIB` | none | the benchmark on [`crate::fsbench::BENCH_FILE`] (created, removed after) |
//! | `probe.fs.getattrs=N` | 2000 | GETATTR round trips of the benchmark |
//! | `probe.fs.chunk=KIB` | 128 | benchmark request size (clamped to `max_write` and the probe's buffers) |
//! | `probe.fs.depth=N` | 4 | benchmark requests in flight (1-8) |
//! | `probe.fs.wait=MS` | 5000 | time limit of each request |

use crate::fs::{self, Request, Session, Status, MAX_SLOTS};
use crate::fsbench::{self, BenchOptions};
use crate::fuse::{self, op, Attr, Entry, ROOT_ID};
use crate::serial::Quoted;
use crate::{fnv1a64_update, report, FNV_OFFSET_BASIS};

/// A name the probe looks up expecting ENOENT.
pub const ABSENT_NAME: &[u8] = b".probe-absent";
/// Request size of the file checks.
const CHECK_CHUNK: usize = 8 * 1024;
/// Largest file the read check reads.
const READ_MAX: u64 = 16 << 20;
/// READDIR(PLUS) reply size asked for.
const DIR_CHUNK: usize = 4096;
/// READDIR(PLUS) requests per listing at most.
const DIR_REQUESTS_MAX: u32 = 64;
/// Longest name the probe handles (NAME_MAX).
const NAME_MAX: usize = 255;
const ENOENT: u32 = 2;
const DEFAULT_GETATTRS: u64 = 2000;
const DEFAULT_CHUNK_KIB: usize = 128;
const DEFAULT_DEPTH: usize = 4;

/// `PATTERN[k] = (k * 7 + 1) & 0xff`; files are windows of it, copied
/// rather than computed byte by byte (guest loops are slow here).
static PATTERN: [u8; 251 + 256] = {
    let mut t = [0u8; 251 + 256];
    let mut k = 0;
    while k < t.len() {
        t[k] = (k * 7 + 1) as u8;
        k += 1;
    }
    t
};

/// Byte at `offset` of a file the probe creates:
/// `(((offset / 256) % 251 + offset % 256) * 7 + 1) & 0xff`.
pub fn pattern_byte(offset: u64) -> u8 {
    PATTERN[((offset / 256) % 251 + offset % 256) as usize]
}

/// Runs `f` on each piece of the pattern covering `len` bytes from file
/// offset `offset` (its position in the range, the pattern bytes), until
/// `f` says stop.
fn pattern_pieces(offset: u64, len: usize, mut f: impl FnMut(usize, &[u8]) -> bool) -> bool {
    let mut pos = 0;
    while pos < len {
        let at = offset + pos as u64;
        let (window, within) = (((at / 256) % 251) as usize, (at % 256) as usize);
        let n = (256 - within).min(len - pos);
        if !f(pos, &PATTERN[window + within..window + within + n]) {
            return false;
        }
        pos += n;
    }
    true
}

/// Fills `buf` with the pattern of file offset `offset` onwards.
pub(crate) fn fill_pattern(buf: &mut [u8], offset: u64) {
    pattern_pieces(offset, buf.len(), |pos, piece| {
        buf[pos..pos + piece.len()].copy_from_slice(piece);
        true
    });
}

/// Whether `buf` holds the pattern of file offset `offset` onwards.
fn is_pattern(buf: &[u8], offset: u64) -> bool {
    pattern_pieces(offset, buf.len(), |pos, piece| {
        &buf[pos..pos + piece.len()] == piece
    })
}

/// The `probe.fs.*` options.
#[derive(Default)]
pub struct Options<'a> {
    read: Option<&'a [u8]>,
    create: Option<(&'a [u8], u64)>,
    mkdir: Option<&'a [u8]>,
    rename: Option<(&'a [u8], &'a [u8])>,
    unlink: Option<&'a [u8]>,
    rmdir: Option<&'a [u8]>,
    bench_mib: Option<u64>,
    getattrs: u64,
    chunk_kib: usize,
    depth: usize,
    /// Time limit of each request, milliseconds.
    pub wait_ms: u64,
}

impl<'a> Options<'a> {
    /// Reads the `probe.fs.*` words of `cmdline`, reporting bad ones.
    pub fn parse(cmdline: &'a [u8]) -> Options<'a> {
        let mut o = Options {
            getattrs: DEFAULT_GETATTRS,
            chunk_kib: DEFAULT_CHUNK_KIB,
            depth: DEFAULT_DEPTH,
            wait_ms: fs::DEFAULT_WAIT_MS,
            ..Options::default()
        };
        for word in cmdline.split(|&b| b == b' ') {
            let Some(rest) = word.strip_prefix(b"probe.fs.") else {
                continue;
            };
            let Some(at) = rest.iter().position(|&b| b == b'=') else {
                report!("fs option unknown={}", Quoted(word));
                continue;
            };
            if o.set(&rest[..at], &rest[at + 1..]).is_none() {
                report!("fs option bad={}", Quoted(word));
            }
        }
        o
    }

    fn set(&mut self, key: &[u8], value: &'a [u8]) -> Option<()> {
        let number = || parse_number(value);
        match key {
            b"read" => self.read = Some(component(value)?),
            b"create" => {
                let (name, bytes) = split_once(value, b':')?;
                self.create = Some((component(name)?, parse_number(bytes)?));
            }
            b"mkdir" => self.mkdir = Some(component(value)?),
            b"rename" => {
                let (from, to) = split_once(value, b':')?;
                split_target(to)?;
                self.rename = Some((component(from)?, to));
            }
            b"unlink" => self.unlink = Some(component(value)?),
            b"rmdir" => self.rmdir = Some(component(value)?),
            b"bench" => self.bench_mib = Some(number()?),
            b"getattrs" => self.getattrs = number()?,
            b"chunk" => self.chunk_kib = usize::try_from(number()?).ok()?.max(4),
            b"depth" => self.depth = (number()? as usize).clamp(1, MAX_SLOTS),
            b"wait" => self.wait_ms = number()?.max(1),
            _ => return None,
        }
        Some(())
    }

    /// The benchmark's options.
    fn bench(&self) -> BenchOptions {
        BenchOptions {
            getattrs: self.getattrs,
            chunk_kib: self.chunk_kib,
            depth: self.depth,
        }
    }

    /// Whether anything beyond the listing was asked for.
    pub fn wants_session(&self) -> bool {
        self.checks() || self.bench_mib.is_some()
    }

    fn checks(&self) -> bool {
        self.read.is_some()
            || self.create.is_some()
            || self.mkdir.is_some()
            || self.rename.is_some()
            || self.unlink.is_some()
            || self.rmdir.is_some()
    }
}

fn split_once(text: &[u8], sep: u8) -> Option<(&[u8], &[u8])> {
    let at = text.iter().position(|&b| b == sep)?;
    Some((&text[..at], &text[at + 1..]))
}

/// A usable single path component.
fn component(name: &[u8]) -> Option<&[u8]> {
    let ok = !name.is_empty()
        && name.len() <= NAME_MAX
        && name != b"."
        && name != b".."
        && !name.iter().any(|&b| b == b'/' || b == 0);
    ok.then_some(name)
}

/// A rename target: `(Some(DIR), NAME)` or `(None, NAME)`.
fn split_target(to: &[u8]) -> Option<(Option<&[u8]>, &[u8])> {
    match split_once(to, b'/') {
        Some((dir, name)) => Some((Some(component(dir)?), component(name)?)),
        None => Some((None, component(to)?)),
    }
}

/// Decimal or `0x` hex.
fn parse_number(text: &[u8]) -> Option<u64> {
    let (digits, radix) = match text.strip_prefix(b"0x") {
        Some(hex) => (hex, 16),
        None => (text, 10),
    };
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &d| {
        let digit = u64::from(char::from(d).to_digit(radix)?);
        acc.checked_mul(u64::from(radix))?.checked_add(digit)
    })
}

/// Everything the options ask of one session; `first`: the first
/// virtio-fs device (checks and benchmark run there only).
pub fn run(session: &mut Session, options: &Options, first: bool) {
    list(session, ROOT_ID, b"", "before");
    let (status, _) = lookup(session, ROOT_ID, ABSENT_NAME);
    report!(
        "fs op=lookup parent=1 name={} errno={status} expect={ENOENT}",
        Quoted(ABSENT_NAME)
    );
    if !first {
        return;
    }
    if options.checks() {
        checks(session, options);
        list(session, ROOT_ID, b"", "after");
        if let Some(dir) = options.mkdir {
            if let (Status::Ok, entry) = lookup(session, ROOT_ID, dir) {
                list(session, entry.nodeid, dir, "after");
            }
        }
    }
    if let Some(mib) = options.bench_mib {
        fsbench::run(session, &options.bench(), mib);
    }
}

fn checks(session: &mut Session, options: &Options) {
    if let Some(name) = options.read {
        read_check(session, name);
    }
    if let Some((name, bytes)) = options.create {
        create_check(session, name, bytes);
    }
    if let Some(name) = options.mkdir {
        let args = fuse::mkdir_in(0o755, 0o022);
        let parts = [&args[..], name, b"\0"];
        let request = Request::new(op::MKDIR, ROOT_ID, &parts, fuse::ENTRY_OUT_LEN);
        let (status, entry) = entry_call(session, &request);
        report!(
            "fs op=mkdir name={} errno={status} nodeid={} type={}",
            Quoted(name),
            entry.nodeid,
            entry.attr.kind()
        );
    }
    if let Some((from, to)) = options.rename {
        rename_check(session, from, to);
    }
    if let Some(name) = options.unlink {
        remove_check(session, op::UNLINK, "unlink", name);
    }
    if let Some(name) = options.rmdir {
        remove_check(session, op::RMDIR, "rmdir", name);
    }
}

/// A request answered by a `fuse_entry_out`; the lookup is counted.
fn entry_call(session: &mut Session, request: &Request) -> (Status, Entry) {
    let status = session.call(request);
    if !status.ok() {
        return (status, Entry::default());
    }
    let entry = Entry::parse(session.reply(0), 0);
    session.note_lookup(entry.nodeid);
    (status, entry)
}

fn lookup(session: &mut Session, parent: u64, name: &[u8]) -> (Status, Entry) {
    let parts = [name, b"\0"];
    let request = Request::new(op::LOOKUP, parent, &parts, fuse::ENTRY_OUT_LEN);
    entry_call(session, &request)
}

/// LOOKUP reported as one line.
fn report_lookup(session: &mut Session, parent: u64, name: &[u8]) -> (Status, Entry) {
    let (status, entry) = lookup(session, parent, name);
    report!(
        "fs op=lookup parent={parent} name={} errno={status} nodeid={} type={} size={}",
        Quoted(name),
        entry.nodeid,
        entry.attr.kind(),
        entry.attr.size
    );
    (status, entry)
}

pub(crate) fn getattr(session: &mut Session, nodeid: u64) -> (Status, Attr) {
    let args = fuse::getattr_in();
    let status = session.call(&Request::new(
        op::GETATTR,
        nodeid,
        &[&args],
        fuse::ATTR_OUT_LEN,
    ));
    let attr = if status.ok() {
        fuse::attr_out(session.reply(0))
    } else {
        Attr::default()
    };
    (status, attr)
}

fn report_getattr(session: &mut Session, nodeid: u64) -> (Status, Attr) {
    let (status, attr) = getattr(session, nodeid);
    report!(
        "fs op=getattr nodeid={nodeid} errno={status} size={} mode={:#o} nlink={} ino={}",
        attr.size,
        attr.mode,
        attr.nlink,
        attr.ino
    );
    (status, attr)
}

/// OPEN or OPENDIR: the file handle.
fn open(session: &mut Session, opcode: u32, nodeid: u64, flags: u32) -> (Status, u64) {
    let args = fuse::open_in(flags);
    let status = session.call(&Request::new(opcode, nodeid, &[&args], fuse::OPEN_OUT_LEN));
    let fh = if status.ok() {
        fuse::open_out(session.reply(0)).0
    } else {
        0
    };
    (status, fh)
}

/// RELEASE or RELEASEDIR, reported.
pub(crate) fn release(session: &mut Session, opcode: u32, nodeid: u64, fh: u64, flags: u32) {
    let args = fuse::release_in(fh, flags);
    let status = session.call(&Request::new(opcode, nodeid, &[&args], 0));
    let name = if opcode == op::RELEASEDIR {
        "releasedir"
    } else {
        "release"
    };
    report!("fs op={name} nodeid={nodeid} fh={fh} errno={status}");
}

/// One READ of `len` bytes at `offset` into the data area at 0; the bytes
/// read.
fn read_at(
    session: &mut Session,
    nodeid: u64,
    fh: u64,
    offset: u64,
    len: usize,
) -> (Status, usize) {
    let args = fuse::read_in(fh, offset, len as u32);
    let parts = [&args[..]];
    let request = Request {
        read: Some((0, len)),
        ..Request::new(op::READ, nodeid, &parts, 0)
    };
    let status = session.call(&request);
    let got = if status.ok() {
        session.reply_len(0).min(len)
    } else {
        0
    };
    (status, got)
}

/// `probe.fs.read`: the whole file, hashed.
fn read_check(session: &mut Session, name: &[u8]) {
    let (status, entry) = report_lookup(session, ROOT_ID, name);
    if !status.ok() {
        return;
    }
    let nodeid = entry.nodeid;
    report_getattr(session, nodeid);
    let (status, fh) = open(session, op::OPEN, nodeid, fuse::O_RDONLY);
    report!("fs op=open nodeid={nodeid} errno={status} fh={fh}");
    if !status.ok() {
        return;
    }
    let (mut offset, mut requests, mut hash) = (0u64, 0u32, FNV_OFFSET_BASIS);
    let status = loop {
        let (status, got) = read_at(session, nodeid, fh, offset, CHECK_CHUNK);
        requests += 1;
        if !status.ok() || got == 0 || offset >= READ_MAX {
            break status;
        }
        hash = fs::with_data(0, got, |data| fnv1a64_update(hash, data));
        offset += got as u64;
        if got < CHECK_CHUNK {
            break status;
        }
    };
    report!(
        "fs op=read name={} errno={status} bytes={offset} requests={requests} fnv1a64={hash:#018x}",
        Quoted(name)
    );
    release(session, op::RELEASE, nodeid, fh, fuse::O_RDONLY);
}

/// `probe.fs.create`: a new file of `bytes` pattern bytes, fsynced, its
/// size and contents checked through the server.
fn create_check(session: &mut Session, name: &[u8], bytes: u64) {
    let flags = fuse::O_RDWR | fuse::O_CREAT | fuse::O_EXCL;
    let (status, entry, fh) = create(session, name, flags);
    report!(
        "fs op=create name={} errno={status} nodeid={} fh={fh}",
        Quoted(name),
        entry.nodeid
    );
    if !status.ok() {
        return;
    }
    let nodeid = entry.nodeid;
    let (mut offset, mut requests) = (0u64, 0u32);
    let mut status = Status::Ok;
    while offset < bytes && status.ok() {
        let len = CHECK_CHUNK.min((bytes - offset) as usize);
        fs::with_data_mut(0, len, |data| fill_pattern(data, offset));
        let (s, written) = write_at(session, nodeid, fh, offset, len);
        requests += 1;
        status = s;
        offset += written as u64;
        if status.ok() && written != len {
            break;
        }
    }
    report!(
        "fs op=write name={} errno={status} bytes={offset} requests={requests}",
        Quoted(name)
    );
    let args = fuse::fsync_in(fh);
    let status = session.call(&Request::new(op::FSYNC, nodeid, &[&args], 0));
    report!("fs op=fsync nodeid={nodeid} fh={fh} errno={status}");
    report_getattr(session, nodeid);
    readback(session, name, nodeid, fh, bytes);
    release(session, op::RELEASE, nodeid, fh, fuse::O_RDWR);
}

/// CREATE of `name` in the root with `flags`: entry and file handle.
pub(crate) fn create(session: &mut Session, name: &[u8], flags: u32) -> (Status, Entry, u64) {
    let args = fuse::create_in(flags, 0o644, 0o022);
    let parts = [&args[..], name, b"\0"];
    let request = Request::new(
        op::CREATE,
        ROOT_ID,
        &parts,
        fuse::ENTRY_OUT_LEN + fuse::OPEN_OUT_LEN,
    );
    let (status, entry) = entry_call(session, &request);
    let fh = if status.ok() {
        fuse::open_out(&session.reply(0)[fuse::ENTRY_OUT_LEN..]).0
    } else {
        0
    };
    (status, entry, fh)
}

/// One WRITE of the data area's first `len` bytes at `offset`; the bytes
/// the server says it wrote.
fn write_at(
    session: &mut Session,
    nodeid: u64,
    fh: u64,
    offset: u64,
    len: usize,
) -> (Status, usize) {
    let args = fuse::write_in(fh, offset, len as u32);
    let parts = [&args[..]];
    let request = Request {
        write: Some((0, len)),
        ..Request::new(op::WRITE, nodeid, &parts, fuse::WRITE_OUT_LEN)
    };
    let status = session.call(&request);
    let written = if status.ok() {
        fuse::write_out(session.reply(0)) as usize
    } else {
        0
    };
    (status, written)
}

/// Reads `bytes` back from the open file and compares with the pattern.
fn readback(session: &mut Session, name: &[u8], nodeid: u64, fh: u64, bytes: u64) {
    let (mut offset, mut matches) = (0u64, true);
    let status = loop {
        let (status, got) = read_at(session, nodeid, fh, offset, CHECK_CHUNK);
        if !status.ok() || got == 0 {
            break status;
        }
        matches &= fs::with_data(0, got, |data| is_pattern(data, offset));
        offset += got as u64;
        if offset >= bytes.saturating_add(1) || got < CHECK_CHUNK {
            break status;
        }
    };
    let matches = matches && offset == bytes;
    report!(
        "fs op=readback name={} errno={status} bytes={offset} match={}",
        Quoted(name),
        u8::from(matches)
    );
}

/// `probe.fs.rename=FROM:TO`, then where the names lead.
fn rename_check(session: &mut Session, from: &[u8], to: &[u8]) {
    let Some((dir, new_name)) = split_target(to) else {
        return;
    };
    let newdir = match dir {
        Some(dir) => {
            let (status, entry) = report_lookup(session, ROOT_ID, dir);
            if !status.ok() {
                return;
            }
            entry.nodeid
        }
        None => ROOT_ID,
    };
    let args = fuse::rename_in(newdir);
    let parts = [&args[..], from, b"\0", new_name, b"\0"];
    let request = Request::new(op::RENAME, ROOT_ID, &parts, 0);
    let status = session.call(&request);
    report!(
        "fs op=rename from={} to={} newdir={newdir} errno={status}",
        Quoted(from),
        Quoted(to)
    );
    report_lookup(session, newdir, new_name);
    report_lookup(session, ROOT_ID, from);
}

/// UNLINK or RMDIR of `name` in the root, then its lookup.
fn remove_check(session: &mut Session, opcode: u32, what: &str, name: &[u8]) {
    let status = session.call(&Request::new(opcode, ROOT_ID, &[name, b"\0"], 0));
    report!("fs op={what} name={} errno={status}", Quoted(name));
    report_lookup(session, ROOT_ID, name);
}

/// Lists directory `nodeid` (`label`: its name in the root, empty for the
/// root): one line per entry but `.` and `..`, then a summary. READDIRPLUS
/// when negotiated (the entries' lookups are counted), else READDIR and a
/// LOOKUP per entry for its size.
fn list(session: &mut Session, nodeid: u64, label: &[u8], phase: &str) {
    let plus = session.init.flags & fuse::init_flag::DO_READDIRPLUS != 0;
    let flags = fuse::O_RDONLY | fuse::O_DIRECTORY;
    let (status, fh) = open(session, op::OPENDIR, nodeid, flags);
    if !status.ok() {
        report!(
            "fs readdir dir={} phase={phase} opendir errno={status}",
            Quoted(label)
        );
        return;
    }
    let opcode = if plus { op::READDIRPLUS } else { op::READDIR };
    let (mut offset, mut entries, mut requests) = (0u64, 0u32, 0u32);
    let mut status = Status::Ok;
    let mut malformed = false;
    while requests < DIR_REQUESTS_MAX {
        let args = fuse::read_in(fh, offset, DIR_CHUNK as u32);
        status = session.call(&Request::new(opcode, nodeid, &[&args], DIR_CHUNK));
        requests += 1;
        if !status.ok() || session.reply_len(0) == 0 {
            break;
        }
        let Some((count, next)) = list_reply(session, nodeid, label, phase, plus) else {
            malformed = true;
            break;
        };
        entries += count;
        if next == offset {
            break;
        }
        offset = next;
    }
    report!(
        "fs readdir dir={} phase={phase} plus={} entries={entries} requests={requests} errno={status} malformed={}",
        Quoted(label),
        u8::from(plus),
        u8::from(malformed)
    );
    release(session, op::RELEASEDIR, nodeid, fh, flags);
}

/// Reports the entries of the READDIR(PLUS) reply in slot 0; their count
/// and the offset to continue from. `None` for a malformed reply.
fn list_reply(
    session: &mut Session,
    nodeid: u64,
    label: &[u8],
    phase: &str,
    plus: bool,
) -> Option<(u32, u64)> {
    let (mut pos, mut count, mut next) = (0, 0u32, 0u64);
    let mut names = NameList::new();
    let mut looked_up = [0u64; 64];
    while let Some((dirent, after)) = fuse::dirent_at(session.reply(0), pos, plus).ok()? {
        pos = after;
        next = dirent.off;
        if dirent.is_dot() {
            continue;
        }
        match dirent.entry {
            Some(entry) => {
                if let Some(slot) = looked_up.get_mut(count as usize) {
                    *slot = entry.nodeid;
                }
                let (kind, size) = (entry.attr.kind(), entry.attr.size);
                report_entry(label, phase, dirent.name, kind, size, dirent.ino);
            }
            None => names.push(dirent.name, dirent.kind, dirent.ino),
        }
        count += 1;
    }
    for nodeid in looked_up {
        session.note_lookup(nodeid);
    }
    for (name, kind, ino) in names.iter() {
        let (_, entry) = lookup(session, nodeid, name);
        report_entry(
            label,
            phase,
            name,
            fuse::dtype_name(kind),
            entry.attr.size,
            ino,
        );
    }
    Some((count, next))
}

fn report_entry(label: &[u8], phase: &str, name: &[u8], kind: &str, size: u64, ino: u64) {
    report!(
        "fs entry dir={} phase={phase} name={} type={kind} size={size} ino={ino}",
        Quoted(label),
        Quoted(name)
    );
}

/// Names of one READDIR reply, kept while their LOOKUPs reuse the reply
/// buffer (plain READDIR only).
struct NameList {
    bytes: [u8; fs::OUT_BYTES],
    used: usize,
    /// (start, len, type, ino) of each name.
    names: [(u16, u16, u32, u64); 64],
    count: usize,
}

impl NameList {
    fn new() -> NameList {
        NameList {
            bytes: [0; fs::OUT_BYTES],
            used: 0,
            names: [(0, 0, 0, 0); 64],
            count: 0,
        }
    }

    fn push(&mut self, name: &[u8], kind: u32, ino: u64) {
        let end = self.used + name.len();
        if self.count == self.names.len() || end > self.bytes.len() {
            return;
        }
        self.bytes[self.used..end].copy_from_slice(name);
        self.names[self.count] = (self.used as u16, name.len() as u16, kind, ino);
        self.used = end;
        self.count += 1;
    }

    fn iter(&self) -> impl Iterator<Item = (&[u8], u32, u64)> + '_ {
        self.names[..self.count]
            .iter()
            .map(|&(start, len, kind, ino)| {
                let start = usize::from(start);
                (&self.bytes[start..start + usize::from(len)], kind, ino)
            })
    }
}
