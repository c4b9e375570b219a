//! Unpacking a bzImage into the ELF vmlinux inside it (`zvmm kernel
//! extract`): locating the compressed payload from the setup header,
//! recognising its compression by magic, decompressing it with pure-Rust
//! decoders, and checking the result is an ELF64 x86_64 image.

pub mod lzop;

use std::fmt;
use std::io::{self, Read};

use crate::kernel::{
    check_elf64_x86_64, has_boot_header, parse_setup_header, setup_size, ElfProblem, ELF_MAGIC,
};

/// A compression method of a Linux kernel payload (or of a whole file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// gzip (deflate).
    Gzip,
    /// bzip2.
    Bzip2,
    /// Legacy `.lzma` (LZMA "alone").
    Lzma,
    /// xz (LZMA2, usually with the x86 BCJ filter in kernels).
    Xz,
    /// lzop.
    Lzo,
    /// LZ4, legacy or frame format.
    Lz4,
    /// Zstandard.
    Zstd,
}

impl Compression {
    /// Recognises a compressed stream by its first bytes.
    pub fn from_magic(bytes: &[u8]) -> Option<Self> {
        const MAGICS: [(&[u8], Compression); 9] = [
            (&[0x1f, 0x8b], Compression::Gzip),
            (&[0x1f, 0x9e], Compression::Gzip),
            (b"BZh", Compression::Bzip2),
            (&[0x5d, 0x00, 0x00], Compression::Lzma),
            (b"\xfd7zXZ\0", Compression::Xz),
            (lzop::LZOP_MAGIC, Compression::Lzo),
            (&LZ4_LEGACY_MAGIC.to_le_bytes(), Compression::Lz4),
            (&LZ4_FRAME_MAGIC.to_le_bytes(), Compression::Lz4),
            (&[0x28, 0xb5, 0x2f, 0xfd], Compression::Zstd),
        ];
        MAGICS
            .iter()
            .find(|(magic, _)| bytes.starts_with(magic))
            .map(|&(_, method)| method)
    }

    /// The command that decompresses a file of this kind to stdout.
    pub fn cat_tool(&self) -> &'static str {
        match self {
            Compression::Gzip => "zcat",
            Compression::Bzip2 => "bzcat",
            Compression::Lzma => "lzcat",
            Compression::Xz => "xzcat",
            Compression::Lzo => "lzop -dc",
            Compression::Lz4 => "lz4cat",
            Compression::Zstd => "zstdcat",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Compression::Gzip => "gzip",
            Compression::Bzip2 => "bzip2",
            Compression::Lzma => "lzma",
            Compression::Xz => "xz",
            Compression::Lzo => "lzo",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        };
        f.write_str(name)
    }
}

/// Why a vmlinux could not be extracted from a bzImage.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    /// No Linux boot header.
    #[error("not a bzImage (no \"HdrS\" boot header at 0x202)")]
    NotBzImage,
    /// The file ends inside the setup header.
    #[error("bzImage is truncated: its setup header is cut short")]
    Truncated,
    /// The boot protocol predates the payload fields.
    #[error("bzImage uses boot protocol {version}, which does not locate its payload; 2.08 or later is needed")]
    TooOld {
        /// The boot protocol version, "major.minor".
        version: String,
    },
    /// payload_offset/payload_length point outside the file.
    #[error("bzImage payload [{start:#x}, {end:#x}) lies outside the {size}-byte file; the file is truncated or corrupt")]
    PayloadOutOfBounds {
        /// File offset of the payload.
        start: u64,
        /// End of the payload.
        end: u64,
        /// File size.
        size: usize,
    },
    /// The payload's compression is not recognised.
    #[error("bzImage payload has an unknown compression (starts with {head})")]
    UnknownCompression {
        /// Hex dump of the payload's first bytes.
        head: String,
    },
    /// The decoder failed.
    #[error("cannot decompress the {method} payload of the bzImage; it is corrupt")]
    Decompress {
        /// The compression.
        method: Compression,
        /// The decoder's error.
        #[source]
        source: io::Error,
    },
    /// The output exceeds the size limit.
    #[error("decompressed kernel exceeds {} MiB", MAX_VMLINUX_SIZE >> 20)]
    TooLarge,
    /// The output size differs from the one the bzImage records.
    #[error("decompressed kernel is {got} bytes but the bzImage records {expected}; the payload is corrupt")]
    SizeMismatch {
        /// Bytes decompressed.
        got: usize,
        /// Size recorded in the payload's last four bytes.
        expected: u32,
    },
    /// The output is not an ELF64 x86_64 image.
    #[error("decompressed payload is not an ELF64 x86_64 vmlinux: {what}")]
    NotElf {
        /// What it is instead.
        what: String,
    },
}

