//! A real Kubernetes control plane on loopback, for the tests and `cargo xtask cluster up`:
//! etcd 3.4 (Debian's), kube-apiserver, kube-controller-manager and kube-scheduler 1.20.2 (built
//! once from Debian bookworm's source package and cached, see [`ensure_binaries`]).
//!
//! What it runs:
//! - etcd with its data on tmpfs (`/dev/shm`), thrown away at stop;
//! - kube-apiserver on `https://127.0.0.1:<port>` (or on an address given to
//!   [`ControlPlane::start_on`], which its serving certificate then names too) with a fresh CA,
//!   RBAC, static tokens for the
//!   admin (`system:masters`) and the two controllers, service-account tokens signed with a fresh
//!   key (TokenRequest, `kubectl create token`, as well as 1.20's legacy token Secrets);
//! - kube-controller-manager (each controller with its own service account, as kubeadm runs it:
//!   namespaces get their `default` ServiceAccount and its token, Deployments their ReplicaSets
//!   and Pods, Services their EndpointSlices) and kube-scheduler, both without leader election;
//! - `deploy/crds` and `deploy/gateway-api` installed and established.
//!
//! Nothing runs pods: there is no kubelet. A Node object registered by a test gets pods bound to
//! it by the scheduler.
//!
//! For outages, [`ControlPlane::stop_apiserver`] and [`ControlPlane::start_apiserver`] stop the
//! API server and start it again on the same port with the same flags and etcd's data, and
//! [`ControlPlane::compact_etcd`] makes every resourceVersion handed out so far too old to
//! watch from (`410 Gone`).
//!
//! Every [`ControlPlane::start`] is a control plane of its own on free loopback ports, in a
//! directory named after the process and a counter (`mesh-cp-<pid>-<n>`), so tests in one
//! process and test processes side by side each run their own. Dropping it stops every process
//! it started and removes the directory; a process killed before its drop leaves them behind,
//! and the next start in any process (or [`sweep_stale`]) removes them.

mod build;
mod pki;

use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rustix::process::{kill_process, Pid, Signal};

use crate::command::stdout_of;
use build::progress;
pub use build::{cache_dir, ensure_binaries, Binaries, COMPONENTS, KUBERNETES_VERSION};
pub use pki::KUBERNETES_SERVICE_IP;
use pki::{Credentials, Identity};

/// The CRDs of `deploy/gateway-api`.
pub const GATEWAY_API_CRDS: [&str; 3] = [
    "crd/httproutes.gateway.networking.k8s.io",
    "crd/grpcroutes.gateway.networking.k8s.io",
    "crd/gateways.gateway.networking.k8s.io",
];
/// The agent's namespace and ServiceAccount in `deploy/base`.
const AGENT_NAMESPACE: &str = "sidecarless-system";
const AGENT: &str = "mesh-agent";
/// The signer's ServiceAccount in `deploy/base`.
const SIGNER: &str = "mesh-signer";
/// Prefix of the run directories of tests' control planes (`mesh-cp-<pid>-<n>`).
const RUN_PREFIX: &str = "mesh-cp-";
/// The range Services' cluster IPs come from (kubeadm's default).
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// How long a component may take to become ready. Generous: on a busy 2-core machine the API
/// server alone has taken 20 s.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a component may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// File in the run directory listing the processes started, one `name pid executable` a line.
const PIDS_FILE: &str = "pids";

/// One running control plane. Dropping it stops it (unless [`ControlPlane::detach`]ed).
pub struct ControlPlane {
    dir: PathBuf,
    server: String,
    kubeconfig: PathBuf,
    ca_cert: PathBuf,
    admin_token: String,
    components: Vec<Component>,
    detached: bool,
    /// Where etcd serves its clients.
    etcd: SocketAddr,
    /// The API server's command line, to start it again the same way.
    apiserver_command: Option<(PathBuf, Vec<OsString>)>,
    /// Its place among `components` while stopped (they stop in reverse order).
    apiserver_slot: Option<usize>,
    /// Whether the components run in a process group of their own (see [`Placement`]).
    own_process_group: bool,
}

