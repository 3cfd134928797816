//! VMs outlive the agent: a vmletd killed with SIGKILL while guests stream
//! output is replaced by a new one that adopts every VM, and no byte of
//! output is lost or duplicated.

use std::time::Duration;

use vmlet_tests::{stderr, stdout, TestAgent};

/// A container that writes numbered lines to stdout and stderr for a few
/// seconds, long enough to span the agent's absence.
const STREAM: &str = "i=1; while [ $i -le 1500 ]; do echo \"out $i\"; echo \"err $i\" >&2; \
                      i=$((i+1)); usleep 10000; done; exit 4";

fn want(prefix: &str) -> String {
    (1..=1500).map(|i| format!("{prefix} {i}\n")).collect()
}

#[test]
fn killed_agent_is_replaced_and_every_byte_survives() {
    let mut a = TestAgent::start();
    // A VM whose VMM dies while the agent is away.
    let doomed = a.detach(&["busybox", "--", "sleep", "1000"]);
    let info = a.inspect(&doomed);
    let doomed_pid = info["VmmPid"].as_i64().unwrap() as i32;
    // Two that stream for longer than the agent is away.
    let ids: Vec<String> = (0..2)
        .map(|_| {
            let o = a.run(&["run", "-d", "busybox", "--", "sh", "-c", STREAM]);
            assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
            stdout(&o).trim().to_string()
        })
        .collect();

    // Let the streams get going, then crash the agent mid-stream.
    std::thread::sleep(Duration::from_millis(1500));
    a.kill9();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(doomed_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // The guests keep running (and buffering) while no agent is there.
    std::thread::sleep(Duration::from_secs(2));
    for id in &ids {
        assert!(
            !TestAgent::processes_mentioning(&a.vm_dir(id)).is_empty(),
            "VM {id} died with the agent"
        );
    }
    a.restart();

    for id in &ids {
        let w = a.run(&["wait", id]);
        assert_eq!(stdout(&w).trim(), "4", "{}", stderr(&w));
        let logs = a.run(&["logs", id]);
        assert!(
            stdout(&logs) == want("out"),
            "stdout of {id} differs after the restart"
        );
        assert!(
            stderr(&logs) == want("err"),
            "stderr of {id} differs after the restart"
        );
    }
    let info = a.inspect(&doomed);
    assert_eq!(info["State"], "exited", "{info}");
    assert!(
        info["Exit"]["Reason"]
            .as_str()
            .unwrap()
            .contains("while the agent was not running"),
        "{info}"
    );
    a.assert_no_processes(&doomed);

    // An adopted VM can be attached to, stopped and removed like any other.
    let id = a.detach(&["busybox", "--", "sh", "-c", "echo hi; sleep 1000"]);
    a.restart();
    // Whether "hi" reached the old agent or is resent to the new one, it
    // arrives exactly once.
    a.wait_logs(&id, "hi\n");
    let o = a.run(&["stop", "-t", "5", &id]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&a.run(&["wait", &id])).trim(), "143");
    for id in ids.iter().chain([&doomed, &id]) {
        assert_eq!(a.run(&["rm", id]).status.code(), Some(0));
        a.assert_no_processes(id);
        assert!(!a.vm_dir(id).exists());
    }
}

