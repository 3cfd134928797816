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

/// An agent with a pool of one busybox guest that runs `warmup` first.
fn warm_pool_agent(warmup: &str) -> TestAgent {
    TestAgent::start_with(AgentOptions {
        extra: vec![
            "--pool".into(),
            "busybox=1".into(),
            "--pool-warmup".into(),
            format!("busybox={warmup}"),
        ],
        ..Default::default()
    })
}

/// A pool's warm-up runs from the image, before the member is ready, in a
/// scratch root: what it writes, the device nodes it would make and the
/// processes it leaves never reach the container.
#[test]
fn a_warm_up_runs_from_the_image_and_leaves_the_container_nothing() {
    // Exits 0 only if it could write its root and could not write /dev.
    let warmup = "sh -c 'echo warm > /warm-marker || exit 3; \
                  touch /dev/warm-node 2>/dev/null && exit 4; \
                  sleep 600 & echo out; echo err >&2'";
    let a = warm_pool_agent(warmup);
    let pools = wait_ready(&a, 1);
    assert!(pools.contains("sh -c 'echo warm > /warm-marker"), "{pools}");
    let id = a.detach(&[
        "busybox",
        "--",
        "sh",
        "-c",
        "test -e /warm-marker && echo marker; test -e /dev/warm-node && echo node; \
         cat /proc/[0-9]*/comm | grep -cx sleep; mount | grep -c scratch; echo end",
    ]);
    assert_eq!(stdout(&a.run(&["wait", &id])).trim(), "0");
    assert_eq!(a.inspect(&id)["StartMode"], "pool");
    // No marker, no node, no sleep, no scratch mount.
    assert_eq!(stdout(&a.run(&["logs", &id])), "0\n0\nend\n");
    let console = std::fs::read_to_string(a.vm_dir(&id).join("console.log")).unwrap();
    let line = console
        .lines()
        .find(|l| l.contains("warm-up: argv"))
        .unwrap_or_else(|| panic!("no warm-up line:\n{console}"));
    // "out\n" and "err\n" discarded; the `sleep` it left killed and reaped.
    assert!(
        line.contains("exited with code 0; 8 bytes of output discarded, 1 processes reaped"),
        "{line}"
    );
}

/// A warm-up that never ends is killed after its time (10 s), and one that
/// cannot start is logged: either way the member is handed out and works.
#[test]
fn a_warm_up_that_hangs_or_fails_still_leaves_a_working_member() {
    for (warmup, said) in [
        ("sleep 600", "ran over 10s and was killed"),
        (
            "/no/such/program",
            "failed (starts are unaffected, only slower)",
        ),
    ] {
        let a = warm_pool_agent(warmup);
        wait_ready(&a, 1);
        let id = a.detach(&["busybox", "--", "sh", "-c", "pidof sleep; echo ok"]);
        assert_eq!(stdout(&a.run(&["wait", &id])).trim(), "0");
        assert_eq!(a.inspect(&id)["StartMode"], "pool");
        assert_eq!(stdout(&a.run(&["logs", &id])), "ok\n", "{warmup}");
        let console = std::fs::read_to_string(a.vm_dir(&id).join("console.log")).unwrap();
        assert!(console.contains(said), "{warmup}:\n{console}");
    }
}

/// `--pool-warmup` is refused for an image without a pool, twice for one
/// pool, and without a command.
#[test]
fn bad_warm_ups_are_refused_at_startup() {
    let vmletd = vmlet_tests::bin("vmletd");
    for (args, why) in [
        (&["--pool-warmup", "busybox=true"][..], "has no --pool"),
        (
            &[
                "--pool",
                "busybox=1",
                "--pool-warmup",
                "busybox=true",
                "--pool-warmup",
                "busybox=false",
            ][..],
            "twice",
        ),
        (
            &["--pool", "busybox=1", "--pool-warmup", "busybox= "][..],
            "has no command",
        ),
        (
            &["--pool", "busybox=1", "--pool-warmup", "busybox='true"][..],
            "missing closing quote",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let o = std::process::Command::new(&vmletd)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--socket")
            .arg(dir.path().join("api.sock"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(why), "{args:?}: {}", stderr(&o));
    }
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
