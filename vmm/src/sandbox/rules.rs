//! The allow-list of every thread kind: the one table the seccomp
//! filters, `zvmm --print-seccomp` and the README are made from.
//!
//! Left out everywhere: process creation and program execution (`clone`,
//! `clone3`, `fork`, `vfork`, `execve`: threads come from the launcher,
//! virtiofsd too), mounts and namespaces, `ptrace` and
//! `process_vm_*`, identity changes, module, kexec and reboot calls,
//! `bpf`, `perf_event_open`, `userfaultfd`, `io_uring_*` (no device uses
//! io_uring), `keyctl`. `tgkill` is allowed only towards zvmm itself.

use super::ThreadKind;

/// Which ioctl requests a kind may make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ioctls {
    /// No ioctl at all.
    None,
    /// Only these requests (name, number).
    Only(&'static [(&'static str, u64)]),
    /// Any request (the threads that set up KVM, taps and terminals).
    Any,
}

/// One kind's allow-list.
#[derive(Clone, Copy, Debug)]
pub struct AllowList {
    /// What the kind does, for the docs.
    pub summary: &'static str,
    /// The system calls it may make besides [`BASE`] (any arguments).
    pub syscalls: &'static [&'static str],
    /// Its ioctl requests.
    pub ioctls: Ioctls,
}

/// What every thread may call: memory, futexes, its own signals, reading
/// and writing fds it holds (eventfds, stderr), time, exiting.
pub const BASE: &[&str] = &[
    "read",
    "write",
    "close",
    "futex",
    "exit",
    "exit_group",
    "rt_sigprocmask",
    "rt_sigreturn",
    "rt_sigaction",
    "sigaltstack",
    "tgkill",
    "mmap",
    "munmap",
    "mprotect",
    "madvise",
    "mremap",
    "brk",
    "sched_yield",
    "sched_getaffinity",
    "gettid",
    "getpid",
    "getrandom",
    "clock_gettime",
    "clock_nanosleep",
    "nanosleep",
    "restart_syscall",
    "fcntl",
];

const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (0xAE << 8) | nr
}
const NONE: u64 = 0;
const WRITE: u64 = 1;
const READ: u64 = 2;

/// KVM_RUN and what the exits a vCPU handles need: MSI-X routes and
/// irqfds (a driver programming vectors), ioeventfds (a BAR moved), the
/// registers for `--timeout`'s report; and what activating a device on
/// DRIVER_OK does on the vCPU thread (tap offloads and queues).
const VCPU_IOCTLS: &[(&str, u64)] = &[
    ("KVM_RUN", ioc(NONE, 0x80, 0)),
    ("KVM_GET_REGS", ioc(READ, 0x81, 144)),
    ("KVM_GET_SREGS", ioc(READ, 0x83, 312)),
    ("KVM_SET_GSI_ROUTING", ioc(WRITE, 0x6a, 8)),
    ("KVM_IRQFD", ioc(WRITE, 0x76, 32)),
    ("KVM_IOEVENTFD", ioc(WRITE, 0x79, 64)),
    ("KVM_SIGNAL_MSI", ioc(WRITE, 0xa5, 32)),
    ("TUNSETOFFLOAD", libc::TUNSETOFFLOAD),
    ("TUNSETVNETHDRSZ", libc::TUNSETVNETHDRSZ),
    ("TUNSETQUEUE", libc::TUNSETQUEUE),
    ("FIONBIO", libc::FIONBIO),
    ("FIOCLEX", libc::FIOCLEX),
];

const TERMINAL_IOCTLS: &[(&str, u64)] = &[
    ("TCGETS", libc::TCGETS),
    ("TCSETS", libc::TCSETS),
    ("TCSETSW", libc::TCSETSW),
    ("TCSETSF", libc::TCSETSF),
];

const VSOCK_IOCTLS: &[(&str, u64)] = &[
    ("FIONBIO", libc::FIONBIO),
    ("FIONREAD", libc::FIONREAD),
    ("FIOCLEX", libc::FIOCLEX),
];

