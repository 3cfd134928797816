//! The tether's end of the host connection: one task owns the stream,
//! survives the host going away, and keeps frames in order.
//!
//! Everything the tether sends goes through an [`Outbox`] (a bounded
//! channel) to the link task, the only writer, so frames never interleave.
//! Each connection gets its own reader task, the only caller of the
//! not-cancel-safe `read_frame`, which forwards host messages to a channel.
//!
//! Backpressure: while connected, a host that stops reading blocks the
//! link's write, the outbox fills, and the stdio pumps stop reading the
//! pipes, so the process blocks on write. While disconnected, the link keeps
//! draining the outbox into memory up to [`Policy::buffer_cap`] bytes, then
//! stops, with the same effect. Nothing is dropped either way; on reconnect
//! the link says hello again and sends what it buffered.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};
use vmlet_protocol::frame::{self, FrameError, MAX_FRAME_LEN};
use vmlet_protocol::guest::{GuestMessage, HostMessage};

use crate::log;

/// How the link connects and reconnects.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    /// First delay between reconnection attempts; doubles up to `max_delay`.
    pub(crate) min_delay: Duration,
    /// The longest delay between attempts.
    pub(crate) max_delay: Duration,
    /// How long one connection attempt may take.
    pub(crate) attempt_timeout: Duration,
    /// Bytes of frames buffered while disconnected before the pumps pause.
    pub(crate) buffer_cap: usize,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            min_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(2),
            buffer_cap: 8 << 20,
        }
    }
}

/// Something that opens a new stream to the host.
pub(crate) trait Connector: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static;
    fn connect(&mut self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

/// Tries `connector` until it succeeds or `patience` has passed, waiting a
/// little longer after each failure. Returns the last error on giving up.
pub(crate) async fn connect_within<C: Connector>(
    connector: &mut C,
    policy: &Policy,
    patience: Duration,
) -> io::Result<C::Stream> {
    let deadline = Instant::now() + patience;
    let mut delay = policy.min_delay;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let err = match timeout(policy.attempt_timeout, connector.connect()).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => e,
            Err(_) => io::Error::new(io::ErrorKind::TimedOut, "connection attempt timed out"),
        };
        if Instant::now() + delay >= deadline {
            log!("giving up connecting to the host after {attempts} attempts");
            return Err(err);
        }
        if attempts == 1 {
            log!("host not reachable yet ({err}); retrying");
        }
        sleep(delay).await;
        delay = (delay * 2).min(policy.max_delay);
    }
}

/// One encoded frame on its way to the host.
#[derive(Debug)]
pub(crate) struct Outgoing {
    frame: Vec<u8>,
    /// Told once the frame is fully written to a connection.
    written: Option<oneshot::Sender<()>>,
}

/// The sending side of the link; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Outbox(mpsc::Sender<Outgoing>);

/// The link task has ended; nothing more can be sent.
#[derive(Debug, thiserror::Error)]
#[error("the host link has shut down")]
pub(crate) struct Closed;

impl Outbox {
    /// Queues `msg`. Waits while the queue is full (backpressure).
    pub(crate) async fn send(&self, msg: &GuestMessage) -> Result<(), Closed> {
        self.queue(msg, None).await
    }

    /// Queues `msg`; the returned receiver resolves once it has been written
    /// to a connection (or errs if the link ends first).
    pub(crate) async fn send_confirmed(
        &self,
        msg: &GuestMessage,
    ) -> Result<oneshot::Receiver<()>, Closed> {
        let (tx, rx) = oneshot::channel();
        self.queue(msg, Some(tx)).await?;
        Ok(rx)
    }

    async fn queue(
        &self,
        msg: &GuestMessage,
        written: Option<oneshot::Sender<()>>,
    ) -> Result<(), Closed> {
        let frame = match frame::encode(msg) {
            Ok(f) => f,
            Err(e) => {
                // Our own messages are bounded by construction; this is a bug.
                log!("cannot encode a message: {e}");
                return Ok(());
            }
        };
        self.0
            .send(Outgoing { frame, written })
            .await
            .map_err(|_| Closed)
    }
}

/// Starts the link on an already connected `first` stream. `hello` is sent
/// first on every connection. Host messages go to `inbound`.
pub(crate) fn start<C: Connector>(
    connector: C,
    first: C::Stream,
    hello: &GuestMessage,
    inbound: mpsc::Sender<HostMessage>,
    policy: Policy,
    queue: usize,
) -> (Outbox, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(queue);
    let hello = frame::encode(hello).expect("the hello is small");
    let link = Link {
        connector,
        hello,
        out: rx,
        out_open: true,
        inbound,
        pending: VecDeque::new(),
        pending_bytes: 0,
        policy,
    };
    (Outbox(tx), tokio::spawn(link.run(first)))
}

