//! Retry policy: which outcomes are retried, how long to back off, and the retry budget.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::clock::nanos;
use crate::config::model::{RetryOn, RetryPolicy};

/// What one try produced, as the proxy reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered (response headers arrived). `grpc_status` is the `grpc-status`
    /// header of a trailers-only gRPC response, if any.
    Response {
        status: u16,
        grpc_status: Option<u32>,
    },
    /// The TCP (or TLS) connection could not be established.
    ConnectFailure,
    /// The upstream refused the stream (HTTP/2 `REFUSED_STREAM`): it never processed it.
    RefusedStream,
    /// The connection or stream was reset before the response headers.
    Reset,
    /// The try's deadline (`Attempt::deadline`) passed first.
    Timeout,
}

impl Outcome {
    /// A plain HTTP response.
    pub fn status(status: u16) -> Outcome {
        Outcome::Response {
            status,
            grpc_status: None,
        }
    }
}

/// `retryOn`, compiled to bits for a branch-cheap check.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct RetryConditions {
    bits: u16,
    codes: Box<[u16]>,
}

const FIVE_XX: u16 = 1 << 0;
const GATEWAY_ERROR: u16 = 1 << 1;
const CONNECT_FAILURE: u16 = 1 << 2;
const REFUSED_STREAM: u16 = 1 << 3;
const RESET: u16 = 1 << 4;
const RETRIABLE_4XX: u16 = 1 << 5;
const CANCELLED: u16 = 1 << 6;
const DEADLINE_EXCEEDED: u16 = 1 << 7;
const INTERNAL: u16 = 1 << 8;
const RESOURCE_EXHAUSTED: u16 = 1 << 9;
const UNAVAILABLE: u16 = 1 << 10;

impl RetryConditions {
    pub(crate) fn new(on: &RetryOn) -> Self {
        let flags = [
            (on.five_xx, FIVE_XX),
            (on.gateway_error, GATEWAY_ERROR),
            (on.connect_failure, CONNECT_FAILURE),
            (on.refused_stream, REFUSED_STREAM),
            (on.reset, RESET),
            (on.retriable_4xx, RETRIABLE_4XX),
            (on.cancelled, CANCELLED),
            (on.deadline_exceeded, DEADLINE_EXCEEDED),
            (on.internal, INTERNAL),
            (on.resource_exhausted, RESOURCE_EXHAUSTED),
            (on.unavailable, UNAVAILABLE),
        ];
        RetryConditions {
            bits: flags
                .iter()
                .filter(|(on, _)| *on)
                .fold(0, |b, (_, f)| b | f),
            codes: on.retriable_status_codes.clone().into_boxed_slice(),
        }
    }

    fn any(&self, bits: u16) -> bool {
        self.bits & bits != 0
    }

    /// Whether `outcome` is retryable under these conditions (Envoy's `x-envoy-retry-on`
    /// semantics): `5xx` covers any 5xx and every failure without a response; `gateway-error`
    /// covers 502/503/504 and failures without a response (the proxy answers them with 503/504);
    /// `reset` covers every failure without a response; `connect-failure` and `refused-stream`
    /// only their own; `retriable-4xx` is 409; gRPC conditions read `grpc-status`.
    pub(crate) fn matches(&self, outcome: Outcome) -> bool {
        let no_response = FIVE_XX | GATEWAY_ERROR | RESET;
        match outcome {
            Outcome::ConnectFailure => self.any(no_response | CONNECT_FAILURE),
            Outcome::RefusedStream => self.any(no_response | REFUSED_STREAM),
            Outcome::Reset | Outcome::Timeout => self.any(no_response),
            Outcome::Response {
                status,
                grpc_status,
            } => {
                (self.any(FIVE_XX) && (500..=599).contains(&status))
                    || (self.any(GATEWAY_ERROR) && matches!(status, 502..=504))
                    || (self.any(RETRIABLE_4XX) && status == 409)
                    || self.codes.contains(&status)
                    || grpc_status.is_some_and(|g| self.grpc_matches(g))
            }
        }
    }

    fn grpc_matches(&self, code: u32) -> bool {
        let bit = match code {
            1 => CANCELLED,
            4 => DEADLINE_EXCEEDED,
            8 => RESOURCE_EXHAUSTED,
            13 => INTERNAL,
            14 => UNAVAILABLE,
            _ => return false,
        };
        self.any(bit)
    }
}

/// A route's retry policy after defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ResolvedRetry {
    /// Retries after the first try.
    pub(crate) attempts: u32,
    pub(crate) per_try_timeout: Option<Duration>,
    pub(crate) conditions: RetryConditions,
}

