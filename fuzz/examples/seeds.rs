//! Writes the committed seed corpora (`corpus/<target>/seed-*`) from real
//! messages: the frames a session of `vmlet run` and one guest start carry,
//! and a log file as the agent writes it.
//!
//! `cargo +nightly run --manifest-path fuzz/Cargo.toml --example seeds`

use std::path::Path;

use vmlet_fuzz::logstore::{Log, LogLimits};
use vmlet_protocol::api::{
    AttachSpec, ClientMessage, CreateSpec, GuestBoot, Request, Response, ServerMessage, Stream,
};
use vmlet_protocol::frame::{encode, HEADER_LEN};
use vmlet_protocol::guest::{DiskSpec, GuestMessage, HostMessage, ProcessSpec};

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
}

fn frames<T: serde::Serialize>(msgs: &[T]) -> Vec<u8> {
    msgs.iter().flat_map(|m| encode(m).unwrap()).collect()
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");

    let client = |id, body| ClientMessage { id, body };
    let api = [
        client(
            0,
            Request::Hello {
                min_version: 1,
                max_version: 1,
                client: "vmlet".into(),
            },
        ),
        client(
            1,
            Request::Run(CreateSpec {
                image: "busybox".into(),
                argv: vec!["sh".into(), "-c".into(), "echo hi; exit 7".into()],
                env: vec!["A=b".into()],
                workdir: Some("/tmp".into()),
                stdin_open: true,
                auto_remove: true,
                memory_mib: Some(256),
                ..Default::default()
            }),
        ),
        client(
            2,
            Request::Attach(AttachSpec {
                vm: "0123456789ab".into(),
                stdin: true,
                stdout: true,
                stderr: true,
                replay: true,
            }),
        ),
        client(
            3,
            Request::Stdin {
                attach: 2,
                data: b"abc\n".to_vec(),
            },
        ),
        client(4, Request::CloseStdin { attach: 2 }),
        client(
            5,
            Request::Stop {
                vm: "web".into(),
                timeout_ms: 5000,
            },
        ),
        client(6, Request::List { all: true }),
        client(7, Request::Cancel { request: 2 }),
    ];
    let dir = root.join("frame_api");
    write(&dir, "session", &frames(&api));
    for (i, m) in api.iter().enumerate() {
        write(
            &dir,
            &format!("payload-{i}"),
            &encode(m).unwrap()[HEADER_LEN..],
        );
    }

    let guest = [
        GuestMessage::Hello {
            version: 1,
            boot: GuestBoot {
                kernel_us: 812_000,
                modules_us: 95_000,
                hello_us: 1_020_000,
            },
        },
        GuestMessage::Root(vmlet_protocol::api::RootTimings {
            disks_us: 10_000,
            layers_us: 6_000,
            writable_us: 25_000,
            dirs_us: 20_000,
            overlay_us: 24_000,
            inner_us: 8_000,
        }),
        GuestMessage::Started { pid: 2 },
        GuestMessage::Stdout(b"ready\n".to_vec()),
        GuestMessage::Stderr(b"warning\n".to_vec()),
        GuestMessage::Exited {
            code: Some(0),
            signal: None,
        },
        GuestMessage::Failed {
            message: "sh: not found".into(),
            code: 127,
        },
    ];
    let host = [
        HostMessage::Spec(ProcessSpec {
            layers: vec![DiskSpec {
                serial: "layer0".into(),
                fstype: "ext4".into(),
            }],
            writable: None,
            argv: vec!["echo".into(), "ready".into()],
            env: vec!["PATH=/usr/sbin:/usr/bin:/sbin:/bin".into()],
            workdir: None,
            stdin: false,
            hostname: "0123456789ab".into(),
            ..Default::default()
        }),
        HostMessage::Stdin(b"input\n".to_vec()),
        HostMessage::CloseStdin,
        HostMessage::Signal(15),
        HostMessage::Ack {
            stdout: 6,
            stderr: 0,
        },
        HostMessage::Resume {
            stdout: 6,
            stderr: 8,
        },
        HostMessage::ExitAck,
    ];
    let dir = root.join("frame_guest");
    write(&dir, "guest-session", &frames(&guest));
    write(&dir, "host-session", &frames(&host));
    for (i, m) in guest.iter().enumerate() {
        write(
            &dir,
            &format!("guest-payload-{i}"),
            &encode(m).unwrap()[HEADER_LEN..],
        );
    }
    for (i, m) in host.iter().enumerate() {
        write(
            &dir,
            &format!("host-payload-{i}"),
            &encode(m).unwrap()[HEADER_LEN..],
        );
    }

    // The roundtrip target reads a selector byte, then structure; real
    // payloads behind each selector are as good a start as any.
    let dir = root.join("roundtrip");
    let server = ServerMessage {
        id: 1,
        body: Response::Output {
            stream: Stream::Stdout,
            timestamp_ns: 1_700_000_000_000_000_000,
            data: b"hello\n".to_vec(),
        },
    };
    let picks: [(u8, Vec<u8>); 4] = [
        (0, encode(&api[1]).unwrap()),
        (1, encode(&server).unwrap()),
        (2, encode(&guest[0]).unwrap()),
        (3, encode(&host[0]).unwrap()),
    ];
    for (sel, f) in picks {
        let mut b = vec![sel];
        b.extend_from_slice(&f[HEADER_LEN..]);
        write(&dir, &format!("kind-{sel}"), &b);
    }

    let dir = root.join("logstore");
    std::fs::create_dir_all(&dir).unwrap();
    let tmp = std::env::temp_dir().join(format!("vmlet-seed-log-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let (_log, mut w) = Log::open(&tmp, LogLimits::UNLIMITED).unwrap();
    w.append(Stream::Stdout, b"ready\n").unwrap();
    w.append(Stream::Stderr, b"oops\n").unwrap();
    w.append(Stream::Stdout, &[0u8; 300]).unwrap();
    drop(w);
    let mut bytes = std::fs::read(&tmp).unwrap();
    std::fs::remove_file(&tmp).unwrap();
    write(&dir, "log", &bytes);
    // A torn tail: half a record header after the last record.
    bytes.extend_from_slice(&[1, 0, 0, 0]);
    write(&dir, "torn", &bytes);
}
