//! A kubelet stand-in: runs the pods that a real control plane ([`crate::control_plane`]) binds
//! to one simulated node as processes on that node.
//!
//! [`Kubelet::start`] registers a `Node` (the object, with the node's pod subnet as its
//! `spec.podCIDR`, then a Ready status with the node's address, [`SimNode::internal_ip`], as its
//! InternalIP) and keeps it Ready with heartbeats (every [`HEARTBEAT_PERIOD`], or
//! [`Settings::heartbeat_period`]); a thread then keeps the node's pods in step with the API
//! server:
//! - a pod bound to the node gets a pod network namespace ([`SimNode::add_pod`]); each container
//!   runs as a process there, in a kubelet-named cgroup (`kubepods/besteffort/pod<uid>/<name>`,
//!   where the agent looks for a pod's network namespace), what runs being looked up in an
//!   [`Images`] table; its status is patched to Running with its IP, and to Ready once every
//!   container's HTTP readiness probe (if any) answers 2xx;
//! - a projected `serviceAccountToken` volume gets a token of the pod's ServiceAccount bound to
//!   the pod (TokenRequest with the pod as `boundObjectRef`, as a kubelet asks), written to a
//!   directory of the host ([`RunningPod::volumes`], [`Container::mounts`]): the process cannot
//!   have it at its `mountPath`, so launchers and tests find it there. It is not renewed (tests
//!   are shorter than its hour);
//! - an image missing from the table leaves the container waiting with reason `ErrImagePull`;
//! - a pod being deleted has its processes stopped (SIGTERM, SIGKILL after its grace period,
//!   capped at [`MAX_GRACE`]) and its deletion confirmed (grace period 0), as a kubelet does.
//!
//! It polls the API server (every [`SYNC_PERIOD`]) rather than watching: a poll is one cheap
//! `curl` that always sees the whole truth, with no watch to resume after a timeout or a
//! restart, and a few hundred milliseconds of lag are nothing next to the controllers' own.
//! Every request goes to the API server from the node's network namespace: a node of its own
//! runs the control plane there (`node.run_on_node(ControlPlane::start)`); the nodes of a
//! [`crate::SimNetwork`] reach one that serves on the first node's underlay address
//! ([`ControlPlane::start_on`]). Pods' `hostIP` is the node's address too.
//!
//! One `Kubelet` serves one node; several nodes each get their own, with their own node name.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::command::stdout_of;
use crate::control_plane::ControlPlane;
use crate::{Pod, PodProcess, SimNode};

/// How often the pods on the node are compared with the API server's.
pub const SYNC_PERIOD: Duration = Duration::from_millis(200);
/// How often the node's Ready condition is renewed by default (the node lifecycle controller marks
/// a node NotReady after 40 s without).
pub const HEARTBEAT_PERIOD: Duration = Duration::from_secs(10);

/// What a kubelet may be started with beyond its node: [`Kubelet::start_with_settings`].
#[derive(Clone, Debug)]
pub struct Settings {
    /// What runs for each image.
    pub images: Images,
    /// How often the node's Ready condition's `lastHeartbeatTime` is renewed.
    pub heartbeat_period: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            images: Images::default(),
            heartbeat_period: HEARTBEAT_PERIOD,
        }
    }
}
/// The longest a container is given to exit after SIGTERM, whatever its pod asks (30 s by
/// default): tests should not wait that long.
pub const MAX_GRACE: Duration = Duration::from_secs(3);
/// How long a readiness probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// What a container's spec says that a launcher may use.
#[derive(Clone, Debug)]
pub struct Container {
    pub name: String,
    pub image: String,
    /// `command` of the spec (the image's entrypoint override), often empty.
    pub command: Vec<String>,
    pub args: Vec<String>,
    /// `env` entries with a literal `value` (others are left out).
    pub env: Vec<(String, String)>,
    /// Volumes the kubelet wrote for the container: `mountPath` → the host directory holding
    /// what a kubelet would mount there (projected ServiceAccount tokens).
    pub mounts: Vec<(String, PathBuf)>,
}

/// Builds the process of a container from its spec.
pub type Launcher = Arc<dyn Fn(&Container) -> Result<Command> + Send + Sync>;

/// What runs for an image: image name (without tag) → launcher.
#[derive(Clone)]
pub struct Images {
    launchers: BTreeMap<String, Launcher>,
}

