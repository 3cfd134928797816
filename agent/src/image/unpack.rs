//! Unpacks one layer tar into a private staging directory, safely, and
//! turns OCI whiteouts into overlayfs ones.
//!
//! A layer is untrusted input. Every entry's path is checked before
//! anything is written: no `..`, no absolute path, no NUL, bounded lengths;
//! every parent component is looked at with `lstat` and must be a real
//! directory (a symlink as a parent is refused, so nothing is ever written
//! through a symlink, wherever it points); hard links must name a file
//! already unpacked from this same layer; device nodes and fifos are
//! refused. GNU long names and PAX headers are parsed here, with a size
//! cap, rather than by the `tar` crate, which would read a long-name
//! record of any size into memory.
//!
//! The staging directory is created by the caller with mode 0700 under the
//! agent's state directory, and only this code writes into it, so nothing
//! can change a checked component between the check and the write.
//!
//! Whiteouts (OCI image spec, "Representing Changes"): `.wh.<name>` becomes
//! a character device 0:0 named `<name>`, and `.wh..wh..opq` becomes the
//! xattr `trusted.overlay.opaque=y` on its directory: what overlayfs reads
//! in a lower layer.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tar::EntryType;

/// Longest path accepted (Linux's `PATH_MAX`).
pub const MAX_PATH: usize = 4096;
/// Longest single path component (`NAME_MAX`).
pub const MAX_NAME: usize = 255;
/// Largest PAX extended header accepted; real ones are a few hundred bytes.
pub const MAX_PAX: u64 = 64 * 1024;
/// Most entries in one layer.
pub const MAX_ENTRIES: u64 = 4_000_000;

/// Why a layer was refused.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The entry's path or link target is not acceptable.
    #[error("layer entry {path:?} is refused: {why}")]
    Refused {
        /// The entry's path as written in the tar.
        path: String,
        /// Why.
        why: &'static str,
    },
    /// The tar stream is malformed.
    #[error("the layer is not a valid tar: {0}")]
    Malformed(String),
    /// Reading the tar or writing the staging directory failed.
    #[error("unpacking the layer failed at {path}")]
    Io {
        /// Where.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn refused(path: &[u8], why: &'static str) -> UnpackError {
    UnpackError::Refused {
        path: String::from_utf8_lossy(&path[..path.len().min(200)]).into_owned(),
        why,
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> UnpackError + '_ {
    move |source| UnpackError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What an unpack did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Entries unpacked.
    pub entries: u64,
    /// File bytes written.
    pub bytes: u64,
}

/// Splits a tar path into checked components. `./` prefixes and empty
/// components are dropped; `..`, an absolute path, NUL and over-long
/// names are refused.
pub fn components(raw: &[u8]) -> Result<Vec<&[u8]>, UnpackError> {
    if raw.len() > MAX_PATH {
        return Err(refused(raw, "the path is longer than 4096 bytes"));
    }
    if raw.contains(&0) {
        return Err(refused(raw, "the path contains a NUL byte"));
    }
    if raw.first() == Some(&b'/') {
        return Err(refused(raw, "absolute paths are not allowed in a layer"));
    }
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(refused(raw, "the path contains `..`")),
            c if c.len() > MAX_NAME => {
                return Err(refused(raw, "a path component is longer than 255 bytes"))
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Walks `comps` below `root` with `lstat`, checking that each is a real
/// directory; with `create`, missing ones are made (mode 0755). Returns
/// the full path.
fn walk_dirs(
    root: &Path,
    comps: &[&[u8]],
    create: bool,
    raw: &[u8],
) -> Result<PathBuf, UnpackError> {
    let mut p = root.to_path_buf();
    for c in comps {
        p.push(std::ffi::OsStr::from_bytes(c));
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(refused(
                    raw,
                    "a parent directory is a symlink: writing through symlinks is not allowed",
                ))
            }
            Ok(_) => return Err(refused(raw, "a parent of the path is not a directory")),
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                fs::create_dir(&p).map_err(io_at(&p))?;
                fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).map_err(io_at(&p))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(refused(
                    raw,
                    "the hard link's target does not exist in this layer",
                ))
            }
            Err(e) => return Err(io_at(&p)(e)),
        }
    }
    Ok(p)
}

