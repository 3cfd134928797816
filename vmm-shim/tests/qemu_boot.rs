//! Boots the real guest kernel (from `scripts/setup-guest.sh`) through [`Qemu`] with a tiny
//! busybox initramfs, and checks the lifecycle end to end: QMP answers, the guest sees its
//! disk and vsock device, a guest reboot ends the VMM, kill and stop end it, and cleanup
//! leaves no process or socket behind.
//!
//! Skipped, with a message, when the guest kernel, QEMU, vhost-device-vsock, busybox or cpio
//! is missing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vmm_shim::{detect_accel, Disk, Qemu, VmConfig, VmHandle, Vmm};

/// Generous: two TCG guests may boot at once on two cores.
const TEST_TIMEOUT: Duration = Duration::from_secs(240);
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// The guest's /init: load the modules, report what the guest sees, then reboot out (or hang
/// when the command line says `vmlet_test=hang`).
const INIT: &str = r#"#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
echo "VMLET-TEST: init $($B cat /proc/uptime)"
while read m; do
    $B insmod /lib/modules/$m || echo "VMLET-TEST: insmod $m failed"
done < /lib/modules/modules.order
echo "VMLET-TEST: modules loaded $($B cat /proc/uptime)"
[ -c /dev/vsock ] && echo "VMLET-TEST: /dev/vsock present"
for d in /sys/bus/virtio/drivers/vmw_vsock_virtio_transport/virtio*; do
    [ -e "$d" ] && echo "VMLET-TEST: vsock transport bound"
done
for b in /sys/block/vd*; do
    [ -e "$b" ] && echo "VMLET-TEST: disk $($B basename $b) serial=$($B cat $b/serial)"
done
case "$($B cat /proc/cmdline)" in
*vmlet_test=hang*)
    echo "VMLET-TEST: hanging"
    while :; do $B sleep 60; done
    ;;
esac
echo "VMLET-TEST: rebooting"
$B reboot -f
"#;

struct Env {
    qemu: Qemu,
    guest: PathBuf,
}

fn guest_dir() -> PathBuf {
    std::env::var_os("VMLET_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/lib/vmlet/guest".into())
}

/// What the test needs, or None after saying what is missing.
fn env() -> Option<Env> {
    // RUST_LOG=vmm_shim=debug shows each start's timings.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let guest = guest_dir();
    for f in ["vmlinux", "modules/modules.order"] {
        if !guest.join(f).is_file() {
            eprintln!(
                "skipping: no guest kernel ({} missing; run scripts/setup-guest.sh)",
                guest.join(f).display()
            );
            return None;
        }
    }
    for tool in ["/bin/busybox", "/usr/bin/cpio"] {
        if !Path::new(tool).exists() {
            eprintln!("skipping: {tool} is not installed");
            return None;
        }
    }
    match Qemu::new() {
        Ok(qemu) => Some(Env { qemu, guest }),
        Err(e) => {
            eprintln!("skipping: {e}");
            None
        }
    }
}

/// Packs busybox, the guest's modules and [`INIT`] into a newc cpio archive.
fn build_initrd(guest: &Path, work: &Path) -> PathBuf {
    let root = work.join("initrd-root");
    for d in ["bin", "lib/modules", "dev", "proc", "sys"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for e in std::fs::read_dir(guest.join("modules")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), root.join("lib/modules").join(e.file_name())).unwrap();
    }
    let init = root.join("init");
    std::fs::write(&init, INIT).unwrap();
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = work.join("initrd.cpio");
    let st = Command::new("sh")
        .arg("-c")
        .arg("find . | cpio -o -H newc --quiet > \"$0\"")
        .arg(&out)
        .current_dir(&root)
        .status()
        .unwrap();
    assert!(st.success(), "cpio failed");
    out
}

