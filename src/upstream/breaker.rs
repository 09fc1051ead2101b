//! A circuit breaker per endpoint: after a transport failure (refused,
//! timeout) or a run of 5xx answers, the endpoint is skipped for a backoff
//! period that doubles (with jitter) up to a cap; then one request probes it
//! and success closes the breaker. A dead hub costs one timeout, not one per
//! blob. A 429 opens it for the upstream's `Retry-After`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Consecutive 5xx answers that open the breaker.
const SERVER_ERRORS_TO_OPEN: u32 = 3;
/// First backoff.
const BASE_BACKOFF: Duration = Duration::from_secs(5);
/// Longest backoff.
const MAX_BACKOFF: Duration = Duration::from_secs(120);
/// Backoff for a 429 without `Retry-After`.
const DEFAULT_THROTTLE: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct State {
    /// Consecutive failures.
    failures: u32,
    /// Skipped until then.
    open_until: Option<Instant>,
    /// How many times it opened in a row (drives the backoff).
    opened: u32,
    /// A probe is in flight (half-open): others keep skipping.
    probing: bool,
}

/// The breaker. Its mutex is held only for a few field updates.
#[derive(Debug, Default)]
pub struct Breaker {
    state: Mutex<State>,
}

/// What kind of failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Could not connect, or timed out.
    Transport,
    /// 5xx or protocol error.
    Server,
    /// Refused our credentials.
    Denied,
    /// 429: back off for this long.
    Throttled(Option<Duration>),
}

impl Breaker {
    /// Whether a request may use the endpoint now. After the backoff one
    /// caller is let through as the probe.
    pub fn allow(&self) -> bool {
        let mut s = self.state.lock().expect("breaker lock");
        match s.open_until {
            None => true,
            Some(t) if Instant::now() < t => false,
            Some(_) if s.probing => false,
            Some(_) => {
                s.probing = true;
                true
            }
        }
    }

    /// Whether the endpoint is being skipped right now.
    pub fn is_open(&self) -> bool {
        let s = self.state.lock().expect("breaker lock");
        s.open_until.is_some_and(|t| Instant::now() < t)
    }

    /// The endpoint answered (any status that is not a failure).
    pub fn success(&self) {
        let mut s = self.state.lock().expect("breaker lock");
        *s = State::default();
    }

    /// The endpoint failed.
    pub fn failure(&self, f: Failure) {
        let mut s = self.state.lock().expect("breaker lock");
        s.failures += 1;
        s.probing = false;
        let open_for = match f {
            Failure::Throttled(after) => Some(
                after
                    .unwrap_or(DEFAULT_THROTTLE)
                    .min(Duration::from_secs(3600)),
            ),
            Failure::Transport | Failure::Denied => Some(backoff(s.opened)),
            Failure::Server if s.failures >= SERVER_ERRORS_TO_OPEN || s.open_until.is_some() => {
                Some(backoff(s.opened))
            }
            Failure::Server => None,
        };
        if let Some(d) = open_for {
            s.opened = s.opened.saturating_add(1);
            s.open_until = Some(Instant::now() + d);
        }
    }
}

fn backoff(opened: u32) -> Duration {
    let exp = BASE_BACKOFF
        .saturating_mul(1 << opened.min(6))
        .min(MAX_BACKOFF);
    // +-20% jitter so a fleet of nodes does not probe a recovering hub at once.
    let jitter = 0.8 + rand::random::<f64>() * 0.4;
    exp.mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_failure_opens_at_once_then_one_probe() {
        let b = Breaker::default();
        assert!(b.allow());
        b.failure(Failure::Transport);
        assert!(b.is_open() && !b.allow());
        // Pretend the backoff passed.
        b.state.lock().unwrap().open_until = Some(Instant::now() - Duration::from_millis(1));
        assert!(b.allow(), "one probe");
        assert!(!b.allow(), "only one probe at a time");
        b.success();
        assert!(b.allow() && !b.is_open());
    }

    #[test]
    fn server_errors_open_after_a_run() {
        let b = Breaker::default();
        b.failure(Failure::Server);
        b.failure(Failure::Server);
        assert!(b.allow());
        b.failure(Failure::Server);
        assert!(!b.allow());
    }

    #[test]
    fn throttle_uses_retry_after_and_backoff_grows() {
        let b = Breaker::default();
        b.failure(Failure::Throttled(Some(Duration::from_secs(30))));
        let until = b.state.lock().unwrap().open_until.unwrap();
        assert!(until > Instant::now() + Duration::from_secs(29));
        assert!(backoff(0) <= Duration::from_secs(6) && backoff(10) <= MAX_BACKOFF.mul_f64(1.2));
    }
}
