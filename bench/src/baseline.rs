//! Mode (a): the start a user would script by hand, with the same kernel,
//! initrd, image disk and QEMU flags as the agent, and none of its help.
//!
//! What the script does, timed from before the copy:
//!
//! ```sh
//! cp rootfs disk.img                                   # copied
//! # listen on vm.vsock_1024 for the tether             (before anything can dial it)
//! vhost-device-vsock --guest-cid 3 --socket vhost.sock --uds-path vm.vsock &
//! # wait for vhost.sock                                # backend-ready
//! qemu-system-x86_64 <the agent's microvm argv> &      # vmm-spawned
//! # accept, read the tether's Hello                    # guest-booted (= ready)
//! # send Spec: echo ready; read until Stdout           # first-output
//! # read Exited, send ExitAck; the guest powers off
//! ```
//!
//! The QEMU argv comes from `vmm_shim::qemu::argv` and the backend's from
//! `vmm_shim::vsock_backend::args`, so the two modes cannot drift apart in
//! flags. Only the orchestration differs: the agent attaches the image disk
//! read-only instead of copying it, keeps its own listener, and so on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::net::UnixListener;
use tokio::process::{Child, Command};
use vmlet_protocol::aio::{read_frame, write_frame};
use vmlet_protocol::guest::{
    DiskSpec, GuestMessage, HostMessage, ProcessSpec, GUEST_PROTOCOL_VERSION, MAX_GUEST_FRAME,
    TETHER_PORT,
};
use vmm_shim::{Accel, Disk, VmConfig, VmPaths};

/// Everything the hand-written script is given.
#[derive(Debug, Clone)]
pub struct Baseline {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// `vhost-device-vsock`.
    pub backend: PathBuf,
    /// The PVH `vmlinux`.
    pub kernel: PathBuf,
    /// Whether that kernel finds its devices through ACPI (as the agent
    /// decides from its config).
    pub acpi: bool,
    /// `CONFIG_HZ` when that kernel takes `lapic_timer_period=` (as the
    /// agent decides from its config).
    pub apic_timer_hz: Option<u32>,
    /// The initrd the agent generated.
    pub initrd: PathBuf,
    /// The image's root filesystem disk (copied per start).
    pub rootfs: PathBuf,
    /// Its filesystem type, as the tether mounts it.
    pub fstype: String,
    /// Accelerator.
    pub accel: Accel,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// Where each start gets its own directory.
    pub work_dir: PathBuf,
    /// How long the guest may take to say hello.
    pub boot_timeout: Duration,
}

/// One baseline start.
#[derive(Debug, Clone, Default)]
pub struct Run {
    /// Milliseconds from the start of the script to each step.
    pub phases_ms: BTreeMap<&'static str, f64>,
    /// PSS of QEMU and the backend, KiB, when sampled.
    pub pss_kib: Option<u64>,
    /// The guest's boot timings from its hello.
    pub guest: Option<vmlet_protocol::api::GuestBoot>,
    /// How the guest assembled the root filesystem, from its report.
    pub root: Option<vmlet_protocol::api::RootTimings>,
}

/// The phases of a baseline start, in order.
pub const PHASES: [&str; 5] = [
    "copied",
    "backend-ready",
    "vmm-spawned",
    "guest-booted",
    "first-output",
];

/// Kills and reaps a child on every path out of [`Baseline::run`].
struct Reaper(Vec<Child>);

impl Reaper {
    async fn finish(&mut self) {
        for c in &mut self.0 {
            let _ = c.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(5), c.wait()).await;
        }
        self.0.clear();
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.start_kill();
        }
    }
}

