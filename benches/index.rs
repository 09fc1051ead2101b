//! The in-memory LRU index ([`Index`]) with 100,000 published entries:
//! lookups (hit, miss, `contains`), an insert that evicts the least recent
//! entry (steady-state churn of a full cache), and rebuilding the index from
//! a 100k-entry scan, which is what berth does at start before it listens.
//! No pins: every entry is in the LRU.
//!
//! Run: `cargo bench --bench index`.

use std::collections::HashSet;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use berth::cache::index::Index;
use berth::cache::store::{Scanned, Store};
use berth::registry::Digest;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

const ENTRIES: usize = 100_000;
const SIZE: u64 = 4096;

fn digest(i: usize) -> Digest {
    let mut raw = [0u8; 32];
    raw[..8].copy_from_slice(&(i as u64).to_le_bytes());
    raw[8..16].copy_from_slice(&(i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
    Digest::from_sha256(raw)
}

fn scanned(digests: &[Digest]) -> Vec<Scanned> {
    let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    digests
        .iter()
        .enumerate()
        .map(|(i, d)| Scanned {
            digest: d.clone(),
            size: SIZE,
            ino: i as u64 + 1,
            last_used: base + Duration::from_secs(i as u64),
        })
        .collect()
}

fn index(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(Store::open(dir.path()).expect("store"));
    // Twice as many digests as fit: the second half are never loaded, so
    // they are misses, and inserting them churns the LRU.
    let digests: Vec<Digest> = (0..2 * ENTRIES).map(digest).collect();
    let capacity = ENTRIES as u64 * SIZE;

    let idx = Arc::new(Index::new(capacity, store.clone()));
    idx.load(scanned(&digests[..ENTRIES]), HashSet::new());
    assert_eq!(idx.len(), ENTRIES as u64);

    let mut g = c.benchmark_group("index_100k");
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(3));

    let mut i = 0usize;
    g.bench_function("get_hit", |b| {
        b.iter(|| {
            i = (i + 7919) % ENTRIES;
            black_box(idx.get(&digests[i]))
        })
    });
    let mut i = 0usize;
    g.bench_function("get_miss", |b| {
        b.iter(|| {
            i = (i + 7919) % ENTRIES;
            black_box(idx.get(&digests[ENTRIES + i]))
        })
    });
    let mut i = 0usize;
    g.bench_function("contains", |b| {
        b.iter(|| {
            i = (i + 7919) % ENTRIES;
            black_box(idx.contains(&digests[i]))
        })
    });

    // Each insert adds a digest that is not in the full index and evicts the
    // least recent one (the eviction listener's unlink finds no file here).
    let churn = Arc::new(Index::new(capacity, store.clone()));
    churn.load(scanned(&digests[..ENTRIES]), HashSet::new());
    let mut next = ENTRIES;
    g.bench_function("insert_evict", |b| {
        b.iter(|| {
            let d = digests[next % digests.len()].clone();
            next += 1;
            churn.insert(d, SIZE, next as u64);
        })
    });
    g.finish();

    let mut g = c.benchmark_group("index_load");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    g.bench_function("load_100k", |b| {
        b.iter_batched(
            || scanned(&digests[..ENTRIES]),
            |s| {
                let idx = Arc::new(Index::new(capacity, store.clone()));
                idx.load(s, HashSet::new());
                black_box(idx.len())
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, index);
criterion_main!(benches);
