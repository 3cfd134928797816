//! Detached containers: logs, attach, wait, ps, inspect, stop, kill, rm,
//! and a VMM killed from outside.

use std::time::{Duration, Instant};

use vmlet_tests::{stderr, stdout, wait_output, TestAgent};

#[test]
fn detached_logs_attach_wait_ps_inspect_rm() {
    let a = TestAgent::start();
    let id = a.detach(&[
        "--name",
        "ticker",
        "busybox",
        "--",
        "sh",
        "-c",
        "for i in 1 2 3 4 5; do echo line $i; sleep 1; done; echo bye >&2; exit 3",
    ]);
    assert_eq!(id.len(), 16, "{id:?}");

    // Two followers at once: `logs -f` and `attach`.
    let spawn = |args: &[&str]| {
        a.vmlet()
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let logs = spawn(&["logs", "-f", "ticker"]);
    let attach = spawn(&["attach", &id]);
    let ps = a.run(&["ps"]);
    assert!(
        stdout(&ps).contains(&id),
        "ps while running: {}",
        stdout(&ps)
    );

    let w = a.run(&["wait", &id]);
    assert_eq!(stdout(&w).trim(), "3");
    let logs = wait_output(logs, Duration::from_secs(60), "logs -f");
    let want: String = (1..=5).map(|i| format!("line {i}\n")).collect();
    assert_eq!(stdout(&logs), want);
    assert_eq!(stderr(&logs), "bye\n");
    let attach = wait_output(attach, Duration::from_secs(60), "attach");
    // The attach began at "now", so it sees a suffix of the same stream,
    // at least the last line, and ends with the container's exit code.
    let att = stdout(&attach);
    assert!(want.ends_with(&att) && att.contains("line 5"), "{att:?}");
    assert_eq!(attach.status.code(), Some(3));

    // After the exit: ps shows it only with -a; logs still has everything.
    assert!(!stdout(&a.run(&["ps"])).contains(&id));
    let psa = stdout(&a.run(&["ps", "-a"]));
    assert!(psa.contains(&id) && psa.contains("exited (3)"), "{psa}");
    assert_eq!(stdout(&a.run(&["logs", &id])), want);

    // inspect shows every phase of the start, in order.
    let info = a.inspect(&id);
    assert_eq!(info["State"], "exited");
    assert_eq!(info["Exit"]["Code"], 3);
    let phases = info["PhasesMs"].as_object().unwrap();
    let names = [
        "accepted",
        "admitted",
        "config-cloned",
        "disks-attached",
        "vmm-spawned",
        "guest-booted",
        "process-started",
        "first-output",
        "exited",
    ];
    let mut last = 0.0;
    for n in names {
        let t = phases
            .get(n)
            .and_then(|v| v.as_f64())
            .unwrap_or_else(|| panic!("phase {n} missing: {phases:?}"));
        assert!(t >= last, "phase {n} at {t} before {last}");
        last = t;
    }
    assert!(info["GuestBoot"]["HelloMs"].as_f64().unwrap() > 0.0);
    // The guest reports how it assembled the root when it did so in the
    // start; a pool member and a template's guest did it before.
    let root = &info["RootMs"];
    if info["StartMode"] != "cold" {
        assert!(root.is_null(), "{root}");
    } else {
        for step in ["Disks", "Layers", "Writable", "Dirs", "Overlay", "Inner"] {
            let ms = root[step]
                .as_f64()
                .unwrap_or_else(|| panic!("no {step}: {root}"));
            assert!(ms > 0.0, "{step}: {root}");
        }
    }

    // rm: no process, no file of it.
    let dir = a.vm_dir(&id);
    assert!(dir.exists());
    let o = a.run(&["rm", &id]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!dir.exists(), "{} still exists", dir.display());
    a.assert_no_processes(&id);
    let o = a.run(&["inspect", &id]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("not found"), "{}", stderr(&o));
}

#[test]
fn stop_sigterm_then_kill_after_timeout() {
    let a = TestAgent::start();
    // A process that ignores SIGTERM: stop must kill the VM after the
    // timeout and report it.
    let stubborn = a.detach(&[
        "busybox",
        "--",
        "sh",
        "-c",
        "trap '' TERM; echo ready; while true; do sleep 1; done",
    ]);
    // One that honours SIGTERM.
    let polite = a.detach(&["busybox", "--", "sleep", "1000"]);

    let t = Instant::now();
    let o = a.run(&["stop", "-t", "3", &polite]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(t.elapsed() < Duration::from_secs(30));
    assert_eq!(a.inspect(&polite)["Exit"]["Signal"], 15);

    let o = a.run(&["stop", "-t", "2", &stubborn]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let info = a.inspect(&stubborn);
    assert_eq!(info["State"], "exited");
    assert_eq!(info["Exit"]["Code"], 137, "{info}");
    a.assert_no_processes(&stubborn);
    a.assert_no_processes(&polite);
    assert_eq!(stdout(&a.run(&["logs", &stubborn])), "ready\n");
}

#[test]
fn kill_signal_and_vmm_killed_from_outside() {
    let a = TestAgent::start();
    let id = a.detach(&["busybox", "--", "sleep", "1000"]);
    let o = a.run(&["kill", "-s", "KILL", &id]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&a.run(&["wait", &id])).trim(), "137");

    let id = a.detach(&["busybox", "--", "sleep", "1000"]);
    let pid = a.inspect(&id)["VmmPid"]
        .as_i64()
        .expect("a running VM has a VMM pid");
    // QEMU runs confined by its seccomp sandbox (mode 2: filter).
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["Seccomp:", "2"]),
        "QEMU is not under seccomp:\n{status}"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let w = a.run(&["wait", &id]);
    assert_eq!(stdout(&w).trim(), "255");
    let info = a.inspect(&id);
    let reason = info["Exit"]["Reason"].as_str().unwrap();
    assert!(
        reason.contains("VMM") && reason.contains("SIGKILL"),
        "{reason}"
    );
    // Its vsock backend and sockets are gone too.
    a.assert_no_processes(&id);
    let socks = a.sockets_left(&id);
    assert!(socks.is_empty(), "sockets left: {socks:?}");
    assert_eq!(a.run(&["rm", &id]).status.code(), Some(0));
}

/// Writes up to `total` bytes into `stdin` from a thread, counting what the
/// pipe took; stops at the first error (the client has exited).
fn push_stdin(
    mut stdin: std::process::ChildStdin,
    total: usize,
) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let pushed = std::sync::Arc::new(AtomicUsize::new(0));
    let count = pushed.clone();
    std::thread::spawn(move || {
        let chunk = vec![b'x'; 64 << 10];
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk.len());
            if stdin.write_all(&chunk[..n]).is_err() {
                return;
            }
            left -= n;
            count.fetch_add(n, Ordering::Relaxed);
        }
    });
    pushed
}

