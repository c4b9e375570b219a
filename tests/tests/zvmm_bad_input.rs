//! The bad-input corpus: one table of bad invocations (option syntax and
//! values, conflicting options, missing files, files of the wrong kind —
//! a directory as kernel, a text file as disk, a qcow2 with a bogus
//! backing file, a truncated ELF, a PE that is not a kernel, ...) and one
//! of bad REST API requests (malformed HTTP, bad JSON, wrong types,
//! unknown endpoints, oversized bodies, requests in the wrong state), each
//! with its expected exit status or HTTP status and what its one-line
//! error must contain.
//!
//! For every case: nothing panics (no "panicked" on stderr), nothing
//! hangs (each run has a time limit; the API server must still answer
//! after every request), every input file is unchanged (content hash,
//! size and mtime before and after), the error is one line starting
//! `zvmm: ` (CLI) or one JSON `{"error": ...}` without a line break (API)
//! and names the input. The table of cases (input → first line of the
//! error) is printed to stderr; all failures are listed together.

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use zvmm_tests::api::{get, put, start_api};
use zvmm_tests::disk::{make_image, FileState};
use zvmm_tests::images::{create, make_iso};
use zvmm_tests::probe::{probe_elf, test_bytes, Flavour};
use zvmm_tests::zvmm::{run_zvmm, scratch_dir, zvmm_bin, Finished};

/// Hard limit for one zvmm run (a hung one is killed and the case fails).
const LIMIT: Duration = Duration::from_secs(30);

/// One bad invocation.
struct CliCase {
    input: String,
    args: Vec<String>,
    code: i32,
    needles: Vec<String>,
}

/// The files the cases use, made once.
struct Files {
    dir: PathBuf,
    kernel: PathBuf,
    _live: UnixListener,
}

impl Files {
    fn kernel(&self) -> String {
        self.kernel.display().to_string()
    }

