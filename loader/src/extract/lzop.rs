//! The lzop container, as Linux's `CONFIG_KERNEL_LZO` payload uses it
//! (`lzop -9` output): header parsing, the block loop with its optional
//! Adler-32/CRC-32 checksums, and LZO1X decompression of each block through
//! the `lzo` crate. Every length read from the stream is checked against the
//! bytes left and the output limit before it is used.
//!
//! The format, as written by lzop 1.0x (all integers big-endian):
//! - magic `89 4c 5a 4f 00 0d 0a 1a 0a`;
//! - header: version u16, library version u16, [version >= 0x0940: version
//!   needed to extract u16], method u8, [>= 0x0940: level u8], flags u32,
//!   [flags & F_H_FILTER: filter u32], mode u32, mtime low u32, [>= 0x0940:
//!   mtime high u32], name length u8, name, then a checksum of the header
//!   from the version on (CRC-32 with F_H_CRC32, Adler-32 otherwise);
//!   [flags & F_H_EXTRA_FIELD: length u32, data, checksum u32];
//! - blocks: uncompressed size u32 (0 ends the stream), compressed size u32,
//!   checksums of the uncompressed data (F_ADLER32_D, F_CRC32_D), and, when
//!   the block is compressed (smaller than its uncompressed size), checksums
//!   of the compressed data (F_ADLER32_C, F_CRC32_C); then the data, stored
//!   as is when both sizes are equal.

use thiserror::Error;

/// The nine bytes an lzop stream starts with.
pub(crate) const LZOP_MAGIC: &[u8] = b"\x89LZO\0\r\n\x1a\n";

/// Header fields added by lzop 0.94.
const VERSION_0940: u16 = 0x0940;
/// Flag: Adler-32 of each block's uncompressed data.
const F_ADLER32_D: u32 = 0x0001;
/// Flag: Adler-32 of each block's compressed data.
const F_ADLER32_C: u32 = 0x0002;
/// Flag: the header has an extra field.
const F_H_EXTRA_FIELD: u32 = 0x0040;
/// Flag: CRC-32 of each block's uncompressed data.
const F_CRC32_D: u32 = 0x0100;
/// Flag: CRC-32 of each block's compressed data.
const F_CRC32_C: u32 = 0x0200;
/// Flag: the data went through a filter, which must be undone.
const F_H_FILTER: u32 = 0x0800;
/// Flag: the header checksum is a CRC-32 instead of an Adler-32.
const F_H_CRC32: u32 = 0x1000;
/// Methods whose blocks are plain LZO1X: lzo1x_1, lzo1x_1_15, lzo1x_999.
const LZO1X_METHODS: [u8; 3] = [1, 2, 3];
/// Largest block lzop writes or accepts.
const MAX_BLOCK_SIZE: u32 = 64 << 20;
/// Largest extra header field accepted.
const MAX_EXTRA_FIELD: u32 = 1 << 16;

