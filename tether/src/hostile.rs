//! A misbehaving guest, for the agent's tests only (cargo feature
//! `hostile`; never in a real guest's initrd).
//!
//! Everything a guest sends is untrusted: the agent must confine a guest
//! that floods, breaks the framing, lies about itself, dials without end or
//! never answers to that guest's own VM. When the spec's environment holds
//! `VMLET_HOSTILE=<mode>` (and optionally `VMLET_HOSTILE_SECONDS=<n>`),
//! [`act`] misbehaves right after the spec arrives:
//!
//! | mode | what the guest does |
//! |---|---|
//! | `flood` | reports a start, then writes stdout frames as fast as it can for n seconds (5), ignoring the host's acknowledgements; then runs the process normally |
//! | `garbage` | reports a start and a line of output, then writes random bytes instead of frames |
//! | `oversize` | reports a start and a line of output, then a frame header announcing 1 GiB |
//! | `identity` | reports a start with a bogus pid, then thousands of second hellos (other boot timings) and starts; then runs the process normally |
//! | `connections` | opens vsock connections to the host's tether port without end, holding every one, while the process runs normally |
//! | `silent` | never reports a start |
//!
//! The raw modes write on the link's own connection, found among the
//! process's descriptors as a hostile guest would find it, while the link
//! is idle (the process has not started, so it has nothing to send).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::sys::socket::{getpeername, VsockAddr};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::time::{sleep, timeout, Instant};
use tokio_vsock::{VsockStream, VMADDR_CID_HOST};
use vmlet_protocol::api::GuestBoot;
use vmlet_protocol::frame::{self, Header, FRAME_VERSION, MAX_CHUNK};
use vmlet_protocol::guest::{GuestMessage, ProcessSpec, GUEST_PROTOCOL_VERSION, TETHER_PORT};

use crate::log;

/// Boot timings no real guest reports: the agent must not believe them.
pub(crate) const BOGUS_KERNEL_US: u64 = 4_242_424_242;

/// Misbehaves as the spec's environment asks; returns when the session
/// should go on normally, never for the modes that end the VM.
pub(crate) async fn act(spec: &ProcessSpec) {
    let env = |key: &str| {
        spec.env
            .iter()
            .find_map(|e| e.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_string)
    };
    let Some(mode) = env("VMLET_HOSTILE") else {
        return;
    };
    let seconds = env("VMLET_HOSTILE_SECONDS")
        .and_then(|s| s.parse().ok())
        .unwrap_or(5u64);
    log!("hostile mode {mode:?}");
    let r = match mode.as_str() {
        "flood" => flood(Duration::from_secs(seconds)).await,
        "garbage" => garbage().await,
        "oversize" => oversize().await,
        "identity" => identity().await,
        "connections" => {
            tokio::spawn(connections());
            Ok(())
        }
        "silent" => std::future::pending().await,
        other => {
            log!("unknown hostile mode {other:?}; behaving");
            Ok(())
        }
    };
    if let Err(e) = r {
        log!("hostile mode {mode:?} failed: {e}");
    }
}

/// The link's connection to the host, duplicated.
fn host_connection() -> io::Result<AsyncFd<OwnedFd>> {
    for ent in std::fs::read_dir("/proc/self/fd")?.flatten() {
        let Some(fd) = ent
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<RawFd>().ok())
        else {
            continue;
        };
        let Ok(peer) = getpeername::<VsockAddr>(fd) else {
            continue;
        };
        if peer.cid() != VMADDR_CID_HOST || peer.port() != TETHER_PORT {
            continue;
        }
        let dup = nix::unistd::dup(fd)?;
        // SAFETY: `dup` was just returned by dup(2), so it is an open
        // descriptor that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(dup) };
        // The duplicate shares the original's O_NONBLOCK (set by tokio), so
        // it is polled like any other non-blocking descriptor.
        // SAFETY: `owned` is open and owned by the AsyncFd from here on, so
        // it stays open and names the same description for its lifetime.
        return unsafe { AsyncFd::register_with_interest(owned, Interest::WRITABLE) }
            .map_err(|e| io::Error::other(e.to_string()));
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "no connection to the host's tether port",
    ))
}

