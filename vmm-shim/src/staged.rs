//! Guest kernels and initrds staged in sealed memory.
//!
//! A [`StagedFile`] is a memfd holding a copy of a file, written through a
//! memmap2 mapping and then sealed (no write, grow or shrink; the seals
//! themselves sealed), so no start reads it from disk and nothing can
//! change it under a running VM. QEMU receives it as an inherited file
//! descriptor and opens it as `/proc/self/fd/N`.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Arc;

/// A sealed in-memory copy of a file. Clones share the memory.
#[derive(Clone)]
pub struct StagedFile {
    fd: Arc<OwnedFd>,
    len: u64,
    name: String,
}

impl std::fmt::Debug for StagedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagedFile")
            .field("name", &self.name)
            .field("len", &self.len)
            .field("fd", &self.fd.as_raw_fd())
            .finish()
    }
}

impl PartialEq for StagedFile {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.fd, &other.fd)
    }
}

impl Eq for StagedFile {}

impl StagedFile {
    /// Copies `path` into a new sealed memfd named `name`.
    pub fn stage(path: &Path, name: &str) -> io::Result<StagedFile> {
        let data = std::fs::read(path)?;
        Self::from_bytes(&data, name)
    }

    /// Puts `data` into a new sealed memfd named `name`.
    pub fn from_bytes(data: &[u8], name: &str) -> io::Result<StagedFile> {
        let file = new_memfd(name)?;
        file.set_len(data.len() as u64)?;
        if !data.is_empty() {
            // SAFETY: the memfd is private to this function until it is sealed below, so no
            // other mapping or writer can change it while the mapping lives.
            let mut map = unsafe { memmap2::MmapMut::map_mut(&file)? };
            map.copy_from_slice(data);
            map.flush()?;
        }
        seal_all(file.as_raw_fd())?;
        Ok(StagedFile {
            fd: Arc::new(OwnedFd::from(file)),
            len: data.len() as u64,
            name: name.to_string(),
        })
    }

    /// Its size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether its seals forbid every change.
    pub fn is_sealed(&self) -> bool {
        // SAFETY: fcntl(F_GET_SEALS) on our own valid descriptor.
        let s = unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_GET_SEALS) };
        s >= 0 && s & libc::F_SEAL_WRITE != 0 && s & libc::F_SEAL_SEAL != 0
    }

    /// The descriptor, to hand to a child.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Guest memory in a memfd the agent owns, so several VMs can map it: a
/// template VM maps it shared (its RAM is this file), and once the template
/// is snapshotted and gone, the file is sealed and every clone maps it
/// privately, copy-on-write: clones share the template's pages until they
/// write them.
#[derive(Clone)]
pub struct MemoryFile {
    fd: Arc<OwnedFd>,
    len: u64,
}

impl std::fmt::Debug for MemoryFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryFile")
            .field("len", &self.len)
            .field("fd", &self.fd.as_raw_fd())
            .finish()
    }
}

impl PartialEq for MemoryFile {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.fd, &other.fd)
    }
}

impl Eq for MemoryFile {}

impl MemoryFile {
    /// A new zero-filled memfd of `len` bytes (no memory is used until
    /// written).
    pub fn create(len: u64, name: &str) -> io::Result<MemoryFile> {
        let file = new_memfd(name)?;
        file.set_len(len)?;
        Ok(MemoryFile {
            fd: Arc::new(OwnedFd::from(file)),
            len,
        })
    }

    /// Forbids every further change. Fails while a shared writable
    /// mapping exists (a template VM still running).
    pub fn seal(&self) -> io::Result<()> {
        seal_all(self.fd.as_raw_fd())
    }

    /// Its size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of memory it holds (pages written so far).
    pub fn resident_bytes(&self) -> u64 {
        // SAFETY: an all-zero stat is a valid value of this plain C struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat fills the stat buffer for our own valid descriptor.
        if unsafe { libc::fstat(self.fd.as_raw_fd(), &mut st) } < 0 {
            return 0;
        }
        st.st_blocks as u64 * 512
    }

    /// The descriptor, to hand to a child.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl StagedFile {
    /// A new open file description of the same memory, with its own file
    /// offset: what a child that reads the descriptor itself (rather than
    /// opening `/proc/self/fd/N`) must get, so two children never share an
    /// offset.
    pub fn reopen(&self) -> io::Result<File> {
        File::open(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

/// A new, empty memfd named `vmlet-<name>` that can be sealed.
fn new_memfd(name: &str) -> io::Result<File> {
    let cname = std::ffi::CString::new(format!("vmlet-{name}"))
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a memfd name"))?;
    // SAFETY: memfd_create reads the NUL-terminated name and returns a new descriptor or
    // -1; it touches no other memory of ours.
    let fd =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Forbids every change to the memfd `fd`: writes, growing, shrinking and
/// further seals.
fn seal_all(fd: RawFd) -> io::Result<()> {
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: fcntl(F_ADD_SEALS) on a valid descriptor of ours with an int argument.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A descriptor a child process inherits at a fixed number.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Inherit {
    pub(crate) from: RawFd,
    pub(crate) to: RawFd,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    #[test]
    fn staged_copy_is_exact_and_sealed() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let s = StagedFile::from_bytes(&data, "test").unwrap();
        assert_eq!(s.len(), data.len() as u64);
        assert!(s.is_sealed());
        let mut f = File::from(s.as_fd().try_clone_to_owned().unwrap());
        let mut back = Vec::new();
        f.seek(std::io::SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut back).unwrap();
        assert_eq!(back, data);
        // Sealed: neither writes nor resizing are allowed.
        assert!(f.write_all(b"x").is_err());
        assert!(f.set_len(1).is_err());
    }
}
