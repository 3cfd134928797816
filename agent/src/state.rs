//! Crash-safe files: every state file is written to a temporary name,
//! then renamed over the old one, so a crash leaves either the old or the
//! new content, never a mix.
//!
//! [`write_atomic`] syncs the file before the rename and the directory
//! after it: once it returns, the new content survives a power loss.
//! [`write_atomic_unsynced`] renames at once and leaves both syncs to its
//! caller ([`Unsynced::sync`], on another thread): its content survives
//! the agent's own crash at once, as the rename is in the host's page
//! cache, and a power loss once the sync is done; until then a power loss
//! may leave the old content, or an empty file.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

/// Writes `data` to `path` atomically.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    write_atomic_mode(path, data, 0o644)
}

/// [`write_atomic`], the file created with permission bits `mode` (before
/// the umask).
pub fn write_atomic_mode(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let (f, tmp, dir) = write_temp(path, data, mode)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    // Make the rename itself durable.
    fs::File::open(dir)?.sync_all()
}

/// A file renamed into place whose data and name may not be on the disk
/// yet.
#[derive(Debug)]
pub struct Unsynced {
    path: PathBuf,
    file: fs::File,
    dir: fs::File,
}

impl Unsynced {
    /// Flushes the file's data, then its directory (its new name), to the
    /// disk. Safe after the file or its directory is gone: it then flushes
    /// what is left of them, which nothing reads.
    pub fn sync(self) -> io::Result<()> {
        self.file.sync_all()?;
        self.dir.sync_all()
    }
}

/// [`write_atomic_mode`] without waiting for the disk: the new content is
/// in place when this returns; [`Unsynced::sync`] makes it durable.
pub fn write_atomic_unsynced(path: &Path, data: &[u8], mode: u32) -> io::Result<Unsynced> {
    let (file, tmp, dir) = write_temp(path, data, mode)?;
    let dir = fs::File::open(dir)?;
    fs::rename(&tmp, path)?;
    Ok(Unsynced {
        path: path.to_owned(),
        file,
        dir,
    })
}

/// How many files may wait for [`Syncer`]'s thread, each holding two file
/// descriptors; past that a caller syncs its own, so a disk slower than
/// the writes holds back the writers rather than growing a queue.
const SYNC_QUEUE: usize = 64;

/// A thread that syncs [`Unsynced`] files in the order they come, so the
/// threads that wrote them never wait for the disk. A failed sync is
/// logged: the content is in place and the next write of the file syncs
/// again.
#[derive(Debug)]
pub struct Syncer {
    tx: Option<mpsc::SyncSender<Unsynced>>,
}

impl Syncer {
    /// Starts the thread; if it cannot start, [`Syncer::submit`] syncs in
    /// the caller.
    pub fn start() -> Syncer {
        let (tx, rx) = mpsc::sync_channel::<Unsynced>(SYNC_QUEUE);
        let spawned = std::thread::Builder::new()
            .name("vmlet-sync".into())
            .spawn(move || {
                // Ends once every sender is gone and the queue is drained.
                for u in rx {
                    sync_logged(u);
                }
            });
        match spawned {
            Ok(_) => Syncer { tx: Some(tx) },
            Err(e) => {
                tracing::warn!(error = %e, "no thread for syncing state files; writers sync them");
                Syncer { tx: None }
            }
        }
    }

    /// Has `u` synced: by the thread, or here when its queue is full.
    pub fn submit(&self, u: Unsynced) {
        let u = match &self.tx {
            Some(tx) => match tx.try_send(u) {
                Ok(()) => return,
                Err(mpsc::TrySendError::Full(u) | mpsc::TrySendError::Disconnected(u)) => u,
            },
            None => u,
        };
        sync_logged(u);
    }
}

fn sync_logged(u: Unsynced) {
    let path = u.path.clone();
    if let Err(e) = u.sync() {
        tracing::error!(path = %path.display(), error = %e, "cannot sync a state file to the disk");
    }
}

/// Writes `data` to a temporary name beside `path`; returns the open file,
/// that name and the directory.
fn write_temp<'a>(
    path: &'a Path,
    data: &[u8],
    mode: u32,
) -> io::Result<(fs::File, std::path::PathBuf, &'a Path)> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let mut f = fs::File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(data)?;
    Ok((f, tmp, dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("vm.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn unsynced_content_is_in_place_before_the_sync() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("vm.json");
        write_atomic_mode(&p, b"one", 0o600).unwrap();
        let pending = write_atomic_unsynced(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        pending.sync().unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
    }

    #[test]
    fn a_sync_after_the_directory_is_deleted_is_harmless() {
        let d = tempfile::tempdir().unwrap();
        let sub = d.path().join("vm");
        fs::create_dir(&sub).unwrap();
        let pending = write_atomic_unsynced(&sub.join("vm.json"), b"x", 0o600).unwrap();
        fs::remove_dir_all(&sub).unwrap();
        pending.sync().unwrap();
    }
}
