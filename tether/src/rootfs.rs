//! The container's root filesystem: layer disks found by serial, merged
//! with overlayfs over a writable upper layer, plus the pseudo-filesystems
//! a process expects inside it.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::MsFlags;
use vmlet_protocol::api::RootTimings;
use vmlet_protocol::guest::{DiskSpec, ProcessSpec};

use crate::log;

/// Where the merged root filesystem is mounted; the process is chrooted here.
pub(crate) const ROOT: &str = "/run/vmlet/root";
/// Each read-only layer is mounted at `LAYERS/<index>`.
const LAYERS: &str = "/run/vmlet/layers";
/// The writable disk (or a tmpfs) holding overlayfs's `upper` and `work`.
const RW: &str = "/run/vmlet/rw";
/// An empty lower layer for a spec with no layers at all.
const EMPTY: &str = "/run/vmlet/empty";
/// A [`Scratch`] root's tmpfs: its overlay's `upper`, `work` and `root`.
const SCRATCH: &str = "/run/vmlet/scratch";
/// Where the kernel lists block devices.
const SYS_BLOCK: &str = "/sys/block";
/// How long to wait for the disks to show up after the modules loaded.
const DISK_WAIT: Duration = Duration::from_secs(5);
/// A virtio-blk serial is at most this many bytes (`VIRTIO_BLK_ID_BYTES`);
/// a longer one reaches the guest truncated.
const SERIAL_MAX: usize = 20;

