//! `mesh-agent run`: the agent's life from start-up checks to a clean exit.

use std::{
    net::{SocketAddr, SocketAddrV4},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use prometheus_client::registry::Registry;
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;

use crate::{
    admin::{self, AdminState},
    discovery::kubernetes::{self, KubeSettings, WatchMetrics},
    engine::{EngineSettings, GatewayLabels},
    enrollment::{by_label, EnrollError, Enrollments, PodSpec},
    heap,
    proxy::{self, Limits, PodContext, Proxy},
    readiness::{Readiness, START_UP},
    redirect::{Redirect, RedirectMode},
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
    pub enroll: Vec<PodSpec>,
    /// Where the agent listens inside every enrolled pod.
    pub listen: SocketAddrV4,
    /// Admin API's TCP address: reads in local mode, probes and metrics in Kubernetes mode.
    pub admin: SocketAddr,
    /// Admin API's Unix socket (mode 0600): everything, and in local mode the only way to
    /// change anything.
    pub admin_socket: PathBuf,
    pub agent_mark: u32,
    pub workers: usize,
    pub access_log: bool,
    /// How long connections in flight may take to finish after SIGTERM.
    pub drain: Duration,
    /// Local mode: folder of Kubernetes-shaped YAML (services, endpoints, mesh rules).
    pub config: Option<PathBuf>,
    /// OTLP/HTTP collector for spans (e.g. `http://jaeger:4318`); `None`: no export.
    pub otlp_endpoint: Option<String>,
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

pub fn run(settings: Settings) -> Result<()> {
    proxy::raise_fd_limit();
    // Refuse before starting anything: no runtime, no listener, nothing attached.
    let redirect = Arc::new(Redirect::start(
        settings.redirect,
        settings.cgroup.as_deref(),
        settings.agent_mark,
        settings.socket_fast_path,
    )?);
    match redirect.cgroup() {
        Some(cgroup) => info!(cgroup = %cgroup.display(), "eBPF programs attached"),
        None => info!("iptables mode: each pod gets REDIRECT rules as it is enrolled"),
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
    let enrollments = Arc::new(Enrollments::new(
        Arc::clone(&redirect),
        Arc::clone(&proxy),
        settings.listen,
        runtime.handle().clone(),
        mesh,
    ));
    for pod in &settings.enroll {
        // A pod gone since the command line was written (its namespace with it) is no reason
        // not to serve the others.
        match enrollments.enroll(pod) {
            Err(error @ EnrollError::Netns { .. }) => {
                tracing::warn!("--enroll {}: skipped: {error}", pod.key())
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
    if let Some(addr) = settings.ingress {
        let listener = std::net::TcpListener::bind(addr)
            .with_context(|| format!("ingress gateway on {addr}"))?;
        listener.set_nonblocking(true)?;
        let _runtime = runtime.enter();
        let listener = tokio::net::TcpListener::from_std(listener)?;
        // Upstreams are dialled from the agent's own namespace, exempted like a pod's.
        let gateway = Arc::new(PodContext::new(
            "istio-ingressgateway".to_owned(),
            "istio-system".to_owned(),
            None,
            redirect.exemption(),
        ));
        runtime.spawn(Arc::clone(&proxy).serve_ingress(listener, gateway));
        info!(%addr, labels = %settings.gateway_labels, "ingress gateway listening");
    }
    // The admin API answers `/healthz` from here on, and `/ready` says what is still awaited.
    let readiness = Arc::new(Readiness::starting());
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
    });
    let admin = admin::spawn(settings.admin, &settings.admin_socket, Arc::clone(&state))?;
    if let Some((kube, client, metrics)) = kubernetes {
        readiness.waiting(ENROLLMENT, "after the first lists");
        runtime.spawn(follow_cluster(
            client,
            kube,
            metrics,
            Arc::clone(&store),
            Arc::clone(&enrollments),
            Arc::clone(&readiness),
        ));
    }
    info!(admin = %admin.addr, admin_socket = %admin.socket_path().display(), listen = %settings.listen, pods = settings.enroll.len(), "started");
    readiness.done(START_UP);

    let signal_name = runtime.block_on(shutdown_signal())?;
    info!(signal = signal_name, "shutting down");
    readiness.waiting("shutdown", "draining connections");
    // New connections go direct from here on; those in flight get the drain period.
    enrollments.unenroll_all();
    let drain = proxy.drain().clone();
    drain.start();
    let drained = runtime.block_on(async {
        tokio::time::timeout(settings.drain, drain.wait())
            .await
            .is_ok()
    });
    if !drained {
        tracing::warn!(
            connections = drain.in_flight(),
            "drain period over; closing connections still open"
        );
    }
    admin.stop();
    drop(proxy);
    drop(telemetry);
    if let Some(task) = span_task {
        // Every exporter is gone with the proxy: the task sends what is queued and ends.
        let _ = runtime.block_on(tokio::time::timeout(Duration::from_secs(2), task.finish()));
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
            match mode {
                RedirectMode::Ebpf => info!("programs detached, exiting"),
                RedirectMode::Iptables => info!("iptables rules removed, exiting"),
            }
        }
        // Cannot happen in iptables mode's normal path: `unenroll_all` removed every pod's
        // rules above.
        Err(_) => tracing::warn!("redirect still referenced; eBPF programs detach at exit"),
    }
    Ok(())
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
    // An invalid first state is logged by the store; it is tried again with the next change,
    // and traffic flows meanwhile.
    let cluster = by_label::Cluster::new(&watches, &kube);
    let _ = store.change(watches.initial);
    tokio::spawn(store.follow(watches.changes));
    // The first reconcile runs before this returns; the task keeps following.
    let following = by_label::follow(cluster, enrollments);
    readiness.done(ENROLLMENT);
    let _ = following.await;
}

async fn shutdown_signal() -> Result<&'static str> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// This agent's name in spans: the node's hostname.
fn node_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| format!("mesh-agent~{}", name.trim()))
        .unwrap_or_else(|_| "mesh-agent".to_owned())
}
