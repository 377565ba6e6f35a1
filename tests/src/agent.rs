//! The node agent as the end-to-end tests drive it: started on a simulated node, attached to the
//! node's cgroup, driven and inspected through its admin socket (each agent its own, in its own
//! temporary directory), or through its admin TCP address from inside the node's namespace.
//! A successor ([`Agent::successor`]) shares its predecessor's directory, and so its admin and
//! handover sockets: it takes over through the latter.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{netns, Pod, PodProcess, SimNode};

/// Where the agent's admin API listens inside the node's namespace (reads only in local mode;
/// probes and metrics only in Kubernetes mode).
pub const ADMIN: &str = "127.0.0.1:15000";

/// What a successor logs once its predecessor has stopped accepting.
const TOOK_OVER: &str = "took over from the running agent";

pub struct Agent {
    process: PodProcess,
    node_netns: PathBuf,
    /// Holds the agent's admin and handover sockets; 0755, so another user reaches the sockets
    /// themselves and their own mode (0600) is what refuses them. Shared with successors.
    socket_dir: Arc<tempfile::TempDir>,
    /// The arguments after the binary, for a successor.
    args: Vec<OsString>,
}

impl Agent {
    /// Starts `mesh-agent run` on the node with `pods` enrolled and the access log on, and waits
    /// until it is ready.
    pub fn start(node: &SimNode, pods: &[&Pod], extra_args: &[&str]) -> Result<Agent> {
        let agent = Agent::spawn(node, pods, extra_args)?;
        agent.wait_ready(Duration::from_secs(20))?;
        Ok(agent)
    }