/// The test server: `mesh_tests::upstream_binary()` with the container's args.
pub const UPSTREAM_IMAGE: &str = "mesh-test/upstream";

impl Images {
    /// No image at all.
    pub fn empty() -> Self {
        Self {
            launchers: BTreeMap::new(),
        }
    }

    /// Adds (or replaces) what runs for `image` (a name without tag, e.g. `mesh-test/upstream`).
    pub fn with(
        mut self,
        image: &str,
        launcher: impl Fn(&Container) -> Result<Command> + Send + Sync + 'static,
    ) -> Self {
        self.launchers.insert(image.to_owned(), Arc::new(launcher));
        self
    }

    /// The launcher of `image`, tag (`:v1`) and digest (`@sha256:…`) ignored.
    pub fn launcher(&self, image: &str) -> Option<&Launcher> {
        self.launchers.get(image_name(image))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.launchers.keys().map(String::as_str)
    }
}

impl Default for Images {
    /// [`UPSTREAM_IMAGE`] runs `upstream` with the container's args (its `command` is ignored:
    /// the image has one program).
    fn default() -> Self {
        Self::empty().with(UPSTREAM_IMAGE, |container| {
            let mut command = Command::new(crate::upstream_binary()?);
            command.args(&container.args);
            Ok(command)
        })
    }
}

impl fmt::Debug for Images {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

/// `registry/name` of `registry/name:tag` or `registry/name@sha256:…`.
fn image_name(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    match image.rsplit_once(':') {
        // A colon after the last slash starts the tag; before it, it is a registry's port.
        Some((name, tag)) if !tag.contains('/') => name,
        _ => image,
    }
}

/// A pod the kubelet runs, as the tests see it.
#[derive(Clone, Debug)]
pub struct RunningPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// Its network namespace on the node.
    pub pod: Pod,
    /// Process id of each running container, by container name.
    pub pids: BTreeMap<String, u32>,
    /// The volumes the kubelet wrote on the host, by volume name (projected ServiceAccount
    /// tokens: `<dir>/<path>` holds the pod-bound token).
    pub volumes: BTreeMap<String, PathBuf>,
}

/// The kubelet of one node. Dropping it stops its pods' processes (the API server is not told).
pub struct Kubelet {
    node_name: String,
    stop: Arc<AtomicBool>,
    running: Arc<Mutex<Vec<RunningPod>>>,
    thread: Option<JoinHandle<()>>,
}

impl Kubelet {
    /// Registers `node_name` as a Ready node and starts running the pods bound to it on `node`,
    /// with the [`Images::default`] table.
    pub fn start(
        node: Arc<SimNode>,
        control_plane: &ControlPlane,
        node_name: &str,
    ) -> Result<Self> {
        Self::start_with(node, control_plane, node_name, Images::default())
    }

    /// Like [`Kubelet::start`], with `images` deciding what runs.
    pub fn start_with(
        node: Arc<SimNode>,
        control_plane: &ControlPlane,
        node_name: &str,
        images: Images,
    ) -> Result<Self> {
        let settings = Settings {
            images,
            ..Settings::default()
        };
        Self::start_with_settings(node, control_plane, node_name, settings)
    }

    /// Like [`Kubelet::start`], with `settings`.
    pub fn start_with_settings(
        node: Arc<SimNode>,
        control_plane: &ControlPlane,
        node_name: &str,
        settings: Settings,
    ) -> Result<Self> {
        ensure!(
            !settings.heartbeat_period.is_zero(),
            "the heartbeat period must be longer than zero"
        );
        let api = Api {
            server: control_plane.server().to_owned(),
            ca_cert: control_plane.ca_cert().to_owned(),
            token: control_plane.admin_token().to_owned(),
        };
        let registration = Registration {
            node_name: node_name.to_owned(),
            address: node.internal_ip(),
            pod_cidr: node.pod_cidr(),
            registered_at: rfc3339(SystemTime::now()),
        };
        node.run_on_node(|| registration.register(&api))?
            .with_context(|| format!("registering node {node_name}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let running = Arc::new(Mutex::new(Vec::new()));
        let mut sync = PodSync {
            node: node.clone(),
            registration,
            api,
            images: settings.images,
            heartbeat_period: settings.heartbeat_period,
            pods: BTreeMap::new(),
            running: running.clone(),
            last_heartbeat: Instant::now(),
            last_error: None,
        };
        let thread = {
            let stop = stop.clone();
            // The containers' processes live as long as this thread.
            node.spawn_thread_on_node(move || sync.run(&stop))?
        };
        Ok(Self {
            node_name: node_name.to_owned(),
            stop,
            running,
            thread: Some(thread),
        })
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The pods running now (started, not yet stopped).
    pub fn running(&self) -> Vec<RunningPod> {
        self.running.lock().unwrap().clone()
    }

    /// The running pod `namespace/name`, if any.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<RunningPod> {
        self.running()
            .into_iter()
            .find(|pod| pod.namespace == namespace && pod.name == name)
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                eprintln!("kubelet {}: its thread panicked", self.node_name);
            }
        }
    }
}

