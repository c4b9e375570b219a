//! Kata Containers' call sequence against zvmm run as `cloud-hypervisor`
//! (a symlink), the way its runtime (`clh.go`, generated client) drives
//! cloud-hypervisor: `cloud-hypervisor --api-socket PATH -v --seccomp
//! false`, `vmm.ping` polled every 10 ms, `vm.create` with the full
//! `VmConfig` the generated client writes (every default spelled out,
//! `max_vcpus` and `topology` above `boot_vcpus`, `hotplug_size`, a
//! virtio-fs share on a virtiofsd the test started, rng, vsock with CID 3),
//! `vm.info` =
//! Created, one `vm.add-net` per NIC on a connection of its own with the
//! tap fd attached as SCM_RIGHTS, `vm.boot`, `vm.info` = Running, the
//! hybrid-vsock handshake with the agent (the probe listening on port
//! 1024 as Kata's agent does: `CONNECT 1024\n`, a line starting `OK`, data
//! both ways), the vCPU threads found by name, `vmm.shutdown`. Every JSON
//! answer is checked against cloud-hypervisor's OpenAPI spec; the
//! transcript is printed. `vm.add-vsock` before boot (the device joins the
//! configuration; a second one and one after boot are refused) has a test
//! of its own.
//!
//! Kata puts its virtio-fs share on PCI segment 1 of 2 (served: see
//! `zvmm_pci_segments.rs`); here a share on segment 2 of 2 is checked to
//! be refused by name and the share sent on segment 0 (as is a balloon,
//! which zvmm lacks).

use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use zvmm_tests::ch::{
    check_answers, cloud_hypervisor_link, open_tap_in, thread_names, wait_for_ping, AgentVirtiofsd,
    Exchange, KeepAlive,
};
use zvmm_tests::net::NetNs;
use zvmm_tests::probe::{fnv1a64, probe_elf, test_bytes, Flavour, ProbeReport};
use zvmm_tests::vsock::{conn_by_peer, handshake, listen_seed, pattern, send_then_read, HostConn};
use zvmm_tests::zvmm::{scratch_dir, Running};

/// How long the probe gets to reach its hang.
const BOOT_LIMIT: Duration = Duration::from_secs(30);
/// Kata SIGKILLs cloud-hypervisor 3 s after `vmm.shutdown`.
const KATA_STOP_LIMIT: Duration = Duration::from_secs(3);
/// Guest RAM and the hotplug range Kata asks for (its "default max memory").
const MEMORY: u64 = 256 << 20;
const HOTPLUG: u64 = 2 << 30;
/// The vCPUs Kata boots with and its `default_maxvcpus` (the host's CPUs).
const BOOT_VCPUS: u32 = 1;
const MAX_VCPUS: u32 = 2;
/// The NICs' MAC addresses.
const MACS: [&str; 2] = ["02:4b:41:54:41:01", "02:4b:41:54:41:02"];
/// The vsock port Kata's agent listens on.
const AGENT_PORT: u32 = 1024;
/// Bytes the probe answers on the agent connection.
const AGENT_REPLY: usize = 4096;
/// How long Kata's runtime keeps trying to reach its agent.
const AGENT_LIMIT: Duration = Duration::from_secs(60);

/// `vm.create`'s body as Kata's generated client writes it
/// (`NewVmConfig`, `NewCpusConfig`, `NewMemoryConfig`, ... with every
/// default filled in), serial on the VMM's stdout as in Kata's debug mode.
fn kata_vm_config(dir: &std::path::Path, fs_socket: &std::path::Path, fs_segment: u16) -> Value {
    let initrd = scratch_dir("ch-kata-initrd").join("initrd.img");
    std::fs::write(&initrd, b"kata agent initrd stand-in").unwrap();
    json!({
        "payload": {
            "kernel": probe_elf(Flavour::Pvh),
            "cmdline": format!("console=ttyS0 probe.action=hang panic=1 no_timer_check \
                        noreplace-smp systemd.log_target=console probe.vsock.listen={AGENT_PORT} \
                        probe.vsock.reply={AGENT_REPLY} probe.vsock.wait=120"),
            "initramfs": initrd,
        },
        "cpus": {
            "boot_vcpus": BOOT_VCPUS,
            "max_vcpus": MAX_VCPUS,
            "topology": {"threads_per_core": 1, "cores_per_die": MAX_VCPUS,
                         "dies_per_package": 1, "packages": 1},
            "kvm_hyperv": false,
            "nested": true,
        },
        "memory": {
            "size": MEMORY,
            "hotplug_size": HOTPLUG,
            "mergeable": false,
            "hotplug_method": "Acpi",
            "shared": true,
            "hugepages": false,
            "prefault": false,
            "thp": true,
        },
        "rng": {"src": "/dev/urandom", "iommu": false},
        "serial": {"mode": "Tty", "iommu": false},
        "console": {"mode": "Off", "iommu": false},
        "fs": [{"tag": "kataShared", "socket": fs_socket, "num_queues": 1,
                "queue_size": 1024, "pci_segment": fs_segment}],
        "vsock": {"cid": 3, "socket": dir.join("clh.sock"), "iommu": false},
        "iommu": false,
        "watchdog": false,
        "pvpanic": false,
        "landlock_enable": false,
        "platform": {"num_pci_segments": 2, "iommu_segments": [], "tdx": false,
                     "sev_snp": false, "iommufd": false, "vfio_p2p_dma": true},
    })
}

