//! The REST API's routing, independent of the HTTP server: a request's
//! method, path, body and attached descriptors become a call on a
//! [`Backend`] and an answer with cloud-hypervisor's status codes — 200
//! with JSON for queries, 204 for actions, 400 for a body that is not a
//! valid configuration (or a field zvmm cannot honour, named), 404 for an
//! unknown path, 405 for a known path with the wrong method, 501 for
//! cloud-hypervisor endpoints zvmm does not serve, 500 with a one-line
//! message when the VM can't do what was asked (wrong state, no VM
//! created, boot failure). Every answer with a body is JSON, errors as
//! `{"error": "..."}`; `null`s are left out (the spec has no nullable
//! field).

use std::os::fd::OwnedFd;

use serde::Serialize;

use crate::control::Counters;
use crate::handle::VmInfo;

/// The prefix of every endpoint.
pub const API_PREFIX: &str = "/api/v1/";

/// Why the backend could not act; answered with status 500 unless it is
/// the client's configuration (400).
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The configuration given to `vm.create` is unusable.
    #[error("invalid VM configuration: {0}")]
    BadConfig(String),
    /// The VM can't do it now (wrong state, no VM, boot failure, ...).
    #[error("{0}")]
    Failed(String),
}

/// A device added with `vm.add-*` before boot.
#[derive(Debug)]
pub struct DeviceAddition {
    /// The `VmConfig` field it joins: `disks`, `net`, `fs` or `vsock`.
    pub field: &'static str,
    /// The device's configuration as sent.
    pub config: serde_json::Value,
    /// Descriptors sent with the request (tap fds for `vm.add-net`).
    pub fds: Vec<OwnedFd>,
}

/// What the API drives: the VMM with at most one VM.
pub trait Backend {
    /// `vm.create`: checks `config` and creates the VM (not booted).
    fn create(&self, config: serde_json::Value) -> Result<(), BackendError>;
    /// `vm.add-disk`, `vm.add-net`, `vm.add-fs`, `vm.add-vsock`.
    fn add_device(&self, device: DeviceAddition) -> Result<(), BackendError>;
    /// `vm.delete`: stops the VM if it runs and forgets it.
    fn delete(&self) -> Result<(), BackendError>;
    /// `vm.boot`.
    fn boot(&self) -> Result<(), BackendError>;
    /// `vm.pause`.
    fn pause(&self) -> Result<(), BackendError>;
    /// `vm.resume`.
    fn resume(&self) -> Result<(), BackendError>;
    /// `vm.power-button`.
    fn power_button(&self) -> Result<(), BackendError>;
    /// `vm.shutdown`: hard stop, the VM stays created.
    fn shutdown(&self) -> Result<(), BackendError>;
    /// `vm.reboot`.
    fn reboot(&self) -> Result<(), BackendError>;
    /// `vm.info`.
    fn info(&self) -> Result<VmInfo, BackendError>;
    /// `vm.counters`.
    fn counters(&self) -> Result<Counters, BackendError>;
}

/// `vmm.ping`'s answer (cloud-hypervisor's `VmmPingResponse`).
#[derive(Debug, Serialize)]
pub struct PingResponse {
    /// The build's version string.
    pub build_version: String,
    /// The crate version.
    pub version: String,
    /// This process's id.
    pub pid: u32,
    /// Optional features compiled in.
    pub features: Vec<String>,
}

impl PingResponse {
    /// The answer for this process.
    pub fn current() -> Self {
        let version = env!("CARGO_PKG_VERSION").to_string();
        Self {
            build_version: format!("zvmm v{version}"),
            version,
            pid: std::process::id(),
            features: Vec::new(),
        }
    }
}

/// An HTTP answer.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// A JSON document; empty for 204.
    pub body: String,
    /// The process must end once this answer is sent (`vmm.shutdown`).
    pub exit_after: bool,
}

impl Answer {
    fn no_content() -> Self {
        Self {
            status: 204,
            body: String::new(),
            exit_after: false,
        }
    }

