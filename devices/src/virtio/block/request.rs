//! One virtio-blk request (virtio 1.2 §5.2.6): collecting a descriptor
//! chain, validating it, running it against the [`DiskImage`] and writing
//! the status byte.
//!
//! The layout is parsed as byte streams, not per descriptor (virtio 1.x
//! drivers may frame buffers freely): the device-readable bytes are the
//! 16-byte header followed by OUT data or discard/write-zeroes segments,
//! the device-writable bytes are IN/GET_ID data followed by the status
//! byte, which is the last writable byte of the chain. Every device-readable
//! descriptor must come before every device-writable one.
//!
//! Any malformed request (short header, wrong direction, data not a whole
//! number of sectors, range beyond the disk, buffer outside guest memory,
//! too many descriptors) completes with `VIRTIO_BLK_S_IOERR`; writes,
//! discards and write-zeroes on a read-only disk too. Unknown types and
//! unknown write-zeroes flags get `VIRTIO_BLK_S_UNSUPP`. A chain without a
//! writable byte for the status is returned with used length 0. The used
//! length is the bytes written to guest memory, status byte included.
//!
//! On a raw image whose type was detected ([`DiskImage::guards_sector0`]),
//! a write whose first sector would make sector 0 read as another format
//! (qcow2, VMDK, VHDX, ...) is refused with `VIRTIO_BLK_S_IOERR`, counted
//! (`sector0_writes_refused`) and reported on stderr the first time. The
//! checked sector is copied out of guest memory first and written from that
//! copy, so the guest cannot change it between check and write.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, VolatileSlice};

use super::disk::SECTOR_SIZE;
use super::format;
use super::image::DiskImage;
use crate::virtio::GuestMemory;

/// Bytes in the request header (type, reserved, sector).
const HEADER_SIZE: u64 = 16;
/// Bytes in one discard/write-zeroes segment (sector, num_sectors, flags).
const SEGMENT_SIZE: u64 = 16;
/// Bytes of a GET_ID answer.
pub(crate) const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Most descriptors one request may have (the data limit of `preadv`).
pub(crate) const MAX_DESCRIPTORS: usize = 1024;
/// Most segments in one discard/write-zeroes request (`max_discard_seg`).
pub(crate) const MAX_DISCARD_SEGMENTS: u64 = 1;
/// Most sectors one discard or write-zeroes segment may cover (1 GiB).
pub(crate) const MAX_DISCARD_SECTORS: u32 = 1 << 21;

/// Why a request failed; becomes its status byte.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain breaks the request layout.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// The sectors lie (partly) beyond the end of the disk.
    #[error("sector range beyond the end of the disk")]
    OutOfRange,
    /// A write-type request on a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// A write that would make a detected raw image read as another format.
    #[error("write would make sector 0 look like {0}")]
    Sector0(format::ImageFormat),
    /// An unknown request type or write-zeroes flag.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// Copying to or from guest memory failed.
    #[error("guest memory access failed")]
    Memory(#[source] vm_memory::GuestMemoryError),
    /// The host I/O failed.
    #[error("host i/o failed")]
    Io(#[source] io::Error),
}

/// Per-disk statistics, shared between the device and its worker.
#[derive(Debug, Default)]
pub struct BlockCounters {
    read_requests: AtomicU64,
    read_bytes: AtomicU64,
    write_requests: AtomicU64,
    write_bytes: AtomicU64,
    flush_requests: AtomicU64,
    discard_requests: AtomicU64,
    write_zeroes_requests: AtomicU64,
    get_id_requests: AtomicU64,
    io_errors: AtomicU64,
    host_errors: AtomicU64,
    unsupported: AtomicU64,
    invalid_chains: AtomicU64,
    sector0_writes_refused: AtomicU64,
}

impl BlockCounters {
    /// The counters as (name, value) pairs.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("read_requests", get(&self.read_requests)),
            ("read_bytes", get(&self.read_bytes)),
            ("write_requests", get(&self.write_requests)),
            ("write_bytes", get(&self.write_bytes)),
            ("flush_requests", get(&self.flush_requests)),
            ("discard_requests", get(&self.discard_requests)),
            ("write_zeroes_requests", get(&self.write_zeroes_requests)),
            ("get_id_requests", get(&self.get_id_requests)),
            ("io_errors", get(&self.io_errors)),
            ("host_errors", get(&self.host_errors)),
            ("unsupported", get(&self.unsupported)),
            ("invalid_chains", get(&self.invalid_chains)),
            ("sector0_writes_refused", get(&self.sector0_writes_refused)),
        ]
    }
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// What a request runs against.
#[derive(Clone, Debug)]
pub(crate) struct Backend {
    /// The image.
    pub disk: Arc<DiskImage>,
    /// The GET_ID answer.
    pub id: [u8; ID_BYTES],
    /// Statistics.
    pub counters: Arc<BlockCounters>,
}

/// A guest buffer of one descriptor.
#[derive(Clone, Copy, Debug)]
struct Segment {
    addr: GuestAddress,
    len: u64,
}

/// A collected chain: its readable and writable bytes, minus the status.
#[derive(Debug, Default)]
struct Chain {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    readable_len: u64,
    writable_len: u64,
    defect: Option<&'static str>,
}

/// How a request orders against others: FLUSH waits for the writes
/// submitted before it (see `pool`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RequestKind {
    /// Reads nothing from and changes nothing on the disk's data, or is
    /// malformed (completes without touching the disk).
    Other,
    /// IN: reads the disk.
    Read,
    /// OUT, DISCARD, WRITE_ZEROES: changes the disk.
    Write,
    /// FLUSH.
    Flush,
}