/// The API server as the kubelet calls it: `curl` with the admin's token.
struct Api {
    server: String,
    ca_cert: PathBuf,
    token: String,
}

impl Api {
    /// `method path` with an optional JSON `body` sent as `content_type`: (status, body).
    fn call(&self, method: &str, path: &str, body: Option<(&str, &Value)>) -> Result<(u16, Value)> {
        let mut curl = Command::new("curl");
        curl.args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
            .arg("--cacert")
            .arg(&self.ca_cert)
            .args(["-X", method])
            .args(["-H", &format!("Authorization: Bearer {}", self.token)]);
        if let Some((content_type, body)) = body {
            curl.args(["-H", &format!("Content-Type: {content_type}")])
                .args(["--data-binary", &body.to_string()]);
        }
        let out = stdout_of(curl.arg(format!("{}{path}", self.server)))?;
        let (text, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", out.trim()));
        let code: u16 = code
            .parse()
            .with_context(|| format!("curl printed no status for {method} {path}"))?;
        let value = serde_json::from_str(text).unwrap_or(Value::Null);
        Ok((code, value))
    }

    /// Like [`Api::call`], failing unless the answer is 2xx (or one of `also_fine`).
    fn expect(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, &Value)>,
        also_fine: &[u16],
    ) -> Result<Value> {
        let (code, value) = self.call(method, path, body)?;
        ensure!(
            (200..300).contains(&code) || also_fine.contains(&code),
            "{method} {path}: {code} {}",
            value["message"].as_str().unwrap_or_default()
        );
        Ok(value)
    }

    fn merge_patch(&self, path: &str, patch: &Value) -> Result<()> {
        self.expect(
            "PATCH",
            path,
            Some(("application/merge-patch+json", patch)),
            &[],
        )?;
        Ok(())
    }
}

/// The node as the kubelet registers it and renews it.
struct Registration {
    node_name: String,
    address: Ipv4Addr,
    pod_cidr: String,
    /// When the node became Ready: its Ready condition's `lastTransitionTime`, which heartbeats
    /// leave alone.
    registered_at: String,
}

impl Registration {
    fn register(&self, api: &Api) -> Result<()> {
        let node_name = &self.node_name;
        let node = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": node_name,
                "labels": {"kubernetes.io/os": "linux", "kubernetes.io/hostname": node_name},
            },
            "spec": {"podCIDR": self.pod_cidr, "podCIDRs": [self.pod_cidr]},
        });
        // 409: registered before (a kubelet restarting), which is fine.
        api.expect(
            "POST",
            "/api/v1/nodes",
            Some(("application/json", &node)),
            &[409],
        )?;
        self.heartbeat(api)
    }

    /// Writes the node's status with a fresh Ready condition.
    fn heartbeat(&self, api: &Api) -> Result<()> {
        let now = rfc3339(SystemTime::now());
        let resources = json!({"cpu": "2", "memory": "4Gi", "pods": "110"});
        let status = json!({
            "status": {
                "capacity": resources,
                "allocatable": resources,
                "conditions": [{
                    "type": "Ready", "status": "True", "reason": "KubeletReady",
                    "message": "mesh_tests::kubelet is posting ready status",
                    "lastHeartbeatTime": now, "lastTransitionTime": self.registered_at,
                }],
                "addresses": [
                    {"type": "InternalIP", "address": self.address.to_string()},
                    {"type": "Hostname", "address": self.node_name},
                ],
            }
        });
        api.merge_patch(&format!("/api/v1/nodes/{}/status", self.node_name), &status)
    }
}

