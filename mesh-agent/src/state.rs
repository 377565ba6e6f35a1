//! The one store everything the data path reads comes from. Sources change a set of typed
//! objects — the config folder (local mode) or the API server's watches (Kubernetes mode) as
//! the base, `mesh-agent apply`/`delete` as an overlay on it — and the store puts the result in
//! force as one immutable [`Snapshot`]: validated, indexed, compiled into the engine. The proxy
//! loads the current snapshot per request (lock-free); admin reads it.
//!
//! A change is all or nothing: one that breaks a rule is refused with every diagnostic and the
//! last good snapshot stays in force. A change costs what it touches: only the objects that
//! differ are indexed again, and the engine is recompiled only when its input changed.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    config::{
        self, model::MeshConfig, Diagnostic, Object, ObjectKey, ObjectSet, Severity, Sourced,
    },
    discovery::{folder::Folder, Discovered, Index, SourceChange},
    engine::{Engine, EngineSettings, GatewayLabels},
};

/// Everything in force at one moment.
pub struct Snapshot {
    pub version: u64,
    pub engine: Engine,
    pub discovered: Discovered,
    /// Every object in force, for `get` and `/config_dump`.
    pub objects: ObjectSet,
}

impl Snapshot {
    /// What is worth a warning in the objects in force.
    pub fn warnings(&self) -> Vec<Diagnostic> {
        let labels = self.engine.settings().gateway_labels.as_ref();
        self.objects
            .values()
            .flat_map(|o| warnings(o, labels))
            .collect()
    }

    /// The warnings about one object in force (none if it is not in force).
    pub fn warnings_of(&self, key: &ObjectKey) -> Vec<Diagnostic> {
        let labels = self.engine.settings().gateway_labels.as_ref();
        self.objects
            .get(key)
            .map(|o| warnings(o, labels))
            .unwrap_or_default()
    }

    /// The objects in force that have no effect at all, each with the reason: kinds of Istio's
    /// API groups the mesh does not implement, and Gateways the agent's ingress does not serve.
    pub fn ignored(&self) -> impl Iterator<Item = (&Sourced, String)> {
        let labels = self.engine.settings().gateway_labels.as_ref();
        self.objects
            .values()
            .filter_map(move |o| Some((&**o, ignored(o, labels)?)))
    }
}

/// Why an object in force has no effect, if it has none. `labels`: the ingress gateway's, `None`
/// when the agent runs none.
fn ignored(object: &Sourced, labels: Option<&GatewayLabels>) -> Option<String> {
    let Object::Gateway(gateway) = &object.object else {
        return object.ignored();
    };
    let Some(labels) = labels else {
        return Some("this agent runs no ingress gateway (run --ingress): not served".to_owned());
    };
    if labels.selects(&gateway.rule.selector) {
        return None;
    }
    let selector: Vec<String> = gateway
        .rule
        .selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    Some(format!(
        "selector {} does not match the labels of this agent's ingress gateway ({labels}): \
         not served",
        selector.join(", ")
    ))
}

/// An object's warnings: those its reading found, and that the ingress does not serve it.
fn warnings(object: &Sourced, labels: Option<&GatewayLabels>) -> Vec<Diagnostic> {
    let mut warnings = object.warnings.clone();
    if matches!(object.object, Object::Gateway(_)) {
        warnings.extend(ignored(object, labels).map(|reason| {
            Diagnostic {
                severity: Severity::Warning,
                file: object.origin.to_string(),
                object: object.key.to_string(),
                // Without an ingress there is nothing in the object to fix.
                field: if labels.is_some() {
                    "spec.selector"
                } else {
                    ""
                }
                .to_owned(),
                reason,
            }
        }));
    }
    warnings
}

/// Changes applied and refused, served as `mesh_config_reloads_total{result}`.
#[derive(Debug, Default)]
pub struct ReloadCounts {
    pub ok: Counter,
    pub rejected: Counter,
}

