//! The REST API's routing, independent of the HTTP server: a request's
//! method, path and body become a call on a [`Backend`] and an answer with
//! cloud-hypervisor's status codes — 200 with JSON for queries, 204 for
//! actions, 400 for a body that is not a valid configuration, 404 for an
//! unknown path, 405 for a known path with the wrong method, 500 with a
//! one-line message when the VM can't do what was asked (wrong state, no
//! VM created, boot failure).

use serde::Serialize;

use crate::config::VmConfig;
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

/// What the API drives: the VMM with at most one VM.
pub trait Backend {
    /// `vm.create`: checks `config` and creates the VM (not booted).
    fn create(&self, config: VmConfig) -> Result<(), BackendError>;
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
    /// JSON document (2xx) or one-line message (errors); empty for 204.
    pub body: String,
    /// Whether `body` is JSON.
    pub json: bool,
    /// The process must end once this answer is sent (`vmm.shutdown`).
    pub exit_after: bool,
}

impl Answer {
    fn no_content() -> Self {
        Self {
            status: 204,
            body: String::new(),
            json: false,
            exit_after: false,
        }
    }

    fn error(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            body: message.into(),
            json: false,
            exit_after: false,
        }
    }

    fn json(value: &impl Serialize) -> Self {
        match serde_json::to_string(value) {
            Ok(body) => Self {
                status: 200,
                body,
                json: true,
                exit_after: false,
            },
            Err(e) => Self::error(500, format!("cannot encode the answer: {e}")),
        }
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

/// Answers one request.
pub fn route(backend: &dyn Backend, method: Method, url: &str, body: &[u8]) -> Answer {
    let path = url.split('?').next().unwrap_or_default();
    let Some(endpoint) = path.strip_prefix(API_PREFIX) else {
        return Answer::error(404, format!("unknown path {path}"));
    };
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
        action => act(backend, action),
    }
}

/// The method each endpoint takes; `None` for unknown endpoints.
fn endpoint_method(endpoint: &str) -> Option<Method> {
    match endpoint {
        "vmm.ping" | "vm.info" | "vm.counters" => Some(Method::Get),
        "vmm.shutdown" | "vm.create" | "vm.delete" | "vm.boot" | "vm.pause" | "vm.resume"
        | "vm.power-button" | "vm.shutdown" | "vm.reboot" => Some(Method::Put),
        _ => None,
    }
}

fn create(backend: &dyn Backend, body: &[u8]) -> Answer {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Answer::error(400, "vm.create needs a VM configuration as JSON body");
    }
    match serde_json::from_slice::<VmConfig>(body) {
        Ok(config) => done(backend.create(config)),
        Err(e) => Answer::error(400, format!("vm.create: bad JSON: {e}")),
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
    use crate::control::VmState;

    /// A backend with the state machine of one VM, recording calls.
    #[derive(Default)]
    struct Fake {
        vm: RefCell<Option<(VmConfig, VmState)>>,
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
        fn create(&self, config: VmConfig) -> Result<(), BackendError> {
            config
                .validate()
                .map_err(|e| BackendError::BadConfig(e.to_string()))?;
            *self.vm.borrow_mut() = Some((config, VmState::Created));
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
        "serial": {"mode": "Pty"}, "console": {"mode": "Off"}, "rng": {"src": "/dev/urandom"}}"#;

    fn put(fake: &Fake, endpoint: &str, body: &str) -> Answer {
        route(
            fake,
            Method::Put,
            &format!("/api/v1/{endpoint}"),
            body.as_bytes(),
        )
    }

    fn get(fake: &Fake, endpoint: &str) -> Answer {
        route(fake, Method::Get, &format!("/api/v1/{endpoint}"), b"")
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
        assert!(answer.json);
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
    fn wrong_state_is_500_with_a_message() {
        let fake = Fake::default();
        let answer = put(&fake, "vm.pause", "");
        assert_eq!(answer.status, 500);
        assert!(answer.body.contains("no VM created"), "{answer:?}");
        put(&fake, "vm.create", CONFIG);
        let answer = put(&fake, "vm.resume", "");
        assert_eq!(answer.status, 500);
        assert_eq!(answer.body, "cannot resume: created");
    }

    #[test]
    fn bad_bodies_are_400() {
        let fake = Fake::default();
        for body in ["", "{", "[1,2]", r#"{"cpus": {"boot_vcpus": "two"}}"#] {
            let answer = put(&fake, "vm.create", body);
            assert_eq!(answer.status, 400, "{body}: {answer:?}");
            assert!(!answer.body.is_empty());
        }
        let answer = put(&fake, "vm.create", r#"{"cpus": {"boot_vcpus": 0}}"#);
        assert_eq!(answer.status, 400, "{answer:?}");
        assert!(answer.body.contains("vCPUs"), "{answer:?}");
        assert!(fake.vm.borrow().is_none());
    }

    #[test]
    fn unknown_paths_are_404_and_wrong_methods_405() {
        let fake = Fake::default();
        assert_eq!(get(&fake, "vm.nonsense").status, 404);
        assert_eq!(route(&fake, Method::Get, "/", b"").status, 404);
        assert_eq!(
            route(&fake, Method::Get, "/api/v2/vmm.ping", b"").status,
            404
        );
        let answer = get(&fake, "vm.boot");
        assert_eq!(answer.status, 405);
        assert!(answer.body.contains("PUT"), "{answer:?}");
        assert_eq!(put(&fake, "vm.info", "").status, 405);
        assert_eq!(
            route(&fake, Method::Other, "/api/v1/vmm.ping", b"").status,
            405
        );
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
        let answer = route(&Fake::default(), Method::Get, "/api/v1/vmm.ping?x=1", b"");
        assert_eq!(answer.status, 200);
    }
}
