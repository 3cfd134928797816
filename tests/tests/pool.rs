//! Warm pools: a start takes a guest that already booted; the pool refills;
//! a VM is never reused; pool guests never share a CID.

use std::time::{Duration, Instant};

use vmlet_tests::{stderr, stdout, AgentOptions, TestAgent};

/// Waits (bounded) until the pool reports `n` ready members.
fn wait_ready(a: &TestAgent, n: u32) -> String {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let out = stdout(&a.run(&["pool"]));
        let ready = out
            .lines()
            .nth(1)
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|r| r.parse::<u32>().ok());
        if ready == Some(n) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "pool never had {n} ready:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn starts_are_hand_offs_and_the_pool_refills() {
    let a = TestAgent::start_with(AgentOptions {
        extra: vec!["--pool".into(), "busybox=2".into()],
        ..Default::default()
    });
    wait_ready(&a, 2);

    // Two pool starts at once: each its own guest, with its own CID.
    let ids: Vec<String> = (0..2)
        .map(|i| {
            let o = a.run(&[
                "run",
                "-d",
                "busybox",
                "--",
                "sh",
                "-c",
                // No process of the rehearsal is left (see below).
                &format!(
                    "echo pooled {i}; grep -l VMLET_TETHER_REHEARSAL /proc/[0-9]*/environ; \
                     echo end; sleep 1000"
                ),
            ]);
            assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
            stdout(&o).trim().to_string()
        })
        .collect();
    let infos: Vec<_> = ids.iter().map(|id| a.inspect(id)).collect();
    for (i, info) in infos.iter().enumerate() {
        assert_eq!(info["StartMode"], "pool", "{info}");
        // No boot in the start: the guest said hello before it.
        let phases = &info["PhasesMs"];
        assert!(phases["guest-booted"].as_f64().unwrap() < 50.0, "{phases}");
        assert!(phases["process-started"].as_f64().is_some(), "{phases}");
        a.wait_logs(&ids[i], &format!("pooled {i}\nend\n"));
        // The member rehearsed a whole start, a session with a host on the
        // guest's vsock loopback, before it was handed out (and the
        // container above found none of its processes left).
        let console = std::fs::read_to_string(a.vm_dir(&ids[i]).join("console.log")).unwrap();
        assert!(console.contains("rehearsed a start in"), "{console}");
        assert!(
            console.contains("rehearsal: exit acknowledged"),
            "{console}"
        );
    }
    assert_ne!(infos[0]["Cid"], infos[1]["Cid"]);
    assert_ne!(infos[0]["VmmPid"], infos[1]["VmmPid"]);

    // The pool refills in the background with new guests.
    let out = wait_ready(&a, 2);
    assert!(
        out.lines().nth(1).unwrap().split_whitespace().nth(5) == Some("2"),
        "{out}"
    );

    // A VM is never reused: removing it ends its guest for good.
    for id in &ids {
        assert_eq!(a.run(&["rm", "-f", id]).status.code(), Some(0));
        a.assert_no_processes(id);
    }
    // A create the pool does not match (other memory size) boots cold.
    let id = a.detach(&["--memory", "192", "busybox", "--", "echo", "cold"]);
    assert_eq!(stdout(&a.run(&["wait", &id])).trim(), "0");
    assert_eq!(a.inspect(&id)["StartMode"], "cold");
    assert_eq!(stdout(&a.run(&["logs", &id])), "cold\n");
}

#[test]
fn pool_members_die_with_a_stopped_agent_and_are_not_adopted() {
    let mut a = TestAgent::start_with(AgentOptions {
        extra: vec!["--pool".into(), "busybox=1".into()],
        ..Default::default()
    });
    wait_ready(&a, 1);
    // A crash leaves the member running; the next agent ends it instead of
    // adopting it (it is no container), then boots a fresh one.
    a.kill9();
    let vms = a.state_dir().join("vms");
    let before: Vec<_> = std::fs::read_dir(&vms)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(before.len(), 1);
    a.restart();
    assert_eq!(
        stdout(&a.run(&["ps", "-a", "-q"])),
        "",
        "a pool member was listed"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !TestAgent::processes_mentioning(&before[0]).is_empty() {
        assert!(Instant::now() < deadline, "the old pool member survived");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!before[0].exists());
    wait_ready(&a, 1);
}

#[test]
fn a_stopping_agent_ends_its_pool_members_but_not_its_containers() {
    let mut a = TestAgent::start_with(AgentOptions {
        extra: vec!["--pool".into(), "busybox=1".into()],
        ..Default::default()
    });
    wait_ready(&a, 1);
    let id = a.detach(&["busybox", "--", "sleep", "1000"]);
    // Taking the member started a refill; stop while it may be booting.
    a.terminate();
    let vms = a.state_dir().join("vms");
    let members: Vec<_> = std::fs::read_dir(&vms)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| !p.ends_with(&id))
        .collect();
    assert!(members.is_empty(), "pool members left: {members:?}");
    for p in std::fs::read_dir(&vms).unwrap().flatten() {
        if !p.path().ends_with(&id) {
            assert!(TestAgent::processes_mentioning(&p.path()).is_empty());
        }
    }
    // The container keeps running without the agent.
    assert!(!TestAgent::processes_mentioning(&a.vm_dir(&id)).is_empty());
}