    /// An error answer: `{"error": message}`.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        let body = serde_json::json!({ "error": message.into() }).to_string();
        Self {
            status,
            body,
            exit_after: false,
        }
    }

    fn json(value: &impl Serialize) -> Self {
        match serde_json::to_value(value) {
            Ok(mut value) => {
                strip_nulls(&mut value);
                Self {
                    status: 200,
                    body: value.to_string(),
                    exit_after: false,
                }
            }
            Err(e) => Self::error(500, format!("cannot encode the answer: {e}")),
        }
    }

    /// The message of an error answer (for logs and tests).
    pub fn message(&self) -> String {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| self.body.clone())
    }
}

/// Removes every `null` member and element: cloud-hypervisor's schemas
/// have no nullable field, an absent optional field is left out.
pub fn strip_nulls(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(members) => {
            members.retain(|_, member| !member.is_null());
            members.values_mut().for_each(strip_nulls);
        }
        serde_json::Value::Array(elements) => {
            elements.retain(|element| !element.is_null());
            elements.iter_mut().for_each(strip_nulls);
        }
        _ => {}
    }
}

/// The HTTP method of a request, as far as the API cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// GET.
    Get,
    /// PUT.
    Put,
    /// Anything else.
    Other,
}

impl Method {
    /// The method named `name`.
    pub fn parse(name: &str) -> Self {
        match name {
            "GET" => Method::Get,
            "PUT" => Method::Put,
            _ => Method::Other,
        }
    }
}

/// The endpoints cloud-hypervisor serves that zvmm does not (yet).
const UNSUPPORTED: &[(&str, &str)] = &[
    ("vm.resize", "vCPU and memory hotplug"),
    ("vm.resize-disk", "disk resizing"),
    ("vm.resize-zone", "memory zones"),
    ("vm.add-device", "VFIO passthrough"),
    ("vm.remove-device", "device hot-unplug"),
    ("vm.add-generic-vhost-user", "generic vhost-user devices"),
    ("vm.add-pmem", "virtio-pmem"),
    ("vm.add-vdpa", "vDPA devices"),
    ("vm.add-user-device", "vfio-user devices"),
    ("vm.snapshot", "snapshots"),
    ("vm.restore", "snapshots"),
    ("vm.coredump", "guest core dumps"),
    ("vm.nmi", "NMI injection"),
    ("vm.receive-migration", "live migration"),
    ("vm.send-migration", "live migration"),
];

/// Answers one request; `fds` are the descriptors it carried.
pub fn route(
    backend: &dyn Backend,
    method: Method,
    url: &str,
    body: &[u8],
    fds: Vec<OwnedFd>,
) -> Answer {
    let path = url.split('?').next().unwrap_or_default();
    let Some(endpoint) = path.strip_prefix(API_PREFIX) else {
        return Answer::error(404, format!("unknown path {path}"));
    };
    if let Some((_, what)) = UNSUPPORTED.iter().find(|(name, _)| *name == endpoint) {
        return Answer::error(501, format!("{path}: zvmm does not support {what}"));
    }
    let Some(expected) = endpoint_method(endpoint) else {
        return Answer::error(404, format!("unknown endpoint {path}"));
    };
    if method != expected {
        let name = if expected == Method::Get {
            "GET"
        } else {
            "PUT"
        };
        return Answer::error(405, format!("{path} takes {name}"));
    }
    if !fds.is_empty() && endpoint != "vm.add-net" {
        return Answer::error(
            400,
            format!("{path} takes no file descriptors (only vm.add-net does)"),
        );
    }
    match endpoint {
        "vmm.ping" => Answer::json(&PingResponse::current()),
        "vmm.shutdown" => Answer {
            exit_after: true,
            ..Answer::no_content()
        },
        "vm.info" => backend
            .info()
            .map_or_else(|e| backend_error(&e), |info| Answer::json(&info)),
        "vm.counters" => backend
            .counters()
            .map_or_else(|e| backend_error(&e), |c| Answer::json(&c)),
        "vm.create" => create(backend, body),
        "vm.add-disk" => add(backend, "disks", endpoint, body, fds),
        "vm.add-net" => add(backend, "net", endpoint, body, fds),
        "vm.add-fs" => add(backend, "fs", endpoint, body, fds),
        "vm.add-vsock" => add(backend, "vsock", endpoint, body, fds),
        action => act(backend, action),
    }
}

