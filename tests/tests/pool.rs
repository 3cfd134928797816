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

/// `vmlet create`, whose id is printed.
fn create(a: &TestAgent, args: &[&str]) -> String {
    let o = a.run(&[&["create"], args].concat());
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    stdout(&o).trim().to_string()
}

/// Pids of the VMMs and backends of every VM of `a`, pool members
/// included.
fn guest_processes(a: &TestAgent) -> Vec<i32> {
    TestAgent::processes_mentioning(&a.state_dir().join("vms"))
}

/// Asserts that `vmlet info` prints each of `lines`.
fn info_says(a: &TestAgent, lines: &[&str]) {
    let info = stdout(&a.run(&["info"]));
    for l in lines {
        assert!(info.contains(l), "no {l:?} in:\n{info}");
    }
}

#[test]
fn created_vms_holding_pool_guests_count_against_the_memory_limit() {
    // Room for three guests of 256 MiB.
    let a = TestAgent::start_with(AgentOptions {
        extra: vec![
            "--pool".into(),
            "busybox=1".into(),
            "--max-total-memory".into(),
            "768".into(),
            "--max-vms".into(),
            "7".into(),
            "--pool-refill".into(),
            "2".into(),
        ],
        ..Default::default()
    });
    wait_ready(&a, 1);
    // The limits, and the member's share of them, are visible.
    info_says(
        &a,
        &[
            "VMs: 0 of at most 7",
            "guest memory: 256 of at most 768 MiB",
            "at most 2 at once",
        ],
    );
    // Each create takes the booted member; the pool refills while the
    // guests it and the created VMs hold still fit.
    let first = create(&a, &["busybox", "--", "true"]);
    wait_ready(&a, 1);
    let second = create(&a, &["busybox", "--", "true"]);
    wait_ready(&a, 1);
    let third = create(&a, &["busybox", "--", "true"]);
    for id in [&first, &second, &third] {
        assert!(
            !TestAgent::processes_mentioning(&a.vm_dir(id)).is_empty(),
            "VM {id} holds no booted guest"
        );
    }
    // Three guests are the budget: the pool must not boot a fourth.
    std::thread::sleep(Duration::from_secs(8));
    let pool = stdout(&a.run(&["pool"]));
    info_says(
        &a,
        &[
            "VMs: 3 of at most 7",
            "guest memory: 768 of at most 768 MiB",
            "pool refills: 0 booting",
        ],
    );
    assert_eq!(
        pool.lines()
            .nth(1)
            .and_then(|l| l.split_whitespace().nth(2)),
        Some("0"),
        "{pool}"
    );
    let vms = std::fs::read_dir(a.state_dir().join("vms"))
        .unwrap()
        .count();
    assert_eq!(vms, 3, "a guest beyond the budget was booted:\n{pool}");
    // Removing one frees its guest and its share of the budget.
    assert_eq!(a.run(&["rm", &third]).status.code(), Some(0));
    a.assert_no_processes(&third);
    wait_ready(&a, 1);
    for id in [&first, &second] {
        assert_eq!(a.run(&["rm", id]).status.code(), Some(0));
    }
}

