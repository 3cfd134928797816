//! The per-VM log cap (`--log-max-size`, `--log-max-files`) on real
//! guests: a guest that floods its stdout ignoring acknowledgements and one
//! that writes megabytes of numbered lines, with a 1 MiB cap in 4 files.
//! The log's files never hold more than the cap plus one segment; a
//! follower that keeps up sees every byte; a reader that starts late is
//! told how many bytes rotation deleted and gets the rest, contiguous;
//! the agent keeps serving other VMs; a rotated log survives an agent
//! restart with its offsets (so nothing is resent twice or skipped); and
//! removal deletes every segment. A log whose disk fills up holds the
//! guest's output back, losing none of it, until there is room again,
//! and a guest whose disk write finds the host full sees an error.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmlet_protocol::api::{Request, Response, Stream};
use vmlet_protocol::client::Client;
use vmlet_tests::{hostile_tether, stderr, stdout, AgentOptions, TestAgent};

/// The cap under test, and the file count it is divided into.
const CAP: u64 = 1 << 20;
const FILES: u64 = 4;
const SEGMENT: u64 = CAP / FILES;
/// The flood's chunk: the hostile tether writes chunks of this size, each
/// `a`..`z` repeated from its first byte.
const FLOOD_CHUNK: usize = 64 * 1024;

fn capped_agent(tether: Option<PathBuf>) -> TestAgent {
    TestAgent::start_with(AgentOptions {
        tether,
        extra: vec![
            "--log-max-size".into(),
            "1M".into(),
            "--log-max-files".into(),
            FILES.to_string(),
        ],
        ..Default::default()
    })
}

fn seq(first: u64, last: u64) -> Vec<u8> {
    (first..=last)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .collect()
}

/// Bytes and number of the log's files in a VM directory.
fn log_usage(dir: &Path) -> (u64, u64) {
    let mut bytes = 0;
    let mut files = 0;
    for ent in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = ent.file_name().to_string_lossy().into_owned();
        if name == "log" || name.starts_with("log.") {
            // A segment deleted between the listing and the stat counts
            // as nothing.
            if let Ok(m) = ent.metadata() {
                bytes += m.len();
                files += 1;
            }
        }
    }
    (bytes, files)
}

/// Samples the log usage of some VM directories every few milliseconds and
/// keeps the largest figures.
struct UsageSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(u64, u64)>>,
}

impl UsageSampler {
    fn start(dirs: Vec<PathBuf>) -> UsageSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut max = vec![(0, 0); dirs.len()];
            while !s.load(Ordering::Relaxed) {
                for (d, m) in dirs.iter().zip(max.iter_mut()) {
                    let (b, f) = log_usage(d);
                    *m = (m.0.max(b), m.1.max(f));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            max
        });
        UsageSampler { stop, thread }
    }

    /// The largest (bytes, files) seen per directory.
    fn finish(self) -> Vec<(u64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("sampler")
    }
}

/// What a `logs -f` follower received.
#[derive(Debug, Default)]
struct Followed {
    out: Vec<u8>,
    err: Vec<u8>,
    drops: Vec<(u64, u64)>,
}

/// Follows VM `vm` through the API from its first byte; returns once the
/// request is in (so the caller may start the VM), with the handle that
/// yields everything it received.
fn follow(socket: &Path, vm: &str) -> std::thread::JoinHandle<Followed> {
    let (socket, vm) = (socket.to_path_buf(), vm.to_string());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let c = Client::connect(&socket).await.expect("connect");
            let mut s = c
                .stream(Request::Logs { vm, follow: true })
                .await
                .expect("logs -f");
            // A first reply (the VM is only created: there is none yet)
            // cannot be awaited; a round trip on the same connection says
            // the agent has the request.
            c.list(true).await.expect("list");
            ready_tx.send(()).expect("ready");
            let mut got = Followed::default();
            while let Some(r) = s.next().await {
                match r {
                    Response::Output { stream, data, .. } => match stream {
                        Stream::Stdout => got.out.extend(data),
                        Stream::Stderr => got.err.extend(data),
                    },
                    Response::Dropped { stdout, stderr } => got.drops.push((stdout, stderr)),
                    Response::StreamEnd { .. } => break,
                    other => panic!("the follower got {other:?}"),
                }
            }
            got
        })
    });
    ready_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the follower did not start");
    h
}