    /// Starts the agent as [`Agent::start`] does, without waiting until it is ready.
    pub fn spawn(node: &SimNode, pods: &[&Pod], extra_args: &[&str]) -> Result<Agent> {
        let socket_dir = tempfile::Builder::new()
            .prefix("mesh-agent-admin.")
            .tempdir()
            .context("a directory for the admin socket")?;
        std::fs::set_permissions(
            socket_dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        let mut args: Vec<OsString> = vec!["run".into(), "--cgroup".into()];
        args.push(node.cgroup_path().into());
        args.extend(["--admin", ADMIN, "--access-log", "--admin-socket"].map(OsString::from));
        args.push(socket_dir.path().join("admin.sock").into());
        // Every agent its own, or agents of tests running side by side would take over from
        // each other.
        args.push("--handover-socket".into());
        args.push(socket_dir.path().join("handover.sock").into());
        // The node's own bpffs: its agents share pins there, as one node's agents do.
        args.push("--bpf-pin-dir".into());
        args.push(node.bpffs_dir().into());
        for pod in pods {
            args.push("--enroll".into());
            args.push(format!("{}={}", pod.name(), pod.netns_path().display()).into());
        }
        args.extend(extra_args.iter().map(OsString::from));
        Agent::spawn_with(node, &crate::agent_binary()?, Arc::new(socket_dir), args)
    }

    fn spawn_with(
        node: &SimNode,
        binary: &Path,
        socket_dir: Arc<tempfile::TempDir>,
        args: Vec<OsString>,
    ) -> Result<Agent> {
        let mut command = Command::new(binary);
        command.args(&args);
        Ok(Agent {
            process: node.spawn_on_node(command)?,
            node_netns: node.netns_path(),
            socket_dir,
            args,
        })
    }

    /// Starts `binary` (e.g. a copy of the agent: an upgrade) on `node` with this agent's
    /// arguments and sockets, and waits until it has taken over from this agent, which then
    /// drains and waits for SIGTERM.
    pub fn successor(&self, node: &SimNode, binary: &Path, timeout: Duration) -> Result<Agent> {
        let successor = self.spawn_successor(node, binary, &[])?;
        successor.wait_took_over(timeout)?;
        Ok(successor)
    }

    /// Starts `binary` on `node` with this agent's arguments and sockets, then `extra_args`,
    /// without waiting for anything.
    pub fn spawn_successor(
        &self,
        node: &SimNode,
        binary: &Path,
        extra_args: &[&str],
    ) -> Result<Agent> {
        let mut args = self.args.clone();
        args.extend(extra_args.iter().map(OsString::from));
        Agent::spawn_with(node, binary, Arc::clone(&self.socket_dir), args)
    }

    /// Waits until this agent has taken over from its predecessor; returns the line saying so.
    pub fn wait_took_over(&self, timeout: Duration) -> Result<String> {
        self.process
            .stderr()
            .wait_for_line(|line| line.contains(TOOK_OVER), timeout)
            .context("the successor did not take over")
    }

    /// The handover socket (`--handover-socket`), where a successor connects.
    pub fn handover_socket(&self) -> PathBuf {
        self.socket_dir.path().join("handover.sock")
    }

    /// Starts the agent in Kubernetes mode on `node`, which the cluster knows as `node_name`,
    /// with `kubeconfig`, without waiting until it is ready.
    pub fn spawn_kubernetes(node: &SimNode, kubeconfig: &Path, node_name: &str) -> Result<Agent> {
        let kubeconfig = kubeconfig
            .to_str()
            .context("the kubeconfig path is not UTF-8")?;
        let args = [
            "--kubernetes",
            "--kubeconfig",
            kubeconfig,
            "--node-name",
            node_name,
        ];
        Agent::spawn(node, &[], &args)
    }

    pub fn process(&mut self) -> &mut PodProcess {
        &mut self.process
    }

    /// Everything the agent logged so far.
    pub fn stderr_text(&self) -> String {
        self.process.stderr().text()
    }

    /// The access log: one JSON object per proxied connection or request.
    pub fn access_log(&self) -> Vec<Value> {
        self.process.stdout().json_lines()
    }

    /// Waits until at least `n` access-log records satisfy `matches`.
    pub fn wait_for_records(
        &self,
        n: usize,
        matches: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Vec<Value>> {
        self.process
            .stdout()
            .wait_for_json_lines(n, matches, timeout)
    }

    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((200, _)) = self.admin_get("/ready") {
                return Ok(());
            }
            if self.process.stderr().is_closed() {
                bail!("the agent exited:\n{}", self.process.stderr().text());
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent was not ready after {timeout:?}:\n{}",
                    self.process.stderr().text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The agent's admin socket (`--admin-socket`): what `mesh-agent apply` must be given.
    pub fn admin_socket(&self) -> PathBuf {
        self.socket_dir.path().join("admin.sock")
    }

    /// `GET path` on the admin socket: (status, body).
    pub fn admin_get(&self, path: &str) -> Result<(u16, String)> {
        self.admin_request("GET", path, "")
    }

    /// The pods the agent has enrolled (`/pods`), as `namespace/name`, sorted.
    pub fn enrolled(&self) -> Result<Vec<String>> {
        let (_, body) = self.admin_get("/pods")?;
        let pods: Value = serde_json::from_str(&body).context("/pods")?;
        let mut names: Vec<String> = pods
            .as_array()
            .context("/pods is no list")?
            .iter()
            .map(|pod| format!("{}/{}", pod["namespace"], pod["name"]).replace('"', ""))
            .collect();
        names.sort();
        Ok(names)
    }

    /// A request on the admin socket, where changes are allowed (in local mode): (status, body).
    pub fn admin_request(&self, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
        let headers = [("Content-Type", "application/json")];
        crate::http::request_unix(&self.admin_socket(), method, path, &headers, body)
    }

    /// A request on the admin TCP address ([`ADMIN`] in the node's namespace), which takes no
    /// changes: (status, body).
    pub fn admin_tcp_request(&self, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
        admin_request(&self.node_netns, method, path, body)
    }

    pub fn stats(&self) -> Result<Value> {
        let (status, body) = self.admin_get("/stats")?;
        if status != 200 {
            bail!("/stats answered {status}: {body}");
        }
        serde_json::from_str(&body).context("parsing /stats")
    }

    /// The kernel's decision counters by name.
    pub fn decisions(&self) -> Result<BTreeMap<String, u64>> {
        let stats = self.stats()?;
        let decisions = stats["decisions"]
            .as_object()
            .context("/stats has no decisions")?;
        Ok(decisions
            .iter()
            .map(|(name, count)| (name.clone(), count.as_u64().unwrap_or(0)))
            .collect())
    }
}

/// A request to the admin TCP address ([`ADMIN`]) from a thread inside the node's namespace;
/// only reads are answered there (changes go through [`Agent::admin_request`]).
pub fn admin_request(
    node_netns: &Path,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String)> {
    let (method, path, body) = (method.to_owned(), path.to_owned(), body.to_owned());
    netns::run_in(node_netns, move || {
        let headers = [("Content-Type", "application/json")];
        crate::http::request(ADMIN.parse()?, &method, &path, &headers, &body)
    })?
}

/// How many programs are attached directly to `cgroup` at the hooks the agent uses
/// (`BPF_PROG_QUERY`), so a test can prove the agent left nothing behind.
pub fn attached_programs(cgroup: &Path) -> Result<u32> {
    Ok(attached_program_ids(cgroup)?.len() as u32)
}

/// The ids of the programs attached directly to `cgroup` at the hooks the agent uses, hook by
/// hook (sockops, connect4, connect6): after a restart, the successor's programs must be there
/// in place of its predecessor's, one per hook.
pub fn attached_program_ids(cgroup: &Path) -> Result<Vec<u32>> {
    // Attach types from the kernel's `enum bpf_attach_type`.
    const BPF_CGROUP_SOCK_OPS: u32 = 3;
    const BPF_CGROUP_INET4_CONNECT: u32 = 10;
    const BPF_CGROUP_INET6_CONNECT: u32 = 11;
    const BPF_PROG_QUERY: libc::c_long = 16;
    /// More than any test attaches at one hook.
    const MAX_IDS: usize = 16;

    #[repr(C)]
    #[derive(Default)]
    struct QueryAttr {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
        prog_attach_flags: u64,
        link_ids: u64,
        link_attach_flags: u64,
        revision: u64,
    }

    let dir = std::fs::File::open(cgroup)
        .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
    let mut all = Vec::new();
    for attach_type in [
        BPF_CGROUP_SOCK_OPS,
        BPF_CGROUP_INET4_CONNECT,
        BPF_CGROUP_INET6_CONNECT,
    ] {
        let mut ids = [0u32; MAX_IDS];
        let mut attr = QueryAttr {
            target_fd: dir.as_raw_fd() as u32,
            attach_type,
            prog_ids: ids.as_mut_ptr() as u64,
            prog_cnt: MAX_IDS as u32,
            ..QueryAttr::default()
        };
        // SAFETY: `attr` is a valid, zero-padded bpf_attr prefix of the size passed, and
        // `prog_ids` points at `prog_cnt` writable u32s that outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_QUERY,
                &mut attr as *mut QueryAttr,
                size_of::<QueryAttr>(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("BPF_PROG_QUERY");
        }
        all.extend_from_slice(&ids[..(attr.prog_cnt as usize).min(MAX_IDS)]);
    }
    Ok(all)
}

/// The samples of `metric` in Prometheus text `exposition` whose labels hold every
/// `label="value"` of `want`, summed.
pub fn sum_samples(exposition: &str, metric: &str, want: &[(&str, &str)]) -> f64 {
    let prefix = format!("{metric}{{");
    exposition
        .lines()
        .filter(|line| line.starts_with(&prefix))
        .filter(|line| {
            want.iter()
                .all(|(key, value)| line.contains(&format!("{key}=\"{value}\"")))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
