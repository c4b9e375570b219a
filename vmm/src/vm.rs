//! One VM from configuration to stop: opens KVM, builds memory and the
//! platform, loads the kernel, initrd, boot parameters and ACPI tables,
//! configures and starts the vCPUs, runs the event loop until something
//! stops the VM, and restarts it on a guest reset unless told not to.
//! Runs on the VMM thread, taking requests (pause, resume, shutdown, ...)
//! from a [`Control`] between event-loop rounds.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::legacy::ioapic::IOAPIC_WINDOW;
use devices::legacy::{Ged, IoApic};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use loader::acpi::PlatformDevice;
use loader::boot::BootSetup;
use loader::kernel::{BootProtocol, LoadedKernel};
use loader::layout;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::bus::Bus;
use crate::cloud_init::{attach_seed, SeedDisk};
use crate::config::{ConsoleMode, OnReset, VmConfig};
use crate::console::{announce_pty, open_console, InputForwarder, RawTerminal};
use crate::control::{
    Command, Control, ControlError, Counters, NewDevice, Reply, Request, StopReport, VmEvent,
    VmState,
};
use crate::cpuid::build_cpuid;
use crate::fs::{start_shares, FsDaemons};
use crate::interrupts::{InterruptRouting, IoApicPins};
use crate::lifecycle::{Lifecycle, StopReason};
use crate::memory::{create_guest_ram, register_guest_ram, GuestRam};
use crate::net::NetBackends;
use crate::pci::{create_pci, PciContext, PciDevices};
use crate::platform::{create_interrupt_controllers, create_platform, IrqchipMode, Platform};
use crate::regs::{self, EntryMode};
use crate::signals;
use crate::vcpu::{install_kick_handler, PauseGate, Vcpu, VcpuHandle};
use crate::virtio_devices::{trailing_devices, virtio_devices};
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
    /// Virtio devices (disks, NICs).
    #[error(transparent)]
    Devices(#[from] crate::virtio_devices::DeviceSetupError),
    /// NICs' host side.
    #[error(transparent)]
    Net(#[from] crate::net::NetSetupError),
    /// Shared directories (virtiofsd, virtio-fs).
    #[error(transparent)]
    Fs(#[from] crate::fs::FsSetupError),
    /// The cloud-init seed.
    #[error(transparent)]
    CloudInit(#[from] crate::cloud_init::CloudInitError),
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
    nets: NetBackends,
    /// Keeps the cloud-init seed disk (in `config.disks`) open.
    _seed: Option<SeedDisk>,
    _raw_terminal: Option<RawTerminal>,
}

/// What the console showed during a run, for the exit report.
#[derive(Clone, Debug, Default)]
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
        crate::fs::check_shares(&config)?;
        for note in config.complete() {
            eprintln!("zvmm: {note}");
        }
        // Before anything else opens fds: inherited tap fds are adopted here.
        let nets = NetBackends::open(&mut config.net)?;
        // After the taps, so no seed fd can take an inherited fd's number.
        let seed = attach_seed(&mut config)?;
        let start = process_start();
        let watcher = ConsoleWatcher::new(
            start,
            compile("expect", &config.watch.expect).map_err(invalid_pattern)?,
            compile("fail-on", &config.watch.fail_on).map_err(invalid_pattern)?,
        );
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        check_capabilities(&kvm, config.pit)?;
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
            nets,
            _seed: seed,
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

    /// The console watcher, whose timeline `vm.info` reports.
    pub fn watcher(&self) -> Arc<Mutex<ConsoleWatcher>> {
        self.watcher.clone()
    }

    /// The configuration in force (with the pty path filled in).
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Serves `control`'s requests until told to quit: the body of the
    /// VMM thread that [`crate::handle::Vm::create`] starts. The VM boots
    /// on [`Command::Boot`]; guest resets reboot it unless `on_reset` is
    /// `Exit`; every stop is recorded in `control`.
    pub fn serve(mut self, control: &Control) {
        loop {
            let request = control.next();
            match request.command {
                Command::Boot => match self.start(control) {
                    Err(e) => request.answer(Err(e.into())),
                    Ok(started) => {
                        request.answer(Ok(Reply::Done));
                        if self.run(control, started) {
                            break;
                        }
                    }
                },
                Command::Quit => {
                    request.answer(Ok(Reply::Done));
                    break;
                }
                Command::AddDevice => {
                    let added = self.add_device(control).map_err(ControlError::from);
                    request.answer(added.map(|()| Reply::Done));
                }
                command => {
                    let state = control.state();
                    request.answer(Err(ControlError::WrongState {
                        action: command.action(),
                        state,
                    }));
                }
            }
        }
    }

    /// Adds the device waiting in `control` to the configuration (the
    /// next boot builds it); a NIC's taps are opened now.
    fn add_device(&mut self, control: &Control) -> Result<(), VmError> {
        let Some(device) = control.take_device() else {
            return Ok(());
        };
        let mut config = self.config.clone();
        match device {
            NewDevice::Disk(disk) => config.disks.push(disk),
            NewDevice::Fs(share) => config.fs.push(share),
            NewDevice::Vsock(_) if config.vsock.is_some() => {
                let why = "the VM already has a vsock device".to_string();
                return Err(VmError::Config(crate::config::ConfigError::Invalid(why)));
            }
            NewDevice::Vsock(vsock) => config.vsock = Some(vsock),
            NewDevice::Net(mut net) => {
                let index = config.net.len();
                net.id.get_or_insert_with(|| format!("_net{index}"));
                config.net.push(net);
            }
        }
        for note in config.complete() {
            eprintln!("zvmm: {note}");
        }
        let opened = self.nets.len();
        let nets = NetBackends::open(&mut config.net[opened..])?;
        self.nets.append(nets);
        control.set_config(config.clone());
        self.config = config;
        Ok(())
    }

    /// Builds the machine and starts its vCPUs.
    fn start(&mut self, control: &Control) -> Result<Started, VmError> {
        let lifecycle = Arc::new(Lifecycle::new().map_err(host_error("an eventfd"))?);
        lock_watcher(&self.watcher).attach(lifecycle.clone());
        let output = self.output.clone().map(|inner| {
            Box::new(WatchedOutput::new(inner, self.watcher.clone()))
                as Box<dyn std::io::Write + Send>
        });
        let machine = Machine::build(&self.kvm, &self.config, &self.nets, output, &lifecycle)?;
        let watcher = self.watcher.clone();
        let on_first_entry =
            Box::new(move || lock_watcher(&watcher).mark("first guest entry (vCPU 0)"));
        // Marked before the vCPU threads exist, so it precedes guest events.
        lock_watcher(&self.watcher).mark("VM ready (vCPUs starting)");
        let running = machine.start(on_first_entry)?;
        control.set_state(VmState::Running);
        control.emit(VmEvent::Booted);
        Ok(Started { running, lifecycle })
    }

    /// Runs a started VM until it stops for good, rebooting it on guest
    /// resets and reboot requests; returns whether the VMM must quit.
    fn run(&mut self, control: &Control, mut started: Started) -> bool {
        loop {
            let mut session = Session::default();
            let result = self.event_loop(&started, control, &mut session);
            let Started { running, lifecycle } = started;
            running.stop();
            let reason = lifecycle.reason().unwrap_or(StopReason::PowerOff);
            let guest_reset = reason.is_reset() && self.config.on_reset == OnReset::Reboot;
            let requested_reboot = session.reboot && reason == StopReason::Requested;
            let outcome = match result {
                Ok(()) if (guest_reset || requested_reboot) && !session.quit => {
                    if guest_reset {
                        control.emit(VmEvent::Reset);
                    }
                    match self.start(control) {
                        Ok(next) => {
                            session.answer_all(Ok(()));
                            started = next;
                            continue;
                        }
                        Err(e) => Err(Arc::new(e)),
                    }
                }
                Ok(()) => Ok(reason),
                Err(e) => Err(Arc::new(e)),
            };
            let answer = outcome.as_ref().map(|_| ()).map_err(Arc::clone);
            // The state reads Shutdown before the requests are answered.
            control.stopped(StopReport {
                outcome,
                summary: self.console_summary(),
            });
            session.answer_all(answer);
            return session.quit;
        }
    }

    fn event_loop(
        &self,
        started: &Started,
        control: &Control,
        session: &mut Session,
    ) -> Result<(), VmError> {
        let Started { running, lifecycle } = started;
        let mut events: EventManager<Box<dyn MutEventSubscriber>> =
            EventManager::new().map_err(VmError::EventLoop)?;
        events.add_subscriber(Box::new(StopWatcher {
            lifecycle: lifecycle.clone(),
        }));
        events.add_subscriber(Box::new(RequestWatcher {
            wake: control
                .wake_fd()
                .try_clone()
                .map_err(host_error("the request eventfd"))?,
        }));
        let mut signal_watcher = signals::SignalWatcher::new(lifecycle.clone());
        if let Some(secs) = self.config.shutdown_grace_secs {
            let button = running.power_button.clone();
            let press: signals::PowerButton = Box::new(move || {
                let mut ged = button.lock().unwrap_or_else(|p| p.into_inner());
                ged.power_button().is_ok()
            });
            signal_watcher = signal_watcher.with_grace(Duration::from_secs(secs), press);
        }
        events.add_subscriber(Box::new(signal_watcher));
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
        // Everything that ends a wait is an eventfd; the tick only matches a
        // console prompt that has no newline yet (and is a fallback).
        let watching =
            !self.config.watch.expect.is_empty() || !self.config.watch.fail_on.is_empty();
        let tick_ms = if watching { 50 } else { 1000 };
        while lifecycle.reason().is_none() {
            while let Some(request) = control.try_next() {
                apply_request(request, started, control, session);
            }
            match events.run_with_timeout(tick_ms) {
                Ok(_) => {}
                Err(event_manager::Error::Epoll(e)) if e.errno() == libc::EINTR => {}
                Err(e) => return Err(VmError::EventLoop(e)),
            }
            lock_watcher(&self.watcher).check_partial_line();
        }
        Ok(())
    }
}

/// A VM whose vCPUs were started, with the lifecycle of this boot.
struct Started {
    running: RunningMachine,
    lifecycle: Arc<Lifecycle>,
}

/// Requests that stop the current boot, answered once it has stopped.
#[derive(Default)]
struct Session {
    waiting: Vec<Request>,
    reboot: bool,
    quit: bool,
}

impl Session {
    fn answer_all(&mut self, result: Result<(), Arc<VmError>>) {
        for request in self.waiting.drain(..) {
            request.answer(match &result {
                Ok(()) => Ok(Reply::Done),
                Err(e) => Err(ControlError::Vm(e.clone())),
            });
        }
    }
}

/// Carries out one request while the VM runs.
fn apply_request(request: Request, started: &Started, control: &Control, session: &mut Session) {
    let state = control.state();
    let wrong_state = |command: Command| ControlError::WrongState {
        action: command.action(),
        state,
    };
    let result = match (request.command, state) {
        (Command::Pause, VmState::Running) => started.running.pause().map(|()| {
            control.set_state(VmState::Paused);
            control.emit(VmEvent::Paused);
            Reply::Done
        }),
        (Command::Resume, VmState::Paused) => {
            started.running.resume();
            control.set_state(VmState::Running);
            control.emit(VmEvent::Resumed);
            Ok(Reply::Done)
        }
        (Command::Counters, _) => Ok(Reply::Counters(started.running.counters())),
        (Command::PowerButton, VmState::Running) => {
            started.running.power_button().map(|()| Reply::Done)
        }
        (command @ (Command::Shutdown | Command::Reboot | Command::Quit), _) => {
            session.reboot |= command == Command::Reboot;
            session.quit |= command == Command::Quit;
            session.waiting.push(request);
            started.lifecycle.stop(StopReason::Requested);
            return;
        }
        (command, _) => Err(wrong_state(command)),
    };
    request.answer(result);
}

fn lock_watcher(watcher: &Mutex<ConsoleWatcher>) -> std::sync::MutexGuard<'_, ConsoleWatcher> {
    watcher.lock().unwrap_or_else(|p| p.into_inner())
}

fn invalid_pattern(e: crate::watch::WatchError) -> VmError {
    VmError::Config(crate::config::ConfigError::Invalid(e.one_line()))
}

fn check_capabilities(kvm: &Kvm, pit: bool) -> Result<(), VmError> {
    let needed = [
        (Cap::Irqchip, "an in-kernel irqchip"),
        (Cap::Irqfd, "irqfd"),
        (Cap::Ioeventfd, "ioeventfd"),
        (Cap::UserMemory, "user memory regions"),
        (Cap::ImmediateExit, "immediate_exit"),
        (Cap::ExtCpuid, "KVM_GET_SUPPORTED_CPUID"),
    ];
    for (cap, name) in needed {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCapability(name));
        }
    }
    if pit && !kvm.check_extension(Cap::Pit2) {
        return Err(VmError::MissingCapability("the in-kernel PIT (--pit on)"));
    }
    if !pit && !kvm.check_extension(Cap::SplitIrqchip) {
        return Err(VmError::MissingCapability(
            "the split irqchip (use --pit on for the full in-kernel one)",
        ));
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
    pci: PciDevices,
    power_button: Arc<Mutex<Ged>>,
    fs_daemons: FsDaemons,
}