/// The route's policy, or Istio's default when `retries` is absent: 2 retries on
/// `connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes` with 503 as
/// the retriable status code (what istiod programs into Envoy), no per-try timeout.
pub(crate) fn resolve(policy: Option<&RetryPolicy>) -> ResolvedRetry {
    let default;
    let policy = match policy {
        Some(policy) => policy,
        None => {
            default = RetryPolicy::istio_default();
            &default
        }
    };
    ResolvedRetry {
        attempts: policy.attempts,
        per_try_timeout: policy.per_try_timeout.filter(|d| !d.is_zero()),
        conditions: RetryConditions::new(&policy.retry_on),
    }
}

/// Exponential backoff with full jitter, as Envoy: retry `n` (1-based) waits a uniformly random
/// time in `[0, min(base × 2^(n-1), max))`.
pub(crate) fn backoff(
    retry: u32,
    base: Duration,
    max: Duration,
    rng: &mut fastrand::Rng,
) -> Duration {
    let base = nanos(base).max(1);
    let ceiling = base
        .saturating_mul(1u64 << retry.saturating_sub(1).min(32))
        .min(nanos(max).max(1));
    Duration::from_nanos(rng.u64(..ceiling))
}

/// How many retries a destination service may receive, beyond Istio (which has none): over a
/// sliding window, retries may not exceed `percent` of requests plus a floor of
/// `min_retries_per_second` per second of the window, so a failing service is not hammered
/// with retries while a quiet one can still retry a few requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryBudget {
    /// Retries allowed as a percentage of requests. Default 20.
    pub percent: u32,
    /// Retries always allowed per second of the window, whatever the request volume. Default 3.
    pub min_retries_per_second: u32,
    /// The sliding window, in whole seconds (1 to 60). Default 10 s.
    pub window: Duration,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            percent: 20,
            min_retries_per_second: 3,
            window: Duration::from_secs(10),
        }
    }
}

const MAX_WINDOW_SECONDS: usize = 60;

/// A per-second ring of counts; each slot packs `(second << 32) | count` into one atomic so a
/// slot is reset and counted without a lock.
#[derive(Debug)]
struct SecondsRing([AtomicU64; MAX_WINDOW_SECONDS]);

impl SecondsRing {
    fn new() -> Self {
        SecondsRing(std::array::from_fn(|_| AtomicU64::new(0)))
    }

    fn add(&self, second: u64) {
        let slot = &self.0[(second % MAX_WINDOW_SECONDS as u64) as usize];
        let _ = slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |packed| {
            Some(if packed >> 32 == second {
                packed.saturating_add(1)
            } else {
                (second << 32) | 1
            })
        });
    }

    /// The count over the `window` seconds ending with `second`.
    fn sum(&self, second: u64, window: u64) -> u64 {
        self.0
            .iter()
            .map(|slot| slot.load(Ordering::Acquire))
            .filter(|packed| {
                let s = packed >> 32;
                s <= second && second - s < window
            })
            .map(|packed| packed & u64::from(u32::MAX))
            .sum()
    }
}

/// One destination service's budget state, shared across snapshots.
#[derive(Debug)]
pub(crate) struct BudgetState {
    requests: SecondsRing,
    retries: SecondsRing,
}

impl BudgetState {
    pub(crate) fn new() -> Self {
        BudgetState {
            requests: SecondsRing::new(),
            retries: SecondsRing::new(),
        }
    }

    /// Counts a request (its first try) at tick `now`.
    pub(crate) fn record_request(&self, now: u64) {
        self.requests.add(second(now));
    }

    /// Grants and counts a retry if the budget allows one at tick `now`.
    pub(crate) fn try_retry(&self, budget: &RetryBudget, now: u64) -> bool {
        let second = second(now);
        let window = budget.window.as_secs().clamp(1, MAX_WINDOW_SECONDS as u64);
        let requests = self.requests.sum(second, window);
        let retries = self.retries.sum(second, window);
        let allowed = u64::from(budget.percent) * requests
            + 100 * u64::from(budget.min_retries_per_second) * window;
        if (retries + 1) * 100 > allowed {
            return false;
        }
        self.retries.add(second);
        true
    }
}

