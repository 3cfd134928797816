//! Confinement of each VMM: QEMU and its vsock backend run as the
//! unprivileged VMM user, inside the VM's own cgroup with its memory, CPU
//! and task limits; an OOM kill ends only that VM and says why; nothing of
//! a VM's cgroup outlives it; adoption keeps it; leftovers go at startup.
//!
//! Needs the `vmlet-vmm` user (scripts/setup-guest.sh creates it) and a
//! usable cgroup hierarchy (v2 with its memory controller, or v1).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmlet_tests::{stderr, stdout, AgentOptions, TestAgent};

/// The VMM user's uid and primary gid.
fn vmm_user() -> (u32, u32) {
    let u = nix::unistd::User::from_name("vmlet-vmm")
        .expect("user database")
        .expect("no user vmlet-vmm: run scripts/setup-guest.sh");
    (u.uid.as_raw(), u.gid.as_raw())
}

/// `Uid:` or `Gid:` of /proc/PID/status: real, effective, saved, fs.
fn ids_of(pid: i32, key: &str) -> Vec<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} for {pid}"))
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect()
}

fn status_field(pid: i32, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The VM's QEMU and vsock backend, by pid.
fn vm_processes(a: &TestAgent, id: &str) -> (i32, i32) {
    let info = a.inspect(id);
    let qemu = info["VmmPid"].as_i64().expect("a VMM pid") as i32;
    let others: Vec<i32> = TestAgent::processes_mentioning(&a.vm_dir(id))
        .into_iter()
        .filter(|p| *p != qemu)
        .collect();
    assert_eq!(others.len(), 1, "one vsock backend, got {others:?}");
    (qemu, others[0])
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_string()
}

/// The cgroup directories `inspect` names, checked against the limits it
/// states and what the kernel holds in the files.
fn cgroup_of(info: &Value, memory_mib: u64, overhead_mib: u64, vcpus: u64) -> Vec<PathBuf> {
    let cg = &info["Confinement"]["Cgroup"];
    assert!(cg.is_object(), "no cgroup: {info}");
    let paths: Vec<PathBuf> = cg["Paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| PathBuf::from(p.as_str().unwrap()))
        .collect();
    let id = info["Id"].as_str().unwrap();
    for p in &paths {
        assert!(p.is_dir(), "{} is missing", p.display());
        assert_eq!(
            p.file_name().unwrap(),
            id,
            "a VM's cgroup is named by its id"
        );
    }
    let mem = (memory_mib + overhead_mib) << 20;
    let quota = vcpus * 100_000 + 25_000;
    assert_eq!(cg["MemoryMaxBytes"], mem, "{cg}");
    assert_eq!(cg["CpuQuotaUs"], quota, "{cg}");
    assert_eq!(cg["CpuPeriodUs"], 100_000, "{cg}");
    assert_eq!(cg["PidsMax"], 512, "{cg}");
    // What the kernel enforces, file by file.
    let find = |f: &str| -> PathBuf {
        paths
            .iter()
            .map(|p| p.join(f))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("no {f} in {paths:?}"))
    };
    match cg["Version"].as_str().unwrap() {
        "v2" => {
            assert_eq!(read(&find("memory.max")), mem.to_string());
            assert_eq!(read(&find("memory.swap.max")), "0");
            assert_eq!(read(&find("cpu.max")), format!("{quota} 100000"));
            assert_eq!(read(&find("pids.max")), "512");
        }
        "v1" => {
            assert_eq!(read(&find("memory.limit_in_bytes")), mem.to_string());
            let memsw = find("memory.memsw.limit_in_bytes");
            assert_eq!(read(&memsw), mem.to_string(), "no swap beyond the limit");
            assert_eq!(read(&find("cpu.cfs_quota_us")), quota.to_string());
            assert_eq!(read(&find("cpu.cfs_period_us")), "100000");
            assert_eq!(read(&find("pids.max")), "512");
        }
        v => panic!("cgroup version {v:?}"),
    }
    paths
}

/// Checks that `pid` runs as the VMM user, with no capabilities, in every
/// directory of `cgroup`.
fn assert_confined(pid: i32, cgroup: &[PathBuf], what: &str) {
    let (uid, gid) = vmm_user();
    assert_eq!(ids_of(pid, "Uid:"), [uid; 4], "{what} runs as vmlet-vmm");
    assert_eq!(
        ids_of(pid, "Gid:"),
        [gid; 4],
        "{what} has vmlet-vmm's group"
    );
    assert_eq!(status_field(pid, "CapEff:"), "0000000000000000", "{what}");
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for d in cgroup {
        let procs = read(&d.join("cgroup.procs"));
        assert!(
            procs.lines().any(|p| p == pid.to_string()),
            "{what} ({pid}) is not in {}: {procs:?}\n/proc/{pid}/cgroup:\n{own}",
            d.display()
        );
    }
    let id = cgroup[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        own.lines()
            .any(|l| l.contains("memory") && l.ends_with(&format!("/{id}")))
            || own
                .lines()
                .any(|l| l.starts_with("0::") && l.ends_with(&id)),
        "/proc/{pid}/cgroup:\n{own}"
    );
    // Every thread, not only the one that joined before exec (the agent
    // joins it through v1's per-thread `tasks`): QEMU's vCPU and I/O threads
    // come later and must inherit the cgroup.
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for tid in &tasks {
        let Ok(of_thread) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/cgroup"))
        else {
            continue; // the thread has ended meanwhile
        };
        assert_eq!(of_thread, own, "{what}'s thread {tid} of {tasks:?}");
    }
}

fn wait_gone(paths: &[PathBuf]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while paths.iter().any(|p| p.exists()) {
        assert!(
            Instant::now() < deadline,
            "cgroups left behind: {:?}",
            paths.iter().filter(|p| p.exists()).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn qemu_and_backend_run_unprivileged_in_the_vms_cgroup() {
    let a = TestAgent::start();
    let (uid, _) = vmm_user();

    // Stdin and stdout still work through a confined VMM.
    a.assert_stdin_reaches_the_container(b"from stdin\n");

    let id = a.detach(&[
        "--memory",
        "200",
        "busybox",
        "--",
        "sh",
        "-c",
        "echo up; sleep 1000",
    ]);
    a.wait_logs(&id, "up\n");
    let info = a.inspect(&id);
    let conf = &info["Confinement"];
    assert_eq!(conf["User"], "vmlet-vmm", "{conf}");
    assert_eq!(conf["Uid"], uid, "{conf}");
    assert!(conf["Note"].is_null(), "fully confined: {conf}");
    let cgroup = cgroup_of(&info, 200, 256, 1);
    let (qemu, backend) = vm_processes(&a, &id);
    assert_confined(qemu, &cgroup, "QEMU");
    assert_confined(backend, &cgroup, "vhost-device-vsock");
    // QEMU's seccomp sandbox is still on (it installs its filter itself,
    // unprivileged, with no_new_privs).
    assert_eq!(status_field(qemu, "Seccomp:"), "2");
    assert_eq!(status_field(qemu, "NoNewPrivs:"), "1");

    // What the VMM's user owns: its writable disk, console and vsock
    // directory; not the agent's record and log.
    use std::os::unix::fs::MetadataExt;
    let dir = a.vm_dir(&id);
    for f in ["rw.qcow2", "console.log", "vsock"] {
        let m = std::fs::metadata(dir.join(f)).unwrap();
        assert_eq!(m.uid(), uid, "{f} belongs to the VMM user");
        assert_eq!(m.mode() & 0o077, 0, "{f} is private: {:o}", m.mode());
    }
    for f in ["vm.json", "log"] {
        let m = std::fs::metadata(dir.join(f)).unwrap();
        assert_eq!(m.uid(), 0, "{f} stays the agent's");
        assert_eq!(m.mode() & 0o077, 0, "{f} is private: {:o}", m.mode());
    }

    // rm releases the processes, the sockets and the cgroup.
    let o = a.run(&["rm", "-f", &id]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    a.assert_no_processes(&id);
    wait_gone(&cgroup);
    assert!(!dir.exists());

    // A VM that ends by itself releases its cgroup without rm.
    let id = a.detach(&["busybox", "--", "sh", "-c", "sleep 3; echo bye"]);
    let paths = cgroup_of(&a.inspect(&id), 256, 256, 1);
    assert_eq!(stdout(&a.run(&["wait", &id])).trim(), "0");
    wait_gone(&paths);
    // Its record still says what it had.
    assert_eq!(
        a.inspect(&id)["Confinement"]["Cgroup"]["MemoryMaxBytes"],
        512u64 << 20
    );
    assert_eq!(a.run(&["rm", &id]).status.code(), Some(0));
}

#[test]
fn an_oom_kill_ends_only_that_vm_and_says_why() {
    // No room beyond the guest's memory: a guest that touches all of it
    // pushes QEMU (its own heap and translation cache on top) over the
    // limit. A quiet guest stays well below it.
    let a = TestAgent::start_with(AgentOptions {
        extra: vec!["--vmm-memory-overhead".into(), "0".into()],
        ..Default::default()
    });
    let quiet = a.detach(&[
        "--memory",
        "512",
        "busybox",
        "--",
        "sh",
        "-c",
        "echo quiet; sleep 1000",
    ]);
    a.wait_logs(&quiet, "quiet\n");

    // The guest fills its page cache, and so all of its memory.
    let o = a.run(&[
        "run",
        "--name",
        "hog",
        "--memory",
        "256",
        "busybox",
        "--",
        "sh",
        "-c",
        "echo filling; dd if=/dev/zero of=/fill bs=1M count=600; echo survived",
    ]);
    assert_eq!(o.status.code(), Some(137), "{}", stderr(&o));
    assert!(!stdout(&o).contains("survived"), "{}", stdout(&o));
    let info = a.inspect("hog");
    assert_eq!(info["Exit"]["Code"], 137, "{info}");
    let reason = info["Exit"]["Reason"].as_str().unwrap();
    assert!(
        reason.starts_with("out of memory") && reason.contains("OOM killer"),
        "{reason}"
    );
    assert!(reason.contains("256 MiB"), "{reason}");
    let paths: Vec<PathBuf> = info["Confinement"]["Cgroup"]["Paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| PathBuf::from(p.as_str().unwrap()))
        .collect();
    wait_gone(&paths);
    let hog_id = info["Id"].as_str().unwrap().to_string();
    a.assert_no_processes(&hog_id);

    // The other VM did not notice, and the agent starts new ones.
    assert_eq!(a.inspect(&quiet)["State"], "running");
    let o = a.run(&[
        "run", "--rm", "--memory", "512", "busybox", "--", "echo", "fine",
    ]);
    assert_eq!(stdout(&o), "fine\n", "{}", stderr(&o));
    assert!(
        a.daemon_log().contains("out of memory"),
        "the agent logs the exit"
    );
    for id in [&quiet, &hog_id] {
        assert_eq!(a.run(&["rm", "-f", id]).status.code(), Some(0));
        a.assert_no_processes(id);
    }
}

#[test]
fn adoption_keeps_the_cgroup_and_startup_removes_leftovers() {
    let mut a = TestAgent::start();
    let id = a.detach(&[
        "busybox",
        "--",
        "sh",
        "-c",
        "i=0; while true; do i=$((i+1)); echo $i; sleep 1; done",
    ]);
    a.wait_logs(&id, "1\n");
    let paths = cgroup_of(&a.inspect(&id), 256, 256, 1);
    let (qemu, backend) = vm_processes(&a, &id);

    // An earlier agent's leftover: an empty cgroup no VM owns.
    let stray: Vec<PathBuf> = paths
        .iter()
        .map(|p| p.parent().unwrap().join("0123456789abcdef"))
        .collect();
    for s in &stray {
        std::fs::create_dir(s).unwrap();
    }

    a.restart();
    wait_gone(&stray);
    // The adopted VM kept its cgroup, its processes in it.
    let info = a.inspect(&id);
    assert_eq!(info["State"], "running", "{info}");
    assert_eq!(cgroup_of(&info, 256, 256, 1), paths);
    assert_confined(qemu, &paths, "the adopted QEMU");
    assert_confined(backend, &paths, "the adopted backend");
    // Its guest reconnected through the listener bound again and opened to
    // the VMM user: output goes on.
    let before = stdout(&a.run(&["logs", &id])).lines().count();
    let deadline = Instant::now() + Duration::from_secs(60);
    while stdout(&a.run(&["logs", &id])).lines().count() < before + 2 {
        assert!(
            Instant::now() < deadline,
            "no output after the restart\n{}",
            a.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    assert_eq!(a.run(&["rm", "-f", &id]).status.code(), Some(0));
    a.assert_no_processes(&id);
    wait_gone(&paths);
}

#[test]
fn pool_members_are_confined_too() {
    let a = TestAgent::start_with(AgentOptions {
        extra: vec!["--pool".into(), "busybox=1".into()],
        ..Default::default()
    });
    // The member is a VM of its own before any create takes it.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let out = stdout(&a.run(&["pool"]));
        if out.lines().nth(1).and_then(|l| l.split_whitespace().nth(2)) == Some("1") {
            break;
        }
        assert!(Instant::now() < deadline, "the pool never filled:\n{out}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let id = a.detach(&["busybox", "--", "sh", "-c", "echo pooled; sleep 1000"]);
    let info = a.inspect(&id);
    assert_eq!(info["StartMode"], "pool", "{info}");
    let paths = cgroup_of(&info, 256, 256, 1);
    let (qemu, backend) = vm_processes(&a, &id);
    assert_confined(qemu, &paths, "a pooled QEMU");
    assert_confined(backend, &paths, "a pooled backend");
    a.wait_logs(&id, "pooled\n");
    assert_eq!(a.run(&["rm", "-f", &id]).status.code(), Some(0));
    a.assert_no_processes(&id);
    wait_gone(&paths);
}

#[test]
fn another_process_cannot_pose_as_a_guests_tether() {
    use std::os::unix::net::UnixStream;
    use vmlet_protocol::api::GuestBoot;
    use vmlet_protocol::guest::{GuestMessage, GUEST_PROTOCOL_VERSION};

    let a = TestAgent::start();
    // The tether's listener exists from before the VMM is spawned; dial it
    // first, from a process that is not the VM's VMM, and say hello.
    let run = a
        .vmlet()
        .args(["run", "-d", "busybox", "--", "echo", "real"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let vms = a.state_dir().join("vms");
    let deadline = Instant::now() + Duration::from_secs(60);
    let listener = loop {
        let found = std::fs::read_dir(&vms)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("vsock/vsock.sock_1024"))
            .find(|p| p.exists());
        if let Some(p) = found {
            break p;
        }
        assert!(Instant::now() < deadline, "no tether listener appeared");
        std::thread::sleep(Duration::from_millis(5));
    };
    // The file appears at bind(), a moment before listen(): until then a
    // connect is refused.
    let mut forged = loop {
        match UnixStream::connect(&listener) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                assert!(Instant::now() < deadline, "the listener never listened");
                std::thread::sleep(Duration::from_millis(1));
            }
            r => break r.expect("connect to the listener"),
        }
    };
    forged
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    vmlet_protocol::frame::write_frame(
        &mut forged,
        &GuestMessage::Hello {
            version: GUEST_PROTOCOL_VERSION,
            boot: GuestBoot::default(),
        },
    )
    .unwrap();
    // The agent closes it unanswered: no spec (argv, environment) for it.
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(&mut forged, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the forged tether was answered");

    // The real guest still boots and runs its command.
    let o = vmlet_tests::wait_output(run, Duration::from_secs(240), "vmlet run -d");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let id = stdout(&o).trim().to_string();
    a.wait_logs(&id, "real\n");
    assert!(
        a.daemon_log()
            .contains("refused a connection to the tether listener"),
        "{}",
        a.daemon_log()
    );
    assert_eq!(a.run(&["rm", "-f", &id]).status.code(), Some(0));
    a.assert_no_processes(&id);
}

/// Whether `argv` succeeds when run as `uid`:`uid` (std drops root's
/// supplementary groups when it changes the uid).
fn succeeds_as(uid: u32, argv: &[&str]) -> bool {
    use std::os::unix::process::CommandExt;
    std::process::Command::new(argv[0])
        .args(&argv[1..])
        .uid(uid)
        .gid(uid)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
}

#[test]
fn per_vm_uids_keep_vmms_apart() {
    const BASE: u32 = 2_000_000;
    let a = TestAgent::start_with(AgentOptions {
        extra: vec!["--vmm-uid-base".into(), BASE.to_string()],
        ..Default::default()
    });
    let ids: Vec<String> = (0..2)
        .map(|i| {
            a.detach(&[
                "busybox",
                "--",
                "sh",
                "-c",
                &format!("echo vm{i}; sleep 1000"),
            ])
        })
        .collect();
    let mut uids = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        a.wait_logs(id, &format!("vm{i}\n"));
        let info = a.inspect(id);
        let uid = BASE + info["Cid"].as_u64().unwrap() as u32;
        assert_eq!(info["Confinement"]["Uid"], uid, "{info}");
        assert_eq!(info["Confinement"]["Gid"], uid, "{info}");
        let (qemu, backend) = vm_processes(&a, id);
        for pid in [qemu, backend] {
            assert_eq!(ids_of(pid, "Uid:"), [uid; 4]);
            assert_eq!(ids_of(pid, "Gid:"), [uid; 4]);
        }
        use std::os::unix::fs::MetadataExt;
        let disk = a.vm_dir(id).join("rw.qcow2");
        assert_eq!(std::fs::metadata(&disk).unwrap().uid(), uid);
        uids.push(uid);
    }
    assert_ne!(uids[0], uids[1], "each VM has its own uid");
    // Each VM's uid reaches its own writable disk and vsock directory, and
    // not the other VM's.
    let path = |id: &str, f: &str| a.vm_dir(id).join(f).display().to_string();
    for (me, other) in [(0, 1), (1, 0)] {
        let (uid, mine, theirs) = (uids[me], &ids[me], &ids[other]);
        assert!(succeeds_as(uid, &["head", "-c1", &path(mine, "rw.qcow2")]));
        assert!(succeeds_as(uid, &["ls", &path(mine, "vsock")]));
        assert!(!succeeds_as(
            uid,
            &["head", "-c1", &path(theirs, "rw.qcow2")]
        ));
        assert!(!succeeds_as(uid, &["ls", &path(theirs, "vsock")]));
        assert!(!succeeds_as(uid, &["head", "-c1", &path(theirs, "log")]));
    }
    for id in &ids {
        assert_eq!(a.run(&["rm", "-f", id]).status.code(), Some(0));
        a.assert_no_processes(id);
    }
}
