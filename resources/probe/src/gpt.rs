//! The firmware mode's GUID partition table reader (UEFI 2.10 §5.3):
//! the protective MBR, the primary header at LBA 1 (signature, header CRC32,
//! `first_usable_lba` ≥ 34 as rust-hypervisor-firmware demands), and the
//! partition entries read sector by sector the way that firmware does
//! (from the entry array's LBA up to `first_usable_lba`, stopping after
//! `num_partition_entries`, skipping entries without a unique GUID). The
//! first EFI system partition is the one to boot.

use crate::fwblk::{Disk, FwError, Sector, SECTOR};
use crate::report;
use crate::serial::Quoted;

/// `EFI PART`.
const SIGNATURE: &[u8; 8] = b"EFI PART";
/// Type GUID of an EFI system partition, as stored (mixed endian).
const ESP_TYPE: [u8; 16] = [
    0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b,
];
/// The smallest `first_usable_lba` the firmware accepts.
const MIN_FIRST_USABLE: u64 = 34;
/// Bytes of one partition entry the firmware assumes (4 per sector).
const ENTRY_SIZE: usize = 128;
/// Most header bytes the CRC covers (the rest of LBA 1 is reserved).
const MAX_HEADER_SIZE: usize = SECTOR;

/// The partition to boot from.
#[derive(Clone, Copy)]
pub struct Esp {
    /// First sector.
    pub first_lba: u64,
    /// Last sector (inclusive).
    pub last_lba: u64,
}

/// Reads the GPT of `disk` and returns its first EFI system partition.
pub fn find_esp(disk: &mut Disk) -> Result<Esp, FwError> {
    let mut sector: Sector = [0; SECTOR];
    disk.read(0, &mut sector)?;
    let mbr = match (sector[510..512] == [0x55, 0xaa], sector[0x1c2]) {
        (true, 0xee) => "protective",
        (true, _) => "other",
        (false, _) => "none",
    };
    disk.read(1, &mut sector)?;
    if &sector[..8] != SIGNATURE {
        report!("fw gpt none mbr={mbr}");
        return Err(FwError::new("no_gpt"));
    }
    let header = Header::parse(&sector);
    report!(
        "fw gpt mbr={mbr} revision={:#010x} header_size={} header_crc={} disk_guid={} first_usable_lba={} last_usable_lba={} entries_lba={} entries={} entry_size={}",
        header.revision,
        header.size,
        if header.crc_ok(&sector) { "ok" } else { "bad" },
        Guid(&header.disk_guid),
        header.first_usable,
        header.last_usable,
        header.entries_lba,
        header.entries,
        header.entry_size
    );
    if header.first_usable < MIN_FIRST_USABLE {
        return Err(FwError::with("first_usable_lba", header.first_usable));
    }
    if header.entry_size as usize != ENTRY_SIZE {
        return Err(FwError::with("entry_size", u64::from(header.entry_size)));
    }
    let esp = scan_entries(disk, &header)?;
    esp.ok_or(FwError::new("no_esp"))
}

/// The header fields the firmware uses, plus the ones reported.
struct Header {
    revision: u32,
    size: u32,
    crc: u32,
    first_usable: u64,
    last_usable: u64,
    disk_guid: [u8; 16],
    entries_lba: u64,
    entries: u32,
    entry_size: u32,
}

impl Header {
    fn parse(s: &Sector) -> Header {
        let mut disk_guid = [0; 16];
        disk_guid.copy_from_slice(&s[56..72]);
        Header {
            revision: le32(s, 8),
            size: le32(s, 12),
            crc: le32(s, 16),
            first_usable: le64(s, 40),
            last_usable: le64(s, 48),
            disk_guid,
            entries_lba: le64(s, 72),
            entries: le32(s, 80),
            entry_size: le32(s, 84),
        }
    }

    /// Whether the CRC32 over the header (its CRC field as zero) matches.
    fn crc_ok(&self, sector: &Sector) -> bool {
        let len = self.size as usize;
        if !(92..=MAX_HEADER_SIZE).contains(&len) {
            return false;
        }
        let mut copy = *sector;
        copy[16..20].fill(0);
        crc32(&copy[..len]) == self.crc
    }
}

/// Reports every used entry and returns the first ESP.
fn scan_entries(disk: &mut Disk, header: &Header) -> Result<Option<Esp>, FwError> {
    let mut sector: Sector = [0; SECTOR];
    let (mut checked, mut used, mut esp) = (0u32, 0u32, None);
    for lba in header.entries_lba..header.first_usable {
        disk.read(lba, &mut sector)?;
        for entry in sector.chunks_exact(ENTRY_SIZE) {
            let index = checked;
            checked += 1;
            if entry[16..32].iter().all(|&b| b == 0) {
                continue;
            }
            used += 1;
            let (first_lba, last_lba) = (le64(entry, 32), le64(entry, 40));
            let is_esp = entry[..16] == ESP_TYPE;
            report!(
                "fw gpt partition={} type={} esp={} first_lba={first_lba} last_lba={last_lba} name={}",
                index + 1,
                Guid(&entry[..16]),
                u8::from(is_esp),
                Quoted(ascii_name(&entry[56..128]).as_slice())
            );
            if is_esp && esp.is_none() {
                esp = Some(Esp {
                    first_lba,
                    last_lba,
                });
            }
        }
        if checked >= header.entries {
            break;
        }
    }
    report!("fw gpt used={used} esp={}", u8::from(esp.is_some()));
    if let Some(esp) = esp {
        report!(
            "fw esp first_lba={} last_lba={}",
            esp.first_lba,
            esp.last_lba
        );
    }
    Ok(esp)
}

/// A UTF-16LE partition name as ASCII (others as `?`), up to its NUL.
fn ascii_name(raw: &[u8]) -> Name {
    let mut name = Name {
        bytes: [0; 36],
        len: 0,
    };
    for pair in raw.chunks_exact(2).take(36) {
        let unit = u16::from_le_bytes([pair[0], pair[1]]);
        if unit == 0 {
            break;
        }
        name.bytes[name.len] = if unit < 0x80 { unit as u8 } else { b'?' };
        name.len += 1;
    }
    name
}

/// A partition name (at most 36 characters).
struct Name {
    bytes: [u8; 36],
    len: usize,
}

impl Name {
    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Displays a stored GUID in its text form (first three fields little
/// endian): `C12A7328-F81F-11D2-BA4B-00A0C93EC93B`.
pub struct Guid<'a>(pub &'a [u8]);

impl core::fmt::Display for Guid<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let b = self.0;
        if b.len() < 16 {
            return f.write_str("?");
        }
        write!(
            f,
            "{:08X}-{:04X}-{:04X}-",
            le32(b, 0),
            u16::from_le_bytes([b[4], b[5]]),
            u16::from_le_bytes([b[6], b[7]])
        )?;
        b[8..10].iter().try_for_each(|x| write!(f, "{x:02X}"))?;
        f.write_str("-")?;
        b[10..16].iter().try_for_each(|x| write!(f, "{x:02X}"))
    }
}

/// CRC-32 (IEEE 802.3, reflected, as GPT uses), bitwise: only the
/// 92-byte header goes through it.
fn crc32(bytes: &[u8]) -> u32 {
    !bytes.iter().fold(u32::MAX, |crc, &b| {
        (0..8).fold(crc ^ u32::from(b), |c, _| {
            (c >> 1) ^ (0xedb8_8320 & (c & 1).wrapping_neg())
        })
    })
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at + 4)) << 32)
}
