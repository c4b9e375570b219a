//! The channel between a [`crate::handle::VmHandle`] and its VMM thread:
//! requests (boot, pause, resume, power button, shutdown, reboot, counters,
//! adding a device before boot, quit) queued
//! with a reply channel and an eventfd that wakes the event loop, the VM's
//! state and configuration as everyone may read them, the subscribers of
//! [`VmEvent`]s, and the record of the last stop.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{DiskConfig, FsConfig, NetConfig, VmConfig, VsockConfig};
use crate::lifecycle::StopReason;
use crate::vm::{ConsoleSummary, VmError};

/// Where a VM is in its life (cloud-hypervisor's `VmState` names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Configured, never booted.
    Created,
    /// vCPUs running.
    Running,
    /// vCPUs parked; devices and timers keep their state.
    Paused,
    /// Stopped after running; it can be booted again.
    Shutdown,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            VmState::Created => "created",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Shutdown => "shut down",
        };
        f.write_str(name)
    }
}

/// Something that happened to the VM, as sent to [`events`] subscribers.
///
/// [`events`]: crate::handle::VmHandle::events
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEvent {
    /// The vCPUs started (first boot, and again after each reboot).
    Booted,
    /// The vCPUs are parked.
    Paused,
    /// The vCPUs run again after a pause.
    Resumed,
    /// The guest reset itself and is being rebooted in the same process.
    Reset,
    /// The VM stopped for good (until booted again); why.
    Stopped(StopReason),
    /// The VM could not be rebooted or its event loop failed.
    Failed(String),
}

/// Per-device counters: device name → counter name → value.
pub type Counters = BTreeMap<String, BTreeMap<String, u64>>;

/// What the VMM thread is asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Build the machine and start the vCPUs.
    Boot,
    /// Park the vCPUs.
    Pause,
    /// Unpark the vCPUs.
    Resume,
    /// Stop the VM at once (hard stop); it can be booted again.
    Shutdown,
    /// Stop the VM and boot it again.
    Reboot,
    /// Read the device counters.
    Counters,
    /// Press the ACPI power button.
    PowerButton,
    /// Add the device waiting in [`Control::take_device`] (not running).
    AddDevice,
    /// Stop the VM if it runs and end the VMM thread.
    Quit,
}

/// A device added to a VM that is not running (`vm.add-*` before boot),
/// already checked against the whole configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NewDevice {
    /// A virtio-blk disk.
    Disk(DiskConfig),
    /// A virtio-net NIC (its taps are opened when it is added).
    Net(NetConfig),
    /// A virtio-fs share.
    Fs(FsConfig),
    /// The virtio-vsock device (a VM has at most one).
    Vsock(VsockConfig),
}

impl Command {
    /// The verb used in error messages.
    pub fn action(self) -> &'static str {
        match self {
            Command::Boot => "boot",
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Shutdown => "shut down",
            Command::Reboot => "reboot",
            Command::Counters => "read counters",
            Command::PowerButton => "press the power button",
            Command::AddDevice => {
                "add a device (zvmm has no hotplug yet: add devices before vm.boot)"
            }
            Command::Quit => "quit",
        }
    }
}

/// The answer to a [`Command`].
#[derive(Debug)]
pub enum Reply {
    /// Done.
    Done,
    /// The device counters.
    Counters(Counters),
}

/// A request could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The VM is in a state where the request makes no sense.
    #[error("cannot {action}: the VM is {state}")]
    WrongState {
        /// What was asked.
        action: &'static str,
        /// The state it was in.
        state: VmState,
    },
    /// Building or starting the VM failed.
    #[error(transparent)]
    Vm(Arc<VmError>),
    /// The vCPUs did not all park in time.
    #[error("cannot pause: {parked} of {total} vCPUs parked within a second")]
    PauseTimeout {
        /// Threads that parked.
        parked: usize,
        /// Threads running.
        total: usize,
    },
    /// The VMM thread has ended.
    #[error("the VMM thread has ended")]
    Gone,
}

