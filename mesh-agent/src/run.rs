//! `mesh-agent run`: the agent's life from start-up checks to a clean exit, or to a successor
//! taking over (`crate::handover`).

use std::{
    net::{SocketAddr, SocketAddrV4},
    os::{fd::OwnedFd, unix::net::UnixListener},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use prometheus_client::registry::Registry;
use serde_json::Value;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::task::AbortOnDropHandle;
use tracing::{info, warn};

use crate::{
    admin::{self, AdminState},
    discovery::kubernetes::{self, KubeSettings, WatchMetrics},
    engine::{EngineSettings, GatewayLabels},
    enrollment::{by_label, EnrollError, Enrollments, InheritedPod, PodSpec},
    handover::{self, names, serve::Server, take::Predecessor, AgentInfo, Handed, Inventory},
    hbone::{Hbone, Source, TunnelClient},
    heap,
    identity::{
        ca::CertificateAuthority,
        certificates::{report_readiness, CertificateSettings, CertificateStore, SystemClock},
        csr::{self, KubernetesIdentity},
        spiffe::SpiffeId,
    },
    inbound::InboundLimits,
    proxy::{self, Limits, PodContext, Proxy},
    readiness::{Readiness, START_UP},
    redirect::{netns::NetNs, preflight, Inherited, Redirect, RedirectMode},
    socket_file::SocketFile,
    state::{self, Store},
    telemetry::{
        metrics::DEFAULT_CLUSTER,
        otlp::{OtlpConfig, SpanExporter},
        AccessLog, Metrics, Telemetry,
    },
};

pub struct Settings {
    /// eBPF programs (default) or iptables rules in each pod.
    pub redirect: RedirectMode,
    /// cgroup v2 directory to attach to; `None` ⇒ the root of the cgroup2 mount. eBPF mode only.
    pub cgroup: Option<PathBuf>,
    /// Both ends of redirected connections exchange bytes through sk_msg, not loopback TCP.
    pub socket_fast_path: bool,
    /// Where inbound capture pins its programs (bpffs); capture runs with mutual TLS only.
    pub bpf_pin_dir: PathBuf,
    pub enroll: Vec<PodSpec>,
    /// Where the agent listens inside every enrolled pod.
    pub listen: SocketAddrV4,
    /// Admin API's TCP address: reads in local mode, probes and metrics in Kubernetes mode.
    pub admin: SocketAddr,
    /// Admin API's Unix socket (mode 0600): everything, and in local mode the only way to
    /// change anything.
    pub admin_socket: PathBuf,
    /// Where a running agent hands over to this one, and this one to the next (mode 0600).
    pub handover_socket: PathBuf,
    pub agent_mark: u32,
    pub workers: usize,
    pub access_log: bool,
    /// How long connections in flight may take to finish after SIGTERM.
    pub drain: Duration,
    /// Local mode: folder of Kubernetes-shaped YAML (services, endpoints, mesh rules).
    pub config: Option<PathBuf>,
    /// OTLP/HTTP collector for spans (e.g. `http://jaeger:4318`); `None`: no export.
    pub otlp_endpoint: Option<String>,
    /// Where pods in the mesh get the certificates of their mutual TLS tunnels. `None`:
    /// plaintext.
    pub mutual_tls: Option<MutualTls>,
    /// Share of new traces sampled, 0.0 to 1.0.
    pub trace_sample_ratio: f64,
    /// Kubernetes mode: discovery and enrollment from the API server.
    pub kubernetes: Option<KubeSettings>,
    /// Serve the mesh's ingress gateway (Istio `Gateway` + bound `VirtualService`s) here.
    pub ingress: Option<SocketAddr>,
    /// The ingress gateway's labels, which `Gateway` selectors are matched against.
    pub gateway_labels: GatewayLabels,
    /// Changes the log filter at run time, for the admin API.
    pub log_level: Option<admin::LogLevelSetter>,
    /// The data path's timeouts, connection caps and buffer budgets.
    pub limits: Limits,
}

/// Where workload certificates come from.
pub enum MutualTls {
    /// Local mode: minted by the CA in this folder (`mesh-agent ca init`).
    LocalCa(PathBuf),
    /// Kubernetes mode: from the mesh's signer (`mesh-agent ca serve`), through CSRs made with
    /// the agent pod's pod-bound token in this file.
    Signer { token_file: PathBuf },
}

pub fn run(settings: Settings) -> Result<()> {
    proxy::raise_fd_limit();
    let me = agent_info(&settings)?;
    // A running agent hands over what it holds; without one, this agent starts afresh.
    let (predecessor, mut inventory) = match handover::take::begin(&settings.handover_socket, &me)?
    {
        Some((predecessor, inventory)) => (Some(predecessor), inventory),
        None => (None, Inventory::default()),
    };
    // Refuse before starting anything: no runtime, no listener, nothing attached.
    let redirect = Arc::new(Redirect::start(
        settings.redirect,
        settings.cgroup.as_deref(),
        settings.agent_mark,
        settings.socket_fast_path,
        inherited_kernel(&mut inventory),
        // What arrives at a pod is judged by its identity, which only mutual TLS proves.
        settings
            .mutual_tls
            .as_ref()
            .map(|_| settings.bpf_pin_dir.as_path()),
    )?);
    if settings.mutual_tls.is_none() {
        info!(
            "no mutual TLS: AuthorizationPolicy and PeerAuthentication are not enforced (they \
             judge identities, which only --ca or --mutual-tls prove)"
        );
    } else if redirect.capture().is_none() {
        tracing::warn!(
            "iptables mode captures nothing arriving at pods: plaintext reaches them whatever \
             their PeerAuthentication says"
        );
    }
    match (redirect.cgroup(), &predecessor) {
        (Some(cgroup), None) => info!(cgroup = %cgroup.display(), "eBPF programs attached"),
        (Some(cgroup), Some(_)) => info!(
            cgroup = %cgroup.display(),
            "eBPF programs loaded against the running agent's maps; in force at the take-over"
        ),
        (None, _) => info!("iptables mode: each pod gets REDIRECT rules as it is enrolled"),
    }
    // One worker: the current-thread scheduler, which the main thread drives in `block_on`;
    // no work stealing, no cross-thread wakeups, and a thread fewer.
    let mut runtime = if settings.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(settings.workers);
        builder
    };
    let runtime = runtime
        .thread_name("data-path")
        .on_thread_park(heap::flush_thread_cache_if_trimmed)
        .enable_all()
        .build()
        .context("starting the data-path runtime")?;
    // Registered now, so that a SIGTERM at any later moment is seen, whatever the agent is
    // doing when it comes.
    let mut signals = {
        let _runtime = runtime.enter();
        Signals::new()?
    };
    // One registry; each subsystem registers its own metrics on it, Istio's at the root and the
    // agent's own under `mesh_`.
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(DEFAULT_CLUSTER, &mut registry));
    let mesh = registry.sub_registry_with_prefix("mesh");
    redirect.register_metrics(mesh.sub_registry_with_prefix("redirect"));
    heap::register_metrics(mesh);
    // Without an ingress listener no Gateway is served, and the store says so.
    let engine_settings = EngineSettings {
        gateway_labels: settings.ingress.map(|_| settings.gateway_labels.clone()),
        ..EngineSettings::default()
    };
    // What the folder holds that is invalid is left out and reported; only a folder that
    // cannot be read at all stops start-up.
    let store = Arc::new(
        Store::open(settings.config.clone(), engine_settings, mesh)
            .map_err(|error| anyhow::anyhow!("{error}"))?,
    );
    // Loading the programs parses the kernel's BTF (megabytes, all freed by now), and a burst
    // of connections leaves freed buffers behind: glibc keeps both resident unless asked.
    heap::trim();
    runtime.spawn(async {
        let mut every = tokio::time::interval(heap::TRIM_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            heap::trim();
        }
    });
    let _watcher = state::watch(Arc::clone(&store)).context("watching the config folder")?;
    let (spans, span_task) = match &settings.otlp_endpoint {
        Some(endpoint) => {
            let config = OtlpConfig::new(endpoint, node_id())
                .with_context(|| format!("--otlp-endpoint {endpoint}"))?;
            let _runtime = runtime.enter();
            let (exporter, task) = SpanExporter::start(config);
            exporter.register_metrics(mesh.sub_registry_with_prefix("trace"));
            (Some(exporter), Some(task))
        }
        None => (None, None),
    };
    let (access_log, access_log_writer) = AccessLog::new(settings.access_log);
    access_log.register_metrics(mesh.sub_registry_with_prefix("access_log"));
    let telemetry = Arc::new(Telemetry {
        metrics: Arc::clone(&metrics),
        access_log,
        spans,
        trace_sample_ratio: settings.trace_sample_ratio,
    });
    let proxy = Arc::new(Proxy::with_limits(
        Arc::clone(&store),
        Arc::clone(&telemetry),
        settings.limits.clone(),
    ));
    if predecessor.is_some() {
        // The predecessor accepts until this agent takes over; should this one fail before,
        // it will have accepted nothing it could drop.
        proxy.drain().pause_accepting();
    }
    // `/healthz` answers once the admin API is up; `/ready` says what is still awaited.
    let readiness = Arc::new(Readiness::starting());
    let (hbone, gateway_identity) = match &settings.mutual_tls {
        Some(mutual_tls) => {
            // A signer's trust bundle is awaited here (for up to the issuer's timeout): without
            // it no tunnel could be checked.
            let (certificates, gateway) =
                runtime.block_on(certificate_store(mutual_tls, settings.kubernetes.as_ref()))?;
            {
                let _runtime = runtime.enter();
                // Not awaited: the task ends with the store.
                drop(report_readiness(&certificates, Arc::clone(&readiness)));
            }
            info!(
                trust_domain = %certificates.trust_bundle().trust_domain(),
                "mutual TLS tunnels between pods in the mesh"
            );
            let hbone = Hbone::new(
                Arc::clone(&store),
                certificates,
                Arc::clone(&telemetry),
                InboundLimits {
                    http_idle_timeout: settings.limits.http_idle_timeout,
                    h2_keepalive_interval: settings.limits.h2_keepalive_interval,
                    h2_keepalive_timeout: settings.limits.h2_keepalive_timeout,
                    tcp_idle_timeout: settings.limits.tcp_idle_timeout,
                    ..InboundLimits::default()
                },
                mesh,
            );
            let gateway = SpiffeId::new(
                hbone.trust_domain().clone(),
                &gateway.namespace,
                &gateway.service_account,
            )
            .context("the ingress gateway's identity")?;
            hbone.keep_identity(gateway.clone());
            (Some(hbone), Some(gateway))
        }
        None => (None, None),
    };
    let enrollments = Arc::new(
        Enrollments::new(
            Arc::clone(&redirect),
            Arc::clone(&proxy),
            settings.listen,
            runtime.handle().clone(),
            mesh,
        )
        .with_hbone(hbone.clone()),
    );
    enrollments.inherit(inherited_pods(&mut inventory));
    {
        // What plaintext meets at each pod follows its PeerAuthentication and its labels.
        let enrollments = Arc::clone(&enrollments);
        let mut versions = store.versions();
        runtime.spawn(async move {
            while versions.changed().await.is_ok() {
                enrollments.update_capture();
            }
        });
    }
    for pod in &settings.enroll {
        // A pod gone since the command line was written (its namespace with it) is no reason
        // not to serve the others.
        match enrollments.enroll(pod) {
            Err(error @ EnrollError::Netns { .. }) => {
                warn!("--enroll {}: skipped: {error}", pod.key())
            }
            result => {
                result?;
            }
        }
    }
    let kubernetes = match settings.kubernetes {
        Some(kube) => {
            let client = runtime
                .block_on(kubernetes::client(&kube))
                .context("kubernetes mode")?;
            let metrics = WatchMetrics::default();
            metrics.register(mesh.sub_registry_with_prefix("kubernetes"));
            Some((kube, client, metrics))
        }
        None => None,
    };
    if kubernetes.is_none() {
        // Pods the predecessor had enrolled at run time, which no flag of ours names.
        enrollments.adopt_inherited();
        enrollments.prune_captures();
    }
    // What a successor gets besides the pods and the kernel state.
    let listeners = Arc::new(handover::Listeners::default());
    if let Some(addr) = settings.ingress {
        let listener = match inventory.take_tcp_listener(names::INGRESS, addr) {
            Some(listener) => listener,
            None => std::net::TcpListener::bind(addr)
                .with_context(|| format!("ingress gateway on {addr}"))?,
        };
        listeners.add(names::INGRESS, Value::Null, listener.try_clone()?.into());
        listener.set_nonblocking(true)?;
        let _runtime = runtime.enter();
        let listener = tokio::net::TcpListener::from_std(listener)?;
        // Upstreams are dialled from the agent's own namespace, exempted like a pod's.
        let mut gateway = PodContext::new(
            GATEWAY_NAME.to_owned(),
            GATEWAY_NAMESPACE.to_owned(),
            None,
            redirect.exemption(),
        );
        if let (Some(hbone), Some(identity)) = (&hbone, gateway_identity) {
            gateway = gateway.with_tunnel(Arc::new(TunnelClient::new(
                Arc::clone(hbone),
                Source::Fixed(identity),
            )));
        }
        let gateway = Arc::new(gateway);
        runtime.spawn(Arc::clone(&proxy).serve_ingress(listener, gateway));
        info!(%addr, labels = %settings.gateway_labels, "ingress gateway listening");
    }
    let state = Arc::new(AdminState {
        redirect: Arc::clone(&redirect),
        enrollments: Arc::clone(&enrollments),
        store: Arc::clone(&store),
        metrics: Arc::new(registry),
        log_level: settings.log_level,
        mode: if kubernetes.is_some() {
            admin::Mode::Kubernetes
        } else {
            admin::Mode::Local
        },
        readiness: Arc::clone(&readiness),
        graph: Default::default(),
    });
    let admin_tcp = match inventory.take_tcp_listener(names::ADMIN, settings.admin) {
        Some(listener) => listener,
        None => std::net::TcpListener::bind(settings.admin)
            .with_context(|| format!("admin API on {}", settings.admin))?,
    };
    listeners.add(names::ADMIN, Value::Null, admin_tcp.try_clone()?.into());
    let (admin_file, admin_unix) =
        match inventory.take_socket_file(names::ADMIN_SOCKET, &settings.admin_socket) {
            Some((file, fd)) => (file, UnixListener::from(fd)),
            None => SocketFile::bind(&settings.admin_socket)
                .with_context(|| format!("admin socket {}", settings.admin_socket.display()))?,
        };
    listeners.add_socket_file(
        names::ADMIN_SOCKET,
        &admin_file,
        admin_unix.try_clone()?.into(),
    );
    let admin = admin::spawn(admin_tcp, admin_file, admin_unix, Arc::clone(&state))?;
    let (handover_file, handover_listener) = match inventory
        .take_socket_file(names::HANDOVER_SOCKET, &settings.handover_socket)
    {
        Some(adopted) => adopted,
        None => SocketFile::bind_seqpacket(&settings.handover_socket)
            .with_context(|| format!("handover socket {}", settings.handover_socket.display()))?,
    };
    listeners.add_socket_file(
        names::HANDOVER_SOCKET,
        &handover_file,
        handover_listener.try_clone()?,
    );
    inventory.close_rest();
    let follow = kubernetes.map(|(kube, client, metrics)| {
        readiness.waiting(ENROLLMENT, "after the first lists");
        AbortOnDropHandle::new(runtime.spawn(follow_cluster(
            client,
            kube,
            metrics,
            Arc::clone(&store),
            Arc::clone(&enrollments),
            Arc::clone(&readiness),
        )))
    });
    info!(admin = %admin.addr, admin_socket = %admin.socket_path().display(), listen = %settings.listen, pods = settings.enroll.len(), "started");
    readiness.done(START_UP);

    let parts = Parts {
        redirect: &redirect,
        enrollments: &enrollments,
        proxy: &proxy,
        readiness: &readiness,
    };
    if let Some(predecessor) = predecessor {
        if let Err(error) = runtime.block_on(take_over(predecessor, &parts, &mut signals)) {
            // The predecessor serves on, with the kernel state as it was: this agent leaves
            // it alone, and the socket files too.
            hand_back(&parts, follow, admin);
            drain(&runtime, &proxy, settings.drain);
            return Err(error);
        }
    }
    let mut server = Server::start(
        handover_listener,
        me,
        vec![
            Arc::clone(&enrollments) as Arc<dyn handover::Source>,
            Arc::new(KernelState(Arc::clone(&redirect))),
            listeners,
        ],
    )
    .context("serving the handover socket")?;

    let (signal, successor) = runtime.block_on(async {
        tokio::select! {
            signal = signals.recv() => (Some(signal), None),
            take_over = server.taken_over() => (None, take_over),
        }
    });
    let signalled = signal.is_some();
    let successor = match (signal, successor) {
        (_, Some(take_over)) => Some(take_over),
        (Some(signal), None) => {
            info!(signal, "shutting down");
            if server.shutting_down() {
                info!("a successor holds this agent's inventory: waiting for it to take over");
                runtime
                    .block_on(async {
                        tokio::time::timeout(TAKE_OVER_GRACE, server.taken_over()).await
                    })
                    .ok()
                    .flatten()
            } else {
                None
            }
        }
        (None, None) => None,
    };
    let handed_over = match successor {
        Some(take_over) => {
            let successor = take_over.successor.pid;
            readiness.waiting("shutdown", format!("superseded by pid {successor}"));
            hand_back(&parts, follow, admin);
            take_over.released();
            server.stop();
            info!(successor, "a successor took over: draining");
            // A connection accepted a moment ago may not have sent its first request yet;
            // closing it gracefully now could close it unread.
            runtime.block_on(async { tokio::time::sleep(ACCEPTED_GRACE).await });
            drain(&runtime, &proxy, settings.drain);
            if !signalled {
                info!("drained; waiting for SIGTERM");
                runtime.block_on(signals.recv());
            }
            true
        }
        None => {
            server.stop();
            readiness.waiting("shutdown", "draining connections");
            // Or the next reconcile would enroll the pods again, for nobody to serve them.
            drop(follow);
            // New connections go direct from here on; those in flight get the drain period.
            enrollments.unenroll_all();
            drain(&runtime, &proxy, settings.drain);
            admin.stop();
            handover_file.remove();
            false
        }
    };
    drop(proxy);
    drop(telemetry);
    if let Some(task) = span_task {
        // Every exporter is gone with the proxy: the task sends what is queued and ends.
        // The timer is made inside the runtime: outside it, tokio panics.
        let _ = runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(2), task.finish()).await });
    }
    runtime.shutdown_timeout(Duration::from_millis(100));
    drop(state);
    drop(enrollments);
    // The proxy's connections and the enrollments held the last clones of the access log.
    access_log_writer.finish(Duration::from_secs(2));
    match Arc::try_unwrap(redirect) {
        Ok(redirect) => {
            let mode = redirect.mode();
            drop(redirect);
            match (handed_over, mode) {
                (true, _) => info!("handed over; exiting"),
                (false, RedirectMode::Ebpf) => info!("programs detached, exiting"),
                (false, RedirectMode::Iptables) => info!("iptables rules removed, exiting"),
            }
        }
        // Cannot happen in iptables mode's normal path: `unenroll_all` removed every pod's
        // rules above.
        Err(_) => tracing::warn!("redirect still referenced; eBPF programs detach at exit"),
    }
    Ok(())
}

