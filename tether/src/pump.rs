//! The process's stdio: output pipes to the host in bounded chunks, host
//! bytes to the stdin pipe.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::time::timeout;
use vmlet_protocol::frame::MAX_CHUNK;
use vmlet_protocol::guest::GuestMessage;

use crate::link::Outbox;
use crate::log;

/// Which output stream a pump carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Output {
    Stdout,
    Stderr,
}

impl Output {
    /// Both streams, in [`Output::index`] order.
    pub(crate) const BOTH: [Output; 2] = [Output::Stdout, Output::Stderr];

    /// 0 for stdout, 1 for stderr.
    pub(crate) fn index(self) -> usize {
        match self {
            Output::Stdout => 0,
            Output::Stderr => 1,
        }
    }

    pub(crate) fn message(self, chunk: Vec<u8>) -> GuestMessage {
        match self {
            Output::Stdout => GuestMessage::Stdout(chunk),
            Output::Stderr => GuestMessage::Stderr(chunk),
        }
    }
}

/// Copies `pipe` to the host until end of file, in chunks of at most
/// [`MAX_CHUNK`] bytes. Each chunk waits for room in the outbox, so a host
/// that does not keep up (or does not acknowledge) makes the process block
/// on write instead of the tether buffering without bound. Returns the
/// bytes carried.
///
/// Once `draining` turns true (every process was killed), a pipe that stays
/// silent for `idle` without reaching end of file is given up on: only a
/// process stuck in the kernel holds it. Time spent waiting for the host
/// does not count, so a host that is away (the agent restarting) never
/// costs output.
pub(crate) async fn output<R: AsyncRead + Unpin>(
    mut pipe: R,
    which: Output,
    out: Outbox,
    mut draining: watch::Receiver<bool>,
    idle: Duration,
) -> u64 {
    let mut buf = vec![0u8; MAX_CHUNK];
    let mut total = 0u64;
    loop {
        // `read` is cancel safe: nothing is lost when the select drops it.
        let read = if *draining.borrow() {
            match timeout(idle, pipe.read(&mut buf)).await {
                Ok(r) => r,
                Err(_) => {
                    log!("the process's {which:?} stayed open {idle:?} after every process was killed; giving up on it");
                    return total;
                }
            }
        } else {
            tokio::select! {
                r = pipe.read(&mut buf) => r,
                // A sender that went away means no draining ever.
                Ok(_) = draining.wait_for(|d| *d) => continue,
            }
        };
        let n = match read {
            Ok(0) => return total,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log!("reading the process's {which:?} failed: {e}");
                return total;
            }
        };
        total += n as u64;
        if out.output(which, buf[..n].to_vec()).await.is_err() {
            return total;
        }
    }
}

/// What the host asks of the process's stdin.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum StdinOp {
    Data(Vec<u8>),
    Close,
}

