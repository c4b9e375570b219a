//! One VM from configuration to stop: opens KVM, builds memory and the
//! platform, loads the kernel, initrd, boot parameters and ACPI tables,
//! configures and starts the vCPUs, runs the event loop until something
//! stops the VM, and restarts it on a guest reset unless told not to.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use loader::boot::BootSetup;
use loader::kernel::{BootProtocol, LoadedKernel};
use vm_memory::GuestAddress;
use vmm_sys_util::timerfd::TimerFd;

use crate::bus::Bus;
use crate::config::{ConsoleMode, OnReset, VmConfig};
use crate::console::{announce_pty, open_console, InputForwarder, RawTerminal};
use crate::cpuid::build_cpuid;
use crate::interrupts::InterruptRouting;
use crate::lifecycle::{Lifecycle, StopReason};
use crate::memory::{create_guest_ram, register_guest_ram, GuestRam};
use crate::pci::create_pci;
use crate::platform::{create_interrupt_controllers, create_platform};
use crate::regs::{self, EntryMode};
use crate::signals;
use crate::vcpu::{install_kick_handler, Vcpu, VcpuHandle};
use crate::watch::{compile, process_start, ConsoleWatcher, Timeline, WatchedOutput};
use crate::writer::SharedWriter;

/// The VM could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Interrupt routing.
    #[error(transparent)]
    Interrupts(#[from] crate::interrupts::InterruptError),
    /// PCI devices.
    #[error(transparent)]
    Pci(#[from] crate::pci::PciSetupError),
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm (is KVM enabled, and may this user open it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// KVM lacks something zvmm needs.
    #[error("this KVM lacks {0}, which zvmm needs")]
    MissingCapability(&'static str),
    /// A KVM ioctl failed.
    #[error("KVM refused to {what}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// The platform devices.
    #[error(transparent)]
    Platform(#[from] crate::platform::PlatformError),
    /// The serial console's host side.
    #[error(transparent)]
    Console(#[from] crate::console::ConsoleError),
    /// The kernel image.
    #[error(transparent)]
    Kernel(#[from] loader::kernel::KernelError),
    /// The initrd.
    #[error(transparent)]
    Initrd(#[from] loader::initrd::InitrdError),
    /// Boot parameters.
    #[error(transparent)]
    Boot(#[from] loader::boot::BootError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] loader::acpi::AcpiError),
    /// vCPU registers.
    #[error(transparent)]
    Regs(#[from] crate::regs::RegsError),
    /// vCPU threads.
    #[error(transparent)]
    Vcpu(#[from] crate::vcpu::VcpuError),
    /// The event loop.
    #[error("event loop failed: {0:?}")]
    EventLoop(event_manager::Error),
    /// A host resource (eventfd, timerfd, signal handler) failed.
    #[error("cannot set up {what}")]
    Host {
        /// What was being set up.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn kvm_error(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn host_error(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Host { what, source }
}

/// A configured VM, possibly booted several times (guest resets).
pub struct Vmm {
    config: VmConfig,
    kvm: Kvm,
    output: Option<SharedWriter>,
    input: Option<File>,
    deadline: Option<Instant>,
    watcher: Arc<Mutex<ConsoleWatcher>>,
    _raw_terminal: Option<RawTerminal>,
}

/// What the console showed during a run, for the exit report.
pub struct ConsoleSummary {
    /// The boot timeline, ending with the exit.
    pub timeline: Timeline,
    /// `--expect` patterns that never matched.
    pub unmatched: Vec<String>,
    /// Whether the guest wrote anything to the serial console.
    pub saw_output: bool,
}

impl Vmm {
    /// Checks `config`, opens KVM and the console's host side.
    pub fn new(mut config: VmConfig) -> Result<Self, VmError> {
        config.validate()?;
        let start = process_start();
        let watcher = ConsoleWatcher::new(
            start,
            compile("expect", &config.watch.expect).map_err(invalid_pattern)?,
            compile("fail-on", &config.watch.fail_on).map_err(invalid_pattern)?,
        );
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        check_capabilities(&kvm)?;
        install_kick_handler()?;
        signals::install().map_err(host_error("signal handlers"))?;
        let endpoints = open_console(&config.serial)?;
        let (output, input) = match endpoints {
            Some(endpoints) => {
                if let Some(path) = &endpoints.pty_path {
                    announce_pty(path);
                    config.serial.file = Some(path.clone());
                }
                (Some(SharedWriter::new(endpoints.output)), endpoints.input)
            }
            None => (None, None),
        };
        let raw_terminal = if matches!(config.serial.mode, ConsoleMode::Tty | ConsoleMode::Tee) {
            RawTerminal::enable()
        } else {
            None
        };
        let deadline = config
            .timeout_secs
            .map(|secs| Instant::now() + Duration::from_secs(secs));
        Ok(Self {
            config,
            kvm,
            output,
            input,
            deadline,
            watcher: Arc::new(Mutex::new(watcher)),
            _raw_terminal: raw_terminal,
        })
    }

    /// What the console showed so far, with an "exit" mark added now.
    pub fn console_summary(&self) -> ConsoleSummary {
        let mut watcher = lock_watcher(&self.watcher);
        watcher.mark("exit");
        ConsoleSummary {
            timeline: watcher.timeline().clone(),
            unmatched: watcher.unmatched().iter().map(|s| s.to_string()).collect(),
            saw_output: watcher.saw_output(),
        }
    }

    /// The configuration in force (with the pty path filled in).
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Boots the VM and runs it until it stops for good; guest resets
    /// reboot it unless `on_reset` is `Exit`.
    pub fn run(&mut self) -> Result<StopReason, VmError> {
        loop {
            let reason = self.boot_once()?;
            if reason.is_reset() && self.config.on_reset == OnReset::Reboot {
                continue;
            }
            return Ok(reason);
        }
    }

    fn boot_once(&mut self) -> Result<StopReason, VmError> {
        let lifecycle = Arc::new(Lifecycle::new().map_err(host_error("an eventfd"))?);
        lock_watcher(&self.watcher).attach(lifecycle.clone());
        let output = self.output.clone().map(|inner| {
            Box::new(WatchedOutput::new(inner, self.watcher.clone()))
                as Box<dyn std::io::Write + Send>
        });
        let machine = Machine::build(&self.kvm, &self.config, output, &lifecycle)?;
        let watcher = self.watcher.clone();
        let on_first_entry =
            Box::new(move || lock_watcher(&watcher).mark("first guest entry (vCPU 0)"));
        let running = machine.start(on_first_entry)?;
        lock_watcher(&self.watcher).mark("VM ready (vCPUs started)");
        let result = self.event_loop(&running, &lifecycle);
        running.stop();
        result?;
        Ok(lifecycle.reason().unwrap_or(StopReason::PowerOff))
    }

    fn event_loop(
        &self,
        running: &RunningMachine,
        lifecycle: &Arc<Lifecycle>,
    ) -> Result<(), VmError> {
        let mut events: EventManager<Box<dyn MutEventSubscriber>> =
            EventManager::new().map_err(VmError::EventLoop)?;
        events.add_subscriber(Box::new(StopWatcher {
            lifecycle: lifecycle.clone(),
        }));
        events.add_subscriber(Box::new(signals::SignalWatcher::new(lifecycle.clone())));
        if let Some(deadline) = self.deadline {
            let timer = DeadlineTimer::new(deadline, lifecycle.clone())
                .map_err(host_error("the timeout timer"))?;
            events.add_subscriber(Box::new(timer));
        }
        if let (Some(input), Some(serial)) = (&self.input, &running.serial) {
            let input = input.try_clone().map_err(host_error("console input"))?;
            let escape = self.config.serial.mode == ConsoleMode::Tty;
            let forwarder = InputForwarder::new(input, serial.clone(), lifecycle.clone(), escape);
            events.add_subscriber(Box::new(forwarder));
        }
        signals::loop_started();
        while lifecycle.reason().is_none() {
            match events.run_with_timeout(50) {
                Ok(_) => {}
                Err(event_manager::Error::Epoll(e)) if e.errno() == libc::EINTR => {}
                Err(e) => return Err(VmError::EventLoop(e)),
            }
            lock_watcher(&self.watcher).check_partial_line();
        }
        Ok(())
    }
}

fn lock_watcher(watcher: &Mutex<ConsoleWatcher>) -> std::sync::MutexGuard<'_, ConsoleWatcher> {
    watcher.lock().unwrap_or_else(|p| p.into_inner())
}

fn invalid_pattern(e: crate::watch::WatchError) -> VmError {
    VmError::Config(crate::config::ConfigError::Invalid(e.one_line()))
}

fn check_capabilities(kvm: &Kvm) -> Result<(), VmError> {
    let needed = [
        (Cap::Irqchip, "an in-kernel irqchip"),
        (Cap::Irqfd, "irqfd"),
        (Cap::Ioeventfd, "ioeventfd"),
        (Cap::UserMemory, "user memory regions"),
        (Cap::ImmediateExit, "immediate_exit"),
        (Cap::Pit2, "the in-kernel PIT"),
        (Cap::ExtCpuid, "KVM_GET_SUPPORTED_CPUID"),
    ];
    for (cap, name) in needed {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCapability(name));
        }
    }
    Ok(())
}

/// A built, not yet running VM.
struct Machine {
    _vm: Arc<VmFd>,
    _ram: GuestRam,
    vcpus: Vec<VcpuFd>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    serial: Option<Arc<Mutex<devices::legacy::serial::Serial>>>,
    lifecycle: Arc<Lifecycle>,
}

impl Machine {
    fn build(
        kvm: &Kvm,
        config: &VmConfig,
        output: Option<Box<dyn std::io::Write + Send>>,
        lifecycle: &Arc<Lifecycle>,
    ) -> Result<Self, VmError> {
        let vm = Arc::new(kvm.create_vm().map_err(kvm_error("create a VM"))?);
        create_interrupt_controllers(&vm)?;
        let routing = Arc::new(InterruptRouting::new(vm.clone())?);
        let ram_size = config.memory.size;
        let ram = create_guest_ram(ram_size, config.memory.shared)?;
        register_guest_ram(&vm, &ram)?;
        let cpus = config.cpus.boot_vcpus;
        let mut platform = create_platform(&vm, cpus, ram_size, output, lifecycle)?;
        let mut mmio = Bus::new();
        let pci = create_pci(
            &vm,
            &routing,
            &ram,
            ram_size,
            &config.disks,
            &mut platform.pio,
            &mut mmio,
        )?;
        platform.acpi.devices.push(pci.acpi);
        let (kernel, boot_info) = load_payload(&ram, config, &platform.acpi)?;
        let vcpus = create_vcpus(kvm, &vm, cpus)?;
        let mode = match kernel.protocol {
            BootProtocol::Pvh => EntryMode::Pvh,
            BootProtocol::Linux64 => EntryMode::Linux64,
        };
        regs::write_boot_tables(&ram, mode)?;
        if let Some(boot_vcpu) = vcpus.first() {
            regs::setup_sregs(boot_vcpu, mode)?;
            regs::setup_regs(boot_vcpu, mode, kernel.entry.0, boot_info.0)?;
        }
        Ok(Self {
            _vm: vm,
            _ram: ram,
            vcpus,
            pio: Arc::new(platform.pio),
            mmio: Arc::new(mmio),
            serial: platform.serial,
            lifecycle: lifecycle.clone(),
        })
    }

    fn start(self, on_first_entry: Box<dyn FnOnce() + Send>) -> Result<RunningMachine, VmError> {
        let mut on_first_entry = Some(on_first_entry);
        let stop = Arc::new(AtomicBool::new(false));
        let mut running = RunningMachine {
            _vm: self._vm,
            _ram: self._ram,
            handles: Vec::new(),
            stop: stop.clone(),
            serial: self.serial,
        };
        for (index, fd) in self.vcpus.into_iter().enumerate() {
            let vcpu = Vcpu {
                index: index as u8,
                fd,
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                lifecycle: self.lifecycle.clone(),
                stop: stop.clone(),
                on_first_entry: on_first_entry.take(),
            };
            // On failure `running` is dropped, which stops the started ones.
            running.handles.push(vcpu.start()?);
        }
        Ok(running)
    }
}

/// Loads kernel, initrd, ACPI tables and boot parameters; returns the
/// kernel and the boot structure's address (start info or zero page).
fn load_payload(
    ram: &GuestRam,
    config: &VmConfig,
    acpi: &loader::acpi::AcpiPlatform,
) -> Result<(LoadedKernel, GuestAddress), VmError> {
    let payload = &config.payload;
    let kernel_path = payload
        .kernel
        .as_deref()
        .unwrap_or(std::path::Path::new(""));
    let kernel = loader::kernel::load_kernel(ram, kernel_path)?;
    let initrd = match &payload.initramfs {
        Some(path) => {
            let max_addr = kernel
                .setup_header
                .map(|header| u64::from(header.initrd_addr_max));
            Some(loader::initrd::load_initrd(
                ram,
                path,
                config.memory.size,
                kernel.end,
                max_addr,
            )?)
        }
        None => None,
    };
    let rsdp = loader::acpi::create_acpi_tables(ram, acpi)?;
    let setup = BootSetup {
        ram_size: config.memory.size,
        cmdline: payload.cmdline.as_deref().unwrap_or(""),
        initrd,
        rsdp: Some(rsdp),
    };
    let boot_info = loader::boot::configure_boot(ram, &kernel, &setup)?;
    Ok((kernel, boot_info))
}

/// Creates the vCPUs with their CPUID, MSRs, FPU and LAPIC set.
fn create_vcpus(kvm: &Kvm, vm: &VmFd, cpus: u8) -> Result<Vec<VcpuFd>, VmError> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_error("report its CPUID"))?;
    (0..cpus)
        .map(|index| {
            let vcpu = vm
                .create_vcpu(u64::from(index))
                .map_err(kvm_error("create a vCPU"))?;
            let entries = build_cpuid(supported.as_slice(), index, cpus);
            let cpuid = kvm_bindings::CpuId::from_entries(&entries)
                .map_err(|_| VmError::MissingCapability("room for the CPUID table"))?;
            vcpu.set_cpuid2(&cpuid).map_err(kvm_error("set CPUID"))?;
            regs::setup_msrs(&vcpu)?;
            regs::setup_fpu(&vcpu)?;
            regs::setup_lint(&vcpu)?;
            Ok(vcpu)
        })
        .collect()
}

/// A VM whose vCPU threads are running.
struct RunningMachine {
    // Field order matters: threads are stopped in `stop`/`drop` before the
    // memory and VM fds they use go away.
    handles: Vec<VcpuHandle>,
    stop: Arc<AtomicBool>,
    serial: Option<Arc<Mutex<devices::legacy::serial::Serial>>>,
    _ram: GuestRam,
    _vm: Arc<VmFd>,
}

impl RunningMachine {
    /// Stops every vCPU thread and waits for it.
    fn stop(mut self) {
        self.stop_threads();
    }

    fn stop_threads(&mut self) {
        self.stop.store(true, Ordering::Release);
        let handles = std::mem::take(&mut self.handles);
        // Kick until each thread has left KVM_RUN: a kick that lands just
        // before the thread enters KVM_RUN is caught by immediate_exit.
        for handle in handles {
            while !handle.is_finished() {
                handle.kick();
                std::thread::sleep(Duration::from_micros(200));
            }
            handle.join();
        }
    }
}

impl Drop for RunningMachine {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

/// Ends the event loop's wait once the lifecycle records a stop.
struct StopWatcher {
    lifecycle: Arc<Lifecycle>,
}

impl MutEventSubscriber for StopWatcher {
    fn process(&mut self, _: Events, _: &mut EventOps) {
        // Drain the counter; the reason is read by the loop itself.
        let _ = self.lifecycle.wake_fd().read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        // Registration failure leaves the 50 ms poll as the fallback.
        let _ = ops.add(Events::new(self.lifecycle.wake_fd(), EventSet::IN));
    }
}

/// Stops the VM with [`StopReason::Timeout`] at the deadline.
struct DeadlineTimer {
    timer: TimerFd,
    lifecycle: Arc<Lifecycle>,
}

impl DeadlineTimer {
    fn new(deadline: Instant, lifecycle: Arc<Lifecycle>) -> std::io::Result<Self> {
        let mut timer = TimerFd::new().map_err(std::io::Error::from)?;
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        timer.reset(remaining, None).map_err(std::io::Error::from)?;
        Ok(Self { timer, lifecycle })
    }
}

impl MutEventSubscriber for DeadlineTimer {
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.timer.wait();
        self.lifecycle.stop(StopReason::Timeout);
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.timer, EventSet::IN));
    }
}