/// How long an agent that got SIGTERM while a successor held its inventory waits for that
/// successor to take over, before it shuts down on its own.
/// The ingress gateway as telemetry names it, and its identity in tunnels: Istio's ingress
/// gateway's service account.
const GATEWAY_NAME: &str = "istio-ingressgateway";
const GATEWAY_NAMESPACE: &str = "istio-system";
const GATEWAY_SERVICE_ACCOUNT: &str = "istio-ingressgateway-service-account";

const TAKE_OVER_GRACE: Duration = Duration::from_secs(10);

/// How long a superseded agent keeps serving what it accepted last before it starts closing
/// connections, so that none is closed before its first request was read.
const ACCEPTED_GRACE: Duration = Duration::from_secs(1);

/// What the end of an agent's life acts on.
struct Parts<'a> {
    redirect: &'a Redirect,
    enrollments: &'a Enrollments,
    proxy: &'a Proxy,
    readiness: &'a Readiness,
}

/// A successor's last steps: once ready, put its programs in force and tell the predecessor
/// to stop accepting. An error leaves the predecessor in charge.
async fn take_over(
    predecessor: Predecessor,
    parts: &Parts<'_>,
    signals: &mut Signals,
) -> Result<()> {
    let pid = predecessor.agent().pid;
    let waiting = Instant::now();
    tokio::select! {
        () = ready(parts.readiness) => {}
        signal = signals.recv() => {
            predecessor.abort(&format!("{signal} before it was ready"));
            anyhow::bail!("{signal} before taking over from the running agent (pid {pid})");
        }
    }
    if let Err(error) = parts.redirect.activate() {
        predecessor.abort(&error.to_string());
        return Err(error).context("putting this agent's programs in force");
    }
    // Both accept for a moment, on the same sockets: no connection waits for nobody.
    parts.proxy.drain().resume_accepting();
    let (outcome, took) = tokio::task::spawn_blocking(move || predecessor.take_over())
        .await
        .context("the take-over task")??;
    info!(
        predecessor = pid,
        ?outcome,
        overlap_ms = took.overlap.as_millis() as u64,
        switch_ms = took.switch.as_millis() as u64,
        waited_for_ready_ms = waiting.elapsed().as_millis() as u64,
        "took over from the running agent"
    );
    Ok(())
}

