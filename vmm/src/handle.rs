//! The library API: [`Vm::create`] checks a [`VmConfig`], opens KVM and
//! the console, and starts the VMM thread; the returned [`VmHandle`]
//! boots, pauses, resumes, reboots, presses the power button of and stops the VM, adds devices
//! to it before boot, reports its state,
//! configuration and counters, and hands out channels of [`VmEvent`]s.
//! The `zvmm` command and the REST API are both users of it.
//!
//! A configuration is plain data (serde, cloud-hypervisor's field names):
//!
//! ```
//! use vmm::config::{ConsoleConfig, ConsoleMode, CpusConfig, VmConfig};
//!
//! let mut config = VmConfig::default();
//! config.payload.kernel = Some("vmlinux".into());
//! config.payload.cmdline = Some("console=ttyS0".into());
//! config.cpus = CpusConfig { boot_vcpus: 2, max_vcpus: 2, topology: None };
//! config.memory.size = 256 << 20;
//! config.serial = ConsoleConfig { mode: ConsoleMode::Pty, file: None };
//! config.validate().unwrap();
//!
//! let json = r#"{"cpus": {"boot_vcpus": 2}, "memory": {"size": 268435456},
//!                "payload": {"kernel": "vmlinux", "cmdline": "console=ttyS0"},
//!                "serial": {"mode": "Pty"}}"#;
//! let parsed: VmConfig = serde_json::from_str(json).unwrap();
//! assert_eq!(parsed.cpus.boot_vcpus, 2);
//! assert_eq!(parsed.serial.mode, ConsoleMode::Pty);
//! ```
//!
//! Booting it needs `/dev/kvm` and a kernel:
//!
//! ```no_run
//! use vmm::config::VmConfig;
//! use vmm::control::{VmEvent, VmState};
//! use vmm::handle::Vm;
//!
//! let mut config = VmConfig::default();
//! config.payload.kernel = Some("vmlinux".into());
//! let vm = Vm::create(config)?;
//! let events = vm.events();
//! vm.boot()?;
//! assert_eq!(events.recv()?, VmEvent::Booted);
//! vm.pause()?;
//! assert_eq!(vm.info().state, VmState::Paused);
//! vm.resume()?;
//! vm.shutdown()?; // hard stop; vm.boot() would start it again
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! While paused, the vCPU threads are parked but the `timeout_secs` clock
//! and the console watcher keep running.

use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde::Serialize;

use crate::config::VmConfig;
use crate::control::{
    Command, Control, ControlError, Counters, NewDevice, Reply, StopReport, VmEvent, VmState,
};
use crate::vm::{VmError, Vmm};
use crate::watch::{ConsoleWatcher, TimelineEntry};

/// Creates VMs.
pub struct Vm;

impl Vm {
    /// Checks `config`, opens KVM and the console's host side (a pty's
    /// path is filled into the configuration) and starts the VMM thread.
    /// The VM is [`VmState::Created`] until [`VmHandle::boot`].
    pub fn create(config: VmConfig) -> Result<VmHandle, VmError> {
        let vmm = Vmm::new(config)?;
        let watcher = vmm.watcher();
        let mut reported = vmm.config().clone();
        if reported.cpus.max_vcpus == 0 {
            reported.cpus.max_vcpus = reported.cpus.boot_vcpus;
        }
        let control = Control::new(reported).map_err(|source| VmError::Host {
            what: "the request eventfd",
            source,
        })?;
        let control = Arc::new(control);
        let served = control.clone();
        let thread = devices::virtio::thread::spawn("vmm".into(), move || {
            vmm.serve(&served);
            served.thread_ended();
        })
        .map_err(|source| VmError::Host {
            what: "the VMM thread",
            source,
        })?;
        Ok(VmHandle {
            control,
            watcher,
            thread: Some(thread),
        })
    }
}

