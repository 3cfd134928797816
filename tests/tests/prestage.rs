//! Pre-staging: the guest kernel and initrd live in sealed memory from the
//! agent's start, so no start reads them from disk; `vmletd --no-prestage`
//! turns that off (the benchmark's cold mode).

use std::path::Path;

use vmlet_tests::{guest_dir, stderr, stdout, AgentOptions, TestAgent};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// QEMU's argument after `flag`, read from the live process.
fn qemu_arg(pid: i64, flag: &str) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    args[i + 1].clone()
}

/// Layer disks of the agent's image store that the agent holds mapped.
fn mapped_layer_disks(a: &TestAgent) -> Vec<String> {
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", a.pid().unwrap())).unwrap();
    let layers_dir = a.state_dir().join("images");
    maps.lines()
        .filter(|l| l.contains(&*layers_dir.to_string_lossy()) && l.contains("disk."))
        .map(str::to_string)
        .collect()
}

#[test]
fn starts_never_read_the_kernel_or_initrd_from_disk() {
    // A private copy of the guest files, so they can be deleted under the
    // running agent.
    let guest = tempfile::tempdir().unwrap();
    copy_dir(&guest_dir(), guest.path());
    let a = TestAgent::start_with(AgentOptions {
        guest_dir: Some(guest.path().to_path_buf()),
        ..Default::default()
    });
    // Once staged, the files on disk are not needed: delete them.
    std::fs::remove_file(guest.path().join("vmlinux")).unwrap();
    std::fs::remove_file(a.state_dir().join("guest/initrd.cpio")).unwrap();

    let id = a.detach(&["busybox", "--", "sh", "-c", "echo staged; sleep 1000"]);
    let info = a.inspect(&id);
    let pid = info["VmmPid"].as_i64().unwrap();
    // QEMU was told to load both from inherited descriptors, which are
    // sealed memfds.
    for (flag, name) in [("-kernel", "vmlet-kernel"), ("-initrd", "vmlet-initrd")] {
        let path = qemu_arg(pid, flag);
        let fd = path
            .strip_prefix("/proc/self/fd/")
            .expect("an inherited descriptor");
        let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
        assert!(
            target
                .to_string_lossy()
                .starts_with(&format!("/memfd:{name}")),
            "{flag} is {target:?}"
        );
    }
    // And the guest booted from them, with the files gone from disk.
    a.wait_logs(&id, "staged\n");
    assert_eq!(a.run(&["rm", "-f", &id]).status.code(), Some(0));
}

#[test]
fn prestage_keeps_an_images_layers_in_memory() {
    let a = TestAgent::start();
    let o = a.run(&["prestage", "busybox"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // The agent holds every layer disk of the image mapped.
    let info: serde_json::Value =
        serde_json::from_slice(&a.run(&["image", "inspect", "busybox"]).stdout).unwrap_or_default();
    assert!(
        !mapped_layer_disks(&a).is_empty(),
        "no layer disk mapped; image {info}"
    );
    let o = a.run(&["prestage", "no-such-image"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("no image"), "{}", stderr(&o));
    // And a start of it works as ever.
    let o = a.run(&["run", "--rm", "busybox", "--", "echo", "warm"]);
    assert_eq!(stdout(&o), "warm\n");
}

#[test]
fn without_prestaging_qemu_reads_the_files_by_path() {
    let a = TestAgent::start_with(AgentOptions {
        extra: vec!["--no-prestage".into()],
        ..Default::default()
    });
    // Nothing is kept in memory for an image either.
    let o = a.run(&["prestage", "busybox"]);
    assert_eq!(o.status.code(), Some(125), "{}", stdout(&o));
    assert!(stderr(&o).contains("pre-staging is off"), "{}", stderr(&o));
    assert_eq!(mapped_layer_disks(&a), Vec::<String>::new());

    let id = a.detach(&["busybox", "--", "sh", "-c", "echo from-disk; sleep 1000"]);
    let pid = a.inspect(&id)["VmmPid"].as_i64().unwrap();
    // QEMU names the files themselves, not inherited descriptors.
    assert_eq!(
        qemu_arg(pid, "-kernel"),
        guest_dir().join("vmlinux").to_string_lossy()
    );
    assert_eq!(
        qemu_arg(pid, "-initrd"),
        a.state_dir().join("guest/initrd.cpio").to_string_lossy()
    );
    a.wait_logs(&id, "from-disk\n");
    assert_eq!(a.run(&["rm", "-f", &id]).status.code(), Some(0));
}
