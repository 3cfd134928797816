//! vmlet's tailored guest kernel (`scripts/build-kernel.sh`) end to end on
//! real QEMU guests: the agent boots it on a machine without ACPI (QEMU
//! lists the virtio-mmio devices on the kernel command line), the tether
//! loads no modules, and containers behave exactly as on Debian's kernel:
//! output, exit codes, stdin, and an image's erofs layers under a writable
//! qcow2 disk.
//!
//! Skipped when the kernel is not installed, unless
//! `VMLET_REQUIRE_TAILORED_KERNEL=1` (as `scripts/test.sh` sets) makes
//! that a failure.

use std::path::{Path, PathBuf};

use vmlet_tests::oci::{self, Entry, TestImage};
use vmlet_tests::{stderr, stdout, tailored_kernel, AgentOptions, TestAgent};

fn agent(dir: &Path) -> TestAgent {
    TestAgent::start_with(AgentOptions {
        guest_dir: Some(dir.to_path_buf()),
        ..Default::default()
    })
}

/// QEMU's arguments, from its `/proc/<pid>/cmdline`.
fn qemu_args(pid: u64) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).expect("QEMU's cmdline");
    String::from_utf8_lossy(&raw)
        .split('\0')
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The value after `flag` in `args`.
fn arg<'a>(args: &'a [String], flag: &str) -> &'a str {
    args.windows(2)
        .find(|w| w[0] == flag)
        .map(|w| w[1].as_str())
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"))
}

