//! Prometheus exposition. The agent has one registry; each subsystem registers its own metrics
//! on a prefixed sub-registry of it at start-up (telemetry the `istio_*` families, the redirect
//! `mesh_redirect_*`, the engine `mesh_engine_*` and its per-service counters, the store
//! `mesh_config_*`, ...), and `/metrics` renders it. What is counted elsewhere — an atomic in a
//! subsystem, the kernel's per-CPU maps — is read only when someone scrapes
//! ([`ScrapedCounters`]).

use std::fmt;

use prometheus_client::{
    collector::Collector,
    encoding::{text, DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, MetricType},
    registry::Registry,
};

/// `Content-Type` of OpenMetrics text, which Prometheus asks for.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of the classic text format 0.0.4, for `curl` and scrapers that do not ask for
/// OpenMetrics.
pub const PROMETHEUS_CONTENT_TYPE: &str =
    prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The body and `Content-Type` of a scrape with this `Accept` header: OpenMetrics when the client
/// asks for it (Prometheus does), the classic text format otherwise.
pub fn render(registry: &Registry, accept: Option<&str>) -> (&'static str, String) {
    let mut out = String::new();
    let openmetrics = accept.is_some_and(|a| a.contains("application/openmetrics-text"));
    // Writing to a String cannot fail; an encoder error would be a bug in a label set.
    let (content_type, encoded) = if openmetrics {
        (OPENMETRICS_CONTENT_TYPE, text::encode(&mut out, registry))
    } else {
        (
            PROMETHEUS_CONTENT_TYPE,
            prometheus_client::encoding::prometheus_text::encode(&mut out, registry),
        )
    };
    if let Err(error) = encoded {
        tracing::warn!(%error, "encoding metrics failed");
    }
    (content_type, out)
}

/// One counter family whose counts live elsewhere: `read` gives `(label value, count)` pairs,
/// monotonic, and runs at each scrape.
pub struct ScrapedCounters<F> {
    pub name: &'static str,
    pub help: &'static str,
    pub label: &'static str,
    pub read: F,
}

impl<F> fmt::Debug for ScrapedCounters<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScrapedCounters")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<F> Collector for ScrapedCounters<F>
where
    F: Fn() -> Vec<(&'static str, u64)> + Send + Sync + 'static,
{
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        encode_counters(
            &mut encoder,
            self.name,
            self.help,
            self.label,
            &(self.read)(),
        )
    }
}

/// Encodes one counter family, a series per `(label value, count)`.
pub fn encode_counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    counts: &[(&str, u64)],
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, count) in counts {
        ConstCounter::new(*count).encode(family.encode_family(&[(label, *value)])?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scraped_counters_are_read_at_each_scrape_under_their_prefix() {
        use std::sync::{
            atomic::{AtomicU64, Ordering},
            Arc,
        };
        let count = Arc::new(AtomicU64::new(3));
        let mut registry = Registry::default();
        let read = Arc::clone(&count);
        registry
            .sub_registry_with_prefix("mesh")
            .sub_registry_with_prefix("thing")
            .register_collector(Box::new(ScrapedCounters {
                name: "events",
                help: "Things that happened",
                label: "kind",
                read: move || vec![("a", read.load(Ordering::Relaxed))],
            }));
        let (_, text) = render(&registry, None);
        assert!(
            text.contains("mesh_thing_events_total{kind=\"a\"} 3"),
            "{text}"
        );
        count.store(5, Ordering::Relaxed);
        let (content_type, text) = render(&registry, Some("application/openmetrics-text"));
        assert_eq!(content_type, OPENMETRICS_CONTENT_TYPE);
        assert!(
            text.contains("mesh_thing_events_total{kind=\"a\"} 5"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
