//! vCPU threads: one per vCPU, each looping on KVM_RUN and dispatching
//! port and MMIO exits synchronously to the shared buses. A thread ends on
//! a stop request (the VM's `stop` flag plus a kick signal that sets
//! `immediate_exit`, so a vCPU halted inside KVM leaves at once), on a
//! triple fault, or on a KVM failure, which it reports to the
//! [`Lifecycle`].

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

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
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{vcpu}"))
            .spawn(move || self.run())
            .map_err(|source| VcpuError::Spawn { vcpu, source })?;
        Ok(VcpuHandle { thread })
    }

    fn run(mut self) {
        KVM_RUN.with(|cell| cell.set(self.fd.get_kvm_run() as *mut kvm_run));
        if let Some(on_first_entry) = self.on_first_entry.take() {
            on_first_entry();
        }
        while !self.stop.load(Ordering::Acquire) {
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
