//! `cargo xtask bench`: what one mesh hop costs, against a direct connection and against nginx
//! and HAProxy, on one simulated node, in one run (issue 7).
//!
//! Build in release → install missing tools → start the node ([`topology`]) → rounds of every
//! scenario ([`scenarios`]) under every load shape ([`load`]) → figures ([`summary`]) → JSON,
//! and for full runs `docs/performance.md` + `docs/performance.svg` ([`report`], [`chart`]).
//! `cargo xtask test` ends with a cut-down run of the same path, [`Mode::CiSmoke`].

mod chart;
mod cpu;
mod hello;
mod hyper_proxy;
mod load;
mod proxies;
mod report;
mod request_cost;
mod rounds;
mod scale;
mod scenarios;
mod summary;
pub mod symbol_order;
mod syscalls;
mod tools;
mod topology;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::{build_ebpf, cargo};
use rounds::Durations;
use summary::Spread;
use topology::{Binaries, Topology};

#[derive(clap::Args)]
pub struct Args {
    /// Rounds of all scenarios, interleaved round-robin.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds per load shape [default: 4, or 2 with --quick].
    #[arg(long)]
    seconds: Option<u32>,
    /// Smoke check: one round, 2 s per shape, no single-connection shape, then a tiny
    /// `--scale`; asserts only that every scenario answered without errors, and writes only the
    /// JSON (not the docs).
    #[arg(long)]
    quick: bool,
    /// Run only these scenarios (repeatable), e.g. `--only direct --only mesh-l7` while
    /// profiling; the docs are then left alone, and the request cost (`--request-cost`, about
    /// 5 minutes) is not measured.
    #[arg(long, value_name = "SCENARIO", conflicts_with = "ci_smoke")]
    only: Vec<String>,
    /// Measure only the agent's instructions and allocations per request under callgrind
    /// (20,000 requests) on `mesh-l7`'s path, on `mesh-mtls`'s (both ends in one agent) and on
    /// `mesh-mtls`'s with an AuthorizationPolicy judged per request, and on the plaintext inbound
    /// hop (a client outside the mesh captured at the pod, judged per request), and the same as
    /// `mesh-l7`'s through `hyper-l7`'s bare hyper proxy for reference, e.g. to judge a change
    /// to the request path; no rounds, no peers, the docs are left alone.
    #[arg(long, conflicts_with_all = ["quick", "only"])]
    request_cost: bool,
    /// With `--request-cost`: also rewrite mesh-agent/link/symbol-order.txt, the functions the
    /// agent ran in those runs, which its release build lays out side by side (fewer pages of
    /// code resident). Run it when the request path or start-up changed much.
    #[arg(long, requires = "request_cost")]
    symbol_order: bool,
    /// Measure only how the agent's costs grow with a node's size (by hand, ~6 min after the
    /// release build): the cost per request under callgrind, the start-up time and the memory
    /// with 1 to 1,001 services in the folder (10,000 endpoints and 5,000 pods at the largest);
    /// the time, memory and kernel maps per enrolled pod (3 to 503) and the hop's cost with
    /// them; the memory per idle keep-alive connection (10,000); throughput with `--workers` 1
    /// and 2; no rounds, no peers; writes its own section of docs/performance.md and
    /// docs/performance-scale.svg.
    #[arg(long, conflicts_with_all = ["quick", "only", "request_cost"])]
    scale: bool,
    /// Internal: be the benchmark's hello server on PORT=BYTES (repeatable).
    #[arg(long, hide = true, value_name = "PORT=BYTES", value_parser = hello::Listener::parse)]
    serve: Vec<hello::Listener>,
    /// Internal: be `hyper-l7`'s proxy on PORT, nine requests in ten to V1 (IP:PORT), one to
    /// V2.
    #[arg(long, hide = true, value_name = "PORT=V1,V2", value_parser = hyper_proxy::Split::parse)]
    hyper_proxy: Option<hyper_proxy::Split>,
    /// Internal: only the smoke `cargo xtask test` ends with ([`Mode::CiSmoke`]), to time or
    /// debug it alone; needs `cargo build --workspace --bins` done.
    #[arg(long, hide = true, conflicts_with_all = ["quick", "seconds", "request_cost", "scale"])]
    ci_smoke: bool,
}