/// The loop of the kubelet's thread and what it keeps between rounds.
struct PodSync {
    node: Arc<SimNode>,
    registration: Registration,
    api: Api,
    images: Images,
    heartbeat_period: Duration,
    /// Pods started, by UID.
    pods: BTreeMap<String, PodState>,
    running: Arc<Mutex<Vec<RunningPod>>>,
    last_heartbeat: Instant,
    /// The last error logged, so that one failing again every round is logged once.
    last_error: Option<String>,
}

struct PodState {
    namespace: String,
    name: String,
    uid: String,
    /// Host directories of its projected volumes, by volume name; removed with the pod.
    volumes: BTreeMap<String, PathBuf>,
    /// The node's address, the pod's `hostIP`.
    host_ip: Ipv4Addr,
    pod: Pod,
    start_time: String,
    containers: Vec<ContainerState>,
    /// The status last written, to write only changes.
    written: Option<Value>,
    /// When Ready last changed (for its condition's `lastTransitionTime`).
    ready_since: String,
    ready: bool,
}

struct ContainerState {
    name: String,
    image: String,
    /// The cgroup the process was moved to, removed once the process is gone.
    cgroup: Option<PathBuf>,
    run: Run,
    probe: Option<HttpProbe>,
    ready: bool,
    /// Consecutive failures of the probe since it last passed.
    failures: u32,
    next_probe: Instant,
}

enum Run {
    Running {
        process: PodProcess,
        started_at: String,
    },
    Waiting {
        reason: &'static str,
        message: String,
    },
    Terminated {
        exit_code: i32,
        started_at: String,
        finished_at: String,
    },
}

#[derive(Debug, PartialEq)]
struct HttpProbe {
    path: String,
    port: u16,
    period: Duration,
    failure_threshold: u32,
}

