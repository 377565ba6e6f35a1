//! What the agent's own Istio metrics say about the traffic between workloads, for the views
//! drawn from them (`mesh-agent stat`, the `/graph` page): a [`Reading`] is what the agent had
//! counted at one moment, per edge of the traffic graph; [`window`] is what happened on each edge
//! between two readings; [`Readings`] keeps the recent ones. Only the series the agent keeps
//! anyway are read, so the data path does nothing more for any view.
//!
//! An edge goes from a source workload to a version of a destination service, as Kiali's
//! versioned-app graph draws it. A request between two pods of this node is reported twice, by
//! its source and by its destination; [`window`] counts it once, as Kiali does.
//!
//! The exposition is read by [`parse`], written for the agent's own text output (a sample per
//! line, label values quoted and escaped): the crate the tests use for Prometheus text splits
//! label values at commas, which response flags such as `UF,URX` contain.

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::identity::UNKNOWN;

/// A workload as the graph draws it: a canonical service's revision, in its namespace.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Node {
    pub namespace: String,
    pub service: String,
    pub version: String,
}

impl Node {
    /// A caller outside the mesh, or a destination the agent could not name.
    pub fn unknown() -> Node {
        Node {
            namespace: UNKNOWN.to_owned(),
            service: UNKNOWN.to_owned(),
            version: UNKNOWN.to_owned(),
        }
    }
}

/// Requests from one workload to one version of a service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Edge {
    pub source: Node,
    /// The service called (`destination_service_name`).
    pub service: String,
    pub destination: Node,
    /// Carried in a mutual TLS tunnel (`connection_security_policy="mutual_tls"`).
    pub mutual_tls: bool,
}

/// Who reported a series (Istio's `reporter`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Reporter {
    Source,
    Destination,
}

/// What the agent had counted at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reading {
    series: BTreeMap<(Edge, Reporter), Counts>,
}

/// Counts of one edge: cumulative in a [`Reading`], within the window in [`window`]'s answer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counts {
    pub requests: f64,
    /// Answered 5xx, or not answered at all (status 0).
    pub failures: f64,
    /// Duration histogram: upper bound in milliseconds (`le`) → cumulative count.
    pub buckets: BTreeMap<Bound, f64>,
}

/// A bucket's upper bound, ordered (`+Inf` last).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bound(pub f64);

impl Eq for Bound {}

impl Ord for Bound {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl PartialOrd for Bound {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// An edge's traffic over a window, as the views show it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub rps: f64,
    /// In percent; `None` without requests.
    pub success: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl Counts {
    /// Adds `other`'s counts (another edge's, or another reporter's).
    pub fn add(&mut self, other: &Counts) {
        self.requests += other.requests;
        self.failures += other.failures;
        for (le, count) in &other.buckets {
            *self.buckets.entry(*le).or_default() += count;
        }
    }

    /// What was counted since `then`.
    fn since(&self, then: &Counts) -> Counts {
        Counts {
            requests: self.requests - then.requests,
            failures: self.failures - then.failures,
            buckets: self
                .buckets
                .iter()
                .map(|(le, count)| (*le, count - then.buckets.get(le).copied().unwrap_or(0.0)))
                .collect(),
        }
    }

    /// Rates and quantiles of counts taken over `seconds`.
    pub fn summary(&self, seconds: f64) -> Summary {
        let buckets: Vec<(f64, f64)> = self.buckets.iter().map(|(le, n)| (le.0, *n)).collect();
        Summary {
            rps: self.requests / seconds,
            success: (self.requests > 0.0).then(|| 100.0 * (1.0 - self.failures / self.requests)),
            p50_ms: quantile(0.5, &buckets),
            p99_ms: quantile(0.99, &buckets),
        }
    }
}

/// Reads the agent's text exposition: its request counts and durations, per edge and reporter.
pub fn reading(exposition: &str) -> Reading {
    let mut reading = Reading::default();
    for (name, labels, value) in exposition.lines().filter_map(parse) {
        let counted = matches!(
            name,
            "istio_requests_total" | "istio_request_duration_milliseconds_bucket"
        );
        if !counted {
            continue;
        }
        let label = |wanted: &str| {
            labels
                .iter()
                .find(|(name, _)| *name == wanted)
                .map_or(UNKNOWN, |(_, value)| value.as_str())
        };
        let reporter = match label("reporter") {
            "source" => Reporter::Source,
            "destination" => Reporter::Destination,
            _ => continue,
        };
        let node = |side: &str| Node {
            namespace: label(&format!("{side}_workload_namespace")).to_owned(),
            service: label(&format!("{side}_canonical_service")).to_owned(),
            version: label(&format!("{side}_canonical_revision")).to_owned(),
        };
        let edge = Edge {
            source: node("source"),
            service: label("destination_service_name").to_owned(),
            destination: node("destination"),
            mutual_tls: label("connection_security_policy") == "mutual_tls",
        };
        if name == "istio_requests_total" {
            let counts = reading.series.entry((edge, reporter)).or_default();
            counts.requests += value;
            let code = label("response_code");
            if code.starts_with('5') || code == "0" || code == UNKNOWN {
                counts.failures += value;
            }
        } else if let Ok(le) = label("le").parse::<f64>() {
            let counts = reading.series.entry((edge, reporter)).or_default();
            *counts.buckets.entry(Bound(le)).or_default() += value;
        }
    }
    reading
}

/// What happened on each edge between `before` and `after`: the edges that had requests, each
/// request counted once. A request both reported is taken from the reporter that counted more
/// of the edge (its source, unless the window caught only the destination's report), as
/// Kiali keeps one of two equal series.
pub fn window(before: &Reading, after: &Reading) -> BTreeMap<Edge, Counts> {
    let mut edges: BTreeMap<Edge, Counts> = BTreeMap::new();
    for ((edge, reporter), now) in &after.series {
        let then = before.series.get(&(edge.clone(), *reporter));
        let reported = now.since(then.unwrap_or(&Counts::default()));
        if reported.requests <= 0.0 {
            continue;
        }
        let kept = edges.entry(edge.clone()).or_default();
        if reported.requests > kept.requests {
            *kept = reported;
        }
    }
    edges
}

/// The `q` quantile of cumulative `buckets` (upper bound, count), interpolated linearly within
/// its bucket as Prometheus's `histogram_quantile` does; `None` without observations. In the
/// `+Inf` bucket it is the highest finite bound.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower.0);
            }
            let within = count - lower.1;
            let fraction = if within > 0.0 {
                (rank - lower.1) / within
            } else {
                1.0
            };
            return Some(lower.0 + (bound - lower.0) * fraction);
        }
        lower = (bound, count);
    }
    Some(lower.0)
}