/// A request taken off the ring, its layout collected and its header
/// copied out of guest memory once (so the guest cannot change the type
/// between classification and execution), ready to run on any thread.
#[derive(Debug)]
pub(crate) struct Prepared {
    /// The chain and its status byte; `None` when there is no writable
    /// byte for the status.
    chain: Option<(Chain, GuestAddress)>,
    /// The header, or why it could not be read.
    header: Result<[u8; HEADER_SIZE as usize], &'static str>,
}

impl Prepared {
    /// The ordering class of the request.
    pub(crate) fn kind(&self) -> RequestKind {
        match (&self.chain, &self.header) {
            (Some((chain, _)), Ok(header)) if chain.defect.is_none() => {
                match request_type(header) {
                    VIRTIO_BLK_T_IN => RequestKind::Read,
                    VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                        RequestKind::Write
                    }
                    VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
                    _ => RequestKind::Other,
                }
            }
            _ => RequestKind::Other,
        }
    }
}

/// Collects the chain in `descriptors` and reads its header.
pub(crate) fn prepare<I>(descriptors: I, mem: &GuestMemory) -> Prepared
where
    I: IntoIterator<Item = Descriptor>,
{
    let chain = collect(descriptors, mem);
    let header = match &chain {
        Some((chain, _)) => read_header(chain, mem),
        None => Err("no status byte"),
    };
    Prepared { chain, header }
}

/// Runs a prepared request and returns its used length. Never fails:
/// errors become the status byte.
pub(crate) fn complete(request: &Prepared, mem: &GuestMemory, backend: &Backend) -> u32 {
    let counters = &backend.counters;
    let Some((chain, status_addr)) = &request.chain else {
        bump(&counters.invalid_chains, 1);
        return 0;
    };
    let result = request
        .header
        .map_err(RequestError::Malformed)
        .and_then(|header| execute(chain, &header, mem, backend));
    let (status, written) = match result {
        Ok(written) => (VIRTIO_BLK_S_OK, written),
        Err(RequestError::Unsupported(_)) => {
            bump(&counters.unsupported, 1);
            (VIRTIO_BLK_S_UNSUPP, 0)
        }
        Err(e) => {
            bump(&counters.io_errors, 1);
            if matches!(e, RequestError::Io(_)) {
                bump(&counters.host_errors, 1);
            }
            (VIRTIO_BLK_S_IOERR, 0)
        }
    };
    // Status codes are 0..=2, so the cast is lossless.
    if mem.write_obj(status as u8, *status_addr).is_err() {
        bump(&counters.invalid_chains, 1);
        return 0;
    }
    written + 1
}

/// Completes a read whose bytes are all in the page cache, without
/// blocking (see [`DiskImage::read_at_nowait`]), and returns its used
/// length; `None` when it has to wait for the device (or is anything but
/// a well-formed read): then run it with [`complete`] where blocking is
/// fine.
pub(crate) fn try_complete_cached(
    request: &Prepared,
    mem: &GuestMemory,
    backend: &Backend,
) -> Option<u32> {
    if request.kind() != RequestKind::Read {
        return None;
    }
    let (Some((chain, status_addr)), Ok(header)) = (&request.chain, &request.header) else {
        return None;
    };
    expect_lengths(chain, Some(HEADER_SIZE), None).ok()?;
    let len = chain.writable_len;
    let [_, _, _, _, _, _, _, _, s @ ..] = *header;
    let offset = byte_range(&backend.disk, u64::from_le_bytes(s), len).ok()?;
    let written = u32::try_from(len).ok()?;
    let slices = guest_slices(mem, &chain.writable, 0, len).ok()?;
    if !backend.disk.read_at_nowait(&slices, offset) {
        return None;
    }
    mem.write_obj(VIRTIO_BLK_S_OK as u8, *status_addr).ok()?;
    bump(&backend.counters.read_requests, 1);
    bump(&backend.counters.read_bytes, len);
    Some(written + 1)
}

/// Runs the request in `descriptors` (one chain) and returns its used
/// length. Never fails: errors become the status byte.
#[cfg(test)]
pub(crate) fn process<I>(descriptors: I, mem: &GuestMemory, backend: &Backend) -> u32
where
    I: IntoIterator<Item = Descriptor>,
{
    complete(&prepare(descriptors, mem), mem, backend)
}

/// The request type field of a header.
fn request_type(header: &[u8; HEADER_SIZE as usize]) -> u32 {
    u32::from_le_bytes([header[0], header[1], header[2], header[3]])
}

/// Copies the 16-byte header out of guest memory.
fn read_header(
    chain: &Chain,
    mem: &GuestMemory,
) -> Result<[u8; HEADER_SIZE as usize], &'static str> {
    if let Some(defect) = chain.defect {
        return Err(defect);
    }
    if chain.readable_len < HEADER_SIZE {
        return Err("header shorter than 16 bytes");
    }
    let mut header = [0u8; HEADER_SIZE as usize];
    copy_from_guest(mem, &chain.readable, 0, &mut header)
        .map_err(|_| "header outside guest memory")?;
    Ok(header)
}

