//! `mesh-agent stat`, the mesh's `linkerd viz stat` / `istioctl x top`: per service and version,
//! requests per second, each version's share of its service, success rate, p50 and p99 over a
//! window, from readings of the agent's own Istio metrics ([`super::reading`]): every request
//! the agent saw, from a pod of its node or to one, by `destination_service_name` and
//! `destination_canonical_revision`.

use std::collections::BTreeMap;

use super::reading::{Counts, Edge};

/// One row of the table: a service version over the window.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub service: String,
    pub version: String,
    pub rps: f64,
    /// Of its service's requests, in percent.
    pub share: f64,
    /// In percent; `None` without requests.
    pub success: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// The window's traffic (`edges`, over `seconds`) by service and version, whoever called: one
/// row per service version that had requests, by service then version.
pub fn rows(edges: &BTreeMap<Edge, Counts>, seconds: f64) -> Vec<Row> {
    let mut versions: BTreeMap<(&str, &str), Counts> = BTreeMap::new();
    for (edge, counts) in edges {
        versions
            .entry((&edge.service, &edge.destination.version))
            .or_default()
            .add(counts);
    }
    let mut totals: BTreeMap<&str, f64> = BTreeMap::new();
    for ((service, _), counts) in &versions {
        *totals.entry(service).or_default() += counts.requests;
    }
    versions
        .iter()
        .map(|((service, version), counts)| {
            let summary = counts.summary(seconds);
            Row {
                service: (*service).to_owned(),
                version: (*version).to_owned(),
                rps: summary.rps,
                share: 100.0 * counts.requests / totals[service],
                success: summary.success,
                p50_ms: summary.p50_ms,
                p99_ms: summary.p99_ms,
            }
        })
        .collect()
}

/// The table, aligned, for a terminal.
pub fn table(rows: &[Row], seconds: f64) -> String {
    let mut out = format!(
        "{:<28} {:<10} {:>9} {:>7} {:>8} {:>9} {:>9}   (last {seconds:.0} s)\n",
        "SERVICE", "VERSION", "RPS", "SHARE", "SUCCESS", "P50", "P99"
    );
    let ms = |value: Option<f64>| value.map_or("-".to_owned(), |ms| format!("{ms:.1}ms"));
    for row in rows {
        out.push_str(&format!(
            "{:<28} {:<10} {:>9.1} {:>6.1}% {:>7} {:>9} {:>9}\n",
            row.service,
            row.version,
            row.rps,
            row.share,
            row.success
                .map_or("-".to_owned(), |success| format!("{success:.1}%")),
            ms(row.p50_ms),
            ms(row.p99_ms),
        ));
    }
    if rows.is_empty() {
        out.push_str("(no requests in the window)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::reading::{
        reading,
        tests::{durations, requests},
        window,
    };

    fn exposition(v1: (u32, u32), v2: (u32, u32), slow: u32) -> String {
        [
            requests("source", "service-b", "v1", "200", v1.0),
            requests("source", "service-b", "v1", "503", v1.1),
            requests("source", "service-b", "v2", "200", v2.0),
            requests("source", "service-b", "v2", "503", v2.1),
            // What B's calls were reported as by the destination: not counted twice.
            requests("destination", "service-b", "v1", "200", v1.0),
            // A caller outside the mesh, seen by the destination only.
            requests("destination", "unknown", "v2", "200", v2.0),
            durations(&[
                ("5", v1.0 + v1.1 - slow),
                ("10", v1.0 + v1.1),
                ("+Inf", v1.0 + v1.1),
            ]),
        ]
        .concat()
    }

    #[test]
    fn rates_shares_and_success_over_the_window_whoever_called() {
        let before = reading(&exposition((100, 0), (5, 0), 0));
        let after = reading(&exposition((280, 0), (10, 10), 90));
        let rows = rows(&window(&before, &after), 2.0);
        assert_eq!(rows.len(), 2);
        let (v1, v2) = (&rows[0], &rows[1]);
        assert_eq!((v1.version.as_str(), v2.version.as_str()), ("v1", "v2"));
        // v2: B's 5 answered and 10 failed, and 5 from outside the mesh.
        assert_eq!((v1.rps, v2.rps), (90.0, 10.0));
        assert_eq!((v1.share, v2.share), (90.0, 10.0));
        assert_eq!((v1.success, v2.success), (Some(100.0), Some(50.0)));
        // 180 new v1 requests: 90 up to 5 ms, 90 between 5 and 10 ms.
        assert_eq!(v1.p50_ms, Some(5.0));
        assert!((v1.p99_ms.unwrap() - 9.9).abs() < 1e-9, "{v1:?}");
        assert_eq!(v2.p50_ms, None, "no histogram for v2 here");
    }

    #[test]
    fn a_version_without_requests_in_the_window_has_no_row() {
        let same = reading(&exposition((100, 0), (10, 0), 0));
        assert!(rows(&window(&same, &same), 1.0).is_empty());
        assert!(table(&[], 10.0).contains("no requests"));
    }
}
