//! virtio-fs tests' host side: finding and running virtiofsd (the
//! vhost-user backend both VMMs use), the shared directory the probe's
//! FUSE checks run on ([`Share`]: files prepared before the run, the
//! `probe.fs.*` command line, and every check of the report and of the
//! files afterwards), and the leftovers a run must not leave (processes,
//! sockets, runtime directories).
//!
//! The probe side is `resources/probe/src/fstest.rs`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::api::processes_mentioning;
use crate::disk::line;
use crate::probe::{fnv1a64, test_bytes, Fields, ProbeReport};

/// Environment variable naming the virtiofsd binary (else
/// `~/.cargo/bin/virtiofsd`, else `virtiofsd` in `PATH`).
pub const VIRTIOFSD_VAR: &str = "ZVMM_VIRTIOFSD";
/// How long virtiofsd may take to listen on its socket.
const LISTEN_LIMIT: Duration = Duration::from_secs(10);

/// Failures of the virtio-fs test plumbing.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// No virtiofsd binary.
    #[error(
        "virtiofsd not found (${VIRTIOFSD_VAR}, ~/.cargo/bin/virtiofsd, PATH); install it: cargo install virtiofsd --locked"
    )]
    Missing,
    /// virtiofsd could not be started.
    #[error("cannot start {bin}")]
    Spawn {
        /// The binary.
        bin: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// virtiofsd exited before it listened.
    #[error("virtiofsd exited ({status}) before listening on {socket}: {stderr}")]
    Exited {
        /// Its socket.
        socket: PathBuf,
        /// How it ended.
        status: ExitStatus,
        /// What it said.
        stderr: String,
    },
    /// virtiofsd did not listen in time.
    #[error("virtiofsd not listening on {socket} after {limit:?}")]
    NotListening {
        /// Its socket.
        socket: PathBuf,
        /// How long we waited.
        limit: Duration,
    },
    /// A file of the shared directory could not be made or read.
    #[error("cannot {what} {path}")]
    File {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The virtiofsd binary: `$ZVMM_VIRTIOFSD`, `~/.cargo/bin/virtiofsd`, or
/// the first `virtiofsd` in `PATH`.
pub fn virtiofsd_bin() -> Result<PathBuf, FsError> {
    if let Some(bin) = std::env::var_os(VIRTIOFSD_VAR) {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(FsError::Missing)
        };
    }
    let home = std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo/bin/virtiofsd"));
    let path = std::env::var_os("PATH").unwrap_or_default();
    let in_path = std::env::split_paths(&path).map(|dir| dir.join("virtiofsd"));
    home.into_iter()
        .chain(in_path)
        .find(|candidate| candidate.is_file())
        .ok_or(FsError::Missing)
}

/// virtiofsd's arguments as the tests run it for QEMU and for
/// `zvmm --fs tag=T,socket=S`: the options zvmm uses for `path` shares.
pub fn virtiofsd_args(socket: &Path, shared: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["--socket-path".into(), socket.into()];
    args.extend(["--shared-dir".into(), shared.into()]);
    args.extend(
        ["--xattr", "--cache", "auto", "--sandbox", "namespace"]
            .iter()
            .map(OsString::from),
    );
    args
}

/// A virtiofsd the test started (in a process group of its own); killed
/// with its group on drop if still running.
pub struct Virtiofsd {
    child: Child,
    socket: PathBuf,
    stderr: Option<JoinHandle<String>>,
}

impl Virtiofsd {
    /// Starts virtiofsd on `shared` with [`virtiofsd_args`] and waits until
    /// `socket` listens (read from `/proc/net/unix`: connecting would use
    /// up the one connection it serves).
    pub fn start(socket: &Path, shared: &Path) -> Result<Virtiofsd, FsError> {
        let bin = virtiofsd_bin()?;
        let mut child = Command::new(&bin)
            .args(virtiofsd_args(socket, shared))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| FsError::Spawn { bin, source })?;
        let stderr = child.stderr.take().map(|mut pipe| {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = pipe.read_to_string(&mut text);
                text
            })
        });
        let mut daemon = Virtiofsd {
            child,
            socket: socket.to_path_buf(),
            stderr,
        };
        daemon.wait_listening()?;
        Ok(daemon)
    }

    fn wait_listening(&mut self) -> Result<(), FsError> {
        let start = Instant::now();
        while !socket_listening(&self.socket) {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(FsError::Exited {
                    socket: self.socket.clone(),
                    status,
                    stderr: self.take_stderr(),
                });
            }
            if start.elapsed() > LISTEN_LIMIT {
                return Err(FsError::NotListening {
                    socket: self.socket.clone(),
                    limit: LISTEN_LIMIT,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Its process id (the parent of the sandboxed server).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Waits up to `limit` for it to exit by itself (it does once its VMM
    /// disconnects): its status (`None`: still running, then killed) and
    /// what it printed.
    pub fn wait(mut self, limit: Duration) -> (Option<ExitStatus>, String) {
        let deadline = Instant::now() + limit;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                _ => {
                    self.kill_group();
                    break None;
                }
            }
        };
        (status, self.take_stderr())
    }

    fn take_stderr(&mut self) -> String {
        if let Ok(None) = self.child.try_wait() {
            return String::new();
        }
        self.stderr
            .take()
            .and_then(|thread| thread.join().ok())
            .unwrap_or_default()
    }

    /// SIGKILL to its process group (the sandboxed child too), then reaps.
    fn kill_group(&mut self) {
        if let Ok(pgid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) has no memory effects; the group is the one
            // our own unreaped child leads, so its id cannot be reused.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
        let _ = self.child.wait();
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill_group();
        }
    }
}

/// Whether a Unix socket bound at `path` is listening (`__SO_ACCEPTCON`
/// in its `/proc/net/unix` line).
pub fn socket_listening(path: &Path) -> bool {
    const ACCEPTCON: u32 = 1 << 16;
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let path = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let flags = fields.get(3).and_then(|f| u32::from_str_radix(f, 16).ok());
        fields.get(7) == Some(&path.as_ref()) && flags.is_some_and(|f| f & ACCEPTCON != 0)
    })
}

