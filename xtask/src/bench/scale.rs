//! `cargo xtask bench --scale`, run by hand: how the agent's costs grow with what a busy node
//! holds (issue 18), each measured on a node of its own with `request_cost`'s hello service:
//!
//! - **Config size**: the agent's folder also holds a [`World`] of 0 to 1,000 services (ten
//!   endpoints each, five of them pods; a tenth routed 90/10). For each size: instructions and
//!   allocations per request under callgrind (as `--request-cost`, `mesh-l7`'s path), and, from
//!   a second agent run natively, the time from its start to ready (reading and compiling the
//!   folder is most of it) and its memory after a thousand requests.
//! - **Idle keep-alive connections**: 10,000 downstream HTTP/1.1 connections from one pod, each
//!   after one answered request: what each costs the agent in resident memory and in heap
//!   (the kernel's socket buffers are not the agent's, and not counted).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use mesh_tests::{agent, world::World, PodProcess};
use serde::Serialize;

use super::{
    chart::{self, Curve},
    cpu, proxies,
    report::Machine,
    request_cost::{self, HelloNode, RequestCost, Upstream},
    topology::Binaries,
};

/// Where `--scale` writes its section of `docs/performance.md`.
pub const HEADING: &str = "## Scale: `cargo xtask bench --scale`";
/// Issue 18's targets: per-request instructions within ± 5 % from the smallest size to the
/// largest; ≤ 4 KiB per idle connection.
const FLAT: f64 = 0.05;
const IDLE_BYTES: f64 = 4096.0;

/// The sizes measured: services besides `hello`.
const SERVICES: [usize; 4] = [0, 10, 100, 1_000];
const IDLE_CONNECTIONS: u64 = 10_000;
/// The heap is trimmed every 5 s (`mesh_agent::heap`): memory is read after one.
const SETTLE: Duration = Duration::from_secs(6);

#[derive(Serialize)]
pub struct Scale {
    pub machine: Machine,
    pub config: Vec<ConfigSize>,
    pub idle: IdleConnections,
}

