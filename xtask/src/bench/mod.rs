//! `cargo xtask bench`: what one mesh hop costs, against a direct connection and against nginx
//! and HAProxy, on one simulated node, in one run (issue 7).
//!
//! Build in release → install missing tools → start the node ([`topology`]) → rounds of every
//! scenario ([`scenarios`]) under every load shape ([`load`]) → figures ([`summary`]) → JSON,
//! and for full runs `docs/performance.md` + `docs/performance.svg` ([`report`], [`chart`]).

mod chart;
mod cpu;
mod hello;
mod load;
mod proxies;
mod report;
mod request_cost;
mod rounds;
mod scenarios;
mod summary;
mod tools;
mod topology;

use anyhow::{bail, Context, Result};

use crate::{build_ebpf, cargo};
use rounds::Durations;
use topology::{Binaries, Topology};

#[derive(clap::Args)]
pub struct Args {
    /// Rounds of all scenarios, interleaved round-robin.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds per load shape [default: 4, or 2 with --quick].
    #[arg(long)]
    seconds: Option<u32>,
    /// Smoke check: one round, 2 s per shape, no single-connection shape; asserts only that
    /// every scenario answered without errors, and writes only the JSON (not the docs).
    #[arg(long)]
    quick: bool,
    /// Run only these scenarios (repeatable), e.g. `--only direct --only mesh-l7` while
    /// profiling; the docs are then left alone.
    #[arg(long, value_name = "SCENARIO")]
    only: Vec<String>,
    /// Measure only the agent's instructions and allocations per request under callgrind
    /// (20,000 requests), e.g. to judge a change to the request path; no rounds, no peers,
    /// the docs are left alone.
    #[arg(long, conflicts_with_all = ["quick", "only"])]
    request_cost: bool,
    /// Internal: be the benchmark's hello server on PORT=BYTES (repeatable).
    #[arg(long, hide = true, value_name = "PORT=BYTES", value_parser = hello::Listener::parse)]
    serve: Vec<hello::Listener>,
}

/// The smoke check `cargo xtask test` ends with.
pub fn quick() -> Result<()> {
    run(Args {
        rounds: 1,
        seconds: None,
        quick: true,
        only: Vec::new(),
        request_cost: false,
        serve: Vec::new(),
    })
}

pub fn run(args: Args) -> Result<()> {
    if !args.serve.is_empty() {
        return hello::serve(&args.serve);
    }
    mesh_tests::require_root();
    let root = build_ebpf::workspace_root();
    if args.request_cost {
        tools::ensure_callgrind()?;
    }
    let tools = if args.request_cost {
        None
    } else {
        Some(tools::ensure()?)
    };
    build_ebpf::run()?;
    cargo(&root, &["build", "--release", "--workspace", "--bins"])?;
    let release = root.join("target/release");
    let binaries = Binaries {
        agent: release.join("mesh-agent"),
        upstream: release.join("upstream"),
        xtask: release.join("xtask"),
    };
    let durations = Durations {
        seconds: args.seconds.unwrap_or(if args.quick { 2 } else { 4 }),
        single: !args.quick,
    };
    let rounds = if args.quick { 1 } else { args.rounds.max(1) };
    let scenarios = scenarios::select(&args.only)?;
    let through_agent = scenarios.iter().any(|s| s.through_ebpf_agent());

    // The processes' output would drown the progress lines; errors still carry it.
    mesh_tests::set_echo(false);
    let cost_requests = if args.quick { 2_000 } else { 20_000 };
    println!("agent under callgrind: {cost_requests} requests");
    let request_cost = request_cost::measure(
        &binaries.agent,
        &binaries.upstream,
        &root.join("target/bench/request-cost"),
        cost_requests,
    )
    .context("measuring instructions and allocations per request")?;
    println!(
        "  {:.0} instructions and {:.1} allocations per request in the agent's user space",
        request_cost.instructions_per_request, request_cost.allocations_per_request
    );
    let Some(tools) = tools else {
        return Ok(());
    };
    let oha = std::process::Command::new(&tools.oha)
        .arg("--version")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .unwrap_or_default();
    let topology = Topology::start(&binaries, &tools)?;
    let node_id = topology.node.id();
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
    let v2_share = if through_agent { v2 / (v1 + v2) } else { 0.0 };
    drop(topology);
    let leftovers = mesh_tests::leftovers_of(&node_id);
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
        durations,
        oha,
        agent_idle_rss_kib,
        request_cost,
        v2_share,
        rounds: &done,
        figures: &figures,
        all_rounds_noisy,
    };
    let json = report::write_json(&root, &report)?;
    println!("raw figures: {}", json.display());
    for fig in &figures {
        println!(
            "{:<15} ratio {:>6.3}  added CPU-µs {:>6.1}  added p50/p99 {:>5.0}/{:>5.0} µs  errors {}",
            fig.scenario,
            fig.ratio.map_or(f64::NAN, |s| s.median),
            fig.added_cpu_us.map_or(f64::NAN, |s| s.median),
            fig.added_p50_us.map_or(f64::NAN, |s| s.median),
            fig.added_p99_us.map_or(f64::NAN, |s| s.median),
            fig.errors
        );
    }

    // The mesh scenarios must really have gone through the agent: one redirect per connection.
    if through_agent && redirected == 0 {
        bail!("the kernel redirected no connection to the agent: the mesh scenarios bypassed it");
    }
    if through_agent {
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
    if args.quick {
        if !failed.is_empty() {
            bail!("scenarios with errors: {failed:?}");
        }
        println!("bench --quick: every scenario answered without errors; nothing left behind");
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
