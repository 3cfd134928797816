//! Many streams, nothing lost: several containerVMs at once, each writing
//! megabytes on stdout and stderr, read by a slow client, a client that
//! disconnects and comes back, and a fast one. Every log and every reader
//! gets every byte, in order, each stream apart; the agent's memory stays
//! bounded; stdin arrives exactly once, in order, and closes cleanly.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use vmlet_protocol::api::{
    AttachSpec, ClientMessage, CreateSpec, Request, Response, ServerMessage, Stream,
};
use vmlet_protocol::frame::{self, MAX_FRAME_LEN};
use vmlet_tests::{stderr, stdout, RssSampler, TestAgent};

/// VMs streaming at once (TCG is CPU-bound: this machine has 2 cores).
const VMS: usize = 4;
/// Each VM writes `seq` over these ranges: about 4.6 MB on stdout and
/// 4.5 MB on stderr.
const OUT_LAST: u64 = 700_000;
const ERR_FIRST: u64 = 1_000_000;
const ERR_LAST: u64 = 1_500_000;
/// The slow reader's pace while the guests write (well below their rate)...
const SLOW_BYTES_PER_SEC: u64 = 32 << 10;
/// ...for this long; then it catches up at full speed, so the test ends.
const SLOW_FOR: Duration = Duration::from_secs(30);
/// The agent's peak resident memory must stay below this.
const MAX_AGENT_RSS_KIB: u64 = 200 * 1024;
/// Everything in this test finishes within this time.
const LIMIT: Duration = Duration::from_secs(600);

fn seq(first: u64, last: u64) -> Vec<u8> {
    (first..=last)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .collect()
}

/// What VM `k` writes on (stdout, stderr).
fn expected(k: usize) -> (Vec<u8>, Vec<u8>) {
    let k = k as u64;
    (seq(k, OUT_LAST + k), seq(ERR_FIRST + k, ERR_LAST + k))
}

fn argv(k: usize) -> Vec<String> {
    let k = k as u64;
    let script = format!(
        "seq {} {} >&2 & seq {} {}; wait",
        ERR_FIRST + k,
        ERR_LAST + k,
        k,
        OUT_LAST + k
    );
    vec!["sh".into(), "-c".into(), script]
}

/// What one reader received: a digest and a byte count per stream.
#[derive(Debug, Default)]
struct Got {
    out: Sha256,
    err: Sha256,
    out_len: u64,
    err_len: u64,
    exit: Option<i32>,
}

impl Got {
    fn add(&mut self, stream: Stream, data: &[u8]) {
        match stream {
            Stream::Stdout => {
                self.out.update(data);
                self.out_len += data.len() as u64;
            }
            Stream::Stderr => {
                self.err.update(data);
                self.err_len += data.len() as u64;
            }
        }
    }

    fn check(self, who: &str, want: &(Vec<u8>, Vec<u8>)) -> u64 {
        assert_eq!(self.out_len, want.0.len() as u64, "{who}: stdout length");
        assert_eq!(self.err_len, want.1.len() as u64, "{who}: stderr length");
        assert!(
            self.out.finalize()[..] == Sha256::digest(&want.0)[..],
            "{who}: stdout differs"
        );
        assert!(
            self.err.finalize()[..] == Sha256::digest(&want.1)[..],
            "{who}: stderr differs"
        );
        assert_eq!(
            self.exit,
            Some(0),
            "{who}: the stream did not report the exit"
        );
        self.out_len + self.err_len
    }
}

