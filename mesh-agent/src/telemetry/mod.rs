//! What the agent reports: Istio-compatible Prometheus metrics (`metrics`), trace context
//! propagation (`trace`), span export over OTLP/HTTP (`otlp`), the access log (`access_log`);
//! and the views drawn from the metrics (`reading`): `mesh-agent stat`'s table (`stat`) and the
//! admin port's live graph page (`graph`).

mod access_log;
pub mod graph;
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
pub(crate) use record::same_arc;
pub use record::{Caller, ConnectionRecord, RequestRecord, GRPC_STATUS};
pub use sinks::Telemetry;
