//! The FUSE wire protocol (Linux uapi `fuse.h`, protocol 7.31 as the probe
//! speaks it) as virtio-fs carries it: opcodes, the request and reply
//! headers, the argument structures the probe sends (encoded into byte
//! arrays) and the replies it reads (decoded from the bytes the device
//! wrote, every field bounds-checked: a short reply reads as zeros).
//!
//! All fields are little-endian (x86). Sizes are those of the C structs.

use crate::phys::{u16_at, u32_at, u64_at};

/// FUSE major version the probe speaks.
pub const MAJOR: u32 = 7;
/// FUSE minor version the probe speaks (no `FUSE_INIT_EXT`: 16-byte
/// `fuse_init_in`).
pub const MINOR: u32 = 31;
/// Node ID of the root directory.
pub const ROOT_ID: u64 = 1;

/// Opcodes (`enum fuse_opcode`).
pub mod op {
    /// Look a name up in a directory.
    pub const LOOKUP: u32 = 1;
    /// Drop lookup references (no reply).
    pub const FORGET: u32 = 2;
    /// Attributes of a node.
    pub const GETATTR: u32 = 3;
    /// Make a directory.
    pub const MKDIR: u32 = 9;
    /// Remove a file.
    pub const UNLINK: u32 = 10;
    /// Remove an empty directory.
    pub const RMDIR: u32 = 11;
    /// Rename (move) an entry.
    pub const RENAME: u32 = 12;
    /// Open a file.
    pub const OPEN: u32 = 14;
    /// Read from an open file.
    pub const READ: u32 = 15;
    /// Write to an open file.
    pub const WRITE: u32 = 16;
    /// Close an open file.
    pub const RELEASE: u32 = 18;
    /// Flush a file's data to stable storage.
    pub const FSYNC: u32 = 20;
    /// Start the session.
    pub const INIT: u32 = 26;
    /// Open a directory.
    pub const OPENDIR: u32 = 27;
    /// Read directory entries.
    pub const READDIR: u32 = 28;
    /// Close an open directory.
    pub const RELEASEDIR: u32 = 29;
    /// Create and open a file.
    pub const CREATE: u32 = 35;
    /// End the session (no reply).
    pub const DESTROY: u32 = 38;
    /// Read directory entries with their attributes (lookups counted).
    pub const READDIRPLUS: u32 = 44;
}

/// `FUSE_INIT` flags the probe asks for (`fuse_init_in.flags`).
pub mod init_flag {
    /// Asynchronous reads.
    pub const ASYNC_READ: u32 = 1 << 0;
    /// Writes larger than a page.
    pub const BIG_WRITES: u32 = 1 << 5;
    /// READDIRPLUS supported.
    pub const DO_READDIRPLUS: u32 = 1 << 13;
    /// `max_pages` in the reply is valid.
    pub const MAX_PAGES: u32 = 1 << 22;
}

/// `sizeof(struct fuse_in_header)`.
pub const IN_HEADER_LEN: usize = 40;
/// `sizeof(struct fuse_out_header)`.
pub const OUT_HEADER_LEN: usize = 16;
/// `sizeof(struct fuse_attr)`.
pub const ATTR_LEN: usize = 88;
/// `sizeof(struct fuse_entry_out)`.
pub const ENTRY_OUT_LEN: usize = 40 + ATTR_LEN;
/// `sizeof(struct fuse_attr_out)`.
pub const ATTR_OUT_LEN: usize = 16 + ATTR_LEN;
/// `sizeof(struct fuse_open_out)`.
pub const OPEN_OUT_LEN: usize = 16;
/// `sizeof(struct fuse_init_out)` (7.23 and later).
pub const INIT_OUT_LEN: usize = 64;
/// `sizeof(struct fuse_write_out)`.
pub const WRITE_OUT_LEN: usize = 8;
/// `sizeof(struct fuse_dirent)` without the name.
const DIRENT_LEN: usize = 24;

// Open flags and file modes (Linux).
/// `O_RDONLY`.
pub const O_RDONLY: u32 = 0;
/// `O_RDWR`.
pub const O_RDWR: u32 = 2;
/// `O_CREAT`.
pub const O_CREAT: u32 = 0o100;
/// `O_EXCL`.
pub const O_EXCL: u32 = 0o200;
/// `O_DIRECTORY`.
pub const O_DIRECTORY: u32 = 0o200000;
/// `S_IFMT`.
pub const S_IFMT: u32 = 0o170000;
/// `S_IFREG`.
pub const S_IFREG: u32 = 0o100000;
/// `S_IFDIR`.
pub const S_IFDIR: u32 = 0o040000;

