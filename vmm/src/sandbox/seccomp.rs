//! Seccomp: the allow-list of each thread kind (the single source of the
//! filters, `zvmm --print-seccomp` and the README table), compiled with
//! `seccompiler`, installed by each thread on itself, and the SIGSYS
//! handler that reports a forbidden call and ends zvmm.
//!
//! The lists were taken from `strace -f` of the end-to-end tests (each
//! thread's calls after it installed its filter) and of the paths those
//! tests do not reach (errors, teardown, reboot), then reviewed: what a
//! kind does not need is left out, so it stops zvmm.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::rules::{allow_list, Ioctls, BASE};
use super::{syscall_names, thread_name, ThreadKind, EXIT_SECCOMP};

/// `--seccomp`: cloud-hypervisor's spelling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompMode {
    /// `true`: a forbidden call stops zvmm (SIGSYS, exit status 8).
    Trap,
    /// `log`: a forbidden call is allowed and logged by the kernel.
    Log,
    /// `false`: no filters.
    Off,
}

impl SeccompMode {
    /// Parses `true`, `log` or `false`.
    pub fn parse(value: &str) -> Result<SeccompMode, SeccompError> {
        match value {
            "true" => Ok(SeccompMode::Trap),
            "log" => Ok(SeccompMode::Log),
            "false" => Ok(SeccompMode::Off),
            other => Err(SeccompError::Mode(other.to_string())),
        }
    }
}

/// Seccomp errors.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// Not `true`, `log` or `false`.
    #[error("--seccomp {0}: expected true, log or false")]
    Mode(String),
    /// An allow-list names a system call x86_64 does not have.
    #[error("unknown system call {0} in the {1} allow-list")]
    UnknownSyscall(&'static str, &'static str),
    /// seccompiler refused a rule or the filter.
    #[error("cannot build the {kind} filter")]
    Build {
        /// The thread kind.
        kind: &'static str,
        /// What seccompiler said.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter.
    #[error("cannot install the {kind} filter")]
    Install {
        /// The thread kind.
        kind: &'static str,
        /// What seccompiler said.
        #[source]
        source: seccompiler::Error,
    },
}

/// The compiled filter of every kind (none with `--seccomp false`).
pub struct Filters {
    programs: BTreeMap<ThreadKind, BpfProgram>,
}

impl Filters {
    /// Compiles every kind's filter for `mode`.
    pub fn compile(mode: SeccompMode) -> Result<Filters, SeccompError> {
        let mismatch = match mode {
            SeccompMode::Off => {
                return Ok(Filters {
                    programs: BTreeMap::new(),
                })
            }
            SeccompMode::Trap => SeccompAction::Trap,
            SeccompMode::Log => SeccompAction::Log,
        };
        let programs = ThreadKind::ALL
            .into_iter()
            .map(|kind| Ok((kind, compile_kind(kind, mismatch.clone())?)))
            .collect::<Result<_, SeccompError>>()?;
        Ok(Filters { programs })
    }

    /// Installs `kind`'s filter on the calling thread.
    pub fn install(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        let Some(program) = self.programs.get(&kind) else {
            return Ok(());
        };
        seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
            kind: kind.name(),
            source,
        })
    }
}

fn compile_kind(kind: ThreadKind, mismatch: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let build = |source: seccompiler::BackendError| SeccompError::Build {
        kind: kind.name(),
        source,
    };
    let list = allow_list(kind);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for name in BASE.iter().chain(list.syscalls) {
        let nr =
            syscall_names::number(name).ok_or(SeccompError::UnknownSyscall(name, kind.name()))?;
        rules.insert(nr, Vec::new());
    }
    // Signals only to zvmm's own threads (a panic's abort, vCPU kicks).
    let own_pid = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        u64::from(std::process::id()),
    )
    .and_then(|condition| SeccompRule::new(vec![condition]))
    .map_err(build)?;
    rules.insert(libc::SYS_tgkill, vec![own_pid]);
    if let Ioctls::Only(requests) = list.ioctls {
        let ioctl_rules = requests
            .iter()
            .map(|(_, request)| {
                let condition =
                    SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, *request)?;
                SeccompRule::new(vec![condition])
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(build)?;
        rules.insert(libc::SYS_ioctl, ioctl_rules);
    } else if list.ioctls == Ioctls::Any {
        rules.insert(libc::SYS_ioctl, Vec::new());
    }
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

/// The test hook's forbidden call: `mount` with null arguments (fails
/// with EFAULT where it is let through).
pub fn forbidden_call() {
    // SAFETY: mount(2) with null pointers reads no memory of ours; it fails
    // (or, with a filter, traps) without side effects.
    unsafe { libc::syscall(libc::SYS_mount, 0usize, 0usize, 0usize, 0usize, 0usize) };
}

/// Installs the SIGSYS handler that reports a trapped call and ends zvmm.
pub fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; the handler is an extern "C"
    // function with the SA_SIGINFO signature, using only write and _exit.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handle_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Where `si_syscall` sits in x86_64's siginfo_t (after signo, errno,
/// code, padding and `si_call_addr`).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn handle_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO; for a
    // seccomp SIGSYS its union holds si_call_addr then si_syscall (int).
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<libc::c_int>()
            .read_unaligned()
    };
    let mut line = Line::default();
    line.push(b"zvmm: seccomp: thread ");
    let name = thread_name();
    let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    line.push(if len == 0 { b"?" } else { &name[..len] });
    line.push(b" made a forbidden system call: ");
    line.push(
        syscall_names::name(i64::from(nr))
            .unwrap_or("unknown")
            .as_bytes(),
    );
    line.push(b" (");
    line.push_number(nr);
    line.push(b")\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe and allowed by
    // every filter; the buffer outlives the call.
    unsafe {
        libc::write(2, line.bytes.as_ptr().cast(), line.len);
        libc::_exit(EXIT_SECCOMP);
    }
}