fn config(env: &Env, dir: &Path, initrd: &Path, cid: u32, cmdline: &str) -> VmConfig {
    let disk = dir.join("disk0.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    VmConfig {
        id: format!("test-{cid}"),
        dir: dir.to_owned(),
        kernel: env.guest.join("vmlinux"),
        initrd: initrd.to_owned(),
        cmdline: cmdline.to_owned(),
        // Debian's cloud kernel finds its devices through ACPI.
        acpi: true,
        // Debian's kernel measures its APIC timer itself.
        apic_timer_hz: None,
        memory_mib: 256,
        vcpus: 1,
        cid,
        disks: vec![Disk {
            path: disk,
            serial: "disk0".into(),
            read_only: true,
        }],
        accel: detect_accel(),
        vsock_uds: dir.join("vsock.sock"),
        link: Default::default(),
        memory: Default::default(),
        incoming: None,
        staged: None,
    }
}

/// Pids of live processes whose command line mentions `dir`: what the VM still owns.
fn processes_mentioning(dir: &Path) -> Vec<u32> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle))
        })
        .collect()
}

fn alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; state Z counts as gone (and means nobody reaped it,
    // which the checks below would then report).
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Kills a VM's processes when a test ends early (a timeout or a failed
/// assertion drops the handle, and a handle left alone keeps its VM running,
/// as the agent's do across its restarts). A test that ends cleanly disarms it
/// once its VM's processes are reaped.
struct KillOnDrop(Vec<u32>);

impl KillOnDrop {
    fn of(h: &dyn VmHandle) -> Self {
        KillOnDrop(h.pid().into_iter().chain(h.helper_pids()).collect())
    }

    /// After the processes were reaped: their pids may be another's by now.
    fn disarm(mut self) {
        self.0.clear();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &p in &self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// After cleanup: no process of the VM alive or left a zombie, and no socket left.
async fn assert_released(h: &dyn VmHandle, dir: &Path) {
    let mut pids: Vec<u32> = h.pid().into_iter().collect();
    pids.extend(h.helper_pids());
    assert_eq!(pids.len(), 2, "QEMU and its vsock backend");
    h.cleanup().await;
    // Reaping happens in a task: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|&p| alive(p) || zombie(p)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for p in &pids {
        assert!(!alive(*p), "pid {p} still runs after cleanup");
        assert!(!zombie(*p), "pid {p} was never reaped");
    }
    assert_eq!(processes_mentioning(dir), Vec::<u32>::new());
    for s in ["qmp.sock", "vhost-vsock.sock", "vsock.sock"] {
        assert!(!dir.join(s).exists(), "{s} left behind");
    }
    h.cleanup().await; // idempotent
}

async fn console_until(dir: &Path, marker: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
        if text.contains(marker) || Instant::now() >= deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_and_reboots_out() {
    let Some(env) = env() else { return };
    tokio::time::timeout(TEST_TIMEOUT, async {
        let work = tempfile::tempdir().unwrap();
        let initrd = build_initrd(&env.guest, work.path());
        let dir = work.path().join("vm");
        std::fs::create_dir(&dir).unwrap();
        let cfg = config(&env, &dir, &initrd, 11, "");

        let t0 = Instant::now();
        let h = env.qemu.start(&cfg).await.unwrap();
        let kill = KillOnDrop::of(h.as_ref());
        let t_qmp = t0.elapsed();
        assert_eq!(h.status().await.unwrap(), "running");

        let exit = tokio::time::timeout(BOOT_TIMEOUT, h.wait())
            .await
            .expect("the guest reboots out");
        let t_exit = t0.elapsed();
        assert_eq!(exit.code, Some(0), "{exit}");
        assert_eq!(exit.signal, None);
        // Cached: a second wait answers at once with the same result.
        assert_eq!(h.wait().await, exit);
        assert!(matches!(h.status().await, Err(vmm_shim::Error::Exited(_))));

        let console = std::fs::read_to_string(dir.join("console.log")).unwrap();
        let uptime = |marker: &str| -> Option<f64> {
            let l = console.lines().find(|l| l.contains(marker))?;
            l.split(marker).nth(1)?.split_whitespace().next()?.parse().ok()
        };
        eprintln!(
            "accel {}: start to QMP ready {:?}; guest /init at {:?} s, modules loaded at {:?} s (guest uptime); start to QEMU exit {:?}",
            cfg.accel,
            t_qmp,
            uptime("VMLET-TEST: init "),
            uptime("VMLET-TEST: modules loaded "),
            t_exit
        );
        for want in [
            "VMLET-TEST: /dev/vsock present",
            "VMLET-TEST: vsock transport bound",
            "VMLET-TEST: disk vda serial=disk0",
            "VMLET-TEST: rebooting",
        ] {
            assert!(console.contains(want), "{want:?} missing from the console:\n{console}");
        }
        assert!(!console.contains("failed"), "{console}");

        assert_released(h.as_ref(), &dir).await;
        kill.disarm();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_ends_a_running_vm() {
    let Some(env) = env() else { return };
    tokio::time::timeout(TEST_TIMEOUT, async {
        let work = tempfile::tempdir().unwrap();
        let initrd = build_initrd(&env.guest, work.path());
        let dir = work.path().join("vm");
        std::fs::create_dir(&dir).unwrap();
        let cfg = config(&env, &dir, &initrd, 12, "vmlet_test=hang");
        let h: std::sync::Arc<dyn VmHandle> = env.qemu.start(&cfg).await.unwrap().into();
        let kill = KillOnDrop::of(h.as_ref());

        // Several waiters at once, started before the exit.
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let h = h.clone();
                tokio::spawn(async move { h.wait().await })
            })
            .collect();

        let console = console_until(&dir, "VMLET-TEST: hanging", BOOT_TIMEOUT).await;
        assert!(console.contains("VMLET-TEST: hanging"), "{console}");

        h.pause().await.unwrap();
        assert_eq!(h.status().await.unwrap(), "paused");
        h.resume().await.unwrap();
        assert_eq!(h.status().await.unwrap(), "running");
        // QEMU 7.2 marks vhost-user-vsock unmigratable: a vsock-linked VM
        // cannot be snapshotted (templates link by a serial port instead).
        let e = h
            .snapshot()
            .await
            .expect_err("a vhost-user-vsock VM cannot be snapshotted");
        let e = format!("{e:?}");
        assert!(e.contains("non-migratable"), "{e}");
        h.resume().await.unwrap();

        h.kill().await.unwrap();
        let exit = tokio::time::timeout(Duration::from_secs(10), h.wait())
            .await
            .expect("SIGKILL ends QEMU");
        assert_eq!(exit.signal, Some(libc::SIGKILL), "{exit}");
        assert_eq!(exit.code, None);
        assert!(exit.description.contains("SIGKILL"), "{exit}");
        for w in waiters {
            assert_eq!(w.await.unwrap(), exit);
        }
        h.kill().await.unwrap(); // already gone: still fine

        assert_released(h.as_ref(), &dir).await;
        kill.disarm();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_quits_through_qmp() {
    let Some(env) = env() else { return };
    tokio::time::timeout(TEST_TIMEOUT, async {
        let work = tempfile::tempdir().unwrap();
        let initrd = build_initrd(&env.guest, work.path());
        let dir = work.path().join("vm");
        std::fs::create_dir(&dir).unwrap();
        let cfg = config(&env, &dir, &initrd, 13, "vmlet_test=hang");
        let h = env.qemu.start(&cfg).await.unwrap();
        let kill = KillOnDrop::of(h.as_ref());
        // The guest may still be booting: "quit" does not need its cooperation.
        h.stop(Duration::from_secs(10)).await.unwrap();
        let exit = tokio::time::timeout(Duration::from_secs(1), h.wait())
            .await
            .expect("stop returns after the exit");
        assert_eq!(exit.code, Some(0), "{exit}");
        h.stop(Duration::from_secs(1)).await.unwrap(); // already stopped: fine
        assert_released(h.as_ref(), &dir).await;
        kill.disarm();
    })
    .await
    .expect("test timed out");
}
