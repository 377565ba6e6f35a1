//! Why a request could not be carried out, in Envoy's response-flag vocabulary.
//!
//! Each error tells the proxy what its local reply must be (status, flag) and what the next
//! layer needs to know (retryable or not, and who caused it), as pingora's error type does.

use std::fmt;

/// A failure the proxy turns into a local reply.
#[derive(thiserror::Error, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineError {
    /// No virtual host or route for the request (`NR`, 404).
    #[error("no route matched the request")]
    NoRoute,
    /// The route's destination does not exist (yet): its subset is defined by no
    /// DestinationRule, or its host is no service (503 `NR`, as Envoy answered a route to a
    /// cluster it does not have before it named that `NC`). Not retried: another try would find
    /// the same.
    #[error("no cluster found for the route's destination")]
    ClusterNotFound,
    /// The chosen destination has no endpoints at all (`UH`, 503).
    #[error("no healthy upstream")]
    NoHealthyUpstream,
    /// Connecting to the endpoint failed (`UF`, 503).
    #[error("upstream connect failure")]
    ConnectFailure,
    /// The upstream reset or refused the stream before a response (`UC`, 503).
    #[error("upstream connection termination")]
    UpstreamReset,
    /// A try ran out of its `perTryTimeout` and was not retried (`UT`, 504).
    #[error("upstream per-try timeout")]
    PerTryTimeout,
    /// The route `timeout` expired, retries and backoff included (`UT`, 504).
    #[error("upstream request timeout")]
    RequestTimeout,
    /// A connection-pool limit was reached; the request fails fast instead of queueing (`UO`, 503).
    #[error("upstream overflow: connection pool limit reached")]
    Overflow,
    /// Retries were used up and the last try failed without a response (`URX` plus the last
    /// failure's flag).
    #[error("retry limit exceeded, last try: {0}")]
    RetriesExhausted(TryFailure),
    /// `fault.abort` chose this request (`FI`).
    #[error("fault injected: abort with {status}")]
    FaultAbort { status: u16 },
}

/// How a try failed when it produced no HTTP response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TryFailure {
    ConnectFailure,
    Reset,
    Timeout,
}

impl fmt::Display for TryFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TryFailure::ConnectFailure => "connect failure",
            TryFailure::Reset => "reset",
            TryFailure::Timeout => "timeout",
        })
    }
}

/// Who caused a failure, so telemetry and the proxy can tell them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// The destination (or its network) misbehaved.
    Upstream,
    /// The client asked for something the mesh cannot serve.
    Downstream,
    /// Mesh policy decided (limits, injected faults).
    Mesh,
}

impl EngineError {
    /// The status of the local reply.
    pub fn status(&self) -> u16 {
        match self {
            EngineError::NoRoute => 404,
            EngineError::PerTryTimeout | EngineError::RequestTimeout => 504,
            EngineError::RetriesExhausted(TryFailure::Timeout) => 504,
            EngineError::FaultAbort { status } => *status,
            _ => 503,
        }
    }

    /// The response flags this error sets in the access log.
    pub fn flags(&self) -> ResponseFlags {
        match self {
            EngineError::NoRoute | EngineError::ClusterNotFound => ResponseFlags::NR,
            EngineError::NoHealthyUpstream => ResponseFlags::UH,
            EngineError::ConnectFailure => ResponseFlags::UF,
            EngineError::UpstreamReset => ResponseFlags::UC,
            EngineError::PerTryTimeout | EngineError::RequestTimeout => ResponseFlags::UT,
            EngineError::Overflow => ResponseFlags::UO,
            EngineError::RetriesExhausted(last) => ResponseFlags::URX | last.flag(),
            EngineError::FaultAbort { .. } => ResponseFlags::FI,
        }
    }

    /// Whether another try (on another endpoint) could succeed. The engine has already applied
    /// the retry policy; this is for layers above it.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            EngineError::ConnectFailure | EngineError::UpstreamReset | EngineError::PerTryTimeout
        )
    }

    pub fn cause(&self) -> Cause {
        match self {
            EngineError::NoRoute => Cause::Downstream,
            EngineError::Overflow
            | EngineError::FaultAbort { .. }
            | EngineError::ClusterNotFound => Cause::Mesh,
            _ => Cause::Upstream,
        }
    }
}

impl TryFailure {
    fn flag(self) -> ResponseFlags {
        match self {
            TryFailure::ConnectFailure => ResponseFlags::UF,
            TryFailure::Reset => ResponseFlags::UC,
            TryFailure::Timeout => ResponseFlags::UT,
        }
    }
}

/// A set of Envoy response flags, displayed as Envoy does (`UF,URX`).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ResponseFlags(u16);

