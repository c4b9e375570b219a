//! The cloud-hypervisor-compatible REST API on a Unix socket
//! (`--api-socket`): the socket's hygiene (a stale socket is replaced, a
//! live one or any other file is refused, mode 0600, removed at exit), the
//! HTTP server thread (`tiny_http`), the VMM behind it (at most one VM,
//! created with `vm.create` or from the command line) and the main
//! thread's wait for the process to end: `vmm.shutdown`, a termination
//! signal, or the VM stopping by itself (guest poweroff, reset with
//! `--no-reboot`, crash, timeout), as in cloud-hypervisor. A `vm.shutdown`
//! only stops the VM; the process stays for `vm.boot` or `vm.delete`.

pub mod routes;

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};

use crate::config::VmConfig;
use crate::control::{ControlError, Counters, VmEvent};
use crate::handle::{Vm, VmHandle, VmInfo};
use crate::lifecycle::{Lifecycle, StopReason};
use crate::signals;
use routes::{route, Backend, BackendError, Method};

/// Largest request body read (a VM configuration is a few KiB).
const MAX_BODY: u64 = 1 << 20;

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
    /// The HTTP server could not start.
    #[error("--api-socket: cannot start the HTTP server: {0}")]
    Server(String),
    /// A host resource (eventfd, epoll, signal handler) failed.
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

/// The VMM behind the API: at most one VM, and the process's own stop.
struct ApiVmm {
    vm: Mutex<Option<VmHandle>>,
    exit: Arc<Lifecycle>,
    failure: Arc<Mutex<Option<String>>>,
}

fn failed(e: impl std::fmt::Display) -> BackendError {
    BackendError::Failed(e.to_string())
}

impl ApiVmm {
    fn lock(&self) -> MutexGuard<'_, Option<VmHandle>> {
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
        act(vm).map_err(failed)
    }

    fn create_vm(&self, config: VmConfig) -> Result<(), ApiError> {
        let handle = Vm::create(config)?;
        self.watch(&handle);
        *self.lock() = Some(handle);
        Ok(())
    }

    /// Ends the process when the VM stops by itself.
    fn watch(&self, handle: &VmHandle) {
        let events = handle.events();
        let exit = self.exit.clone();
        let failure = self.failure.clone();
        std::thread::spawn(move || {
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
        });
    }
}

impl Backend for ApiVmm {
    fn create(&self, config: VmConfig) -> Result<(), BackendError> {
        config
            .validate()
            .map_err(|e| BackendError::BadConfig(e.to_string()))?;
        if self.lock().is_some() {
            return Err(failed("a VM is already created: PUT vm.delete first"));
        }
        self.create_vm(config).map_err(failed)
    }

    fn delete(&self) -> Result<(), BackendError> {
        let handle = self.lock().take();
        if let Some(handle) = handle {
            handle.quit();
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

/// Serves the API on `socket` until the process must end; creates and
/// boots `config` first when given. Returns why the process ends.
pub fn run(socket: &Path, config: Option<VmConfig>) -> Result<StopReason, ApiError> {
    let mut socket = ApiSocket::bind(socket)?;
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
        .ok_or_else(|| ApiError::Server("no listener".into()))?;
    let server = Arc::new(
        tiny_http::Server::from_listener(listener, None)
            .map_err(|e| ApiError::Server(e.to_string()))?,
    );
    let http = {
        let (server, vmm) = (server.clone(), vmm.clone());
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || serve_http(&server, &vmm))
            .map_err(|e| ApiError::Host(format!("the API thread: {e}")))?
    };
    let result = boot_initial(&vmm, config).and_then(|()| wait_for_exit(&exit));
    server.unblock();
    let _ = http.join();
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
    vmm.create_vm(config)?;
    let vm = vmm.lock();
    match vm.as_ref() {
        Some(handle) => handle.boot().map_err(ApiError::from),
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

/// Answers requests one at a time until the server is unblocked.
fn serve_http(server: &tiny_http::Server, vmm: &ApiVmm) {
    while let Ok(mut request) = server.recv() {
        let method = match request.method() {
            tiny_http::Method::Get => Method::Get,
            tiny_http::Method::Put => Method::Put,
            _ => Method::Other,
        };
        let mut body = Vec::new();
        let read = request.as_reader().take(MAX_BODY).read_to_end(&mut body);
        let answer = match read {
            Ok(_) => route(vmm, method, request.url(), &body),
            Err(e) => routes::Answer {
                status: 400,
                body: format!("cannot read the request body: {e}"),
                json: false,
                exit_after: false,
            },
        };
        let exit_after = answer.exit_after;
        // A client that went away is no reason to stop serving.
        let _ = request.respond(response(answer));
        if exit_after {
            vmm.exit.stop(StopReason::Requested);
            return;
        }
    }
}

fn response(answer: routes::Answer) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
    let content_type = if answer.json {
        "application/json"
    } else {
        "text/plain"
    };
    let mut response =
        tiny_http::Response::from_data(answer.body.into_bytes()).with_status_code(answer.status);
    if let Ok(header) = tiny_http::Header::from_bytes("Content-Type", content_type) {
        response.add_header(header);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

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