impl From<VmError> for ControlError {
    fn from(e: VmError) -> Self {
        ControlError::Vm(Arc::new(e))
    }
}

/// One queued request with its reply channel.
pub struct Request {
    /// What to do.
    pub command: Command,
    reply: Sender<Result<Reply, ControlError>>,
}

impl Request {
    /// Sends the answer (a caller that gave up is no error).
    pub fn answer(self, result: Result<Reply, ControlError>) {
        let _ = self.reply.send(result);
    }
}

/// How the VM's last run ended.
#[derive(Clone, Debug)]
pub struct StopReport {
    /// Why it stopped, or why it could not go on.
    pub outcome: Result<StopReason, Arc<VmError>>,
    /// What the console showed, with the boot timeline.
    pub summary: ConsoleSummary,
}

struct Status {
    state: VmState,
    config: VmConfig,
    last_stop: Option<StopReport>,
    thread_ended: bool,
}

/// Shared between the handle (any thread) and the VMM thread.
pub struct Control {
    queue: Mutex<VecDeque<Request>>,
    queued: Condvar,
    wake: EventFd,
    status: Mutex<Status>,
    status_changed: Condvar,
    subscribers: Mutex<Vec<Sender<VmEvent>>>,
    device: Mutex<Option<NewDevice>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Control {
    /// A control block for a created VM with `config`.
    pub fn new(config: VmConfig) -> std::io::Result<Self> {
        Ok(Self {
            queue: Mutex::new(VecDeque::new()),
            queued: Condvar::new(),
            wake: EventFd::new(EFD_NONBLOCK)?,
            status: Mutex::new(Status {
                state: VmState::Created,
                config,
                last_stop: None,
                thread_ended: false,
            }),
            status_changed: Condvar::new(),
            subscribers: Mutex::new(Vec::new()),
            device: Mutex::new(None),
        })
    }

    /// Queues `command` and waits for its answer.
    pub fn call(&self, command: Command) -> Result<Reply, ControlError> {
        let (reply, answer) = channel();
        {
            let status = lock(&self.status);
            if status.thread_ended {
                return Err(ControlError::Gone);
            }
            lock(&self.queue).push_back(Request { command, reply });
        }
        self.queued.notify_all();
        // A full counter still wakes the loop.
        let _ = self.wake.write(1);
        answer.recv().unwrap_or(Err(ControlError::Gone))
    }

    /// Readable while requests wait (drained by the event loop).
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    /// The next queued request, if any.
    pub fn try_next(&self) -> Option<Request> {
        lock(&self.queue).pop_front()
    }

    /// Waits for the next request.
    pub fn next(&self) -> Request {
        let mut queue = lock(&self.queue);
        loop {
            if let Some(request) = queue.pop_front() {
                return request;
            }
            queue = self.queued.wait(queue).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The current state.
    pub fn state(&self) -> VmState {
        lock(&self.status).state
    }

    /// The configuration in force.
    pub fn config(&self) -> VmConfig {
        lock(&self.status).config.clone()
    }

    /// Records the configuration in force (a device was added).
    pub fn set_config(&self, config: VmConfig) {
        lock(&self.status).config = config;
    }

    /// Hands `device` to the VMM thread for the next [`Command::AddDevice`].
    pub fn put_device(&self, device: NewDevice) {
        *lock(&self.device) = Some(device);
    }

    /// The device a [`Command::AddDevice`] is about.
    pub fn take_device(&self) -> Option<NewDevice> {
        lock(&self.device).take()
    }

    /// Records a new state (and clears the last stop when running again).
    pub fn set_state(&self, state: VmState) {
        let mut status = lock(&self.status);
        status.state = state;
        if state == VmState::Running {
            status.last_stop = None;
        }
        drop(status);
        self.status_changed.notify_all();
    }

    /// Records that the VM stopped, and tells subscribers.
    pub fn stopped(&self, report: StopReport) {
        let event = match &report.outcome {
            Ok(reason) => VmEvent::Stopped(reason.clone()),
            Err(e) => VmEvent::Failed(format!("{e}")),
        };
        let mut status = lock(&self.status);
        status.state = VmState::Shutdown;
        status.last_stop = Some(report);
        drop(status);
        self.status_changed.notify_all();
        self.emit(event);
    }

    /// Records that the VMM thread ended; later calls fail with `Gone`.
    pub fn thread_ended(&self) {
        lock(&self.status).thread_ended = true;
        self.status_changed.notify_all();
        for request in lock(&self.queue).drain(..) {
            request.answer(Err(ControlError::Gone));
        }
    }

    /// Waits until the VM has stopped (or the VMM thread ended) and
    /// returns the report, if any.
    pub fn wait_stopped(&self) -> Option<StopReport> {
        let mut status = lock(&self.status);
        loop {
            if let Some(report) = &status.last_stop {
                return Some(report.clone());
            }
            if status.thread_ended {
                return None;
            }
            status = self
                .status_changed
                .wait(status)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// A new receiver of every event from now on.
    pub fn subscribe(&self) -> Receiver<VmEvent> {
        let (sender, receiver) = channel();
        lock(&self.subscribers).push(sender);
        receiver
    }

    /// Sends `event` to every subscriber still listening.
    pub fn emit(&self, event: VmEvent) {
        lock(&self.subscribers).retain(|sender| sender.send(event.clone()).is_ok());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_answered_in_order_by_the_serving_thread() {
        let control = Arc::new(Control::new(VmConfig::default()).unwrap());
        let server = control.clone();
        let thread = std::thread::spawn(move || {
            let first = server.next();
            assert_eq!(first.command, Command::Pause);
            first.answer(Err(ControlError::WrongState {
                action: "pause",
                state: VmState::Created,
            }));
            let second = server.next();
            assert_eq!(second.command, Command::Quit);
            second.answer(Ok(Reply::Done));
            server.thread_ended();
        });
        let err = control.call(Command::Pause).unwrap_err();
        assert_eq!(err.to_string(), "cannot pause: the VM is created");
        assert!(matches!(control.call(Command::Quit), Ok(Reply::Done)));
        thread.join().unwrap();
        assert!(matches!(
            control.call(Command::Boot),
            Err(ControlError::Gone)
        ));
        assert!(control.wait_stopped().is_none());
    }

    #[test]
    fn a_device_waits_for_the_vmm_thread_and_the_config_is_replaced() {
        let control = Control::new(VmConfig::default()).unwrap();
        assert_eq!(control.take_device(), None);
        let disk = crate::config::parse_disk("/img").unwrap();
        control.put_device(NewDevice::Disk(disk.clone()));
        assert_eq!(control.take_device(), Some(NewDevice::Disk(disk.clone())));
        assert_eq!(control.take_device(), None);
        let mut config = VmConfig::default();
        config.disks.push(disk);
        control.set_config(config.clone());
        assert_eq!(control.config(), config);
        assert!(Command::AddDevice.action().contains("before vm.boot"));
    }

    #[test]
    fn stop_reports_reach_waiters_and_subscribers() {
        let control = Control::new(VmConfig::default()).unwrap();
        let events = control.subscribe();
        control.set_state(VmState::Running);
        control.emit(VmEvent::Booted);
        control.stopped(StopReport {
            outcome: Ok(StopReason::PowerOff),
            summary: ConsoleSummary::default(),
        });
        assert_eq!(control.state(), VmState::Shutdown);
        let report = control.wait_stopped().unwrap();
        assert_eq!(report.outcome.unwrap(), StopReason::PowerOff);
        assert_eq!(events.recv().unwrap(), VmEvent::Booted);
        assert_eq!(
            events.recv().unwrap(),
            VmEvent::Stopped(StopReason::PowerOff)
        );
    }
}