/// `vm.add-net`'s body (`NewNetConfig` plus the MAC), without `tap`: the
/// tap comes as a descriptor.
fn kata_net_config(mac: &str) -> Value {
    json!({
        "ip": "192.168.249.1", "mask": "255.255.255.0", "mac": mac,
        "iommu": false, "num_queues": 2, "queue_size": 256,
        "vhost_user": false, "vhost_mode": "Client",
        "offload_tso": true, "offload_ufo": true, "offload_csum": true,
    })
}

fn wait_until_exited(zvmm: &mut Running, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if zvmm.try_status().is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Sends one request on `client`, keeping the exchange in `log`.
fn call(
    log: &mut Vec<Exchange>,
    client: &mut KeepAlive,
    method: &str,
    endpoint: &str,
    body: &str,
    fds: &[i32],
) -> Exchange {
    let exchange = client
        .request(method, endpoint, body, fds)
        .unwrap_or_else(|e| panic!("{method} {endpoint}: {e}"));
    log.push(exchange.clone());
    exchange
}

#[test]
fn kata_containers_sequence_with_tap_fds_over_scm_rights() {
    let dir = scratch_dir("ch-kata");
    let shared = dir.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::write(shared.join("hello.txt"), b"kata").unwrap();
    let fs_socket = dir.join("virtiofsd.sock");
    let _virtiofsd = AgentVirtiofsd::start(&["--cache", "auto"], &fs_socket, &shared);
    let mut ns = NetNs::new().unwrap();
    ns.add_tap("tap0_kata", "10.91.0.1/24").unwrap();
    ns.add_tap("tap1_kata", "10.92.0.1/24").unwrap();
    let taps = [open_tap_in(&ns, "tap0_kata"), open_tap_in(&ns, "tap1_kata")];

    let bin_dir = cloud_hypervisor_link(&dir);
    let socket = dir.join("clh-api.sock");
    let mut command = Command::new(bin_dir.join("cloud-hypervisor"));
    command
        .arg("--api-socket")
        .arg(&socket)
        .args(["-v", "--seccomp", "false"]);
    let mut zvmm = Running::spawn(command);
    let pid = zvmm.pid();

    let mut log = vec![wait_for_ping(&socket, Duration::from_secs(10))];
    let mut pool = KeepAlive::connect(&socket).unwrap();
    let refused = |field: &str, body: Value| (field.to_string(), body.to_string());
    // What zvmm refuses by name that Kata's body can carry.
    let mut with_balloon = kata_vm_config(&dir, &fs_socket, 0);
    with_balloon["balloon"] = json!({"size": 0, "deflate_on_oom": false});
    for (named, body) in [
        refused("pci_segment=2", kata_vm_config(&dir, &fs_socket, 2)),
        refused("balloon", with_balloon),
    ] {
        let answer = call(&mut log, &mut pool, "PUT", "vm.create", &body, &[]);
        assert_eq!(answer.status, 400, "{}", answer.line());
        let message = answer.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(message.contains(&named), "{named}: {message}");
    }
    let create = kata_vm_config(&dir, &fs_socket, 0).to_string();
    let created = call(&mut log, &mut pool, "PUT", "vm.create", &create, &[]);
    assert_eq!(created.status, 204, "{}", created.line());
    let info = call(&mut log, &mut pool, "GET", "vm.info", "", &[]);
    assert_eq!(info.json()["state"], "Created", "{}", info.line());

    // vmAddNetPutRequest: a connection of its own, one request per NIC.
    let mut net_conn = KeepAlive::connect(&socket).unwrap();
    for (tap, mac) in taps.iter().zip(MACS) {
        let body = kata_net_config(mac).to_string();
        let added = call(
            &mut log,
            &mut net_conn,
            "PUT",
            "vm.add-net",
            &body,
            &[tap.as_raw_fd()],
        );
        assert_eq!(added.status, 204, "{}", added.line());
    }
    drop(net_conn);
    drop(taps);

    let booted = call(&mut log, &mut pool, "PUT", "vm.boot", "", &[]);
    assert_eq!(booted.status, 204, "{}", booted.line());
    let info = call(&mut log, &mut pool, "GET", "vm.info", "", &[]).json();
    assert_eq!(info["state"], "Running", "{info}");
    let config = &info["config"];
    assert_eq!(config["cpus"]["max_vcpus"], MAX_VCPUS, "{info}");
    assert_eq!(config["memory"]["hotplug_size"], HOTPLUG, "{info}");
    let nets = config["net"].as_array().cloned().unwrap_or_default();
    let macs: Vec<&str> = nets.iter().filter_map(|n| n["mac"].as_str()).collect();
    assert_eq!(macs, MACS, "{info}");
    let tap_names: Vec<&str> = nets.iter().filter_map(|n| n["tap"].as_str()).collect();
    assert_eq!(tap_names, ["tap0_kata", "tap1_kata"], "{info}");
    let vsock_socket = dir.join("clh.sock");
    assert_eq!(config["vsock"]["socket"], json!(vsock_socket), "{info}");
    let (mut agent, attempts) = connect_agent(&vsock_socket, &zvmm);
    let sent = test_bytes(20_000, 0x4b41);
    let answer = send_then_read(&mut agent, &sent).unwrap();
    assert!(
        answer == pattern(listen_seed(&sent), AGENT_REPLY),
        "the agent's answer ({} bytes) is not the probe's pattern",
        answer.len()
    );
    assert!(
        zvmm.stdout.wait_for("probe: action name=hang", BOOT_LIMIT),
        "the probe never got to its hang:\n{}\n{}",
        zvmm.stdout.text(),
        zvmm.stderr.text()
    );
    let report = ProbeReport::parse(&zvmm.stdout.text());
    assert_eq!(
        report.cpus(),
        Some(u64::from(BOOT_VCPUS)),
        "only boot vCPUs enabled"
    );
    // Header, local APIC address and flags, one entry per possible vCPU
    // (the ones above boot_vcpus online-capable), the IOAPIC, the NMI.
    let madt = report.acpi_table("APIC").expect("an MADT");
    assert_eq!(madt.len, 44 + 8 * u64::from(MAX_VCPUS) + 12 + 6, "{madt:?}");
    let seen = conn_by_peer(&report, agent.host_port).expect("the agent's report");
    assert_eq!(seen.local, AGENT_PORT, "{seen:?}");
    assert_eq!(seen.rx_fnv1a64, fnv1a64(&sent), "{seen:?}");
    assert_eq!(seen.tx_bytes, AGENT_REPLY as u64, "{seen:?}");
    assert_eq!(seen.end, "closed", "{seen:?}");
    let counters = call(&mut log, &mut pool, "GET", "vm.counters", "", &[]);
    assert_eq!(counters.status, 200, "{}", counters.line());

    // GetThreadIDs: vCPU threads by name; every other thread named too.
    let names = thread_names(pid);
    let vcpus: Vec<&String> = names.iter().filter(|n| is_vcpu_name(n)).collect();
    assert_eq!(vcpus, ["vcpu0"], "{names:?}");
    let main_named = names.iter().filter(|n| *n == "cloud-hyperviso").count();
    assert_eq!(
        main_named, 1,
        "threads without a name of their own: {names:?}"
    );
    for expected in ["vmm", "api-accept", "api-conn", "api-vm-events"] {
        assert!(
            names.iter().any(|n| n == expected),
            "no {expected} thread: {names:?}"
        );
    }

    let again = call(
        &mut log,
        &mut pool,
        "PUT",
        "vm.add-net",
        &kata_net_config(MACS[0]).to_string(),
        &[],
    );
    assert_eq!(again.status, 500, "no hotplug after boot: {}", again.line());
    let stop = call(&mut log, &mut pool, "PUT", "vmm.shutdown", "", &[]);
    assert_eq!(stop.status, 204, "{}", stop.line());
    assert!(
        wait_until_exited(&mut zvmm, KATA_STOP_LIMIT),
        "still running {KATA_STOP_LIMIT:?} after vmm.shutdown (Kata would SIGKILL it)"
    );
    let done = zvmm.finish(Duration::from_secs(1));
    assert_eq!(done.code(), 0, "{done:#?}");
    assert!(!socket.exists(), "API socket left behind");
    assert!(
        done.stderr.contains("--seccomp false recorded"),
        "{done:#?}"
    );

    println!("Kata transcript:");
    for exchange in &log {
        println!("  {}", exchange.line());
    }
    println!(
        "  vsock {}: CONNECT {AGENT_PORT} -> OK {} (attempt {attempts}), {} bytes sent, {} answered, both checked",
        vsock_socket.display(),
        agent.host_port,
        sent.len(),
        answer.len()
    );
    let create_index = log.iter().position(|e| e.request == create).unwrap();
    let problems = check_answers(&log, &[(create_index, "VmConfig")]);
    assert!(
        problems.is_empty(),
        "answers off the spec:\n{}",
        problems.join("\n")
    );
}

/// What Kata's agent client does after boot: `CONNECT 1024` on the vsock
/// socket until a line starting `OK` comes (zvmm closes the stream when
/// the guest's driver is not up yet). Returns the connection and the
/// attempts it took.
fn connect_agent(socket: &std::path::Path, zvmm: &Running) -> (HostConn, u32) {
    let deadline = Instant::now() + AGENT_LIMIT;
    let mut attempts = 0;
    loop {
        attempts += 1;
        match handshake(socket, AGENT_PORT, Duration::from_secs(10)) {
            Ok(conn) => return (conn, attempts),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(why) => panic!(
                "no agent on vsock port {AGENT_PORT} after {attempts} attempts ({why}):\n{}\n{}",
                zvmm.stdout.text(),
                zvmm.stderr.text()
            ),
        }
    }
}

fn is_vcpu_name(name: &str) -> bool {
    name.strip_prefix("vcpu")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// `vm.add-vsock` before boot with the body Kata's generated client
/// writes (`NewVsockConfig`, every default): 204 and the device in the
/// configuration; a second one refused (cloud-hypervisor allows one);
/// the boot builds it (its socket appears); after boot the answer every
/// `vm.add-*` gives then.
#[test]
fn vm_add_vsock_before_boot_joins_the_config() {
    let dir = scratch_dir("ch-add-vsock");
    let bin_dir = cloud_hypervisor_link(&dir);
    let socket = dir.join("api.sock");
    let mut command = Command::new(bin_dir.join("cloud-hypervisor"));
    command.arg("--api-socket").arg(&socket);
    let mut zvmm = Running::spawn(command);
    let mut log = vec![wait_for_ping(&socket, Duration::from_secs(10))];
    let mut client = KeepAlive::connect(&socket).unwrap();
    let create = json!({
        "payload": {"kernel": probe_elf(Flavour::Pvh), "cmdline": "console=ttyS0 probe.action=hang"},
        "memory": {"size": MEMORY},
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off"},
    })
    .to_string();
    let created = call(&mut log, &mut client, "PUT", "vm.create", &create, &[]);
    assert_eq!(created.status, 204, "{}", created.line());
    let vsock_socket = dir.join("agent.sock");
    let vsock = |cid: u32, path: &std::path::Path| {
        json!({"cid": cid, "socket": path, "iommu": false, "pci_segment": 0, "id": "agent"})
            .to_string()
    };
    let body = vsock(3, &vsock_socket);
    let added = call(&mut log, &mut client, "PUT", "vm.add-vsock", &body, &[]);
    assert_eq!(added.status, 204, "{}", added.line());
    let add_index = log.len() - 1;
    let second = vsock(4, &dir.join("other.sock"));
    let again = call(&mut log, &mut client, "PUT", "vm.add-vsock", &second, &[]);
    assert_eq!(again.status, 500, "{}", again.line());
    let message = again.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(message.contains("already has a vsock"), "{message}");
    let info = call(&mut log, &mut client, "GET", "vm.info", "", &[]).json();
    let recorded = &info["config"]["vsock"];
    assert_eq!(recorded["cid"], 3, "{info}");
    assert_eq!(recorded["socket"], json!(vsock_socket), "{info}");
    assert_eq!(recorded["id"], "agent", "{info}");
    assert!(!vsock_socket.exists(), "bound before boot");

    let booted = call(&mut log, &mut client, "PUT", "vm.boot", "", &[]);
    assert_eq!(booted.status, 204, "{}", booted.line());
    assert!(
        zvmm_tests::vsock::wait_for_socket(&vsock_socket, BOOT_LIMIT),
        "the added vsock was not built: {}",
        zvmm.stderr.text()
    );
    let late_disk = json!({"path": dir.join("late.img")}).to_string();
    let disk = call(&mut log, &mut client, "PUT", "vm.add-disk", &late_disk, &[]);
    let late = vsock(5, &dir.join("late.sock"));
    let after = call(&mut log, &mut client, "PUT", "vm.add-vsock", &late, &[]);
    assert_eq!(after.status, 500, "no hotplug after boot: {}", after.line());
    assert_eq!(
        after.json(),
        disk.json(),
        "{} / {}",
        after.line(),
        disk.line()
    );

    let stop = call(&mut log, &mut client, "PUT", "vmm.shutdown", "", &[]);
    assert_eq!(stop.status, 204, "{}", stop.line());
    assert!(
        wait_until_exited(&mut zvmm, KATA_STOP_LIMIT),
        "still running {KATA_STOP_LIMIT:?} after vmm.shutdown"
    );
    assert_eq!(zvmm.finish(Duration::from_secs(1)).code(), 0);
    assert!(!vsock_socket.exists(), "vsock socket left behind");
    println!("vm.add-vsock transcript:");
    for exchange in &log {
        println!("  {}", exchange.line());
    }
    let problems = check_answers(&log, &[(add_index, "VsockConfig")]);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// HTTP/1.1 keep-alive with several requests on one connection, a
/// malformed request answered 400 in JSON and the connection closed, and
/// descriptors sent with a request that takes none refused.
#[test]
fn keep_alive_malformed_requests_and_stray_fds() {
    let dir = scratch_dir("ch-http");
    let bin_dir = cloud_hypervisor_link(&dir);
    let socket = dir.join("api.sock");
    let mut command = Command::new(bin_dir.join("cloud-hypervisor"));
    command.arg("--api-socket").arg(&socket);
    let zvmm = Running::spawn(command);
    let mut log = vec![wait_for_ping(&socket, Duration::from_secs(10))];
    let mut client = KeepAlive::connect(&socket).unwrap();
    for _ in 0..5 {
        let ping = call(&mut log, &mut client, "GET", "vmm.ping", "", &[]);
        assert_eq!(ping.status, 200);
    }
    let info = call(&mut log, &mut client, "GET", "vm.info", "", &[]);
    assert_eq!(info.status, 500, "{}", info.line());
    let resize = call(
        &mut log,
        &mut client,
        "PUT",
        "vm.resize",
        r#"{"desired_vcpus":2}"#,
        &[],
    );
    assert_eq!(resize.status, 501, "{}", resize.line());
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let stray = call(
        &mut log,
        &mut client,
        "PUT",
        "vm.boot",
        "",
        &[a.as_raw_fd()],
    );
    assert_eq!(stray.status, 400, "{}", stray.line());
    let ping = call(&mut log, &mut client, "GET", "vmm.ping", "", &[]);
    assert_eq!(ping.status, 200, "the connection survives answered errors");

    use std::io::{Read, Write};
    let mut raw = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    raw.write_all(b"GARBAGE\r\n\r\n").unwrap();
    let mut answer = String::new();
    raw.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(
        answer.contains("Content-Type: application/json"),
        "{answer}"
    );
    let mut half = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    half.write_all(b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 10\r\n\r\n{")
        .unwrap();
    drop(half);
    let ping = call(&mut log, &mut client, "GET", "vmm.ping", "", &[]);
    assert_eq!(ping.status, 200, "still serving after a truncated request");
    let problems = check_answers(&log, &[]);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    zvmm.signal(libc::SIGTERM);
    let done = zvmm.finish(Duration::from_secs(5));
    assert_eq!(done.code(), 143, "{done:#?}");
}