/// Largest vmlinux `extract_vmlinux` produces.
pub const MAX_VMLINUX_SIZE: usize = 512 << 20;
/// Oldest boot protocol with payload_offset/payload_length.
const PAYLOAD_PROTOCOL: u16 = 0x0208;
/// Magic of Linux's legacy LZ4 format (`lz4 -l`).
const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
/// Magic of the LZ4 frame format.
const LZ4_FRAME_MAGIC: u32 = 0x184d_2204;
/// Largest decompressed block of the legacy LZ4 format.
const LZ4_LEGACY_BLOCK_SIZE: usize = 8 << 20;
/// Largest LZMA dictionary accepted, in KiB (the kernel uses 64 MiB at most).
const LZMA_MEM_LIMIT_KIB: u32 = 1 << 20;
/// Largest zstd window accepted.
const ZSTD_MAX_WINDOW: u64 = 1 << 30;
/// Number of payload bytes shown for an unknown compression.
const HEAD_SHOWN: usize = 8;

/// The compression of a bzImage's payload.
pub fn payload_compression(bzimage: &[u8]) -> Result<Compression, ExtractError> {
    detect(payload(bzimage)?)
}

/// Decompresses the vmlinux ELF image embedded in `bzimage`.
pub fn extract_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>, ExtractError> {
    let payload = payload(bzimage)?;
    let method = detect(payload)?;
    // Linux appends the decompressed size (for gzip: the trailer's ISIZE).
    let tail = &payload[payload.len() - 4..];
    let expected = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
    let vmlinux = decompress(method, payload, expected as usize)?;
    if vmlinux.len() as u64 & u64::from(u32::MAX) != u64::from(expected) {
        return Err(ExtractError::SizeMismatch {
            got: vmlinux.len(),
            expected,
        });
    }
    check_elf(&vmlinux)?;
    Ok(vmlinux)
}

/// The compressed payload, located by the setup header.
pub(crate) fn payload(bzimage: &[u8]) -> Result<&[u8], ExtractError> {
    if !has_boot_header(bzimage) {
        return Err(ExtractError::NotBzImage);
    }
    let hdr = parse_setup_header(bzimage).ok_or(ExtractError::Truncated)?;
    let version = hdr.version;
    if version < PAYLOAD_PROTOCOL {
        return Err(ExtractError::TooOld {
            version: format!("{}.{:02}", version >> 8, version & 0xff),
        });
    }
    let start = setup_size(&hdr) + u64::from(hdr.payload_offset);
    let end = start + u64::from(hdr.payload_length);
    let out_of_bounds = ExtractError::PayloadOutOfBounds {
        start,
        end,
        size: bzimage.len(),
    };
    if hdr.payload_length < 4 {
        return Err(out_of_bounds);
    }
    let (Ok(start), Ok(end)) = (usize::try_from(start), usize::try_from(end)) else {
        return Err(out_of_bounds);
    };
    bzimage.get(start..end).ok_or(out_of_bounds)
}

