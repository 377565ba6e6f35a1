//! The agent's own live traffic graph: `GET /graph` on the admin port is one self-contained
//! page (compiled into the binary: no CDN, nothing to build or install) that polls
//! `/graph.json` every second and draws the workloads this agent sees, each edge with its
//! request rate, success rate, p99 and share of its service's calls from that source (a
//! canary's split), mutual TLS marked, and the endpoints outlier detection has ejected.
//!
//! Everything comes from the agent's own metrics ([`super::reading`]) and the engine's endpoint
//! health, read every second and only while someone watches (a view in the last
//! [`KEEP_WATCHING`]): nobody looking costs nothing, and the data path never does more.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde::Serialize;

use super::reading::{Counts, Edge, Node, Reading, Readings, Summary};

/// The page, as served.
pub const PAGE: &str = include_str!("graph.html");

/// How far back the page may look (`/graph.json?window=` in seconds, 10 by default).
pub const LONGEST_WINDOW: Duration = Duration::from_secs(60);
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);
/// How often the metrics are read while someone watches.
pub const EVERY: Duration = Duration::from_secs(1);
/// How long after the last view the readings go on: a page left open polls well within it.
pub const KEEP_WATCHING: Duration = Duration::from_secs(300);

/// The readings the page is drawn from, taken while someone watches.
#[derive(Debug)]
pub struct Watch {
    state: Mutex<Watched>,
}

#[derive(Debug)]
struct Watched {
    readings: Readings,
    viewed: Option<Instant>,
}

impl Default for Watch {
    fn default() -> Self {
        Watch {
            state: Mutex::new(Watched {
                readings: Readings::new(LONGEST_WINDOW),
                viewed: None,
            }),
        }
    }
}

impl Watch {
    /// A view at `now`: the traffic of the last `window` (`None` until a second reading),
    /// reading the metrics first if nothing is kept (the first view starts the readings).
    pub fn view(
        &self,
        now: Instant,
        window: Duration,
        read: impl FnOnce() -> Reading,
    ) -> Option<(BTreeMap<Edge, Counts>, f64)> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.viewed = Some(now);
        if state.readings.is_empty() {
            state.readings.push(now, read());
        }
        state.readings.last(window)
    }

    /// Every [`EVERY`]: reads the metrics if someone watched lately, and forgets what was read
    /// once nobody has for [`KEEP_WATCHING`].
    pub fn tick(&self, now: Instant, read: impl FnOnce() -> Reading) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let watched = state
            .viewed
            .is_some_and(|viewed| now.duration_since(viewed) < KEEP_WATCHING);
        if watched {
            state.readings.push(now, read());
        } else {
            state.readings.clear();
            state.viewed = None;
        }
    }
}

/// What `/graph.json` answers.
#[derive(Debug, Serialize)]
pub struct Graph {
    /// How many seconds the rates are over; 0 before the second reading.
    pub window_seconds: f64,
    pub nodes: Vec<GraphNode>,
    pub edges: Vec<GraphEdge>,
}

#[derive(Debug, Serialize)]
pub struct GraphNode {
    /// `namespace/service/version`.
    pub id: String,
    #[serde(flatten)]
    pub node: Node,
    pub ejected: Vec<Ejected>,
}

/// An endpoint outlier detection has taken out of its pool.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Ejected {
    pub address: SocketAddr,
    pub seconds_left: f64,
}

#[derive(Debug, Serialize)]
pub struct GraphEdge {
    pub source: String,
    pub destination: String,
    /// The service called, whose versions the share is of.
    pub service: String,
    /// Of the source's requests to the service, in percent.
    pub share: f64,
    pub mutual_tls: bool,
    #[serde(flatten)]
    pub summary: Summary,
}

fn id(node: &Node) -> String {
    format!("{}/{}/{}", node.namespace, node.service, node.version)
}