/// Splits the chain into readable and writable segments and takes the
/// status byte off the end; `None` when there is no writable byte for it.
fn collect<I>(descriptors: I, mem: &GuestMemory) -> Option<(Chain, GuestAddress)>
where
    I: IntoIterator<Item = Descriptor>,
{
    let mut chain = Chain::default();
    for (count, desc) in descriptors.into_iter().enumerate() {
        if count >= MAX_DESCRIPTORS {
            chain.defect = Some("too many descriptors");
        }
        if desc.len() == 0 {
            continue;
        }
        let seg = Segment {
            addr: desc.addr(),
            len: u64::from(desc.len()),
        };
        if !GuestMemoryBackend::check_range(mem, seg.addr, desc.len() as usize) {
            chain.defect = Some("buffer outside guest memory");
        }
        if desc.is_write_only() {
            chain.writable_len += seg.len;
            chain.writable.push(seg);
        } else {
            if !chain.writable.is_empty() {
                chain.defect = Some("device-readable buffer after a device-writable one");
            }
            chain.readable_len += seg.len;
            chain.readable.push(seg);
        }
    }
    let last = chain.writable.last_mut()?;
    let status_addr = last.addr.checked_add(last.len - 1)?;
    if !GuestMemoryBackend::check_range(mem, status_addr, 1) {
        return None;
    }
    last.len -= 1;
    if last.len == 0 {
        chain.writable.pop();
    }
    chain.writable_len -= 1;
    Some((chain, status_addr))
}

/// Runs a collected request; returns the data bytes written to the guest.
fn execute(
    chain: &Chain,
    header: &[u8; HEADER_SIZE as usize],
    mem: &GuestMemory,
    backend: &Backend,
) -> Result<u32, RequestError> {
    let [_, _, _, _, _, _, _, _, s @ ..] = *header;
    let request_type = request_type(header);
    let sector = u64::from_le_bytes(s);
    let disk = &backend.disk;
    let counters = &backend.counters;
    match request_type {
        VIRTIO_BLK_T_IN => {
            expect_lengths(chain, Some(HEADER_SIZE), None)?;
            let len = chain.writable_len;
            let offset = byte_range(disk, sector, len)?;
            let written =
                u32::try_from(len).map_err(|_| RequestError::Malformed("request too large"))?;
            let slices = guest_slices(mem, &chain.writable, 0, len)?;
            disk.read_at(&slices, offset).map_err(RequestError::Io)?;
            bump(&counters.read_requests, 1);
            bump(&counters.read_bytes, len);
            Ok(written)
        }
        VIRTIO_BLK_T_OUT => {
            expect_lengths(chain, None, Some(0))?;
            writable_disk(disk)?;
            let len = chain.readable_len - HEADER_SIZE;
            let offset = byte_range(disk, sector, len)?;
            if offset == 0 && len > 0 && disk.guards_sector0() {
                write_sector0_checked(chain, mem, backend, len)?;
            } else {
                let slices = guest_slices(mem, &chain.readable, HEADER_SIZE, len)?;
                disk.write_at(&slices, offset).map_err(RequestError::Io)?;
            }
            bump(&counters.write_requests, 1);
            bump(&counters.write_bytes, len);
            Ok(0)
        }
        VIRTIO_BLK_T_FLUSH => {
            // Device-readable bytes after the header are ignored: firmware
            // (rust-hypervisor-firmware) sends FLUSH with a stale data
            // descriptor between header and status.
            expect_lengths(chain, None, Some(0))?;
            if !disk.readonly() {
                disk.flush().map_err(RequestError::Io)?;
            }
            bump(&counters.flush_requests, 1);
            Ok(0)
        }
        VIRTIO_BLK_T_GET_ID => {
            expect_lengths(chain, Some(HEADER_SIZE), None)?;
            let len = chain.writable_len.min(ID_BYTES as u64) as usize;
            if len == 0 {
                return Err(RequestError::Malformed("GET_ID without a buffer"));
            }
            copy_to_guest(mem, &chain.writable, &backend.id[..len])?;
            bump(&counters.get_id_requests, 1);
            // len <= 20.
            Ok(len as u32)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            discard_or_zero(chain, mem, backend, request_type == VIRTIO_BLK_T_DISCARD)?;
            Ok(0)
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

/// Checks the readable and writable byte counts (status excluded) where
/// the request type fixes them.
fn expect_lengths(
    chain: &Chain,
    readable: Option<u64>,
    writable: Option<u64>,
) -> Result<(), RequestError> {
    if readable.is_some_and(|n| n != chain.readable_len) {
        return Err(RequestError::Malformed(
            "device-readable data where none belongs",
        ));
    }
    if writable.is_some_and(|n| n != chain.writable_len) {
        return Err(RequestError::Malformed(
            "device-writable data where none belongs",
        ));
    }
    Ok(())
}

/// Writes `len` bytes at sector 0 unless their first sector would be
/// detected as another format; that sector goes from a host copy.
fn write_sector0_checked(
    chain: &Chain,
    mem: &GuestMemory,
    backend: &Backend,
    len: u64,
) -> Result<(), RequestError> {
    let mut first = [0u8; SECTOR_SIZE as usize];
    copy_from_guest(mem, &chain.readable, HEADER_SIZE, &mut first)?;
    if let Some(format) = format::sector0_format(&first) {
        let counters = &backend.counters;
        if counters
            .sector0_writes_refused
            .fetch_add(1, Ordering::Relaxed)
            == 0
        {
            eprintln!(
                "zvmm: disk {}: refused a guest write that would make sector 0 look like {format} \
                 (the raw format was detected, not given; image_type=raw allows such writes)",
                backend.disk.path().display()
            );
        }
        return Err(RequestError::Sector0(format));
    }
    let mut slices = vec![VolatileSlice::from(&mut first[..])];
    let rest = len - SECTOR_SIZE;
    slices.extend(guest_slices(
        mem,
        &chain.readable,
        HEADER_SIZE + SECTOR_SIZE,
        rest,
    )?);
    backend.disk.write_at(&slices, 0).map_err(RequestError::Io)
}

fn writable_disk(disk: &DiskImage) -> Result<(), RequestError> {
    if disk.readonly() {
        return Err(RequestError::ReadOnly);
    }
    Ok(())
}

/// The byte offset of `len` bytes at `sector`, checked to be whole sectors
/// within the disk.
fn byte_range(disk: &DiskImage, sector: u64, len: u64) -> Result<u64, RequestError> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::Malformed("data length not a multiple of 512"));
    }
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(RequestError::OutOfRange)?;
    let end = offset.checked_add(len).ok_or(RequestError::OutOfRange)?;
    if end > disk.size() {
        return Err(RequestError::OutOfRange);
    }
    Ok(offset)
}

