//! vmletd.
