//! The boot-latency harness's parts: the hand-written baseline, the page
//! cache, statistics, the SVG plot and what it reads from `/proc`.
//! `vmlet-bench` (main.rs) drives them.

pub mod baseline;
pub mod cache;
pub mod stats;
pub mod svg;
pub mod sys;
