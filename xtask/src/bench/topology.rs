//! Two simulated nodes hold every scenario, each on its own port, so all of them can be
//! interleaved round-robin without rebuilding anything between runs:
//!
//! ```text
//!  node 1: CPU 0                  CPU 1
//!  client       ─────────────▶  server-v1, server-v2   hello :8080 (12 B) :8081 (1 KiB) :9000
//!      └───────────────▶ proxy  nginx :80, haproxy :81 (L7) :9001 (L4), hyper :82 ─▶ servers
//!  client-mesh  ─ connect4 ─▶ mesh-agent (its in-pod listener) ─▶ servers
//!  client-iptables ─ REDIRECT ─▶ mesh-agent --redirect iptables (its in-pod listener) ─▶ servers
//!  ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ underlay ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─
//!  node 2:                        CPU 1
//!  client ──────────────────────▶ remote-v1, remote-v2  hello :8080 (12 B)     (direct-remote)
//!  client-mesh ─▶ mesh-agent ────▶ the same, plaintext                        (mesh-l7-remote)
//!  client-mesh ─▶ mesh-agent --ca ═ mTLS :15008 ═▶ node 2's agent ─▶ the same  (mesh-mtls)
//! ```
//!
//! `client-mesh` is the eBPF agent's only enrolled pod, `client-iptables` the iptables-mode
//! agent's: an enrolled pod's every connection goes through its agent, so the other scenarios
//! need a client nothing redirects. The eBPF programs leave `client-iptables` alone (not
//! enrolled with them), and the second agent's upstream sockets carry the same mark. Node 2's
//! agent (always `--ca`) enrolls the remote servers, which are in the mesh: node 1's agent
//! tunnels to them when it is given the CA too (`mesh-mtls`), and dials them in plaintext
//! otherwise (`mesh-l7-remote`, the cross-node reference).

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mesh_tests::{ConfigDir, Pod, PodProcess, SimNetwork, SimNode};

use super::hello::Listener;
use super::hyper_proxy::Split;
use super::proxies::{self, HELLO_1K_PORT, HELLO_PORT, HYPER_PORT, TCP_PORT};
use super::tools::Tools;

/// Servers and proxies share this core, as a node agent shares cores with the apps.
pub const SERVER_CPU: &str = "1";

/// The admin API of the iptables-mode agent, beside the eBPF agent's
/// [`mesh_tests::agent::ADMIN`] in the node's namespace.
const ADMIN_IPTABLES: &str = "127.0.0.1:15002";

/// The agents' counter of completed tunnel handshakes (either end).
const TUNNEL_HANDSHAKES: &str = "mesh_tunnel_handshakes_total";

pub struct Topology {
    // Processes before the nodes: they are stopped first, then the nodes' drop kills anything
    // left.
    /// The eBPF agent; restarted when a scenario needs another mode (socket fast path, CA).
    agent: RefCell<EbpfAgent>,
    pub agent_iptables: PodProcess,
    /// Node 2's agent, the destination end of `mesh-mtls`'s tunnels.
    pub agent_remote: PodProcess,
    pub nginx: PodProcess,
    pub haproxy: PodProcess,
    pub hyper: PodProcess,
    _servers: Vec<PodProcess>,
    config: ConfigDir,
    agent_binary: PathBuf,
    /// Kernel redirects and (v1, v2) requests counted by eBPF agents already stopped.
    stopped_agents: Cell<(u64, f64, f64)>,
    scratch: PathBuf,
    pub client: Pod,
    pub client_mesh: Pod,
    pub client_iptables: Pod,
    pub server_v1: Pod,
    pub remote_v1: Pod,
    pub proxy: Pod,
    /// Node 1: the clients, the local servers, the peers and the measured agents.
    pub node: Arc<SimNode>,
    /// Node 2: the remote servers and their agent.
    pub remote_node: Arc<SimNode>,
    network: SimNetwork,
}

struct EbpfAgent {
    /// `None` only between stopping one agent and starting the next.
    process: Option<PodProcess>,
    mode: AgentMode,
}

/// What the eBPF agent is started with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentMode {
    Plain,
    /// `--socket-fast-path` (sockmap + sk_msg).
    SocketFastPath,
    /// `--ca`: connections to pods in the mesh go through mutual TLS tunnels.
    MutualTls,
}

