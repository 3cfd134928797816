//! Dev-only host side of a tether boot test: listens where
//! vhost-device-vsock forwards the guest's connections to port 1024
//! (`<uds-path>_1024`), hands the tether a spec, prints everything it
//! sends, feeds stdin, acknowledges output and the exit, and (like the
//! agent) answers a reconnecting tether's hello with `Resume` and the
//! offsets it stored.
//!
//! ```text
//! host --listen /tmp/x/vm.vsock_1024 [--layer SERIAL:FSTYPE]... [--writable SERIAL:FSTYPE]
//!      [--env K=V]... [--workdir DIR] [--hostname NAME] [--stdin LINE]... [--signal N]
//!      [--drop-after-started] [--drop-after-bytes N] [--stdout-file F] [--stderr-file F]
//!      [--timeout SECS] -- ARGV...
//! ```
//!
//! `--stdin LINE`: send LINE and a newline, wait until stdout has echoed it,
//! then the next; CloseStdin after the last. `--signal N`: send signal N once
//! the first output arrived. `--drop-after-started`: hang up after Started
//! and accept the tether's reconnection. `--drop-after-bytes N`: hang up
//! once N stdout bytes are stored, without reading what is in flight, and
//! accept the reconnection. `--stdout-file`/`--stderr-file`: write the
//! stored streams there at the exit. Every output frame is acknowledged
//! once stored. Exits with the container's code
//! (128+signal if killed). Without `--layer`, the one layer is `layer0:ext4`.

use std::time::{Duration, Instant};

use tokio::net::{UnixListener, UnixStream};
use tokio::time::timeout;
use vmlet_protocol::aio::{read_frame, write_frame};
use vmlet_protocol::guest::{DiskSpec, GuestMessage, HostMessage, ProcessSpec, MAX_GUEST_FRAME};

#[derive(Debug, Default)]
struct Args {
    listen: String,
    spec: ProcessSpec,
    stdin: Vec<String>,
    signal: Option<i32>,
    drop_after_started: bool,
    drop_after_bytes: Option<usize>,
    stdout_file: Option<String>,
    stderr_file: Option<String>,
    timeout: u64,
}

fn disk(s: &str) -> DiskSpec {
    let (serial, fstype) = s.split_once(':').unwrap_or((s, "ext4"));
    DiskSpec {
        serial: serial.into(),
        fstype: fstype.into(),
    }
}

