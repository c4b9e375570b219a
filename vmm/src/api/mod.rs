//! The cloud-hypervisor-compatible REST API on a Unix socket
//! (`--api-socket`): the socket's hygiene (a stale socket is replaced, a
//! live one or any other file is refused, mode 0600, removed at exit), the
//! HTTP/1.1 server (`server`, `http`: keep-alive, SCM_RIGHTS), the routes
//! (`routes`), cloud-hypervisor's full `VmConfig` (`compat`), the VMM
//! behind them (at most one VM, created with `vm.create` or from the
//! command line, devices added before boot with `vm.add-*`) and the main
//! thread's wait for the process to end: `vmm.shutdown`, a termination
//! signal, or the VM stopping by itself (guest poweroff, reset with
//! `--no-reboot`, crash, timeout), as in cloud-hypervisor. A `vm.shutdown`
//! only stops the VM; the process stays for `vm.boot` or `vm.delete`.

pub mod compat;
pub mod http;
pub mod routes;
pub mod server;

use std::os::fd::{IntoRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use serde_json::Value;

use crate::config::VmConfig;
use crate::control::{ControlError, Counters, NewDevice, VmEvent};
use crate::handle::{Vm, VmHandle, VmInfo};
use crate::lifecycle::{Lifecycle, StopReason};
use crate::signals;
use routes::{Backend, BackendError, DeviceAddition};

/// The API could not be started or the VMM failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Another file is in the way.
    #[error(
        "--api-socket {0}: the path exists and is not a socket; remove it or choose another path"
    )]
    NotASocket(PathBuf),
    /// A live process answers on the socket.
    #[error("--api-socket {0}: another process is listening on this socket")]
    InUse(PathBuf),
    /// The socket could not be created or prepared.
    #[error("--api-socket {path}: cannot {what}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A host resource (eventfd, epoll, signal handler, thread) failed.
    #[error("cannot set up {0}")]
    Host(String),
    /// The VM given on the command line could not be created or booted.
    #[error(transparent)]
    Vm(#[from] crate::vm::VmError),
    /// Booting the VM given on the command line failed.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The VM failed while running (a reboot or its event loop failed).
    #[error("{0}")]
    Failed(String),
}

/// The API socket, removed when dropped.
pub struct ApiSocket {
    path: PathBuf,
    listener: Option<UnixListener>,
}