/// Runs a DISCARD or WRITE_ZEROES request's segments.
fn discard_or_zero(
    chain: &Chain,
    mem: &GuestMemory,
    backend: &Backend,
    discard: bool,
) -> Result<(), RequestError> {
    expect_lengths(chain, None, Some(0))?;
    writable_disk(&backend.disk)?;
    let payload = chain.readable_len - HEADER_SIZE;
    if payload == 0 || !payload.is_multiple_of(SEGMENT_SIZE) {
        return Err(RequestError::Malformed(
            "segments not a multiple of 16 bytes",
        ));
    }
    if payload / SEGMENT_SIZE > MAX_DISCARD_SEGMENTS {
        return Err(RequestError::Malformed(
            "more segments than max_discard_seg",
        ));
    }
    let mut raw = [0u8; SEGMENT_SIZE as usize];
    copy_from_guest(mem, &chain.readable, HEADER_SIZE, &mut raw)?;
    let [s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, f0, f1, f2, f3] = raw;
    let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
    let sectors = u32::from_le_bytes([n0, n1, n2, n3]);
    let flags = u32::from_le_bytes([f0, f1, f2, f3]);
    let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
    if discard && flags != 0 {
        // Virtio 1.2 §5.2.6.2: the unmap flag (or any other) on a discard.
        return Err(RequestError::Unsupported(flags));
    }
    if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
        return Err(RequestError::Unsupported(flags));
    }
    if sectors > MAX_DISCARD_SECTORS {
        return Err(RequestError::OutOfRange);
    }
    let len = u64::from(sectors) * SECTOR_SIZE;
    let offset = byte_range(&backend.disk, sector, len)?;
    let counters = &backend.counters;
    if discard {
        backend
            .disk
            .discard(offset, len)
            .map_err(RequestError::Io)?;
        bump(&counters.discard_requests, 1);
    } else {
        backend
            .disk
            .write_zeroes(offset, len, unmap)
            .map_err(RequestError::Io)?;
        bump(&counters.write_zeroes_requests, 1);
    }
    Ok(())
}

/// The guest memory of `len` bytes starting `skip` bytes into `segments`.
fn guest_slices<'m>(
    mem: &'m GuestMemory,
    segments: &[Segment],
    mut skip: u64,
    mut len: u64,
) -> Result<Vec<VolatileSlice<'m>>, RequestError> {
    let mut slices = Vec::with_capacity(segments.len());
    for seg in segments {
        if len == 0 {
            break;
        }
        if skip >= seg.len {
            skip -= seg.len;
            continue;
        }
        let take = (seg.len - skip).min(len);
        let addr = seg.addr.unchecked_add(skip);
        // `take` is at most a descriptor length (u32), so it fits usize.
        for slice in GuestMemoryBackend::get_slices(mem, addr, take as usize) {
            slices.push(slice.map_err(RequestError::Memory)?);
        }
        skip = 0;
        len -= take;
    }
    if len != 0 {
        return Err(RequestError::Malformed("buffers shorter than the request"));
    }
    Ok(slices)
}

fn copy_from_guest(
    mem: &GuestMemory,
    segments: &[Segment],
    skip: u64,
    buf: &mut [u8],
) -> Result<(), RequestError> {
    let mut done = 0;
    for slice in guest_slices(mem, segments, skip, buf.len() as u64)? {
        done += slice.copy_to(&mut buf[done..]);
    }
    Ok(())
}