/// Writes a `fuse_in_header` into `buf` (at least [`IN_HEADER_LEN`]):
/// total request length `len`, uid/gid 0 (root), pid 1.
pub fn write_in_header(buf: &mut [u8], len: u32, opcode: u32, unique: u64, nodeid: u64) {
    buf[..IN_HEADER_LEN].fill(0);
    buf[0..4].copy_from_slice(&len.to_le_bytes());
    buf[4..8].copy_from_slice(&opcode.to_le_bytes());
    buf[8..16].copy_from_slice(&unique.to_le_bytes());
    buf[16..24].copy_from_slice(&nodeid.to_le_bytes());
    buf[32..36].copy_from_slice(&1u32.to_le_bytes());
}

/// A `fuse_out_header` as the device wrote it.
#[derive(Clone, Copy)]
pub struct OutHeader {
    /// Bytes of the reply, header included.
    pub len: u32,
    /// 0, or a negative errno.
    pub error: i32,
    /// The request it answers.
    pub unique: u64,
}

impl OutHeader {
    /// Decodes the first [`OUT_HEADER_LEN`] bytes of `bytes`.
    pub fn parse(bytes: &[u8]) -> OutHeader {
        OutHeader {
            len: u32_at(bytes, 0),
            error: u32_at(bytes, 4) as i32,
            unique: u64_at(bytes, 8),
        }
    }
}

/// Packs little-endian fields into an `N`-byte argument structure.
struct Packer<const N: usize> {
    bytes: [u8; N],
    at: usize,
}

impl<const N: usize> Packer<N> {
    fn new() -> Self {
        Packer {
            bytes: [0; N],
            at: 0,
        }
    }

    fn u32(mut self, value: u32) -> Self {
        self.bytes[self.at..self.at + 4].copy_from_slice(&value.to_le_bytes());
        self.at += 4;
        self
    }

    fn u64(mut self, value: u64) -> Self {
        self.bytes[self.at..self.at + 8].copy_from_slice(&value.to_le_bytes());
        self.at += 8;
        self
    }

    fn done(self) -> [u8; N] {
        self.bytes
    }
}

/// `fuse_init_in` (16 bytes, no extension).
pub fn init_in(max_readahead: u32, flags: u32) -> [u8; 16] {
    Packer::new()
        .u32(MAJOR)
        .u32(MINOR)
        .u32(max_readahead)
        .u32(flags)
        .done()
}

/// `fuse_getattr_in`: no file handle.
pub fn getattr_in() -> [u8; 16] {
    [0; 16]
}

/// `fuse_open_in` (OPEN and OPENDIR).
pub fn open_in(flags: u32) -> [u8; 8] {
    Packer::new().u32(flags).done()
}

/// `fuse_create_in`, followed on the wire by the name.
pub fn create_in(flags: u32, mode: u32, umask: u32) -> [u8; 16] {
    Packer::new().u32(flags).u32(mode).u32(umask).done()
}

/// `fuse_mkdir_in`, followed on the wire by the name.
pub fn mkdir_in(mode: u32, umask: u32) -> [u8; 8] {
    Packer::new().u32(mode).u32(umask).done()
}

/// `fuse_read_in` (READ, READDIR, READDIRPLUS).
pub fn read_in(fh: u64, offset: u64, size: u32) -> [u8; 40] {
    Packer::new().u64(fh).u64(offset).u32(size).done()
}

/// `fuse_write_in`, followed on the wire by the data.
pub fn write_in(fh: u64, offset: u64, size: u32) -> [u8; 40] {
    Packer::new().u64(fh).u64(offset).u32(size).done()
}

/// `fuse_release_in` (RELEASE and RELEASEDIR).
pub fn release_in(fh: u64, flags: u32) -> [u8; 24] {
    Packer::new().u64(fh).u32(flags).done()
}

/// `fuse_fsync_in`: data and metadata (`fsync_flags` 0).
pub fn fsync_in(fh: u64) -> [u8; 16] {
    Packer::new().u64(fh).done()
}

/// `fuse_rename_in`, followed on the wire by the old and new names.
pub fn rename_in(newdir: u64) -> [u8; 8] {
    Packer::new().u64(newdir).done()
}

/// `fuse_forget_in`.
pub fn forget_in(nlookup: u64) -> [u8; 8] {
    Packer::new().u64(nlookup).done()
}

/// The `fuse_attr` fields the probe reports.
#[derive(Clone, Copy, Default)]
pub struct Attr {
    /// Inode number.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// File type and permissions.
    pub mode: u32,
    /// Hard links.
    pub nlink: u32,
}

impl Attr {
    /// Decodes a `fuse_attr` at `off` in `bytes`.
    pub fn parse(bytes: &[u8], off: usize) -> Attr {
        Attr {
            ino: u64_at(bytes, off),
            size: u64_at(bytes, off + 8),
            mode: u32_at(bytes, off + 60),
            nlink: u32_at(bytes, off + 64),
        }
    }

    /// `file`, `dir`, `link` or `other`.
    pub fn kind(&self) -> &'static str {
        kind_name(self.mode & S_IFMT)
    }
}

