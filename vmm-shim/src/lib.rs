//! The VMM abstraction.
