//! Stdin on its way to a guest: queued for the guest connection's writer
//! ([`StdinQueue`]), and written but not yet taken by the tether
//! ([`StdinReplay`]).
//!
//! The tether counts the stdin bytes its process's stdin queue took and
//! reports the count (`StdinAck`) as it grows and first thing on every
//! resumed connection. Bytes written into a connection that then breaks (a stall,
//! a transport that dropped it) may never have reached the tether: the
//! agent keeps every byte past the last count and writes them again, from
//! the tether's count, on the next connection, followed by the stdin close
//! if one was written. So a connection lost while the agent lives loses
//! no stdin and repeats none. (Across an agent restart the client resends
//! from the count it is told: the agent's memory is gone then.)

use std::collections::VecDeque;

use parking_lot::Mutex;
use tokio::sync::Notify;
use vmlet_protocol::api::STDIN_WINDOW;
use vmlet_protocol::frame::MAX_CHUNK;
use vmlet_protocol::guest::HostMessage;

/// Most stdin the agent holds unacknowledged for one VM; the writer waits
/// for the tether's count before writing more, which slows the clients
/// through the VM's queue. It is also the window of stdin the tether may
/// have to buffer (what a process does not read stops the count, never the
/// tether's reader), so it is kept small against the guest's memory. (A
/// 32 MiB `vmlet run -i … sha256sum` took 5.0–6.0 s with 1 MiB against
/// 6.6–7.7 s with 8 MiB, cold start included, 6 runs each.)
pub const REPLAY_CAP: usize = 1 << 20;

/// The bytes past the tether's count, in order.
#[derive(Debug, Default)]
pub struct StdinReplay {
    /// The tether's count at the front of `chunks`; `None` while unknown
    /// (a VM adopted from an earlier agent, until its tether says).
    base: Option<u64>,
    /// Bytes of the front chunk already taken.
    skip: usize,
    chunks: VecDeque<Vec<u8>>,
    /// Bytes held (not counting `skip`).
    held: usize,
    /// A stdin close was written.
    closed: bool,
}

impl StdinReplay {
    /// For a process that has not started: nothing taken yet.
    pub fn fresh() -> StdinReplay {
        StdinReplay {
            base: Some(0),
            ..StdinReplay::default()
        }
    }

    /// Bytes held for a replay.
    pub fn held(&self) -> usize {
        self.held
    }

    /// `data` is being written to the guest.
    pub fn wrote(&mut self, data: Vec<u8>) {
        if !data.is_empty() {
            self.held += data.len();
            self.chunks.push_back(data);
        }
    }

    /// A stdin close is being written.
    pub fn wrote_close(&mut self) {
        self.closed = true;
    }

    /// The tether took `received` bytes in all: forget what it has.
    pub fn taken(&mut self, received: u64) {
        let Some(base) = self.base else {
            // An earlier agent wrote what the tether counts; this one has
            // written nothing yet.
            self.base = Some(received);
            return;
        };
        if received <= base {
            return;
        }
        let mut n = received - base;
        if n >= self.held as u64 {
            // All of it (more only if a client resent past the count,
            // which the tether counted: nothing to keep either way).
            self.chunks.clear();
            self.skip = 0;
            self.held = 0;
            self.base = Some(received);
            return;
        }
        self.base = Some(received);
        self.held -= n as usize;
        while n > 0 {
            let front = self.chunks.front().expect("held covers n").len() - self.skip;
            if (front as u64) <= n {
                self.chunks.pop_front();
                self.skip = 0;
                n -= front as u64;
            } else {
                self.skip += n as usize;
                n = 0;
            }
        }
    }

    /// A new connection's tether took `received` bytes: what to write on it
    /// before anything else, in order, and whether the close follows.
    pub fn resume_from(&mut self, received: u64) -> (Vec<Vec<u8>>, bool) {
        self.taken(received);
        let mut out = Vec::with_capacity(self.chunks.len());
        for (i, c) in self.chunks.iter().enumerate() {
            let from = if i == 0 { self.skip } else { 0 };
            out.push(c[from..].to_vec());
        }
        (out, self.closed)
    }
}

/// Most stdin bytes one VM's queue holds before its writers wait (it may
/// go past by the last chunk taken): the window a client keeps per VM, so
/// a client that keeps to it is never made to wait, and stdin for one VM
/// never holds up its connection's requests for others.
pub const QUEUE_CAP: usize = STDIN_WINDOW;

/// Stdin on its way to one VM's guest, ahead of the writer of the guest
/// connection: chunks in order, then the close. Bounded in bytes, not in
/// chunks (small chunks are joined), so the bound holds whatever the chunk
/// sizes.
#[derive(Debug, Default)]
pub struct StdinQueue {
    inner: Mutex<Queued>,
    /// Woken when bytes are taken.
    room: Notify,
    /// Woken when bytes or the close arrive.
    ready: Notify,
}

#[derive(Debug, Default)]
struct Queued {
    chunks: VecDeque<Vec<u8>>,
    bytes: usize,
    /// A close was queued; `close_taken` once the writer took it.
    closed: bool,
    close_taken: bool,
}

