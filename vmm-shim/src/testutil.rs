//! Helpers shared by the unit tests.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// Writes `script` to `path` as an executable (mode 0755) that this process
/// may exec at once.
///
/// Writing it ourselves would race with other tests: a child forked by a
/// concurrent test inherits our write descriptor until it execs, and exec
/// of a file open for writing anywhere fails with ETXTBSY. So a `cat` child
/// writes it, and the only descriptor to the file is in a process that has
/// exited before this returns.
pub(crate) fn install_script(path: &Path, script: &str) {
    let mut cat = Command::new("/bin/sh")
        .args(["-c", "cat > \"$1\" && chmod 755 \"$1\"", "sh"])
        .arg(path)
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn sh to write a script");
    cat.stdin
        .take()
        .expect("piped stdin")
        .write_all(script.as_bytes())
        .expect("write the script");
    let status = cat.wait().expect("wait for sh");
    assert!(
        status.success(),
        "writing {} failed: {status}",
        path.display()
    );
}