/// The method each endpoint takes; `None` for unknown endpoints.
fn endpoint_method(endpoint: &str) -> Option<Method> {
    match endpoint {
        "vmm.ping" | "vm.info" | "vm.counters" => Some(Method::Get),
        "vmm.shutdown" | "vm.create" | "vm.delete" | "vm.boot" | "vm.pause" | "vm.resume"
        | "vm.power-button" | "vm.shutdown" | "vm.reboot" | "vm.add-disk" | "vm.add-net"
        | "vm.add-fs" | "vm.add-vsock" => Some(Method::Put),
        _ => None,
    }
}

/// The body as a JSON object, or the answer refusing it.
fn json_object(endpoint: &str, body: &[u8]) -> Result<serde_json::Value, Answer> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Answer::error(400, format!("{endpoint} needs a JSON body")));
    }
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(value) if value.is_object() => Ok(value),
        Ok(_) => Err(Answer::error(
            400,
            format!("{endpoint}: bad JSON: expected an object"),
        )),
        Err(e) => Err(Answer::error(400, format!("{endpoint}: bad JSON: {e}"))),
    }
}

fn create(backend: &dyn Backend, body: &[u8]) -> Answer {
    match json_object("vm.create", body) {
        Ok(value) => done(backend.create(value)),
        Err(answer) => answer,
    }
}

fn add(
    backend: &dyn Backend,
    field: &'static str,
    endpoint: &str,
    body: &[u8],
    fds: Vec<OwnedFd>,
) -> Answer {
    match json_object(endpoint, body) {
        Ok(config) => done(backend.add_device(DeviceAddition { field, config, fds })),
        Err(answer) => answer,
    }
}

fn act(backend: &dyn Backend, action: &str) -> Answer {
    done(match action {
        "vm.delete" => backend.delete(),
        "vm.boot" => backend.boot(),
        "vm.pause" => backend.pause(),
        "vm.resume" => backend.resume(),
        "vm.power-button" => backend.power_button(),
        "vm.shutdown" => backend.shutdown(),
        "vm.reboot" => backend.reboot(),
        other => return Answer::error(404, format!("unknown endpoint {API_PREFIX}{other}")),
    })
}

fn done(result: Result<(), BackendError>) -> Answer {
    match result {
        Ok(()) => Answer::no_content(),
        Err(e) => backend_error(&e),
    }
}

