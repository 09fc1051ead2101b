//! Flight tests: coalescing, resume, verification hold, slow bodies.

use super::*;
use crate::cache::provenance::Origin;
use crate::cache::Cache;
use crate::transfer::{Blame, Body, Fault};
use futures_util::StreamExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

fn cache(policy: Policy) -> (tempfile::TempDir, Cache) {
    let dir = tempfile::tempdir().unwrap();
    let mut cache = Cache::open(dir.path(), 1 << 30, Default::default()).unwrap();
    cache.flight_policy = policy;
    (dir, cache)
}

fn publish(cache: &Cache) -> Publish {
    cache.publisher(Origin {
        registry: "docker.io".parse().unwrap(),
        private: false,
    })
}

fn body(bytes: Vec<u8>, blame: Option<Blame>) -> Body {
    let size = Some(bytes.len() as u64);
    let stream = futures_util::stream::iter([Ok(Bytes::from(bytes))]).boxed();
    Body {
        size,
        stream,
        blame,
    }
}

async fn read_all(f: &Flight, size: u64) -> Result<Vec<u8>, std::io::Error> {
    let mut out = Vec::new();
    let mut s = std::pin::pin!(f.read(0, size));
    while let Some(b) = s.next().await {
        out.extend_from_slice(&b?);
    }
    Ok(out)
}

fn leader(j: Result<Joined, Error>) -> Arc<Flight> {
    match j.unwrap() {
        Joined::Leader(f) => f,
        _ => panic!("expected to start the flight"),
    }
}

/// An opener serving corrupt bytes first (blaming records it), then good ones.
fn corrupt_then_good(good: Vec<u8>, blamed: Arc<AtomicUsize>) -> Opener {
    let calls = Arc::new(AtomicUsize::new(0));
    Box::new(move |_offset| {
        let (good, blamed) = (good.clone(), blamed.clone());
        let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
        Box::pin(async move {
            let mut bytes = good;
            let blame: Option<Blame> = first.then(|| {
                bytes[0] ^= 0xff;
                Box::new(move |f: Fault| {
                    assert_eq!(f, Fault::Mismatch);
                    blamed.fetch_add(1, Ordering::SeqCst);
                    true
                }) as Blame
            });
            Ok(body(bytes, blame))
        })
    })
}

#[tokio::test]
async fn a_mismatch_within_the_hold_is_fetched_again_unseen() {
    let (_dir, cache) = cache(Policy {
        verify_hold: Duration::from_secs(5),
        ..Policy::default()
    });
    let good = b"the good bytes of a blob".to_vec();
    let digest = Digest::of(&good);
    let blamed = Arc::new(AtomicUsize::new(0));
    let opener = corrupt_then_good(good.clone(), blamed.clone());
    let f = leader(cache.flights.join(&digest, publish(&cache), || opener));
    let size = f.size().await.unwrap();
    assert_eq!(
        read_all(&f, size).await.unwrap(),
        good,
        "readers saw only good bytes"
    );
    assert_eq!(f.finished().await.unwrap(), good.len() as u64);
    assert_eq!(
        blamed.load(Ordering::SeqCst),
        1,
        "the bad source was blamed"
    );
    assert!(cache.index.contains(&digest));
}

#[tokio::test]
async fn a_mismatch_after_the_hold_fails_the_readers_and_blames_the_source() {
    let (_dir, cache) = cache(Policy {
        verify_hold: Duration::ZERO,
        ..Policy::default()
    });
    let good = b"the good bytes of another blob".to_vec();
    let digest = Digest::of(&good);
    let blamed = Arc::new(AtomicUsize::new(0));
    let opener = corrupt_then_good(good.clone(), blamed.clone());
    let f = leader(cache.flights.join(&digest, publish(&cache), || opener));
    // Not `f.size()`: the flight may have failed before it is asked.
    assert!(read_all(&f, good.len() as u64).await.is_err());
    assert!(matches!(
        f.finished().await,
        Err(Error::DigestMismatch { .. })
    ));
    assert_eq!(blamed.load(Ordering::SeqCst), 1);
    assert!(!cache.index.contains(&digest));
}