/// Processes (zombies excluded) whose command line names `needle`, with
/// that command line, e.g. a virtiofsd still serving a test's directory.
pub fn processes_naming(needle: &str) -> Vec<(u32, String)> {
    processes_mentioning(needle)
        .into_iter()
        .filter(|&pid| pid != std::process::id())
        .map(|pid| {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let text = String::from_utf8_lossy(&raw).replace('\0', " ");
            (pid, text.trim_end().to_string())
        })
        .collect()
}

/// Byte at `offset` of a file the probe creates (`probe.fs.create`):
/// `(((offset / 256) % 251 + offset % 256) * 7 + 1) & 0xff`.
pub fn pattern_byte(offset: u64) -> u8 {
    ((((offset / 256) % 251 + offset % 256) * 7 + 1) & 0xff) as u8
}

/// The first `len` bytes the probe writes into a file it creates.
pub fn pattern(len: u64) -> Vec<u8> {
    (0..len).map(pattern_byte).collect()
}

/// The names and sizes of the checks (see [`Share`]).
pub mod plan {
    /// The virtio-fs tag.
    pub const TAG: &str = "probefs";
    /// A host file the probe reads and hashes.
    pub const READ_FILE: &str = "host-data.bin";
    /// Its size (two and a half of the probe's 8 KiB requests).
    pub const READ_SIZE: usize = 20_000;
    /// A host file the probe moves into [`NEW_DIR`] as [`MOVED_NAME`].
    pub const MOVE_FILE: &str = "to-move.txt";
    /// A host file the probe removes.
    pub const DOOMED_FILE: &str = "doomed.txt";
    /// An empty host directory the probe removes.
    pub const EMPTY_DIR: &str = "empty-dir";
    /// The file the probe creates, with the pattern.
    pub const CREATED_FILE: &str = "created.bin";
    /// Its size (not a multiple of anything the probe uses).
    pub const CREATED_SIZE: u64 = 20_001;
    /// The directory the probe makes.
    pub const NEW_DIR: &str = "made-dir";
    /// The name [`MOVE_FILE`] gets inside [`NEW_DIR`].
    pub const MOVED_NAME: &str = "moved.txt";
}

/// What a listing showed of one entry: its type and size.
pub type Listing = BTreeMap<String, (String, u64)>;