impl ResponseFlags {
    pub const NONE: ResponseFlags = ResponseFlags(0);
    /// No healthy upstream.
    pub const UH: ResponseFlags = ResponseFlags(1 << 0);
    /// Upstream connection failure.
    pub const UF: ResponseFlags = ResponseFlags(1 << 1);
    /// Upstream overflow (pool limit, retry overflow or retry budget).
    pub const UO: ResponseFlags = ResponseFlags(1 << 2);
    /// Upstream retry limit exceeded.
    pub const URX: ResponseFlags = ResponseFlags(1 << 3);
    /// Upstream request timeout.
    pub const UT: ResponseFlags = ResponseFlags(1 << 4);
    /// No route.
    pub const NR: ResponseFlags = ResponseFlags(1 << 5);
    /// Fault injected: abort.
    pub const FI: ResponseFlags = ResponseFlags(1 << 6);
    /// Fault injected: delay.
    pub const DI: ResponseFlags = ResponseFlags(1 << 7);
    /// Upstream connection termination (reset).
    pub const UC: ResponseFlags = ResponseFlags(1 << 8);
    /// Downstream connection termination: the client went away before the response. Set by
    /// the proxy, never by the engine.
    pub const DC: ResponseFlags = ResponseFlags(1 << 9);

    /// In the order of Envoy's `ResponseFlag` enum, which is the order `%RESPONSE_FLAGS%` and
    /// Istio's `response_flags` label list them in (`UT,URX`, `DI,FI`): dashboards and alerts
    /// match these strings whole.
    const NAMES: [(ResponseFlags, &'static str); 10] = [
        (ResponseFlags::UH, "UH"),
        (ResponseFlags::UT, "UT"),
        (ResponseFlags::UF, "UF"),
        (ResponseFlags::UC, "UC"),
        (ResponseFlags::UO, "UO"),
        (ResponseFlags::NR, "NR"),
        (ResponseFlags::DI, "DI"),
        (ResponseFlags::FI, "FI"),
        (ResponseFlags::DC, "DC"),
        (ResponseFlags::URX, "URX"),
    ];

    pub fn contains(self, other: ResponseFlags) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl std::ops::BitOr for ResponseFlags {
    type Output = ResponseFlags;
    fn bitor(self, rhs: ResponseFlags) -> ResponseFlags {
        ResponseFlags(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for ResponseFlags {
    fn bitor_assign(&mut self, rhs: ResponseFlags) {
        self.0 |= rhs.0;
    }
}

impl fmt::Display for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("-");
        }
        let mut first = true;
        for (flag, name) in Self::NAMES {
            if self.contains(flag) {
                if !first {
                    f.write_str(",")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_status_flag_cause_and_retryability() {
        let cases = [
            (EngineError::NoRoute, 404, "NR", Cause::Downstream, false),
            (EngineError::ClusterNotFound, 503, "NR", Cause::Mesh, false),
            (
                EngineError::NoHealthyUpstream,
                503,
                "UH",
                Cause::Upstream,
                false,
            ),
            (
                EngineError::ConnectFailure,
                503,
                "UF",
                Cause::Upstream,
                true,
            ),
            (EngineError::UpstreamReset, 503, "UC", Cause::Upstream, true),
            (EngineError::PerTryTimeout, 504, "UT", Cause::Upstream, true),
            (
                EngineError::RequestTimeout,
                504,
                "UT",
                Cause::Upstream,
                false,
            ),
            (EngineError::Overflow, 503, "UO", Cause::Mesh, false),
            (
                EngineError::RetriesExhausted(TryFailure::ConnectFailure),
                503,
                "UF,URX",
                Cause::Upstream,
                false,
            ),
            (
                EngineError::FaultAbort { status: 418 },
                418,
                "FI",
                Cause::Mesh,
                false,
            ),
        ];
        for (err, status, flags, cause, retryable) in cases {
            assert_eq!(err.status(), status, "{err}");
            assert_eq!(err.flags().to_string(), flags, "{err}");
            assert_eq!(err.cause(), cause, "{err}");
            assert_eq!(err.is_retryable(), retryable, "{err}");
        }
        assert_eq!(ResponseFlags::NONE.to_string(), "-");
        // Envoy's order, whichever flag was raised first.
        let combined = |flags: &[ResponseFlags]| {
            flags
                .iter()
                .fold(ResponseFlags::NONE, |all, &f| all | f)
                .to_string()
        };
        assert_eq!(combined(&[ResponseFlags::URX, ResponseFlags::UT]), "UT,URX");
        assert_eq!(combined(&[ResponseFlags::URX, ResponseFlags::UC]), "UC,URX");
        assert_eq!(combined(&[ResponseFlags::URX, ResponseFlags::UO]), "UO,URX");
        assert_eq!(combined(&[ResponseFlags::FI, ResponseFlags::DI]), "DI,FI");
        assert_eq!(combined(&[ResponseFlags::DC, ResponseFlags::UT]), "UT,DC");
    }
}
