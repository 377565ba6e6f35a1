//! `mesh-agent run`: the agent's life from start-up checks to a clean exit.

use std::{
    net::{SocketAddr, SocketAddrV4},
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;

use crate::{
    admin::{self, AdminState},
    engine::EngineSettings,
    enrollment::{Enrollments, PodSpec},
    proxy::Proxy,
    redirect::Redirect,
    state::{self, Store},
    telemetry::AccessLog,
};

#[derive(Clone, Debug)]
pub struct Settings {
    /// cgroup v2 directory to attach to; `None` ⇒ the root of the cgroup2 mount.
    pub cgroup: Option<PathBuf>,
    pub enroll: Vec<PodSpec>,
    /// Where the agent listens inside every enrolled pod.
    pub listen: SocketAddrV4,
    pub admin: SocketAddr,
    pub agent_mark: u32,
    pub workers: usize,
    pub access_log: bool,
    /// How long connections in flight may take to finish after SIGTERM.
    pub drain: Duration,
    /// Local mode: folder of Kubernetes-shaped YAML (services, endpoints, mesh rules).
    pub config: Option<PathBuf>,
}

pub fn run(settings: Settings) -> Result<()> {
    // Refuse before starting anything: no runtime, no listener, nothing attached.
    let redirect = Arc::new(Redirect::attach(
        settings.cgroup.as_deref(),
        settings.agent_mark,
    )?);
    info!(cgroup = %redirect.cgroup().display(), "eBPF programs attached");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.workers)
        .thread_name("data-path")
        .enable_all()
        .build()
        .context("starting the data-path runtime")?;
    let store = Arc::new(
        Store::open(settings.config.clone(), EngineSettings::default()).map_err(|diagnostics| {
            let lines: Vec<String> = diagnostics
                .iter()
                .map(|d| format!("  {}: {d}", d.severity))
                .collect();
            anyhow::anyhow!("the config folder is invalid:\n{}", lines.join("\n"))
        })?,
    );
    let _watcher = state::watch(Arc::clone(&store)).context("watching the config folder")?;
    let proxy = Arc::new(Proxy::new(
        Arc::clone(&redirect),
        Arc::clone(&store),
        settings.agent_mark,
        AccessLog::new(settings.access_log),
    ));
    let enrollments = Arc::new(Enrollments::new(
        Arc::clone(&redirect),
        proxy,
        settings.listen,
        runtime.handle().clone(),
    ));
    for pod in &settings.enroll {
        enrollments.enroll(pod)?;
    }
    let state = Arc::new(AdminState {
        redirect: Arc::clone(&redirect),
        enrollments: Arc::clone(&enrollments),
        store: Arc::clone(&store),
        ready: Default::default(),
    });
    let admin = admin::spawn(settings.admin, Arc::clone(&state))
        .with_context(|| format!("admin API on {}", settings.admin))?;
    state.ready.store(true, Ordering::Release);
    info!(admin = %admin.addr, listen = %settings.listen, pods = settings.enroll.len(), "ready");

    let signal_name = runtime.block_on(shutdown_signal())?;
    info!(signal = signal_name, "shutting down");
    state.ready.store(false, Ordering::Release);
    // New connections go direct from here on; those in flight get the drain period.
    enrollments.unenroll_all();
    admin.stop();
    runtime.shutdown_timeout(settings.drain);
    drop(state);
    drop(enrollments);
    match Arc::try_unwrap(redirect) {
        Ok(redirect) => {
            drop(redirect);
            info!("programs detached, exiting");
        }
        Err(_) => tracing::warn!("kernel programs still referenced; they detach at exit"),
    }
    Ok(())
}

async fn shutdown_signal() -> Result<&'static str> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
