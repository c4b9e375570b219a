//! A REST backend for the API targets that does what zvmm's does with a
//! request's JSON — cloud-hypervisor's `VmConfig` mapped field by field,
//! validated, devices added to the configuration as asked for — without
//! creating a VM.

use std::sync::Mutex;

use serde_json::Value;
use vmm::api::compat;
use vmm::api::routes::{Backend, BackendError, DeviceAddition};
use vmm::control::Counters;
use vmm::handle::VmInfo;

/// Holds the configuration `vm.create` and `vm.add-*` built.
#[derive(Default)]
pub struct ConfigOnly {
    requested: Mutex<Option<Value>>,
}

/// Maps and validates `body` as `vm.create` does.
pub fn check_vm_config(body: Value) -> Result<(), BackendError> {
    let config = compat::vm_config(body).map_err(|e| BackendError::BadConfig(e.to_string()))?;
    config
        .validate()
        .map_err(|e| BackendError::BadConfig(e.to_string()))?;
    let _ = serde_json::to_string(&config);
    Ok(())
}

fn no_vm() -> BackendError {
    BackendError::Failed("no VM created".into())
}

impl Backend for ConfigOnly {
    fn create(&self, config: Value) -> Result<(), BackendError> {
        check_vm_config(config.clone())?;
        *self.requested.lock().expect("lock") = Some(config);
        Ok(())
    }

    fn add_device(&self, device: DeviceAddition) -> Result<(), BackendError> {
        let mut config = device.config;
        vmm::api::routes::strip_nulls(&mut config);
        let mut requested = self.requested.lock().expect("lock");
        let mut candidate = requested.clone().ok_or_else(no_vm)?;
        let Some(object) = candidate.as_object_mut() else {
            return Err(no_vm());
        };
        if device.field == "vsock" {
            object.insert("vsock".into(), config);
        } else {
            let list = object
                .entry(device.field)
                .or_insert_with(|| Value::Array(Vec::new()));
            match list.as_array_mut() {
                Some(list) => list.push(config),
                None => return Err(BackendError::BadConfig("not a list".into())),
            }
        }
        check_vm_config(candidate.clone())?;
        *requested = Some(candidate);
        Ok(())
    }

    fn delete(&self) -> Result<(), BackendError> {
        *self.requested.lock().expect("lock") = None;
        Ok(())
    }

    fn boot(&self) -> Result<(), BackendError> {
        Err(no_vm())
    }

    fn pause(&self) -> Result<(), BackendError> {
        Err(no_vm())
    }

    fn resume(&self) -> Result<(), BackendError> {
        Err(no_vm())
    }

    fn power_button(&self) -> Result<(), BackendError> {
        Err(no_vm())
    }

    fn shutdown(&self) -> Result<(), BackendError> {
        Err(no_vm())
    }

    fn reboot(&self) -> Result<(), BackendError> {
        Err(no_vm())
    }

    fn info(&self) -> Result<VmInfo, BackendError> {
        Err(no_vm())
    }

    fn counters(&self) -> Result<Counters, BackendError> {
        Err(no_vm())
    }
}