impl ReloadCounts {
    /// Registers `reloads_total{result}` (under the caller's prefix: `mesh_config_`).
    fn registered(registry: &mut Registry) -> ReloadCounts {
        let family = Family::<[(&'static str, &'static str); 1], Counter>::default();
        registry.register(
            "reloads",
            "Config changes, applied (ok) or refused (rejected)",
            family.clone(),
        );
        let ok = family.get_or_create(&[("result", "ok")]).clone();
        let rejected = family.get_or_create(&[("result", "rejected")]).clone();
        ReloadCounts { ok, rejected }
    }
}

/// How many source changes one compile takes at most; a longer burst is compiled in steps.
const MAX_BATCH: usize = 1024;
/// A burst of watch events is compiled once: wait this long for the rest of it.
const COALESCE: Duration = Duration::from_millis(20);

pub struct Store {
    current: ArcSwap<Snapshot>,
    state: Mutex<State>,
    pub reloads: ReloadCounts,
}

/// What the sources want, and what is in force.
struct State {
    folder: Option<Folder>,
    /// The source's objects: the folder's, or the API server's.
    base: ObjectSet,
    /// Applied objects; they replace the base's of the same identity.
    applied: ObjectSet,
    /// Deleted base objects, hidden until applied again or the agent restarts.
    deleted: imbl::OrdSet<ObjectKey>,
    /// Objects whose wanted version may differ from the one in force: a refused base change
    /// leaves them here, and the next change tries them again.
    pending: BTreeSet<ObjectKey>,
    in_force: InForce,
    /// The ingress gateway's labels (`None`: no ingress), which decide whether a Gateway is
    /// worth a warning.
    gateway_labels: Option<GatewayLabels>,
}

/// The objects in force and what was derived from them.
#[derive(Clone, Default)]
struct InForce {
    objects: ObjectSet,
    index: Index,
    config: MeshConfig,
}

/// A change that passed every rule, ready to be put in force.
struct Accepted {
    next: InForce,
    /// Whether the engine's input changed.
    recompile: bool,
    /// Warnings the objects it brings in did not have in force already: each is logged once,
    /// when an object appears or its warnings change, not again on every reload or relist.
    warnings: Vec<Diagnostic>,
}

impl Store {
    /// Loads the folder (if any); start-up fails on an invalid folder, naming every problem.
    /// The store's metrics (`mesh_config_*`) and the engine's (`mesh_engine_*`, per-service
    /// counters) are registered on `registry`, the agent's `mesh` sub-registry.
    pub fn open(
        dir: Option<PathBuf>,
        settings: EngineSettings,
        registry: &mut Registry,
    ) -> Result<Store, Vec<Diagnostic>> {
        let mut folder = dir.map(Folder::new);
        let base = match &mut folder {
            Some(folder) => folder.read()?,
            None => ObjectSet::new(),
        };
        let mut state = State {
            folder,
            base,
            applied: ObjectSet::new(),
            deleted: imbl::OrdSet::new(),
            pending: BTreeSet::new(),
            in_force: InForce::default(),
            gateway_labels: settings.gateway_labels.clone(),
        };
        let keys: Vec<ObjectKey> = state.base.keys().cloned().collect();
        let accepted = state.check(keys)?;
        log_warnings(&accepted.warnings);
        let engine = Engine::new(
            &accepted.next.config,
            &accepted.next.index.registry(),
            settings,
            Instant::now(),
        );
        engine.shared_metrics().register(registry);
        let snapshot = state.put_in_force(accepted.next, 1, engine);
        let reloads = ReloadCounts::registered(registry.sub_registry_with_prefix("config"));
        reloads.ok.inc();
        Ok(Store {
            current: ArcSwap::from_pointee(snapshot),
            state: Mutex::new(state),
            reloads,
        })
    }

    /// The snapshot in force. Cheap: an atomic load and an `Arc` clone.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The config folder, if the store reads one.
    pub fn folder(&self) -> Option<PathBuf> {
        self.lock().folder.as_ref().map(|f| f.dir().to_path_buf())
    }

    /// Re-reads the folder; on error the current snapshot stays.
    pub fn reload(&self) -> Result<u64, Vec<Diagnostic>> {
        let mut state = self.lock();
        let Some(folder) = &mut state.folder else {
            return Ok(self.current.load().version);
        };
        let result = folder.read().map(|base| {
            let touched = changed_keys(&state.base, &base);
            state.base = base;
            touched
        });
        let result = result.and_then(|touched| self.settle(&mut state, touched));
        self.count(result)
    }