fn second(ticks: u64) -> u64 {
    ticks / 1_000_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(f: impl FnOnce(&mut RetryOn)) -> RetryConditions {
        let mut retry_on = RetryOn::default();
        f(&mut retry_on);
        RetryConditions::new(&retry_on)
    }

    #[test]
    fn each_retry_on_condition_matches_its_outcomes() {
        use Outcome::*;
        let s = Outcome::status;
        let grpc = |code| Response {
            status: 200,
            grpc_status: Some(code),
        };
        let five_xx = on(|r| r.five_xx = true);
        let gateway = on(|r| r.gateway_error = true);
        let connect = on(|r| r.connect_failure = true);
        let refused = on(|r| r.refused_stream = true);
        let reset = on(|r| r.reset = true);
        let four_xx = on(|r| r.retriable_4xx = true);
        let codes = on(|r| r.retriable_status_codes = vec![418, 503]);
        let unavailable = on(|r| r.unavailable = true);
        let cancelled = on(|r| r.cancelled = true);
        let deadline = on(|r| r.deadline_exceeded = true);
        let internal = on(|r| r.internal = true);
        let exhausted = on(|r| r.resource_exhausted = true);
        let cases: Vec<(&str, &RetryConditions, Outcome, bool)> = vec![
            ("5xx 500", &five_xx, s(500), true),
            ("5xx 503", &five_xx, s(503), true),
            ("5xx 404", &five_xx, s(404), false),
            ("5xx connect", &five_xx, ConnectFailure, true),
            ("5xx reset", &five_xx, Reset, true),
            ("5xx timeout", &five_xx, Timeout, true),
            ("5xx refused", &five_xx, RefusedStream, true),
            ("gw 502", &gateway, s(502), true),
            ("gw 503", &gateway, s(503), true),
            ("gw 504", &gateway, s(504), true),
            ("gw 500", &gateway, s(500), false),
            ("gw connect", &gateway, ConnectFailure, true),
            ("connect connect", &connect, ConnectFailure, true),
            ("connect reset", &connect, Reset, false),
            ("connect 503", &connect, s(503), false),
            ("refused refused", &refused, RefusedStream, true),
            ("refused connect", &refused, ConnectFailure, false),
            ("reset reset", &reset, Reset, true),
            ("reset timeout", &reset, Timeout, true),
            ("reset connect", &reset, ConnectFailure, true),
            ("reset 503", &reset, s(503), false),
            ("4xx 409", &four_xx, s(409), true),
            ("4xx 404", &four_xx, s(404), false),
            ("codes 418", &codes, s(418), true),
            ("codes 503", &codes, s(503), true),
            ("codes 500", &codes, s(500), false),
            ("codes connect", &codes, ConnectFailure, false),
            ("unavailable 14", &unavailable, grpc(14), true),
            ("unavailable 13", &unavailable, grpc(13), false),
            ("cancelled 1", &cancelled, grpc(1), true),
            ("deadline 4", &deadline, grpc(4), true),
            ("internal 13", &internal, grpc(13), true),
            ("exhausted 8", &exhausted, grpc(8), true),
            ("unavailable plain 503", &unavailable, s(503), false),
        ];
        for (name, conditions, outcome, want) in cases {
            assert_eq!(conditions.matches(outcome), want, "{name}");
        }
    }

    #[test]
    fn absent_retries_resolve_to_istios_default() {
        let policy = resolve(None);
        assert_eq!(policy.attempts, 2);
        assert_eq!(policy.per_try_timeout, None);
        assert!(policy.conditions.matches(Outcome::ConnectFailure));
        assert!(policy.conditions.matches(Outcome::RefusedStream));
        assert!(policy.conditions.matches(Outcome::status(503)));
        assert!(!policy.conditions.matches(Outcome::status(500)));
        assert!(!policy.conditions.matches(Outcome::Reset));
        assert!(policy.conditions.matches(Outcome::Response {
            status: 200,
            grpc_status: Some(14)
        }));
    }

    #[test]
    fn backoff_is_full_jitter_below_an_exponential_ceiling() {
        let mut rng = fastrand::Rng::with_seed(7);
        let base = Duration::from_millis(25);
        let max = Duration::from_millis(250);
        for (retry, ceiling) in [(1, 25), (2, 50), (3, 100), (4, 200), (5, 250), (40, 250)] {
            let mut longest = Duration::ZERO;
            for _ in 0..1_000 {
                let d = backoff(retry, base, max, &mut rng);
                assert!(d < Duration::from_millis(ceiling), "retry {retry}: {d:?}");
                longest = longest.max(d);
            }
            // Full jitter spreads over the whole range.
            assert!(
                longest > Duration::from_millis(ceiling) * 9 / 10,
                "retry {retry}"
            );
        }
    }

    #[test]
    fn budget_allows_percent_of_requests_plus_floor() {
        let budget = RetryBudget::default();
        let state = BudgetState::new();
        let t = 5_000_000_000; // 5 s
                               // With no requests, the floor alone: 3/s × 10 s.
        let floor = (0..100).filter(|_| state.try_retry(&budget, t)).count();
        assert_eq!(floor, 30);
        for _ in 0..1_000 {
            state.record_request(t);
        }
        let more = (0..1_000).filter(|_| state.try_retry(&budget, t)).count();
        assert_eq!(more, 200);
        // Eleven seconds later the window has moved past all of it.
        let later = t + 11_000_000_000;
        let fresh = (0..100).filter(|_| state.try_retry(&budget, later)).count();
        assert_eq!(fresh, 30);
    }
}
