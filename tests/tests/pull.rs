//! `vmlet image pull` end to end against a real registry: Debian's
//! `docker-registry` on loopback (HTTP), test images pushed into it with
//! `skopeo` from OCI layouts built by `vmlet_tests::oci`, containers run
//! from what was pulled on real QEMU guests.
//!
//! `scripts/install-test-deps.sh` installs both tools (scripts/test.sh
//! runs it first).

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmlet_tests::oci::{self, Entry, TestImage};
use vmlet_tests::{stderr, stdout, wait_output, TestAgent};

/// `docker-registry serve` on 127.0.0.1:<free port>, storing in a temp
/// dir; killed on drop.
struct Registry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("vmlet-registry-")
            .tempdir_in("/tmp")
            .unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n  secret: vmlet-test\n",
                dir.path().join("storage").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry is installed (scripts/install-test-deps.sh)");
        let mut r = Registry { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(st) = r.child.try_wait().unwrap() {
                panic!("docker-registry exited with {st}: {}", r.log());
            }
            assert!(Instant::now() < deadline, "registry not up: {}", r.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// `127.0.0.1:<port>`.
    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn skopeo(&self, args: &[&str]) -> std::process::Output {
        let child = Command::new("skopeo")
            .arg("--insecure-policy")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("skopeo is installed (scripts/install-test-deps.sh)");
        let o = wait_output(child, Duration::from_secs(120), &format!("skopeo {args:?}"));
        assert!(
            o.status.success(),
            "skopeo {args:?}: {}\nregistry: {}",
            stderr(&o),
            self.log()
        );
        o
    }

    /// Pushes `oci:<layout>:<tag>` to `<repo_tag>` here (`--all`: every
    /// manifest of an index).
    fn push(&self, layout: &Path, tag: &str, repo_tag: &str, all: bool) {
        let src = format!("oci:{}:{tag}", layout.display());
        let dest = format!("docker://{}/{repo_tag}", self.host());
        let mut args = vec!["copy", "--dest-tls-verify=false"];
        if all {
            args.push("--all");
        }
        self.skopeo(&[&args[..], &[&src, &dest]].concat());
    }

    /// The manifest (or index) the registry serves for `repo_tag`.
    fn manifest(&self, repo_tag: &str) -> serde_json::Value {
        let o = self.skopeo(&[
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{}/{repo_tag}", self.host()),
        ]);
        serde_json::from_slice(&o.stdout).unwrap()
    }

    /// Where the registry keeps a blob's bytes.
    fn blob_file(&self, digest: &str) -> PathBuf {
        let h = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&h[..2])
            .join(h)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- registry log ----\n{}", self.log());
        }
    }
}

/// busybox plus a layer with `/msg` holding `msg`; runs `cat /msg`.
fn image(msg: &str) -> TestImage {
    let data: &'static str = Box::leak(msg.to_string().into_boxed_str());
    let top = vec![Entry::File("msg", 0o644, data.as_bytes().to_vec())];
    TestImage {
        layers: vec![
            oci::layer_tar(&oci::busybox_entries()),
            oci::layer_tar(&top),
        ],
        run_config: serde_json::json!({
            "Cmd": ["/bin/sh", "-c", "cat /msg"],
            "Env": ["PATH=/bin"],
        }),
    }
}