fn detect(payload: &[u8]) -> Result<Compression, ExtractError> {
    Compression::from_magic(payload).ok_or_else(|| {
        let head: Vec<String> = payload
            .iter()
            .take(HEAD_SHOWN)
            .map(|b| format!("{b:02x}"))
            .collect();
        ExtractError::UnknownCompression {
            head: head.join(" "),
        }
    })
}

/// Decompresses `payload`; `size_hint` (the recorded size) only sizes the
/// first allocation.
fn decompress(
    method: Compression,
    payload: &[u8],
    size_hint: usize,
) -> Result<Vec<u8>, ExtractError> {
    let failed = |source| ExtractError::Decompress { method, source };
    let capacity = size_hint.min(MAX_VMLINUX_SIZE);
    match method {
        Compression::Gzip => read_all(flate2::bufread::GzDecoder::new(payload), capacity),
        Compression::Bzip2 => read_all(bzip2::read::BzDecoder::new(payload), capacity),
        Compression::Xz => read_all(lzma_rust2::XzReader::new(payload, false), capacity),
        Compression::Lzma => {
            let reader = lzma_rust2::LzmaReader::new_mem_limit(payload, LZMA_MEM_LIMIT_KIB, None)
                .map_err(failed)?;
            read_all(reader, capacity)
        }
        Compression::Zstd => {
            let reader = ruzstd::decoding::StreamingDecoder::new_with_max_window_size(
                payload,
                ZSTD_MAX_WINDOW,
            )
            .map_err(|e| failed(io::Error::new(io::ErrorKind::InvalidData, e)))?;
            read_all(reader, capacity)
        }
        Compression::Lz4 if payload.starts_with(&LZ4_FRAME_MAGIC.to_le_bytes()) => {
            read_all(lz4_flex::frame::FrameDecoder::new(payload), capacity)
        }
        Compression::Lz4 => decompress_lz4_legacy(payload, capacity),
        Compression::Lzo => {
            lzop::decompress_lzop(payload, MAX_VMLINUX_SIZE).map_err(|err| match err {
                lzop::LzopError::TooLarge(_) => DecodeError::TooLarge,
                other => DecodeError::Io(io::Error::new(io::ErrorKind::InvalidData, other)),
            })
        }
    }
    .map_err(|err| match err {
        DecodeError::Io(source) => failed(source),
        DecodeError::TooLarge => ExtractError::TooLarge,
    })
}

/// A decoder failure, or output past `MAX_VMLINUX_SIZE`.
enum DecodeError {
    Io(io::Error),
    TooLarge,
}

impl From<io::Error> for DecodeError {
    fn from(err: io::Error) -> Self {
        DecodeError::Io(err)
    }
}

/// Reads a decoder to its end, up to `MAX_VMLINUX_SIZE` bytes.
fn read_all<R: Read>(reader: R, capacity: usize) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::with_capacity(capacity);
    reader
        .take(MAX_VMLINUX_SIZE as u64 + 1)
        .read_to_end(&mut out)?;
    if out.len() > MAX_VMLINUX_SIZE {
        return Err(DecodeError::TooLarge);
    }
    Ok(out)
}

