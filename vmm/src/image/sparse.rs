//! Sparse-file primitives under `zvmm image`: where a file's data and
//! holes are (`SEEK_DATA`/`SEEK_HOLE`), in-kernel copies
//! (`copy_file_range`), positional reads and writes, and making a block
//! device range read as zeroes while writing as little as possible.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use vmm_sys_util::fallocate::{fallocate, FallocateMode};

/// What a file holds at some offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Region {
    /// Bytes stored in the file (or an extent the file system cannot
    /// tell apart from data).
    Data,
    /// A hole: reads as zeroes, occupies no space.
    Hole,
}

/// The region of `file` at `offset` and where it ends (at most `end`).
/// Files or devices that cannot say (no `SEEK_DATA`) are all data.
pub fn region_at(file: &File, offset: u64, end: u64) -> io::Result<(Region, u64)> {
    debug_assert!(offset < end);
    match seek(file, offset, libc::SEEK_DATA) {
        Ok(data) if data > offset => Ok((Region::Hole, data.min(end))),
        Ok(_) => {
            let hole = seek(file, offset, libc::SEEK_HOLE)?;
            Ok((Region::Data, hole.clamp(offset + 1, end)))
        }
        // No data at or after `offset`: a hole to the end of the file.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok((Region::Hole, end)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok((Region::Data, end)),
        Err(e) => Err(e),
    }
}

fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<u64> {
    let offset = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: lseek only moves the file offset of a descriptor `file` owns;
    // every read and write here is positional, so nothing depends on it.
    let at = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if at < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(at as u64)
}

/// Copies `len` bytes from `src` at `src_offset` to `dst` at `dst_offset`
/// inside the kernel. `Unsupported` when this pair of files cannot (a
/// block device, another file system): the caller reads and writes.
pub fn copy_in_kernel(
    src: &File,
    src_offset: u64,
    dst: &File,
    dst_offset: u64,
    len: u64,
) -> io::Result<()> {
    let (mut from, mut to) = (as_off(src_offset)?, as_off(dst_offset)?);
    let mut left = len;
    while left > 0 {
        let chunk = usize::try_from(left).unwrap_or(usize::MAX);
        // SAFETY: both descriptors are open for the whole call; the kernel
        // reads and updates only the two offsets we pass by pointer.
        let copied = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut from,
                dst.as_raw_fd(),
                &mut to,
                chunk,
                0,
            )
        };
        match copied {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n if n > 0 => left -= n as u64,
            _ => {
                let error = io::Error::last_os_error();
                return match error.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(
                        libc::EXDEV | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS | libc::EBADF,
                    ) if left == len => Err(io::ErrorKind::Unsupported.into()),
                    _ => Err(error),
                };
            }
        }
    }
    Ok(())
}

fn as_off(offset: u64) -> io::Result<i64> {
    i64::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput.into())
}

/// Fills `buf` from `file` at `offset`; bytes past the end of the file
/// read as zeroes.
pub fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether every byte of `buf` is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: any bytes are a valid u64; align_to keeps the rest in
        // `head` and `tail`.
        unsafe { buf.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// How a block device range was made to read as zeroes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Zeroed {
    /// Bytes the device zeroed itself (`fallocate(PUNCH_HOLE)`: discard
    /// or write-zeroes with unmap, which guarantees zeroes).
    pub by_device: u64,
    /// Bytes that already read as zeroes and were left alone.
    pub already_zero: u64,
    /// Bytes written with zeroes.
    pub written: u64,
}

/// Makes `len` bytes of block device `device` at `offset` read as zeroes:
/// the device zeroes them itself where it can (the kernel turns
/// `fallocate(PUNCH_HOLE|KEEP_SIZE)` on a block device into a discard or
/// write-zeroes that guarantees zeroes, and refuses rather than writing
/// them when the device cannot); else chunks that already read as zeroes
/// are skipped and only the others written. `scratch` is the chunk buffer.
pub fn zero_device_range(
    device: &File,
    offset: u64,
    len: u64,
    scratch: &mut [u8],
) -> io::Result<Zeroed> {
    if len == 0 {
        return Ok(Zeroed::default());
    }
    if fallocate(device, FallocateMode::PunchHole, true, offset, len).is_ok() {
        return Ok(Zeroed {
            by_device: len,
            ..Zeroed::default()
        });
    }
    zero_where_needed(device, offset, len, scratch)
}