/// A process of the control plane.
struct Component {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

/// Where a control plane keeps its files, and whether its processes may outlive the starter.
struct Placement {
    dir: PathBuf,
    /// A process group of their own, so a Ctrl-C in the terminal that started them does not
    /// reach them.
    own_process_group: bool,
}

impl ControlPlane {
    /// Builds the binaries if they are not cached, then starts a control plane of its own on
    /// free loopback ports and waits until it is ready (progress lines go to stderr).
    pub fn start() -> Result<Self> {
        Self::start_on(Ipv4Addr::LOCALHOST)
    }

    /// Like [`ControlPlane::start`], with the API server serving on `address` only (one of the
    /// caller's network namespace: a [`crate::SimNetwork`] node's underlay address, so that the
    /// kubelets and agents of the other nodes reach it). Its certificate names `address`, and
    /// every kubeconfig (the admin's, the controllers', [`ControlPlane::agent_kubeconfig`]'s)
    /// points there. etcd stays on loopback.
    pub fn start_on(address: Ipv4Addr) -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        sweep_stale_once();
        let name = format!(
            "{RUN_PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let placement = Placement {
            dir: run_root().join(name),
            own_process_group: false,
        };
        Self::start_at(&placement, address)
    }

    /// Starts a control plane in `dir` whose processes can outlive this one (`cargo xtask
    /// cluster up`): in a process group of their own, so a Ctrl-C in the terminal does not reach
    /// them. Dropping the value still stops them; [`ControlPlane::detach`] lets them run on until
    /// [`stop_detached`]. Fails if `dir` holds a running control plane.
    pub fn start_detached(dir: &Path) -> Result<Self> {
        let running = running_in(dir);
        ensure!(
            running.is_empty(),
            "a control plane is already running in {} ({}): stop it first",
            dir.display(),
            running.join(", ")
        );
        let _ = fs::remove_dir_all(dir);
        let placement = Placement {
            dir: dir.to_owned(),
            own_process_group: true,
        };
        Self::start_at(&placement, Ipv4Addr::LOCALHOST)
    }

