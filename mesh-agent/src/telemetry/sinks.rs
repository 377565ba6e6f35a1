//! Where records go: the metrics, the access log and the span exporter.

use std::sync::Arc;

use super::{access_log::AccessLog, metrics::Metrics, otlp};

/// Everything the data path reports through, shared by all connections.
pub struct Telemetry {
    pub metrics: Arc<Metrics>,
    pub access_log: AccessLog,
    /// `None`: tracing headers are still propagated, but no spans are exported.
    pub spans: Option<otlp::SpanExporter>,
    /// Share of new traces sampled (0.0 to 1.0); callers' decisions are kept.
    pub trace_sample_ratio: f64,
}

#[cfg(test)]
impl Telemetry {
    /// Metrics on a registry of their own, no access log and no spans.
    pub fn for_tests() -> Self {
        let (access_log, _writer) = AccessLog::new(false);
        let registry = &mut prometheus_client::registry::Registry::default();
        Telemetry {
            metrics: Arc::new(Metrics::new("cluster.local", registry)),
            access_log,
            spans: None,
            trace_sample_ratio: 0.0,
        }
    }
}
