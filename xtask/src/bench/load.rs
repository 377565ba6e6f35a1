//! The four load shapes, run from a client pod pinned to CPU 0, and what their output says.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use mesh_tests::{Pod, PodProcess, SimNode};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::tools::Tools;

/// The client's core; servers and proxies get the other one.
pub const CLIENT_CPU: &str = "0";
/// The fixed rate of the latency shape.
pub const FIXED_RPS: u32 = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Max throughput over keep-alive: `wrk -t1 -c64`.
    Throughput,
    /// One connection, one request at a time: the round trip, `wrk -t1 -c1`.
    Single,
    /// A new connection per request: `wrk -t1 -c64 -H 'Connection: close'`.
    Churn,
    /// 1,000 rps with coordinated-omission correction: `oha -q 1000 --latency-correction`.
    Latency,
}

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Shape::Throughput => "throughput",
            Shape::Single => "single",
            Shape::Churn => "churn",
            Shape::Latency => "latency",
        }
    }
}

/// What one run of a shape measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Outcome {
    pub requests: u64,
    pub rps: f64,
    /// Socket errors, timeouts and non-2xx answers.
    pub errors: u64,
    /// Latency percentiles in µs (the latency shape only).
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    /// What the errors were (oha's error kinds and non-2xx codes), for the report.
    #[serde(default)]
    pub error_kinds: BTreeMap<String, u64>,
}

impl Outcome {
    fn add_error(&mut self, kind: &str, n: u64) {
        if n > 0 {
            self.errors += n;
            *self.error_kinds.entry(kind.to_owned()).or_default() += n;
        }
    }
}

/// Starts `shape` against `url` from `pod` for `seconds`.
pub fn start(
    node: &SimNode,
    pod: &Pod,
    tools: &Tools,
    shape: Shape,
    url: &str,
    seconds: u32,
) -> Result<PodProcess> {
    let mut command = Command::new("taskset");
    command.args(["-c", CLIENT_CPU]);
    let duration = format!("{seconds}s");
    match shape {
        Shape::Throughput | Shape::Single | Shape::Churn => {
            let connections = if shape == Shape::Single { "1" } else { "64" };
            command
                .arg(&tools.wrk)
                .args(["-t1", "-c", connections, "-d", &duration]);
            if shape == Shape::Churn {
                command.args(["-H", "Connection: close"]);
            }
        }
        Shape::Latency => {
            let oha = tools.oha.as_ref().context(
                "the fixed-rate latency shape needs oha, which this run did not install",
            )?;
            let rate = FIXED_RPS.to_string();
            // A few connections, so one slow answer delays the next requests (which the latency
            // correction then counts) without stalling the whole schedule.
            command.arg(oha).args([
                "-q",
                &rate,
                "--latency-correction",
                // Requests in flight at the deadline are answers, not "aborted" errors.
                "-w",
                "-c",
                "4",
                "-z",
                &duration,
                "--no-tui",
                "--output-format",
                "json",
            ]);
        }
    }
    command.arg(url);
    node.spawn_in_pod(pod, command)
}

/// Waits for the run started by [`start`] and parses its output.
pub fn finish(mut process: PodProcess, shape: Shape, seconds: u32) -> Result<Outcome> {
    let status = process.finish(Duration::from_secs(u64::from(seconds) + 30))?;
    let stdout = process.stdout().text();
    if !status.success() {
        bail!(
            "{} failed ({status}): {stdout}{}",
            shape.name(),
            process.stderr().text()
        );
    }
    match shape {
        Shape::Latency => parse_oha(&stdout),
        _ => parse_wrk(&stdout),
    }
    .with_context(|| format!("parsing the {} output:\n{stdout}", shape.name()))
}

/// wrk's text report: `N requests in`, `Requests/sec:`, `Socket errors: connect A, read B, write
/// C, timeout D` and `Non-2xx or 3xx responses: N`.
fn parse_wrk(text: &str) -> Result<Outcome> {
    let mut outcome = Outcome::default();
    for line in text.lines().map(str::trim) {
        if let Some((count, _)) = line.split_once(" requests in ") {
            outcome.requests = count.trim().parse().context("request count")?;
        } else if let Some(rate) = line.strip_prefix("Requests/sec:") {
            outcome.rps = rate.trim().parse().context("Requests/sec")?;
        } else if let Some(errors) = line.strip_prefix("Socket errors:") {
            // `connect 0, read 3, write 1, timeout 0`
            for part in errors.split(',') {
                let mut words = part.split_whitespace();
                if let (Some(kind), Some(Ok(n))) = (words.next(), words.next().map(str::parse)) {
                    outcome.add_error(kind, n);
                }
            }
        } else if let Some(count) = line.strip_prefix("Non-2xx or 3xx responses:") {
            outcome.add_error("non-2xx", count.trim().parse().context("non-2xx count")?);
        }
    }
    if outcome.requests == 0 {
        bail!("wrk made no request");
    }
    Ok(outcome)
}

/// oha's JSON summary: seconds, which we turn into µs.
fn parse_oha(text: &str) -> Result<Outcome> {
    let start = text.find('{').context("no JSON")?;
    let json: Value = serde_json::from_str(&text[start..])?;
    let percentile = |name: &str| {
        json["latencyPercentiles"][name]
            .as_f64()
            .unwrap_or(f64::NAN)
            * 1e6
    };
    let statuses = json["statusCodeDistribution"]
        .as_object()
        .context("no statusCodeDistribution")?;
    let count = |value: &Value| value.as_u64().unwrap_or(0);
    let ok: u64 = statuses
        .iter()
        .filter(|(code, _)| code.starts_with('2'))
        .map(|(_, n)| count(n))
        .sum();
    let bad: u64 = statuses
        .iter()
        .filter(|(code, _)| !code.starts_with('2'))
        .map(|(_, n)| count(n))
        .sum();
    let mut error_kinds: BTreeMap<String, u64> = statuses
        .iter()
        .filter(|(code, _)| !code.starts_with('2'))
        .map(|(code, n)| (format!("status {code}"), count(n)))
        .collect();
    if let Some(errors) = json["errorDistribution"].as_object() {
        error_kinds.extend(errors.iter().map(|(kind, n)| (kind.clone(), count(n))));
    }
    let failed: u64 = error_kinds.values().sum::<u64>() - bad;
    if ok == 0 {
        bail!("oha got no successful answer");
    }
    Ok(Outcome {
        requests: ok + bad,
        rps: json["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
        errors: bad + failed,
        p50_us: percentile("p50"),
        p90_us: percentile("p90"),
        p99_us: percentile("p99"),
        error_kinds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_report() {
        let text = "Running 2s test @ http://10.77.0.4:8080/\n  1 threads and 64 connections\n\
                    \x20 24680 requests in 2.00s, 2.1MB read\n\
                    \x20 Socket errors: connect 0, read 3, write 1, timeout 0\n\
                    \x20 Non-2xx or 3xx responses: 2\nRequests/sec:  12340.50\nTransfer/sec: 1MB\n";
        let outcome = parse_wrk(text).unwrap();
        assert_eq!(outcome.requests, 24680);
        assert_eq!(outcome.errors, 6);
        assert!((outcome.rps - 12340.5).abs() < 1e-9);
    }
}
