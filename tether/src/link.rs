//! The tether's end of the host connection: one task owns the stream,
//! survives the host going away, keeps frames in order, and delivers the
//! process's output exactly once across broken connections.
//!
//! Everything the tether sends goes through an [`Outbox`] (a bounded
//! channel) to the link task, the only writer, so frames never interleave.
//! Each connection gets its own reader task, the only caller of the
//! not-cancel-safe `read_frame`, which forwards host messages to a channel
//! and handles the link's own messages (`Ack`, `Resume`) itself.
//!
//! # Exact output
//!
//! Output is counted per stream from the process start (the sum of the
//! `Stdout`/`Stderr` payload bytes). The link keeps every output byte the
//! host has not acknowledged ([`HostMessage::Ack`], cumulative offsets), not
//! only the bytes not yet written: bytes written into a connection that then
//! breaks are gone with it. Once a Spec has been seen (a process exists),
//! every new connection is a resumption: hello, then the host's first
//! message must be [`HostMessage::Resume`] with the offsets it stored, and
//! the link resends each stream from there, then goes on live. The final
//! report (`Exited`, `Failed`) is kept until `ExitAck` and written again on
//! every new connection, after the output.
//!
//! Host → guest stdin is counted instead ([`GuestMessage::StdinAck`]): a
//! chunk counts once the session's stdin queue took it, and the host writes
//! again, from the count, whatever a broken connection lost. Stdin goes to
//! that queue through a buffer of the connection's own, never through the
//! reader: a process that does not read its stdin stops the count, and
//! with it the host's stdin (the host keeps at most a window uncounted),
//! but not the reader, so acknowledgements, signals and the exit's
//! acknowledgement still pass. The buffer is dropped with its connection,
//! uncounted, to be written again on the next. Signals are not written
//! again.
//!
//! # Backpressure
//!
//! The retained bytes are bounded by [`Policy::retain_cap`]. At the cap the
//! link stops taking from the outbox, the outbox fills, the stdio pumps
//! stop reading the pipes, and the process blocks on write: nothing is
//! dropped. The same happens while the host does not read (the link's
//! write blocks) or does not acknowledge, and while disconnected.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, timeout, Instant};
use vmlet_protocol::frame::{self, FrameError, MAX_CHUNK, MAX_FRAME_LEN};
use vmlet_protocol::guest::{GuestMessage, HostMessage};

use crate::log;
use crate::pump::{Output, StdinOp};

/// How the link connects and reconnects.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    /// First delay between reconnection attempts; doubles up to `max_delay`.
    pub(crate) min_delay: Duration,
    /// The longest delay between attempts.
    pub(crate) max_delay: Duration,
    /// How long one connection attempt may take.
    pub(crate) attempt_timeout: Duration,
    /// Bytes of unacknowledged output (and unsent frames) the link holds
    /// before the pumps pause.
    pub(crate) retain_cap: usize,
    /// How long a host may take to send its first message after a
    /// resuming hello before the link hangs up and dials again.
    pub(crate) resume_patience: Duration,
    /// How long written output (or the exit report) may go unacknowledged,
    /// or a write stay blocked, before the link takes the connection for
    /// dead, hangs up and dials again. The transport does not always say
    /// so itself: vhost-device-vsock 0.3.0 never tells the guest when the
    /// host closes a connection it had not read everything from (an agent
    /// that crashed). Hanging up on a live but slow host costs only a
    /// resumption.
    pub(crate) stall_patience: Duration,
    /// How long a host that has been sending its heartbeat on this
    /// connection (the agent's session acks once a second) may go silent
    /// before the link takes the connection for dead, though nothing is
    /// outstanding: a process that only reads stdin must not wait forever
    /// on a connection the transport never said was gone.
    pub(crate) silence_patience: Duration,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            min_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(2),
            // A 256 MiB guest can spare it; the agent acks every 256 KiB
            // or 100 ms, so only a host that is away fills it.
            retain_cap: 8 << 20,
            resume_patience: Duration::from_secs(30),
            // The agent acks every 100 ms while output flows.
            stall_patience: Duration::from_secs(4),
            silence_patience: Duration::from_secs(10),
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

/// What goes through the outbox.
#[derive(Debug)]
enum Outgoing {
    /// An encoded frame written once, on whichever connection is up.
    Once(Vec<u8>),
    /// A chunk of process output, kept until the host acknowledges it.
    Output(Output, Vec<u8>),
    /// The encoded final report, written on every new connection until
    /// the host's `ExitAck`.
    Report(Vec<u8>),
}

/// When the final report was written on the current connection; `None`
/// while it was not (yet), e.g. after the connection broke.
pub(crate) type Delivery = watch::Receiver<Option<Instant>>;

/// The sending side of the link; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Outbox {
    tx: mpsc::Sender<Outgoing>,
    delivery: Delivery,
}

/// The link task has ended; nothing more can be sent.
#[derive(Debug, thiserror::Error)]
#[error("the host link has shut down")]
pub(crate) struct Closed;

impl Outbox {
    /// Queues `msg`, to be written once. Waits while the queue is full
    /// (backpressure).
    pub(crate) async fn send(&self, msg: &GuestMessage) -> Result<(), Closed> {
        match encode(msg) {
            Some(f) => self.queue(Outgoing::Once(f)).await,
            None => Ok(()),
        }
    }

    /// Queues a chunk of the process's output (at most [`MAX_CHUNK`]
    /// bytes), kept until acknowledged. Waits while the queue is full.
    pub(crate) async fn output(&self, which: Output, chunk: Vec<u8>) -> Result<(), Closed> {
        debug_assert!(chunk.len() <= MAX_CHUNK);
        self.queue(Outgoing::Output(which, chunk)).await
    }

    /// Queues the final report (`Exited` or `Failed`), written after all
    /// output and again on every new connection until the host's
    /// `ExitAck`. Returns a view of its delivery on the current connection.
    pub(crate) async fn report(&self, msg: &GuestMessage) -> Result<Delivery, Closed> {
        if let Some(f) = encode(msg) {
            self.queue(Outgoing::Report(f)).await?;
        }
        Ok(self.delivery.clone())
    }

    async fn queue(&self, o: Outgoing) -> Result<(), Closed> {
        self.tx.send(o).await.map_err(|_| Closed)
    }
}

fn encode(msg: &GuestMessage) -> Option<Vec<u8>> {
    match frame::encode(msg) {
        Ok(f) => Some(f),
        Err(e) => {
            // Our own messages are bounded by construction; this is a bug.
            log!("cannot encode a message: {e}");
            None
        }
    }
}

/// Starts the link on an already connected `first` stream. `hello` is sent
/// first on every connection. Host messages go to `inbound`, except `Ack`
/// and `Resume` (the link's own), a second `Spec`, and a `Resume` before
/// any spec (both logged and dropped), and stdin (`Stdin`, `CloseStdin`),
/// which goes to `stdin`, in order, counted as it is taken.
pub(crate) fn start<C: Connector>(
    connector: C,
    first: C::Stream,
    hello: &GuestMessage,
    inbound: mpsc::Sender<HostMessage>,
    stdin_ops: mpsc::Sender<StdinOp>,
    policy: Policy,
    queue: usize,
) -> (Outbox, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(queue);
    let (delivery_tx, delivery) = watch::channel(None);
    let (acks_tx, acks) = watch::channel(Acks::default());
    let (stdin_tx, stdin) = watch::channel(0u64);
    let hello = frame::encode(hello).expect("the hello is small");
    let link = Link {
        connector,
        hello,
        out: rx,
        out_open: true,
        inbound,
        stdin_ops,
        host: Arc::new(FromHost {
            spec_seen: AtomicBool::new(false),
            acks: acks_tx,
            stdin: stdin_tx,
        }),
        acks,
        stdin,
        stdin_told: None,
        heard: 0,
        beats: 0,
        beating: false,
        backpressured: false,
        next_seq: 0,
        once: VecDeque::new(),
        once_bytes: 0,
        streams: Default::default(),
        report: None,
        delivery: delivery_tx,
        policy,
    };
    (Outbox { tx, delivery }, tokio::spawn(link.run(first)))
}