/// The graph of `edges` (over `seconds`), with `ejected` endpoints on the workloads they are.
pub fn graph(edges: &BTreeMap<Edge, Counts>, seconds: f64, ejected: Vec<(Node, Ejected)>) -> Graph {
    let mut called: BTreeMap<(&Node, &str), f64> = BTreeMap::new();
    for (edge, counts) in edges {
        *called.entry((&edge.source, &edge.service)).or_default() += counts.requests;
    }
    let mut nodes: BTreeMap<&Node, Vec<Ejected>> = BTreeMap::new();
    for edge in edges.keys() {
        nodes.entry(&edge.source).or_default();
        nodes.entry(&edge.destination).or_default();
    }
    // An endpoint of several clusters (a subset's and its service's) is listed once, with the
    // longest ejection it has, as `/clusters` reads it.
    for (node, endpoint) in &ejected {
        let listed = nodes.entry(node).or_default();
        match listed.iter_mut().find(|e| e.address == endpoint.address) {
            Some(e) => e.seconds_left = e.seconds_left.max(endpoint.seconds_left),
            None => listed.push(endpoint.clone()),
        }
    }
    Graph {
        window_seconds: seconds,
        nodes: nodes
            .into_iter()
            .map(|(node, ejected)| GraphNode {
                id: id(node),
                node: node.clone(),
                ejected,
            })
            .collect(),
        edges: edges
            .iter()
            .map(|(edge, counts)| GraphEdge {
                source: id(&edge.source),
                destination: id(&edge.destination),
                service: edge.service.clone(),
                share: 100.0 * counts.requests / called[&(&edge.source, edge.service.as_str())],
                mutual_tls: edge.mutual_tls,
                summary: counts.summary(seconds),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::reading::{reading, tests::requests, window};

    fn counted(v1: u32, v2: u32) -> Reading {
        reading(
            &[
                requests("source", "service-b", "v1", "200", v1),
                requests("source", "service-b", "v2", "200", v2),
                requests("destination", "unknown", "v2", "503", v2),
            ]
            .concat(),
        )
    }

    #[test]
    fn edges_carry_their_share_of_the_sources_calls_and_ejections_their_workload() {
        let edges = window(&counted(0, 0), &counted(90, 10));
        let c_v2 = Node {
            namespace: "default".into(),
            service: "service-c".into(),
            version: "v2".into(),
        };
        let ejected = Ejected {
            address: "10.1.0.7:8080".parse().unwrap(),
            seconds_left: 8.5,
        };
        let in_its_subset = Ejected {
            seconds_left: 3.0,
            ..ejected.clone()
        };
        let graph = graph(
            &edges,
            2.0,
            vec![(c_v2.clone(), ejected.clone()), (c_v2, in_its_subset)],
        );
        let ids: Vec<&str> = graph.nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "default/service-b/v1",
                "default/service-c/v1",
                "default/service-c/v2",
                "unknown/unknown/unknown"
            ]
        );
        assert_eq!(graph.nodes[2].ejected, [ejected]);
        let shares: Vec<(&str, &str, f64)> = graph
            .edges
            .iter()
            .map(|e| (e.source.as_str(), e.destination.as_str(), e.share))
            .collect();
        assert_eq!(
            shares,
            [
                ("default/service-b/v1", "default/service-c/v1", 90.0),
                ("default/service-b/v1", "default/service-c/v2", 10.0),
                ("unknown/unknown/unknown", "default/service-c/v2", 100.0),
            ]
        );
        assert_eq!(graph.edges[0].summary.rps, 45.0);
        assert_eq!(graph.edges[2].summary.success, Some(0.0));
        let json = serde_json::to_value(&graph).unwrap();
        assert_eq!(json["edges"][1]["share"], 10.0);
        assert_eq!(json["nodes"][2]["service"], "service-c");
    }

    #[test]
    fn readings_are_taken_while_someone_watches_and_forgotten_after() {
        let watch = Watch::default();
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        let reads = std::cell::Cell::new(0);
        let read = || {
            reads.set(reads.get() + 1);
            counted(10 * reads.get(), 0)
        };
        watch.tick(at(0), read);
        assert_eq!(reads.get(), 0, "nobody has looked yet");
        assert!(watch.view(at(1), DEFAULT_WINDOW, read).is_none());
        assert_eq!(reads.get(), 1, "the first view reads at once");
        for second in 2..=12 {
            watch.tick(at(second), read);
        }
        let (edges, seconds) = watch.view(at(12), DEFAULT_WINDOW, read).unwrap();
        assert_eq!(seconds, 10.0);
        assert_eq!(edges.values().next().unwrap().requests, 100.0);
        let watched = reads.get();
        watch.tick(at(12) + KEEP_WATCHING, read);
        assert_eq!(reads.get(), watched, "nobody watched for five minutes");
        assert!(watch.state.lock().unwrap().readings.is_empty());
    }
}
