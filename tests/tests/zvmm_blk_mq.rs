//! Multiqueue virtio-blk end to end: a disk with `num_queues=2` offers
//! VIRTIO_BLK_F_MQ with `num_queues` 2 in its configuration; the probe sets
//! up both queues, writes through one and reads back through the other
//! (one at a time, then with both queues in flight), and the test checks
//! what it reports against the image file. A single-queue disk offers no
//! MQ; bad `num_queues`/`queue_size` values are refused with one line.

use std::path::Path;
use std::time::Duration;

use zvmm_tests::disk::{has_feature, line, make_image, pattern, range_bytes, SECTOR};
use zvmm_tests::probe::{probe_elf, Flavour, ProbeReport};
use zvmm_tests::zvmm::{assert_rejected, scratch_dir, spawn_zvmm};

/// Hard limit for one VM run (the test kills zvmm past it).
const LIMIT: Duration = Duration::from_secs(90);
/// zvmm's own limit (`--timeout`), below [`LIMIT`].
const VM_TIMEOUT: &str = "80";
/// Image size.
const SIZE: u64 = 16 << 20;
/// First sector `probe.blk.mq` writes; it writes 4 × 8 sectors from it.
const MQ_SECTOR: u64 = 4096;
const MQ_SECTORS: u64 = 32;
/// `VIRTIO_BLK_F_MQ`.
const F_MQ: u32 = 12;
/// The disk's PCI slot (slot 0: host bridge).
const SLOT: &str = "blk slot=1";
/// Exit status of a bad option.
const USAGE: i32 = 2;

fn args(disk: &str, cmdline: &str) -> Vec<String> {
    let kernel = probe_elf(Flavour::Pvh).display().to_string();
    [
        "--kernel",
        &kernel,
        "--memory",
        "256M",
        "--timeout",
        VM_TIMEOUT,
        "--disk",
        disk,
        "--cmdline",
        cmdline,
    ]
    .map(String::from)
    .to_vec()
}

/// Boots the probe with `disk`; it must finish and zvmm exit 0.
fn run_probe(disk: &str) -> (ProbeReport, String) {
    let cmdline = format!("console=ttyS0 probe.blk.mq={MQ_SECTOR}");
    let args = args(disk, &cmdline);
    let run = spawn_zvmm(&args).finish(LIMIT);
    let report = ProbeReport::parse(&run.stdout);
    let context = format!("zvmm {args:?}: {run:#?}");
    assert!(run.status.is_some(), "killed after {LIMIT:?}: {context}");
    assert_eq!(report.panic_message(), None, "{context}");
    assert!(report.finished(), "no 'probe: done': {context}");
    assert_eq!(run.code(), 0, "{context}");
    (report, context)
}

fn image(test: &str) -> std::path::PathBuf {
    let path = scratch_dir(&format!("blk-mq-{test}")).join("disk.img");
    make_image(&path, SIZE, &[]);
    path
}

fn offered(report: &ProbeReport, context: &str) -> Option<u64> {
    line(report, "virtio slot=1", "features ", context).num("offered")
}

#[test]
fn the_probe_uses_both_queues_and_the_data_lands() {
    let path = image("two");
    let disk = format!("path={},num_queues=2,queue_size=64", path.display());
    let (report, context) = run_probe(&disk);
    assert!(has_feature(offered(&report, &context), F_MQ), "{context}");
    let queues = line(&report, SLOT, "num_queues=", &context);
    assert_eq!(queues.num("num_queues"), Some(2), "{context}");
    for queue in ["queue=0 ", "queue=1 "] {
        let setup = line(&report, "virtio slot=1", queue, &context);
        assert_eq!(setup.num("max"), Some(64), "{queue}: {context}");
    }
    let one_at_a_time = line(&report, SLOT, "mq sector=", &context);
    for key in ["q1_write", "q0_read", "q0_write", "q1_read"] {
        assert_eq!(one_at_a_time.get(key), Some("ok"), "{key}: {context}");
    }
    for key in ["q0_match", "q1_match"] {
        assert_eq!(one_at_a_time.get(key), Some("1"), "{key}: {context}");
    }
    let both = line(&report, SLOT, "mq both_in_flight ", &context);
    assert_eq!(both.get("writes"), Some("ok"), "{context}");
    for key in ["q0_read", "q1_read"] {
        assert_eq!(both.get(key), Some("ok"), "{key}: {context}");
    }
    for key in ["q0_match", "q1_match"] {
        assert_eq!(both.get(key), Some("1"), "{key}: {context}");
    }
    assert_eq!(report.value(&format!("{SLOT} reset=")), Some("ok"));
    assert!(
        report.value(&format!("{SLOT} broken")).is_none(),
        "{context}"
    );
    check_image(&path);
}

/// What the probe wrote through both queues is in the image, and nothing
/// else changed.
fn check_image(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(bytes.len() as u64, SIZE);
    let written = (MQ_SECTOR, MQ_SECTORS);
    assert!(
        range_bytes(&bytes, written) == pattern(MQ_SECTOR, MQ_SECTORS),
        "the pattern written through both queues is not in the image"
    );
    let end = ((MQ_SECTOR + MQ_SECTORS) * SECTOR) as usize;
    let start = (MQ_SECTOR * SECTOR) as usize;
    assert!(
        bytes[..start].iter().all(|&b| b == 0),
        "bytes before changed"
    );
    assert!(bytes[end..].iter().all(|&b| b == 0), "bytes after changed");
}

#[test]
fn a_single_queue_disk_offers_no_multiqueue() {
    let path = image("one");
    let (report, context) = run_probe(&format!("path={}", path.display()));
    assert!(!has_feature(offered(&report, &context), F_MQ), "{context}");
    let skipped = line(&report, SLOT, "mq ", &context);
    assert_eq!(skipped.get("skipped"), Some("single_queue"), "{context}");
    let bytes = std::fs::read(&path).unwrap();
    assert!(bytes.iter().all(|&b| b == 0), "the image changed");
}

#[test]
fn bad_queue_options_are_refused_with_one_line() {
    let path = image("bad");
    let shown = path.display().to_string();
    for (option, needle) in [
        ("num_queues=0", "num_queues=0 must be 1 to 64"),
        ("num_queues=65", "num_queues=65 must be 1 to 64"),
        ("queue_size=100", "queue_size=100 must be a power of two"),
        ("queue_size=2", "queue_size=2 must be a power of two"),
        ("num_queues=many", "num_queues"),
    ] {
        let disk = format!("path={shown},{option}");
        let run = spawn_zvmm(args(&disk, "console=ttyS0")).finish(LIMIT);
        assert_rejected(&run, USAGE, &[needle]);
    }
}