/// The byte count of `vmlet logs`' notice of dropped output, if it printed
/// one (exactly one is allowed).
fn dropped_notice(err: &str) -> Option<u64> {
    let notices: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("dropped by log rotation"))
        .collect();
    assert!(notices.len() <= 1, "more than one notice: {err}");
    notices.first().map(|l| {
        l.strip_prefix("vmlet: ")
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unreadable notice {l:?}"))
    })
}

fn vmlet_ok(a: &TestAgent, args: &[&str]) -> String {
    let o = a.run(args);
    assert_eq!(o.status.code(), Some(0), "vmlet {args:?}: {}", stderr(&o));
    stdout(&o)
}

fn exit_code(a: &TestAgent, id: &str) -> i32 {
    vmlet_ok(a, &["wait", id])
        .trim()
        .parse()
        .expect("an exit code")
}

fn u(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

#[test]
fn a_flood_stays_within_the_cap_and_readers_learn_what_they_missed() {
    let a = capped_agent(Some(hostile_tether()));
    let flooder = vmlet_ok(
        &a,
        &[
            "create",
            "-e",
            "VMLET_HOSTILE=flood",
            "-e",
            "VMLET_HOSTILE_SECONDS=8",
            "busybox",
            "--",
            "echo",
            "flood over",
        ],
    )
    .trim()
    .to_string();
    // About 6.9 MB of numbered lines, read by a follower from the start.
    let lines = vmlet_ok(&a, &["create", "busybox", "--", "seq", "1", "1000000"])
        .trim()
        .to_string();
    let sampler = UsageSampler::start(vec![a.vm_dir(&flooder), a.vm_dir(&lines)]);
    let follower = follow(&a.socket, &lines);
    let t = Instant::now();
    vmlet_ok(&a, &["start", &flooder]);
    vmlet_ok(&a, &["start", &lines]);

    // Meanwhile a neighbour under the cap runs and keeps all its output.
    let quiet = a.detach(&["busybox", "--", "seq", "1", "20000"]);
    assert_eq!(exit_code(&a, &quiet), 0);
    assert!(vmlet_ok(&a, &["logs", &quiet]).as_bytes() == seq(1, 20000));
    assert_eq!(u(&a.inspect(&quiet), "LogDroppedBytes"), 0);
    let neighbour = t.elapsed();

    assert_eq!(exit_code(&a, &flooder), 0);
    assert_eq!(exit_code(&a, &lines), 0);
    let followed = follower.join().expect("follower");
    let usage = sampler.finish();

    // The flood: within the cap; a late reader is told what it missed and
    // gets whole chunks from there on, then the process's output.
    let info = a.inspect(&flooder);
    let (kept, dropped) = (u(&info, "LogBytes"), u(&info, "LogDroppedBytes"));
    let logs = a.run(&["logs", &flooder]);
    assert_eq!(logs.status.code(), Some(0), "{}", stderr(&logs));
    let notice = dropped_notice(&stderr(&logs)).expect("a notice of dropped output");
    let out = logs.stdout;
    let flood = out
        .strip_suffix(b"flood over\n")
        .expect("the process's output after the flood");
    eprintln!(
        "flood: {:.1} MB written, {:.1} MB dropped, {} bytes kept; log files at most {} bytes \
         in {} files (cap {CAP} + one segment {SEGMENT}); a neighbour started meanwhile \
         finished complete after {:.1} s",
        (dropped + flood.len() as u64) as f64 / 1e6,
        dropped as f64 / 1e6,
        kept,
        usage[0].0,
        usage[0].1,
        neighbour.as_secs_f64()
    );
    assert!(dropped > 4 * CAP, "only {dropped} bytes dropped");
    assert!(kept <= CAP, "{kept} bytes kept");
    assert!(usage[0].0 <= CAP + SEGMENT, "{:?}", usage[0]);
    assert!(usage[0].1 <= FILES + 1, "{:?}", usage[0]);
    assert_eq!(notice, dropped);
    assert_eq!(dropped % FLOOD_CHUNK as u64, 0);
    assert!(!flood.is_empty());
    // Whole chunks, each `a`..`z` from its start: nothing torn, nothing
    // out of step.
    for (i, b) in flood.iter().enumerate() {
        assert_eq!(
            *b,
            b'a' + ((i % FLOOD_CHUNK) % 26) as u8,
            "byte {i} of the flood"
        );
    }

    // The numbered lines: the follower kept up and got every byte; a late
    // reader gets a contiguous tail after the notice.
    let want = seq(1, 1_000_000);
    let info = a.inspect(&lines);
    let dropped = u(&info, "LogDroppedBytes");
    assert!(
        followed.drops.is_empty(),
        "the follower was told of drops {:?}",
        followed.drops
    );
    assert!(
        followed.out == want,
        "the follower's stdout differs ({} bytes of {})",
        followed.out.len(),
        want.len()
    );
    assert!(followed.err.is_empty());
    let logs = a.run(&["logs", &lines]);
    assert_eq!(logs.status.code(), Some(0), "{}", stderr(&logs));
    let notice = dropped_notice(&stderr(&logs)).expect("a notice of dropped output");
    eprintln!(
        "lines: {} bytes written, a follower got all of them; {dropped} dropped, a late reader \
         got the last {} after the notice; log files at most {} bytes in {} files",
        want.len(),
        logs.stdout.len(),
        usage[1].0,
        usage[1].1
    );
    assert_eq!(notice, dropped);
    assert_eq!(notice + logs.stdout.len() as u64, want.len() as u64);
    assert!(want.ends_with(&logs.stdout), "the tail is not contiguous");
    assert!(u(&info, "LogBytes") <= CAP);
    assert!(usage[1].0 <= CAP + SEGMENT, "{:?}", usage[1]);

    // Removal deletes every segment with the VM's directory.
    for id in [&flooder, &lines, &quiet] {
        vmlet_ok(&a, &["rm", id]);
        assert!(!a.vm_dir(id).exists());
        a.assert_no_processes(id);
    }
}

#[test]
fn a_rotated_log_survives_an_agent_restart() {
    let mut a = capped_agent(None);
    let want = seq(1, 1_200_000);
    let id = a.detach(&[
        "busybox",
        "--",
        "sh",
        "-c",
        "seq 1 600000; sleep 3; seq 600001 1200000",
    ]);
    // Kill the agent once rotation has deleted something, while the guest
    // still writes.
    let deadline = Instant::now() + Duration::from_secs(180);
    while u(&a.inspect(&id), "LogDroppedBytes") == 0 {
        assert!(Instant::now() < deadline, "the log never rotated");
        std::thread::sleep(Duration::from_millis(200));
    }
    a.kill9();
    let (before, _) = log_usage(&a.vm_dir(&id));
    std::thread::sleep(Duration::from_secs(1));
    a.restart();
    assert_eq!(exit_code(&a, &id), 0);

    // The tether resumed from the stream offsets the reopened log gave:
    // what was dropped and what is kept add up to exactly what the guest
    // wrote, and the kept part is its contiguous tail.
    let info = a.inspect(&id);
    let dropped = u(&info, "LogDroppedBytes");
    let logs = a.run(&["logs", &id]);
    assert_eq!(logs.status.code(), Some(0), "{}", stderr(&logs));
    let notice = dropped_notice(&stderr(&logs)).expect("a notice of dropped output");
    let (after, files) = log_usage(&a.vm_dir(&id));
    eprintln!(
        "restart: log files {before} bytes when the agent was killed, {after} in {files} files \
         at the end; {dropped} bytes dropped + {} kept = {} written",
        logs.stdout.len(),
        want.len()
    );
    assert_eq!(notice, dropped);
    assert_eq!(dropped + logs.stdout.len() as u64, want.len() as u64);
    assert!(want.ends_with(&logs.stdout), "the tail is not contiguous");
    assert!(
        after <= CAP && files <= FILES,
        "{after} bytes in {files} files"
    );
    vmlet_ok(&a, &["rm", &id]);
    assert!(!a.vm_dir(&id).exists());
    a.assert_no_processes(&id);
}

/// Fills the filesystem holding `dir`: a file of everything left, to the
/// last block.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("create the filler");
    for size in [1 << 20, 4096, 1] {
        let buf = vec![0u8; size];
        while f.write_all(&buf).is_ok() {}
    }
    path
}

