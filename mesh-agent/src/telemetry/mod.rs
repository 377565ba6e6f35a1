//! What the agent reports: the access log (one JSON line per connection) for now.

mod access_log;

pub use access_log::{AccessLog, TcpRecord};
