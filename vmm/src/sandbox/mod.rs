//! zvmm's confinement of itself, without an external jailer: one seccomp
//! filter per thread kind ([`seccomp`]) and a Landlock domain limited to
//! the paths the VM's configuration names ([`landlock`]).
//!
//! Both are per-thread in Linux and inherited by threads created later, so
//! [`init`] (called by the `zvmm` binary before any other thread exists)
//! starts one unconfined *launcher* thread, `zvmm-launcher`, and makes it
//! the creator of every other thread (through
//! [`devices::virtio::thread::spawn`], which device workers use too): each
//! new thread inherits nothing and installs exactly its own kind's
//! confinement before its body runs. The launcher also starts virtiofsd
//! ([`run_unconfined`]), whose own sandbox needs system calls no zvmm
//! thread may make. It runs nothing else: it waits on a channel.
//!
//! Test hooks (they can only make zvmm die or print): with
//! `ZVMM_SECCOMP_SELFTEST=<kind>` a thread of that kind makes a forbidden
//! system call (`mount` with null arguments) right after installing its
//! filter; with `ZVMM_LANDLOCK_SELFTEST=<path>` the first vCPU thread tries
//! to open `path` after restricting itself and prints the outcome.

pub mod landlock;
pub mod rules;
pub mod seccomp;
pub mod syscall_names;

use std::cell::Cell;
use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, OnceLock};

use devices::virtio::thread::{LaunchJob, ThreadStarter};

pub use self::landlock::{LandlockError, LandlockMode, PathRules};
pub use self::seccomp::{SeccompError, SeccompMode};

/// Exit status when a thread made a system call its filter forbids
/// (`--seccomp true`).
pub const EXIT_SECCOMP: i32 = 8;

/// Sandbox set-up errors.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A seccomp filter could not be built or installed.
    #[error("seccomp")]
    Seccomp(#[from] SeccompError),
    /// Landlock could not be set up.
    #[error("landlock")]
    Landlock(#[from] LandlockError),
    /// The launcher thread could not start.
    #[error("cannot start the thread launcher")]
    Launcher(#[source] std::io::Error),
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler")]
    Signal(#[source] std::io::Error),
}

/// What kind of thread a zvmm thread is, from its name: each kind has its
/// own seccomp filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The `zvmm` command's main thread once the VM runs (or the API is
    /// served).
    Main,
    /// `vmm`: builds the VM at each boot and runs the event loop.
    Vmm,
    /// `vcpuN`: KVM_RUN and the exits it dispatches to the buses.
    Vcpu,
    /// `api-accept`: takes API connections.
    ApiAccept,
    /// `api-conn`: one API connection's requests (vm.create builds a VM).
    ApiConn,
    /// `api-vm-events`: ends the process when the VM stops by itself.
    ApiVmEvents,
    /// `blk-ID`: a disk's requests.
    Block,
    /// `net-ID-N`: a NIC queue pair's frames.
    Net,
    /// `vsock-ID`: a vsock device's connections.
    Vsock,
    /// `rng-ID`: the entropy device's requests.
    Rng,
    /// `fs-ID-watch`: watches a virtio-fs backend's socket.
    FsWatch,
    /// `fs-ID-irq`: relays a virtio-fs queue's interrupts.
    FsIrq,
    /// `virtiofsd-log`: reads a virtiofsd's stderr.
    VirtiofsdLog,
}

impl ThreadKind {
    /// Every kind, in the order the docs list them.
    pub const ALL: [ThreadKind; 13] = [
        ThreadKind::Main,
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::ApiAccept,
        ThreadKind::ApiConn,
        ThreadKind::ApiVmEvents,
        ThreadKind::Block,
        ThreadKind::Net,
        ThreadKind::Vsock,
        ThreadKind::Rng,
        ThreadKind::FsWatch,
        ThreadKind::FsIrq,
        ThreadKind::VirtiofsdLog,
    ];

    /// The kind's name (`--print-seccomp`, `ZVMM_SECCOMP_SELFTEST`).
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::ApiAccept => "api-accept",
            ThreadKind::ApiConn => "api-conn",
            ThreadKind::ApiVmEvents => "api-vm-events",
            ThreadKind::Block => "blk",
            ThreadKind::Net => "net",
            ThreadKind::Vsock => "vsock",
            ThreadKind::Rng => "rng",
            ThreadKind::FsWatch => "fs-watch",
            ThreadKind::FsIrq => "fs-irq",
            ThreadKind::VirtiofsdLog => "virtiofsd-log",
        }
    }

    /// The kind named `name` (as [`ThreadKind::name`] spells it).
    pub fn from_name(name: &str) -> Option<ThreadKind> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }

    /// The kind of the thread named `thread` (`vcpu0`, `blk-disk0`, ...);
    /// `None` for a name zvmm does not give.
    pub fn of_thread(thread: &str) -> Option<ThreadKind> {
        let exact = match thread {
            "main" => Some(ThreadKind::Main),
            "vmm" => Some(ThreadKind::Vmm),
            "api-accept" => Some(ThreadKind::ApiAccept),
            "api-conn" => Some(ThreadKind::ApiConn),
            "api-vm-events" => Some(ThreadKind::ApiVmEvents),
            "virtiofsd-log" => Some(ThreadKind::VirtiofsdLog),
            _ => None,
        };
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        exact.or(match thread {
            t if t.strip_prefix("vcpu").is_some_and(digits) => Some(ThreadKind::Vcpu),
            t if t.starts_with("blk-") => Some(ThreadKind::Block),
            t if t.starts_with("net-") => Some(ThreadKind::Net),
            t if t.starts_with("vsock-") => Some(ThreadKind::Vsock),
            t if t.starts_with("rng-") => Some(ThreadKind::Rng),
            t if t.starts_with("fs-") && t.ends_with("-watch") => Some(ThreadKind::FsWatch),
            t if t.starts_with("fs-") && t.ends_with("-irq") => Some(ThreadKind::FsIrq),
            _ => None,
        })
    }

    /// Whether threads of this kind take the VM's Landlock domain as they
    /// start. The VMM thread takes it itself once its first boot is set up
    /// (it may start before the rules exist); the API threads outlive VMs.
    fn landlocked_at_start(self) -> bool {
        !matches!(
            self,
            ThreadKind::Vmm | ThreadKind::ApiAccept | ThreadKind::ApiConn | ThreadKind::ApiVmEvents
        )
    }
}

