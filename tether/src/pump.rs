//! The process's stdio: output pipes to the host in bounded chunks, host
//! bytes to the stdin pipe.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
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
    fn message(self, chunk: Vec<u8>) -> GuestMessage {
        match self {
            Output::Stdout => GuestMessage::Stdout(chunk),
            Output::Stderr => GuestMessage::Stderr(chunk),
        }
    }
}

/// Copies `pipe` to the host until end of file, in chunks of at most
/// [`MAX_CHUNK`] bytes. Each chunk waits for room in the outbox, so a host
/// that does not keep up makes the process block on write instead of the
/// tether buffering without bound. Returns the bytes carried.
pub(crate) async fn output<R: AsyncRead + Unpin>(mut pipe: R, which: Output, out: Outbox) -> u64 {
    let mut buf = vec![0u8; MAX_CHUNK];
    let mut total = 0u64;
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) => return total,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log!("reading the process's {which:?} failed: {e}");
                return total;
            }
        };
        total += n as u64;
        if out.send(&which.message(buf[..n].to_vec())).await.is_err() {
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
    use crate::link::{self, Connector, Policy};
    use std::io;
    use tokio::net::unix::pipe;
    use tokio::net::UnixStream;
    use vmlet_protocol::frame::MAX_FRAME_LEN;
    use vmlet_protocol::guest::HostMessage;

    struct Never;
    impl Connector for Never {
        type Stream = UnixStream;
        async fn connect(&mut self) -> io::Result<UnixStream> {
            Err(io::Error::from(io::ErrorKind::ConnectionRefused))
        }
    }

    fn os_pipe() -> (pipe::Sender, pipe::Receiver) {
        let (r, w) = nix::unistd::pipe().unwrap();
        (
            pipe::Sender::from_owned_fd(w).unwrap(),
            pipe::Receiver::from_owned_fd(r).unwrap(),
        )
    }

    /// Two pumps push several MiB each through real pipes and the link at
    /// once, against a slow host: every chunk is at most MAX_CHUNK, and
    /// each stream arrives whole and in order.
    #[tokio::test]
    async fn pumps_chunk_and_lose_nothing() {
        let (a, mut host) = UnixStream::pair().unwrap();
        let (in_tx, _in_rx) = mpsc::channel::<HostMessage>(1);
        let hello = GuestMessage::Started { pid: 1 };
        let (out, _task) = link::start(Never, a, &hello, in_tx, Policy::default(), 4);

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
            pumps.push(tokio::spawn(output(r, which, out.clone())));
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