/// Why an lzop stream could not be decompressed.
#[derive(Debug, Error)]
pub enum LzopError {
    /// The stream does not start with the lzop magic.
    #[error("not an lzop stream (bad magic)")]
    BadMagic,
    /// The stream ends inside a structure.
    #[error("lzop stream is truncated in {0}")]
    Truncated(&'static str),
    /// A method other than LZO1X.
    #[error("lzop method {0} is not LZO1X")]
    UnsupportedMethod(u8),
    /// The data went through an lzop filter.
    #[error("lzop stream uses filter {0}, which is not supported")]
    Filter(u32),
    /// The header checksum does not match.
    #[error("lzop header checksum mismatch")]
    HeaderChecksum,
    /// The extra header field is implausibly long.
    #[error("lzop extra header field of {0} bytes is too long")]
    ExtraFieldTooLong(u32),
    /// A block declares an uncompressed size above lzop's limit.
    #[error("lzop block {index} declares {size} bytes, above the 64 MiB block limit")]
    BlockTooBig {
        /// Block number, from 0.
        index: usize,
        /// Declared uncompressed size.
        size: u32,
    },
    /// A block's compressed size is 0 or above its uncompressed size.
    #[error("lzop block {index} has compressed size {compressed} for {uncompressed} bytes")]
    BadBlockSize {
        /// Block number, from 0.
        index: usize,
        /// Declared compressed size.
        compressed: u32,
        /// Declared uncompressed size.
        uncompressed: u32,
    },
    /// The LZO1X decoder rejected a block.
    #[error("lzop block {index} is corrupt")]
    Block {
        /// Block number, from 0.
        index: usize,
        /// The decoder's error.
        #[source]
        source: lzo::Error,
    },
    /// A block decompressed to fewer bytes than declared.
    #[error("lzop block {index} decompresses to {got} bytes instead of {expected}")]
    BlockShort {
        /// Block number, from 0.
        index: usize,
        /// Bytes produced.
        got: usize,
        /// Declared uncompressed size.
        expected: u32,
    },
    /// A block checksum does not match.
    #[error("lzop block {index}: {what} checksum mismatch")]
    Checksum {
        /// Block number, from 0.
        index: usize,
        /// Which checksum ("Adler-32 of the data", ...).
        what: &'static str,
    },
    /// The output would exceed the caller's limit.
    #[error("lzop output exceeds {0} bytes")]
    TooLarge(usize),
}

/// A cursor over the stream that never reads past its end.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize, what: &'static str) -> Result<&'a [u8], LzopError> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|&end| end <= self.bytes.len())
            .ok_or(LzopError::Truncated(what))?;
        let taken = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(taken)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, LzopError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, LzopError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, LzopError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// Which checksums accompany each block.
#[derive(Clone, Copy)]
struct Flags(u32);

impl Flags {
    fn has(self, flag: u32) -> bool {
        self.0 & flag != 0
    }
}

/// Decompresses an lzop stream, producing at most `limit` bytes. Bytes
/// after the end-of-stream marker (Linux appends the decompressed size) are
/// ignored.
pub fn decompress_lzop(stream: &[u8], limit: usize) -> Result<Vec<u8>, LzopError> {
    let mut reader = Reader {
        bytes: stream,
        pos: 0,
    };
    if reader.take(LZOP_MAGIC.len(), "its magic")? != LZOP_MAGIC {
        return Err(LzopError::BadMagic);
    }
    let flags = read_header(&mut reader)?;
    let mut out = Vec::new();
    for index in 0.. {
        if !read_block(&mut reader, flags, index, limit, &mut out)? {
            break;
        }
    }
    Ok(out)
}

/// Parses and checks the header (after the magic); returns its flags.
fn read_header(reader: &mut Reader<'_>) -> Result<Flags, LzopError> {
    const WHAT: &str = "its header";
    let start = reader.pos;
    let version = reader.u16(WHAT)?;
    reader.u16(WHAT)?; // library version
    if version >= VERSION_0940 {
        reader.u16(WHAT)?; // version needed to extract
    }
    let method = reader.u8(WHAT)?;
    if !LZO1X_METHODS.contains(&method) {
        return Err(LzopError::UnsupportedMethod(method));
    }
    if version >= VERSION_0940 {
        reader.u8(WHAT)?; // level
    }
    let flags = Flags(reader.u32(WHAT)?);
    if flags.has(F_H_FILTER) {
        return Err(LzopError::Filter(reader.u32(WHAT)?));
    }
    reader.take(8, WHAT)?; // mode, mtime low
    if version >= VERSION_0940 {
        reader.u32(WHAT)?; // mtime high
    }
    let name_len = reader.u8(WHAT)?;
    reader.take(usize::from(name_len), WHAT)?;
    let covered = &reader.bytes[start..reader.pos];
    let expected = reader.u32(WHAT)?;
    if checksum(flags.has(F_H_CRC32), covered) != expected {
        return Err(LzopError::HeaderChecksum);
    }
    if flags.has(F_H_EXTRA_FIELD) {
        let len = reader.u32("its extra header field")?;
        if len > MAX_EXTRA_FIELD {
            return Err(LzopError::ExtraFieldTooLong(len));
        }
        reader.take(len as usize + 4, "its extra header field")?;
    }
    Ok(flags)
}

/// Decodes block `index` onto `out`; returns false at the end marker.
fn read_block(
    reader: &mut Reader<'_>,
    flags: Flags,
    index: usize,
    limit: usize,
    out: &mut Vec<u8>,
) -> Result<bool, LzopError> {
    const WHAT: &str = "a block header";
    let uncompressed = reader.u32(WHAT)?;
    if uncompressed == 0 {
        return Ok(false);
    }
    if uncompressed > MAX_BLOCK_SIZE {
        return Err(LzopError::BlockTooBig {
            index,
            size: uncompressed,
        });
    }
    let compressed = reader.u32(WHAT)?;
    if compressed == 0 || compressed > uncompressed {
        return Err(LzopError::BadBlockSize {
            index,
            compressed,
            uncompressed,
        });
    }
    let stored = compressed == uncompressed;
    let data_sums = read_sums(reader, flags, F_ADLER32_D, F_CRC32_D)?;
    let packed_sums = if stored {
        BlockSums::default()
    } else {
        read_sums(reader, flags, F_ADLER32_C, F_CRC32_C)?
    };
    let data = reader.take(compressed as usize, "a block's data")?;
    packed_sums.verify(data, index, "compressed data")?;
    let start = out.len();
    let end = start
        .checked_add(uncompressed as usize)
        .filter(|&end| end <= limit)
        .ok_or(LzopError::TooLarge(limit))?;
    out.resize(end, 0);
    if stored {
        out[start..].copy_from_slice(data);
    } else {
        decode_block(data, &mut out[start..], index)?;
    }
    data_sums.verify(&out[start..], index, "data")?;
    Ok(true)
}

/// Decodes one LZO1X block that must fill `dest` exactly.
fn decode_block(data: &[u8], dest: &mut [u8], index: usize) -> Result<(), LzopError> {
    let got =
        lzo::decompress_into(data, dest).map_err(|source| LzopError::Block { index, source })?;
    if got != dest.len() {
        return Err(LzopError::BlockShort {
            index,
            got,
            expected: dest.len() as u32,
        });
    }
    Ok(())
}

/// The checksums stored for one part of a block.
#[derive(Default)]
struct BlockSums {
    adler32: Option<u32>,
    crc32: Option<u32>,
}

fn read_sums(
    reader: &mut Reader<'_>,
    flags: Flags,
    adler_flag: u32,
    crc_flag: u32,
) -> Result<BlockSums, LzopError> {
    const WHAT: &str = "a block checksum";
    let adler32 = match flags.has(adler_flag) {
        true => Some(reader.u32(WHAT)?),
        false => None,
    };
    let crc32 = match flags.has(crc_flag) {
        true => Some(reader.u32(WHAT)?),
        false => None,
    };
    Ok(BlockSums { adler32, crc32 })
}

impl BlockSums {
    fn verify(&self, bytes: &[u8], index: usize, part: &'static str) -> Result<(), LzopError> {
        let mismatch = |kind: &str| LzopError::Checksum {
            index,
            what: match (kind, part) {
                ("adler", "data") => "Adler-32 of the data",
                ("adler", _) => "Adler-32 of the compressed data",
                (_, "data") => "CRC-32 of the data",
                _ => "CRC-32 of the compressed data",
            },
        };
        if self.adler32.is_some_and(|sum| sum != adler32(bytes)) {
            return Err(mismatch("adler"));
        }
        if self.crc32.is_some_and(|sum| sum != crc32(bytes)) {
            return Err(mismatch("crc"));
        }
        Ok(())
    }
}

/// CRC-32 (the zlib/PNG one) when `crc`, else Adler-32.
fn checksum(crc: bool, bytes: &[u8]) -> u32 {
    if crc {
        crc32(bytes)
    } else {
        adler32(bytes)
    }
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = flate2::Crc::new();
    crc.update(bytes);
    crc.sum()
}

/// Adler-32 (RFC 1950) starting from 1, as lzop uses it.
fn adler32(bytes: &[u8]) -> u32 {
    const MOD: u32 = 65521;
    // Largest run of bytes whose sums cannot overflow u32 before the modulo.
    const RUN: usize = 5552;
    let (mut a, mut b) = (1u32, 0u32);
    for run in bytes.chunks(RUN) {
        for &byte in run {
            a += u32::from(byte);
            b += a;
        }
        a %= MOD;
        b %= MOD;
    }
    (b << 16) | a
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    /// Compresses `data` with the real `lzop` tool and `args`.
    pub(crate) fn lzop(data: &[u8], args: &[&str]) -> Vec<u8> {
        let mut child = Command::new("lzop")
            .args(args)
            .arg("-c")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run lzop ({e}); install it: apt-get install -y lzop")
            });
        let mut stdin = child.stdin.take().unwrap();
        let input = data.to_vec();
        let writer = std::thread::spawn(move || stdin.write_all(&input).unwrap());
        let output = child.wait_with_output().unwrap();
        writer.join().unwrap();
        assert!(output.status.success(), "lzop {args:?} failed");
        output.stdout
    }

    /// Compressible text, then incompressible bytes spanning more than one
    /// 256 KiB lzop block (stored as is), then text again.
    fn mixed_data() -> Vec<u8> {
        let mut data: Vec<u8> = (0..0x6_0000u32)
            .map(|i| b"kernel text "[(i % 12) as usize] ^ ((i >> 11) as u8 & 3))
            .collect();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        data.extend((0..0x9_0000).map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        }));
        data.extend((0..0x2_0000u32).map(|i| (i * 7 % 251) as u8));
        data
    }

    #[test]
    fn adler32_known_values() {
        assert_eq!(adler32(b""), 1);
        assert_eq!(adler32(b"Wikipedia"), 0x11e6_0398);
        let long = vec![0xffu8; 100_000];
        let naive = long.iter().fold((1u64, 0u64), |(a, b), &x| {
            let a = (a + u64::from(x)) % 65521;
            (a, (b + a) % 65521)
        });
        assert_eq!(adler32(&long), ((naive.1 << 16) | naive.0) as u32);
    }

    #[test]
    fn lzop_tool_output_round_trips() {
        let data = mixed_data();
        for args in [&["-9"][..], &["-1"], &["-9", "--crc32"], &["-F"]] {
            let stream = lzop(&data, args);
            let out =
                decompress_lzop(&stream, 16 << 20).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert!(out == data, "{args:?}: output differs");
        }
    }

    #[test]
    fn empty_input_and_named_file_round_trip() {
        assert_eq!(decompress_lzop(&lzop(&[], &["-9"]), 1 << 20).unwrap(), b"");
        // A named input file puts its name in the header.
        let dir = std::env::temp_dir().join(format!("zvmm-lzop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vmlinux.bin");
        std::fs::write(&path, b"named file contents ".repeat(100)).unwrap();
        let output = Command::new("lzop")
            .args(["-c", "-9"])
            .arg(&path)
            .output()
            .expect("cannot run lzop; install it: apt-get install -y lzop");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(output.status.success());
        assert!(output.stdout.windows(11).any(|w| w == b"vmlinux.bin"));
        let out = decompress_lzop(&output.stdout, 1 << 20).unwrap();
        assert_eq!(out, b"named file contents ".repeat(100));
    }

    #[test]
    fn output_limit_is_enforced() {
        let stream = lzop(&mixed_data(), &["-9"]);
        let err = decompress_lzop(&stream, 0x1000).unwrap_err();
        assert!(matches!(err, LzopError::TooLarge(0x1000)), "{err:?}");
    }

    #[test]
    fn every_truncation_is_an_error() {
        let data = b"abcabcabcabc hello hello hello ".repeat(300);
        let stream = lzop(&data, &["-9", "--crc32"]);
        for len in 0..stream.len() {
            assert!(decompress_lzop(&stream[..len], 1 << 20).is_err(), "{len}");
        }
        assert_eq!(decompress_lzop(&stream, 1 << 20).unwrap(), data);
    }

    #[test]
    fn no_single_bit_flip_gives_wrong_output() {
        let data = b"hello lzop, hello kernel; ".repeat(300);
        let stream = lzop(&data, &["-9"]);
        let mut errors = 0;
        for bit in 0..stream.len() * 8 {
            let mut bad = stream.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            // The header and data checksums catch what the decoder does not;
            // a few bits (such as the end marker's unused state bits) do not
            // matter and decode to the original.
            match decompress_lzop(&bad, 1 << 20) {
                Ok(out) => assert!(out == data, "bit {bit}: wrong output"),
                Err(_) => errors += 1,
            }
        }
        assert!(errors > stream.len() * 8 * 9 / 10, "{errors} errors");
    }

    #[test]
    fn garbage_blocks_never_panic() {
        // Without checksums, random block contents reach the LZO1X decoder.
        let data = mixed_data();
        let stream = lzop(&data[..0x1_0000], &["-F"]);
        // From stdin with -F: a 38-byte header (no name), then one block.
        let word = |at: usize| u32::from_be_bytes(stream[at..at + 4].try_into().unwrap());
        assert_eq!(word(38), 0x1_0000);
        let (data_start, data_len) = (46, word(42) as usize);
        assert_eq!(stream.len(), data_start + data_len + 4);
        let mut state = 0x9e37_79b9u32;
        let mut next = || {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            state >> 8
        };
        let mut decoded = 0;
        for _ in 0..3000 {
            let mut bad = stream.clone();
            for _ in 0..1 + next() % 8 {
                bad[data_start + next() as usize % data_len] = next() as u8;
            }
            decoded += usize::from(decompress_lzop(&bad, 1 << 20).is_ok());
        }
        assert!(decoded < 3000, "no corruption was detected");
    }

    #[test]
    fn header_and_block_problems_are_named() {
        let stream = lzop(b"some data some data some data", &["-9"]);
        let mut bad_magic = stream.clone();
        bad_magic[1] = b'X';
        assert!(matches!(
            decompress_lzop(&bad_magic, 1 << 20),
            Err(LzopError::BadMagic)
        ));
        // Byte 15 is the method when the version is >= 0x0940.
        let mut method = stream.clone();
        method[15] = 0x1a;
        assert!(matches!(
            decompress_lzop(&method, 1 << 20),
            Err(LzopError::UnsupportedMethod(0x1a))
        ));
        let mut header = stream.clone();
        header[24] ^= 0x40; // a mode bit
        assert!(matches!(
            decompress_lzop(&header, 1 << 20),
            Err(LzopError::HeaderChecksum)
        ));
        let filtered = lzop(b"0123456789", &["--filter=1"]);
        assert!(matches!(
            decompress_lzop(&filtered, 1 << 20),
            Err(LzopError::Filter(1))
        ));
    }

    #[test]
    fn bad_block_sizes_are_errors() {
        let stream = lzop(b"", &["-9"]);
        let header = &stream[..stream.len() - 4];
        let block = |words: &[u32]| {
            let mut s = header.to_vec();
            words
                .iter()
                .for_each(|w| s.extend_from_slice(&w.to_be_bytes()));
            s
        };
        let too_big = block(&[MAX_BLOCK_SIZE + 1, 10]);
        assert!(matches!(
            decompress_lzop(&too_big, usize::MAX),
            Err(LzopError::BlockTooBig { index: 0, .. })
        ));
        for words in [[16, 0], [16, 17]] {
            assert!(matches!(
                decompress_lzop(&block(&words), usize::MAX),
                Err(LzopError::BadBlockSize { index: 0, .. })
            ));
        }
        // A 16-byte block claimed to be 4 bytes compressed, with bogus data.
        let mut bogus = block(&[16, 4, adler32(&[0; 16])]);
        bogus.extend_from_slice(&[0x11, 0, 0, 0]);
        assert!(matches!(
            decompress_lzop(&bogus, usize::MAX),
            Err(LzopError::Block { index: 0, .. })
        ));
        // A valid block that decodes to fewer bytes than it declares.
        let mut short = block(&[16, 5, adler32(&[0; 16])]);
        short.extend_from_slice(&[0x12, 7, 0x11, 0, 0]);
        let err = decompress_lzop(&short, usize::MAX).unwrap_err();
        assert!(
            matches!(err, LzopError::BlockShort { got: 1, .. }),
            "{err:?}"
        );
    }
}
