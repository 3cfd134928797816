//! Hostile guests: a tether built with the `hostile` feature floods,
//! breaks the framing, lies about itself, dials without end or never
//! answers, as its spec's `VMLET_HOSTILE` asks (tether/src/hostile.rs).
//! Each is confined to its own VM: ended with a clear reason, or left
//! running within bounds, while the agent and the other VMs go on.

use std::time::{Duration, Instant};

use vmlet_tests::{hostile_tether, stderr, stdout, AgentOptions, RssSampler, TestAgent};

/// The agent's resident memory must stay below this.
const MAX_AGENT_RSS_KIB: u64 = 200 * 1024;

fn hostile_agent() -> TestAgent {
    TestAgent::start_with(AgentOptions {
        tether: Some(hostile_tether()),
        ..Default::default()
    })
}

/// `vmlet wait ID`: the exit code it prints (and exits with).
fn wait(a: &TestAgent, id: &str) -> i32 {
    let o = a.run(&["wait", id]);
    let code = stdout(&o).trim().parse().expect("an exit code");
    assert_eq!(o.status.code(), Some(code), "wait {id}: {}", stderr(&o));
    code
}

fn reason(a: &TestAgent, id: &str) -> String {
    a.inspect(id)["Exit"]["Reason"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn still_serving(a: &TestAgent) {
    let o = a.run(&["ps", "-a"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

fn seq(first: u64, last: u64) -> String {
    (first..=last).map(|i| format!("{i}\n")).collect()
}

#[test]
fn a_flood_is_confined_and_a_neighbour_keeps_its_output() {
    let a = hostile_agent();
    let rss = RssSampler::start(&a);
    let flooder = a.detach(&[
        "-e",
        "VMLET_HOSTILE=flood",
        "-e",
        "VMLET_HOSTILE_SECONDS=10",
        "busybox",
        "--",
        "echo",
        "flood over",
    ]);
    // Started while the flood runs: its output must come promptly and
    // whole.
    let t = Instant::now();
    let quiet = a.detach(&["busybox", "--", "seq", "1", "20000"]);
    assert_eq!(wait(&a, &quiet), 0);
    let neighbour = t.elapsed();
    let logs = a.run(&["logs", &quiet]);
    assert!(
        stdout(&logs) == seq(1, 20000),
        "the neighbour's output differs"
    );
    let phases = a.inspect(&quiet)["PhasesMs"].clone();

    assert_eq!(wait(&a, &flooder), 0);
    let info = a.inspect(&flooder);
    // Stored, and deleted again by rotation past the log cap (64 MiB).
    let kept = info["LogBytes"].as_u64().unwrap();
    let flooded = kept + info["LogDroppedBytes"].as_u64().unwrap();
    let peak = rss.max_kib();
    // The flood's warnings (its process reports a start again) are few.
    let warns = a.daemon_log().matches("unexpected message").count();
    eprintln!(
        "flood: the guest wrote {:.1} MB in 10 s ({:.1} MB/s) ignoring acknowledgements, \
         {:.1} MB of it kept under the log cap; the neighbour started meanwhile finished \
         complete in {:.1} s (phases {phases}); agent RSS at most {:.1} MiB; {warns} warnings \
         logged",
        flooded as f64 / 1e6,
        flooded as f64 / 1e7,
        kept as f64 / 1e6,
        neighbour.as_secs_f64(),
        peak as f64 / 1024.0
    );
    assert!(flooded > 1 << 20, "the flood wrote only {flooded} bytes");
    assert!(
        kept <= 64 << 20,
        "the log kept {kept} bytes, over the default cap"
    );
    assert!(
        neighbour < Duration::from_secs(90),
        "the neighbour took {neighbour:?}"
    );
    assert!(peak < MAX_AGENT_RSS_KIB, "agent RSS {peak} KiB");
    assert!(warns <= 5, "{warns} warnings");
    still_serving(&a);
    for id in [&flooder, &quiet] {
        assert_eq!(a.run(&["rm", id]).status.code(), Some(0));
        a.assert_no_processes(id);
    }
}

#[test]
fn broken_framing_ends_only_its_own_vm() {
    let a = hostile_agent();
    let garbage = a.detach(&[
        "-e",
        "VMLET_HOSTILE=garbage",
        "busybox",
        "--",
        "sleep",
        "1000",
    ]);
    let oversize = a.detach(&[
        "-e",
        "VMLET_HOSTILE=oversize",
        "busybox",
        "--",
        "sleep",
        "1000",
    ]);
    for (id, before, why) in [
        (&garbage, "before the garbage\n", "magic"),
        (
            &oversize,
            "before the oversized frame\n",
            "exceeds the limit",
        ),
    ] {
        assert_eq!(wait(&a, id), 255);
        let r = reason(&a, id);
        eprintln!("{before:?} VM ended: {r}");
        assert!(r.contains("broke the protocol") && r.contains(why), "{r}");
        // What it sent before breaking the framing is kept.
        assert_eq!(stdout(&a.run(&["logs", id])), before);
        a.assert_no_processes(id);
    }
    // The agent goes on: a well-behaved VM on the same agent runs.
    let o = a.run(&["run", "--rm", "busybox", "--", "echo", "fine"]);
    assert_eq!(stdout(&o), "fine\n", "{}", stderr(&o));
    still_serving(&a);
}

#[test]
fn false_identities_are_ignored_and_silence_times_out() {
    let a = hostile_agent();
    // Never reports a start: the start fails at the spawn timeout with a
    // reason, and the VM is cleaned up.
    let silent = {
        let socket = a.socket.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            let o = std::process::Command::new(vmlet_tests::bin("vmlet"))
                .env("VMLET_SOCKET", socket)
                .args([
                    "run",
                    "-d",
                    "--name",
                    "silent",
                    "-e",
                    "VMLET_HOSTILE=silent",
                    "busybox",
                    "--",
                    "true",
                ])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("vmlet");
            let o = vmlet_tests::wait_output(o, Duration::from_secs(180), "silent run");
            (o, t.elapsed())
        })
    };
    // Claims to be started with a bogus pid, then says hello again
    // thousands of times with other boot timings: ignored, and the
    // warnings rate-limited; the real process runs.
    let liar = a.detach(&[
        "-e",
        "VMLET_HOSTILE=identity",
        "busybox",
        "--",
        "sh",
        "-c",
        "echo real output",
    ]);
    assert_eq!(wait(&a, &liar), 0);
    assert_eq!(stdout(&a.run(&["logs", &liar])), "real output\n");
    let boot = a.inspect(&liar)["GuestBoot"].clone();
    assert_ne!(boot["KernelMs"].as_f64(), Some(4_242_424.242), "{boot}");
    let log = a.daemon_log();
    let warns = log.matches("unexpected message").count();
    eprintln!("identity: 10000 false hellos and 10000 false starts ignored, {warns} warnings logged; boot kept as {boot}");
    assert!(warns <= 10, "{warns} warnings for one guest");

    let (o, took) = silent.join().expect("silent");
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("did not start the process: it did not answer in time"),
        "{}",
        stderr(&o)
    );
    let r = reason(&a, "silent");
    eprintln!("silent: refused after {:.1} s: {r}", took.as_secs_f64());
    assert!(r.contains("did not answer in time"), "{r}");
    let id = a.inspect("silent")["Id"].as_str().unwrap().to_string();
    a.assert_no_processes(&id);
    still_serving(&a);
}

#[test]
fn endless_connections_are_confined() {
    let a = hostile_agent();
    still_serving(&a);
    let base = a.fd_count();
    let dialer = a.detach(&[
        "-e",
        "VMLET_HOSTILE=connections",
        "busybox",
        "--",
        "sh",
        "-c",
        "sleep 20; echo survived",
    ]);
    let per_vm = a.fd_count() - base;
    let other = a.detach(&["busybox", "--", "sh", "-c", "sleep 2; echo fine"]);
    let mut most = 0;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(15) {
        most = most.max(a.fd_count());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(wait(&a, &other), 0);
    assert_eq!(stdout(&a.run(&["logs", &other])), "fine\n");
    assert_eq!(wait(&a, &dialer), 0);
    assert_eq!(stdout(&a.run(&["logs", &dialer])), "survived\n");
    let console =
        std::fs::read_to_string(a.vm_dir(&dialer).join("console.log")).unwrap_or_default();
    let dialled = console
        .lines()
        .rev()
        .find(|l| l.contains("extra connections"))
        .unwrap_or("")
        .to_string();
    eprintln!(
        "connections: agent fds {base} before, {} with one VM, at most {most} while the guest \
         dialled without end ({dialled})",
        base + per_vm
    );
    // Two VMs' worth of descriptors, not one per connection the guest made.
    assert!(most <= base + 2 * per_vm + 8, "agent fds reached {most}");
    for id in [&dialer, &other] {
        assert_eq!(a.run(&["rm", id]).status.code(), Some(0));
        a.assert_no_processes(id);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while a.fd_count() > base {
        assert!(Instant::now() < deadline, "agent fds {}", a.fd_count());
        std::thread::sleep(Duration::from_millis(100));
    }
    still_serving(&a);
}
