//! Access to the API socket and admission limits.

use std::os::unix::process::CommandExt;
use std::process::Stdio;

use vmlet_tests::{stderr, stdout, wait_output, AgentOptions, TestAgent};

fn ps_as(a: &TestAgent, uid: u32) -> std::process::Output {
    let child = a
        .vmlet()
        .args(["ps", "-a"])
        .uid(uid)
        .gid(uid)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_output(child, std::time::Duration::from_secs(30), "vmlet ps")
}

#[test]
fn only_configured_users_may_use_the_api() {
    // The socket is world-writable here so that only the credential check
    // stands between another user and the API.
    let nobody = 65534;
    let a = TestAgent::start_with(AgentOptions {
        extra: vec!["--socket-mode".into(), "666".into()],
        ..Default::default()
    });
    let o = ps_as(&a, nobody);
    assert_ne!(
        o.status.code(),
        Some(0),
        "nobody was let in: {}",
        stdout(&o)
    );
    assert!(
        a.daemon_log().contains("refused a connection"),
        "{}",
        a.daemon_log()
    );
    assert_eq!(a.run(&["ps"]).status.code(), Some(0), "root is refused");

    let b = TestAgent::start_with(AgentOptions {
        extra: vec![
            "--socket-mode".into(),
            "666".into(),
            "--allow-uid".into(),
            nobody.to_string(),
        ],
        ..Default::default()
    });
    let o = ps_as(&b, nobody);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn a_start_over_the_memory_limit_fails_fast() {
    let a = TestAgent::start_with(AgentOptions {
        extra: vec!["--max-total-memory".into(), "400".into()],
        ..Default::default()
    });
    let first = a.detach(&["--memory", "256", "busybox", "--", "sleep", "1000"]);
    let o = a.run(&["run", "--rm", "--memory", "256", "busybox", "--", "true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("limit is 400 MiB"), "{}", stderr(&o));
    // A smaller one still fits.
    let o = a.run(&[
        "run", "--rm", "--memory", "128", "busybox", "--", "echo", "fits",
    ]);
    assert_eq!(stdout(&o), "fits\n", "{}", stderr(&o));
    assert_eq!(a.run(&["rm", "-f", &first]).status.code(), Some(0));
    a.assert_no_processes(&first);
}
