//! What the agent reports: Istio-compatible Prometheus metrics (`metrics`), trace context
//! propagation (`trace`), span export over OTLP/HTTP (`otlp`), the access log (`access_log`), and
//! `mesh-agent stat`'s reading of the metrics (`stat`).

mod access_log;
mod metered;
pub mod metrics;
pub mod otlp;
pub mod reading;
mod record;
mod sinks;
pub mod stat;
pub mod trace;

pub use access_log::{AccessLog, AccessLogOptions, HttpRecord, TcpRecord};
pub use metered::Metered;
pub use metrics::Metrics;
pub use record::{Caller, ConnectionRecord, RequestRecord, GRPC_STATUS};
pub use sinks::Telemetry;
