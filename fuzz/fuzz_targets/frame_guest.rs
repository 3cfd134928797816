//! The guest link, both ways: what the agent reads from a guest (untrusted,
//! limited to `MAX_GUEST_FRAME`), and what the tether reads from the host.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmlet_fuzz::{check_decode, check_frames};
use vmlet_protocol::guest::{GuestMessage, HostMessage, MAX_GUEST_FRAME};
use vmlet_protocol::MAX_FRAME_LEN;

fuzz_target!(|data: &[u8]| {
    check_frames::<GuestMessage>(data, MAX_GUEST_FRAME);
    check_decode::<GuestMessage>(data);
    check_frames::<HostMessage>(data, MAX_FRAME_LEN);
    check_decode::<HostMessage>(data);
});