/// The readings that cover the last `span`, oldest first: the most a view looks back.
#[derive(Debug)]
pub struct Readings {
    span: Duration,
    kept: VecDeque<(Instant, Reading)>,
}

impl Readings {
    pub fn new(span: Duration) -> Readings {
        Readings {
            span,
            kept: VecDeque::new(),
        }
    }

    /// Keeps `reading`, taken at `now`, and forgets those the span no longer needs (all but
    /// the newest taken a span ago or more).
    pub fn push(&mut self, now: Instant, reading: Reading) {
        while self
            .kept
            .get(1)
            .is_some_and(|(at, _)| now.duration_since(*at) >= self.span)
        {
            self.kept.pop_front();
        }
        self.kept.push_back((now, reading));
    }

    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }

    pub fn clear(&mut self) {
        self.kept.clear();
    }

    /// The traffic of the last `span` (from the newest reading at least that old, or the
    /// oldest kept), and how many seconds that is; `None` until two readings are kept.
    pub fn last(&self, span: Duration) -> Option<(BTreeMap<Edge, Counts>, f64)> {
        let (now, latest) = self.kept.back()?;
        let (then, earliest) = self
            .kept
            .iter()
            .rev()
            .find(|(at, _)| now.duration_since(*at) >= span)
            .or(self.kept.front())?;
        let seconds = now.duration_since(*then).as_secs_f64();
        (seconds > 0.0).then(|| (window(earliest, latest), seconds))
    }
}

