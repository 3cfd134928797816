//! Crash-safe state: an agent killed at any phase of a start leaves a VM
//! that a new agent either can still start or has ended and cleaned up,
//! never a leaked process, socket or half-written record.

use vmlet_tests::{stderr, TestAgent};

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
