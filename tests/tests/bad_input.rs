//! Bad input gets a clear error and the agent keeps serving others.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vmlet_protocol::api::{ClientMessage, Request, Response, ServerMessage};
use vmlet_protocol::frame::{self, Header, FRAME_VERSION, MAX_FRAME_LEN};
use vmlet_protocol::ErrorCode;
use vmlet_tests::{raw_hello, stderr, stdout, AgentOptions, TestAgent};

fn raw(a: &TestAgent) -> UnixStream {
    let s = UnixStream::connect(&a.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

fn expect_error(s: &mut UnixStream, code: ErrorCode) -> String {
    let r: ServerMessage = frame::read_frame(s, MAX_FRAME_LEN)
        .expect("a reply frame")
        .expect("a reply before close");
    match r.body {
        Response::Error(e) => {
            assert_eq!(e.code, code, "{e:?}");
            e.message
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Whether the agent closed the connection. Closing a Unix socket with
/// unread bytes in it resets the peer rather than ending the stream.
fn closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

fn still_serving(a: &TestAgent) {
    let o = a.run(&["ps", "-a"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("ID"));
}

#[test]
fn hostile_frames_on_the_api_socket() {
    let a = TestAgent::start();

    // Random bytes: bad magic, an error, then the connection is closed.
    let mut s = raw(&a);
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let m = expect_error(&mut s, ErrorCode::InvalidArgument);
    assert!(m.contains("magic"), "{m}");
    assert!(closed(&mut s));

    // An oversized frame is refused from its header alone.
    let mut s = raw(&a);
    raw_hello(&mut s);
    let h = Header {
        version: FRAME_VERSION,
        flags: 0,
        len: MAX_FRAME_LEN + 1,
    };
    s.write_all(&h.to_bytes()).unwrap();
    let m = expect_error(&mut s, ErrorCode::InvalidArgument);
    assert!(m.contains("exceeds"), "{m}");
    assert!(closed(&mut s));

    // An unknown framing version.
    let mut s = raw(&a);
    let h = Header {
        version: 77,
        flags: 0,
        len: 0,
    };
    s.write_all(&h.to_bytes()).unwrap();
    let m = expect_error(&mut s, ErrorCode::InvalidArgument);
    assert!(m.contains("version 77"), "{m}");

    // A well-framed but malformed payload: an error, and the connection
    // goes on.
    let mut s = raw(&a);
    raw_hello(&mut s);
    let junk = [0xffu8; 16];
    let h = Header {
        version: FRAME_VERSION,
        flags: 0,
        len: junk.len() as u32,
    };
    s.write_all(&h.to_bytes()).unwrap();
    s.write_all(&junk).unwrap();
    let m = expect_error(&mut s, ErrorCode::InvalidArgument);
    assert!(m.contains("malformed"), "{m}");
    frame::write_frame(
        &mut s,
        &ClientMessage {
            id: 9,
            body: Request::List { all: true },
        },
    )
    .unwrap();
    let r: ServerMessage = frame::read_frame(&mut s, MAX_FRAME_LEN).unwrap().unwrap();
    assert_eq!(r.id, 9);
    assert!(matches!(r.body, Response::List(_)), "{r:?}");

    // A truncated frame, then the client goes away.
    let mut s = raw(&a);
    raw_hello(&mut s);
    let full = frame::encode(&ClientMessage {
        id: 3,
        body: Request::Version,
    })
    .unwrap();
    s.write_all(&full[..full.len() - 1]).unwrap();
    drop(s);

    // No common API version.
    let mut s = raw(&a);
    frame::write_frame(
        &mut s,
        &ClientMessage {
            id: 1,
            body: Request::Hello {
                min_version: 99,
                max_version: 100,
                client: "future".into(),
            },
        },
    )
    .unwrap();
    let m = expect_error(&mut s, ErrorCode::InvalidArgument);
    assert!(m.contains("no common API version"), "{m}");

    // A request before hello.
    let mut s = raw(&a);
    frame::write_frame(
        &mut s,
        &ClientMessage {
            id: 4,
            body: Request::List { all: true },
        },
    )
    .unwrap();
    expect_error(&mut s, ErrorCode::InvalidArgument);

    still_serving(&a);
}

#[test]
fn unknown_ids_bad_names_and_missing_images() {
    let a = TestAgent::start();
    for (args, want) in [
        (vec!["inspect", "0123456789abcdef"], "not found"),
        (vec!["wait", "nosuchvm"], "not found"),
        (vec!["rm", "../../etc"], "invalid"),
        (vec!["logs", "a/b"], "invalid"),
        (
            vec!["run", "--rm", "no-such-image", "--", "true"],
            "no image \"no-such-image\"",
        ),
        (
            vec!["run", "--rm", "../busybox", "--", "true"],
            "invalid image",
        ),
        (
            vec!["run", "--name", "bad/name", "busybox", "--", "true"],
            "invalid name",
        ),
    ] {
        let o = a.run(&args);
        assert_eq!(o.status.code(), Some(125), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
    }
    // The failed creates left nothing behind.
    assert_eq!(stdout(&a.run(&["ps", "-a", "-q"])), "");
    still_serving(&a);
}

/// `vmlet … | head` closes vmlet's stdout early: vmlet ends quietly with
/// what SIGPIPE would give (141), never a panic.
#[test]
fn a_closed_stdout_ends_the_cli_quietly() {
    let a = TestAgent::start();
    for args in [&["version"][..], &["image", "ls"], &["pool"]] {
        let (rd, wr) = nix::unistd::pipe().unwrap();
        drop(rd);
        let o = a
            .vmlet()
            .args(args)
            .stdout(std::process::Stdio::from(wr))
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(141), "{args:?}: {}", stderr(&o));
        assert_eq!(stderr(&o), "", "{args:?}");
    }
    still_serving(&a);
}

#[test]
fn a_guest_that_never_says_hello_fails_the_start_and_is_cleaned_up() {
    // A boot timeout far below this machine's boot time: the guest cannot
    // say hello in time.
    let a = TestAgent::start_with(AgentOptions {
        boot_timeout: 0.5,
        ..Default::default()
    });
    let o = a.run(&["run", "--name", "slow", "busybox", "--", "echo", "hi"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(
        stderr(&o).contains("did not say hello within 0.5 s"),
        "{}",
        stderr(&o)
    );
    let psa = stdout(&a.run(&["ps", "-a"]));
    assert!(psa.contains("slow") && psa.contains("exited"), "{psa}");
    let id = psa
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    a.assert_no_processes(&id);
    assert_eq!(a.run(&["rm", "slow"]).status.code(), Some(0));
    still_serving(&a);
}

#[test]
fn references_that_try_to_leave_the_state_directory() {
    // Through the API, where the CLI cannot filter: NUL, newlines, slashes,
    // dot-dots, absolute paths, absurd lengths, non-ASCII.
    let a = TestAgent::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let long = "a".repeat(100_000);
    let refs = [
        "..",
        ".",
        "../../../../etc/passwd",
        "/etc/passwd",
        "a/../../b",
        "vms/../..",
        "a\0b",
        "\0",
        "a\nb",
        "%2e%2e%2f",
        "..\\..\\x",
        "é",
        "",
        long.as_str(),
    ];
    rt.block_on(async {
        let c = a.client().await;
        for r in refs {
            let shown = &r[..r.len().min(40)];
            for req in [
                Request::Inspect { vm: r.into() },
                Request::Logs {
                    vm: r.into(),
                    follow: false,
                },
                Request::Remove {
                    vm: r.into(),
                    force: true,
                },
                Request::Start { vm: r.into() },
                Request::ImageInspect { image: r.into() },
                Request::ImageRemove {
                    image: r.into(),
                    force: true,
                },
                Request::ImageImportBegin {
                    name: Some(r.into()),
                },
                Request::Create(vmlet_protocol::api::CreateSpec {
                    name: Some(r.into()),
                    image: "busybox".into(),
                    argv: vec!["true".into()],
                    ..Default::default()
                }),
                Request::Create(vmlet_protocol::api::CreateSpec {
                    image: r.into(),
                    argv: vec!["true".into()],
                    ..Default::default()
                }),
            ] {
                let what = format!("{req:?}");
                let what = &what[..what.len().min(80)];
                match c.call(req).await {
                    Err(vmlet_protocol::client::ClientError::Api(e)) => assert!(
                        matches!(e.code, ErrorCode::InvalidArgument | ErrorCode::NotFound),
                        "{shown:?}: {what}: {e:?}"
                    ),
                    other => panic!("{shown:?}: {what}: {other:?}"),
                }
            }
        }
    });
    // Nothing was created, inside the state directory or beside it.
    assert_eq!(stdout(&a.run(&["ps", "-a", "-q"])), "");
    let vms: Vec<_> = std::fs::read_dir(a.state_dir().join("vms"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(vms.is_empty(), "{vms:?}");
    let beside: Vec<_> = std::fs::read_dir(a.state_dir().parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !matches!(n.as_str(), "state" | "api.sock" | "vmletd.log"))
        .collect();
    assert!(beside.is_empty(), "{beside:?}");
    still_serving(&a);
}