impl PodSync {
    fn run(&mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            let result = self.round();
            self.log(result);
            std::thread::sleep(SYNC_PERIOD);
        }
        for (_, pod) in std::mem::take(&mut self.pods) {
            stop_pod(pod, MAX_GRACE);
        }
        self.publish();
    }

    fn log(&mut self, result: Result<()>) {
        match result {
            Ok(()) => self.last_error = None,
            Err(error) => {
                let error = format!("{error:#}");
                if self.last_error.as_ref() != Some(&error) {
                    eprintln!("kubelet {}: {error}", self.registration.node_name);
                    self.last_error = Some(error);
                }
            }
        }
    }

    fn round(&mut self) -> Result<()> {
        if self.last_heartbeat.elapsed() >= self.heartbeat_period {
            self.registration.heartbeat(&self.api)?;
            self.last_heartbeat = Instant::now();
        }
        let list = self.api.expect(
            "GET",
            &format!(
                "/api/v1/pods?fieldSelector=spec.nodeName%3D{}",
                self.registration.node_name
            ),
            None,
            &[],
        )?;
        let items = list["items"].as_array().cloned().unwrap_or_default();
        let mut errors = Vec::new();
        let mut listed = Vec::new();
        for item in &items {
            let uid = item["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            listed.push(uid.clone());
            if let Err(error) = self.sync_pod(&uid, item) {
                errors.push(format!("{error:#}"));
            }
        }
        // Gone from the API server without us (a forced deletion): stop them all the same.
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|uid| !listed.contains(uid))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(pod) = self.pods.remove(&uid) {
                stop_pod(pod, MAX_GRACE);
            }
        }
        self.publish();
        if !errors.is_empty() {
            bail!("{}", errors.join("; "));
        }
        Ok(())
    }

    fn sync_pod(&mut self, uid: &str, item: &Value) -> Result<()> {
        let namespace = item["metadata"]["namespace"].as_str().unwrap_or_default();
        let name = item["metadata"]["name"].as_str().unwrap_or_default();
        let pod_path = format!("/api/v1/namespaces/{namespace}/pods/{name}");
        if !item["metadata"]["deletionTimestamp"].is_null() {
            if let Some(pod) = self.pods.remove(uid) {
                let asked = item["spec"]["terminationGracePeriodSeconds"]
                    .as_u64()
                    .map_or(MAX_GRACE, Duration::from_secs);
                stop_pod(pod, asked.min(MAX_GRACE));
                self.publish();
            }
            // As a kubelet does once the containers are gone: only then does the pod vanish.
            let confirm = json!({
                "apiVersion": "v1", "kind": "DeleteOptions",
                "gracePeriodSeconds": 0, "preconditions": {"uid": uid},
            });
            self.api
                .expect(
                    "DELETE",
                    &pod_path,
                    Some(("application/json", &confirm)),
                    &[404, 409],
                )
                .with_context(|| format!("confirming the deletion of {namespace}/{name}"))?;
            return Ok(());
        }
        if !self.pods.contains_key(uid) {
            let pod = self
                .start_pod(namespace, name, uid, item)
                .with_context(|| format!("starting pod {namespace}/{name}"))?;
            self.pods.insert(uid.to_owned(), pod);
            self.publish();
        }
        let pod = self.pods.get_mut(uid).expect("inserted above");
        pod.observe();
        let status = pod.status();
        if pod.written.as_ref() != Some(&status) {
            self.api
                .merge_patch(&format!("{pod_path}/status"), &json!({ "status": status }))
                .with_context(|| format!("writing the status of {namespace}/{name}"))?;
            pod.written = Some(status);
        }
        Ok(())
    }

    fn start_pod(&self, namespace: &str, name: &str, uid: &str, item: &Value) -> Result<PodState> {
        let taken: Vec<String> = self
            .node
            .pods()
            .iter()
            .map(|pod| pod.name().to_owned())
            .collect();
        let volumes = self.project_tokens(namespace, name, uid, item)?;
        let pod = self.node.add_pod(&sim_pod_name(namespace, name, &taken))?;
        let now = rfc3339(SystemTime::now());
        let mut containers = Vec::new();
        for spec in item["spec"]["containers"].as_array().into_iter().flatten() {
            containers.push(self.start_container(&pod, uid, name, spec, &volumes)?);
        }
        Ok(PodState {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: uid.to_owned(),
            volumes,
            host_ip: self.registration.address,
            pod,
            start_time: now.clone(),
            containers,
            written: None,
            ready_since: now,
            ready: false,
        })
    }

    /// Writes each projected `serviceAccountToken` source of the pod's volumes: a token of the
    /// pod's ServiceAccount bound to the pod, for the source's audience (the API server's when
    /// none) and lifetime. Other volume kinds are left out.
    fn project_tokens(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
        item: &Value,
    ) -> Result<BTreeMap<String, PathBuf>> {
        let service_account = item["spec"]["serviceAccountName"]
            .as_str()
            .filter(|sa| !sa.is_empty())
            .unwrap_or("default");
        let mut volumes = BTreeMap::new();
        for volume in item["spec"]["volumes"].as_array().into_iter().flatten() {
            let sources = volume["projected"]["sources"].as_array();
            let tokens: Vec<&Value> = sources
                .into_iter()
                .flatten()
                .map(|source| &source["serviceAccountToken"])
                .filter(|token| token.is_object())
                .collect();
            if tokens.is_empty() {
                continue;
            }
            let volume_name = volume["name"].as_str().unwrap_or_default();
            let dir = volumes_root().join(uid).join(volume_name);
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for token in tokens {
                let mut spec = json!({
                    "expirationSeconds": token["expirationSeconds"].as_u64().unwrap_or(3600),
                    "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": name, "uid": uid},
                });
                if let Some(audience) = token["audience"].as_str() {
                    spec["audiences"] = json!([audience]);
                }
                let request = json!({
                    "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec,
                });
                let answer = self
                    .api
                    .expect(
                        "POST",
                        &format!(
                            "/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token"
                        ),
                        Some(("application/json", &request)),
                        &[],
                    )
                    .with_context(|| format!("a token for volume {volume_name}"))?;
                let path = dir.join(token["path"].as_str().unwrap_or("token"));
                let value = answer["status"]["token"]
                    .as_str()
                    .context("the TokenRequest answered no token")?;
                fs::write(&path, value).with_context(|| format!("writing {}", path.display()))?;
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
            }
            volumes.insert(volume_name.to_owned(), dir);
        }
        Ok(volumes)
    }

    fn start_container(
        &self,
        pod: &Pod,
        uid: &str,
        pod_name: &str,
        spec: &Value,
        volumes: &BTreeMap<String, PathBuf>,
    ) -> Result<ContainerState> {
        let strings = |value: &Value| -> Vec<String> {
            value
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        };
        let mut env = vec![("HOSTNAME".to_owned(), pod_name.to_owned())];
        env.extend(
            spec["env"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|var| {
                    Some((
                        var["name"].as_str()?.to_owned(),
                        var["value"].as_str()?.to_owned(),
                    ))
                }),
        );
        let container = Container {
            name: spec["name"].as_str().unwrap_or_default().to_owned(),
            image: spec["image"].as_str().unwrap_or_default().to_owned(),
            command: strings(&spec["command"]),
            args: strings(&spec["args"]),
            env,
            mounts: spec["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|mount| {
                    let dir = volumes.get(mount["name"].as_str()?)?;
                    Some((mount["mountPath"].as_str()?.to_owned(), dir.clone()))
                })
                .collect(),
        };
        let mut state = ContainerState {
            name: container.name.clone(),
            image: container.image.clone(),
            cgroup: None,
            run: Run::Waiting {
                reason: "ContainerCreating",
                message: String::new(),
            },
            probe: http_probe(spec)?,
            ready: false,
            failures: 0,
            next_probe: Instant::now(),
        };
        let Some(launcher) = self.images.launcher(&container.image) else {
            state.run = Run::Waiting {
                reason: "ErrImagePull",
                message: format!(
                    "image {:?} is not in the kubelet's table (it runs {:?})",
                    container.image, self.images
                ),
            };
            return Ok(state);
        };
        let mut command = match launcher(&container) {
            Ok(command) => command,
            Err(error) => {
                state.run = Run::Waiting {
                    reason: "CreateContainerError",
                    message: format!("{error:#}"),
                };
                return Ok(state);
            }
        };
        command.envs(container.env.iter().map(|(name, value)| (name, value)));
        let process = self.node.spawn_in_pod(pod, command)?;
        state.cgroup = Some(self.node.move_to_cgroup(
            process.pid(),
            &format!("kubepods/besteffort/pod{uid}/{}", container.name),
        )?);
        state.run = Run::Running {
            process,
            started_at: rfc3339(SystemTime::now()),
        };
        Ok(state)
    }

    /// Makes what [`Kubelet::running`] answers match the pods started.
    fn publish(&self) {
        let running = self
            .pods
            .values()
            .map(|pod| RunningPod {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                uid: pod.uid.clone(),
                pod: pod.pod.clone(),
                volumes: pod.volumes.clone(),
                pids: pod
                    .containers
                    .iter()
                    .filter_map(|container| match &container.run {
                        Run::Running { process, .. } => {
                            Some((container.name.clone(), process.pid()))
                        }
                        _ => None,
                    })
                    .collect(),
            })
            .collect();
        *self.running.lock().unwrap() = running;
    }
}

