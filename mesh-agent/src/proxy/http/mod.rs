//! L7: HTTP/1.1 keep-alive, HTTP/2 with prior knowledge and gRPC on a redirected connection or
//! at the ingress gateway. `downstream` is the hyper side (serving the connection, the
//! smuggling guard, local replies); `forward` is the try loop each request runs through.

mod conn;
mod downstream;
mod forward;
mod hop_by_hop;
mod limits;
mod reply;
mod smuggling;

pub use conn::{Entry, HttpConn};
pub use downstream::serve;
pub use reply::local_reply;