/// What the reader tasks learn for the link, across connections.
#[derive(Debug)]
struct FromHost {
    /// A spec went to the session: a process exists (or is being set up),
    /// so every later connection is a resumption.
    spec_seen: AtomicBool,
    /// The host's acknowledgements, coalesced: the reader never waits for
    /// the link to take them (a reader blocked on the link could stall a
    /// host that blocks on writing while the link blocks on the host).
    acks: watch::Sender<Acks>,
    /// Stdin bytes taken from the host and handed to the session's stdin
    /// queue: they reach the process whatever happens to the connection.
    stdin: watch::Sender<u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Acks {
    /// The highest stdout and stderr offsets the host said it stored.
    stored: [u64; 2],
    /// How many messages arrived: the agent also sends `Ack`s as a
    /// heartbeat (unchanged offsets) while it lives, so a host that is
    /// alive but slow to drain a congested connection is not taken for
    /// dead.
    heard: u64,
    /// How many of them were `Ack`s: the agent sends them from its session
    /// only, so once one came on a connection, silence means trouble.
    beats: u64,
    /// The reader waits for the session to take a message: the host is
    /// not heard from then because the guest does not read, not because
    /// the host is gone.
    backpressured: bool,
    /// The host sent `ExitAck`.
    exit_acked: bool,
}

/// A piece of output kept until acknowledged.
#[derive(Debug)]
struct Chunk {
    /// Its place among everything taken from the outbox, so a resend keeps
    /// stdout, stderr and the other frames in their original order.
    seq: u64,
    /// Offset of its first byte in the stream.
    start: u64,
    data: Vec<u8>,
}

/// Memory a chunk costs besides its bytes: many tiny chunks must count.
const CHUNK_OVERHEAD: usize = std::mem::size_of::<Chunk>() + 16;

impl Chunk {
    fn end(&self) -> u64 {
        self.start + self.data.len() as u64
    }

    fn cost(&self) -> usize {
        self.data.capacity() + CHUNK_OVERHEAD
    }
}

/// One output stream from the process start: the bytes kept, and how far
/// they were written and acknowledged. Offsets count payload bytes.
///
/// Invariant: `acked <= cursor <= end`, `acked <= sent <= end`, and the
/// chunks are contiguous, the first one holding byte `acked` (none when
/// `acked == end`).
#[derive(Debug, Default)]
struct Stream {
    chunks: VecDeque<Chunk>,
    /// Offset after the last byte taken from the pump.
    end: u64,
    /// Bytes the host acknowledged; forgotten.
    acked: u64,
    /// Highest offset ever written to a connection.
    sent: u64,
    /// Next offset to write on the current connection.
    cursor: u64,
    /// Memory held by `chunks`.
    held: usize,
}

impl Stream {
    /// Appends `data`, taken as item `seq`. It joins the last chunk when
    /// nothing else was taken since (that chunk is item `seq - 1`) and the
    /// chunk has room, so a trickle of small writes costs one chunk, not
    /// one each. Returns whether it used `seq`.
    fn push(&mut self, seq: u64, data: Vec<u8>) -> bool {
        let start = self.end;
        self.end += data.len() as u64;
        if let Some(last) = self.chunks.back_mut() {
            if last.seq + 1 == seq && last.data.len() + data.len() <= MAX_CHUNK {
                self.held -= last.cost();
                // Grow by doubling, but never past a full chunk.
                let len = last.data.len() + data.len();
                if last.data.capacity() < len {
                    let target = (2 * len).clamp(len, MAX_CHUNK.max(len));
                    last.data.reserve_exact(target - last.data.len());
                }
                last.data.extend_from_slice(&data);
                self.held += last.cost();
                return false;
            }
        }
        let c = Chunk { seq, start, data };
        self.held += c.cost();
        self.chunks.push_back(c);
        true
    }

    /// The host stored everything before `upto`: forget it. Clamped to
    /// what was ever written (the host cannot have stored more). Cheap:
    /// constant time unless whole chunks are freed.
    fn ack(&mut self, upto: u64) -> bool {
        let upto = upto.min(self.sent);
        if upto <= self.acked {
            return false;
        }
        self.acked = upto;
        while let Some(c) = self.chunks.front() {
            if c.end() > upto {
                break;
            }
            self.held -= c.cost();
            self.chunks.pop_front();
        }
        self.cursor = self.cursor.max(upto);
        true
    }

    /// A resuming host stored `from` bytes: write again from there. Returns
    /// a warning when `from` makes no sense.
    fn resume(&mut self, from: u64) -> Option<String> {
        if from < self.acked {
            self.cursor = self.acked;
            return Some(format!(
                "asks from byte {from}, but the bytes before {} were acknowledged and forgotten; \
                 resending from there",
                self.acked
            ));
        }
        if from > self.sent {
            let _ = self.ack(self.sent);
            self.cursor = self.sent;
            return Some(format!(
                "asks from byte {from}, beyond the {} bytes sent; nothing to resend",
                self.sent
            ));
        }
        let _ = self.ack(from);
        self.cursor = from;
        None
    }

    /// A new connection whose host did not say what it stored: write
    /// everything kept again.
    fn resend_all(&mut self) {
        self.cursor = self.acked;
    }

    /// The next bytes to write on this connection and their item's seq.
    fn next(&self) -> Option<(u64, &[u8])> {
        if self.cursor >= self.end {
            return None;
        }
        // Chunks hold increasing offsets: a binary search, not a walk.
        let i = self.chunks.partition_point(|c| c.end() <= self.cursor);
        let c = self.chunks.get(i)?;
        debug_assert!(c.start <= self.cursor);
        Some((c.seq, &c.data[(self.cursor - c.start) as usize..]))
    }