impl PodState {
    /// Notes exited containers and runs the readiness probes that are due.
    fn observe(&mut self) {
        let ip = self.pod.ip();
        for container in &mut self.containers {
            if let Run::Running {
                process,
                started_at,
            } = &mut container.run
            {
                if let Ok(Some(status)) = process.try_status() {
                    container.run = Run::Terminated {
                        exit_code: status.code().unwrap_or(128 + 9),
                        started_at: started_at.clone(),
                        finished_at: rfc3339(SystemTime::now()),
                    };
                    container.ready = false;
                    continue;
                }
            } else {
                continue;
            }
            let Some(probe) = &container.probe else {
                container.ready = true;
                continue;
            };
            if Instant::now() < container.next_probe {
                continue;
            }
            let passed = probe.passes(ip);
            if passed {
                container.ready = true;
                container.failures = 0;
            } else {
                container.failures += 1;
                if container.failures >= probe.failure_threshold {
                    container.ready = false;
                }
            }
            // Until it is first ready, probe every round: a test waits on it.
            container.next_probe = if container.ready {
                Instant::now() + probe.period
            } else {
                Instant::now()
            };
        }
        let ready = !self.containers.is_empty() && self.containers.iter().all(|c| c.ready);
        if ready != self.ready {
            self.ready = ready;
            self.ready_since = rfc3339(SystemTime::now());
        }
    }