/// Removes whatever is at `p` (not following symlinks), if anything.
fn clear(p: &Path) -> Result<(), UnpackError> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_dir() => fs::remove_dir_all(p).map_err(io_at(p)),
        Ok(_) => fs::remove_file(p).map_err(io_at(p)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_at(p)(e)),
    }
}

fn cstr(p: &Path) -> Result<CString, UnpackError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| UnpackError::Malformed("NUL in path".into()))
}

/// Sets an xattr on `p` itself (never following a symlink).
fn set_xattr(p: &Path, name: &str, value: &[u8]) -> Result<(), UnpackError> {
    let cp = cstr(p)?;
    let cn = CString::new(name).expect("static name");
    // SAFETY: both strings are valid NUL-terminated C strings that outlive
    // the call; `value` is a valid slice of `value.len()` bytes.
    let r = unsafe {
        libc::lsetxattr(
            cp.as_ptr(),
            cn.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r != 0 {
        return Err(io_at(p)(io::Error::last_os_error()));
    }
    Ok(())
}

/// Sets a path's mtime without following a symlink.
fn set_mtime(p: &Path, secs: u64) {
    let t = nix::sys::time::TimeSpec::new(secs.min(i64::MAX as u64) as i64, 0);
    let _ = nix::sys::stat::utimensat(
        None,
        p,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    );
}

/// Reads the whole of a small extension record, refusing a big one.
pub(super) fn read_small<R: Read>(
    e: &mut tar::Entry<'_, R>,
    cap: u64,
) -> Result<Vec<u8>, UnpackError> {
    let size = e
        .header()
        .entry_size()
        .map_err(|e| UnpackError::Malformed(e.to_string()))?;
    if size > cap {
        return Err(UnpackError::Refused {
            path: "<extended header>".into(),
            why: "an extended (long name or PAX) header is over its size limit",
        });
    }
    let mut v = Vec::with_capacity(size as usize);
    e.read_to_end(&mut v).map_err(|source| UnpackError::Io {
        path: "<extended header>".into(),
        source,
    })?;
    Ok(v)
}

/// Parses PAX records (`"<len> <key>=<value>\n"`), keeping the ones used.
pub(super) fn parse_pax(data: &[u8]) -> Result<HashMap<String, Vec<u8>>, UnpackError> {
    let bad = || UnpackError::Malformed("a PAX header is malformed".into());
    let mut out = HashMap::new();
    let mut rest = data;
    while !rest.is_empty() {
        let sp = rest.iter().position(|b| *b == b' ').ok_or_else(bad)?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(bad());
        }
        let rec = &rest[sp + 1..len - 1];
        let eq = rec.iter().position(|b| *b == b'=').ok_or_else(bad)?;
        let key = String::from_utf8_lossy(&rec[..eq]).into_owned();
        if matches!(
            key.as_str(),
            "path" | "linkpath" | "uid" | "gid" | "size" | "mtime"
        ) {
            out.insert(key, rec[eq + 1..].to_vec());
        }
        rest = &rest[len..];
    }
    Ok(out)
}

pub(super) fn pax_num(pax: &HashMap<String, Vec<u8>>, key: &str) -> Option<u64> {
    let v = pax.get(key)?;
    let s = std::str::from_utf8(v).ok()?;
    s.split('.').next()?.parse().ok()
}

/// Unpacks the tar read from `src` into `root` (an existing empty
/// directory). Nothing is written outside `root`.
pub fn unpack<R: Read>(src: R, root: &Path) -> Result<Stats, UnpackError> {
    let mut ar = tar::Archive::new(src);
    let mut entries = ar
        .entries()
        .map_err(|e| UnpackError::Malformed(e.to_string()))?;
    // Raw iteration: long names and PAX are handled below, bounded.
    entries = entries.raw(true);
    let mut stats = Stats::default();
    let mut long_name: Option<Vec<u8>> = None;
    let mut long_link: Option<Vec<u8>> = None;
    let mut pax: Option<HashMap<String, Vec<u8>>> = None;
    for entry in entries {
        let mut e = entry.map_err(|e| UnpackError::Malformed(e.to_string()))?;
        let kind = e.header().entry_type();
        match kind {
            EntryType::GNULongName => {
                let mut v = read_small(&mut e, MAX_PATH as u64 + 1)?;
                if v.last() == Some(&0) {
                    v.pop();
                }
                long_name = Some(v);
                continue;
            }
            EntryType::GNULongLink => {
                let mut v = read_small(&mut e, MAX_PATH as u64 + 1)?;
                if v.last() == Some(&0) {
                    v.pop();
                }
                long_link = Some(v);
                continue;
            }
            EntryType::XHeader => {
                pax = Some(parse_pax(&read_small(&mut e, MAX_PAX)?)?);
                continue;
            }
            EntryType::XGlobalHeader => {
                read_small(&mut e, MAX_PAX)?;
                continue;
            }
            _ => {}
        }
        let pax_now = pax.take().unwrap_or_default();
        let path_raw: Vec<u8> = match (pax_now.get("path"), long_name.take()) {
            (Some(p), _) => p.clone(),
            (None, Some(p)) => p,
            (None, None) => e.header().path_bytes().into_owned(),
        };
        let link_raw: Option<Vec<u8>> = match (pax_now.get("linkpath"), long_link.take()) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(p)) => Some(p),
            (None, None) => e.header().link_name_bytes().map(|b| b.into_owned()),
        };
        let hsize = e
            .header()
            .entry_size()
            .map_err(|err| UnpackError::Malformed(err.to_string()))?;
        if let Some(s) = pax_num(&pax_now, "size") {
            if s != hsize {
                return Err(refused(
                    &path_raw,
                    "PAX sizes beyond the header's are not supported",
                ));
            }
        }
        stats.entries += 1;
        if stats.entries > MAX_ENTRIES {
            return Err(refused(
                &path_raw,
                "the layer has more than 4 million entries",
            ));
        }
        let h = e.header();
        let mode = h.mode().unwrap_or(0o644) & 0o7777;
        let uid = pax_num(&pax_now, "uid")
            .or_else(|| h.uid().ok())
            .unwrap_or(0) as u32;
        let gid = pax_num(&pax_now, "gid")
            .or_else(|| h.gid().ok())
            .unwrap_or(0) as u32;
        let mtime = pax_num(&pax_now, "mtime")
            .or_else(|| h.mtime().ok())
            .unwrap_or(0);

        let comps = components(&path_raw)?;
        let Some((name, parents)) = comps.split_last() else {
            // The root itself (`./`): its mode and owner.
            if kind == EntryType::Directory {
                std::os::unix::fs::lchown(root, Some(uid), Some(gid)).map_err(io_at(root))?;
                fs::set_permissions(root, fs::Permissions::from_mode(mode)).map_err(io_at(root))?;
            }
            continue;
        };
        let dir = walk_dirs(root, parents, true, &path_raw)?;

        // Whiteouts.
        if let Some(hidden) = name.strip_prefix(b".wh.") {
            if hidden == b".wh..opq" {
                set_xattr(&dir, "trusted.overlay.opaque", b"y")?;
            } else if hidden.starts_with(b".wh.") {
                // Other AUFS metadata (`.wh..wh.plnk`, …): not content.
            } else if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(refused(&path_raw, "a whiteout must name an entry"));
            } else {
                let p = dir.join(std::ffi::OsStr::from_bytes(hidden));
                clear(&p)?;
                nix::sys::stat::mknod(
                    &p,
                    nix::sys::stat::SFlag::S_IFCHR,
                    nix::sys::stat::Mode::empty(),
                    0,
                )
                .map_err(|errno| io_at(&p)(io::Error::from(errno)))?;
            }
            continue;
        }

        let p = dir.join(std::ffi::OsStr::from_bytes(name));
        match kind {
            EntryType::Directory => {
                match fs::symlink_metadata(&p) {
                    Ok(m) if m.file_type().is_dir() => {}
                    _ => {
                        clear(&p)?;
                        fs::create_dir(&p).map_err(io_at(&p))?;
                    }
                }
                std::os::unix::fs::lchown(&p, Some(uid), Some(gid)).map_err(io_at(&p))?;
                fs::set_permissions(&p, fs::Permissions::from_mode(mode)).map_err(io_at(&p))?;
            }
            EntryType::Regular | EntryType::Continuous => {
                clear(&p)?;
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&p)
                    .map_err(io_at(&p))?;
                let n = io::copy(&mut (&mut e).take(hsize), &mut f).map_err(io_at(&p))?;
                if n != hsize {
                    return Err(UnpackError::Malformed(format!(
                        "the tar ends inside {}",
                        String::from_utf8_lossy(&path_raw)
                    )));
                }
                stats.bytes += n;
                // chown before chmod: chown clears setuid and setgid.
                std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).map_err(io_at(&p))?;
                f.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(io_at(&p))?;
                drop(f);
                set_mtime(&p, mtime);
            }
            EntryType::Symlink => {
                let target =
                    link_raw.ok_or_else(|| refused(&path_raw, "a symlink without a target"))?;
                if target.is_empty() || target.len() > MAX_PATH || target.contains(&0) {
                    return Err(refused(
                        &path_raw,
                        "the symlink's target is empty or too long",
                    ));
                }
                // The target may point anywhere: it is never followed here,
                // and in the guest it resolves inside the container's root.
                clear(&p)?;
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), &p)
                    .map_err(io_at(&p))?;
                std::os::unix::fs::lchown(&p, Some(uid), Some(gid)).map_err(io_at(&p))?;
                set_mtime(&p, mtime);
            }
            EntryType::Link => {
                let target =
                    link_raw.ok_or_else(|| refused(&path_raw, "a hard link without a target"))?;
                let tcomps = components(&target)?;
                let Some((tname, tparents)) = tcomps.split_last() else {
                    return Err(refused(&path_raw, "a hard link to the root"));
                };
                let tdir = walk_dirs(root, tparents, false, &path_raw)?;
                let t = tdir.join(std::ffi::OsStr::from_bytes(tname));
                match fs::symlink_metadata(&t) {
                    Ok(m) if m.file_type().is_file() || m.file_type().is_symlink() => {}
                    Ok(_) => return Err(refused(&path_raw, "a hard link must name a file")),
                    Err(_) => {
                        return Err(refused(
                            &path_raw,
                            "the hard link's target does not exist in this layer",
                        ))
                    }
                }
                if t == p {
                    continue;
                }
                clear(&p)?;
                // linkat without AT_SYMLINK_FOLLOW: a symlink target is
                // linked itself, never followed.
                fs::hard_link(&t, &p).map_err(io_at(&p))?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                return Err(refused(
                    &path_raw,
                    "device nodes and fifos are not allowed in image layers",
                ))
            }
            _ => return Err(refused(&path_raw, "unsupported tar entry type")),
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn header(kind: EntryType, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1);
        h
    }

    /// Writes a header whose name bytes are set raw, bypassing the tar
    /// crate's own path checks, as a hostile archive would.
    fn raw_entry(
        b: &mut tar::Builder<Vec<u8>>,
        kind: EntryType,
        name: &[u8],
        link: &[u8],
        data: &[u8],
    ) {
        let mut h = header(kind, data.len() as u64, 0o644);
        {
            let g = h.as_old_mut();
            g.name[..name.len()].copy_from_slice(name);
            g.linkname[..link.len()].copy_from_slice(link);
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    fn staging() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        fs::create_dir(&root).unwrap();
        (d, root)
    }

    #[test]
    fn refuses_escapes_and_leaves_nothing_outside() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "dotdot",
                tar_of(|b| raw_entry(b, EntryType::Regular, b"../canary", b"", b"x")),
            ),
            (
                "absolute",
                tar_of(|b| raw_entry(b, EntryType::Regular, b"/tmp/canary", b"", b"x")),
            ),
            (
                "symlink then write through it",
                tar_of(|b| {
                    raw_entry(b, EntryType::Symlink, b"esc", b"..", b"");
                    raw_entry(b, EntryType::Regular, b"esc/canary", b"", b"x");
                }),
            ),
            (
                "hard link out",
                tar_of(|b| raw_entry(b, EntryType::Link, b"l", b"../canary", b"")),
            ),
            (
                "device",
                tar_of(|b| raw_entry(b, EntryType::Char, b"dev", b"", b"")),
            ),
            (
                "fifo",
                tar_of(|b| raw_entry(b, EntryType::Fifo, b"fifo", b"", b"")),
            ),
        ];
        for (what, t) in cases {
            let (d, root) = staging();
            let r = unpack(&t[..], &root);
            assert!(
                matches!(r, Err(UnpackError::Refused { .. })),
                "{what}: {r:?}"
            );
            assert!(!d.path().join("canary").exists(), "{what}");
        }
    }

    #[test]
    fn refuses_an_oversized_long_name() {
        let mut t = Vec::new();
        let mut h = header(EntryType::GNULongName, 10 << 20, 0o644);
        h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
        h.set_cksum();
        t.extend_from_slice(h.as_bytes());
        t.extend_from_slice(&vec![b'a'; 10 << 20]);
        let (_d, root) = staging();
        let r = unpack(&t[..], &root);
        assert!(matches!(r, Err(UnpackError::Refused { .. })), "{r:?}");
    }

    #[test]
    fn whiteouts_links_and_modes() {
        let t = tar_of(|b| {
            b.append_data(&mut header(EntryType::Directory, 0, 0o755), "d/", &[][..])
                .unwrap();
            b.append_data(
                &mut header(EntryType::Regular, 0, 0o644),
                "d/.wh..wh..opq",
                &[][..],
            )
            .unwrap();
            b.append_data(
                &mut header(EntryType::Regular, 0, 0o644),
                "d/.wh.gone",
                &[][..],
            )
            .unwrap();
            b.append_data(
                &mut header(EntryType::Regular, 3, 0o4755),
                "d/suid",
                &b"abc"[..],
            )
            .unwrap();
            raw_entry(b, EntryType::Link, b"d/hard", b"d/suid", b"");
            raw_entry(b, EntryType::Symlink, b"d/sym", b"/etc/passwd", b"");
        });
        let (_d, root) = staging();
        unpack(&t[..], &root).unwrap();
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let m = fs::symlink_metadata(root.join("d/gone")).unwrap();
        assert!(m.file_type().is_char_device() && m.rdev() == 0);
        let mut v = [0u8; 4];
        let p = cstr(&root.join("d")).unwrap();
        // SAFETY: valid C strings and a buffer of the stated length.
        let n = unsafe {
            libc::lgetxattr(
                p.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                v.as_mut_ptr().cast(),
                4,
            )
        };
        assert_eq!(n, 1);
        assert_eq!(v[0], b'y');
        let s = fs::symlink_metadata(root.join("d/suid")).unwrap();
        assert_eq!(s.mode() & 0o7777, 0o4755);
        assert_eq!(s.nlink(), 2);
        assert_eq!(
            fs::read_link(root.join("d/sym")).unwrap(),
            Path::new("/etc/passwd")
        );
    }
}