fn copy_to_guest(mem: &GuestMemory, segments: &[Segment], data: &[u8]) -> Result<(), RequestError> {
    let mut done = 0;
    for slice in guest_slices(mem, segments, 0, data.len() as u64)? {
        slice.copy_from(&data[done..done + slice.len()]);
        done += slice.len();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::testing::*;
    use crate::virtio::block::ImageType;

    const MIB: u64 = 1 << 20;

    fn backend(image: &Image, readonly: bool) -> Backend {
        Backend {
            disk: Arc::new(open_image(&image.path, readonly, None)),
            id: *b"test-serial-0123456\0",
            counters: Arc::new(BlockCounters::default()),
        }
    }

    fn run(mem: &GuestMemory, backend: &Backend, descs: &[Desc]) -> (u32, u8) {
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let used = process(chain(mem, descs), mem, backend);
        (used, byte_at(mem, STATUS))
    }

    fn counter(backend: &Backend, name: &str) -> u64 {
        let all = backend.counters.snapshot();
        all.iter().find(|(n, _)| *n == name).unwrap().1
    }

    fn write_sectors(mem: &GuestMemory, b: &Backend, sector: u64, data: &[u8]) -> (u32, u8) {
        header(mem, HEADER, VIRTIO_BLK_T_OUT, sector);
        mem.write_slice(data, GuestAddress(DATA)).unwrap();
        let descs = [r(HEADER, 16), r(DATA, data.len() as u32), w(STATUS, 1)];
        run(mem, b, &descs)
    }

    fn read_sectors(mem: &GuestMemory, b: &Backend, sector: u64, len: u32) -> (u32, u8, Vec<u8>) {
        header(mem, HEADER, VIRTIO_BLK_T_IN, sector);
        let (used, status) = run(mem, b, &[r(HEADER, 16), w(DATA, len), w(STATUS, 1)]);
        (used, status, bytes_at(mem, DATA, len as usize))
    }

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    #[test]
    fn write_then_read_round_trips_at_several_sectors() {
        let image = Image::new(MIB);
        let (mem, b) = (memory(), backend(&image, false));
        let last = MIB / 512 - 1;
        for (seed, sector) in [(1u8, 0u64), (2, 1), (3, 7), (4, 1000), (5, last)] {
            let data = pattern(seed, 512);
            assert_eq!(write_sectors(&mem, &b, sector, &data), (1, OK));
            let offset = (sector * 512) as usize;
            assert_eq!(&image.contents()[offset..offset + 512], &data[..]);
            mem.write_slice(&[0u8; 512], GuestAddress(DATA)).unwrap();
            assert_eq!(read_sectors(&mem, &b, sector, 512), (513, OK, data));
        }
        assert_eq!(counter(&b, "write_requests"), 5);
        assert_eq!(counter(&b, "read_bytes"), 5 * 512);
    }

    #[test]
    fn multi_descriptor_requests_use_byte_streams() {
        let image = Image::new(MIB);
        let (mem, b) = (memory(), backend(&image, false));
        let data = pattern(9, 2048);
        // Header split 8 + 8, data in three pieces at scattered addresses.
        header(&mem, HEADER, VIRTIO_BLK_T_OUT, 3);
        mem.write_slice(&data[..512], GuestAddress(DATA)).unwrap();
        mem.write_slice(&data[512..1536], GuestAddress(DATA + 0x4000))
            .unwrap();
        mem.write_slice(&data[1536..], GuestAddress(DATA + 0x9000))
            .unwrap();
        let descs = [
            r(HEADER, 8),
            r(HEADER + 8, 8),
            r(DATA, 512),
            r(DATA + 0x4000, 1024),
            r(DATA + 0x9000, 512),
            w(STATUS, 1),
        ];
        assert_eq!(run(&mem, &b, &descs), (1, OK));
        assert_eq!(&image.contents()[3 * 512..3 * 512 + 2048], &data[..]);
        // Read it back with the status byte sharing the last data buffer.
        header(&mem, HEADER, VIRTIO_BLK_T_IN, 3);
        let status = DATA + 0x20000 + 1024;
        let descs = [
            r(HEADER, 16),
            w(DATA + 0x10000, 1024),
            w(DATA + 0x20000, 1025),
        ];
        assert_eq!(process(chain(&mem, &descs), &mem, &b), 2049);
        assert_eq!(byte_at(&mem, status), OK);
        assert_eq!(bytes_at(&mem, DATA + 0x10000, 1024), &data[..1024]);
        assert_eq!(bytes_at(&mem, DATA + 0x20000, 1024), &data[1024..]);
    }

    #[test]
    fn indirect_chains_are_followed() {
        use virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;
        use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
        use virtio_queue::mock::{DescriptorTable, MockSplitQueue};
        use virtio_queue::{Queue, QueueOwnedT};

        let image = Image::new(MIB);
        let (mem, b) = (memory(), backend(&image, false));
        let data = pattern(2, 1024);
        std::fs::write(
            &image.path,
            [data.clone(), vec![0; MIB as usize - 1024]].concat(),
        )
        .unwrap();
        header(&mem, HEADER, VIRTIO_BLK_T_IN, 0);
        let table_addr = HEADER + 0x1000;
        let table = DescriptorTable::new(&mem, GuestAddress(table_addr), 3);
        for (i, desc) in raw(&[r(HEADER, 16), w(DATA, 1024), w(STATUS, 1)], 0)
            .into_iter()
            .enumerate()
        {
            table.store(i as u16, desc).unwrap();
        }
        let vq = MockSplitQueue::new(&mem, 16);
        let flags = VRING_DESC_F_INDIRECT as u16;
        let head = RawDescriptor::from(SplitDescriptor::new(table_addr, 3 * 16, flags, 0));
        vq.add_desc_chains(&[head], 0).unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        let chain = queue.iter(&mem).unwrap().next().unwrap();
        assert_eq!(process(chain, &mem, &b), 1025);
        assert_eq!(byte_at(&mem, STATUS), OK);
        assert_eq!(bytes_at(&mem, DATA, 1024), data);
    }

    #[test]
    fn flush_succeeds_and_is_counted() {
        let image = Image::new(MIB);
        let (mem, b) = (memory(), backend(&image, false));
        header(&mem, HEADER, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(run(&mem, &b, &[r(HEADER, 16), w(STATUS, 1)]), (1, OK));
        assert_eq!(counter(&b, "flush_requests"), 1);
    }

    #[test]
    fn flush_ignores_a_stale_readable_data_descriptor() {
        let image = Image::new(MIB);
        let (mem, b) = (memory(), backend(&image, false));
        header(&mem, HEADER, VIRTIO_BLK_T_FLUSH, 0);
        let stale = [r(HEADER, 16), r(DATA, 512), w(STATUS, 1)];
        assert_eq!(run(&mem, &b, &stale), (1, OK));
        assert_eq!(counter(&b, "flush_requests"), 1);
        // Device-writable data still has no place in a FLUSH.
        let writable = [r(HEADER, 16), w(DATA, 512), w(STATUS, 1)];
        assert_eq!(run(&mem, &b, &writable), (1, IOERR));
        assert_eq!(counter(&b, "flush_requests"), 1);
    }

    #[test]
    fn get_id_writes_twenty_bytes() {
        let image = Image::new(MIB);
        let (mem, b) = (memory(), backend(&image, false));
        header(&mem, HEADER, VIRTIO_BLK_T_GET_ID, 0);
        let (used, status) = run(&mem, &b, &[r(HEADER, 16), w(DATA, 20), w(STATUS, 1)]);
        assert_eq!((used, status), (21, OK));
        assert_eq!(bytes_at(&mem, DATA, 20), b"test-serial-0123456\0");
    }

    #[test]
    fn discard_punches_a_hole() {
        let image = Image::new(MIB);
        let (mem, b) = (memory(), backend(&image, false));
        let data = pattern(7, 64 * 1024);
        assert_eq!(write_sectors(&mem, &b, 0, &data), (1, OK));
        b.disk.flush().unwrap();
        let before = image.blocks();
        assert!(
            before >= 128,
            "writing 64 KiB allocated only {before} blocks"
        );
        header(&mem, HEADER, VIRTIO_BLK_T_DISCARD, 0);
        segment(&mem, HEADER + 16, 0, 128, 0);
        assert_eq!(run(&mem, &b, &[r(HEADER, 32), w(STATUS, 1)]), (1, OK));
        let after = image.blocks();
        assert!(
            after + 128 <= before,
            "discard left {after} of {before} blocks: /tmp must support punch-hole"
        );
        assert_eq!(counter(&b, "discard_requests"), 1);
    }

    #[test]
    fn write_zeroes_with_unmap_reads_zero_and_stays_sparse() {
        let image = Image::new(MIB);
        let (mem, b) = (memory(), backend(&image, false));
        assert_eq!(write_sectors(&mem, &b, 8, &pattern(3, 32 * 1024)), (1, OK));
        b.disk.flush().unwrap();
        let before = image.blocks();
        header(&mem, HEADER, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        segment(&mem, HEADER + 16, 8, 64, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        assert_eq!(
            run(&mem, &b, &[r(HEADER, 16), r(HEADER + 16, 16), w(STATUS, 1)]),
            (1, OK)
        );
        assert!(image.contents().iter().all(|&x| x == 0));
        assert!(
            image.blocks() + 64 <= before,
            "write-zeroes with unmap kept the blocks"
        );
        assert_eq!(image.contents().len() as u64, MIB);
    }

    #[test]
    fn write_zeroes_without_unmap_reads_zero() {
        let image = Image::new(MIB);
        let (mem, b) = (memory(), backend(&image, false));
        assert_eq!(write_sectors(&mem, &b, 0, &pattern(4, 4096)), (1, OK));
        header(&mem, HEADER, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        segment(&mem, HEADER + 16, 1, 6, 0);
        assert_eq!(run(&mem, &b, &[r(HEADER, 32), w(STATUS, 1)]), (1, OK));
        let contents = image.contents();
        assert_eq!(&contents[..512], &pattern(4, 4096)[..512]);
        assert!(contents[512..3584].iter().all(|&x| x == 0));
        assert_eq!(&contents[3584..4096], &pattern(4, 4096)[3584..]);
        assert_eq!(counter(&b, "write_zeroes_requests"), 1);
    }

    #[test]
    fn discard_and_write_zeroes_flags_are_checked() {
        let image = Image::new(MIB);
        let (mem, b) = (memory(), backend(&image, false));
        header(&mem, HEADER, VIRTIO_BLK_T_DISCARD, 0);
        segment(&mem, HEADER + 16, 0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        assert_eq!(run(&mem, &b, &[r(HEADER, 32), w(STATUS, 1)]), (1, UNSUPP));
        header(&mem, HEADER, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        segment(&mem, HEADER + 16, 0, 8, 2);
        assert_eq!(run(&mem, &b, &[r(HEADER, 32), w(STATUS, 1)]), (1, UNSUPP));
        // Two segments exceed max_discard_seg; a partial one is malformed.
        segment(&mem, HEADER + 16, 0, 8, 0);
        segment(&mem, HEADER + 32, 8, 8, 0);
        assert_eq!(run(&mem, &b, &[r(HEADER, 48), w(STATUS, 1)]), (1, IOERR));
        assert_eq!(run(&mem, &b, &[r(HEADER, 24), w(STATUS, 1)]), (1, IOERR));
        // Beyond the disk, and more than max_discard_sectors.
        segment(&mem, HEADER + 16, MIB / 512 - 4, 8, 0);
        assert_eq!(run(&mem, &b, &[r(HEADER, 32), w(STATUS, 1)]), (1, IOERR));
        segment(&mem, HEADER + 16, 0, MAX_DISCARD_SECTORS + 1, 0);
        assert_eq!(run(&mem, &b, &[r(HEADER, 32), w(STATUS, 1)]), (1, IOERR));
    }

    #[test]
    fn readonly_disk_refuses_writes_and_keeps_the_file() {
        let image = Image::new(MIB);
        std::fs::write(&image.path, pattern(5, MIB as usize)).unwrap();
        let (mem, b) = (memory(), backend(&image, true));
        assert_eq!(write_sectors(&mem, &b, 0, &[0u8; 512]), (1, IOERR));
        for request_type in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            header(&mem, HEADER, request_type, 0);
            segment(&mem, HEADER + 16, 0, 8, 0);
            assert_eq!(run(&mem, &b, &[r(HEADER, 32), w(STATUS, 1)]), (1, IOERR));
        }
        assert_eq!(image.contents(), pattern(5, MIB as usize));
        assert_eq!(read_sectors(&mem, &b, 0, 512).1, OK);
        assert_eq!(counter(&b, "io_errors"), 3);
    }

    #[test]
    fn sectors_beyond_the_disk_are_refused() {
        let image = Image::new(MIB);
        let (mem, b) = (memory(), backend(&image, false));
        let sectors = MIB / 512;
        assert_eq!(read_sectors(&mem, &b, sectors, 512).1, IOERR);
        assert_eq!(read_sectors(&mem, &b, sectors - 1, 1024).1, IOERR);
        assert_eq!(write_sectors(&mem, &b, sectors, &[1u8; 512]), (1, IOERR));
        // sector * 512 and offset + len overflow u64.
        assert_eq!(read_sectors(&mem, &b, u64::MAX, 512).1, IOERR);
        assert_eq!(read_sectors(&mem, &b, u64::MAX / 512, 512).1, IOERR);
        assert_eq!(image.contents().len() as u64, MIB);
    }

    #[test]
    fn bad_directions_and_lengths_are_ioerr() {
        let image = Image::new(MIB);
        let (mem, b) = (memory(), backend(&image, false));
        // IN whose data buffer is device-readable.
        header(&mem, HEADER, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            run(&mem, &b, &[r(HEADER, 16), r(DATA, 512), w(STATUS, 1)]),
            (1, IOERR)
        );
        // OUT whose data buffer is device-writable.
        header(&mem, HEADER, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            run(&mem, &b, &[r(HEADER, 16), w(DATA, 512), w(STATUS, 1)]),
            (1, IOERR)
        );
        // A readable buffer after a writable one.
        let descs = [
            r(HEADER, 16),
            w(DATA, 512),
            r(DATA + 0x1000, 512),
            w(STATUS, 1),
        ];
        assert_eq!(run(&mem, &b, &descs), (1, IOERR));
        // Data not a multiple of 512, header short.
        assert_eq!(read_sectors(&mem, &b, 0, 511).1, IOERR);
        assert_eq!(run(&mem, &b, &[r(HEADER, 12), w(STATUS, 1)]), (1, IOERR));
        // Buffers outside guest memory.
        let outside = MEM_SIZE as u64 + 0x1000;
        assert_eq!(
            run(&mem, &b, &[r(HEADER, 16), w(outside, 512), w(STATUS, 1)]),
            (1, IOERR)
        );
        assert_eq!(counter(&b, "io_errors"), 6);
        assert_eq!(counter(&b, "read_requests"), 0);
    }

    #[test]
    fn chains_without_a_status_byte_are_returned_empty() {
        let image = Image::new(MIB);
        let (mem, b) = (memory(), backend(&image, false));
        header(&mem, HEADER, VIRTIO_BLK_T_FLUSH, 0);
        // No writable descriptor at all; the "status" is device-readable.
        assert_eq!(run(&mem, &b, &[r(HEADER, 16), r(STATUS, 1)]), (0, 0xff));
        // A single zero-length descriptor.
        assert_eq!(run(&mem, &b, &[w(STATUS, 0)]), (0, 0xff));
        // A status byte outside guest memory.
        let outside = MEM_SIZE as u64;
        assert_eq!(
            process(chain(&mem, &[r(HEADER, 16), w(outside, 1)]), &mem, &b),
            0
        );
        assert_eq!(counter(&b, "invalid_chains"), 3);
    }

    #[test]
    fn unknown_types_are_unsupported() {
        let image = Image::new(MIB);
        let (mem, b) = (memory(), backend(&image, false));
        for request_type in [2, 3, 14, 0x8000_0000] {
            header(&mem, HEADER, request_type, 0);
            assert_eq!(run(&mem, &b, &[r(HEADER, 16), w(STATUS, 1)]), (1, UNSUPP));
        }
        assert_eq!(counter(&b, "unsupported"), 4);
    }

    #[test]
    fn too_many_descriptors_are_ioerr() {
        let image = Image::new(MIB);
        let (mem, b) = (memory(), backend(&image, false));
        header(&mem, HEADER, VIRTIO_BLK_T_IN, 0);
        let mut descs = vec![r(HEADER, 16)];
        descs.extend((0..MAX_DESCRIPTORS as u64).map(|i| w(DATA + i * 512, 512)));
        descs.push(w(STATUS, 1));
        let status_ok = process(descriptors(&descs), &mem, &b);
        assert_eq!(status_ok, 1);
        assert_eq!(byte_at(&mem, STATUS), IOERR);
        descs.drain(1..3);
        assert_eq!(
            process(descriptors(&descs), &mem, &b),
            (MAX_DESCRIPTORS as u32 - 2) * 512 + 1
        );
        assert_eq!(byte_at(&mem, STATUS), OK);
    }

    /// First sectors that would be detected as another format.
    fn foreign_sector0s() -> Vec<Vec<u8>> {
        let mut vdi = vec![0u8; 512];
        vdi[0x40..0x44].copy_from_slice(&0xbeda_107fu32.to_le_bytes());
        [
            &b"QFI\xfb\0\0\0\x03"[..],
            b"QFI\xfb\0\0\0\x01",
            b"KDMV",
            b"# Disk DescriptorFile",
            b"vhdxfile",
            b"conectix",
            b"QED\0",
            &vdi,
        ]
        .iter()
        .map(|magic| {
            let mut sector = vec![0u8; 512];
            sector[..magic.len()].copy_from_slice(magic);
            sector
        })
        .collect()
    }

    #[test]
    fn sector0_writes_that_would_change_the_format_are_refused() {
        let image = Image::new(MIB);
        let (mem, b) = (memory(), backend(&image, false));
        assert!(b.disk.guards_sector0());
        let foreign = foreign_sector0s();
        for sector in &foreign {
            assert_eq!(write_sectors(&mem, &b, 0, sector), (1, IOERR));
            // Followed by more data in the same request: refused too.
            let long = [sector.clone(), pattern(1, 4096)].concat();
            assert_eq!(write_sectors(&mem, &b, 0, &long), (1, IOERR));
        }
        assert_eq!(image.contents(), vec![0; MIB as usize]);
        assert_eq!(
            counter(&b, "sector0_writes_refused"),
            2 * foreign.len() as u64
        );
        assert_eq!(counter(&b, "write_requests"), 0);
        // The same bytes elsewhere, and ordinary sector-0 writes, go through.
        assert_eq!(write_sectors(&mem, &b, 1, &foreign[0]), (1, OK));
        let boot = pattern(2, 2048);
        assert_eq!(write_sectors(&mem, &b, 0, &boot), (1, OK));
        assert_eq!(&image.contents()[..2048], &boot[..]);
        // Zeroing sector 0 is harmless.
        header(&mem, HEADER, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        segment(&mem, HEADER + 16, 0, 1, 0);
        assert_eq!(run(&mem, &b, &[r(HEADER, 32), w(STATUS, 1)]), (1, OK));
        let info = crate::virtio::block::format::detect(&image.path).unwrap();
        assert_eq!(info.format, crate::virtio::block::ImageFormat::Raw);
    }

    #[test]
    fn a_checked_sector0_is_written_from_the_checked_copy() {
        let image = Image::new(MIB);
        let (mem, b) = (memory(), backend(&image, false));
        // Sector 0 split over three descriptors, then two more sectors.
        let data = pattern(4, 1536);
        header(&mem, HEADER, VIRTIO_BLK_T_OUT, 0);
        mem.write_slice(&data[..100], GuestAddress(DATA)).unwrap();
        mem.write_slice(&data[100..512], GuestAddress(DATA + 0x1000))
            .unwrap();
        mem.write_slice(&data[512..], GuestAddress(DATA + 0x2000))
            .unwrap();
        let descs = [
            r(HEADER, 16),
            r(DATA, 100),
            r(DATA + 0x1000, 412),
            r(DATA + 0x2000, 1024),
            w(STATUS, 1),
        ];
        assert_eq!(run(&mem, &b, &descs), (1, OK));
        assert_eq!(&image.contents()[..1536], &data[..]);
        // A qcow2 magic split across descriptors is still seen.
        mem.write_slice(b"QF", GuestAddress(DATA)).unwrap();
        mem.write_slice(b"I\xfb\0\0\0\x03", GuestAddress(DATA + 2))
            .unwrap();
        let split = [r(HEADER, 16), r(DATA, 2), r(DATA + 2, 510), w(STATUS, 1)];
        assert_eq!(run(&mem, &b, &split), (1, IOERR));
        assert_eq!(&image.contents()[..1536], &data[..]);
    }

    #[test]
    fn a_raw_type_given_or_a_qcow2_image_has_no_sector0_guard() {
        let image = Image::new(MIB);
        let forced = Backend {
            disk: Arc::new(open_image(&image.path, false, Some(ImageType::Raw))),
            id: [0; ID_BYTES],
            counters: Arc::new(BlockCounters::default()),
        };
        let mem = memory();
        let qcow2 = foreign_sector0s().remove(0);
        assert_eq!(write_sectors(&mem, &forced, 0, &qcow2), (1, OK));
        assert_eq!(counter(&forced, "sector0_writes_refused"), 0);
        drop(forced);
        // The write landed: the file now reads as (a broken) qcow2.
        let info = crate::virtio::block::format::detect(&image.path).unwrap();
        assert_eq!(info.format, crate::virtio::block::ImageFormat::Qcow2);
        // A qcow2 guest's sector 0 is data inside the image, never a header.
        let dir = image.path.parent().unwrap();
        let path = dir.join("q.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "1M"]);
        let q = Backend {
            disk: Arc::new(open_image(&path, false, None)),
            id: [0; ID_BYTES],
            counters: Arc::new(BlockCounters::default()),
        };
        assert_eq!(write_sectors(&mem, &q, 0, &qcow2), (1, OK));
        assert_eq!(read_sectors(&mem, &q, 0, 512), (513, OK, qcow2));
    }
}
