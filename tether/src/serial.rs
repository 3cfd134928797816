//! The host link over a virtio-serial port, for guests restored from a
//! template snapshot.
//!
//! QEMU 7.2 cannot migrate a `vhost-user-vsock-device` (its state is marked
//! unmigratable), so a template VM, which is snapshotted once and restored
//! many times, talks to the host through a named virtio-serial port instead
//! (`virtserialport,name=vmlet`), whose QEMU side is a Unix socket the agent
//! connects to. The framing above it is the same as over vsock.
//!
//! The port tells the guest about the host: while no host is connected,
//! `poll` reports `POLLHUP` and a read returns end of file, and writes wait.
//! So a connection here is "the host is connected": [`Serial::connect`]
//! opens the port and waits until a host is there, and a host that goes
//! away ends the connection with end of file, which the link answers by
//! closing the port and connecting again. Unlike vhost-device-vsock, the
//! port always says when the host left, so no stall check is needed.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::link::Connector;

/// The port's name, as the agent gives it to QEMU.
pub(crate) const PORT_NAME: &str = "vmlet";

/// How often a waiting connect looks for the host. Short: a clone restored
/// from a template waits here for its agent, and every millisecond of this
/// is start latency.
const HOST_POLL: Duration = Duration::from_millis(2);

/// Connects by opening the port named [`PORT_NAME`].
#[derive(Debug, Default)]
pub(crate) struct Serial {
    path: Option<PathBuf>,
}

impl Connector for Serial {
    type Stream = Port;
    async fn connect(&mut self) -> io::Result<Port> {
        let path = match &self.path {
            Some(p) => p.clone(),
            None => {
                let p = find_port(Path::new("/sys/class/virtio-ports"), PORT_NAME)?;
                self.path.insert(p).clone()
            }
        };
        // The device node appears shortly after the driver binds the port.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)?;
        loop {
            if host_connected(&file)? {
                // SAFETY: the file is open, and owned by the AsyncFd from
                // here on, so it stays open while registered.
                let fd = unsafe { AsyncFd::register(file) }?;
                return Ok(Port { fd });
            }
            tokio::time::sleep(HOST_POLL).await;
        }
    }
}

/// `/dev/vportNpM` of the port whose sysfs name is `name`.
fn find_port(class: &Path, name: &str) -> io::Result<PathBuf> {
    for e in std::fs::read_dir(class)? {
        let e = e?;
        let n = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if n.trim_end() == name {
            return Ok(Path::new("/dev").join(e.file_name()));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no virtio-serial port named {name:?}"),
    ))
}

/// Whether a host is connected to the port: no `POLLHUP`.
fn host_connected(f: &File) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLIN | libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd, a zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(p.revents & libc::POLLHUP == 0)
}

/// An open port with a host connected to it.
#[derive(Debug)]
pub(crate) struct Port {
    fd: AsyncFd<File>,
}

impl AsyncRead for Port {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|f| f.get_ref().read(unfilled)) {
                // 0: the host went away (or end of file): the link reconnects.
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for Port {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|f| f.get_ref().write(data)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Which transport the agent gave this guest (`vmlet.link=` on the kernel
/// command line; vsock unless it says `serial`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LinkKind {
    Vsock,
    Serial,
}

impl LinkKind {
    /// Reads it from a kernel command line.
    pub(crate) fn from_cmdline(cmdline: &str) -> LinkKind {
        match cmdline
            .split_ascii_whitespace()
            .find_map(|a| a.strip_prefix("vmlet.link="))
        {
            Some("serial") => LinkKind::Serial,
            _ => LinkKind::Vsock,
        }
    }

    /// This guest's.
    pub(crate) fn current() -> LinkKind {
        LinkKind::from_cmdline(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default())
    }
}

/// Applies a template clone's fix-ups: `seed` into the kernel's random
/// pool, credited, then a reseed of the generator every clone inherited
/// in the same state; and the wall clock.
pub(crate) fn renew(seed: &[u8], realtime_ns: u64) -> io::Result<()> {
    let mut random = OpenOptions::new().write(true).open("/dev/urandom")?;
    let words = seed.len().div_ceil(4).min(64);
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = vec![0u32; 2 + words];
    info[0] = (seed.len().min(words * 4) * 8) as u32;
    info[1] = seed.len().min(words * 4) as u32;
    for (i, chunk) in seed.chunks(4).take(words).enumerate() {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = u32::from_ne_bytes(w);
    }
    const RNDADDENTROPY: libc::Ioctl = 0x4008_5203;
    const RNDRESEEDCRNG: libc::Ioctl = 0x5207;
    // SAFETY: the ioctl reads a rand_pool_info of buf_size bytes from our
    // buffer, which holds at least that many after its two header words.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) } < 0 {
        return Err(io::Error::last_os_error());
    }
    random.flush()?;
    let ts = nix::sys::time::TimeSpec::from(Duration::from_nanos(realtime_ns));
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_kind_comes_from_the_command_line() {
        assert_eq!(
            LinkKind::from_cmdline("console=ttyS0 quiet"),
            LinkKind::Vsock
        );
        assert_eq!(
            LinkKind::from_cmdline("quiet vmlet.link=serial panic=-1"),
            LinkKind::Serial
        );
        assert_eq!(LinkKind::from_cmdline("vmlet.link=bogus"), LinkKind::Vsock);
    }

    #[test]
    fn finds_a_port_by_its_name() {
        let d = std::env::temp_dir().join(format!("vmlet-ports-{}", std::process::id()));
        for (port, name) in [("vport0p1", "other"), ("vport0p2", "vmlet")] {
            std::fs::create_dir_all(d.join(port)).unwrap();
            std::fs::write(d.join(port).join("name"), format!("{name}\n")).unwrap();
        }
        assert_eq!(find_port(&d, "vmlet").unwrap(), Path::new("/dev/vport0p2"));
        assert_eq!(
            find_port(&d, "nope").unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