/// The daemon log without colour codes.
fn plain_log(a: &TestAgent) -> String {
    let log = a.daemon_log();
    let mut out = String::with_capacity(log.len());
    let mut it = log.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\x1b' {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The fields of the last `image pulled` line.
fn last_pull(a: &TestAgent) -> String {
    plain_log(a)
        .lines()
        .rev()
        .find(|l| l.contains("image pulled"))
        .unwrap_or_else(|| panic!("no pull in the log:\n{}", a.daemon_log()))
        .to_string()
}

fn pull(a: &TestAgent, reference: &str) -> std::process::Output {
    a.run(&["image", "pull", reference])
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn pull_runs_then_dedups_and_resumes() {
    let reg = Registry::start();
    let a = TestAgent::start();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let img = image("hello from the registry");
    img.write_oci_layout(&layout, "v1", &[0]);
    reg.push(&layout, "v1", "test/img:v1", false);

    let reference = format!("http://{}/test/img:v1", reg.host());
    let o = pull(&a, &reference);
    assert_eq!(o.status.code(), Some(0), "pull: {}", stderr(&o));
    let id = stdout(&o).trim().to_string();
    assert_eq!(
        id,
        oci::sha256(&img.config()),
        "the image id is its config's digest"
    );
    let first = last_pull(&a);
    assert!(first.contains("layers_downloaded=2"), "{first}");

    let name = format!("{}/test/img:v1", reg.host());
    let o = a.run(&["run", "--rm", &name]);
    assert_eq!(stdout(&o), "hello from the registry", "{}", stderr(&o));
    assert_eq!(o.status.code(), Some(0));

    // Again: the manifest and nothing else.
    let o = pull(&a, &reference);
    assert_eq!(o.status.code(), Some(0), "pull: {}", stderr(&o));
    assert_eq!(stdout(&o).trim(), id);
    let second = last_pull(&a);
    assert!(
        second.contains("layers_downloaded=0") && second.contains("bytes_downloaded=0"),
        "{second}"
    );

    // A second image sharing busybox's layer downloads only its own.
    let layout2 = work.path().join("layout2");
    let img2 = image("second image");
    img2.write_oci_layout(&layout2, "v2", &[0]);
    reg.push(&layout2, "v2", "test/img:v2", false);
    let manifest = reg.manifest("test/img:v2");
    let top = &manifest["layers"][1];
    let top_digest = top["digest"].as_str().unwrap().to_string();
    let top_size = top["size"].as_u64().unwrap();

    // Resume: a partial download of the new layer's first half is in tmp
    // (as a broken connection leaves it); the pull asks for the rest.
    let blob = std::fs::read(reg.blob_file(&top_digest)).unwrap();
    assert_eq!(blob.len() as u64, top_size);
    let half = blob.len() / 2;
    let tmp = a.state_dir().join("images/tmp");
    std::fs::write(
        tmp.join(format!("blob-{}.partial", &top_digest[7..])),
        &blob[..half],
    )
    .unwrap();
    let o = pull(&a, &format!("http://{}/test/img:v2", reg.host()));
    assert_eq!(o.status.code(), Some(0), "pull: {}", stderr(&o));
    let third = last_pull(&a);
    assert!(third.contains("layers_downloaded=1"), "{third}");
    let config_len = img2.config().len();
    let want = format!("bytes_downloaded={}", config_len + blob.len() - half);
    assert!(third.contains(&want), "want {want}: {third}");
    assert!(
        plain_log(&a).contains(&format!(
            "resuming a partial download blob={top_digest} from={half}"
        )),
        "{}",
        plain_log(&a)
    );
    let o = a.run(&["run", "--rm", &format!("{}/test/img:v2", reg.host())]);
    assert_eq!(stdout(&o), "second image", "{}", stderr(&o));
    assert_eq!(
        entries(&tmp),
        Vec::<String>::new(),
        "tmp is empty after pulls"
    );
}

#[test]
fn a_corrupted_blob_is_refused_and_leaves_nothing() {
    let reg = Registry::start();
    let a = TestAgent::start();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let img = image("never seen");
    img.write_oci_layout(&layout, "v1", &[]);
    reg.push(&layout, "v1", "test/bad:v1", false);
    let manifest = reg.manifest("test/bad:v1");
    let digest = manifest["layers"][1]["digest"]
        .as_str()
        .unwrap()
        .to_string();

    // Same size, one byte changed: only the digest can tell.
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(reg.blob_file(&digest))
        .unwrap();
    let mid = f.metadata().unwrap().len() / 2;
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(mid)).unwrap();
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::Start(mid)).unwrap();
    f.write_all(&[b[0] ^ 0xff]).unwrap();
    drop(f);

    let layers = a.state_dir().join("images/layers/sha256");
    let tmp = a.state_dir().join("images/tmp");
    let before = entries(&layers);
    let o = pull(&a, &format!("http://{}/test/bad:v1", reg.host()));
    assert_eq!(o.status.code(), Some(125), "{}", stdout(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!("blob {digest} failed verification")),
        "{err}"
    );
    assert_eq!(entries(&tmp), Vec::<String>::new(), "nothing left in tmp");
    let after = entries(&layers);
    assert_eq!(after, before, "no layer was stored");
    let ls = a.run(&["image", "ls", "-q"]);
    assert_eq!(
        stdout(&ls).lines().count(),
        1,
        "only busybox: {}",
        stdout(&ls)
    );

    // A missing tag is NotFound, said plainly.
    let o = pull(&a, &format!("http://{}/test/bad:nosuch", reg.host()));
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("404"), "{}", stderr(&o));
}

#[test]
fn a_multi_platform_index_yields_its_linux_amd64_image() {
    let reg = Registry::start();
    let a = TestAgent::start();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    // Two images into one layout (blobs accumulate; index.json is
    // rewritten each time, so read each manifest's descriptor after).
    let mut descs = Vec::new();
    for (arch, msg) in [("arm64", "wrong platform"), ("amd64", "linux/amd64")] {
        image(msg).write_oci_layout(&layout, arch, &[0]);
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
        let mut d = index["manifests"][0].clone();
        d.as_object_mut().unwrap().remove("annotations");
        d["platform"] = serde_json::json!({"architecture": arch, "os": "linux"});
        descs.push(d);
    }
    // arm64 first: picking the first entry would be wrong.
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": descs,
    }))
    .unwrap();
    let index_digest = oci::sha256(&index);
    std::fs::write(layout.join("blobs/sha256").join(&index_digest[7..]), &index).unwrap();
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": index_digest, "size": index.len(),
                "annotations": {"org.opencontainers.image.ref.name": "multi"},
            }],
        }))
        .unwrap(),
    )
    .unwrap();
    reg.push(&layout, "multi", "test/multi:1", true);
    let served = reg.manifest("test/multi:1");
    assert_eq!(
        served["manifests"].as_array().map(Vec::len),
        Some(2),
        "the registry serves an index: {served}"
    );

    let o = pull(&a, &format!("http://{}/test/multi:1", reg.host()));
    assert_eq!(o.status.code(), Some(0), "pull: {}", stderr(&o));
    assert_eq!(
        stdout(&o).trim(),
        oci::sha256(&image("linux/amd64").config())
    );
    let o = a.run(&["run", "--rm", &format!("{}/test/multi:1", reg.host())]);
    assert_eq!(stdout(&o), "linux/amd64", "{}", stderr(&o));
}
