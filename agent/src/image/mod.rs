//! The image store. For now an image is one read-only root filesystem disk
//! at `images/<name>/rootfs.ext4`; the default `busybox` image is built
//! from the host's static busybox the first time the agent starts.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use vmlet_protocol::{ApiError, ErrorCode};

use crate::ids;

/// Why an image could not be built or found.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A file operation failed.
    #[error("image store i/o failed at {path}")]
    Io {
        /// Where.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An external tool failed.
    #[error("{tool} failed: {stderr}")]
    Tool {
        /// The tool.
        tool: String,
        /// What it printed.
        stderr: String,
    },
    /// The host lacks something the image needs.
    #[error("{0}")]
    Missing(String),
}

/// A resolved image: its disks.
#[derive(Debug, Clone)]
pub struct Image {
    /// Normalised name.
    pub name: String,
    /// The root filesystem disk.
    pub rootfs: PathBuf,
    /// Its filesystem type.
    pub fstype: &'static str,
}

/// The image store under the agent's state directory.
#[derive(Debug)]
pub struct ImageStore {
    dir: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl ImageStore {
    /// Opens the store at `dir`, creating it.
    pub fn open(dir: PathBuf) -> Result<Self, ImageError> {
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        Ok(ImageStore { dir })
    }

    /// Finds an image by name (`busybox`, `busybox:latest`).
    pub fn resolve(&self, name: &str) -> Result<Image, ApiError> {
        ids::validate_image(name)?;
        let norm = name.strip_suffix(":latest").unwrap_or(name);
        let rootfs = self.dir.join(norm).join("rootfs.ext4");
        if !rootfs.is_file() {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("no image named {name:?} in this agent's image store"),
            ));
        }
        Ok(Image {
            name: norm.to_string(),
            rootfs,
            fstype: "ext4",
        })
    }

    /// Builds the `busybox` image from the host's static busybox if it is
    /// not there yet.
    pub fn ensure_busybox(&self) -> Result<(), ImageError> {
        let dest_dir = self.dir.join("busybox");
        let dest = dest_dir.join("rootfs.ext4");
        if dest.is_file() {
            return Ok(());
        }
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.is_file())
            .ok_or_else(|| {
                ImageError::Missing(
                    "no busybox on this host: install Debian's busybox-static".into(),
                )
            })?;
        fs::create_dir_all(&dest_dir).map_err(io_err(&dest_dir))?;
        let stage = dest_dir.join(".stage");
        let _ = fs::remove_dir_all(&stage);
        for d in [
            "bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "root", "run", "var",
        ] {
            let p = stage.join(d);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        let bb = stage.join("bin/busybox");
        fs::copy(busybox, &bb).map_err(io_err(&bb))?;
        let list = Command::new(busybox)
            .arg("--list")
            .output()
            .map_err(io_err(busybox))?;
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            let applet = applet.trim();
            if applet.is_empty() || applet.contains('/') || applet == "busybox" {
                continue;
            }
            let link = stage.join("bin").join(applet);
            let _ = std::os::unix::fs::symlink("busybox", link);
        }
        let files = [
            (
                "etc/passwd",
                "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
            ),
            ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
            ("etc/hosts", "127.0.0.1 localhost\n"),
        ];
        for (name, text) in files {
            let p = stage.join(name);
            fs::write(&p, text).map_err(io_err(&p))?;
        }
        let tmp = dest_dir.join(".rootfs.ext4.tmp");
        let _ = fs::remove_file(&tmp);
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "busybox", "-O", "^has_journal", "-d"])
            .arg(&stage)
            .arg(&tmp)
            .arg("16M")
            .output()
            .map_err(|e| {
                ImageError::Missing(format!("cannot run mkfs.ext4 (install e2fsprogs): {e}"))
            })?;
        if !out.status.success() {
            return Err(ImageError::Tool {
                tool: "mkfs.ext4".into(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
        let _ = fs::remove_dir_all(&stage);
        Ok(())
    }
}