/// Decodes Linux's legacy LZ4 format: the magic, then blocks each preceded
/// by its little-endian compressed size, decompressing to at most 8 MiB.
/// A magic may recur (concatenated streams); a final lone word is the size
/// Linux appends.
fn decompress_lz4_legacy(payload: &[u8], capacity: usize) -> Result<Vec<u8>, DecodeError> {
    let invalid = |msg: String| DecodeError::Io(io::Error::new(io::ErrorKind::InvalidData, msg));
    let mut out = Vec::with_capacity(capacity);
    let mut rest = payload;
    while let Some((word, after)) = rest.split_first_chunk::<4>() {
        let word = u32::from_le_bytes(*word);
        if word == LZ4_LEGACY_MAGIC {
            rest = after;
            continue;
        }
        if after.is_empty() {
            break;
        }
        let len = word as usize;
        let block = after
            .get(..len)
            .ok_or_else(|| invalid(format!("lz4 block of {len} bytes runs past the payload")))?;
        let start = out.len();
        if start > MAX_VMLINUX_SIZE {
            return Err(DecodeError::TooLarge);
        }
        out.resize(start + LZ4_LEGACY_BLOCK_SIZE, 0);
        let written = lz4_flex::block::decompress_into(block, &mut out[start..])
            .map_err(|e| invalid(format!("lz4 block at output offset {start}: {e}")))?;
        out.truncate(start + written);
        rest = &after[len..];
    }
    if out.len() > MAX_VMLINUX_SIZE {
        return Err(DecodeError::TooLarge);
    }
    Ok(out)
}