/// A fixed buffer for the handler's one line (no allocation).
struct Line {
    bytes: [u8; 160],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line {
            bytes: [0; 160],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, text: &[u8]) {
        let room = self.bytes.len() - self.len;
        let n = text.len().min(room);
        self.bytes[self.len..self.len + n].copy_from_slice(&text[..n]);
        self.len += n;
    }

    fn push_number(&mut self, n: i32) {
        if n < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 10];
        let mut i = digits.len();
        let mut rest = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// What `kind` may call, one line per entry: `--print-seccomp KIND`.
pub fn describe(kind: ThreadKind) -> String {
    let list = allow_list(kind);
    let mut out = format!("{}: {}\n", kind.name(), list.summary);
    let mut names: Vec<&str> = BASE.iter().chain(list.syscalls).copied().collect();
    names.sort_unstable();
    out.push_str(&format!("  syscalls: {}\n", names.join(" ")));
    match list.ioctls {
        Ioctls::None => out.push_str("  ioctl: none\n"),
        Ioctls::Any => out.push_str("  ioctl: any request\n"),
        Ioctls::Only(requests) => {
            let names: Vec<&str> = requests.iter().map(|(name, _)| *name).collect();
            out.push_str(&format!("  ioctl: only {}\n", names.join(" ")));
        }
    }
    out
}

/// Every kind's allow-list as a Markdown table (the README's).
pub fn markdown_table() -> String {
    let mut out = String::from("| thread | allowed system calls |\n|---|---|\n");
    for kind in ThreadKind::ALL {
        let list = allow_list(kind);
        let extra = list.syscalls;
        let ioctl = match list.ioctls {
            Ioctls::None => String::new(),
            Ioctls::Any => " ioctl (any)".into(),
            Ioctls::Only(requests) => {
                let names: Vec<&str> = requests.iter().map(|(name, _)| *name).collect();
                format!(" ioctl ({})", names.join(", "))
            }
        };
        let plus = if extra.is_empty() { "" } else { " + " };
        out.push_str(&format!(
            "| `{}` | {}: base{plus}{}{} |\n",
            kind.name(),
            list.summary,
            extra.join(" "),
            ioctl
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_in_both_modes() {
        for mode in [SeccompMode::Trap, SeccompMode::Log] {
            let filters = Filters::compile(mode).unwrap();
            assert_eq!(filters.programs.len(), ThreadKind::ALL.len());
        }
        assert!(Filters::compile(SeccompMode::Off)
            .unwrap()
            .programs
            .is_empty());
    }

    #[test]
    fn modes_parse_with_cloud_hypervisors_words() {
        assert_eq!(SeccompMode::parse("true").unwrap(), SeccompMode::Trap);
        assert_eq!(SeccompMode::parse("log").unwrap(), SeccompMode::Log);
        assert_eq!(SeccompMode::parse("false").unwrap(), SeccompMode::Off);
        let e = SeccompMode::parse("on").unwrap_err().to_string();
        assert_eq!(e, "--seccomp on: expected true, log or false");
    }

    #[test]
    fn the_handlers_line_formats_numbers_without_allocating() {
        let mut line = Line::default();
        line.push(b"mount (");
        line.push_number(165);
        line.push(b") ");
        line.push_number(0);
        line.push_number(-7);
        assert_eq!(&line.bytes[..line.len], b"mount (165) 0-7");
    }

    #[test]
    fn the_table_lists_every_kind() {
        let table = markdown_table();
        for kind in ThreadKind::ALL {
            assert!(
                table.contains(&format!("| `{}` |", kind.name())),
                "{kind:?}"
            );
        }
        assert!(describe(ThreadKind::Vcpu).contains("KVM_RUN"));
    }

    /// A thread with a filter that forbids `mount` really is refused: run
    /// in a child thread with the log mode's opposite, an errno action,
    /// so the test process survives.
    #[test]
    fn an_installed_filter_stops_a_call_it_does_not_list() {
        let handle = std::thread::spawn(|| {
            let list = allow_list(ThreadKind::Rng);
            let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
            for name in BASE.iter().chain(list.syscalls) {
                rules.insert(syscall_names::number(name).unwrap(), Vec::new());
            }
            let filter = SeccompFilter::new(
                rules,
                SeccompAction::Errno(libc::EPERM as u32),
                SeccompAction::Allow,
                TargetArch::x86_64,
            )
            .unwrap();
            seccompiler::apply_filter(&BpfProgram::try_from(filter).unwrap()).unwrap();
            // SAFETY: mount(2) with null arguments has no side effects.
            let ret =
                unsafe { libc::syscall(libc::SYS_mount, 0usize, 0usize, 0usize, 0usize, 0usize) };
            (ret, std::io::Error::last_os_error().raw_os_error())
        });
        assert_eq!(handle.join().unwrap(), (-1, Some(libc::EPERM)));
    }
}
