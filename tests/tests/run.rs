//! `vmlet run` end to end on real QEMU guests: output, exit codes, stdin,
//! concurrency, and that `--rm` leaves nothing behind.

use vmlet_tests::{stderr, stdout, TestAgent};

#[test]
fn echo_and_exit_codes_and_rm_leaves_nothing() {
    let a = TestAgent::start();
    a.assert_echo_and_exit_codes();

    // --rm removed both: nothing listed, no VM directory, no process.
    let ps = a.run(&["ps", "-a", "-q"]);
    assert_eq!(stdout(&ps), "", "ps -a after --rm: {}", stdout(&ps));
    let left = a.container_dirs();
    assert!(left.is_empty(), "VM directories left: {left:?}");
    a.assert_no_container_processes();
}

#[test]
fn stdin_reaches_the_container_and_closes() {
    let a = TestAgent::start();
    let o = a.run_with_input(
        &["run", "-i", "--rm", "busybox", "--", "cat"],
        Some(b"abc\n"),
    );
    assert_eq!(stdout(&o), "abc\n", "stderr: {}", stderr(&o));
    assert_eq!(o.status.code(), Some(0));

    // More than one chunk, in order, exactly once.
    let input: Vec<u8> = (0..200_000u32)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .collect();
    let o = a.run_with_input(
        &[
            "run",
            "-i",
            "--rm",
            "busybox",
            "--",
            "sh",
            "-c",
            "md5sum; wc -c",
        ],
        Some(&input),
    );
    let want_sum = {
        let out = std::process::Command::new("md5sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(&input)?;
                c.wait_with_output()
            })
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    let got = stdout(&o);
    assert!(got.starts_with(&want_sum), "md5 {got:?} want {want_sum}");
    // wc reads what md5sum left: nothing.
    assert!(got.trim_end().ends_with('0'), "{got:?}");
}

#[test]
fn attach_i_feeds_a_started_container_and_ends_with_its_code() {
    let a = TestAgent::start();
    let script = "while read l; do echo \"got $l\"; done; echo end; exit 4";
    let id = stdout(&a.run(&["create", "-i", "busybox", "--", "sh", "-c", script]))
        .trim()
        .to_string();
    let s = a.run(&["start", &id]);
    assert!(s.status.success(), "start: {}", stderr(&s));
    // The container reads nothing until an attach brings stdin; the end
    // of this input closes it, and the attach ends with the exit code.
    let o = a.run_with_input(&["attach", "-i", &id], Some(b"abc\nxyz\n"));
    assert_eq!(
        stdout(&o),
        "got abc\ngot xyz\nend\n",
        "stderr: {}",
        stderr(&o)
    );
    assert_eq!(o.status.code(), Some(4));
    assert_eq!(stdout(&a.run(&["wait", &id])).trim(), "4");
    a.run(&["rm", &id]);
}

#[test]
fn command_not_found_is_127_with_a_message() {
    let a = TestAgent::start();
    let o = a.run(&["run", "--rm", "busybox", "--", "/no/such/program"]);
    assert_eq!(o.status.code(), Some(127), "stderr: {}", stderr(&o));
    assert!(stderr(&o).contains("/no/such/program"), "{}", stderr(&o));
}

#[test]
fn four_vms_at_once_each_get_their_own_output() {
    let a = TestAgent::start();
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|i| {
                let a = &a;
                s.spawn(move || {
                    let script = format!("echo vm-{i}; echo err-{i} >&2; exit {}", 10 + i);
                    let o = a.run(&["run", "--rm", "busybox", "--", "sh", "-c", &script]);
                    (i, o)
                })
            })
            .collect();
        for h in hs {
            let (i, o) = h.join().unwrap();
            assert_eq!(stdout(&o), format!("vm-{i}\n"));
            assert_eq!(stderr(&o), format!("err-{i}\n"));
            assert_eq!(o.status.code(), Some(10 + i));
        }
    });
    a.assert_no_container_processes();
}