struct Link<C: Connector> {
    connector: C,
    hello: Vec<u8>,
    out: mpsc::Receiver<Outgoing>,
    /// False once every [`Outbox`] is gone.
    out_open: bool,
    inbound: mpsc::Sender<HostMessage>,
    /// Frames taken from `out` but not yet written to any connection.
    pending: VecDeque<Outgoing>,
    pending_bytes: usize,
    policy: Policy,
}

impl<C: Connector> Link<C> {
    async fn run(mut self, first: C::Stream) {
        let mut stream = first;
        loop {
            let (rd, mut wr) = tokio::io::split(stream);
            let mut reader = tokio::spawn(read_loop(rd, self.inbound.clone()));
            let why = self.serve(&mut wr, &mut reader).await;
            reader.abort();
            if !self.out_open && self.pending.is_empty() && self.inbound.is_closed() {
                return;
            }
            log!("host connection lost ({why}); reconnecting");
            stream = self.reconnect().await;
            log!("reconnected to the host");
        }
    }

    /// Serves one connection until it fails; returns why.
    async fn serve(
        &mut self,
        wr: &mut WriteHalf<C::Stream>,
        reader: &mut JoinHandle<String>,
    ) -> String {
        if let Err(e) = write(wr, &self.hello).await {
            return format!("cannot send the hello: {e}");
        }
        while let Some(o) = self.pending.front() {
            if let Err(e) = write(wr, &o.frame).await {
                return format!("write failed: {e}");
            }
            let o = self.pending.pop_front().expect("front exists");
            self.pending_bytes -= o.frame.len();
            confirm(o);
        }
        loop {
            tokio::select! {
                why = &mut *reader => {
                    return why.unwrap_or_else(|e| format!("reader failed: {e}"));
                }
                next = self.out.recv(), if self.out_open => match next {
                    None => self.out_open = false,
                    Some(o) => {
                        if let Err(e) = write(wr, &o.frame).await {
                            self.pending_bytes += o.frame.len();
                            self.pending.push_front(o);
                            return format!("write failed: {e}");
                        }
                        confirm(o);
                    }
                },
            }
        }
    }

    /// Retries with bounded backoff, buffering outgoing frames up to the
    /// cap meanwhile, until a connection succeeds.
    async fn reconnect(&mut self) -> C::Stream {
        let mut delay = self.policy.min_delay;
        let next_try = sleep(delay);
        tokio::pin!(next_try);
        loop {
            let room = self.pending_bytes < self.policy.buffer_cap;
            tokio::select! {
                next = self.out.recv(), if self.out_open && room => match next {
                    None => self.out_open = false,
                    Some(o) => {
                        self.pending_bytes += o.frame.len();
                        self.pending.push_back(o);
                    }
                },
                () = &mut next_try => {
                    let attempt = timeout(self.policy.attempt_timeout, self.connector.connect());
                    if let Ok(Ok(s)) = attempt.await {
                        return s;
                    }
                    delay = (delay * 2).min(self.policy.max_delay);
                    next_try.as_mut().reset(Instant::now() + delay);
                }
            }
        }
    }
}

fn confirm(o: Outgoing) {
    if let Some(tx) = o.written {
        let _ = tx.send(());
    }
}

/// Writes one whole frame.
///
/// # Cancel safety
///
/// Not cancel safe: never select on it.
async fn write<S: AsyncWrite>(wr: &mut WriteHalf<S>, frame: &[u8]) -> io::Result<()> {
    wr.write_all(frame).await?;
    wr.flush().await
}