async fn write_raw(fd: &AsyncFd<OwnedFd>, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let mut ready = fd.writable().await?;
        match ready.try_io(|f| nix::unistd::write(f.get_ref(), buf).map_err(io::Error::from)) {
            Ok(Ok(n)) => buf = &buf[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}

async fn write_msg(fd: &AsyncFd<OwnedFd>, m: &GuestMessage) -> io::Result<()> {
    let f = frame::encode(m).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    write_raw(fd, &f).await
}

async fn flood(length: Duration) -> io::Result<()> {
    let fd = host_connection()?;
    write_msg(&fd, &GuestMessage::Started { pid: 1 }).await?;
    let chunk: Vec<u8> = (0..MAX_CHUNK).map(|i| b'a' + (i % 26) as u8).collect();
    let f = frame::encode(&GuestMessage::Stdout(chunk))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let end = Instant::now() + length;
    let mut sent = 0u64;
    while Instant::now() < end {
        write_raw(&fd, &f).await?;
        sent += MAX_CHUNK as u64;
    }
    log!("flooded {sent} bytes in {length:?}");
    Ok(())
}

/// Stands in for the process forever: the agent is to end this VM.
async fn hang() -> io::Result<()> {
    std::future::pending().await
}

async fn garbage() -> io::Result<()> {
    let fd = host_connection()?;
    write_msg(&fd, &GuestMessage::Started { pid: 1 }).await?;
    write_msg(&fd, &GuestMessage::Stdout(b"before the garbage\n".to_vec())).await?;
    sleep(Duration::from_millis(300)).await;
    let mut x = 0x2545_f491_4f6c_dd1d_u64 ^ crate::console::boottime_us();
    let junk: Vec<u8> = (0..65536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    write_raw(&fd, &junk).await?;
    hang().await
}

async fn oversize() -> io::Result<()> {
    let fd = host_connection()?;
    write_msg(&fd, &GuestMessage::Started { pid: 1 }).await?;
    write_msg(
        &fd,
        &GuestMessage::Stdout(b"before the oversized frame\n".to_vec()),
    )
    .await?;
    sleep(Duration::from_millis(300)).await;
    let h = Header {
        version: FRAME_VERSION,
        flags: 0,
        len: 1 << 30,
    };
    write_raw(&fd, &h.to_bytes()).await?;
    write_raw(&fd, &[0x55; 4096]).await?;
    hang().await
}

async fn identity() -> io::Result<()> {
    let fd = host_connection()?;
    write_msg(&fd, &GuestMessage::Started { pid: 4242 }).await?;
    let hello = GuestMessage::Hello {
        version: GUEST_PROTOCOL_VERSION,
        boot: GuestBoot {
            kernel_us: BOGUS_KERNEL_US,
            modules_us: 1,
            hello_us: 2,
        },
    };
    for i in 0..10_000 {
        write_msg(&fd, &hello).await?;
        write_msg(&fd, &GuestMessage::Started { pid: 100_000 + i }).await?;
    }
    log!("sent 10000 false hellos and starts");
    Ok(())
}

/// Dials the host's tether port without end, keeping every connection.
async fn connections() {
    let mut held = Vec::new();
    let mut failures = 0u64;
    loop {
        let c = timeout(
            Duration::from_secs(2),
            VsockStream::connect(tokio_vsock::VsockAddr::new(VMADDR_CID_HOST, TETHER_PORT)),
        )
        .await;
        match c {
            Ok(Ok(s)) => {
                held.push(s);
                if held.len() % 100 == 0 {
                    log!("holding {} extra connections to the host", held.len());
                }
            }
            _ => {
                failures += 1;
                if failures % 100 == 1 {
                    log!("{failures} failed extra connections ({} held)", held.len());
                }
                sleep(Duration::from_millis(10)).await;
            }
        }
    }
}
