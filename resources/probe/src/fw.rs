//! Firmware mode (`probe.mode=firmware`): the probe behaves like
//! rust-hypervisor-firmware entered through PVH and reports what such
//! firmware would find. No ACPI, no interrupts, no SMP: it checks the start
//! info the way the firmware reads it (version ≥ 1, command line, RSDP,
//! memory map types ≤ 5), writes to COM1 polling THRE (NUL bytes too, as its
//! EFI console does), reads the CMOS clock (EFI GetTime), then tries each
//! modern virtio-blk on bus 0 in slot order ([`fwblk`]: 0xCF8 only, BARs as
//! the VMM left them, one polled 16-entry queue): GPT ([`gpt`]), the FAT32
//! EFI system partition ([`fat`]), the files named by `probe.fw.file=`
//! (size and FNV-1a 64), what the firmware would boot (the boot loader spec
//! entry of `/loader/loader.conf`, else `\EFI\BOOT\BOOTX64.EFI`) and a FLUSH
//! with the firmware's stale middle descriptor.
//!
//! Success: `fw result=ok`, then the probe goes on like the OS the firmware
//! would start (ACPI, power-off). Failure: `fw error stage=S reason=R`,
//! then it halts for good, as the firmware does after a panic; the VMM must
//! stay in control (`--timeout`, `vm.shutdown`).

use crate::boot::{BootInfo, Protocol};
use crate::fat::{self, Entry, Volume};
use crate::fwblk::{self, Disk, FwError, SECTOR};
use crate::io::{inb, outb};
use crate::serial::{self, Quoted};
use crate::{fnv1a64_update, gpt, io, report, FNV_OFFSET_BASIS};

/// The command-line word that selects the mode.
const MODE: &[u8] = b"probe.mode=firmware";
/// Most `probe.fw.file=` options kept.
const MAX_FILES: usize = 4;
/// Largest loader.conf / entry file the firmware reads.
const CONF_MAX: usize = 4096;
/// Largest e820 type the firmware accepts (it panics on others).
const MAX_E820_TYPE: u32 = 5;
/// NUL bytes written to COM1 (the firmware's EFI console writes many).
const NUL_BYTES: usize = 64;
/// Root directory entries reported.
const ROOT_LISTED: usize = 32;
const EFI_BOOT_PATH: &[u8] = b"/EFI/BOOT/BOOTX64.EFI";
const LOADER_CONF: &[u8] = b"/loader/loader.conf";
const ENTRIES_DIR: &[u8] = b"/loader/entries";

/// Whether the command line asks for firmware mode.
pub fn requested(boot: &BootInfo) -> bool {
    words(boot.cmdline.unwrap_or(&[])).any(|w| w == MODE)
}

