//! The log store's record parser: a log file with any content (a torn
//! write, a corrupted disk, a file left by another version) is opened, its
//! torn tail cut, and read to the end without a panic; what is read accounts
//! for every byte kept; a record appended afterwards reads back intact.
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
    let _ = std::fs::remove_file(p);
});