/// Why the root filesystem could not be assembled.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// No block device carries this serial.
    #[error("no disk with serial {0:?} appeared within {DISK_WAIT:?}")]
    DiskMissing(String),
    /// A mount failed.
    #[error("cannot mount {what} ({fstype}) on {target}")]
    Mount {
        what: String,
        fstype: String,
        target: PathBuf,
        #[source]
        source: Errno,
    },
    /// A directory could not be created.
    #[error("cannot create {0}")]
    Mkdir(PathBuf, #[source] std::io::Error),
    /// The hostname was refused.
    #[error("cannot set the hostname to {0:?}")]
    Hostname(String, #[source] Errno),
}

/// The console's account of [`assemble`]'s steps.
pub(crate) fn describe(t: &RootTimings) -> String {
    format!(
        "disks {} us, layers {} us, writable {} us, dirs {} us, overlay {} us, inner {} us",
        t.disks_us, t.layers_us, t.writable_us, t.dirs_us, t.overlay_us, t.inner_us
    )
}

/// Measures one step after another on the guest's clock.
struct Lap(u64);

impl Lap {
    fn start() -> Lap {
        Lap(crate::console::boottime_us())
    }
    /// Microseconds since the last lap.
    fn lap(&mut self) -> u64 {
        let now = crate::console::boottime_us();
        now.saturating_sub(std::mem::replace(&mut self.0, now))
    }
}

/// Mounts the layers, the upper layer and the overlay at [`ROOT`], the
/// pseudo-filesystems inside it, and sets the hostname. Returns how long
/// each step took: under emulation they are a visible share of a cold
/// start.
pub(crate) fn assemble(spec: &ProcessSpec) -> Result<RootTimings, Error> {
    let mut steps = RootTimings::default();
    let mut lap = Lap::start();
    let wanted: Vec<&str> = spec
        .layers
        .iter()
        .chain(spec.writable.iter())
        .map(|d| d.serial.as_str())
        .collect();
    let devices = wait_for_disks(&wanted, Path::new(SYS_BLOCK), DISK_WAIT)?;
    steps.disks_us = lap.lap();
    let dev = |d: &DiskSpec| -> PathBuf {
        // wait_for_disks returned only when every wanted serial was found.
        Path::new("/dev").join(&devices[&d.serial])
    };

    for (i, layer) in spec.layers.iter().enumerate() {
        mount(
            &dev(layer),
            &Path::new(LAYERS).join(i.to_string()),
            &layer.fstype,
            MsFlags::MS_RDONLY,
            None,
        )?;
    }
    let lowers = lowers(spec.layers.len())?;
    steps.layers_us = lap.lap();

    let rw = Path::new(RW);
    match &spec.writable {
        Some(disk) => mount(&dev(disk), rw, &disk.fstype, MsFlags::empty(), None)?,
        None => mount(
            Path::new("tmpfs"),
            rw,
            "tmpfs",
            MsFlags::MS_NODEV,
            Some("mode=0755"),
        )?,
    }
    steps.writable_us = lap.lap();
    let (upper, work) = (rw.join("upper"), rw.join("work"));
    mkdir(&upper)?;
    mkdir(&work)?;
    steps.dirs_us = lap.lap();
    let opts = overlay_options(&lowers, &upper, &work);
    mount(
        Path::new("overlay"),
        Path::new(ROOT),
        "overlay",
        MsFlags::empty(),
        Some(&opts),
    )?;
    steps.overlay_us = lap.lap();

    mount_inner(Path::new(ROOT), false)?;
    set_hostname(&spec.hostname)?;
    steps.inner_us = lap.lap();
    Ok(steps)
}

/// The overlay's lower directories for `layers` mounted layers: each
/// layer's mount point, or one empty directory when there are none.
fn lowers(layers: usize) -> Result<Vec<PathBuf>, Error> {
    if layers == 0 {
        mkdir(Path::new(EMPTY))?;
        return Ok(vec![PathBuf::from(EMPTY)]);
    }
    Ok((0..layers)
        .map(|i| Path::new(LAYERS).join(i.to_string()))
        .collect())
}

/// A scratch copy of the root [`assemble`] mounted: the same layers,
/// merged over a throwaway tmpfs instead of the writable disk, with its
/// own proc, sys and dev. Nothing written in it reaches the container's
/// root. Unmounted, with everything mounted under it, when dropped.
#[derive(Debug)]
pub(crate) struct Scratch(());

impl Scratch {
    /// Where the scratch root is mounted.
    pub(crate) fn root(&self) -> PathBuf {
        Path::new(SCRATCH).join("root")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Lazily: a mount still in use goes once its last user does.
        if let Err(e) = nix::mount::umount2(SCRATCH, nix::mount::MntFlags::MNT_DETACH) {
            log!("cannot unmount {SCRATCH}: {e}");
        }
    }
}

/// Mounts a [`Scratch`] root over the `layers` layers [`assemble`]
/// mounted.
pub(crate) fn mount_scratch(layers: usize) -> Result<Scratch, Error> {
    let base = Path::new(SCRATCH);
    mount(
        Path::new("tmpfs"),
        base,
        "tmpfs",
        MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    let scratch = Scratch(());
    let (upper, work) = (base.join("upper"), base.join("work"));
    mkdir(&upper)?;
    mkdir(&work)?;
    let opts = overlay_options(&lowers(layers)?, &upper, &work);
    let root = scratch.root();
    mount(
        Path::new("overlay"),
        &root,
        "overlay",
        MsFlags::empty(),
        Some(&opts),
    )?;
    mount_inner(&root, true)?;
    Ok(scratch)
}

/// Sets the guest's hostname (nothing for an empty one).
pub(crate) fn set_hostname(name: &str) -> Result<(), Error> {
    if !name.is_empty() {
        nix::unistd::sethostname(name).map_err(|e| Error::Hostname(name.to_string(), e))?;
    }
    Ok(())
}

/// overlayfs's `lowerdir` lists the top-most layer first; `layers` are
/// lowest first.
pub(crate) fn lowerdir(layers: &[PathBuf]) -> String {
    layers
        .iter()
        .rev()
        .map(|p| p.to_string_lossy())
        .collect::<Vec<_>>()
        .join(":")
}

fn overlay_options(lowers: &[PathBuf], upper: &Path, work: &Path) -> String {
    format!(
        "lowerdir={},upperdir={},workdir={}",
        lowerdir(lowers),
        upper.display(),
        work.display()
    )
}

/// proc, sys and dev inside the new root: the minimum a process expects.
/// `/dev/pts` and `/dev/shm` are conveniences and may fail. A `scratch`
/// root's dev is read-only: devtmpfs is one filesystem for the whole
/// guest, so a node made there would be the container's too.
fn mount_inner(root: &Path, scratch: bool) -> Result<(), Error> {
    let hard = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Path::new("proc"), &root.join("proc"), "proc", hard, None)?;
    mount(
        Path::new("sysfs"),
        &root.join("sys"),
        "sysfs",
        hard | MsFlags::MS_RDONLY,
        None,
    )?;
    mount(
        Path::new("devtmpfs"),
        &root.join("dev"),
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    if scratch {
        // This mount only: a read-only devtmpfs mount would reconfigure
        // its one superblock, the container's /dev with it.
        let flags =
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID;
        let dev = root.join("dev");
        nix::mount::mount(None::<&str>, &dev, None::<&str>, flags, None::<&str>).map_err(
            |source| Error::Mount {
                what: "a read-only bind".into(),
                fstype: "devtmpfs".into(),
                target: dev.clone(),
                source,
            },
        )?;
    }
    let optional = [
        (
            "devpts",
            "dev/pts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=0620",
        ),
        (
            "tmpfs",
            "dev/shm",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            "mode=1777",
        ),
    ];
    for (fstype, dir, flags, data) in optional {
        if let Err(e) = mount(
            Path::new(fstype),
            &root.join(dir),
            fstype,
            flags,
            Some(data),
        ) {
            log!("{}", crate::console::chain(&e));
        }
    }
    Ok(())
}

fn mkdir(path: &Path) -> Result<(), Error> {
    fs::create_dir_all(path).map_err(|e| Error::Mkdir(path.to_owned(), e))
}

/// Mounts `what` on `target`, creating `target` first.
fn mount(
    what: &Path,
    target: &Path,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), Error> {
    mkdir(target)?;
    nix::mount::mount(Some(what), target, Some(fstype), flags, data).map_err(|source| {
        Error::Mount {
            what: what.display().to_string(),
            fstype: fstype.to_owned(),
            target: target.to_owned(),
            source,
        }
    })
}

/// Polls `sys_block` until every serial in `wanted` names a device, and
/// returns serial → device name (`vda`). Device names depend on probe
/// order; serials are what the agent controls.
fn wait_for_disks(
    wanted: &[&str],
    sys_block: &Path,
    patience: Duration,
) -> Result<HashMap<String, String>, Error> {
    let start = Instant::now();
    loop {
        let found = read_serials(sys_block);
        let mut map = HashMap::new();
        let mut missing = None;
        for &serial in wanted {
            match found.get(wire_serial(serial)) {
                Some(dev) => {
                    map.insert(serial.to_owned(), dev.clone());
                }
                None => {
                    missing = Some(serial);
                    break;
                }
            }
        }
        match missing {
            None => return Ok(map),
            Some(s) if start.elapsed() >= patience => return Err(Error::DiskMissing(s.to_owned())),
            Some(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// The serial as the guest sees it: virtio-blk carries at most
/// [`SERIAL_MAX`] bytes.
fn wire_serial(serial: &str) -> &str {
    if serial.len() <= SERIAL_MAX {
        return serial;
    }
    let mut end = SERIAL_MAX;
    while !serial.is_char_boundary(end) {
        end -= 1;
    }
    &serial[..end]
}

/// Serial → device name for every block device that has a serial.
fn read_serials(sys_block: &Path) -> HashMap<String, String> {
    let mut map = HashMap::new();
    let Ok(entries) = fs::read_dir(sys_block) else {
        return map;
    };
    for entry in entries.flatten() {
        let Ok(raw) = fs::read(entry.path().join("serial")) else {
            continue;
        };
        let serial = String::from_utf8_lossy(&raw)
            .trim_matches(|c: char| c.is_whitespace() || c == '\0')
            .to_owned();
        if !serial.is_empty() {
            map.insert(serial, entry.file_name().to_string_lossy().into_owned());
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    #[test]
    fn lowerdir_lists_top_layer_first() {
        let layers: Vec<PathBuf> = ["/l/0", "/l/1", "/l/2"].iter().map(PathBuf::from).collect();
        assert_eq!(lowerdir(&layers), "/l/2:/l/1:/l/0");
        assert_eq!(lowerdir(&layers[..1]), "/l/0");
    }

    #[test]
    fn overlay_options_name_all_three_dirs() {
        let o = overlay_options(
            &[PathBuf::from("/a"), PathBuf::from("/b")],
            Path::new("/rw/upper"),
            Path::new("/rw/work"),
        );
        assert_eq!(o, "lowerdir=/b:/a,upperdir=/rw/upper,workdir=/rw/work");
    }

    fn fake_disk(dir: &Path, name: &str, serial: Option<&[u8]>) {
        let d = dir.join(name);
        fs::create_dir_all(&d).unwrap();
        if let Some(s) = serial {
            fs::write(d.join("serial"), s).unwrap();
        }
    }

    #[test]
    fn serials_map_to_devices() {
        let t = TempDir::new();
        fake_disk(t.path(), "vda", Some(b"layer0\n"));
        fake_disk(t.path(), "vdb", Some(b"rw\0\0"));
        fake_disk(t.path(), "loop0", None);
        fake_disk(t.path(), "vdc", Some(b""));
        let m = read_serials(t.path());
        assert_eq!(m.len(), 2);
        assert_eq!(m["layer0"], "vda");
        assert_eq!(m["rw"], "vdb");
        let got = wait_for_disks(&["rw", "layer0"], t.path(), Duration::ZERO).unwrap();
        assert_eq!(got["layer0"], "vda");
        assert_eq!(got["rw"], "vdb");
    }

    #[test]
    fn missing_disk_times_out() {
        let t = TempDir::new();
        fake_disk(t.path(), "vda", Some(b"layer0"));
        let err = wait_for_disks(&["layer0", "nope"], t.path(), Duration::from_millis(30));
        assert!(matches!(err, Err(Error::DiskMissing(s)) if s == "nope"));
        assert!(wait_for_disks(&[], t.path(), Duration::ZERO)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn long_serials_match_their_truncated_form() {
        let t = TempDir::new();
        fake_disk(t.path(), "vda", Some(b"0123456789abcdefghij"));
        let long = "0123456789abcdefghijKLMNOP";
        let got = wait_for_disks(&[long], t.path(), Duration::ZERO).unwrap();
        assert_eq!(got[long], "vda");
        assert_eq!(wire_serial(&format!("a{}", "é".repeat(10))).len(), 19);
    }
}