/// Spawns `vmlet args…` with piped stdio and `total` bytes pushed into
/// its stdin.
fn spawn_pushing(
    a: &TestAgent,
    args: &[&str],
    total: usize,
) -> (
    std::process::Child,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::process::Stdio;
    let mut child = a
        .vmlet()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmlet");
    let pushed = push_stdin(child.stdin.take().expect("stdin"), total);
    (child, pushed)
}

/// More stdin than every buffer between the client and the process holds,
/// and a process that never reads it: what goes the other way (output and
/// its acknowledgements) and signals must still pass, as they would past a
/// full pipe on one host.
#[test]
fn output_and_signals_pass_stdin_the_process_does_not_read() {
    use std::sync::atomic::Ordering;
    const STDIN: usize = 24 << 20;
    let a = TestAgent::start();

    // Output beyond what the guest may hold unacknowledged (8 MiB), after
    // the stdin has backed up.
    let (child, _pushed) = spawn_pushing(
        &a,
        &[
            "run",
            "-i",
            "--name",
            "unread-out",
            "busybox",
            "--",
            "sh",
            "-c",
            "sleep 2; head -c 20000000 /dev/zero",
        ],
        STDIN,
    );
    let t = Instant::now();
    let o = wait_output(child, Duration::from_secs(180), "run -i with unread stdin");
    eprintln!("20 MB of output past unread stdin in {:?}", t.elapsed());
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(o.stdout.len(), 20_000_000, "{}", stderr(&o));
    assert!(o.stdout.iter().all(|&b| b == 0));
    // Not by redialling: the output's acknowledgements came through, and
    // the connection was never taken for dead.
    let id = a.inspect("unread-out")["Id"].as_str().unwrap().to_string();
    let console = std::fs::read_to_string(a.vm_dir(&id).join("console.log")).unwrap();
    assert!(
        !console.contains("taking the connection for dead"),
        "{console}"
    );
    assert_eq!(a.run(&["rm", &id]).status.code(), Some(0));

    // A signal, once the stdin is backed up all the way to the client.
    let (child, pushed) = spawn_pushing(
        &a,
        &[
            "run",
            "-i",
            "--rm",
            "--name",
            "unread-stdin",
            "busybox",
            "--",
            "sh",
            "-c",
            "trap 'echo got TERM; exit 7' TERM; echo ready; while true; do sleep 1; done",
        ],
        STDIN,
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    // (Not found until the client's create.)
    while !stdout(&a.run(&["inspect", "unread-stdin"])).contains("\"running\"") {
        assert!(Instant::now() < deadline, "never running");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut last = (usize::MAX, Instant::now());
    loop {
        let now = pushed.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(3) {
            break;
        }
        assert!(Instant::now() < deadline, "stdin never backed up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let stuck = pushed.load(Ordering::Relaxed);
    assert!(stuck < STDIN, "all {stuck} bytes of stdin were taken");
    eprintln!("stdin backed up after {stuck} bytes");
    let k = a.run(&["kill", "-s", "TERM", "unread-stdin"]);
    assert_eq!(k.status.code(), Some(0), "{}", stderr(&k));
    let o = wait_output(child, Duration::from_secs(60), "run -i killed");
    assert_eq!(stdout(&o), "ready\ngot TERM\n", "{}", stderr(&o));
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    a.assert_no_container_processes();
}

/// One client connection, two VMs: stdin that one VM's process does not
/// read, sent within the protocol's window in small chunks, holds up
/// neither the other VM's stdin nor a kill on the same connection.
#[test]
fn stdin_one_vm_does_not_read_holds_up_no_other_request_on_its_connection() {
    use vmlet_protocol::api::{AttachSpec, CreateSpec, Request, Response, STDIN_WINDOW};
    let a = TestAgent::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = vmlet_protocol::client::Client::connect(&a.socket)
            .await
            .expect("connect");
        let spec = |argv: &[&str]| CreateSpec {
            image: "busybox".into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            stdin_open: true,
            ..Default::default()
        };
        let attach = |vm: &str| {
            Request::Attach(AttachSpec {
                vm: vm.into(),
                stdin: true,
                stdout: true,
                stderr: true,
                replay: true,
            })
        };
        let deaf = c.create(spec(&["sleep", "1000"])).await.unwrap();
        let echo = c.create(spec(&["cat"])).await.unwrap();
        let sd = c.stream(attach(&deaf)).await.unwrap();
        let mut se = c.stream(attach(&echo)).await.unwrap();
        c.start(&deaf).await.unwrap();
        c.start(&echo).await.unwrap();
        let limit = Duration::from_secs(60);
        // The whole window, in 4 KiB chunks, without waiting for a count.
        let t = Instant::now();
        for _ in 0..STDIN_WINDOW / 4096 {
            tokio::time::timeout(limit, c.stdin(sd.id, vec![b'x'; 4096]))
                .await
                .expect("stdin within the window was held up")
                .unwrap();
        }
        eprintln!("{STDIN_WINDOW} bytes sent in {:?}", t.elapsed());
        tokio::time::timeout(limit, c.stdin(se.id, b"hello\n".to_vec()))
            .await
            .expect("the other VM's stdin was held up")
            .unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(limit, async {
            while got != b"hello\n" {
                match se.next().await {
                    Some(Response::Output { data, .. }) => got.extend_from_slice(&data),
                    Some(Response::StdinAck { .. }) => {}
                    other => panic!("the echo VM's stream said {other:?}"),
                }
            }
        })
        .await
        .expect("the other VM's stdin never arrived");
        tokio::time::timeout(limit, c.kill(&deaf, 9))
            .await
            .expect("the kill was held up")
            .unwrap();
        let exit = tokio::time::timeout(limit, c.wait(&deaf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(exit.code, 137, "{exit:?}");
        c.close_stdin(se.id).await.unwrap();
        let exit = tokio::time::timeout(limit, c.wait(&echo))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(exit.code, 0, "{exit:?}");
        drop(sd);
        c.remove(&deaf, true).await.unwrap();
        c.remove(&echo, true).await.unwrap();
    });
    a.assert_no_container_processes();
}
