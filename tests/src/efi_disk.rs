//! Raw disks for the firmware tests, made the way `resources/vm-disk/`
//! makes them (no root, no loop devices): a sparse file, a GPT written by
//! `sgdisk`, a FAT32 EFI system partition formatted in place by `mkfs.fat
//! --offset` and filled by `mmd`/`mcopy -i FILE@@OFFSET`; plus the broken
//! ones (no GPT, no ESP, an ESP without a file system), what `sgdisk`
//! says the partitions are, and the `probe.mode=firmware` report's lines.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::disk::line;
use crate::probe::{Fields, ProbeReport};

/// Bytes per sector.
pub const SECTOR: u64 = 512;
/// First sector of the first partition (sgdisk's 1 MiB alignment).
pub const ESP_FIRST_LBA: u64 = 2048;
/// ESP size: the smallest FAT32 with 512-byte clusters needs 65,525
/// clusters (32 MiB).
pub const ESP_MIB: u64 = 40;
/// `sgdisk` type code and GUID of an EFI system partition.
pub const ESP_TYPE_GUID: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
/// `sgdisk` type code 8304 (Linux x86-64 root) as a GUID.
pub const LINUX_ROOT_GUID: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";

/// What to put on a test disk.
#[derive(Clone, Debug)]
pub enum Layout {
    /// GPT with an ESP (FAT32, label `PROBEESP`) holding the files, and a
    /// Linux root partition after it.
    Efi(Vec<(String, Vec<u8>)>),
    /// No partition table at all (zeros).
    NoGpt,
    /// GPT with only a Linux root partition.
    NoEsp,
    /// GPT with an ESP that holds no file system.
    UnformattedEsp,
}

/// Builds a sparse raw disk of `mib` MiB at `path` with `layout`. Panics
/// with an install hint when a tool is missing (test helper).
pub fn build(path: &Path, mib: u64, layout: &Layout) {
    let _ = std::fs::remove_file(path);
    let file = std::fs::File::create(path).expect("cannot create the disk image");
    file.set_len(mib << 20).expect("cannot size the disk image");
    drop(file);
    let esp = format!("1:{ESP_FIRST_LBA}:+{ESP_MIB}M");
    match layout {
        Layout::NoGpt => {}
        Layout::NoEsp => sgdisk(path, &["-n", "1:0:0", "-t", "1:8304", "-c", "1:root"]),
        Layout::UnformattedEsp => sgdisk(path, &["-n", &esp, "-t", "1:EF00", "-c", "1:ESP"]),
        Layout::Efi(files) => {
            sgdisk(
                path,
                &[
                    "-n", &esp, "-t", "1:EF00", "-c", "1:ESP", "-n", "2:0:0", "-t", "2:8304", "-c",
                    "2:root",
                ],
            );
            format_esp(path);
            for (name, bytes) in files {
                put_file(path, name, bytes);
            }
        }
    }
}

fn sgdisk(path: &Path, args: &[&str]) {
    let output = tool("sgdisk", "gdisk").args(args).arg(path).output();
    check("sgdisk", output);
}

/// `mkfs.fat -F 32 -s 1` over the ESP, in place.
fn format_esp(path: &Path) {
    let output = tool("mkfs.fat", "dosfstools")
        .args(["-F", "32", "-s", "1", "-n", "PROBEESP", "--offset"])
        .arg(ESP_FIRST_LBA.to_string())
        .arg(path)
        .arg((ESP_MIB * 1024).to_string())
        .output();
    check("mkfs.fat", output);
}

/// `path@@offset`: mtools' way to name a file system inside an image.
pub fn mtools_image(path: &Path) -> String {
    format!("{}@@{}", path.display(), ESP_FIRST_LBA * SECTOR)
}

