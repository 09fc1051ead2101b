//! sha256 throughput of [`Digester`], the hasher every cache miss runs over
//! the upstream body (on the flight's writer thread) before publishing.
//!
//! `update/<chunk>`: one `update` of a chunk on a long-lived digester (raw
//! hashing speed for that call size). `stream_16MiB/<chunk>`: a fresh
//! digester fed 16 MiB in chunks of that size, then finished, as a download
//! of a 16 MiB layer would be.
//!
//! Run: `cargo bench --bench digest`.

use std::hint::black_box;
use std::time::Duration;

use berth::registry::digest::Digester;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
const CHUNKS: &[usize] = &[4 * KIB, 64 * KIB, MIB, 16 * MIB];
const STREAM: usize = 16 * MIB;

fn data(len: usize) -> Vec<u8> {
    // Deterministic, incompressible-looking bytes (xorshift64).
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn label(size: usize) -> String {
    if size >= MIB {
        format!("{}MiB", size / MIB)
    } else {
        format!("{}KiB", size / KIB)
    }
}

fn update(c: &mut Criterion) {
    let buf = data(16 * MIB);
    let mut g = c.benchmark_group("digester/update");
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(3));
    for &chunk in CHUNKS {
        if chunk >= 16 * MIB {
            g.sample_size(20);
        }
        g.throughput(Throughput::Bytes(chunk as u64));
        g.bench_with_input(
            BenchmarkId::from_parameter(label(chunk)),
            &chunk,
            |b, &chunk| {
                let mut d = Digester::default();
                b.iter(|| d.update(black_box(&buf[..chunk])));
                black_box(d.finish());
            },
        );
    }
    g.finish();
}

fn stream(c: &mut Criterion) {
    let buf = data(STREAM);
    let mut g = c.benchmark_group("digester/stream_16MiB");
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(3));
    g.sample_size(20);
    g.throughput(Throughput::Bytes(STREAM as u64));
    for &chunk in CHUNKS {
        g.bench_with_input(
            BenchmarkId::from_parameter(label(chunk)),
            &chunk,
            |b, &chunk| {
                b.iter(|| {
                    let mut d = Digester::default();
                    for part in buf.chunks(chunk) {
                        d.update(black_box(part));
                    }
                    black_box(d.finish())
                });
            },
        );
    }
    g.finish();
}

criterion_group!(benches, update, stream);
criterion_main!(benches);