fn words(cmdline: &'static [u8]) -> impl Iterator<Item = &'static [u8]> {
    cmdline.split(|&b| b == b' ').filter(|w| !w.is_empty())
}

/// Runs the firmware mode; returns only on success.
pub fn run(boot: &BootInfo) {
    report!("fw mode=firmware");
    let mut files: [&[u8]; MAX_FILES] = [&[]; MAX_FILES];
    let mut file_count = 0;
    for word in words(boot.cmdline.unwrap_or(&[])) {
        if let Some(path) = word.strip_prefix(b"probe.fw.file=") {
            match files.get_mut(file_count) {
                Some(slot) => {
                    *slot = path;
                    file_count += 1;
                }
                None => report!("fw option ignored={}", Quoted(word)),
            }
        }
    }
    if let Err(err) = start_info(boot) {
        fail("start_info", err);
    }
    serial_facts();
    cmos_time();
    let (slots, count) = fwblk::scan();
    report!("fw pci virtio_blk={count}");
    let booted = slots[..count]
        .iter()
        .any(|&slot| try_disk(slot, &files[..file_count]));
    if !booted {
        fail("boot", FwError::new("no_bootable_disk"));
    }
    report!("fw result=ok tx_stalls={}", serial::tx_stalls());
}

/// Reports the failure and halts, as the firmware does after a panic.
fn fail(stage: &str, err: FwError) -> ! {
    report!("fw error stage={stage} {err}");
    report!("fw halt");
    io::halt_forever()
}

/// The start info as the firmware reads it (`src/pvh.rs` of its source).
fn start_info(boot: &BootInfo) -> Result<(), FwError> {
    let (Protocol::Pvh, Some(version)) = (boot.protocol, boot.pvh_version) else {
        return Err(FwError::new("not_pvh"));
    };
    let memmap = boot.memmap();
    let max_type = memmap.iter().map(|r| r.kind).max().unwrap_or(0);
    let ram_low: u64 = memmap
        .iter()
        .filter(|r| r.kind == 1 && r.start < 1 << 32)
        .map(|r| r.size.min((1 << 32) - r.start))
        .sum();
    report!(
        "fw start_info version={version} cmdline={} rsdp={:#x} memmap_entries={} max_type={max_type} ram_below_4g={ram_low}",
        if boot.cmdline.is_some() { "yes" } else { "no" },
        boot.rsdp.unwrap_or(0),
        memmap.len()
    );
    if version < 1 {
        return Err(FwError::with("no_memmap", u64::from(version)));
    }
    if memmap.is_empty() {
        return Err(FwError::new("empty_memmap"));
    }
    if max_type > MAX_E820_TYPE {
        return Err(FwError::with("e820_type", u64::from(max_type)));
    }
    Ok(())
}

/// COM1 as the firmware's 16550 driver uses it: THRE polled before every
/// byte; NUL bytes written as its EFI console writes them.
fn serial_facts() {
    const LSR: u16 = 0x3fd;
    let lsr = inb(LSR);
    serial::write_raw(&[0; NUL_BYTES]);
    report!(
        "fw serial lsr={lsr:#04x} thre={} nul_bytes={NUL_BYTES} tx_stalls={}",
        u8::from(lsr & 0x20 != 0),
        serial::tx_stalls()
    );
}

/// Reads the RTC the way the firmware's EFI GetTime does (`src/cmos.rs`).
fn cmos_time() {
    const UIP_POLLS: u32 = 1_000_000;
    let read = |reg: u8| {
        outb(0x70, reg);
        inb(0x71)
    };
    let mut polls = 0;
    while read(0x0a) & 0x80 != 0 && polls < UIP_POLLS {
        polls += 1;
    }
    let reg_b = read(0x0b);
    let decode = |raw: u8| {
        if reg_b & 0x04 == 0 {
            (raw >> 4) * 10 + (raw & 0x0f)
        } else {
            raw
        }
    };
    let [sec, min, hour_raw, day, month, year, century] =
        [0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32].map(read);
    let mut hour = decode(hour_raw & 0x7f);
    if reg_b & 0x02 == 0 && hour_raw & 0x80 != 0 {
        hour = (hour + 12) % 24;
    }
    let century = match decode(century) {
        0 => 20,
        c => c,
    };
    report!(
        "fw cmos date={}{:02}-{:02}-{:02} time={:02}:{:02}:{:02} reg_b={reg_b:#04x} uip_polls={polls}",
        century,
        decode(year),
        decode(month),
        decode(day),
        hour,
        decode(min),
        decode(sec)
    );
}

/// Tries to boot from the virtio-blk in `slot`; true on success.
fn try_disk(slot: u8, files: &[&[u8]]) -> bool {
    let mut disk = match Disk::open(slot) {
        Ok(disk) => disk,
        Err(err) => {
            report!("fw slot={slot} error stage=virtio {err}");
            return false;
        }
    };
    let result = boot_disk(&mut disk, files);
    if let Err((stage, err)) = result {
        report!("fw slot={slot} error stage={stage} {err}");
    }
    report!("fw slot={slot} requests={}", disk.requests);
    let reset = if disk.reset() { "ok" } else { "timeout" };
    report!("fw slot={slot} reset={reset}");
    result.is_ok()
}

type StageResult = Result<(), (&'static str, FwError)>;

fn boot_disk(disk: &mut Disk, files: &[&[u8]]) -> StageResult {
    let esp = gpt::find_esp(disk).map_err(|e| ("gpt", e))?;
    let mut volume = fat::open(disk, esp).map_err(|e| ("fat", e))?;
    list_root(&mut volume, disk).map_err(|e| ("fat", e))?;
    for &path in files {
        read_named(&mut volume, disk, path).map_err(|e| ("file", e))?;
    }
    boot_target(&mut volume, disk).map_err(|e| ("boot", e))?;
    let (status, addr, len) = disk.flush().map_err(|e| ("flush", e))?;
    report!("fw flush status={status} stale_addr={addr:#x} stale_len={len}");
    if status != 0 {
        return Err(("flush", FwError::with("status", u64::from(status))));
    }
    Ok(())
}

fn list_root(volume: &mut Volume, disk: &mut Disk) -> Result<(), FwError> {
    let root = volume.root();
    let mut listed = 0;
    volume.walk(disk, &root, &mut |entry| {
        report!(
            "fw dir path=\"/\" name={} dir={} size={} cluster={}",
            Quoted(entry.name()),
            u8::from(entry.is_dir()),
            entry.size,
            entry.cluster
        );
        listed += 1;
        listed >= ROOT_LISTED
    })
}

/// Reads the whole file at `path` and reports its size and FNV-1a 64.
fn read_named(volume: &mut Volume, disk: &mut Disk, path: &[u8]) -> Result<(), FwError> {
    let Some(entry) = volume.lookup(disk, path)? else {
        report!("fw file path={} missing", Quoted(path));
        return Ok(());
    };
    if entry.is_dir() {
        report!("fw file path={} dir", Quoted(path));
        return Ok(());
    }
    let mut hash = FNV_OFFSET_BASIS;
    let sectors = volume.read_file(disk, &entry, usize::MAX, &mut |bytes| {
        hash = fnv1a64_update(hash, bytes);
    })?;
    report!(
        "fw file path={} size={} sectors={sectors} fnv1a64={hash:#018x}",
        Quoted(path),
        entry.size
    );
    Ok(())
}

/// What the firmware would boot: the boot loader spec entry, else (as it
/// falls back on any failure there) the EFI binary.
fn boot_target(volume: &mut Volume, disk: &mut Disk) -> Result<(), FwError> {
    match boot_loader_spec(volume, disk) {
        Ok(()) => {
            report!("fw boot method=bls");
            return Ok(());
        }
        Err(err) => report!("fw bls failed {err}"),
    }
    efi_binary(volume, disk)?;
    report!("fw boot method=efi");
    Ok(())
}

/// A small text file read whole (at most [`CONF_MAX`] bytes).
struct Text {
    bytes: [u8; CONF_MAX],
    len: usize,
}

impl Text {
    fn read(volume: &mut Volume, disk: &mut Disk, entry: &Entry) -> Result<Text, FwError> {
        if entry.is_dir() || entry.size as usize > CONF_MAX {
            return Err(FwError::with("conf_size", u64::from(entry.size)));
        }
        let mut text = Text {
            bytes: [0; CONF_MAX],
            len: 0,
        };
        volume.read_file(disk, entry, CONF_MAX, &mut |bytes| {
            text.bytes[text.len..text.len + bytes.len()].copy_from_slice(bytes);
            text.len += bytes.len();
        })?;
        Ok(text)
    }

    /// The value of the first line `KEY VALUE` (key then whitespace).
    fn value(&self, key: &[u8]) -> Option<&[u8]> {
        self.bytes[..self.len]
            .split(|&b| b == b'\n')
            .find_map(|line| {
                let rest = line.strip_prefix(key)?;
                rest.first()
                    .is_some_and(|b| b.is_ascii_whitespace())
                    .then(|| rest.trim_ascii())
            })
    }
}

fn boot_loader_spec(volume: &mut Volume, disk: &mut Disk) -> Result<(), FwError> {
    let conf = volume
        .lookup(disk, LOADER_CONF)?
        .ok_or(FwError::new("no_loader_conf"))?;
    let conf = Text::read(volume, disk, &conf)?;
    let pattern = conf.value(b"default").unwrap_or(&[]);
    report!(
        "fw bls loader_conf size={} default={}",
        conf.len,
        Quoted(pattern)
    );
    let entries = volume
        .lookup(disk, ENTRIES_DIR)?
        .filter(Entry::is_dir)
        .ok_or(FwError::new("no_entries_dir"))?;
    let entry = choose_entry(volume, disk, &entries, pattern)?;
    let text = Text::read(volume, disk, &entry)?;
    let linux = text.value(b"linux").unwrap_or(&[]);
    let initrd = text.value(b"initrd").unwrap_or(&[]);
    report!(
        "fw bls entry={} linux={} initrd={} options={}",
        Quoted(entry.name()),
        Quoted(linux),
        Quoted(initrd),
        Quoted(text.value(b"options").unwrap_or(&[]))
    );
    check_kernel(volume, disk, linux)?;
    if !initrd.is_empty() {
        let file = volume
            .lookup(disk, initrd)?
            .filter(|e| !e.is_dir())
            .ok_or(FwError::new("initrd_missing"))?;
        report!("fw bls initrd path={} size={}", Quoted(initrd), file.size);
    }
    Ok(())
}

/// The entry file matching `pattern`, else the first `*.conf`.
fn choose_entry(
    volume: &mut Volume,
    disk: &mut Disk,
    dir: &Entry,
    pattern: &[u8],
) -> Result<Entry, FwError> {
    let (mut matched, mut fallback) = (None, None);
    volume.walk(disk, dir, &mut |entry| {
        if entry.is_dir() {
            return false;
        }
        if !pattern.is_empty() && glob(pattern, entry.name(), 32) {
            matched = Some(*entry);
            return true;
        }
        if fallback.is_none() && glob(b"*.conf", entry.name(), 32) {
            fallback = Some(*entry);
        }
        false
    })?;
    matched.or(fallback).ok_or(FwError::new("no_entry"))
}

/// `*` and `?` matching, as the firmware's `compare_entry` (bounded).
fn glob(pattern: &[u8], name: &[u8], depth: u32) -> bool {
    if depth == 0 {
        return false;
    }
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|skip| glob(rest, &name[skip..], depth - 1)),
        Some((b'?', rest)) => !name.is_empty() && glob(rest, &name[1..], depth),
        Some((&c, rest)) => name.first() == Some(&c) && glob(rest, &name[1..], depth),
    }
}