    /// The pod's `status` as a kubelet would write it.
    fn status(&self) -> Value {
        let ip = self.pod.ip().to_string();
        let running = self
            .containers
            .iter()
            .all(|c| matches!(c.run, Run::Running { .. }));
        let terminated: Vec<i32> = self
            .containers
            .iter()
            .filter_map(|c| match c.run {
                Run::Terminated { exit_code, .. } => Some(exit_code),
                _ => None,
            })
            .collect();
        // No restarts: a pod whose containers have all exited is over.
        let phase = if !self.containers.is_empty() && terminated.len() == self.containers.len() {
            if terminated.iter().all(|&code| code == 0) {
                "Succeeded"
            } else {
                "Failed"
            }
        } else if running || !terminated.is_empty() {
            "Running"
        } else {
            "Pending"
        };
        let flag = |on: bool| if on { "True" } else { "False" };
        let condition = |kind: &str, on: bool, since: &str| json!({"type": kind, "status": flag(on), "lastProbeTime": null, "lastTransitionTime": since});
        let statuses: Vec<Value> = self
            .containers
            .iter()
            .map(|c| {
                let (state, started) = match &c.run {
                    Run::Running {
                        process,
                        started_at,
                    } => (
                        json!({"running": {"startedAt": started_at}}),
                        json!({"containerID": format!("process://{}", process.pid())}),
                    ),
                    Run::Waiting { reason, message } => (
                        json!({"waiting": {"reason": reason, "message": message}}),
                        json!({}),
                    ),
                    Run::Terminated {
                        exit_code,
                        started_at,
                        finished_at,
                    } => (
                        json!({"terminated": {
                            "exitCode": exit_code, "startedAt": started_at,
                            "finishedAt": finished_at,
                            "reason": if *exit_code == 0 { "Completed" } else { "Error" },
                        }}),
                        json!({}),
                    ),
                };
                let mut status = json!({
                    "name": c.name, "image": c.image, "imageID": "",
                    "ready": c.ready, "restartCount": 0,
                    "started": matches!(c.run, Run::Running { .. }),
                    "state": state,
                });
                if let Some(id) = started.get("containerID") {
                    status["containerID"] = id.clone();
                }
                status
            })
            .collect();
        json!({
            "phase": phase,
            "hostIP": self.host_ip.to_string(),
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "startTime": self.start_time,
            "conditions": [
                condition("Initialized", true, &self.start_time),
                condition("Ready", self.ready, &self.ready_since),
                condition("ContainersReady", self.ready, &self.ready_since),
                condition("PodScheduled", true, &self.start_time),
            ],
            "containerStatuses": statuses,
        })
    }
}

/// Stops the pod's processes (SIGTERM, SIGKILL after `grace`) and removes its cgroups.
fn stop_pod(pod: PodState, grace: Duration) {
    let pod_cgroup = pod
        .containers
        .iter()
        .find_map(|c| c.cgroup.as_ref()?.parent().map(PathBuf::from));
    for container in pod.containers {
        if let Run::Running { mut process, .. } = container.run {
            if let Err(error) = process.stop(grace) {
                eprintln!("stopping {}: {error:#}", process.label());
            }
        }
        if let Some(cgroup) = container.cgroup {
            let _ = fs::remove_dir(cgroup);
        }
    }
    if let Some(pod_cgroup) = pod_cgroup {
        let _ = fs::remove_dir(pod_cgroup);
    }
    if !pod.volumes.is_empty() {
        let _ = fs::remove_dir_all(volumes_root().join(&pod.uid));
    }
}

/// Where this process's kubelets write pods' projected volumes: `<tmp>/mesh-kubelet-<pid>`.
fn volumes_root() -> PathBuf {
    std::env::temp_dir().join(format!("mesh-kubelet-{}", std::process::id()))
}

/// The container's `readinessProbe`, if it is an HTTP GET (other kinds are refused: a pod
/// that would never be Ready is worse than a clear error).
fn http_probe(spec: &Value) -> Result<Option<HttpProbe>> {
    let probe = &spec["readinessProbe"];
    if probe.is_null() {
        return Ok(None);
    }
    let get = &probe["httpGet"];
    ensure!(
        !get.is_null(),
        "container {}: only httpGet readiness probes are supported, not {probe}",
        spec["name"]
    );
    let port = match &get["port"] {
        Value::Number(port) => port.as_u64(),
        Value::String(name) => spec["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|port| port["name"] == name.as_str())
            .and_then(|port| port["containerPort"].as_u64()),
        _ => None,
    };
    let port = port
        .and_then(|port| u16::try_from(port).ok())
        .with_context(|| {
            format!(
                "container {}: readiness probe port {}",
                spec["name"], get["port"]
            )
        })?;
    Ok(Some(HttpProbe {
        path: get["path"].as_str().unwrap_or("/").to_owned(),
        port,
        period: Duration::from_secs(probe["periodSeconds"].as_u64().unwrap_or(10)),
        failure_threshold: probe["failureThreshold"]
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(3),
    }))
}

impl HttpProbe {
    /// Whether `GET path` on `ip:port` answers 2xx within [`PROBE_TIMEOUT`] (from the calling
    /// thread's namespace: the node's, as a kubelet probes).
    fn passes(&self, ip: Ipv4Addr) -> bool {
        let attempt = || -> std::io::Result<bool> {
            let addr = SocketAddr::from((ip, self.port));
            let mut stream = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)?;
            stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
            write!(
                stream,
                "GET {} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.20\r\n\
                 Connection: close\r\n\r\n",
                self.path
            )?;
            let mut head = [0u8; 12];
            stream.read_exact(&mut head)?;
            // "HTTP/1.1 200"
            Ok(head.starts_with(b"HTTP/1.") && head[9] == b'2')
        };
        attempt().unwrap_or(false)
    }
}

