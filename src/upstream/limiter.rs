//! A bandwidth cap shared by all downloads from one endpoint: each chunk
//! books its transfer time on a shared schedule and waits for its slot.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{BoxStream, StreamExt};

use crate::error::Error;

/// Bytes per second, shared.
pub struct Limiter {
    rate: u64,
    /// When the link is next free.
    next: Mutex<Instant>,
}

impl Limiter {
    /// A limiter for `rate` bytes per second.
    pub fn new(rate: u64) -> Limiter {
        Limiter {
            rate: rate.max(1),
            next: Mutex::new(Instant::now()),
        }
    }

    /// How long to wait before `n` more bytes may pass.
    fn book(&self, n: usize) -> Duration {
        let cost = Duration::from_secs_f64(n as f64 / self.rate as f64);
        let mut next = self.next.lock().expect("limiter lock");
        let now = Instant::now();
        // Bank at most 100 ms of idle credit (a small burst).
        let floor = now.checked_sub(Duration::from_millis(100)).unwrap_or(now);
        let start = (*next).max(floor);
        *next = start + cost;
        next.saturating_duration_since(now)
    }

    /// Pace a stream.
    pub fn throttle(
        self: Arc<Self>,
        stream: BoxStream<'static, Result<Bytes, Error>>,
    ) -> BoxStream<'static, Result<Bytes, Error>> {
        stream
            .then(move |chunk| {
                let me = self.clone();
                async move {
                    if let Ok(b) = &chunk {
                        let wait = me.book(b.len());
                        if !wait.is_zero() {
                            tokio::time::sleep(wait).await;
                        }
                    }
                    chunk
                }
            })
            .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn paces_to_the_rate() {
        let l = Arc::new(Limiter::new(1 << 20));
        let chunks: Vec<Result<Bytes, Error>> = (0..8)
            .map(|_| Ok(Bytes::from(vec![0u8; 64 << 10])))
            .collect();
        let started = Instant::now();
        let n: usize = l
            .throttle(futures_util::stream::iter(chunks).boxed())
            .map(|c| c.unwrap().len())
            .fold(0, |a, b| async move { a + b })
            .await;
        assert_eq!(n, 512 << 10);
        // 512 KiB at 1 MiB/s takes about half a second (minus 100 ms of credit).
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );
    }
}