/// How much a run does, and on which binaries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// `cargo xtask bench`: every shape, `--rounds` rounds, request cost; rewrites the docs.
    Full,
    /// `cargo xtask bench --quick`, by hand: one round of 2 s shapes (no single connection) on
    /// release binaries, request cost and a tiny `--scale` included: figures worth a glance,
    /// written to JSON only.
    Quick,
    /// The end of `cargo xtask test`: does the harness still work, not how fast anything is.
    /// It runs the debug binaries CI has just built and only wrk's shapes (throughput, churn),
    /// 1 s each: the release build (~5 min on CI's 2 cores), oha (~8 min to install on a fresh
    /// machine) and callgrind would cost every CI run more than they tell it. It checks what
    /// `--quick` checks: no errors, connections redirected, the 90/10 split, nothing left.
    CiSmoke,
}

impl Mode {
    fn of(args: &Args) -> Mode {
        if args.ci_smoke {
            Mode::CiSmoke
        } else if args.quick {
            Mode::Quick
        } else {
            Mode::Full
        }
    }

    fn durations(self, seconds: Option<u32>) -> Durations {
        let default = match self {
            Mode::Full => 4,
            Mode::Quick => 2,
            Mode::CiSmoke => 1,
        };
        let seconds = seconds.unwrap_or(default);
        Durations {
            seconds,
            single: self == Mode::Full,
            latency: self != Mode::CiSmoke,
            // 10,000 samples at the fixed rate make a p99 worth reading.
            latency_seconds: if self == Mode::Full {
                seconds.max(10_000 / load::FIXED_RPS)
            } else {
                seconds
            },
        }
    }

    /// What runs it, for the console.
    fn command(self) -> &'static str {
        match self {
            Mode::Full => "cargo xtask bench",
            Mode::Quick => "cargo xtask bench --quick",
            Mode::CiSmoke => "the CI smoke of the bench (cargo xtask test)",
        }
    }

    /// Requests the agent serves under callgrind.
    fn request_cost_requests(self) -> Option<u64> {
        match self {
            Mode::Full => Some(20_000),
            Mode::Quick => Some(2_000),
            Mode::CiSmoke => None,
        }
    }

    /// Builds what the run needs and says where the binaries are.
    fn build(self, root: &Path) -> Result<Binaries> {
        let profile = if self == Mode::CiSmoke {
            // `cargo xtask test` built the eBPF object and these binaries before its tests: this
            // build has nothing to do then, and guards a smoke run on its own.
            cargo(root, &["build", "--workspace", "--bins"])?;
            "debug"
        } else {
            build_ebpf::run()?;
            cargo(root, &["build", "--release", "--workspace", "--bins"])?;
            "release"
        };
        let dir = root.join("target").join(profile);
        let binaries = Binaries {
            agent: dir.join("mesh-agent"),
            upstream: dir.join("upstream"),
            hog: dir.join("hog"),
            xtask: dir.join("xtask"),
        };
        // Only the release build is laid out by the symbol order.
        if profile == "release" {
            symbol_order::warn_if_stale(root, &binaries.agent)?;
        }
        Ok(binaries)
    }
}

/// The smoke check `cargo xtask test` ends with: [`Mode::CiSmoke`].
pub fn ci_smoke() -> Result<()> {
    run(Args {
        rounds: 1,
        seconds: None,
        quick: false,
        only: Vec::new(),
        request_cost: false,
        symbol_order: false,
        scale: false,
        serve: Vec::new(),
        hyper_proxy: None,
        ci_smoke: true,
    })
}

