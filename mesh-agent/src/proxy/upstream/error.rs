//! How a request sent through the pool can fail, in the terms the engine's outcomes need.

use hyper::{client::conn::TrySendError, Request};
use tracing::debug;

use super::body::ProxyBody;

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
    /// The response head was malformed or ambiguous: hyper could not parse it, or
    /// `response_check::check` refused it (`UPE`, answered 502 as Envoy does).
    #[error("upstream protocol error")]
    Protocol,
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

/// What a failed send leaves. A connection that had sat open (`reused`) may have closed
/// meanwhile (the server's keep-alive timeout, say) before the request left: the request comes
/// back to go on another connection, as hyper-util's client does. Anything else is a reset.
pub(super) fn unsent(
    mut error: TrySendError<Request<ProxyBody>>,
    reused: bool,
) -> Result<Request<ProxyBody>, SendError> {
    match error.take_message() {
        Some(request) if reused => Ok(request),
        _ => {
            let error = error.into_error();
            if error.is_parse() {
                debug!(%error, "malformed upstream response");
                return Err(SendError::Protocol);
            }
            debug!(%error, "upstream reset before the response");
            Err(SendError::Reset)
        }
    }
}
