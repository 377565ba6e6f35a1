//! The one store everything the data path reads comes from: discovery writes whole validated
//! snapshots, the proxy loads the current one per request (lock-free), admin reads it.
//!
//! A change is all or nothing: an invalid folder edit or `apply` is rejected with every
//! diagnostic and the last good snapshot stays in force.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use serde_json::Value;
use tracing::{info, warn};

use crate::{
    config::{model::MeshConfig, Diagnostic},
    discovery::{
        local::{self, LocalSource, ObjectKey},
        Discovered,
    },
    engine::{Engine, EngineSettings},
    telemetry::{metrics::ReloadResult, Metrics},
};

/// Everything in force at one moment.
pub struct Snapshot {
    pub version: u64,
    pub engine: Engine,
    pub discovered: Discovered,
    pub config: MeshConfig,
    pub objects: BTreeMap<ObjectKey, Value>,
    pub warnings: Vec<Diagnostic>,
}

#[derive(Debug, Default)]
pub struct ReloadCounts {
    pub ok: AtomicU64,
    pub rejected: AtomicU64,
}

pub struct Store {
    current: ArcSwap<Snapshot>,
    source: Mutex<LocalSource>,
    pub reloads: ReloadCounts,
    metrics: Arc<Metrics>,
}

impl Store {
    /// Loads the folder (if any); start-up fails on an invalid folder, naming every problem.
    pub fn open(
        dir: Option<PathBuf>,
        settings: EngineSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Store, Vec<Diagnostic>> {
        let source = LocalSource::new(dir);
        let loaded = source.load()?;
        log_warnings(&loaded.warnings);
        let engine = Engine::new(
            &loaded.config,
            &loaded.discovered.registry,
            settings,
            Instant::now(),
        );
        let store = Store {
            current: ArcSwap::from_pointee(snapshot(1, engine, loaded)),
            source: Mutex::new(source),
            reloads: ReloadCounts::default(),
            metrics,
        };
        store.reloads.ok.fetch_add(1, Ordering::Relaxed);
        store.metrics.record_config_reload(ReloadResult::Ok);
        Ok(store)
    }

    /// The snapshot in force. Cheap: an atomic load and an `Arc` clone.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Re-reads the folder; on error the current snapshot stays.
    pub fn reload(&self) -> Result<u64, Vec<Diagnostic>> {
        let source = self.source.lock().expect("config source lock");
        let result = source.load();
        self.settle(result.map(|loaded| (loaded, Vec::new())))
            .map(|(version, _)| version)
    }

    /// Kubernetes mode: the watched objects changed.
    pub fn set_watched(&self, source: &str, objects: Vec<Value>) -> Result<u64, Vec<Diagnostic>> {
        let mut local = self.source.lock().expect("config source lock");
        let result = local.set_watched(source, objects);
        self.settle(result.map(|loaded| (loaded, Vec::new())))
            .map(|(version, _)| version)
    }

    /// `mesh-agent apply -f`: all objects of `text` or none.
    pub fn apply(&self, label: &str, text: &str) -> Result<(u64, Vec<ObjectKey>), Vec<Diagnostic>> {
        let mut source = self.source.lock().expect("config source lock");
        let result = source.apply(label, text);
        self.settle(result)
    }

    /// `mesh-agent delete -f`.
    pub fn delete(
        &self,
        label: &str,
        text: &str,
    ) -> Result<(u64, Vec<ObjectKey>), Vec<Diagnostic>> {
        let mut source = self.source.lock().expect("config source lock");
        let result = source.delete(label, text);
        self.settle(result)
    }

    fn settle(
        &self,
        result: Result<(local::Loaded, Vec<ObjectKey>), Vec<Diagnostic>>,
    ) -> Result<(u64, Vec<ObjectKey>), Vec<Diagnostic>> {
        match result {
            Ok((loaded, keys)) => {
                log_warnings(&loaded.warnings);
                let current = self.current.load();
                let engine = current.engine.reload(
                    &loaded.config,
                    &loaded.discovered.registry,
                    Instant::now(),
                );
                let version = current.version + 1;
                self.current
                    .store(Arc::new(snapshot(version, engine, loaded)));
                self.reloads.ok.fetch_add(1, Ordering::Relaxed);
                self.metrics.record_config_reload(ReloadResult::Ok);
                info!(version, "config in force");
                Ok((version, keys))
            }
            Err(diagnostics) => {
                self.reloads.rejected.fetch_add(1, Ordering::Relaxed);
                self.metrics.record_config_reload(ReloadResult::Rejected);
                for diagnostic in diagnostics.iter().filter(|d| d.is_error()) {
                    warn!("config rejected, last good config stays: {diagnostic}");
                }
                Err(diagnostics)
            }
        }
    }
}

fn snapshot(version: u64, engine: Engine, loaded: local::Loaded) -> Snapshot {
    Snapshot {
        version,
        engine,
        discovered: loaded.discovered,
        config: loaded.config,
        objects: loaded.objects,
        warnings: loaded.warnings,
    }
}

fn log_warnings(warnings: &[Diagnostic]) {
    for warning in warnings {
        warn!("{warning}");
    }
}

/// Watches the config folder and reloads within about 100 ms of a change. The returned watcher
/// must be kept alive.
pub fn watch(store: Arc<Store>) -> notify::Result<Option<notify::RecommendedWatcher>> {
    use notify::{RecursiveMode, Watcher};

    let Some(dir) = store
        .source
        .lock()
        .expect("config source lock")
        .dir()
        .map(|d| d.to_path_buf())
    else {
        return Ok(None);
    };
    let (changed, changes) = std::sync::mpsc::channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            let _ = changed.send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::Recursive)?;
    std::thread::Builder::new()
        .name("config-watch".into())
        .spawn(move || {
            // Editors write a file in several steps: wait for a quiet moment, then reload once.
            while changes.recv().is_ok() {
                while changes.recv_timeout(Duration::from_millis(100)).is_ok() {}
                let _ = store.reload();
            }
        })
        .map_err(notify::Error::io)?;
    Ok(Some(watcher))
}