/// The binaries the bench runs: release builds, or the debug ones CI has built for the smoke.
pub struct Binaries {
    pub agent: PathBuf,
    /// The tests' HTTP server and client (`mesh-tests`'s `upstream`).
    pub upstream: PathBuf,
    /// The hostile neighbour (`mesh-tests`'s `hog`): idle connections for `--scale`.
    pub hog: PathBuf,
    pub xtask: PathBuf,
}

impl Topology {
    pub fn start(binaries: &Binaries, tools: &Tools) -> Result<Topology> {
        let network = SimNetwork::new(2)?;
        let node = Arc::clone(network.node(0)?);
        let remote_node = Arc::clone(network.node(1)?);
        let client = node.add_pod("client")?;
        let client_mesh = node.add_pod("client-mesh")?;
        let client_iptables = node.add_pod("client-iptables")?;
        let server_v1 = node.add_pod("server-v1")?;
        let server_v2 = node.add_pod("server-v2")?;
        let proxy = node.add_pod("proxy")?;
        let remote_v1 = remote_node.add_pod("remote-v1")?;
        let remote_v2 = remote_node.add_pod("remote-v2")?;

        let mut servers = Vec::new();
        for (node, pod) in [
            (&node, &server_v1),
            (&node, &server_v2),
            (&remote_node, &remote_v1),
            (&remote_node, &remote_v2),
        ] {
            let mut hello = pinned(&binaries.xtask);
            hello.arg("bench");
            for (port, body_len) in [(HELLO_PORT, 12), (HELLO_1K_PORT, 1024), (TCP_PORT, 12)] {
                hello.arg("--serve").arg(Listener { port, body_len }.arg());
            }
            let server = node.spawn_in_pod(pod, hello)?;
            server
                .stdout()
                .wait_for_line(|line| line == "listening", Duration::from_secs(10))
                .context("the hello server did not start")?;
            servers.push(server);
        }

        let scratch = std::env::temp_dir().join(format!("mesh-bench-{}", std::process::id()));
        std::fs::create_dir_all(&scratch)?;
        let dir = scratch.to_str().context("temp dir is not UTF-8")?;
        let nginx_conf = scratch.join("nginx.conf");
        std::fs::write(
            &nginx_conf,
            proxies::nginx_conf(dir, server_v1.ip(), server_v2.ip()),
        )?;
        let haproxy_cfg = scratch.join("haproxy.cfg");
        std::fs::write(
            &haproxy_cfg,
            proxies::haproxy_cfg(server_v1.ip(), server_v2.ip()),
        )?;
        let mut nginx = pinned(&tools.nginx);
        nginx.arg("-p").arg(&scratch).arg("-c").arg(&nginx_conf);
        let mut nginx = node.spawn_in_pod(&proxy, nginx)?;
        let mut haproxy = pinned(&tools.haproxy);
        // -db: foreground, no daemon.
        haproxy.args(["-db", "-f"]).arg(&haproxy_cfg);
        let mut haproxy = node.spawn_in_pod(&proxy, haproxy)?;
        let mut hyper = pinned(&binaries.xtask);
        let split = Split {
            port: HYPER_PORT,
            upstreams: [server_v1.addr(HELLO_PORT), server_v2.addr(HELLO_PORT)],
        };
        hyper.args(["bench", "--hyper-proxy", &split.arg()]);
        let hyper = node.spawn_in_pod(&proxy, hyper)?;
        hyper
            .stdout()
            .wait_for_line(|line| line == "listening", Duration::from_secs(10))
            .context("the hyper proxy did not start")?;

        let config = proxies::mesh_config(&server_v1, &server_v2, &remote_v1, &remote_v2)?;
        let ca = scratch.join("ca");
        mesh_tests::ca_init(&binaries.agent, &ca)?;
        // Two agents on the same core with the same config: one per redirect mode, each with
        // its own client pod.
        let agent_ebpf = start_agent(
            &node,
            &binaries.agent,
            &config,
            &[&client_mesh],
            "ebpf",
            &[],
        )?;
        let agent_iptables = start_agent(
            &node,
            &binaries.agent,
            &config,
            &[&client_iptables],
            "iptables",
            &[],
        )?;
        let agent_remote = start_agent(
            &remote_node,
            &binaries.agent,
            &config,
            &[&remote_v1, &remote_v2],
            "ebpf",
            &ca_flag(&ca)?,
        )?;

        // They print nothing when they start well (and nginx points its stderr at its error
        // log), so give a bad config the time to fail and look at the exit status.
        std::thread::sleep(Duration::from_millis(300));
        for (process, name) in [(&mut nginx, "nginx"), (&mut haproxy, "haproxy")] {
            if let Some(status) = process.try_status()? {
                bail!(
                    "{name} exited ({status}): {}{}",
                    process.stdout().text(),
                    process.stderr().text()
                );
            }
        }
        Ok(Topology {
            agent: RefCell::new(EbpfAgent {
                process: Some(agent_ebpf),
                mode: AgentMode::Plain,
            }),
            agent_iptables,
            agent_remote,
            nginx,
            haproxy,
            hyper,
            _servers: servers,
            config,
            agent_binary: binaries.agent.clone(),
            stopped_agents: Cell::new((0, 0.0, 0.0)),
            scratch,
            client,
            client_mesh,
            client_iptables,
            server_v1,
            remote_v1,
            proxy,
            node,
            remote_node,
            network,
        })
    }

