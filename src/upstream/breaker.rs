//! A circuit breaker per endpoint. It opens at once on failures that cost
//! real time or say the endpoint is gone (connect timeouts and refusals, a
//! connection dropped again on the immediate retry, refused credentials, a
//! 429 for its `Retry-After`) and after a run of 5xx answers; one dropped
//! connection or one reset does not open it (the request is retried on a new
//! connection first, see `Endpoint::send`). While open the endpoint is
//! skipped for a backoff that doubles (with jitter) up to a cap; then one
//! request probes it and success closes the breaker. A dead hub costs one
//! timeout, not one per blob.
//!
//! When every endpoint of a registry is open, the registry is not declared
//! down for the rest of the backoff: one request at a time is let through as
//! a half-open probe ([`Breaker::admit`] with `last_resort`), so a registry
//! whose only endpoint hiccuped answers the very next request, and requests
//! fail fast only while a probe is actually failing. Not after a timeout
//! (each probe would cost the whole timeout: the backoff is what saves that
//! time, e.g. for an offline node serving stale tags) nor a 429.
//!
//! An [`Admission`] that is dropped without a verdict (its request was
//! cancelled: a client went away mid-probe) gives the probe back, so a
//! cancelled probe can never leave an endpoint skipped forever.

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
    /// Opened by a timeout or a 429: even last-resort probes wait for the
    /// backoff (a probe would cost a whole timeout, or defy `Retry-After`).
    patient: bool,
}

/// The breaker. Its mutex is held only for a few field updates.
#[derive(Debug, Default)]
pub struct Breaker {
    state: Mutex<State>,
}

/// What kind of failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Could not connect (refused, unreachable), or the connection was
    /// dropped again on the immediate retry: cheap to find out again.
    Transport,
    /// A connect or read timeout: finding out again costs the whole timeout.
    Timeout,
    /// 5xx, a protocol error, or bytes that failed verification.
    Server,
    /// Refused our credentials.
    Denied,
    /// 429: back off for this long.
    Throttled(Option<Duration>),
}

/// Permission to send one request to an endpoint. Report the outcome with
/// [`Admission::success`] or [`Admission::failure`]; dropping it without
/// either (cancellation) releases a probe slot it held.
#[must_use = "report the request's outcome"]
pub struct Admission<'a> {
    breaker: &'a Breaker,
    probe: bool,
}

impl Admission<'_> {
    /// The endpoint answered (any status that is not a failure).
    pub fn success(self) {
        self.breaker.success();
        std::mem::forget(self);
    }

    /// The endpoint failed.
    pub fn failure(self, f: Failure) {
        self.breaker.failure(f);
        std::mem::forget(self);
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if self.probe {
            self.breaker.state.lock().expect("breaker lock").probing = false;
        }
    }
}

impl Breaker {
    /// Whether a request may use the endpoint now. After the backoff one
    /// caller is let through as the probe. With `last_resort` (every
    /// endpoint of the registry is open) one probe at a time is let through
    /// before the backoff ends too, unless the upstream throttled us.
    pub fn admit(&self, last_resort: bool) -> Option<Admission<'_>> {
        let mut s = self.state.lock().expect("breaker lock");
        let probe = match s.open_until {
            None => false,
            Some(_) if s.probing => return None,
            // During the backoff only a last-resort probe, and not after a timeout or 429.
            Some(t) if Instant::now() < t && (!last_resort || s.patient) => return None,
            Some(_) => true,
        };
        s.probing |= probe;
        Some(Admission {
            breaker: self,
            probe,
        })
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
            Failure::Transport | Failure::Timeout | Failure::Denied => Some(backoff(s.opened)),
            Failure::Server if s.failures >= SERVER_ERRORS_TO_OPEN || s.open_until.is_some() => {
                Some(backoff(s.opened))
            }
            Failure::Server => None,
        };
        s.patient = matches!(f, Failure::Throttled(_) | Failure::Timeout);
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

    fn expire(b: &Breaker) {
        b.state.lock().unwrap().open_until = Some(Instant::now() - Duration::from_millis(1));
    }

    #[test]
    fn transport_failure_opens_at_once_then_one_probe() {
        let b = Breaker::default();
        b.admit(false).unwrap().failure(Failure::Transport);
        assert!(b.is_open() && b.admit(false).is_none());
        expire(&b);
        let probe = b.admit(false).expect("one probe");
        assert!(b.admit(false).is_none(), "only one probe at a time");
        probe.success();
        assert!(b.admit(false).is_some() && !b.is_open());
    }

    #[test]
    fn server_errors_open_after_a_run() {
        let b = Breaker::default();
        b.admit(false).unwrap().failure(Failure::Server);
        b.admit(false).unwrap().failure(Failure::Server);
        b.admit(false).unwrap().failure(Failure::Server);
        assert!(b.admit(false).is_none());
    }

    #[test]
    fn a_last_resort_probe_goes_through_during_the_backoff_one_at_a_time() {
        let b = Breaker::default();
        b.admit(false).unwrap().failure(Failure::Transport);
        assert!(
            b.admit(false).is_none(),
            "skipped while other endpoints exist"
        );
        let probe = b.admit(true).expect("the only endpoint is probed at once");
        assert!(b.admit(true).is_none(), "one probe at a time");
        probe.success();
        assert!(!b.is_open());
    }

    #[test]
    fn a_throttled_endpoint_is_not_probed_before_retry_after() {
        let b = Breaker::default();
        b.admit(false)
            .unwrap()
            .failure(Failure::Throttled(Some(Duration::from_secs(30))));
        assert!(b.admit(true).is_none());
    }

    #[test]
    fn a_timed_out_endpoint_is_not_probed_before_its_backoff() {
        let b = Breaker::default();
        b.admit(false).unwrap().failure(Failure::Timeout);
        assert!(
            b.admit(true).is_none(),
            "a probe would cost a whole timeout"
        );
    }

    #[test]
    fn a_cancelled_probe_gives_its_slot_back() {
        let b = Breaker::default();
        b.admit(false).unwrap().failure(Failure::Transport);
        expire(&b);
        drop(b.admit(false).expect("probe"));
        assert!(
            b.admit(false).is_some(),
            "a dropped probe does not block the endpoint"
        );
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
