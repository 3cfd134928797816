//! The boot-latency harness's parts: the hand-written baseline, statistics,
//! the SVG plot and what it reads from `/proc`. `vmlet-bench` (main.rs)
//! drives them.

pub mod baseline;
pub mod stats;
pub mod svg;
pub mod sys;
