//! `vm.create` bodies: JSON as a host agent sends it, mapped onto zvmm's
//! `VmConfig` field by field (what zvmm cannot honour refused by name),
//! validated and serialised back as `vm.info` reports it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(body) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = zvmm_fuzz::api::check_vm_config(body);
    }
});