pub fn run(args: Args) -> Result<()> {
    if !args.serve.is_empty() {
        return hello::serve(&args.serve);
    }
    if let Some(split) = args.hyper_proxy {
        return hyper_proxy::serve(split);
    }
    mesh_tests::require_root();
    let root = build_ebpf::workspace_root();
    let mode = Mode::of(&args);
    let durations = mode.durations(args.seconds);
    let cost_requests = mode
        .request_cost_requests()
        .filter(|_| args.only.is_empty());
    if cost_requests.is_some() {
        tools::ensure_callgrind()?;
    }
    if args.scale {
        let binaries = mode.build(&root)?;
        mesh_tests::set_echo(false);
        let scale = scale::run(&root, &binaries, &scale::Sizes::FULL)?;
        println!("raw figures: {}", scale.write_json(&root)?.display());
        std::fs::write(root.join("docs/performance-scale.svg"), scale.svg())?;
        report::write_section(&root, scale::HEADING, &scale.markdown())?;
        println!("wrote its section of docs/performance.md and docs/performance-scale.svg");
        return Ok(());
    }
    let tools = if args.request_cost {
        None
    } else {
        Some(tools::ensure(durations.latency)?)
    };
    let binaries = mode.build(&root)?;
    let rounds = if mode == Mode::Full {
        args.rounds.max(1)
    } else {
        1
    };
    let scenarios = scenarios::select(&args.only)?;
    let through_agent = scenarios.iter().any(|s| s.through_ebpf_agent());

    // The processes' output would drown the progress lines; errors still carry it.
    mesh_tests::set_echo(false);
    let measure_cost = |upstream, folder: &str| {
        let Some(requests) = cost_requests else {
            return Ok(None);
        };
        println!("agent under callgrind: {requests} requests, {upstream:?} upstream");
        let cost = request_cost::measure(
            &binaries.agent,
            &binaries.upstream,
            &root.join("target/bench").join(folder),
            requests,
            upstream,
            request_cost::Beside::default(),
            args.symbol_order,
        )
        .with_context(|| format!("measuring the cost per request, {upstream:?} upstream"))?;
        println!("  {}", cost.summary("the agent's"));
        anyhow::Ok(Some(cost))
    };
    let request_cost = measure_cost(request_cost::Upstream::Plain, "request-cost")?;
    let request_cost_tunnel = measure_cost(request_cost::Upstream::Tunnel, "request-cost-tunnel")?;
    let request_cost_judged = measure_cost(request_cost::Upstream::Judged, "request-cost-judged")?;
    let request_cost_captured =
        measure_cost(request_cost::Upstream::Captured, "request-cost-captured")?;
    let request_cost_hyper = match cost_requests {
        Some(requests) => {
            println!("hyper-l7's proxy under callgrind: {requests} requests");
            let cost = request_cost::measure_hyper(
                &binaries.xtask,
                &binaries.upstream,
                &root.join("target/bench/request-cost-hyper"),
                requests,
            )
            .context("measuring the cost per request of hyper-l7's proxy")?;
            println!("  {}", cost.summary("the proxy's"));
            Some(cost)
        }
        None => None,
    };
    if args.symbol_order {
        // The default path first, then the plain inbound hop, then the tunnel's; last what a
        // burst of idle connections runs, apart, so that only a burst pages it in.
        let costs: Vec<&request_cost::RequestCost> = [
            &request_cost,
            &request_cost_captured,
            &request_cost_tunnel,
            &request_cost_judged,
        ]
        .into_iter()
        .flatten()
        .collect();
        let mut paths: Vec<Vec<&Path>> = costs
            .iter()
            .map(|cost| {
                let profiles = cost.profiles_run.iter().chain([&cost.profile]);
                profiles.map(PathBuf::as_path).collect()
            })
            .collect();
        paths.push(
            costs
                .iter()
                .map(|cost| cost.profile_burst.as_path())
                .collect(),
        );
        let listed = symbol_order::write(&root, &binaries.agent, &paths)?;
        println!("wrote {} ({listed} functions)", symbol_order::PATH);
    }
    let Some(tools) = tools else {
        return Ok(());
    };
    let oha = tools.oha.as_ref().map(|oha| {
        std::process::Command::new(oha)
            .arg("--version")
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .unwrap_or_default()
    });
    let topology = Topology::start(&binaries, &tools)?;
    let ids = topology.ids();
    let agent_idle_rss_kib = cpu::memory_kib(
        topology
            .agent_pid()
            .context("the eBPF agent is not running")?,
    )?
    .0;
    let redirected_before = topology.redirected()?;
    let mut done = Vec::new();
    for index in 0..rounds {
        println!("round {} of {rounds}", index + 1);
        done.push(rounds::run(
            index, &topology, &tools, &scenarios, durations,
        )?);
    }
    let redirected = topology.redirected()? - redirected_before;
    let (v1, v2) = topology.requests_by_version()?;
    let split_checked = scenarios.iter().any(|s| s.split_by_agent());
    let v2_share = if split_checked { v2 / (v1 + v2) } else { 0.0 };
    drop(topology);
    let leftovers: Vec<String> = ids
        .iter()
        .flat_map(|id| mesh_tests::leftovers_of(id))
        .collect();
    if !leftovers.is_empty() {
        bail!("the bench left these behind: {leftovers:?}");
    }

    let kept: Vec<&rounds::Round> = done.iter().filter(|round| !round.discarded).collect();
    let all_rounds_noisy = kept.is_empty();
    let used: Vec<&rounds::Round> = if all_rounds_noisy {
        done.iter().collect()
    } else {
        kept
    };
    let figures = summary::figures(&scenarios, &used);
    let report = report::Report {
        machine: report::Machine::probe(&root),
        mode,
        durations,
        oha,
        agent_idle_rss_kib,
        request_cost,
        request_cost_tunnel,
        request_cost_judged,
        request_cost_captured,
        request_cost_hyper,
        v2_share,
        rounds: &done,
        figures: &figures,
        all_rounds_noisy,
    };
    let json = report::write_json(&root, &report)?;
    println!("raw figures: {}", json.display());
    if mode == Mode::CiSmoke {
        println!(
            "CI smoke: debug binaries, wrk shapes only, so these figures say nothing about speed; \
             `-`: not measured (no fixed-rate latency shape)"
        );
    }
    for fig in &figures {
        println!(
            "{:<15} ratio {:>6}  added CPU-µs {:>6}  added p50/p99 {:>5}/{:>5} µs  errors {}  \
             proxy per request: user {} µs, kernel {} µs, {} syscalls, {} switches",
            fig.scenario,
            median(fig.ratio, 3),
            median(fig.added_cpu_us, 1),
            median(fig.added_p50_us, 0),
            median(fig.added_p99_us, 0),
            fig.errors,
            median(fig.proxy_under_load.user_us, 1),
            median(fig.proxy_under_load.kernel_us, 1),
            median(fig.proxy_under_load.syscalls, 2),
            median(fig.proxy_under_load.switches, 2),
        );
        if fig.has_proxy {
            println!(
                "{:<15} at the fixed rate, per request: user {} µs, kernel {} µs, {} syscalls, \
                 {} switches",
                "",
                median(fig.proxy_at_fixed_rate.user_us, 1),
                median(fig.proxy_at_fixed_rate.kernel_us, 1),
                median(fig.proxy_at_fixed_rate.syscalls, 2),
                median(fig.proxy_at_fixed_rate.switches, 2),
            );
            println!(
                "{:<15} churn, per connection: user {} µs, kernel {} µs, {} syscalls, {} \
                 switches; client core {} µs, servers' core {} µs",
                "",
                median(fig.proxy_under_churn.user_us, 1),
                median(fig.proxy_under_churn.kernel_us, 1),
                median(fig.proxy_under_churn.syscalls, 2),
                median(fig.proxy_under_churn.switches, 2),
                median(fig.churn_client_core_us, 1),
                median(fig.churn_server_core_us, 1),
            );
        }
    }

    // The mesh scenarios must really have gone through the agent: one redirect per connection.
    if through_agent && redirected == 0 {
        bail!("the kernel redirected no connection to the agent: the mesh scenarios bypassed it");
    }
    if split_checked {
        println!(
            "the agent routed {:.0} requests: {:.1}% to v2 (the VirtualService says 10%)",
            v1 + v2,
            v2_share * 100.0
        );
        if !(0.05..=0.15).contains(&v2_share) {
            bail!("the 90/10 split was not applied: v1 {v1}, v2 {v2}");
        }
    }
    let failed: Vec<&str> = figures
        .iter()
        .filter(|fig| fig.errors > 0)
        .map(|fig| fig.scenario.as_str())
        .collect();
    if mode != Mode::Full {
        if !failed.is_empty() {
            bail!("scenarios with errors: {failed:?}");
        }
        if mode == Mode::Quick {
            println!("a tiny `--scale`:");
            let scale = scale::run(&root, &binaries, &scale::Sizes::TINY)?;
            println!("raw figures: {}", scale.write_json(&root)?.display());
        }
        println!(
            "{}: every scenario answered without errors; nothing left behind",
            mode.command()
        );
        return Ok(());
    }
    if !args.only.is_empty() {
        println!("--only: docs/performance.md left alone");
        return Ok(());
    }
    report::write_docs(&root, &report, &chart::svg(&figures))
        .context("writing docs/performance.md")?;
    println!("wrote docs/performance.md and docs/performance.svg");
    if !failed.is_empty() {
        println!("note: scenarios with errors (reported in the table): {failed:?}");
    }
    Ok(())
}

/// A figure's median for the console, `-` where there is none (a baseline's added cost, a shape
/// the run skipped).
fn median(spread: Option<Spread>, decimals: usize) -> String {
    spread.map_or_else(|| "-".to_owned(), |s| format!("{:.decimals$}", s.median))
}