/// What `vm.info` reports.
#[derive(Clone, Debug, Serialize)]
pub struct VmInfo {
    /// The configuration in force (the pty path filled in).
    pub config: VmConfig,
    /// Where the VM is in its life.
    pub state: VmState,
    /// Guest RAM in bytes (cloud-hypervisor's `memory_actual_size`).
    pub memory_actual_size: u64,
    /// The boot timeline so far (zvmm's addition: process start, VM ready,
    /// first guest entry, first serial byte, `--expect` matches).
    pub boot_timeline: Vec<TimelineEntry>,
}

/// A created VM. Dropping it stops the VM and ends its VMM thread.
pub struct VmHandle {
    control: Arc<Control>,
    watcher: Arc<Mutex<ConsoleWatcher>>,
    thread: Option<JoinHandle<()>>,
}

impl VmHandle {
    fn act(&self, command: Command) -> Result<(), ControlError> {
        self.control.call(command).map(|_| ())
    }

    /// Builds the machine and starts the vCPUs (from `Created` or
    /// `Shutdown`); returns once they run, or why they could not start.
    pub fn boot(&self) -> Result<(), ControlError> {
        crate::sandbox::landlock::prepare(
            &self.control.config(),
            &crate::virtiofsd::runtime_base(),
        )
        .map_err(|e| VmError::Host {
            what: "the Landlock ruleset",
            source: std::io::Error::other(crate::sandbox::error_chain(&e)),
        })?;
        self.act(Command::Boot)
    }

    /// Parks every vCPU (the VM must be `Running`).
    pub fn pause(&self) -> Result<(), ControlError> {
        self.act(Command::Pause)
    }

    /// Lets the vCPUs run again (the VM must be `Paused`).
    pub fn resume(&self) -> Result<(), ControlError> {
        self.act(Command::Resume)
    }

    /// Presses the ACPI power button (the VM must be `Running`): the guest
    /// gets a GED interrupt and its `_EVT` notifies the `PNP0C0C` button;
    /// a guest that handles it powers off (then [`VmHandle::wait`] reports
    /// [`StopReason::PowerOff`](crate::lifecycle::StopReason::PowerOff)).
    pub fn power_button(&self) -> Result<(), ControlError> {
        self.act(Command::PowerButton)
    }

    /// Stops the VM at once without asking the guest (hard stop); it can
    /// be booted again. Returns once the vCPUs have stopped.
    pub fn shutdown(&self) -> Result<(), ControlError> {
        self.act(Command::Shutdown)
    }

    /// Adds `device` to a VM that is not running (created, or shut down):
    /// the next boot has it. A NIC's taps are opened (or its fds adopted)
    /// now. `device` must have been checked with the whole configuration.
    pub fn add_device(&self, device: NewDevice) -> Result<(), ControlError> {
        self.control.put_device(device);
        let result = self.act(Command::AddDevice);
        // A device the VMM thread never took (wrong state) is dropped here.
        let _ = self.control.take_device();
        result
    }

    /// Stops the VM and boots it again from its configuration.
    pub fn reboot(&self) -> Result<(), ControlError> {
        self.act(Command::Reboot)
    }

    /// The state and configuration.
    pub fn info(&self) -> VmInfo {
        let config = self.control.config();
        let boot_timeline = self
            .watcher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .timeline()
            .entries();
        VmInfo {
            memory_actual_size: config.memory.size,
            config,
            state: self.control.state(),
            boot_timeline,
        }
    }

    /// Per-device counters of the running VM.
    pub fn counters(&self) -> Result<Counters, ControlError> {
        match self.control.call(Command::Counters)? {
            Reply::Counters(counters) => Ok(counters),
            Reply::Done => Ok(Counters::new()),
        }
    }

    /// A channel receiving every event from now on.
    pub fn events(&self) -> Receiver<VmEvent> {
        self.control.subscribe()
    }

    /// Waits until the VM stops by itself or is shut down, and says why;
    /// `None` if the VMM thread ended first.
    pub fn wait(&self) -> Option<StopReport> {
        self.control.wait_stopped()
    }

    /// Stops the VM if it runs and waits for the VMM thread to end (the
    /// console's host side is closed and the terminal restored).
    pub fn quit(mut self) {
        self.end();
    }

    fn end(&mut self) {
        let _ = self.control.call(Command::Quit);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        self.end();
    }
}
