//! Template clones: a start restores a snapshot of a booted guest instead of
//! booting one. Clones never share a connection, a random seed or a clock;
//! a snapshot of an image that changed, or one that fails to restore, is
//! never used again, and the start boots cold instead.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vmlet_tests::{stderr, stdout, AgentOptions, TestAgent};

/// An agent with a busybox template, ready (the harness waits for it).
fn template_agent(env: &[(&str, &str)]) -> TestAgent {
    let mut extra: Vec<String> = AgentOptions::default().extra;
    if !extra.iter().any(|x| x == "--template") {
        extra.extend(["--template".into(), "busybox".into()]);
    }
    TestAgent::start_with(AgentOptions {
        extra,
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    })
}

fn templates(a: &TestAgent) -> serde_json::Value {
    let o = a.run(&["template", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).expect("template --json")
}

fn qemu_cmdline(pid: u64) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .unwrap_or_default()
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn clones_share_no_connection_seed_or_clock() {
    let a = template_agent(&[]);
    // Let the snapshot's clock fall behind, so a clone that kept it shows.
    std::thread::sleep(Duration::from_secs(6));

    let script = "cat /proc/sys/kernel/random/uuid; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s; sleep 600";
    let ids: Vec<String> = (0..2)
        .map(|_| a.detach(&["busybox", "--", "sh", "-c", script]))
        .collect();
    let mut seen = Vec::new();
    for id in &ids {
        let info = a.inspect(id);
        assert_eq!(info["StartMode"], "template", "{info}");
        // No kernel boot in the start: the guest woke, it did not boot.
        let phases = &info["PhasesMs"];
        let booted = phases["guest-booted"].as_f64().unwrap();
        assert!(
            booted < 1500.0,
            "a clone took {booted} ms to wake: {phases}"
        );

        // Its QEMU: the template's memory mapped privately, its own serial
        // socket in its own directory, no vsock device to share.
        let pid = info["VmmPid"].as_u64().expect("a VMM pid");
        let cmd = qemu_cmdline(pid);
        let dir = a.vm_dir(id);
        assert!(cmd.contains("share=off"), "{cmd}");
        assert!(cmd.contains("-incoming defer"), "{cmd}");
        // The serial link's listening socket: inherited at fd 105, and it
        // is the one bound at this VM's own serial.sock.
        assert!(cmd.contains("socket,id=link0,fd=105"), "{cmd}");
        let own = dir.join("serial.sock");
        let inode = std::fs::read_link(format!("/proc/{pid}/fd/105"))
            .expect("QEMU's fd 105")
            .to_string_lossy()
            .trim_start_matches("socket:[")
            .trim_end_matches(']')
            .to_string();
        let unix = std::fs::read_to_string("/proc/net/unix").unwrap();
        assert!(
            unix.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() >= 8 && f[6] == inode && f[7] == own.to_string_lossy()
            }),
            "QEMU's fd 105 (socket {inode}) is not bound at {}",
            own.display()
        );
        assert!(!cmd.contains("vhost-user-vsock"), "{cmd}");

        // Output: uuid, 16 random bytes, the guest's clock.
        let deadline = Instant::now() + Duration::from_secs(60);
        let lines = loop {
            let out = stdout(&a.run(&["logs", id]));
            let lines: Vec<String> = out.lines().map(str::to_string).collect();
            if lines.len() >= 3 {
                break lines;
            }
            assert!(Instant::now() < deadline, "no output from {id}: {out:?}");
            std::thread::sleep(Duration::from_millis(100));
        };
        let guest_now: i64 = lines[2].trim().parse().expect("date +%s");
        assert!(
            (guest_now - now_s()).abs() <= 3,
            "the clone's clock is {guest_now}, the host's {}",
            now_s()
        );
        seen.push((info["Cid"].clone(), lines[0].clone(), lines[1].clone()));
    }
    let (c0, u0, r0) = &seen[0];
    let (c1, u1, r1) = &seen[1];
    assert_ne!(c0, c1, "two clones share a CID");
    assert_ne!(u0, u1, "two clones drew the same uuid");
    assert_ne!(r0, r1, "two clones read the same random bytes");
    assert_eq!(r0.len(), 32, "{r0}");

    let t = templates(&a);
    assert_eq!(t[0]["clones"], 2, "{t}");
    assert!(t[0]["state_bytes"].as_u64().unwrap() < 1 << 20, "{t}");

    // Stop and rm work on clones as on any VM, leaving nothing behind.
    for id in &ids {
        let o = a.run(&["rm", "-f", id]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        a.assert_no_processes(id);
    }
    a.assert_no_container_processes();
}

#[test]
fn a_snapshot_that_fails_to_restore_is_dropped_and_the_start_boots_cold() {
    // The first snapshot is damaged on purpose; the rebuilt one is not.
    let a = template_agent(&[("VMLET_TEST_CORRUPT_TEMPLATE", "1")]);
    let o = a.run(&["run", "--rm", "busybox", "--", "echo", "still runs"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "still runs\n");
    let t = templates(&a);
    assert_eq!(t[0]["failures"], 1, "{t}");
    let err = t[0]["last_error"].as_str().unwrap_or_default();
    assert!(err.contains("restore failed"), "{t}");

    // The template is rebuilt, and the next start is a clone again.
    let deadline = Instant::now() + Duration::from_secs(180);
    while !(templates(&a)[0]["builds"] == 2 && templates(&a)[0]["status"] == "ready") {
        assert!(Instant::now() < deadline, "not rebuilt: {}", templates(&a));
        std::thread::sleep(Duration::from_millis(200));
    }
    let id = a.detach(&["busybox", "--", "echo", "cloned"]);
    a.wait_logs(&id, "cloned\n");
    assert_eq!(a.inspect(&id)["StartMode"], "template");
    let o = a.run(&["rm", "-f", &id]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    a.assert_no_container_processes();
}

#[test]
fn a_template_of_a_removed_image_is_never_used() {
    let a = template_agent(&[]);
    // Created while the image exists; its start comes after the image is
    // gone (the VM keeps its layers, the template does not survive).
    let id = stdout(&a.run(&["create", "busybox", "--", "echo", "after rm"]))
        .trim()
        .to_string();
    let o = a.run(&["image", "rm", "-f", "busybox"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let deadline = Instant::now() + Duration::from_secs(30);
    while templates(&a)[0]["status"] != "waiting" {
        assert!(Instant::now() < deadline, "kept: {}", templates(&a));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(templates(&a)[0]["image_id"].is_null());
    let o = a.run(&["start", &id]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = a.run(&["wait", &id]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&a.run(&["logs", &id])), "after rm\n");
    assert_eq!(a.inspect(&id)["StartMode"], "cold");
    let o = a.run(&["create", "busybox", "--", "true"]);
    assert_ne!(o.status.code(), Some(0));
}

#[test]
fn a_stopping_agent_leaves_no_template_build_running() {
    // `--template=busybox` in one argument: the harness does not wait for
    // the template, so the agent is stopped while its guest boots.
    let mut a = TestAgent::start_with(AgentOptions {
        extra: vec!["--template=busybox".into()],
        ..Default::default()
    });
    let dir = a.state_dir().join("templates");
    let deadline = Instant::now() + Duration::from_secs(60);
    while TestAgent::processes_mentioning(&dir).is_empty() {
        assert!(
            Instant::now() < deadline,
            "no template VM started: {}",
            templates(&a)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    a.terminate();
    vmlet_tests::assert_no_processes_under(&dir, "the template build", &String::new);
}
