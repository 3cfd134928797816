//! Hostile clients on the API socket: thousands of connections, clients
//! that stall mid-frame or never read, a flood of random frames, and an
//! agent that runs out of file descriptors. The agent keeps serving
//! everyone else, its memory stays bounded, and what the clients held is
//! released when they go.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vmlet_protocol::api::{ClientMessage, Request, Response, ServerMessage};
use vmlet_protocol::frame::{self, Header, FRAME_VERSION, MAX_FRAME_LEN};
use vmlet_protocol::ErrorCode;
use vmlet_tests::{raw_hello, stderr, stdout, AgentOptions, RssSampler, TestAgent};

/// The agent's peak resident memory must stay below this.
const MAX_AGENT_RSS_KIB: u64 = 200 * 1024;

fn still_serving(a: &TestAgent) {
    let o = a.run(&["ps", "-a"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("ID"));
}

/// Waits (bounded) until the agent holds no more descriptors than `base`.
fn fds_back_to(a: &TestAgent, base: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = a.fd_count();
        if n <= base {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the agent still holds {n} descriptors, {base} before"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A tiny deterministic generator: the tests need varied bytes, not
/// cryptographic ones.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn read_reply(s: &mut UnixStream) -> ServerMessage {
    frame::read_frame(s, MAX_FRAME_LEN)
        .expect("a reply frame")
        .expect("a reply before close")
}

#[test]
fn thousands_of_connections_are_bounded_and_released() {
    let a = TestAgent::start();
    still_serving(&a);
    let base = a.fd_count();
    let rss = RssSampler::start(&a);
    let t = Instant::now();
    let mut held = Vec::new();
    let (mut served, mut refused) = (0, 0);
    for _ in 0..2000 {
        let mut s = a.raw_connection();
        frame::write_frame(
            &mut s,
            &ClientMessage {
                id: 1,
                body: Request::Hello {
                    min_version: 1,
                    max_version: 1,
                    client: "many".into(),
                },
            },
        )
        .unwrap();
        match read_reply(&mut s).body {
            Response::Hello { .. } => {
                served += 1;
                held.push(s);
            }
            Response::Error(e) => {
                assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}");
                assert!(e.message.contains("connections"), "{e:?}");
                refused += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let opened = t.elapsed();
    // While the connections are held, a newcomer is told why, not hung.
    let o = a.run(&["ps"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("connections"), "{}", stderr(&o));
    let peak_fds = a.fd_count();
    drop(held);
    fds_back_to(&a, base);
    still_serving(&a);
    let peak = rss.max_kib();
    eprintln!(
        "connections: 2000 opened in {:.1} s, {served} served and held, {refused} refused with a \
         clear error; agent fds {base} → {peak_fds} → back to {}; RSS at most {:.1} MiB",
        opened.as_secs_f64(),
        a.fd_count(),
        peak as f64 / 1024.0
    );
    assert!(
        served >= 1000 && refused > 0,
        "{served} served, {refused} refused"
    );
    assert!(peak < MAX_AGENT_RSS_KIB, "peak RSS {peak} KiB");
}

#[test]
fn running_out_of_descriptors_does_not_end_the_agent() {
    // With few descriptors, accepting fails with EMFILE long before the
    // connection limit; the agent must back off and go on, not exit.
    let a = TestAgent::start_with(AgentOptions {
        nofile: Some(128),
        ..Default::default()
    });
    still_serving(&a);
    let base = a.fd_count();
    // More than the agent can hold, fewer than the listen backlog (so no
    // connect blocks).
    let held: Vec<UnixStream> = (0..250).map(|_| a.raw_connection()).collect();
    std::thread::sleep(Duration::from_secs(1));
    let during = a.fd_count();
    drop(held);
    // The connections that never said hello are closed within the hello
    // timeout; those still queued are accepted and closed as they come.
    fds_back_to(&a, base);
    still_serving(&a);
    eprintln!(
        "out of descriptors: agent fds {base} → {during} (limit 128) → back to {}",
        a.fd_count()
    );
    assert!(
        a.daemon_log().contains("cannot accept"),
        "{}",
        a.daemon_log()
    );
}

#[test]
fn stalled_and_never_reading_clients_cost_only_themselves() {
    let a = TestAgent::start();
    // A chatty VM: about 20 MB of output, then quiet.
    let o = a.run(&[
        "run",
        "-d",
        "busybox",
        "--",
        "sh",
        "-c",
        "seq 1 3000000; sleep 1000",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let id = stdout(&o).trim().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !a.run(&["logs", &id]).stdout.starts_with(b"1\n2\n3\n") {
        assert!(Instant::now() < deadline, "no output from the chatty VM");
        std::thread::sleep(Duration::from_millis(200));
    }
    let base = a.fd_count();
    let rss = RssSampler::start(&a);

    // Half a hello, then nothing: closed at the hello timeout, with a
    // reason.
    let mut half_hello = a.raw_connection();
    half_hello.write_all(b"VMLT\x01").unwrap();
    // Half a frame after hello, then nothing.
    let mut half_frame = a.raw_client();
    let full = frame::encode(&ClientMessage {
        id: 3,
        body: Request::List { all: true },
    })
    .unwrap();
    half_frame.write_all(&full[..7]).unwrap();
    // Many followers of the chatty VM that never read a byte.
    let mut deaf = a.raw_client();
    for i in 0..64 {
        frame::write_frame(
            &mut deaf,
            &ClientMessage {
                id: 100 + i,
                body: Request::Logs {
                    vm: id.clone(),
                    follow: true,
                },
            },
        )
        .unwrap();
    }

    // Meanwhile everyone else is served promptly, output included.
    let t = Instant::now();
    let mut served = 0;
    while t.elapsed() < Duration::from_secs(20) {
        let q = Instant::now();
        still_serving(&a);
        let logs = a.run(&["logs", &id]);
        assert_eq!(logs.status.code(), Some(0));
        assert!(logs.stdout.starts_with(b"1\n2\n3\n"));
        assert!(
            q.elapsed() < Duration::from_secs(15),
            "ps and logs took {:?}",
            q.elapsed()
        );
        served += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    let stored = a.run(&["logs", &id]).stdout.len();
    let peak = rss.max_kib();

    let r = read_reply(&mut half_hello);
    match r.body {
        Response::Error(e) => assert!(e.message.contains("no Hello"), "{e:?}"),
        other => panic!("unexpected {other:?}"),
    }
    let mut b = [0u8; 1];
    assert!(matches!(half_hello.read(&mut b), Ok(0) | Err(_)));

    // The stalled frame can still be finished: the connection was only
    // waiting.
    half_frame.write_all(&full[7..]).unwrap();
    let r = read_reply(&mut half_frame);
    assert!(matches!(r.body, Response::List(_)), "{r:?}");

    drop((half_hello, half_frame, deaf));
    fds_back_to(&a, base);
    eprintln!(
        "slow clients: {served} rounds of ps+logs served while 64 never-read followers and two \
         stalled frames were held; {stored} bytes stored; agent RSS at most {:.1} MiB meanwhile",
        peak as f64 / 1024.0
    );
    assert!(peak < MAX_AGENT_RSS_KIB, "peak RSS {peak} KiB");
    assert_eq!(a.run(&["rm", "-f", &id]).status.code(), Some(0));
    a.assert_no_processes(&id);
}

#[test]
fn thousands_of_random_frames() {
    let a = TestAgent::start();
    let mut rng = XorShift(0x5eed_1234_abcd_0001);

    // Well framed, random payloads: each gets an answer and the
    // connection goes on. Replies are drained on another thread so the
    // agent never waits on this client.
    let mut s = a.raw_client();
    let mut r = s.try_clone().unwrap();
    r.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let reader = std::thread::spawn(move || {
        let mut replies = 0u64;
        loop {
            let m: ServerMessage = match frame::read_frame(&mut r, MAX_FRAME_LEN) {
                Ok(Some(m)) => m,
                other => panic!("the connection ended: {other:?}"),
            };
            replies += 1;
            if m.id == 424_242 {
                assert!(matches!(m.body, Response::List(_)), "{m:?}");
                return replies;
            }
        }
    });
    const FRAMES: usize = 3000;
    for _ in 0..FRAMES {
        let len = (rng.next() % 300) as usize;
        let payload = rng.bytes(len);
        let h = Header {
            version: FRAME_VERSION,
            flags: 0,
            len: len as u32,
        };
        s.write_all(&h.to_bytes()).unwrap();
        s.write_all(&payload).unwrap();
    }
    frame::write_frame(
        &mut s,
        &ClientMessage {
            id: 424_242,
            body: Request::List { all: true },
        },
    )
    .unwrap();
    let replies = reader.join().expect("reader");

    // Raw random bytes on fresh connections: closed, nobody else hurt.
    for i in 0..200 {
        let mut s = a.raw_connection();
        if i % 2 == 0 {
            raw_hello(&mut s);
        }
        let n = 1 + (rng.next() % 4096) as usize;
        let _ = s.write_all(&rng.bytes(n));
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
    eprintln!("random frames: {FRAMES} random payloads answered ({replies} replies), 200 connections of random bytes");
    still_serving(&a);
    // Whatever the random requests asked for, nothing is left running.
    a.assert_no_container_processes();
}

#[test]
fn idle_connections_are_closed_but_streams_and_waits_are_not() {
    const IDLE: Duration = Duration::from_secs(3);
    let a = TestAgent::start_with(AgentOptions {
        extra: vec!["--idle-timeout".into(), IDLE.as_secs().to_string()],
        ..Default::default()
    });
    // A VM that runs well past the idle timeout.
    let id = a.detach(&["busybox", "--", "sh", "-c", "echo hi; sleep 12"]);
    let base = a.fd_count();
    let long_read = |s: &UnixStream| {
        s.set_read_timeout(Some(Duration::from_secs(120)))
            .expect("timeout")
    };
    let t = Instant::now();

    // Never says hello: dropped at the hello bound (here the idle timeout,
    // shorter than 10 s).
    let mut mute = a.raw_connection();
    // Says hello, then nothing.
    let mut idle = a.raw_client();
    // A wait and a logs -f in progress: never idle, however quiet.
    let mut waiting = a.raw_client();
    long_read(&waiting);
    frame::write_frame(
        &mut waiting,
        &ClientMessage {
            id: 7,
            body: Request::Wait { vm: id.clone() },
        },
    )
    .unwrap();
    let mut following = a.raw_client();
    long_read(&following);
    frame::write_frame(
        &mut following,
        &ClientMessage {
            id: 8,
            body: Request::Logs {
                vm: id.clone(),
                follow: true,
            },
        },
    )
    .unwrap();
    // Busy with small requests more often than the timeout: each frame
    // restarts the clock.
    let chatty = {
        let mut s = a.raw_client();
        std::thread::spawn(move || {
            let t = Instant::now();
            let mut n = 0u64;
            while t.elapsed() < 3 * IDLE {
                frame::write_frame(
                    &mut s,
                    &ClientMessage {
                        id: 100 + n,
                        body: Request::List { all: true },
                    },
                )
                .unwrap();
                let r = read_reply(&mut s);
                assert!(matches!(r.body, Response::List(_)), "{r:?}");
                n += 1;
                std::thread::sleep(IDLE / 3);
            }
            n
        })
    };
    // The engine's client library: an idle connection's next call says
    // why it was closed, and that retrying can help.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = rt.block_on(a.client());

    let closed_with = |s: &mut UnixStream, what: &str| {
        let r = read_reply(s);
        let Response::Error(e) = r.body else {
            panic!("{what}: {r:?}")
        };
        assert_eq!(r.id, 0, "{what}: {e:?}");
        assert_eq!(e.code, ErrorCode::TimedOut, "{what}: {e:?}");
        assert!(e.retryable());
        let mut b = [0u8; 1];
        assert!(
            matches!(s.read(&mut b), Ok(0) | Err(_)),
            "{what}: still open"
        );
        e.message
    };
    let m = closed_with(&mut mute, "no hello");
    let mute_after = t.elapsed();
    assert!(m.contains("no Hello"), "{m}");
    let m = closed_with(&mut idle, "idle");
    let idle_after = t.elapsed();
    assert!(m.contains("idle"), "{m}");
    assert!(
        mute_after >= IDLE - Duration::from_millis(500) && idle_after >= IDLE,
        "closed too early: {mute_after:?}, {idle_after:?}"
    );
    assert!(
        idle_after < IDLE * 5,
        "the idle client was closed only after {idle_after:?}"
    );
    let rounds = chatty.join().expect("the chatty client was closed");
    let e = rt
        .block_on(client.list(true))
        .expect_err("the idle library client still answered");
    match e {
        vmlet_protocol::client::ClientError::Api(e) => {
            assert_eq!(e.code, ErrorCode::TimedOut, "{e:?}")
        }
        other => panic!("the idle library client saw {other:?}"),
    }

    // The waiter and the follower outlived several timeouts: both get
    // their answers when the VM exits, then go idle and are closed.
    let r = read_reply(&mut waiting);
    assert!(
        matches!(&r.body, Response::Exited(e) if e.code == 0),
        "{r:?}"
    );
    let waited = t.elapsed();
    assert!(waited > 2 * IDLE, "the VM exited after only {waited:?}");
    let mut out = Vec::new();
    loop {
        let r = read_reply(&mut following);
        match r.body {
            Response::Output { data, .. } => out.extend(data),
            Response::StreamEnd { exit } => {
                assert_eq!(exit.map(|e| e.code), Some(0));
                break;
            }
            other => panic!("the follower got {other:?}"),
        }
    }
    assert_eq!(out, b"hi\n");
    closed_with(&mut waiting, "idle after its wait");
    closed_with(&mut following, "idle after its stream");
    eprintln!(
        "idle timeout {IDLE:?}: a mute client was dropped after {mute_after:?}, an idle one \
         after {idle_after:?}; a wait and a logs -f lived {waited:?} until the VM exited; a \
         client sending a request every {:?} was served {rounds} times",
        IDLE / 3
    );
    drop((mute, idle, waiting, following, client));
    fds_back_to(&a, base);
    still_serving(&a);
    assert_eq!(a.run(&["rm", &id]).status.code(), Some(0));
    a.assert_no_processes(&id);
}
