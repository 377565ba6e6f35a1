//! L7: HTTP/1.1 keep-alive, HTTP/2 with prior knowledge and gRPC on a redirected connection or
//! at the ingress gateway. `downstream` is the hyper side (serving the connection, refusing
//! what `head_check` refuses, local replies); `forward` is the try loop each request runs
//! through; `activity` is a connection's clocks for its timeouts.

pub mod activity;
mod conn;
mod downstream;
mod forward;
pub mod head_check;
mod hop_by_hop;
pub mod limits;
mod reply;
mod shared_socket;

pub use conn::{Entry, HttpConn};

/// The HTTP/2 connection preface (RFC 9113 §3.4): a connection that starts with it is HTTP/2 with
/// prior knowledge. Detection, the head checker and the connection's timeouts all look for it.
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub use downstream::serve;
pub use hop_by_hop::strip_hop_by_hop;
pub use reply::local_reply;
