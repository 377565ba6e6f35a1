//! `cargo xtask bench --scale`, run by hand: how the agent's costs grow with what a busy node
//! holds (issue 18), each measured on a node of its own with `request_cost`'s hello service:
//!
//! - **Config size**: the agent's folder also holds a [`World`] of 0 to 1,000 services (ten
//!   endpoints each, five of them pods; a tenth routed 90/10). For each size: instructions and
//!   allocations per request under callgrind (as `--request-cost`, `mesh-l7`'s path), and, from
//!   a second agent run natively, the time from its start to ready (reading and compiling the
//!   folder is most of it) and its memory after a thousand requests.
//! - **Enrolled pods**: idle pods enrolled one by one through the admin socket, up to 500, with
//!   the pods in the mesh (a CA: each pod gets a tunnel and an inbound listener too): how long
//!   each enrollment takes, the agent's memory and its kernel maps' at each step, and the
//!   `mesh-mtls` hop's instructions per request with none and with all of them enrolled.
//! - **Idle keep-alive connections**: 10,000 downstream HTTP/1.1 connections from one pod, each
//!   after one answered request: what each costs the agent in resident memory and in heap
//!   (the kernel's socket buffers are not the agent's, and not counted).
//! - **Cores**: the same requests through an agent with `--workers 1` and `2`: throughput and
//!   the agent's CPU time per request (nothing pinned: on a two-core machine the client, the
//!   agent and the servers share both cores).
//!
//! `--quick` runs a tiny version ([`Sizes::TINY`]) and keeps its figures in JSON only.

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
    request_cost::{self, Beside, HelloNode, RequestCost, Upstream},
    topology::Binaries,
};

/// Where `--scale` writes its section of `docs/performance.md`.
pub const HEADING: &str = "## Scale: `cargo xtask bench --scale`";
/// Issue 18's targets: per-request instructions within ± 5 % from the smallest size to the
/// largest; ≤ 4 KiB per idle connection; ≤ 50 KiB per enrolled pod.
const FLAT: f64 = 0.05;
const IDLE_BYTES: f64 = 4096.0;
const POD_BYTES: f64 = 50.0 * 1024.0;

/// How much a run measures.
pub struct Sizes {
    /// Services besides `hello`.
    pub services: &'static [usize],
    /// Idle pods enrolled besides the client and `hello`'s two, in steps.
    pub pods: &'static [usize],
    pub idle_connections: u64,
    /// Requests counted under callgrind for each cost per request.
    pub requests: u64,
    /// Requests timed through the agent for each number of workers.
    pub timed_requests: u64,
}

impl Sizes {
    /// `cargo xtask bench --scale`: what issue 18 names.
    pub const FULL: Sizes = Sizes {
        services: &[0, 10, 100, 1_000],
        pods: &[0, 10, 100, 500],
        idle_connections: 10_000,
        requests: 20_000,
        timed_requests: 100_000,
    };
    /// The glance `cargo xtask bench --quick` takes.
    pub const TINY: Sizes = Sizes {
        services: &[0, 100],
        // Per pod is read over the last step: the first is still settling from the warm-up
        // (idle tunnels close).
        pods: &[0, 10, 60],
        idle_connections: 1_000,
        requests: 2_000,
        timed_requests: 10_000,
    };
}
/// The heap is trimmed every 5 s (`mesh_agent::heap`): memory is read after one.
const SETTLE: Duration = Duration::from_secs(6);

#[derive(Serialize)]
pub struct Scale {
    pub machine: Machine,
    pub config: Vec<ConfigSize>,
    pub pods: EnrolledPods,
    pub idle: IdleConnections,
    pub workers: Vec<Workers>,
}

