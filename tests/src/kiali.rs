//! What Kiali's graph makes of the mesh's metrics: a namespace's versioned-app graph, from the
//! queries Kiali issues to Prometheus for HTTP traffic (the same selectors, group-by labels,
//! rate window and `> 0`), merged as Kiali merges them: a series missing any label Kiali groups
//! on is skipped, and traffic is counted once per (source node, destination node, response
//! code, flags, destination service) however many of the queries return it, so a request
//! reported by both its source and its destination is not counted twice.
//!
//! Kiali itself cannot run here (it needs a Kubernetes API with Istio's objects, and no package
//! of this machine's registries carries it), so this is its query layer written again, from
//! Kiali's `graph/telemetry/istio` (`buildNamespaceTrafficMap`, `populateTrafficMap`); the
//! Prometheus it asks is real ([`crate::prometheus`]).

use std::{
    collections::{BTreeMap, HashSet},
    time::Duration,
};

use anyhow::Result;

use crate::prometheus::{Prometheus, Sample};

/// The labels Kiali groups request rates by.
const GROUP_BY: &str = "source_cluster,source_workload_namespace,source_workload,\
                        source_canonical_service,source_canonical_revision,destination_cluster,\
                        destination_service_namespace,destination_service,\
                        destination_service_name,destination_workload_namespace,\
                        destination_workload,destination_canonical_service,\
                        destination_canonical_revision,request_protocol,response_code,\
                        grpc_response_status,response_flags";

/// Those a series must have, or Kiali skips it ("missing expected TS labels").
const REQUIRED: [&str; 12] = [
    "source_workload_namespace",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "destination_service_namespace",
    "destination_service",
    "destination_service_name",
    "destination_workload_namespace",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "response_flags",
];

/// A node of a versioned-app graph: a canonical service's revision, in its namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AppVersion {
    pub namespace: String,
    pub app: String,
    pub version: String,
}

/// Requests per second on each edge, by response code.
#[derive(Debug, Default)]
pub struct Graph {
    pub edges: BTreeMap<(AppVersion, AppVersion), BTreeMap<String, f64>>,
    /// Series Kiali would have skipped for a missing label.
    pub skipped: Vec<Sample>,
}

impl Graph {
    /// Requests per second from app `from` to app `to` (any version of each; `to`'s version
    /// only, when given), and how many of them answered 5xx.
    pub fn rate(&self, from: &str, to: &str, to_version: Option<&str>) -> (f64, f64) {
        self.edges
            .iter()
            .filter(|((source, destination), _)| {
                source.app == from
                    && destination.app == to
                    && to_version.is_none_or(|version| destination.version == version)
            })
            .flat_map(|(_, codes)| codes)
            .fold((0.0, 0.0), |(all, errors), (code, rate)| {
                let error = if code.starts_with('5') { *rate } else { 0.0 };
                (all + rate, errors + error)
            })
    }
}

/// Namespace `namespace`'s versioned-app graph over the last `window`, as Kiali draws it.
pub fn namespace_graph(
    prometheus: &Prometheus,
    namespace: &str,
    window: Duration,
) -> Result<Graph> {
    let seconds = window.as_secs().max(1);
    let rate = |selector: String| {
        format!("sum(rate(istio_requests_total{{{selector}}} [{seconds}s])) by ({GROUP_BY}) > 0")
    };
    let queries = [
        // Incoming that no destination reports (requests that never reached one).
        rate(format!(
            "reporter=\"source\",source_workload_namespace!=\"{namespace}\",\
             destination_workload_namespace=\"unknown\",destination_workload=\"unknown\",\
             destination_service=~\"^.+\\\\.{namespace}\\\\..+$\""
        )),
        // Incoming, as the destinations report it.
        rate(format!(
            "reporter=\"destination\",destination_workload_namespace=\"{namespace}\""
        )),
        // Outgoing, as the sources report it.
        rate(format!(
            "reporter=\"source\",source_workload_namespace=\"{namespace}\""
        )),
    ];
    let mut graph = Graph::default();
    let mut counted = HashSet::new();
    for query in queries {
        for sample in prometheus.query(&query)? {
            let label = |name: &str| sample.labels.get(name).map(String::as_str);
            if REQUIRED.iter().any(|name| label(name).is_none()) {
                graph.skipped.push(sample);
                continue;
            }
            let node = |namespace: &str, app: &str, version: &str| AppVersion {
                namespace: label(namespace).unwrap_or_default().to_owned(),
                app: label(app).unwrap_or_default().to_owned(),
                version: label(version).unwrap_or_default().to_owned(),
            };
            let source = node(
                "source_workload_namespace",
                "source_canonical_service",
                "source_canonical_revision",
            );
            let mut destination = node(
                "destination_workload_namespace",
                "destination_canonical_service",
                "destination_canonical_revision",
            );
            if destination.namespace == "unknown" {
                destination.namespace = label("destination_service_namespace")
                    .unwrap_or_default()
                    .to_owned();
            }
            let code = label("response_code").unwrap_or_default().to_owned();
            let once = (
                source.clone(),
                destination.clone(),
                code.clone(),
                label("response_flags").unwrap_or_default().to_owned(),
                label("destination_service").unwrap_or_default().to_owned(),
            );
            if counted.insert(once) {
                *graph
                    .edges
                    .entry((source, destination))
                    .or_default()
                    .entry(code)
                    .or_default() += sample.value;
            }
        }
    }
    Ok(graph)
}