fn parse() -> Args {
    let mut a = Args {
        timeout: 120,
        spec: ProcessSpec {
            hostname: "vmlet-test".into(),
            ..ProcessSpec::default()
        },
        ..Args::default()
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--listen" => a.listen = val(),
            "--layer" => a.spec.layers.push(disk(&val())),
            "--writable" => a.spec.writable = Some(disk(&val())),
            "--env" => a.spec.env.push(val()),
            "--workdir" => a.spec.workdir = Some(val()),
            "--hostname" => a.spec.hostname = val(),
            "--stdin" => a.stdin.push(val()),
            "--signal" => a.signal = Some(val().parse().expect("signal number")),
            "--timeout" => a.timeout = val().parse().expect("seconds"),
            "--drop-after-started" => a.drop_after_started = true,
            "--drop-after-bytes" => a.drop_after_bytes = Some(val().parse().expect("bytes")),
            "--stdout-file" => a.stdout_file = Some(val()),
            "--stderr-file" => a.stderr_file = Some(val()),
            "--" => {
                a.spec.argv = it.by_ref().collect();
                break;
            }
            other => panic!("unknown argument {other}"),
        }
    }
    if a.spec.layers.is_empty() {
        a.spec.layers.push(disk("layer0:ext4"));
    }
    if a.spec.env.is_empty() {
        a.spec.env.push("PATH=/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    a.spec.stdin = !a.stdin.is_empty();
    assert!(!a.listen.is_empty(), "--listen is required");
    a
}

fn show(bytes: &[u8]) -> String {
    if bytes.len() <= 200 {
        format!("{:?}", String::from_utf8_lossy(bytes))
    } else {
        format!("<{} bytes>", bytes.len())
    }
}

async fn accept(l: &UnixListener, t0: Instant) -> UnixStream {
    let (s, _) = l.accept().await.expect("accept");
    println!(
        "[{:>8.1} ms] tether connected",
        t0.elapsed().as_secs_f64() * 1e3
    );
    s
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = parse();
    let deadline = Duration::from_secs(args.timeout);
    match timeout(deadline, session(args)).await {
        Ok(code) => std::process::exit(code),
        Err(_) => {
            println!("TIMEOUT after {deadline:?}");
            std::process::exit(124);
        }
    }
}

async fn session(args: Args) -> i32 {
    let _ = std::fs::remove_file(&args.listen);
    let listener = UnixListener::bind(&args.listen).expect("bind");
    let t0 = Instant::now();
    println!("listening on {}", args.listen);
    let mut s = accept(&listener, t0).await;
    let mut spec_sent = false;
    let mut stdin_lines = args.stdin.clone().into_iter();
    let mut awaiting_echo: Option<String> = None;
    let mut signal = args.signal;
    let mut dropped = false;
    let mut drop_after_bytes = args.drop_after_bytes;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut acked = 0usize;
    let mut acks = 0u32;
    loop {
        let msg = match read_frame::<_, GuestMessage>(&mut s, MAX_GUEST_FRAME).await {
            Ok(Some(m)) => m,
            Ok(None) => {
                println!("tether hung up");
                return 125;
            }
            Err(e) => {
                println!("read failed: {e}");
                return 125;
            }
        };
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        match &msg {
            GuestMessage::Stdout(b) => println!("[{ms:>8.1} ms] Stdout {}", show(b)),
            GuestMessage::Stderr(b) => println!("[{ms:>8.1} ms] Stderr {}", show(b)),
            m => println!("[{ms:>8.1} ms] {m:?}"),
        }
        let mut reply = Vec::new();
        match msg {
            GuestMessage::Hello { .. } if !spec_sent => {
                spec_sent = true;
                reply.push(HostMessage::Spec(args.spec.clone()));
            }
            GuestMessage::Hello { .. } => {
                println!(
                    "(re-hello after reconnect: Resume from stdout={} stderr={})",
                    out.len(),
                    err.len()
                );
                reply.push(HostMessage::Resume {
                    stdout: out.len() as u64,
                    stderr: err.len() as u64,
                });
            }
            GuestMessage::Started { .. } => {
                if args.drop_after_started && !dropped {
                    dropped = true;
                    println!("dropping the connection, accepting again in 1 s");
                    drop(s);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    s = accept(&listener, t0).await;
                    continue;
                }
                if let Some(line) = stdin_lines.next() {
                    reply.push(HostMessage::Stdin(format!("{line}\n").into_bytes()));
                    awaiting_echo = Some(line);
                }
            }
            GuestMessage::Stdout(b) => {
                out.extend_from_slice(&b);
                if let Some(sig) = signal.take() {
                    reply.push(HostMessage::Signal(sig));
                }
                let echoed = awaiting_echo
                    .as_ref()
                    .is_some_and(|l| String::from_utf8_lossy(&out).contains(&format!("{l}\n")));
                if echoed {
                    match stdin_lines.next() {
                        Some(line) => {
                            reply.push(HostMessage::Stdin(format!("{line}\n").into_bytes()));
                            awaiting_echo = Some(line);
                        }
                        None => {
                            reply.push(HostMessage::CloseStdin);
                            awaiting_echo = None;
                        }
                    }
                }
            }
            GuestMessage::Stderr(b) => err.extend_from_slice(&b),
            GuestMessage::Failed { code, .. } => {
                write_frame(&mut s, &HostMessage::ExitAck)
                    .await
                    .expect("ack");
                println!("summary: failed code={code}");
                wait_hangup(&mut s, t0).await;
                return code;
            }
            GuestMessage::Exited { code, signal } => {
                write_frame(&mut s, &HostMessage::ExitAck)
                    .await
                    .expect("ack");
                println!(
                    "summary: stdout={} bytes stderr={} bytes code={code:?} signal={signal:?}",
                    out.len(),
                    err.len()
                );
                println!("acks sent: {acks}");
                for (file, data) in [(&args.stdout_file, &out), (&args.stderr_file, &err)] {
                    if let Some(f) = file {
                        std::fs::write(f, data).expect("write the stream file");
                    }
                }
                wait_hangup(&mut s, t0).await;
                return code.unwrap_or_else(|| 128 + signal.unwrap_or(0));
            }
            // Messages newer than this example are shown above and ignored.
            #[allow(unreachable_patterns)]
            _ => {}
        }
        // Unlike the agent (a timer), this loop only wakes on a frame, so
        // the last bytes of a burst would go unacknowledged until the next
        // one and the tether would take the connection for stalled: every
        // output frame is acknowledged here, at once.
        let stored = out.len() + err.len();
        if stored > acked {
            reply.push(HostMessage::Ack {
                stdout: out.len() as u64,
                stderr: err.len() as u64,
            });
            acked = stored;
            acks += 1;
        }
        if drop_after_bytes.is_some_and(|n| out.len() >= n) {
            drop_after_bytes = None;
            // As an agent that dies with bytes received but not stored: read
            // on without storing (ending mid-frame, most likely), then hang up.
            let discarded = discard(&mut s, 300_000).await;
            println!(
                "dropping the connection mid-stream with stdout={} stderr={} stored, \
                 {discarded} more bytes received and discarded; accepting again in 1 s",
                out.len(),
                err.len()
            );
            drop(s);
            tokio::time::sleep(Duration::from_secs(1)).await;
            s = accept(&listener, t0).await;
            continue;
        }
        for m in reply {
            write_frame(&mut s, &m).await.expect("write");
        }
    }
}

/// Reads and throws away up to `limit` bytes (less if the stream goes
/// quiet for half a second); returns how many.
async fn discard(s: &mut UnixStream, limit: usize) -> usize {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 7001];
    let mut n = 0;
    while n < limit {
        let want = buf.len().min(limit - n);
        match timeout(Duration::from_millis(500), s.read(&mut buf[..want])).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(k)) => n += k,
        }
    }
    n
}

/// After the ack the guest powers off; its end of the stream closes.
async fn wait_hangup(s: &mut UnixStream, t0: Instant) {
    match timeout(
        Duration::from_secs(30),
        read_frame::<_, GuestMessage>(s, MAX_GUEST_FRAME),
    )
    .await
    {
        Ok(Ok(None)) | Ok(Err(_)) => println!(
            "[{:>8.1} ms] tether hung up after the ack",
            t0.elapsed().as_secs_f64() * 1e3
        ),
        Ok(Ok(Some(m))) => println!("unexpected after the ack: {m:?}"),
        Err(_) => println!("tether still connected 30 s after the ack"),
    }
}
