//! Rounds: every scenario once, every load shape once, with the CPU and memory readings taken
//! around each run; and the check that nothing else used the machine meanwhile.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::cpu;
use super::load::{self, Outcome, Shape};
use super::scenarios::{Proxy, Scenario};
use super::syscalls;
use super::topology::Topology;

/// A round is discarded when processes outside the bench used more than this share of the
/// machine during it.
pub const MAX_OTHER_SHARE: f64 = 0.05;

/// How long each shape runs, in seconds, and which shapes run.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Durations {
    pub seconds: u32,
    /// `--quick` and the CI smoke skip the single-connection shape.
    pub single: bool,
    /// The CI smoke skips the fixed-rate latency shape: its client, oha, takes minutes to build
    /// on a fresh machine, which the smoke, a check of the harness, is not worth.
    pub latency: bool,
    /// The fixed-rate shape's own length: long enough in a full run that a p99 rests on
    /// 10,000 samples a round.
    #[serde(default)]
    pub latency_seconds: u32,
}

/// One scenario in one round.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sample {
    pub scenario: String,
    pub throughput: Outcome,
    /// Busy time of the servers' core (CPU 1), tasks and softirqs, per request of the throughput
    /// run, in µs.
    pub server_core_us_per_request: f64,
    /// The same for the client's core (CPU 0).
    pub client_core_us_per_request: f64,
    pub single: Option<Outcome>,
    pub churn: Outcome,
    /// Tunnel handshakes per second (both agents) during the churn run: `mesh-mtls` only. New
    /// client connections ride pooled tunnels, so this stays near zero.
    #[serde(default)]
    pub churn_handshakes_per_second: Option<f64>,
    /// `None` where the fixed-rate latency shape did not run (the CI smoke).
    pub latency: Option<Outcome>,
    /// CPU time of the proxy process during the fixed-rate run, in cores.
    pub proxy_cores_at_fixed_rate: Option<f64>,
    /// Proxy VmRSS (KiB) through the fixed-rate run's second half (see `rss_through`) and in
    /// the middle of the throughput run, and its VmHWM after the round's runs.
    pub proxy_rss_kib_fixed_rate: Option<u64>,
    pub proxy_rss_kib_throughput: Option<u64>,
    pub proxy_hwm_kib: Option<u64>,
    /// What the proxy's processes (both agents for `mesh-mtls`) spent per request under
    /// maximum load; `None` without a proxy.
    #[serde(default)]
    pub proxy_under_load: Option<ProxyCost>,
    /// The same at the fixed rate, where each request wakes the proxy on its own; `None`
    /// without a proxy or without the fixed-rate shape.
    #[serde(default)]
    pub proxy_at_fixed_rate: Option<ProxyCost>,
    /// The same per connection of the churn run (one request each); `None` without a proxy.
    #[serde(default)]
    pub proxy_under_churn: Option<ProxyCost>,
    /// Busy time of the client's and the servers' cores per connection of the churn run, in
    /// µs: a new connection's cost outside the proxy too (the client's `connect`, redirect
    /// included, is charged to the client's core).
    #[serde(default)]
    pub churn_core_us_per_connection: Option<[f64; 2]>,
}

/// A proxy's cost per request over one load shape, as the kernel accounts it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct ProxyCost {
    /// CPU time in user space, µs.
    pub user_us: f64,
    /// CPU time in the kernel, µs, softirqs run in its context included.
    pub kernel_us: f64,
    /// Times its threads were switched out.
    pub switches: f64,
    /// System calls, from a shorter run of the same shape with `perf` attached (its
    /// tracepoint slows every call, so the main run is left uncounted); `None` without `perf`.
    pub syscalls: Option<f64>,
}

impl ProxyCost {
    fn of(spent: &cpu::ProcessTimes, requests: u64, syscalls: Option<f64>) -> ProxyCost {
        let requests = requests.max(1) as f64;
        ProxyCost {
            user_us: spent.user.as_secs_f64() * 1e6 / requests,
            kernel_us: spent.kernel.as_secs_f64() * 1e6 / requests,
            switches: spent.switches as f64 / requests,
            syscalls,
        }
    }
}

