//! Images end to end on real QEMU guests: a three-layer image imported as
//! an OCI layout and as a `docker save` archive shows exactly the merged
//! tree the OCI spec defines; two VMs share the layer disks and keep
//! their writes apart; hostile layers are refused without touching the
//! host; a distribution's image (Debian 12, dynamically linked) runs.

use std::collections::BTreeMap;
use std::path::PathBuf;

use vmlet_tests::oci::{self, Entry, TestImage};
use vmlet_tests::{stderr, stdout, TestAgent};

fn data(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

/// Three layers over busybox touching `/data`: files added, changed and
/// deleted, a directory deleted and re-created, an opaque directory,
/// symlinks, hard links, setuid and setgid bits.
fn layered() -> (Vec<Vec<Entry>>, TestImage) {
    let mut base = oci::busybox_entries();
    base.extend([
        Entry::Dir("data", 0o755),
        Entry::File("data/keep.txt", 0o644, data("keep")),
        Entry::File("data/change.txt", 0o644, data("v1")),
        Entry::File("data/del.txt", 0o644, data("deleted")),
        Entry::Dir("data/deldir", 0o755),
        Entry::File("data/deldir/a", 0o644, data("a")),
        Entry::Dir("data/opq", 0o700),
        Entry::File("data/opq/old", 0o644, data("old")),
        Entry::Dir("data/opq/sub", 0o755),
        Entry::File("data/opq/sub/x", 0o644, data("x")),
        Entry::Symlink("data/rel-link", "keep.txt"),
        Entry::File("data/hard1", 0o640, data("shared")),
        Entry::Hard("data/hard2", "data/hard1"),
    ]);
    let second = vec![
        Entry::File("data/change.txt", 0o644, data("v2")),
        Entry::Whiteout("data/del.txt"),
        Entry::Whiteout("data/deldir"),
        Entry::File("data/new.txt", 0o644, data("new")),
        // A layer carries the directories its changes are in (as image
        // builders write them); this one keeps opq's mode.
        Entry::Dir("data/opq", 0o700),
        Entry::Opaque("data/opq"),
        Entry::File("data/opq/fresh", 0o644, data("fresh")),
        Entry::File("data/suid", 0o4755, data("suid")),
        Entry::Symlink("data/abs-link", "/data/keep.txt"),
    ];
    let third = vec![
        Entry::File("data/change.txt", 0o600, data("v3")),
        Entry::Whiteout("data/new.txt"),
        Entry::Dir("data/deldir", 0o750),
        Entry::File("data/deldir/c", 0o644, data("c")),
        Entry::Dir("data/sgid", 0o2775),
        Entry::File("data/sgid/h1", 0o755, data("h")),
        Entry::Hard("data/sgid/h2", "data/sgid/h1"),
    ];
    let layers = vec![base, second, third];
    let img = TestImage {
        layers: layers.iter().map(|l| oci::layer_tar(l)).collect(),
        run_config: serde_json::json!({
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo default-cmd"],
            "Env": ["PATH=/bin", "FROM_IMAGE=1"],
            "WorkingDir": "/data",
        }),
    };
    (layers, img)
}

fn guest_listing(a: &TestAgent, image: &str) -> BTreeMap<String, String> {
    let o = a.run(&["run", "--rm", image, &oci::listing_script("/data")]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    stdout(&o)
        .lines()
        .map(|l| {
            let (p, rest) = l.split_once(' ').expect("path and kind");
            (p.to_string(), rest.to_string())
        })
        .collect()
}

#[test]
fn three_layers_merge_as_the_oci_spec_says_from_oci_layout_and_docker_save() {
    let a = TestAgent::start();
    let (layers, img) = layered();
    let want = oci::merged_tree(&layers, "/data");
    // Spot-check the model itself, so a wrong model cannot agree with a
    // wrong guest.
    assert_eq!(want["/data/change.txt"], "file 600 v3");
    assert!(!want.contains_key("/data/del.txt") && !want.contains_key("/data/new.txt"));
    assert!(!want.contains_key("/data/opq/old") && !want.contains_key("/data/deldir/a"));

    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    img.write_oci_layout(&layout, "layered:oci", &[0, 2]);
    let o = a.run(&["image", "import", layout.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "import: {}", stderr(&o));
    let id = stdout(&o).trim().to_string();
    assert!(id.starts_with("sha256:"), "{id}");

    let archive = work.path().join("saved.tar");
    std::fs::write(&archive, img.docker_save("layered:docker")).unwrap();
    let o = a.run(&["image", "import", archive.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "import: {}", stderr(&o));
    // Same config, same image: both names point at it, layers stored once.
    assert_eq!(stdout(&o).trim(), id);
    let layer_dirs = std::fs::read_dir(a.state_dir().join("images/layers/sha256"))
        .unwrap()
        .count();
    assert_eq!(layer_dirs, 3 + 1, "three layers plus busybox's");

    let o = a.run(&["image", "inspect", "layered:docker"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["Layers"].as_array().unwrap().len(), 3);
    assert_eq!(v["Config"]["WorkingDir"], "/data");

    for name in ["layered:oci", &id[7..19]] {
        let got = guest_listing(&a, name);
        assert_eq!(got, want, "merged tree seen by the guest from {name}");
    }

    // The image's config applies: Entrypoint + Cmd, Env, WorkingDir; and
    // docker run's overrides.
    let o = a.run(&["run", "--rm", "layered:oci"]);
    assert_eq!(stdout(&o), "default-cmd\n", "{}", stderr(&o));
    let o = a.run(&[
        "run",
        "--rm",
        "-e",
        "X=2",
        "layered:oci",
        "echo $FROM_IMAGE$X $(pwd)",
    ]);
    assert_eq!(stdout(&o), "12 /data\n", "{}", stderr(&o));
    let o = a.run(&[
        "run",
        "--rm",
        "--entrypoint",
        "/bin/echo",
        "layered:oci",
        "plain",
    ]);
    assert_eq!(stdout(&o), "plain\n", "{}", stderr(&o));
    // User: resolved against the image's /etc/passwd by the tether.
    let o = a.run(&["run", "--rm", "-u", "web", "layered:oci", "id -u; id -g"]);
    assert_eq!(stdout(&o), "1000\n1001\n", "{}", stderr(&o));
    let o = a.run(&["run", "--rm", "-u", "nosuch", "layered:oci", "true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("nosuch"), "{}", stderr(&o));

    // rm: both names go, then the layers only this image used.
    let o = a.run(&["image", "rm", "layered:oci"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!a
        .run(&["image", "inspect", "layered:docker"])
        .status
        .success());
    let left = std::fs::read_dir(a.state_dir().join("images/layers/sha256"))
        .unwrap()
        .count();
    assert_eq!(left, 1, "only busybox's layer is left");
}

/// The read-only `file=` paths in a QEMU command line.
fn read_only_drives(pid: u64) -> Vec<PathBuf> {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let mut v: Vec<PathBuf> = String::from_utf8_lossy(&cmd)
        .split('\0')
        .filter(|a| a.contains("readonly=on"))
        .filter_map(|a| {
            a.split(',')
                .find_map(|kv| kv.strip_prefix("file="))
                .map(PathBuf::from)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn two_vms_share_layer_disks_and_keep_their_writes_apart() {
    let a = TestAgent::start();
    let (_, img) = layered();
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("saved.tar");
    std::fs::write(&archive, img.docker_save("shared:1")).unwrap();
    let o = a.run(&["image", "import", archive.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));

    let ids: Vec<String> = ["A", "B"]
        .iter()
        .map(|who| {
            let script = format!(
                "test -e /data/mine && echo LEAK; echo {who} > /data/mine; echo {who} >> /data/keep.txt; \
                 echo seen-$(cat /data/mine)-$(cat /data/keep.txt); sleep 600"
            );
            let o = a.run(&["run", "-d", "shared:1", &script]);
            assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
            stdout(&o).trim().to_string()
        })
        .collect();
    for (id, who) in ids.iter().zip(["A", "B"]) {
        let log = a.wait_logs_containing(id, "seen-");
        // keep.txt has no trailing newline: each VM's append follows it.
        assert_eq!(log, format!("seen-{who}-keep{who}\n"), "VM {who}");
    }
    let layer_root = a.state_dir().join("images/layers/sha256");
    let drives: Vec<Vec<PathBuf>> = ids
        .iter()
        .map(|id| {
            let o = a.run(&["inspect", id]);
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            read_only_drives(v["VmmPid"].as_u64().expect("a running VMM"))
        })
        .collect();
    assert_eq!(drives[0].len(), 3, "{:?}", drives[0]);
    assert_eq!(drives[0], drives[1], "both VMs attach the same layer files");
    assert!(drives[0].iter().all(|p| p.starts_with(&layer_root)));
    // Each writable disk is the VM's own and lives in its directory.
    for id in &ids {
        assert!(a.vm_dir(id).join("rw.qcow2").is_file());
    }
    // The image is in use: rm refuses, unless forced.
    let o = a.run(&["image", "rm", "shared:1"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("used by"), "{}", stderr(&o));
    let o = a.run(&["image", "rm", "-f", "shared:1"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // The running VMs keep their layers until they are removed.
    assert!(drives[0].iter().all(|p| p.is_file()));
    for id in &ids {
        let o = a.run(&["rm", "-f", id]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        a.assert_no_processes(id);
        assert!(!a.vm_dir(id).exists());
    }
    assert!(drives[0].iter().all(|p| !p.exists()), "layers collected");
}

/// `scripts/make-debian-image.sh`'s archive, which
/// `scripts/install-test-deps.sh` builds where this looks for it.
fn debian_archive() -> PathBuf {
    let p = std::env::var_os("VMLET_DEBIAN_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/vmlet/debian-bookworm.tar"));
    assert!(
        p.is_file(),
        "no Debian image at {}: run scripts/install-test-deps.sh (or set VMLET_DEBIAN_IMAGE)",
        p.display()
    );
    p
}

#[test]
fn a_debian_image_runs_its_dynamically_linked_programs() {
    let a = TestAgent::start();
    let o = a.run(&["image", "import", debian_archive().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "import: {}", stderr(&o));
    // Its own loader and C library, merged /usr (/bin is a symlink),
    // dpkg's database, and a write to the image's /etc kept in the VM.
    let script = "cat /etc/debian_version; \
        readlink /bin; \
        /usr/bin/env printf '%s\\n' dynamic; \
        ldd /usr/bin/env | grep -c libc.so.6; \
        dpkg-query -W -f '${Package} ${Status}\\n' coreutils; \
        echo written > /etc/vmlet-test && cat /etc/vmlet-test; \
        id -un; exit 5";
    let o = a.run(&["run", "--rm", "debian:bookworm", "--", "sh", "-c", script]);
    assert_eq!(o.status.code(), Some(5), "stderr: {}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.first().is_some_and(|v| v.starts_with("12.")), "{out}");
    assert_eq!(
        &lines[1..],
        [
            "usr/bin",
            "dynamic",
            "1",
            "coreutils install ok installed",
            "written",
            "root"
        ],
        "{out}"
    );
    // The image's default command (bash) and its config's PATH.
    let o = a.run_with_input(
        &["run", "-i", "--rm", "debian:bookworm"],
        Some(b"echo $0 $PATH\n"),
    );
    assert_eq!(
        stdout(&o),
        "bash /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n",
        "stderr: {}",
        stderr(&o)
    );
}

#[test]
fn hostile_layers_are_refused_and_touch_nothing_outside() {
    let a = TestAgent::start();
    let work = tempfile::tempdir().unwrap();
    let canary = work.path().join("canary");
    std::fs::create_dir(&canary).unwrap();
    let canary_s = canary.to_str().unwrap().trim_start_matches('/').to_string();
    let dotdot = format!("{}{canary_s}/dotdot", "../".repeat(16));
    let abs = format!("/{canary_s}/abs");
    let target = format!("/{canary_s}");
    type Build = Box<dyn Fn(&mut tar::Builder<Vec<u8>>)>;
    let cases: Vec<(&str, Build, &str)> = vec![
        (
            "dotdot",
            Box::new(move |b| {
                oci::raw_entry(b, tar::EntryType::Regular, dotdot.as_bytes(), b"", b"x")
            }),
            "`..`",
        ),
        (
            "absolute",
            Box::new(move |b| {
                oci::raw_entry(b, tar::EntryType::Regular, abs.as_bytes(), b"", b"x")
            }),
            "absolute",
        ),
        (
            "symlink escape",
            Box::new(move |b| {
                oci::raw_entry(b, tar::EntryType::Symlink, b"esc", target.as_bytes(), b"");
                oci::raw_entry(b, tar::EntryType::Regular, b"esc/through", b"", b"x");
            }),
            "symlink",
        ),
        (
            "device node",
            Box::new(|b| oci::raw_entry(b, tar::EntryType::Block, b"sda", b"", b"")),
            "device",
        ),
        (
            "oversized header",
            Box::new(|b| {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::GNULongName);
                h.set_size(8 << 20);
                h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
                h.set_cksum();
                b.append(&h, &vec![b'a'; 8 << 20][..]).unwrap();
            }),
            "over its size limit",
        ),
    ];
    for (what, build, why) in cases {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        let bad = b.into_inner().unwrap();
        let img = TestImage {
            layers: vec![bad],
            run_config: serde_json::json!({"Cmd": ["/bin/sh"]}),
        };
        let archive = work.path().join("hostile.tar");
        std::fs::write(&archive, img.docker_save("hostile:1")).unwrap();
        let o = a.run(&["image", "import", archive.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(125), "{what}: {}", stdout(&o));
        let err = stderr(&o);
        assert!(
            err.contains("refused") && err.contains(why),
            "{what}: {err}"
        );
        let outside: Vec<_> = std::fs::read_dir(&canary).unwrap().collect();
        assert!(outside.is_empty(), "{what} wrote outside: {outside:?}");
        // Nothing half-made stays in the store.
        let tmp: Vec<_> = std::fs::read_dir(a.state_dir().join("images/tmp"))
            .unwrap()
            .collect();
        assert!(tmp.is_empty(), "{what} left {tmp:?}");
        let layers = std::fs::read_dir(a.state_dir().join("images/layers/sha256"))
            .unwrap()
            .count();
        assert_eq!(layers, 1, "{what}: only busybox's layer");
    }
    assert!(!a.run(&["image", "inspect", "hostile:1"]).status.success());
}
