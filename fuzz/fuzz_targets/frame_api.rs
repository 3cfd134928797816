//! The API socket: what vmletd reads from any local client.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmlet_fuzz::{check_decode, check_frames};
use vmlet_protocol::api::ClientMessage;
use vmlet_protocol::MAX_FRAME_LEN;

fuzz_target!(|data: &[u8]| {
    // As a stream of frames, and as one bare payload (so the fuzzer need
    // not find a valid header to reach the decoder).
    check_frames::<ClientMessage>(data, MAX_FRAME_LEN);
    check_decode::<ClientMessage>(data);
});