/// Reads host messages until the stream ends; returns why it ended.
async fn read_loop<S: AsyncRead>(
    mut rd: ReadHalf<S>,
    inbound: mpsc::Sender<HostMessage>,
) -> String {
    loop {
        match vmlet_protocol::aio::read_frame::<_, HostMessage>(&mut rd, MAX_FRAME_LEN).await {
            Ok(Some(m)) => {
                if inbound.send(m).await.is_err() {
                    return "nobody listens to the host any more".to_owned();
                }
            }
            Ok(None) => return "closed by the host".to_owned(),
            Err(e) if e.stream_usable() => log!("ignoring a bad host message: {e}"),
            Err(FrameError::Io(e)) => return format!("read failed: {e}"),
            Err(e) => return e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::net::UnixStream;

    /// Hands out the client ends of socket pairs queued by the test.
    struct Pairs(Arc<Mutex<VecDeque<UnixStream>>>);

    impl Connector for Pairs {
        type Stream = UnixStream;
        fn connect(&mut self) -> impl Future<Output = io::Result<UnixStream>> + Send {
            let next = self.0.lock().unwrap().pop_front();
            async move { next.ok_or_else(|| io::Error::from(io::ErrorKind::ConnectionRefused)) }
        }
    }

    fn fast() -> Policy {
        Policy {
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
            attempt_timeout: Duration::from_millis(100),
            buffer_cap: 1 << 20,
        }
    }

    fn hello() -> GuestMessage {
        GuestMessage::Started { pid: 0 }
    }

    async fn recv(s: &mut UnixStream) -> Option<GuestMessage> {
        vmlet_protocol::aio::read_frame(s, MAX_FRAME_LEN)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn hello_first_then_messages_in_order_and_host_messages_forwarded() {
        let (a, mut host) = UnixStream::pair().unwrap();
        let (in_tx, mut in_rx) = mpsc::channel(4);
        let (out, task) = start(Pairs(Default::default()), a, &hello(), in_tx, fast(), 2);
        let sender = tokio::spawn(async move {
            for i in 0..200u8 {
                out.send(&GuestMessage::Stdout(vec![i; i as usize * 100]))
                    .await
                    .unwrap();
            }
        });
        assert_eq!(recv(&mut host).await, Some(hello()));
        for i in 0..200u8 {
            assert_eq!(
                recv(&mut host).await,
                Some(GuestMessage::Stdout(vec![i; i as usize * 100]))
            );
        }
        sender.await.unwrap();
        vmlet_protocol::aio::write_frame(&mut host, &HostMessage::Signal(15))
            .await
            .unwrap();
        assert_eq!(in_rx.recv().await, Some(HostMessage::Signal(15)));
        task.abort();
    }

    /// The host goes away mid-stream: everything queued meanwhile reaches
    /// the next connection, after a fresh hello, and nothing is lost.
    #[tokio::test]
    async fn reconnects_and_delivers_what_was_buffered() {
        let queue = Arc::new(Mutex::new(VecDeque::new()));
        let (a, mut host1) = UnixStream::pair().unwrap();
        let (in_tx, _in_rx) = mpsc::channel(4);
        let (out, task) = start(Pairs(queue.clone()), a, &hello(), in_tx, fast(), 2);
        out.send(&GuestMessage::Stdout(b"one".to_vec()))
            .await
            .unwrap();
        assert_eq!(recv(&mut host1).await, Some(hello()));
        assert_eq!(
            recv(&mut host1).await,
            Some(GuestMessage::Stdout(b"one".to_vec()))
        );
        drop(host1);

        // Sent while nobody listens: buffered (well under the cap).
        for i in 0..50u8 {
            out.send(&GuestMessage::Stderr(vec![i; 1000]))
                .await
                .unwrap();
        }
        let done = out
            .send_confirmed(&GuestMessage::Exited {
                code: Some(0),
                signal: None,
            })
            .await
            .unwrap();

        let (b, mut host2) = UnixStream::pair().unwrap();
        queue.lock().unwrap().push_back(b);
        assert_eq!(recv(&mut host2).await, Some(hello()));
        for i in 0..50u8 {
            assert_eq!(
                recv(&mut host2).await,
                Some(GuestMessage::Stderr(vec![i; 1000]))
            );
        }
        assert_eq!(
            recv(&mut host2).await,
            Some(GuestMessage::Exited {
                code: Some(0),
                signal: None
            })
        );
        timeout(Duration::from_secs(5), done)
            .await
            .unwrap()
            .unwrap();
        task.abort();
    }

    /// While disconnected the link buffers up to its cap and then stops
    /// taking frames, so senders block instead of memory growing.
    #[tokio::test]
    async fn buffer_cap_blocks_senders() {
        let (a, host1) = UnixStream::pair().unwrap();
        drop(host1);
        let (in_tx, _in_rx) = mpsc::channel(4);
        let policy = Policy {
            buffer_cap: 10_000,
            ..fast()
        };
        let queue = Arc::new(Mutex::new(VecDeque::new()));
        let (out, task) = start(Pairs(queue.clone()), a, &hello(), in_tx, policy, 1);
        let mut sent = 0usize;
        loop {
            let msg = GuestMessage::Stdout(vec![7; 1000]);
            let send = out.send(&msg);
            match timeout(Duration::from_millis(200), send).await {
                Ok(r) => {
                    r.unwrap();
                    sent += 1;
                }
                Err(_) => break,
            }
            assert!(sent < 100, "the link never pushed back");
        }
        // Cap plus one frame in flight plus the channel slot.
        assert!((10..=13).contains(&sent), "sent {sent}");

        let (b, mut host2) = UnixStream::pair().unwrap();
        queue.lock().unwrap().push_back(b);
        assert_eq!(recv(&mut host2).await, Some(hello()));
        for _ in 0..sent {
            assert_eq!(
                recv(&mut host2).await,
                Some(GuestMessage::Stdout(vec![7; 1000]))
            );
        }
        task.abort();
    }

    #[tokio::test]
    async fn connect_within_gives_up() {
        let mut c = Pairs(Default::default());
        let start = Instant::now();
        let r = connect_within(&mut c, &fast(), Duration::from_millis(50)).await;
        assert!(r.is_err());
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