/// The ACPI power button: the GED event register on the port bus, its
/// interrupt as an irqfd on [`layout::GED_GSI`], and the DSDT devices.
fn add_power_button(vm: &VmFd, platform: &mut Platform) -> Result<Arc<Mutex<Ged>>, VmError> {
    let interrupt = EventFd::new(EFD_NONBLOCK).map_err(host_error("the power-button eventfd"))?;
    vm.register_irqfd(&interrupt, layout::GED_GSI)
        .map_err(kvm_error("connect the power-button interrupt"))?;
    let ged = Arc::new(Mutex::new(Ged::new(interrupt)));
    let shared: crate::bus::SharedDevice = ged.clone();
    platform
        .pio
        .insert(
            shared,
            u64::from(layout::GED_EVENT_PORT),
            u64::from(layout::GED_EVENT_LEN),
        )
        .map_err(crate::platform::PlatformError::Bus)?;
    platform.acpi.devices.push(PlatformDevice::PowerButton {
        event_port: layout::GED_EVENT_PORT,
        gsi: layout::GED_GSI,
    });
    Ok(ged)
}

impl Machine {
    fn build(
        kvm: &Kvm,
        config: &VmConfig,
        nets: &NetBackends,
        output: Option<Box<dyn std::io::Write + Send>>,
        lifecycle: &Arc<Lifecycle>,
    ) -> Result<Self, VmError> {
        let vm = crate::kernel_time::timed("KVM_CREATE_VM", || kvm.create_vm())
            .map_err(kvm_error("create a VM"))?;
        let vm = Arc::new(vm);
        let irqchip = IrqchipMode::for_pit(config.pit);
        create_interrupt_controllers(&vm, irqchip)?;
        let routing = Arc::new(match irqchip {
            IrqchipMode::Split => InterruptRouting::split(vm.clone()),
            IrqchipMode::InKernelWithPit => InterruptRouting::new(vm.clone())?,
        });
        let ram_size = config.memory.size;
        let ram = create_guest_ram(ram_size, config.memory.shared)?;
        register_guest_ram(&vm, &ram)?;
        let cpus = config.cpus.boot_vcpus;
        let mut platform = create_platform(&vm, cpus, ram_size, output, lifecycle)?;
        platform.acpi.max_cpus = config.cpus.max();
        let power_button = add_power_button(&vm, &mut platform)?;
        let mut mmio = Bus::new();
        if irqchip == IrqchipMode::Split {
            let pins = Arc::new(IoApicPins(routing.clone()));
            let ioapic = Arc::new(Mutex::new(IoApic::new(pins)));
            mmio.insert(ioapic, layout::IOAPIC_START, IOAPIC_WINDOW)
                .map_err(crate::platform::PlatformError::Bus)?;
            platform.acpi.legacy_pic = false;
        }
        let context = PciContext {
            vm: &vm,
            routing: &routing,
            ram: &ram,
            ram_size,
            hotplug_size: config.memory.hotplug_size.unwrap_or(0),
            pci_segments: config.platform.num_pci_segments,
        };
        let mut devices = virtio_devices(config, nets)?;
        let (shares, fs_daemons) = start_shares(config, &ram, lifecycle)?;
        devices.extend(shares);
        devices.extend(trailing_devices(config)?);
        let pci = create_pci(&context, devices, &mut platform.pio, &mut mmio)?;
        platform.acpi.devices.extend(pci.acpi);
        let (kernel, boot_info) = load_payload(&ram, config, &platform.acpi)?;
        let vcpus =
            crate::kernel_time::timed("vCPU creation and set-up", || create_vcpus(kvm, &vm, cpus))?;
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
            pci: pci.devices,
            power_button,
            fs_daemons,
        })
    }

    fn start(self, on_first_entry: Box<dyn FnOnce() + Send>) -> Result<RunningMachine, VmError> {
        let mut on_first_entry = Some(on_first_entry);
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(PauseGate::new());
        let mut running = RunningMachine {
            _vm: self._vm,
            _ram: self._ram,
            handles: Vec::new(),
            stop: stop.clone(),
            pause: pause.clone(),
            serial: self.serial,
            pio: self.pio.clone(),
            mmio: self.mmio.clone(),
            pci: self.pci,
            _fs_daemons: self.fs_daemons,
            power_button: self.power_button,
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
                pause: pause.clone(),
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
    check_firmware_options(&kernel, config)?;
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

/// PVH firmware loads the kernel and initrd from a disk itself: an
/// `--initrd` would be ignored, and without a disk it has nothing to boot.
fn check_firmware_options(kernel: &LoadedKernel, config: &VmConfig) -> Result<(), VmError> {
    let loader::kernel::KernelFormat::PvhFirmware(firmware) = kernel.format else {
        return Ok(());
    };
    let kernel_path = config
        .payload
        .kernel
        .as_deref()
        .unwrap_or(std::path::Path::new(""));
    let refuse = |why: String| Err(VmError::Config(crate::config::ConfigError::Invalid(why)));
    if let Some(initrd) = &config.payload.initramfs {
        return refuse(format!(
            "--kernel {} is {firmware}, which loads the kernel and initrd from the disk; drop --initrd {}",
            kernel_path.display(),
            initrd.display()
        ));
    }
    if config.disks.is_empty() {
        return refuse(format!(
            "--kernel {} is {firmware}, which boots from a disk; add --disk path=IMAGE (a GPT disk with an EFI system partition)",
            kernel_path.display()
        ));
    }
    Ok(())
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
    pause: Arc<PauseGate>,
    serial: Option<Arc<Mutex<devices::legacy::serial::Serial>>>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    pci: PciDevices,
    power_button: Arc<Mutex<Ged>>,
    // After `pci`: the devices disconnect before their daemons stop.
    _fs_daemons: FsDaemons,
    _ram: GuestRam,
    _vm: Arc<VmFd>,
}

impl RunningMachine {
    /// Stops every vCPU thread and waits for it, then tears the VM down
    /// (closing the last VM fd and unmapping RAM is the kernel's work).
    fn stop(mut self) {
        self.stop_threads();
        crate::kernel_time::timed("VM teardown (close fds, unmap RAM)", || drop(self));
    }

    /// Parks every vCPU thread; undone if they don't all park in time.
    fn pause(&self) -> Result<(), ControlError> {
        self.pause.close();
        let live: Vec<&VcpuHandle> = self.handles.iter().filter(|h| !h.is_finished()).collect();
        let parked = self.pause.wait_parked(live.len(), PAUSE_LIMIT, || {
            live.iter().for_each(|h| h.kick())
        });
        if parked < live.len() {
            self.pause.open();
            return Err(ControlError::PauseTimeout {
                parked,
                total: live.len(),
            });
        }
        Ok(())
    }

    /// Lets the parked vCPU threads run again.
    fn resume(&self) {
        self.pause.open();
    }

    /// Presses the ACPI power button (GED event and interrupt).
    fn power_button(&self) -> Result<(), ControlError> {
        let mut ged = self.power_button.lock().unwrap_or_else(|p| p.into_inner());
        ged.power_button()
            .map_err(|source| ControlError::from(host_error("the power-button interrupt")(source)))
    }

    /// Unclaimed bus accesses and each virtio device's counters.
    fn counters(&self) -> Counters {
        let mut counters = Counters::new();
        for (name, bus) in [("pio-bus", &self.pio), ("mmio-bus", &self.mmio)] {
            let (reads, writes) = bus.unclaimed();
            let entry = counters.entry(name.to_string()).or_default();
            entry.insert("unclaimed_reads".into(), reads);
            entry.insert("unclaimed_writes".into(), writes);
        }
        for (name, device) in self.pci.counters() {
            let entry = counters.entry(name).or_default();
            for (counter, value) in device {
                entry.insert(counter.to_string(), value);
            }
        }
        counters
    }

    fn stop_threads(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.pause.wake_all();
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

/// How long the vCPUs get to park on a pause request.
const PAUSE_LIMIT: Duration = Duration::from_secs(1);

/// Wakes the event loop when a request is queued; the loop takes the
/// requests itself.
struct RequestWatcher {
    wake: vmm_sys_util::eventfd::EventFd,
}

impl MutEventSubscriber for RequestWatcher {
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.wake.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        // Registration failure leaves the 50 ms poll as the fallback.
        let _ = ops.add(Events::new(&self.wake, EventSet::IN));
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