/// The checks the firmware makes of a boot loader spec `linux` image
/// (`src/bzimage.rs`): boot flag, `HdrS`, protocol ≥ 2.05, relocatable.
fn check_kernel(volume: &mut Volume, disk: &mut Disk, path: &[u8]) -> Result<(), FwError> {
    let file = volume
        .lookup(disk, path)?
        .filter(|e| !e.is_dir())
        .ok_or(FwError::new("linux_missing"))?;
    let mut head = [0u8; 2 * SECTOR];
    let mut len = 0;
    volume.read_file(disk, &file, head.len(), &mut |bytes| {
        head[len..len + bytes.len()].copy_from_slice(bytes);
        len += bytes.len();
    })?;
    let boot_flag = u16::from_le_bytes([head[0x1fe], head[0x1ff]]);
    let version = u16::from_le_bytes([head[0x206], head[0x207]]);
    let relocatable = head[0x234];
    report!(
        "fw bls kernel path={} size={} boot_flag={boot_flag:#06x} hdrs={} version={version:#06x} relocatable={relocatable}",
        Quoted(path),
        file.size,
        u8::from(&head[0x202..0x206] == b"HdrS")
    );
    if boot_flag != 0xaa55 || &head[0x202..0x206] != b"HdrS" {
        return Err(FwError::new("kernel_magic"));
    }
    if version < 0x205 || relocatable == 0 {
        return Err(FwError::with("kernel_not_relocatable", u64::from(version)));
    }
    Ok(())
}

