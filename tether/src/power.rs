//! Ending the VM: PID 1 must never exit, so every path ends here.

use nix::sys::reboot::{reboot, RebootMode};

use crate::log;

/// Flushes the filesystems and reboots, which ends the VM: QEMU runs with
/// `-no-reboot`. If even that fails, exiting makes the kernel panic, which
/// with `panic=-1` also reboots.
pub(crate) fn off() -> ! {
    nix::unistd::sync();
    // reboot() returns only on failure.
    let e = reboot(RebootMode::RB_AUTOBOOT).unwrap_err();
    log!("reboot failed: {e}");
    std::process::exit(1)
}

/// A panic (the profile aborts on panic) would kill PID 1 and panic the
/// kernel; report it on the console and reboot cleanly instead.
pub(crate) fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        log!("panic: {info}");
        off()
    }));
}