/// Waits (bounded) for the first `StdinAck` at or above `at_least` on an
/// attach stream; output on it is ignored.
async fn stdin_ack(s: &mut vmlet_protocol::client::ResponseStream, at_least: u64) -> u64 {
    use vmlet_protocol::api::Response;
    let wait = async {
        loop {
            match s.next().await {
                Some(Response::StdinAck { received }) if received >= at_least => return received,
                Some(Response::Error(e)) => panic!("attach failed: {e}"),
                Some(_) => {}
                None => panic!("the attach stream ended before the stdin acknowledgement"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), wait)
        .await
        .expect("a stdin acknowledgement within 120 s")
}

/// `mib` MiB of stdin (a different pattern per `seed`) and its sha256 as
/// `sha256sum` prints it.
fn stdin_payload(seed: u64, mib: u64) -> (Vec<u8>, String) {
    use sha2::{Digest, Sha256};
    let data: Vec<u8> = (0..mib << 20)
        .map(|i| (i.wrapping_mul(seed) >> 13) as u8)
        .collect();
    let sum = Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    (data, sum)
}

#[test]
fn stdin_in_flight_when_the_agent_dies_is_delivered_exactly_once() {
    use vmlet_protocol::api::{AttachSpec, CreateSpec, Request};
    const MIB: usize = 1 << 20;
    let (data, want) = stdin_payload(2_654_435_761, 3);
    let mut a = TestAgent::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let attach = |vm: &str| {
        Request::Attach(AttachSpec {
            vm: vm.to_string(),
            stdin: true,
            stdout: false,
            stderr: false,
            replay: false,
        })
    };
    // The first client sends 1 MiB and sees it taken, then sends another
    // MiB without waiting, and the agent dies with it in flight.
    let id = rt.block_on(async {
        let c = a.client().await;
        let id = c
            .create(CreateSpec {
                image: "busybox".into(),
                argv: vec!["sh".into(), "-c".into(), "sha256sum; echo done".into()],
                stdin_open: true,
                ..Default::default()
            })
            .await
            .unwrap();
        c.start(&id).await.unwrap();
        let mut s = c.stream(attach(&id)).await.unwrap();
        for chunk in data[..MIB].chunks(64 << 10) {
            c.stdin(s.id, chunk.to_vec()).await.unwrap();
        }
        stdin_ack(&mut s, MIB as u64).await;
        for chunk in data[MIB..2 * MIB].chunks(64 << 10) {
            c.stdin(s.id, chunk.to_vec()).await.unwrap();
        }
        id
    });
    // The agent stops reading first, so the guest's acknowledgements of
    // what it takes meanwhile are left unread when it dies: the vsock
    // backend then never tells the guest the connection is gone, and the
    // tether must find out by itself (the host's heartbeat stops).
    let pid = nix::unistd::Pid::from_raw(a.pid().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    a.kill9();
    a.restart();
    // A new client learns where the guest is and sends the rest from
    // there: every byte once, in order, whatever was in flight.
    rt.block_on(async {
        let c = a.client().await;
        let mut s = c.stream(attach(&id)).await.unwrap();
        let from = stdin_ack(&mut s, 0).await as usize;
        assert!(
            (MIB..=2 * MIB).contains(&from),
            "the guest took {from} bytes: not between what was acknowledged and what was sent"
        );
        for chunk in data[from..].chunks(64 << 10) {
            c.stdin(s.id, chunk.to_vec()).await.unwrap();
        }
        c.close_stdin(s.id).await.unwrap();
    });
    let w = a.run(&["wait", &id]);
    assert_eq!(stdout(&w).trim(), "0", "{}", stderr(&w));
    let logs = stdout(&a.run(&["logs", &id]));
    assert_eq!(logs, format!("{want}  -\ndone\n"));
    let o = a.run(&["rm", &id]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

/// The tether hangs up on a host that stops acknowledging (here: the agent
/// is frozen with SIGSTOP while the container writes and does not read its
/// stdin), with stdin the agent wrote still unread in the old connection.
/// The agent, alive all along, writes exactly what the tether did not
/// take again on the new connection, and the stdin close after it.
#[test]
fn stdin_in_a_connection_the_tether_drops_is_written_again() {
    use vmlet_protocol::api::{AttachSpec, CreateSpec, Request};
    let (data, want) = stdin_payload(2_246_822_519, 3);
    let a = TestAgent::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Output that keeps needing acks, and stdin read only after it.
    let script = "i=0; while [ $i -lt 40 ]; do echo tick; sleep 0.25; i=$((i+1)); done; sha256sum";
    let id = rt.block_on(async {
        let c = a.client().await;
        let id = c
            .create(CreateSpec {
                image: "busybox".into(),
                argv: vec!["sh".into(), "-c".into(), script.into()],
                stdin_open: true,
                ..Default::default()
            })
            .await
            .unwrap();
        c.start(&id).await.unwrap();
        let mut s = c
            .stream(Request::Attach(AttachSpec {
                vm: id.clone(),
                stdin: true,
                stdout: false,
                stderr: false,
                replay: false,
            }))
            .await
            .unwrap();
        for chunk in data.chunks(64 << 10) {
            c.stdin(s.id, chunk.to_vec()).await.unwrap();
        }
        c.close_stdin(s.id).await.unwrap();
        // The tether's queue and the pipe fill, and the count stops; the
        // agent has then written its window (1 MiB) past the count, which
        // waits in the connection, uncounted.
        stdin_ack(&mut s, 512 << 10).await;
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(1), s.next()).await {}
        id
    });
    let pid = nix::unistd::Pid::from_raw(a.pid().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    // The tether's stall patience is 4 s.
    std::thread::sleep(Duration::from_secs(7));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let w = a.run(&["wait", &id]);
    assert_eq!(stdout(&w).trim(), "0", "{}", stderr(&w));
    let logs = stdout(&a.run(&["logs", &id]));
    assert_eq!(logs, format!("{}{want}  -\n", "tick\n".repeat(40)));
    if a.inspect(&id)["StartMode"] == "template" {
        // A template clone links over a serial port, which reports a closed host;
        // the link never hangs up on a live one, so nothing was in a
        // dropped connection: the bytes above are all the test shows.
        let o = a.run(&["rm", &id]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        return;
    }
    let console = std::fs::read_to_string(a.vm_dir(&id).join("console.log")).unwrap_or_default();
    assert!(
        console.contains("taking the connection for dead"),
        "the tether never hung up, so nothing was shown:\n{console}"
    );
    assert!(
        a.daemon_log()
            .contains("writing the stdin the tether did not take again"),
        "no stdin was left in the dropped connection, so nothing was shown"
    );
    let o = a.run(&["rm", &id]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

/// A container's script: 60 lines on stdout and 60 on stderr, over 6 s.
const SIXTY_LINES: &str =
    "i=1; while [ $i -le 60 ]; do echo line $i; echo err $i >&2; sleep 0.1; i=$((i+1)); done";

/// Checks that a CLI that lost its connection (it said so) printed
/// [`SIXTY_LINES`]' output, each line once, in order.
fn assert_sixty_lines_once(o: &std::process::Output) {
    let want: String = (1..=60).map(|i| format!("line {i}\n")).collect();
    assert_eq!(stdout(o), want);
    let err = stderr(o);
    assert!(
        err.contains("reconnecting"),
        "the CLI never lost its connection: {err}"
    );
    let want_err: String = (1..=60).map(|i| format!("err {i}\n")).collect();
    assert_eq!(
        err.lines()
            .filter(|l| !l.starts_with("vmlet:"))
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
        want_err
    );
}

/// Runs `vmlet ARGS` against VM `id` while its container prints
/// [`SIXTY_LINES`], kills the agent with SIGKILL once the log holds line
/// 10, starts it again, and returns the CLI's output.
fn cli_across_a_restart(a: &mut TestAgent, id: &str, args: &[&str]) -> std::process::Output {
    let cli = a
        .vmlet()
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    a.wait_logs_containing(id, "line 10\n");
    a.kill9();
    std::thread::sleep(Duration::from_millis(500));
    a.restart();
    vmlet_tests::wait_output(cli, Duration::from_secs(120), &format!("vmlet {args:?}"))
}

/// The id of the agent's one VM, once `vmlet run` has created it.
fn only_vm(a: &TestAgent) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let ps = a.run(&["ps", "-q"]);
        if let Some(id) = stdout(&ps).lines().next() {
            return id.to_string();
        }
        assert!(std::time::Instant::now() < deadline, "no VM appeared");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `vmlet logs -f` outlives the agent it follows: the connection breaks
/// when vmletd is killed, the CLI reconnects to the new one and goes on,
/// and every line is printed exactly once.
#[test]
fn logs_follow_reconnects_across_a_restart_and_prints_every_byte_once() {
    let mut a = TestAgent::start();
    let id = a.detach(&["busybox", "--", "sh", "-c", SIXTY_LINES]);
    let o = cli_across_a_restart(&mut a, &id, &["logs", "-f", &id]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_sixty_lines_once(&o);
    assert_eq!(a.run(&["rm", &id]).status.code(), Some(0));
}

/// `vmlet run` (without `-i`) outlives the agent too: it attaches again,
/// prints every byte once and exits with the container's code.
#[test]
fn run_reattaches_across_a_restart_and_keeps_the_exit_code() {
    let mut a = TestAgent::start();
    let runner = a
        .vmlet()
        .args([
            "run",
            "busybox",
            "--",
            "sh",
            "-c",
            &format!("{SIXTY_LINES}; exit 7"),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let id = only_vm(&a);
    a.wait_logs_containing(&id, "line 10\n");
    a.kill9();
    std::thread::sleep(Duration::from_millis(500));
    a.restart();
    let o = vmlet_tests::wait_output(runner, Duration::from_secs(120), "vmlet run");
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    assert_sixty_lines_once(&o);
    assert_eq!(a.run(&["rm", &id]).status.code(), Some(0));
}

/// `vmlet run -i` carries its stdin across a restart: what the guest had
/// not taken when the agent died (sent while the container slept: more
/// than the guest's own stdin queue holds, so some is still in the agent)
/// is sent again from the guest's count, and the container gets every
/// byte once, in order.
#[test]
fn run_interactive_resends_unacknowledged_stdin_across_a_restart() {
    use std::io::Write as _;
    let (data, want) = stdin_payload(40_503, 12);
    let mut a = TestAgent::start();
    let mut runner = a
        .vmlet()
        .args([
            "run",
            "-i",
            "busybox",
            "--",
            "sh",
            "-c",
            "dd bs=4096 count=250 of=/a 2>/dev/null; echo taken; sleep 4; cat >> /a; sha256sum < /a; echo done",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = runner.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        input.write_all(&data).unwrap();
        // Dropping it closes the CLI's stdin.
    });
    let id = only_vm(&a);
    a.wait_logs_containing(&id, "taken\n");
    a.kill9();
    a.restart();
    let o = vmlet_tests::wait_output(runner, Duration::from_secs(180), "vmlet run -i");
    writer.join().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("reconnecting"),
        "the CLI never lost its connection: {err}"
    );
    assert_eq!(stdout(&o), format!("taken\n{want}  -\ndone\n"), "{err}");
    assert_eq!(a.run(&["rm", &id]).status.code(), Some(0));
}

/// What `vmlet inspect ID` says: the record, or `None` once the VM is gone
/// ("not found").
fn inspect_if_present(a: &TestAgent, id: &str) -> Option<serde_json::Value> {
    let o = a.run(&["inspect", id]);
    if o.status.code() == Some(0) {
        return Some(serde_json::from_str(&stdout(&o)).expect("inspect prints JSON"));
    }
    assert!(stderr(&o).contains("not found"), "{}", stderr(&o));
    None
}

/// An auto-remove container that exits while the agent is away is not
/// removed the moment the restarted agent learns its exit: a `vmlet run
/// --rm` reconnecting (or anyone) can still learn the exit code. Once a
/// client has been told (here by `vmlet wait`), it is removed, files and
/// processes with it.
#[test]
fn auto_remove_after_a_restart_waits_until_a_client_learns_the_exit() {
    let mut a = TestAgent::start();
    let id = a.detach(&[
        "--rm",
        "busybox",
        "--",
        "sh",
        "-c",
        "echo up; sleep 3; echo bye; exit 7",
    ]);
    a.wait_logs_containing(&id, "up\n");
    a.kill9();
    // The container exits meanwhile; the tether keeps its exit report
    // until an agent takes it.
    std::thread::sleep(Duration::from_secs(5));
    a.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let info = inspect_if_present(&a, &id)
            .expect("the VM was removed before any client learned its exit");
        if info["State"] == "exited" {
            assert_eq!(info["Exit"]["Code"], 7, "{info}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the restarted agent never learned the exit: {info}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = a.run(&["logs", &id]);
    assert_eq!(stdout(&o), "up\nbye\n", "{}", stderr(&o));
    let o = a.run(&["wait", &id]);
    assert_eq!(stdout(&o).trim(), "7", "{}", stderr(&o));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while inspect_if_present(&a, &id).is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "not removed after a client learned the exit"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!a.vm_dir(&id).exists());
    a.assert_no_processes(&id);
}

/// `vmlet attach` (without stdin) outlives the agent too: the agent said
/// where the attach began, so after the restart the CLI attaches again,
/// replaying the log, skips what came before its attach and what it
/// printed, and exits with the container's code. What the container wrote
/// before the attach is never printed; every line after it is, once.
#[test]
fn attach_reconnects_across_a_restart_and_prints_from_the_attach_on_once() {
    let mut a = TestAgent::start();
    let id = a.detach(&[
        "busybox",
        "--",
        "sh",
        "-c",
        &format!("echo before; echo before >&2; sleep 3; {SIXTY_LINES}; exit 7"),
    ]);
    a.wait_logs_containing(&id, "before\n");
    let o = cli_across_a_restart(&mut a, &id, &["attach", &id]);
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    assert_sixty_lines_once(&o);
    assert_eq!(a.run(&["rm", &id]).status.code(), Some(0));
}

/// A running VM whose log the next agent cannot open is neither left
/// running unaccounted for nor forgotten: it is ended, listed with the
/// reason, and can be removed.
#[test]
fn a_running_vm_whose_log_cannot_be_reopened_is_ended_and_listed() {
    let mut a = TestAgent::start();
    let id = a.detach(&["busybox", "--", "sleep", "1000"]);
    a.kill9();
    let dir = a.vm_dir(&id);
    std::fs::rename(dir.join("log"), dir.join("log.kept")).unwrap();
    std::fs::create_dir(dir.join("log")).unwrap();
    a.restart();
    let info = a.inspect(&id);
    assert_eq!(info["State"], "exited", "{info}");
    let reason = info["Exit"]["Reason"].as_str().unwrap_or_default();
    assert!(reason.contains("could not reopen the VM's log"), "{info}");
    a.assert_no_processes(&id);
    let o = a.run(&["rm", &id]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!dir.exists(), "rm left {}", dir.display());
}
