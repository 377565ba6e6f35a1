//! From rounds to figures: per scenario, the median with min–max over the kept rounds, each
//! "added" figure taken against the baseline *of the same round* before aggregating.

use std::collections::BTreeMap;

use serde::Serialize;

use super::load::{Outcome, FIXED_RPS};
use super::rounds::{ProxyCost, Round, Sample};
use super::scenarios::{Proxy, Scenario};

/// Median with min and max over rounds.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Option<Spread> {
        values.retain(|value| value.is_finite());
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: values[0],
            max: values[n - 1],
        })
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Figures {
    pub scenario: String,
    pub baseline: String,
    pub body: String,
    pub has_proxy: bool,
    pub rps: Option<Spread>,
    pub ratio: Option<Spread>,
    /// Servers' core µs per request minus the baseline's.
    pub added_cpu_us: Option<Spread>,
    pub single_rtt_us: Option<Spread>,
    pub churn_rps: Option<Spread>,
    pub churn_ratio: Option<Spread>,
    /// Tunnel handshakes per second during the churn run (`mesh-mtls`).
    pub churn_handshakes_per_second: Option<Spread>,
    pub p50_us: Option<Spread>,
    pub p99_us: Option<Spread>,
    pub added_p50_us: Option<Spread>,
    pub added_p90_us: Option<Spread>,
    pub added_p99_us: Option<Spread>,
    /// The proxy process's cores per 1,000 rps, from the fixed-rate run.
    pub vcpu_per_1k_rps: Option<Spread>,
    pub rss_mib_fixed_rate: Option<Spread>,
    pub rss_mib_throughput: Option<Spread>,
    pub hwm_mib: Option<Spread>,
    /// The proxy's cost per request (all its processes) under maximum load and at the fixed
    /// rate.
    pub proxy_under_load: CostFigures,
    pub proxy_at_fixed_rate: CostFigures,
    /// The same per connection of the churn run, and the client's and the servers' cores'
    /// busy µs per connection there.
    pub proxy_under_churn: CostFigures,
    pub churn_client_core_us: Option<Spread>,
    pub churn_server_core_us: Option<Spread>,
    pub errors: u64,
    /// `shape: kind` → count, over the rounds.
    pub error_kinds: BTreeMap<String, u64>,
}

/// A proxy's cost per request: user and kernel CPU-µs, system calls and context switches.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct CostFigures {
    pub user_us: Option<Spread>,
    pub kernel_us: Option<Spread>,
    pub syscalls: Option<Spread>,
    pub switches: Option<Spread>,
}

impl CostFigures {
    fn of<'a>(samples: impl Iterator<Item = Option<&'a ProxyCost>> + Clone) -> CostFigures {
        let spread = |pick: fn(&ProxyCost) -> Option<f64>| {
            Spread::of(samples.clone().flatten().filter_map(pick).collect())
        };
        CostFigures {
            user_us: spread(|cost| Some(cost.user_us)),
            kernel_us: spread(|cost| Some(cost.kernel_us)),
            syscalls: spread(|cost| cost.syscalls),
            switches: spread(|cost| Some(cost.switches)),
        }
    }

    /// The kernel's share of the CPU time, from the medians.
    pub fn kernel_share(&self) -> Option<f64> {
        let (user, kernel) = (self.user_us?.median, self.kernel_us?.median);
        (user + kernel > 0.0).then(|| kernel / (user + kernel))
    }
}

/// Figures of every scenario over `rounds` (the caller passes the kept ones).
pub fn figures(scenarios: &[Scenario], rounds: &[&Round]) -> Vec<Figures> {
    scenarios
        .iter()
        .map(|scenario| figures_of(scenario, rounds))
        .collect()
}