impl Sample {
    pub fn errors(&self) -> u64 {
        self.throughput.errors
            + self.single.as_ref().map_or(0, |single| single.errors)
            + self.churn.errors
            + self.latency.as_ref().map_or(0, |latency| latency.errors)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Round {
    pub index: usize,
    pub samples: Vec<Sample>,
    /// CPU used by processes other than the bench's, as a share of all cores over the round.
    pub other_share: f64,
    pub discarded: bool,
    pub seconds: f64,
}

/// Runs every scenario once, starting with a different one each round so that no scenario
/// always follows the same neighbour.
pub fn run(
    index: usize,
    topology: &Topology,
    tools: &super::tools::Tools,
    scenarios: &[Scenario],
    durations: Durations,
) -> Result<Round> {
    let started = Instant::now();
    let before = Accounting::now(topology)?;
    let mut samples = Vec::new();
    for offset in 0..scenarios.len() {
        let scenario = &scenarios[(index + offset) % scenarios.len()];
        let sample = run_scenario(scenario, topology, tools, durations)
            .with_context(|| format!("round {index}, scenario {}", scenario.name))?;
        let percentile = |pick: fn(&Outcome) -> f64| {
            sample
                .latency
                .as_ref()
                .map_or_else(|| "-".to_owned(), |latency| format!("{:.0}", pick(latency)))
        };
        println!(
            "  {:<15} {:>8.0} req/s  churn {:>7.0}  p50 {:>6} µs  p99 {:>6} µs  errors {}",
            sample.scenario,
            sample.throughput.rps,
            sample.churn.rps,
            percentile(|latency| latency.p50_us),
            percentile(|latency| latency.p99_us),
            sample.errors()
        );
        samples.push(sample);
    }
    samples.sort_by_key(|sample| {
        scenarios
            .iter()
            .position(|scenario| scenario.name == sample.scenario)
    });
    let other_share = Accounting::now(topology)?.other_share_since(&before);
    let discarded = other_share > MAX_OTHER_SHARE;
    if discarded {
        println!(
            "  round {index} discarded: other processes used {:.1}% of the CPU",
            other_share * 100.0
        );
    }
    Ok(Round {
        index,
        samples,
        other_share,
        discarded,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn run_scenario(
    scenario: &Scenario,
    topology: &Topology,
    tools: &super::tools::Tools,
    durations: Durations,
) -> Result<Sample> {
    scenario.prepare(topology)?;
    let (url, pod) = scenario.target(topology);
    let pid = scenario.proxy_pid(topology);
    let seconds = durations.seconds;
    let half_run = Duration::from_secs_f64(f64::from(seconds) / 2.0);
    let rss = |pid: Option<u32>| -> Result<Option<u64>> {
        pid.map(|pid| cpu::memory_kib(pid).map(|(rss, _)| rss))
            .transpose()
    };

    // Throughput, with the cores' and the proxy's CPU time around it and the proxy's memory in
    // the middle.
    let mesh = scenario.mesh_pids(topology);
    let proxy_before = cpu::ProcessTimes::of(&mesh)?;
    let cores_before = cpu::cores()?;
    let run = load::start(&topology.node, pod, tools, Shape::Throughput, &url, seconds)?;
    std::thread::sleep(half_run);
    let proxy_rss_kib_throughput = rss(pid)?;
    let throughput = load::finish(run, Shape::Throughput, seconds)?;
    let cores_after = cpu::cores()?;
    let proxy_spent = cpu::ProcessTimes::of(&mesh)?.since(&proxy_before);
    let requests = throughput.requests.max(1) as f64;
    let per_request = |core: usize| {
        let busy = cores_after[core].since(&cores_before[core]).busy();
        busy.as_secs_f64() * 1e6 / requests
    };
    let proxy_under_load = if mesh.is_empty() {
        None
    } else {
        let syscalls = count_syscalls(
            &mesh,
            topology,
            pod,
            tools,
            Shape::Throughput,
            &url,
            seconds,
        )?;
        Some(ProxyCost::of(&proxy_spent, throughput.requests, syscalls))
    };

    let single = if durations.single {
        let run = load::start(&topology.node, pod, tools, Shape::Single, &url, seconds)?;
        Some(load::finish(run, Shape::Single, seconds)?)
    } else {
        None
    };
    let tunnelled = scenario.proxy == Proxy::AgentMutualTls;
    let handshakes_before = if tunnelled {
        Some(topology.tunnel_handshakes()?)
    } else {
        None
    };
    let clock = Instant::now();
    let proxy_before = cpu::ProcessTimes::of(&mesh)?;
    let cores_before = cpu::cores()?;
    let run = load::start(&topology.node, pod, tools, Shape::Churn, &url, seconds)?;
    let churn = load::finish(run, Shape::Churn, seconds)?;
    let cores_after = cpu::cores()?;
    let proxy_spent = cpu::ProcessTimes::of(&mesh)?.since(&proxy_before);
    let churn_handshakes_per_second = match handshakes_before {
        Some(before) => {
            Some((topology.tunnel_handshakes()? - before) / clock.elapsed().as_secs_f64())
        }
        None => None,
    };
    let connections = churn.requests.max(1) as f64;
    let per_connection = |core: usize| {
        let busy = cores_after[core].since(&cores_before[core]).busy();
        busy.as_secs_f64() * 1e6 / connections
    };
    let churn_core_us_per_connection = Some([per_connection(0), per_connection(1)]);
    let proxy_under_churn = if mesh.is_empty() {
        None
    } else {
        let syscalls = count_syscalls(&mesh, topology, pod, tools, Shape::Churn, &url, seconds)?;
        Some(ProxyCost::of(&proxy_spent, churn.requests, syscalls))
    };

    // Fixed rate, with the mesh's own CPU time (all threads of its processes) around it.
    let (latency, proxy_rss_kib_fixed_rate, proxy_cores_at_fixed_rate, proxy_at_fixed_rate) =
        if durations.latency {
            let mesh_time =
                || -> Result<Duration> { mesh.iter().map(|pid| cpu::process_time(*pid)).sum() };
            let mesh_time_before = mesh_time()?;
            let proxy_before = cpu::ProcessTimes::of(&mesh)?;
            let clock = Instant::now();
            let seconds = durations.latency_seconds;
            let run = load::start(&topology.node, pod, tools, Shape::Latency, &url, seconds)?;
            let rss = rss_through(seconds, || rss(pid))?;
            let latency = load::finish(run, Shape::Latency, seconds)?;
            let elapsed = clock.elapsed().as_secs_f64();
            let (cores, cost) = if mesh.is_empty() {
                (None, None)
            } else {
                let cores = (mesh_time()? - mesh_time_before).as_secs_f64() / elapsed;
                let spent = cpu::ProcessTimes::of(&mesh)?.since(&proxy_before);
                let syscalls = count_syscalls(
                    &mesh,
                    topology,
                    pod,
                    tools,
                    Shape::Latency,
                    &url,
                    durations.seconds,
                )?;
                (
                    Some(cores),
                    Some(ProxyCost::of(&spent, latency.requests, syscalls)),
                )
            };
            (Some(latency), rss, cores, cost)
        } else {
            (None, None, None, None)
        };

    Ok(Sample {
        scenario: scenario.name.to_owned(),
        server_core_us_per_request: per_request(1),
        client_core_us_per_request: per_request(0),
        throughput,
        single,
        churn,
        churn_handshakes_per_second,
        latency,
        proxy_cores_at_fixed_rate,
        proxy_rss_kib_fixed_rate,
        proxy_rss_kib_throughput,
        proxy_hwm_kib: pid
            .map(|pid| cpu::memory_kib(pid).map(|(_, hwm)| hwm))
            .transpose()?,
        proxy_under_load,
        proxy_at_fixed_rate,
        proxy_under_churn,
        churn_core_us_per_connection,
    })
}

/// The proxy's RSS at a steady load of `seconds`: the median of a reading each second through
/// the run's second half. The throughput and churn runs before it leave pooled connections and
/// freed pages that go back within about 6 s (a connection sleeps after a second idle, and its
/// buffers return with the next 5 s heap trim); one reading in the middle of the run read that
/// or not as the round's timing had it, 1 to 2 MiB apart for the same build.
fn rss_through(seconds: u32, rss: impl Fn() -> Result<Option<u64>>) -> Result<Option<u64>> {
    let mut readings = Vec::new();
    for second in 1..seconds.max(2) {
        std::thread::sleep(Duration::from_secs(1));
        if second >= seconds / 2 {
            readings.extend(rss()?);
        }
    }
    readings.sort_unstable();
    Ok(readings.get(readings.len() / 2).copied())
}

/// System calls per request of `pids` over a run of `shape` of its own, at most 2 s; `None`
/// where `perf` cannot count them.
fn count_syscalls(
    pids: &[u32],
    topology: &Topology,
    pod: &mesh_tests::Pod,
    tools: &super::tools::Tools,
    shape: Shape,
    url: &str,
    seconds: u32,
) -> Result<Option<f64>> {
    let Some(counting) = syscalls::Counting::start(pids) else {
        return Ok(None);
    };
    // perf attaches to every thread before the load starts.
    std::thread::sleep(Duration::from_millis(300));
    let seconds = seconds.min(2);
    let run = load::start(&topology.node, pod, tools, shape, url, seconds)?;
    let counted = load::finish(run, shape, seconds)?;
    Ok(counting
        .finish()
        .map(|calls| calls as f64 / counted.requests.max(1) as f64))
}

/// CPU time of the whole machine's tasks, of the node's cgroup (everything the bench started
/// there) and of this process.
struct Accounting {
    at: Instant,
    cores: Vec<cpu::CoreTimes>,
    cgroup: Duration,
    own: Duration,
}

impl Accounting {
    fn now(topology: &Topology) -> Result<Self> {
        Ok(Self {
            at: Instant::now(),
            cores: cpu::cores()?,
            cgroup: topology.cgroup_usage()?,
            own: cpu::process_time(std::process::id())?,
        })
    }

    /// Busy time of all cores not spent by the bench's processes, as a share of all cores over
    /// the wall time. Softirqs count as busy: without `CONFIG_IRQ_TIME_ACCOUNTING` (our kernel)
    /// those run in a task's context are charged to that task, hence to our cgroup.
    ///
    /// Signed on purpose: `/proc/stat` is sampled at each tick while the cgroup's time is exact,
    /// so an idle machine reads a little below zero; clamping would hide how big that error is.
    fn other_share_since(&self, earlier: &Accounting) -> f64 {
        let busy: Duration = self
            .cores
            .iter()
            .zip(&earlier.cores)
            .map(|(now, then)| now.since(then).busy())
            .sum();
        let ours = (self.cgroup - earlier.cgroup) + (self.own - earlier.own);
        let other = busy.as_secs_f64() - ours.as_secs_f64();
        let capacity = self.at.duration_since(earlier.at).as_secs_f64() * self.cores.len() as f64;
        other / capacity
    }
}
