//! Why a VM stops, and the one place that records it: devices, vCPU
//! threads, signals and timers all report through [`Lifecycle::stop`]; the
//! first report wins and wakes the event loop. Also maps each reason to the
//! process exit status documented in `--help`.

use std::sync::Mutex;

use devices::{VmControl, VmRequest};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Exit status: the guest powered off.
pub const EXIT_POWEROFF: i32 = 0;
/// Exit status: configuration or host error.
pub const EXIT_ERROR: i32 = 1;
/// Exit status: usage error on the command line.
pub const EXIT_USAGE: i32 = 2;
/// Exit status: the guest reset itself and `--no-reboot` was given.
pub const EXIT_RESET: i32 = 3;
/// Exit status: KVM or instruction-emulation failure.
pub const EXIT_CRASH: i32 = 4;
/// Exit status: a `--fail-on` pattern matched the console.
pub const EXIT_FAIL_PATTERN: i32 = 5;
/// Exit status: a vhost-user backend (virtiofsd) died or disconnected.
pub const EXIT_BACKEND_LOST: i32 = 7;
/// Exit status: `--timeout` expired.
pub const EXIT_TIMEOUT: i32 = 124;
/// Exit status base for a terminating signal (128 + signal number).
pub const EXIT_SIGNAL_BASE: i32 = 128;

/// Why the VM stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest reset itself (i8042, ACPI reset register).
    Reset,
    /// A vCPU triple-faulted; treated like a reset.
    TripleFault {
        /// The vCPU that faulted.
        vcpu: u8,
    },
    /// KVM could not run a vCPU (entry failure, emulation failure, ...).
    Crash {
        /// The vCPU that failed.
        vcpu: u8,
        /// What KVM said, and the registers.
        detail: String,
    },
    /// `--timeout` expired.
    Timeout,
    /// Every `--expect` pattern matched the console.
    Expected,
    /// A `--fail-on` pattern matched a console line.
    FailPattern {
        /// The pattern.
        pattern: String,
        /// The console line it matched.
        line: String,
    },
    /// SIGTERM or SIGINT.
    Signal(i32),
    /// Stopped on request through the library handle or the API (a hard
    /// stop: the guest is not asked).
    Requested,
    /// A device's out-of-process backend (virtiofsd) died or closed its
    /// connection; the guest cannot use the device any more.
    BackendLost {
        /// What happened, one line naming the device.
        detail: String,
    },
}

impl StopReason {
    /// Whether the guest asked for a restart.
    pub fn is_reset(&self) -> bool {
        matches!(self, StopReason::Reset | StopReason::TripleFault { .. })
    }

    /// The process exit status for this reason, when zvmm ends on it.
    pub fn exit_status(&self) -> i32 {
        match self {
            StopReason::PowerOff | StopReason::Expected | StopReason::Requested => EXIT_POWEROFF,
            StopReason::FailPattern { .. } => EXIT_FAIL_PATTERN,
            StopReason::Reset | StopReason::TripleFault { .. } => EXIT_RESET,
            StopReason::Crash { .. } => EXIT_CRASH,
            StopReason::Timeout => EXIT_TIMEOUT,
            StopReason::Signal(signal) => EXIT_SIGNAL_BASE + signal,
            StopReason::BackendLost { .. } => EXIT_BACKEND_LOST,
        }
    }
}

/// The shared stop flag and reason of one VM run.
pub struct Lifecycle {
    reason: Mutex<Option<StopReason>>,
    wake: EventFd,
}

impl Lifecycle {
    /// A running VM's lifecycle.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            wake: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless another was recorded first, and wakes the
    /// event loop.
    pub fn stop(&self, reason: StopReason) {
        let mut current = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if current.is_none() {
            *current = Some(reason);
        }
        // A full eventfd counter still wakes the loop; nothing to handle.
        let _ = self.wake.write(1);
    }

    /// The recorded reason, if the VM was told to stop.
    pub fn reason(&self) -> Option<StopReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Becomes readable once [`stop`](Self::stop) was called.
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }
}

impl VmControl for Lifecycle {
    fn request(&self, request: VmRequest) {
        self.stop(match request {
            VmRequest::PowerOff => StopReason::PowerOff,
            VmRequest::Reset => StopReason::Reset,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_wakes() {
        let lifecycle = Lifecycle::new().unwrap();
        assert_eq!(lifecycle.reason(), None);
        lifecycle.request(VmRequest::PowerOff);
        lifecycle.stop(StopReason::Timeout);
        assert_eq!(lifecycle.reason(), Some(StopReason::PowerOff));
        assert_eq!(lifecycle.wake_fd().read().unwrap(), 2);
    }

    #[test]
    fn exit_statuses_match_the_documentation() {
        assert_eq!(StopReason::PowerOff.exit_status(), 0);
        assert_eq!(StopReason::Reset.exit_status(), 3);
        assert_eq!(StopReason::TripleFault { vcpu: 0 }.exit_status(), 3);
        let crash = StopReason::Crash {
            vcpu: 0,
            detail: String::new(),
        };
        assert_eq!(crash.exit_status(), 4);
        assert_eq!(StopReason::Timeout.exit_status(), 124);
        assert_eq!(StopReason::Expected.exit_status(), 0);
        let fail = StopReason::FailPattern {
            pattern: "x".into(),
            line: "x".into(),
        };
        assert_eq!(fail.exit_status(), 5);
        assert_eq!(StopReason::Signal(15).exit_status(), 143);
        assert_eq!(StopReason::Requested.exit_status(), 0);
        assert!(StopReason::TripleFault { vcpu: 1 }.is_reset());
        assert!(!StopReason::PowerOff.is_reset());
    }
}