impl Scale {
    /// The section of `docs/performance.md`: the method, the machine, both tables, the targets
    /// met or not, and the chart `performance-scale.svg`.
    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut out = format!(
            "{HEADING}\n\n\
             How the agent's costs grow with what a node holds (issue 18). Run by hand (about 6 \
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
        let pods = &self.pods;
        let _ = write!(
            out,
            "\nEnrolled pods (idle pods enrolled one by one through the admin socket, beside the \
             client and `hello`'s two, all in the mesh: each gets the agent's outbound, tunnel and \
             inbound listeners in its namespace; kernel maps: the `memlock` of every BPF map the \
             agent holds, from `/proc/<pid>/fdinfo`):\n\n\
             | pods enrolled | enrollment, mean per pod | RSS | heap in use | kernel maps |\n\
             | --- | --- | --- | --- | --- |\n"
        );
        for step in &pods.steps {
            let _ = writeln!(
                out,
                "| {} | {} | {:.1} MiB | {:.1} MiB | {:.1} MiB |",
                thousands(step.pods as u64),
                milliseconds(step.enroll_ms_per_pod),
                step.rss_kib as f64 / 1024.0,
                step.heap_allocated_bytes as f64 / (1 << 20) as f64,
                step.bpf_map_bytes as f64 / (1 << 20) as f64,
            );
        }
        let _ = write!(
            out,
            "\nPer pod, over the last step ({} to {} pods): {:.1} KiB resident, {:.1} KiB of heap, \
             {:.0} bytes of kernel maps. The `mesh-mtls` hop (both ends in this agent) costs {} \
             instructions per request with {} pods enrolled and {} with {} ({:+.1} %).\n",
            pods.steps.iter().rev().nth(1).map_or(0, |step| step.pods),
            pods.most(),
            pods.rss_bytes_per_pod() / 1024.0,
            pods.heap_bytes_per_pod() / 1024.0,
            pods.bpf_map_bytes_per_pod(),
            thousands(pods.cost_fewest.instructions_per_request.round() as u64),
            pods.fewest(),
            thousands(pods.cost_most.instructions_per_request.round() as u64),
            pods.most(),
            pods.cost_drift() * 100.0,
        );
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
        let _ = write!(
            out,
            "Cores (`--workers`; {} keep-alive GETs on 16 connections from the client pod, timed \
             around the client's run after a warm-up; nothing pinned: on this machine's {} cores the \
             client, the agent and the servers share them all):\n\n\
             | workers | requests per second | agent CPU-µs per request |\n\
             | --- | --- | --- |\n",
            self.workers
                .first()
                .map_or(String::new(), |w| thousands(w.requests)),
            m.cpus,
        );
        for workers in &self.workers {
            let _ = writeln!(
                out,
                "| {} | {} | {:.1} |",
                workers.workers,
                thousands(workers.requests_per_second.round() as u64),
                workers.agent_cpu_us_per_request,
            );
        }
        out.push('\n');
        let drift = self.drift();
        let met = |ok: bool| if ok { "met" } else { "**not met**" };
        let _ = write!(
            out,
            "Targets (issue 18):\n\n\
             - per-request instructions flat (± {:.0} %) from the smallest size to the largest: \
             {:+.1} %, {};\n\
             - ≤ 50 KiB per enrolled pod: {:.1} KiB of heap, {:.1} KiB resident, {};\n\
             - the hop's cost unchanged (± {:.0} %) as pods are enrolled: {:+.1} %, {};\n\
             - ≤ 4 KiB per idle connection: {:.1} KiB of heap, {}.\n\n\
             Reproduce: `cargo xtask bench --scale` (raw figures in \
             `target/bench/scale-<date>.json`).\n\n",
            FLAT * 100.0,
            drift * 100.0,
            met(drift.abs() <= FLAT),
            pods.heap_bytes_per_pod() / 1024.0,
            pods.rss_bytes_per_pod() / 1024.0,
            met(pods.heap_bytes_per_pod().max(pods.rss_bytes_per_pod()) <= POD_BYTES),
            FLAT * 100.0,
            pods.cost_drift() * 100.0,
            met(pods.cost_drift().abs() <= FLAT),
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
            Curve {
                title: "Heap in use, MiB; across: pods enrolled, log scale",
                points: self
                    .pods
                    .steps
                    .iter()
                    .map(|step| {
                        let mib = step.heap_allocated_bytes as f64 / (1 << 20) as f64;
                        (step.pods as f64, mib)
                    })
                    .collect(),
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
pub struct Workers {
    pub workers: usize,
    pub requests: u64,
    pub requests_per_second: f64,
    /// The agent's user and system time over the requests, per request.
    pub agent_cpu_us_per_request: f64,
}

#[derive(Debug, Serialize)]
pub struct EnrolledPods {
    pub steps: Vec<PodsStep>,
    /// `mesh-mtls`'s cost per request with the fewest pods enrolled, and with the most.
    pub cost_fewest: RequestCost,
    pub cost_most: RequestCost,
}

#[derive(Debug, Serialize)]
pub struct PodsStep {
    /// Pods enrolled, the client and `hello`'s two included.
    pub pods: usize,
    /// The mean time of this step's enrollments, each a `POST /pods` answered; none for a step
    /// that enrolls none.
    pub enroll_ms_per_pod: Option<f64>,
    pub rss_kib: u64,
    pub heap_allocated_bytes: u64,
    /// The `memlock` of every BPF map the agent holds.
    pub bpf_map_bytes: u64,
}

impl EnrolledPods {
    fn fewest(&self) -> usize {
        self.steps.first().map_or(0, |step| step.pods)
    }

    fn most(&self) -> usize {
        self.steps.last().map_or(0, |step| step.pods)
    }

    /// What one more pod costs, over the last step: the most pods enrolled at once, and the
    /// furthest from the agent's warm-up.
    fn per_pod(&self, figure: fn(&PodsStep) -> f64) -> f64 {
        match self.steps.as_slice() {
            [.., first, last] if last.pods > first.pods => {
                (figure(last) - figure(first)).max(0.0) / (last.pods - first.pods) as f64
            }
            _ => 0.0,
        }
    }

    pub fn rss_bytes_per_pod(&self) -> f64 {
        self.per_pod(|step| (step.rss_kib * 1024) as f64)
    }

    pub fn heap_bytes_per_pod(&self) -> f64 {
        self.per_pod(|step| step.heap_allocated_bytes as f64)
    }

    pub fn bpf_map_bytes_per_pod(&self) -> f64 {
        self.per_pod(|step| step.bpf_map_bytes as f64)
    }

    fn cost_drift(&self) -> f64 {
        self.cost_most.instructions_per_request / self.cost_fewest.instructions_per_request - 1.0
    }
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

pub fn run(root: &Path, binaries: &Binaries, sizes: &Sizes) -> Result<Scale> {
    let out_dir = &root.join("target/bench/scale");
    let mut config = Vec::new();
    for &services in sizes.services {
        let world = world(services);
        println!("config size: {} services besides hello", services);
        let beside = Beside {
            world: world.as_ref(),
            pods: 0,
        };
        let cost = request_cost::measure(
            &binaries.agent,
            &binaries.upstream,
            &out_dir.join(format!("request-cost-{services}")),
            sizes.requests,
            Upstream::Plain,
            beside,
            false,
        )
        .with_context(|| format!("the cost per request with {services} more services"))?;
        let (hello, mut agent, ready) =
            warm_agent(binaries, out_dir, Upstream::Plain, beside.world, 1)?;
        let (rss_kib, heap_allocated_bytes) = memory(&hello, &agent)?;
        agent.stop(Duration::from_secs(10))?;
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
    println!("idle keep-alive connections: {}", sizes.idle_connections);
    let idle = idle_connections(binaries, out_dir, sizes.idle_connections)?;
    println!(
        "  {:.0} bytes resident and {:.0} bytes of heap per connection; {} descriptors added",
        idle.rss_bytes_per_connection(),
        idle.heap_bytes_per_connection(),
        idle.descriptors_added
    );
    let mut workers = Vec::new();
    for count in [1, 2] {
        println!("--workers {count}: {} requests", sizes.timed_requests);
        let timed = timed_workers(binaries, out_dir, count, sizes.timed_requests)?;
        println!(
            "  {:.0} requests per second, {:.1} agent CPU-µs per request",
            timed.requests_per_second, timed.agent_cpu_us_per_request
        );
        workers.push(timed);
    }
    // Last: its hundreds of namespaces take the kernel a while to tear down, which slows
    // every namespace made meanwhile (and so the start-up times above, if they came after).
    let pods = enrolled_pods(binaries, out_dir, sizes)?;
    println!(
        "  per pod: {:.0} bytes resident, {:.0} bytes of heap, {:.0} bytes of kernel maps; \
         mesh-mtls {:.0} → {:.0} instructions per request",
        pods.rss_bytes_per_pod(),
        pods.heap_bytes_per_pod(),
        pods.bpf_map_bytes_per_pod(),
        pods.cost_fewest.instructions_per_request,
        pods.cost_most.instructions_per_request,
    );
    Ok(Scale {
        machine: Machine::probe(root),
        config,
        pods,
        idle,
        workers,
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

/// Idle pods enrolled in steps into a native agent with its pods in the mesh: the time each
/// enrollment takes and the memory at each step; then `mesh-mtls`'s cost per request under
/// callgrind with the fewest and the most pods.
fn enrolled_pods(binaries: &Binaries, out_dir: &Path, sizes: &Sizes) -> Result<EnrolledPods> {
    let (fewest, most) = match sizes.pods {
        [first, .., last] => (*first, *last),
        _ => anyhow::bail!("enrolled pods: at least two steps"),
    };
    let (hello, mut agent, _) = warm_agent(binaries, out_dir, Upstream::Tunnel, None, 1)?;
    // The client and `hello`'s two.
    let hello_pods = hello.node.pods().len();
    let mut steps = Vec::new();
    let mut enrolled = 0;
    for &step in sizes.pods {
        println!("enrolled pods: {step} besides the client and hello's two");
        let pods = hello.add_idle_pods(step - enrolled)?;
        let started = Instant::now();
        for pod in &pods {
            hello.enroll(pod)?;
        }
        let took = started.elapsed();
        enrolled = step;
        let listed = agent::admin_request(&hello.node.netns_path(), "GET", "/pods", "")?;
        let listed: serde_json::Value = serde_json::from_str(&listed.1)?;
        ensure!(
            listed.as_array().map(Vec::len) == Some(hello_pods + step),
            "the agent does not list {} pods: {listed}",
            hello_pods + step
        );
        std::thread::sleep(SETTLE);
        let (rss_kib, heap_allocated_bytes) = memory(&hello, &agent)?;
        let step = PodsStep {
            pods: hello_pods + step,
            enroll_ms_per_pod: (!pods.is_empty())
                .then(|| took.as_secs_f64() * 1e3 / pods.len() as f64),
            rss_kib,
            heap_allocated_bytes,
            bpf_map_bytes: bpf_map_bytes(agent.pid())?,
        };
        println!(
            "  {} per enrollment; RSS {} KiB, heap {} KiB, kernel maps {} KiB",
            milliseconds(step.enroll_ms_per_pod),
            step.rss_kib,
            step.heap_allocated_bytes / 1024,
            step.bpf_map_bytes / 1024
        );
        steps.push(step);
    }
    let after = hello.get(1_000)?;
    ensure!(
        after["errors"] == 0,
        "requests failed with {most} pods enrolled: {after}"
    );
    agent.stop(Duration::from_secs(10))?;
    drop(hello);
    let cost = |pods: usize| {
        println!("mesh-mtls under callgrind with {pods} idle pods enrolled");
        request_cost::measure(
            &binaries.agent,
            &binaries.upstream,
            &out_dir.join(format!("request-cost-pods-{pods}")),
            sizes.requests,
            Upstream::Tunnel,
            Beside { world: None, pods },
            false,
        )
        .with_context(|| format!("the cost per request with {pods} idle pods enrolled"))
    };
    Ok(EnrolledPods {
        steps,
        cost_fewest: cost(fewest)?,
        cost_most: cost(most)?,
    })
}

/// `connections` idle keep-alive connections from the client pod, each after one answered GET.
fn idle_connections(
    binaries: &Binaries,
    out_dir: &Path,
    connections: u64,
) -> Result<IdleConnections> {
    let (hello, mut agent, _) = warm_agent(binaries, out_dir, Upstream::Plain, None, 1)?;
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

/// `requests` GETs through a warm native agent with `workers` data-path threads.
fn timed_workers(
    binaries: &Binaries,
    out_dir: &Path,
    workers: usize,
    requests: u64,
) -> Result<Workers> {
    let (hello, mut agent, _) = warm_agent(binaries, out_dir, Upstream::Plain, None, workers)?;
    let cpu_before = cpu::process_time(agent.pid())?;
    let started = Instant::now();
    let run = hello.get(requests)?;
    let took = started.elapsed();
    let cpu = cpu::process_time(agent.pid())? - cpu_before;
    ensure!(
        run["errors"] == 0 && run["by_status"]["200"] == requests,
        "not every request answered 200 with --workers {workers}: {run}"
    );
    agent.stop(Duration::from_secs(10))?;
    Ok(Workers {
        workers,
        requests,
        requests_per_second: requests as f64 / took.as_secs_f64(),
        agent_cpu_us_per_request: cpu.as_secs_f64() * 1e6 / requests as f64,
    })
}

/// The agent run natively with `workers` data-path threads on a node of its own (`upstream`,
/// with `world` in its folder), ready, warmed by 1,000 requests, and a heap trim after them;
/// how long it took to be ready.
fn warm_agent(
    binaries: &Binaries,
    out_dir: &Path,
    upstream: Upstream,
    world: Option<&World>,
    workers: usize,
) -> Result<(HelloNode, PodProcess, Duration)> {
    let hello = HelloNode::start(
        &binaries.agent,
        &binaries.upstream,
        out_dir,
        upstream,
        world,
    )?;
    let started = Instant::now();
    let agent = hello.spawn_agent_with_workers(Command::new(&binaries.agent), workers)?;
    request_cost::wait_ready(&hello.node, &agent)?;
    let ready = started.elapsed();
    let warm_up = hello.get(1_000)?;
    ensure!(warm_up["errors"] == 0, "requests failed: {warm_up}");
    std::thread::sleep(SETTLE);
    Ok((hello, agent, ready))
}

/// The `memlock` of every BPF map `pid` holds a descriptor of (each map once).
fn bpf_map_bytes(pid: u32) -> Result<u64> {
    let mut maps = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        // A descriptor closed while the directory is read is no map.
        let Ok(info) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|value| value.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) {
            maps.insert(id, memlock);
        }
    }
    ensure!(!maps.is_empty(), "the agent ({pid}) holds no BPF map");
    Ok(maps.values().sum())
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

/// `0.63 ms`, or `–` where nothing was timed.
fn milliseconds(ms: Option<f64>) -> String {
    ms.map_or_else(|| "–".to_owned(), |ms| format!("{ms:.2} ms"))
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
