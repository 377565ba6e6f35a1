//! How a request sent through the pool can fail, in the terms the engine's outcomes need.

/// Why the pool produced no response.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Refused at once: past `http1MaxPendingRequests`, or (for a request that may not wait) no
    /// connection free (`UO`).
    #[error("upstream overflow")]
    Overflow,
    /// No connection could be opened (refused, unreachable, or `tcp.connectTimeout` passed), or
    /// the connection the request waited for failed to open (`UF`).
    #[error("upstream connect failure")]
    ConnectFailure,
    /// The connection failed after it was open, before a whole response head (`UC`).
    #[error("upstream reset before the response")]
    Reset,
}

/// How far a request got in the pool; read by the caller when its deadline cut it short.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Progress {
    /// Looking for a connection, or waiting for one to come back: the endpoint was not asked.
    #[default]
    Waiting,
    /// Opening a connection to the endpoint.
    Connecting,
    /// On a connection to the endpoint.
    Sent,
}