impl Baseline {
    /// One start running `argv`. With `sample_after`, the memory of QEMU
    /// and the backend is read that long after the first output (the
    /// command must still be running then).
    pub async fn run(
        &self,
        slot: usize,
        argv: &[&str],
        sample_after: Option<Duration>,
    ) -> anyhow::Result<Run> {
        let dir = self.work_dir.join(format!("baseline-{slot}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let mut reaper = Reaper(Vec::new());
        let r = self.run_in(&dir, argv, sample_after, &mut reaper).await;
        reaper.finish().await;
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    async fn run_in(
        &self,
        dir: &Path,
        argv: &[&str],
        sample_after: Option<Duration>,
        reaper: &mut Reaper,
    ) -> anyhow::Result<Run> {
        let log = std::fs::File::create(dir.join("vmm.log"))?;
        let disk = dir.join("disk.img");
        let uds = dir.join("vm.vsock");
        let paths = VmPaths::new(dir);
        let mut run = Run::default();
        let t0 = Instant::now();
        let mark = |run: &mut Run, p: &'static str| {
            run.phases_ms.insert(p, t0.elapsed().as_secs_f64() * 1000.0);
        };

        let st = Command::new("cp")
            .arg(&self.rootfs)
            .arg(&disk)
            .status()
            .await
            .context("cp")?;
        if !st.success() {
            bail!("cp {} failed: {st}", self.rootfs.display());
        }
        mark(&mut run, "copied");

        let mut listen = uds.clone().into_os_string();
        listen.push(format!("_{TETHER_PORT}"));
        let listener = UnixListener::bind(&listen).context("listening for the tether")?;

        // As the agent waits: for the socket to listen, not only to exist.
        let listening = vmm_shim::vsock_backend::ListenWatch::new(&paths.vhost_vsock);
        let backend = Command::new(&self.backend)
            .args(vmm_shim::vsock_backend::args(3, &paths.vhost_vsock, &uds))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log.try_clone()?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("running {}", self.backend.display()))?;
        let backend_pid = backend.id();
        reaper.0.push(backend);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !listening.ready() {
            if Instant::now() > deadline {
                bail!("vhost-device-vsock did not listen on its socket in 10 s");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        mark(&mut run, "backend-ready");

        let cfg = VmConfig {
            id: format!("baseline-{}", std::process::id()),
            dir: dir.to_owned(),
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: format!("vmlet.port={TETHER_PORT}"),
            acpi: self.acpi,
            apic_timer_hz: self.apic_timer_hz,
            memory_mib: self.memory_mib,
            vcpus: self.vcpus,
            cid: 3,
            disks: vec![Disk {
                path: disk.clone(),
                serial: "layer0".into(),
                read_only: false,
            }],
            accel: self.accel,
            vsock_uds: uds.clone(),
            link: Default::default(),
            memory: Default::default(),
            incoming: None,
            staged: None,
        };
        let qemu = Command::new(&self.qemu)
            .args(vmm_shim::qemu::argv(&cfg, &paths, None))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("running {}", self.qemu.display()))?;
        let qemu_pid = qemu.id();
        reaper.0.push(qemu);
        mark(&mut run, "vmm-spawned");

        let (stream, _) = tokio::time::timeout(self.boot_timeout, listener.accept())
            .await
            .with_context(|| {
                format!(
                    "the guest did not dial in within {:?}; console: {}",
                    self.boot_timeout,
                    tail(&paths.console)
                )
            })??;
        let (mut rd, mut wr) = stream.into_split();
        match read_frame::<_, GuestMessage>(&mut rd, MAX_GUEST_FRAME).await? {
            Some(GuestMessage::Hello { version, boot }) if version == GUEST_PROTOCOL_VERSION => {
                run.guest = Some(boot);
            }
            other => bail!("expected the tether's hello, got {other:?}"),
        }
        mark(&mut run, "guest-booted");

        let spec = ProcessSpec {
            layers: vec![DiskSpec {
                serial: "layer0".into(),
                fstype: self.fstype.clone(),
            }],
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec!["PATH=/usr/sbin:/usr/bin:/sbin:/bin".into()],
            hostname: "baseline".into(),
            ..Default::default()
        };
        write_frame(&mut wr, &HostMessage::Spec(spec)).await?;
        let mut exited = false;
        let mut first = true;
        while let Some(m) = tokio::time::timeout(
            Duration::from_secs(60),
            read_frame::<_, GuestMessage>(&mut rd, MAX_GUEST_FRAME),
        )
        .await
        .context("the guest went silent")??
        {
            match m {
                GuestMessage::Root(t) => run.root = Some(t),
                GuestMessage::Stdout(_) | GuestMessage::Stderr(_) if first => {
                    first = false;
                    mark(&mut run, "first-output");
                    if let Some(d) = sample_after {
                        tokio::time::sleep(d).await;
                        let mut total = 0;
                        for pid in [qemu_pid, backend_pid].into_iter().flatten() {
                            total += crate::sys::pss_kib(pid)
                                .with_context(|| format!("reading the PSS of {pid}"))?;
                        }
                        run.pss_kib = Some(total);
                    }
                }
                GuestMessage::Failed { message, code } => {
                    bail!("the tether failed ({code}): {message}")
                }
                GuestMessage::Exited { .. } => {
                    exited = true;
                    write_frame(&mut wr, &HostMessage::ExitAck).await?;
                    break;
                }
                _ => {}
            }
        }
        if first {
            bail!("the command wrote nothing");
        }
        if !exited {
            bail!("the guest hung up before reporting the exit");
        }
        // The tether powers the VM off after the ack; give it a moment, then
        // the reaper kills whatever is left.
        if let Some(q) = reaper.0.last_mut() {
            let _ = tokio::time::timeout(Duration::from_secs(10), q.wait()).await;
        }
        Ok(run)
    }
}

fn tail(p: &Path) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

/// The disk the agent built in its state directory for `image`'s one
/// layer (`images/layers/sha256/<diff id>/disk.<fstype>`), with its
/// filesystem type. The script copies one disk, so an image of more
/// layers is refused: its baseline would need a merged disk the agent
/// never builds.
pub fn image_disk(
    state_dir: &Path,
    image: &vmlet_protocol::api::ImageInfo,
) -> anyhow::Result<(PathBuf, String)> {
    let [layer] = image.layers.as_slice() else {
        bail!(
            "the baseline copies one disk, and image {} has {} layers: give a one-layer image",
            image.id,
            image.layers.len()
        );
    };
    let hex = layer
        .diff_id
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .with_context(|| format!("layer id {:?} is not sha256:<hex>", layer.diff_id))?;
    if !matches!(layer.fstype.as_str(), "erofs" | "ext4") {
        bail!("layer {} has filesystem {:?}", layer.diff_id, layer.fstype);
    }
    let disk = state_dir
        .join("images/layers/sha256")
        .join(hex)
        .join(format!("disk.{}", layer.fstype));
    if !disk.is_file() {
        bail!("no disk at {} for layer {}", disk.display(), layer.diff_id);
    }
    Ok((disk, layer.fstype.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    use vmlet_protocol::api::{ImageInfo, LayerInfo};

    fn image(layers: &[(&str, &str)]) -> ImageInfo {
        ImageInfo {
            id: "sha256:feed".into(),
            layers: layers
                .iter()
                .map(|(d, f)| LayerInfo {
                    diff_id: d.to_string(),
                    fstype: f.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_disk_is_the_images_own_layers() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        for h in [&a, &b] {
            let l = d.path().join("images/layers/sha256").join(h);
            std::fs::create_dir_all(&l).unwrap();
            std::fs::write(l.join("disk.erofs"), b"").unwrap();
        }
        // Not the first disk in the store: the one of the image asked for.
        let (disk, fstype) =
            image_disk(d.path(), &image(&[(&format!("sha256:{b}"), "erofs")])).unwrap();
        assert_eq!(
            disk,
            d.path()
                .join("images/layers/sha256")
                .join(&b)
                .join("disk.erofs")
        );
        assert_eq!(fstype, "erofs");

        let two = image(&[
            (&format!("sha256:{a}"), "erofs"),
            (&format!("sha256:{b}"), "erofs"),
        ]);
        let e = image_disk(d.path(), &two).unwrap_err().to_string();
        assert!(e.contains("has 2 layers"), "{e}");
        let c = "c".repeat(64);
        let e = image_disk(d.path(), &image(&[(&format!("sha256:{c}"), "erofs")])).unwrap_err();
        assert!(e.to_string().contains("no disk at"), "{e}");
        let e = image_disk(d.path(), &image(&[("sha256:../../x", "erofs")])).unwrap_err();
        assert!(e.to_string().contains("not sha256:<hex>"), "{e}");
        let e = image_disk(d.path(), &image(&[(&format!("sha256:{a}"), "../x")])).unwrap_err();
        assert!(e.to_string().contains("filesystem"), "{e}");
    }
}