/// The shared directory of the probe's checks: prepared before the run,
/// checked afterwards (the probe's report and the files themselves).
pub struct Share {
    dir: PathBuf,
    read_bytes: Vec<u8>,
    move_bytes: Vec<u8>,
    /// What the host said the empty directory's size was.
    empty_dir_size: u64,
}

impl Share {
    /// Makes `dir` (which must not exist or be empty) with the files the
    /// probe expects.
    pub fn prepare(dir: &Path) -> Result<Share, FsError> {
        fn file(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FsError {
            let path = path.to_path_buf();
            move |source| FsError::File { what, path, source }
        }
        std::fs::create_dir_all(dir).map_err(file("create", dir))?;
        let share = Share {
            dir: dir.to_path_buf(),
            read_bytes: test_bytes(plan::READ_SIZE, 0xf5),
            move_bytes: b"a host file that moves into a new directory\n".to_vec(),
            empty_dir_size: 0,
        };
        let write = |name: &str, bytes: &[u8]| {
            let path = dir.join(name);
            std::fs::write(&path, bytes).map_err(file("write", &path))
        };
        write(plan::READ_FILE, &share.read_bytes)?;
        write(plan::MOVE_FILE, &share.move_bytes)?;
        write(plan::DOOMED_FILE, b"remove me\n")?;
        let empty = dir.join(plan::EMPTY_DIR);
        std::fs::create_dir(&empty).map_err(file("create", &empty))?;
        let meta = std::fs::metadata(&empty).map_err(file("stat", &empty))?;
        Ok(Share {
            empty_dir_size: meta.len(),
            ..share
        })
    }

    /// The shared directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The kernel command line that runs every check.
    pub fn cmdline(&self) -> String {
        use plan::*;
        format!(
            "console=ttyS0 probe.fs.read={READ_FILE} probe.fs.create={CREATED_FILE}:{CREATED_SIZE} \
             probe.fs.mkdir={NEW_DIR} probe.fs.rename={MOVE_FILE}:{NEW_DIR}/{MOVED_NAME} \
             probe.fs.unlink={DOOMED_FILE} probe.fs.rmdir={EMPTY_DIR}"
        )
    }

    /// The root listing before the run, as the probe must report it.
    fn listing_before(&self) -> Listing {
        use plan::*;
        let file = |len: usize| ("file".to_string(), len as u64);
        Listing::from([
            (READ_FILE.into(), file(self.read_bytes.len())),
            (MOVE_FILE.into(), file(self.move_bytes.len())),
            (DOOMED_FILE.into(), file(10)),
            (EMPTY_DIR.into(), ("dir".into(), self.empty_dir_size)),
        ])
    }

    fn dir_size(&self, name: &str) -> u64 {
        std::fs::metadata(self.dir.join(name)).map_or(0, |m| m.len())
    }

    /// Every check of the report and of the shared directory after a run
    /// with [`Share::cmdline`]; panics with `context` on the first failure.
    pub fn check(&self, report: &ProbeReport, context: &str) {
        use plan::*;
        check_device(report, context);
        assert_eq!(
            listing(report, "", "before"),
            self.listing_before(),
            "{context}"
        );
        let absent = op_line(report, "lookup", ".probe-absent", context);
        assert_eq!(absent.get("errno"), Some("2"), "{context}");
        self.check_read(report, context);
        self.check_create(report, context);
        self.check_moves(report, context);
        let after = Listing::from([
            (READ_FILE.into(), ("file".into(), plan::READ_SIZE as u64)),
            (CREATED_FILE.into(), ("file".into(), CREATED_SIZE)),
            (NEW_DIR.into(), ("dir".into(), self.dir_size(NEW_DIR))),
        ]);
        assert_eq!(listing(report, "", "after"), after, "{context}");
        let moved = (
            MOVED_NAME.into(),
            ("file".into(), self.move_bytes.len() as u64),
        );
        assert_eq!(
            listing(report, NEW_DIR, "after"),
            Listing::from([moved]),
            "{context}"
        );
        check_session_end(report, 4, context);
        self.check_host_files(context);
    }

    fn check_read(&self, report: &ProbeReport, context: &str) {
        let size = self.read_bytes.len() as u64;
        let lookup = op_line(report, "lookup", plan::READ_FILE, context);
        assert_eq!(lookup.get("errno"), Some("0"), "{context}");
        assert_eq!(lookup.num("size"), Some(size), "{context}");
        let node = lookup.get("nodeid").unwrap_or_default().to_string();
        let getattr = node_line(report, "getattr", &node, context);
        assert_eq!(getattr.get("errno"), Some("0"), "{context}");
        assert_eq!(getattr.num("size"), Some(size), "{context}");
        assert_eq!(getattr.get("mode"), Some("0o100644"), "{context}");
        let open = node_line(report, "open", &node, context);
        assert_eq!(open.get("errno"), Some("0"), "{context}");
        let read = op_line(report, "read", plan::READ_FILE, context);
        assert_eq!(read.get("errno"), Some("0"), "{context}");
        assert_eq!(read.num("bytes"), Some(size), "{context}");
        assert_eq!(read.num("requests"), Some(3), "{context}");
        assert_eq!(
            read.num("fnv1a64"),
            Some(fnv1a64(&self.read_bytes)),
            "{context}"
        );
        let release = node_line(report, "release", &node, context);
        assert_eq!(release.get("errno"), Some("0"), "{context}");
    }

    fn check_create(&self, report: &ProbeReport, context: &str) {
        let name = plan::CREATED_FILE;
        let size = plan::CREATED_SIZE;
        let create = op_line(report, "create", name, context);
        assert_eq!(create.get("errno"), Some("0"), "{context}");
        let node = create.get("nodeid").unwrap_or_default().to_string();
        let write = op_line(report, "write", name, context);
        assert_eq!(write.get("errno"), Some("0"), "{context}");
        assert_eq!(write.num("bytes"), Some(size), "{context}");
        assert_eq!(write.num("requests"), Some(3), "{context}");
        let fsync = node_line(report, "fsync", &node, context);
        assert_eq!(fsync.get("errno"), Some("0"), "{context}");
        let getattr = node_line(report, "getattr", &node, context);
        assert_eq!(getattr.num("size"), Some(size), "{context}");
        let readback = op_line(report, "readback", name, context);
        assert_eq!(readback.get("errno"), Some("0"), "{context}");
        assert_eq!(readback.num("bytes"), Some(size), "{context}");
        assert_eq!(readback.get("match"), Some("1"), "{context}");
        let release = node_line(report, "release", &node, context);
        assert_eq!(release.get("errno"), Some("0"), "{context}");
    }

    fn check_moves(&self, report: &ProbeReport, context: &str) {
        use plan::*;
        let mkdir = op_line(report, "mkdir", NEW_DIR, context);
        assert_eq!(mkdir.get("errno"), Some("0"), "{context}");
        assert_eq!(mkdir.get("type"), Some("dir"), "{context}");
        let rename = find_op(report, "rename", "from", MOVE_FILE, context);
        assert_eq!(rename.get("errno"), Some("0"), "{context}");
        assert_eq!(rename.get("newdir"), mkdir.get("nodeid"), "{context}");
        let moved = op_line(report, "lookup", MOVED_NAME, context);
        assert_eq!(moved.get("errno"), Some("0"), "{context}");
        assert_eq!(moved.get("parent"), mkdir.get("nodeid"), "{context}");
        assert_eq!(
            moved.num("size"),
            Some(self.move_bytes.len() as u64),
            "{context}"
        );
        for (op, name) in [
            ("rename", MOVE_FILE),
            ("unlink", DOOMED_FILE),
            ("rmdir", EMPTY_DIR),
        ] {
            if op != "rename" {
                let removed = op_line(report, op, name, context);
                assert_eq!(removed.get("errno"), Some("0"), "{op}: {context}");
            }
            let gone = last_op_line(report, "lookup", name, context);
            assert_eq!(gone.get("errno"), Some("2"), "{name} after {op}: {context}");
        }
    }

    /// The files on the host after the run.
    fn check_host_files(&self, context: &str) {
        use plan::*;
        let read = |name: &str| {
            std::fs::read(self.dir.join(name))
                .unwrap_or_else(|e| panic!("cannot read {name} on the host: {e}: {context}"))
        };
        assert!(read(READ_FILE) == self.read_bytes, "{READ_FILE} changed");
        let created = read(CREATED_FILE);
        assert_eq!(created.len() as u64, CREATED_SIZE, "{context}");
        if let Some(at) = (0..created.len()).find(|&i| created[i] != pattern_byte(i as u64)) {
            panic!("{CREATED_FILE} differs from the pattern at byte {at}: {context}");
        }
        let moved = format!("{NEW_DIR}/{MOVED_NAME}");
        assert!(read(&moved) == self.move_bytes, "{moved} differs");
        for name in [MOVE_FILE, DOOMED_FILE, EMPTY_DIR] {
            assert!(
                std::fs::symlink_metadata(self.dir.join(name)).is_err(),
                "{name} still on the host: {context}"
            );
        }
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .unwrap_or_else(|e| panic!("cannot list the share: {e}"))
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [CREATED_FILE, READ_FILE, NEW_DIR], "{context}");
    }
}