/// Waits (bounded) until the VM's console says `needle`.
fn wait_console(a: &TestAgent, id: &str, needle: &str) {
    let console = a.vm_dir(id).join("console.log");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains(needle)
    {
        assert!(Instant::now() < deadline, "no {needle:?} on the console");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Numbered lines, each padded to 200 bytes, for a while.
fn numbered_lines(n: u64) -> (String, impl Fn(u64) -> String) {
    let pad = "x".repeat(200);
    let script =
        format!("i=1; while [ $i -le {n} ]; do echo $i {pad}; i=$((i+1)); sleep 0.02; done");
    (script, move |i| format!("{i} {pad}\n"))
}

fn assert_lines(logs: &str, n: u64, line: impl Fn(u64) -> String) {
    let want: String = (1..=n).map(&line).collect();
    let lines: Vec<&str> = logs.lines().collect();
    assert!(
        logs == want,
        "lines lost or repeated: {} lines, the first wrong {:?}",
        lines.len(),
        (1..=n)
            .zip(lines.iter().chain(std::iter::repeat(&"")))
            .find(|(i, l)| format!("{l}\n") != line(*i))
            .map(|(i, l)| (i, l.split(' ').next().unwrap_or_default().to_string()))
    );
}

/// The disk under the agent's state fills up while a container writes,
/// and stays full well after the container has exited. The agent holds
/// the guest's output back (the guest's writes wait, as on a full pipe),
/// the guest waits for the agent to take its exit, and once there is room
/// every line is in the log, once, in order, and the exit code is the
/// container's.
#[test]
fn output_written_while_the_disk_is_full_is_kept_once_in_order() {
    let a = TestAgent::start_with(AgentOptions {
        state_tmpfs_mib: Some(256),
        ..Default::default()
    });
    let (script, line) = numbered_lines(200);
    let id = a.detach(&["busybox", "--", "sh", "-c", &format!("{script}; exit 3")]);
    a.wait_logs_containing(&id, &line(20));
    let filler = fill(&a.state_dir());
    let dir = a.vm_dir(&id);
    let held = log_usage(&dir).0;
    // The container ends while the disk is full (the tether says so on the
    // console), and the disk stays full for longer than the tether waits
    // for an acknowledgement of the exit from a host it does not hear.
    wait_console(&a, &id, "process exited");
    std::thread::sleep(Duration::from_secs(15));
    // No more than what fits in the page the log ended in.
    let grown = log_usage(&dir).0 - held;
    assert!(
        grown <= 4096,
        "the log grew by {grown} bytes on a full disk"
    );
    assert_eq!(a.inspect(&id)["State"], "running");
    std::fs::remove_file(&filler).expect("free the disk");
    let o = a.run(&["wait", &id]);
    assert_eq!(stdout(&o).trim(), "3", "{}", stderr(&o));
    assert_lines(&vmlet_ok(&a, &["logs", &id]), 200, line);
    let log = a.daemon_log();
    assert!(log.contains("holding the guest's output back"), "{log}");
}

/// A container's write to its disk on a full host disk fails in the
/// container, and its VM goes on: QEMU does not stop it (a stopped VM's
/// vsock would not come back), so its output, exit and removal work.
#[test]
fn a_write_to_a_full_disk_fails_in_the_container_whose_vm_goes_on() {
    let a = TestAgent::start_with(AgentOptions {
        state_tmpfs_mib: Some(256),
        ..Default::default()
    });
    let id = a.detach(&[
        "busybox",
        "--",
        "sh",
        "-c",
        "echo before; sleep 5; \
         if dd if=/dev/zero of=/big bs=64k count=128 conv=fsync 2>/dev/null; \
         then echo written; else echo refused; fi",
    ]);
    a.wait_logs_containing(&id, "before\n");
    let filler = fill(&a.state_dir());
    // The guest's kernel says when its disk fails; the dd has been refused
    // by the time it is 10 s past its start.
    wait_console(&a, &id, "I/O error");
    std::thread::sleep(Duration::from_secs(10));
    std::fs::remove_file(&filler).expect("free the disk");
    assert_eq!(exit_code(&a, &id), 0);
    assert_eq!(vmlet_ok(&a, &["logs", &id]), "before\nrefused\n");
    // And the next container starts and runs as ever.
    a.assert_echo_and_exit_codes();
}