fn figures_of(scenario: &Scenario, rounds: &[&Round]) -> Figures {
    // (this scenario's sample, its baseline's sample) per round.
    let pairs: Vec<(&Sample, &Sample)> = rounds
        .iter()
        .filter_map(|round| {
            let find = |name: &str| round.samples.iter().find(|s| s.scenario == name);
            Some((find(scenario.name)?, find(scenario.baseline)?))
        })
        .collect();
    let spread = |f: &dyn Fn(&Sample, &Sample) -> f64| {
        Spread::of(pairs.iter().map(|(s, b)| f(s, b)).collect())
    };
    let optional = |f: &dyn Fn(&Sample) -> Option<f64>| {
        Spread::of(pairs.iter().filter_map(|(s, _)| f(s)).collect())
    };
    let mib = |kib: Option<u64>| kib.map(|kib| kib as f64 / 1024.0);
    let is_baseline = scenario.name == scenario.baseline;
    let added = |f: &dyn Fn(&Sample, &Sample) -> f64| if is_baseline { None } else { spread(f) };
    // Absent, like `single`, where the fixed-rate latency shape did not run.
    let latency = |pick: fn(&Outcome) -> f64| optional(&|s| s.latency.as_ref().map(pick));
    let added_latency = |pick: fn(&Outcome) -> f64| {
        if is_baseline {
            return None;
        }
        Spread::of(
            pairs
                .iter()
                .filter_map(|(s, b)| Some(pick(s.latency.as_ref()?) - pick(b.latency.as_ref()?)))
                .collect(),
        )
    };
    Figures {
        scenario: scenario.name.to_owned(),
        baseline: scenario.baseline.to_owned(),
        body: scenario.body.to_owned(),
        has_proxy: scenario.proxy != Proxy::None,
        rps: spread(&|s, _| s.throughput.rps),
        ratio: spread(&|s, b| s.throughput.rps / b.throughput.rps),
        added_cpu_us: added(&|s, b| s.server_core_us_per_request - b.server_core_us_per_request),
        single_rtt_us: optional(&|s| s.single.as_ref().map(|single| 1e6 / single.rps)),
        churn_rps: spread(&|s, _| s.churn.rps),
        churn_ratio: spread(&|s, b| s.churn.rps / b.churn.rps),
        churn_handshakes_per_second: optional(&|s| s.churn_handshakes_per_second),
        p50_us: latency(|l| l.p50_us),
        p99_us: latency(|l| l.p99_us),
        added_p50_us: added_latency(|l| l.p50_us),
        added_p90_us: added_latency(|l| l.p90_us),
        added_p99_us: added_latency(|l| l.p99_us),
        vcpu_per_1k_rps: optional(&|s| {
            s.proxy_cores_at_fixed_rate
                .map(|cores| cores * 1000.0 / f64::from(FIXED_RPS))
        }),
        rss_mib_fixed_rate: optional(&|s| mib(s.proxy_rss_kib_fixed_rate)),
        rss_mib_throughput: optional(&|s| mib(s.proxy_rss_kib_throughput)),
        hwm_mib: optional(&|s| mib(s.proxy_hwm_kib)),
        proxy_under_load: CostFigures::of(pairs.iter().map(|(s, _)| s.proxy_under_load.as_ref())),
        proxy_at_fixed_rate: CostFigures::of(
            pairs.iter().map(|(s, _)| s.proxy_at_fixed_rate.as_ref()),
        ),
        proxy_under_churn: CostFigures::of(pairs.iter().map(|(s, _)| s.proxy_under_churn.as_ref())),
        churn_client_core_us: optional(&|s| s.churn_core_us_per_connection.map(|[c, _]| c)),
        churn_server_core_us: optional(&|s| s.churn_core_us_per_connection.map(|[_, s]| s)),
        errors: pairs.iter().map(|(s, _)| s.errors()).sum(),
        error_kinds: error_kinds(pairs.iter().map(|(s, _)| *s)),
    }
}

fn error_kinds<'a>(samples: impl Iterator<Item = &'a Sample>) -> BTreeMap<String, u64> {
    let mut kinds = BTreeMap::new();
    for sample in samples {
        let shapes = [
            ("throughput", Some(&sample.throughput)),
            ("single", sample.single.as_ref()),
            ("churn", Some(&sample.churn)),
            ("latency", sample.latency.as_ref()),
        ];
        for (shape, outcome) in shapes {
            for (kind, n) in outcome.map(|o| &o.error_kinds).into_iter().flatten() {
                *kinds.entry(format!("{shape}: {kind}")).or_default() += n;
            }
        }
    }
    kinds
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::scenarios::{self, Scenario};

    fn scenario(name: &str) -> Scenario {
        *scenarios::ALL.iter().find(|s| s.name == name).unwrap()
    }

    fn outcome(rps: f64, errors: u64, p50_us: f64) -> Outcome {
        Outcome {
            requests: 1000,
            rps,
            errors,
            p50_us,
            p90_us: p50_us,
            p99_us: p50_us,
            error_kinds: BTreeMap::from([("read".to_owned(), errors)]),
        }
    }

    fn sample(name: &str, rps: f64, latency: Option<Outcome>) -> Sample {
        Sample {
            scenario: name.to_owned(),
            throughput: outcome(rps, 0, f64::NAN),
            server_core_us_per_request: 10.0,
            client_core_us_per_request: 10.0,
            single: None,
            churn: outcome(rps / 2.0, 2, f64::NAN),
            churn_handshakes_per_second: None,
            latency,
            proxy_cores_at_fixed_rate: None,
            proxy_rss_kib_fixed_rate: None,
            proxy_rss_kib_throughput: None,
            proxy_hwm_kib: None,
            proxy_under_load: None,
            proxy_at_fixed_rate: None,
            proxy_under_churn: None,
            churn_core_us_per_connection: None,
        }
    }

    fn round(samples: Vec<Sample>) -> Round {
        Round {
            index: 0,
            samples,
            other_share: 0.0,
            discarded: false,
            seconds: 1.0,
        }
    }

    #[test]
    fn a_skipped_latency_shape_leaves_its_figures_absent_and_still_counts_errors() {
        let scenarios = [scenario("direct"), scenario("mesh-l7")];
        let skipped = round(vec![
            sample("direct", 1000.0, None),
            sample("mesh-l7", 500.0, None),
        ]);
        let mesh = &figures(&scenarios, &[&skipped])[1];
        assert!(mesh.p50_us.is_none() && mesh.added_p50_us.is_none());
        assert!(mesh.added_p99_us.is_none());
        assert_eq!(mesh.ratio.map(|s| s.median), Some(0.5));
        assert_eq!(mesh.errors, 2);
        assert_eq!(mesh.error_kinds.get("churn: read"), Some(&2));

        let measured = round(vec![
            sample("direct", 1000.0, Some(outcome(1000.0, 0, 100.0))),
            sample("mesh-l7", 500.0, Some(outcome(1000.0, 1, 250.0))),
        ]);
        let mesh = &figures(&scenarios, &[&measured])[1];
        assert_eq!(mesh.added_p50_us.map(|s| s.median), Some(150.0));
        assert_eq!(mesh.errors, 3);
    }
}