fn check_elf(vmlinux: &[u8]) -> Result<(), ExtractError> {
    let what = if !vmlinux.starts_with(ELF_MAGIC) {
        "it does not start with the ELF magic".to_string()
    } else {
        match check_elf64_x86_64(vmlinux) {
            Ok(()) => return Ok(()),
            Err(ElfProblem::Truncated) => "it is shorter than an ELF header".to_string(),
            Err(ElfProblem::Class32) => "it is a 32-bit ELF".to_string(),
            Err(ElfProblem::BigEndian) => "it is a big-endian ELF".to_string(),
            Err(ElfProblem::Arch(arch)) => format!("it is an ELF for {arch}"),
            Err(ElfProblem::BadIdent) => "its ELF class or data encoding is invalid".to_string(),
        }
    };
    Err(ExtractError::NotElf { what })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::testimg::{BzImageBuilder, ElfBuilder};
    use std::io::Write;

    /// A small vmlinux: an ELF64 x86_64 image followed by fake relocations,
    /// varied enough that the compressors produce real matches and literals.
    fn vmlinux() -> Vec<u8> {
        let code: Vec<u8> = (0..0x1_0000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 & 0x3f)
            .collect();
        let mut image = ElfBuilder::new(0x100_0000).code(&code).bss(0x1000).build();
        image.extend((0..0x400u32).flat_map(|i| (i * 8).to_le_bytes()));
        image
    }

    fn with_size(mut compressed: Vec<u8>, data: &[u8]) -> Vec<u8> {
        compressed.extend_from_slice(&(data.len() as u32).to_le_bytes());
        compressed
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn bzip2(data: &[u8]) -> Vec<u8> {
        let mut enc = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::best());
        enc.write_all(data).unwrap();
        with_size(enc.finish().unwrap(), data)
    }

    /// xz as the kernel builds it: CRC32 check, x86 BCJ filter, LZMA2.
    fn xz(data: &[u8]) -> Vec<u8> {
        let mut options = lzma_rust2::XzOptions::with_preset(6);
        options.set_check_sum_type(lzma_rust2::CheckType::Crc32);
        options.filters = vec![lzma_rust2::FilterConfig::new_bcj_x86(0)];
        let mut enc = lzma_rust2::XzWriter::new(Vec::new(), options).unwrap();
        enc.write_all(data).unwrap();
        with_size(enc.finish().unwrap(), data)
    }

    /// `.lzma` as `lzma -9` writes it from a pipe: unknown size, end marker.
    fn lzma(data: &[u8]) -> Vec<u8> {
        let options = lzma_rust2::LzmaOptions::with_preset(6);
        let mut enc = lzma_rust2::LzmaWriter::new_use_header(Vec::new(), &options, None).unwrap();
        enc.write_all(data).unwrap();
        with_size(enc.finish().unwrap(), data)
    }

    /// Linux's legacy LZ4: magic, then [size][block] for each `block_size`
    /// chunk, then the appended decompressed size.
    fn lz4_legacy(data: &[u8], block_size: usize) -> Vec<u8> {
        let mut out = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in data.chunks(block_size) {
            let block = lz4_flex::block::compress(chunk);
            out.extend_from_slice(&(block.len() as u32).to_le_bytes());
            out.extend_from_slice(&block);
        }
        with_size(out, data)
    }

    fn zstd(data: &[u8]) -> Vec<u8> {
        let compressed =
            ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest);
        with_size(compressed, data)
    }

    fn bzimage(payload: &[u8]) -> Vec<u8> {
        BzImageBuilder::new(payload).build()
    }

    #[test]
    fn every_supported_compression_round_trips() {
        let elf = vmlinux();
        let cases = [
            (Compression::Gzip, gzip(&elf)),
            (Compression::Bzip2, bzip2(&elf)),
            (Compression::Xz, xz(&elf)),
            (Compression::Lzma, lzma(&elf)),
            (Compression::Lz4, lz4_legacy(&elf, LZ4_LEGACY_BLOCK_SIZE)),
            (Compression::Zstd, zstd(&elf)),
        ];
        for (method, payload) in cases {
            assert!(payload.len() < elf.len(), "{method} did not compress");
            let image = bzimage(&payload);
            assert_eq!(payload_compression(&image).unwrap(), method);
            let out = extract_vmlinux(&image).unwrap_or_else(|e| panic!("{method}: {e}"));
            assert!(out == elf, "{method}: output differs from the input");
        }
    }

    #[test]
    fn lz4_legacy_with_many_blocks_and_repeated_magic() {
        let elf = vmlinux();
        let mut payload = lz4_legacy(&elf[..0x8000], 0x1000);
        payload.truncate(payload.len() - 4);
        let second = lz4_legacy(&elf[0x8000..], 0x3000);
        payload.extend_from_slice(&second[..second.len() - 4]);
        let payload = with_size(payload, &elf);
        assert_eq!(extract_vmlinux(&bzimage(&payload)).unwrap(), elf);
    }

    #[test]
    fn lz4_frame_format_is_accepted() {
        let elf = vmlinux();
        let mut enc = lz4_flex::frame::FrameEncoder::new(Vec::new());
        enc.write_all(&elf).unwrap();
        let payload = with_size(enc.finish().unwrap(), &elf);
        assert_eq!(extract_vmlinux(&bzimage(&payload)).unwrap(), elf);
    }

    #[test]
    fn truncated_lz4_block_is_an_error() {
        let elf = vmlinux();
        let payload = lz4_legacy(&elf, 0x4000);
        let cut = [&payload[..payload.len() / 2], &[0u8; 4][..]].concat();
        let err = extract_vmlinux(&bzimage(&cut)).unwrap_err();
        assert!(
            matches!(
                err,
                ExtractError::Decompress {
                    method: Compression::Lz4,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn corrupt_payloads_are_errors() {
        let elf = vmlinux();
        for (method, mut payload) in [
            (Compression::Gzip, gzip(&elf)),
            (Compression::Xz, xz(&elf)),
            (Compression::Zstd, zstd(&elf)),
        ] {
            let middle = payload.len() / 2;
            payload[middle..middle + 16].fill(0xff);
            let err = extract_vmlinux(&bzimage(&payload)).unwrap_err();
            assert!(
                matches!(
                    err,
                    ExtractError::Decompress { .. } | ExtractError::SizeMismatch { .. }
                ),
                "{method}: {err:?}"
            );
        }
    }

    #[test]
    fn wrong_recorded_size_is_an_error() {
        let elf = vmlinux();
        let mut payload = zstd(&elf);
        let len = payload.len();
        payload[len - 4..].copy_from_slice(&7u32.to_le_bytes());
        let err = extract_vmlinux(&bzimage(&payload)).unwrap_err();
        assert!(
            matches!(err, ExtractError::SizeMismatch { expected: 7, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn non_elf_payload_is_refused() {
        let data = b"this is not an ELF file, just some text".repeat(20);
        let err = extract_vmlinux(&bzimage(&gzip(&data))).unwrap_err();
        assert!(matches!(err, ExtractError::NotElf { .. }), "{err:?}");
        let arm = ElfBuilder::new(0x100_0000)
            .code(&[0; 64])
            .machine(183)
            .build();
        let err = extract_vmlinux(&bzimage(&gzip(&arm))).unwrap_err();
        assert!(err.to_string().contains("aarch64"), "{err}");
    }

    /// The kernel's LZO payload: `lzop -9` output plus the appended size.
    fn lzo(data: &[u8]) -> Vec<u8> {
        with_size(lzop::tests::lzop(data, &["-9"]), data)
    }

    #[test]
    fn lzo_payload_round_trips() {
        let elf = vmlinux();
        let payload = lzo(&elf);
        assert!(payload.len() < elf.len(), "lzo did not compress");
        let image = bzimage(&payload);
        assert_eq!(payload_compression(&image).unwrap(), Compression::Lzo);
        assert_eq!(extract_vmlinux(&image).unwrap(), elf);
    }

    #[test]
    fn corrupt_or_truncated_lzo_payload_is_an_error() {
        let elf = vmlinux();
        let payload = lzo(&elf);
        let mut corrupt = payload.clone();
        let middle = corrupt.len() / 2;
        corrupt[middle..middle + 8].fill(0x55);
        let truncated = with_size(payload[..payload.len() / 3].to_vec(), &elf);
        for bad in [corrupt, truncated] {
            let err = extract_vmlinux(&bzimage(&bad)).unwrap_err();
            assert!(
                matches!(
                    err,
                    ExtractError::Decompress {
                        method: Compression::Lzo,
                        ..
                    }
                ),
                "{err:?}"
            );
            assert!(err.to_string().contains("lzo payload"), "{err}");
        }
    }

    #[test]
    fn unknown_compression_shows_bytes() {
        let err = extract_vmlinux(&bzimage(&[0xde, 0xad, 0xbe, 0xef, 0, 0])).unwrap_err();
        assert!(err.to_string().contains("de ad be ef"), "{err}");
    }

    #[test]
    fn header_problems_are_errors() {
        let err = extract_vmlinux(&[0u8; 0x1000]).unwrap_err();
        assert!(matches!(err, ExtractError::NotBzImage), "{err:?}");
        let image = bzimage(&gzip(&vmlinux()));
        let err = extract_vmlinux(&image[..0x220]).unwrap_err();
        assert!(matches!(err, ExtractError::Truncated), "{err:?}");
        let old = BzImageBuilder::new(&gzip(&vmlinux()))
            .version(0x0207)
            .build();
        let err = extract_vmlinux(&old).unwrap_err();
        assert!(matches!(err, ExtractError::TooOld { .. }), "{err:?}");
        let err = extract_vmlinux(&image[..image.len() - 0x100]).unwrap_err();
        assert!(
            matches!(err, ExtractError::PayloadOutOfBounds { .. }),
            "{err:?}"
        );
        let tiny = BzImageBuilder::new(&[0; 16])
            .payload_window(0x240, 2)
            .build();
        let err = extract_vmlinux(&tiny).unwrap_err();
        assert!(
            matches!(err, ExtractError::PayloadOutOfBounds { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn magic_detection() {
        assert_eq!(
            Compression::from_magic(&[0x1f, 0x8b, 8]),
            Some(Compression::Gzip)
        );
        assert_eq!(
            Compression::from_magic(b"\x02\x21\x4c\x18"),
            Some(Compression::Lz4)
        );
        assert_eq!(
            Compression::from_magic(&[0x5d, 0, 0, 0, 4]),
            Some(Compression::Lzma)
        );
        assert_eq!(Compression::from_magic(b"\x7fELF"), None);
        assert_eq!(Compression::from_magic(&[]), None);
    }
}