/// A client that reads its socket slowly: the agent must hold back this
/// client's replies without buffering them and without slowing anyone
/// else (the Rust client reads its socket at full speed and queues on its
/// side, so this reader is raw).
fn slow_reader(a: &TestAgent, vm: String) -> std::thread::JoinHandle<Got> {
    let mut s = a.raw_client();
    frame::write_frame(
        &mut s,
        &ClientMessage {
            id: 2,
            body: Request::Attach(AttachSpec {
                vm,
                stdin: false,
                stdout: true,
                stderr: true,
                replay: true,
            }),
        },
    )
    .unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    std::thread::spawn(move || {
        let t = Instant::now();
        let mut got = Got::default();
        loop {
            let m: ServerMessage = frame::read_frame(&mut s, MAX_FRAME_LEN)
                .expect("slow reader: a frame")
                .expect("slow reader: the stream ended without StreamEnd");
            match m.body {
                Response::Output { stream, data, .. } => {
                    got.add(stream, &data);
                    if t.elapsed() < SLOW_FOR {
                        std::thread::sleep(Duration::from_micros(
                            data.len() as u64 * 1_000_000 / SLOW_BYTES_PER_SEC,
                        ));
                    }
                }
                Response::StreamEnd { exit } => {
                    got.exit = exit.map(|e| e.code);
                    return got;
                }
                other => panic!("slow reader: unexpected {other:?}"),
            }
        }
    })
}