/// Copies `bytes` to `/`-separated `name` on the ESP, making directories.
fn put_file(path: &Path, name: &str, bytes: &[u8]) {
    let image = mtools_image(path);
    let parts: Vec<&str> = name.split('/').filter(|p| !p.is_empty()).collect();
    for depth in 1..parts.len() {
        let dir = format!("::/{}", parts[..depth].join("/"));
        // An existing directory makes mmd fail; that is fine.
        let _ = tool("mmd", "mtools")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-i", &image, &dir])
            .output();
    }
    let source = path.with_extension(format!("src-{}", parts.join("-")));
    std::fs::write(&source, bytes).expect("cannot write a file for mcopy");
    let output = tool("mcopy", "mtools")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-i", &image])
        .arg(&source)
        .arg(format!("::/{}", parts.join("/")))
        .output();
    let _ = std::fs::remove_file(&source);
    check("mcopy", output);
}

fn tool(name: &str, package: &str) -> Command {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).exists()))
        .unwrap_or(false);
    let in_sbin = ["/usr/sbin", "/sbin"]
        .iter()
        .map(|dir| PathBuf::from(dir).join(name))
        .find(|p| p.exists());
    match (found, in_sbin) {
        (true, _) => Command::new(name),
        (false, Some(path)) => Command::new(path),
        (false, None) => {
            panic!("{name} not found; install {package} (bash resources/install-host-deps.sh)")
        }
    }
}

fn check(what: &str, output: std::io::Result<std::process::Output>) {
    let output = output.unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// One partition as `sgdisk -i` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// 1-based number.
    pub number: u32,
    /// Type GUID (upper case).
    pub type_guid: String,
    /// First sector.
    pub first_lba: u64,
    /// Last sector.
    pub last_lba: u64,
    /// Name.
    pub name: String,
}