/// The process's confinement, fixed by [`init`].
struct Sandbox {
    seccomp: seccomp::Filters,
    launcher: Mutex<Sender<LaunchJob>>,
    seccomp_selftest: Option<ThreadKind>,
}

static SANDBOX: OnceLock<Sandbox> = OnceLock::new();

thread_local! {
    /// This thread's name for the SIGSYS report (no allocation, no lock).
    static THREAD_NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

/// Sets up confinement for this process: call once from `main` before any
/// other thread starts. With `SeccompMode::Off` and Landlock off nothing
/// is installed and threads start directly.
pub fn init(seccomp_mode: SeccompMode, landlock_mode: LandlockMode) -> Result<(), SandboxError> {
    landlock::set_mode(landlock_mode)?;
    if seccomp_mode == SeccompMode::Off && !landlock::enabled() {
        return Ok(());
    }
    let filters = seccomp::Filters::compile(seccomp_mode)?;
    if seccomp_mode == SeccompMode::Trap {
        seccomp::install_sigsys_handler().map_err(SandboxError::Signal)?;
    }
    let (sender, jobs) = mpsc::channel::<LaunchJob>();
    std::thread::Builder::new()
        .name("zvmm-launcher".into())
        .spawn(move || jobs.into_iter().for_each(|job| job()))
        .map_err(SandboxError::Launcher)?;
    let seccomp_selftest = std::env::var("ZVMM_SECCOMP_SELFTEST")
        .ok()
        .and_then(|kind| ThreadKind::from_name(&kind));
    let sandbox = Sandbox {
        seccomp: filters,
        launcher: Mutex::new(sender),
        seccomp_selftest,
    };
    if SANDBOX.set(sandbox).is_ok() {
        devices::virtio::thread::set_starter(Box::new(Starter));
    }
    Ok(())
}

/// Confines the calling thread as a thread of `kind` (the main thread,
/// once it has done what needs more).
pub fn confine_current(kind: ThreadKind) -> Result<(), SandboxError> {
    remember_thread_name(kind.name());
    confine(kind)
}

fn confine(kind: ThreadKind) -> Result<(), SandboxError> {
    let Some(sandbox) = SANDBOX.get() else {
        return Ok(());
    };
    if kind.landlocked_at_start() {
        landlock::restrict_current()?;
    }
    if kind == ThreadKind::Vcpu {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(landlock::selftest);
    }
    sandbox.seccomp.install(kind)?;
    if sandbox.seccomp_selftest == Some(kind) {
        seccomp::forbidden_call();
    }
    Ok(())
}

/// Runs `job` on the unconfined launcher thread and returns its result
/// (inline when there is no sandbox): for starting processes, which
/// inherit the calling thread's filter and domain.
pub fn run_unconfined<T, F>(job: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let Some(sandbox) = SANDBOX.get() else {
        return job();
    };
    let (sender, result) = mpsc::sync_channel(1);
    let job: LaunchJob = Box::new(move || {
        let _ = sender.send(job());
    });
    let sent = sandbox
        .launcher
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(job);
    // The launcher never ends while the process runs; should it have, the
    // job runs here, confined.
    match sent {
        Ok(()) => {}
        Err(mpsc::SendError(job)) => job(),
    }
    result.recv().expect("the job sends its result")
}

/// `e` and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        line.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    line
}

