//! A real Prometheus (Debian's `prometheus`, installed on first use) on a simulated node: it
//! scrapes the agent's admin port there every second, over the node's loopback, and answers
//! PromQL through its HTTP API, as it would for Kiali or Grafana.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::{agent::ADMIN, http, packages, PodProcess, SimNode};

/// Where Prometheus listens, inside the node's network namespace.
const LISTEN: &str = "127.0.0.1:9090";
const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);
const READY_WITHIN: Duration = Duration::from_secs(60);

pub struct Prometheus<'n> {
    node: &'n SimNode,
    // Field order is drop order: the process before its data directory.
    _process: PodProcess,
    _data: tempfile::TempDir,
}

/// One series of an instant vector: its labels and value.
#[derive(Clone, Debug)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl<'n> Prometheus<'n> {
    /// Starts Prometheus on `node`, scraping the agent's Istio-style endpoint
    /// (`/stats/prometheus` on [`ADMIN`]), and waits until it is ready.
    pub fn start(node: &'n SimNode) -> Result<Prometheus<'n>> {
        packages::ensure(&["prometheus"], |line| eprintln!("prometheus: {line}"))?;
        let data = tempfile::Builder::new()
            .prefix("mesh-prometheus-")
            .tempdir()?;
        let config = data.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: {interval}s, evaluation_interval: {interval}s}}\n\
                 scrape_configs:\n\
                 - job_name: mesh-agent\n  \
                   metrics_path: /stats/prometheus\n  \
                   static_configs: [{{targets: ['{ADMIN}']}}]\n",
                interval = SCRAPE_INTERVAL.as_secs()
            ),
        )?;
        let mut command = Command::new("prometheus");
        command
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                data.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={LISTEN}"))
            .arg("--log.level=warn");
        let process = node.spawn_on_node(command)?;
        let prometheus = Prometheus {
            node,
            _process: process,
            _data: data,
        };
        let started = Instant::now();
        while !prometheus
            .get("/-/ready")
            .is_ok_and(|(status, _)| status == 200)
        {
            ensure!(
                started.elapsed() < READY_WITHIN,
                "Prometheus not ready within {READY_WITHIN:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(prometheus)
    }

    /// Waits until Prometheus has scraped the agent after this call began, so that a query
    /// sees everything the agent had counted by then.
    pub fn wait_for_scrape(&self) -> Result<()> {
        let asked = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
        let started = Instant::now();
        loop {
            let last = self.query("max(timestamp(up{job=\"mesh-agent\"} == 1))")?;
            if last.first().is_some_and(|sample| sample.value > asked) {
                return Ok(());
            }
            ensure!(
                started.elapsed() < 10 * SCRAPE_INTERVAL,
                "no successful scrape of the agent in {:?}: {:?}",
                10 * SCRAPE_INTERVAL,
                self.query("up")
            );
            std::thread::sleep(SCRAPE_INTERVAL / 4);
        }
    }

    /// The instant vector `promql` evaluates to now.
    pub fn query(&self, promql: &str) -> Result<Vec<Sample>> {
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("query", promql)
            .finish();
        let address: SocketAddr = LISTEN.parse()?;
        let headers = [("content-type", "application/x-www-form-urlencoded")];
        let (status, text) = self
            .node
            .run_on_node(move || http::request(address, "POST", "/api/v1/query", &headers, &body))?
            .with_context(|| format!("querying {promql}"))?;
        let answer: Value = serde_json::from_str(&text)
            .with_context(|| format!("Prometheus answered {status}: {text}"))?;
        if status != 200 || answer["status"] != "success" {
            bail!("{promql}: Prometheus answered {status}: {text}");
        }
        let result = answer["data"]["result"]
            .as_array()
            .with_context(|| format!("{promql}: not a vector: {text}"))?;
        result
            .iter()
            .map(|series| {
                let labels = series["metric"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(name, value)| (name.clone(), value.as_str().unwrap_or("").to_owned()))
                    .collect();
                let value = series["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .with_context(|| format!("{promql}: a sample without a value: {series}"))?;
                Ok(Sample { labels, value })
            })
            .collect()
    }

    fn get(&self, path: &'static str) -> Result<(u16, String)> {
        let address: SocketAddr = LISTEN.parse()?;
        self.node
            .run_on_node(move || http::request(address, "GET", path, &[], ""))?
    }
}