    /// Kubernetes mode: what the API server's watches reported.
    pub fn change(&self, changes: Vec<SourceChange>) -> Result<u64, Vec<Diagnostic>> {
        let mut state = self.lock();
        let mut touched = Vec::new();
        for change in changes {
            match change {
                SourceChange::Upsert(sourced) => {
                    touched.push(sourced.key.clone());
                    state.base.insert(sourced.key.clone(), sourced);
                }
                SourceChange::Remove(key) => {
                    state.base.remove(&key);
                    touched.push(key);
                }
                SourceChange::Replace {
                    kind,
                    objects,
                    rejected,
                } => {
                    let mut replacement = ObjectSet::new();
                    for sourced in objects {
                        replacement.insert(sourced.key.clone(), sourced);
                    }
                    let gone: Vec<ObjectKey> = config::of_kind(&state.base, &kind)
                        .map(|o| o.key.clone())
                        .filter(|key| !replacement.contains_key(key) && !rejected.contains(key))
                        .collect();
                    for key in gone {
                        state.base.remove(&key);
                        touched.push(key);
                    }
                    for (key, sourced) in replacement {
                        touched.push(key.clone());
                        state.base.insert(key, sourced);
                    }
                }
            }
        }
        let result = self.settle(&mut state, touched);
        self.count(result)
    }

    /// Kubernetes mode: puts what the watches report in force until they end, a burst of
    /// events at a time.
    pub async fn follow(self: Arc<Self>, mut changes: mpsc::Receiver<SourceChange>) {
        let mut batch = Vec::new();
        while changes.recv_many(&mut batch, MAX_BATCH).await > 0 {
            tokio::time::sleep(COALESCE).await;
            while batch.len() < MAX_BATCH {
                match changes.try_recv() {
                    Ok(change) => batch.push(change),
                    Err(_) => break,
                }
            }
            let store = Arc::clone(&self);
            let changes = std::mem::take(&mut batch);
            // Compiling takes milliseconds at worst: off the data path's threads. A refused
            // change is logged; its objects are tried again with the next one.
            let _ = tokio::task::spawn_blocking(move || store.change(changes)).await;
        }
    }

    /// `mesh-agent apply -f`: all objects of `text` or none.
    pub fn apply(&self, label: &str, text: &str) -> Result<(u64, Vec<ObjectKey>), Vec<Diagnostic>> {
        let objects = config::read_text(label, text);
        let mut state = self.lock();
        let result = objects.and_then(|objects| {
            let (applied, deleted) = (state.applied.clone(), state.deleted.clone());
            let mut keys = Vec::new();
            for sourced in objects {
                state.deleted.remove(&sourced.key);
                keys.push(sourced.key.clone());
                state.applied.insert(sourced.key.clone(), Arc::new(sourced));
            }
            self.settle(&mut state, keys.clone())
                .map(|version| (version, keys))
                .inspect_err(|_| (state.applied, state.deleted) = (applied, deleted))
        });
        self.count(result)
    }

    /// `mesh-agent delete -f`: the objects named in `text` (only kind, namespace and name
    /// matter); one that does not exist is an error and nothing changes.
    pub fn delete(
        &self,
        label: &str,
        text: &str,
    ) -> Result<(u64, Vec<ObjectKey>), Vec<Diagnostic>> {
        let keys = keys_of(label, text);
        let mut state = self.lock();
        let result = keys.and_then(|keys| {
            let (applied, deleted) = (state.applied.clone(), state.deleted.clone());
            let mut missing = Vec::new();
            for key in &keys {
                let in_base = state.base.contains_key(key) && !state.deleted.contains(key);
                if state.applied.remove(key).is_none() && !in_base {
                    missing.push(Diagnostic::error(label, &key.to_string(), "not found"));
                }
                if state.base.contains_key(key) {
                    state.deleted.insert(key.clone());
                }
            }
            let result = if missing.is_empty() {
                self.settle(&mut state, keys.clone())
                    .map(|version| (version, keys))
            } else {
                Err(missing)
            };
            result.inspect_err(|_| (state.applied, state.deleted) = (applied, deleted))
        });
        self.count(result)
    }