/// A download whose rate shows it cannot finish within the hold streams at
/// once: holding it could verify nothing and would only delay its readers.
#[tokio::test(start_paused = true)]
async fn a_download_that_will_outlast_the_hold_is_released_early() {
    let hold = Duration::from_secs(60);
    let (_dir, cache) = cache(Policy {
        verify_hold: hold,
        min_rate: 0,
        ..Policy::default()
    });
    let blob = pseudo(1 << 20);
    let digest = Digest::of(&blob);
    let b = Bytes::from(blob);
    let opener: Opener = Box::new(move |_| {
        let b = b.clone();
        Box::pin(async move {
            // 64 KiB now, 64 KiB ten seconds later, then a stall: at this
            // rate the 1 MiB blob needs 80 s, longer than the 60 s hold.
            let (first, second) = (b.slice(..64 << 10), b.slice(64 << 10..128 << 10));
            let stream = futures_util::stream::iter([Ok(first)])
                .chain(futures_util::stream::once(async move {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    Ok(second)
                }))
                .chain(futures_util::stream::pending())
                .boxed();
            Ok(Body {
                size: Some(b.len() as u64),
                stream,
                blame: None,
            })
        })
    });
    let start = tokio::time::Instant::now();
    let f = leader(cache.flights.join(&digest, publish(&cache), || opener));
    let size = f.size().await.unwrap();
    let mut s = std::pin::pin!(f.read(0, size));
    // The clock does not advance by itself while the writer and hasher
    // threads run: move it past the second chunk by hand, never to the hold.
    tokio::time::advance(Duration::from_secs(10)).await;
    let real = std::time::Instant::now();
    let first = loop {
        if let Some(item) = futures_util::FutureExt::now_or_never(s.next()) {
            break item.unwrap().unwrap();
        }
        assert!(
            real.elapsed() < Duration::from_secs(30),
            "no byte was released before the hold ended"
        );
        // Let the pump run, and the writer thread some real time.
        tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(5)))
            .await
            .unwrap();
    };
    assert!(!first.is_empty() && first.len() <= 128 << 10);
    assert!(start.elapsed() < hold);
}

#[tokio::test]
async fn a_trickling_body_moves_on_after_the_rate_window() {
    let (_dir, cache) = cache(Policy {
        verify_hold: Duration::ZERO,
        min_rate: 10_000,
        rate_window: Duration::from_millis(300),
    });
    let good = pseudo(64 * 1024);
    let digest = Digest::of(&good);
    let slow = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let (g, s2) = (good.clone(), slow.clone());
    let opener: Opener = Box::new(move |offset| {
        let (good, slow) = (g.clone(), s2.clone());
        let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
        Box::pin(async move {
            let size = Some(good.len() as u64);
            let rest = Bytes::from(good).slice(offset as usize..);
            if first {
                // One byte, then nothing more: a trickle.
                let stream = futures_util::stream::iter([Ok(rest.slice(..1))])
                    .chain(futures_util::stream::pending())
                    .boxed();
                let blame: Blame = Box::new(move |f| {
                    assert_eq!(f, Fault::TooSlow);
                    slow.fetch_add(1, Ordering::SeqCst);
                    true
                });
                Ok(Body {
                    size,
                    stream,
                    blame: Some(blame),
                })
            } else {
                let stream = futures_util::stream::iter([Ok(rest)]).boxed();
                Ok(Body {
                    size,
                    stream,
                    blame: None,
                })
            }
        })
    });
    let f = leader(cache.flights.join(&digest, publish(&cache), || opener));
    let done = tokio::time::timeout(Duration::from_secs(10), f.finished()).await;
    assert_eq!(done.expect("not held forever").unwrap(), good.len() as u64);
    assert_eq!(
        slow.load(Ordering::SeqCst),
        1,
        "the trickling source was blamed"
    );
}

#[tokio::test]
async fn a_panicking_download_leaves_the_table() {
    let (_dir, cache) = cache(Policy::default());
    let good = b"panic-free bytes".to_vec();
    let digest = Digest::of(&good);
    let opener: Opener = Box::new(|_| Box::pin(async { panic!("injected") }));
    let f = leader(cache.flights.join(&digest, publish(&cache), || opener));
    assert!(f.finished().await.is_err(), "readers get an error");
    assert!(
        cache.flights.get(&digest).is_none(),
        "the entry left the table"
    );
    let g = good.clone();
    let opener: Opener = Box::new(move |_| {
        let g = g.clone();
        Box::pin(async move { Ok(body(g, None)) })
    });
    let f = leader(cache.flights.join(&digest, publish(&cache), || opener));
    assert_eq!(f.finished().await.unwrap(), good.len() as u64);
}

fn pseudo(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}