/// A name for the pod's network namespace on the node from `namespace/name`: `namespace-name`
/// with dots as dashes, shortened to [`SimNode::add_pod`]'s 63 characters with a hash of the
/// whole if longer, and with a `-2`, `-3`… suffix if `taken` has it already (a pod recreated
/// under the same name).
fn sim_pod_name(namespace: &str, name: &str, taken: &[String]) -> String {
    const MAX: usize = 63;
    let whole = format!("{namespace}-{name}").replace('.', "-");
    let base = if whole.len() <= MAX - 3 {
        whole
    } else {
        let hash = hex(&Sha256::digest(whole.as_bytes())[..4]);
        format!("{}-{hash}", whole[..MAX - 3 - 9].trim_end_matches('-'))
    };
    let mut candidate = base.clone();
    let mut n = 2;
    while taken.contains(&candidate) {
        candidate = format!("{base}-{n}");
        n += 1;
    }
    candidate
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `time` as Kubernetes writes it: `2006-01-02T15:04:05Z`.
fn rfc3339(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_in_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let leap_day = UNIX_EPOCH + Duration::from_secs(951_782_400 + 3_723);
        assert_eq!(rfc3339(leap_day), "2000-02-29T01:02:03Z");
        let later = UNIX_EPOCH + Duration::from_secs(1_735_689_599);
        assert_eq!(rfc3339(later), "2024-12-31T23:59:59Z");
    }

    #[test]
    fn image_names_drop_tag_and_digest_but_keep_a_registry_port() {
        assert_eq!(image_name("mesh-test/upstream"), "mesh-test/upstream");
        assert_eq!(image_name("mesh-test/upstream:v1"), "mesh-test/upstream");
        assert_eq!(image_name("localhost:5000/app"), "localhost:5000/app");
        assert_eq!(image_name("localhost:5000/app:1"), "localhost:5000/app");
        assert_eq!(image_name("app@sha256:abcd"), "app");
        assert!(Images::default()
            .launcher("mesh-test/upstream:latest")
            .is_some());
        assert!(Images::default().launcher("nginx").is_none());
    }

    #[test]
    fn pod_names_on_the_node_are_valid_and_unique() {
        assert_eq!(sim_pod_name("shop", "web-1", &[]), "shop-web-1");
        assert_eq!(sim_pod_name("a.b", "c", &[]), "a-b-c");
        let taken = vec!["shop-web-1".to_owned(), "shop-web-1-2".to_owned()];
        assert_eq!(sim_pod_name("shop", "web-1", &taken), "shop-web-1-3");
        let long = sim_pod_name("a-namespace-with-a-long-name", &"x".repeat(60), &[]);
        assert!(long.len() <= 60, "{long}");
        let other = sim_pod_name("a-namespace-with-a-long-name", &"x".repeat(61), &[]);
        assert_ne!(long, other, "the hash tells them apart");
        assert!(long
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
    }

    #[test]
    fn readiness_probes_are_read_from_the_spec() {
        let spec = json!({
            "name": "web",
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 1},
        });
        assert_eq!(
            http_probe(&spec).unwrap(),
            Some(HttpProbe {
                path: "/health".into(),
                port: 8080,
                period: Duration::from_secs(1),
                failure_threshold: 3
            })
        );
        assert_eq!(http_probe(&json!({"name": "web"})).unwrap(), None);
        let exec = json!({"name": "web", "readinessProbe": {"exec": {"command": ["true"]}}});
        assert!(format!("{:#}", http_probe(&exec).unwrap_err()).contains("only httpGet"));
        let unknown = json!({"name": "web", "readinessProbe": {"httpGet": {"port": "nope"}}});
        assert!(http_probe(&unknown).is_err());
    }
}
