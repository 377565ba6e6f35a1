//! Time in the engine: the caller's clock, passed in.
//!
//! Every engine call that depends on time takes `now: Instant` from the caller (the proxy
//! passes `Instant::now()`, tests pass instants they construct), so there is no hidden clock and
//! every behaviour is deterministic under test. Shared state stores times as nanoseconds since
//! the engine's epoch so it fits in atomics.

use std::time::{Duration, Instant};

/// The instant the first snapshot was built; kept across reloads so stored ticks stay valid.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Epoch(Instant);

impl Epoch {
    pub(crate) fn new(now: Instant) -> Self {
        Epoch(now)
    }

    /// Nanoseconds since the epoch; instants before it count as the epoch.
    pub(crate) fn ticks(self, now: Instant) -> u64 {
        nanos(now.saturating_duration_since(self.0))
    }
}

/// A duration in nanoseconds, saturating (u64 nanoseconds last 584 years).
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
