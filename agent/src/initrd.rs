//! Builds the guest's initramfs: the tether as `/init` plus the kernel
//! modules it loads (none for a kernel with its drivers built in), as an
//! uncompressed newc cpio archive (the kernel unpacks it without a
//! decompressor, which is fastest under TCG).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Why the initrd could not be built.
#[derive(Debug, thiserror::Error)]
pub enum InitrdError {
    /// A source file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The tether is not a static executable, so it cannot run as the
    /// guest's init (the initramfs has no dynamic loader or libc).
    #[error("{0} is not a static x86-64 executable; build it with scripts/build.sh (musl)")]
    NotStatic(PathBuf),
    /// The archive could not be written.
    #[error("cannot write the initrd to {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// A newc cpio writer.
#[derive(Debug)]
struct Cpio<W: Write> {
    out: W,
    ino: u32,
    written: u64,
}

impl<W: Write> Cpio<W> {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.ino += 1;
        let namesize = name.len() + 1;
        let hdr = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            namesize,
            0
        );
        self.put(hdr.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }

    fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, &[])?;
        Ok(self.out)
    }
}

const DIR: u32 = 0o040755;
const EXEC: u32 = 0o100755;
const FILE: u32 = 0o100644;

/// Builds the archive in memory: `/init` is `tether`; every module listed
/// in `modules_dir/modules.order` goes to `/lib/modules/`, with the order
/// file itself. Without `modules_dir` (a kernel with its drivers built in)
/// `/lib/modules` stays empty, and the tether has nothing to load.
pub fn build(tether: &Path, modules_dir: Option<&Path>) -> Result<Vec<u8>, InitrdError> {
    let read = |p: &Path| {
        fs::read(p).map_err(|source| InitrdError::Read {
            path: p.to_path_buf(),
            source,
        })
    };
    let init = read(tether)?;
    if !is_static_elf(&init) {
        return Err(InitrdError::NotStatic(tether.to_path_buf()));
    }
    let mut c = Cpio {
        out: Vec::with_capacity(init.len() + (8 << 20)),
        ino: 0,
        written: 0,
    };
    let w = |e: io::Error| InitrdError::Write {
        path: PathBuf::from("<memory>"),
        source: e,
    };
    for d in ["dev", "proc", "sys", "run", "lib", "lib/modules"] {
        c.entry(d, DIR, &[]).map_err(w)?;
    }
    c.entry("init", EXEC, &init).map_err(w)?;
    if let Some(dir) = modules_dir {
        add_modules(&mut c, dir, &read, &w)?;
    }
    c.finish().map_err(w)
}

/// `dir/modules.order` and every module it names, under `lib/modules/`.
fn add_modules(
    c: &mut Cpio<Vec<u8>>,
    dir: &Path,
    read: &dyn Fn(&Path) -> Result<Vec<u8>, InitrdError>,
    w: &dyn Fn(io::Error) -> InitrdError,
) -> Result<(), InitrdError> {
    let order = read(&dir.join("modules.order"))?;
    c.entry("lib/modules/modules.order", FILE, &order)
        .map_err(w)?;
    let order_text = String::from_utf8_lossy(&order);
    for name in order_text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        // Names come from our own setup step; still refuse anything that
        // is not a plain file name.
        if name.contains('/') || name.starts_with('.') {
            continue;
        }
        let data = read(&dir.join(name))?;
        c.entry(&format!("lib/modules/{name}"), FILE, &data)
            .map_err(w)?;
    }
    Ok(())
}

/// Builds the archive and writes it atomically to `dest`.
pub fn build_to(
    tether: &Path,
    modules_dir: Option<&Path>,
    dest: &Path,
) -> Result<u64, InitrdError> {
    let data = build(tether, modules_dir)?;
    crate::state::write_atomic(dest, &data).map_err(|source| InitrdError::Write {
        path: dest.to_path_buf(),
        source,
    })?;
    Ok(data.len() as u64)
}

/// Whether `elf` is a 64-bit little-endian ELF without a program
/// interpreter (`PT_INTERP`), that is, one the kernel can run alone.
fn is_static_elf(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    if elf.get(0..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..phnum as usize).all(|i| {
        let at = phoff as usize + i * phentsize as usize;
        elf.get(at..at + 4)
            .is_some_and(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) != PT_INTERP)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_lists_with_cpio() {
        let dir = tempfile::tempdir().unwrap();
        let tether = dir.path().join("tether");
        // A dynamically linked program (this test binary) is refused...
        let me = std::env::current_exe().unwrap();
        assert!(matches!(
            build(&me, Some(&dir.path().join("none"))),
            Err(InitrdError::NotStatic(_))
        ));
        // ...a static one is taken: an ELF header with no program headers.
        let mut elf = vec![0x7f, b'E', b'L', b'F', 2, 1];
        elf.resize(64, 0);
        fs::write(&tether, &elf).unwrap();
        let mods = dir.path().join("modules");
        fs::create_dir(&mods).unwrap();
        fs::write(mods.join("a.ko"), b"AAAA1").unwrap();
        fs::write(mods.join("modules.order"), b"a.ko\n../evil.ko\n").unwrap();
        let out = dir.path().join("initrd.cpio");
        build_to(&tether, Some(&mods), &out).unwrap();
        let data = fs::read(&out).unwrap();
        assert_eq!(&data[..6], b"070701");
        assert_eq!(data.len() % 4, 0);
        // If the cpio tool is present, it must agree with our layout.
        if let Ok(o) = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(fs::File::open(&out).unwrap())
            .output()
        {
            let list = String::from_utf8_lossy(&o.stdout);
            assert!(list.lines().any(|l| l == "init"), "{list}");
            assert!(list.lines().any(|l| l == "lib/modules/a.ko"), "{list}");
            assert!(!list.contains("evil"), "{list}");
        }
        // A kernel with its drivers built in: no modules, not even the order file.
        let data = build(&tether, None).unwrap();
        let text = String::from_utf8_lossy(&data);
        assert!(text.contains("init"));
        assert!(!text.contains("modules.order"));
        assert!(!text.contains("a.ko"));
    }
}
