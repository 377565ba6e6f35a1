//! What the agent reports: Istio-compatible Prometheus metrics (`metrics`), trace context
//! propagation (`trace`), span export over OTLP/HTTP (`otlp`) and the access log (`access_log`).

mod access_log;
pub mod metrics;
pub mod otlp;
pub mod trace;

pub use access_log::{AccessLog, AccessLogOptions, HttpRecord, TcpRecord};
pub use metrics::Metrics;

use std::sync::Arc;

/// Everything the data path reports through, shared by all connections.
pub struct Telemetry {
    pub metrics: Arc<Metrics>,
    pub access_log: AccessLog,
    /// `None`: tracing headers are still propagated, but no spans are exported.
    pub spans: Option<otlp::SpanExporter>,
    /// Share of new traces sampled (0.0 to 1.0); callers' decisions are kept.
    pub trace_sample_ratio: f64,
}