impl Scale {
    /// The section of `docs/performance.md`: the method, the machine, both tables, the targets
    /// met or not, and the chart `performance-scale.svg`.
    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut out = format!(
            "{HEADING}\n\n\
             How the agent's costs grow with what a node holds (issue 18). Run by hand (about 2 \
             minutes after the release build); each part runs on a node of its own with \
             `--request-cost`'s `hello` service (90/10, retries, outlier detection). Beside it the \
             folder holds a world of Services (ten endpoints each, five of them Pods, a tenth of the \
             services routed 90/10: `mesh_tests::world`). Instructions and allocations per request \
             are counted by callgrind (exact, whatever the machine does); the start-up time and the \
             memory come from a second agent run natively: from its start to `/ready`, then resident \
             memory and heap in use after 1,000 requests and a heap trim. Written by the command; \
             the figures are read in the next section.\n\n\
             Machine: {} × {} (`nproc` {}), Linux `{}`, {}, commit `{}`.\n\n\
             ![per-request instructions, start-up and heap against the number of services](performance-scale.svg)\n\n\
             | services (endpoints, pods) | instructions per request | allocations per request | start to ready | RSS | heap in use |\n\
             | --- | --- | --- | --- | --- | --- |\n",
            m.cpus, m.model, m.cpus, m.kernel, m.date, m.commit
        );
        for size in &self.config {
            let _ = writeln!(
                out,
                "| {} ({}, {}) | {} | {:.1} | {} ms | {:.1} MiB | {:.1} MiB |",
                thousands(size.services as u64),
                thousands(size.endpoints as u64),
                thousands(size.pods as u64),
                thousands(size.cost.instructions_per_request.round() as u64),
                size.cost.allocations_per_request,
                size.ready_ms,
                size.rss_kib as f64 / 1024.0,
                size.heap_allocated_bytes as f64 / (1 << 20) as f64,
            );
        }
        let idle = &self.idle;
        let _ = write!(
            out,
            "\nIdle keep-alive connections (`hog idle --idle-keepalive`, from one pod: each sends \
             one GET and reads its answer before the next opens, so the agent holds idle \
             downstream connections; {} descriptors added):\n\n\
             | connections | resident per connection | heap per connection |\n\
             | --- | --- | --- |\n\
             | {} | {:.1} KiB | {:.1} KiB |\n\n",
            thousands(idle.descriptors_added),
            thousands(idle.connections),
            idle.rss_bytes_per_connection() / 1024.0,
            idle.heap_bytes_per_connection() / 1024.0,
        );
        let drift = self.drift();
        let met = |ok: bool| if ok { "met" } else { "**not met**" };
        let _ = write!(
            out,
            "Targets (issue 18):\n\n\
             - per-request instructions flat (± {:.0} %) from the smallest size to the largest: \
             {:+.1} %, {};\n\
             - ≤ 4 KiB per idle connection: {:.1} KiB of heap, {}.\n\n\
             Reproduce: `cargo xtask bench --scale` (raw figures in \
             `target/bench/scale-<date>.json`).\n\n",
            FLAT * 100.0,
            drift * 100.0,
            met(drift.abs() <= FLAT),
            idle.heap_bytes_per_connection() / 1024.0,
            met(idle.heap_bytes_per_connection() <= IDLE_BYTES),
        );
        out
    }

    /// The chart: per-request instructions, start to ready and heap in use against services.
    pub fn svg(&self) -> String {
        let points = |figure: fn(&ConfigSize) -> f64| {
            self.config
                .iter()
                .map(|size| (size.services as f64, figure(size)))
                .collect()
        };
        chart::curves(&[
            Curve {
                title: "Instructions per request (callgrind); across: services in the folder, log scale",
                points: points(|s| s.cost.instructions_per_request),
                format: |v| thousands(v.round() as u64),
            },
            Curve {
                title: "Start to ready, ms",
                points: points(|s| s.ready_ms as f64),
                format: |v| format!("{v:.0}"),
            },
            Curve {
                title: "Heap in use after 1,000 requests, MiB",
                points: points(|s| s.heap_allocated_bytes as f64 / (1 << 20) as f64),
                format: |v| format!("{v:.1}"),
            },
        ])
    }

    /// Per-request instructions at the largest size against the smallest, as a fraction.
    fn drift(&self) -> f64 {
        match (self.config.first(), self.config.last()) {
            (Some(small), Some(large)) => {
                large.cost.instructions_per_request / small.cost.instructions_per_request - 1.0
            }
            _ => 0.0,
        }
    }

    /// `target/bench/scale-<date>.json`.
    pub fn write_json(&self, root: &Path) -> Result<PathBuf> {
        let dir = root.join("target/bench");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("scale-{}.json", self.machine.date.replace(':', "")));
        std::fs::write(&path, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

#[derive(Debug, Serialize)]
pub struct ConfigSize {
    /// Services in the folder, `hello` included.
    pub services: usize,
    pub endpoints: usize,
    pub pods: usize,
    pub cost: RequestCost,
    /// From the agent's start to `/ready` answering 200.
    pub ready_ms: u64,
    pub rss_kib: u64,
    pub heap_allocated_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct IdleConnections {
    pub connections: u64,
    pub rss_kib_before: u64,
    pub rss_kib_held: u64,
    pub heap_allocated_before: u64,
    pub heap_allocated_held: u64,
    /// The downstream connections, and any upstream ones the agent opened for their requests.
    pub descriptors_added: u64,
}

impl IdleConnections {
    pub fn rss_bytes_per_connection(&self) -> f64 {
        (self.rss_kib_held.saturating_sub(self.rss_kib_before) * 1024) as f64
            / self.connections as f64
    }

    pub fn heap_bytes_per_connection(&self) -> f64 {
        self.heap_allocated_held
            .saturating_sub(self.heap_allocated_before) as f64
            / self.connections as f64
    }
}

pub fn run(root: &Path, binaries: &Binaries, requests: u64) -> Result<Scale> {
    let out_dir = &root.join("target/bench/scale");
    let mut config = Vec::new();
    for services in SERVICES {
        let world = world(services);
        println!("config size: {} services besides hello", services);
        let cost = request_cost::measure(
            &binaries.agent,
            &binaries.upstream,
            &out_dir.join(format!("request-cost-{services}")),
            requests,
            Upstream::Plain,
            world.as_ref(),
        )
        .with_context(|| format!("the cost per request with {services} more services"))?;
        let (ready, rss_kib, heap_allocated_bytes) = footprint(binaries, out_dir, world.as_ref())?;
        let size = ConfigSize {
            services: services + 1,
            endpoints: world.map_or(0, |w| w.endpoints()) + 2,
            pods: world.map_or(0, |w| w.pods()) + 2,
            cost,
            ready_ms: ready.as_millis() as u64,
            rss_kib,
            heap_allocated_bytes,
        };
        println!(
            "  {:.0} instructions and {:.1} allocations per request; ready in {} ms; \
             RSS {} KiB, heap {} KiB",
            size.cost.instructions_per_request,
            size.cost.allocations_per_request,
            size.ready_ms,
            size.rss_kib,
            size.heap_allocated_bytes / 1024
        );
        config.push(size);
    }
    println!("idle keep-alive connections: {IDLE_CONNECTIONS}");
    let idle = idle_connections(binaries, out_dir, IDLE_CONNECTIONS)?;
    println!(
        "  {:.0} bytes resident and {:.0} bytes of heap per connection; {} descriptors added",
        idle.rss_bytes_per_connection(),
        idle.heap_bytes_per_connection(),
        idle.descriptors_added
    );
    Ok(Scale {
        machine: Machine::probe(root),
        config,
        idle,
    })
}

/// `services` more services than `hello`, a tenth of them routed; none for 0.
fn world(services: usize) -> Option<World> {
    (services > 0).then_some(World {
        services,
        routed: services / 10,
        ..World::BUSY_NODE
    })
}

/// The agent run natively with `world` in its folder: how long it took to be ready, then its
/// resident memory and heap.
fn footprint(
    binaries: &Binaries,
    out_dir: &Path,
    world: Option<&World>,
) -> Result<(Duration, u64, u64)> {
    let (hello, mut agent, ready) = warm_agent(binaries, out_dir, world)?;
    let memory = memory(&hello, &agent)?;
    agent.stop(Duration::from_secs(10))?;
    Ok((ready, memory.0, memory.1))
}

/// `connections` idle keep-alive connections from the client pod, each after one answered GET.
fn idle_connections(
    binaries: &Binaries,
    out_dir: &Path,
    connections: u64,
) -> Result<IdleConnections> {
    let (hello, mut agent, _) = warm_agent(binaries, out_dir, None)?;
    let before = memory(&hello, &agent)?;
    let descriptors_before = open_descriptors(agent.pid())?;
    let mut hog = Command::new(&binaries.hog);
    hog.args(["idle", "--target"])
        .arg(format!("{}:{}", request_cost::VIP, proxies::HELLO_PORT))
        .args(["--host", "hello", "--wait-secs", "120"])
        .args(["--idle-keepalive", &connections.to_string()]);
    let hog: PodProcess = hello.node.spawn_in_pod(&hello.client, hog)?;
    // The hog counts a connection open once its request is answered.
    let opened = hog
        .stdout()
        .wait_for_json(|line| line["opened"].is_u64(), Duration::from_secs(120))?;
    ensure!(
        opened["opened"] == connections,
        "not every connection opened: {opened}"
    );
    std::thread::sleep(SETTLE);
    let held = memory(&hello, &agent)?;
    let open = open_descriptors(agent.pid())?;
    ensure!(
        open >= connections,
        "the connections were closed before they were measured ({open} descriptors open)"
    );
    drop(hog);
    agent.stop(Duration::from_secs(10))?;
    Ok(IdleConnections {
        connections,
        rss_kib_before: before.0,
        rss_kib_held: held.0,
        heap_allocated_before: before.1,
        heap_allocated_held: held.1,
        descriptors_added: open - descriptors_before,
    })
}

/// The agent run natively on a node of its own with `world` beside `hello` in its folder,
/// ready, warmed by 1,000 requests, and a heap trim after them; how long it took to be ready.
fn warm_agent(
    binaries: &Binaries,
    out_dir: &Path,
    world: Option<&World>,
) -> Result<(HelloNode, PodProcess, Duration)> {
    let hello = HelloNode::start(
        &binaries.agent,
        &binaries.upstream,
        out_dir,
        Upstream::Plain,
        world,
    )?;
    let started = Instant::now();
    let agent = hello.spawn_agent(Command::new(&binaries.agent))?;
    request_cost::wait_ready(&hello.node, &agent)?;
    let ready = started.elapsed();
    let warm_up = hello.get(1_000)?;
    ensure!(warm_up["errors"] == 0, "requests failed: {warm_up}");
    std::thread::sleep(SETTLE);
    Ok((hello, agent, ready))
}

fn open_descriptors(pid: u32) -> Result<u64> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64)
}

/// The agent's resident memory (KiB) and heap in live allocations (bytes).
fn memory(hello: &HelloNode, agent: &PodProcess) -> Result<(u64, u64)> {
    let (rss_kib, _) = cpu::memory_kib(agent.pid())?;
    let heap = metric(hello, "mesh_heap_allocated_bytes ")?;
    Ok((rss_kib, heap as u64))
}

/// The sum of the samples of every series whose line starts with `prefix` on `/metrics`.
fn metric(hello: &HelloNode, prefix: &str) -> Result<f64> {
    let (status, text) = agent::admin_request(&hello.node.netns_path(), "GET", "/metrics", "")?;
    ensure!(status == 200, "/metrics answered {status}");
    let values: Vec<f64> = text
        .lines()
        .filter(|line| line.starts_with(prefix))
        .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
        .collect();
    ensure!(!values.is_empty(), "no {prefix:?} on /metrics");
    Ok(values.iter().sum())
}

/// `44854` → `44,854`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn thousands_are_separated_by_commas() {
        assert_eq!(thousands(7), "7");
        assert_eq!(thousands(1_001), "1,001");
        assert_eq!(thousands(44_854), "44,854");
        assert_eq!(thousands(10_002_000), "10,002,000");
    }
}
