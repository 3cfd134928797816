//! Diagnostics on the guest console.
//!
//! PID 1's stderr is `/dev/console` (the serial port QEMU writes to a log
//! file), so a plain `eprintln!` with a boot-time stamp is all the logging
//! the tether needs. Lines are rare: one per boot phase, plus errors.

use std::fmt;

use nix::time::{clock_gettime, ClockId};

/// Microseconds since the kernel started (`CLOCK_BOOTTIME`), the clock the
/// hello's boot timings use.
pub(crate) fn boottime_us() -> u64 {
    match clock_gettime(ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => (ts.tv_sec() as u64) * 1_000_000 + (ts.tv_nsec() as u64) / 1_000,
        Err(_) => 0,
    }
}

/// Writes one line to the console. Use [`log!`](crate::log).
pub(crate) fn write(args: fmt::Arguments<'_>) {
    let t = boottime_us();
    eprintln!(
        "tether[{:>4}.{:06}]: {}",
        t / 1_000_000,
        t % 1_000_000,
        args
    );
}

/// Formats an error with its whole `source()` chain, outermost first.
pub(crate) fn chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}

/// Logs a line to the console with a boot-time stamp.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::console::write(format_args!($($arg)*))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chain_lists_every_source() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(chain(&e), "outer: inner");
    }

    #[test]
    fn boottime_moves_forward() {
        let a = boottime_us();
        let b = boottime_us();
        assert!(a > 0 && b >= a);
    }
}
