//! The log store's record parser: a log file with any content (a torn
//! write, a corrupted disk, a file left by another version) is opened, its
//! torn tail cut, and read to the end without a panic; what is read accounts
//! for every byte kept; a record appended afterwards reads back intact.
//! Then the same log is reopened with a tiny cap and rotated: the segment
//! files stay within the cap, and a reader from the start is told of
//! exactly the bytes it cannot read.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vmlet_fuzz::block_on;
use vmlet_fuzz::logstore::{Item, Log, LogLimits};
use vmlet_protocol::api::Stream;

/// Bytes of a record's header: stream, timestamp, length.
const REC_HDR: u64 = 13;

fn path() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        // tmpfs when there is one: this target writes a file per input.
        let dir = ["/dev/shm", "/tmp"]
            .into_iter()
            .map(PathBuf::from)
            .find(|d| d.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        dir.join(format!("vmlet-fuzz-log-{}", std::process::id()))
    })
}

fn read_all(log: &Log) -> Vec<(Stream, Vec<u8>)> {
    let mut r = log.reader(true);
    let mut out = Vec::new();
    while let Some(item) = block_on(r.next(false)).expect("read") {
        match item {
            Item::Record(rec) => out.push((rec.stream, rec.data)),
            // One segment starting at offset 0: nothing can be missing.
            Item::Dropped(d) => panic!("a single-file log reported {d:?} dropped"),
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let p = path();
    std::fs::write(p, data).expect("write the input");

    let sealed = Log::open_sealed(p).expect("open sealed");
    let kept = sealed.pos().len;
    assert!(kept <= data.len() as u64);
    let recs = read_all(&sealed);
    let accounted: u64 = recs.iter().map(|(_, d)| REC_HDR + d.len() as u64).sum();
    assert_eq!(
        accounted, kept,
        "records do not account for the valid length"
    );

    // Opening for writing cuts the torn tail and keeps the same records.
    let (log, mut w) = Log::open(p, LogLimits::UNLIMITED).expect("open");
    assert_eq!(log.pos().len, kept);
    assert_eq!(std::fs::metadata(p).expect("stat").len(), kept);
    w.append(Stream::Stderr, b"appended").expect("append");
    w.seal();
    let mut again = read_all(&log);
    assert_eq!(again.pop(), Some((Stream::Stderr, b"appended".to_vec())));
    assert_eq!(again, recs);

    // Rotation from there on: two segments of 256 bytes.
    let tiny = LogLimits {
        max_size: 512,
        max_files: 2,
    };
    let (log, mut w) = Log::open(p, tiny).expect("open capped");
    for i in 0..8u8 {
        let s = if i % 3 == 0 {
            Stream::Stderr
        } else {
            Stream::Stdout
        };
        w.append(s, &[b'a' + i; 100]).expect("append");
    }
    let written = w.stream_bytes();
    w.seal();
    let files = segments(p);
    let on_disk: u64 = files.iter().map(|f| f.1).sum();
    assert!(files.len() <= 2 && on_disk <= 512, "{files:?}");
    let mut r = log.reader(true);
    let (mut out, mut err) = (0u64, 0u64);
    while let Some(item) = block_on(r.next(false)).expect("read") {
        match item {
            Item::Record(rec) if rec.stream == Stream::Stdout => out += rec.data.len() as u64,
            Item::Record(rec) => err += rec.data.len() as u64,
            Item::Dropped(d) => {
                out += d.stdout;
                err += d.stderr;
            }
        }
    }
    assert_eq!((out, err), written, "dropped and read differ from written");
    for (f, _) in files {
        let _ = std::fs::remove_file(f);
    }
    let _ = std::fs::remove_file(p);
});

/// The log's files: `p` and its rotated segments beside it.
fn segments(p: &PathBuf) -> Vec<(PathBuf, u64)> {
    let name = p.file_name().expect("a name").to_string_lossy().into_owned();
    let dir = p.parent().expect("a directory");
    std::fs::read_dir(dir)
        .expect("list")
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n == name || n.starts_with(&format!("{name}."))
        })
        .map(|e| (e.path(), e.metadata().map(|m| m.len()).unwrap_or(0)))
        .collect()
}