/// The disk GUID and partitions `sgdisk` reads from `path`.
pub fn sgdisk_view(path: &Path) -> (String, Vec<Partition>) {
    let text = |args: &[&str]| {
        let output = tool("sgdisk", "gdisk").args(args).arg(path).output();
        let output = output.expect("cannot run sgdisk");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let listing = text(&["-p"]);
    let field = |text: &str, label: &str| -> String {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let disk_guid = field(&listing, "Disk identifier (GUID):");
    let numbers: Vec<u32> = listing
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("Number"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    let partitions = numbers
        .into_iter()
        .map(|number| {
            let info = text(&["-i", &number.to_string()]);
            let type_guid = field(&info, "Partition GUID code:");
            let sector = |label| {
                field(&info, label)
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0)
            };
            Partition {
                number,
                type_guid: type_guid.split_whitespace().next().unwrap_or("").into(),
                first_lba: sector("First sector:"),
                last_lba: sector("Last sector:"),
                name: field(&info, "Partition name:")
                    .trim_matches('\'')
                    .to_string(),
            }
        })
        .collect();
    (disk_guid, partitions)
}

/// The fields of the first `fw {stem} {start}...` line (panics with
/// `context` when missing).
pub fn fw_line(report: &ProbeReport, stem: &str, start: &str, context: &str) -> Fields {
    line(report, &format!("fw {stem}"), start, context)
}

/// Every `fw {stem} ...` line's fields.
pub fn fw_lines(report: &ProbeReport, stem: &str) -> Vec<Fields> {
    report
        .values(&format!("fw {stem} "))
        .into_iter()
        .map(Fields::parse)
        .collect()
}

/// The `fw error ...` / `fw slot=N error ...` reasons, in order.
pub fn fw_errors(report: &ProbeReport) -> Vec<(String, String)> {
    report
        .lines()
        .iter()
        .filter_map(|l| {
            let rest = l.strip_prefix("fw ")?;
            let at = rest.find("error stage=")?;
            let f = Fields::parse(&rest[at + 6..]);
            Some((
                f.get("stage").unwrap_or_default().to_string(),
                f.get("reason").unwrap_or_default().to_string(),
            ))
        })
        .collect()
}

/// The data file the firmware-mode tests read back (asked for in another
/// case, which FAT lookups ignore).
pub const DATA_FILE: &str = "probe/Data-File.bin";
/// How the tests name it on the probe's command line.
pub const DATA_FILE_ASKED: &str = "/PROBE/data-file.BIN";
/// The boot loader spec entry the `default` pattern selects.
pub const BLS_ENTRY: &str = "probe-vm.conf";
/// Its options line.
pub const BLS_OPTIONS: &str = "console=ttyS0 root=PARTLABEL=root rw";
/// Size of the fake initrd the entry names.
pub const INITRD_LEN: usize = 777;

/// The first KiB of a relocatable bzImage (boot flag, `HdrS`, protocol
/// 2.15, relocatable): what the firmware checks before loading a kernel.
pub fn bzimage_head() -> Vec<u8> {
    let mut head = vec![0u8; 3000];
    head[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    head[0x202..0x206].copy_from_slice(b"HdrS");
    head[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    head[0x234] = 1;
    head
}

/// A minimal PE/COFF head for x86-64 (`MZ`, `PE\0\0`, machine 0x8664).
pub fn pe_head() -> Vec<u8> {
    let mut pe = vec![0u8; 1024];
    pe[..2].copy_from_slice(b"MZ");
    pe[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
    pe[0x80..0x84].copy_from_slice(b"PE\0\0");
    pe[0x84..0x86].copy_from_slice(&0x8664u16.to_le_bytes());
    pe
}

/// The ESP of the firmware-mode tests: a loader.conf whose `default`
/// pattern picks [`BLS_ENTRY`] over a decoy entry, the kernel and initrd
/// it names, an EFI binary, and the data file (`data` as its bytes).
pub fn probe_esp_files(data: &[u8], with_loader: bool) -> Vec<(String, Vec<u8>)> {
    let text = |s: &str| s.as_bytes().to_vec();
    let mut files = vec![
        ("EFI/BOOT/BOOTX64.EFI".to_string(), pe_head()),
        (DATA_FILE.to_string(), data.to_vec()),
        ("vmlinuz".to_string(), bzimage_head()),
        ("initrd.img".to_string(), vec![0x5a; INITRD_LEN]),
    ];
    if with_loader {
        files.extend([
            (
                "loader/loader.conf".to_string(),
                text("timeout 0\ndefault probe-*.conf\n"),
            ),
            (
                "loader/entries/a-decoy.conf".to_string(),
                text("title decoy\nlinux /missing\n"),
            ),
            (
                format!("loader/entries/{BLS_ENTRY}"),
                text(&format!(
                    "title probe\nlinux /vmlinuz\ninitrd /initrd.img\noptions {BLS_OPTIONS}\n"
                )),
            ),
        ]);
    }
    files
}

/// Seconds since the Unix epoch of a `fw cmos date=Y-M-D time=h:m:s`.
pub fn cmos_unix_seconds(fields: &Fields) -> Option<i64> {
    let nums = |text: &str, sep: char| -> Option<Vec<i64>> {
        text.split(sep).map(|n| n.parse().ok()).collect()
    };
    let date = nums(fields.get("date")?, '-')?;
    let time = nums(fields.get("time")?, ':')?;
    let (&[y, m, d], &[hh, mm, ss]) = (date.as_slice(), time.as_slice()) else {
        return None;
    };
    // Days from civil (proleptic Gregorian), after H. Hinnant's algorithm.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

/// Checks what the firmware-mode probe reported about the disk `path`
/// built with [`probe_esp_files`]`(data, true)` in PCI slot `slot`, against
/// what `sgdisk` reads and the files: the start info and platform facts,
/// GPT, FAT32, the listing, the data file's hash, the boot entry, the
/// FLUSH with the stale descriptor, and success. VMM-specific facts (the
/// command register, BAR windows) are the caller's.
pub fn check_firmware_report(
    report: &ProbeReport,
    slot: u8,
    path: &Path,
    data: &[u8],
    context: &str,
) {
    assert!(report.has("fw mode=firmware"), "{context}");
    assert_eq!(fw_errors(report), [], "{context}");
    let si = fw_line(report, "start_info", "version=", context);
    assert_eq!(si.num("version"), Some(1), "{context}");
    assert_eq!(si.get("cmdline"), Some("yes"), "{context}");
    assert!(si.num("rsdp").unwrap_or(0) != 0, "{context}");
    assert!(si.num("memmap_entries") > Some(1), "{context}");
    assert!(
        si.num("max_type") <= Some(5),
        "e820 type above 5: {context}"
    );
    let serial = fw_line(report, "serial", "lsr=", context);
    assert_eq!(serial.get("thre"), Some("1"), "{context}");
    assert_eq!(serial.num("tx_stalls"), Some(0), "{context}");
    let cmos = fw_line(report, "cmos", "date=", context);
    let guest = cmos_unix_seconds(&cmos).unwrap_or_else(|| panic!("bad cmos line: {context}"));
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    assert!(
        (host - guest).abs() < 300,
        "CMOS time off by {}s: {context}",
        host - guest
    );

    let at = format!("slot={slot}");
    let virtio = fw_line(report, &at, "virtio ", context);
    assert_eq!(virtio.num("accepted"), Some(1 << 32), "{context}");
    assert!(virtio.num("queue_max") >= Some(16), "{context}");
    assert_eq!(virtio.num("queue_size"), Some(16), "{context}");
    assert_eq!(virtio.get("status"), Some("0x0f"), "{context}");
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    assert_eq!(virtio.num("capacity"), Some(size / SECTOR), "{context}");
    assert_eq!(
        fw_line(report, &at, "caps ", context).get("msix"),
        Some("off"),
        "{context}"
    );

    let (disk_guid, partitions) = sgdisk_view(path);
    let gpt = fw_line(report, "gpt", "mbr=", context);
    assert_eq!(gpt.get("mbr"), Some("protective"), "{context}");
    assert_eq!(gpt.get("header_crc"), Some("ok"), "{context}");
    assert_eq!(gpt.get("disk_guid"), Some(disk_guid.as_str()), "{context}");
    assert_eq!(gpt.num("first_usable_lba"), Some(34), "{context}");
    let reported: Vec<Partition> = fw_lines(report, "gpt")
        .iter()
        .filter(|f| f.get("partition").is_some())
        .map(|f| Partition {
            number: f.num("partition").unwrap_or(0) as u32,
            type_guid: f.get("type").unwrap_or_default().to_string(),
            first_lba: f.num("first_lba").unwrap_or(0),
            last_lba: f.num("last_lba").unwrap_or(0),
            name: f.get("name").unwrap_or_default().to_string(),
        })
        .collect();
    assert_eq!(reported, partitions, "{context}");
    let esp = fw_line(report, "esp", "first_lba=", context);
    assert_eq!(
        esp.num("first_lba"),
        Some(partitions[0].first_lba),
        "{context}"
    );
    assert_eq!(
        esp.num("last_lba"),
        Some(partitions[0].last_lba),
        "{context}"
    );

    let fat = fw_line(report, "fat", "type=", context);
    assert_eq!(fat.get("type"), Some("fat32"), "{context}");
    assert_eq!(fat.get("label"), Some("PROBEESP"), "{context}");
    assert_eq!(fat.get("oem"), Some("mkfs.fat"), "{context}");
    assert_eq!(fat.num("total_sectors"), Some(ESP_MIB << 11), "{context}");
    let mut names: Vec<String> = fw_lines(report, "dir")
        .iter()
        .filter_map(|f| f.get("name").map(str::to_string))
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["EFI", "initrd.img", "loader", "probe", "vmlinuz"],
        "{context}"
    );

    let file = fw_line(
        report,
        "file",
        &format!("path=\"{DATA_FILE_ASKED}\""),
        context,
    );
    assert_eq!(file.num("size"), Some(data.len() as u64), "{context}");
    assert_eq!(
        file.num("fnv1a64"),
        Some(crate::probe::fnv1a64(data)),
        "{context}"
    );
    assert!(
        report.has("fw file path=\"/no/such/file\" missing"),
        "{context}"
    );

    let conf = fw_line(report, "bls", "loader_conf ", context);
    assert_eq!(conf.get("default"), Some("probe-*.conf"), "{context}");
    let entry = fw_line(report, "bls", "entry=", context);
    assert_eq!(entry.get("entry"), Some(BLS_ENTRY), "{context}");
    assert_eq!(entry.get("linux"), Some("/vmlinuz"), "{context}");
    assert_eq!(entry.get("initrd"), Some("/initrd.img"), "{context}");
    assert_eq!(entry.get("options"), Some(BLS_OPTIONS), "{context}");
    let kernel = fw_line(report, "bls", "kernel ", context);
    assert_eq!(kernel.get("hdrs"), Some("1"), "{context}");
    assert_eq!(kernel.get("relocatable"), Some("1"), "{context}");
    assert_eq!(
        kernel.num("size"),
        Some(bzimage_head().len() as u64),
        "{context}"
    );
    let initrd = fw_line(report, "bls", "initrd ", context);
    assert_eq!(initrd.num("size"), Some(INITRD_LEN as u64), "{context}");
    assert!(report.has("fw boot method=bls"), "{context}");

    let flush = fw_line(report, "flush", "status=", context);
    assert_eq!(
        flush.get("status"),
        Some("0"),
        "FLUSH with a stale descriptor: {context}"
    );
    assert_eq!(flush.num("stale_len"), Some(16), "{context}");
    assert_eq!(
        report.value(&format!("fw {at} reset=")),
        Some("ok"),
        "{context}"
    );
    assert!(report.value("fw result=ok").is_some(), "{context}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_and_lines_are_read_from_a_report() {
        let report = ProbeReport::parse(
            "probe: fw slot=1 error stage=gpt reason=no_gpt\n\
             probe: fw gpt partition=1 type=X esp=1 first_lba=2048 last_lba=9\n\
             probe: fw error stage=boot reason=no_bootable_disk\n",
        );
        assert_eq!(
            fw_errors(&report),
            [
                ("gpt".to_string(), "no_gpt".to_string()),
                ("boot".to_string(), "no_bootable_disk".to_string())
            ]
        );
        let part = fw_line(&report, "gpt", "partition=1", "ctx");
        assert_eq!(part.num("first_lba"), Some(2048));
        assert_eq!(fw_lines(&report, "gpt").len(), 1);
    }

    #[test]
    fn cmos_lines_convert_to_unix_time() {
        let at = |text: &str| cmos_unix_seconds(&Fields::parse(text));
        assert_eq!(at("date=1970-01-01 time=00:00:00"), Some(0));
        assert_eq!(at("date=2000-03-01 time=01:02:03"), Some(951_872_523));
        assert_eq!(at("date=2024-02-29 time=23:59:59"), Some(1_709_251_199));
        assert_eq!(at("date=2024-02 time=23:59:59"), None);
    }

    #[test]
    fn efi_disks_are_sparse_and_sgdisk_reads_them_back() {
        let dir = std::env::temp_dir().join(format!("zvmm-efi-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk.img");
        let files = vec![("a/b/c.txt".to_string(), b"hello".to_vec())];
        build(&path, 64, &Layout::Efi(files));
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 < 8 << 20, "not sparse: {meta:?}");
        let (guid, parts) = sgdisk_view(&path);
        assert_eq!(guid.len(), 36, "{guid}");
        assert_eq!(parts.len(), 2, "{parts:?}");
        assert_eq!(parts[0].type_guid, ESP_TYPE_GUID);
        assert_eq!(parts[0].first_lba, ESP_FIRST_LBA);
        assert_eq!(parts[0].last_lba, ESP_FIRST_LBA + (ESP_MIB << 11) - 1);
        assert_eq!(parts[1].type_guid, LINUX_ROOT_GUID);
        assert_eq!(parts[1].name, "root");
        let out = Command::new("mtype")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-i", &mtools_image(&path), "::/a/b/c.txt"])
            .output()
            .unwrap();
        assert_eq!(out.stdout, b"hello");
        build(&path, 8, &Layout::NoGpt);
        assert!(sgdisk_view(&path).1.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
