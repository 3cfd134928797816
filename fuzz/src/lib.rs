//! Shared checks for the fuzz targets: an allocator that records the largest
//! single allocation, the frame-reader invariants (sync and async readers
//! must agree), and [`arb::value`], which builds an arbitrary value of any
//! `Deserialize` type from fuzzer bytes, so the protocol crate needs no
//! `arbitrary` dependency and new message variants are fuzzed without
//! wrapper types to keep in step.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Debug;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use serde::{de::DeserializeOwned, Serialize};
use vmlet_protocol::frame::{self, FrameError, Header, HEADER_LEN};

pub mod arb;

/// The agent's log store, compiled from its source file rather than through
/// the `vmlet-agent` crate: it uses only std, tokio's watch and the
/// protocol, while the whole agent (HTTP client, image tools) takes minutes
/// to build with sanitizers.
#[path = "../../agent/src/logstore.rs"]
pub mod logstore;

/// The system allocator, recording the largest single allocation since
/// [`reset_peak`].
#[derive(Debug)]
pub struct Tracking;

static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged, so `System`'s guarantees carry over; the counter has no effect
// on the memory handed out.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        PEAK.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        PEAK.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, that is from `System`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        PEAK.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// Forgets the largest allocation seen so far.
pub fn reset_peak() {
    PEAK.store(0, Ordering::Relaxed);
}

/// The largest single allocation since [`reset_peak`].
pub fn peak() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// serde's `size_hint::cautious` lets a sequence preallocate up to 1 MiB
/// whatever its length prefix claims; bincode's byte limit catches the lie
/// only when the elements are read. So a decode may allocate this much
/// beyond what the payload itself explains.
pub const SERDE_PREALLOC: usize = 1 << 20;

/// The most one decode of an `n`-byte payload may allocate at once: a
/// payload byte can become at most a few hundred bytes of decoded structure
/// (an empty string is one byte on the wire, 24 in memory; a vector grows by
/// doubling), plus serde's preallocation.
pub fn decode_alloc_bound(n: usize) -> usize {
    SERDE_PREALLOC + 1024 * n + 4096
}

/// Runs a future that never waits on anything but ready I/O (reads from a
/// byte slice) to completion.
pub fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..1_000_000 {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
    panic!("a read from a byte slice kept returning Pending");
}

/// One frame read's outcome in a comparable form.
fn outcome<T: Debug>(r: &Result<Option<T>, FrameError>) -> String {
    match r {
        Ok(v) => format!("ok {v:?}"),
        // I/O errors carry no payload worth comparing beyond their kind.
        Err(FrameError::Io(e)) => format!("io {:?}", e.kind()),
        Err(e) => format!("err {e:?}"),
    }
}

/// Reads every frame in `bytes` with both the blocking and the async reader
/// (limit `max`), as a peer would, and checks:
///
/// - both readers agree on every frame and every error;
/// - a header announcing more than `max` is refused as `TooLarge` before
///   anything of its size is allocated;
/// - no decode allocates more than [`decode_alloc_bound`] at once;
/// - a decoded message re-encodes to a frame no larger than the one it came
///   from, which decodes to the same value;
/// - after a malformed payload the reader stays in step (the next read
///   starts at the next frame); after any other error the stream is given up.
pub fn check_frames<T>(bytes: &[u8], max: u32)
where
    T: DeserializeOwned + Serialize + PartialEq + Debug,
{
    let mut sync_rd = bytes;
    let mut async_rd = bytes;
    for _ in 0..64 {
        let at = bytes.len() - sync_rd.len();
        let header = <&[u8; HEADER_LEN]>::try_from(sync_rd.get(..HEADER_LEN).unwrap_or(&[]))
            .ok()
            .map(|h| Header::parse(h, u32::MAX));

        reset_peak();
        let s = frame::read_frame::<_, T>(&mut sync_rd, max);
        let sync_peak = peak();
        reset_peak();
        let a = block_on(vmlet_protocol::aio::read_frame::<_, T>(&mut async_rd, max));
        let async_peak = peak();

        assert_eq!(outcome(&s), outcome(&a), "readers disagree at byte {at}");
        assert_eq!(
            sync_rd.len(),
            async_rd.len(),
            "readers consumed differently"
        );

        if let Some(Ok(h)) = header {
            if h.len > max {
                assert!(
                    matches!(s, Err(FrameError::TooLarge { len, .. }) if len == h.len),
                    "a {}-byte frame over the limit {max} was not refused: {}",
                    h.len,
                    outcome(&s)
                );
                assert!(
                    sync_peak < 4096 && async_peak < 4096,
                    "an oversized header made the reader allocate {} bytes",
                    sync_peak.max(async_peak)
                );
            } else {
                // The payload buffer itself, then the decode.
                let bound = (h.len as usize).max(decode_alloc_bound(h.len as usize));
                assert!(
                    sync_peak <= bound && async_peak <= bound,
                    "a {}-byte payload made the reader allocate {} bytes at once",
                    h.len,
                    sync_peak.max(async_peak)
                );
            }
        }

        match s {
            Ok(None) => {
                assert!(sync_rd.is_empty(), "end of stream with bytes left");
                return;
            }
            Ok(Some(msg)) => {
                let h = header
                    .expect("a frame was read")
                    .expect("its header parsed");
                check_reencode(&msg, h.len as usize);
            }
            Err(e) if e.stream_usable() => {
                let h = header
                    .expect("a frame was read")
                    .expect("its header parsed");
                assert_eq!(
                    bytes.len() - sync_rd.len(),
                    at + HEADER_LEN + h.len as usize,
                    "a malformed payload left the stream out of step"
                );
            }
            Err(_) => return,
        }
    }
}

/// Re-encodes a decoded message: it must fit where it came from and decode
/// to the same value.
pub fn check_reencode<T>(msg: &T, original_len: usize)
where
    T: DeserializeOwned + Serialize + PartialEq + Debug,
{
    let buf = frame::encode(msg).expect("a decoded message re-encodes");
    let payload = &buf[HEADER_LEN..];
    assert!(
        payload.len() <= original_len,
        "re-encoding grew a {original_len}-byte payload to {}",
        payload.len()
    );
    let back: T = frame::decode(payload).expect("a re-encoded message decodes");
    assert_eq!(&back, msg, "decode(encode(m)) != m");
}

/// Decodes `payload` as a `T` the way the frame readers do and checks the
/// allocation bound and, on success, the re-encoding.
pub fn check_decode<T>(payload: &[u8])
where
    T: DeserializeOwned + Serialize + PartialEq + Debug,
{
    reset_peak();
    let r = frame::decode::<T>(payload);
    let p = peak();
    assert!(
        p <= decode_alloc_bound(payload.len()),
        "decoding {} bytes allocated {p} bytes at once",
        payload.len()
    );
    match r {
        Ok(m) => check_reencode(&m, payload.len()),
        Err(e) => assert!(matches!(e, FrameError::Malformed(_)), "{e:?}"),
    }
}