/// Writes host bytes to the stdin pipe, in order and in full, until
/// [`StdinOp::Close`] or the channel closes; then closes the pipe. With no
/// pipe (the spec wanted no stdin) or once the process has closed its end,
/// further bytes are discarded so the host is never blocked by them.
pub(crate) async fn stdin<W: AsyncWrite + Unpin>(
    mut pipe: Option<W>,
    mut ops: mpsc::Receiver<StdinOp>,
) {
    while let Some(op) = ops.recv().await {
        match op {
            StdinOp::Data(bytes) => {
                let Some(w) = pipe.as_mut() else { continue };
                if let Err(e) = w.write_all(&bytes).await {
                    if e.kind() != std::io::ErrorKind::BrokenPipe {
                        log!("writing the process's stdin failed: {e}");
                    }
                    pipe = None;
                }
            }
            StdinOp::Close => pipe = None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::{self, Policy};
    use crate::testutil::{not_draining, os_pipe, Pairs};
    use tokio::net::UnixStream;
    use vmlet_protocol::frame::MAX_FRAME_LEN;
    use vmlet_protocol::guest::HostMessage;

    /// A link on `stream` alone, with a stdin queue nobody reads.
    fn one_connection(
        stream: UnixStream,
        inbound: mpsc::Sender<HostMessage>,
    ) -> (link::Outbox, tokio::task::JoinHandle<()>) {
        let hello = GuestMessage::Started { pid: 1 };
        let stdin = mpsc::channel(1).0;
        link::start(
            Pairs::default(),
            stream,
            &hello,
            inbound,
            stdin,
            Policy::default(),
            4,
        )
    }

    /// Two pumps push several MiB each through real pipes and the link at
    /// once, against a slow host: every chunk is at most MAX_CHUNK, and
    /// each stream arrives whole and in order.
    #[tokio::test]
    async fn pumps_chunk_and_lose_nothing() {
        let (a, mut host) = UnixStream::pair().unwrap();
        let (in_tx, _in_rx) = mpsc::channel::<HostMessage>(1);
        // (Without a spec the link is not resuming: fine for one connection.)
        let hello = GuestMessage::Started { pid: 1 };
        let (out, _task) = one_connection(a, in_tx);

        let pattern = |seed: u8, len: usize| -> Vec<u8> {
            (0..len)
                .map(|i| (i as u8).wrapping_mul(31) ^ seed)
                .collect()
        };
        let sizes = [
            (Output::Stdout, 3 << 20, 1u8),
            (Output::Stderr, (5 << 20) + 17, 2u8),
        ];
        let mut pumps = Vec::new();
        for (which, len, seed) in sizes {
            let (mut w, r) = os_pipe();
            let data = pattern(seed, len);
            tokio::spawn(async move {
                // Odd-sized writes, so chunk and write boundaries differ.
                for piece in data.chunks(100_003) {
                    w.write_all(piece).await.unwrap();
                }
            });
            pumps.push(tokio::spawn(output(
                r,
                which,
                out.clone(),
                not_draining(),
                Duration::from_secs(10),
            )));
        }
        drop(out);

        let mut got = (Vec::new(), Vec::new());
        let expect = (pattern(1, 3 << 20), pattern(2, (5 << 20) + 17));
        assert_eq!(
            vmlet_protocol::aio::read_frame::<_, GuestMessage>(&mut host, MAX_FRAME_LEN)
                .await
                .unwrap(),
            Some(hello)
        );
        let mut n = 0;
        while got.0.len() < expect.0.len() || got.1.len() < expect.1.len() {
            if n % 16 == 0 {
                // A slow host: the pumps must wait, not drop.
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                // And one that acknowledges, or the link would stop at its
                // retention cap (8 MiB) before the end.
                let ack = HostMessage::Ack {
                    stdout: got.0.len() as u64,
                    stderr: got.1.len() as u64,
                };
                vmlet_protocol::aio::write_frame(&mut host, &ack)
                    .await
                    .unwrap();
            }
            n += 1;
            let m = vmlet_protocol::aio::read_frame::<_, GuestMessage>(&mut host, MAX_FRAME_LEN)
                .await
                .unwrap()
                .unwrap();
            match m {
                GuestMessage::Stdout(c) => {
                    assert!(!c.is_empty() && c.len() <= MAX_CHUNK);
                    got.0.extend_from_slice(&c);
                }
                GuestMessage::Stderr(c) => {
                    assert!(!c.is_empty() && c.len() <= MAX_CHUNK);
                    got.1.extend_from_slice(&c);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(got.0 == expect.0, "stdout differs");
        assert!(got.1 == expect.1, "stderr differs");
        let totals: Vec<u64> = futures_join(pumps).await;
        assert_eq!(totals, vec![3 << 20, (5 << 20) + 17]);
    }

    async fn futures_join(hs: Vec<tokio::task::JoinHandle<u64>>) -> Vec<u64> {
        let mut v = Vec::new();
        for h in hs {
            v.push(h.await.unwrap());
        }
        v
    }

    /// Once draining, a pipe held open but silent is given up on after
    /// the idle time, keeping what it carried.
    #[tokio::test]
    async fn draining_gives_up_on_a_silent_pipe() {
        let (a, _host) = UnixStream::pair().unwrap();
        let (in_tx, _in_rx) = mpsc::channel::<HostMessage>(1);
        let (out, _task) = one_connection(a, in_tx);
        let (mut w, r) = os_pipe();
        w.write_all(b"last words").await.unwrap();
        let (draining, rx) = watch::channel(false);
        let idle = Duration::from_millis(100);
        let pump = tokio::spawn(output(r, Output::Stdout, out, rx, idle));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!pump.is_finished(), "gave up before draining");
        draining.send_replace(true);
        let carried = timeout(Duration::from_secs(5), pump)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(carried, 10);
        drop(w);
    }

    /// Waiting for a host that is away does not count as a silent pipe:
    /// a pump blocked on the link for longer than the idle time while
    /// draining still delivers everything once a host resumes.
    #[tokio::test]
    async fn draining_waits_for_an_absent_host() {
        let pairs = Pairs::default();
        let mut host1 = pairs.next();
        let first = pairs.0.lock().unwrap().pop_front().unwrap();
        let (in_tx, mut in_rx) = mpsc::channel::<HostMessage>(4);
        let policy = Policy {
            retain_cap: 50_000,
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
            ..Policy::default()
        };
        let hello = GuestMessage::Started { pid: 1 };
        let (out, _task) = link::start(
            pairs.clone(),
            first,
            &hello,
            in_tx,
            mpsc::channel(1).0,
            policy,
            1,
        );
        let spec = HostMessage::Spec(Default::default());
        vmlet_protocol::aio::write_frame(&mut host1, &spec)
            .await
            .unwrap();
        assert_eq!(in_rx.recv().await, Some(spec));
        drop(host1);

        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (mut w, r) = os_pipe();
        let writer = {
            let data = data.clone();
            tokio::spawn(async move { w.write_all(&data).await.unwrap() })
        };
        let (_draining, rx) = watch::channel(true);
        let pump = tokio::spawn(output(
            r,
            Output::Stdout,
            out,
            rx,
            Duration::from_millis(50),
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !pump.is_finished(),
            "the pump gave up while the host was away"
        );

        let mut host2 = pairs.next();
        let mut got = Vec::new();
        let resume = HostMessage::Resume {
            stdout: 0,
            stderr: 0,
        };
        let mut first = true;
        while got.len() < data.len() {
            let m = vmlet_protocol::aio::read_frame::<_, GuestMessage>(&mut host2, MAX_FRAME_LEN)
                .await
                .unwrap()
                .unwrap();
            match m {
                GuestMessage::Started { .. } if first => {
                    first = false;
                    vmlet_protocol::aio::write_frame(&mut host2, &resume)
                        .await
                        .unwrap();
                    continue;
                }
                GuestMessage::Stdout(c) => got.extend_from_slice(&c),
                GuestMessage::StdinAck { received: 0 } => continue,
                other => panic!("unexpected {other:?}"),
            }
            let ack = HostMessage::Ack {
                stdout: got.len() as u64,
                stderr: 0,
            };
            vmlet_protocol::aio::write_frame(&mut host2, &ack)
                .await
                .unwrap();
        }
        assert!(got == data);
        writer.await.unwrap();
        assert_eq!(pump.await.unwrap(), data.len() as u64);
    }

    #[tokio::test]
    async fn stdin_writes_in_order_then_closes() {
        let (w, mut r) = os_pipe();
        let (tx, rx) = mpsc::channel(2);
        let task = tokio::spawn(stdin(Some(w), rx));
        // A slow reader: the writer must wait for it, in order, in full.
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 7000];
            loop {
                tokio::time::sleep(std::time::Duration::from_micros(200)).await;
                match r.read(&mut buf).await.unwrap() {
                    0 => return got,
                    n => got.extend_from_slice(&buf[..n]),
                }
            }
        });
        let mut expect = Vec::new();
        for i in 0..100u8 {
            let chunk = vec![i; 3000];
            expect.extend_from_slice(&chunk);
            tx.send(StdinOp::Data(chunk)).await.unwrap();
        }
        tx.send(StdinOp::Close).await.unwrap();
        // Bytes after Close are discarded, not an error.
        tx.send(StdinOp::Data(b"late".to_vec())).await.unwrap();
        let got = reader.await.unwrap();
        assert!(got == expect);
        drop(tx);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn stdin_survives_a_reader_that_went_away() {
        let (w, r) = os_pipe();
        drop(r);
        let (tx, rx) = mpsc::channel(2);
        let task = tokio::spawn(stdin(Some(w), rx));
        for _ in 0..10 {
            tx.send(StdinOp::Data(vec![0; 100_000])).await.unwrap();
        }
        drop(tx);
        task.await.unwrap();
    }
}