impl StdinQueue {
    /// Queues `data` after what is queued, waiting while the queue holds
    /// [`QUEUE_CAP`] bytes or more. Dropped once a close was queued.
    pub async fn push(&self, data: Vec<u8>) {
        if data.is_empty() {
            return;
        }
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            // Registered before the check, so a take in between is seen.
            room.as_mut().enable();
            {
                let mut q = self.inner.lock();
                if q.closed {
                    return;
                }
                if q.bytes < QUEUE_CAP {
                    q.bytes += data.len();
                    match q.chunks.back_mut() {
                        Some(last) if last.len() + data.len() <= MAX_CHUNK => {
                            last.extend_from_slice(&data)
                        }
                        _ => q.chunks.push_back(data),
                    }
                    drop(q);
                    self.ready.notify_one();
                    return;
                }
            }
            room.await;
        }
    }

    /// Queues the close, after every chunk queued so far.
    pub fn close(&self) {
        self.inner.lock().closed = true;
        self.ready.notify_one();
    }

    /// Bytes queued.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.inner.lock().bytes
    }

    /// The next message for the guest (`Stdin`, then `CloseStdin` once),
    /// waiting until there is one. Cancel safe: nothing is taken unless
    /// returned.
    pub async fn next(&self) -> HostMessage {
        loop {
            let ready = self.ready.notified();
            {
                let mut q = self.inner.lock();
                if let Some(c) = q.chunks.pop_front() {
                    q.bytes -= c.len();
                    drop(q);
                    self.room.notify_waiters();
                    return HostMessage::Stdin(c);
                }
                if q.closed && !q.close_taken {
                    q.close_taken = true;
                    return HostMessage::CloseStdin;
                }
            }
            ready.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    /// Chunks come out in order, small ones joined, then the close once;
    /// nothing after the close.
    #[tokio::test]
    async fn the_queue_keeps_order_joins_small_chunks_and_closes_once() {
        let q = StdinQueue::default();
        q.push(b"ab".to_vec()).await;
        q.push(Vec::new()).await;
        q.push(b"cd".to_vec()).await;
        q.push(vec![7; MAX_CHUNK]).await;
        q.close();
        q.push(b"late".to_vec()).await;
        assert_eq!(q.bytes(), 4 + MAX_CHUNK);
        assert_eq!(q.next().await, HostMessage::Stdin(b"abcd".to_vec()));
        assert_eq!(q.next().await, HostMessage::Stdin(vec![7; MAX_CHUNK]));
        assert_eq!(q.next().await, HostMessage::CloseStdin);
        let more = tokio::time::timeout(Duration::from_millis(50), q.next()).await;
        assert!(more.is_err(), "{more:?}");
        assert_eq!(q.bytes(), 0);
    }

    /// A writer within the window never waits, even in small chunks; past
    /// it, it waits until bytes are taken.
    #[tokio::test]
    async fn the_queue_is_bounded_in_bytes_and_waits_only_past_the_window() {
        let q = Arc::new(StdinQueue::default());
        for _ in 0..QUEUE_CAP / 4096 {
            tokio::time::timeout(Duration::from_secs(1), q.push(vec![1; 4096]))
                .await
                .expect("a push within the window waited");
        }
        // Small chunks cost no more than their bytes.
        assert_eq!(q.bytes(), QUEUE_CAP);
        let q2 = q.clone();
        let past = tokio::spawn(async move { q2.push(vec![2]).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!past.is_finished(), "a push past the window did not wait");
        assert!(matches!(q.next().await, HostMessage::Stdin(c) if c.len() == MAX_CHUNK));
        tokio::time::timeout(Duration::from_secs(1), past)
            .await
            .expect("the push did not go on once bytes were taken")
            .unwrap();
        assert_eq!(q.bytes(), QUEUE_CAP - MAX_CHUNK + 1);
    }

    fn flat(v: Vec<Vec<u8>>) -> Vec<u8> {
        v.concat()
    }

    #[test]
    fn keeps_exactly_what_the_tether_has_not_taken() {
        let mut r = StdinReplay::fresh();
        r.wrote(b"abc".to_vec());
        r.wrote(b"".to_vec());
        r.wrote(b"defg".to_vec());
        assert_eq!(r.held(), 7);
        r.taken(2);
        assert_eq!(r.held(), 5);
        let (again, close) = r.resume_from(2);
        assert_eq!(flat(again), b"cdefg");
        assert!(!close);
        // A count inside the second chunk, then a stale one.
        r.taken(5);
        r.taken(4);
        assert_eq!(flat(r.resume_from(5).0), b"fg");
        r.wrote(b"h".to_vec());
        r.wrote_close();
        let (again, close) = r.resume_from(6);
        assert_eq!(flat(again), b"gh");
        assert!(close);
        r.taken(8);
        assert_eq!(r.held(), 0);
        assert_eq!(r.resume_from(8), (vec![], true));
    }

    #[test]
    fn an_adopted_vm_starts_at_the_tethers_count() {
        let mut r = StdinReplay::default();
        assert_eq!(r.resume_from(1000), (vec![], false));
        r.wrote(b"xyz".to_vec());
        r.taken(1001);
        assert_eq!(flat(r.resume_from(1001).0), b"yz");
        // Past everything written (a count the agent never saw grow).
        r.taken(5000);
        assert_eq!(r.held(), 0);
        r.wrote(b"q".to_vec());
        assert_eq!(flat(r.resume_from(5000).0), b"q");
    }
}