/// Reads a stream to its end with the Rust client, at full speed.
async fn drain(mut st: vmlet_protocol::client::ResponseStream, got: &mut Got) {
    while let Some(r) = st.next().await {
        match r {
            Response::Output { stream, data, .. } => got.add(stream, &data),
            Response::StreamEnd { exit } => {
                got.exit = exit.map(|e| e.code);
                return;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    panic!("the connection closed before StreamEnd");
}

fn attach(vm: &str) -> Request {
    Request::Attach(AttachSpec {
        vm: vm.into(),
        stdin: false,
        stdout: true,
        stderr: true,
        replay: true,
    })
}

#[test]
fn many_streams_nothing_lost_memory_bounded() {
    let a = TestAgent::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let started = Instant::now();
    let hwm_before = a.peak_rss_kib();
    // VmHWM is set at startup, when vmletd stages the kernel and initrd
    // through memory; sampling shows what the streams cost.
    let rss = RssSampler::start(&a);

    // Create every VM first, attach its readers, then start them all at
    // once: the replaying readers see every byte whenever they attach.
    let ids: Vec<String> = rt.block_on(async {
        let c = a.client().await;
        let mut ids = Vec::new();
        for k in 0..VMS {
            let id = c
                .create(CreateSpec {
                    image: "busybox".into(),
                    argv: argv(k),
                    ..Default::default()
                })
                .await
                .expect("create");
            ids.push(id);
        }
        ids
    });
    let slow: Vec<_> = ids.iter().map(|id| slow_reader(&a, id.clone())).collect();

    let socket = a.socket.clone();
    let results = rt.block_on(async {
        let mut tasks = Vec::new();
        for id in ids.clone() {
            let socket = socket.clone();
            // The fast reader.
            let fast = tokio::spawn({
                let socket = socket.clone();
                let id = id.clone();
                async move {
                    let c = vmlet_protocol::client::Client::connect(&socket)
                        .await
                        .unwrap();
                    let st = c.stream(attach(&id)).await.unwrap();
                    let mut got = Got::default();
                    drain(st, &mut got).await;
                    got
                }
            });
            // The one that goes away mid-stream and comes back with
            // `logs -f`, which replays from the first byte.
            let flaky = tokio::spawn({
                let socket = socket.clone();
                let id = id.clone();
                async move {
                    let c = vmlet_protocol::client::Client::connect(&socket)
                        .await
                        .unwrap();
                    let mut st = c.stream(attach(&id)).await.unwrap();
                    let mut seen = 0usize;
                    while seen < 1 << 20 {
                        match st.next().await {
                            Some(Response::Output { data, .. }) => seen += data.len(),
                            other => panic!("flaky reader: {other:?} before 1 MiB"),
                        }
                    }
                    drop(st);
                    drop(c);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let c = vmlet_protocol::client::Client::connect(&socket)
                        .await
                        .unwrap();
                    let st = c
                        .stream(Request::Logs {
                            vm: id.clone(),
                            follow: true,
                        })
                        .await
                        .unwrap();
                    let mut got = Got::default();
                    drain(st, &mut got).await;
                    got
                }
            });
            tasks.push((fast, flaky));
        }
        let c = vmlet_protocol::client::Client::connect(&socket)
            .await
            .unwrap();
        for id in &ids {
            c.start(id).await.expect("start");
        }
        let mut out = Vec::new();
        for (fast, flaky) in tasks {
            out.push((fast.await.unwrap(), flaky.await.unwrap()));
        }
        out
    });
    let streamed = started.elapsed();
    assert!(streamed < LIMIT, "streaming took {streamed:?}");

    let mut moved = 0u64;
    let mut slow_got = Vec::new();
    for h in slow {
        slow_got.push(h.join().expect("slow reader"));
    }
    let all_read = started.elapsed();
    for (k, ((fast, flaky), slow)) in results.into_iter().zip(slow_got).enumerate() {
        let want = expected(k);
        moved += fast.check(&format!("VM {k} fast reader"), &want);
        moved += flaky.check(&format!("VM {k} reconnected reader"), &want);
        moved += slow.check(&format!("VM {k} slow reader"), &want);
        // The stored log, through the CLI: each stream apart.
        let logs = a.run(&["logs", &ids[k]]);
        assert_eq!(logs.status.code(), Some(0), "{}", stderr(&logs));
        assert!(logs.stdout == want.0, "VM {k}: `vmlet logs` stdout differs");
        assert!(logs.stderr == want.1, "VM {k}: `vmlet logs` stderr differs");
        moved += (want.0.len() + want.1.len()) as u64;
    }
    let written: u64 = (0..VMS)
        .map(|k| {
            let (o, e) = expected(k);
            (o.len() + e.len()) as u64
        })
        .sum();
    let hwm = a.peak_rss_kib();
    let anon = a.anon_rss_kib();
    let peak = rss.max_kib();
    eprintln!(
        "streams: {VMS} VMs, {} guest streams and {} readers at once; guests wrote {:.1} MB, \
         readers received {:.1} MB, 0 bytes lost; fast readers done in {:.1} s, slow ones in \
         {:.1} s; agent RSS at most {:.1} MiB while streaming (VmHWM {:.1} MiB, {:.1} MiB before; \
         anonymous memory now {:.1} MiB)",
        VMS * 2,
        VMS * 3,
        written as f64 / 1e6,
        moved as f64 / 1e6,
        streamed.as_secs_f64(),
        all_read.as_secs_f64(),
        peak as f64 / 1024.0,
        hwm as f64 / 1024.0,
        hwm_before as f64 / 1024.0,
        anon as f64 / 1024.0,
    );
    assert!(
        peak < MAX_AGENT_RSS_KIB && hwm < MAX_AGENT_RSS_KIB,
        "the agent's RSS reached {peak} KiB, VmHWM {hwm} KiB (limit {MAX_AGENT_RSS_KIB} KiB)"
    );
    for id in &ids {
        assert_eq!(a.run(&["rm", id]).status.code(), Some(0));
    }
    stdin_megabytes_arrive_once_in_order_and_close(&a);
    a.assert_no_container_processes();
}

/// Stdin is checked after the streams, on the same agent, so no more
/// than [`VMS`] guests run at once.
fn stdin_megabytes_arrive_once_in_order_and_close(a: &TestAgent) {
    // 4 MiB of bytes that are not all alike, so any reordering, loss or
    // duplication changes the digest.
    let mut input = vec![0u8; 4 << 20];
    let mut x: u32 = 0x9e37_79b9;
    for b in input.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    let hex: String = Sha256::digest(&input)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let want = format!("{hex}  -\n");
    let t = Instant::now();
    let o = a.run_with_input(
        &["run", "-i", "--rm", "busybox", "--", "sha256sum"],
        Some(&input),
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), want);
    eprintln!(
        "stdin: {} bytes delivered once, in order, closed cleanly, in {:.1} s",
        input.len(),
        t.elapsed().as_secs_f64()
    );
}
