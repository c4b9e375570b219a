//! SIGTERM and SIGINT: a handler that only records the signal and writes
//! to an eventfd (both async-signal-safe), and an event-loop subscriber
//! that turns it into a clean [`StopReason::Signal`].

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, OnceLock};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::register_signal_handler;

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

/// Stops the VM when a termination signal arrived.
pub struct SignalWatcher {
    lifecycle: Arc<Lifecycle>,
}

impl SignalWatcher {
    /// Watches for signals on behalf of `lifecycle`.
    pub fn new(lifecycle: Arc<Lifecycle>) -> Self {
        Self { lifecycle }
    }
}

impl MutEventSubscriber for SignalWatcher {
    fn process(&mut self, _: Events, _: &mut EventOps) {
        if let Some(event) = SIGNAL_EVENT.get() {
            let _ = event.read();
        }
        let signal = LAST_SIGNAL.load(Ordering::SeqCst);
        if signal != 0 {
            self.lifecycle.stop(StopReason::Signal(signal));
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Some(event) = SIGNAL_EVENT.get() {
            let _ = ops.add(Events::new(event, EventSet::IN));
        }
        // A signal that arrived before this VM boot still counts.
        if LAST_SIGNAL.load(Ordering::SeqCst) != 0 {
            self.lifecycle
                .stop(StopReason::Signal(LAST_SIGNAL.load(Ordering::SeqCst)));
        }
    }
}