/// `\EFI\BOOT\BOOTX64.EFI`: present and a PE image for x86-64.
fn efi_binary(volume: &mut Volume, disk: &mut Disk) -> Result<(), FwError> {
    let file = volume
        .lookup(disk, EFI_BOOT_PATH)?
        .filter(|e| !e.is_dir())
        .ok_or(FwError::new("nothing_to_boot"))?;
    let mut head = [0u8; SECTOR];
    let mut len = 0;
    volume.read_file(disk, &file, SECTOR, &mut |bytes| {
        head[..bytes.len()].copy_from_slice(bytes);
        len = bytes.len();
    })?;
    let pe_at = u32::from_le_bytes([head[0x3c], head[0x3d], head[0x3e], head[0x3f]]) as usize;
    let pe = head.get(pe_at..pe_at.saturating_add(6)).unwrap_or(&[]);
    let machine = if pe.starts_with(b"PE\0\0") {
        u16::from_le_bytes([pe[4], pe[5]])
    } else {
        0
    };
    report!(
        "fw efi path={} size={} mz={} machine={machine:#06x}",
        Quoted(EFI_BOOT_PATH),
        file.size,
        u8::from(len >= 2 && &head[..2] == b"MZ")
    );
    if &head[..2] != b"MZ" || machine != 0x8664 {
        return Err(FwError::new("efi_not_x86_64_pe"));
    }
    Ok(())
}