    fn make() -> Files {
        let dir = scratch_dir("bad-input");
        let kernel = probe_elf(Flavour::Pvh);
        let probe = std::fs::read(&kernel).unwrap();
        let write = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).unwrap();
        std::fs::create_dir(dir.join("adir")).unwrap();
        write("empty", b"");
        write("random.bin", &test_bytes(4096, 42));
        write("text.txt", b"hello\n");
        write("user-data.yaml", b"#cloud-config\n");
        write("vmlinux32", &elf32_image());
        write("truncated.elf", &probe[..probe.len() / 2]);
        write("header-only.elf", &probe[..40]);
        write("not-a-kernel.efi", &pe_image());
        write("zimage", &zimage());
        write("vmlinux.gz", &gzip(&probe));
        write("disk.gz", &gzip(b"hello\n"));
        let sparse = |name: &str, size: u64| make_image(&dir.join(name), size, &[]);
        sparse("disk.raw", 1 << 20);
        sparse("huge-initrd", 256 << 20);
        make_iso(&dir.join("cd.iso"), 1 << 20);
        let qcow2 =
            |name: &str, options: &[&str]| create(&dir.join(name), "qcow2", options, Some("1M"));
        qcow2("ok.qcow2", &[]);
        qcow2(
            "bogus-backing.qcow2",
            &["-u", "-b", "/nonexistent/base.qcow2", "-F", "qcow2"],
        );
        qcow2("backed.qcow2", &["-b", "ok.qcow2", "-F", "qcow2"]);
        let qcow2_header = std::fs::read(dir.join("ok.qcow2")).unwrap();
        write("truncated.qcow2", &qcow2_header[..512]);
        create(&dir.join("disk.vmdk"), "vmdk", &[], Some("1M"));
        mkfifo(&dir.join("fifo"));
        let live = UnixListener::bind(dir.join("live.sock")).unwrap();
        Files {
            dir,
            kernel,
            _live: live,
        }
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut child = Command::new("gzip")
        .args(["-c", "-n"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run gzip (apt-get install -y gzip): {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let input = bytes.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&input));
    let output = child.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    assert!(output.status.success(), "gzip failed: {output:?}");
    output.stdout
}

fn mkfifo(path: &Path) {
    let c_path = std::ffi::CString::new(path.display().to_string()).unwrap();
    // SAFETY: `c_path` is a valid NUL-terminated string for the call.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
}

/// A minimal but well-formed ELF32 i386 executable with one `PT_LOAD`.
fn elf32_image() -> Vec<u8> {
    const EHDR_LEN: u16 = 52;
    const PHDR_LEN: u16 = 32;
    let mut image = vec![0x7f, b'E', b'L', b'F', 1, 1, 1, 0];
    image.resize(16, 0);
    let half = |v: u16| v.to_le_bytes().to_vec();
    let word = |v: u32| v.to_le_bytes().to_vec();
    let len = u32::from(EHDR_LEN + PHDR_LEN);
    for field in [
        half(2),                   // e_type: EXEC
        half(3),                   // e_machine: 386
        word(1),                   // e_version
        word(0x10_0000),           // e_entry
        word(u32::from(EHDR_LEN)), // e_phoff
        word(0),                   // e_shoff
        word(0),                   // e_flags
        half(EHDR_LEN),            // e_ehsize
        half(PHDR_LEN),            // e_phentsize
        half(1),                   // e_phnum
        half(40),                  // e_shentsize
        half(0),                   // e_shnum
        half(0),                   // e_shstrndx
        word(1),                   // p_type: LOAD
        word(0),                   // p_offset
        word(0x10_0000),           // p_vaddr
        word(0x10_0000),           // p_paddr
        word(len),                 // p_filesz
        word(len),                 // p_memsz
        word(5),                   // p_flags: R X
        word(0x1000),              // p_align
    ] {
        image.extend(field);
    }
    image
}

/// An x86-64 PE/COFF header (an EFI application) without a Linux boot
/// header.
fn pe_image() -> Vec<u8> {
    let mut image = vec![0u8; 4096];
    image[..2].copy_from_slice(b"MZ");
    image[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
    image[0x80..0x84].copy_from_slice(b"PE\0\0");
    image[0x84..0x86].copy_from_slice(&0x8664u16.to_le_bytes());
    image
}

/// A boot sector with the `HdrS` header of a zImage (not loaded high).
fn zimage() -> Vec<u8> {
    let mut image = vec![0u8; 2048];
    image[0x1f1] = 4;
    image[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    image
}

/// The invocations, one a line: `input | exit status | arguments |
/// needles`. Arguments are split at spaces, needles at ` ;; `. `$K` is
/// the probe kernel, `$D` the directory of [`Files`], `$BOOT` stands for
/// `--kernel $K`, `$LONG` for 70000 `x`, `$S35` for 35 `s`.
const CLI_CASES: &str = r#"
no options at all | 2 |  | --kernel
unknown flag | 2 | $BOOT --bogus-flag | '--bogus-flag'
unknown short flag | 2 | $BOOT -k | '-k'
flag without its value | 2 | $BOOT --cpus | --cpus
--kernel twice | 2 | $BOOT --kernel x | --kernel ;; multiple times
memory not a size | 2 | $BOOT --memory size=abc | --memory ;; abc
memory too small | 2 | $BOOT --memory 1M | --memory
memory hugepages | 2 | $BOOT --memory 64M,hugepages=on | hugepages
zero cpus | 2 | $BOOT --cpus 0 | --cpus
cpus not a number | 2 | $BOOT --cpus boot=x | --cpus ;; 'x'
more cpus than supported | 2 | $BOOT --cpus 1000 | --cpus ;; 1000 ;; 1 to
max below boot | 2 | $BOOT --cpus boot=2,max=1 | --cpus ;; max=1
bad topology | 2 | $BOOT --cpus boot=2,topology=1:1:1 | topology ;; 1:1:1
unknown serial mode | 2 | $BOOT --serial bogus | --serial ;; bogus
serial file without path | 2 | $BOOT --serial file= | --serial ;; file
virtio console | 2 | $BOOT --console tty | --console ;; virtio-console
timeout not a number | 2 | $BOOT --timeout abc | --timeout ;; abc
negative grace | 2 | $BOOT --shutdown-grace -1 | '-1'
bad --expect regex | 2 | $BOOT --expect ( | --expect ;; '('
bad --fail-on regex | 2 | $BOOT --fail-on [ | --fail-on ;; '['
--pit neither on nor off | 2 | $BOOT --pit maybe | --pit ;; maybe
disk without path | 2 | $BOOT --disk readonly=on | --disk ;; path
disk unknown key | 2 | $BOOT --disk path=$D/disk.raw,bogus=1 | --disk ;; bogus
disk readonly=maybe | 2 | $BOOT --disk path=$D/disk.raw,readonly=maybe | readonly ;; maybe
disk image_type=vmdk | 2 | $BOOT --disk path=$D/disk.raw,image_type=vmdk | image_type ;; vmdk
disk serial too long | 2 | $BOOT --disk path=$D/disk.raw,serial=$S35 | --disk ;; serial ;; 20
two disks, one id | 2 | $BOOT --disk path=$D/disk.raw,id=x --disk path=$D/ok.qcow2,id=x | --disk ;; 'x' ;; twice
net bad mac | 2 | $BOOT --net tap=t0,mac=zz:zz | --net ;; zz:zz
net tap and fd | 2 | $BOOT --net tap=t0,fd=3 | --net tap=t0 ;; not both
net odd queues | 2 | $BOOT --net tap=t0,num_queues=3 | --net tap=t0 ;; num_queues=3
net queue size | 2 | $BOOT --net tap=t0,queue_size=3 | --net tap=t0 ;; queue_size=3
vsock reserved cid | 2 | $BOOT --vsock cid=2,socket=/tmp/x | --vsock ;; cid 2
vsock without cid | 2 | $BOOT --vsock socket=/tmp/x | --vsock ;; cid
vsock twice | 2 | $BOOT --vsock cid=3,socket=a --vsock cid=4,socket=b | --vsock ;; multiple times
fs without path or socket | 2 | $BOOT --fs tag=t | --fs tag=t ;; path=DIR
fs with shared=off | 2 | $BOOT --fs $D/adir --memory size=64M,shared=off | shared=off ;; --fs
rng without source | 2 | $BOOT --rng src= | --rng ;; src
api socket without path | 2 | $BOOT --api-socket path= | --api-socket ;; path
kernel extract without arguments | 2 | kernel extract | --output <PATH>, <BZIMAGE>
image create, size not a size | 2 | image create $D/new.raw 1Q | '1Q' ;; not a size
image create, unknown format | 2 | image create $D/new.raw 1M --format vmdk | --format ;; vmdk
missing kernel | 1 | --kernel $D/no-such-vmlinux | $D/no-such-vmlinux ;; --kernel
directory as kernel | 1 | --kernel $D/adir | $D/adir ;; directory
empty kernel | 1 | --kernel $D/empty | $D/empty ;; empty
random bytes as kernel | 1 | --kernel $D/random.bin | $D/random.bin ;; not an ELF
gzip-compressed kernel | 1 | --kernel $D/vmlinux.gz | $D/vmlinux.gz ;; gzip ;; decompress
32-bit ELF kernel | 1 | --kernel $D/vmlinux32 | $D/vmlinux32 ;; 32-bit
FIFO as kernel | 1 | --kernel $D/fifo | $D/fifo ;; FIFO
truncated ELF | 1 | --kernel $D/truncated.elf | $D/truncated.elf ;; truncated
ELF header only | 1 | --kernel $D/header-only.elf | $D/header-only.elf ;; truncated
PE that is not a kernel | 1 | --kernel $D/not-a-kernel.efi | $D/not-a-kernel.efi ;; not a Linux bzImage
zImage | 1 | --kernel $D/zimage | $D/zimage ;; zImage
text file as kernel | 1 | --kernel $D/text.txt | $D/text.txt ;; not an ELF
missing initrd | 1 | $BOOT --initrd $D/no-such-initrd | $D/no-such-initrd ;; --initrd
directory as initrd | 1 | $BOOT --initrd $D/adir | $D/adir ;; directory
FIFO as initrd | 1 | $BOOT --initrd $D/fifo | $D/fifo ;; FIFO
initrd larger than RAM | 1 | $BOOT --memory 64M --initrd $D/huge-initrd | $D/huge-initrd ;; does not fit ;; --memory
missing disk | 1 | $BOOT --disk path=$D/missing.raw | $D/missing.raw ;; does not exist
directory as disk | 1 | $BOOT --disk path=$D/adir | $D/adir ;; directory
text file as disk | 1 | $BOOT --disk path=$D/text.txt | $D/text.txt ;; multiple of 512
FIFO as disk | 1 | $BOOT --disk path=$D/fifo | $D/fifo ;; not a regular file
qcow2 with a bogus backing file | 1 | $BOOT --disk path=$D/bogus-backing.qcow2 | $D/bogus-backing.qcow2 ;; /nonexistent/base.qcow2
qcow2 cut after its header | 1 | $BOOT --disk path=$D/truncated.qcow2 | $D/truncated.qcow2 ;; truncated
VMDK disk | 1 | $BOOT --disk path=$D/disk.vmdk | $D/disk.vmdk ;; VMDK ;; qemu-img convert
gzip file as disk | 1 | $BOOT --disk path=$D/disk.gz | $D/disk.gz ;; gunzip
writable ISO | 1 | $BOOT --disk path=$D/cd.iso | $D/cd.iso ;; readonly=on
qcow2 forced raw | 1 | $BOOT --disk path=$D/ok.qcow2,image_type=raw | $D/ok.qcow2 ;; image_type=raw
backing file with backing_files=off | 1 | $BOOT --disk path=$D/backed.qcow2,backing_files=off | $D/backed.qcow2 ;; backing_files
one writable disk twice | 1 | $BOOT --disk path=$D/disk.raw --disk path=$D/disk.raw | $D/disk.raw ;; same image
serial file in a missing directory | 1 | $BOOT --serial file=/nonexistent/dir/log | --serial ;; /nonexistent/dir/log
command line of 70000 bytes | 1 | $BOOT --cmdline $LONG | command line ;; 70000 ;; 65535
rng source missing | 1 | $BOOT --rng src=/nonexistent | --rng ;; /nonexistent
rng source a directory | 1 | $BOOT --rng src=$D/adir | --rng ;; $D/adir ;; directory
fs share missing | 1 | $BOOT --fs $D/missing-dir | --fs ;; $D/missing-dir ;; does not exist
fs share a file | 1 | $BOOT --fs $D/text.txt | --fs ;; $D/text.txt ;; not a directory
fs socket missing | 1 | $BOOT --fs tag=t,socket=$D/nosock | --fs ;; $D/nosock
virtiofsd binary missing | 1 | $BOOT --fs $D/adir --virtiofsd /nonexistent/virtiofsd | /nonexistent/virtiofsd
api socket in a missing directory | 1 | $BOOT --api-socket /nonexistent/dir/api.sock | --api-socket ;; /nonexistent/dir
api socket path is a file | 1 | $BOOT --api-socket $D/text.txt | --api-socket ;; $D/text.txt ;; not a socket
api socket someone listens on | 1 | $BOOT --api-socket $D/live.sock | --api-socket ;; $D/live.sock ;; listening
vsock socket path is a file | 1 | $BOOT --vsock cid=3,socket=$D/text.txt | --vsock ;; $D/text.txt ;; not a socket
vsock socket someone listens on | 1 | $BOOT --vsock cid=3,socket=$D/live.sock | --vsock ;; $D/live.sock ;; listening
vsock socket in a missing directory | 1 | $BOOT --vsock cid=3,socket=/nonexistent/v.sock | --vsock ;; /nonexistent
cloud-init user-data missing | 1 | $BOOT --cloud-init user-data=$D/missing.yaml | cloud-init ;; $D/missing.yaml
cloud-init dir missing | 1 | $BOOT --cloud-init dir=$D/missing-dir | cloud-init ;; $D/missing-dir
net fd not open | 1 | $BOOT --net fd=99 | --net fd=99 ;; not open
net tap name too long | 1 | $BOOT --net tap=abcdefghijklmnopqrstu | abcdefghijklmnopqrstu ;; 15 bytes
more memory than any host has | 1 | $BOOT --memory 300000T | --memory ;; bytes of guest memory
kernel inspect missing file | 1 | kernel inspect $D/missing.elf | $D/missing.elf
kernel inspect directory | 1 | kernel inspect $D/adir | $D/adir
kernel extract of an ELF | 1 | kernel extract $K -o $D/out.elf | $K ;; not a bzImage
kernel extract onto a file | 1 | kernel extract $D/text.txt -o $D/disk.raw | $D/text.txt
image info missing file | 1 | image info $D/missing.raw | $D/missing.raw
image create over a file | 1 | image create $D/disk.raw 1M | $D/disk.raw ;; --force
image grow that shrinks | 1 | image grow $D/disk.raw 512K | $D/disk.raw ;; never shrinks
image convert over a file | 1 | image convert $D/disk.raw $D/ok.qcow2 | $D/ok.qcow2 ;; --force
image copy over a file | 1 | image copy $D/disk.raw $D/ok.qcow2 | $D/ok.qcow2 ;; --force
image copy of a VMDK | 1 | image copy $D/disk.vmdk $D/copy.raw | $D/disk.vmdk ;; VMDK
cloud-init build over a file | 1 | cloud-init build user-data=$D/user-data.yaml -o $D/disk.raw | $D/disk.raw ;; --force
cloud-init build, user-data missing | 1 | cloud-init build user-data=$D/missing.yaml -o $D/seed.img | $D/missing.yaml
"#;

/// [`CLI_CASES`] with the placeholders filled in.
fn cli_cases(files: &Files) -> Vec<CliCase> {
    let expand = |text: &str| {
        text.replace("$BOOT", "--kernel $K")
            .replace("$K", &files.kernel())
            .replace("$D", &files.dir.display().to_string())
            .replace("$LONG", &"x".repeat(70_000))
            .replace("$S35", &"s".repeat(35))
    };
    CLI_CASES
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split(" | ").collect();
            assert_eq!(fields.len(), 4, "bad table line {line:?}");
            CliCase {
                input: fields[0].to_string(),
                code: fields[1].parse().expect("exit status"),
                args: expand(fields[2])
                    .split_whitespace()
                    .map(str::to_string)
                    .collect(),
                needles: fields[3].split(" ;; ").map(expand).collect(),
            }
        })
        .collect()
}

/// One file before or after a run: its path, [`FileState`] (regular files
/// and directories) and size and mtime (anything, FIFOs included).
type Snapshot = (String, Option<FileState>, Option<(u64, i64, i64)>);

/// What a run could change of the files `args` name (size, mtime, blocks
/// and, for regular files, content); FIFOs and sockets are never read.
fn snapshot(args: &[String]) -> Vec<Snapshot> {
    let mut paths: Vec<String> = args
        .iter()
        .flat_map(|arg| {
            arg.split([',', '='])
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter(|piece| piece.starts_with('/'))
        .collect();
    paths.sort();
    paths.dedup();
    paths
        .into_iter()
        .map(|path| {
            let meta = std::fs::symlink_metadata(&path).ok();
            let regular = meta.as_ref().is_some_and(|m| m.is_file() || m.is_dir());
            let state = if regular {
                FileState::of(Path::new(&path))
            } else {
                None
            };
            let stat = meta.map(|m| (m.len(), m.mtime(), m.mtime_nsec()));
            (path, state, stat)
        })
        .collect()
}

/// The problems with one run (empty: as expected).
fn cli_problems(case: &CliCase, run: &Finished) -> Vec<String> {
    let mut problems = Vec::new();
    match run.status.and_then(|s| s.code()) {
        None => problems.push(format!("hung or killed after {:?}", run.elapsed)),
        Some(code) if code != case.code => {
            problems.push(format!("exit {code}, expected {}", case.code))
        }
        Some(_) => {}
    }
    if run.stderr.contains("panicked") {
        problems.push("panicked".into());
    }
    if !run.stdout.is_empty() {
        problems.push(format!("stdout not empty: {:?}", run.stdout));
    }
    if run.stderr.lines().count() != 1 || !run.stderr.starts_with("zvmm: ") {
        problems.push(format!("not one 'zvmm: ' line: {:?}", run.stderr));
    }
    for needle in &case.needles {
        if !run.stderr.contains(needle.as_str()) {
            problems.push(format!("no {needle:?} in the message"));
        }
    }
    problems
}

fn first_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or("");
    if line.chars().count() > 200 {
        format!("{}...", line.chars().take(200).collect::<String>())
    } else {
        line.to_string()
    }
}

fn run_cli_cases(files: &Files, failures: &mut Vec<String>) -> usize {
    let cases = cli_cases(files);
    eprintln!("| # | input | exit | first line of the error |\n|---|---|---|---|");
    for (index, case) in cases.iter().enumerate() {
        let before = snapshot(&case.args);
        let run = run_zvmm(&case.args, LIMIT);
        let mut problems = cli_problems(case, &run);
        if snapshot(&case.args) != before {
            problems.push("an input file changed".into());
        }
        let code = run
            .status
            .and_then(|s| s.code())
            .map_or("-".into(), |c| c.to_string());
        let shown = first_line(&run.stderr).replace(&files.dir.display().to_string(), "$D");
        eprintln!("| {} | {} | {code} | `{shown}` |", index + 1, case.input);
        if !problems.is_empty() {
            failures.push(format!(
                "CLI {}: {}: {:?}",
                case.input,
                problems.join("; "),
                run.stderr
            ));
        }
    }
    cases.len()
}

/// One bad API request: raw bytes sent on a new connection.
struct ApiCase {
    input: String,
    raw: Vec<u8>,
    status: u16,
    needle: String,
}

/// The requests, one a line, grouped by the VM's state when sent:
/// `state | input | status | METHOD endpoint | body | needle`. `RAW`
/// sends the body as the whole request; `\r`, `\n` and `\xNN` are
/// escapes, and `$BIG` in a raw body stands for 70000 `a`.
const API_CASES: &str = r#"
no VM | garbage request line | 400 | RAW | GARBAGE\r\n\r\n | METHOD TARGET
no VM | binary request line | 400 | RAW | \x00\x01\x02\r\n\r\n | METHOD TARGET
no VM | no HTTP version | 400 | RAW | GET /api/v1/vmm.ping\r\n\r\n | METHOD TARGET
no VM | HTTP/9.9 | 400 | RAW | GET /api/v1/vmm.ping HTTP/9.9\r\n\r\n | HTTP/1.1
no VM | header without colon | 400 | RAW | GET /api/v1/vmm.ping HTTP/1.1\r\nNoColon\r\n\r\n | ':'
no VM | 70 kB header | 431 | RAW | GET /api/v1/vmm.ping HTTP/1.1\r\nX: $BIG\r\n\r\n | larger than
no VM | body of 100 MB announced | 413 | RAW | PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n{ | larger than
no VM | negative Content-Length | 400 | RAW | PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: -5\r\n\r\n | Content-Length
no VM | Content-Length not a number | 400 | RAW | PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: abc\r\n\r\n | Content-Length
no VM | chunked body | 411 | RAW | PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n | Content-Length
no VM | body cut short | 400 | RAW | PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 50\r\n\r\n{"a": | closed
no VM | unknown path | 404 | RAW | GET /foo HTTP/1.1\r\n\r\n | /foo
no VM | path traversal | 404 | RAW | GET /api/v1/../../etc/passwd HTTP/1.1\r\n\r\n | passwd
no VM | unknown endpoint | 404 | GET vm.bogus |  | vm.bogus
no VM | GET on vm.create | 405 | GET vm.create |  | PUT
no VM | DELETE on vmm.ping | 405 | DELETE vmm.ping |  | GET
no VM | vm.resize | 501 | PUT vm.resize | {} | hotplug
no VM | vm.snapshot | 501 | PUT vm.snapshot | {} | snapshot
no VM | vm.create: bad JSON | 400 | PUT vm.create | { | bad JSON
no VM | vm.create: not JSON | 400 | PUT vm.create | \xff\xfe | bad JSON
no VM | vm.create: an array | 400 | PUT vm.create | [1,2] | object
no VM | vm.create: string for a number | 400 | PUT vm.create | {"cpus":{"boot_vcpus":"two"},"payload":{"kernel":"/k"}} | "two"
no VM | vm.create: negative size | 400 | PUT vm.create | {"memory":{"size":-1},"payload":{"kernel":"/k"}} | -1
no VM | vm.create: unknown field | 400 | PUT vm.create | {"payload":{"kernel":"/k"},"bogus_field":1} | bogus_field
no VM | vm.create: no kernel | 400 | PUT vm.create | {"cpus":{"boot_vcpus":1}} | kernel
no VM | vm.add-disk: bad JSON | 400 | PUT vm.add-disk | {"path": | bad JSON
no VM | vm.boot without a VM | 500 | PUT vm.boot |  | vm.create
no VM | vm.pause without a VM | 500 | PUT vm.pause |  | vm.create
no VM | vm.resume without a VM | 500 | PUT vm.resume |  | vm.create
no VM | vm.shutdown without a VM | 500 | PUT vm.shutdown |  | vm.create
no VM | vm.power-button without a VM | 500 | PUT vm.power-button |  | vm.create
no VM | vm.reboot without a VM | 500 | PUT vm.reboot |  | vm.create
no VM | vm.info without a VM | 500 | GET vm.info |  | vm.create
no VM | vm.add-disk without a VM | 500 | PUT vm.add-disk | {"path":"/x"} | vm.create
created | vm.create twice | 500 | PUT vm.create | {"payload":{"kernel":"/k"}} | vm.delete
created | vm.pause before boot | 500 | PUT vm.pause |  | created
created | vm.counters before boot | 500 | GET vm.counters |  | created
created | vm.add-disk: number as path | 400 | PUT vm.add-disk | {"path":7} | 7
created | vm.add-disk: unknown field | 400 | PUT vm.add-disk | {"path":"/x","bogus":1} | bogus
running | vm.boot while running | 500 | PUT vm.boot |  | running
running | vm.resume while running | 500 | PUT vm.resume |  | running
running | vm.add-disk while running | 500 | PUT vm.add-disk | {"path":"/x"} | boot
"#;

/// `\r`, `\n` and `\xNN` escapes as bytes.
fn unescape(text: &str) -> Vec<u8> {
    let (mut out, bytes) = (Vec::new(), text.as_bytes());
    let mut at = 0;
    while at < bytes.len() {
        let (byte, len) = match (bytes[at], bytes.get(at + 1)) {
            (b'\\', Some(b'r')) => (b'\r', 2),
            (b'\\', Some(b'n')) => (b'\n', 2),
            (b'\\', Some(b'x')) => {
                let hex = std::str::from_utf8(&bytes[at + 2..at + 4]).expect("ascii escape");
                (u8::from_str_radix(hex, 16).expect("hex escape"), 4)
            }
            (byte, _) => (byte, 1),
        };
        out.push(byte);
        at += len;
    }
    out
}

/// [`API_CASES`] grouped by state, in order.
fn api_cases() -> Vec<(String, Vec<ApiCase>)> {
    let mut groups: Vec<(String, Vec<ApiCase>)> = Vec::new();
    for line in API_CASES.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split(" | ").collect();
        assert_eq!(fields.len(), 6, "bad table line {line:?}");
        let body = fields[4].trim();
        let raw = match fields[3].split_once(' ') {
            None => unescape(&body.replace("$BIG", &"a".repeat(70_000))),
            Some((method, endpoint)) => request(method, endpoint, &unescape(body)),
        };
        let case = ApiCase {
            input: fields[1].to_string(),
            raw,
            status: fields[2].parse().expect("status"),
            needle: fields[5].to_string(),
        };
        match groups.last_mut() {
            Some((state, cases)) if state == fields[0] => cases.push(case),
            _ => groups.push((fields[0].to_string(), vec![case])),
        }
    }
    groups
}

fn request(method: &str, endpoint: &str, body: &[u8]) -> Vec<u8> {
    let mut raw = format!(
        "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(body);
    raw
}

/// The probe VM (hanging after boot) as `vm.create` takes it.
fn probe_vm(files: &Files) -> String {
    let mut vm = zvmm_tests::api::ProbeVm::new("probe.action=hang probe.pci=off");
    vm.serial_file = Some(files.dir.join("api-serial.log"));
    vm.json()
}

/// Sends `raw` on a new connection; returns the status and body.
fn exchange(socket: &Path, raw: &[u8]) -> Result<(u16, String), String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // The server may answer and close before it read everything.
    let _ = stream.write_all(raw);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    let read = stream.read_to_end(&mut answer);
    if answer.is_empty() {
        return Err(format!("no answer ({read:?})"));
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or(format!("no head: {text:?}"))?;
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok());
    Ok((
        status.ok_or(format!("no status: {head:?}"))?,
        body.to_string(),
    ))
}

fn api_problems(case: &ApiCase, answer: &Result<(u16, String), String>) -> Vec<String> {
    let (status, body) = match answer {
        Ok(answer) => answer,
        Err(e) => return vec![e.clone()],
    };
    let mut problems = Vec::new();
    if *status != case.status {
        problems.push(format!("status {status}, expected {}", case.status));
    }
    let error = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string));
    match error {
        None => problems.push(format!("body is not {{\"error\": ...}}: {body:?}")),
        Some(e) if e.contains('\n') => problems.push(format!("multi-line error {e:?}")),
        Some(e) if !e.contains(case.needle.as_str()) => {
            problems.push(format!("no {:?} in {e:?}", case.needle))
        }
        Some(_) => {}
    }
    problems
}

fn run_api_cases(files: &Files, failures: &mut Vec<String>) -> usize {
    let socket = files.dir.join("api.sock");
    let zvmm = start_api(&socket, &[]);
    let mut count = 0;
    eprintln!("| # | state | request | status | error |\n|---|---|---|---|---|");
    for (state, cases) in api_cases() {
        if state == "created" {
            assert_eq!(put(&socket, "vm.create", &probe_vm(files)).status, 204);
        }
        if state == "running" {
            assert_eq!(put(&socket, "vm.boot", "").status, 204);
        }
        for case in cases {
            count += 1;
            let answer = exchange(&socket, &case.raw);
            let mut problems = api_problems(&case, &answer);
            if get(&socket, "vmm.ping").status != 200 {
                problems.push("the server stopped answering".into());
            }
            let (status, body) = answer.clone().unwrap_or((0, String::new()));
            eprintln!(
                "| {count} | {state} | {} | {status} | `{}` |",
                case.input,
                first_line(&body)
            );
            if !problems.is_empty() {
                failures.push(format!(
                    "API {state}: {}: {}",
                    case.input,
                    problems.join("; ")
                ));
            }
        }
    }
    assert_eq!(put(&socket, "vmm.shutdown", "").status, 204);
    let done = zvmm.finish(LIMIT);
    if done.code() != 0 || done.stderr.contains("panicked") {
        failures.push(format!("API server ended badly: {done:#?}"));
    }
    count
}

#[test]
fn bad_input_corpus() {
    zvmm_bin();
    let files = Files::make();
    let mut failures = Vec::new();
    let cli = run_cli_cases(&files, &mut failures);
    let api = run_api_cases(&files, &mut failures);
    eprintln!(
        "bad input: {cli} invocations and {api} API requests, {} failed",
        failures.len()
    );
    assert!(cli + api >= 60, "the corpus shrank");
    assert!(
        failures.is_empty(),
        "{} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
