//! Arbitrary messages of every kind: encode, then read back through both
//! frame readers; the value must survive, and the size limits must hold on
//! both sides (a sender never produces a frame its peer must refuse).
#![no_main]

use std::fmt::Debug;

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};
use vmlet_fuzz::{arb, block_on};
use vmlet_protocol::api::{ClientMessage, ServerMessage};
use vmlet_protocol::frame::{self, FrameError, HEADER_LEN};
use vmlet_protocol::guest::{GuestMessage, HostMessage, MAX_GUEST_FRAME};
use vmlet_protocol::MAX_FRAME_LEN;

fn roundtrip<T>(u: &mut Unstructured<'_>, read_limit: u32)
where
    T: DeserializeOwned + Serialize + PartialEq + Debug,
{
    let Ok(msg) = arb::value::<T>(u) else {
        return;
    };
    let buf = match frame::encode(&msg) {
        Ok(b) => b,
        Err(FrameError::TooLarge { .. }) => return,
        Err(e) => panic!("encoding {msg:?} failed: {e}"),
    };
    let len = buf.len() - HEADER_LEN;
    assert!(len <= MAX_FRAME_LEN as usize);
    let sync = frame::read_frame::<_, T>(&mut &buf[..], read_limit);
    let asy = block_on(vmlet_protocol::aio::read_frame::<_, T>(
        &mut &buf[..],
        read_limit,
    ));
    if len > read_limit as usize {
        assert!(matches!(sync, Err(FrameError::TooLarge { .. })), "{sync:?}");
        assert!(matches!(asy, Err(FrameError::TooLarge { .. })), "{asy:?}");
        return;
    }
    assert_eq!(sync.expect("sync read").as_ref(), Some(&msg));
    assert_eq!(asy.expect("async read").as_ref(), Some(&msg));
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    match u.int_in_range(0..=3u8).unwrap_or(0) {
        0 => roundtrip::<ClientMessage>(&mut u, MAX_FRAME_LEN),
        1 => roundtrip::<ServerMessage>(&mut u, MAX_FRAME_LEN),
        2 => roundtrip::<GuestMessage>(&mut u, MAX_GUEST_FRAME),
        _ => roundtrip::<HostMessage>(&mut u, MAX_FRAME_LEN),
    }
});