/// Building a VM (each boot, also on reboot) and running its event loop:
/// files and images, sockets, KVM, memory, virtiofsd's supervision. Also
/// `api-conn`'s list: `vm.create` opens KVM, taps, ptys and builds the
/// cloud-init seed on that thread, and `vm.boot` prepares Landlock there.
const VMM: &[&str] = &[
    // files, images, directories
    "openat",
    "open",
    "readv",
    "writev",
    "pread64",
    "pwrite64",
    "preadv",
    "pwritev",
    "lseek",
    "fstat",
    "newfstatat",
    "statx",
    "access",
    "faccessat",
    "faccessat2",
    "readlink",
    "readlinkat",
    "getdents64",
    "mkdir",
    "mkdirat",
    "rmdir",
    "unlink",
    "unlinkat",
    "rename",
    "renameat2",
    "chmod",
    "fchmod",
    "fchmodat",
    "ftruncate",
    "fallocate",
    "fsync",
    "fdatasync",
    "flock",
    "dup",
    "dup3",
    "pipe2",
    "memfd_create",
    "getcwd",
    "uname",
    "statfs",
    "fstatfs",
    "prlimit64",
    "getuid",
    "geteuid",
    "getgid",
    "getegid",
    // event loop
    "epoll_create1",
    "epoll_ctl",
    "epoll_wait",
    "epoll_pwait",
    "poll",
    "ppoll",
    "eventfd2",
    "timerfd_create",
    "timerfd_settime",
    "timerfd_gettime",
    // sockets (vsock, vhost-user, the API's fds)
    "socket",
    "socketpair",
    "bind",
    "listen",
    "connect",
    "accept4",
    "sendmsg",
    "recvmsg",
    "sendto",
    "recvfrom",
    "shutdown",
    "getsockopt",
    "setsockopt",
    "getsockname",
    // virtiofsd's supervision (started by the launcher)
    "kill",
    "wait4",
    "waitid",
    // Landlock: the VMM thread restricts itself after its first set-up;
    // `api-conn` (same list) builds the rules at `vm.boot`
    "prctl",
    "landlock_create_ruleset",
    "landlock_add_rule",
    "landlock_restrict_self",
];

const MAIN: &[&str] = &[
    "epoll_create1",
    "epoll_ctl",
    "epoll_wait",
    "epoll_pwait",
    "eventfd2",
    "timerfd_create",
    "timerfd_settime",
    "poll",
    "ppoll",
    "unlink",
    "newfstatat",
    "statx",
    "fstat",
    "lseek",
];

const VCPU: &[&str] = &[
    // activating a device on DRIVER_OK: eventfds, the workers' epoll
    // sets, the vhost-user exchange of a virtio-fs device
    "eventfd2",
    "dup",
    "epoll_create1",
    "epoll_ctl",
    "sendmsg",
    "recvmsg",
    "poll",
    "ppoll",
];

const API_ACCEPT: &[&str] = &["accept4", "poll", "ppoll", "sendto", "sendmsg", "shutdown"];

const BLOCK: &[&str] = &[
    "epoll_create1",
    "epoll_ctl",
    "epoll_wait",
    "epoll_pwait",
    "preadv",
    "pwritev",
    "preadv2",
    "pwritev2",
    "pread64",
    "pwrite64",
    "readv",
    "writev",
    "lseek",
    "fsync",
    "fdatasync",
    "fallocate",
    "ftruncate",
    "fstat",
    "newfstatat",
    "statx",
];

const NET: &[&str] = &[
    "epoll_create1",
    "epoll_ctl",
    "epoll_wait",
    "epoll_pwait",
    "readv",
    "writev",
];

const VSOCK: &[&str] = &[
    "epoll_create1",
    "epoll_ctl",
    "epoll_wait",
    "epoll_pwait",
    "readv",
    "writev",
    // host streams: accepted on the device's socket, or connected to
    // PATH_port for a guest's connection
    "accept4",
    "socket",
    "connect",
    "recvfrom",
    "recvmsg",
    "sendto",
    "sendmsg",
    "shutdown",
    "getsockopt",
    "setsockopt",
    "unlink",
    "newfstatat",
    "statx",
    "fstat",
];

const WAITS_ON_EPOLL: &[&str] = &["epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait"];

/// The watcher also reaps a virtiofsd that died (its exit status is in
/// the message that ends the VM).
const FS_WATCH: &[&str] = &["poll", "ppoll", "recvfrom", "recvmsg", "wait4", "waitid"];