    /// `n` bytes from the cursor were written.
    fn wrote(&mut self, n: usize) {
        self.cursor += n as u64;
        self.sent = self.sent.max(self.cursor);
    }
}

/// The final report and whether the current connection has it.
#[derive(Debug)]
struct Report {
    seq: u64,
    frame: Vec<u8>,
    written: bool,
}

/// What to write next.
#[derive(Debug, Clone, Copy)]
enum Next {
    Once,
    Output(Output, usize),
    Report,
}

struct Link<C: Connector> {
    connector: C,
    hello: Vec<u8>,
    out: mpsc::Receiver<Outgoing>,
    /// False once every [`Outbox`] is gone.
    out_open: bool,
    inbound: mpsc::Sender<HostMessage>,
    /// The session's stdin queue.
    stdin_ops: mpsc::Sender<StdinOp>,
    host: Arc<FromHost>,
    acks: watch::Receiver<Acks>,
    /// Stdin bytes taken, and what the current connection was told of it.
    stdin: watch::Receiver<u64>,
    stdin_told: Option<u64>,
    /// `Acks::heard` and `Acks::beats` when last looked at.
    heard: u64,
    beats: u64,
    /// The host's heartbeat was heard on the current connection.
    beating: bool,
    /// The reader waits on the session (see `Acks::backpressured`).
    backpressured: bool,
    /// The seq the next item taken from the outbox gets.
    next_seq: u64,
    /// One-time frames not yet written.
    once: VecDeque<(u64, Vec<u8>)>,
    once_bytes: usize,
    /// Stdout and stderr, by [`Output::index`].
    streams: [Stream; 2],
    report: Option<Report>,
    delivery: watch::Sender<Option<Instant>>,
    policy: Policy,
}

impl<C: Connector> Link<C> {
    async fn run(mut self, first: C::Stream) {
        let mut stream = first;
        loop {
            let (rd, mut wr) = tokio::io::split(stream);
            // Decided per connection: the spec may arrive on this one.
            let resuming = self.host.spec_seen.load(Ordering::Acquire);
            let (first_tx, first_rx) = oneshot::channel();
            let (stdin_tx, stdin_rx) = mpsc::unbounded_channel();
            let stdin = tokio::spawn(forward_stdin(
                stdin_rx,
                self.stdin_ops.clone(),
                self.host.clone(),
            ));
            let mut reader = tokio::spawn(read_loop(
                rd,
                self.inbound.clone(),
                stdin_tx,
                self.host.clone(),
                resuming.then_some(first_tx),
            ));
            let why = self
                .serve(&mut wr, &mut reader, resuming.then_some(first_rx))
                .await;
            reader.abort();
            // What this connection's stdin buffer still holds is not
            // counted: the next connection is told the count and gets it
            // again from there, so the buffer must be gone before then.
            stdin.abort();
            let _ = stdin.await;
            self.beating = false;
            // A reader cut off while it waited on the session leaves the
            // flag set.
            self.host.acks.send_modify(|a| a.backpressured = false);
            // Close this connection before dialling the next: a serial
            // port admits one opener at a time.
            // (A finished reader has dropped its half already, and may
            // have been awaited: a JoinHandle must not be polled again.)
            if !reader.is_finished() {
                let _ = reader.await;
            }
            drop(wr);
            if let Some(r) = &mut self.report {
                r.written = false;
            }
            self.delivery.send_replace(None);
            if !self.out_open && self.inbound.is_closed() {
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
        first: Option<oneshot::Receiver<Option<[u64; 2]>>>,
    ) -> String {
        if let Err(e) = write(wr, &self.hello).await {
            return format!("cannot send the hello: {e}");
        }
        // A resumed connection is told the stdin count first thing: the
        // host (perhaps a new agent) learns where its clients resume.
        self.stdin_told = if first.is_some() {
            None
        } else {
            Some(*self.stdin.borrow_and_update())
        };
        if let Some(first) = first {
            let patience = self.policy.resume_patience;
            tokio::select! {
                why = &mut *reader => return ended(why),
                r = first => match r {
                    Ok(Some(from)) => self.resume(from),
                    Ok(None) => self.streams.iter_mut().for_each(Stream::resend_all),
                    Err(_) => return ended((&mut *reader).await),
                },
                () = sleep(patience) => {
                    return format!("the host said nothing within {patience:?} of the hello");
                }
            }
        }
        // When the host last showed it was alive, for the stall check.
        let mut progress = Instant::now();
        loop {
            let heard = self.apply_acks();
            // A host heard from after the report was written is alive and
            // has yet to acknowledge it (its log may be full, holding the
            // output back): its patience for the acknowledgement starts
            // again.
            if heard && self.report.as_ref().is_some_and(|r| r.written) {
                self.delivery.send_replace(Some(Instant::now()));
            }
            let outstanding = self.outstanding();
            // Silence matters while output waits for its ack, and, once the
            // host's heartbeat was heard, whenever the reader is free to
            // hear it.
            let watched = outstanding || (self.beating && !self.backpressured);
            if heard || !watched {
                progress = Instant::now();
            }
            let patience = if outstanding {
                self.policy.stall_patience
            } else {
                self.policy.silence_patience
            };
            let stalled = progress + patience;
            let stall = || {
                format!("nothing from the host for {patience:?}; taking the connection for dead")
            };
            let taken = *self.stdin.borrow_and_update();
            if self.stdin_told != Some(taken) {
                let frame = encode(&GuestMessage::StdinAck { received: taken });
                if let Some(f) = frame {
                    // A host that stopped reading is watched as for output.
                    tokio::select! {
                        biased;
                        why = &mut *reader => return ended(why),
                        () = sleep_until(stalled), if watched => return stall(),
                        r = write(wr, &f) => if let Err(e) = r {
                            return format!("write failed: {e}");
                        },
                    }
                }
                self.stdin_told = Some(taken);
                continue;
            }
            if let Some(next) = self.next() {
                // A write blocked on a host that went away must not wait
                // forever for the kernel to fail it: the reader's end of
                // the connection ends the write too. Cancelling it half way
                // is harmless then, since the connection is done with.
                tokio::select! {
                    biased;
                    why = &mut *reader => return ended(why),
                    () = sleep_until(stalled) => return stall(),
                    r = self.write_next(wr, next) => if let Err(e) = r {
                        return format!("write failed: {e}");
                    },
                }
                self.wrote(next);
                continue;
            }
            let room = self.held() < self.policy.retain_cap;
            tokio::select! {
                why = &mut *reader => return ended(why),
                () = sleep_until(stalled), if watched => return stall(),
                // Cannot fail: `self.host` holds the senders.
                _ = self.acks.changed() => {}
                _ = self.stdin.changed() => {}
                next = self.out.recv(), if self.out_open && room => self.take(next),
            }
        }
    }

    /// Retries with bounded backoff, taking outgoing frames up to the cap
    /// meanwhile, until a connection succeeds.
    async fn reconnect(&mut self) -> C::Stream {
        let mut delay = self.policy.min_delay;
        let next_try = sleep(delay);
        tokio::pin!(next_try);
        loop {
            let room = self.held() < self.policy.retain_cap;
            tokio::select! {
                next = self.out.recv(), if self.out_open && room => self.take(next),
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

    fn resume(&mut self, from: [u64; 2]) {
        for which in Output::BOTH {
            let s = &mut self.streams[which.index()];
            if let Some(w) = s.resume(from[which.index()]) {
                log!("warning: the host's Resume for {which:?} {w}");
            }
        }
        let [out, err] = &self.streams;
        log!(
            "host resumes at stdout {}, stderr {}: resending {} + {} bytes",
            out.cursor,
            err.cursor,
            out.sent - out.cursor,
            err.sent - err.cursor
        );
    }

    /// Bytes held for the host: the cap applies to these.
    fn held(&self) -> usize {
        self.streams.iter().map(|s| s.held).sum::<usize>()
            + self.once_bytes
            + self.report.as_ref().map_or(0, |r| r.frame.len())
    }

    /// Takes one item from the outbox (`None`: the outbox closed).
    fn take(&mut self, next: Option<Outgoing>) {
        let seq = self.next_seq;
        match next {
            None => self.out_open = false,
            Some(Outgoing::Once(f)) => {
                self.once_bytes += f.len();
                self.once.push_back((seq, f));
                self.next_seq += 1;
            }
            Some(Outgoing::Output(_, data)) if data.is_empty() => {}
            Some(Outgoing::Output(which, data)) => {
                if self.streams[which.index()].push(seq, data) {
                    self.next_seq += 1;
                }
            }
            Some(Outgoing::Report(frame)) => {
                self.report = Some(Report {
                    seq,
                    frame,
                    written: false,
                });
                self.next_seq += 1;
            }
        }
    }

    /// Forgets what the host acknowledged; returns whether that was
    /// anything new. Cheap when nothing changed.
    fn apply_acks(&mut self) -> bool {
        let a = *self.acks.borrow_and_update();
        // Any message, even an Ack that moves nothing, shows the host is
        // alive.
        let mut moved = std::mem::replace(&mut self.heard, a.heard) != a.heard;
        self.beating |= std::mem::replace(&mut self.beats, a.beats) != a.beats;
        self.backpressured = a.backpressured;
        for which in Output::BOTH {
            moved |= self.streams[which.index()].ack(a.stored[which.index()]);
        }
        if a.exit_acked && self.report.is_some() {
            self.report = None;
            moved = true;
        }
        moved
    }

    /// Whether this connection carries something the host has yet to
    /// acknowledge.
    fn outstanding(&self) -> bool {
        self.streams.iter().any(|s| s.cursor > s.acked)
            || self.report.as_ref().is_some_and(|r| r.written)
    }

    /// The oldest item not yet written on this connection.
    fn next(&self) -> Option<Next> {
        let mut best: Option<(u64, Next)> = None;
        let mut consider = |seq: u64, n: Next| {
            if !matches!(best, Some((s, _)) if s <= seq) {
                best = Some((seq, n));
            }
        };
        if let Some((seq, _)) = self.once.front() {
            consider(*seq, Next::Once);
        }
        for which in Output::BOTH {
            if let Some((seq, bytes)) = self.streams[which.index()].next() {
                consider(seq, Next::Output(which, bytes.len()));
            }
        }
        if let Some(r) = self.report.as_ref().filter(|r| !r.written) {
            consider(r.seq, Next::Report);
        }
        best.map(|(_, n)| n)
    }

    /// Writes `next`; does not change what is written (see [`Self::wrote`]).
    /// Takes `&mut self` only so the future is `Send` without `C: Sync`.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: a cancelled write leaves a partial frame, so cancel
    /// it only when abandoning the connection.
    async fn write_next(&mut self, wr: &mut WriteHalf<C::Stream>, next: Next) -> io::Result<()> {
        match next {
            Next::Once => write(wr, &self.once.front().expect("an item").1).await,
            Next::Output(which, _) => {
                let (_, bytes) = self.streams[which.index()].next().expect("bytes");
                match encode(&which.message(bytes.to_vec())) {
                    Some(f) => write(wr, &f).await,
                    None => Ok(()),
                }
            }
            Next::Report => write(wr, &self.report.as_ref().expect("a report").frame).await,
        }
    }

    /// `next` was written to the current connection.
    fn wrote(&mut self, next: Next) {
        match next {
            Next::Once => {
                let (_, f) = self.once.pop_front().expect("an item");
                self.once_bytes -= f.len();
            }
            Next::Output(which, n) => self.streams[which.index()].wrote(n),
            Next::Report => {
                if let Some(r) = &mut self.report {
                    r.written = true;
                }
                self.delivery.send_replace(Some(Instant::now()));
            }
        }
    }
}

fn ended(why: Result<String, tokio::task::JoinError>) -> String {
    why.unwrap_or_else(|e| format!("reader failed: {e}"))
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

fn kind(m: &HostMessage) -> &'static str {
    match m {
        HostMessage::Spec(_) => "a spec",
        HostMessage::Stdin(_) => "stdin",
        HostMessage::CloseStdin => "CloseStdin",
        HostMessage::Signal(_) => "a signal",
        HostMessage::ExitAck => "ExitAck",
        HostMessage::Resume { .. } => "Resume",
        HostMessage::Ack { .. } => "Ack",
        HostMessage::Prepare { .. } => "Prepare",
        HostMessage::Renew { .. } => "Renew",
    }
}

/// Hands one connection's stdin to the session's queue, in order, counting
/// each chunk once the queue took it. Once the queue is gone (the session
/// is over) stdin is counted and dropped, as a closed pipe's is.
async fn forward_stdin(
    mut ops: mpsc::UnboundedReceiver<StdinOp>,
    queue: mpsc::Sender<StdinOp>,
    host: Arc<FromHost>,
) {
    while let Some(op) = ops.recv().await {
        let n = match &op {
            StdinOp::Data(b) => b.len() as u64,
            StdinOp::Close => 0,
        };
        // Cancelled here (the connection ended), the chunk was not taken.
        let _ = queue.send(op).await;
        if n > 0 {
            host.stdin.send_modify(|c| *c += n);
        }
    }
}

/// Reads host messages until the stream ends; returns why it ended.
/// `first`, on a resuming connection, gets the offsets of the host's
/// opening `Resume`, or `None` if it opened with anything else. Stdin goes
/// to `stdin`, which never makes the reader wait: the host writes no more
/// than its window past the count.
async fn read_loop<S: AsyncRead>(
    mut rd: ReadHalf<S>,
    inbound: mpsc::Sender<HostMessage>,
    stdin: mpsc::UnboundedSender<StdinOp>,
    host: Arc<FromHost>,
    mut first: Option<oneshot::Sender<Option<[u64; 2]>>>,
) -> String {
    loop {
        let m = match vmlet_protocol::aio::read_frame(&mut rd, MAX_FRAME_LEN).await {
            Ok(Some(m)) => m,
            Ok(None) => return "closed by the host".to_owned(),
            Err(e) if e.stream_usable() => {
                log!("ignoring a bad host message: {e}");
                continue;
            }
            Err(FrameError::Io(e)) => return format!("read failed: {e}"),
            Err(e) => return e.to_string(),
        };
        host.acks.send_modify(|a| a.heard += 1);
        if let Some(tx) = first.take() {
            if let HostMessage::Resume { stdout, stderr } = m {
                let _ = tx.send(Some([stdout, stderr]));
                continue;
            }
            log!(
                "warning: the host answered a resuming hello with {} instead of Resume; \
                 resending all unacknowledged output",
                kind(&m)
            );
            let _ = tx.send(None);
        }
        let forward = match m {
            HostMessage::Ack { stdout, stderr } => {
                host.acks.send_modify(|a| {
                    a.stored = [a.stored[0].max(stdout), a.stored[1].max(stderr)];
                    a.beats += 1;
                });
                None
            }
            HostMessage::Resume { .. } if host.spec_seen.load(Ordering::Acquire) => {
                log!("warning: ignoring a Resume that did not open the connection");
                None
            }
            HostMessage::Resume { .. } => {
                log!("warning: ignoring a Resume before any spec (no process yet); waiting for a spec");
                None
            }
            HostMessage::Spec(_) => {
                if host.spec_seen.swap(true, Ordering::AcqRel) {
                    log!("warning: ignoring a spec: the process already runs");
                    None
                } else {
                    Some(m)
                }
            }
            HostMessage::ExitAck => {
                host.acks.send_modify(|a| a.exit_acked = true);
                Some(m)
            }
            HostMessage::Stdin(b) => {
                // The forwarder lives as long as this reader.
                let _ = stdin.send(StdinOp::Data(b));
                None
            }
            HostMessage::CloseStdin => {
                let _ = stdin.send(StdinOp::Close);
                None
            }
            m => Some(m),
        };
        let Some(m) = forward else { continue };
        match inbound.try_send(m) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return "nobody listens to the host any more".to_owned();
            }
            Err(mpsc::error::TrySendError::Full(m)) => {
                // Reset by the link if this reader is cut off here.
                host.acks.send_modify(|a| a.backpressured = true);
                let sent = inbound.send(m).await;
                host.acks.send_modify(|a| {
                    a.backpressured = false;
                    a.heard += 1;
                });
                if sent.is_err() {
                    return "nobody listens to the host any more".to_owned();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{os_pipe, Pairs, Rng};
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixStream;
    use vmlet_protocol::frame::{Header, HEADER_LEN};
    use vmlet_protocol::guest::ProcessSpec;

    fn fast() -> Policy {
        Policy {
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
            attempt_timeout: Duration::from_millis(100),
            retain_cap: 1 << 20,
            resume_patience: Duration::from_secs(5),
            stall_patience: Duration::from_secs(10),
            silence_patience: Duration::from_secs(10),
        }
    }

    fn hello() -> GuestMessage {
        GuestMessage::Started { pid: 0 }
    }

    fn exited() -> GuestMessage {
        GuestMessage::Exited {
            code: Some(0),
            signal: None,
        }
    }

    fn spec() -> HostMessage {
        HostMessage::Spec(ProcessSpec::default())
    }

    /// The next frame but stdin acknowledgements (tested on their own).
    async fn recv(s: &mut UnixStream) -> Option<GuestMessage> {
        loop {
            match recv_any(s).await {
                Some(GuestMessage::StdinAck { .. }) => {}
                other => return other,
            }
        }
    }

    async fn recv_any(s: &mut UnixStream) -> Option<GuestMessage> {
        timeout(
            Duration::from_secs(10),
            vmlet_protocol::aio::read_frame(s, MAX_FRAME_LEN),
        )
        .await
        .expect("a frame within 10 s")
        .unwrap()
    }

    /// Nothing arrives within a short while.
    async fn quiet(s: &mut UnixStream) {
        loop {
            let r = timeout(
                Duration::from_millis(200),
                vmlet_protocol::aio::read_frame::<_, GuestMessage>(s, MAX_FRAME_LEN),
            )
            .await;
            match r {
                Ok(Ok(Some(GuestMessage::StdinAck { .. }))) => {}
                r => {
                    assert!(r.is_err(), "unexpected {r:?}");
                    return;
                }
            }
        }
    }

    async fn send(s: &mut UnixStream, m: HostMessage) {
        vmlet_protocol::aio::write_frame(s, &m).await.unwrap();
    }

    /// Reads stdin counts until one says `n`; fails on any other frame, a
    /// count past `n`, or 5 s of silence.
    async fn count_reaches(host: &mut UnixStream, n: u64) {
        let mut told = 0;
        while told < n {
            match timeout(Duration::from_secs(5), recv_any(host)).await {
                Ok(Some(GuestMessage::StdinAck { received })) => told = received,
                other => panic!("expected the count to reach {n}, got {other:?}"),
            }
        }
        assert_eq!(told, n);
    }

    /// The link's next connection, from a host that takes its hello and
    /// resumes at `stdout` (stderr 0).
    async fn resume_at(pairs: &Pairs, stdout: u64) -> UnixStream {
        let mut host = pairs.next();
        assert_eq!(recv_any(&mut host).await, Some(hello()));
        send(&mut host, HostMessage::Resume { stdout, stderr: 0 }).await;
        host
    }

    /// Reads output frames until `n` payload bytes of `which` arrived.
    async fn recv_output(s: &mut UnixStream, which: Output, n: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < n {
            match (which, recv(s).await) {
                (Output::Stdout, Some(GuestMessage::Stdout(c)))
                | (Output::Stderr, Some(GuestMessage::Stderr(c))) => got.extend_from_slice(&c),
                (_, other) => panic!("expected {which:?}, got {other:?}"),
            }
        }
        assert_eq!(got.len(), n, "more {which:?} than expected");
        got
    }

    /// Starts a link on a first connection and hands it a spec, as a
    /// session would see it: from then on every connection resumes.
    async fn started(
        policy: Policy,
        queue: usize,
    ) -> (
        Pairs,
        UnixStream,
        Outbox,
        mpsc::Receiver<HostMessage>,
        JoinHandle<()>,
        mpsc::Receiver<StdinOp>,
    ) {
        let pairs = Pairs::default();
        let mut host = pairs.next();
        let first = pairs.0.lock().unwrap().pop_front().unwrap();
        let (in_tx, mut in_rx) = mpsc::channel(16);
        let (stdin_tx, stdin_rx) = mpsc::channel(2);
        let (out, task) = start(
            pairs.clone(),
            first,
            &hello(),
            in_tx,
            stdin_tx,
            policy,
            queue,
        );
        assert_eq!(recv(&mut host).await, Some(hello()));
        send(&mut host, spec()).await;
        assert_eq!(in_rx.recv().await, Some(spec()));
        (pairs, host, out, in_rx, task, stdin_rx)
    }

    /// Splits the complete frames off the front of `buf`.
    fn take_frames(buf: &mut Vec<u8>) -> Vec<GuestMessage> {
        let mut msgs = Vec::new();
        let mut at = 0;
        while buf.len() - at >= HEADER_LEN {
            let hdr: &[u8; HEADER_LEN] = buf[at..at + HEADER_LEN].try_into().unwrap();
            let total = HEADER_LEN + Header::parse(hdr, MAX_FRAME_LEN).unwrap().len as usize;
            if buf.len() - at < total {
                break;
            }
            msgs.push(frame::decode(&buf[at + HEADER_LEN..at + total]).unwrap());
            at += total;
        }
        buf.drain(..at);
        msgs
    }

    #[tokio::test]
    async fn hello_first_then_messages_in_order_and_host_messages_forwarded() {
        let policy = Policy {
            retain_cap: 4 << 20,
            ..fast()
        };
        let (_pairs, mut host, out, mut in_rx, task, _stdin) = started(policy, 2).await;
        let sender = tokio::spawn(async move {
            out.send(&GuestMessage::Started { pid: 7 }).await.unwrap();
            for i in 0..200u8 {
                out.output(Output::Stdout, vec![i; i as usize * 100])
                    .await
                    .unwrap();
            }
        });
        assert_eq!(
            recv(&mut host).await,
            Some(GuestMessage::Started { pid: 7 })
        );
        let got = recv_output(&mut host, Output::Stdout, (0..200).sum::<usize>() * 100).await;
        let want: Vec<u8> = (0..200u8).flat_map(|i| vec![i; i as usize * 100]).collect();
        assert!(got == want);
        sender.await.unwrap();
        send(
            &mut host,
            HostMessage::Ack {
                stdout: 5,
                stderr: 0,
            },
        )
        .await;
        send(&mut host, HostMessage::Signal(15)).await;
        // The link keeps its own messages.
        assert_eq!(in_rx.recv().await, Some(HostMessage::Signal(15)));
        task.abort();
    }

    /// The host goes away mid-stream: the next connection starts with a
    /// fresh hello, the host's Resume, then exactly the bytes it lacks and
    /// everything queued meanwhile.
    #[tokio::test]
    async fn reconnects_and_resumes_where_the_host_stopped() {
        let (pairs, mut host1, out, _in_rx, task, _stdin) = started(fast(), 2).await;
        out.output(Output::Stdout, b"one".to_vec()).await.unwrap();
        assert_eq!(recv_output(&mut host1, Output::Stdout, 3).await, b"one");
        drop(host1);

        // Sent while nobody listens.
        for i in 0..50u8 {
            out.output(Output::Stderr, vec![i; 1000]).await.unwrap();
        }
        let delivery = out.report(&exited()).await.unwrap();

        // Only "o" was stored (the rest was lost in the old connection).
        let mut host2 = resume_at(&pairs, 1).await;
        assert_eq!(recv_output(&mut host2, Output::Stdout, 2).await, b"ne");
        let want: Vec<u8> = (0..50u8).flat_map(|i| vec![i; 1000]).collect();
        assert!(recv_output(&mut host2, Output::Stderr, want.len()).await == want);
        assert_eq!(recv(&mut host2).await, Some(exited()));
        let mut d = delivery.clone();
        timeout(Duration::from_secs(5), d.wait_for(Option::is_some))
            .await
            .unwrap()
            .unwrap();
        task.abort();
    }

    /// Stdin taken from the host is acknowledged as it arrives, and the
    /// count opens every resumed connection, so a new host knows where
    /// its clients resume.
    #[tokio::test]
    async fn stdin_taken_is_acknowledged_and_told_to_every_new_host() {
        let (pairs, mut host1, _out, _in_rx, task, mut stdin) = started(fast(), 2).await;
        for i in 0..3u8 {
            send(&mut host1, HostMessage::Stdin(vec![i; 1000])).await;
            assert_eq!(stdin.recv().await, Some(StdinOp::Data(vec![i; 1000])));
        }
        let mut last = 0;
        while last < 3000 {
            match recv_any(&mut host1).await {
                Some(GuestMessage::StdinAck { received }) => {
                    assert!(
                        received > last && received <= 3000,
                        "{received} after {last}"
                    );
                    last = received;
                }
                other => panic!("expected a stdin acknowledgement, got {other:?}"),
            }
        }
        drop(host1);
        let mut host2 = resume_at(&pairs, 0).await;
        assert_eq!(
            recv_any(&mut host2).await,
            Some(GuestMessage::StdinAck { received: 3000 })
        );
        task.abort();
    }

    /// While disconnected the link holds output up to its cap and then
    /// stops taking it, so senders block instead of memory growing.
    #[tokio::test]
    async fn retain_cap_blocks_senders_while_disconnected() {
        let policy = Policy {
            retain_cap: 10_000,
            ..fast()
        };
        let (pairs, host1, out, _in_rx, task, _stdin) = started(policy, 1).await;
        drop(host1);
        let mut sent = 0usize;
        loop {
            let send = out.output(Output::Stdout, vec![sent as u8; 1000]);
            match timeout(Duration::from_millis(200), send).await {
                Ok(r) => {
                    r.unwrap();
                    sent += 1;
                }
                Err(_) => break,
            }
            assert!(sent < 100, "the link never pushed back");
        }
        // At most the cap (counting the chunk's spare capacity: at least
        // half of it is data), one taken past it, and the channel slot.
        assert!((5..=12).contains(&sent), "sent {sent}");

        let mut host2 = resume_at(&pairs, 0).await;
        // What the link held, then (acknowledged) what waited in the outbox.
        let want: Vec<u8> = (0..sent).flat_map(|i| vec![i as u8; 1000]).collect();
        let mut got = Vec::new();
        while got.len() < want.len() {
            match recv(&mut host2).await {
                Some(GuestMessage::Stdout(c)) => got.extend_from_slice(&c),
                other => panic!("unexpected {other:?}"),
            }
            let stdout = got.len() as u64;
            send(&mut host2, HostMessage::Ack { stdout, stderr: 0 }).await;
        }
        assert!(got == want);
        task.abort();
    }

    /// (Backpressure) A connected host that reads but does not acknowledge
    /// gets at most the cap; the pump stops reading the pipe and the writer
    /// blocks. Acknowledging lets the rest through, all of it.
    #[tokio::test]
    async fn unacknowledged_output_blocks_the_pump_and_nothing_is_dropped() {
        let cap = 100_000;
        let policy = Policy {
            retain_cap: cap,
            ..fast()
        };
        let (_pairs, mut host, out, _in_rx, task, _stdin) = started(policy, 2).await;
        let data = Rng::new(7).bytes(1 << 20);
        let (mut w, r) = os_pipe();
        let writer = {
            let data = data.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                w.write_all(&data).await.unwrap();
            })
        };
        let pump = tokio::spawn(crate::pump::output(
            r,
            Output::Stdout,
            out.clone(),
            crate::testutil::not_draining(),
            Duration::from_secs(10),
        ));

        let mut got = Vec::new();
        loop {
            let r = timeout(
                Duration::from_millis(300),
                vmlet_protocol::aio::read_frame::<_, GuestMessage>(&mut host, MAX_FRAME_LEN),
            )
            .await;
            match r {
                Ok(Ok(Some(GuestMessage::Stdout(c)))) => got.extend_from_slice(&c),
                Ok(Ok(Some(GuestMessage::StdinAck { .. }))) => {}
                Ok(other) => panic!("unexpected {other:?}"),
                Err(_) => break,
            }
        }
        assert!(
            got.len() <= cap + MAX_CHUNK + CHUNK_OVERHEAD,
            "{} bytes unacknowledged",
            got.len()
        );
        assert!(got.len() >= cap / 2, "only {} bytes", got.len());
        assert!(!writer.is_finished(), "the writer was never blocked");
        assert!(!pump.is_finished());

        // Now acknowledge as it comes: everything arrives, in order.
        while got.len() < data.len() {
            send(
                &mut host,
                HostMessage::Ack {
                    stdout: got.len() as u64,
                    stderr: 0,
                },
            )
            .await;
            match recv(&mut host).await {
                Some(GuestMessage::Stdout(c)) => got.extend_from_slice(&c),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(got == data, "the stream differs");
        writer.await.unwrap();
        assert_eq!(pump.await.unwrap(), data.len() as u64);
        task.abort();
    }

    /// One run of the exact-delivery check: two pumps carry random data
    /// through real pipes while a host hangs up at random byte counts
    /// (often mid-frame), stores only whole frames, acknowledges now and
    /// then, and resumes from what it stored. Returns the reconnections.
    async fn exact_run(seed: u64) -> usize {
        let mut rng = Rng::new(seed);
        let policy = Policy {
            retain_cap: 300_000,
            ..fast()
        };
        let (pairs, mut conn, out, mut in_rx, task, _stdin) = started(policy, 4).await;
        let lens = [
            1_500_000 + rng.below(1000) as usize,
            700_000 + rng.below(1000) as usize,
        ];
        let want = [rng.bytes(lens[0]), rng.bytes(lens[1])];
        let mut pumps = Vec::new();
        for which in Output::BOTH {
            let (mut w, r) = os_pipe();
            let data = want[which.index()].clone();
            let mut wrng = Rng::new(seed ^ 0x55 ^ which.index() as u64);
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let mut at = 0;
                while at < data.len() {
                    let n = (1 + wrng.below(20_000) as usize).min(data.len() - at);
                    w.write_all(&data[at..at + n]).await.unwrap();
                    at += n;
                    if wrng.below(8) == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            });
            pumps.push(tokio::spawn(crate::pump::output(
                r,
                which,
                out.clone(),
                crate::testutil::not_draining(),
                Duration::from_secs(10),
            )));
        }
        let reporter = tokio::spawn(async move {
            for p in pumps {
                p.await.unwrap();
            }
            out.report(&exited()).await.unwrap();
        });

        let mut stored: [Vec<u8>; 2] = Default::default();
        let offsets = |s: &[Vec<u8>; 2]| (s[0].len() as u64, s[1].len() as u64);
        let mut reconnects = 0;
        let mut buf = Vec::new();
        'connections: loop {
            let budget = 1 + rng.below(400_000) as usize;
            let mut got = 0;
            let mut tmp = vec![0u8; 8192];
            while got < budget {
                let want_n = tmp.len().min(budget - got);
                // A timeout, so a host waiting on a tether that waits for an
                // ack still acks (as the agent's timer does).
                let n =
                    match timeout(Duration::from_millis(20), conn.read(&mut tmp[..want_n])).await {
                        Ok(r) => r.unwrap(),
                        Err(_) => 0,
                    };
                got += n;
                buf.extend_from_slice(&tmp[..n]);
                for m in take_frames(&mut buf) {
                    match m {
                        GuestMessage::Stdout(c) => stored[0].extend_from_slice(&c),
                        GuestMessage::Stderr(c) => stored[1].extend_from_slice(&c),
                        GuestMessage::Exited { .. } => {
                            assert!(stored[0] == want[0], "seed {seed}: stdout differs");
                            assert!(stored[1] == want[1], "seed {seed}: stderr differs");
                            send(&mut conn, HostMessage::ExitAck).await;
                            break 'connections;
                        }
                        GuestMessage::StdinAck { received: 0 } => {}
                        other => panic!("seed {seed}: unexpected {other:?}"),
                    }
                }
                if n == 0 || rng.below(4) == 0 {
                    let (stdout, stderr) = offsets(&stored);
                    send(&mut conn, HostMessage::Ack { stdout, stderr }).await;
                }
            }
            // Hang up; whatever was not read, and a partial frame, is lost.
            drop(conn);
            buf.clear();
            reconnects += 1;
            conn = pairs.next();
            // The hello is the first frame on a new connection.
            loop {
                let n = conn.read(&mut tmp).await.unwrap();
                assert!(n > 0);
                buf.extend_from_slice(&tmp[..n]);
                let msgs = take_frames(&mut buf);
                if let Some(m) = msgs.first() {
                    assert_eq!(m, &hello());
                    assert_eq!(msgs.len(), 1, "frames before the Resume");
                    break;
                }
            }
            let (stdout, stderr) = offsets(&stored);
            send(&mut conn, HostMessage::Resume { stdout, stderr }).await;
        }
        reporter.await.unwrap();
        assert_eq!(in_rx.recv().await, Some(HostMessage::ExitAck));
        assert!(in_rx.try_recv().is_err(), "only the spec and the ExitAck");
        task.abort();
        reconnects
    }

    /// (Exactness) Output written across disconnects at random points
    /// arrives exactly once and in order.
    #[tokio::test]
    async fn output_arrives_exactly_once_across_random_disconnects() {
        let mut reconnects = 0;
        for seed in 1..=6 {
            reconnects += timeout(Duration::from_secs(60), exact_run(seed))
                .await
                .unwrap_or_else(|_| panic!("seed {seed} stalled"));
        }
        assert!(reconnects >= 12, "only {reconnects} reconnections");
    }

    /// An exit report the host did not acknowledge is written again on the
    /// next connection, after the output the host lacks; once
    /// acknowledged, never again.
    #[tokio::test]
    async fn exit_report_is_sent_again_until_acknowledged() {
        let (pairs, mut host1, out, mut in_rx, task, _stdin) = started(fast(), 2).await;
        out.output(Output::Stdout, b"abc".to_vec()).await.unwrap();
        let mut delivery = out.report(&exited()).await.unwrap();
        assert_eq!(recv_output(&mut host1, Output::Stdout, 3).await, b"abc");
        assert_eq!(recv(&mut host1).await, Some(exited()));
        delivery.wait_for(Option::is_some).await.unwrap();
        drop(host1);
        delivery.wait_for(Option::is_none).await.unwrap();

        let mut host2 = resume_at(&pairs, 1).await;
        assert_eq!(recv_output(&mut host2, Output::Stdout, 2).await, b"bc");
        assert_eq!(recv(&mut host2).await, Some(exited()));
        drop(host2);

        let mut host3 = resume_at(&pairs, 3).await;
        assert_eq!(recv(&mut host3).await, Some(exited()));
        send(&mut host3, HostMessage::ExitAck).await;
        assert_eq!(in_rx.recv().await, Some(HostMessage::ExitAck));
        drop(host3);

        let mut host4 = resume_at(&pairs, 3).await;
        quiet(&mut host4).await;
        task.abort();
    }

    /// A host that answers a resuming hello with a spec is not obeyed: the
    /// spec does not reach the session, every unacknowledged byte is
    /// resent, and the output goes on live.
    #[tokio::test]
    async fn spec_on_reconnect_is_ignored_and_output_goes_on() {
        let (pairs, mut host1, out, mut in_rx, task, _stdin) = started(fast(), 2).await;
        out.output(Output::Stdout, b"abc".to_vec()).await.unwrap();
        assert_eq!(recv_output(&mut host1, Output::Stdout, 3).await, b"abc");
        send(
            &mut host1,
            HostMessage::Ack {
                stdout: 1,
                stderr: 0,
            },
        )
        .await;
        // The ack is applied before the link takes the next item.
        tokio::time::sleep(Duration::from_millis(50)).await;
        out.output(Output::Stderr, b"x".to_vec()).await.unwrap();
        assert_eq!(recv_output(&mut host1, Output::Stderr, 1).await, b"x");
        drop(host1);

        let mut host2 = pairs.next();
        assert_eq!(recv(&mut host2).await, Some(hello()));
        send(&mut host2, spec()).await;
        send(&mut host2, HostMessage::Signal(2)).await;
        assert_eq!(recv_output(&mut host2, Output::Stdout, 2).await, b"bc");
        assert_eq!(recv_output(&mut host2, Output::Stderr, 1).await, b"x");
        out.output(Output::Stdout, b"def".to_vec()).await.unwrap();
        assert_eq!(recv_output(&mut host2, Output::Stdout, 3).await, b"def");
        // The session saw the signal, not the spec.
        assert_eq!(in_rx.recv().await, Some(HostMessage::Signal(2)));
        assert!(in_rx.try_recv().is_err());
        task.abort();
    }

    /// A connection the transport never reports dead (a host that stopped
    /// reading and acknowledging) is hung up after the stall patience; the
    /// output goes on on the next one, from where the host stored.
    #[tokio::test]
    async fn silent_dead_connection_is_redialled() {
        let policy = Policy {
            stall_patience: Duration::from_millis(300),
            ..fast()
        };
        let (pairs, mut host1, out, _in_rx, task, _stdin) = started(policy, 2).await;
        out.output(Output::Stdout, b"abc".to_vec()).await.unwrap();
        assert_eq!(recv_output(&mut host1, Output::Stdout, 3).await, b"abc");
        // host1 stays open but silent: no ack, no close.
        let mut host2 = resume_at(&pairs, 0).await;
        assert_eq!(recv_output(&mut host2, Output::Stdout, 3).await, b"abc");
        send(
            &mut host2,
            HostMessage::Ack {
                stdout: 3,
                stderr: 0,
            },
        )
        .await;
        // Acknowledged: no more stalls on a quiet connection.
        tokio::time::sleep(Duration::from_millis(600)).await;
        out.output(Output::Stdout, b"d".to_vec()).await.unwrap();
        assert_eq!(recv_output(&mut host2, Output::Stdout, 1).await, b"d");
        drop(host1);
        task.abort();
    }

    /// With nothing outstanding, a host is taken for dead when it goes
    /// silent after its heartbeat was heard on the connection: the agent
    /// that crashed with guest bytes unread is never reported by
    /// vhost-device-vsock, and a process that only reads stdin (no output
    /// to wait for an ack on) would wait on that connection forever.
    #[tokio::test]
    async fn silence_after_the_heartbeat_is_redialled() {
        let policy = Policy {
            silence_patience: Duration::from_millis(300),
            ..fast()
        };
        let (pairs, mut host1, _out, _in_rx, task, _stdin) = started(policy, 2).await;
        let host2 = pairs.next();
        // No heartbeat yet (a start still under way): silence is fine.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(
            pairs.0.lock().unwrap().len(),
            1,
            "redialled before any heartbeat"
        );
        let heartbeat = HostMessage::Ack {
            stdout: 0,
            stderr: 0,
        };
        // Heartbeats keep the connection.
        for _ in 0..5 {
            send(&mut host1, heartbeat.clone()).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(pairs.0.lock().unwrap().len(), 1, "redialled a live host");
        // Silence after them does not.
        let mut host2 = host2;
        let r = timeout(Duration::from_secs(5), recv(&mut host2)).await;
        assert_eq!(r.expect("a redial within 5 s"), Some(hello()));
        drop(host1);
        task.abort();
    }

    /// Stdin the session does not take holds back neither the host's
    /// other messages nor its acknowledgements: only the count stops, at
    /// what the stdin queue took.
    #[tokio::test]
    async fn untaken_stdin_holds_back_only_the_count() {
        let (_pairs, mut host, _out, mut in_rx, task, mut stdin) = started(fast(), 2).await;
        for i in 0..6u8 {
            send(&mut host, HostMessage::Stdin(vec![i; 100])).await;
        }
        send(&mut host, HostMessage::CloseStdin).await;
        send(&mut host, HostMessage::Signal(15)).await;
        send(&mut host, HostMessage::ExitAck).await;
        let got = timeout(Duration::from_secs(5), in_rx.recv()).await.unwrap();
        assert_eq!(got, Some(HostMessage::Signal(15)));
        assert_eq!(in_rx.recv().await, Some(HostMessage::ExitAck));
        // The queue holds 2 chunks: only those are counted.
        count_reaches(&mut host, 200).await;
        let more = timeout(Duration::from_millis(300), recv_any(&mut host)).await;
        assert!(
            more.is_err(),
            "counted what the queue did not take: {more:?}"
        );
        for i in 0..6u8 {
            assert_eq!(stdin.recv().await, Some(StdinOp::Data(vec![i; 100])));
        }
        assert_eq!(stdin.recv().await, Some(StdinOp::Close));
        count_reaches(&mut host, 600).await;
        task.abort();
    }

    /// Stdin a connection held but the session did not take is dropped
    /// with the connection, uncounted: the next host writes it again from
    /// the count, and it arrives once, in order.
    #[tokio::test]
    async fn stdin_held_by_a_lost_connection_arrives_once() {
        let (pairs, mut host1, _out, _in_rx, task, mut stdin) = started(fast(), 2).await;
        for i in 0..5u8 {
            send(&mut host1, HostMessage::Stdin(vec![i; 10])).await;
        }
        // Until the queue (2) is full and the rest waits on the connection.
        let t = Instant::now();
        while stdin.len() < 2 {
            assert!(t.elapsed() < Duration::from_secs(5));
            sleep(Duration::from_millis(10)).await;
        }
        sleep(Duration::from_millis(100)).await;
        drop(host1);
        let mut host2 = resume_at(&pairs, 0).await;
        assert_eq!(
            recv_any(&mut host2).await,
            Some(GuestMessage::StdinAck { received: 20 })
        );
        for i in 2..5u8 {
            send(&mut host2, HostMessage::Stdin(vec![i; 10])).await;
        }
        for i in 0..5u8 {
            let got = timeout(Duration::from_secs(5), stdin.recv()).await.unwrap();
            assert_eq!(got, Some(StdinOp::Data(vec![i; 10])));
        }
        sleep(Duration::from_millis(100)).await;
        assert!(stdin.try_recv().is_err(), "stdin arrived twice");
        task.abort();
    }

    /// A host that sends stdin but stops reading the guest's counts is
    /// taken for dead once it falls silent too, like one that stops reading
    /// output: the count's write does not wait for it forever.
    #[tokio::test]
    async fn a_host_that_stops_reading_the_stdin_count_is_redialled() {
        let policy = Policy {
            silence_patience: Duration::from_millis(300),
            ..fast()
        };
        let (pairs, mut host1, _out, _in_rx, task, mut stdin) = started(policy, 2).await;
        tokio::spawn(async move { while stdin.recv().await.is_some() {} });
        let _host2 = pairs.next();
        send(
            &mut host1,
            HostMessage::Ack {
                stdout: 0,
                stderr: 0,
            },
        )
        .await;
        // Each count the guest writes is a frame of its own, and each costs
        // the socket's buffer far more than its bytes: a few thousand fill
        // it, and the count's write then blocks.
        // (The guest may hang up while this host still writes.)
        let one = frame::encode(&HostMessage::Stdin(vec![0])).unwrap();
        for _ in 0..20_000 {
            if host1.write_all(&one).await.is_err() {
                break;
            }
        }
        let t = Instant::now();
        while !pairs.0.lock().unwrap().is_empty() {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "still waiting on a host that reads nothing"
            );
            sleep(Duration::from_millis(20)).await;
        }
        drop(host1);
        task.abort();
    }

    /// A host is not taken for dead while the guest is the one not
    /// reading: the reader waits for the session to take a message.
    #[tokio::test]
    async fn silence_while_the_session_backs_up_is_not_death() {
        let policy = Policy {
            silence_patience: Duration::from_millis(300),
            ..fast()
        };
        let (pairs, mut host1, _out, mut in_rx, task, _stdin) = started(policy, 2).await;
        let _host2 = pairs.next();
        send(
            &mut host1,
            HostMessage::Ack {
                stdout: 0,
                stderr: 0,
            },
        )
        .await;
        // More than the session's queue (16) holds, nobody taking it.
        for i in 0..20 {
            send(&mut host1, HostMessage::Signal(i)).await;
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            pairs.0.lock().unwrap().len(),
            1,
            "redialled while backed up"
        );
        for i in 0..20 {
            assert_eq!(in_rx.recv().await, Some(HostMessage::Signal(i)));
        }
        // Free again, then silent: taken for dead.
        let t = Instant::now();
        while !pairs.0.lock().unwrap().is_empty() {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "no redial after the backlog drained"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        task.abort();
    }

    /// Resume on a first connection (no process yet) is ignored; the spec
    /// that follows goes to the session.
    #[tokio::test]
    async fn resume_before_any_spec_is_ignored() {
        let pairs = Pairs::default();
        let mut host = pairs.next();
        let first = pairs.0.lock().unwrap().pop_front().unwrap();
        let (in_tx, mut in_rx) = mpsc::channel(4);
        let (_out, task) = start(
            pairs.clone(),
            first,
            &hello(),
            in_tx,
            mpsc::channel(2).0,
            fast(),
            2,
        );
        assert_eq!(recv(&mut host).await, Some(hello()));
        send(
            &mut host,
            HostMessage::Resume {
                stdout: 5,
                stderr: 5,
            },
        )
        .await;
        send(&mut host, spec()).await;
        assert_eq!(in_rx.recv().await, Some(spec()));
        task.abort();
    }

    /// A pooled VM's connection breaking before any spec: the next
    /// connection is not a resumption, the host sends the spec.
    #[tokio::test]
    async fn reconnect_before_any_spec_waits_for_the_spec() {
        let pairs = Pairs::default();
        let host1 = pairs.next();
        let first = pairs.0.lock().unwrap().pop_front().unwrap();
        let (in_tx, mut in_rx) = mpsc::channel(4);
        let (_out, task) = start(
            pairs.clone(),
            first,
            &hello(),
            in_tx,
            mpsc::channel(2).0,
            fast(),
            2,
        );
        drop(host1);
        let mut host2 = pairs.next();
        assert_eq!(recv(&mut host2).await, Some(hello()));
        send(&mut host2, spec()).await;
        assert_eq!(in_rx.recv().await, Some(spec()));
        task.abort();
    }

    #[test]
    fn resume_offsets_out_of_range_are_clamped() {
        let mut s = Stream::default();
        assert!(s.push(0, b"hello ".to_vec()));
        assert!(!s.push(1, b"world".to_vec()), "joins the last chunk");
        assert!(s.push(3, b"!".to_vec()), "something came between");
        assert_eq!(s.next(), Some((0, &b"hello world"[..])));
        s.wrote(11);
        assert_eq!(s.next(), Some((3, &b"!"[..])));
        // An ack beyond what was sent cannot be true.
        s.ack(100);
        assert_eq!((s.acked, s.chunks.len()), (11, 1));
        // Older than what is kept: from the oldest kept byte.
        assert!(s.resume(3).is_some());
        assert_eq!(s.next(), Some((3, &b"!"[..])));
        s.wrote(1);
        // Beyond what was sent: nothing to resend.
        assert!(s.resume(50).is_some());
        assert_eq!(s.next(), None);
        assert_eq!((s.acked, s.held), (12, 0));
        // In range, mid-chunk.
        s.push(4, b"abcdef".to_vec());
        s.wrote(6);
        assert!(s.resume(14).is_none());
        assert_eq!(s.next(), Some((4, &b"cdef"[..])));
    }

    #[tokio::test]
    async fn connect_within_gives_up() {
        let mut c = Pairs::default();
        let start = Instant::now();
        let r = connect_within(&mut c, &fast(), Duration::from_millis(50)).await;
        assert!(r.is_err());
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
