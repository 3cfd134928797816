//! Diagnostics on the guest console.
//!
//! PID 1's stderr is `/dev/console` (the serial port QEMU writes to a log
//! file), so a line on stderr with a boot-time stamp is all the logging
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
///
/// The line is formatted first and written in one call: `eprintln!` on the
/// unbuffered stderr makes a `write` per piece of the format (18 for the
/// start's line, counted with strace), each a trip through the tty layer
/// to the emulated UART, and lets other writers cut into the line.
pub(crate) fn write(args: fmt::Arguments<'_>) {
    use std::io::Write;
    let line = line(boottime_us(), args);
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// One console line: the boot-time stamp `t` (µs), the message, a newline.
fn line(t: u64, args: fmt::Arguments<'_>) -> String {
    format!(
        "tether[{:>4}.{:06}]: {}\n",
        t / 1_000_000,
        t % 1_000_000,
        args
    )
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
    fn a_line_is_stamped_and_ends_in_a_newline() {
        let argv = ["echo", "ready"];
        assert_eq!(
            line(
                1_234_567,
                format_args!("process {} started: argv {argv:?}", 26)
            ),
            "tether[   1.234567]: process 26 started: argv [\"echo\", \"ready\"]\n"
        );
        assert_eq!(
            line(12_000_000_001, format_args!("x")),
            "tether[12000.000001]: x\n"
        );
    }

    #[test]
    fn boottime_moves_forward() {
        let a = boottime_us();
        let b = boottime_us();
        assert!(a > 0 && b >= a);
    }
}
