//! vCPU threads: one per vCPU, each looping on KVM_RUN and dispatching
//! port and MMIO exits synchronously to the shared buses. A thread ends on
//! a stop request (the VM's `stop` flag plus a kick signal that sets
//! `immediate_exit`, so a vCPU halted inside KVM leaves at once), on a
//! triple fault, or on a KVM failure, which it reports to the
//! [`Lifecycle`]. Pausing parks every thread on a [`PauseGate`] (the same
//! kick gets it out of KVM_RUN) until the VM is resumed or stopped.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_run, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::bus::Bus;
use crate::lifecycle::{Lifecycle, StopReason};
use crate::regs::dump_registers;

/// Starting or stopping vCPU threads failed.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    /// The OS refused a new thread.
    #[error("cannot start vCPU thread {vcpu}")]
    Spawn {
        /// vCPU index.
        vcpu: u8,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run` area, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's live kvm_run mapping, set by
        // the vCPU loop before it first enters KVM_RUN and cleared before the
        // VcpuFd is dropped; the kernel reads the byte on the next KVM_RUN.
        unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
    }
}

/// Installs the process-wide kick handler (idempotent).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), handle_kick).map_err(VcpuError::SignalHandler)
}

/// What a vCPU thread needs: its fd and the VM's shared state.
pub struct Vcpu {
    /// vCPU index (also its APIC ID).
    pub index: u8,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Where stop reasons go.
    pub lifecycle: Arc<Lifecycle>,
    /// Set when the VM is stopping.
    pub stop: Arc<AtomicBool>,
    /// Called once, just before the first KVM_RUN.
    pub on_first_entry: Option<Box<dyn FnOnce() + Send>>,
    /// Where the thread parks while the VM is paused.
    pub pause: Arc<PauseGate>,
}

/// Parks vCPU threads while the VM is paused.
#[derive(Default)]
pub struct PauseGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    paused: bool,
    parked: usize,
}

impl PauseGate {
    /// An open gate: nothing parks.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks every vCPU thread to park at its next exit from KVM_RUN.
    pub fn close(&self) {
        self.lock().paused = true;
    }

    /// Lets parked threads run again.
    pub fn open(&self) {
        self.lock().paused = false;
        self.changed.notify_all();
    }

    /// Wakes parked threads so they notice a stop request.
    pub fn wake_all(&self) {
        let _guard = self.lock();
        self.changed.notify_all();
    }

    /// Waits at most `limit` for `count` threads to park, calling `kick`
    /// between checks; returns how many parked.
    pub fn wait_parked(&self, count: usize, limit: Duration, mut kick: impl FnMut()) -> usize {
        let deadline = Instant::now() + limit;
        let mut state = self.lock();
        while state.parked < count && Instant::now() < deadline {
            drop(state);
            kick();
            state = self.lock();
            state = self
                .changed
                .wait_timeout(state, Duration::from_millis(1))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        state.parked
    }

    /// Parks the calling vCPU thread while the gate is closed and `stop`
    /// is not set; returns whether it parked.
    fn park(&self, stop: &AtomicBool) -> bool {
        let mut state = self.lock();
        if !state.paused {
            return false;
        }
        state.parked += 1;
        self.changed.notify_all();
        while state.paused && !stop.load(Ordering::Acquire) {
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.parked -= 1;
        true
    }
}

/// A running vCPU thread.
pub struct VcpuHandle {
    thread: JoinHandle<()>,
}

impl VcpuHandle {
    /// Interrupts KVM_RUN on the thread so it sees the stop flag.
    pub fn kick(&self) {
        // The thread may have exited already; nothing to interrupt then.
        let _ = self.thread.kill(kick_signal());
    }

    /// Whether the thread has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits for the thread to end.
    pub fn join(self) {
        // A panicking vCPU thread was already reported through the hook.
        let _ = self.thread.join();
    }
}

impl Vcpu {
    /// Starts the vCPU's thread.
    pub fn start(self) -> Result<VcpuHandle, VcpuError> {
        let vcpu = self.index;
        // The VMM thread's first boot is set up: it takes the VM's
        // Landlock domain before the guest runs.
        crate::sandbox::landlock::restrict_current().map_err(|e| VcpuError::Spawn {
            vcpu,
            source: std::io::Error::other(crate::sandbox::error_chain(&e)),
        })?;
        let thread = devices::virtio::thread::spawn(format!("vcpu{vcpu}"), move || self.run())
            .map_err(|source| VcpuError::Spawn { vcpu, source })?;
        Ok(VcpuHandle { thread })
    }

    fn run(mut self) {
        KVM_RUN.with(|cell| cell.set(self.fd.get_kvm_run() as *mut kvm_run));
        if let Some(on_first_entry) = self.on_first_entry.take() {
            on_first_entry();
        }
        while !self.stop.load(Ordering::Acquire) {
            if self.pause.park(&self.stop) {
                continue;
            }
            if let Some(reason) = self.run_once() {
                self.lifecycle.stop(reason);
                break;
            }
        }
        KVM_RUN.with(|cell| cell.set(std::ptr::null_mut()));
        if self.lifecycle.reason() == Some(StopReason::Timeout) {
            // Where a hung guest was is the first thing its developer asks.
            let dump = dump_registers(&self.fd).replace('\n', " ");
            eprintln!("zvmm: timeout: vcpu{} was at {dump}", self.index);
        }
    }

    /// Runs the vCPU until its next exit and handles it; returns a reason
    /// when the VM must stop.
    fn run_once(&mut self) -> Option<StopReason> {
        let index = self.index;
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                return None;
            }
            Err(e) => return Some(self.crash(format!("KVM_RUN failed: {e}"))),
        };
        match exit {
            VcpuExit::IoIn(port, data) => {
                self.pio.read(u64::from(port), data);
                None
            }
            VcpuExit::IoOut(port, data) => {
                self.pio.write(u64::from(port), data);
                None
            }
            VcpuExit::MmioRead(addr, data) => {
                self.mmio.read(addr, data);
                None
            }
            VcpuExit::MmioWrite(addr, data) => {
                self.mmio.write(addr, data);
                None
            }
            VcpuExit::Intr => None,
            // Split irqchip: the user-space I/O APIC holds no Remote IRR
            // (every input is edge-triggered), so an EOI needs nothing.
            VcpuExit::IoapicEoi(_) => None,
            VcpuExit::Shutdown => Some(StopReason::TripleFault { vcpu: index }),
            VcpuExit::SystemEvent(kind, _) => Some(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => StopReason::PowerOff,
                KVM_SYSTEM_EVENT_RESET => StopReason::Reset,
                KVM_SYSTEM_EVENT_CRASH => self.crash("guest reported a crash".into()),
                other => self.crash(format!("unknown system event {other}")),
            }),
            VcpuExit::FailEntry(reason, cpu) => Some(self.crash(format!(
                "KVM could not enter the guest (hardware reason {reason:#x}, host cpu {cpu})"
            ))),
            VcpuExit::InternalError => {
                let detail = self.internal_error_detail();
                Some(self.crash(detail))
            }
            other => {
                let name = format!("{other:?}");
                Some(self.crash(format!("unexpected KVM exit {name}")))
            }
        }
    }

    fn internal_error_detail(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: exit_reason was KVM_EXIT_INTERNAL_ERROR, so `internal` is
        // the union member the kernel filled.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let count = (internal.ndata as usize).min(internal.data.len());
        let what = match internal.suberror {
            1 => "instruction emulation failed",
            2 => "simultaneous exceptions",
            3 => "delivery event failed",
            4 => "unexpected exit",
            _ => "internal error",
        };
        format!(
            "KVM internal error: {what} (suberror {}, data {:x?})",
            internal.suberror,
            &internal.data[..count]
        )
    }

    fn crash(&self, what: String) -> StopReason {
        StopReason::Crash {
            vcpu: self.index,
            detail: format!("{what}\n{}", dump_registers(&self.fd)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parker(gate: &Arc<PauseGate>, stop: &Arc<AtomicBool>) -> JoinHandle<bool> {
        let (gate, stop) = (gate.clone(), stop.clone());
        std::thread::spawn(move || gate.park(&stop))
    }

    #[test]
    fn open_gate_does_not_park() {
        let gate = PauseGate::new();
        assert!(!gate.park(&AtomicBool::new(false)));
    }

    #[test]
    fn closed_gate_parks_until_opened() {
        let gate = Arc::new(PauseGate::new());
        let stop = Arc::new(AtomicBool::new(false));
        gate.close();
        let threads = [parker(&gate, &stop), parker(&gate, &stop)];
        let mut kicks = 0;
        assert_eq!(
            gate.wait_parked(2, Duration::from_secs(5), || kicks += 1),
            2
        );
        assert!(threads.iter().all(|t| !t.is_finished()));
        gate.open();
        for thread in threads {
            assert!(thread.join().unwrap());
        }
    }

    #[test]
    fn stop_releases_parked_threads() {
        let gate = Arc::new(PauseGate::new());
        let stop = Arc::new(AtomicBool::new(false));
        gate.close();
        let thread = parker(&gate, &stop);
        assert_eq!(gate.wait_parked(1, Duration::from_secs(5), || {}), 1);
        stop.store(true, Ordering::Release);
        gate.wake_all();
        assert!(thread.join().unwrap());
    }

    #[test]
    fn waiting_for_parkers_gives_up() {
        let gate = PauseGate::new();
        gate.close();
        let mut kicks = 0;
        let parked = gate.wait_parked(1, Duration::from_millis(20), || kicks += 1);
        assert_eq!(parked, 0);
        assert!(kicks > 0);
    }
}