    /// The eBPF agent's process id.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.borrow().process.as_ref().map(PodProcess::pid)
    }

    /// Restarts the eBPF agent in `mode` if it is not already in it; what the stopped one
    /// counted is kept for [`Self::redirected`] and [`Self::requests_by_version`].
    pub fn use_agent_mode(&self, mode: AgentMode) -> Result<()> {
        let mut agent = self.agent.borrow_mut();
        if agent.mode == mode {
            return Ok(());
        }
        let redirected = self.ebpf_redirected()?;
        let (v1, v2) = requests_by_version(&self.admin_get(mesh_tests::agent::ADMIN, "/metrics")?);
        let (r, a, b) = self.stopped_agents.get();
        self.stopped_agents.set((r + redirected, a + v1, b + v2));
        let flags = match mode {
            AgentMode::Plain => Vec::new(),
            AgentMode::SocketFastPath => vec!["--socket-fast-path".to_owned()],
            AgentMode::MutualTls => ca_flag(&self.scratch.join("ca"))?,
        };
        // Stop first: two agents cannot attach to one cgroup.
        drop(agent.process.take());
        agent.process = Some(start_agent(
            &self.node,
            &self.agent_binary,
            &self.config,
            &[&self.client_mesh],
            "ebpf",
            &flags,
        )?);
        agent.mode = mode;
        Ok(())
    }

    /// Tunnel handshakes both ends made so far: what a pooled tunnel keeps low under churn.
    pub fn tunnel_handshakes(&self) -> Result<f64> {
        let mut total = 0.0;
        for node in [&self.node, &self.remote_node] {
            let metrics = admin_get(node, mesh_tests::agent::ADMIN, "/metrics")?;
            total += metrics
                .lines()
                .filter(|line| line.starts_with(TUNNEL_HANDSHAKES))
                .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>();
        }
        Ok(total)
    }

    /// Connections the kernel handed to the eBPF agents of this run: proof that the mesh
    /// scenarios went through them. (The iptables-mode agent has no such counters; a
    /// `mesh-iptables` connection that bypassed it would go to a VIP nothing routes, and fail.)
    pub fn redirected(&self) -> Result<u64> {
        Ok(self.stopped_agents.get().0 + self.ebpf_redirected()?)
    }

    fn ebpf_redirected(&self) -> Result<u64> {
        let body = self.admin_get(mesh_tests::agent::ADMIN, "/stats")?;
        let stats: serde_json::Value = serde_json::from_str(&body)?;
        stats["decisions"]["redirected"]
            .as_u64()
            .context("/stats has no redirected counter")
    }

    /// Requests both agents report per destination version (`istio_requests_total`, all HTTP
    /// services): (v1, v2), summed. Proof that the 90/10 split was applied on the measured
    /// paths: an error if either agent that served requests sent v2 other than 5–15% of them.
    pub fn requests_by_version(&self) -> Result<(f64, f64)> {
        let (_, v1, v2) = self.stopped_agents.get();
        let mut total = (v1, v2);
        for (admin, redirect) in [
            (mesh_tests::agent::ADMIN, "ebpf"),
            (ADMIN_IPTABLES, "iptables"),
        ] {
            let (v1, v2) = requests_by_version(&self.admin_get(admin, "/metrics")?);
            if v1 + v2 > 0.0 && !(0.05..=0.15).contains(&(v2 / (v1 + v2))) {
                bail!("the agent with --redirect {redirect} did not apply the 90/10 split: v1 {v1}, v2 {v2}");
            }
            total = (total.0 + v1, total.1 + v2);
        }
        Ok(total)
    }

    /// `GET path` on the admin API at `admin`, in the node's namespace.
    fn admin_get(&self, admin: &str, path: &str) -> Result<String> {
        admin_get(&self.node, admin, path)
    }

    /// CPU time of everything the bench started, on both nodes.
    pub fn cgroup_usage(&self) -> Result<Duration> {
        Ok(super::cpu::cgroup_usage(self.node.cgroup_path())?
            + super::cpu::cgroup_usage(self.remote_node.cgroup_path())?)
    }

    /// The ids of the nodes and their underlay: what [`mesh_tests::leftovers_of`] takes.
    pub fn ids(&self) -> Vec<String> {
        self.network.ids()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// (v1, v2) requests in a `/metrics` scrape's `istio_requests_total`.
fn requests_by_version(metrics: &str) -> (f64, f64) {
    let mut counts = (0.0, 0.0);
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
    {
        let value: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        if line.contains("destination_version=\"v1\"") {
            counts.0 += value;
        } else if line.contains("destination_version=\"v2\"") {
            counts.1 += value;
        }
    }
    counts
}

fn admin_get(node: &SimNode, admin: &str, path: &str) -> Result<String> {
    let addr: SocketAddr = admin.parse()?;
    let path = path.to_owned();
    let (status, body) =
        node.run_on_node(move || mesh_tests::http::request(addr, "GET", &path, &[], ""))??;
    if status != 200 {
        bail!("{admin} answered {status}: {body}");
    }
    Ok(body)
}

fn ca_flag(dir: &Path) -> Result<Vec<String>> {
    let dir = dir.to_str().context("the CA folder's path is not UTF-8")?;
    Ok(vec!["--ca".to_owned(), dir.to_owned()])
}

/// The agent in `redirect` mode, pinned, enrolling `pods`, ready. The admin socket's name
/// carries the node, so node 2's eBPF agent has its own.
fn start_agent(
    node: &SimNode,
    binary: &Path,
    config: &ConfigDir,
    pods: &[&Pod],
    redirect: &str,
    flags: &[String],
) -> Result<PodProcess> {
    let admin = match redirect {
        "ebpf" => mesh_tests::agent::ADMIN,
        _ => ADMIN_IPTABLES,
    };
    let mut agent = pinned(binary);
    agent
        .args(["run", "--redirect", redirect])
        .arg("--cgroup")
        .arg(node.cgroup_path())
        .args(["--admin", admin, "--workers", "1"])
        // Each agent its own admin socket: two run on the node at once.
        .arg("--admin-socket")
        .arg(std::env::temp_dir().join(format!(
            "mesh-bench-{}-{}-{redirect}.sock",
            std::process::id(),
            node.id()
        )))
        // And its own handover socket, or the second would try to take over from the first.
        .arg("--handover-socket")
        .arg(std::env::temp_dir().join(format!(
            "mesh-bench-{}-{}-{redirect}.handover.sock",
            std::process::id(),
            node.id()
        )))
        .args(flags)
        // The node's own bpffs: what inbound capture pins goes with the node.
        .arg("--bpf-pin-dir")
        .arg(node.bpffs_dir())
        .arg("--config")
        .arg(config.path());
    for pod in pods {
        agent
            .arg("--enroll")
            .arg(format!("{}={}", pod.name(), pod.netns_path().display()));
    }
    let agent = node.spawn_on_node(agent)?;
    wait_ready(node, &agent, admin)
        .with_context(|| format!("the agent with --redirect {redirect} {flags:?}"))?;
    Ok(agent)
}

/// `taskset -c 1 program`: taskset execs the program, so the process id stays the program's.
fn pinned(program: &Path) -> Command {
    let mut command = Command::new("taskset");
    command.args(["-c", SERVER_CPU]).arg(program);
    command
}

fn wait_ready(node: &SimNode, agent: &PodProcess, admin: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if admin_get(node, admin, "/ready").is_ok() {
            return Ok(());
        }
        if agent.stderr().is_closed() {
            bail!("the agent exited:\n{}", agent.stderr().text());
        }
        if Instant::now() > deadline {
            bail!(
                "the agent was not ready in 20 s:\n{}",
                agent.stderr().text()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
