//! The probe's virtio-rng report (`probe: rng slot=S read=K ...`,
//! `resources/probe/src/rng.rs`) and the checks every VMM must pass: a
//! file source gives exactly the file's bytes, in order; a random source
//! gives reads that differ and are not all zero.

use std::path::{Path, PathBuf};

use crate::probe::{fnv1a64, test_bytes, Fields, ProbeReport};

/// One `rng ... read=K` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RngRead {
    /// Bytes the read got.
    pub bytes: u64,
    /// Requests it took.
    pub requests: u64,
    /// FNV-1a of the bytes.
    pub fnv1a64: u64,
    /// Whether every byte was zero.
    pub all_zero: bool,
    /// Whether a request came back empty (the source ended).
    pub ended: bool,
}

/// The reads of the first rng device, in order.
pub fn rng_reads(report: &ProbeReport) -> Vec<RngRead> {
    report
        .values("rng slot=")
        .into_iter()
        .map(|rest| Fields::parse(&format!("slot={rest}")))
        .filter(|f| f.get("read").is_some() && f.get("bytes").is_some())
        .map(|f| RngRead {
            bytes: f.num("bytes").unwrap_or(u64::MAX),
            requests: f.num("requests").unwrap_or(0),
            fnv1a64: f.num("fnv1a64").unwrap_or(0),
            all_zero: f.num("all_zero") != Some(0),
            ended: f.num("ended") == Some(1),
        })
        .collect()
}

/// Writes `len` known bytes to `dir/entropy.bin`; returns the path and
/// the bytes.
pub fn source_file(dir: &Path, len: usize) -> (PathBuf, Vec<u8>) {
    let path = dir.join("entropy.bin");
    let bytes = test_bytes(len, 0x5eed_4e47);
    std::fs::write(&path, &bytes).unwrap();
    (path, bytes)
}

/// Checks that `reads` of `per_read` bytes each are the consecutive
/// chunks of `file` (the last one shorter, and marked ended, when the
/// file runs out).
pub fn check_file_reads(reads: &[RngRead], file: &[u8], per_read: usize, context: &str) {
    assert!(!reads.is_empty(), "no rng reads: {context}");
    for (index, read) in reads.iter().enumerate() {
        let start = (index * per_read).min(file.len());
        let end = (start + per_read).min(file.len());
        let chunk = &file[start..end];
        assert_eq!(read.bytes, chunk.len() as u64, "read {index}: {context}");
        assert_eq!(read.fnv1a64, fnv1a64(chunk), "read {index}: {context}");
        assert_eq!(
            read.ended,
            chunk.len() < per_read,
            "read {index}: {context}"
        );
    }
}

/// Checks that two reads of `per_read` bytes from a random source are
/// full, differ and are not all zero.
pub fn check_random_reads(reads: &[RngRead], per_read: u64, context: &str) {
    assert_eq!(reads.len(), 2, "{context}");
    for read in reads {
        assert_eq!(read.bytes, per_read, "{context}");
        assert!(!read.all_zero, "{context}");
        assert!(!read.ended, "{context}");
    }
    assert_ne!(reads[0].fnv1a64, reads[1].fnv1a64, "{context}");
}