/// The device lines: tag, one request queue, VERSION_1, both queues set
/// up, DRIVER_OK, FUSE_INIT answered by a 7.x server.
pub fn check_device(report: &ProbeReport, context: &str) {
    let device = line(report, "fs", "slot=", context);
    assert_eq!(device.get("tag"), Some(plan::TAG), "{context}");
    assert_eq!(device.num("num_request_queues"), Some(1), "{context}");
    let negotiated = device.num("negotiated").unwrap_or(0);
    assert_ne!(negotiated & (1 << 32), 0, "no VERSION_1: {context}");
    let slot = device.get("slot").unwrap_or_default();
    for queue in 0..2 {
        let prefix = format!("virtio slot={slot} queue={queue} ");
        assert!(
            report.lines().iter().any(|l| l.starts_with(&prefix)),
            "no queue {queue}: {context}"
        );
    }
    let init = line(report, "fs", "init ", context);
    assert_eq!(init.get("errno"), Some("0"), "{context}");
    assert_eq!(init.num("major"), Some(7), "{context}");
    assert!(init.num("minor") >= Some(31), "{context}");
    assert!(init.num("max_write") >= Some(4096), "{context}");
    assert!(
        !report.lines().iter().any(|l| l.contains(" broken ")),
        "{context}"
    );
    assert!(
        !report.lines().iter().any(|l| l.starts_with("fs bad_reply")),
        "{context}"
    );
}