/// A sample line's metric name, labels and value.
type Sample<'a> = (&'a str, Vec<(&'a str, String)>, f64);

/// One sample line; `None` for comments and blank lines.
fn parse(line: &str) -> Option<Sample<'_>> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        loop {
            rest = rest.trim_start_matches([',', ' ']);
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (label, after) = rest.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                let (at, c) = chars.next()?;
                match c {
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        escaped => value.push(escaped),
                    },
                    '"' => break at,
                    c => value.push(c),
                }
            };
            labels.push((label, value));
            rest = &after[end + 1..];
        }
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some((name, labels, value))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One series of `istio_requests_total` from `source` to `version` of service-c.
    pub(crate) fn requests(
        reporter: &str,
        source: &str,
        version: &str,
        code: &str,
        count: u32,
    ) -> String {
        // A caller outside the mesh is unknown in every label.
        let (namespace, revision) = match source {
            UNKNOWN => (UNKNOWN, UNKNOWN),
            _ => ("default", "v1"),
        };
        format!(
            "istio_requests_total{{reporter=\"{reporter}\",source_workload_namespace=\"{namespace}\",\
             source_canonical_service=\"{source}\",source_canonical_revision=\"{revision}\",\
             destination_service_name=\"service-c\",destination_workload_namespace=\"default\",\
             destination_canonical_service=\"service-c\",\
             destination_canonical_revision=\"{version}\",response_code=\"{code}\",\
             response_flags=\"UF,URX\",connection_security_policy=\"none\"}} {count}\n"
        )
    }

    /// The duration buckets of service-b's requests to service-c v1, as its source reports.
    pub(crate) fn durations(buckets: &[(&str, u32)]) -> String {
        buckets
            .iter()
            .map(|(le, count)| {
                format!(
                    "istio_request_duration_milliseconds_bucket{{reporter=\"source\",\
                     source_workload_namespace=\"default\",source_canonical_service=\"service-b\",\
                     source_canonical_revision=\"v1\",destination_service_name=\"service-c\",\
                     destination_workload_namespace=\"default\",\
                     destination_canonical_service=\"service-c\",\
                     destination_canonical_revision=\"v1\",\
                     connection_security_policy=\"none\",le=\"{le}\"}} {count}\n"
                )
            })
            .collect()
    }

    fn edge(source: &str, version: &str) -> Edge {
        let node = |service: &str, version: &str| Node {
            namespace: "default".into(),
            service: service.into(),
            version: version.into(),
        };
        Edge {
            source: match source {
                UNKNOWN => Node::unknown(),
                _ => node(source, "v1"),
            },
            service: "service-c".into(),
            destination: node("service-c", version),
            mutual_tls: false,
        }
    }

    #[test]
    fn a_request_reported_by_both_ends_is_counted_once() {
        let at = |n: u32| {
            reading(
                &[
                    requests("source", "service-b", "v1", "200", n),
                    requests("destination", "service-b", "v1", "200", n),
                ]
                .concat(),
            )
        };
        let edges = window(&at(100), &at(150));
        assert_eq!(edges.len(), 1);
        assert_eq!(edges[&edge("service-b", "v1")].requests, 50.0);
    }

    #[test]
    fn a_caller_only_the_destination_saw_is_counted_from_its_report() {
        let at = |n: u32| reading(&requests("destination", "unknown", "v2", "503", n));
        let edges = window(&at(10), &at(30));
        let counts = &edges[&edge("unknown", "v2")];
        assert_eq!((counts.requests, counts.failures), (20.0, 20.0));
        assert_eq!(counts.summary(2.0).success, Some(0.0));
    }

    #[test]
    fn an_edge_first_seen_in_the_window_counts_from_zero_and_an_idle_one_not_at_all() {
        let before = reading(&requests("source", "service-b", "v1", "200", 5));
        let after = reading(
            &[
                requests("source", "service-b", "v1", "200", 5),
                requests("source", "service-b", "v2", "200", 7),
            ]
            .concat(),
        );
        let edges = window(&before, &after);
        assert_eq!(edges.keys().collect::<Vec<_>>(), [&edge("service-b", "v2")]);
        assert_eq!(edges[&edge("service-b", "v2")].requests, 7.0);
    }

    #[test]
    fn quantiles_interpolate_within_a_bucket_as_prometheus_does() {
        let buckets = [(1.0, 0.0), (10.0, 100.0), (f64::INFINITY, 100.0)];
        assert_eq!(quantile(0.5, &buckets), Some(5.5));
        assert_eq!(quantile(1.0, &buckets), Some(10.0));
        assert_eq!(quantile(0.5, &[(1.0, 0.0), (f64::INFINITY, 0.0)]), None);
        let beyond = [(1.0, 10.0), (f64::INFINITY, 100.0)];
        assert_eq!(
            quantile(0.99, &beyond),
            Some(1.0),
            "the highest finite bound"
        );
    }

    #[test]
    fn durations_give_the_window_its_quantiles() {
        let with_requests = |n, buckets: &[(&str, u32)]| {
            reading(
                &[
                    requests("source", "service-b", "v1", "200", n),
                    durations(buckets),
                ]
                .concat(),
            )
        };
        let edges = window(
            &with_requests(0, &[("5", 0), ("10", 0), ("+Inf", 0)]),
            &with_requests(180, &[("5", 90), ("10", 180), ("+Inf", 180)]),
        );
        let summary = edges[&edge("service-b", "v1")].summary(2.0);
        assert_eq!((summary.rps, summary.p50_ms), (90.0, Some(5.0)));
        assert!((summary.p99_ms.unwrap() - 9.9).abs() < 1e-9, "{summary:?}");
    }

    #[test]
    fn label_values_keep_their_commas_and_escapes() {
        let (name, labels, value) =
            parse(r#"m{a="UF,URX",b="say \"hi\"\n",c="x"} 3.5 1700000000"#).unwrap();
        assert_eq!((name, value), ("m", 3.5));
        assert_eq!(
            labels,
            vec![
                ("a", "UF,URX".to_owned()),
                ("b", "say \"hi\"\n".to_owned()),
                ("c", "x".to_owned())
            ]
        );
        assert_eq!(parse("bare 7").unwrap().2, 7.0);
        assert!(parse("# HELP m x").is_none());
    }

    #[test]
    fn readings_keep_their_span_and_windows_need_two() {
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        let counted = |n| reading(&requests("source", "service-b", "v1", "200", n));
        let mut readings = Readings::new(Duration::from_secs(60));
        readings.push(at(0), counted(0));
        assert_eq!(readings.last(Duration::from_secs(10)), None);
        for second in 1..=70 {
            readings.push(at(second), counted(10 * second as u32));
        }
        assert_eq!(readings.kept.len(), 61, "a minute and its first reading");
        let (edges, seconds) = readings.last(Duration::from_secs(10)).unwrap();
        assert_eq!(seconds, 10.0);
        assert_eq!(edges[&edge("service-b", "v1")].requests, 100.0);
        let (_, seconds) = readings.last(Duration::from_secs(600)).unwrap();
        assert_eq!(seconds, 60.0, "as much as is kept");
    }
}
