//! Crash-safe state: an agent killed at any phase of a start leaves a VM
//! that a new agent either can still start or has ended and cleaned up,
//! never a leaked process, socket or half-written record.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use vmlet_tests::{stderr, AgentOptions, TestAgent};

const PHASES: [&str; 7] = [
    "accepted",
    "admitted",
    "config-cloned",
    "disks-attached",
    "vmm-spawned",
    "guest-booted",
    "process-started",
];

#[test]
fn an_agent_killed_at_each_phase_of_a_start_leaks_nothing() {
    let mut a = TestAgent::start();
    for phase in PHASES {
        a.restart_with_env(&[("VMLET_TEST_CRASH_AT", phase)]);
        let name = format!("crash-{phase}");
        let o = a.run(&[
            "run", "-d", "--name", &name, "busybox", "--", "sleep", "1000",
        ]);
        assert_eq!(
            o.status.code(),
            Some(125),
            "{phase}: the start survived the crash"
        );
        a.restart();
        let info = a.inspect(&name);
        let id = info["Id"].as_str().unwrap().to_string();
        eprintln!(
            "killed at {phase}: the VM is {} ({})",
            info["State"], info["Exit"]["Reason"]
        );
        a.assert_no_processes(&id);
        let sockets = a.sockets_left(&id);
        assert!(sockets.is_empty(), "{phase}: sockets left: {sockets:?}");
        match info["State"].as_str().unwrap() {
            // Nothing of the start reached the disk: the VM starts anew.
            "created" => {
                let o = a.run(&["start", &id]);
                assert_eq!(o.status.code(), Some(0), "{phase}: {}", stderr(&o));
            }
            "exited" => {
                let reason = info["Exit"]["Reason"].as_str().unwrap();
                assert!(reason.contains("agent restarted"), "{phase}: {reason}");
            }
            other => panic!("{phase}: the VM is {other} after the crash: {info}"),
        }
        let o = a.run(&["rm", "-f", &id]);
        assert_eq!(o.status.code(), Some(0), "{phase}: {}", stderr(&o));
        assert!(!a.vm_dir(&id).exists(), "{phase}: directory left");
        a.assert_no_processes(&id);
    }
    // And the agent still runs containers.
    let o = a.run(&["run", "--rm", "busybox", "--", "echo", "fine"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "fine\n");
}

#[test]
fn a_removal_during_a_start_ends_it_without_waiting_out_the_start() {
    // A VMM that takes 3 s to begin: a removal comes while the start waits
    // for it, before there is any VMM handle to kill.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let slow = dir.path().join("slow-qemu");
    std::fs::write(
        &slow,
        "#!/bin/sh\nsleep 3\nexec /usr/bin/qemu-system-x86_64 \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&slow, std::fs::Permissions::from_mode(0o755)).unwrap();
    let a = TestAgent::start_with(AgentOptions {
        env: vec![("VMLET_QEMU".into(), slow.to_string_lossy().into_owned())],
        ..Default::default()
    });
    let o = a.run(&["create", "busybox", "--", "sleep", "1000"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let mut start = a.vmlet().args(["start", &id]).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    let o = a.run(&["rm", "-f", &id]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // The start ends as soon as its VMM is up, rather than booting the
    // guest and running the container until the removal gives up waiting.
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "the removal took {:?}",
        t0.elapsed()
    );
    assert_ne!(start.wait().unwrap().code(), Some(0));
    a.assert_no_processes(&id);
    assert!(!a.vm_dir(&id).exists());
}
