//! One simulated node holds every scenario, each on its own port, so all of them can be
//! interleaved round-robin without rebuilding anything between runs:
//!
//! ```text
//!  CPU 0                         CPU 1
//!  client       ─────────────▶  server-v1, server-v2   hello :8080 (12 B) :8081 (1 KiB) :9000
//!      └───────────────────────▶ proxy   nginx :80, haproxy :81 (L7) :9001 (L4) ─▶ servers
//!  client-mesh  ─ connect4 ─▶ mesh-agent (its in-pod listener) ─▶ servers
//! ```
//!
//! `client-mesh` is the only enrolled pod: an enrolled pod's every connection goes through the
//! agent, so the other scenarios need a client the kernel leaves alone.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mesh_tests::{ConfigDir, Pod, PodProcess, SimNode};

use super::hello::Listener;
use super::proxies::{self, HELLO_1K_PORT, HELLO_PORT, TCP_PORT};
use super::tools::Tools;

/// Servers and proxies share this core, as a node agent shares cores with the apps.
pub const SERVER_CPU: &str = "1";

pub struct Topology {
    // Processes before the node: they are stopped first, then the node's drop kills anything left.
    pub agent: PodProcess,
    pub nginx: PodProcess,
    pub haproxy: PodProcess,
    _servers: Vec<PodProcess>,
    _config: ConfigDir,
    scratch: PathBuf,
    pub client: Pod,
    pub client_mesh: Pod,
    pub server_v1: Pod,
    pub proxy: Pod,
    pub node: SimNode,
}

/// Binaries built by the bench in release mode.
pub struct Binaries {
    pub agent: PathBuf,
    pub xtask: PathBuf,
}

impl Topology {
    pub fn start(binaries: &Binaries, tools: &Tools) -> Result<Topology> {
        let node = SimNode::new()?;
        let client = node.add_pod("client")?;
        let client_mesh = node.add_pod("client-mesh")?;
        let server_v1 = node.add_pod("server-v1")?;
        let server_v2 = node.add_pod("server-v2")?;
        let proxy = node.add_pod("proxy")?;

        let mut servers = Vec::new();
        for pod in [&server_v1, &server_v2] {
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

        let config = proxies::mesh_config(&server_v1, &server_v2)?;
        let mut agent = pinned(&binaries.agent);
        agent
            .arg("run")
            .arg("--cgroup")
            .arg(node.cgroup_path())
            .args(["--admin", mesh_tests::agent::ADMIN, "--workers", "1"])
            .arg("--enroll")
            .arg(format!(
                "{}={}",
                client_mesh.name(),
                client_mesh.netns_path().display()
            ))
            .arg("--config")
            .arg(config.path());
        let agent = node.spawn_on_node(agent)?;
        wait_ready(&node, &agent)?;

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
            agent,
            nginx,
            haproxy,
            _servers: servers,
            _config: config,
            scratch,
            client,
            client_mesh,
            server_v1,
            proxy,
            node,
        })
    }

    /// Asks the agent for its kernel counters: proof that the mesh scenarios went through it.
    pub fn redirected(&self) -> Result<u64> {
        let (_, body) =
            mesh_tests::agent::admin_request(&self.node.netns_path(), "GET", "/stats", "")?;
        let stats: serde_json::Value = serde_json::from_str(&body)?;
        stats["decisions"]["redirected"]
            .as_u64()
            .context("/stats has no redirected counter")
    }

    /// Requests the agent reports per destination version (`istio_requests_total`, all HTTP
    /// services): (v1, v2). Proof that the 90/10 split was applied on the measured path.
    pub fn requests_by_version(&self) -> Result<(f64, f64)> {
        let (_, body) =
            mesh_tests::agent::admin_request(&self.node.netns_path(), "GET", "/metrics", "")?;
        let mut counts = (0.0, 0.0);
        for line in body
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
        Ok(counts)
    }

    pub fn cgroup(&self) -> &Path {
        self.node.cgroup_path()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// `taskset -c 1 program`: taskset execs the program, so the process id stays the program's.
fn pinned(program: &Path) -> Command {
    let mut command = Command::new("taskset");
    command.args(["-c", SERVER_CPU]).arg(program);
    command
}

fn wait_ready(node: &SimNode, agent: &PodProcess) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = mesh_tests::agent::admin_request(&node.netns_path(), "GET", "/ready", "");
        if let Ok((200, _)) = ready {
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
