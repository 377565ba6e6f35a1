//! L7: HTTP/1.1 keep-alive, HTTP/2 with prior knowledge and gRPC on a redirected connection or
//! at the ingress gateway. `downstream` is the hyper side (serving the connection, refusing
//! what `head_check` refuses, local replies); `forward` is the try loop each request runs
//! through.

mod conn;
mod downstream;
mod forward;
pub mod head_check;
mod hop_by_hop;
mod limits;
mod reply;

pub use conn::{Entry, HttpConn};
pub use downstream::serve;
pub use reply::local_reply;