    fn start_at(placement: &Placement, address: Ipv4Addr) -> Result<Self> {
        let binaries = ensure_binaries()?;
        // Free ports are picked before the processes bind them; another process may take one in
        // between. That shows as an early exit with "address already in use": start again.
        let mut attempt = 1;
        loop {
            match Self::try_start(&binaries, placement, address) {
                Ok(control_plane) => return Ok(control_plane),
                Err(error) if attempt < 3 && format!("{error:#}").contains("already in use") => {
                    progress(format_args!("a port was taken meanwhile; starting again"));
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    fn try_start(binaries: &Binaries, placement: &Placement, address: Ipv4Addr) -> Result<Self> {
        let started = Instant::now();
        let dir = &placement.dir;
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        let credentials = pki::write(dir, address)?;
        let [etcd_client, etcd_peer, apiserver, controller_manager, scheduler] = free_ports()?;
        let server = format!("https://{address}:{apiserver}");
        let mut control_plane = Self {
            dir: dir.clone(),
            kubeconfig: credentials.kubeconfig(dir, &server, Identity::Admin)?,
            server,
            ca_cert: credentials.ca_cert.clone(),
            admin_token: credentials.admin_token.clone(),
            components: Vec::new(),
            detached: false,
            etcd: SocketAddr::from((Ipv4Addr::LOCALHOST, etcd_client)),
            apiserver_command: None,
            apiserver_slot: None,
            own_process_group: placement.own_process_group,
        };
        // From here on, a failure drops `control_plane`, which stops what was started.
        control_plane.start_etcd(binaries, placement, etcd_client, etcd_peer)?;
        control_plane.launch_apiserver(binaries, &credentials, address, etcd_client)?;
        control_plane.start_controllers(
            binaries,
            placement,
            &credentials,
            controller_manager,
            scheduler,
        )?;
        control_plane.install_crds()?;
        control_plane.wait_for_service_accounts()?;
        progress(format_args!(
            "up in {:.1} s: {} (KUBECONFIG={})",
            started.elapsed().as_secs_f64(),
            control_plane.server,
            control_plane.kubeconfig.display()
        ));
        Ok(control_plane)
    }

    fn start_etcd(
        &mut self,
        binaries: &Binaries,
        placement: &Placement,
        client: u16,
        peer: u16,
    ) -> Result<()> {
        let started = Instant::now();
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut etcd = Command::new(&binaries.etcd);
        etcd.arg("--name=mesh")
            // The run directory is on tmpfs where there is one: etcd 3.4 has no way to skip
            // fsync, and the data is thrown away at stop.
            .arg(format!("--data-dir={}", self.dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=mesh={peer_url}"))
            .args(["--logger=zap", "--log-outputs=stderr"]);
        self.spawn("etcd", etcd, placement)?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, client));
        self.wait_until("etcd", || {
            Ok(crate::http::get(addr, "/health")
                .is_ok_and(|(status, body)| status == 200 && body.contains("true")))
        })?;
        progress(format_args!(
            "etcd ready on {client_url} ({:.1} s)",
            started.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    fn launch_apiserver(
        &mut self,
        binaries: &Binaries,
        credentials: &Credentials,
        address: Ipv4Addr,
        etcd: u16,
    ) -> Result<()> {
        let port = self.port();
        let mut apiserver = Command::new(&binaries.kube_apiserver);
        apiserver
            .arg(format!("--bind-address={address}"))
            .arg(format!("--advertise-address={address}"))
            .arg(format!("--secure-port={port}"))
            // 1.20 otherwise also serves everything unauthenticated on 127.0.0.1:8080.
            .arg("--insecure-port=0")
            .arg(format!("--etcd-servers=http://127.0.0.1:{etcd}"))
            .arg(format!(
                "--tls-cert-file={}",
                credentials.serving_cert.display()
            ))
            .arg(format!(
                "--tls-private-key-file={}",
                credentials.serving_key.display()
            ))
            .arg(format!(
                "--client-ca-file={}",
                credentials.ca_cert.display()
            ))
            .arg(format!(
                "--token-auth-file={}",
                credentials.token_file.display()
            ))
            .arg("--authorization-mode=RBAC")
            .arg(format!(
                "--service-account-key-file={}",
                credentials.service_account_public_key.display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                credentials.service_account_key.display()
            ))
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
            // The `kubernetes` Service's endpoints would be 127.0.0.1 by default, which Endpoints
            // refuse; in-cluster clients here use kubeconfigs.
            .arg("--endpoint-reconciler-type=none")
            // The agent's DaemonSet asks for host namespaces, as real clusters allow.
            .arg("--allow-privileged=true")
            .arg("--profiling=false");
        self.apiserver_command = Some((
            apiserver.get_program().into(),
            apiserver.get_args().map(OsString::from).collect(),
        ));
        self.run_apiserver()
    }

    /// Starts the API server as [`ControlPlane::launch_apiserver`] set it up and waits until it
    /// is ready.
    fn run_apiserver(&mut self) -> Result<()> {
        let started = Instant::now();
        let (program, args) = self
            .apiserver_command
            .clone()
            .context("the API server was never set up")?;
        let mut apiserver = Command::new(program);
        apiserver.args(args);
        let placement = Placement {
            dir: self.dir.clone(),
            own_process_group: self.own_process_group,
        };
        self.spawn("kube-apiserver", apiserver, &placement)?;
        if let Some(slot) = self.apiserver_slot.take() {
            let component = self.components.pop().expect("spawned above");
            self.components
                .insert(slot.min(self.components.len()), component);
        }
        let kubeconfig = self.kubeconfig.clone();
        self.wait_until("kube-apiserver", || {
            Ok(kubectl(&kubeconfig, &["get", "--raw", "/readyz"])
                .is_ok_and(|body| body.trim() == "ok"))
        })?;
        progress(format_args!(
            "kube-apiserver ready on {} ({:.1} s)",
            self.server,
            started.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    /// Stops the API server (SIGTERM, SIGKILL after a grace period), as an outage: clients'
    /// connections and watches break, and new ones are refused, until
    /// [`ControlPlane::start_apiserver`]. etcd and the controllers run on.
    pub fn stop_apiserver(&mut self) -> Result<()> {
        let slot = self
            .components
            .iter()
            .position(|component| component.name == "kube-apiserver")
            .context("the API server is not running")?;
        let mut component = self.components.remove(slot);
        self.apiserver_slot = Some(slot);
        stop_child(&mut component.child).context("stopping kube-apiserver")?;
        progress(format_args!("kube-apiserver stopped"));
        Ok(())
    }

    /// Starts the API server [`ControlPlane::stop_apiserver`] stopped, on the same port with the
    /// same flags and etcd's data, and waits until it is ready. Call it where the first start
    /// ran (inside the node's network namespace when the control plane runs there): the new
    /// process binds loopback in the caller's network namespace.
    pub fn start_apiserver(&mut self) -> Result<()> {
        ensure!(
            !self
                .components
                .iter()
                .any(|component| component.name == "kube-apiserver"),
            "the API server is running already"
        );
        self.run_apiserver()
    }

    /// Makes every resourceVersion handed out so far too old to watch from: writes a key outside
    /// the API server's prefix (`/registry`), so that etcd's revision passes all of them, and
    /// compacts etcd's history up to that revision. Do it while the API server is stopped: its
    /// watch cache, filled at start from etcd's current revision, then answers a watch resumed
    /// from any earlier resourceVersion with `410 Gone`, as etcd itself does. Returns the
    /// compacted revision. Call it where etcd is reachable (inside the node's network namespace
    /// when the control plane runs there).
    pub fn compact_etcd(&self) -> Result<u64> {
        // etcd's JSON gateway wants keys in base64: this is "mesh-test/revision".
        const KEY: &str = "bWVzaC10ZXN0L3JldmlzaW9u";
        let call = |path: &str, body: serde_json::Value| -> Result<serde_json::Value> {
            let (status, answer) = crate::http::request(
                self.etcd,
                "POST",
                path,
                &[("Content-Type", "application/json")],
                &body.to_string(),
            )
            .with_context(|| format!("etcd {path}"))?;
            ensure!(status == 200, "etcd {path}: {status} {answer}");
            serde_json::from_str(&answer).with_context(|| format!("etcd {path} answered {answer}"))
        };
        let put = call("/v3/kv/put", serde_json::json!({ "key": KEY, "value": "" }))?;
        // int64s come as strings in the gateway's JSON.
        let revision: u64 = put["header"]["revision"]
            .as_str()
            .and_then(|revision| revision.parse().ok())
            .with_context(|| format!("etcd's put answered no revision: {put}"))?;
        call(
            "/v3/kv/compaction",
            serde_json::json!({ "revision": revision.to_string(), "physical": true }),
        )?;
        progress(format_args!("etcd compacted at revision {revision}"));
        Ok(revision)
    }

    fn start_controllers(
        &mut self,
        binaries: &Binaries,
        placement: &Placement,
        credentials: &Credentials,
        controller_manager_port: u16,
        scheduler_port: u16,
    ) -> Result<()> {
        let started = Instant::now();
        // Health is served on plain HTTP on loopback (1.20's insecure port, deprecated but
        // there); the secure ports would default to fixed numbers two control planes share.
        let health = |port: u16| {
            [
                "--address=127.0.0.1".to_owned(),
                format!("--port={port}"),
                "--secure-port=0".to_owned(),
                // One instance: no lease to wait for.
                "--leader-elect=false".to_owned(),
            ]
        };
        let mut controller_manager = Command::new(&binaries.kube_controller_manager);
        controller_manager
            .arg(format!(
                "--kubeconfig={}",
                credentials
                    .kubeconfig(&self.dir, &self.server, Identity::ControllerManager)?
                    .display()
            ))
            .args(health(controller_manager_port))
            .arg("--use-service-account-credentials=true")
            .arg(format!(
                "--service-account-private-key-file={}",
                credentials.service_account_key.display()
            ))
            .arg(format!("--root-ca-file={}", credentials.ca_cert.display()))
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"));
        self.spawn("kube-controller-manager", controller_manager, placement)?;
        let mut scheduler = Command::new(&binaries.kube_scheduler);
        scheduler
            .arg(format!(
                "--kubeconfig={}",
                credentials
                    .kubeconfig(&self.dir, &self.server, Identity::Scheduler)?
                    .display()
            ))
            .args(health(scheduler_port));
        self.spawn("kube-scheduler", scheduler, placement)?;
        for (name, port) in [
            ("kube-controller-manager", controller_manager_port),
            ("kube-scheduler", scheduler_port),
        ] {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            self.wait_until(name, || {
                Ok(crate::http::get(addr, "/healthz")
                    .is_ok_and(|(status, body)| status == 200 && body.trim() == "ok"))
            })?;
        }
        progress(format_args!(
            "kube-controller-manager and kube-scheduler healthy ({:.1} s)",
            started.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    /// `kubectl apply -f deploy/crds` and `-k deploy/gateway-api` (Istio's kinds and the Gateway
    /// API's routes), then waits until the API server serves them.
    fn install_crds(&self) -> Result<()> {
        let started = Instant::now();
        let root = repo_root();
        let crds = root.join("deploy/crds");
        let crds = crds.to_str().context("the repository path is not UTF-8")?;
        let gateway_api = root.join("deploy/gateway-api");
        let gateway_api = gateway_api
            .to_str()
            .context("the repository path is not UTF-8")?;
        self.kubectl(&["apply", "-f", crds])?;
        self.kubectl(&["apply", "-k", gateway_api])?;
        self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "-f",
            crds,
        ])?;
        let mut wait = vec!["wait", "--for=condition=Established", "--timeout=60s"];
        wait.extend(GATEWAY_API_CRDS);
        self.kubectl(&wait)?;
        progress(format_args!(
            "deploy/crds and deploy/gateway-api established ({:.1} s)",
            started.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    /// What the agent needs to run as the DaemonSet would: `deploy/base`'s namespace,
    /// ServiceAccount, ClusterRole, Role and their bindings (not the DaemonSet), and a kubeconfig
    /// with a token of that ServiceAccount, written to `<dir>/agent.kubeconfig`. Call it where
    /// the API server is reachable (inside the node's namespace when the control plane runs
    /// there).
    pub fn agent_kubeconfig(&self) -> Result<PathBuf> {
        self.apply_base(&[
            "namespace",
            "serviceaccount",
            "clusterrole",
            "clusterrolebinding",
            "role",
        ])?;
        let token = self.kubectl(&["-n", AGENT_NAMESPACE, "create", "token", AGENT])?;
        self.write_kubeconfig("agent", AGENT, &format!("token: {}", token.trim()))
    }

    /// What the signer (`mesh-agent ca serve`) needs to run as its Deployment would:
    /// `deploy/base`'s namespace, the signer's ServiceAccount, ClusterRole, Role and bindings,
    /// and a kubeconfig with a token of that ServiceAccount, `<dir>/signer.kubeconfig`.
    pub fn signer_kubeconfig(&self) -> Result<PathBuf> {
        self.apply_base(&[
            "namespace",
            "signer-serviceaccount",
            "signer-clusterrole",
            "signer-clusterrolebinding",
            "signer-role",
        ])?;
        let token = self.kubectl(&["-n", AGENT_NAMESPACE, "create", "token", SIGNER])?;
        self.write_kubeconfig("signer", SIGNER, &format!("token: {}", token.trim()))
    }

    /// A kubeconfig, `<dir>/<name>.kubeconfig`, for this API server with `credentials` (a
    /// kubeconfig user's fields, e.g. `token: …` or `tokenFile: /path`).
    pub fn write_kubeconfig(&self, name: &str, user: &str, credentials: &str) -> Result<PathBuf> {
        let path = self.dir.join(format!("{name}.kubeconfig"));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: mesh-test\n  cluster:\n    \
             server: {}\n    certificate-authority: {}\nusers:\n- name: {user}\n  user:\n    \
             {credentials}\ncontexts:\n- name: mesh-test\n  context: {{cluster: mesh-test, user: {user}}}\n\
             current-context: mesh-test\n",
            self.server,
            self.ca_cert.display(),
        );
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// `kubectl apply -f deploy/base/<file>.yaml` for each file.
    fn apply_base(&self, files: &[&str]) -> Result<()> {
        let base = repo_root().join("deploy/base");
        for file in files {
            let path = base.join(format!("{file}.yaml"));
            let path = path.to_str().context("the repository path is not UTF-8")?;
            self.kubectl(&["apply", "-f", path])?;
        }
        Ok(())
    }

    /// Waits until the controller-manager's service-account and token controllers have given the
    /// `default` namespace its `default` ServiceAccount and that its token Secret: from then on,
    /// pods can be created.
    fn wait_for_service_accounts(&mut self) -> Result<()> {
        let started = Instant::now();
        let kubeconfig = self.kubeconfig.clone();
        self.wait_until("the default ServiceAccount's token", || {
            Ok(kubectl(
                &kubeconfig,
                &[
                    "-n",
                    "default",
                    "get",
                    "serviceaccount",
                    "default",
                    "-o",
                    "jsonpath={.secrets[*].name}",
                ],
            )
            .is_ok_and(|names| !names.trim().is_empty()))
        })?;
        progress(format_args!(
            "service accounts and their tokens issued ({:.1} s)",
            started.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    /// The API server's URL, `https://127.0.0.1:<port>` (or the address given to
    /// [`ControlPlane::start_on`]).
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The API server's port.
    pub fn port(&self) -> u16 {
        self.server
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .expect("the server URL ends in its port")
    }

    /// A kubeconfig for the admin (`system:masters`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The CA that signed the API server's certificate (PEM).
    pub fn ca_cert(&self) -> &Path {
        &self.ca_cert
    }

    /// The admin's bearer token.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// The directory with the credentials, kubeconfigs and each component's log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `kubectl` against this control plane, as the admin (add `--token` for someone else).
    pub fn kubectl_command(&self) -> Command {
        let mut command = Command::new("kubectl");
        command.env("KUBECONFIG", &self.kubeconfig);
        command
    }

    /// Runs `kubectl ARGS` as the admin and returns its stdout; the error has all it printed.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        kubectl(&self.kubeconfig, args)
    }

    /// Stops every process (SIGTERM, then SIGKILL after a grace period) and removes the run
    /// directory.
    pub fn stop(mut self) -> Result<()> {
        self.stop_all()
    }

    /// Lets the processes run on after this value is gone ([`stop_detached`] stops them).
    pub fn detach(mut self) -> PathBuf {
        self.detached = true;
        self.components.clear();
        self.dir.clone()
    }

    fn stop_all(&mut self) -> Result<()> {
        let mut errors = Vec::new();
        while let Some(mut component) = self.components.pop() {
            if let Err(error) = stop_child(&mut component.child) {
                errors.push(format!("{}: {error:#}", component.name));
            }
        }
        if self.dir.exists() {
            if let Err(error) = fs::remove_dir_all(&self.dir) {
                errors.push(format!("removing {}: {error}", self.dir.display()));
            }
        }
        ensure!(
            errors.is_empty(),
            "stopping the control plane: {}",
            errors.join("; ")
        );
        Ok(())
    }

    /// Starts a component with its output in `<dir>/<name>.log` and records its pid.
    fn spawn(
        &mut self,
        name: &'static str,
        mut command: Command,
        placement: &Placement,
    ) -> Result<()> {
        let log = self.dir.join(format!("{name}.log"));
        // Appended to: a component started again keeps its earlier log.
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        if placement.own_process_group {
            command.process_group(0);
        }
        let executable = PathBuf::from(command.get_program());
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", executable.display()))?;
        let record = format!("{name} {} {}\n", child.id(), executable.display());
        self.components.push(Component { name, child, log });
        append(&self.dir.join(PIDS_FILE), &record)
    }

    /// Polls `ready` until it says yes; fails early if a component exited, with its log's end.
    fn wait_until(&mut self, what: &str, mut ready: impl FnMut() -> Result<bool>) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            for component in &mut self.components {
                if let Some(status) = component.child.try_wait()? {
                    bail!(
                        "{} exited ({status}) while waiting for {what}; the end of {}:\n{}",
                        component.name,
                        component.log.display(),
                        log_tail(&component.log)
                    );
                }
            }
            if ready()? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let logs: Vec<String> = self
                    .components
                    .iter()
                    .map(|c| format!("--- {} ---\n{}", c.log.display(), log_tail(&c.log)))
                    .collect();
                bail!(
                    "{what} not ready after {READY_TIMEOUT:?}; the logs end:\n{}",
                    logs.join("\n")
                );
            }
            thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        if let Err(error) = self.stop_all() {
            eprintln!("{error:#}");
        }
    }
}

impl fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlPlane")
            .field("server", &self.server)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Runs `kubectl ARGS` with `kubeconfig` and returns its stdout; the error has all it printed.
fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<String> {
    stdout_of(
        Command::new("kubectl")
            .env("KUBECONFIG", kubeconfig)
            .args(args),
    )
}

/// SIGTERM, a grace period, then SIGKILL; reaps the child.
fn stop_child(child: &mut Child) -> Result<()> {
    if child.try_wait()?.is_some() {
        return Ok(());
    }
    if let Some(pid) = Pid::from_raw(child.id() as i32) {
        let _ = kill_process(pid, Signal::TERM);
    }
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    child.kill()?;
    child.wait()?;
    Ok(())
}

/// Five distinct free loopback ports: each is held until all are picked.
fn free_ports() -> Result<[u16; 5]> {
    let listeners = (0..5)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<Result<Vec<_>, _>>()
        .context("picking free loopback ports")?;
    let mut ports = [0; 5];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

/// Where control planes keep their files: tmpfs where there is one (`/dev/shm`), so etcd's data
/// and the logs never touch the disk.
pub fn run_root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_owned()
}

fn append(path: &Path, line: &str) -> Result<()> {
    use std::io::Write;
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut file| file.write_all(line.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))
}

/// The last lines of a log, for error messages.
fn log_tail(path: &Path) -> String {
    const LINES: usize = 30;
    let Ok(file) = fs::File::open(path) else {
        return format!("({} cannot be read)", path.display());
    };
    let lines: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
    lines[lines.len().saturating_sub(LINES)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// Processes recorded in a run directory: detached control planes and leftovers
// ---------------------------------------------------------------------------------------------

/// A process a control plane started, as recorded in its run directory.
struct Recorded {
    name: String,
    pid: i32,
    executable: PathBuf,
}

impl Recorded {
    fn all_in(dir: &Path) -> Vec<Self> {
        let text = fs::read_to_string(dir.join(PIDS_FILE)).unwrap_or_default();
        text.lines()
            .filter_map(|line| {
                let mut fields = line.splitn(3, ' ');
                Some(Self {
                    name: fields.next()?.to_owned(),
                    pid: fields.next()?.parse().ok()?,
                    executable: PathBuf::from(fields.next()?),
                })
            })
            .collect()
    }

    /// Whether the pid still runs the recorded program (not a later process that reused it).
    fn is_running(&self) -> bool {
        fs::read_link(format!("/proc/{}/exe", self.pid)).is_ok_and(|exe| exe == self.executable)
    }

    /// SIGTERM, a grace period, then SIGKILL (the process is not our child: poll /proc).
    fn stop(&self) {
        let Some(pid) = Pid::from_raw(self.pid) else {
            return;
        };
        let _ = kill_process(pid, Signal::TERM);
        let deadline = Instant::now() + STOP_GRACE;
        while self.is_running() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        if self.is_running() {
            let _ = kill_process(pid, Signal::KILL);
        }
    }
}

impl fmt::Display for Recorded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (pid {})", self.name, self.pid)
    }
}

/// The admin's kubeconfig of the control plane whose files are in `dir`.
pub fn admin_kubeconfig(dir: &Path) -> PathBuf {
    pki::kubeconfig_path(dir, Identity::Admin)
}

/// The recorded processes in `dir` that still run, described.
pub fn running_in(dir: &Path) -> Vec<String> {
    Recorded::all_in(dir)
        .iter()
        .filter(|process| process.is_running())
        .map(ToString::to_string)
        .collect()
}

/// Stops the control plane [`ControlPlane::start_detached`] started in `dir` and removes `dir`;
/// returns what it stopped.
pub fn stop_detached(dir: &Path) -> Result<Vec<String>> {
    let mut stopped = Vec::new();
    // Controllers first, etcd last, as a drop does.
    for process in Recorded::all_in(dir).iter().rev() {
        if process.is_running() {
            process.stop();
            stopped.push(process.to_string());
        }
    }
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(stopped)
}

/// Tests' control planes whose process no longer exists: (run directory, owner pid).
fn stale_runs() -> Vec<(PathBuf, u32)> {
    let mut runs = Vec::new();
    for root in [run_root(), std::env::temp_dir()] {
        let Ok(entries) = fs::read_dir(&root) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let owner = name
                .strip_prefix(RUN_PREFIX)
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok());
            if let Some(owner) = owner {
                runs.push((entry.path(), owner));
            }
        }
    }
    runs.sort();
    runs.dedup();
    runs
}

/// Everything of tests' control planes that exists now (run directories and their processes),
/// of any process, described for a human.
pub fn leftovers() -> Vec<String> {
    let mut found = Vec::new();
    for (dir, _) in stale_runs() {
        found.push(format!("control plane directory {}", dir.display()));
        for process in Recorded::all_in(&dir) {
            if process.is_running() {
                found.push(format!("control plane process {process}"));
            }
        }
    }
    found
}

/// Stops the processes and removes the run directories of tests' control planes whose process
/// no longer exists (killed before its drop); returns what it removed. Safe while other test
/// processes run their own.
pub fn sweep_stale() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for (dir, owner) in stale_runs() {
        if Path::new("/proc").join(owner.to_string()).exists() {
            continue;
        }
        removed.extend(
            stop_detached(&dir)?
                .into_iter()
                .map(|process| format!("control plane process {process}")),
        );
        removed.push(format!("control plane directory {}", dir.display()));
    }
    Ok(removed)
}

/// Sweeps once per process, before its first control plane.
fn sweep_stale_once() {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| match sweep_stale() {
        Ok(removed) if !removed.is_empty() => {
            eprintln!("removed leftovers of dead test processes: {removed:?}");
        }
        Ok(_) => {}
        Err(error) => eprintln!("{error:#}"),
    });
}