/// The end of a session: every looked-up node forgotten and returned,
/// DESTROY, `errors` error replies, no broken device, the reset, one device.
pub fn check_session_end(report: &ProbeReport, errors: u64, context: &str) {
    let forget = line(report, "fs", "forget ", context);
    assert!(forget.num("nodes") >= Some(1), "{context}");
    assert_eq!(forget.num("returned"), forget.num("nodes"), "{context}");
    assert_eq!(forget.num("untracked"), Some(0), "{context}");
    assert_eq!(report.value("fs op=destroy "), Some("errno=0"), "{context}");
    let counters = report
        .values("fs slot=")
        .into_iter()
        .map(|rest| Fields::parse(&format!("slot={rest}")))
        .find(|f| f.get("requests").is_some())
        .unwrap_or_else(|| panic!("no fs counters: {context}"));
    assert_eq!(counters.num("errors"), Some(errors), "{context}");
    // DESTROY gets no reply.
    assert_eq!(
        counters.num("replies").map(|r| r + 1),
        counters.num("requests"),
        "{context}"
    );
    assert!(
        report
            .values("fs slot=")
            .iter()
            .any(|l| l.ends_with("reset=ok")),
        "{context}"
    );
    assert_eq!(report.value("fs devices="), Some("1"), "{context}");
}

/// The entries the `phase` listing of `dir` (`""`: the root) reported;
/// panics unless its summary line counts as many, without errors.
pub fn listing(report: &ProbeReport, dir: &str, phase: &str) -> Listing {
    let wanted = |f: &Fields| f.get("dir") == Some(dir) && f.get("phase") == Some(phase);
    let entries: Listing = report
        .values("fs entry ")
        .into_iter()
        .map(Fields::parse)
        .filter(wanted)
        .map(|f| {
            let name = f.get("name").unwrap_or_default().to_string();
            let kind = f.get("type").unwrap_or_default().to_string();
            (name, (kind, f.num("size").unwrap_or(u64::MAX)))
        })
        .collect();
    let summary = report
        .values("fs readdir ")
        .into_iter()
        .map(Fields::parse)
        .find(wanted)
        .unwrap_or_else(|| panic!("no {phase} listing of {dir:?}: {report:#?}"));
    assert_eq!(summary.get("errno"), Some("0"), "{report:#?}");
    assert_eq!(summary.get("malformed"), Some("0"), "{report:#?}");
    assert_eq!(
        summary.num("entries"),
        Some(entries.len() as u64),
        "{report:#?}"
    );
    entries
}

