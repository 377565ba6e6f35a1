//! `mesh-agent stat`, the mesh's `linkerd viz stat` / `istioctl x top`: per service and version,
//! requests per second, each version's share of its service, success rate, p50 and p99 over a
//! window. Derived from two readings of the agent's own Istio metrics (`/stats/prometheus`, the
//! series it keeps anyway), so the data path does nothing more for it: the requests its pods sent
//! (`reporter="source"`), by `destination_service_name` and `destination_canonical_revision`.
//!
//! The exposition is read by [`parse`], written for the agent's own text output (a sample per
//! line, label values quoted and escaped): the crate the tests use for Prometheus text splits
//! label values at commas, which response flags such as `UF,URX` contain.

use std::collections::BTreeMap;

/// A service and one version of it (its canonical revision).
pub type Key = (String, String);

/// What the agent had counted at one moment, per service version.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reading {
    pub series: BTreeMap<Key, Counts>,
}

/// Cumulative counts of one service version.
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

/// Reads the agent's text exposition.
pub fn reading(exposition: &str) -> Reading {
    let mut reading = Reading::default();
    for (name, labels, value) in exposition.lines().filter_map(parse) {
        let label = |wanted: &str| {
            labels
                .iter()
                .find(|(name, _)| *name == wanted)
                .map(|(_, value)| value.as_str())
        };
        if label("reporter") != Some("source") {
            continue;
        }
        let key = (
            label("destination_service_name")
                .unwrap_or("unknown")
                .to_owned(),
            label("destination_canonical_revision")
                .unwrap_or("unknown")
                .to_owned(),
        );
        match name {
            "istio_requests_total" => {
                let counts = reading.series.entry(key).or_default();
                counts.requests += value;
                let code = label("response_code").unwrap_or("0");
                if code.starts_with('5') || code == "0" {
                    counts.failures += value;
                }
            }
            "istio_request_duration_milliseconds_bucket" => {
                let Some(le) = label("le").and_then(|le| le.parse::<f64>().ok()) else {
                    continue;
                };
                let counts = reading.series.entry(key).or_default();
                *counts.buckets.entry(Bound(le)).or_default() += value;
            }
            _ => {}
        }
    }
    reading
}

/// What happened between `before` and `after`, `seconds` apart: one row per service version
/// that had requests, by service then version.
pub fn rows(before: &Reading, after: &Reading, seconds: f64) -> Vec<Row> {
    let mut rows: Vec<Row> = after
        .series
        .iter()
        .filter_map(|(key, now)| {
            let then = before.series.get(key).cloned().unwrap_or_default();
            let requests = now.requests - then.requests;
            if requests <= 0.0 {
                return None;
            }
            let buckets: Vec<(f64, f64)> = now
                .buckets
                .iter()
                .map(|(le, count)| (le.0, count - then.buckets.get(le).copied().unwrap_or(0.0)))
                .collect();
            Some(Row {
                service: key.0.clone(),
                version: key.1.clone(),
                rps: requests / seconds,
                share: 0.0,
                success: Some(100.0 * (1.0 - (now.failures - then.failures) / requests)),
                p50_ms: quantile(0.5, &buckets),
                p99_ms: quantile(0.99, &buckets),
            })
        })
        .collect();
    let mut totals: BTreeMap<String, f64> = BTreeMap::new();
    for row in &rows {
        *totals.entry(row.service.clone()).or_default() += row.rps;
    }
    for row in &mut rows {
        row.share = 100.0 * row.rps / totals[&row.service];
    }
    rows
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
mod tests {
    use super::*;

    fn exposition(v1: (u32, u32), v2: (u32, u32), slow: u32) -> String {
        let series = |version: &str, code: &str, count: u32| {
            format!(
                "istio_requests_total{{reporter=\"source\",destination_service_name=\"service-c\",\
                 destination_canonical_revision=\"{version}\",response_code=\"{code}\",\
                 response_flags=\"UF,URX\"}} {count}\n"
            )
        };
        let bucket = |le: &str, count: u32| {
            format!(
                "istio_request_duration_milliseconds_bucket{{reporter=\"source\",\
                 destination_service_name=\"service-c\",destination_canonical_revision=\"v1\",\
                 le=\"{le}\"}} {count}\n"
            )
        };
        format!(
            "# TYPE istio_requests_total counter\n{}{}{}{}{}{}{}\
             istio_requests_total{{reporter=\"destination\",destination_service_name=\"service-c\",\
             destination_canonical_revision=\"v1\",response_code=\"200\"}} 1000\n",
            series("v1", "200", v1.0),
            series("v1", "503", v1.1),
            series("v2", "200", v2.0),
            series("v2", "503", v2.1),
            bucket("5", v1.0 + v1.1 - slow),
            bucket("10", v1.0 + v1.1),
            bucket("+Inf", v1.0 + v1.1),
        )
    }

    #[test]
    fn rates_shares_and_success_over_the_window_from_the_sources_reports() {
        let before = reading(&exposition((100, 0), (10, 0), 0));
        let after = reading(&exposition((280, 0), (20, 10), 90));
        let rows = rows(&before, &after, 2.0);
        assert_eq!(rows.len(), 2);
        let (v1, v2) = (&rows[0], &rows[1]);
        assert_eq!((v1.version.as_str(), v2.version.as_str()), ("v1", "v2"));
        assert_eq!((v1.rps, v2.rps), (90.0, 10.0));
        assert_eq!((v1.share, v2.share), (90.0, 10.0));
        assert_eq!((v1.success, v2.success), (Some(100.0), Some(50.0)));
        // 180 new v1 requests: 90 up to 5 ms, 90 between 5 and 10 ms.
        assert_eq!(v1.p50_ms, Some(5.0));
        assert!((v1.p99_ms.unwrap() - 9.9).abs() < 1e-9, "{v1:?}");
        assert_eq!(v2.p50_ms, None, "no histogram for v2 here");
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
    fn a_version_without_requests_in_the_window_has_no_row() {
        let same = reading(&exposition((100, 0), (10, 0), 0));
        assert!(rows(&same, &same, 1.0).is_empty());
        assert!(table(&[], 10.0).contains("no requests"));
    }
}
