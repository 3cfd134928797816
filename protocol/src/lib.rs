//! Wire types and framing for vmlet.
//!
//! Every message that crosses a process boundary lives here: the engine ⇄
//! agent API ([`api`]) and the agent ⇄ tether protocol ([`guest`]). Both use
//! the same framing ([`frame`]): a fixed header (magic, framing version,
//! payload length) followed by a bincode 1.3 payload. The payload length is
//! checked against a hard maximum *before* anything is allocated, and every
//! decode runs with a byte limit, so a hostile peer cannot make the reader
//! allocate more than one frame's worth of memory.
//!
//! The core has no runtime dependency. The `tokio` feature adds async frame
//! I/O (module `aio`); the `client` feature adds the engine's client (module
//! `client`).
#![warn(missing_docs, unreachable_pub)]

pub mod api;
pub mod error;
pub mod frame;
pub mod guest;

#[cfg(feature = "tokio")]
pub mod aio;
#[cfg(feature = "client")]
pub mod client;

pub use error::{ApiError, ErrorCode};
pub use frame::{FrameError, Header, HEADER_LEN, MAGIC, MAX_FRAME_LEN};