/// The allow-list of `kind`.
pub fn allow_list(kind: ThreadKind) -> AllowList {
    let (summary, syscalls, ioctls): (_, &'static [&'static str], _) = match kind {
        ThreadKind::Main => (
            "waits for the VM, restores the terminal, prints the outcome",
            MAIN,
            Ioctls::Only(TERMINAL_IOCTLS),
        ),
        ThreadKind::Vmm => (
            "builds the VM at each boot, runs the event loop",
            VMM,
            Ioctls::Any,
        ),
        ThreadKind::Vcpu => (
            "runs the guest, dispatches exits, activates devices",
            VCPU,
            Ioctls::Only(VCPU_IOCTLS),
        ),
        ThreadKind::ApiAccept => ("takes API connections", API_ACCEPT, Ioctls::None),
        ThreadKind::ApiConn => (
            "serves one API connection; vm.create builds the VM here",
            VMM,
            Ioctls::Any,
        ),
        ThreadKind::ApiVmEvents => ("forwards the VM's stop", &[], Ioctls::None),
        ThreadKind::Block => ("a disk's requests", BLOCK, Ioctls::None),
        ThreadKind::Net => ("a NIC queue pair's frames", NET, Ioctls::None),
        ThreadKind::Vsock => (
            "a vsock device's host connections",
            VSOCK,
            Ioctls::Only(VSOCK_IOCTLS),
        ),
        ThreadKind::Rng => (
            "the entropy device's requests",
            WAITS_ON_EPOLL,
            Ioctls::None,
        ),
        ThreadKind::FsWatch => ("watches a virtiofsd's socket", FS_WATCH, Ioctls::None),
        ThreadKind::FsIrq => ("relays virtio-fs interrupts", WAITS_ON_EPOLL, Ioctls::None),
        ThreadKind::VirtiofsdLog => ("reads virtiofsd's stderr", &[], Ioctls::None),
    };
    AllowList {
        summary,
        syscalls,
        ioctls,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::syscall_names;

    #[test]
    fn every_list_names_real_calls_once() {
        for name in BASE {
            assert!(syscall_names::number(name).is_some(), "{name}");
        }
        for kind in ThreadKind::ALL {
            let list = allow_list(kind);
            for (i, name) in list.syscalls.iter().enumerate() {
                assert!(!BASE.contains(name), "{kind:?}: {name} is in the base");
                assert!(!list.syscalls[..i].contains(name), "{kind:?}: {name} twice");
                assert!(syscall_names::number(name).is_some(), "{kind:?}: {name}");
            }
        }
    }

    #[test]
    fn no_list_can_start_processes_or_mount() {
        let forbidden = [
            "clone",
            "clone3",
            "fork",
            "vfork",
            "execve",
            "execveat",
            "mount",
            "umount2",
            "unshare",
            "setns",
            "ptrace",
            "process_vm_writev",
            "init_module",
            "kexec_load",
            "reboot",
            "setuid",
            "bpf",
            "io_uring_setup",
        ];
        for kind in ThreadKind::ALL {
            for name in forbidden {
                assert!(
                    !allow_list(kind).syscalls.contains(&name),
                    "{kind:?}: {name}"
                );
                assert!(!BASE.contains(&name), "{name}");
            }
        }
    }

    #[test]
    fn kvm_ioctl_numbers_match_the_kernels() {
        let number = |name| VCPU_IOCTLS.iter().find(|(n, _)| *n == name).unwrap().1;
        assert_eq!(number("KVM_RUN"), 0xae80);
        assert_eq!(number("KVM_IRQFD"), 0x4020_ae76);
        assert_eq!(number("KVM_IOEVENTFD"), 0x4040_ae79);
        assert_eq!(number("KVM_SET_GSI_ROUTING"), 0x4008_ae6a);
        assert_eq!(number("KVM_GET_REGS"), 0x8090_ae81);
        assert_eq!(number("KVM_GET_SREGS"), 0x8138_ae83);
        assert_eq!(
            number("KVM_GET_REGS") >> 16 & 0x3fff,
            std::mem::size_of::<kvm_bindings::kvm_regs>() as u64
        );
        assert_eq!(
            number("KVM_GET_SREGS") >> 16 & 0x3fff,
            std::mem::size_of::<kvm_bindings::kvm_sregs>() as u64
        );
    }
}
