//! SIGTERM and SIGINT: a handler that only records the signal and writes
//! to an eventfd (both async-signal-safe), and an event-loop subscriber
//! that turns it into a clean [`StopReason::Signal`].

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::register_signal_handler;
use vmm_sys_util::timerfd::TimerFd;

use crate::lifecycle::{Lifecycle, StopReason};

static SIGNAL_EVENT: OnceLock<EventFd> = OnceLock::new();
static SIGNAL_EVENT_FD: AtomicI32 = AtomicI32::new(-1);
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);
/// False until the first event loop runs: until then nothing would act on
/// a recorded signal, so the handler ends the process itself.
static LOOP_RUNNING: AtomicBool = AtomicBool::new(false);

/// Marks that the event loop now handles termination signals.
pub fn loop_started() {
    LOOP_RUNNING.store(true, Ordering::SeqCst);
}

extern "C" fn handle_termination(
    signal: libc::c_int,
    _: *mut libc::siginfo_t,
    _: *mut libc::c_void,
) {
    LAST_SIGNAL.store(signal, Ordering::SeqCst);
    let fd = SIGNAL_EVENT_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one = 1u64;
        // SAFETY: write(2) is async-signal-safe; `fd` is the eventfd kept
        // alive for the whole process in SIGNAL_EVENT; the buffer is 8 bytes.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// Installs the SIGTERM/SIGINT handlers (idempotent).
pub fn install() -> std::io::Result<()> {
    if SIGNAL_EVENT.get().is_none() {
        let event = EventFd::new(EFD_NONBLOCK)?;
        SIGNAL_EVENT_FD.store(event.as_raw_fd(), Ordering::SeqCst);
        // A racing second install keeps the first eventfd; both are valid.
        let _ = SIGNAL_EVENT.set(event);
    }
    for signal in [libc::SIGTERM, libc::SIGINT] {
        register_signal_handler(signal, handle_termination).map_err(std::io::Error::from)?;
    }
    Ok(())
}

/// Presses the guest's power button; false if it could not.
pub type PowerButton = Box<dyn FnMut() -> bool + Send>;

/// Stops the VM when a termination signal arrived. With a grace period,
/// the first SIGTERM presses the ACPI power button instead and the VM is
/// stopped hard only if it has not powered off when the grace ends (or on
/// a second signal).
pub struct SignalWatcher {
    lifecycle: Arc<Lifecycle>,
    graceful: Option<(Duration, PowerButton)>,
    grace_timer: Option<TimerFd>,
    handled: u64,
}

impl SignalWatcher {
    /// Watches for signals on behalf of `lifecycle`.
    pub fn new(lifecycle: Arc<Lifecycle>) -> Self {
        Self {
            lifecycle,
            graceful: None,
            grace_timer: None,
            handled: 0,
        }
    }

    /// On SIGTERM, press the power button and allow `grace` before the
    /// hard stop.
    pub fn with_grace(mut self, grace: Duration, press: PowerButton) -> Self {
        self.graceful = Some((grace, press));
        self
    }

    fn on_signal(&mut self, signal: i32) {
        self.handled += 1;
        let first_sigterm = signal == libc::SIGTERM && self.handled == 1;
        if let (true, Some((grace, press))) = (first_sigterm, self.graceful.as_mut()) {
            if press() {
                if let Ok(mut timer) = TimerFd::new() {
                    if timer.reset(*grace, None).is_ok() {
                        self.grace_timer = Some(timer);
                        return;
                    }
                }
            }
        }
        self.lifecycle.stop(StopReason::Signal(signal));
    }
}

impl MutEventSubscriber for SignalWatcher {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if let Some(timer) = self.grace_timer.as_mut() {
            if events.fd() == timer.as_raw_fd() {
                let _ = timer.wait();
                self.lifecycle.stop(StopReason::Signal(libc::SIGTERM));
                return;
            }
        }
        if let Some(event) = SIGNAL_EVENT.get() {
            let _ = event.read();
        }
        let signal = LAST_SIGNAL.swap(0, Ordering::SeqCst);
        if signal != 0 {
            self.on_signal(signal);
            if let Some(timer) = &self.grace_timer {
                let _ = ops.add(Events::new(timer, EventSet::IN));
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Some(event) = SIGNAL_EVENT.get() {
            let _ = ops.add(Events::new(event, EventSet::IN));
        }
        // A signal that arrived before this VM boot still counts.
        let signal = LAST_SIGNAL.swap(0, Ordering::SeqCst);
        if signal != 0 {
            self.lifecycle.stop(StopReason::Signal(signal));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn watcher_with_button(
        presses: Arc<AtomicUsize>,
        works: bool,
    ) -> (SignalWatcher, Arc<Lifecycle>) {
        let lifecycle = Arc::new(Lifecycle::new().unwrap());
        let press: PowerButton = Box::new(move || {
            presses.fetch_add(1, Ordering::SeqCst);
            works
        });
        let watcher =
            SignalWatcher::new(lifecycle.clone()).with_grace(Duration::from_secs(5), press);
        (watcher, lifecycle)
    }

    #[test]
    fn first_sigterm_presses_the_power_button_and_waits() {
        let presses = Arc::new(AtomicUsize::new(0));
        let (mut watcher, lifecycle) = watcher_with_button(presses.clone(), true);
        watcher.on_signal(libc::SIGTERM);
        assert_eq!(presses.load(Ordering::SeqCst), 1);
        assert_eq!(lifecycle.reason(), None);
        assert!(watcher.grace_timer.is_some());
        watcher.on_signal(libc::SIGTERM);
        assert_eq!(lifecycle.reason(), Some(StopReason::Signal(libc::SIGTERM)));
        assert_eq!(
            presses.load(Ordering::SeqCst),
            1,
            "the second signal stops hard"
        );
    }

    #[test]
    fn sigint_and_a_failed_press_stop_at_once() {
        let presses = Arc::new(AtomicUsize::new(0));
        let (mut watcher, lifecycle) = watcher_with_button(presses.clone(), true);
        watcher.on_signal(libc::SIGINT);
        assert_eq!(lifecycle.reason(), Some(StopReason::Signal(libc::SIGINT)));
        let (mut watcher, lifecycle) = watcher_with_button(presses, false);
        watcher.on_signal(libc::SIGTERM);
        assert_eq!(lifecycle.reason(), Some(StopReason::Signal(libc::SIGTERM)));
    }

    #[test]
    fn without_grace_sigterm_stops_at_once() {
        let lifecycle = Arc::new(Lifecycle::new().unwrap());
        let mut watcher = SignalWatcher::new(lifecycle.clone());
        watcher.on_signal(libc::SIGTERM);
        assert_eq!(lifecycle.reason(), Some(StopReason::Signal(libc::SIGTERM)));
    }
}
