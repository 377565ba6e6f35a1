//! Upstream connections, made from the source pod's network namespace so the pod's own IP is
//! the source, and exempted so the kernel programs never redirect them (`dial`).
//!
//! HTTP goes through the pod's [`UpstreamPool`] (`pool`): per destination cluster and endpoint,
//! hyper HTTP/1.1 connections (`http1`: reused one request at a time) or one multiplexed HTTP/2
//! connection (`http2`), under the cluster's `connectionPool` settings with Envoy's semantics:
//! `tcp.maxConnections` caps the cluster's open connections, a request that finds none free
//! waits (counted against `http1MaxPendingRequests`, past which it is refused with `UO`),
//! `maxRequestsPerConnection` retires a connection, `tcp.connectTimeout` bounds every dial and
//! `http.idleTimeout` closes idle connections (`connection`); an idle HTTP/1.1 connection sleeps
//! after a second, holding only its socket (`http1_connection`). An HTTP/1.1 response head is
//! checked as Envoy checks it (`response_check`); the response body (`response`) gives its
//! connection back when it has been read to its end.

mod body;
mod connection;
mod dial;
mod error;
mod http1;
mod http1_connection;
mod http2;
mod pool;
mod response;
mod response_check;

pub use body::{BoxError, ProxyBody};
pub use dial::{Dialer, TunnelStream, Tunnels, UpstreamIo};
pub use error::{Progress, SendError};
pub use pool::{Protocol, UpstreamPool, Waiting};
pub use response::{ReplyBody, ResponseBody};
