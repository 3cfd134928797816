//! Config cloning: what a start pays to turn the compiled template into
//! its VM's config, and then into QEMU's argv.

use std::path::{Path, PathBuf};

use criterion::{criterion_group, criterion_main, Criterion};
use vmlet_agent::agent::VmTemplate;
use vmm_shim::{Accel, Disk, VmConfig, VmPaths};

fn template() -> VmTemplate {
    VmTemplate::new(VmConfig {
        id: String::new(),
        dir: PathBuf::new(),
        kernel: "/var/lib/vmlet/guest/vmlinux".into(),
        initrd: "/var/lib/vmlet/state/guest/initrd.cpio".into(),
        cmdline: "vmlet.port=1024".into(),
        acpi: true,
        apic_timer_hz: Some(250),
        memory_mib: 256,
        vcpus: 1,
        cid: 0,
        disks: Vec::new(),
        accel: Accel::Tcg,
        vsock_uds: PathBuf::new(),
        link: Default::default(),
        memory: Default::default(),
        incoming: None,
        staged: None,
    })
}

fn disks() -> Vec<Disk> {
    (0..3)
        .map(|i| Disk {
            path: format!("/var/lib/vmlet/state/images/layers/sha256/{i:064x}/disk.erofs").into(),
            serial: format!("l{i}"),
            read_only: true,
        })
        .chain(std::iter::once(Disk {
            path: "/var/lib/vmlet/state/vms/0123456789abcdef/rw.qcow2".into(),
            serial: "rw".into(),
            read_only: false,
        }))
        .collect()
}

fn bench(c: &mut Criterion) {
    let t = template();
    let dir = Path::new("/var/lib/vmlet/state/vms/0123456789abcdef");
    c.bench_function("config clone (template → VM config)", |b| {
        b.iter(|| t.clone_for("0123456789abcdef", dir, 7, 256, 1, disks()))
    });
    c.bench_function("config clone + QEMU argv", |b| {
        b.iter(|| {
            let cfg = t.clone_for("0123456789abcdef", dir, 7, 256, 1, disks());
            vmm_shim::qemu::argv(&cfg, &VmPaths::new(dir), Some(102))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