impl ApiSocket {
    /// Binds `path` with mode 0600, replacing a stale socket (one nobody
    /// listens on) and refusing any other file.
    pub fn bind(path: &Path) -> Result<Self, ApiError> {
        let socket_error = |what| {
            let path = path.to_path_buf();
            move |source| ApiError::Socket { path, what, source }
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if UnixStream::connect(path).is_ok() {
                    return Err(ApiError::InUse(path.to_path_buf()));
                }
                std::fs::remove_file(path).map_err(socket_error("remove the stale socket"))?;
                // A zvmm killed with SIGKILL cannot remove its socket.
                eprintln!(
                    "zvmm: removed stale API socket {} (no process listening)",
                    path.display()
                );
            }
            Ok(_) => return Err(ApiError::NotASocket(path.to_path_buf())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(socket_error("inspect the path")(e)),
        }
        let listener = UnixListener::bind(path).map_err(socket_error("bind"))?;
        let socket = Self {
            path: path.to_path_buf(),
            listener: Some(listener),
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(socket_error("set mode 0600"))?;
        Ok(socket)
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        // Already gone (removed by someone else) is fine.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The VM behind the API: its handle and the configuration as asked for
/// (`vm.create` plus `vm.add-*`, before zvmm filled anything in), which
/// every later addition is checked with.
struct ApiVm {
    handle: VmHandle,
    requested: Value,
}

/// The VMM behind the API: at most one VM, and the process's own stop.
struct ApiVmm {
    vm: Mutex<Option<ApiVm>>,
    exit: Arc<Lifecycle>,
    failure: Arc<Mutex<Option<String>>>,
}

fn failed(e: impl std::fmt::Display) -> BackendError {
    BackendError::Failed(e.to_string())
}

fn bad_config(e: impl std::fmt::Display) -> BackendError {
    BackendError::BadConfig(e.to_string())
}

/// The NetConfig defaults cloud-hypervisor's clients write out; they
/// address the host side of a tap the VMM creates, never of one passed
/// as a descriptor.
const CH_DEFAULT_IP: &str = "192.168.249.1";
const CH_DEFAULT_MASK: &str = "255.255.255.0";

impl ApiVmm {
    fn lock(&self) -> MutexGuard<'_, Option<ApiVm>> {
        self.vm.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn with_vm<T>(
        &self,
        act: impl FnOnce(&VmHandle) -> Result<T, ControlError>,
    ) -> Result<T, BackendError> {
        let vm = self.lock();
        let vm = vm
            .as_ref()
            .ok_or_else(|| failed("no VM created: PUT vm.create first"))?;
        act(&vm.handle).map_err(failed)
    }

    fn create_vm(&self, config: VmConfig, requested: Value) -> Result<(), ApiError> {
        let handle = Vm::create(config)?;
        self.watch(&handle)?;
        *self.lock() = Some(ApiVm { handle, requested });
        Ok(())
    }

    /// Ends the process when the VM stops by itself.
    fn watch(&self, handle: &VmHandle) -> Result<(), ApiError> {
        let events = handle.events();
        let exit = self.exit.clone();
        let failure = self.failure.clone();
        devices::virtio::thread::spawn("api-vm-events".into(), move || {
            for event in events {
                match event {
                    VmEvent::Stopped(StopReason::Requested) => {}
                    VmEvent::Stopped(reason) => exit.stop(reason),
                    VmEvent::Failed(message) => {
                        *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(message);
                        exit.stop(StopReason::Requested);
                    }
                    _ => continue,
                }
            }
        })
        .map(|_| ())
        .map_err(|e| ApiError::Host(format!("the VM event thread: {e}")))
    }
}

/// Refuses tap fds written into a body: over the API they come as
/// SCM_RIGHTS with `vm.add-net`.
fn refuse_fd_numbers(nets: Option<&Value>) -> Result<(), BackendError> {
    let nets = nets
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    match nets.iter().position(|net| net.get("fds").is_some()) {
        Some(index) => Err(bad_config(format!(
            "net[{index}].fds: send tap fds with vm.add-net as SCM_RIGHTS, not as numbers"
        ))),
        None => Ok(()),
    }
}

/// Puts the descriptors received with `vm.add-net` into its configuration
/// (by number: the VMM adopts and closes them), dropping the host-address
/// defaults that do not apply to them.
fn attach_fds(net: &mut Value, fds: &[OwnedFd]) -> Result<(), BackendError> {
    use std::os::fd::AsRawFd;
    refuse_fd_numbers(Some(&Value::Array(vec![net.clone()])))?;
    if fds.is_empty() {
        return Ok(());
    }
    let Some(members) = net.as_object_mut() else {
        return Err(bad_config("vm.add-net: expected a JSON object"));
    };
    if members.contains_key("tap") {
        return Err(bad_config("vm.add-net: give tap or send tap fds, not both"));
    }
    for (key, default) in [("ip", CH_DEFAULT_IP), ("mask", CH_DEFAULT_MASK)] {
        if members.get(key).and_then(Value::as_str) == Some(default) {
            members.remove(key);
        }
    }
    let numbers: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    members.insert("fds".into(), numbers.into());
    Ok(())
}

/// The requested configuration with `config` added to `field`.
fn with_device(mut requested: Value, field: &str, config: Value) -> Result<Value, BackendError> {
    let Some(members) = requested.as_object_mut() else {
        return Err(failed("the VM configuration is not an object"));
    };
    if field == "vsock" {
        // One at most: the VMM refuses a second one before boot and any
        // device after boot, as it does for the other vm.add-*.
        members.insert(field.into(), config);
    } else {
        let list = members
            .entry(field)
            .or_insert_with(|| Value::Array(Vec::new()));
        match list.as_array_mut() {
            Some(list) => list.push(config),
            None => *list = Value::Array(vec![config]),
        }
    }
    Ok(requested)
}

/// The device just added to `field`, as the VMM thread takes it.
fn new_device(config: &VmConfig, field: &str) -> Result<NewDevice, BackendError> {
    let missing = || failed(format!("{field}: the added device is missing"));
    Ok(match field {
        "disks" => NewDevice::Disk(config.disks.last().cloned().ok_or_else(missing)?),
        "net" => NewDevice::Net(config.net.last().cloned().ok_or_else(missing)?),
        "fs" => NewDevice::Fs(config.fs.last().cloned().ok_or_else(missing)?),
        "vsock" => NewDevice::Vsock(config.vsock.clone().ok_or_else(missing)?),
        other => return Err(bad_config(format!("{other}: zvmm cannot add this device"))),
    })
}

impl Backend for ApiVmm {
    fn create(&self, body: Value) -> Result<(), BackendError> {
        refuse_fd_numbers(body.get("net"))?;
        let config = compat::vm_config(body.clone()).map_err(bad_config)?;
        config.validate().map_err(bad_config)?;
        if self.lock().is_some() {
            return Err(failed("a VM is already created: PUT vm.delete first"));
        }
        self.create_vm(config, body).map_err(failed)
    }

    fn add_device(&self, device: DeviceAddition) -> Result<(), BackendError> {
        let DeviceAddition {
            field,
            mut config,
            fds,
        } = device;
        routes::strip_nulls(&mut config);
        if field == "net" {
            attach_fds(&mut config, &fds)?;
        }
        let mut vm = self.lock();
        let vm = vm
            .as_mut()
            .ok_or_else(|| failed("no VM created: PUT vm.create first"))?;
        let requested = with_device(vm.requested.clone(), field, config)?;
        let candidate = compat::vm_config(requested.clone()).map_err(bad_config)?;
        candidate.validate().map_err(bad_config)?;
        let device = new_device(&candidate, field)?;
        vm.handle.add_device(device).map_err(failed)?;
        vm.requested = requested;
        // Adopted by the VMM, which closed the received numbers.
        for fd in fds {
            let _ = fd.into_raw_fd();
        }
        Ok(())
    }

    fn delete(&self) -> Result<(), BackendError> {
        let vm = self.lock().take();
        if let Some(vm) = vm {
            vm.handle.quit();
        }
        Ok(())
    }

    fn boot(&self) -> Result<(), BackendError> {
        self.with_vm(VmHandle::boot)
    }

    fn pause(&self) -> Result<(), BackendError> {
        self.with_vm(VmHandle::pause)
    }

    fn resume(&self) -> Result<(), BackendError> {
        self.with_vm(VmHandle::resume)
    }

    fn power_button(&self) -> Result<(), BackendError> {
        self.with_vm(VmHandle::power_button)
    }

    fn shutdown(&self) -> Result<(), BackendError> {
        self.with_vm(VmHandle::shutdown)
    }

    fn reboot(&self) -> Result<(), BackendError> {
        self.with_vm(VmHandle::reboot)
    }

    fn info(&self) -> Result<VmInfo, BackendError> {
        self.with_vm(|vm| Ok(vm.info()))
    }

    fn counters(&self) -> Result<Counters, BackendError> {
        self.with_vm(VmHandle::counters)
    }
}

impl server::Service for ApiVmm {
    fn backend(&self) -> &dyn Backend {
        self
    }

    fn exit_requested(&self) {
        self.exit.stop(StopReason::Requested);
    }
}

/// Serves the API on `socket` until the process must end; creates and
/// boots `config` first when given. Returns why the process ends.
pub fn run(socket: &Path, config: Option<VmConfig>) -> Result<StopReason, ApiError> {
    let mut socket = ApiSocket::bind(socket)?;
    crate::sandbox::landlock::allow_api_socket(&socket.path);
    signals::install().map_err(|e| ApiError::Host(format!("signal handlers: {e}")))?;
    let exit = Arc::new(Lifecycle::new().map_err(|e| ApiError::Host(format!("an eventfd: {e}")))?);
    let vmm = Arc::new(ApiVmm {
        vm: Mutex::new(None),
        exit: exit.clone(),
        failure: Arc::new(Mutex::new(None)),
    });
    let listener = socket
        .listener
        .take()
        .ok_or_else(|| ApiError::Host("the API socket's listener".into()))?;
    let server = server::Server::start(listener, vmm.clone())
        .map_err(|e| ApiError::Host(format!("the API server: {e}")))?;
    let result = boot_initial(&vmm, config)
        .and_then(|()| {
            // The main thread only waits from here on.
            crate::sandbox::confine_current(crate::sandbox::ThreadKind::Main)
                .map_err(|e| ApiError::Host(crate::sandbox::error_chain(&e)))
        })
        .and_then(|()| wait_for_exit(&exit));
    server.stop();
    // Stops a VM that still runs (vmm.shutdown, signal) before the socket goes.
    let _ = vmm.delete();
    drop(socket);
    let failure = vmm.failure.lock().unwrap_or_else(|p| p.into_inner()).take();
    match failure {
        Some(message) => Err(ApiError::Failed(message)),
        None => result,
    }
}

fn boot_initial(vmm: &ApiVmm, config: Option<VmConfig>) -> Result<(), ApiError> {
    let Some(config) = config else {
        return Ok(());
    };
    let requested = serde_json::to_value(&config).unwrap_or(Value::Null);
    vmm.create_vm(config, requested)?;
    let vm = vmm.lock();
    match vm.as_ref() {
        Some(vm) => vm.handle.boot().map_err(ApiError::from),
        None => Ok(()),
    }
}

/// Waits on the main thread for the process's stop reason, watching
/// termination signals.
fn wait_for_exit(exit: &Arc<Lifecycle>) -> Result<StopReason, ApiError> {
    let mut events: EventManager<Box<dyn MutEventSubscriber>> =
        EventManager::new().map_err(|e| ApiError::Host(format!("the event loop: {e:?}")))?;
    events.add_subscriber(Box::new(signals::SignalWatcher::new(exit.clone())));
    events.add_subscriber(Box::new(ExitWatcher { exit: exit.clone() }));
    signals::loop_started();
    loop {
        if let Some(reason) = exit.reason() {
            return Ok(reason);
        }
        match events.run_with_timeout(100) {
            Ok(_) => {}
            Err(event_manager::Error::Epoll(e)) if e.errno() == libc::EINTR => {}
            Err(e) => return Err(ApiError::Host(format!("the event loop: {e:?}"))),
        }
    }
}

/// Wakes [`wait_for_exit`] when the process's stop is recorded.
struct ExitWatcher {
    exit: Arc<Lifecycle>,
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.exit.wake_fd().read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        // Without it the 100 ms poll still notices the stop.
        let _ = ops.add(Events::new(self.exit.wake_fd(), EventSet::IN));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn received_fds_replace_the_default_host_address() {
        let (a, _peer) = UnixStream::pair().unwrap();
        let fds = vec![OwnedFd::from(a)];
        let mut net = json!({"mac": "02:00:00:00:00:01", "ip": "192.168.249.1",
                             "mask": "255.255.255.0", "num_queues": 2});
        attach_fds(&mut net, &fds).unwrap();
        use std::os::fd::AsRawFd;
        assert_eq!(net["fds"], json!([fds[0].as_raw_fd()]));
        assert!(
            net.get("ip").is_none() && net.get("mask").is_none(),
            "{net}"
        );
        let mut own = json!({"ip": "10.0.0.1"});
        attach_fds(&mut own, &fds).unwrap();
        assert_eq!(own["ip"], "10.0.0.1", "a chosen address is kept");
        let mut both = json!({"tap": "t0"});
        assert!(attach_fds(&mut both, &fds).is_err());
        let mut numbers = json!({"fds": [3]});
        let err = attach_fds(&mut numbers, &[]).unwrap_err().to_string();
        assert!(err.contains("SCM_RIGHTS"), "{err}");
    }

    #[test]
    fn devices_join_their_list_and_a_vsock_its_field() {
        let base = json!({"payload": {"kernel": "/k"}, "disks": [{"path": "/a"}]});
        let two = with_device(base.clone(), "disks", json!({"path": "/b"})).unwrap();
        assert_eq!(two["disks"][1]["path"], "/b");
        let net = with_device(base.clone(), "net", json!({"tap": "t0"})).unwrap();
        assert_eq!(net["net"], json!([{"tap": "t0"}]));
        let vsock = with_device(base, "vsock", json!({"cid": 3})).unwrap();
        let second = with_device(vsock, "vsock", json!({"cid": 4})).unwrap();
        assert_eq!(second["vsock"], json!({"cid": 4}), "the VMM judges it");
        let config: VmConfig = serde_json::from_value(two).unwrap();
        assert_eq!(
            new_device(&config, "disks").unwrap(),
            NewDevice::Disk(config.disks[1].clone())
        );
        assert!(new_device(&config, "fs").is_err(), "no fs was added");
    }

    #[test]
    fn an_added_vsock_is_the_new_device() {
        let base = json!({"payload": {"kernel": "/k"}});
        let added = with_device(base.clone(), "vsock", json!({"cid": 3, "socket": "/v"})).unwrap();
        let config: VmConfig = serde_json::from_value(added).unwrap();
        let vsock = config.vsock.clone().expect("the vsock joined the config");
        assert_eq!(vsock.cid, 3);
        assert_eq!(
            new_device(&config, "vsock").unwrap(),
            NewDevice::Vsock(vsock)
        );
        let none: VmConfig = serde_json::from_value(base).unwrap();
        assert!(new_device(&none, "vsock").is_err(), "no vsock was added");
    }

    #[test]
    fn fd_numbers_in_a_body_are_refused() {
        assert!(refuse_fd_numbers(None).is_ok());
        assert!(refuse_fd_numbers(Some(&json!([{"tap": "t0"}]))).is_ok());
        let err = refuse_fd_numbers(Some(&json!([{"tap": "t0"}, {"fds": [3]}]))).unwrap_err();
        assert!(err.to_string().contains("net[1].fds"), "{err}");
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("zvmm-api-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn socket_is_private_and_removed_at_drop() {
        let dir = scratch("private");
        let path = dir.join("api.sock");
        let socket = ApiSocket::bind(&path).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        drop(socket);
        assert!(!path.exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn stale_socket_is_replaced_live_one_and_files_refused() {
        let dir = scratch("stale");
        let path = dir.join("api.sock");
        drop(UnixListener::bind(&path).unwrap());
        let socket = ApiSocket::bind(&path).unwrap();
        let err = ApiSocket::bind(&path).err().unwrap();
        assert!(matches!(err, ApiError::InUse(_)), "{err}");
        drop(socket);
        let file = dir.join("file");
        std::fs::write(&file, b"keep me").unwrap();
        let err = ApiSocket::bind(&file).err().unwrap();
        assert!(err.to_string().contains(file.to_str().unwrap()), "{err}");
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