/// The fields of every `fs op=OP ...` line.
fn op_lines(report: &ProbeReport, op: &str) -> Vec<Fields> {
    let prefix = format!("fs op={op} ");
    report
        .values(&prefix)
        .into_iter()
        .map(Fields::parse)
        .collect()
}

/// The first `fs op=OP` line whose `key` is `value`.
fn find_op(report: &ProbeReport, op: &str, key: &str, value: &str, context: &str) -> Fields {
    op_lines(report, op)
        .into_iter()
        .find(|f| f.get(key) == Some(value))
        .unwrap_or_else(|| panic!("no 'fs op={op} ... {key}={value}': {context}"))
}

/// The first `fs op=OP` line about `name`.
fn op_line(report: &ProbeReport, op: &str, name: &str, context: &str) -> Fields {
    find_op(report, op, "name", name, context)
}

/// The last `fs op=OP` line about `name`.
fn last_op_line(report: &ProbeReport, op: &str, name: &str, context: &str) -> Fields {
    op_lines(report, op)
        .into_iter()
        .rfind(|f| f.get("name") == Some(name))
        .unwrap_or_else(|| panic!("no 'fs op={op} ... name={name}': {context}"))
}

/// The first `fs op=OP` line about node `nodeid`.
fn node_line(report: &ProbeReport, op: &str, nodeid: &str, context: &str) -> Fields {
    find_op(report, op, "nodeid", nodeid, context)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_windows_of_the_probe_table() {
        // Block b (256 bytes) is the table from b % 251 on; table[k] = 7k + 1.
        assert_eq!(pattern(3), [1, 8, 15]);
        assert_eq!(pattern_byte(255), (255 * 7 + 1) as u8);
        assert_eq!(pattern_byte(256), 8);
        assert_eq!(pattern_byte(251 * 256), 1);
        assert_eq!(pattern_byte(251 * 256 + 2), pattern_byte(2));
    }

    #[test]
    fn listening_means_listen_called() {
        let dir = std::env::temp_dir().join(format!("zvmm-fs-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("s.sock");
        assert!(!socket_listening(&path));
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(socket_listening(&path));
        drop(listener);
        assert!(!socket_listening(&path));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn processes_are_found_by_their_command_line() {
        let marker = format!("zvmm-fs-unit-marker-{}", std::process::id());
        assert!(processes_naming(&marker).is_empty());
        // `; :` keeps sh from exec'ing sleep, so the pid stays the shell's.
        let mut child = Command::new("sh")
            .args(["-c", "sleep 30; :", &marker])
            .spawn()
            .unwrap();
        // Right after fork the child still has the test's command line.
        let deadline = Instant::now() + Duration::from_secs(5);
        let found = loop {
            let found = processes_naming(&marker);
            if found.iter().any(|(pid, _)| *pid == child.id()) || Instant::now() > deadline {
                break found;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let _ = child.kill();
        let _ = child.wait();
        let ours: Vec<_> = found.iter().filter(|(pid, _)| *pid == child.id()).collect();
        assert_eq!(ours.len(), 1, "{found:?}");
        assert!(ours[0].1.starts_with("sh -c sleep 30"), "{found:?}");
        assert!(processes_naming(&marker)
            .iter()
            .all(|(pid, _)| *pid != child.id()));
    }

    #[test]
    fn virtiofsd_runs_with_zvmm_s_options() {
        let args = virtiofsd_args(Path::new("/s.sock"), Path::new("/share"));
        let text: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
        assert_eq!(
            text,
            [
                "--socket-path",
                "/s.sock",
                "--shared-dir",
                "/share",
                "--xattr",
                "--cache",
                "auto",
                "--sandbox",
                "namespace"
            ]
        );
    }
}
