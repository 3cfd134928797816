//! `tether`, PID 1 of every vmlet guest.
//!
//! Mounts the pseudo-filesystems, loads the kernel modules, connects to
//! the host over vsock and says hello with its boot timings, assembles the
//! container's root filesystem from the layer disks, runs the container
//! process and carries its stdio, signals and exit status, then powers the
//! VM off. See `session.rs` for the flow.

mod boot;
mod console;
#[cfg(feature = "hostile")]
mod hostile;
mod link;
mod power;
mod process;
mod pump;
mod rehearsal;
mod rootfs;
mod serial;
mod session;
#[cfg(test)]
mod testutil;
mod warmup;

use std::path::Path;

/// Why the tether gave up.
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("early boot failed")]
    Boot(#[from] boot::Error),
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("the session failed")]
    Session(#[from] session::Error),
}

fn main() {
    let kernel_us = console::boottime_us();
    if nix::unistd::getpid().as_raw() != 1 {
        if rehearsal::is_rehearsal() {
            rehearsal::act();
        }
        // kill(-1) and reboot() are only sane inside a guest.
        eprintln!("tether: refusing to run: it must be PID 1 of a vmlet guest");
        std::process::exit(2);
    }
    power::install_panic_hook();
    if let Err(e) = run(kernel_us) {
        log!("fatal: {}", console::chain(&e));
    }
    power::off()
}

fn run(kernel_us: u64) -> Result<(), Error> {
    let mounted = boot::mount_early();
    boot::ensure_console();
    mounted?;
    log!("tether up {kernel_us} us after kernel start");
    let start = console::boottime_us();
    // The virtio-serial driver only for guests whose host link it carries
    // (template clones, see serial.rs).
    let link = serial::LinkKind::current();
    let skip: &[&str] = match link {
        serial::LinkKind::Vsock => &["virtio_console.ko", boot::LOOPBACK_MODULE],
        serial::LinkKind::Serial => &[boot::LOOPBACK_MODULE],
    };
    boot::load_modules(Path::new(boot::MODULES_DIR), skip);
    let modules_us = console::boottime_us().saturating_sub(start);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    rt.block_on(session::run(link, kernel_us, modules_us))?;
    Ok(())
}