fn remember_thread_name(name: &str) {
    let mut buffer = [0u8; 16];
    let len = name.len().min(15);
    buffer[..len].copy_from_slice(&name.as_bytes()[..len]);
    THREAD_NAME.with(|cell| cell.set(buffer));
}

/// This thread's remembered name, for the SIGSYS handler.
fn thread_name() -> [u8; 16] {
    THREAD_NAME.with(Cell::get)
}

/// Routes every zvmm thread's creation through the launcher.
struct Starter;

impl ThreadStarter for Starter {
    fn launch(&self, job: LaunchJob) {
        let Some(sandbox) = SANDBOX.get() else {
            return job();
        };
        let sent = sandbox
            .launcher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job);
        if let Err(mpsc::SendError(job)) = sent {
            job();
        }
    }

    fn on_start(&self, name: &str) {
        remember_thread_name(name);
        // A thread zvmm does not name gets the main thread's small filter:
        // should it need more, the report names it.
        let kind = ThreadKind::of_thread(name).unwrap_or(ThreadKind::Main);
        report_setup_failure(name, confine(kind));
    }
}

/// A thread that cannot confine itself must not run unconfined: zvmm
/// stops with the reason.
fn report_setup_failure(thread: &str, result: Result<(), SandboxError>) {
    if let Err(e) = result {
        eprintln!(
            "zvmm: thread {thread} cannot confine itself: {}",
            error_chain(&e)
        );
        std::process::exit(crate::lifecycle::EXIT_ERROR);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_names_map_to_their_kinds() {
        let cases = [
            ("vmm", Some(ThreadKind::Vmm)),
            ("vcpu0", Some(ThreadKind::Vcpu)),
            ("vcpu12", Some(ThreadKind::Vcpu)),
            ("vcpu", None),
            ("vcpux", None),
            ("api-conn", Some(ThreadKind::ApiConn)),
            ("blk-_disk0", Some(ThreadKind::Block)),
            ("net-_net0-1", Some(ThreadKind::Net)),
            ("vsock-_vsock0", Some(ThreadKind::Vsock)),
            ("rng-__rng", Some(ThreadKind::Rng)),
            ("fs-_fs0-watch", Some(ThreadKind::FsWatch)),
            ("fs-_fs0-irq", Some(ThreadKind::FsIrq)),
            ("fs-_fs0", None),
            ("virtiofsd-log", Some(ThreadKind::VirtiofsdLog)),
            ("worker", None),
        ];
        for (thread, kind) in cases {
            assert_eq!(ThreadKind::of_thread(thread), kind, "{thread}");
        }
    }

    #[test]
    fn kind_names_round_trip() {
        for kind in ThreadKind::ALL {
            assert_eq!(ThreadKind::from_name(kind.name()), Some(kind));
        }
        assert_eq!(ThreadKind::from_name("blk-x"), None);
    }
}