/// Resolves once the agent is ready. `Readiness` has no notification; a start takes far longer
/// than the polling interval.
async fn ready(readiness: &Readiness) {
    while readiness.check().is_err() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Gives up everything to the other agent (the successor, or the predecessor when this one
/// did not take over): stops accepting and enrolling, touches neither the kernel state nor the
/// socket files, which that agent serves.
fn hand_back(parts: &Parts<'_>, follow: Option<AbortOnDropHandle<()>>, admin: admin::AdminServer) {
    parts.proxy.drain().stop_accepting();
    drop(follow);
    parts.enrollments.hand_over();
    parts.redirect.relinquish();
    admin.hand_over();
}

/// Lets connections in flight finish, for at most `period`.
fn drain(runtime: &tokio::runtime::Runtime, proxy: &Proxy, period: Duration) {
    let drain = proxy.drain().clone();
    drain.start();
    let drained =
        runtime.block_on(async { tokio::time::timeout(period, drain.wait()).await.is_ok() });
    if !drained {
        warn!(
            connections = drain.in_flight(),
            "drain period over; closing connections still open"
        );
    }
}

/// How this agent runs, as a predecessor or successor sees it.
fn agent_info(settings: &Settings) -> Result<AgentInfo> {
    let cgroup = match settings.redirect {
        RedirectMode::Ebpf => {
            let cgroup = preflight::check(settings.cgroup.as_deref())?;
            // Two spellings of one directory are one cgroup.
            Some(std::fs::canonicalize(&cgroup).unwrap_or(cgroup))
        }
        RedirectMode::Iptables => None,
    };
    let netns_cookie = NetNs::current()
        .and_then(|netns| netns.cookie())
        .context("this agent's network namespace")?;
    Ok(AgentInfo {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        redirect: settings.redirect.name().to_owned(),
        cgroup,
        listen: settings.listen,
        netns_cookie,
    })
}

/// The predecessor's maps and links, by name.
fn inherited_kernel(inventory: &mut Inventory) -> Inherited {
    let fd = |(name, handed): (String, Handed)| Some((name, handed.fds.into_iter().next()?));
    Inherited {
        maps: inventory
            .take_prefixed(names::MAP)
            .into_iter()
            .filter_map(fd)
            .collect(),
        links: inventory
            .take_prefixed(names::LINK)
            .into_iter()
            .filter_map(fd)
            .collect(),
    }
}

/// The predecessor's pods; one that cannot be read is left to go (with its listener).
fn inherited_pods(inventory: &mut Inventory) -> Vec<InheritedPod> {
    let pods: Vec<InheritedPod> = inventory
        .take_prefixed(names::POD)
        .into_iter()
        .filter_map(|(_, handed)| match InheritedPod::from_handed(handed) {
            Ok(pod) => Some(pod),
            Err(error) => {
                warn!(%error, "cannot serve a pod the running agent handed over");
                None
            }
        })
        .collect();
    pods.into_iter()
        .map(|mut pod| {
            if let Some(tunnel) = inventory.take(&format!("{}{}", names::POD_TUNNEL, pod.key())) {
                // Without it the pod gets a listener of its own (`Enrollments::install`).
                if let Err(error) = pod.set_tunnel_listener(tunnel) {
                    warn!(%error, "cannot serve a tunnel listener the running agent handed over");
                }
            }
            if let Some(inbound) = inventory.take(&format!("{}{}", names::POD_INBOUND, pod.key())) {
                if let Err(error) = pod.set_inbound_listener(inbound) {
                    warn!(%error, "cannot serve an inbound listener the running agent handed over");
                }
            }
            pod
        })
        .collect()
}

/// The workload certificates' store, and whose identity the ingress gateway presents: Istio's ingress gateway's in local mode; in Kubernetes mode the agent's own
/// ServiceAccount's, the one identity of a gateway inside the agent that the signer grants
/// (the agent pod runs on its node as that account).
async fn certificate_store(
    mutual_tls: &MutualTls,
    kubernetes: Option<&KubeSettings>,
) -> Result<(Arc<CertificateStore>, GatewayAccount)> {
    match (mutual_tls, kubernetes) {
        (MutualTls::LocalCa(dir), _) => {
            let ca = CertificateAuthority::load(dir, SystemTime::now())
                .with_context(|| format!("--ca {}", dir.display()))?;
            info!(ca = %dir.display(), "workload certificates minted by the local CA");
            let store = CertificateStore::new(
                Arc::new(ca),
                CertificateSettings::default(),
                Arc::new(SystemClock),
            );
            let gateway = GatewayAccount {
                namespace: GATEWAY_NAMESPACE.to_owned(),
                service_account: GATEWAY_SERVICE_ACCOUNT.to_owned(),
            };
            Ok((Arc::new(store), gateway))
        }
        (MutualTls::Signer { token_file }, Some(kube)) => {
            let agent = csr::token_subject(token_file).context("--mutual-tls")?;
            let identity = KubernetesIdentity {
                agent_namespace: agent.namespace.clone(),
                node_name: kube.node_name.clone(),
                timeout: csr::DEFAULT_ISSUE_TIMEOUT,
            };
            info!(
                token = %token_file.display(),
                agent_namespace = %agent.namespace,
                "workload certificates from the mesh's signer, through CSRs"
            );
            let store = csr::agent_store(kube.kubeconfig.as_deref(), token_file, &identity)
                .await
                .context("--mutual-tls: the trust bundle")?;
            let gateway = GatewayAccount {
                namespace: agent.namespace,
                service_account: agent.service_account,
            };
            Ok((store, gateway))
        }
        (MutualTls::Signer { .. }, None) => {
            anyhow::bail!("--mutual-tls needs --kubernetes (local mode takes --ca)")
        }
    }
}

/// Whose identity the ingress gateway presents in tunnels.
struct GatewayAccount {
    namespace: String,
    service_account: String,
}

/// The redirect's maps and links, for a successor.
struct KernelState(Arc<Redirect>);

impl handover::Source for KernelState {
    fn handed(&self) -> std::io::Result<Vec<Handed>> {
        let Inherited { maps, links } = self.0.kernel_state()?;
        let named = |prefix: &str, (name, fd): (String, OwnedFd)| {
            Handed::new(format!("{prefix}{name}"), Value::Null, vec![fd])
        };
        Ok(maps
            .into_iter()
            .map(|map| named(names::MAP, map))
            .chain(links.into_iter().map(|link| named(names::LINK, link)))
            .collect())
    }
}

/// What Kubernetes mode holds `/ready` on until this node's pods are enrolled.
const ENROLLMENT: &str = "enrollment";

/// Kubernetes mode once the client is made: waits for the first lists (as long as it takes,
/// `/ready` saying what for), puts them in force, then follows the cluster's changes and its
/// labels. Only then are pods enrolled: a pod is never redirected to an agent that does not
/// know its services yet.
async fn follow_cluster(
    client: kube::Client,
    kube: KubeSettings,
    metrics: WatchMetrics,
    store: Arc<Store>,
    enrollments: Arc<Enrollments>,
    readiness: Arc<Readiness>,
) {
    let watches = kubernetes::start(client, &readiness, &metrics).await;
    info!(node = %kube.node_name, "kubernetes watches listed");
    // The store leaves out (and reports) each invalid object by itself; the rest is in force.
    let cluster = by_label::Cluster::new(&watches, &kube);
    let _ = store.change(watches.initial);
    tokio::spawn(store.follow(watches.changes));
    // The pods a predecessor served go on being served as they were; the reconcile below
    // unenrolls those the cluster no longer enrolls.
    enrollments.adopt_inherited();
    // The first reconcile runs before this returns; the task keeps following (until this task
    // is aborted, on a handover).
    let following = AbortOnDropHandle::new(by_label::follow(cluster, enrollments));
    readiness.done(ENROLLMENT);
    let _ = following.await;
}

/// SIGTERM and SIGINT, each seen from the moment [`Signals::new`] registered it.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Needs the runtime's context.
    fn new() -> Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("handling SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("handling SIGINT")?,
        })
    }

    /// The next one, by name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// This agent's name in spans: the node's hostname.
fn node_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| format!("mesh-agent~{}", name.trim()))
        .unwrap_or_else(|_| "mesh-agent".to_owned())
}