    /// Checks what `touched` changed and, if every rule holds, puts it in force.
    fn settle(&self, state: &mut State, touched: Vec<ObjectKey>) -> Result<u64, Vec<Diagnostic>> {
        let accepted = state.check(touched)?;
        log_warnings(&accepted.warnings);
        let current = self.current.load();
        let engine = if accepted.recompile {
            let next = &accepted.next;
            current
                .engine
                .reload(&next.config, &next.index.registry(), Instant::now())
        } else {
            current.engine.clone()
        };
        let version = current.version + 1;
        let snapshot = state.put_in_force(accepted.next, version, engine);
        self.current.store(Arc::new(snapshot));
        info!(version, "config in force");
        Ok(version)
    }

    fn count<T>(&self, result: Result<T, Vec<Diagnostic>>) -> Result<T, Vec<Diagnostic>> {
        match &result {
            Ok(_) => {
                self.reloads.ok.inc();
            }
            Err(diagnostics) => {
                self.reloads.rejected.inc();
                for diagnostic in diagnostics.iter().filter(|d| d.is_error()) {
                    warn!("config rejected, last good config stays: {diagnostic}");
                }
            }
        }
        result
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// The object the sources want for `key`.
    fn wanted(&self, key: &ObjectKey) -> Option<&Arc<Sourced>> {
        match self.applied.get(key) {
            Some(applied) => Some(applied),
            None if self.deleted.contains(key) => None,
            None => self.base.get(key),
        }
    }

    /// What is in force once `touched` (and anything still pending) takes what the sources
    /// want, if that breaks no rule. Changes nothing in force either way.
    fn check(&mut self, touched: Vec<ObjectKey>) -> Result<Accepted, Vec<Diagnostic>> {
        let mut keys = std::mem::take(&mut self.pending);
        keys.extend(touched);
        let mut next = self.in_force.clone();
        let (mut registry_changed, mut rules_changed) = (false, false);
        let mut warnings = Vec::new();
        for key in &keys {
            let wanted = self.wanted(key);
            let current = next.objects.get(key);
            match (wanted, current) {
                (Some(wanted), Some(current)) if Arc::ptr_eq(wanted, current) => continue,
                (None, None) => continue,
                _ => {}
            }
            registry_changed |= next.index.apply(key, wanted.map(|w| &w.object));
            rules_changed |= config::is_istio_kind(&key.kind);
            match wanted {
                Some(wanted) => {
                    let labels = self.gateway_labels.as_ref();
                    let found = self::warnings(wanted, labels);
                    let known = current.map(|c| self::warnings(c, labels));
                    if known.as_ref() != Some(&found) {
                        warnings.extend(found);
                    }
                    next.objects.insert(key.clone(), Arc::clone(wanted));
                }
                None => {
                    next.objects.remove(key);
                }
            }
        }
        if rules_changed {
            let rules: Vec<&Sourced> = ["DestinationRule", "VirtualService"]
                .into_iter()
                .flat_map(|kind| config::of_kind(&next.objects, kind))
                .map(|o| &**o)
                .collect();
            let errors = config::check_subsets(&rules, &[]);
            if !errors.is_empty() {
                self.pending = keys;
                return Err(errors.into_iter().map(|e| e.diagnostic).collect());
            }
            next.config = config::mesh_config(&next.objects);
        }
        Ok(Accepted {
            next,
            recompile: registry_changed || rules_changed,
            warnings,
        })
    }

    fn put_in_force(&mut self, next: InForce, version: u64, engine: Engine) -> Snapshot {
        let snapshot = Snapshot {
            version,
            engine,
            discovered: next.index.discovered().clone(),
            objects: next.objects.clone(),
        };
        self.in_force = next;
        snapshot
    }
}

/// Keys whose object differs between two versions of a source's set.
fn changed_keys(old: &ObjectSet, new: &ObjectSet) -> Vec<ObjectKey> {
    let mut keys: Vec<ObjectKey> = new
        .iter()
        .filter(|(key, object)| !old.get(*key).is_some_and(|o| Arc::ptr_eq(o, object)))
        .map(|(key, _)| key.clone())
        .collect();
    keys.extend(old.keys().filter(|key| !new.contains_key(*key)).cloned());
    keys
}

/// The identities named in `text`.
fn keys_of(label: &str, text: &str) -> Result<Vec<ObjectKey>, Vec<Diagnostic>> {
    let documents = config::documents(label, text).map_err(|error| vec![error])?;
    documents
        .iter()
        .map(|document| {
            let value = &document.value;
            match (value["kind"].as_str(), value["metadata"]["name"].as_str()) {
                (Some(kind), Some(name)) => Ok(ObjectKey::new(
                    kind,
                    value["metadata"]["namespace"].as_str(),
                    name,
                )),
                _ => Err(vec![Diagnostic::error(
                    label,
                    "",
                    "every object needs kind and metadata.name",
                )]),
            }
        })
        .collect()
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

    let Some(dir) = store.folder() else {
        return Ok(None);
    };
    let (changed, changes) = std::sync::mpsc::channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            let _ = changed.send(());
        }
    })?;
    watcher.watch(Path::new(&dir), RecursiveMode::Recursive)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Object;

    const SERVICE: &str = "
