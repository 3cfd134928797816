//! The boot-latency harness's parts: the hand-written baseline, the
//! private agents of the other modes, the page cache, statistics, the
//! report and its SVG plot, and what it reads from `/proc`. `vmlet-bench`
//! (main.rs) drives them.

pub mod agents;
pub mod baseline;
pub mod cache;
pub mod mode;
pub mod report;
pub mod stats;
pub mod svg;
pub mod sys;