#[test]
fn a_pool_guest_is_ended_when_its_start_is_refused_or_its_vm_removed() {
    let a = TestAgent::start_with(AgentOptions {
        extra: vec![
            "--pool".into(),
            "busybox=1".into(),
            "--max-vms".into(),
            "1".into(),
        ],
        ..Default::default()
    });
    wait_ready(&a, 1);
    let base = a.fd_count();
    // Created from the member, then removed without a start: its guest
    // and everything the agent held for it go.
    for _ in 0..2 {
        let id = create(&a, &["busybox", "--", "true"]);
        assert_eq!(a.run(&["rm", &id]).status.code(), Some(0));
        a.assert_no_processes(&id);
        wait_ready(&a, 1);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while a.fd_count() > base {
        assert!(
            Instant::now() < deadline,
            "the agent holds {} descriptors, {base} before",
            a.fd_count()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The host's one VM runs; a start of another, taken from the
    // refilled pool, is refused and its guest ended.
    let running = a.detach(&["busybox", "--", "sleep", "1000"]);
    wait_ready(&a, 1);
    let refused = create(&a, &["busybox", "--", "true"]);
    let o = a.run(&["start", &refused]);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("limit of 1 VMs"), "{}", stderr(&o));
    a.assert_no_processes(&refused);
    assert_eq!(a.run(&["rm", "-f", &running]).status.code(), Some(0));
    assert_eq!(a.run(&["rm", &refused]).status.code(), Some(0));
    assert!(guest_processes(&a).len() <= 2, "{:?}", guest_processes(&a));
}

#[test]
fn a_member_whose_vmm_dies_while_it_waits_is_never_handed_out() {
    let a = TestAgent::start_with(AgentOptions {
        extra: vec!["--pool".into(), "busybox=1".into()],
        ..Default::default()
    });
    wait_ready(&a, 1);
    // The member's QEMU dies while it waits in the pool.
    let qemu: Vec<i32> = guest_processes(&a)
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains("qemu-system"))
                .unwrap_or(false)
        })
        .collect();
    assert_eq!(qemu.len(), 1, "{qemu:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemu[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // It leaves the pool, counted as a failure...
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = stdout(&a.run(&["pool"]));
        let failures = out
            .lines()
            .nth(1)
            .and_then(|l| l.split_whitespace().nth(7))
            .map(str::to_owned);
        if failures.as_deref() == Some("1") {
            break;
        }
        assert!(Instant::now() < deadline, "no failure counted:\n{out}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // ...so the next start is never given the dead guest: it runs (from a
    // refilled member, or booted cold).
    let o = a.run(&["run", "--rm", "busybox", "--", "echo", "alive"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "alive\n");
    wait_ready(&a, 1);
}

#[test]
fn a_created_vm_holding_a_pool_guest_comes_back_exited_after_a_restart() {
    let mut a = TestAgent::start_with(AgentOptions {
        extra: vec!["--pool".into(), "busybox=1".into()],
        ..Default::default()
    });
    wait_ready(&a, 1);
    let id = create(&a, &["busybox", "--", "echo", "once"]);
    assert!(!TestAgent::processes_mentioning(&a.vm_dir(&id)).is_empty());
    // Whether or not its spec had gone out, the new agent cannot know: the
    // VM is ended, so its command can never run twice, and its guest goes.
    a.restart();
    a.assert_no_processes(&id);
    let info = a.inspect(&id);
    assert_eq!(info["State"], "exited", "{info}");
    let reason = info["Exit"]["Reason"].as_str().unwrap_or_default();
    assert!(reason.contains("warm-pool guest"), "{info}");
    let o = a.run(&["start", &id]);
    assert_ne!(o.status.code(), Some(0), "{}", stdout(&o));
    assert_eq!(a.run(&["rm", &id]).status.code(), Some(0));
}

#[test]
fn a_stopping_agent_leaves_no_booting_member_running() {
    let mut a = TestAgent::start_with(AgentOptions {
        // One argument: the harness does not wait for the pool to fill, so
        // the agent is stopped while its member's VMM starts.
        extra: vec!["--pool=busybox=1".into()],
        ..Default::default()
    });
    // Its QEMU has just been spawned: the start waits for QMP, and the
    // record does not name the QEMU yet.
    let qemu_up = || {
        guest_processes(&a).iter().any(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("qemu-system"))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !qemu_up() {
        assert!(Instant::now() < deadline, "no pool member started");
        std::thread::sleep(Duration::from_millis(5));
    }
    let t0 = Instant::now();
    a.terminate();
    let vms = a.state_dir().join("vms");
    vmlet_tests::assert_no_processes_under(&vms, "the booting pool member", &String::new);
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "stopping took {:?}",
        t0.elapsed()
    );
}