/// The file QEMU loaded as the kernel: a path, or the agent's sealed copy
/// among QEMU's descriptors (`/proc/self/fd/N`).
fn kernel_bytes(pid: u64, kernel_arg: &str) -> Vec<u8> {
    let path = match kernel_arg.strip_prefix("/proc/self/") {
        Some(rest) => PathBuf::from(format!("/proc/{pid}/{rest}")),
        None => PathBuf::from(kernel_arg),
    };
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The entry names of a newc cpio archive.
fn cpio_names(data: &[u8]) -> Vec<String> {
    let hex = |at: usize| {
        let s = std::str::from_utf8(&data[at..at + 8]).expect("hex field");
        usize::from_str_radix(s, 16).expect("hex field")
    };
    let pad4 = |n: usize| (n + 3) & !3;
    let mut names = Vec::new();
    let mut at = 0;
    while at + 110 <= data.len() {
        assert_eq!(&data[at..at + 6], b"070701", "newc header at {at}");
        let (size, namesize) = (hex(at + 54), hex(at + 94));
        let name = String::from_utf8_lossy(&data[at + 110..at + 110 + namesize - 1]).into_owned();
        if name == "TRAILER!!!" {
            break;
        }
        names.push(name);
        at = pad4(pad4(at + 110 + namesize) + size);
    }
    names
}

#[test]
fn tailored_kernel_boots_containers_without_acpi_or_modules() {
    let Some(dir) = tailored_kernel() else {
        return;
    };
    let release = std::fs::read_to_string(dir.join("kernel.release"))
        .unwrap()
        .trim()
        .to_string();
    let a = agent(&dir);

    // The agent says which kernel it boots.
    let o = a.run(&["version"]);
    let version = stdout(&o);
    assert!(
        version.contains(&release) && version.contains("no ACPI"),
        "{version}"
    );

    // A running guest: its kernel is the tailored one, QEMU's machine has no
    // ACPI, and QEMU put the virtio-mmio devices on the kernel command line.
    let id = a.detach(&[
        "busybox",
        "--",
        "sh",
        "-c",
        "echo release=$(uname -r); echo cmdline=$(cat /proc/cmdline); sleep 3; \
         echo tick=$(grep -A1 'Per CPU device: 0' /proc/timer_list | grep -o 'Clock Event Device: .*'); \
         echo clock=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource); \
         sleep 600",
    ]);
    let log = a.wait_logs_containing(&id, "clock=");
    assert!(log.contains(&format!("release={release}\n")), "{log}");
    // Told the host's TSC rate, the guest keeps time with its TSC. Told a
    // wrong one (a fixed 2 GHz), this kernel, which cannot calibrate the
    // TSC itself, found it skewed within the 3 s (its clock watchdog checks
    // every half second) and fell back to 4 ms jiffies. (kvm-clock under KVM.)
    assert!(
        log.contains("clock=tsc\n") || log.contains("clock=kvm-clock\n"),
        "{log}"
    );
    let cmdline = log
        .lines()
        .find_map(|l| l.strip_prefix("cmdline="))
        .expect("the guest's /proc/cmdline");
    let info = a.inspect(&id);
    let pid = info["VmmPid"].as_u64().expect("a running VMM");
    let args = qemu_args(pid);
    // One per virtio device QEMU was given: each disk, and vsock.
    let devices = args.iter().filter(|x| *x == "-device").count();
    assert!(devices >= 2, "{args:?}");
    assert_eq!(
        cmdline.matches("virtio_mmio.device=").count(),
        devices,
        "{cmdline}"
    );
    assert!(arg(&args, "-M").contains("acpi=off"), "{args:?}");
    // Under TCG the guest is told QEMU's APIC timer rate (1 GHz bus, HZ=250)
    // instead of measuring it, and keeps its ticks on that timer (under KVM:
    // the TSC-deadline mode, `lapic-deadline`). A rate it refused would
    // have it measure again; a mis-scaled one would break the sleeps above.
    if arg(&args, "-accel").starts_with("tcg") {
        assert!(
            cmdline.contains(" lapic_timer_period=4000000 "),
            "{cmdline}"
        );
    }
    assert!(log.contains("tick=Clock Event Device: lapic"), "{log}");
    assert!(
        !arg(&args, "-append").contains("virtio_mmio.device="),
        "the agent lists no devices itself: QEMU does"
    );
    assert!(
        kernel_bytes(pid, arg(&args, "-kernel")) == std::fs::read(dir.join("vmlinux")).unwrap(),
        "QEMU did not load {}",
        dir.join("vmlinux").display()
    );
    // No modules: the initrd carries none.
    let initrd = std::fs::read(a.state_dir().join("guest/initrd.cpio")).unwrap();
    let names = cpio_names(&initrd);
    assert!(names.iter().any(|n| n == "init"), "{names:?}");
    assert!(
        !names.iter().any(|n| n.starts_with("lib/modules/")),
        "the initrd carries modules: {names:?}"
    );
    let o = a.run(&["rm", "-f", &id]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    a.assert_no_processes(&id);

    // stdout, stderr and exit codes.
    a.assert_echo_and_exit_codes();

    // stdin through attach, to its end.
    a.assert_stdin_reaches_the_container(b"abc\n");

    image_layers_and_writable_disk(&a);
    a.assert_no_container_processes();
}

/// A two-layer image: its layers are erofs disks merged by overlayfs
/// (a file changed, one deleted), and writes go to the VM's qcow2 disk.
fn image_layers_and_writable_disk(a: &TestAgent) {
    let mut base = oci::busybox_entries();
    base.extend([
        Entry::Dir("data", 0o755),
        Entry::File("data/a.txt", 0o644, b"a1".to_vec()),
        Entry::File("data/gone.txt", 0o644, b"gone".to_vec()),
    ]);
    let top = vec![
        Entry::Dir("data", 0o755),
        Entry::File("data/a.txt", 0o644, b"a2".to_vec()),
        Entry::Whiteout("data/gone.txt"),
    ];
    let img = TestImage {
        layers: vec![oci::layer_tar(&base), oci::layer_tar(&top)],
        run_config: serde_json::json!({"Entrypoint": ["/bin/sh", "-c"], "Env": ["PATH=/bin"]}),
    };
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    img.write_oci_layout(&layout, "kernel-test:1", &[0]);
    let o = a.run(&["image", "import", layout.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "import: {}", stderr(&o));

    let id = a.detach(&[
        "kernel-test:1",
        "echo $(cat /data/a.txt) $(ls /data); echo w > /data/new; \
         echo fs=$(grep ' / ' /proc/mounts | cut -d' ' -f3) wrote=$(cat /data/new); sleep 600",
    ]);
    let log = a.wait_logs_containing(&id, "wrote=");
    assert_eq!(log, "a2 a.txt\nfs=overlay wrote=w\n", "{log}");
    let pid = a.inspect(&id)["VmmPid"].as_u64().expect("a running VMM");
    let drives: Vec<String> = qemu_args(pid)
        .into_iter()
        .filter(|x| x.starts_with("id=d") && x.contains("file="))
        .collect();
    let layers = drives
        .iter()
        .filter(|d| d.contains("readonly=on") && d.contains(".erofs,"))
        .count();
    assert_eq!(layers, 2, "{drives:?}");
    assert!(
        drives
            .iter()
            .any(|d| d.contains("readonly=off") && d.contains("format=qcow2")),
        "{drives:?}"
    );
    assert!(a.vm_dir(&id).join("rw.qcow2").is_file());
    let o = a.run(&["rm", "-f", &id]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    a.assert_no_processes(&id);
}