/// Writes zeroes over the chunks of the range that do not read as zeroes.
fn zero_where_needed(
    device: &File,
    offset: u64,
    len: u64,
    scratch: &mut [u8],
) -> io::Result<Zeroed> {
    let mut zeroed = Zeroed::default();
    let end = offset + len;
    let mut at = offset;
    while at < end {
        let chunk = (end - at).min(scratch.len() as u64) as usize;
        let buf = &mut scratch[..chunk];
        read_full(device, buf, at)?;
        if is_zero(buf) {
            zeroed.already_zero += chunk as u64;
        } else {
            buf.fill(0);
            device.write_all_at(buf, at)?;
            zeroed.written += chunk as u64;
        }
        at += chunk as u64;
    }
    Ok(zeroed)
}

/// Bytes a file occupies on its file system (`st_blocks` × 512).
pub fn allocated_bytes(meta: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    meta.blocks().saturating_mul(512)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn sparse_file(name: &str, size: u64, data_at: &[u64]) -> (File, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("zvmm-sparse-{name}-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(size).unwrap();
        for &at in data_at {
            file.write_all_at(&vec![0xa5; MIB as usize], at).unwrap();
        }
        (file, path)
    }

    #[test]
    fn regions_follow_the_written_megabytes() {
        let (file, path) = sparse_file("regions", 8 * MIB, &[2 * MIB, 5 * MIB]);
        let mut regions = Vec::new();
        let mut at = 0;
        while at < 8 * MIB {
            let (region, end) = region_at(&file, at, 8 * MIB).unwrap();
            regions.push((region, at / MIB, end / MIB));
            at = end;
        }
        std::fs::remove_file(path).unwrap();
        assert_eq!(
            regions,
            [
                (Region::Hole, 0, 2),
                (Region::Data, 2, 3),
                (Region::Hole, 3, 5),
                (Region::Data, 5, 6),
                (Region::Hole, 6, 8),
            ]
        );
    }

    #[test]
    fn region_ends_are_clamped_to_the_range() {
        let (file, path) = sparse_file("clamp", 4 * MIB, &[0]);
        let data = region_at(&file, 4096, 8192).unwrap();
        let hole = region_at(&file, 2 * MIB, 3 * MIB).unwrap();
        std::fs::remove_file(path).unwrap();
        assert_eq!(data, (Region::Data, 8192));
        assert_eq!(hole, (Region::Hole, 3 * MIB));
    }

    #[test]
    fn kernel_copy_moves_the_bytes() {
        let (src, src_path) = sparse_file("copy-src", 2 * MIB, &[MIB]);
        let (dst, dst_path) = sparse_file("copy-dst", 2 * MIB, &[]);
        copy_in_kernel(&src, MIB, &dst, 4096, MIB).unwrap();
        let mut back = vec![0u8; MIB as usize];
        read_full(&dst, &mut back, 4096).unwrap();
        std::fs::remove_file(src_path).unwrap();
        std::fs::remove_file(dst_path).unwrap();
        assert!(back.iter().all(|&b| b == 0xa5));
    }

    #[test]
    fn reads_past_the_end_are_zeroes() {
        let (file, path) = sparse_file("eof", 4096, &[]);
        file.write_all_at(&[7; 4096], 0).unwrap();
        let mut buf = vec![1u8; 8192];
        read_full(&file, &mut buf, 0).unwrap();
        std::fs::remove_file(path).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 7));
        assert!(is_zero(&buf[4096..]));
    }

    #[test]
    fn zeroing_writes_only_chunks_that_are_not_zero() {
        let (file, path) = sparse_file("zero", 4 * MIB, &[MIB]);
        let mut scratch = vec![0u8; MIB as usize];
        let zeroed = zero_where_needed(&file, 0, 4 * MIB, &mut scratch).unwrap();
        let mut back = vec![1u8; 4 * MIB as usize];
        read_full(&file, &mut back, 0).unwrap();
        std::fs::remove_file(path).unwrap();
        assert_eq!(zeroed.written, MIB);
        assert_eq!(zeroed.already_zero, 3 * MIB);
        assert!(is_zero(&back));
    }

    #[test]
    fn zeroing_a_file_range_punches_a_hole() {
        let (file, path) = sparse_file("punch", 2 * MIB, &[0, MIB]);
        let mut scratch = vec![0u8; 4096];
        let zeroed = zero_device_range(&file, 0, MIB, &mut scratch).unwrap();
        let first = region_at(&file, 0, 2 * MIB).unwrap();
        std::fs::remove_file(path).unwrap();
        assert_eq!(zeroed.by_device, MIB);
        assert_eq!(first, (Region::Hole, MIB));
    }

    #[test]
    fn zero_detection_sees_one_stray_byte() {
        let mut buf = vec![0u8; 4099];
        assert!(is_zero(&buf));
        for at in [0, 7, 2048, 4098] {
            buf[at] = 1;
            assert!(!is_zero(&buf), "byte {at}");
            buf[at] = 0;
        }
        assert!(is_zero(&buf[1..]));
    }
}