fn backend_error(error: &BackendError) -> Answer {
    let status = match error {
        BackendError::BadConfig(_) => 400,
        BackendError::Failed(_) => 500,
    };
    Answer::error(status, error.to_string())
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::config::VmConfig;
    use crate::control::VmState;

    /// A backend with the state machine of one VM, recording calls.
    #[derive(Default)]
    struct Fake {
        vm: RefCell<Option<(VmConfig, VmState)>>,
        added: RefCell<Vec<(&'static str, serde_json::Value, usize)>>,
        calls: RefCell<Vec<&'static str>>,
    }

    impl Fake {
        fn step(
            &self,
            name: &'static str,
            from: &[VmState],
            to: VmState,
        ) -> Result<(), BackendError> {
            self.calls.borrow_mut().push(name);
            let mut vm = self.vm.borrow_mut();
            let Some((_, state)) = vm.as_mut() else {
                return Err(BackendError::Failed("no VM created".into()));
            };
            if !from.contains(state) {
                return Err(BackendError::Failed(format!("cannot {name}: {state}")));
            }
            *state = to;
            Ok(())
        }
    }

    impl Backend for Fake {
        fn create(&self, config: serde_json::Value) -> Result<(), BackendError> {
            let config: VmConfig = serde_json::from_value(config)
                .map_err(|e| BackendError::BadConfig(e.to_string()))?;
            config
                .validate()
                .map_err(|e| BackendError::BadConfig(e.to_string()))?;
            *self.vm.borrow_mut() = Some((config, VmState::Created));
            Ok(())
        }
        fn add_device(&self, device: DeviceAddition) -> Result<(), BackendError> {
            let fds = device.fds.len();
            self.added
                .borrow_mut()
                .push((device.field, device.config, fds));
            Ok(())
        }
        fn delete(&self) -> Result<(), BackendError> {
            self.vm.borrow_mut().take();
            Ok(())
        }
        fn boot(&self) -> Result<(), BackendError> {
            use VmState::*;
            self.step("boot", &[Created, Shutdown], Running)
        }
        fn pause(&self) -> Result<(), BackendError> {
            self.step("pause", &[VmState::Running], VmState::Paused)
        }
        fn resume(&self) -> Result<(), BackendError> {
            self.step("resume", &[VmState::Paused], VmState::Running)
        }
        fn power_button(&self) -> Result<(), BackendError> {
            self.step(
                "press the power button",
                &[VmState::Running],
                VmState::Running,
            )
        }
        fn shutdown(&self) -> Result<(), BackendError> {
            use VmState::*;
            self.step("shutdown", &[Running, Paused], Shutdown)
        }
        fn reboot(&self) -> Result<(), BackendError> {
            use VmState::*;
            self.step("reboot", &[Running, Paused], Running)
        }
        fn info(&self) -> Result<VmInfo, BackendError> {
            let vm = self.vm.borrow();
            let (config, state) = vm
                .as_ref()
                .ok_or_else(|| BackendError::Failed("no VM created".into()))?;
            Ok(VmInfo {
                memory_actual_size: config.memory.size,
                config: config.clone(),
                state: *state,
                boot_timeline: Vec::new(),
            })
        }
        fn counters(&self) -> Result<Counters, BackendError> {
            Ok(Counters::new())
        }
    }

    const CONFIG: &str = r#"{"cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": 134217728}, "payload": {"kernel": "/k"},
        "serial": {"mode": "Pty"}, "console": {"mode": "Off"}}"#;

    fn put(fake: &Fake, endpoint: &str, body: &str) -> Answer {
        let url = format!("/api/v1/{endpoint}");
        route(fake, Method::Put, &url, body.as_bytes(), Vec::new())
    }

    fn get(fake: &Fake, endpoint: &str) -> Answer {
        let url = format!("/api/v1/{endpoint}");
        route(fake, Method::Get, &url, b"", Vec::new())
    }

    fn info_json(fake: &Fake) -> serde_json::Value {
        let answer = get(fake, "vm.info");
        assert_eq!(answer.status, 200, "{answer:?}");
        serde_json::from_str(&answer.body).unwrap()
    }

    #[test]
    fn ping_answers_like_cloud_hypervisor() {
        let answer = get(&Fake::default(), "vmm.ping");
        assert_eq!(answer.status, 200);
        let value: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
        assert_eq!(value["pid"], std::process::id());
        assert_eq!(value["version"], env!("CARGO_PKG_VERSION"));
        assert!(value["build_version"].as_str().unwrap().contains("zvmm"));
    }

    #[test]
    fn create_boot_pause_resume_shutdown_walks_the_states() {
        let fake = Fake::default();
        assert_eq!(put(&fake, "vm.create", CONFIG).status, 204);
        let info = info_json(&fake);
        assert_eq!(info["state"], "Created");
        assert_eq!(info["config"]["cpus"]["boot_vcpus"], 2);
        assert_eq!(info["config"]["memory"]["size"], 134217728u64);
        assert_eq!(info["config"]["serial"]["mode"], "Pty");
        assert_eq!(info["config"]["payload"]["kernel"], "/k");
        for (endpoint, state) in [
            ("vm.boot", "Running"),
            ("vm.pause", "Paused"),
            ("vm.resume", "Running"),
            ("vm.power-button", "Running"),
            ("vm.reboot", "Running"),
            ("vm.shutdown", "Shutdown"),
            ("vm.boot", "Running"),
        ] {
            assert_eq!(put(&fake, endpoint, "").status, 204, "{endpoint}");
            assert_eq!(info_json(&fake)["state"], state, "{endpoint}");
        }
        assert_eq!(put(&fake, "vm.delete", "").status, 204);
        assert_eq!(get(&fake, "vm.info").status, 500);
    }

    #[test]
    fn info_leaves_out_nulls() {
        let fake = Fake::default();
        assert_eq!(put(&fake, "vm.create", CONFIG).status, 204);
        let answer = get(&fake, "vm.info");
        assert!(!answer.body.contains("null"), "{}", answer.body);
        let info = info_json(&fake);
        assert!(info["config"]["payload"].get("initramfs").is_none());
        assert!(info["config"]["console"].get("file").is_none());
        let mut nested = serde_json::json!({"a": null, "b": [1, null, {"c": null, "d": 2}]});
        strip_nulls(&mut nested);
        assert_eq!(nested, serde_json::json!({"b": [1, {"d": 2}]}));
    }

    #[test]
    fn errors_are_json_with_a_message() {
        let fake = Fake::default();
        let answer = put(&fake, "vm.pause", "");
        assert_eq!(answer.status, 500);
        let value: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
        assert_eq!(value["error"], "no VM created");
        put(&fake, "vm.create", CONFIG);
        let answer = put(&fake, "vm.resume", "");
        assert_eq!(answer.status, 500);
        assert_eq!(answer.message(), "cannot resume: created");
    }

    #[test]
    fn bad_bodies_are_400() {
        let fake = Fake::default();
        for body in ["", "{", "[1,2]", r#"{"cpus": {"boot_vcpus": "two"}}"#] {
            let answer = put(&fake, "vm.create", body);
            assert_eq!(answer.status, 400, "{body}: {answer:?}");
            assert!(!answer.message().is_empty());
        }
        let answer = put(&fake, "vm.create", r#"{"cpus": {"boot_vcpus": 0}}"#);
        assert_eq!(answer.status, 400, "{answer:?}");
        assert!(answer.message().contains("vCPUs"), "{answer:?}");
        assert!(fake.vm.borrow().is_none());
        assert_eq!(put(&fake, "vm.add-net", "[]").status, 400);
        assert!(fake.added.borrow().is_empty());
    }

    #[test]
    fn add_requests_reach_the_backend_with_their_field_and_fds() {
        let fake = Fake::default();
        for (endpoint, field) in [
            ("vm.add-disk", "disks"),
            ("vm.add-net", "net"),
            ("vm.add-fs", "fs"),
            ("vm.add-vsock", "vsock"),
        ] {
            assert_eq!(put(&fake, endpoint, r#"{"id": "x"}"#).status, 204);
            assert_eq!(fake.added.borrow().last().unwrap().0, field);
        }
        let (fd, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let url = "/api/v1/vm.add-net";
        let answer = route(&fake, Method::Put, url, b"{}", vec![fd.into()]);
        assert_eq!(answer.status, 204);
        assert_eq!(fake.added.borrow().last().unwrap().2, 1);
        let (fd, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let url = "/api/v1/vm.add-disk";
        let answer = route(&fake, Method::Put, url, b"{}", vec![fd.into()]);
        assert_eq!(answer.status, 400);
        assert!(
            answer.message().contains("no file descriptors"),
            "{answer:?}"
        );
    }

    #[test]
    fn unknown_paths_are_404_wrong_methods_405_unsupported_501() {
        let fake = Fake::default();
        assert_eq!(get(&fake, "vm.nonsense").status, 404);
        let root = route(&fake, Method::Get, "/", b"", Vec::new());
        assert_eq!(root.status, 404);
        let v2 = route(&fake, Method::Get, "/api/v2/vmm.ping", b"", Vec::new());
        assert_eq!(v2.status, 404);
        let answer = get(&fake, "vm.boot");
        assert_eq!(answer.status, 405);
        assert!(answer.message().contains("PUT"), "{answer:?}");
        assert_eq!(put(&fake, "vm.info", "").status, 405);
        let other = route(&fake, Method::Other, "/api/v1/vmm.ping", b"", Vec::new());
        assert_eq!(other.status, 405);
        let resize = put(&fake, "vm.resize", r#"{"desired_vcpus": 2}"#);
        assert_eq!(resize.status, 501);
        assert!(resize.message().contains("hotplug"), "{resize:?}");
        assert!(fake.calls.borrow().is_empty());
    }

    #[test]
    fn vmm_shutdown_asks_for_exit_after_answering() {
        let fake = Fake::default();
        let answer = put(&fake, "vmm.shutdown", "");
        assert_eq!(answer.status, 204);
        assert!(answer.exit_after);
        assert!(!get(&fake, "vmm.ping").exit_after);
    }

    #[test]
    fn query_strings_are_ignored() {
        let url = "/api/v1/vmm.ping?x=1";
        let answer = route(&Fake::default(), Method::Get, url, b"", Vec::new());
        assert_eq!(answer.status, 200);
    }
}