/// A type from `S_IFMT` bits as a word.
pub fn kind_name(format: u32) -> &'static str {
    match format {
        S_IFREG => "file",
        S_IFDIR => "dir",
        0o120000 => "link",
        _ => "other",
    }
}

/// A `fuse_entry_out` (LOOKUP, MKDIR, CREATE, READDIRPLUS).
#[derive(Clone, Copy, Default)]
pub struct Entry {
    /// The node (0: a negative entry, no lookup counted).
    pub nodeid: u64,
    /// Its attributes.
    pub attr: Attr,
}

impl Entry {
    /// Decodes a `fuse_entry_out` at `off` in `bytes`.
    pub fn parse(bytes: &[u8], off: usize) -> Entry {
        Entry {
            nodeid: u64_at(bytes, off),
            attr: Attr::parse(bytes, off + 40),
        }
    }
}

/// `fuse_attr_out`'s attributes.
pub fn attr_out(bytes: &[u8]) -> Attr {
    Attr::parse(bytes, 16)
}

/// `fuse_open_out`: the file handle and open flags.
pub fn open_out(bytes: &[u8]) -> (u64, u32) {
    (u64_at(bytes, 0), u32_at(bytes, 8))
}

/// `fuse_write_out`: bytes written.
pub fn write_out(bytes: &[u8]) -> u32 {
    u32_at(bytes, 0)
}

/// The `fuse_init_out` fields the probe reports.
#[derive(Clone, Copy, Default)]
pub struct InitOut {
    /// Protocol major version of the server.
    pub major: u32,
    /// Protocol minor version of the server.
    pub minor: u32,
    /// Read-ahead the server allows.
    pub max_readahead: u32,
    /// Flags both sides use.
    pub flags: u32,
    /// Most requests in the background.
    pub max_background: u16,
    /// Largest WRITE payload.
    pub max_write: u32,
    /// Timestamp granularity (ns).
    pub time_gran: u32,
    /// Most pages per request (with `MAX_PAGES`).
    pub max_pages: u16,
    /// Upper 32 flag bits (`FUSE_INIT_EXT`).
    pub flags2: u32,
}

impl InitOut {
    /// Decodes a `fuse_init_out` (missing fields read as zero).
    pub fn parse(bytes: &[u8]) -> InitOut {
        InitOut {
            major: u32_at(bytes, 0),
            minor: u32_at(bytes, 4),
            max_readahead: u32_at(bytes, 8),
            flags: u32_at(bytes, 12),
            max_background: u16_at(bytes, 16),
            max_write: u32_at(bytes, 20),
            time_gran: u32_at(bytes, 24),
            max_pages: u16_at(bytes, 28),
            flags2: u32_at(bytes, 32),
        }
    }
}

/// One directory entry of a READDIR or READDIRPLUS reply.
pub struct Dirent<'a> {
    /// Inode number.
    pub ino: u64,
    /// Offset to continue reading after this entry.
    pub off: u64,
    /// `DT_*` type (4 = dir, 8 = file, 10 = link).
    pub kind: u32,
    /// The name (no NUL).
    pub name: &'a [u8],
    /// READDIRPLUS only: the entry's lookup reply.
    pub entry: Option<Entry>,
}

impl Dirent<'_> {
    /// `.` or `..`, which READDIRPLUS answers without a lookup.
    pub fn is_dot(&self) -> bool {
        self.name == b"." || self.name == b".."
    }
}

/// The `DT_*` type of a dirent as a word.
pub fn dtype_name(kind: u32) -> &'static str {
    match kind {
        4 => "dir",
        8 => "file",
        10 => "link",
        _ => "other",
    }
}

/// The entry at `pos` of a READDIR(PLUS) reply body (`plus`: entries are
/// `fuse_direntplus`) and the position of the next one; `Ok(None)` at the
/// end, `Err(())` for an entry that does not fit or has no name.
#[allow(clippy::result_unit_err)]
pub fn dirent_at(bytes: &[u8], pos: usize, plus: bool) -> Result<Option<(Dirent<'_>, usize)>, ()> {
    let Some(bytes) = bytes.get(pos..).filter(|b| !b.is_empty()) else {
        return Ok(None);
    };
    let head = if plus { ENTRY_OUT_LEN } else { 0 };
    let name_at = head + DIRENT_LEN;
    let namelen = u32_at(bytes, head + 16) as usize;
    let end = name_at.saturating_add(namelen);
    if namelen == 0 || end > bytes.len() {
        return Err(());
    }
    let record = end.next_multiple_of(8).min(bytes.len());
    let dirent = Dirent {
        ino: u64_at(bytes, head),
        off: u64_at(bytes, head + 8),
        kind: u32_at(bytes, head + 20),
        name: &bytes[name_at..end],
        entry: plus.then(|| Entry::parse(bytes, 0)),
    };
    Ok(Some((dirent, pos + record)))
}
