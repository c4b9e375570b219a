//! The ACPI power button end to end over the REST API: the probe, told
//! the GED's interrupt line and event register (zvmm's layout constants),
//! waits for the interrupt on its local APIC; `PUT vm.power-button`
//! answers 204, the probe reports the event byte and powers off, and zvmm
//! exits 0. Without a running VM the request is refused with 500.

use std::path::Path;
use std::time::{Duration, Instant};

use loader::layout::{GED_EVENT_PORT, GED_GSI};
use zvmm_tests::api::{get, put, start_api, ProbeVm};
use zvmm_tests::zvmm::scratch_dir;

const LIMIT: Duration = Duration::from_secs(15);

fn wait_for(file: &Path, needle: &str) -> String {
    let deadline = Instant::now() + LIMIT;
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(Instant::now() < deadline, "no {needle:?} in:\n{text}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn host_agent_sequence_ends_with_the_power_button_powering_the_probe_off() {
    let dir = scratch_dir("power-button");
    let socket = dir.join("api.sock");
    let serial = dir.join("serial.log");
    let zvmm = start_api(&socket, &[]);
    let refused = put(&socket, "vm.power-button", "");
    assert_eq!(refused.status, 500, "{refused:?}");

    let mut vm = ProbeVm::new(&format!(
        "probe.action=power-button probe.pwrbtn.gsi={GED_GSI} probe.pwrbtn.reg={GED_EVENT_PORT:#x}"
    ));
    vm.serial_file = Some(serial.clone());
    assert_eq!(put(&socket, "vm.create", &vm.json()).status, 204);
    let early = put(&socket, "vm.power-button", "");
    assert_eq!(early.status, 500, "not booted yet: {early:?}");
    assert_eq!(put(&socket, "vm.boot", "").status, 204);
    wait_for(&serial, "probe: power-button waiting");
    // The whole host-agent sequence: info, pause, resume, then the button.
    let info = get(&socket, "vm.info").json();
    assert_eq!(info["state"], "Running", "{info}");
    let timeline: Vec<&str> = info["boot_timeline"]
        .as_array()
        .map(|events| events.iter().filter_map(|e| e["event"].as_str()).collect())
        .unwrap_or_default();
    assert!(timeline.contains(&"first serial byte"), "{info}");
    assert_eq!(put(&socket, "vm.pause", "").status, 204);
    assert_eq!(get(&socket, "vm.info").json()["state"], "Paused");
    assert_eq!(put(&socket, "vm.resume", "").status, 204);
    assert_eq!(get(&socket, "vm.info").json()["state"], "Running");
    let pressed = put(&socket, "vm.power-button", "");
    assert_eq!(pressed.status, 204, "{pressed:?}");
    let done = zvmm.finish(LIMIT);
    assert_eq!(done.code(), 0, "{done:#?}");
    let text = std::fs::read_to_string(&serial).unwrap();
    assert!(text.contains("probe: power-button event=0x01"), "{text}");
    assert!(
        text.contains("probe: poweroff method=sleep_control"),
        "{text}"
    );
    assert!(!text.contains("power-button timeout"), "{text}");
}
