//! Helpers for the `zvmm image` tests: images made and checked by
//! qemu-img and qemu-io (the reference), partitioned with sfdisk and
//! formatted with mformat/mkfs.ext4, allocated sizes as `stat` and `du`
//! report them, and a loop device that detaches itself.

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Bytes in a mebibyte.
pub const MIB: u64 = 1 << 20;

/// Runs `program` with `args`, feeding `stdin`; panics when it cannot
/// start or fails.
pub fn tool<I, S>(program: &str, args: I, stdin: &str) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let output = tool_output(program, args, stdin);
    assert!(
        output.status.success(),
        "{program} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Like [`tool`], returning the output whatever the status.
pub fn tool_output<I, S>(program: &str, args: I, stdin: &str) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} (bash resources/install-host-deps.sh): {e}")
        });
    let mut input = child.stdin.take().expect("piped stdin");
    input
        .write_all(stdin.as_bytes())
        .expect("cannot feed stdin");
    drop(input);
    child.wait_with_output().expect("cannot wait for a tool")
}

/// `qemu-img ARGS`, which must succeed; its stdout.
pub fn qemu_img<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    tool("qemu-img", args, "")
}

/// `qemu-img info --output=json` of an image.
pub fn qemu_info(path: &Path) -> serde_json::Value {
    let text = qemu_img([
        OsStr::new("info"),
        OsStr::new("-U"),
        OsStr::new("--output=json"),
        path.as_os_str(),
    ]);
    serde_json::from_str(&text).expect("qemu-img info prints JSON")
}

/// Whether `qemu-img compare` finds the guest-visible contents of two
/// images equal (formats detected by qemu-img).
pub fn qemu_compare(a: &Path, b: &Path) -> bool {
    let output = tool_output(
        "qemu-img",
        [
            OsStr::new("compare"),
            OsStr::new("-U"),
            a.as_os_str(),
            b.as_os_str(),
        ],
        "",
    );
    match output.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!(
            "qemu-img compare {} {} failed: {}",
            a.display(),
            b.display(),
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

/// `qemu-img check` passes (no corruption, no leaks).
pub fn qemu_check(path: &Path) {
    qemu_img([OsStr::new("check"), path.as_os_str()]);
}

/// Writes `pattern` bytes with qemu-io: `(pattern, offset, len)` each.
pub fn qemu_io_write(path: &Path, format: &str, writes: &[(u8, u64, u64)]) {
    let mut args: Vec<String> = vec!["-f".into(), format.into()];
    for (pattern, offset, len) in writes {
        args.push("-c".into());
        args.push(format!("write -P {pattern} {offset} {len}"));
    }
    args.push(path.display().to_string());
    tool("qemu-io", &args, "");
}

/// Bytes allocated to a file: `st_blocks` × 512, as `stat` reports it.
pub fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("cannot stat {}: {e}", path.display()))
        .blocks()
        * 512
}

/// Bytes `du -B1` says a file occupies.
pub fn du_bytes(path: &Path) -> u64 {
    let out = tool("du", [OsStr::new("-B1"), path.as_os_str()], "");
    out.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("du printed {out:?}"))
}

/// A sparse raw file of `size` bytes with the given byte ranges filled.
pub fn sparse_file(path: &Path, size: u64, fills: &[(u8, u64, u64)]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::create(path).expect("cannot create a test image");
    file.set_len(size).expect("cannot size a test image");
    for &(byte, offset, len) in fills {
        file.write_all_at(&vec![byte; len as usize], offset)
            .expect("cannot write a test image");
    }
    file.sync_all().expect("cannot sync a test image");
}

/// A loop device over a file, detached when dropped.
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub path: PathBuf,
}

impl LoopDevice {
    /// Attaches `file` to a free loop device.
    pub fn attach(file: &Path) -> LoopDevice {
        let out = tool(
            "losetup",
            [OsStr::new("--find"), OsStr::new("--show"), file.as_os_str()],
            "",
        );
        LoopDevice {
            path: PathBuf::from(out.trim()),
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup")
            .arg("--detach")
            .arg(&self.path)
            .status();
    }
}