apiVersion: v1
kind: Service
metadata: {name: service-c}
spec: {clusterIP: 10.96.0.30, ports: [{name: http, port: 8080}]}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: service-c}
spec:
  host: service-c
  subsets:
  - {name: version-v1, labels: {version: v1}}
  - {name: version-v2, labels: {version: v2}}
";

    fn vs(weight_v1: u32, weight_v2: u32) -> String {
        format!(
            "apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: service-c}}
spec:
  hosts: [service-c]
  http:
  - route:
    - {{destination: {{host: service-c, subset: version-v1}}, weight: {weight_v1}}}
    - {{destination: {{host: service-c, subset: version-v2}}, weight: {weight_v2}}}
"
        )
    }

    fn folder(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    fn open(dir: Option<&tempfile::TempDir>) -> Result<Store, Vec<Diagnostic>> {
        Store::open(
            dir.map(|d| d.path().to_path_buf()),
            EngineSettings::default(),
            &mut Registry::default(),
        )
    }

    /// The weights of the VirtualService in force.
    fn weights(store: &Store) -> Option<Vec<u32>> {
        let snapshot = store.snapshot();
        let weights =
            config::of_kind(&snapshot.objects, "VirtualService").find_map(|o| match &o.object {
                Object::VirtualService(vs) => {
                    Some(vs.rule.http[0].route.iter().map(|r| r.weight).collect())
                }
                _ => None,
            });
        weights
    }

    fn kinds(store: &Store) -> Vec<String> {
        let snapshot = store.snapshot();
        snapshot
            .objects
            .keys()
            .map(|k| k.kind.to_string())
            .collect()
    }

    const POLICY: &str = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: shop}
