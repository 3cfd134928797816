//! Framing costs on the hot paths: a full 64 KiB stdout chunk from a guest
//! (the largest frame the data path carries), and a small API request.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use vmlet_protocol::api::{ClientMessage, Request};
use vmlet_protocol::frame::{self, HEADER_LEN, MAX_CHUNK};
use vmlet_protocol::guest::{GuestMessage, MAX_GUEST_FRAME};
use vmlet_protocol::MAX_FRAME_LEN;

fn stdout_chunk(c: &mut Criterion) {
    let msg = GuestMessage::Stdout((0..MAX_CHUNK).map(|i| i as u8).collect());
    let buf = frame::encode(&msg).unwrap();
    let mut g = c.benchmark_group("stdout-64KiB");
    g.throughput(Throughput::Bytes(MAX_CHUNK as u64));
    g.bench_function("encode", |b| {
        b.iter(|| frame::encode(black_box(&msg)).unwrap())
    });
    g.bench_function("decode", |b| {
        b.iter(|| frame::decode::<GuestMessage>(black_box(&buf[HEADER_LEN..])).unwrap())
    });
    g.bench_function("read_frame", |b| {
        b.iter(|| {
            frame::read_frame::<_, GuestMessage>(&mut black_box(&buf[..]), MAX_GUEST_FRAME)
                .unwrap()
                .unwrap()
        })
    });
    g.bench_function("read_frame-async", |b| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        b.iter_batched(
            || &buf[..],
            |mut rd| {
                rt.block_on(vmlet_protocol::aio::read_frame::<_, GuestMessage>(
                    &mut rd,
                    MAX_GUEST_FRAME,
                ))
                .unwrap()
                .unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn small_request(c: &mut Criterion) {
    let msg = ClientMessage {
        id: 42,
        body: Request::Inspect {
            vm: "0123456789abcdef".into(),
        },
    };
    let buf = frame::encode(&msg).unwrap();
    let mut g = c.benchmark_group("api-inspect");
    g.bench_function("encode", |b| {
        b.iter(|| frame::encode(black_box(&msg)).unwrap())
    });
    g.bench_function("decode", |b| {
        b.iter(|| frame::decode::<ClientMessage>(black_box(&buf[HEADER_LEN..])).unwrap())
    });
    g.bench_function("read_frame", |b| {
        b.iter(|| {
            frame::read_frame::<_, ClientMessage>(&mut black_box(&buf[..]), MAX_FRAME_LEN)
                .unwrap()
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, stdout_chunk, small_request);
criterion_main!(benches);