spec: {}
";

    /// The `warn!` lines `f` logs on this thread.
    fn logged_warnings(f: impl FnOnce()) -> Vec<String> {
        #[derive(Clone, Default)]
        struct Lines(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    /// A warning is logged when its object appears (or its warnings change), not again when an
    /// edit elsewhere in its file or a relist hands over an equal copy.
    #[test]
    fn an_object_not_enforced_is_warned_about_once_as_it_appears() {
        let dir = folder(&[("policy.yml", POLICY), ("service.yml", SERVICE)]);
        let mut store = None;
        let at_start = logged_warnings(|| store = Some(open(Some(&dir)).unwrap()));
        let store = store.unwrap();
        assert_eq!(at_start.len(), 1, "{at_start:?}");
        assert!(
            at_start[0].ends_with(
                "policy.yml: AuthorizationPolicy shop/deny-all: kind AuthorizationPolicy is not \
                 implemented by this mesh: not enforced"
            ),
            "{at_start:?}"
        );

        let quiet = logged_warnings(|| {
            store.reload().unwrap();
            // The file is parsed again: a new object, the same warnings.
            std::fs::write(dir.path().join("policy.yml"), format!("{POLICY}# edited\n")).unwrap();
            store.reload().unwrap();
            std::fs::write(dir.path().join("vs.yml"), vs(90, 10)).unwrap();
            store.reload().unwrap();
        });
        assert_eq!(quiet, Vec::<String>::new());
        assert_eq!(store.snapshot().version, 4);

        // Kubernetes mode: a relist reads every object again.
        let watched = open(None).unwrap();
        let relist = || {
            let objects = config::read_text("kubernetes", POLICY).unwrap();
            vec![SourceChange::Replace {
                kind: "AuthorizationPolicy".into(),
                objects: objects.into_iter().map(Arc::new).collect(),
                rejected: vec![],
            }]
        };
        let listed = logged_warnings(|| {
            watched.change(relist()).unwrap();
        });
        assert_eq!(listed.len(), 1, "{listed:?}");
        let relisted = logged_warnings(|| {
            watched.change(relist()).unwrap();
            watched.change(relist()).unwrap();
        });
        assert_eq!(relisted, Vec::<String>::new());

        let another = logged_warnings(|| {
            let second = POLICY.replace("deny-all", "allow-some");
            std::fs::write(dir.path().join("second.yml"), second).unwrap();
            store.reload().unwrap();
        });
        assert_eq!(another.len(), 1, "{another:?}");
        assert!(another[0].contains("shop/allow-some"), "{another:?}");
    }

    #[test]
    fn ignored_lists_kinds_not_implemented_and_gateways_not_served() {
        let gateway = |name: &str, selector: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: Gateway\n\
                 metadata: {{name: {name}}}\nspec:\n  selector: {selector}\n  servers:\n  \
                 - port: {{number: 80, name: http, protocol: HTTP}}\n    hosts: ['*']\n"
            )
        };
        let text = format!(
            "{POLICY}---\n{}---\n{}",
            gateway("tutorial", "{istio: ingressgateway}"),
            gateway("egress", "{istio: egressgateway}")
        );
        let labels = GatewayLabels::new([("istio".to_owned(), "egressgateway".to_owned())]);
        let with_labels = |labels| EngineSettings {
            gateway_labels: labels,
            ..EngineSettings::default()
        };
        let no_match = "does not match the labels of this agent's ingress gateway";
        let no_ingress = "this agent runs no ingress gateway (run --ingress): not served";
        for (settings, not_served, reason) in [
            (EngineSettings::default(), &["egress"][..], no_match),
            (with_labels(Some(labels)), &["tutorial"][..], no_match),
            (with_labels(None), &["egress", "tutorial"][..], no_ingress),
        ] {
            let store = Store::open(None, settings, &mut Registry::default()).unwrap();
            store.apply("objects.yml", &text).unwrap();
            let snapshot = store.snapshot();
            let ignored: Vec<(String, String)> = snapshot
                .ignored()
                .map(|(o, reason)| (o.key.to_string(), reason))
                .collect();
            let mut expected = vec!["AuthorizationPolicy shop/deny-all".to_owned()];
            expected.extend(not_served.iter().map(|n| format!("Gateway default/{n}")));
            let keys: Vec<&str> = ignored.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(keys, expected);
            for (_, why) in &ignored[1..] {
                assert!(
                    why.contains(reason) && why.ends_with(": not served"),
                    "{why}"
                );
            }
        }
    }

    #[test]
    fn apply_replaces_and_delete_removes_by_identity() {
        let dir = folder(&[("service.yml", SERVICE)]);
        let store = open(Some(&dir)).unwrap();
        assert_eq!(kinds(&store), ["DestinationRule", "Service"]);
        assert_eq!(weights(&store), None);

        let (version, keys) = store.apply("1-vs.yml", &vs(100, 0)).unwrap();
        assert_eq!(
            (version, keys[0].to_string()),
            (2, "VirtualService default/service-c".into())
        );
        assert_eq!(weights(&store), Some(vec![100, 0]));
        store.apply("2-vs.yml", &vs(90, 10)).unwrap();
        assert_eq!(weights(&store), Some(vec![90, 10]));

        store.delete("2-vs.yml", &vs(90, 10)).unwrap();
        assert_eq!(weights(&store), None);
        let missing = store.delete("2-vs.yml", &vs(90, 10)).unwrap_err();
        assert_eq!(missing[0].reason, "not found");
        // A folder object can be deleted too, and re-applied.
        store.delete("dr.yml", SERVICE).unwrap();
        assert!(kinds(&store).is_empty());
        assert!(store
            .snapshot()
            .discovered
            .service_at("10.96.0.30:8080".parse().unwrap())
            .is_none());
        store.apply("dr.yml", SERVICE).unwrap();
        assert_eq!(kinds(&store), ["DestinationRule", "Service"]);
    }

    #[test]
    fn an_invalid_apply_changes_nothing_and_names_file_object_field() {
        let dir = folder(&[("service.yml", SERVICE)]);
        let store = open(Some(&dir)).unwrap();
        store.apply("good.yml", &vs(90, 10)).unwrap();
        let version = store.snapshot().version;
        let errors = store.apply("bad.yml", &vs(90, 20)).unwrap_err();
        let error = errors.iter().find(|d| d.is_error()).unwrap();
        assert_eq!(error.file, "bad.yml");
        assert_eq!(error.object, "VirtualService default/service-c");
        assert!(error.field.starts_with("spec.http[0].route"), "{error}");

        // A subset nobody defines is refused too, across objects.
        let unknown = vs(90, 10).replace("version-v2", "version-v3");
        let errors = store.apply("bad.yml", &unknown).unwrap_err();
        assert!(errors[0].reason.contains("unknown subset"), "{errors:?}");
        assert_eq!(store.snapshot().version, version);
        assert_eq!(weights(&store), Some(vec![90, 10]));
        assert_eq!(store.reloads.rejected.get(), 2);
    }

    #[test]
    fn a_bad_folder_is_refused_whole_and_its_fix_is_taken() {
        let dir = folder(&[("a.yml", SERVICE), ("b.yml", SERVICE)]);
        let errors = open(Some(&dir)).err().unwrap();
        assert!(
            errors.iter().any(|d| d.reason.contains("defined again")),
            "{errors:?}"
        );
        std::fs::remove_file(dir.path().join("b.yml")).unwrap();
        let store = open(Some(&dir)).unwrap();
        std::fs::write(dir.path().join("vs.yml"), vs(90, 20)).unwrap();
        assert!(store.reload().is_err());
        assert_eq!(weights(&store), None);
        std::fs::write(dir.path().join("vs.yml"), vs(90, 10)).unwrap();
        store.reload().unwrap();
        assert_eq!(weights(&store), Some(vec![90, 10]));
    }

    /// A change from the API server that breaks a rule waits, and goes in with the change
    /// that mends it.
    #[test]
    fn a_refused_source_change_stays_pending_until_mended() {
        let store = open(None).unwrap();
        let sourced = |label: &str, text: &str| {
            let mut found = config::read_text(label, text).unwrap();
            found.drain(..).map(Arc::new).collect::<Vec<_>>()
        };
        let rule = sourced("kubernetes", SERVICE);
        let route = sourced("kubernetes", &vs(90, 10));
        // The route names subsets no rule defines yet.
        let changes = route.iter().cloned().map(SourceChange::Upsert).collect();
        assert!(store.change(changes).is_err());
        assert_eq!(weights(&store), None);
        let changes = rule.iter().cloned().map(SourceChange::Upsert).collect();
        store.change(changes).unwrap();
        assert_eq!(weights(&store), Some(vec![90, 10]));

        // A relist that finds the route invalid keeps its last good version ...
        let key = route[0].key.clone();
        store
            .change(vec![SourceChange::Replace {
                kind: "VirtualService".into(),
                objects: vec![],
                rejected: vec![key],
            }])
            .unwrap();
        assert_eq!(weights(&store), Some(vec![90, 10]));

        // ... and a relist without the route removes it.
        store
            .change(vec![SourceChange::Replace {
                kind: "VirtualService".into(),
                objects: vec![],
                rejected: vec![],
            }])
            .unwrap();
        assert_eq!(weights(&store), None);
        assert_eq!(kinds(&store), ["DestinationRule", "Service"]);
    }
}
